"""A Maildir / Maildir++ mailbox as one POP3 session sees it: a snapshot taken at login.

Methods for the session
-----------------------
``Maildir.open(path, ...)``
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
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from tpops.logs import escape, get
from tpops.mailbox.encode import wire_size_fd

log = get("mailbox")

#: Name of the size cache in the Maildir root.
SIZE_CACHE_NAME = "tpops-sizecache"
#: First line of the size cache; a file starting otherwise is ignored and rewritten.
#: Version 2: lines are in delivery order, so an unchanged Maildir is listed from the cache alone.
SIZE_CACHE_HEADER = b"tpops-sizecache 2\n"
#: Maildir++ quota file in the Maildir root; deletions are appended to it.
MAILDIRSIZE_NAME = "maildirsize"
#: Info suffix a reader adds when moving a message from new/ to cur/ (Maildir spec).
NEW_TO_CUR_INFO = ":2,"
#: RFC 1939 section 7: a unique-id is 1 to 70 characters in 0x21-0x7E.
UIDL_MAX_OCTETS = 70

_LEADING_NUMBER = re.compile(r"[0-9]*")
_CACHE_LINE = re.compile(r"([^\n]*) ([0-9]{1,18})\n")
_PLAIN_UIDL = re.compile(r"[\x21-\x7e]{1,%d}" % 70)
_SIZE_FIELD = re.compile(r",([SW])=([0-9]+)")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class MessageGone(Exception):
    """The message's file disappeared (another program deleted it) during the session."""


@dataclass(slots=True)
class Message:
    """One message of the snapshot. Its message number is its index in the list plus 1."""

    uid: str  #: the UIDL: unique name, or its SHA-1 when not a valid unique-id
    name: str  #: current file name inside cur/ (changes if another reader renames it)
    octets: int  #: exact wire size, or the configured fast approximation
    deleted: bool = False  #: marked by DELE, cleared by RSET; acted on by commit()


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
    return hashlib.sha1(os.fsencode(unique)).hexdigest()


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


def _message_entries(directory: str) -> Iterator[os.DirEntry[str]]:
    """The entries of ``directory`` that may be messages; none if it does not exist.

    Uses the file type from the directory listing (no stat per file on file systems
    that report it): symlinks and non-regular files are skipped, as are dot files.
    """
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name[0] != "." and entry.is_file(follow_symlinks=False):
                    yield entry
    except (FileNotFoundError, NotADirectoryError):
        return


def _scan_names(cur: str) -> dict[str, str]:
    """A fresh listing of ``cur``: unique name -> file name."""
    return {unique_name(entry.name): entry.name for entry in _message_entries(cur)}


class _SizeCache:
    """The ``tpops-sizecache`` file: exact wire sizes by unique name.

    Format: the header line, then one ``<unique name> <octets>`` line per message,
    names as their file system octets. A name containing LF cannot be stored and is
    simply not cached; the octets are digits, so the last space on a line separates
    them from a name that contains spaces. A file that does not parse is ignored
    whole and rewritten. It is written to a temporary file in the Maildir root and
    renamed over the old one, so readers never see half a cache.
    """

    __slots__ = ("path", "root", "entries", "valid")

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, SIZE_CACHE_NAME)
        self.entries: dict[str, int] = {}
        self.valid = True
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            log.debug("size cache %s unreadable: %s", escape(self.path), e.strerror)
            self.valid = False
            return
        entries = self._parse(data)
        if entries is None:
            log.debug("size cache %s is corrupt, ignoring it", escape(self.path))
            self.valid = False
        else:
            self.entries = entries

    @staticmethod
    def _parse(data: bytes) -> dict[str, int] | None:
        """The entries of a cache file's content, or None if it is not a valid cache."""
        if not data.startswith(SIZE_CACHE_HEADER) or not data.endswith(b"\n"):
            return None
        # Decoding the whole body equals decoding each name: LF and space are ASCII.
        body = os.fsdecode(data[len(SIZE_CACHE_HEADER) :])
        # A match cannot span lines, so every line is valid iff each one gave a match.
        pairs = _CACHE_LINE.findall(body)
        if len(pairs) != body.count("\n"):
            return None
        return {name: int(octets) for name, octets in pairs}

    def save(self, entries: dict[str, int]) -> None:
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
        lines.extend(b"%s %d\n" % (fsencode(u), n) for u, n in storable.items())
        try:
            fd, tmp_path = tempfile.mkstemp(prefix=f".{SIZE_CACHE_NAME}.", dir=self.root)
        except OSError as e:
            log.debug("size cache not written in %s: %s", escape(self.root), e.strerror)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(lines))
            os.replace(tmp_path, self.path)
        except OSError as e:
            log.debug("size cache %s not written: %s", escape(self.path), e.strerror)
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            return
        self.entries = storable
        self.valid = True


class _Sizer:
    """Finds each message's size during :meth:`Maildir.open`, by the configured rules.

    ``exact`` collects the exact sizes of present messages: the next cache content.
    The cache is read only when some size may have to be exact.
    """

    __slots__ = ("cur", "extended", "use_filesize", "cache", "known", "exact")

    def __init__(self, root: str, cur: str, extended: bool, use_filesize: bool) -> None:
        self.cur = cur
        self.extended = extended
        self.use_filesize = use_filesize
        self.cache = None if use_filesize else _SizeCache(root)
        self.known: dict[str, int] = self.cache.entries if self.cache else {}
        self.exact: dict[str, int] = {}

    def octets(self, name: str, unique: str) -> int:
        """The size for LIST of ``cur/name``.

        Raises FileNotFoundError if the file vanished, other OSError if unreadable.
        """
        if self.extended and ("," in unique):
            fields = size_fields(unique)
            if "W" in fields:  # trusted as is: no check of the final newline
                return fields["W"]
            if "S" in fields:
                return fields["S"]
        if self.use_filesize:
            return os.lstat(os.path.join(self.cur, name)).st_size
        octets = self.known.get(unique)
        if octets is None:
            octets = _exact_octets(os.path.join(self.cur, name), unique)
        self.exact[unique] = octets
        return octets

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
        self.cache.save(self.exact)


def _exact_octets(path: str, unique: str) -> int:
    """The exact wire size of a message file: from ``W=`` and its last octet, or by reading.

    ``W=`` (Maildir++/Dovecot) counts the message with CRLF line ends; a file whose
    last octet is not LF is sent with a CRLF appended, 2 octets W= does not count.
    """
    virtual_octets = size_fields(unique).get("W") if ",W=" in unique else None
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if virtual_octets is None:
            return wire_size_fd(fd)
        try:
            os.lseek(fd, -1, os.SEEK_END)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return 0  # empty file: nothing is sent, whatever W= says
            raise
        last = os.read(fd, 1)
        return virtual_octets if last == b"\n" else virtual_octets + 2
    finally:
        os.close(fd)


class Maildir:
    """One session's snapshot of a Maildir; see the module docstring for the rules.

    ``messages[index]`` is message number ``index + 1``. The session changes only
    ``Message.deleted``; :meth:`commit` acts on it.
    """

    __slots__ = ("path", "messages", "_cur")

    def __init__(self, path: str, messages: list[Message]) -> None:
        self.path = path
        self.messages = messages
        self._cur = os.path.join(path, "cur")

    @classmethod
    def open(
        cls,
        path: str,
        *,
        maildir_extended: bool = False,
        maildir_use_filesize: bool = False,
    ) -> Maildir:
        """Snapshot the Maildir at ``path`` (moving new/ to cur/ and finding sizes).

        Raises OSError when the Maildir exists but cannot be listed (permissions); a
        missing one is an empty mailbox.
        """
        cur = os.path.join(path, "cur")
        _move_new_to_cur(path, cur)
        if not (maildir_extended or maildir_use_filesize):
            unchanged = _from_cache(path, cur)
            if unchanged is not None:
                return cls(path, unchanged)
        # (delivery time, unique name, name): names are unique within a directory.
        listing = [delivery_order_key(entry.name) for entry in _message_entries(cur)]
        listing.sort()
        sizer = _Sizer(path, cur, maildir_extended, maildir_use_filesize)
        messages: list[Message] = []
        previous = None
        for _, unique, name in listing:
            try:
                octets = sizer.octets(name, unique)
            except FileNotFoundError:
                log.debug("message cur/%s vanished while sizing", escape(name))
                continue
            except OSError as e:
                log.warning("message cur/%s skipped: %s", escape(name), e.strerror)
                continue
            if unique == previous:  # sorted, so copies of one unique name are adjacent
                log.warning("duplicate unique name in %s: cur/%s", escape(path), escape(name))
            previous = unique
            messages.append(Message(uidl_for(unique), name, octets))
        sizer.save(unique for _, unique, _ in listing)
        return cls(path, messages)

    def open_message(self, msg: Message) -> BinaryIO:
        """The message's file, opened for reading (see :meth:`open_message_fd`)."""
        return io.FileIO(self.open_message_fd(msg), "rb")  # unbuffered: readers read big chunks

    def open_message_fd(self, msg: Message) -> int:
        """A read descriptor on the message's file (the caller closes it).

        If another reader renamed it (changed its flags) since the snapshot, it is found
        again by unique name and ``msg.name`` is updated. Raises :class:`MessageGone`
        when it no longer exists.
        """
        fd = _open_in(self._cur, msg.name)
        if fd is None:
            relocated = _scan_names(self._cur).get(unique_name(msg.name))
            if (
                relocated is None
                or relocated == msg.name
                or (fd := _open_in(self._cur, relocated)) is None
            ):
                raise MessageGone(msg.name)
            msg.name = relocated
        return fd

    def commit(self) -> CommitResult:
        """UPDATE: unlink every message marked deleted; report what happened.

        A file already gone (after looking for it under a new name once) counts as
        deleted. Any other failure is recorded and the rest are still tried. When the
        Maildir++ quota file ``maildirsize`` exists, one ``-<bytes> -<count>`` line
        records the files removed here.
        """
        result = CommitResult()
        relocations: dict[str, str] | None = None
        removed_bytes = 0
        removed_files = 0
        for msg in self.messages:
            if not msg.deleted:
                continue
            unique = unique_name(msg.name)
            names = [msg.name]
            outcome = _unlink(self._cur, msg.name)
            if outcome is None:  # vanished: look for it under a new name
                if relocations is None:
                    relocations = _scan_names(self._cur)
                moved = relocations.get(unique)
                if moved is not None and moved != msg.name:
                    names.append(moved)
                    outcome = _unlink(self._cur, moved)
            if isinstance(outcome, str):
                result.failures.append(f"unlink cur/{escape(names[-1])}: {outcome}")
                continue
            result.deleted += 1
            result.deleted_octets += msg.octets
            if outcome is not None:
                removed_files += 1
                removed_bytes += outcome
        if removed_files:
            _record_quota(self.path, removed_bytes, removed_files)
        return result


def _from_cache(root: str, cur: str) -> list[Message] | None:
    """The snapshot straight from the size cache when ``cur/`` holds exactly the cached
    messages (the usual later login): no sorting, no sizing, one directory listing.

    Any difference — a new, gone or renamed message, a non-message entry — returns
    None and the full scan decides.
    """
    try:
        names = [n for n in os.listdir(cur) if n[0] != "."]
    except (FileNotFoundError, NotADirectoryError):
        return None
    cache = _SizeCache(root)
    entries = cache.entries
    if not cache.valid or len(names) != len(entries) or not names:
        return None
    by_unique = {n.partition(":")[0]: n for n in names}
    if len(by_unique) != len(names) or by_unique.keys() != entries.keys():
        return None
    return [Message(uidl_for(u), by_unique[u], octets) for u, octets in entries.items()]


def _open_in(cur: str, name: str) -> int | None:
    """A read descriptor for ``cur/name``, or None when no message file is there.

    A symlink put in its place is not the message we listed (O_NOFOLLOW: ELOOP).
    """
    try:
        return os.open(f"{cur}/{name}", _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise


def _unlink(cur: str, name: str) -> int | str | None:
    """Unlink ``cur/name``: its size on disk if removed, None if it was not there,
    or the failure's reason.

    The size (for Maildir++ quota) is ``,S=`` from the name, else taken by lstat
    before the unlink.
    """
    path = os.path.join(cur, name)
    try:
        fields = size_fields(unique_name(name))
        octets = fields["S"] if "S" in fields else os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    return octets


def _record_quota(root: str, removed_bytes: int, removed_files: int) -> None:
    """Append ``-<bytes> -<count>`` to ``maildirsize`` if the Maildir++ quota file exists.

    One ``write`` with O_APPEND, so concurrent appenders never interleave within a line.
    A failure here loses only quota accounting, which Maildir++ recalculates; it is
    logged, not reported as a failed deletion.
    """
    path = os.path.join(root, MAILDIRSIZE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("cannot update %s: %s", escape(path), e.strerror)
        return
    try:
        os.write(fd, b"-%d -%d\n" % (removed_bytes, removed_files))
    except OSError as e:
        log.warning("cannot update %s: %s", escape(path), e.strerror)
    finally:
        os.close(fd)


def _move_new_to_cur(root: str, cur: str) -> None:
    """Move every message in ``new/`` to ``cur/``, adding the ``:2,`` info suffix.

    A file that vanished was moved by another reader (the cur/ listing that follows
    finds it there) or deleted; either way it is skipped. ``cur/`` is created if
    ``new/`` has messages and it is missing.
    """
    new = os.path.join(root, "new")
    entries = list(_message_entries(new))
    if not entries:
        return
    try:
        os.mkdir(cur, 0o700)
        log.info("created missing %s", escape(cur))
    except FileExistsError:
        pass
    except OSError as e:
        log.warning("cannot create %s: %s", escape(cur), e.strerror)
        return
    for entry in entries:
        name = entry.name
        target = name if ":" in name else name + NEW_TO_CUR_INFO
        try:
            os.rename(entry.path, os.path.join(cur, target))
        except FileNotFoundError:
            log.debug("new/%s vanished before it was moved to cur/", escape(name))
        except OSError as e:
            log.warning("cannot move new/%s to cur/: %s", escape(name), e.strerror)
