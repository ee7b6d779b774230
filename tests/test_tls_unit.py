"""Unit tests of tpops.tls: loading certificates, real handshakes, resumption across forked workers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.tlscerts import CertFiles, ecdsa_certs, issue, rsa_certs  # noqa: F401  (fixtures)
from tpops import tls
from tpops.config import Config, ConfigError, check_config, parse_config

GREETING = b"+OK tpops ready\r\n"


def serve_one(server: tls.ServerTLS, sock: socket.socket) -> dict[str, object]:
    """Handshake as the server on ``sock`` in a thread; the result dict fills in when done."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            with server.context.wrap_socket(sock, server_side=True) as conn:
                result["session"] = tls.describe_session(conn)
                conn.sendall(GREETING)
                conn.recv(100)
        except (ssl.SSLError, OSError) as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def handshake(server: tls.ServerTLS, client_context: ssl.SSLContext
              ) -> tuple[ssl.SSLSocket, dict[str, object]]:
    """A real handshake over a socketpair; the client socket (greeting read) and the server's result."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = serve_one(server, b)
    client = client_context.wrap_socket(a, server_hostname="localhost")
    assert client.recv(100) == GREETING
    return client, result


# ---------------------------------------------------------------- loading and serving

@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_handshake_serves_the_configured_certificate(tmp_path: Path, kind: str) -> None:
    certs = issue(tmp_path, kind)
    server = tls.load_server_tls(str(certs.cert_file), str(certs.key_file))
    client, result = handshake(server, certs.client_context())
    with client:
        assert client.getpeercert(binary_form=True) == certs.leaf_der
        assert client.version() in ("TLSv1.2", "TLSv1.3")
        desc = tls.describe_session(client)
        assert re.fullmatch(r"TLSv1\.[23] [A-Z0-9_-]+", desc), desc
        assert desc.split()[1] == client.cipher()[0]
    result["thread"].join(10)  # type: ignore[attr-defined]
    assert result["session"] == desc
    assert "error" not in result
    assert server.cert_file == str(certs.cert_file)
    assert "localhost" in server.subject and "valid until 3000-01-01" in server.subject


def test_chain_is_sent_and_client_verifies_host_name(rsa_certs: CertFiles) -> None:
    server = tls.load_server_tls(str(rsa_certs.cert_file), str(rsa_certs.key_file))
    context = rsa_certs.client_context()
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = serve_one(server, b)
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        context.wrap_socket(a, server_hostname="pop.example.org")
    result["thread"].join(10)  # type: ignore[attr-defined]
    assert "does not trust" in tls.describe_handshake_error(result["error"]) or \
        "rejected our certificate" in tls.describe_handshake_error(result["error"])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_end_point_is_sha256_of_the_leaf(tmp_path: Path, kind: str) -> None:
    certs = issue(tmp_path, kind)
    server = tls.load_server_tls(str(certs.cert_file), str(certs.key_file))
    # trustme signs with SHA-256, so RFC 5929 says: SHA-256 of the DER certificate.
    assert server.end_point == hashlib.sha256(certs.leaf_der).digest()
    assert tls.server_end_point(certs.leaf_der) == server.end_point


def test_end_point_upgrades_sha1_and_keeps_sha384() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(algorithm: hashes.HashAlgorithm) -> bytes:
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, algorithm))
        return cert.public_bytes(serialization.Encoding.DER)

    der384 = make(hashes.SHA384())
    assert tls.server_end_point(der384) == hashlib.sha384(der384).digest()


def test_end_point_of_a_sha1_certificate_is_sha256(tmp_path: Path) -> None:
    """RFC 5929 4.1: MD5 and SHA-1 are replaced by SHA-256 (the openssl tool still signs SHA-1)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-sha1", "-subj", "/CN=x", "-days", "1",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                   check=True, capture_output=True, timeout=60)
    der = ssl.PEM_cert_to_DER_cert((tmp_path / "c.pem").read_text())
    assert tls.server_end_point(der) == hashlib.sha256(der).digest()


# ---------------------------------------------------------------- errors: FILE: what is wrong

def test_key_that_does_not_match(tmp_path: Path) -> None:
    one = issue(tmp_path, "rsa", name="one")
    other = issue(tmp_path, "rsa", name="other")
    with pytest.raises(tls.TLSConfigError) as info:
        tls.load_server_tls(str(one.cert_file), str(other.key_file))
    assert str(info.value) == (f"{other.key_file}: the private key does not match the "
                               f"certificate in {one.cert_file}")


def test_missing_unreadable_and_swapped_files(rsa_certs: CertFiles, tmp_path: Path) -> None:
    cert, key = str(rsa_certs.cert_file), str(rsa_certs.key_file)
    missing = str(tmp_path / "nope.pem")

    def error(c: str, k: str) -> str:
        with pytest.raises(tls.TLSConfigError) as info:
            tls.load_server_tls(c, k)
        return str(info.value)

    assert error(missing, key) == f"{missing}: no such file (certificate)"
    assert error(cert, missing) == f"{missing}: no such file (private key)"
    assert error(str(tmp_path), key) == f"{tmp_path}: is a directory, not a certificate file"
    assert error(key, cert).startswith(f"{key}: not a PEM certificate")
    assert "swap $tls_cert_file and $tls_key_file" in error(key, cert)
    assert error(cert, cert).startswith(f"{cert}: not a PEM private key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello\n")
    assert error(str(garbage), key).startswith(f"{garbage}: not a PEM certificate")
    damaged = tmp_path / "damaged.pem"
    damaged.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert error(str(damaged), key).startswith(f"{damaged}: the PEM certificate is damaged")
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert error(cert, str(bad_key)).startswith(f"{bad_key}: not a usable PEM private key")
    if os.geteuid() != 0:  # root reads a 000 file anyway
        locked = tmp_path / "locked.key"
        locked.write_bytes(rsa_certs.key_file.read_bytes())
        locked.chmod(0)
        assert error(cert, str(locked)).startswith(f"{locked}: permission denied")


def test_encrypted_key_is_refused_without_a_prompt(rsa_certs: CertFiles, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(rsa_certs.key_file.read_bytes(), None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(tls.TLSConfigError, match="protected by a passphrase"):
        tls.load_server_tls(str(rsa_certs.cert_file), str(encrypted))


@pytest.mark.parametrize(("value", "expected"), [
    ("TLSv1.2", ssl.TLSVersion.TLSv1_2), ("TLSv1.3", ssl.TLSVersion.TLSv1_3),
    ("tlsv1.2", ssl.TLSVersion.TLSv1_2), ("TLS1.3", ssl.TLSVersion.TLSv1_3),
    ("TLSv1_2", ssl.TLSVersion.TLSv1_2), ("TLS 1.3", ssl.TLSVersion.TLSv1_3),
    ("1.2", ssl.TLSVersion.TLSv1_2),
])
def test_min_version_spellings(value: str, expected: ssl.TLSVersion) -> None:
    assert tls.parse_min_version(value) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("TLSv1", "$tls_min_version: TLSv1 is obsolete and insecure (RFC 8996); use 'TLSv1.2' or 'TLSv1.3'"),
    ("TLSv1.1", "$tls_min_version: TLSv1.1 is obsolete and insecure (RFC 8996); use 'TLSv1.2' or 'TLSv1.3'"),
    ("SSLv3", "$tls_min_version: SSLv3 is obsolete and insecure (RFC 7568); use 'TLSv1.2' or 'TLSv1.3'"),
    ("TLSv2", "$tls_min_version: unknown TLS version 'TLSv2'; use 'TLSv1.2' or 'TLSv1.3'"),
    ("", "$tls_min_version: unknown TLS version ''; use 'TLSv1.2' or 'TLSv1.3'"),
])
def test_min_version_refused(value: str, message: str) -> None:
    with pytest.raises(tls.TLSConfigError) as info:
        tls.parse_min_version(value)
    assert str(info.value) == message


def test_min_version_tls13_refuses_a_tls12_client(ecdsa_certs: CertFiles) -> None:
    server = tls.load_server_tls(str(ecdsa_certs.cert_file), str(ecdsa_certs.key_file),
                                 min_version="TLSv1.3")
    assert server.context.minimum_version == ssl.TLSVersion.TLSv1_3
    context = ecdsa_certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = serve_one(server, b)
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(a, server_hostname="localhost")
    result["thread"].join(10)  # type: ignore[attr-defined]
    assert tls.describe_handshake_error(result["error"]) == (  # type: ignore[arg-type]
        "the client offers only TLS versions below $tls_min_version")


def test_plaintext_client_on_the_tls_port_is_described(rsa_certs: CertFiles) -> None:
    server = tls.load_server_tls(str(rsa_certs.cert_file), str(rsa_certs.key_file))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = serve_one(server, b)
    a.sendall(b"USER tommy\r\n")
    result["thread"].join(10)  # type: ignore[attr-defined]
    a.close()
    assert tls.describe_handshake_error(result["error"]) == (  # type: ignore[arg-type]
        "the client did not send a TLS ClientHello (a plain-text client on the TLS port?)")


def test_describe_handshake_error_timeout_and_eof() -> None:
    assert "within $command_timeout" in tls.describe_handshake_error(TimeoutError("timed out"))
    assert "closed the connection" in tls.describe_handshake_error(ssl.SSLEOFError(8, "EOF"))
    assert "closed the connection" in tls.describe_handshake_error(ConnectionResetError(104, "x"))


def test_ciphers(rsa_certs: CertFiles) -> None:
    cert, key = str(rsa_certs.cert_file), str(rsa_certs.key_file)
    with pytest.raises(tls.TLSConfigError) as info:
        tls.load_server_tls(cert, key, ciphers="NO-SUCH-CIPHER")
    assert str(info.value).startswith("$tls_ciphers: no cipher matches 'NO-SUCH-CIPHER'")
    server = tls.load_server_tls(cert, key, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    context = rsa_certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client, result = handshake(server, context)
    with client:
        assert tls.describe_session(client) == "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"
    result["thread"].join(10)  # type: ignore[attr-defined]


def test_context_keeps_stateless_tickets(rsa_certs: CertFiles) -> None:
    server = tls.load_server_tls(str(rsa_certs.cert_file), str(rsa_certs.key_file))
    assert not server.context.options & ssl.OP_NO_TICKET
    assert server.context.num_tickets == tls.TICKETS_PER_HANDSHAKE >= 1
    assert server.context.verify_mode == ssl.CERT_NONE  # no client certificates asked for


# ---------------------------------------------------------------- resumption across workers

def _fork_server(listener: socket.socket, make_server: Callable[[], tls.ServerTLS],
                 expect_reused: bool) -> int:
    """Fork a "worker" that serves one TLS connection from ``listener``; exit 0 when the
    server side saw ``session_reused == expect_reused``."""
    pid = os.fork()
    if pid:
        return pid
    code = 2
    try:  # the child must never return into pytest
        server = make_server()
        conn, _ = listener.accept()
        conn.settimeout(10)
        with server.context.wrap_socket(conn, server_side=True) as tconn:
            tconn.sendall(GREETING)
            tconn.recv(100)  # until the client closes
            code = 0 if tconn.session_reused == expect_reused else 3
    except BaseException:
        code = 4
    finally:
        os._exit(code)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_resumption_across_forked_workers(rsa_certs: CertFiles, version: ssl.TLSVersion) -> None:
    """The master builds one context and forks; a client resumes on another worker.

    The control (a worker that builds its own context from the same files, as it would
    if workers loaded the certificate themselves) must *not* resume: the shared ticket
    keys are what makes resumption work.
    """
    server = tls.load_server_tls(str(rsa_certs.cert_file), str(rsa_certs.key_file))
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    own = lambda: tls.load_server_tls(str(rsa_certs.cert_file), str(rsa_certs.key_file))  # noqa: E731
    pids = [_fork_server(listeners[0], lambda: server, False),
            _fork_server(listeners[1], lambda: server, True),
            _fork_server(listeners[2], own, False)]
    context = rsa_certs.client_context()
    context.minimum_version = context.maximum_version = version

    def connect(index: int, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        sock = socket.create_connection(listeners[index].getsockname(), timeout=10)
        client = context.wrap_socket(sock, server_hostname="localhost", session=session)
        assert client.recv(100) == GREETING  # TLS 1.3 tickets arrive with the first data
        return client

    try:
        with connect(0, None) as first:
            assert not first.session_reused
            assert first.version() == version.name.replace("_", ".")
            session = first.session
        assert session is not None and session.has_ticket
        with connect(1, session) as second:
            assert second.session_reused, "a client must resume on another worker"
        with connect(2, session) as third:
            assert not third.session_reused
    finally:
        codes = _reap(pids, timeout=10)
        for listener in listeners:
            listener.close()
    assert codes == [0, 0, 0]


def _reap(pids: list[int], timeout: float) -> list[int | None]:
    """Exit codes of the forked workers; one still running after ``timeout`` (blocked in
    accept because the test failed early) is killed and reported as ``None``."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int | None] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) < len(pids):
            if time.monotonic() > deadline:
                for pid in pids:
                    if pid not in codes:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        codes[pid] = None
            time.sleep(0.02)
    return [codes[pid] for pid in pids]


# ---------------------------------------------------------------- configuration

def test_config_tls_defaults_and_cross_checks(rsa_certs: CertFiles) -> None:
    config = Config()
    assert (config.tls_cert_file, config.tls_key_file, config.tls_port) == (None, None, 995)
    assert (config.tls_min_version, config.tls_ciphers) == ("TLSv1.2", None)
    assert config.disable_plaintext_auth is None and not config.plaintext_auth_disabled()
    assert tls.tls_from_config(config) is None

    on = dataclasses.replace(config, tls_cert_file=str(rsa_certs.cert_file),
                             tls_key_file=str(rsa_certs.key_file))
    assert check_config(on) == [] and on.plaintext_auth_disabled()
    assert not dataclasses.replace(on, disable_plaintext_auth=False).plaintext_auth_disabled()
    assert dataclasses.replace(config, disable_plaintext_auth=True).plaintext_auth_disabled()
    loaded = tls.tls_from_config(on)
    assert loaded is not None and loaded.end_point

    assert check_config(dataclasses.replace(config, tls_cert_file="/c")) == [
        "$tls_cert_file requires $tls_key_file"]
    assert check_config(dataclasses.replace(config, tls_key_file="/k")) == [
        "$tls_key_file requires $tls_cert_file"]
    assert check_config(dataclasses.replace(on, tls_port=110)) == [
        "$tls_port and $port are both 110; use another $tls_port (or nil for STLS only)"]
    assert check_config(dataclasses.replace(config, tls_port=110)) == []  # TLS off: unused


def test_config_file_syntax_for_tls() -> None:
    config = parse_config("$tls_cert_file = '/etc/c.pem'\n$tls_key_file = '/etc/k.pem'\n"
                          "$tls_port = nil\n$tls_min_version = 'TLSv1.3'\n"
                          "$disable_plaintext_auth = false\n$tls_ciphers = 'HIGH'\n", "t.conf")
    assert config.tls_port is None and config.disable_plaintext_auth is False
    assert config.tls_min_version == "TLSv1.3" and config.tls_ciphers == "HIGH"
    with pytest.raises(ConfigError) as info:
        parse_config("$tls_min_version = 'TLSv1.1'\n$tls_port = 'x'\n"
                     "$disable_plaintext_auth = 'yes'\n$tls_ciphers = ''\n", "t.conf")
    assert info.value.errors == [
        "t.conf:1: $tls_min_version: TLSv1.1 is obsolete and insecure (RFC 8996); "
        "use 'TLSv1.2' or 'TLSv1.3'",
        "t.conf:2: $tls_port: expected an integer or nil, got the string 'x'",
        "t.conf:3: $disable_plaintext_auth: expected true, false or nil, got the string 'yes'",
        "t.conf:4: $tls_ciphers: must not be empty (use nil to leave it unset)",
    ]


def test_text_around_the_pem_blocks_is_accepted(rsa_certs: CertFiles, tmp_path: Path) -> None:
    """As OpenSSL does: 'openssl pkcs12' and 'x509 -text' put headers before the blocks."""
    annotated = tmp_path / "annotated.crt"
    annotated.write_bytes(b"Bag Attributes\nsubject=CN = localhost\n"
                          + rsa_certs.cert_file.read_bytes() + b"\n# end\n")
    server = tls.load_server_tls(str(annotated), str(rsa_certs.key_file))
    client, result = handshake(server, rsa_certs.client_context())
    with client:
        assert client.getpeercert(binary_form=True) == rsa_certs.leaf_der
    result["thread"].join(10)  # type: ignore[attr-defined]
