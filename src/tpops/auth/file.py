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
are added without a restart. A bad line is logged once per load with its line
number and refuses only that user; a missing or unreadable file makes the backend
unavailable. APOP and AUTH CRAM-MD5 work for ``{PLAIN}``/``{CLEARTEXT}`` entries only;
AUTH SCRAM-SHA-256 for those and ``{SCRAM-SHA-256}`` entries (Dovecot's format).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
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


@dataclass(frozen=True)
class _Table:
    """The parsed file and the ``stat`` identity it was read at."""

    key: tuple[int, ...]
    users: dict[str, StoredEntry | _Bad]
    apop: bool
    scram: bool  # some entry is {SCRAM-SHA-256}
    dummy: str | None  # a stored value of the majority scheme and cost (hashes.SchemeTally)


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

    def _users(self) -> _Table:
        """The current table, re-read when the file's identity changed since the last read."""
        try:
            key = file_key(os.stat(self._path))
            if self._table is not None and self._table.key == key:
                return self._table
            with open(self._path, "rb") as f:
                key = file_key(os.fstat(f.fileno()))
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            raise AuthUnavailable(f"File: cannot read {self._path}: {e.strerror or e}") from e
        users = parse(text, self._path)
        apop = any(
            isinstance(u, StoredEntry) and hashes.plain_secret(u.stored) is not None for u in users.values()
        )
        scram = any(
            isinstance(u, StoredEntry) and hashes.scram_secret(u.stored) is not None for u in users.values()
        )
        tally = hashes.SchemeTally()
        for entry in users.values():
            if isinstance(entry, StoredEntry):
                tally.add(entry.stored)
        log.info("loaded %d users from %s", sum(isinstance(u, StoredEntry) for u in users.values()),
                 escape(self._path))
        self._table = _Table(key, users, apop, scram, tally.template())
        return self._table

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
        found = self._users().users.get(login)
        if isinstance(found, _Bad):
            log.info("login %s refused: its line %d is bad (%s)", escape(login), found.lineno, found.reason)
            return None
        if found is None:
            log.info("login %s refused: no such user", escape(login))
        return found
