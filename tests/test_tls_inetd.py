"""TLS under ``tpops --inetd``: implicit TLS on ``$tls_port``, STLS elsewhere, nothing on pipes.

An inetd ``nowait`` service is played by :class:`Inetd`: it accepts on a loopback port and
runs one ``tpops --inetd`` per connection with the connected socket as stdin and stdout,
as inetd(8) and systemd's ``Accept=yes`` do. The same tpops.conf serves the daemon, so a
certificate configured there must not leave inetd clients without TLS (and, with
``$disable_plaintext_auth`` on by default once a certificate is set, without a login).
"""

from __future__ import annotations

import poplib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.client import check_stls_discards_pipelined_input
from tests.support.server import TPOPS, MailEnv, free_port, make_message, run_inetd
from tests.support.tlscerts import CertFiles, issue

BODIES = [make_message(f"inetd{i}", f"body {i}\n.dot line\n") for i in range(2)]


class Inetd:
    """inetd's ``nowait`` service on a loopback port: ``tpops --inetd`` per connection."""

    def __init__(self, env: MailEnv) -> None:
        self.env = env
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stderr_path = env.base / "inetd-stderr.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> Inetd:
        self.thread.start()
        return self

    def _accept(self) -> None:
        with self.stderr_path.open("ab") as stderr:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except OSError:  # closed by stop()
                    return
                with conn:
                    self.procs.append(subprocess.Popen([TPOPS, "--inetd", "-f", str(self.env.conf)],
                                                       stdin=conn.fileno(), stdout=conn.fileno(), stderr=stderr))

    def stop(self) -> list[int | None]:
        """Stop accepting; each session's exit status (a hung one is killed and fails the test)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        except OSError:
            pass  # stopped before
        self.listener.close()
        if self.thread.is_alive():
            self.thread.join(10)
        statuses = []
        for proc in self.procs:
            try:
                statuses.append(proc.wait(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                statuses.append(None)
        return statuses

    def log(self) -> str:
        """What the sessions logged ($error_log) and wrote to stderr."""
        text = self.env.error_log.read_text(errors="replace") if self.env.error_log.exists() else ""
        return text + self.stderr_path.read_text(errors="replace")


@pytest.fixture
def certs(mail_env: MailEnv) -> CertFiles:
    mail_env.add_user("alice", "secret", BODIES)
    return issue(mail_env.base, "rsa", name="inetd")


def configure(env: MailEnv, certs: CertFiles, tls_port: int, **extra: str) -> None:
    settings = {"tls_cert_file": repr(str(certs.cert_file)), "tls_key_file": repr(str(certs.key_file)),
                "tls_port": str(tls_port), **extra}
    env.write_conf(**settings)


@pytest.fixture
def inetd(mail_env: MailEnv) -> Iterator[Inetd]:
    service = Inetd(mail_env)
    try:
        yield service
    finally:
        service.stop()


def listing(client: poplib.POP3) -> tuple[list[bytes], list[bytes], list[bytes]]:
    sizes = client.list()[1]
    uids = client.uidl()[1]
    return sizes, uids, [b"\n".join(client.retr(i + 1)[1]) for i in range(len(sizes))]


def test_implicit_tls_on_the_tls_port_stls_on_another(mail_env: MailEnv, certs: CertFiles, inetd: Inetd) -> None:
    # The inetd port is $tls_port: implicit TLS, as for pop3s in inetd.conf.
    configure(mail_env, certs, inetd.port)
    inetd.start()
    client = poplib.POP3_SSL("127.0.0.1", inetd.port, context=certs.client_context(), timeout=10)
    assert client.sock.version() == "TLSv1.3"
    assert "STLS" not in client.capa()
    client.user("alice")
    client.pass_("secret")
    implicit = listing(client)
    client.quit()
    assert len(implicit[0]) == len(implicit[1]) == 2 and all(b".dot line" in m for m in implicit[2])

    # Any other port: the greeting in clear, STLS offered; after it the same mailbox.
    configure(mail_env, certs, free_port())
    client = poplib.POP3("127.0.0.1", inetd.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(certs.client_context())
    assert client.sock.version() == "TLSv1.3"
    assert "STLS" not in client.capa()
    client.user("alice")
    client.pass_("secret")
    assert listing(client) == implicit
    client.quit()

    assert inetd.stop() == [0, 0]
    assert inetd.log() == ""  # no warning, no error; info lines go to syslog only (off here)
    access = mail_env.access_log.read_text().splitlines()
    assert len(access) == 2 and all(" alice " in line for line in access)


def test_stls_injection_is_discarded_under_inetd(mail_env: MailEnv, certs: CertFiles, inetd: Inetd) -> None:
    """``STLS\\r\\nCAPA\\r\\n`` in one packet: the CAPA typed in clear is never answered."""
    configure(mail_env, certs, free_port())
    inetd.start()
    check_stls_discards_pipelined_input(inetd.port, certs.client_context())
    assert inetd.stop() == [0]


def test_garbage_on_the_tls_port_is_logged_and_answered_with_nothing(mail_env: MailEnv, certs: CertFiles,
                                                                       inetd: Inetd) -> None:
    configure(mail_env, certs, inetd.port)
    inetd.start()
    with socket.create_connection(("127.0.0.1", inetd.port), timeout=10) as raw:
        raw.sendall(b"USER alice\r\n")  # clear text where a ClientHello belongs
        raw.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := raw.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass  # closed with our clear text unread: a reset, also an end
    assert b"+OK" not in answer and b"-ERR" not in answer  # at most a TLS alert, never clear text
    assert inetd.stop() == [0]
    assert "TLS handshake failed from 127.0.0.1" in inetd.log()


def test_the_tls_port_without_a_certificate_is_refused_not_served_in_clear(mail_env: MailEnv,
                                                                            inetd: Inetd) -> None:
    mail_env.add_user("alice", "secret", BODIES)
    mail_env.write_conf(tls_port=str(inetd.port))  # no $tls_cert_file
    inetd.start()
    with socket.create_connection(("127.0.0.1", inetd.port), timeout=10) as raw:
        assert raw.recv(4096) == b""  # closed without a clear-text greeting
    assert inetd.stop() == [3]
    assert (f"cannot start the session: a connection to the implicit-TLS port {inetd.port} ($tls_port), "
            "but no certificate is configured") in inetd.log()


def test_a_broken_certificate_is_reported_and_the_client_told(mail_env: MailEnv, certs: CertFiles,
                                                               inetd: Inetd, tmp_path: Path) -> None:
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    configure(mail_env, certs, free_port(), tls_key_file=repr(str(broken)))
    inetd.start()
    with socket.create_connection(("127.0.0.1", inetd.port), timeout=10) as raw:
        assert raw.makefile("rb").readline() == b"-ERR [SYS/TEMP] Server not available.\r\n"
    assert inetd.stop() == [3]
    assert f"cannot start the session: {broken}: " in inetd.log()


def test_pipes_cannot_carry_tls_so_no_stls_is_offered(mail_env: MailEnv, certs: CertFiles) -> None:
    configure(mail_env, certs, free_port())
    out = run_inetd(mail_env, b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS secret\r\nQUIT\r\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    caps = lines[2:lines.index(b".")]
    assert b"STLS" not in caps and b"USER" in caps  # pipes from a local program count as local
    after = lines[lines.index(b".") + 1:]
    assert after[0].startswith(b"-ERR") and b"STLS" not in caps
    assert after[2].startswith(b"+OK Logged in")
