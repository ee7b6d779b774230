"""``tpops-passwd``: make password hashes for tpops and set them in ``$auth_file`` or the MySQL table.

Dovecot's ``doveadm pw`` for tpops, plus the editing ``doveadm`` leaves to the admin::

    tpops-passwd hash [-s SCHEME] [-r ROUNDS] [--stdin]
    tpops-passwd set USER [-s SCHEME] [--stdin] [--uid UID] [--gid GID] [--home DIR] [--mail DIR]
                          [-f FILE | -c CONFIG]
    tpops-passwd set USER --mysql [-c CONFIG]          (a row's password column only)
    tpops-passwd delete USER [-f FILE | -c CONFIG]

``hash`` prints ``{SCHEME}hash``. Schemes (:data:`HASHERS`): ``SHA512-CRYPT`` (the
default, as ``doveadm pw``), ``BLF-CRYPT``, ``ARGON2ID``, ``SSHA512``,
``SCRAM-SHA-256`` (Dovecot's format: works with USER/PASS, AUTH PLAIN/LOGIN and AUTH
SCRAM-SHA-256 without storing the password), ``PLAIN`` (the only one APOP and
CRAM-MD5 can use). They are made with the passlib API (the ``libpass``
distribution), the library :mod:`tpops.auth.hashes` verifies them with, and every new
hash is verified by that module before it is printed or written: the tool never
stores a value tpops would refuse.

The password is asked twice on the terminal (``getpass``), or read as one line from
standard input with ``--stdin`` (scripts); never from the command line, where
``ps`` would show it.

``set`` and ``delete`` edit the passwd-file (``-f FILE``, else ``$auth_file`` of the
configuration): ``set`` changes the password of USER's first line (the one tpops
uses) and, when given, its uid, gid, home or mail location, and keeps its other
fields; a new USER gets ``USER:{SCHEME}hash:uid:gid::home::userdb_mail=maildir:DIR``
appended. Every other line, comments and blank lines included, is kept byte for
byte. The line is checked with the File backend's own parser before anything is
written. The file is replaced atomically: a temporary file in the same directory,
with the old file's mode and owner, written and fsynced, then renamed over it; an
exclusive ``flock`` on the directory keeps two ``tpops-passwd`` runs from losing
each other's change. tpops re-reads the file by itself.

``set --mysql`` changes a row of the configured database (``$mysql_server``,
``$mysql_db``, ... of ``-c CONFIG``). ``$mysql_auth_query`` is a SELECT and says
nothing about how to write, so the table is assumed to be the one of
``tpops_auth-mysql.sql`` (and of TPOPS 0.5): table ``user``, login column ``login``,
password column ``passwd``; ``--table``, ``--login-column`` and
``--password-column`` name others. Identifiers are checked against a strict pattern
and quoted; the values are bound parameters. An UPDATE that matches no row is an
error (rows are added by whatever provisions the mailboxes, not here).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from passlib import exc as passlib_exc
from passlib import hash as passlib_hash

from tpops.auth import credentials, hashes
from tpops.auth.file import BadLine, parse_line
from tpops.config import DEFAULT_PATH, Config, ConfigError, load_config

PROG = "tpops-passwd"
#: Mode of a passwd-file this tool creates (an existing file keeps its own).
NEW_FILE_MODE = 0o600
#: ``doveadm pw``'s SHA512-CRYPT cost (crypt(3)'s default); ``-r`` raises it.
SHA512_DEFAULT_ROUNDS = 5000
#: Defaults of the MySQL table (``tpops_auth-mysql.sql``).
MYSQL_TABLE, MYSQL_LOGIN_COLUMN, MYSQL_PASSWORD_COLUMN = "user", "login", "passwd"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,63}")


class Failure(Exception):
    """A user-facing error: the message is printed and the exit status is 1."""


def _sha512_crypt(secret: str, rounds: int | None) -> str:
    return str(passlib_hash.sha512_crypt.using(rounds=rounds or SHA512_DEFAULT_ROUNDS).hash(secret))  # type: ignore[no-untyped-call]  # passlib/MySQLdb stubs leave it untyped


def _bcrypt(secret: str, rounds: int | None) -> str:
    if len(secret.encode("utf-8")) > 72:
        raise Failure("BLF-CRYPT uses only the first 72 octets of a password; pick another scheme")
    handler = passlib_hash.bcrypt.using(ident="2y", **({"rounds": rounds} if rounds else {}))
    return str(handler.hash(secret))


def _argon2id(secret: str, rounds: int | None) -> str:
    handler = passlib_hash.argon2.using(type="ID", **({"rounds": rounds} if rounds else {}))  # type: ignore[no-untyped-call]  # passlib/MySQLdb stubs leave it untyped
    return str(handler.hash(secret))


def _ssha512(secret: str, rounds: int | None) -> str:
    value = str(passlib_hash.ldap_salted_sha512.hash(secret))
    return value.removeprefix("{SSHA512}")  # passlib writes the same {SSHA512} prefix Dovecot does


def _plain(secret: str, rounds: int | None) -> str:
    return secret


def _scram_sha256(secret: str, rounds: int | None) -> str:
    iterations = rounds or credentials.SCRAM_ITERATIONS
    if iterations < credentials.SCRAM_ITERATIONS:
        raise Failure(f"SCRAM-SHA-256 needs at least {credentials.SCRAM_ITERATIONS} iterations (RFC 7677)")
    value = credentials.format_dovecot_scram(credentials.make_scram_credentials(secret, iterations=iterations))
    return value.removeprefix(credentials.DOVECOT_SCRAM_PREFIX)


#: Dovecot scheme name -> maker of the value after ``{SCHEME}`` (secret, rounds or None).
HASHERS: dict[str, Callable[[str, int | None], str]] = {
    "SHA512-CRYPT": _sha512_crypt,
    "BLF-CRYPT": _bcrypt,
    "ARGON2ID": _argon2id,
    "SSHA512": _ssha512,
    "SCRAM-SHA-256": _scram_sha256,
    "PLAIN": _plain,
}
DEFAULT_SCHEME = "SHA512-CRYPT"


def make_hash(secret: str, scheme: str = DEFAULT_SCHEME, rounds: int | None = None) -> str:
    """``{SCHEME}value`` for ``secret``, verified by tpops' own checker before it is returned."""
    scheme = scheme.upper()
    maker = HASHERS.get(scheme)
    if maker is None:
        raise Failure(f"unknown scheme {scheme!r}; known: {', '.join(HASHERS)}")
    try:
        stored = f"{{{scheme}}}{maker(secret, rounds)}"
    except passlib_exc.MissingBackendError as e:
        raise Failure(f"{scheme}: {e} (install the extra package it names)") from e
    except ValueError as e:  # rounds out of the handler's range
        raise Failure(f"{scheme}: {e}") from e
    if not hashes.verify_password(secret.encode("utf-8", "surrogateescape"), stored):
        raise Failure(f"{scheme}: tpops cannot verify the hash just made; nothing written")
    return stored


def read_password(use_stdin: bool, stdin: TextIO | None = None) -> str:
    """The new password: asked twice on the terminal, or one line of standard input (``--stdin``)."""
    stream = stdin if stdin is not None else sys.stdin
    if use_stdin:
        password = stream.readline().rstrip("\r\n")
    else:
        if not stream.isatty():
            raise Failure("no terminal to ask the password on: give it on standard input with --stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise Failure("the two passwords differ; nothing changed")
    if not password:
        raise Failure("empty password; nothing changed")
    if any(c in password for c in "\r\n\0"):
        raise Failure("the password may not contain line breaks or NUL")
    return password


def check_login(login: str) -> None:
    """Refuse logins a passwd-file line cannot hold."""
    if not login or any(c in login for c in ":\r\n\0") or login.lstrip().startswith("#") or login != login.strip():
        raise Failure(f"login {login!r} cannot be stored: no ':', line breaks, NUL, leading '#' or "
                      f"surrounding spaces")


def _check_field(name: str, value: str | None) -> None:
    if value is not None and any(c in value for c in ":\r\n\0"):
        raise Failure(f"--{name} may not contain ':', line breaks or NUL")


# ---------------------------------------------------------------------------
# The passwd-file


def _is_entry(body: bytes) -> bool:
    stripped = body.strip()
    return bool(stripped) and not stripped.startswith(b"#")


def edited_lines(
    lines: list[bytes],
    login: str,
    stored: str | None,
    fields: dict[str, str | None] | None = None,
) -> tuple[list[bytes], bool]:
    """The file's lines with ``login``'s first line set (``stored``) or removed (None); whether it was there.

    ``fields`` may set ``uid``, ``gid``, ``home`` and ``mail`` (a Maildir path, written as
    Dovecot's ``userdb_mail=maildir:PATH`` in the extra field). Every other line is
    returned as it was; a last line without a newline gets one only when a line
    follows it. The new line is checked with the File backend's parser.
    """
    fields = fields or {}
    key = login.encode("utf-8", "surrogateescape")
    out: list[bytes] = []
    found = False
    for line in lines:
        body = line.rstrip(b"\r\n")
        if not found and _is_entry(body) and body.split(b":", 1)[0] == key:
            found = True
            if stored is not None:
                ending = line[len(body):] or b"\n"
                out.append(_entry(body.decode("utf-8", "surrogateescape"), login, stored, fields) + ending)
            continue
        out.append(line)
    if not found and stored is not None:
        if out and not out[-1].endswith(b"\n"):
            out[-1] += b"\n"
        out.append(_entry(None, login, stored, fields) + b"\n")
    return out, found


def _entry(old: str | None, login: str, stored: str, fields: dict[str, str | None]) -> bytes:
    """The new line for ``login``: the old line's fields kept unless ``fields`` sets them.

    An old line keeps its number of fields unless a field beyond them is set; a new
    line leaves out empty trailing fields.
    """
    parts = old.split(":", 7) if old is not None else [login, ""]
    used = len(parts)
    parts += [""] * (8 - len(parts))
    parts[1] = stored
    for index, name in ((2, "uid"), (3, "gid"), (5, "home")):
        value = fields.get(name)
        if value is not None:
            parts[index] = value
            used = max(used, index + 1)
    mail = fields.get("mail")
    if mail is not None:
        kept = [item for item in parts[7].split()
                if item.partition("=")[0] not in ("maildir", "userdb_maildir", "userdb_mail", "mail")]
        parts[7] = " ".join([*kept, f"userdb_mail=maildir:{mail}"])
        used = 8
    text = ":".join(parts[:used])
    if old is None:
        text = text.rstrip(":")
    try:
        parse_line(text)
    except BadLine as e:
        raise Failure(f"the line for {login!r} would be refused by tpops: {e}") from e
    return text.encode("utf-8", "surrogateescape")


def write_atomically(path: str, lines: list[bytes], *, mode: int | None = None,
                     prefix: str = ".tpops-passwd-") -> None:
    """Replace ``path`` by ``lines``: temporary file in the same directory, fsync, rename.

    The new file keeps the old owner (when run as root) and the old mode, or gets
    ``mode`` when given (``tpops-apoppasswd`` keeps its secrets 0600 whatever they were).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        if mode is None:
            mode = NEW_FILE_MODE if old is None else (old.st_mode & 0o7777)
        os.fchmod(fd, mode)
        if old is not None and os.geteuid() == 0:
            os.fchown(fd, old.st_uid, old.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _directory_locked(path: str) -> Any:
    """An exclusive flock on the file's directory (the file itself is replaced, its lock would not hold)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def edit_file(path: str, login: str, stored: str | None, fields: dict[str, str | None] | None = None) -> str:
    """Set (``stored``) or delete (None) ``login`` in the passwd-file; the message to print."""
    check_login(login)
    for name, value in (fields or {}).items():
        _check_field(name, value)
    try:
        with _directory_locked(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if stored is None:
                    raise Failure(f"{path} does not exist") from None
                data = b""
            lines, found = edited_lines(data.splitlines(keepends=True), login, stored, fields)
            if stored is None and not found:
                raise Failure(f"{login!r} is not in {path}")
            write_atomically(path, lines)
    except OSError as e:
        raise Failure(f"cannot update {path}: {e.strerror or e}") from e
    if stored is None:
        return f"deleted {login!r} from {path}"
    return f"{'changed' if found else 'added'} {login!r} in {path}"


# ---------------------------------------------------------------------------
# MySQL


def _identifier(name: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise Failure(f"{what} {name!r} is not a plain SQL identifier (letters, digits, _)")
    return f"`{name}`"


def update_mysql(config: Config, login: str, stored: str, table: str = MYSQL_TABLE,
                 login_column: str = MYSQL_LOGIN_COLUMN, password_column: str = MYSQL_PASSWORD_COLUMN) -> str:
    """``UPDATE table SET password_column = %s WHERE login_column = %s`` with bound values."""
    try:
        import MySQLdb
    except ImportError as e:
        raise Failure("--mysql needs the mysqlclient package (pip install 'tpops[mysql]')") from e
    # Identifiers cannot be bound parameters: _identifier allows [A-Za-z0-9_] only.
    sql = (f"UPDATE {_identifier(table, 'table')} SET {_identifier(password_column, 'column')} = %s "  # noqa: S608
           f"WHERE {_identifier(login_column, 'column')} = %s")
    params: dict[str, Any] = {"charset": "utf8mb4", "connect_timeout": 10}
    if config.mysql_socket:
        params.update(unix_socket=config.mysql_socket, host="localhost")
    else:
        params.update(host=config.mysql_server or "localhost", port=int(config.mysql_port))
    if config.mysql_user:
        params["user"] = config.mysql_user
    params["password"] = config.mysql_pass or ""
    if not config.mysql_db:
        raise Failure("--mysql: $mysql_db is not set in the configuration")
    params["database"] = config.mysql_db
    try:
        conn = MySQLdb.connect(**params)
        try:
            cursor = conn.cursor()
            # The WHERE compares with the column's collation; rowcount counts matched rows
            # only with CLIENT.FOUND_ROWS, so ask whether the row exists first.
            cursor.execute(f"SELECT COUNT(*) FROM {_identifier(table, 'table')} "  # noqa: S608  (checked names)
                           f"WHERE {_identifier(login_column, 'column')} = %s", (login,))
            (count,) = cursor.fetchone()
            if count == 0:
                raise Failure(f"no row for {login!r} in {config.mysql_db}.{table}; nothing changed")
            if count > 1:
                raise Failure(f"{count} rows for {login!r} in {config.mysql_db}.{table}; nothing changed")
            cursor.execute(sql, (stored, login))
            conn.commit()  # type: ignore[no-untyped-call]  # passlib/MySQLdb stubs leave it untyped
        finally:
            conn.close()  # type: ignore[no-untyped-call]  # passlib/MySQLdb stubs leave it untyped
    except MySQLdb.Error as e:
        raise Failure(f"MySQL: {e}") from e
    return f"changed the password of {login!r} in {config.mysql_db}.{table}"


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make a password hash for tpops (like doveadm pw), and set or delete a user in "
                    "$auth_file or the MySQL table.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{hash,set,delete}")

    def hashing(p: argparse.ArgumentParser) -> None:
        p.add_argument("-s", "--scheme", default=DEFAULT_SCHEME, type=str.upper,
                       help=f"{', '.join(HASHERS)} (default {DEFAULT_SCHEME})")
        p.add_argument("-r", "--rounds", type=int,
                       help=f"cost: SHA512-CRYPT rounds (default {SHA512_DEFAULT_ROUNDS}, as doveadm), "
                            "BLF-CRYPT log2 rounds, ARGON2ID time cost, SCRAM-SHA-256 iterations (default 4096)")
        p.add_argument("--stdin", action="store_true", help="read the password as one line of standard input")

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_PATH, help=f"tpops configuration (default {DEFAULT_PATH})")
        p.add_argument("-f", "--file", help="the passwd-file (default: $auth_file of the configuration)")

    hashing(sub.add_parser("hash", help="print {SCHEME}hash of a password"))
    p_set = sub.add_parser("set", help="add USER or change its password (and fields)")
    p_set.add_argument("login", metavar="USER")
    hashing(p_set)
    target(p_set)
    p_set.add_argument("--uid", help="uid field (number or name; empty: the Maildir's owner)")
    p_set.add_argument("--gid", help="gid field (number or name)")
    p_set.add_argument("--home", help="home directory (the Maildir is HOME/Maildir by default)")
    p_set.add_argument("--mail", metavar="DIR", help="the Maildir (userdb_mail=maildir:DIR)")
    p_set.add_argument("--mysql", action="store_true",
                       help="set the password of USER's row in the configured MySQL table instead")
    p_set.add_argument("--table", default=MYSQL_TABLE, help=f"--mysql table (default {MYSQL_TABLE})")
    p_set.add_argument("--login-column", default=MYSQL_LOGIN_COLUMN,
                       help=f"--mysql login column (default {MYSQL_LOGIN_COLUMN})")
    p_set.add_argument("--password-column", default=MYSQL_PASSWORD_COLUMN,
                       help=f"--mysql password column (default {MYSQL_PASSWORD_COLUMN})")
    p_del = sub.add_parser("delete", help="remove USER's line from the passwd-file")
    p_del.add_argument("login", metavar="USER")
    target(p_del)
    return parser


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise Failure(str(e)) from e


def _passwd_file(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    path = _load(args.config).auth_file
    if not path:
        raise Failure(f"no -f FILE given and $auth_file is not set in {args.config}")
    return path


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> str:
    """Carry out one parsed command; the text to print."""
    if args.command == "delete":
        return edit_file(_passwd_file(args), args.login, None)
    if args.command == "set":
        check_login(args.login)
        if args.mysql and any(getattr(args, n) is not None for n in ("uid", "gid", "home", "mail", "file")):
            raise Failure("--mysql sets the password only: no -f, --uid, --gid, --home or --mail")
        path = None if args.mysql else _passwd_file(args)
    stored = make_hash(read_password(args.stdin, stdin), args.scheme, args.rounds)
    if args.command == "hash":
        return stored
    if args.mysql:
        return update_mysql(_load(args.config), args.login, stored, args.table, args.login_column,
                            args.password_column)
    assert path is not None
    fields = {n: getattr(args, n) for n in ("uid", "gid", "home", "mail")}
    return edit_file(path, args.login, stored, fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``tpops-passwd``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print(f"{PROG}: interrupted; nothing changed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
