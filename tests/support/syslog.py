"""A /dev/log stand-in: collect what tpops sends to syslog, and run tpops where /dev/log is it (root).

The module is ``tests.support.syslog``; it never shadows the standard library's
:mod:`syslog` because it is only imported by its full name.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from tests.support.procs import wait_for
from tests.support.server import MailEnv, Server


class SyslogCatcher:
    """A /dev/log stand-in: an AF_UNIX datagram socket collecting what tpops sends to syslog."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # sessions served as nobody log too
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode("utf-8", "surrogateescape"))

    def lines(self) -> list[str]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """The first message containing ``text``."""
        def find() -> str | None:
            return next((m for m in self.lines() if text in m), None)
        return wait_for(find, timeout, what=f"syslog message with {text!r}")

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


#: Run a command in a private mount namespace whose /dev is a small tmpfs holding the
#: usual device nodes (bind-mounted from the real /dev) and ``log``, a symlink to the test's
#: syslog socket (no ``log`` when the socket argument is empty: a host without syslog). Nothing outside the namespace changes; it vanishes with its processes.
_PRIVATE_DEV = r"""
set -e
real=$1; log=$2; shift 2
mount --rbind /dev "$real"
mount -t tmpfs -o mode=755,size=64k tpops-test-dev /dev
for n in null zero full random urandom tty; do
  if [ -e "$real/$n" ]; then : > "/dev/$n"; mount --bind "$real/$n" "/dev/$n"; fi
done
ln -s /proc/self/fd /dev/fd
if [ -n "$log" ]; then ln -s "$log" /dev/log; fi
umount -l "$real"
exec "$@"
"""


def with_dev_log(base: Path, log_socket: Path | None, argv: list[str]) -> list[str]:
    """``argv`` run where /dev/log is ``log_socket``, or where there is no /dev/log at all
    when it is None (needs root: ``unshare --mount``)."""
    real = base / "realdev"
    real.mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _PRIVATE_DEV,
            "sh", str(real), "" if log_socket is None else str(log_socket), *argv]


class SyslogServer(Server):
    """``tpops --fg`` whose syslog goes to a :class:`SyslogCatcher` (root only)."""

    def __init__(self, env: MailEnv, *extra_args: str, port: int | None = None) -> None:
        super().__init__(env, *extra_args, port=port)
        self.syslog = SyslogCatcher(env.base / "syslog.sock")
        self.args = with_dev_log(env.base, self.syslog.path, self.args)

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            self.syslog.close()
