r"""Configuration: read tpops.conf (the original TPOPS Ruby-syntax file) without running Ruby.

The file is a list of ``$name = value`` lines, exactly as the 2003 TPOPS read it
with ``load``; the original ``tpops.conf.sample`` loads unchanged.  Instead of
evaluating Ruby, a small tokenizer accepts only this grammar::

    line      := blank | comment | assignment [comment]
    comment   := '#' anything                      (also =begin ... =end blocks,
                                                    and __END__ ends the file)
    assignment:= '$' NAME '=' value
    value     := intexpr                           60*60, 2*60+30, -1, 1_000
               | 'single quoted'                   only \\ and \' are escapes
               | "double quoted"                   \\ \" \n \t \# escapes; #{...} is an error
               | true | false | nil
               | Syslog::LOG_MAIL                  and the other facility names
               | `uname -n`.chomp                  this host's name; no other command

Integer expressions use ``+``, ``-`` and ``*`` with normal precedence (no
parentheses, no division); a leading zero (Ruby octal) is refused rather than
guessed.  Any other construct, an unknown parameter, a value of the wrong type
or a value out of range raises :class:`ConfigError`, whose messages read
``FILE:LINE: what is wrong``; all errors of a file are collected.  If a
parameter is assigned twice, the last assignment wins, as in Ruby.

The file is read as UTF-8; undecodable bytes are tolerated in comments (old
files may carry EUC-JP comments) but not inside values.

Callers apply command-line overrides with ``dataclasses.replace(config, ...)``
and then call :func:`check_config` (or :meth:`Config.validate`) themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import syslog
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tpops.tls import TLSConfigError, parse_min_version

__all__ = [
    "DEFAULT_PATH",
    "AUTH_TYPES",
    "PARAMETER_DOCS",
    "SYSLOG_FACILITIES",
    "Config",
    "ConfigError",
    "check_config",
    "format_effective",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = "/etc/tpops/tpops.conf"

#: The accepted values of ``$auth_type`` (case-sensitive, as in TPOPS).
AUTH_TYPES: tuple[str, ...] = ("Passwd", "MySQL", "File")

_FACILITY_NAMES = (
    "LOG_KERN", "LOG_USER", "LOG_MAIL", "LOG_DAEMON", "LOG_AUTH", "LOG_LPR",
    "LOG_NEWS", "LOG_UUCP", "LOG_CRON", "LOG_AUTHPRIV",
    "LOG_LOCAL0", "LOG_LOCAL1", "LOG_LOCAL2", "LOG_LOCAL3",
    "LOG_LOCAL4", "LOG_LOCAL5", "LOG_LOCAL6", "LOG_LOCAL7",
)
#: ``Syslog::LOG_*`` facility name -> the stdlib :mod:`syslog` constant.
SYSLOG_FACILITIES: dict[str, int] = {
    name: getattr(syslog, name) for name in _FACILITY_NAMES if hasattr(syslog, name)
}
_FACILITY_BY_VALUE: dict[int, str] = {v: k for k, v in SYSLOG_FACILITIES.items()}
# Ruby's Syslog names that exist but are not facilities: named in error messages.
_NOT_FACILITIES = frozenset({
    "LOG_EMERG", "LOG_ALERT", "LOG_CRIT", "LOG_ERR", "LOG_WARNING", "LOG_NOTICE",
    "LOG_INFO", "LOG_DEBUG", "LOG_PID", "LOG_CONS", "LOG_ODELAY", "LOG_NDELAY",
    "LOG_NOWAIT", "LOG_PERROR",
})

_DEFAULT_MYSQL_AUTH_QUERY = 'select login,passwd,uid,maildir from user where login="%s"'
_SECRET = "********"
_SECRETS = frozenset({"mysql_pass"})


def _p(default: Any, doc: str) -> Any:
    """A configuration field with its one-line description in the metadata."""
    return field(default=default, metadata={"doc": doc})


def _nodename() -> str:
    return os.uname().nodename


class ConfigError(Exception):
    """The configuration is invalid; :attr:`errors` lists every problem found."""

    errors: list[str]

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        return (type(self), (self.errors,))


@dataclass(frozen=True)
class Config:
    """The effective tpops configuration; field names are the file's ``$names``.

    Field order is the order :func:`format_effective` prints: server and
    process settings, TLS, logging, worker limits, mailbox, authentication, MySQL.
    """

    # --- server
    port: int = _p(110, "TCP port to listen on (0 = any free port)")
    bind_address: str | None = _p(
        None, "addresses to listen on, separated by commas/spaces (nil = all, IPv6 and IPv4)")
    hostname: str = field(default_factory=_nodename, metadata={
        "doc": "host name used in the greeting and APOP banner (default: this host's name)"})
    with_inetd: bool = _p(False, "true if started by inetd (one session on stdin/stdout)")
    user: str | None = _p(None, "run workers as this user (name, or numeric uid as a string)")
    group: str | None = _p(None, "run workers as this group (name, or numeric gid as a string)")
    pid_file: str | None = _p(None, "file to write the server's process id to")
    connection_keep_time: int = _p(3600, "maximum seconds a connection may last")
    command_timeout: int = _p(600, "maximum seconds to wait for the next command")
    # --- TLS (on when $tls_cert_file is set)
    tls_cert_file: str | None = _p(
        None, "PEM server certificate, optionally followed by its chain (nil = no TLS)")
    tls_key_file: str | None = _p(None, "PEM private key of $tls_cert_file (unencrypted)")
    tls_port: int | None = _p(995, "implicit-TLS port on $bind_address (nil = none; STLS only)")
    tls_min_version: str = _p("TLSv1.2", "oldest TLS version accepted: 'TLSv1.2' or 'TLSv1.3'")
    tls_ciphers: str | None = _p(
        None, "OpenSSL cipher list for TLS 1.2 (nil = OpenSSL's secure default)")
    disable_plaintext_auth: bool | None = _p(
        None, "refuse passwords in clear off TLS and loopback (nil = true when TLS is on)")
    # --- logging
    access_log: str | None = _p(None, "file logging one line per finished session")
    error_log: str | None = _p(None, "file for error messages")
    syslog_facility: int | None = _p(
        syslog.LOG_MAIL, "syslog facility, e.g. Syslog::LOG_MAIL (nil = no syslog)")
    debug: bool = _p(False, "log debug information")
    # --- workers and limits
    error_interval: int = _p(5, "seconds to wait before answering a client with an error")
    min_servers: int = _p(5, "minimum number of worker processes")
    max_servers: int = _p(50, "maximum number of worker processes")
    max_use: int = _p(100, "sessions a worker serves before it is replaced (0 = no limit)")
    max_idle: int = _p(100, "maximum idle time of a worker process, in seconds")
    max_bad_commands: int = _p(10, "unknown/invalid commands before the connection is closed")
    max_auth_failures: int = _p(3, "failed logins before the connection is closed")
    # --- mailbox
    maildir_extended: bool = _p(
        False, "trust the Maildir++ ,S= size in file names (it is the file size)")
    maildir_use_filesize: bool = _p(
        False, "use the file size as message size instead of the exact RFC 1939 size")
    # --- authentication
    auth_type: str = _p("Passwd", "authentication type: 'Passwd', 'MySQL' or 'File'")
    default_domain: str | None = _p(
        None, "domain tried as user@domain when a login has no '@', '%' or '+'")
    passwd_lock_dir: str = _p("/var/tmp/tpops", "directory holding the mailbox lock files")
    apop_passwd_file: str | None = _p(None, "APOP password database (login -> plain password)")
    auth_file: str | None = _p(None, "user file for auth_type 'File'")
    # --- MySQL (auth_type 'MySQL')
    mysql_server: str | None = _p(None, "MySQL server host name")
    mysql_port: int = _p(3306, "MySQL server TCP port")
    mysql_socket: str | None = _p(None, "MySQL server Unix socket (instead of host and port)")
    mysql_user: str | None = _p(None, "MySQL user name")
    mysql_pass: str | None = _p(None, "MySQL password")
    mysql_db: str | None = _p(None, "MySQL database name")
    mysql_auth_query: str = _p(
        _DEFAULT_MYSQL_AUTH_QUERY,
        "query returning login, passwd, uid, maildir; %s is replaced with the login name")

    def bind_addresses(self) -> list[str]:
        """The addresses in :attr:`bind_address`; ``[]`` means all addresses."""
        if self.bind_address is None:
            return []
        return [a for a in re.split(r"[\s,]+", self.bind_address) if a]

    def plaintext_auth_disabled(self) -> bool:
        """The effective :attr:`disable_plaintext_auth`: when unset (``nil``), true exactly
        when a certificate is configured (TPOPS compatibility without TLS)."""
        if self.disable_plaintext_auth is None:
            return self.tls_cert_file is not None
        return self.disable_plaintext_auth

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every problem :func:`check_config` finds."""
        errors = check_config(self)
        if errors:
            raise ConfigError(errors)


# ---------------------------------------------------------------- field kinds

_INT, _BOOL, _STR, _OPT_STR, _FACILITY = "int", "bool", "str", "str|None", "facility"
_OPT_INT, _OPT_BOOL = "int|None", "bool|None"

_HINTS = typing.get_type_hints(Config)
_FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Config)
_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)


def _kind_of(name: str) -> str:
    hint = _HINTS[name]
    if name == "syslog_facility":
        return _FACILITY
    if hint is int:
        return _INT
    if hint is bool:
        return _BOOL
    if hint is str:
        return _STR
    if hint == (str | None):
        return _OPT_STR
    if hint == (int | None):
        return _OPT_INT
    if hint == (bool | None):
        return _OPT_BOOL
    raise TypeError(f"config field {name}: unsupported type {hint!r}")  # pragma: no cover


_KINDS: dict[str, str] = {name: _kind_of(name) for name in _NAMES}

#: ``name -> one-line description`` of every parameter, in :func:`format_effective` order.
PARAMETER_DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in _FIELDS}


# ---------------------------------------------------------------- validation

def _describe(value: object) -> str:
    """A value as a user would recognise it in an error message."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Facility):
        return f"Syslog::{value.name}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    return repr(value)


def _type_error(name: str, kind: str, value: object) -> str | None:
    """The message if ``value`` does not fit the type of parameter ``name``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT:
        ok, want = is_int, "an integer"
    elif kind == _BOOL:
        ok, want = isinstance(value, bool), "true or false"
    elif kind == _STR:
        ok, want = isinstance(value, str), "a string"
    elif kind == _OPT_STR:
        ok, want = value is None or isinstance(value, str), "a string or nil"
    elif kind == _OPT_INT:
        ok, want = value is None or is_int, "an integer or nil"
    elif kind == _OPT_BOOL:
        ok, want = value is None or isinstance(value, bool), "true, false or nil"
    else:
        ok, want = value is None or is_int, "a syslog facility (Syslog::LOG_MAIL, ...) or nil"
    if ok:
        return None
    hint = ""
    if name in ("user", "group") and is_int:
        hint = f" (write a numeric id as a string: '{value}')"
    elif kind in (_BOOL, _OPT_BOOL) and isinstance(value, str) and value.lower() in ("true", "false"):
        hint = f" (write {value.lower()} without quotes)"
    elif kind in (_INT, _OPT_INT) and isinstance(value, str) and re.fullmatch(r" *[0-9]+ *", value):
        hint = f" (write {value.strip()} without quotes)"
    return f"${name}: expected {want}, got {_describe(value)}{hint}"


_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# Optional strings that would be meaningless when empty (use nil instead).
_NONEMPTY_OPTIONAL = ("bind_address", "user", "group", "pid_file", "access_log",
                      "error_log", "default_domain", "apop_passwd_file", "auth_file",
                      "mysql_socket", "tls_cert_file", "tls_key_file", "tls_ciphers")
_NONEMPTY = ("hostname", "passwd_lock_dir", "mysql_auth_query")


def _checks(config: Config) -> list[tuple[tuple[str, ...], str]]:
    """Every problem as (parameters involved, message)."""
    out: list[tuple[tuple[str, ...], str]] = []

    def bad(names: str | tuple[str, ...], msg: str) -> None:
        out.append(((names,) if isinstance(names, str) else names, msg))

    mistyped: set[str] = set()
    for name in _NAMES:
        value = getattr(config, name)
        msg = _type_error(name, _KINDS[name], value)
        if msg:
            bad(name, msg)
            mistyped.add(name)
        elif isinstance(value, str):
            if _SURROGATES.search(value):
                bad(name, f"${name}: not valid UTF-8 text")
            elif _BAD_CHARS.search(value):
                bad(name, f"${name}: contains control characters")
            elif value == "" and name in _NONEMPTY_OPTIONAL:
                bad(name, f"${name}: must not be empty (use nil to leave it unset)")
            elif value == "" and name in _NONEMPTY:
                bad(name, f"${name}: must not be empty")

    def ok(*names: str) -> bool:
        return not mistyped.intersection(names)

    def at_least(name: str, low: int, note: str = "") -> None:
        if ok(name) and getattr(config, name) < low:
            bad(name, f"${name} must be at least {low}{note}, got {getattr(config, name)}")

    def in_range(name: str, low: int, high: int) -> None:
        value = getattr(config, name)
        if ok(name) and not low <= value <= high:
            bad(name, f"${name} must be between {low} and {high}, got {value}")

    in_range("port", 0, 65535)
    in_range("mysql_port", 1, 65535)
    if ok("tls_port") and config.tls_port is not None:
        in_range("tls_port", 0, 65535)
    at_least("connection_keep_time", 1)
    at_least("command_timeout", 1)
    at_least("error_interval", 0)
    at_least("min_servers", 1)
    at_least("max_use", 0, " (0 = no limit)")
    at_least("max_idle", 1)
    at_least("max_bad_commands", 1)
    at_least("max_auth_failures", 1)
    if (ok("min_servers", "max_servers") and config.min_servers >= 1
            and config.max_servers < config.min_servers):
        bad(("min_servers", "max_servers"),
            f"$max_servers ({config.max_servers}) must be at least "
            f"$min_servers ({config.min_servers})")

    if ok("syslog_facility") and config.syslog_facility is not None \
            and config.syslog_facility not in _FACILITY_BY_VALUE:
        bad("syslog_facility",
            f"$syslog_facility: {config.syslog_facility} is not a known syslog facility "
            f"(use Syslog::LOG_MAIL, Syslog::LOG_LOCAL0 ... or nil)")

    if ok("auth_type") and config.auth_type not in AUTH_TYPES:
        choices = ", ".join(f"'{t}'" for t in AUTH_TYPES)
        same = [t for t in AUTH_TYPES if t.lower() == config.auth_type.lower()]
        hint = f"; did you mean '{same[0]}'? (case matters)" if same else ""
        bad("auth_type", f"$auth_type must be one of {choices}, "
                         f"got {_quote(config.auth_type)}{hint}")
    if ok("auth_type", "auth_file") and config.auth_type == "File" and config.auth_file is None:
        bad(("auth_type", "auth_file"), "$auth_type 'File' requires $auth_file")

    if ok("tls_cert_file", "tls_key_file") and \
            (config.tls_cert_file is None) != (config.tls_key_file is None):
        given, missing = (("tls_cert_file", "tls_key_file") if config.tls_key_file is None
                          else ("tls_key_file", "tls_cert_file"))
        bad(("tls_cert_file", "tls_key_file"), f"${given} requires ${missing}")
    if ok("tls_min_version"):
        try:
            parse_min_version(config.tls_min_version)
        except TLSConfigError as e:
            bad("tls_min_version", str(e))
    if ok("tls_cert_file", "tls_port", "port") and config.tls_cert_file is not None \
            and config.tls_port is not None and config.tls_port == config.port != 0:
        bad(("port", "tls_port"), f"$tls_port and $port are both {config.port}; "
                                  f"use another $tls_port (or nil for STLS only)")

    if ok("bind_address") and config.bind_address and not config.bind_addresses():
        bad("bind_address", "$bind_address: no address given (use nil for all addresses)")
    return out


def check_config(config: Config) -> list[str]:
    """Every problem with ``config`` (types, ranges, combinations); ``[]`` if it is valid.

    Use this after applying command-line overrides with :func:`dataclasses.replace`.
    """
    return [msg for _, msg in _checks(config)]


# ---------------------------------------------------------------- tokenizer / parser

@dataclass(frozen=True)
class _Facility:
    """A ``Syslog::LOG_*`` constant as written (an int for the config, a name for errors)."""

    name: str
    value: int


class _ParseError(Exception):
    pass


_SPACE = " \t\f\v"  # Ruby's blanks within a line
_ASSIGN = re.compile(r"[ \t\f\v]*\$([A-Za-z_][A-Za-z0-9_]*)[ \t\f\v]*=(?![=~>])")
_NAME_ONLY = re.compile(r"[ \t\f\v]*\$([A-Za-z_][A-Za-z0-9_]*)")
_INT_TOKEN = re.compile(r"[0-9]+(?:_[0-9]+)*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*[?!]?")
_SYSLOG = re.compile(r"Syslog::([A-Za-z_][A-Za-z0-9_]*)")
_BACKTICK = re.compile(r"`[ \t]*uname[ \t]+-n[ \t]*`\.chomp(?![A-Za-z0-9_!?(])")
_DQ_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "#": "#"}


class _Scanner:
    """Parses the value part of one assignment line."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def rest(self) -> str:
        return self.text[self.pos:]

    def value(self) -> object:
        self.skip_space()
        ch = self.peek()
        if ch == "":
            raise _ParseError("missing value after '='")
        if ch == "'":
            return self.single_quoted()
        if ch == '"':
            return self.double_quoted()
        if ch == "`":
            m = _BACKTICK.match(self.text, self.pos)
            if not m:
                raise _ParseError("the only command allowed in backticks is `uname -n`.chomp")
            self.pos = m.end()
            return _nodename()
        if ch in "0123456789+-":
            return self.int_expr()
        m = _SYSLOG.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return self.facility(m.group(1))
        m = _WORD.match(self.text, self.pos)
        if m and m.group() in ("true", "false", "nil"):
            self.pos = m.end()
            return {"true": True, "false": False, "nil": None}[m.group()]
        shown = m.group() if m else (self.rest().split() or [self.rest()])[0]
        raise _ParseError(f"unsupported value {shown!r} (expected a number, a quoted "
                          f"string, true, false, nil or Syslog::LOG_*)")

    @staticmethod
    def facility(name: str) -> _Facility:
        if name in SYSLOG_FACILITIES:
            return _Facility(name, SYSLOG_FACILITIES[name])
        if name in _NOT_FACILITIES:
            raise _ParseError(f"Syslog::{name} is not a syslog facility "
                              f"(use e.g. Syslog::LOG_MAIL)")
        raise _ParseError(f"unknown syslog facility Syslog::{name}")

    def single_quoted(self) -> str:
        # Ruby: only \\ and \' are escapes; any other backslash stays as written.
        out: list[str] = []
        i = self.pos + 1
        text = self.text
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "\\'":
                out.append(text[i + 1])
                i += 2
            elif ch == "'":
                self.pos = i + 1
                return "".join(out)
            else:
                out.append(ch)
                i += 1
        raise _ParseError("unterminated single-quoted string")

    def double_quoted(self) -> str:
        out: list[str] = []
        i = self.pos + 1
        text = self.text
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                esc = text[i + 1] if i + 1 < len(text) else ""
                if esc not in _DQ_ESCAPES:
                    shown = f"\\{esc}" if esc else "\\ at end of line"
                    raise _ParseError(f"unsupported escape {shown} in double-quoted string "
                                      f"(only \\\\ \\\" \\n \\t \\#; or use single quotes)")
                out.append(_DQ_ESCAPES[esc])
                i += 2
            elif ch == "#" and i + 1 < len(text) and text[i + 1] in "{$@":
                raise _ParseError(f"interpolation #{text[i + 1]}... in a double-quoted string "
                                  f"is not supported (write \\# or use single quotes)")
            elif ch == '"':
                self.pos = i + 1
                return "".join(out)
            else:
                out.append(ch)
                i += 1
        raise _ParseError("unterminated double-quoted string")

    def int_operand(self) -> int:
        self.skip_space()
        sign = 1
        while self.peek() in ("+", "-"):
            if self.peek() == "-":
                sign = -sign
            self.pos += 1
            self.skip_space()
        m = _INT_TOKEN.match(self.text, self.pos)
        if not m:
            raise _ParseError("expected an integer" + (
                f" at {self.rest()!r}" if self.rest().strip() else " at end of line"))
        digits = m.group()
        after = self.text[m.end():m.end() + 2]
        if re.match(r"[.eE][0-9]", after):
            raise _ParseError("floating-point numbers are not supported")
        if re.match(r"[A-Za-z_]", after):
            raise _ParseError(f"bad integer {self.text[self.pos:m.end() + 1]!r}...")
        if len(digits) > 1 and digits[0] == "0":
            raise _ParseError(f"integer {digits} has a leading zero (Ruby reads that as "
                              f"octal); write it without the leading zero")
        self.pos = m.end()
        return sign * int(digits.replace("_", ""))

    def int_term(self) -> int:
        value = self.int_operand()
        while True:
            save = self.pos
            self.skip_space()
            if self.peek() == "*" and self.text[self.pos:self.pos + 2] != "**":
                self.pos += 1
                value *= self.int_operand()
            else:
                self.pos = save
                return value

    def int_expr(self) -> int:
        value = self.int_term()
        while True:
            save = self.pos
            self.skip_space()
            op = self.peek()
            if op in ("+", "-"):
                self.pos += 1
                rhs = self.int_term()
                value = value + rhs if op == "+" else value - rhs
            else:
                self.pos = save
                return value

    def end(self) -> None:
        """Only blanks and a comment may follow the value."""
        self.skip_space()
        rest = self.rest()
        if rest and not rest.startswith("#"):
            raise _ParseError(f"unexpected {rest.rstrip()!r} after the value "
                              f"(only '$name = value' and comments are allowed)")


def _parse_lines(text: str, filename: str
                 ) -> tuple[dict[str, object], dict[str, int], list[tuple[int, str]], set[str]]:
    """(values, line of each value's last assignment, (line, error) pairs, names that failed)."""
    values: dict[str, object] = {}
    lines_of: dict[str, int] = {}
    errors: list[tuple[int, str]] = []
    failed: set[str] = set()
    in_doc = 0  # line number of an open =begin block
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")

        def error(msg: str, lineno: int = lineno) -> None:
            errors.append((lineno, f"{filename}:{lineno}: {msg}"))

        if in_doc:
            if re.match(r"=end(\s|$)", line):
                in_doc = 0
            continue
        if re.match(r"=begin(\s|$)", line):
            in_doc = lineno
            continue
        if line.rstrip(_SPACE) == "__END__":
            break  # Ruby ignores the rest of the file
        stripped = line.strip(_SPACE)
        if not stripped or stripped.startswith("#"):
            continue
        m = _ASSIGN.match(line)
        if not m:
            nm = _NAME_ONLY.match(line)
            if nm:
                error(f"${nm.group(1)}: expected '${nm.group(1)} = value', got {stripped!r}")
                failed.add(nm.group(1))
            else:
                error(f"expected '$name = value' or a comment, got {stripped!r}")
            continue
        name = m.group(1)
        if name not in _KINDS:
            close = difflib.get_close_matches(name, _NAMES, n=1)
            error(f"unknown parameter ${name}" + (f" (did you mean ${close[0]}?)" if close else ""))
            continue
        scanner = _Scanner(line)
        scanner.pos = m.end()
        try:
            value = scanner.value()
            scanner.end()
        except _ParseError as exc:
            error(f"${name}: {exc}")
            failed.add(name)
            continue
        kind = _KINDS[name]
        if isinstance(value, _Facility) and kind != _FACILITY:
            error(f"${name}: expected {_KIND_WORDS[kind]}, got Syslog::{value.name}")
            failed.add(name)
            continue
        plain = value.value if isinstance(value, _Facility) else value
        msg = _type_error(name, kind, plain)
        if msg:
            error(msg)
            failed.add(name)
            continue
        values[name] = plain  # a later assignment overrides an earlier one, as in Ruby
        lines_of[name] = lineno
        failed.discard(name)
    if in_doc:
        errors.append((in_doc, f"{filename}:{in_doc}: =begin without =end"))
    return values, lines_of, errors, failed


_KIND_WORDS = {_INT: "an integer", _BOOL: "true or false", _STR: "a string",
               _OPT_STR: "a string or nil", _OPT_INT: "an integer or nil",
               _OPT_BOOL: "true, false or nil"}


def parse_config(text: str, filename: str = "<string>") -> Config:
    """The :class:`Config` described by ``text``; :class:`ConfigError` lists every problem.

    Parameters the text does not set keep their defaults.  Errors are ordered by
    line; a problem involving several parameters is reported at the last line
    that set one of them.
    """
    values, lines_of, errors, failed = _parse_lines(text, filename)
    config = Config(**values)  # type: ignore[arg-type]  # types were checked above
    for names, msg in _checks(config):
        if failed.intersection(names):
            continue  # a default stands in for a broken line; don't blame it twice
        set_at = [lines_of[n] for n in names if n in lines_of]
        line = max(set_at, default=0)
        errors.append((line, f"{filename}:{line}: {msg}" if line else f"{filename}: {msg}"))
    if errors:
        raise ConfigError([msg for _, msg in sorted(errors, key=lambda e: e[0])])
    return config


def load_config(path: str | None) -> Config:
    """Read the configuration file at ``path``.

    ``None`` means :data:`DEFAULT_PATH`, where a missing file means all defaults
    (as TPOPS could run without tpops.conf); an explicit path must exist.
    """
    explicit = path is not None
    real = path if path is not None else DEFAULT_PATH
    try:
        with open(real, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{real}: no such file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{real}: {exc.strerror or exc}") from None
    return parse_config(data.decode("utf-8", "surrogateescape"), real)


# ---------------------------------------------------------------- output

def _quote(value: str) -> str:
    """``value`` as a string literal of the config file (single quotes unless awkward)."""
    if "\n" in value or "\t" in value or ("'" in value and '"' not in value):
        body = (value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
                .replace("\n", "\\n").replace("\t", "\\t"))
        return f'"{body}"'
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _format_value(name: str, value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if name == "syslog_facility" and isinstance(value, int) and value in _FACILITY_BY_VALUE:
        return f"Syslog::{_FACILITY_BY_VALUE[value]}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quote(_SECRET if name in _SECRETS else value)
    return repr(value)


def format_effective(config: Config) -> str:
    """Every parameter as a ``$name = value`` line, in the file's own syntax.

    Lines follow the :class:`Config` field order (server, TLS, logging, workers,
    mailbox, authentication, MySQL) and end with a newline.  A set
    ``$mysql_pass`` is shown as ``'********'``.  The text parses back with
    :func:`parse_config` to the same configuration (apart from the mask).
    """
    return "".join(f"${name} = {_format_value(name, getattr(config, name))}\n"
                   for name in _NAMES)
