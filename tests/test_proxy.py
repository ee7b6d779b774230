"""PROXY protocol: the parser (v1, v2, TLVs), exact reads from a socket, a fuzz test, and tpops behind a trusted balancer."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.client import RawClient
from tests.support.procs import worker_serving
from tests.support.proxy import v2, wait_for_proxied_port
from tests.support.server import MailEnv, Server, make_message
from tpops.proxy import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyError,
    ProxyInfo,
    TrustedNetworks,
    header_length,
    parse_header,
    read_header,
)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def ssl_tlv(client_flags: int) -> bytes:
    """PP2_TYPE_SSL: client flags, verify result, a PP2_SUBTYPE_SSL_VERSION sub-TLV."""
    return tlv(0x20, bytes([client_flags]) + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3"))


# -- the parser ------------------------------------------------------------------------------------


def test_v1_tcp4_tcp6_and_unknown() -> None:
    assert parse_header(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 110\r\n") == ProxyInfo("192.0.2.7", version=1)
    assert parse_header(b"PROXY TCP6 2001:db8::7 ::1 5555 110\r\n").source_addr == "2001:db8::7"
    assert parse_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n").source_addr == "192.0.2.7"
    assert parse_header(b"PROXY UNKNOWN\r\n").source_addr is None
    assert parse_header(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n").client("10.1.1.1") == "10.1.1.1"


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 192.0.2.7 127.0.0.1 5555\r\n",            # a field missing
    b"PROXY TCP4 2001:db8::7 127.0.0.1 5555 110\r\n",      # IPv6 under TCP4
    b"PROXY TCP4 192.0.2.300 127.0.0.1 5555 110\r\n",      # not an address
    b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 110\r\n",       # port out of range
    b"PROXY TCP4 192.0.2.7 127.0.0.1 05 110\r\n",          # leading zero
    b"PROXY TCP4  192.0.2.7 127.0.0.1 5 110\r\n",          # two spaces
    b"PROXY UDP4 192.0.2.7 127.0.0.1 5 110\r\n",
    b"PROXY TCP4 \xff.0.2.7 127.0.0.1 5 110\r\n",
])
def test_v1_malformed(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_header(bad)


def test_v2_tcp4_tcp6_local_and_ssl_tlv() -> None:
    assert parse_header(v2()) == ProxyInfo("192.0.2.7", ssl=False, version=2)
    assert parse_header(v2("2001:db8::7", "::1")).source_addr == "2001:db8::7"
    local = parse_header(v2(command=0))
    assert local.source_addr is None and local.client("127.0.0.1") == "127.0.0.1"
    assert parse_header(v2(tlvs=ssl_tlv(0x01))).ssl is True
    assert parse_header(v2(tlvs=ssl_tlv(0x00))).ssl is False
    # Other TLVs (ALPN, authority, NOOP padding) are skipped.
    assert parse_header(v2(tlvs=tlv(0x01, b"pop3") + tlv(0x02, b"pop.example.org") + tlv(0x04, b"\0" * 9))) \
        == ProxyInfo("192.0.2.7")
    # UNSPEC family (HAProxy's LOCAL checks send it): the peer stands.
    unspec = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    assert parse_header(unspec).source_addr is None


@pytest.mark.parametrize("bad", [
    V2_SIGNATURE + bytes([0x10, 0x11]) + struct.pack("!H", 12) + b"\0" * 12,   # version 1 in a v2 header
    V2_SIGNATURE + bytes([0x22, 0x11]) + struct.pack("!H", 12) + b"\0" * 12,   # command 2
    V2_SIGNATURE + bytes([0x21, 0x41]) + struct.pack("!H", 12) + b"\0" * 12,   # family 4
    V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 8) + b"\0" * 8,     # address block short
    v2(tlvs=b"\x20\x00"),                                                       # truncated TLV
    v2(tlvs=tlv(0x20, b"\x01")),                                                # SSL TLV too short
    v2(tlvs=b"\x01\x00\x09abc"),                                                # TLV longer than the header
])
def test_v2_malformed(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_header(bad)


def test_header_length_needs_more_or_refuses() -> None:
    assert header_length(b"") is None
    assert header_length(b"PRO") is None
    assert header_length(V2_SIGNATURE[:7]) is None
    assert header_length(V2_SIGNATURE + b"\x21\x11") is None
    assert header_length(b"PROXY TCP4 1.2.3.4") is None
    assert header_length(b"PROXY UNKNOWN\r\nUSER x\r\n") == len(b"PROXY UNKNOWN\r\n")
    assert header_length(v2() + b"USER x\r\n") == len(v2())
    with pytest.raises(ProxyError):
        header_length(b"USER tommy\r\n")
    with pytest.raises(ProxyError):
        header_length(b"PROXY " + b"x" * V1_MAX)
    with pytest.raises(ProxyError):
        header_length(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535))


def test_trusted_networks() -> None:
    trusted = TrustedNetworks.parse("127.0.0.2, 10.0.0.0/8  2001:db8::/32")
    assert "127.0.0.2" in trusted and "10.9.8.7" in trusted and "2001:db8::1" in trusted
    assert "::ffff:10.1.2.3" in trusted
    assert "127.0.0.1" not in trusted and "stdin" not in trusted
    assert not TrustedNetworks.parse(None) and not TrustedNetworks.parse("  ")
    with pytest.raises(ValueError, match="not an address"):
        TrustedNetworks.parse("10.0.0.0/33")


# -- exact reads from a socket ---------------------------------------------------------------------


def _read_from(data: bytes, *, timeout: float = 1.0, close: bool = True) -> tuple[ProxyInfo | ProxyError, bytes]:
    """Send ``data`` on a socket pair, read a header from the other end: the result and what is left."""
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        if close:
            a.shutdown(socket.SHUT_WR)
        result: ProxyInfo | ProxyError
        try:
            result = read_header(b, timeout)
        except ProxyError as exc:
            result = exc
        b.setblocking(False)
        rest = b""
        try:
            while chunk := b.recv(65536):
                rest += chunk
        except BlockingIOError:
            pass
        return result, rest
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 110\r\n", v2(tlvs=ssl_tlv(1))])
def test_read_stops_exactly_at_the_end_of_the_header(header: bytes) -> None:
    after = b"CAPA\r\n\x16\x03\x01 a TLS ClientHello would follow"
    result, rest = _read_from(header + after)
    assert isinstance(result, ProxyInfo) and result.source_addr == "192.0.2.7"
    assert rest == after


def test_read_waits_for_a_header_split_over_segments() -> None:
    header = v2()
    a, b = socket.socketpair()
    try:
        def send() -> None:
            for i in range(0, len(header), 5):
                a.sendall(header[i:i + 5])
                time.sleep(0.02)
            a.sendall(b"USER x\r\n")
        sender = threading.Thread(target=send)
        sender.start()
        assert read_header(b, 5).source_addr == "192.0.2.7"
        sender.join()
        assert b.recv(100) == b"USER x\r\n"
    finally:
        a.close()
        b.close()


def test_read_is_bounded_in_time_and_by_close() -> None:
    start = time.monotonic()
    result, _ = _read_from(b"PROXY TCP4 192.0.2.7", timeout=0.3, close=False)
    assert isinstance(result, ProxyError) and "within" in str(result)
    assert time.monotonic() - start < 2
    result, _ = _read_from(b"PROXY TCP4 192.0.2.7", timeout=5)  # the balancer closed mid-header
    assert isinstance(result, ProxyError) and "closed" in str(result)
    result, rest = _read_from(b"USER tommy\r\n")  # not a header: nothing consumed
    assert isinstance(result, ProxyError) and rest == b"USER tommy\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"PROXY " + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=200), st.binary(max_size=20)).map(
        lambda t: V2_SIGNATURE + bytes(t[:2]) + struct.pack("!H", len(t[2])) + t[2] + t[3]),
))
def test_fuzz_never_raises_anything_else_nor_reads_past_the_header(data: bytes) -> None:
    """Random input: a ProxyInfo or ProxyError, never another exception; what was consumed
    is nothing or exactly the header (the client's bytes after it stay in the socket)."""
    result, rest = _read_from(data, timeout=0.2)
    consumed = len(data) - len(rest)
    assert data.endswith(rest)
    try:
        length = header_length(data)
    except ProxyError:
        length = None
    assert consumed in (0, length)
    if isinstance(result, ProxyInfo):
        assert consumed == length and length is not None


# -- over the wire ---------------------------------------------------------------------------------


def _connect(port: int, first: bytes) -> RawClient:
    """A client that sends ``first`` (a PROXY header) before reading the greeting."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sock.sendall(first)
    client.file = client.sock.makefile("rb")
    client.greeting = client.readline()
    return client


def _wait_for_text(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{content}")


@pytest.fixture
def proxied(mail_env: MailEnv) -> Iterator[Server]:
    """tpops trusting 127.0.0.1 as its balancer, one user with one message."""
    mail_env.add_user("tommy", messages=[make_message("one")])
    mail_env.write_conf(haproxy_trusted_networks="'127.0.0.1/32'", max_connections_per_ip="2")
    srv = Server(mail_env)
    srv.stderr = srv.stderr_path.open("wb")
    srv.proc = subprocess.Popen(srv.args, stdin=subprocess.DEVNULL, stdout=srv.stderr, stderr=srv.stderr)
    try:
        wait_for_proxied_port(srv.port, srv.proc)
        yield srv
    finally:
        srv.stop()


def test_proxied_client_address_reaches_logs_and_the_first_command_is_kept(proxied: Server) -> None:
    env = proxied.env
    # The header and the first command in one segment: the command must not be lost.
    client = _connect(proxied.port, b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 110\r\nCAPA\r\n")
    assert client.greeting.startswith(b"+OK")
    assert client.readline().startswith(b"+OK")
    client.read_body()
    assert client.login("tommy").startswith(b"+OK")
    assert proxied.proc is not None
    worker_serving(proxied.proc.pid, "tommy@192.0.2.7")  # the process title
    assert client.cmd("QUIT").startswith(b"+OK")
    client.close()
    assert "192.0.2.7" in _wait_for_text(env.access_log, "tommy")


def test_per_ip_limit_counts_the_proxied_client_not_the_balancer(proxied: Server) -> None:
    """$max_connections_per_ip = 2: three clients behind one balancer all get in; a third
    connection of one client does not."""
    clients = [_connect(proxied.port, v2(src)) for src in ("192.0.2.1", "192.0.2.1", "192.0.2.2")]
    clients.append(_connect(proxied.port, v2("2001:db8::2", "::1")))
    assert all(c.greeting.startswith(b"+OK") for c in clients)
    again = _connect(proxied.port, v2("192.0.2.1"))
    assert again.greeting.startswith(b"-ERR [SYS/TEMP]")
    for c in (*clients, again):
        c.close()


def test_health_check_local_is_greeted(proxied: Server) -> None:
    check = _connect(proxied.port, v2(command=0))
    assert check.greeting.startswith(b"+OK")
    assert check.cmd("QUIT").startswith(b"+OK")
    check.close()


def _closed_without_greeting(s: socket.socket) -> bool:
    """EOF (or a reset: our unread bytes were still queued at the close) before any byte."""
    try:
        return s.recv(512) == b""
    except ConnectionResetError:
        return True


def test_trusted_peer_without_a_header_is_closed_with_a_log_line(proxied: Server) -> None:
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as s:
        s.sendall(b"USER tommy\r\n")
        assert _closed_without_greeting(s)
    log = _wait_for_text(proxied.env.error_log, "haproxy_trusted_networks")
    assert "does not start with a PROXY header" in log
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as s:
        s.sendall(v2(tlvs=b"\x20\x00"))  # malformed TLV
        assert _closed_without_greeting(s)
    _wait_for_text(proxied.env.error_log, "truncated TLV")


def test_untrusted_peer_header_is_just_a_bad_command(mail_env: MailEnv) -> None:
    mail_env.add_user("tommy", messages=[make_message("one")])
    mail_env.write_conf(haproxy_trusted_networks="'10.0.0.0/8, 192.168.0.1'")
    srv = Server(mail_env).start()
    try:
        client = RawClient(srv.port)
        assert client.greeting.startswith(b"+OK")
        assert client.cmd("PROXY TCP4 192.0.2.7 127.0.0.1 5555 110").startswith(b"-ERR")
        assert client.login("tommy").startswith(b"+OK")
        client.cmd("QUIT")
        client.close()
        log = _wait_for_text(mail_env.access_log, "tommy")
        assert "192.0.2.7" not in log and "127.0.0.1" in log
    finally:
        srv.stop()
