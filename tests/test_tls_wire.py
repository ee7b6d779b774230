"""TLS over the wire (issue 9): implicit TLS on ``$tls_port``, STLS, real clients, reload, resumption.

Certificates come from ``trustme`` (tests/support/tlscerts.py), never from files in the
repository. Every client fetches the same messages, with the same sizes and UIDLs, over
plain POP3, implicit TLS and STLS.
"""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.client import RawClient, check_stls_discards_pipelined_input
from tests.support.procs import wait_for, worker_titles
from tests.support.server import IS_ROOT, MAIL_GID, MAIL_UID, MailEnv, Server, chown_tree, free_port, make_message
from tests.support.tlscerts import CertFiles, issue

BODIES = [make_message(f"tls{i}", f"body {i}\n.dot line\nlast\n") for i in range(3)]


@dataclass
class TLSServer:
    """A running tpops with a certificate: ``port`` (plain, STLS) and ``tls_port`` (implicit)."""

    server: Server
    env: MailEnv
    certs: CertFiles
    tls_port: int

    @property
    def port(self) -> int:
        return self.server.port

    def context(self) -> ssl.SSLContext:
        return self.certs.client_context()

    def error_log(self) -> str:
        """What tpops logged: $error_log, and in the foreground its stderr (info lines)."""
        text = self.env.error_log.read_text(errors="replace") if self.env.error_log.exists() else ""
        return text + self.server.output()


def start(env: MailEnv, certs: CertFiles, *args: str, **conf: str) -> TLSServer:
    tls_port = free_port()
    env.write_conf(tls_cert_file=repr(str(certs.cert_file)), tls_key_file=repr(str(certs.key_file)),
                   tls_port=str(tls_port), **conf)
    return TLSServer(Server(env, *args).start(), env, certs, tls_port)


@pytest.fixture
def tls(mail_env: MailEnv) -> Iterator[TLSServer]:
    mail_env.add_user("alice", "secret", BODIES)
    certs = issue(mail_env.base, "rsa", name="rsa")
    srv = start(mail_env, certs)
    try:
        yield srv
    finally:
        srv.server.stop()


def listing(client: poplib.POP3) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """LIST, UIDL and every message as one client sees them."""
    sizes = client.list()[1]
    uids = client.uidl()[1]
    messages = [b"\n".join(client.retr(i + 1)[1]) for i in range(len(sizes))]
    return sizes, uids, messages


def poplib_plain(port: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("alice")
    client.pass_("secret")
    try:
        return listing(client)
    finally:
        client.quit()


# ---------------------------------------------------------------- poplib


def test_poplib_implicit_tls_and_stls_see_what_plain_sees(tls: TLSServer) -> None:
    plain = poplib_plain(tls.port)
    assert len(plain[0]) == 3

    implicit = poplib.POP3_SSL("127.0.0.1", tls.tls_port, context=tls.context(), timeout=10)
    assert "STLS" not in implicit.capa()  # already TLS
    assert implicit.sock.version() in ("TLSv1.2", "TLSv1.3")
    implicit.user("alice")
    implicit.pass_("secret")
    assert listing(implicit) == plain
    implicit.quit()

    client = poplib.POP3("127.0.0.1", tls.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(tls.context())
    assert "STLS" not in client.capa()  # recomputed after the upgrade
    client.user("alice")
    client.pass_("secret")
    assert listing(client) == plain
    client.quit()

    wait_for(lambda: "(STLS: TLSv1.3 " in tls.error_log() or "(STLS: TLSv1.2 " in tls.error_log(),
             what="the STLS login line")
    log = tls.error_log()
    assert "login: alice has 3 messages" in log
    assert "from 127.0.0.1 (TLS: TLSv1.3 TLS_" in log
    assert "from 127.0.0.1 (plain)" in log


def test_a_second_stls_and_stls_on_the_tls_port_are_refused(tls: TLSServer) -> None:
    client = poplib.POP3_SSL("127.0.0.1", tls.tls_port, context=tls.context(), timeout=10)
    with pytest.raises(poplib.error_proto, match="Command not permitted when TLS active"):
        client._shortcmd("STLS")
    client.quit()
    client = poplib.POP3("127.0.0.1", tls.port, timeout=10)
    client.stls(tls.context())
    with pytest.raises(poplib.error_proto, match="Command not permitted when TLS active"):
        client._shortcmd("STLS")
    client.quit()


def test_stls_injection_pipelined_commands_are_discarded(tls: TLSServer) -> None:
    """``STLS\\r\\nCAPA\\r\\n`` in one packet: CAPA is never answered, inside TLS or before it."""
    check_stls_discards_pipelined_input(tls.port, tls.context())


# ---------------------------------------------------------------- handshake failures


def test_garbage_instead_of_a_client_hello_is_logged_and_the_worker_goes_on(mail_env: MailEnv) -> None:
    mail_env.add_user("alice", "secret", BODIES)
    srv = start(mail_env, issue(mail_env.base), min_servers="1", max_servers="1")
    try:
        with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as s:
            s.sendall(b"USER alice\r\nPASS secret\r\n" + b"x" * 300)
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass  # our unread junk made the close a reset
            assert b"+OK" not in data  # never a POP3 greeting in the clear
        wait_for(lambda: "TLS handshake failed from 127.0.0.1: the client did not send a TLS ClientHello"
                 in srv.error_log(), what="the handshake failure in the log")
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=srv.context(), timeout=10)
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 3
        client.quit()
    finally:
        srv.server.stop()


def test_a_client_stalling_mid_handshake_is_cut_at_command_timeout(mail_env: MailEnv) -> None:
    mail_env.add_user("alice", "secret", BODIES)
    srv = start(mail_env, issue(mail_env.base), command_timeout="2", min_servers="1", max_servers="1")
    try:
        staller = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        staller.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello record header that never completes
        time.sleep(0.3)
        started = time.monotonic()
        # The only worker is busy with the staller; this client is served once it is cut.
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=srv.context(), timeout=15)
        waited = time.monotonic() - started
        assert 0.5 < waited < 6, waited
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 3
        client.quit()
        assert staller.recv(100) == b""  # cut
        staller.close()
        assert "TLS handshake failed from 127.0.0.1: the client did not complete the handshake within " \
               "$command_timeout" in srv.error_log()
    finally:
        srv.server.stop()


def test_a_failed_stls_handshake_ends_only_that_connection(tls: TLSServer) -> None:
    c = RawClient(tls.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.send(b"not a client hello\r\n" * 20)
    assert c.closed()
    c.close()
    wait_for(lambda: "TLS handshake failed from 127.0.0.1" in tls.error_log(), what="the log line")
    assert "disconnect from 127.0.0.1 (TLS handshake failed)" in tls.error_log()
    assert poplib_plain(tls.port)[0]



def test_sigterm_during_an_stls_handshake_writes_no_clear_text(mail_env: MailEnv) -> None:
    """After STLS's +OK the client speaks TLS: a stop that cuts the handshake must end
    the connection without the clear-text "-ERR [SYS/TEMP] Server shutting down." that
    ends every other interrupted session (the client would read it as a broken record)."""
    mail_env.add_user("alice", "secret", BODIES)
    srv = start(mail_env, issue(mail_env.base), min_servers="1", max_servers="1")
    try:
        c = RawClient(srv.port)
        assert c.cmd("STLS").startswith(b"+OK")  # then no ClientHello: the worker waits in the handshake
        master = srv.server.proc.pid
        wait_for(lambda: any(t.endswith("(TLS handshake)") for t in worker_titles(master).values()),
                 what="the worker in the STLS handshake")
        os.kill(master, signal.SIGTERM)
        c.sock.settimeout(10)
        rest = b""
        while chunk := c.sock.recv(4096):
            rest += chunk
        assert rest == b"", rest
        c.close()
        assert srv.server.proc.wait(15) == 0
        assert "disconnect from 127.0.0.1 (server shutdown)" in srv.error_log()
    finally:
        srv.server.stop()

# ---------------------------------------------------------------- reload, resumption


def served_certificate(port: int, ca_file: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_reload_serves_a_new_certificate_and_keeps_the_old_one_when_broken(tls: TLSServer) -> None:
    assert tls.server.proc is not None
    first = served_certificate(tls.tls_port, tls.certs.ca_file)
    assert first == tls.certs.leaf_der
    renewed = issue(tls.env.base, "rsa", ca=tls.certs.ca, name="renewed")
    shutil.copy(renewed.cert_file, tls.certs.cert_file)  # certbot renews in place
    shutil.copy(renewed.key_file, tls.certs.key_file)
    os.kill(tls.server.proc.pid, signal.SIGHUP)
    wait_for(lambda: served_certificate(tls.tls_port, tls.certs.ca_file) == renewed.leaf_der,
             what="the renewed certificate served")
    # A broken one (a key that does not match): the reload is refused, the renewed one stays.
    other = issue(tls.env.base, "rsa", name="other")
    shutil.copy(other.key_file, tls.certs.key_file)
    os.kill(tls.server.proc.pid, signal.SIGHUP)
    wait_for(lambda: "certificate not reloaded" in tls.error_log(), what="the refused reload")
    assert f"{tls.certs.key_file}: the private key does not match the certificate" in tls.error_log()
    time.sleep(0.5)
    for _ in range(3):
        assert served_certificate(tls.tls_port, tls.certs.ca_file) == renewed.leaf_der
    assert served_certificate(tls.tls_port, tls.certs.ca_file) != first


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_session_resumption_across_workers(tls: TLSServer, version: ssl.TLSVersion) -> None:
    context = tls.context()
    context.maximum_version = version
    first = poplib.POP3_SSL("127.0.0.1", tls.tls_port, context=context, timeout=10)
    first.user("alice")
    first.pass_("secret")
    first.stat()  # TLS 1.3 tickets arrive after the handshake: read something first
    session = first.sock.session
    assert session is not None
    # The first connection stays open, so its worker is busy: another worker takes this one.
    with socket.create_connection(("127.0.0.1", tls.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost", session=session) as again:
        assert again.session_reused
        assert again.recv(100).startswith(b"+OK")
        again.sendall(b"QUIT\r\n")
    first.quit()


# ---------------------------------------------------------------- real clients


def test_openssl_s_client_implicit_and_starttls(tls: TLSServer) -> None:
    assert shutil.which("openssl")
    script = b"USER alice\nPASS secret\nLIST\nUIDL\nQUIT\n"
    plain = RawClient(tls.port)
    plain.login("alice")
    plain_list = plain.multi("LIST")[1]
    plain_uidl = plain.multi("UIDL")[1]
    plain.cmd("QUIT")
    for extra in (["-connect", f"127.0.0.1:{tls.tls_port}"],
                  ["-connect", f"127.0.0.1:{tls.port}", "-starttls", "pop3"]):
        result = subprocess.run(["openssl", "s_client", *extra, "-CAfile", str(tls.certs.ca_file),
                                 "-verify_return_error", "-servername", "localhost", "-crlf", "-quiet",
                                 "-ign_eof"], input=script, capture_output=True, timeout=30)
        out = result.stdout.replace(b"\r\n", b"\n")
        assert b"+OK Logged in, 3 messages" in out, result
        assert plain_list.replace(b"\r\n", b"\n") in out and plain_uidl.replace(b"\r\n", b"\n") in out


def test_a_fullchain_file_serves_leaf_and_intermediate(mail_env: MailEnv) -> None:
    """A certificate file as certbot writes it (leaf, then the intermediate): a client that
    trusts only the root verifies the chain, so tpops sends the intermediate too."""
    mail_env.add_user("alice", "secret", BODIES)
    certs = issue(mail_env.base, "rsa", name="chained", intermediate=True)
    assert certs.cert_file.read_bytes().count(b"-----BEGIN CERTIFICATE-----") == 2
    srv = start(mail_env, certs, min_servers="1", max_servers="2")
    try:
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=certs.client_context(), timeout=10)
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK Logged in, 3 messages")
        client.quit()
        result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-starttls", "pop3",
                                 "-CAfile", str(certs.ca_file), "-verify_return_error", "-showcerts"],
                                input=b"QUIT\r\n", capture_output=True, timeout=30)
        assert b"Verify return code: 0 (ok)" in result.stdout, result
        assert result.stdout.count(b"-----BEGIN CERTIFICATE-----") == 2  # the chain the server sent
    finally:
        srv.server.stop()


def curl(*args: str) -> str:
    result = subprocess.run(["curl", "-sS", "--max-time", "20", "-u", "alice:secret", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_curl_pop3s_and_stls(tls: TLSServer) -> None:
    ca = ["--cacert", str(tls.certs.ca_file)]
    for what in ([], ["-X", "UIDL"], ["2"]):
        plain = curl(f"pop3://127.0.0.1:{tls.port}/", *what) if not what or what[0] != "2" \
            else curl(f"pop3://127.0.0.1:{tls.port}/2")
        url_tail = "2" if what == ["2"] else ""
        extra = [] if what == ["2"] else what
        assert curl(f"pop3s://localhost:{tls.tls_port}/{url_tail}", *ca, *extra) == plain
        assert curl(f"pop3://localhost:{tls.port}/{url_tail}", "--ssl-reqd", *ca, *extra) == plain
        assert plain
    assert "(STLS: TLSv1.3" in tls.error_log() and "(TLS: TLSv1.3" in tls.error_log()


def got_bodies(directory: Path) -> list[bytes]:
    return sorted(p.read_bytes().replace(b"\r\n", b"\n") for p in directory.rglob("*") if p.is_file())


def assert_same_messages(got: list[bytes]) -> None:
    assert len(got) == 3, got
    for body in BODIES:
        assert sum(1 for g in got if g.endswith(body.split(b"\n\n", 1)[1]) and b"Subject: " in g) >= 1


@pytest.mark.parametrize("mode", ["ssl", "stls"])
def test_fetchmail(tls: TLSServer, tmp_path: Path, mode: str) -> None:
    assert shutil.which("fetchmail"), "fetchmail is installed by scripts/test"
    out_dir = tmp_path / "got"
    out_dir.mkdir()
    port, options = (tls.tls_port, "ssl sslcertck") if mode == "ssl" else (tls.port, "sslproto tls1.2+ sslcertck")
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"set no syslog\npoll localhost protocol pop3 port {port} auth password\n"
        f"  user alice password secret is root here\n"
        f"  {options} sslcertfile {tls.certs.ca_file}\n"
        f"  mda \"/bin/sh -c 'cat > {out_dir}/msg.$$'\"\n  keep\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "-v"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_messages(got_bodies(out_dir))
    assert ("(TLS: " if mode == "ssl" else "(STLS: ") in tls.error_log()


@pytest.mark.parametrize("starttls", ["off", "on"])
def test_mpop(tls: TLSServer, tmp_path: Path, starttls: str) -> None:
    assert shutil.which("mpop"), "mpop is installed by scripts/test"
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    rc = tmp_path / "mpoprc"
    rc.write_text(
        f"account default\nhost localhost\nport {tls.tls_port if starttls == 'off' else tls.port}\n"
        f"user alice\npassword secret\nauth user\ntls on\ntls_starttls {starttls}\n"
        f"tls_trust_file {tls.certs.ca_file}\nkeep on\ndelivery maildir {maildir}\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(["mpop", "-C", str(rc), "-a"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_messages(got_bodies(maildir))


def test_getmail6_ssl_retriever(tls: TLSServer, tmp_path: Path) -> None:
    assert shutil.which("getmail"), "getmail6 is installed by scripts/test"
    maildir = tls.env.base / "getmail-Maildir"  # mail_env's base is world-readable; tmp_path is not
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    owner = ""
    if IS_ROOT:  # getmail refuses to deliver as root
        owner = "user = nobody\n"
        chown_tree(maildir, MAIL_UID, MAIL_GID)
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = localhost\n"
        f"port = {tls.tls_port}\nusername = alice\npassword = secret\n"
        f"ca_certs = {tls.certs.ca_file}\n\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\n{owner}\n"
        "[options]\nread_all = true\ndelete = false\nverbose = 0\n"
    )
    result = subprocess.run(["getmail", "--getmaildir", str(tmp_path), "--rcfile", str(rc)],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_messages(got_bodies(maildir))
    assert "(TLS: " in tls.error_log()


def test_large_and_gathered_replies_go_through_tls(mail_env: MailEnv) -> None:
    """The plain transport's zero-copy paths (``sendfile`` for a large verbatim message,
    ``writev`` for gathered chunks) must never bypass TLS: RETR of such messages over TLS
    gives what plain POP3 gives, octet for octet."""
    big = b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a big CRLF message\r\n" % i for i in range(12_000))
    medium = [make_message(f"m{i}", ("x" * 70 + "\n") * 300) for i in range(6)]
    mail_env.add_user("alice", "secret", [big, *medium])
    srv = start(mail_env, issue(mail_env.base))
    try:
        plain = poplib_plain(srv.port)
        assert any(len(m) > 128 * 1024 for m in plain[2])
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=srv.context(), timeout=10)
        client.user("alice")
        client.pass_("secret")
        assert listing(client) == plain
        # Pipelined: several RETRs answered in one gathered write.
        client.sock.sendall(b"".join(b"RETR %d\r\n" % i for i in range(2, 8)))
        for i in range(2, 8):
            assert client._getlongresp()[1] == plain[2][i - 1].split(b"\n")  # noqa: SLF001
        client.quit()
    finally:
        srv.server.stop()
