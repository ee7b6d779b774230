"""The MySQL backend (``$auth_type = 'MySQL'``): users from a MySQL/MariaDB table, GET_LOCK mailbox locks.

``$mysql_auth_query`` keeps the 2003 server's form: ``%s`` stands for the login,
bare or quoted (``'%s'`` / ``"%s"``). It is turned into a query with one bound
parameter, so the login is always data, never SQL. The query is tokenized
(literals, quoted identifiers, comments): a ``%s`` inside a literal such as
``'/home/%s/Maildir/'`` is refused at start-up, since the bound login would end
that literal. ``%%`` is a literal percent
(as with the old server's sprintf), and so is any other lone ``%``. The query's
columns are taken by position: ``login, passwd, uid, maildir``. The ``uid`` column
is the schema's auto-increment row id, not a system uid: it is ignored, and the
session runs as ``--user``/``--group`` or as the Maildir's owner
(``MailUser.uid``/``gid`` are None).

``passwd`` may be clear text (the 2003 schema's rows), ``{SCHEME}value`` or a bare
crypt hash (see :mod:`tpops.auth.hashes`); APOP works for clear-text and ``{PLAIN}``
rows. ``maildir`` is used as stored (trailing slash or not) and must be absolute.

Each authenticator (one per worker process) owns one connection, opened at first
use with short timeouts; a connection lost to a server restart is reopened once,
transparently. A dead, hung or firewalled server gives :class:`AuthUnavailable`
within 5 seconds. The mailbox lock is ``GET_LOCK`` (named after the row's login) on that connection, so every
tpops host sharing the database sees one lock, and the server drops it when the
worker (its connection) dies. A lock taken on a connection that is later lost is
gone with it, silently: the lock's ``still_held()`` asks the server, on that same
connection, before the session's UPDATE (``IS_USED_LOCK(name) = CONNECTION_ID()``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
from typing import TYPE_CHECKING, Any

import MySQLdb

from tpops.auth import hashes
from tpops.auth.base import (
    AuthUnavailable,
    MailboxInUse,
    MailboxLock,
    MailUser,
    lock_key,
    lock_on_host,
)
from tpops.auth.credentials import BackendCaps
from tpops.auth.stored import StoredEntry, StoredPasswordAuthenticator
from tpops.logs import escape, get
from tpops.mailbox.lock import lock_kind

if TYPE_CHECKING:
    from tpops.config import Config

log = get("auth.mysql")

#: Seconds for connect, each read and each write on the connection.
TIMEOUT = 3
#: connect timeout of the one reconnect after a lost connection (a restarted server answers fast).
RETRY_CONNECT_TIMEOUT = 1
#: A lost connection is retried only if it failed this fast (a timeout is not retried).
RETRY_WITHIN = 1.0
#: A query is sent only if its connection was up this soon after the call began, so that
#: connect + query stay under 5 s.
QUERY_START_BY = 1.9
#: Client/server errors meaning "this connection is unusable" (gone away, lost, refused, killed).
CONNECTION_ERRORS = frozenset({1053, 1927, 2002, 2003, 2006, 2013, 2014, 2026, 2055, 4031})
#: "Illegal mix of collations": the login cannot even be expressed in the column's charset.
COLLATION_ERRORS = frozenset({1267, 1270, 1271})
LOCK_PREFIX = "tpops:"
#: The columns ``$mysql_auth_query`` must return, by position.
COLUMNS = ("login", "passwd", "uid", "maildir")

#: What MySQLdb imports only at its first connect, query or warning (and what those import:
#: decimal, datetime, array, warnings). Imported in the master by :func:`preload_driver`:
#: a worker that dropped to ``--user`` may be unable to read the interpreter's files.
DRIVER_MODULES = (
    "MySQLdb.connections",
    "MySQLdb.cursors",
    "MySQLdb.converters",
    "MySQLdb.times",
    "MySQLdb._exceptions",
    "MySQLdb.constants.CLIENT",
    "MySQLdb.constants.CR",
    "MySQLdb.constants.ER",
    "MySQLdb.constants.FIELD_TYPE",
    "MySQLdb.constants.FLAG",
    "array",
    "datetime",
    "decimal",
    "warnings",
)


def preload_driver() -> None:
    """Import everything the driver would import lazily after the privilege drop (issue:
    ``No module named 'decimal'`` at every login under a 0700 pyenv home)."""
    for name in DRIVER_MODULES:
        importlib.import_module(name)


_PLACEHOLDER_HINT = (
    "write the placeholder bare (login = %s) or as a whole literal (login = '%s'), "
    "and build longer strings with CONCAT('/home/', %s, '/Maildir/')"
)


def _skip_literal(query: str, start: int) -> int:
    """The index after the SQL literal or quoted identifier opening at ``start``.

    MySQL's rules: ``'...'`` and ``"..."`` end at an unescaped quote, where ``\\x``
    escapes any character and a doubled quote stands for one; `` `...` `` (an identifier)
    knows only the doubled backtick. ValueError when it never ends.
    """
    quote = query[start]
    i = start + 1
    while i < len(query):
        ch = query[i]
        if ch == "\\" and quote != "`":
            i += 2
        elif ch == quote:
            if query[i + 1 : i + 2] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise ValueError(f"$mysql_auth_query: unterminated {quote}...{quote} starting at offset {start}")


def _comment_end(query: str, start: int) -> int | None:
    """The index after the comment opening at ``start`` (``#``, ``-- ``, ``/* */``), None if none opens there."""
    if query[start] == "#" or (query.startswith("--", start)
                               and (start + 2 == len(query) or query[start + 2] in " \t\r\n\f\v")):
        end = query.find("\n", start)
        return len(query) if end < 0 else end + 1
    if query.startswith("/*", start):
        end = query.find("*/", start + 2)
        if end < 0:
            raise ValueError(f"$mysql_auth_query: unterminated /* comment starting at offset {start}")
        return end + 2
    return None


def _no_placeholder(text: str, what: str) -> str:
    """``text`` (a literal, identifier or comment) with every ``%`` doubled for MySQLdb;
    ValueError when it holds the login placeholder, which would be spliced into it."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("%%", i):
            out.append("%%")
            i += 2
        elif text.startswith("%s", i):
            raise ValueError(
                f"$mysql_auth_query: the login placeholder %s is inside {what} {text}, where a "
                f"login could end it and inject SQL; {_PLACEHOLDER_HINT}"
            )
        else:
            out.append("%%" if text[i] == "%" else text[i])
            i += 1
    return "".join(out)


def compile_query(query: str) -> str:
    """``$mysql_auth_query`` as a MySQLdb query with one ``%s`` parameter for the login.

    The query is tokenized as MySQL reads it: string literals (``'...'``, ``"..."``,
    with backslash and doubled-quote escapes), quoted identifiers and comments (``#``,
    ``-- ``, ``/* */``). The login placeholder is ``%s`` outside them, or a literal that
    is exactly ``'%s'`` / ``"%s"`` (the 2003 form, which becomes a bound parameter). A
    ``%s`` anywhere inside a literal, identifier or comment (``'/home/%s/Maildir/'``)
    is refused: bound there, the quoted login would close the literal and the rest of
    it would run as SQL. ``%%`` and any other ``%`` are literal percents.

    Raises ValueError (for the start-up error) when the query has no login placeholder,
    several, one inside a literal or comment, or an unterminated literal or comment.
    """
    parts: list[str] = []
    count = 0
    i = 0
    while i < len(query):
        ch = query[i]
        comment = _comment_end(query, i)
        if comment is not None:
            parts.append(_no_placeholder(query[i:comment], "a comment"))
            i = comment
        elif ch in "'\"`":
            end = _skip_literal(query, i)
            literal = query[i:end]
            if ch != "`" and literal[1:-1] == "%s":
                parts.append("%s")  # '%s' as a whole: the bound login takes the literal's place
                count += 1
            else:
                parts.append(_no_placeholder(literal, "an identifier" if ch == "`" else "a string literal"))
            i = end
        elif query.startswith("%%", i):
            parts.append("%%")
            i += 2
        elif query.startswith("%s", i):
            parts.append("%s")
            count += 1
            i += 2
        else:
            parts.append("%%" if ch == "%" else ch)
            i += 1
    if count != 1:
        raise ValueError(
            f"$mysql_auth_query must contain the login placeholder %s exactly once (found {count})"
        )
    return "".join(parts)


def lock_name(key: str) -> str:
    """The GET_LOCK name for a lock key (:func:`tpops.auth.base.lock_key`: the row's login),
    a digest so it fits the server's 64-character limit."""
    data = key.encode("utf-8", "surrogateescape")
    return LOCK_PREFIX + hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _text(value: Any) -> str | None:
    """A column value as text (binary columns decoded), None for NULL."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _describe(error: MySQLdb.Error) -> str:
    """An error's code and message for a log line (client data inside it escaped)."""
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    if len(args) >= 2:
        return f"({args[0]}) {escape(str(args[1]))}"
    return escape(str(error))


def _code(error: MySQLdb.Error) -> int | None:
    """The numeric MySQL error code, if any."""
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    return args[0] if args and isinstance(args[0], int) else None


class _Lock:
    """A held GET_LOCK; ``release()`` is idempotent and ignores a lost connection."""

    def __init__(self, owner: MySQLConnection, conn: Any, name: str) -> None:
        self._owner = owner
        self._conn = conn
        self._name = name
        self._released = False

    def release(self) -> None:
        """RELEASE_LOCK on the connection that took it (nothing if that connection is gone)."""
        if not self._released:
            self._released = True
            self._owner._release(self._conn, self._name)

    def still_held(self) -> bool:
        """Whether the server still gives this lock to our connection (see :meth:`MySQLConnection._still_held`)."""
        return not self._released and self._owner._still_held(self._conn, self._name)


class MySQLConnection:
    """One lazily opened connection to ``$mysql_server`` and the ``GET_LOCK`` mailbox locks
    on it: the MySQL backend's, and the lock of any backend with ``$mailbox_lock = 'mysql'``."""

    def __init__(self, config: Config) -> None:
        params: dict[str, Any] = {
            "read_timeout": TIMEOUT,
            "write_timeout": TIMEOUT,
            "charset": "utf8mb4",
            "autocommit": True,
        }
        if config.mysql_socket:
            params["unix_socket"] = config.mysql_socket
            params["host"] = "localhost"
            self._where = f"socket {config.mysql_socket}"
        else:
            params["host"] = config.mysql_server or "localhost"
            params["port"] = int(config.mysql_port or 3306)
            self._where = f"{params['host']}:{params['port']}"
        if config.mysql_user:
            params["user"] = config.mysql_user
        params["password"] = config.mysql_pass or ""
        if config.mysql_db:
            params["database"] = config.mysql_db
        self._params = params
        self._conn: Any = None
        self._conn_pid = 0
        self._held: set[str] = set()

    # -- the connection -------------------------------------------------------------

    def _current(self) -> Any:
        """This process's open connection, or None (a connection inherited over fork is let go
        of, see :meth:`detach`)."""
        if self._conn is not None and self._conn_pid != os.getpid():
            self.detach()
        return self._conn

    def detach(self) -> None:
        """Let go of a connection inherited over fork without touching it: its descriptor
        is pointed at /dev/null first, so the ``COM_QUIT`` that closing (or collecting)
        the driver's object sends goes nowhere instead of ending the parent's session
        (and the ``GET_LOCK`` locks the parent holds on it)."""
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is None:
            return
        try:
            fd = conn.fileno()
        except MySQLdb.Error:
            fd = -1
        if fd >= 0:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(null, fd, inheritable=False)
            finally:
                os.close(null)
        try:
            conn.close()
        except MySQLdb.Error:
            pass

    def _drop(self) -> None:
        """Forget the connection (its locks are gone with it)."""
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            try:
                conn.close()
            except MySQLdb.Error:
                pass

    def _open(self, connect_timeout: int, start: float) -> Any:
        """A new connection, or AuthUnavailable. Too slow to leave time for a query: AuthUnavailable too."""
        try:
            conn = MySQLdb.connect(connect_timeout=connect_timeout, **self._params)
        except MySQLdb.Error as e:
            raise AuthUnavailable(f"MySQL: cannot connect to {self._where}: {_describe(e)}") from e
        self._conn, self._conn_pid = conn, os.getpid()
        self._held.clear()
        elapsed = time.monotonic() - start
        if elapsed > QUERY_START_BY:
            raise AuthUnavailable(f"MySQL: connecting to {self._where} took {elapsed:.1f} s; not querying")
        return conn

    @staticmethod
    def _execute(conn: Any, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement and fetch all its rows."""
        cursor = conn.cursor()
        try:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def _run(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a statement on our connection; reconnect and retry once if the server went away."""
        start = time.monotonic()
        conn = self._current()
        fresh = conn is None
        if conn is None:
            conn = self._open(TIMEOUT, start)
        try:
            return self._execute(conn, sql, args)
        except MySQLdb.Error as e:
            code = _code(e)
            if code in COLLATION_ERRORS:
                raise
            if code not in CONNECTION_ERRORS:
                raise AuthUnavailable(f"MySQL: query failed on {self._where}: {_describe(e)}") from e
            self._drop()
            if fresh or time.monotonic() - start > RETRY_WITHIN:
                raise AuthUnavailable(f"MySQL: lost connection to {self._where}: {_describe(e)}") from e
            log.info("MySQL: connection to %s lost (%s); reconnecting", self._where, _describe(e))
        conn = self._open(RETRY_CONNECT_TIMEOUT, start)
        try:
            return self._execute(conn, sql, args)
        except MySQLdb.Error as e:
            if _code(e) in COLLATION_ERRORS:
                raise
            if _code(e) in CONNECTION_ERRORS:
                self._drop()
            raise AuthUnavailable(f"MySQL: query failed on {self._where}: {_describe(e)}") from e

    def prepare(self) -> None:
        """The driver's lazily imported modules, loaded before workers fork (and drop privileges)."""
        preload_driver()

    def check_connection(self) -> None:
        """One round trip (the pre-flight worker's, for ``$mailbox_lock = 'mysql'``): a server
        that cannot be reached now is only logged; it may be back before the first login."""
        try:
            self._run("SELECT 1", ())
        except (AuthUnavailable, MySQLdb.Error) as e:
            log.warning("MySQL (mailbox locks): %s; not checked at start-up", e)

    def close(self) -> None:
        """Close the connection (the server then drops this worker's locks)."""
        if self._current() is not None:
            self._drop()

    # -- locking --------------------------------------------------------------------

    def get_lock(self, user: MailUser) -> MailboxLock:
        """``GET_LOCK`` (no wait) named after the login (:func:`tpops.auth.base.lock_key`);
        MailboxInUse when another session has it."""
        key = lock_key(user)
        name = lock_name(key)
        if self._current() is not None and name in self._held:
            raise MailboxInUse(key)  # GET_LOCK is re-entrant per connection; we are not
        try:
            rows = self._run("SELECT GET_LOCK(%s, 0)", (name,))
        except MySQLdb.Error as e:
            raise AuthUnavailable(f"MySQL: GET_LOCK failed: {_describe(e)}") from e
        result = rows[0][0] if rows and rows[0] else None
        if result is None:
            raise AuthUnavailable(f"MySQL: GET_LOCK({name}) returned NULL")
        if int(result) != 1:
            raise MailboxInUse(key)
        self._held.add(name)
        return _Lock(self, self._conn, name)

    def _still_held(self, conn: Any, name: str) -> bool:
        """``IS_USED_LOCK(name) = CONNECTION_ID()`` on ``conn``, the connection that took the lock.

        A GET_LOCK lives exactly as long as its connection: a server restart, a
        ``wait_timeout`` or a KILL ends both, silently. The check runs on that same
        connection and never reconnects (a new connection holds nothing); any error,
        or a connection that is no longer ours, means the lock is gone: UPDATE must not
        run, another session may already have the mailbox.
        """
        if conn is None or conn is not self._current():
            return False
        try:
            rows = self._execute(conn, "SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (name,))
        except MySQLdb.Error as e:
            log.warning("MySQL: the mailbox lock cannot be confirmed (%s); it is lost with its connection",
                        _describe(e))
            if _code(e) in CONNECTION_ERRORS:
                self._drop()
            return False
        held = bool(rows and rows[0] and rows[0][0] == 1)
        if not held:
            log.warning("MySQL: the mailbox lock %s is no longer held by this connection", name)
            self._held.discard(name)
        return held

    def _release(self, conn: Any, name: str) -> None:
        """RELEASE_LOCK if ``conn`` is still our live connection; errors ignored (the lock dies with it)."""
        if conn is None or conn is not self._current():
            return
        self._held.discard(name)
        try:
            self._execute(conn, "SELECT RELEASE_LOCK(%s)", (name,))
        except MySQLdb.Error as e:
            log.info("MySQL: RELEASE_LOCK failed (%s); the lock ends with the connection", _describe(e))
            if _code(e) in CONNECTION_ERRORS:
                self._drop()


class MySQLAuthenticator(StoredPasswordAuthenticator, MySQLConnection):
    """Users from ``$mysql_auth_query``; one lazily opened connection; GET_LOCK mailbox locks
    (or ``$mailbox_lock``'s choice)."""

    name = "MySQL"
    plain_ok = True  # the 2003 schema's rows are clear text

    def __init__(self, config: Config) -> None:
        StoredPasswordAuthenticator.__init__(self, config.default_domain, log)
        MySQLConnection.__init__(self, config)
        self._query = compile_query(config.mysql_auth_query)
        self._lock_kind = lock_kind(config.mailbox_lock, "MySQL")
        self._lock_dir = config.passwd_lock_dir
        self._tally = hashes.SchemeTally(plain_ok=True)  # the schemes of the rows looked up so far

    @property
    def supports_apop(self) -> bool:
        """Always: APOP works for rows with clear-text passwords."""
        return True

    @property
    def sasl_caps(self) -> BackendCaps:
        """Always both: rows may hold clear text (CRAM-MD5, SCRAM) or ``{SCRAM-SHA-256}``
        values (SCRAM); a table cannot be listed through ``$mysql_auth_query`` to know."""
        return BackendCaps(clear_secrets=True, scram=True)

    def dummy_template(self) -> str | None:
        """The majority scheme and cost of the rows this worker has looked up (a table cannot
        be listed through ``$mysql_auth_query``); sha512-crypt until the first hashed row."""
        return self._tally.template()

    def prepare(self) -> None:
        """Hash handlers and the driver's lazily imported modules loaded before workers fork
        (and before they drop privileges); no connection (it would be shared)."""
        hashes.preload()
        preload_driver()

    def check(self) -> None:
        """Run ``$mysql_auth_query`` once (in the pre-flight worker, as the worker's identity).

        A query that fails with an SQL error or returns fewer than the four columns
        ``login, passwd, uid, maildir`` would fail every login: ValueError, so start-up
        (or the reload) stops with the reason. The column count comes from the result's
        description, so no row has to match. A server that cannot be reached now is
        only logged: it may be back before the first login.
        """
        try:
            conn = self._current() or self._open(TIMEOUT, time.monotonic())
            cursor = conn.cursor()
            try:
                cursor.execute(self._query, ("",))
                columns = len(cursor.description or ())
                cursor.fetchall()
            finally:
                cursor.close()
        except AuthUnavailable as e:
            log.warning("%s; $mysql_auth_query not checked at start-up", e)
            return
        except MySQLdb.Error as e:
            if _code(e) in CONNECTION_ERRORS:
                self._drop()
                log.warning("MySQL: lost connection to %s (%s); $mysql_auth_query not checked at start-up",
                            self._where, _describe(e))
                return
            raise ValueError(f"$mysql_auth_query fails on {self._where}: {_describe(e)}") from None
        if columns < len(COLUMNS):
            raise ValueError(f"$mysql_auth_query returns {columns} column{'s' if columns != 1 else ''}; "
                             f"it must return {', '.join(COLUMNS)} (in that order)")

    # -- authentication -------------------------------------------------------------

    def lookup(self, login: str) -> StoredEntry | None:
        """The row of a login (row login, passwd, maildir), None (logged) when it has no usable row.

        The row's login names the session: a case- or accent-insensitive collation may
        match ``TOMMY`` to ``tommy``, and logs and locks must see one account.
        """
        try:
            login.encode("utf-8")
        except UnicodeEncodeError:
            log.info("login %s refused: not UTF-8", escape(login))
            return None
        try:
            rows = self._run(self._query, (login,))
        except MySQLdb.Error as e:  # collation: the login is not expressible in the column's charset
            log.info("login %s refused: no such user (%s)", escape(login), _describe(e))
            return None
        if not rows:
            log.info("login %s refused: no such user", escape(login))
            return None
        if len(rows) > 1:
            log.warning("login %s refused: $mysql_auth_query returned %d rows", escape(login), len(rows))
            return None
        row = rows[0]
        if len(row) < len(COLUMNS):  # check() stops start-up for this; kept for safety
            raise AuthUnavailable(
                f"MySQL: $mysql_auth_query returns {len(row)} columns; it must return {', '.join(COLUMNS)}"
            )
        stored, maildir = _text(row[1]), _text(row[3])
        if not stored:
            log.warning("login %s refused: empty or NULL passwd", escape(login))
            return None
        if not maildir or not os.path.isabs(maildir):
            log.warning("login %s refused: maildir %s is not an absolute path", escape(login),
                        escape(maildir or ""))
            return None
        self._tally.add(stored)
        return StoredEntry(_text(row[0]) or login, stored, maildir)

    def lock(self, user: MailUser) -> MailboxLock:
        """The one-session lock ``$mailbox_lock`` names: GET_LOCK by default (see :meth:`get_lock`)."""
        if self._lock_kind == "mysql":
            return self.get_lock(user)
        return lock_on_host(self._lock_kind, user, self._lock_dir)
