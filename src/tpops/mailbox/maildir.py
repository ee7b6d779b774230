"""A Maildir / Maildir++ mailbox as one POP3 session sees it: a snapshot taken at login.

Methods for the session
-----------------------
``open_root(path)``
    Open the Maildir directory itself, without following a symlink in its last
    component; the identity decision (:mod:`tpops.privileges`) uses its ``fstat``.
``Maildir.open(path_or_root, ...)``
    Take the snapshot (RFC 1939 section 4: the maildrop is fixed once the session is in
    the TRANSACTION state). ``messages[msn - 1]`` is message number ``msn``.
``open_message(msg)``
    The stored file for RETR/TOP; :class:`MessageGone` if another program removed it.
``commit()``
    The UPDATE state: unlink every message marked ``deleted``. Nothing else in this
    module ever deletes, and mail delivered during the session is neither listed nor
    touched.

The snapshot
------------
Messages are the regular files in ``cur/`` and ``new/`` whose names do not start with
"."; ``tmp/`` (deliveries in progress), symlinks and anything else are ignored. A
missing Maildir, or one missing ``cur/`` and ``new/``, is an empty mailbox. Files in
``new/`` are moved to ``cur/`` with the ``:2,`` info suffix, as the Maildir
specification asks of a reader. Messages are ordered by delivery time (the leading
decimal number of the unique name, 0 without one), then by unique name, so every
session numbers them the same way.

UIDL is the unique name (the file name before the first ":"), as TPOPS sent it, so
it never changes when another reader renames the file to change flags. A unique name
that is not 1 to 70 octets of 0x21-0x7E (RFC 1939 section 7) is replaced by the hex
SHA-1 of its octets, which is just as stable.

Files the user controls
-----------------------
The Maildir belongs to the user being served, who may put anything in it: symlinks,
FIFOs, devices, huge files. Every file is reached relative to a descriptor of the
directory opened at login (a renamed or swapped path component cannot redirect
later lookups), opened ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO opens at once instead of
blocking the worker) and used only when ``fstat`` says it is a regular file; the
size cache is read with a size cap. A file failing a check is not a message, and a
size cache failing one is ignored and rewritten.

Sizes
-----
STAT and LIST must report what RETR sends (RFC 1939 section 11), which
:mod:`tpops.mailbox.encode` defines. Finding it means reading each message once, so
the results are kept in ``tpops-sizecache`` in the Maildir root, keyed by unique name
(a Maildir message's content never changes): a later login lists two directories and
reads one file. A Maildir++ / Dovecot ``,W=<n>`` in the name (the size with CRLF line
ends) also answers without reading, after checking the last octet, since a message
not ending in LF gets a CRLF appended. Two settings trade exactness for speed, as in
TPOPS: ``maildir_extended`` trusts ``,W=<n>`` without the final-newline check, else
``,S=<n>`` (the file size), and
``maildir_use_filesize`` uses the file's size from ``stat``; neither is exact when the
stored message has bare LF line ends, and their results are not cached.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import stat
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from tpops.logs import escape, get
from tpops.mailbox.encode import VERBATIM_MIN_OCTETS, wire_size_verbatim_fd

log = get("mailbox")

#: Name of the size cache in the Maildir root.
SIZE_CACHE_NAME = "tpops-sizecache"
#: This host's name as it goes into temporary file names: two nodes sharing a Maildir
#: (NFS, CephFS) may have equal pids, so host + pid + random makes the name unique.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", os.uname().nodename)[:64] or "host"
#: First line of the size cache; a file starting otherwise is ignored and rewritten.
#: Version 2: lines are in delivery order, so an unchanged Maildir is listed from the cache alone.
#: Version 3: a line may end in " v": the message is stored in its wire form (RETR may
#: ``sendfile`` it). A version 2 cache is read as version 3 without flags and rewritten
#: in version 3 the next time the Maildir changes.
SIZE_CACHE_HEADER = b"tpops-sizecache 3\n"
#: Older headers whose lines are still read (sizes only).
SIZE_CACHE_OLD_HEADERS = (b"tpops-sizecache 2\n",)
#: A size cache larger than this is ignored and rewritten, never read: about 150,000
#: messages' worth, far more than any mailbox a POP3 client downloads.
SIZE_CACHE_MAX_OCTETS = 16 * 1024 * 1024
#: Maildir++ quota file in the Maildir root; deletions are appended to it.
MAILDIRSIZE_NAME = "maildirsize"
#: Info suffix a reader adds when moving a message from new/ to cur/ (Maildir spec).
NEW_TO_CUR_INFO = ":2,"
#: RFC 1939 section 7: a unique-id is 1 to 70 characters in 0x21-0x7E.
UIDL_MAX_OCTETS = 70
#: Symlinks followed while resolving a Maildir path, as the kernel's own limit.
MAX_SYMLINKS = 40

_LEADING_NUMBER = re.compile(r"[0-9]*")
_CACHE_LINE = re.compile(r"([^\n]*) ([0-9]{1,18})( v)?\n")
#: A message file at most this large is sized with one read of all of it.
_WHOLE_READ_OCTETS = 1 << 20
#: Messages sized and timed in the calling thread before deciding on threads.
_PROBE_MESSAGES = 64
#: Per-file time above which sizing is waiting for the disk, not computing: threads then.
_IO_BOUND_SECONDS = 40e-6
#: Messages per task handed to a sizing thread.
_THREAD_BATCH = 256
#: Threads that size messages read from the disk on a first login: open, fstat, pread
#: and close release the GIL, so the disk waits of several files overlap.
SIZING_THREADS = 8
_PLAIN_UIDL = re.compile(r"[\x21-\x7e]{1,70}")
_SIZE_FIELD = re.compile(r",([SW])=([0-9]+)")
#: Files in the Maildir: never through a symlink, and a FIFO must not block the open.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Path components and the Maildir root: only looked up from, never read (O_PATH needs
#: no read permission on the directory, so a 0711 home does not stop the walk).
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: cur/ and new/: listed, so opened for reading.
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class MessageGone(Exception):
    """The message's file disappeared (another program deleted it) during the session."""


class UnsafeMaildir(PermissionError):
    """The Maildir's path or layout is one tpops must not serve (a symlink where the
    owner decides, a symlink planted by another user, a symlinked ``cur/``)."""


class NotRegularFile(OSError):
    """A file in the Maildir is not a regular file (a FIFO, device, directory ...)."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.EINVAL, "not a regular file", name)


@dataclass(slots=True)
class Message:
    """One message of the snapshot. Its message number is its index in the list plus 1."""

    uid: str  #: the UIDL: unique name, or its SHA-1 when not a valid unique-id
    name: str  #: current file name inside cur/ (changes if another reader renames it)
    octets: int  #: exact wire size, or the configured fast approximation
    deleted: bool = False  #: marked by DELE, cleared by RSET; acted on by commit()
    ino: int = 0  #: the file's inode at the snapshot (0: unknown): tells duplicates apart
    verbatim: bool = False  #: the file is its own wire form, ``octets`` long (RETR may sendfile it)


@dataclass(slots=True)
class CommitResult:
    """What :meth:`Maildir.commit` did, for the QUIT reply and the access log.

    ``deleted`` counts messages that are gone afterwards (including ones someone else
    removed first); ``deleted_octets`` sums their POP3 sizes; ``failures`` holds one
    log-ready reason per message that could not be removed.
    """

    deleted: int = 0
    deleted_octets: int = 0
    failures: list[str] = field(default_factory=list)


def unique_name(name: str) -> str:
    """The Maildir unique name: the file name up to the first ":" (the info part)."""
    return name.partition(":")[0]


def uidl_for(unique: str) -> str:
    """The UIDL for a unique name: itself when RFC 1939 allows it, else its hex SHA-1."""
    if _PLAIN_UIDL.fullmatch(unique):
        return unique
    return hashlib.sha1(os.fsencode(unique), usedforsecurity=False).hexdigest()  # a stable name, not a secret


def delivery_order_key(name: str) -> tuple[int, str, str]:
    """Sort key: the unique name's leading decimal number (0 if none), then the name.

    The unique name comes before the full name so flag changes never reorder messages;
    the full name only breaks ties between duplicates of one unique name.
    """
    unique = name.partition(":")[0]
    digits = unique.partition(".")[0]  # fast path for the usual "<time>.<id>.<host>"
    if not (digits.isascii() and digits.isdigit()):
        digits = _LEADING_NUMBER.match(unique).group()  # type: ignore[union-attr]
    return (int(digits) if digits else 0, unique, name)


def size_fields(unique: str) -> dict[str, int]:
    """The Maildir++ ``,S=<n>`` and ``,W=<n>`` fields of a unique name, by letter."""
    return {letter: int(value) for letter, value in _SIZE_FIELD.findall(unique)}


# ---------------------------------------------------------------- descriptors


def _closer(owner: object, fd: int) -> weakref.finalize[[int], object]:
    """Close ``fd`` when ``owner`` is collected, or earlier when the result is called."""
    return weakref.finalize(owner, os.close, fd)


class MaildirRoot:
    """The Maildir directory as opened at login: the anchor of every later lookup.

    ``fd`` is an ``O_PATH`` descriptor of the directory, None when the Maildir does not
    exist (an empty mailbox). ``stat`` is the ``fstat`` of the directory, or of its
    nearest existing ancestor when it does not exist: the owner the privilege layer
    serves when the backend names none. The descriptor is closed by :meth:`close` or
    when the object is collected.
    """

    __slots__ = ("__weakref__", "_close", "fd", "path", "stat")

    def __init__(self, path: str, fd: int | None, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd
        self.stat = st
        self._close = _closer(self, fd) if fd is not None else None

    @property
    def exists(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _components(path: str) -> list[str]:
    """The components of ``path`` to walk, last first (a stack)."""
    return [c for c in reversed(path.split("/")) if c and c != "."]


def open_root(path: str, *, follow_last: bool = True) -> MaildirRoot:
    """Open the Maildir at ``path`` one component at a time, each with ``O_NOFOLLOW``.

    A symlink on the way is followed only when it belongs to root or to the current
    effective user (whoever else planted it could point us anywhere; as root that
    means only root's own links), and never as the last component when
    ``follow_last`` is False: then the directory's owner, which decides whom the
    session runs as, is the owner of a real directory at that very path. Raises
    :class:`UnsafeMaildir` for a refused symlink; a missing Maildir, or a non-directory
    in its place, gives a root with ``fd`` None.
    """
    trusted = {0, os.geteuid()}
    fd = os.open("/" if path.startswith("/") else ".", _PATH_FLAGS)
    pending = _components(path)
    links = 0
    try:
        while pending:
            name = pending.pop()
            try:
                child = os.open(name, _PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return MaildirRoot(path, None, os.fstat(fd))
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):  # a file where a directory should be
                    return MaildirRoot(path, None, os.fstat(fd))
                if not pending and not follow_last:
                    raise UnsafeMaildir(errno.ELOOP, "the Maildir is a symbolic link", path) from None
                if st.st_uid not in trusted:
                    raise UnsafeMaildir(
                        errno.EPERM, f"symbolic link {name!r} on the way belongs to uid {st.st_uid}", path
                    ) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many symbolic links", path) from None
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _PATH_FLAGS)
                pending.extend(_components(target))
                continue
            os.close(fd)
            fd = child
        root = MaildirRoot(path, fd, os.fstat(fd))
        fd = -1  # the root owns it now
        return root
    finally:
        if fd >= 0:
            os.close(fd)


def _open_subdir(root_fd: int, name: str) -> int | None:
    """A listing descriptor of ``cur``/``new`` in the root; None when missing.

    A symlink there raises :class:`UnsafeMaildir`; any other non-directory counts as
    missing.
    """
    try:
        return os.open(name, _LIST_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        if stat.S_ISLNK(os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode):
            raise UnsafeMaildir(errno.ELOOP, f"{name}/ is a symbolic link", name) from None
        return None


def open_regular(dir_fd: int, name: str, flags: int = _OPEN_FLAGS) -> int:
    """Open ``name`` in ``dir_fd`` only if it is a regular file; the descriptor blocks.

    ``O_NOFOLLOW`` refuses a symlink (ELOOP) and ``O_NONBLOCK`` lets a FIFO open at
    once, so ``fstat`` can refuse it (:class:`NotRegularFile`) instead of the open
    hanging until someone writes to it.
    """
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(name)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(dir_fd: int, name: str, cap: int) -> bytes:
    """The content of the regular file ``name`` in ``dir_fd``, at most ``cap`` octets.

    Raises OSError (:class:`NotRegularFile`, ELOOP for a symlink, EFBIG when larger).
    """
    fd = open_regular(dir_fd, name)
    try:
        if os.fstat(fd).st_size > cap:
            raise OSError(errno.EFBIG, f"larger than {cap} octets", name)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:  # it grew after the fstat
                raise OSError(errno.EFBIG, f"larger than {cap} octets", name)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _message_entries(dir_fd: int | None) -> Iterator[os.DirEntry[str]]:
    """The entries of the directory open on ``dir_fd`` that may be messages.

    Uses the file type from the directory listing (no stat per file on file systems
    that report it): symlinks and non-regular files are skipped, as are dot files.
    """
    if dir_fd is None:
        return
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.name[0] != "." and entry.is_file(follow_symlinks=False):
                yield entry


def _scan_inodes(cur_fd: int | None) -> dict[int, str]:
    """A fresh listing of ``cur``: inode -> file name (a rename keeps the inode)."""
    return {entry.inode(): entry.name for entry in _message_entries(cur_fd)}


class _SizeCache:
    """The ``tpops-sizecache`` file: exact wire sizes by unique name.

    Format: the header line, then one ``<unique name> <octets>`` line per message,
    names as their file system octets, `` v`` appended when the message is stored in
    its wire form (``verbatim``). A name containing LF cannot be stored and is
    simply not cached; the octets are digits, so the last space before them separates
    them from a name that contains spaces. A file that is not a regular file, is
    larger than :data:`SIZE_CACHE_MAX_OCTETS` or does not parse is ignored whole and
    rewritten. It is written to a new file with a unique name in the Maildir root
    and renamed over the old one, so readers never see half a cache.
    """

    __slots__ = ("entries", "label", "root_fd", "valid", "verbatim")

    def __init__(self, root_fd: int, label: str) -> None:
        self.root_fd = root_fd
        self.label = label  # the path, for log lines
        self.entries: dict[str, int] = {}
        self.verbatim: set[str] = set()
        self.valid = True
        self._load()

    def _load(self) -> None:
        try:
            data = read_regular(self.root_fd, SIZE_CACHE_NAME, SIZE_CACHE_MAX_OCTETS)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("size cache %s ignored, it will be rewritten: %s", self._where(), e.strerror)
            self.valid = False
            return
        parsed = self._parse(data)
        if parsed is None:
            log.debug("size cache %s is corrupt, ignoring it", self._where())
            self.valid = False
        else:
            self.entries, self.verbatim = parsed

    def _where(self) -> str:
        return escape(os.path.join(self.label, SIZE_CACHE_NAME))

    @staticmethod
    def _parse(data: bytes) -> tuple[dict[str, int], set[str]] | None:
        """The sizes and verbatim names of a cache file's content; None if not a valid cache."""
        if data.startswith(SIZE_CACHE_HEADER):
            header = SIZE_CACHE_HEADER
        else:
            header = next((h for h in SIZE_CACHE_OLD_HEADERS if data.startswith(h)), b"")
            if not header:
                return None
        if not data.endswith(b"\n"):
            return None
        # Decoding the whole body equals decoding each name: LF and space are ASCII.
        body = os.fsdecode(data[len(header) :])
        # A match cannot span lines, so every line is valid iff each one gave a match.
        lines = _CACHE_LINE.findall(body)
        if len(lines) != body.count("\n"):
            return None
        if header != SIZE_CACHE_HEADER and any(flag for _, _, flag in lines):
            return None  # no flags before version 3
        entries = {name: int(octets) for name, octets, _ in lines}
        return entries, {name for name, _, flag in lines if flag}

    def save(self, entries: dict[str, int], verbatim: set[str]) -> None:
        """Replace the cache with ``entries`` if they differ in keys or it was invalid.

        Sizes never change for a unique name, so only added or dropped names matter.
        An unwritable Maildir just keeps the old cache (logged at debug).
        """
        if self.valid and entries.keys() == self.entries.keys():
            return
        storable = {u: n for u, n in entries.items() if "\n" not in u}
        if self.valid and storable.keys() == self.entries.keys():
            return
        lines = [SIZE_CACHE_HEADER]
        fsencode = os.fsencode
        lines.extend(
            b"%s %d v\n" % (fsencode(u), n) if u in verbatim else b"%s %d\n" % (fsencode(u), n)
            for u, n in storable.items()
        )
        if _replace_file(self.root_fd, SIZE_CACHE_NAME, b"".join(lines), self._where()):
            self.entries = storable
            self.verbatim = {u for u in verbatim if u in storable}
            self.valid = True


def _replace_file(dir_fd: int, name: str, data: bytes, label: str) -> bool:
    """Atomically replace ``name`` in ``dir_fd`` with ``data``; False (logged) on failure.

    The new content goes to ``.<name>.<host>.<pid>.<random>`` (unique across the hosts
    sharing the Maildir, so two nodes rebuilding the cache at once never write into
    one file; the last rename wins, and both wrote a whole, valid cache) created ``O_EXCL | O_NOFOLLOW`` (nothing
    planted under that name is ever written through) and is renamed over ``name``,
    which replaces whatever was there unless it is a directory.
    """
    tmp = f".{name}.{_HOST}.{os.getpid()}.{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as e:
        log.debug("%s not written: %s", label, e.strerror)
        return False
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        log.debug("%s not written: %s", label, e.strerror)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        return False
    return True


class _Sizer:
    """Finds each message's size during :meth:`Maildir.open`, by the configured rules.

    :meth:`size` takes the sorted listing and returns one result per entry: the
    cached size, the configured approximation, or the exact size found by reading the
    file (many files at once, in threads: :func:`_exact_sizes`). ``exact`` collects
    the exact sizes of present messages, ``verbatim`` the unique names of those stored
    in their wire form: the next cache content. The cache is read only when some size
    may have to be exact.
    """

    __slots__ = ("cache", "cur_fd", "exact", "extended", "known", "use_filesize", "verbatim")

    def __init__(self, cache: _SizeCache | None, cur_fd: int, extended: bool, use_filesize: bool) -> None:
        self.cur_fd = cur_fd
        self.extended = extended
        self.use_filesize = use_filesize
        self.cache = cache
        self.known: dict[str, int] = self.cache.entries if self.cache else {}
        self.verbatim: set[str] = set(self.cache.verbatim) if self.cache else set()
        self.exact: dict[str, int] = {}

    def _approximate(self, name: str, unique: str) -> int | None:
        """The size the fast settings give without reading (None: none applies)."""
        if self.extended and ("," in unique):
            fields = size_fields(unique)
            if "W" in fields:  # trusted as is: no check of the final newline
                return fields["W"]
            if "S" in fields:
                return fields["S"]
        if self.use_filesize:
            return os.stat(name, dir_fd=self.cur_fd, follow_symlinks=False).st_size
        return None

    def size(self, listing: list[tuple[int, str, str]]) -> list[int | OSError]:
        """For each ``(time, unique, name)`` of ``listing``: its size, or the OSError
        that makes it no message (FileNotFoundError: it vanished)."""
        results: list[int | OSError] = []
        todo: list[tuple[int, str, str]] = []  # (index in results, name, unique)
        known = self.known
        approximate = self.extended or self.use_filesize
        for _, unique, name in listing:
            try:
                octets = self._approximate(name, unique) if approximate else None
            except OSError as e:
                results.append(e)
                continue
            if octets is None:
                octets = known.get(unique)
                if octets is None:
                    todo.append((len(results), name, unique))
                    results.append(0)
                    self.exact[unique] = 0  # its place: the cache is in delivery order
                    continue
                self.exact[unique] = octets
            results.append(octets)
        for (index, _, unique), found in zip(todo, _exact_sizes(self.cur_fd, todo), strict=True):
            if isinstance(found, OSError):
                results[index] = found
                self.exact.pop(unique, None)
                continue
            octets, verbatim = found
            results[index] = octets
            self.exact[unique] = octets
            if verbatim:
                self.verbatim.add(unique)
        return results

    def save(self, present: Iterable[str]) -> None:
        """Rewrite the cache if the set of names with exact sizes changed.

        Cached sizes of ``present`` messages that were sized another way this time are
        kept: they are still right, and dropping them would only cause rewrites.
        """
        if self.cache is None:
            return
        if self.extended:
            known, exact = self.known, self.exact
            merged = {}
            for unique in present:  # delivery order, as the cache format requires
                octets = exact.get(unique, known.get(unique))
                if octets is not None:
                    merged[unique] = octets
            self.exact = merged
        self.cache.save(self.exact, self.verbatim)


def _exact_sizes(cur_fd: int, todo: list[tuple[int, str, str]]) -> list[tuple[int, bool] | OSError]:
    """:func:`_exact_octets` of each ``(_, name, unique)`` in ``todo``, in order.

    A first login of a large Maildir opens and reads thousands of small files. When
    they are in the page cache, each costs a few microseconds of Python and system
    calls, and threads only add GIL hand-offs; when they must come from the disk, each
    waits for it, and the waits overlap in threads (open, fstat, pread and close
    release the GIL). So the first :data:`_PROBE_MESSAGES` are sized here, timed, and
    the rest go to :data:`SIZING_THREADS` threads only if that took longer than
    :data:`_IO_BOUND_SECONDS` per file.
    """
    probe = todo[:_PROBE_MESSAGES]
    started = time.monotonic()
    results = _exact_run(cur_fd, probe)
    rest = todo[_PROBE_MESSAGES:]
    if not rest:
        return results
    per_file = (time.monotonic() - started) / len(probe)
    if SIZING_THREADS < 2 or per_file < _IO_BOUND_SECONDS:
        return results + _exact_run(cur_fd, rest)
    step = max(1, min(_THREAD_BATCH, len(rest) // SIZING_THREADS))
    batches = [rest[k : k + step] for k in range(0, len(rest), step)]
    with ThreadPoolExecutor(SIZING_THREADS, thread_name_prefix="tpops-sizing") as pool:
        for part in pool.map(lambda batch: _exact_run(cur_fd, batch), batches):
            results.extend(part)
    return results


def _exact_run(cur_fd: int, todo: list[tuple[int, str, str]]) -> list[tuple[int, bool] | OSError]:
    """:func:`_exact_octets` over ``todo``, an OSError in place of each failure."""
    out: list[tuple[int, bool] | OSError] = []
    for _, name, unique in todo:
        try:
            out.append(_exact_octets(cur_fd, name, unique))
        except OSError as e:
            out.append(e)
    return out


def _exact_octets(cur_fd: int, name: str, unique: str) -> tuple[int, bool]:
    """The exact wire size of a message file: from ``W=`` and its last octet, or by
    reading; and whether the file is its own wire form (always False with ``W=``).

    ``W=`` (Maildir++/Dovecot) counts the message with CRLF line ends; a file whose
    last octet is not LF is sent with a CRLF appended, 2 octets W= does not count.
    The file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file
    (:class:`NotRegularFile`); the non-blocking flag is harmless for a regular file,
    so it is left on (two ``fcntl`` calls fewer per message).
    """
    virtual_octets = size_fields(unique).get("W") if ",W=" in unique else None
    fd = os.open(name, _OPEN_FLAGS, dir_fd=cur_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(name)
        size = st.st_size
        if virtual_octets is not None:
            if size == 0:
                return 0, False  # empty file: nothing is sent, whatever W= says
            last = os.pread(fd, 1, size - 1)
            if last == b"":  # it shrank since fstat: read it whole
                return wire_size_verbatim_fd(fd)
            return (virtual_octets if last == b"\n" else virtual_octets + 2), False
        if size < _WHOLE_READ_OCTETS:
            data = os.pread(fd, size + 1, 0)
            if len(data) <= size:  # all of it (a short read of a regular file is its end)
                return _wire_size_of(data)
        return wire_size_verbatim_fd(fd)
    finally:
        os.close(fd)


def _wire_size_of(data: bytes) -> tuple[int, bool]:
    """:func:`~tpops.mailbox.encode.wire_size_verbatim_fd` of a message read whole."""
    if not data:
        return 0, False
    lf = data.count(b"\n")
    crlf = data.count(b"\r\n") if b"\r" in data else 0
    octets = len(data) + lf - crlf
    if data[-1] != 0x0A:
        return octets + 2, False
    if lf != crlf or len(data) < VERBATIM_MIN_OCTETS:
        return octets, False  # a small message is never sent verbatim: no need to know
    return octets, data[0] != 0x2E and b"\n." not in data


class Maildir:
    """One session's snapshot of a Maildir; see the module docstring for the rules.

    ``messages[index]`` is message number ``index + 1``. The session changes only
    ``Message.deleted``; :meth:`commit` acts on it. The Maildir's directories stay
    open for the session; their descriptors close with the object.
    """

    __slots__ = ("__weakref__", "_close_cur", "_cur_fd", "messages", "path", "root")

    def __init__(self, root: MaildirRoot, cur_fd: int | None, messages: list[Message]) -> None:
        self.path = root.path
        self.root = root
        self.messages = messages
        self._cur_fd = cur_fd
        self._close_cur = _closer(self, cur_fd) if cur_fd is not None else None

    @classmethod
    def open(
        cls,
        path: str | MaildirRoot,
        *,
        maildir_extended: bool = False,
        maildir_use_filesize: bool = False,
    ) -> Maildir:
        """Snapshot the Maildir at ``path`` (moving new/ to cur/ and finding sizes).

        ``path`` is a path (opened here with :func:`open_root`) or a root already
        opened. Raises OSError when the Maildir exists but cannot be listed
        (permissions, a symlinked ``cur/``); a missing one is an empty mailbox.
        """
        root = path if isinstance(path, MaildirRoot) else open_root(path)
        if root.fd is None:
            return cls(root, None, [])
        cur_fd = _move_new_to_cur(root)
        try:
            return cls._snapshot(root, cur_fd, maildir_extended, maildir_use_filesize)
        except BaseException:
            if cur_fd is not None:
                os.close(cur_fd)
            raise

    @classmethod
    def _snapshot(cls, root: MaildirRoot, cur_fd: int | None, extended: bool, use_filesize: bool) -> Maildir:
        if cur_fd is None:
            return cls(root, None, [])
        assert root.fd is not None
        # One listing serves both the cache check and the full scan.
        files: list[tuple[str, int]] = []  # (name, inode) of every possible message
        odd = False  # some entry is a symlink, FIFO, directory ...: never a message
        with os.scandir(cur_fd) as entries:
            for entry in entries:
                if entry.name[0] == ".":
                    continue
                if entry.is_file(follow_symlinks=False):
                    files.append((entry.name, entry.inode()))
                else:
                    odd = True
        cache = None if use_filesize else _SizeCache(root.fd, root.path)
        if cache is not None and not extended:
            unchanged = _from_cache(cache, files, odd)
            if unchanged is not None:
                return cls(root, cur_fd, unchanged)
        # (delivery time, unique name, name): names are unique within a directory.
        inodes = dict(files)
        listing = [delivery_order_key(name) for name, _ in files]
        listing.sort()
        sizer = _Sizer(cache, cur_fd, extended, use_filesize)
        messages: list[Message] = []
        previous = None
        verbatim = sizer.verbatim
        for (_, unique, name), octets in zip(listing, sizer.size(listing), strict=True):
            if isinstance(octets, FileNotFoundError):
                log.debug("message cur/%s vanished while sizing", escape(name))
                continue
            if isinstance(octets, OSError):
                log.warning("message cur/%s skipped: %s", escape(name), octets.strerror)
                continue
            if unique == previous:  # sorted, so copies of one unique name are adjacent
                log.warning("duplicate unique name in %s: cur/%s", escape(root.path), escape(name))
            previous = unique
            messages.append(Message(uidl_for(unique), name, octets, ino=inodes[name], verbatim=unique in verbatim))
        sizer.save(unique for _, unique, _ in listing)
        return cls(root, cur_fd, messages)

    def open_message(self, msg: Message) -> BinaryIO:
        """The message's file, opened for reading (see :meth:`open_message_fd`)."""
        return io.FileIO(self.open_message_fd(msg), "rb")  # unbuffered: readers read big chunks

    def open_message_fd(self, msg: Message) -> int:
        """A read descriptor on the message's file (the caller closes it).

        If another reader renamed it (changed its flags) since the snapshot, it is found
        again by its inode and ``msg.name`` is updated. Raises :class:`MessageGone`
        when it no longer exists, or something other than a regular file (a symlink,
        a FIFO) took its place.
        """
        assert self._cur_fd is not None  # a message implies cur/
        fd = _open_in(self._cur_fd, msg.name)
        if fd is None:
            relocated = self._relocated(msg, _scan_inodes(self._cur_fd))
            if relocated is None or (fd := _open_in(self._cur_fd, relocated)) is None:
                raise MessageGone(msg.name)
            msg.name = relocated
        return fd

    @staticmethod
    def _relocated(msg: Message, by_inode: dict[int, str]) -> str | None:
        """The message's new name in cur/ after a rename: same inode, same unique name."""
        name = by_inode.get(msg.ino) if msg.ino else None
        if name is None or name == msg.name or unique_name(name) != unique_name(msg.name):
            return None
        return name

    def commit(self) -> CommitResult:
        """UPDATE: unlink every message marked deleted; report what happened.

        Only the very file that was listed is removed: when its name now holds another
        file (a different inode) or is gone, it is looked for by inode under a new
        name once; a duplicate of its unique name is never taken for it. A file gone
        for good counts as deleted. Any other failure is recorded and the rest are
        still tried. When the Maildir++ quota file ``maildirsize`` exists, each removed
        file is recorded there as it goes (see :class:`_QuotaLog`).
        """
        result = CommitResult()
        if self._cur_fd is None or self.root.fd is None:
            return result
        by_inode: dict[int, str] | None = None
        quota = _QuotaLog(self.root)
        try:
            for msg in self.messages:
                if not msg.deleted:
                    continue
                names = [msg.name]
                outcome = _unlink_exact(self._cur_fd, msg.name, msg.ino)
                if outcome is None:  # vanished: look for it under a new name
                    if by_inode is None:
                        by_inode = _scan_inodes(self._cur_fd)
                    moved = self._relocated(msg, by_inode)
                    if moved is not None:
                        names.append(moved)
                        outcome = _unlink_exact(self._cur_fd, moved, msg.ino)
                if isinstance(outcome, str):
                    result.failures.append(f"unlink cur/{escape(names[-1])}: {outcome}")
                    continue
                result.deleted += 1
                result.deleted_octets += msg.octets
                if outcome is not None:
                    quota.removed(outcome)
        finally:
            quota.close()
        return result


def _from_cache(cache: _SizeCache, files: list[tuple[str, int]], odd: bool) -> list[Message] | None:
    """The snapshot straight from the size cache when the regular files of ``cur/``
    (``files``: name and inode) are exactly the cached messages (the usual later
    login): no sorting, no sizing.

    Any difference — a new, gone or renamed message, a non-message entry (``odd``) —
    returns None and the full scan decides.
    """
    cached = cache.entries
    count = len(files)
    if odd or not cache.valid or count != len(cached) or not count:
        return None
    names = {name.partition(":")[0]: (name, ino) for name, ino in files}
    if len(names) != count or names.keys() != cached.keys():
        return None
    messages = []
    verbatim = cache.verbatim
    for unique, octets in cached.items():
        name, ino = names[unique]
        messages.append(Message(uidl_for(unique), name, octets, ino=ino, verbatim=unique in verbatim))
    return messages


def _open_in(cur_fd: int, name: str) -> int | None:
    """A read descriptor for ``cur/name``, or None when no message file is there.

    A symlink put in its place is not the message we listed (O_NOFOLLOW: ELOOP), nor
    is a FIFO or anything else that is not a regular file.
    """
    try:
        return open_regular(cur_fd, name)
    except (FileNotFoundError, NotRegularFile):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise


def _unlink_exact(cur_fd: int, name: str, ino: int) -> int | str | None:
    """Unlink ``cur/name`` if it is the regular file with inode ``ino`` (any when 0).

    Returns its size on disk if removed, None if it (that inode) was not there, or the
    failure's reason. The size (for Maildir++ quota) is ``,S=`` from the name, else
    the ``lstat`` size.
    """
    try:
        st = os.stat(name, dir_fd=cur_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or (ino and st.st_ino != ino):
            return None  # another file now has this name: not the one DELE marked
        fields = size_fields(unique_name(name))
        octets = fields.get("S", st.st_size)
        os.unlink(name, dir_fd=cur_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    return octets


class _QuotaLog:
    """Records UPDATE's removals in the Maildir++ quota file ``maildirsize``, if it exists.

    One ``-<bytes> -1`` line is appended right after each unlink, each with a single
    ``write`` on an O_APPEND descriptor (concurrent appenders never interleave within
    a line), so a session killed in the middle of UPDATE leaves the quota at most one
    message off. A large UPDATE makes the file grow past the 5120 octets at which
    Maildir++ has the next deliverer recalculate it, which is what the specification
    intends. The file is opened ``O_NOFOLLOW | O_NONBLOCK`` and used only when it is a
    regular file; a failure here loses only quota accounting, which Maildir++
    recalculates, so it is logged and never fails a deletion.
    """

    __slots__ = ("failed", "fd", "root")

    def __init__(self, root: MaildirRoot) -> None:
        self.root = root
        self.fd: int | None = None
        self.failed = False

    def removed(self, octets: int) -> None:
        if self.failed:
            return
        if self.fd is None:
            self.fd = self._open()
            if self.fd is None:
                self.failed = True
                return
        try:
            os.write(self.fd, b"-%d -1\n" % octets)
        except OSError as e:
            self._warn(e)
            self.failed = True

    def _open(self) -> int | None:
        assert self.root.fd is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            return open_regular(self.root.fd, MAILDIRSIZE_NAME, flags)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn(e)
            return None

    def _warn(self, e: OSError) -> None:
        log.warning("cannot update %s: %s", escape(os.path.join(self.root.path, MAILDIRSIZE_NAME)), e.strerror)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _move_new_to_cur(root: MaildirRoot) -> int | None:
    """Move every message in ``new/`` to ``cur/``, adding the ``:2,`` info suffix; return
    the listing descriptor of ``cur/`` (None when there is none).

    A file that vanished was moved by another reader (the cur/ listing that follows
    finds it there) or deleted; either way it is skipped. ``cur/`` is created if
    ``new/`` has messages and it is missing.
    """
    assert root.fd is not None
    cur_fd = _open_subdir(root.fd, "cur")
    new_fd = _open_subdir(root.fd, "new")
    if new_fd is None:
        return cur_fd
    try:
        entries = list(_message_entries(new_fd))
        if not entries:
            return cur_fd
        if cur_fd is None:
            try:
                os.mkdir("cur", 0o700, dir_fd=root.fd)
                log.info("created missing %s", escape(os.path.join(root.path, "cur")))
            except FileExistsError:
                pass
            except OSError as e:
                log.warning("cannot create %s: %s", escape(os.path.join(root.path, "cur")), e.strerror)
                return None
            cur_fd = _open_subdir(root.fd, "cur")
            if cur_fd is None:
                return None
        for entry in entries:
            name = entry.name
            target = name if ":" in name else name + NEW_TO_CUR_INFO
            try:
                os.rename(name, target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
            except FileNotFoundError:
                log.debug("new/%s vanished before it was moved to cur/", escape(name))
            except OSError as e:
                log.warning("cannot move new/%s to cur/: %s", escape(name), e.strerror)
        return cur_fd
    finally:
        os.close(new_fd)
