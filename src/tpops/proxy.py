"""The PROXY protocol (HAProxy's v1 text and v2 binary headers), read exactly from a blocking socket.

A load balancer in TCP mode (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS NLB, nginx
``stream``) hides the client's address: tpops sees the balancer's. The balancer then
sends one PROXY header before any byte of the client's, naming the client. tpops
believes that header only from ``$haproxy_trusted_networks`` (:class:`TrustedNetworks`),
and from those addresses it requires one: a trusted connection without a valid header
is closed with a log line. From anywhere else ``PROXY ...`` is just an unknown command.

The header is read *exactly*: its length is found by peeking (``MSG_PEEK``) at what
has arrived — v1 ends at its CRLF within 107 bytes, v2 carries its length in bytes
14-15 — and then exactly that many bytes are received, so the first client command
(or a TLS ClientHello on an implicit-TLS port) stays in the socket for whoever reads
next. Size is bounded (:data:`V1_MAX`, :data:`V2_MAX`), time by a deadline the worker
derives from ``$command_timeout``.

The pypi ``proxy-protocol`` package was considered: its readers work on asyncio
streams, not on a blocking socket that must not be read past the header, so this is
a small parser of its own (fuzzed in tests/test_proxy.py).

The result is a :class:`ProxyInfo`: the client's address (None for v2 ``LOCAL``
health checks and ``UNKNOWN``/unspecified families: the peer's address stays) and
whether the balancer terminated TLS for the client (``PP2_TYPE_SSL`` with the
``PP2_CLIENT_SSL`` flag), for ``$disable_plaintext_auth`` once TLS support asks.
"""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "V1_MAX",
    "V2_MAX",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyInfo",
    "TrustedNetworks",
    "header_length",
    "parse_header",
    "read_header",
]

#: The longest v1 header the specification allows, CRLF included.
V1_MAX = 107
#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v2 header accepted: 16 fixed bytes plus addresses and a few TLVs
#: (HAProxy's SSL TLVs with a client certificate's CN stay far below this).
V2_MAX = 16 + 4096
_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
#: v2 address block lengths by family (high nibble of byte 13).
_ADDRESS_LENGTHS = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
PP2_TYPE_SSL = 0x20
PP2_CLIENT_SSL = 0x01
_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")


class ProxyError(ValueError):
    """Not a valid PROXY header (or none arrived in time); the message is for the log."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said: ``source_addr`` the client's address (None: keep the
    peer's, as for a v2 ``LOCAL`` health check), ``ssl`` whether the balancer
    terminated TLS for the client, ``version`` 1 or 2."""

    source_addr: str | None
    ssl: bool = False
    version: int = 2

    def client(self, peer: str) -> str:
        """The address the session is served for: the header's source, else the peer."""
        return self.source_addr if self.source_addr is not None else peer


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as tpops logs it: an IPv4-mapped IPv6 address as its dotted quad."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def header_length(data: bytes, v2_max: int = V2_MAX) -> int | None:
    """The length of the PROXY header at the start of ``data``, None if more bytes are
    needed to tell. Raises :class:`ProxyError` when ``data`` cannot start a header or the
    header would be longer than allowed."""
    if data.startswith(V2_SIGNATURE):
        if len(data) < _V2_FIXED:
            return None
        total: int = _V2_FIXED + struct.unpack_from("!H", data, 14)[0]
        if total > v2_max:
            raise ProxyError(f"PROXY v2 header of {total} bytes is longer than {v2_max}")
        return total
    if data.startswith(_V1_PREFIX):
        end = data.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX:
            raise ProxyError(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    if V2_SIGNATURE.startswith(data) or _V1_PREFIX.startswith(data):
        return None  # an incomplete signature so far (empty included)
    raise ProxyError("the connection does not start with a PROXY header")


def parse_v1(header: bytes) -> ProxyInfo:
    """A whole v1 header (``PROXY TCP4 src dst sport dport\\r\\n``, CRLF included)."""
    if not header.startswith(_V1_PREFIX) or not header.endswith(b"\r\n") or len(header) > V1_MAX:
        raise ProxyError("malformed PROXY v1 header")
    fields = header[:-2].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyInfo(None, version=1)  # the balancer could not tell; keep the peer
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("malformed PROXY v1 header: expected PROXY TCP4|TCP6 src dst sport dport")
    kind = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        src = kind(fields[2].decode("ascii"))
        kind(fields[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"PROXY v1 header: bad {fields[1].decode()} address") from None
    for port in fields[4:6]:
        if not _PORT.match(port) or int(port) > 65535:
            raise ProxyError("PROXY v1 header: bad port")
    return ProxyInfo(_address_text(src), version=1)


def _ssl_flag(tlvs: bytes) -> bool:
    """Walk the TLVs after the addresses: True when ``PP2_TYPE_SSL`` says the client used TLS."""
    ssl = False
    i = 0
    while i < len(tlvs):
        if len(tlvs) - i < 3:
            raise ProxyError("PROXY v2 header: truncated TLV")
        kind = tlvs[i]
        length = struct.unpack_from("!H", tlvs, i + 1)[0]
        value = tlvs[i + 3:i + 3 + length]
        if len(value) != length:
            raise ProxyError("PROXY v2 header: TLV longer than the header")
        if kind == PP2_TYPE_SSL:
            if length < 5:  # client (1 byte), verify (4 bytes), then sub-TLVs
                raise ProxyError("PROXY v2 header: short SSL TLV")
            ssl = bool(value[0] & PP2_CLIENT_SSL)
        i += 3 + length
    return ssl


def parse_v2(header: bytes) -> ProxyInfo:
    """A whole v2 header (signature, version/command, family, length, addresses, TLVs)."""
    if len(header) < _V2_FIXED or not header.startswith(V2_SIGNATURE):
        raise ProxyError("malformed PROXY v2 header")
    ver_cmd, family = header[12], header[13]
    if len(header) != _V2_FIXED + struct.unpack_from("!H", header, 14)[0]:
        raise ProxyError("PROXY v2 header: length does not match")
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"PROXY v2 header: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2 header: unknown command {command}")
    af, transport = family >> 4, family & 0xF
    if af not in _ADDRESS_LENGTHS or transport > 2:
        raise ProxyError(f"PROXY v2 header: unknown address family 0x{family:02x}")
    body = header[_V2_FIXED:]
    need = _ADDRESS_LENGTHS[af]
    if len(body) < need:
        raise ProxyError("PROXY v2 header: address block too short")
    ssl = _ssl_flag(body[need:])
    if command == 0 or af in (0x0, 0x3) or transport != 1:
        # LOCAL (the balancer's own health check), an unspecified or Unix family, or not
        # TCP: the connection's own endpoints stand.
        return ProxyInfo(None, ssl=ssl)
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    src = ipaddress.IPv4Address(body[:4]) if af == 0x1 else ipaddress.IPv6Address(body[:16])
    return ProxyInfo(_address_text(src), ssl=ssl)


def parse_header(header: bytes) -> ProxyInfo:
    """A whole header, v1 or v2 (exactly :func:`header_length` bytes)."""
    if header.startswith(V2_SIGNATURE):
        return parse_v2(header)
    return parse_v1(header)


#: Pause between peeks while a header is incomplete (the data already there keeps poll() readable).
_PEEK_PAUSE = 0.01


def read_header(
    sock: socket.socket,
    timeout: float,
    should_stop: Callable[[], bool] = lambda: False,
    *,
    wake_fd: int | None = None,
    v2_max: int = V2_MAX,
) -> ProxyInfo:
    """Read exactly one PROXY header from the blocking ``sock`` within ``timeout`` seconds.

    Peeks until the header's length is known, then receives exactly that many bytes:
    nothing after it is consumed. Raises :class:`ProxyError` for a malformed or
    oversized header, a timeout, a close before the header, or a stop request
    (``should_stop()`` True; ``wake_fd`` readable wakes the wait early to ask it).
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    seen = -1
    while True:
        if should_stop():
            raise ProxyError("stopped while waiting for the PROXY header")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProxyError(f"no complete PROXY header within {timeout:g} s")
        events = dict(poller.poll(min(left, 1.0) * 1000))
        if sock.fileno() not in events:
            continue
        closed = bool(events[sock.fileno()] & (select.POLLRDHUP | select.POLLHUP))
        try:
            data = sock.recv(v2_max, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            raise ProxyError(f"error before the PROXY header: {exc.strerror or exc}") from None
        if not data:
            raise ProxyError("connection closed before a complete PROXY header")
        length = header_length(data, v2_max)
        if length is None or length > len(data):
            if closed:  # the peer finished sending: the rest of the header will never come
                raise ProxyError("connection closed before a complete PROXY header")
            if len(data) == seen:  # nothing new yet: do not spin on the readable socket
                time.sleep(min(_PEEK_PAUSE, max(left, 0)))
            seen = len(data)
            continue
        header = _recv_exactly(sock, length)
        return parse_header(header)


def _recv_exactly(sock: socket.socket, length: int) -> bytes:
    """``length`` bytes already peeked at (so they are there): received, and nothing more."""
    chunks: list[bytes] = []
    remaining = length
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class TrustedNetworks:
    """``$haproxy_trusted_networks``: addresses and CIDR networks, separated by spaces or commas."""

    __slots__ = ("networks",)

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = networks

    @classmethod
    def parse(cls, text: str | None) -> TrustedNetworks:
        """The networks in ``text`` (None or blank: none). ValueError names a bad entry."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in re.split(r"[\s,]+", text or ""):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"$haproxy_trusted_networks: {entry!r} is not an address or CIDR network") from None
        return cls(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, peer: object) -> bool:
        """Whether the peer address text (as :func:`tpops.worker.peer_name` gives it) is trusted."""
        if not self.networks or not isinstance(peer, str):
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
