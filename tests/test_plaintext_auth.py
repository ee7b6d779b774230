"""``$disable_plaintext_auth`` (issue 9): no password in clear on a connection that is
neither TLS nor from this host, in the AUTHORIZATION state and over the wire.

The non-loopback case over loopback: a trusted balancer (``$haproxy_trusted_networks``
= 127.0.0.1) names a client at 192.0.2.1 in a PROXY v1 header, so tpops sees a real
non-loopback, non-TLS connection.
"""

from __future__ import annotations

import dataclasses
import poplib
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy import wait_for_proxied_port
from tests.support.server import MailEnv, Server, free_port, make_message
from tests.support.tlscerts import issue
from tpops.arbiter import warn_plaintext
from tpops.auth.credentials import BackendCaps
from tpops.authorization import Authorization
from tpops.config import Config
from tpops.connection import IMPLICIT_TLS, STARTTLS, Connection

REFUSED = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections."


class NoBackend:
    """An authenticator that must never be asked (the refusal comes first)."""

    name = "none"
    supports_apop = True
    sasl_caps = BackendCaps(clear_secrets=True, scram=True)  # so CAPA's SASL line shows what is refused

    def authenticate(self, login: str, password: bytes) -> None:
        raise AssertionError("a refused password reached the backend")

    def authenticate_apop(self, login: str, timestamp: str, digest: str) -> None:
        raise AssertionError("a refused APOP reached the backend")

    def clear_secret(self, login: str) -> None:
        raise AssertionError("a refused AUTH reached the backend")

    def scram_credentials(self, login: str) -> None:
        raise AssertionError("a refused AUTH reached the backend")


def authorization(connection: Connection, **config: object) -> Authorization:
    settings = dataclasses.replace(Config(), **config)  # type: ignore[arg-type]
    return Authorization(settings, NoBackend(), connection.peer, connection=connection,  # type: ignore[arg-type]
                         timestamp="<1.2@test>")


def capa(auth: Authorization) -> list[str]:
    reply = auth.execute("CAPA", "")
    assert reply is not None and reply.lines is not None
    return list(reply.lines)


@pytest.mark.parametrize("peer", ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"])
def test_refused_on_a_remote_plain_connection(peer: str) -> None:
    auth = authorization(Connection(peer), disable_plaintext_auth=True)
    for verb, rest in (("USER", "alice"), ("PASS", "secret"), ("APOP", "alice 0123456789abcdef")):
        reply = auth.execute(verb, rest)
        assert reply is not None and reply.status_line() == REFUSED, verb
        assert not reply.bad and not reply.auth_failed
    assert auth.pending_user is None and auth.attempted_login is None
    assert "USER" not in capa(auth)
    assert "SASL SCRAM-SHA-256" in capa(auth)  # the mechanisms that send the secret are gone
    reply = auth.execute("AUTH", "PLAIN")
    assert reply is not None and reply.status_line() == REFUSED


@pytest.mark.parametrize("connection", [
    Connection("127.0.0.1"), Connection("::1"), Connection("::ffff:127.0.0.1"),
    Connection("192.0.2.1", IMPLICIT_TLS), Connection("192.0.2.1", STARTTLS),
])
def test_allowed_on_loopback_and_tls(connection: Connection) -> None:
    auth = authorization(connection, disable_plaintext_auth=True)
    reply = auth.execute("USER", "alice")
    assert reply is not None and reply.status_line() == "+OK Send your password."
    assert "USER" in capa(auth)
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capa(auth)


def test_off_allows_everything_and_the_default_follows_the_certificate() -> None:
    auth = authorization(Connection("192.0.2.1"), disable_plaintext_auth=False)
    assert auth.execute("USER", "alice").ok  # type: ignore[union-attr]
    assert "USER" in capa(auth)
    assert authorization(Connection("192.0.2.1")).plaintext_allowed()  # nil, no certificate: TPOPS
    assert not authorization(Connection("192.0.2.1"), tls_cert_file="/c", tls_key_file="/k").plaintext_allowed()


def test_the_startup_warning_names_exposed_listeners(caplog: pytest.LogCaptureFixture) -> None:
    # Bound, never listening: getsockname is all the check needs.
    with socket.socket() as exposed, socket.socket() as local:
        exposed.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        off = dataclasses.replace(Config(), disable_plaintext_auth=False)
        on = dataclasses.replace(Config(), disable_plaintext_auth=True)
        assert not warn_plaintext(off, [local])
        assert not warn_plaintext(on, [exposed, local])
        with caplog.at_level("WARNING"):
            assert warn_plaintext(off, [exposed, local])
    assert "passwords travel in clear: listening on 0.0.0.0:" in caplog.text
    assert "127.0.0.1" not in caplog.text


def proxied(port: int, client: str = "192.0.2.1") -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 5555 110\r\n".encode())
    return sock, sock.makefile("rb")


def exchange(sock: socket.socket, file: object, line: str) -> bytes:
    sock.sendall(line.encode() + b"\r\n")
    return file.readline()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("disabled", [True, False])
def test_over_the_wire_behind_a_trusted_balancer(mail_env: MailEnv, tmp_path: Path, disabled: bool) -> None:
    mail_env.add_user("alice", "secret", [make_message()])
    certs = issue(mail_env.base)
    mail_env.write_conf(haproxy_trusted_networks="'127.0.0.1'", tls_cert_file=repr(str(certs.cert_file)),
                        tls_key_file=repr(str(certs.key_file)), tls_port=str(free_port()),
                        disable_plaintext_auth="true" if disabled else "false")
    srv = Server(mail_env)
    srv.stderr = srv.stderr_path.open("wb")
    srv.proc = subprocess.Popen(srv.args, stdin=subprocess.DEVNULL, stdout=srv.stderr, stderr=srv.stderr)
    try:
        wait_for_proxied_port(srv.port, srv.proc)
        sock, file = proxied(srv.port)
        assert file.readline().startswith(b"+OK")  # type: ignore[attr-defined]
        sock.sendall(b"CAPA\r\n")
        caps = []
        while (line := file.readline()) != b".\r\n":  # type: ignore[attr-defined]
            caps.append(line.strip())
        assert (b"USER" not in caps) is disabled and b"STLS" in caps
        answer = exchange(sock, file, "USER alice")
        if disabled:
            assert answer.decode().strip() == REFUSED
            assert exchange(sock, file, "PASS secret").decode().strip() == REFUSED
            # After STLS the same client may log in with USER/PASS.
            assert exchange(sock, file, "STLS") == b"+OK Begin TLS negotiation.\r\n"
            tls_sock = certs.client_context().wrap_socket(sock, server_hostname="localhost")
            client = poplib.POP3.__new__(poplib.POP3)  # poplib over the already upgraded socket
            client._debugging, client.encoding, client.sock = 0, "UTF-8", tls_sock
            client.file = tls_sock.makefile("rb")
            client._tls_established = True
            assert "USER" in client.capa()
            client.user("alice")
            assert client.pass_("secret").startswith(b"+OK Logged in")
            client.quit()
        else:
            assert answer == b"+OK Send your password.\r\n"
            assert exchange(sock, file, "PASS secret").startswith(b"+OK Logged in")
            exchange(sock, file, "QUIT")
        sock.close()
    finally:
        srv.stop()
    assert "login: alice has 1 messages (" in srv.output()
    assert ("from 192.0.2.1 (STLS: TLSv1.3" in srv.output()) is disabled
