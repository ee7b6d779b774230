"""POP3 wire I/O: a deadline-bounded transport, the command line reader and the reply writer.

One :class:`Transport` works on a TCP socket (standalone mode) and on plain pipes
(``--inetd`` with stdin/stdout), so the session above it is the same code in both
modes. Every read and write is bounded by a deadline, and a signal that arrives
while we wait (the worker's wake-up pipe) interrupts the wait so shutdown is prompt.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable

from tpops.mailbox.encode import VerbatimFile

#: RFC 2449 section 4 caps a command at 255 octets including the CRLF; we accept 255
#: octets plus the line end, so a 250-octet login still fits after "USER ".
MAX_COMMAND_OCTETS = 255
#: How much we read from the client at once (PIPELINING: blocks, not bytes).
READ_BLOCK = 16 * 1024
#: Replies are buffered up to this size before they are sent, even mid-pipeline.
WRITE_BUFFER = 256 * 1024
#: A message chunk at least this large is not copied into the reply buffer: it is
#: queued as it is and sent with the others in one ``writev``.
GATHER_MIN_OCTETS = 16 * 1024
#: Queued chunks are sent once they add up to this much.
GATHER_OCTETS = 1024 * 1024
#: At most this many buffers per ``writev`` (Linux IOV_MAX is 1024).
GATHER_MAX_BUFFERS = 64
#: When the server ends a connection, how long and how much client input it drains
#: after shutting down its sending side (see :meth:`Transport.shut_down`).
LINGER_SECONDS = 1.0
LINGER_OCTETS = 64 * 1024


class ConnectionLost(Exception):
    """The client went away (EOF, reset, broken pipe)."""


class Timeout(Exception):
    """A read or write deadline passed."""


class Interrupted(Exception):
    """The worker was told to stop while we waited for the client."""


class _Blocked(Exception):
    """A non-blocking read or write would block: wait for ``event`` on ``fd``, then retry.
    (TLS may need the other direction: a write that must first read, and back.)"""

    def __init__(self, fd: int, event: int) -> None:
        self.fd = fd
        self.event = event


class HandshakeFailed(ConnectionLost):
    """A TLS handshake failed; the message says why in an admin's words (already logged)."""


class LineTooLong:
    """Marker returned by :meth:`LineReader.read_line` for an over-long command line."""

    __slots__ = ()


LINE_TOO_LONG = LineTooLong()


class Transport:
    """Non-blocking byte I/O on a read fd and a write fd (the same fd for a socket).

    ``wake_fd`` is the read end of a pipe that becomes readable when a signal arrives
    (``signal.set_wakeup_fd``); ``should_stop()`` then says whether to give up waiting.
    ``progress()`` is called whenever data moves (and each second of a pause): the
    worker's heartbeat for the master's watchdog.
    """

    def __init__(
        self,
        rfd: int,
        wfd: int,
        wake_fd: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.wake_fd = wake_fd
        self.should_stop = should_stop or (lambda: False)
        self.progress = progress or (lambda: None)
        #: One poll object per (fd, event) waited for, made at the first wait: a session
        #: waits a few times per command, always for the same few things.
        self._pollers: dict[tuple[int, int], select.poll] = {}
        for fd in {rfd, wfd}:
            os.set_blocking(fd, False)

    def _poller(self, fd: int, event: int) -> select.poll:
        poller = self._pollers.get((fd, event))
        if poller is None:
            poller = self._pollers[fd, event] = select.poll()
            poller.register(fd, event)
            if self.wake_fd is not None:
                poller.register(self.wake_fd, select.POLLIN)
        return poller

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        """Block until ``fd`` is ready for ``event``; raise Timeout/Interrupted."""
        poller = self._poller(fd, event)
        while True:
            if self.should_stop():
                raise Interrupted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout
            ready = poller.poll(min(remaining, 3600.0) * 1000.0)
            for rfd, _ in ready:
                if rfd == self.wake_fd:
                    drain(self.wake_fd)
                else:
                    return
            if not ready and time.monotonic() >= deadline:
                raise Timeout

    def _read(self) -> bytes:
        """One non-blocking read (the one thing a TLS transport does differently)."""
        try:
            return os.read(self.rfd, READ_BLOCK)
        except BlockingIOError:
            raise _Blocked(self.rfd, select.POLLIN) from None
        except OSError as exc:
            raise ConnectionLost(str(exc)) from None

    def _write(self, view: memoryview) -> int:
        """One non-blocking write: the octets it took."""
        try:
            return os.write(self.wfd, view)
        except BlockingIOError:
            raise _Blocked(self.wfd, select.POLLOUT) from None
        except OSError as exc:
            raise ConnectionLost(str(exc)) from None

    def recv(self, deadline: float) -> bytes:
        """Up to READ_BLOCK octets; raises ConnectionLost at EOF."""
        while True:
            try:
                data = self._read()
            except _Blocked as blocked:
                self._wait(blocked.fd, blocked.event, deadline)
                continue
            if not data:
                raise ConnectionLost("end of input")
            self.progress()
            return data

    def send(
        self,
        data: bytes | bytearray | memoryview,
        timeout: float,
        deadline: float = math.inf,
    ) -> None:
        """Send everything or raise Timeout/ConnectionLost.

        Bounded twice: by ``timeout`` seconds without progress (a client that stopped
        reading) and by the absolute ``deadline`` (time.monotonic(); the connection's
        time limit: a client that reads slowly but steadily must not keep the worker
        past it).
        """
        view = memoryview(data).cast("B")
        stall = time.monotonic() + timeout
        while view:
            if time.monotonic() >= deadline:
                raise Timeout
            try:
                sent = self._write(view)
            except _Blocked as blocked:
                self._wait(blocked.fd, blocked.event, min(stall, deadline))
                continue
            self.sent(sent)
            view = view[sent:]
            stall = time.monotonic() + timeout
            self.progress()

    def send_chunks(
        self,
        chunks: list[bytes | bytearray | memoryview],
        timeout: float,
        deadline: float = math.inf,
    ) -> None:
        """Send the buffers in order with as few ``writev`` calls as the peer allows.

        Bounded like :meth:`send`: ``timeout`` seconds without progress and the absolute
        ``deadline`` raise Timeout. Nothing is copied: a partial write advances a
        memoryview of the buffer it stopped in.
        """
        views = [memoryview(c) for c in chunks if len(c)]
        stall = time.monotonic() + timeout
        first = 0
        while first < len(views):
            if time.monotonic() >= deadline:
                raise Timeout
            batch = views[first : first + GATHER_MAX_BUFFERS]
            try:
                sent = os.writev(self.wfd, batch)
            except BlockingIOError:
                self._wait(self.wfd, select.POLLOUT, min(stall, deadline))
                continue
            except OSError as exc:
                raise ConnectionLost(str(exc)) from None
            self.sent(sent)
            while sent and first < len(views):
                size = len(views[first])
                if sent >= size:
                    sent -= size
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0
            stall = time.monotonic() + timeout
            self.progress()

    def sendfile(self, fd: int, count: int, timeout: float, deadline: float = math.inf) -> None:
        """Send ``count`` octets of the file ``fd`` from offset 0 with ``os.sendfile``.

        Bounded like :meth:`send` (``timeout`` seconds without progress, the absolute
        ``deadline``: Timeout). A file shorter than ``count`` raises OSError: the
        announced size would be a lie, so the caller must not go on as if it had been
        sent. Where the kernel cannot ``sendfile`` to this descriptor, the rest goes
        with ``pread`` + :meth:`send`.
        """
        offset = 0
        stall = time.monotonic() + timeout
        while offset < count:
            if time.monotonic() >= deadline:
                raise Timeout
            try:
                sent = os.sendfile(self.wfd, fd, offset, count - offset)
            except BlockingIOError:
                self._wait(self.wfd, select.POLLOUT, min(stall, deadline))
                continue
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    self._copy_file(fd, offset, count, timeout, deadline)
                    return
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise ConnectionLost(str(exc)) from None
                raise
            if sent == 0:
                raise OSError(errno.EIO, "file shorter than announced")
            self.sent(sent)
            offset += sent
            stall = time.monotonic() + timeout
            self.progress()

    def _copy_file(self, fd: int, offset: int, count: int, timeout: float, deadline: float) -> None:
        """The :meth:`sendfile` fallback: the file's octets ``offset`` to ``count`` by reading."""
        while offset < count:
            data = os.pread(fd, min(READ_BLOCK * 16, count - offset), offset)
            if not data:
                raise OSError(errno.EIO, "file shorter than announced")
            self.send(data, timeout, deadline)
            offset += len(data)

    def sent(self, octets: int) -> None:
        """Called with the octets each write put on the wire: a hook for counting
        subclasses (:class:`tpops.status.CountingTransport`); nothing here."""

    def shut_down(self, linger: float = LINGER_SECONDS, limit: int = LINGER_OCTETS, *,
                  unread: bool = False) -> None:
        """End the server's side of a connection cleanly, before the owner closes the fds.

        On a socket: shut down the sending side (the client reads every reply, then
        EOF), then read and discard client input until EOF, at most ``limit`` octets for
        at most ``linger`` seconds. Closing a socket with unread input makes the kernel
        send a reset, and a client that had pipelined more than we read would lose the
        last replies to ECONNRESET. The linger happens only when the client is still
        sending: input waiting in the socket, or ``unread`` (the caller still holds
        pipelined input it will not execute). A client that sent nothing past its last
        command (every lockstep client, every QUIT) is not waited for: the worker is
        free at once, as Dovecot's is. Plain pipes (inetd) need nothing: replies are
        flushed by the caller. Never raises.
        """
        try:
            if not stat.S_ISSOCK(os.fstat(self.wfd).st_mode):
                return
            duplicate = os.dup(self.wfd)  # a socket object of our own; the owner's fd stays open
            try:
                sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                raise
            with sock:
                sock.shutdown(socket.SHUT_WR)
            if not stat.S_ISSOCK(os.fstat(self.rfd).st_mode):
                return
        except OSError:
            return
        deadline = time.monotonic() + linger
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        drained = 0
        while drained < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                data = os.read(self.rfd, min(READ_BLOCK, limit - drained))
            except BlockingIOError:
                if not drained and not unread:
                    return  # nothing sent past what we read: no reset can overtake a reply
                try:
                    poller.poll(remaining * 1000.0)
                except InterruptedError:
                    pass
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)

    def pause(self, seconds: float) -> None:
        """Sleep (the `$error_interval` delay) but wake up for a stop request."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        if self.wake_fd is None:
            time.sleep(seconds)
            return
        while True:
            if self.should_stop():
                raise Interrupted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.progress()
            ready, _, _ = select.select([self.wake_fd], [], [], min(remaining, 1.0))
            if ready:
                drain(self.wake_fd)


class TLSTransport(Transport):
    """A :class:`Transport` over a server-side :class:`ssl.SSLSocket` (implicit TLS or STLS).

    Same deadlines, stop requests and ``progress()`` hook as :class:`Transport`; the
    socket is non-blocking and OpenSSL's "want read"/"want write" mean: poll for that
    direction, then retry. A read tries ``recv`` before polling, so bytes OpenSSL has
    already decrypted (``pending()``: a whole pipelined batch may sit there while the
    socket is quiet) are returned at once.
    """

    def __init__(
        self,
        sock: ssl.SSLSocket,
        wake_fd: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        super().__init__(sock.fileno(), sock.fileno(), wake_fd, should_stop, progress)
        self.sock = sock

    def handshake(self, deadline: float) -> None:
        """Run the server handshake, all of it bounded by ``deadline`` (not per read: a
        client trickling one byte at a time must not hold the worker). Raises the
        ``ssl.SSLError``/``OSError`` of a failed handshake, :class:`Timeout` or
        :class:`Interrupted`."""
        while True:
            try:
                self.sock.do_handshake()
                self.progress()
                return
            except ssl.SSLWantReadError:
                self._wait(self.rfd, select.POLLIN, deadline)
            except ssl.SSLWantWriteError:
                self._wait(self.wfd, select.POLLOUT, deadline)

    def _read(self) -> bytes:
        """Up to READ_BLOCK decrypted octets: ``recv`` before any poll, so what OpenSSL
        already decrypted (``pending()``) comes at once."""
        try:
            return self.sock.recv(READ_BLOCK)
        except ssl.SSLWantReadError:
            raise _Blocked(self.rfd, select.POLLIN) from None
        except ssl.SSLWantWriteError:
            raise _Blocked(self.wfd, select.POLLOUT) from None
        except (ssl.SSLError, OSError, ValueError) as exc:  # close_notify, reset, a bad record
            raise ConnectionLost(str(exc)) from None

    def _write(self, view: memoryview) -> int:
        """One TLS record's worth of ``view``, encrypted."""
        try:
            return self.sock.send(view)
        except ssl.SSLWantWriteError:
            raise _Blocked(self.wfd, select.POLLOUT) from None
        except ssl.SSLWantReadError:  # a key update or renegotiation wants the peer first
            raise _Blocked(self.rfd, select.POLLIN) from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConnectionLost(str(exc)) from None

    def send_chunks(
        self,
        chunks: list[bytes | bytearray | memoryview],
        timeout: float,
        deadline: float = math.inf,
    ) -> None:
        """As :meth:`Transport.send_chunks`, through TLS: ``writev`` on the socket would
        bypass the encryption, so the buffers are joined and sent as records."""
        self.send(b"".join(chunks), timeout, deadline)

    def sendfile(self, fd: int, count: int, timeout: float, deadline: float = math.inf) -> None:
        """As :meth:`Transport.sendfile`, through TLS: the kernel's ``sendfile`` would put
        the file on the wire unencrypted, so it is read and sent (pread + :meth:`send`)."""
        self._copy_file(fd, 0, count, timeout, deadline)

    def shut_down(self, linger: float = LINGER_SECONDS, limit: int = LINGER_OCTETS, *,
                  unread: bool = False) -> None:
        """Send TLS close_notify (best effort, never waiting for the client's), then as
        :meth:`Transport.shut_down`: shut down the sending side of the socket and drain
        (the still-encrypted) client input briefly. Never raises."""
        try:
            self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # the client's close_notify has not come yet (non-blocking), or it is gone
        super().shut_down(linger, limit, unread=unread)


def drain(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (the signal numbers in it are not needed)."""
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class LineReader:
    """Splits client input into command lines (CRLF or bare LF), bounded in memory.

    A line longer than the limit (MAX_COMMAND_OCTETS for a command; line end excluded) is
    discarded as it arrives (never buffered whole) and reported once as LINE_TOO_LONG.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.buffer = bytearray()
        self.discarding = False

    def has_pending_line(self) -> bool:
        """True when a complete line is already buffered (the client is pipelining)."""
        return b"\n" in self.buffer

    def read_line(self, deadline: float, limit: int = MAX_COMMAND_OCTETS) -> bytes | LineTooLong:
        """The next line without its line ending; longer than ``limit`` octets: LINE_TOO_LONG.

        ``limit`` is MAX_COMMAND_OCTETS for a command; an exchange (SASL) may allow more.
        """
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                if self.discarding:
                    self.discarding = False
                    return LINE_TOO_LONG
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > limit:
                    return LINE_TOO_LONG
                return line
            if len(self.buffer) > limit + 1:  # room for the CR of a CRLF
                self.discarding = True
                del self.buffer[:]
            self.buffer += self.transport.recv(deadline)


class ReplyWriter:
    """Buffers replies so a pipelined batch of commands goes out in few writes, in order.

    Small pieces are copied into ``buffer``; large message chunks are queued as they
    are in ``queued`` (whatever was buffered before them is moved into the queue
    first) and everything goes out in one ``writev``. A
    :class:`~tpops.mailbox.encode.VerbatimFile` body goes out with ``os.sendfile``.

    Every send is bounded by ``timeout`` seconds without progress and by the absolute
    ``deadline`` (the session keeps it at its connection/login limit). While replies
    cannot drain, the send blocks the session loop, so no further client input is read
    or parsed. A send that failed part-way leaves ``broken`` set: the client may hold
    half a reply, and anything written after it would be read as that reply's data.
    """

    def __init__(
        self,
        transport: Transport,
        timeout: float,
        deadline: float = math.inf,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.deadline = deadline
        self.buffer = bytearray()
        self.queued: list[bytes | bytearray] = []
        self.queued_octets = 0
        self.broken = False

    def line(self, text: str) -> None:
        """One status or data line; CRLF is added here."""
        self.buffer += text.encode("utf-8", "surrogateescape")
        self.buffer += b"\r\n"
        if len(self.buffer) >= WRITE_BUFFER:
            self.flush()

    def lines(self, lines: Iterable[str]) -> None:
        """Many data lines at once (LIST, UIDL on big mailboxes): one encode, one append."""
        text = "\r\n".join(lines)
        if text:
            self.buffer += text.encode("utf-8", "surrogateescape")
            self.buffer += b"\r\n"
        if len(self.buffer) >= WRITE_BUFFER:
            self.flush()

    def raw(self, chunks: Iterable[bytes]) -> None:
        """Already-encoded multi-line data (byte-stuffed, CRLF); large chunks are not copied."""
        if isinstance(chunks, VerbatimFile):
            self._sendfile(chunks)
            return
        for chunk in chunks:
            if len(chunk) >= GATHER_MIN_OCTETS:
                if self.buffer:
                    self.queued.append(bytes(self.buffer))
                    self.buffer.clear()
                self.queued.append(chunk)
                self.queued_octets += len(chunk)
                if self.queued_octets >= GATHER_OCTETS:
                    self.flush()
                continue
            self.buffer += chunk
            if len(self.buffer) >= WRITE_BUFFER:
                self.flush()

    def _sendfile(self, body: VerbatimFile) -> None:
        """The status line and anything before it, then the file itself by ``sendfile``."""
        try:
            self.flush()
            self._guarded(lambda: self.transport.sendfile(body.fd, body.octets, self.timeout, self.deadline))
        finally:
            body.close()

    def flush(self) -> None:
        if self.queued:
            chunks: list[bytes | bytearray | memoryview] = [*self.queued]
            if self.buffer:
                chunks.append(bytes(self.buffer))
            self.queued.clear()
            self.queued_octets = 0
            self.buffer.clear()
            self._guarded(lambda: self.transport.send_chunks(chunks, self.timeout, self.deadline))
        elif self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            self._guarded(lambda: self.transport.send(data, self.timeout, self.deadline))

    def _guarded(self, send: Callable[[], None]) -> None:
        """Run one send; if it fails, the client may hold half a reply: ``broken``."""
        try:
            send()
        except BaseException:
            self.broken = True
            raise
