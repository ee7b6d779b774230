"""The authenticator extension point: what every backend (File, Passwd, MySQL) provides.

Methods the session calls
-------------------------
``authenticate(login, password)``
    Check USER/PASS credentials. Return a :class:`MailUser` on success, ``None`` for
    bad credentials (unknown user and wrong password alike, after doing comparable
    work so the two cannot be told apart by timing). Raise :class:`AuthUnavailable`
    when the backend itself fails (database down, unreadable file): the session then
    answers ``-ERR [SYS/TEMP]``.
``authenticate_apop(login, timestamp, digest)``
    Check an APOP digest (RFC 1939 section 7): ``digest`` is the 32 lowercase hex
    characters the client sent, ``timestamp`` the exact ``<...>`` string of our
    greeting. Same return/raise contract as ``authenticate``. Compare digests in
    constant time.
``supports_apop``
    True when APOP can work for this backend as configured; the greeting carries an
    APOP timestamp only then.
``clear_secret(login)`` / ``scram_credentials(login)``
    For SASL AUTH (:class:`tpops.sasl.SaslBackend`): the user and the clear-text secret
    (CRAM-MD5); for SCRAM, stored SCRAM-SHA-256 credentials or else that clear-text
    secret, from one lookup. None for an unknown user or one without that kind of
    secret. ``$default_domain`` applies as for ``authenticate``.
``sasl_caps``
    A :class:`~tpops.auth.credentials.BackendCaps`: which of those two can answer for
    some users, so CAPA and AUTH offer only mechanisms that can work.
``lock(user)``
    Take the one-session-per-mailbox lock; return a :class:`MailboxLock` or raise
    :class:`MailboxInUse` (both live in :mod:`tpops.mailbox.lock`, re-exported here).
    ``$mailbox_lock`` chooses it: a kernel file lock in ``$passwd_lock_dir``
    (``'local'``, the default for File/Passwd), an OFD lock in the Maildir
    (``'maildir'``), or ``GET_LOCK`` (``'mysql'``, the default for MySQL).
    The lock has ``release()`` (idempotent) and ``still_held()``: whether it is still
    ours right now. The session must call ``still_held()`` just before UPDATE and,
    when it is False, delete nothing (end the session with ``-ERR [SYS/TEMP]``): a
    MySQL ``GET_LOCK`` vanishes with its connection (server restart, ``wait_timeout``,
    KILL) and another session may hold the mailbox by then. A file lock is held until
    released.
``prepare()``
    Load now what the workers will need: read files, import hash handlers. Called once
    in the master, as root, before workers are forked (and again after a reload), so a
    worker neither re-reads the user list on its first login nor imports code after it
    dropped privileges. Must not open connections: they would be shared across fork.
``check()``
    One real round trip as the worker will make it, called by the pre-flight worker
    (:func:`tpops.worker.preflight`) after the privilege drop, at start-up and before a
    reload is accepted. Raise ValueError, with a message for the administrator, for a
    configuration error that would fail every login (MySQL: a ``$mysql_auth_query``
    that returns too few columns or does not run); backend trouble that may pass (the
    database down) is only logged. File and Passwd have nothing to check here yet.
``close()``
    Release backend resources (a database connection). Called when the worker exits.
``detach()``
    In a forked child that will never authenticate (root mode's post-login process,
    which serves a mailbox as its owner): let go of connections inherited from the
    parent without disturbing the parent's use of them (MySQL: nothing is sent on the
    shared socket). The child then holds no handle with tpops's database credentials.

Methods a backend may rely on
-----------------------------
``apply_default_domain(login)`` turns ``tommy`` into ``tommy@example.org`` when
``$default_domain`` / ``--domain`` is set and the login has none of ``@ % +``.
``file_key(stat)`` is the reload key of a file a backend re-reads when it changes.
:class:`tpops.auth.stored.StoredPasswordAuthenticator` is the whole USER/PASS/APOP
check (default domain, timing defence, APOP digest) for backends that store one
password per login (File, MySQL): they supply only the lookup.

Backends never raise anything but :class:`AuthUnavailable` out of the three
``authenticate*``/``lock`` calls for backend trouble; anything else is a bug the
session logs with a traceback and answers with ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tpops.auth import hashes
from tpops.auth.credentials import BackendCaps, ScramCredentials
from tpops.mailbox.lock import (
    MailboxInUse,
    MailboxLock,
    acquire,
    acquire_in_maildir,
    lock_kind,
)

if TYPE_CHECKING:
    from tpops.config import Config

__all__ = [
    "AuthUnavailable",
    "Authenticator",
    "LockConnection",
    "LockingAuthenticator",
    "MailUser",
    "MailboxInUse",
    "MailboxLock",
    "apply_default_domain",
    "file_key",
    "lock_key",
    "lock_on_host",
]


class AuthUnavailable(Exception):
    """The backend could not answer (not a credentials problem). Message is for the log."""


@dataclass(frozen=True)
class MailUser:
    """An authenticated mailbox owner.

    ``login`` is the canonical login (after the default domain was applied); ``maildir``
    the absolute path of the Maildir; ``uid``/``gid`` the system identity to serve the
    mailbox as, or ``None`` for "the owner of the Maildir" (virtual users).
    """

    login: str
    maildir: str
    uid: int | None = None
    gid: int | None = None


class Authenticator(Protocol):
    """What every backend provides; see the module docstring for the contract."""

    name: str

    @property
    def supports_apop(self) -> bool: ...

    def authenticate(self, login: str, password: bytes) -> MailUser | None: ...

    def authenticate_apop(self, login: str, timestamp: str, digest: str) -> MailUser | None: ...

    @property
    def sasl_caps(self) -> BackendCaps: ...

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None: ...

    def scram_credentials(self, login: str) -> tuple[MailUser, ScramCredentials | bytes] | None: ...

    def lock(self, user: MailUser) -> MailboxLock: ...

    def prepare(self) -> None: ...

    def check(self) -> None: ...

    def close(self) -> None: ...

    def detach(self) -> None: ...


def file_key(st: os.stat_result) -> tuple[int, ...]:
    """What tells a changed file from the one a backend read (its reload key): identity,
    size and both times, so a rewrite in place and a rename over it are both noticed."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def apply_default_domain(login: str, domain: str | None) -> str:
    """``login@domain`` when a default domain is set and ``login`` names no domain (@ % +)."""
    if domain and not any(c in login for c in "@%+"):
        return f"{login}@{domain}"
    return login


def lock_key(user: MailUser) -> str:
    """What a mailbox lock is named after: the login exactly as the backend returned it.

    Not the Maildir path: that is resolved as root through components the user
    controls (``~/Maildir`` may be a symlink), so a user could point it at another
    user's Maildir and take, and hold, that user's lock. The login is the backend's
    canonical name of the account (after ``$default_domain``; MySQL's row login, not
    the spelling a case-insensitive collation matched), which no user can redirect.
    The opened directory's device/inode would be unredirectable too, but the lock is
    taken before the Maildir is opened (as its owner), so it is not known yet.

    The price: logins that share one Maildir (aliases) no longer exclude each other.
    Their sessions stay safe apart from that, since UPDATE treats a message another
    session already removed as gone.
    """
    return user.login


def lock_on_host(kind: str, user: MailUser, lock_dir: str) -> MailboxLock:
    """A file lock for ``user``: ``'maildir'`` in the Maildir itself (shared storage),
    otherwise (``'local'``) a flock in ``lock_dir``. An unusable lock place is backend
    trouble (:class:`AuthUnavailable`), not a busy mailbox."""
    if kind == "maildir":
        try:
            return acquire_in_maildir(user.maildir, lock_key(user))
        except OSError as e:
            raise AuthUnavailable(f"cannot lock in the Maildir {user.maildir}: {e.strerror or e}") from e
    try:
        return acquire(lock_dir, lock_key(user))
    except OSError as e:
        raise AuthUnavailable(f"cannot lock in {lock_dir}: {e.strerror or e}") from e


class LockConnection(Protocol):
    """A database connection that takes ``GET_LOCK`` mailbox locks (:class:`tpops.auth.mysql.MySQLConnection`)."""

    def get_lock(self, user: MailUser) -> MailboxLock: ...

    def prepare(self) -> None: ...

    def check_connection(self) -> None: ...

    def close(self) -> None: ...

    def detach(self) -> None: ...


class LockingAuthenticator:
    """Base for backends without a lock of their own (File, Passwd).

    ``lock()`` takes the lock ``$mailbox_lock`` names (``config``; without one, ``'local'``):
    an exclusive ``flock`` in ``lock_dir`` (``$passwd_lock_dir``), an OFD lock in the
    Maildir, or ``GET_LOCK`` on ``$mysql_server`` through a connection used only for
    locks (opened at first use, closed by :meth:`close`). All keyed by :func:`lock_key`.
    """

    def __init__(self, lock_dir: str, config: Config | None = None) -> None:
        self._lock_dir = lock_dir
        self._lock_kind = lock_kind(config.mailbox_lock, config.auth_type) if config is not None else "local"
        self._mysql: LockConnection | None = None

    @property
    def lock_kind(self) -> str:
        """The effective ``$mailbox_lock``: 'local', 'maildir' or 'mysql'."""
        return self._lock_kind

    def use_lock_connection(self, connection: LockConnection) -> None:
        """Take ``'mysql'`` locks through ``connection`` (set up by :func:`tpops.auth.make_authenticator`)."""
        self._mysql = connection

    def lock(self, user: MailUser) -> MailboxLock:
        """Take the one-session-per-mailbox lock, or raise :class:`MailboxInUse`."""
        if self._lock_kind == "mysql":
            if self._mysql is None:
                raise AuthUnavailable("$mailbox_lock 'mysql' without a MySQL connection")
            return self._mysql.get_lock(user)
        return lock_on_host(self._lock_kind, user, self._lock_dir)

    def prepare(self) -> None:
        """Import the hash handlers (and the MySQL driver for 'mysql' locks) while still root."""
        hashes.preload()
        if self._mysql is not None:
            self._mysql.prepare()

    def check(self) -> None:
        """For 'mysql' locks one round trip to the database (only logged when it fails);
        the lock directory was checked by the worker boot."""
        if self._mysql is not None:
            self._mysql.check_connection()

    def close(self) -> None:
        """Close the lock connection, if any (file locks die with their holder)."""
        if self._mysql is not None:
            self._mysql.close()

    def detach(self) -> None:
        """In a forked child that never authenticates (a post-login process): let go of
        the lock connection inherited from the parent, leaving the parent's intact."""
        if self._mysql is not None:
            self._mysql.detach()
