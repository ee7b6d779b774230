"""systemd's service protocols without libsystemd: readiness notification, socket activation, journald's stderr.

Three conventions, each small enough to implement from its specification (sd_notify(3),
sd_listen_fds(3), systemd.exec(5)) with the standard library:

- :class:`Notifier`: ``Type=notify`` readiness. systemd passes ``NOTIFY_SOCKET``, a Unix
  datagram socket (a path, or an abstract name written ``@name``); the service sends
  newline-separated ``KEY=value`` assignments: ``READY=1``, ``RELOADING=1`` with
  ``MONOTONIC_USEC=`` (systemd 253+ wants the timestamp; older ones ignore it),
  ``STOPPING=1``, ``STATUS=free text``.
- :func:`inherited_listeners`: socket activation. systemd passes listening sockets as
  descriptors 3, 4, ... with ``LISTEN_FDS=N``, ``LISTEN_PID=<our pid>`` (they are ours
  only if it matches) and ``LISTEN_FDNAMES=name:name`` (``FileDescriptorName=``).
- :func:`stderr_is_journal`: ``JOURNAL_STREAM=dev:inode`` names the journald stream that
  stdout/stderr were connected to; when fd 2 is that very stream, log lines may carry
  a ``<N>`` syslog priority prefix, which journald turns into the entry's priority.

The variables are removed from the environment once read (as ``sd_notify(unset=1)`` and
``sd_listen_fds(unset=1)`` do), so no child process misreads descriptors or a socket
that are not meant for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: ``FileDescriptorName=`` values tpops understands: plain POP3 and POP3 over implicit TLS.
PLAIN, TLS = "pop3", "pop3s"
#: The implicit-TLS port (RFC 8314), used when a descriptor carries no name tpops knows.
DEFAULT_TLS_PORT = 995


def implicit_tls_port(tls_port: int | None) -> int:
    """The local port that means implicit TLS on a socket tpops did not bind (systemd's
    unnamed listeners, ``--inetd`` connections): ``$tls_port``, 995 when it is nil."""
    return tls_port if tls_port is not None else DEFAULT_TLS_PORT


class Notifier:
    """``sd_notify()``: sends state changes to systemd when ``NOTIFY_SOCKET`` is set, else does nothing.

    Delivery is best-effort, as in libsystemd: a send that fails (systemd gone, socket
    full) is ignored, the service goes on serving.
    """

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        if address:
            # '@name' is a Linux abstract socket: a leading NUL byte instead of the '@'.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier systemd asked for (``NOTIFY_SOCKET``), which is then unset."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class ActivationError(Exception):
    """systemd passed descriptors tpops cannot serve on (not listening TCP sockets)."""


@dataclass
class InheritedListener:
    """A listening socket passed by systemd, with what it is for.

    ``kind`` is :data:`PLAIN` or :data:`TLS`: the descriptor's name when it is one of
    those (``FileDescriptorName=pop3`` / ``pop3s``), otherwise decided by the port
    (the TLS port means TLS). The name wins over the port, so port 995 named ``pop3``
    serves plain POP3.
    """

    sock: socket.socket
    name: str
    kind: str


def inherited_listeners(tls_port: int = DEFAULT_TLS_PORT, pid: int | None = None) -> list[InheritedListener]:
    """The listening sockets systemd passed to this process, or [] when it passed none.

    ``LISTEN_FDS``, ``LISTEN_PID`` and ``LISTEN_FDNAMES`` are removed from the
    environment in every case. Descriptors meant for another process (``LISTEN_PID``
    not ours) are left alone. The sockets are made close-on-exec and non-blocking (the
    workers poll them and accept without blocking). Raises :class:`ActivationError`
    for a descriptor that is not a listening TCP socket (``ListenDatagram=``, a FIFO,
    ``Accept=yes``: a connection, which is ``--inetd``'s job).
    """
    count = os.environ.pop("LISTEN_FDS", None)
    listen_pid = os.environ.pop("LISTEN_PID", None)
    names = os.environ.pop("LISTEN_FDNAMES", None)
    if count is None or listen_pid is None:
        return []
    try:
        n, owner = int(count), int(listen_pid)
    except ValueError:
        raise ActivationError(f"invalid LISTEN_FDS={count!r} / LISTEN_PID={listen_pid!r}") from None
    if owner != (os.getpid() if pid is None else pid) or n <= 0:
        return []
    labels = names.split(":") if names else []
    result: list[InheritedListener] = []
    try:
        for i in range(n):
            fd = LISTEN_FDS_START + i
            name = labels[i] if i < len(labels) else "unknown"
            os.set_inheritable(fd, False)
            sock = _listening_tcp_socket(fd, name)
            result.append(InheritedListener(sock, name, _kind(sock, name, tls_port)))
    except BaseException:
        for listener in result:
            listener.sock.close()
        raise
    return result


def _listening_tcp_socket(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"systemd passed descriptor {fd} ({name}), which is not a socket: "
                              f"{exc.strerror or exc}") from None
    ok = (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
          and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    if not ok:
        sock.detach()  # not ours to close: report it and leave the descriptor as it was
        raise ActivationError(f"systemd passed descriptor {fd} ({name}), which is not a listening TCP "
                              "socket: use ListenStream= with Accept=no for tpops, or Accept=yes with "
                              "tpops --inetd")
    sock.setblocking(False)
    return sock


def _kind(sock: socket.socket, name: str, tls_port: int) -> str:
    if name in (PLAIN, TLS):
        return name
    port = 0
    with contextlib.suppress(OSError, IndexError):
        port = int(sock.getsockname()[1])
    return TLS if port == tls_port else PLAIN


def stderr_is_journal() -> bool:
    """True when stderr is journald's stream (``JOURNAL_STREAM`` names fd 2's device and inode).

    ``INVOCATION_ID`` alone is not enough: it is set for every process systemd starts,
    also when its output goes to a file or a terminal (``StandardError=file:...``), and is
    inherited by anything those processes start, test suites included.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False
