"""A raw POP3 client for tests: exact bytes over a socket, status lines and multi-line bodies."""

from __future__ import annotations

import socket


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
