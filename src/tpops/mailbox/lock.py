"""One POP3 session per mailbox: a kernel file lock that dies with its holder.

RFC 1939 section 4 has the server lock the maildrop when a session enters the
TRANSACTION state, so two sessions never hand out (and delete) the same messages. The
lock here is ``flock(LOCK_EX | LOCK_NB)`` on a file in ``$passwd_lock_dir``. The kernel
drops a flock when the last descriptor of its open file description closes, so a
session that is killed, even with SIGKILL, never leaves its user locked out; this is
the bug TPOPS 0.5.1 fixed for its own lock files ("lock information remains when client
disconnect").

Choices, and why:

* The file is named by a SHA-256 digest of the key (the Maildir's real path), so any
  path maps to a fixed-length, safe file name and two spellings of one Maildir share a
  lock once the caller resolves the path.
* The file is opened with ``O_NOFOLLOW | O_CREAT | O_CLOEXEC``, mode 0600: a symlink
  planted in the lock directory cannot redirect the open, and the descriptor does not
  leak into programs the server executes.
* The lock directory is created 0700 when missing and refused when it is a symlink, not
  ours, or writable by group or others: whoever can create files there could hold
  every user's lock.
* ``release`` never unlinks the file. Unlinking a flock file races with another locker
  that opened the old file just before: both would then "hold" a lock, on different
  inodes.
* Flock belongs to the open file description, not the process, so a second ``acquire``
  in the same process conflicts with the first, and the held descriptor keeps the lock
  across a later ``setuid`` to the mailbox owner (nothing is reopened).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from types import TracebackType
from typing import Protocol

from tpops.logs import escape, get

log = get("mailbox")

#: Permissions of a lock directory we create.
LOCK_DIR_MODE = 0o700
#: Permissions of a lock file we create.
LOCK_FILE_MODE = 0o600


class MailboxInUse(Exception):
    """Another session holds this mailbox's lock."""


class MailboxLock(Protocol):
    """A held mailbox lock; ``release()`` is idempotent. Process death releases it too."""

    def release(self) -> None: ...


class FileMailboxLock:
    """A held mailbox lock (a :class:`MailboxLock`) on a file in the lock directory.

    ``release()`` is idempotent; process death releases the lock too. Usable as a
    context manager.
    """

    __slots__ = ("_fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path

    @property
    def held(self) -> bool:
        """True until :meth:`release` is called."""
        return self._fd >= 0

    def release(self) -> None:
        """Give up the lock. Safe to call more than once.

        Unlocks explicitly before closing: a forked child may share the open file
        description, and closing only our descriptor would then keep the lock held.
        """
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FileMailboxLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<FileMailboxLock {self.path!r} {state}>"


def lock_file_name(key: str) -> str:
    """The lock file name for ``key``: a digest, so every key gives a safe, short name."""
    digest = hashlib.sha256(os.fsencode(key)).hexdigest()
    return f"tpops-{digest}.lock"


def ensure_lock_dir(lock_dir: str) -> None:
    """Create ``lock_dir`` (0700) if missing; refuse one another user could write to.

    Raises :class:`PermissionError` for an unsafe directory and :class:`OSError` when it
    cannot be created or examined.
    """
    try:
        os.mkdir(lock_dir, LOCK_DIR_MODE)
        log.info("created lock directory %s", escape(lock_dir))
    except FileExistsError:
        pass
    st = os.lstat(lock_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(errno.ENOTDIR, "lock directory is not a directory", lock_dir)
    if st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "lock directory belongs to another user", lock_dir)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(errno.EPERM, "lock directory is group or world writable", lock_dir)


def prepare_lock_dir(lock_dir: str, owner: tuple[int, int] | None = None) -> None:
    """Make ``lock_dir`` ready for the workers: run before they drop privileges.

    Creates it (0700) when missing; as root with ``owner`` (the ``--user`` uid/gid the
    workers will lock as) it is handed to that owner.
    """
    os.makedirs(lock_dir, mode=LOCK_DIR_MODE, exist_ok=True)
    if os.geteuid() == 0 and owner is not None:
        os.chown(lock_dir, owner[0], owner[1])


def check_lock_dir(lock_dir: str) -> None:
    """Refuse to start when ``lock_dir`` cannot be used as this process's identity (the
    rules of :func:`ensure_lock_dir`): otherwise every login would fail later with
    ``-ERR [SYS/TEMP]``. Raises ValueError with a message for the administrator."""
    try:
        ensure_lock_dir(lock_dir)
    except OSError as exc:
        raise ValueError(
            f"$passwd_lock_dir {lock_dir} is not usable as uid {os.geteuid()}: {exc.strerror or exc}"
        ) from None


def acquire(lock_dir: str, key: str) -> FileMailboxLock:
    """Take the one-session lock for ``key`` (the Maildir's real path) in ``lock_dir``.

    Raises :class:`MailboxInUse` when another session holds it, :class:`OSError` when the
    lock directory or file is unusable (missing parent, unsafe directory, a symlink in
    place of the lock file).
    """
    ensure_lock_dir(lock_dir)
    path = os.path.join(lock_dir, lock_file_name(key))
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, LOCK_FILE_MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PermissionError(errno.EPERM, "lock file is not a regular file", path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxInUse(key) from None
    except BaseException:
        os.close(fd)
        raise
    return FileMailboxLock(fd, path)
