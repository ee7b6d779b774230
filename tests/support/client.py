"""A raw POP3 client for tests: exact bytes over a socket, status lines and multi-line bodies."""

from __future__ import annotations

import socket
import ssl


class RawClient:
    """Exact bytes over a socket: send lines, read status lines and multi-line bodies."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.readline()

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed")
        assert line.endswith(b"\r\n"), line
        return line[:-2]

    def read_body(self) -> bytes:
        """The raw multi-line body up to (not including) the terminating ``.CRLF``."""
        chunks = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed mid-body")
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line)

    def multi(self, line: str) -> tuple[bytes, bytes]:
        status = self.cmd(line)
        return status, (self.read_body() if status.startswith(b"+OK") else b"")

    def login(self, user: str, password: str = "secret") -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF)."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def unstuff(body: bytes) -> bytes:
    """Undo byte-stuffing of a multi-line body."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def check_stls_discards_pipelined_input(port: int, context: ssl.SSLContext) -> None:
    """``STLS\\r\\nCAPA\\r\\n`` in one packet (the STARTTLS command-injection class): CAPA
    is never answered, in the clear after the ``+OK`` or inside TLS; the session goes on."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    file = raw.makefile("rb")
    assert file.readline().startswith(b"+OK")
    raw.sendall(b"STLS\r\nCAPA\r\n")
    assert file.readline() == b"+OK Begin TLS negotiation.\r\n"
    raw.settimeout(0.5)
    try:
        peeked = raw.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        peeked = None
    assert peeked is None, f"the server wrote {peeked!r} in the clear after +OK"
    raw.settimeout(10)
    tls_sock = context.wrap_socket(raw, server_hostname="localhost")
    tls_file = tls_sock.makefile("rb")
    tls_sock.sendall(b"NOOP\r\n")
    # The first line inside TLS answers NOOP (an -ERR: wrong state), not the injected CAPA.
    first = tls_file.readline()
    assert first.startswith(b"-ERR") and b"Capability" not in first, first
    tls_sock.sendall(b"CAPA\r\n")
    assert tls_file.readline() == b"+OK Capability list follows\r\n"
    caps = []
    while (line := tls_file.readline()) != b".\r\n":
        caps.append(line.strip())
    assert b"USER" in caps and b"STLS" not in caps
    tls_sock.sendall(b"QUIT\r\n")
    assert tls_file.readline().startswith(b"+OK")
    tls_sock.close()
