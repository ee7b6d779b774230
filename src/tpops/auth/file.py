"""The File backend (``$auth_type = 'File'``): virtual users from a Dovecot passwd-file.

One user per line, ``login:password:uid:gid:gecos:home:shell:extra``; ``#`` comments
and blank lines are skipped; trailing fields may be left out. The password is
``{SCHEME}value`` or a bare crypt hash (see :mod:`tpops.auth.hashes`); clear text
needs ``{PLAIN}``. ``uid``/``gid`` are numbers, names, or empty (then the session
runs as the Maildir's owner). The Maildir is ``home/Maildir`` unless the extra field
(space-separated ``key=value``) sets ``maildir=PATH``, or Dovecot's
``userdb_mail=maildir:PATH`` / ``mail=maildir:PATH`` (``~/`` is the home; ``%u``,
``%n``, ``%d``, ``%h`` expand as in Dovecot).

The file is re-read whenever it changes (a cheap ``stat`` on every call), so users
are added without a restart. A bad line refuses only that user and is logged with
its line number, once per load and process, when that user is first looked up (a
line without any ":" and a duplicate login are logged at load); a missing or
unreadable file makes the backend unavailable. APOP and AUTH CRAM-MD5 work for
``{PLAIN}``/``{CLEARTEXT}`` entries only; AUTH SCRAM-SHA-256 for those and
``{SCRAM-SHA-256}`` entries (Dovecot's format).

Scale: a load does not parse every line. It keeps the file's octets and an index
``login -> offset of its line`` (one pass of ``bytes`` operations: about 0.7 s and
~210 MB for 1,000,000 users); a lookup parses the one line it needs. The master
loads the file before it forks (and again on SIGHUP/SIGUSR1), so workers share the
index copy-on-write. A worker that sees a small file changed re-indexes it itself; a
large one (more than :data:`REINDEX_MAX_LOGINS`) is re-indexed once by the master
(:meth:`FileAuthenticator.refresh`, which then replaces the workers), and until then
the worker answers from its old index plus a scan of appended lines, or by scanning
the whole file.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpops.auth import hashes
from tpops.auth.base import AuthUnavailable, LockingAuthenticator, file_key
from tpops.auth.credentials import BackendCaps
from tpops.auth.stored import StoredEntry, StoredPasswordAuthenticator
from tpops.logs import escape, get

if TYPE_CHECKING:
    from tpops.config import Config

log = get("auth.file")

_FIELDS = 8
_VARIABLE = re.compile(r"%(.)")


@dataclass(frozen=True)
class _Bad:
    """A user whose line could not be used: always refused."""

    lineno: int
    reason: str


#: Lines whose password may be clear text: the APOP candidates checked at load.
_PLAIN_CANDIDATE = re.compile(rb"(?mi)^[^:\n]*:\{(?:plain|cleartext)")
#: Lines whose password may be a stored SCRAM-SHA-256 value: checked at load for CAPA's SASL line.
_SCRAM_CANDIDATE = re.compile(rb"(?mi)^[^:\n]*:\{scram-sha-256\}")
#: Stored values sampled (evenly over the file) for the majority scheme of the dummy check.
_TALLY_SAMPLE = 2000
#: A worker that sees the file changed re-indexes it itself only up to this many logins
#: (a few tens of milliseconds and megabytes); a larger one is scanned per lookup until
#: the master re-indexes it (:meth:`FileAuthenticator.refresh`) and replaces the workers.
REINDEX_MAX_LOGINS = 50_000
#: Nice increment of a worker that scans (see :func:`_yield_cpu`).
STALE_NICE = 10
#: Read size of :func:`scan`.
SCAN_CHUNK_OCTETS = 1 << 20


@dataclass(frozen=True)
class _Table:
    """The file's octets, its login index and the ``stat`` identity it was read at."""

    key: tuple[int, ...]
    data: bytes
    index: dict[bytes, int]  # login -> offset of its (first) line in data
    apop: bool
    scram: bool  # some entry is {SCRAM-SHA-256}
    dummy: str | None  # a stored value of the majority scheme and cost (hashes.SchemeTally)

    def line(self, offset: int) -> str:
        """The text of the line at ``offset``."""
        end = self.data.find(b"\n", offset)
        raw = self.data[offset:] if end < 0 else self.data[offset:end]
        return raw.decode("utf-8", "surrogateescape").rstrip("\r")

    def lineno(self, offset: int) -> int:
        """The line number of the line at ``offset`` (a scan: for log lines only)."""
        return self.data.count(b"\n", 0, offset) + 1


class BadLine(ValueError):
    """A passwd-file line that cannot be used; the message is safe to log (no secrets)."""


def _id(text: str, kind: str) -> int | None:
    """A uid/gid field: a number, a user/group name, or empty (None)."""
    if text == "":
        return None
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid if kind == "uid" else grp.getgrnam(text).gr_gid
    except KeyError:
        raise BadLine(f"unknown {kind} {escape(text)!s}") from None


def _expand(path: str, login: str, home: str) -> str:
    """Dovecot's ``~/`` and ``%u %n %d %h %%`` in a mail location."""
    user, _, domain = login.partition("@")

    def one(match: re.Match[str]) -> str:
        values = {"u": login, "n": user, "d": domain, "h": home, "%": "%"}
        key = match.group(1)
        if key not in values or (key == "h" and not home):
            raise BadLine(f"unsupported variable %{escape(key)} in the mail location")
        return values[key]

    path = _VARIABLE.sub(one, path)
    if path == "~" or path.startswith("~/"):
        if not home:
            raise BadLine("mail location uses ~ but the line has no home")
        path = home + path[1:]
    return path


def _maildir(extra: str, login: str, home: str) -> str:
    """The Maildir of a line: the extra field's setting, else ``home/Maildir``."""
    location: str | None = None
    for item in extra.split():
        key, eq, value = item.partition("=")
        if not eq:
            continue
        if key in ("maildir", "userdb_maildir"):
            location = value
        elif key in ("userdb_mail", "mail"):
            kind, colon, rest = value.partition(":")
            if not colon or kind.lower() != "maildir":
                raise BadLine(f"mail location is not a Maildir ({escape(kind)})")
            location = rest.split(":", 1)[0]  # drop Dovecot's :LAYOUT=... options
    if location is None:
        if not home:
            raise BadLine("no home and no maildir= in the extra field: no Maildir to serve")
        location = os.path.join(home, "Maildir")
    location = _expand(location, login, home)
    if not os.path.isabs(location):
        raise BadLine("the Maildir is not an absolute path")
    return location


def parse_line(line: str) -> StoredEntry:
    """One non-comment line as an entry; :class:`BadLine` (no secrets in it) when unusable."""
    fields = line.split(":", _FIELDS - 1)
    if len(fields) < 2:
        raise BadLine("no password field")
    fields += [""] * (_FIELDS - len(fields))
    login, stored, uid_text, gid_text, _gecos, home, _shell, extra = fields
    if not login:
        raise BadLine("empty login")
    if not stored:
        raise BadLine("empty password")
    if hashes.identify(stored) is None:
        if stored.startswith("{"):
            raise BadLine("unknown password scheme or malformed value")
        raise BadLine("password is neither {SCHEME}-prefixed nor a crypt hash (clear text needs {PLAIN})")
    uid, gid = _id(uid_text.strip(), "uid"), _id(gid_text.strip(), "gid")
    if uid == 0:
        raise BadLine("uid 0 is never served")
    if home and not os.path.isabs(home):
        raise BadLine("home is not an absolute path")
    return StoredEntry(login, stored, _maildir(extra, login, home), uid, gid)


def parse(text: str, path: str) -> dict[str, StoredEntry | _Bad]:
    """All users of a passwd-file's text; bad lines and duplicates are logged (once per load)."""
    users: dict[str, StoredEntry | _Bad] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:  # maybe a pasted secret: never log the content
            log.error("%s line %d: bad entry, not login:password:...; ignored", escape(path), lineno)
            continue
        login = line.split(":", 1)[0]
        if login in users:
            log.warning("%s line %d: duplicate login %s ignored (the first one wins)",
                        escape(path), lineno, escape(login))
            continue
        try:
            users[login] = parse_line(line)
        except BadLine as e:
            log.error("%s line %d: bad entry, login %s refused: %s", escape(path), lineno, escape(login), e)
            if login:
                users[login] = _Bad(lineno, str(e))
    return users


def index(data: bytes, path: str) -> dict[bytes, int]:
    """login -> offset of its line, for every line that has a login (the first one wins).

    Comments, blank lines and lines without ":" are skipped (the last are logged, by
    line number only: the content may be a pasted secret), as are duplicates (logged).
    """
    found: dict[bytes, int] = {}
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        start = offset
        offset += len(raw) + 1
        login, colon, _ = raw.partition(b":")
        if login[:1] in (b"#", b" ", b"\t", b"\r", b""):  # maybe a comment or a blank line
            stripped = raw.strip()
            if not stripped or stripped.startswith(b"#"):
                continue
        if not colon:
            log.error("%s line %d: bad entry, not login:password:...; ignored", escape(path), lineno)
            continue
        if login in found:
            log.warning("%s line %d: duplicate login %s ignored (the first one wins)",
                        escape(path), lineno, escape(login.decode("utf-8", "surrogateescape")))
            continue
        found[login] = start
    return found


def scan(path: str, login: bytes, start: int = 0) -> tuple[int, str] | None:
    """The offset and text of the first line of ``path`` for ``login`` from the line
    starting at offset ``start``, read in chunks of :data:`SCAN_CHUNK_OCTETS` (memory
    stays bounded whatever the file's size).

    What a stale index is replaced with until the file is indexed again: a few tens of
    milliseconds for a million lines, where an index costs a second and 200 MB.
    """
    wanted = login + b":"
    with open(path, "rb") as f:
        f.seek(start)
        base = start  # file offset of buf[0], always a line start
        buf = b""
        while True:
            chunk = f.read(SCAN_CHUNK_OCTETS)
            buf += chunk
            last = len(buf) if not chunk else buf.rfind(b"\n") + 1  # complete lines only
            start = 0
            while start < last:
                if buf.startswith(wanted, start, last):
                    pos = start
                else:
                    hit = buf.find(b"\n" + wanted, start, last)
                    if hit < 0:
                        break
                    pos = hit + 1
                end = buf.find(b"\n", pos, last)
                line = buf[pos : end if end >= 0 else last]
                if not line.lstrip().startswith(b"#"):  # a login that looks like a comment is one
                    return base + pos, line.decode("utf-8", "surrogateescape").rstrip("\r")
                if end < 0:
                    break
                start = end + 1
            if not chunk:
                return None
            buf, base = buf[last:], base + last


def appended_to(path: str, old: bytes) -> int | None:
    """``len(old)`` when ``path`` is ``old`` with lines appended (the usual way users are
    added), else None. Compared in chunks: one read of the old part, bounded memory."""
    if old and not old.endswith(b"\n"):
        return None  # an append could have continued the last line
    with open(path, "rb") as f:
        offset = 0
        while offset < len(old):
            chunk = f.read(min(SCAN_CHUNK_OCTETS, len(old) - offset))
            if not chunk or chunk != old[offset : offset + len(chunk)]:
                return None
            offset += len(chunk)
    return len(old)


def _yield_cpu() -> None:
    """Lower this worker's CPU priority for the rest of its life (it is replaced soon).

    Under load, dozens of workers scanning a large changed file would starve the master,
    whose one re-index ends the scanning; niced, they leave it the CPU. Raising the
    nice value needs no privilege; failing to is harmless.
    """
    try:
        os.nice(STALE_NICE)
    except OSError:
        pass


def _lineno(path: str, offset: int) -> int:
    """The line number at ``offset`` of ``path`` (for a log line)."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0 and (chunk := f.read(min(SCAN_CHUNK_OCTETS, offset))):
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _apop_possible(data: bytes) -> bool:
    """True when some line has a clear-text (``{PLAIN}``/``{CLEARTEXT}``) password."""
    return _some_stored(data, _PLAIN_CANDIDATE, hashes.plain_secret)


def _scram_possible(data: bytes) -> bool:
    """True when some line has a usable ``{SCRAM-SHA-256}`` password (Dovecot's format)."""
    return _some_stored(data, _SCRAM_CANDIDATE, hashes.scram_secret)


def _some_stored(data: bytes, candidate: re.Pattern[bytes], usable: Callable[[str], object | None]) -> bool:
    """True when a line that ``candidate`` finds has a stored password ``usable`` accepts."""
    for match in candidate.finditer(data):
        end = data.find(b"\n", match.start())
        line = data[match.start() : end if end >= 0 else len(data)].decode("utf-8", "surrogateescape")
        stored = line.rstrip("\r").split(":", 2)[1]
        if usable(stored) is not None:
            return True
    return False


def _dummy_template(data: bytes, offsets: list[int]) -> str | None:
    """The majority scheme and cost among up to :data:`_TALLY_SAMPLE` entries spread over the file."""
    tally = hashes.SchemeTally()
    step = max(1, len(offsets) // _TALLY_SAMPLE)
    for offset in offsets[::step]:
        end = data.find(b"\n", offset)
        fields = data[offset : end if end >= 0 else len(data)].split(b":", 2)
        if len(fields) >= 2:
            tally.add(fields[1].rstrip(b"\r").decode("utf-8", "surrogateescape"))
    return tally.template()


class FileAuthenticator(StoredPasswordAuthenticator, LockingAuthenticator):
    """Users from a Dovecot-style passwd-file (``$auth_file``), re-read when it changes."""

    name = "File"

    def __init__(self, config: Config) -> None:
        if not config.auth_file:
            raise ValueError("$auth_type is 'File' but $auth_file is not set")
        StoredPasswordAuthenticator.__init__(self, config.default_domain, log)
        LockingAuthenticator.__init__(self, config.passwd_lock_dir, config)
        self._path: str = config.auth_file
        self._table: _Table | None = None
        self._bad_logged: set[int] = set()  # offsets of bad lines logged since the last load
        self._last_key: tuple[int, ...] | None = None
        self._stale_key: tuple[int, ...] | None = None  # the changed file's key seen while stale
        self._appended: int | None = None  # where appended lines start in it (None: not an append)
        self._niced = False  # this process lowered its priority (see _yield_cpu)

    def _users(self) -> _Table:
        """The table to use: re-read when the file changed, unless it is large (then the
        last one, and :meth:`lookup` scans the file; see :meth:`refresh`)."""
        key = self._last_key = self._key()
        table = self._table
        if table is None or (table.key != key and len(table.index) <= REINDEX_MAX_LOGINS):
            table = self._load()
            self._last_key = table.key
        return table

    def _key(self) -> tuple[int, ...]:
        try:
            return file_key(os.stat(self._path))
        except OSError as e:
            raise AuthUnavailable(f"File: cannot read {self._path}: {e.strerror or e}") from e

    def _load(self) -> _Table:
        """Read and index the file now."""
        try:
            with open(self._path, "rb") as f:
                key = file_key(os.fstat(f.fileno()))
                data = f.read()
        except OSError as e:
            raise AuthUnavailable(f"File: cannot read {self._path}: {e.strerror or e}") from e
        found = index(data, self._path)
        table = _Table(key, data, found, _apop_possible(data), _scram_possible(data),
                       _dummy_template(data, list(found.values())))
        log.info("indexed %d logins from %s", len(found), escape(self._path))
        self._table = table
        self._bad_logged = set()
        self._stale_key = None
        return table

    def refresh(self) -> bool:
        """Re-index a large file (more than :data:`REINDEX_MAX_LOGINS` logins) if it
        changed since the last load; True when it did.

        The master calls this between its rounds, so a large file changed without a
        signal is indexed once, there, and the workers it forks afterwards share it
        (it replaces the older workers, which scan meanwhile). A small file is left to
        the workers, which re-read it at their next login. A file that cannot be read
        keeps the last table (logged); the workers report it at login.
        """
        try:
            key = self._key()
            table = self._table
            if table is None or table.key == key or len(table.index) <= REINDEX_MAX_LOGINS:
                return False  # unchanged, or small enough for each worker to re-read at once
            self._load()
        except AuthUnavailable as e:
            log.error("%s", e)
            return False
        return True

    def prepare(self) -> None:
        """Handlers imported and the user list read, so forked workers share both."""
        super().prepare()
        try:
            self._users()
        except AuthUnavailable as e:  # the first login reports it again
            log.error("%s", e)

    def check(self) -> None:
        """The passwd-file is readable by the identity that will re-read it (issue 8 item 6).

        Run in the pre-flight worker after ``--user`` was applied: a root-only file would
        pass a root master's ``prepare()`` and then fail every login once it changes.
        """
        super().check()
        try:
            os.close(os.open(self._path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise ValueError(
                f"$auth_file {self._path} cannot be read as uid {os.geteuid()} (the workers' identity): "
                f"{e.strerror or e}; make it readable by that user or group"
            ) from None

    @property
    def supports_apop(self) -> bool:
        """True when some entry has a clear-text (``{PLAIN}``) password; False when the file
        cannot be read (the login that follows reports why)."""
        try:
            return self._users().apop
        except Exception as e:  # a greeting must never fail
            log.error("%s", e)
            return False

    @property
    def sasl_caps(self) -> BackendCaps:
        """CRAM-MD5 and SCRAM when some entry is ``{PLAIN}``; SCRAM also when some entry is
        ``{SCRAM-SHA-256}``; neither when the file cannot be read (a login reports why)."""
        try:
            table = self._users()
        except AuthUnavailable as e:  # CAPA still answers; a login reports it again
            log.error("%s", e)
            return BackendCaps()
        return BackendCaps(clear_secrets=table.apop, scram=table.scram)

    def dummy_template(self) -> str | None:
        """The majority scheme and cost of the file's users, as of its last load."""
        return None if self._table is None else self._table.dummy

    def lookup(self, login: str) -> StoredEntry | None:
        """The usable entry for a login; None (logged) for unknown users and bad lines."""
        table = self._users()
        wanted = login.encode("utf-8", "surrogateescape")
        if table.key == self._key_seen():
            offset = table.index.get(wanted)
            line = None if offset is None else table.line(offset)
        else:  # a large file changed: the index is stale until the master re-indexes it
            try:
                offset, line = self._stale_lookup(table, wanted)
            except OSError as e:
                raise AuthUnavailable(f"File: cannot read {self._path}: {e.strerror or e}") from e
        if offset is None or line is None:
            log.info("login %s refused: no such user", escape(login))
            return None
        try:
            return parse_line(line)
        except BadLine as e:
            if offset not in self._bad_logged:
                self._bad_logged.add(offset)
                lineno = table.lineno(offset) if table.key == self._key_seen() else _lineno(self._path, offset)
                log.error("%s line %d: bad entry, login %s refused: %s", escape(self._path), lineno, escape(login), e)
            log.info("login %s refused: its line is bad (%s)", escape(login), e)
            return None

    def _stale_lookup(self, table: _Table, wanted: bytes) -> tuple[int | None, str | None]:
        """A lookup in the changed file while ``table`` is stale.

        When lines were only appended (checked once per change), the old index still
        answers for the old part and only the new lines are scanned; otherwise the whole
        file is scanned, and this worker lowers its priority so the master's re-index
        is not starved.
        """
        key = self._last_key
        if self._stale_key != key:
            self._stale_key = key
            self._appended = appended_to(self._path, table.data)
            how = "only its new lines are scanned" if self._appended is not None else "scanning it"
            log.info("%s changed: looking logins up (%s) until it is indexed again", escape(self._path), how)
            if self._appended is None and not self._niced:
                self._niced = True
                _yield_cpu()
        if self._appended is not None:
            offset = table.index.get(wanted)
            if offset is not None:
                return offset, table.line(offset)
            found = scan(self._path, wanted, self._appended)
        else:
            found = scan(self._path, wanted)
        return found if found is not None else (None, None)

    def _key_seen(self) -> tuple[int, ...] | None:
        """The file key found by the last :meth:`_users` (its ``stat``)."""
        return self._last_key
