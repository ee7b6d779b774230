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
  every user's lock. Root prepares it for the workers (:func:`prepare_lock_dir`: start-up,
  every reload, every worker boot) through ``O_DIRECTORY | O_NOFOLLOW`` descriptors and
  ``fchown``, never by path: a lock directory swapped for a symlink (to ``/etc/shadow``,
  say) is refused, its target untouched. The default lives under root's ``/run/tpops``
  (:func:`default_lock_dir`), where no other user can swap it at all.
* ``release`` never unlinks the file. Unlinking a flock file races with another locker
  that opened the old file just before: both would then "hold" a lock, on different
  inodes.
* Flock belongs to the open file description, not the process, so a second ``acquire``
  in the same process conflicts with the first, and the held descriptor keeps the lock
  across a later ``setuid`` to the mailbox owner (nothing is reopened).

``$mailbox_lock`` chooses where the lock lives (:func:`lock_kind`): ``'local'`` is the
flock above (one host only: another host's flock on its own ``$passwd_lock_dir`` never
sees it); ``'maildir'`` is :func:`acquire_in_maildir`, an OFD lock (``F_OFD_SETLK``) on
``tpops-lock`` in the Maildir root, which a shared file system that implements POSIX
byte-range locks (NFSv4, CephFS, GlusterFS) enforces across hosts; ``'mysql'`` is
``GET_LOCK`` on the database (:mod:`tpops.auth.mysql`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
from types import TracebackType
from typing import Protocol

from tpops.logs import escape, get

log = get("mailbox")

#: Permissions of a lock directory we create.
LOCK_DIR_MODE = 0o700
#: Permissions of a lock file we create.
LOCK_FILE_MODE = 0o600
#: Root-owned parent of the default lock directory when running as root.
DEFAULT_LOCK_PARENT = "/run/tpops"
#: Permissions of :data:`DEFAULT_LOCK_PARENT` when we create it.
PARENT_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


#: The values of ``$mailbox_lock``.
MAILBOX_LOCKS: tuple[str, ...] = ("local", "maildir", "mysql")
#: The lock file in a Maildir root (``'maildir'``); never a message (those live in cur/ and new/).
MAILDIR_LOCK_NAME = "tpops-lock"


def lock_kind(mailbox_lock: str | None, auth_type: str) -> str:
    """The effective ``$mailbox_lock``: as set, else ``'mysql'`` for the MySQL backend
    (its behaviour before the parameter existed) and ``'local'`` for the others."""
    if mailbox_lock is not None:
        return mailbox_lock
    return "mysql" if auth_type == "MySQL" else "local"


class MailboxInUse(Exception):
    """Another session holds this mailbox's lock."""


class MailboxLock(Protocol):
    """A held mailbox lock; ``release()`` is idempotent. Process death releases it too.

    ``still_held()`` says whether the lock is still ours right now: a flock cannot be
    lost while its descriptor is open, but a MySQL ``GET_LOCK`` ends silently with its
    connection. The session asks it before UPDATE and deletes nothing when it is False.
    """

    def release(self) -> None: ...

    def still_held(self) -> bool: ...


class DescriptorLock:
    """A lock held by an open file description (flock, OFD lock): it can move to another
    process with its descriptor (root mode's hand-off, :mod:`tpops.postlogin`)."""

    __slots__ = ("_fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path

    def fileno(self) -> int:
        """The descriptor holding the lock (to send to the process that takes the session over)."""
        return self._fd

    def hand_over(self) -> None:
        """Close this process's descriptor without unlocking, once another process holds
        the same open file description (received over a socket): the lock goes with it."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class FileMailboxLock(DescriptorLock):
    """A held mailbox lock (a :class:`MailboxLock`) on a file in the lock directory.

    ``release()`` is idempotent; process death releases the lock too. Usable as a
    context manager.
    """

    __slots__ = ()

    @property
    def held(self) -> bool:
        """True until :meth:`release` is called."""
        return self._fd >= 0

    def still_held(self) -> bool:
        """True until :meth:`release`: the kernel keeps a flock as long as its descriptor is open."""
        return self.held

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


class LockDirError(ValueError):
    """``$passwd_lock_dir`` cannot be used; the message names it and says why, for the admin."""


def default_lock_dir() -> str:
    """The default ``$passwd_lock_dir``: ``/run/tpops/locks`` as root, a per-user one otherwise.

    As root the directory lives under :data:`DEFAULT_LOCK_PARENT`, which root creates
    0755 and nobody else can write: no local user (nor the ``--user`` that owns the lock
    directory itself) can replace the lock directory by a symlink there. A non-root run
    (development, tests) cannot write ``/run`` and changes no ownership, so a directory
    of its own in ``/var/tmp`` is enough.
    """
    if os.geteuid() == 0:
        return os.path.join(DEFAULT_LOCK_PARENT, "locks")
    return f"/var/tmp/tpops-{os.geteuid()}"  # noqa: S108  (checked: ours, not a symlink, not shared)


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    """A descriptor of the directory ``name`` itself: never through a symlink in its last component."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _unsafe(st: os.stat_result, allowed: set[int], euid: int) -> str | None:
    """Why a lock directory with this ``fstat`` may not be used, or None."""
    if st.st_uid not in allowed:
        whom = "root or the --user" if euid == 0 else f"uid {euid}"
        return f"it belongs to uid {st.st_uid}, and only {whom} may own it"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "it is writable by group or others (chmod 0700 it)"
    return None


def _open_parent(lock_dir: str, parent: str, euid: int) -> int:
    """The lock directory's parent, created 0755 when it is the default one, checked: only
    root (or this user) may be able to replace entries in it."""
    if parent == DEFAULT_LOCK_PARENT and euid == 0:
        try:
            os.mkdir(parent, PARENT_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(parent, PARENT_MODE)  # whatever the umask: --user must be able to pass
            log.info("created %s", escape(parent))
    try:
        fd = _open_dir(parent)
    except OSError as e:
        raise LockDirError(f"$passwd_lock_dir {lock_dir}: cannot open its parent {parent}: "
                           f"{e.strerror or e}") from None
    st = os.fstat(fd)
    problem: str | None = None
    if st.st_uid not in (0, euid):
        problem = f"belongs to uid {st.st_uid}, not root"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        problem = "is writable by group or others without the sticky bit"
    if problem is not None:
        os.close(fd)
        raise LockDirError(f"$passwd_lock_dir {lock_dir}: its parent {parent} {problem}, so another "
                           "user could replace the lock directory; use a directory under a root-owned "
                           f"parent (the default is {os.path.join(DEFAULT_LOCK_PARENT, 'locks')})")
    return fd


def prepare_lock_dir(lock_dir: str, owner: tuple[int, int] | None = None) -> None:
    """Make ``lock_dir`` ready for the workers; run before they drop privileges (as root).

    ``owner`` is the ``(uid, gid)`` the workers will lock as (``--user``), None for this
    process. The directory is created 0700 when missing, opened with
    ``O_DIRECTORY | O_NOFOLLOW`` relative to its opened parent, checked with ``fstat``
    and, as root, handed to ``owner`` with ``fchown`` on that descriptor: nothing is
    ever changed by path, so a symlink swapped in at any moment redirects nothing.

    Refused with :class:`LockDirError` (a clear start-up error) when the directory is a
    symlink or not a directory, belongs to anyone but root or ``owner`` (this user when
    not root), is writable by group or others, or its parent could let another user
    replace it (not root's, or writable by others without the sticky bit).
    """
    euid = os.geteuid()
    path = os.path.abspath(lock_dir)
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise LockDirError(f"$passwd_lock_dir {lock_dir}: not a directory name")
    allowed = {euid} if euid != 0 else {0} | ({owner[0]} if owner is not None else set())
    parent_fd = _open_parent(lock_dir, parent, euid)
    try:
        try:
            os.mkdir(name, LOCK_DIR_MODE, dir_fd=parent_fd)
            log.info("created lock directory %s", escape(path))
        except FileExistsError:
            pass
        except OSError as e:
            raise LockDirError(f"$passwd_lock_dir {lock_dir}: cannot create it: {e.strerror or e}") from None
        try:
            fd = _open_dir(name, parent_fd)
        except OSError as e:
            raise LockDirError(f"$passwd_lock_dir {lock_dir}: {_open_error(e, name, parent_fd)}") from None
    finally:
        os.close(parent_fd)
    try:
        st = os.fstat(fd)
        problem = _unsafe(st, allowed, euid)
        if problem is not None:
            raise LockDirError(f"$passwd_lock_dir {lock_dir}: refused: {problem}")
        if euid == 0 and owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, owner[0], owner[1])
    finally:
        os.close(fd)


def _open_error(e: OSError, name: str, dir_fd: int | None) -> str:
    """What a failed ``O_DIRECTORY | O_NOFOLLOW`` open of a lock directory means, for the admin."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            pass
        else:
            if stat.S_ISLNK(st.st_mode):
                return "refused: it is a symbolic link (remove it; tpops creates the directory)"
            if not stat.S_ISDIR(st.st_mode):
                return "refused: it is not a directory"
    return f"cannot open it: {e.strerror or e}"


def open_lock_dir(lock_dir: str) -> int:
    """A descriptor of ``lock_dir`` checked for this process's use, created (0700) when missing.

    The last component is opened ``O_NOFOLLOW``; the directory must belong to this
    process's effective uid and be writable by nobody else (whoever can create files
    there could hold every user's lock). Raises :class:`PermissionError` for an unsafe
    directory, :class:`OSError` when it cannot be created or opened.
    """
    try:
        os.mkdir(lock_dir, LOCK_DIR_MODE)
        log.info("created lock directory %s", escape(lock_dir))
    except FileExistsError:
        pass
    try:
        fd = _open_dir(lock_dir)
    except OSError as e:
        raise PermissionError(e.errno, _open_error(e, lock_dir, None), lock_dir) from None
    try:
        problem = _unsafe(os.fstat(fd), {os.geteuid()}, os.geteuid())
        if problem is not None:
            raise PermissionError(errno.EPERM, problem, lock_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_lock_dir(lock_dir: str) -> None:
    """Refuse to start when ``lock_dir`` cannot be used as this process's identity (the
    rules of :func:`open_lock_dir`): otherwise every login would fail later with
    ``-ERR [SYS/TEMP]``. Raises :class:`LockDirError` with a message for the administrator."""
    try:
        os.close(open_lock_dir(lock_dir))
    except OSError as exc:
        raise LockDirError(
            f"$passwd_lock_dir {lock_dir} is not usable as uid {os.geteuid()}: {exc.strerror or exc}"
        ) from None


def acquire(lock_dir: str, key: str) -> FileMailboxLock:
    """Take the one-session lock for ``key`` in ``lock_dir``.

    Raises :class:`MailboxInUse` when another session holds it, :class:`OSError` when the
    lock directory or file is unusable (missing parent, unsafe directory, a symlink in
    place of the directory or the lock file). The file is opened relative to the
    checked directory descriptor, so the directory cannot be swapped in between.
    """
    dir_fd = open_lock_dir(lock_dir)
    name = lock_file_name(key)
    path = os.path.join(lock_dir, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, LOCK_FILE_MODE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
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


# ---------------------------------------------------------------- 'maildir': OFD locks


#: ``struct flock`` on Linux (short l_type, short l_whence, off_t l_start, off_t l_len,
#: pid_t l_pid, padded to its C size). ``l_pid`` must be 0 for OFD locks.
_FLOCK = struct.Struct("@hhqqi4x")


def _ofd(fd: int, lock_type: int) -> None:
    """``F_OFD_SETLK`` of ``lock_type`` over the whole file (no wait)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0))


class OfdMailboxLock(DescriptorLock):
    """A held OFD lock on the Maildir's ``tpops-lock`` (a :class:`MailboxLock`).

    An OFD lock belongs to the open file description, like a flock: it ends when the
    last descriptor closes, with the process, even under SIGKILL. On NFS the client
    kernel holds it as a POSIX lock on the server (NFSv4 state, or lockd for v3): a
    crashed client's locks are dropped by the server when its lease expires.
    """

    __slots__ = ()

    def still_held(self) -> bool:
        """True until :meth:`release`: the kernel keeps the lock while its descriptor is open."""
        return self._fd >= 0

    def release(self) -> None:
        """Unlock (a forked child may share the description), then close. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            _ofd(fd, fcntl.F_UNLCK)
        except OSError:
            pass  # closing below drops it anyway
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<OfdMailboxLock {self.path!r} {'held' if self._fd >= 0 else 'released'}>"


class NoMailboxLock:
    """The lock of a Maildir that does not exist yet: a session that opens it sees no
    message, so it can delete nothing, and there is nothing to lock."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = True

    def still_held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False


def acquire_in_maildir(maildir: str, key: str) -> OfdMailboxLock | NoMailboxLock:
    """Take the one-session lock in the Maildir itself (``$mailbox_lock = 'maildir'``).

    The Maildir root is opened as :mod:`tpops.mailbox.maildir` opens it (component by
    component, symlinks only of root or this user); ``tpops-lock`` is opened relative to
    that descriptor with ``O_NOFOLLOW | O_NONBLOCK`` (no symlink, no FIFO), checked to
    be a regular file, and, when root created it, handed to the Maildir's owner with
    ``fchown`` (so the file is the owner's, like everything else in the Maildir).
    Raises :class:`MailboxInUse` when another session, on any host sharing the file
    system, holds it; OSError when it cannot be taken (``key`` names the mailbox in
    the exception only).
    """
    # Imported here: maildir.py is the heavier module, and config.py imports this one early.
    from tpops.mailbox.maildir import open_root

    root = open_root(maildir, follow_last=True)
    try:
        if root.fd is None:
            return NoMailboxLock()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(MAILDIR_LOCK_NAME, flags, LOCK_FILE_MODE, dir_fd=root.fd)
    finally:
        root.close()
    path = os.path.join(maildir, MAILDIR_LOCK_NAME)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(errno.EPERM, "lock file is not a regular file", path)
        if os.geteuid() == 0 and st.st_uid == 0 and root.stat.st_uid != 0:
            os.fchown(fd, root.stat.st_uid, root.stat.st_gid)
        _ofd(fd, fcntl.F_WRLCK)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise MailboxInUse(key) from None
        raise
    except BaseException:
        os.close(fd)
        raise
    return OfdMailboxLock(fd, path)
