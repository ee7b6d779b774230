"""Detaching (python-daemon) and the pid file.

The pid file holds the daemon's real pid (the seed wrote its parent's), is replaced
when stale, refused when a live tpops holds it, and removed at exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable

import daemon

from tpops import logs
from tpops.config import Config


class PidFileError(Exception):
    """The pid file belongs to a running tpops, or cannot be written."""


class PidFile:
    """``$pid_file`` / ``--pidfile``."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid: int | None = None

    def check(self) -> None:
        """Refuse to start when a live tpops owns the file; a stale one is fine."""
        try:
            with open(self.path) as f:
                text = f.read(64).strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise PidFileError(f"cannot read pid file {self.path}: {exc.strerror}") from None
        if text.isdigit() and int(text) != os.getpid() and _is_tpops(int(text)):
            raise PidFileError(f"tpops is already running with pid {text} (pid file {self.path})")
        directory = os.path.dirname(self.path)
        if not os.access(directory, os.W_OK):
            raise PidFileError(f"cannot write pid file {self.path}: directory not writable")

    def write(self) -> None:
        """Write our pid atomically: a fresh temporary file in the pid file's directory
        (``mkstemp``: ``O_CREAT|O_EXCL``, a random name, so root never opens a file or
        symlink someone planted at a guessable name), then renamed over the pid file."""
        self.pid = os.getpid()
        directory, name = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, f"{self.pid}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self) -> None:
        """Remove the file if it is still ours (only the process that wrote it removes it)."""
        if self.pid != os.getpid():
            return
        try:
            with open(self.path) as f:
                if f.read(64).strip() != str(self.pid):
                    return
            os.unlink(self.path)
        except OSError:
            pass


def _is_tpops(pid: int) -> bool:
    """True when ``pid`` is alive and is a tpops master (not a recycled pid).

    A running master's title is ``tpops: master``; one still starting up runs the
    ``tpops`` script. Anything else (a shell, an editor with "tpops" in a file name)
    means the pid file is stale.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # alive and we cannot tell: be safe
    if cmdline.startswith(b"tpops: master"):
        return True
    argv = cmdline.split(b"\0")[:2]
    return any(os.path.basename(arg) == b"tpops" for arg in argv)


def detach(
    config: Config,
    listeners: list[socket.socket],
    log_files: logs.LogSetup,
    reopen: Callable[[], logs.LogSetup],
) -> logs.LogSetup:
    """Become a daemon (new session, umask 022, chdir /), keeping sockets and log files.

    stdin, stdout and stderr go to /dev/null; the caller then points stderr at
    ``$error_log`` (see ``tpops.cli``) so it follows the file across reopens. The logs
    (syslog included) were opened once to prove they can be; they are closed before
    the fork-and-close dance and opened again after it.
    """
    if log_files.syslog is not None:
        log_files.syslog.close()
    log_files.close()
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        files_preserve=[s.fileno() for s in listeners],
        signal_map={},
    )
    context.open()
    return reopen()
