"""Configuration: the tpops.conf parameters, their defaults and checks, and ``--check-config`` output.

The file's syntax (TPOPS's Ruby ``$name = value`` lines, read without running
Ruby) is :mod:`tpops.config_syntax`; this module is the schema on top of it:
the :class:`Config` fields with their defaults and one-line descriptions, the
kind each value must have (:class:`Kind`), ranges and combinations
(:func:`check_config`), and :func:`format_effective`, which prints every
parameter back in the file's syntax.

Any unknown parameter, a value of the wrong type or a value out of range raises
:class:`ConfigError`, whose messages read ``FILE:LINE: what is wrong``; all
errors of a file are collected.  If a parameter is assigned twice, the last
assignment wins, as in Ruby.

The file is read as UTF-8; undecodable bytes are tolerated in comments (old
files may carry EUC-JP comments) but not inside values.

Callers apply command-line overrides with ``dataclasses.replace(config, ...)``
and then call :func:`check_config` (or :meth:`Config.validate`) themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import syslog
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tpops.config_syntax import (
    SYSLOG_FACILITIES,
    Assignment,
    Facility,
    literal,
    nodename,
    quote,
    read_statements,
)
from tpops.mailbox.lock import MAILBOX_LOCKS, default_lock_dir
from tpops.proxy import TrustedNetworks
from tpops.tls import TLSConfigError, parse_min_version

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_MYSQL_AUTH_QUERY",
    "DEFAULT_PATH",
    "PARAMETER_DOCS",
    "SYSLOG_FACILITIES",
    "Config",
    "ConfigError",
    "ConfigFile",
    "Kind",
    "check_config",
    "config_problems",
    "format_effective",
    "load_config",
    "parse_config",
    "read_config_file",
]

DEFAULT_PATH = "/etc/tpops/tpops.conf"

#: The accepted values of ``$auth_type`` (case-sensitive, as in TPOPS).
AUTH_TYPES: tuple[str, ...] = ("Passwd", "MySQL", "File")

#: The SASL mechanisms tpops implements (:data:`tpops.sasl.MECHANISMS`), strongest first.
SASL_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")
#: Offered unless ``$sasl_mechanisms`` says otherwise: CRAM-MD5 is opt-in, because clients
#: that see it prefer it (curl, Thunderbird) and it works only for clear-text secrets.
DEFAULT_SASL_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN", "LOGIN")

_FACILITY_BY_VALUE: dict[int, str] = {v: k for k, v in SYSLOG_FACILITIES.items()}

#: The query TPOPS used when ``$mysql_auth_query`` is not set.
DEFAULT_MYSQL_AUTH_QUERY = 'select login,passwd,uid,maildir from user where login="%s"'
_SECRET = "********"  # noqa: S105  (the mask --check-config prints, not a password)
_SECRETS = frozenset({"mysql_pass"})


def _p(default: Any, doc: str) -> Any:
    """A configuration field with its one-line description in the metadata."""
    return field(default=default, metadata={"doc": doc})


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
    hostname: str = field(default_factory=nodename, metadata={
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
    sasl_mechanisms: str | None = _p(
        None, "AUTH mechanisms offered where they can work (nil = all but CRAM-MD5)")
    haproxy_trusted_networks: str | None = _p(
        None, "load balancers (addresses/CIDRs, by spaces or commas) whose connections start "
              "with a PROXY v1/v2 header naming the client (nil = none)")
    control_socket: str | None = _p(
        None, "Unix socket (0600) tpops --status asks (nil = /run/tpops/control as root)")
    metrics_address: str | None = _p(None, "HOST:PORT serving Prometheus metrics (nil = no metrics)")
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
    max_connections_per_ip: int = _p(10, "simultaneous connections from one address, loopback too (0 = no limit)")
    max_auth_penalty: int = _p(
        15, "cap in seconds of the growing delay after failed logins from one address (0 = none)")
    login_timeout: int = _p(60, "maximum seconds a connection may stay unauthenticated")
    # --- mailbox
    maildir_extended: bool = _p(
        False, "trust the Maildir++ ,S= size in file names (it is the file size)")
    maildir_use_filesize: bool = _p(
        False, "use the file size as message size instead of the exact RFC 1939 size")
    first_valid_uid: int = _p(500, "lowest uid a session may run as when tpops switches per session")
    post_login_workers: int = _p(
        100, "root mode: post-login processes kept for reuse by the whole pool, at most (0 = none)")
    post_login_idle: int = _p(60, "root mode: seconds an idle post-login process is kept")
    last_valid_uid: int = _p(0, "highest uid a session may run as (0 = no upper bound)")
    # --- authentication
    auth_type: str = _p("Passwd", "authentication type: 'Passwd', 'MySQL' or 'File'")
    default_domain: str | None = _p(
        None, "domain tried as user@domain when a login has no '@', '%' or '+'")
    passwd_lock_dir: str = field(default_factory=default_lock_dir, metadata={
        "doc": "directory holding the mailbox lock files (default /run/tpops/locks as root)"})
    mailbox_lock: str | None = _p(
        None, "one-session lock: 'local' (flock in $passwd_lock_dir), 'maildir' (OFD lock file in "
              "the Maildir, for shared storage) or 'mysql' (GET_LOCK); nil = 'mysql' for MySQL, else 'local'")
    apop_passwd_file: str | None = _p(None, "APOP password database (login -> plain password)")
    auth_file: str | None = _p(None, "user file for auth_type 'File'")
    apop: bool = _p(True, "offer APOP (the greeting's timestamp); false: USER/PASS only")
    # --- MySQL (auth_type 'MySQL')
    mysql_server: str | None = _p(None, "MySQL server host name")
    mysql_port: int = _p(3306, "MySQL server TCP port")
    mysql_socket: str | None = _p(None, "MySQL server Unix socket (instead of host and port)")
    mysql_user: str | None = _p(None, "MySQL user name")
    mysql_pass: str | None = _p(None, "MySQL password")
    mysql_db: str | None = _p(None, "MySQL database name")
    mysql_auth_query: str = _p(
        DEFAULT_MYSQL_AUTH_QUERY,
        "query returning login, passwd, uid, maildir; %s is replaced with the login name")

    def bind_addresses(self) -> list[str]:
        """The addresses in :attr:`bind_address`; ``[]`` means all addresses."""
        if self.bind_address is None:
            return []
        return [a for a in re.split(r"[\s,]+", self.bind_address) if a]

    def sasl_mechanism_names(self) -> tuple[str, ...]:
        """The mechanisms :attr:`sasl_mechanisms` allows, upper-cased; nil: :data:`DEFAULT_SASL_MECHANISMS`."""
        if self.sasl_mechanisms is None:
            return DEFAULT_SASL_MECHANISMS
        return tuple(m.upper() for m in re.split(r"[\s,]+", self.sasl_mechanisms) if m)

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

class Kind(enum.Enum):
    """What a parameter's value must be; the value is how an error message names it."""

    INT = "an integer"
    BOOL = "true or false"
    STR = "a string"
    OPT_STR = "a string or nil"
    OPT_INT = "an integer or nil"
    OPT_BOOL = "true, false or nil"
    FACILITY = "a syslog facility (Syslog::LOG_MAIL, ...) or nil"

    def accepts(self, value: object) -> bool:
        """True when ``value`` (a plain Python value, not a :class:`Facility`) fits."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self is Kind.INT:
            return is_int
        if self is Kind.BOOL:
            return isinstance(value, bool)
        if self is Kind.STR:
            return isinstance(value, str)
        if self is Kind.OPT_STR:
            return value is None or isinstance(value, str)
        if self is Kind.OPT_BOOL:
            return value is None or isinstance(value, bool)
        return value is None or is_int


_HINTS = typing.get_type_hints(Config)
_FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Config)
_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)


def _kind_of(name: str) -> Kind:
    hint = _HINTS[name]
    if name == "syslog_facility":
        return Kind.FACILITY
    if hint is int:
        return Kind.INT
    if hint is bool:
        return Kind.BOOL
    if hint is str:
        return Kind.STR
    if hint == (str | None):
        return Kind.OPT_STR
    if hint == (int | None):
        return Kind.OPT_INT
    if hint == (bool | None):
        return Kind.OPT_BOOL
    raise TypeError(f"config field {name}: unsupported type {hint!r}")  # pragma: no cover


_KINDS: dict[str, Kind] = {name: _kind_of(name) for name in _NAMES}

#: ``name -> one-line description`` of every parameter, in :func:`format_effective` order.
PARAMETER_DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in _FIELDS}


# ---------------------------------------------------------------- validation

def _describe(value: object) -> str:
    """A value as a user would recognise it in an error message."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Facility):
        return f"Syslog::{value.name}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    return repr(value)


def _type_error(name: str, kind: Kind, value: object) -> str | None:
    """The message if ``value`` does not fit the type of parameter ``name``."""
    if kind.accepts(value):
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    hint = ""
    if name in ("user", "group") and is_int:
        hint = f" (write a numeric id as a string: '{value}')"
    elif kind in (Kind.BOOL, Kind.OPT_BOOL) and isinstance(value, str) and value.lower() in ("true", "false"):
        hint = f" (write {value.lower()} without quotes)"
    elif kind in (Kind.INT, Kind.OPT_INT) and isinstance(value, str) and re.fullmatch(r" *[0-9]+ *", value):
        hint = f" (write {value.strip()} without quotes)"
    return f"${name}: expected {kind.value}, got {_describe(value)}{hint}"


_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# Optional strings that would be meaningless when empty (use nil instead).
_NONEMPTY_OPTIONAL = ("bind_address", "user", "group", "pid_file", "control_socket",
                      "metrics_address", "access_log", "error_log", "default_domain", "apop_passwd_file", "auth_file",
                      "mysql_socket", "tls_cert_file", "tls_key_file", "tls_ciphers",
                      "haproxy_trusted_networks", "mailbox_lock")
_NONEMPTY = ("hostname", "passwd_lock_dir", "mysql_auth_query")


def _checks(config: Config, *, complete: bool = True) -> list[tuple[tuple[str, ...], str]]:
    """Every problem as (parameters involved, message).

    ``complete=False`` leaves out what the command line may still fix (``--user``
    for a file's ``$group``): a file is checked on its own before the options apply.
    """
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
    at_least("first_valid_uid", 1, " (uid 0 is never served)")
    at_least("post_login_workers", 0, " (0 = none)")
    at_least("post_login_idle", 1)
    at_least("last_valid_uid", 0, " (0 = no upper bound)")
    at_least("max_connections_per_ip", 0, " (0 = no limit)")
    at_least("max_auth_penalty", 0, " (0 = none)")
    at_least("login_timeout", 1)
    if ok("control_socket") and config.control_socket and not config.control_socket.startswith("/"):
        bad("control_socket", "$control_socket must be an absolute path")
    if ok("metrics_address") and config.metrics_address:
        try:
            parse_address(config.metrics_address)
        except ValueError as exc:
            bad("metrics_address", f"$metrics_address: {exc}")
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
                         f"got {quote(config.auth_type)}{hint}")
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

    if ok("mailbox_lock") and config.mailbox_lock is not None and config.mailbox_lock not in MAILBOX_LOCKS:
        bad("mailbox_lock", f"$mailbox_lock must be one of {', '.join(repr(k) for k in MAILBOX_LOCKS)} "
                            f"or nil, got {quote(config.mailbox_lock)}")
    if ok("haproxy_trusted_networks") and config.haproxy_trusted_networks:
        try:
            if not TrustedNetworks.parse(config.haproxy_trusted_networks):
                bad("haproxy_trusted_networks", "$haproxy_trusted_networks: no network given (use nil for none)")
        except ValueError as exc:
            bad("haproxy_trusted_networks", str(exc))
    if ok("sasl_mechanisms") and config.sasl_mechanisms is not None:
        unknown = [m for m in config.sasl_mechanism_names() if m not in SASL_MECHANISMS]
        if unknown or not config.sasl_mechanism_names():
            what = "unknown mechanism " + quote(unknown[0]) if unknown else "empty"
            bad("sasl_mechanisms", f"$sasl_mechanisms: {what}; "
                                   f"name some of {' '.join(SASL_MECHANISMS)} (or nil for the default)")
    if ok("bind_address") and config.bind_address and not config.bind_addresses():
        bad("bind_address", "$bind_address: no address given (use nil for all addresses)")
    if ok("auth_type", "mysql_auth_query") and config.auth_type == "MySQL" \
            and "%s" not in config.mysql_auth_query:
        bad(("auth_type", "mysql_auth_query"),
            "$mysql_auth_query has no %s where the login name goes")
    if complete and ok("user", "group") and config.group is not None and config.user is None:
        bad(("user", "group"), "$group requires $user (the workers run as $user, in $group)")
    return out


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (``$metrics_address``) -> (host, port); ValueError with the reason."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT (e.g. '127.0.0.1:9110'), got {quote(text)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host, number


def check_config(config: Config) -> list[str]:
    """Every problem with ``config`` (types, ranges, combinations); ``[]`` if it is valid.

    Use this after applying command-line overrides with :func:`dataclasses.replace`.
    """
    return [msg for _, msg in _checks(config)]


def config_problems(config: Config) -> list[tuple[tuple[str, ...], str]]:
    """Like :func:`check_config`, each message with the parameters it involves
    (for :meth:`ConfigFile.blame`)."""
    return _checks(config)


# ---------------------------------------------------------------- reading a file

def _schema_errors(statement: Assignment) -> tuple[str | None, object]:
    """(what is wrong with one assignment for the schema, or None; its plain value)."""
    name, value = statement.name, statement.value
    if name not in _KINDS:
        close = difflib.get_close_matches(name, _NAMES, n=1)
        return f"unknown parameter ${name}" + (f" (did you mean ${close[0]}?)" if close else ""), None
    if statement.error is not None:
        return statement.error, None
    kind = _KINDS[name]
    if isinstance(value, Facility):
        if kind is not Kind.FACILITY:
            return f"${name}: expected {kind.value}, got Syslog::{value.name}", None
        return None, value.value
    return _type_error(name, kind, value), value


def _read_values(text: str, filename: str
                 ) -> tuple[dict[str, object], dict[str, int], list[tuple[int, str]], set[str]]:
    """(values, line of each value's last assignment, (line, error) pairs, names that failed)."""
    values: dict[str, object] = {}
    lines_of: dict[str, int] = {}
    errors: list[tuple[int, str]] = []
    failed: set[str] = set()
    for statement in read_statements(text):
        line = statement.line
        if not isinstance(statement, Assignment):
            errors.append((line, f"{filename}:{line}: {statement.message}"))
            if statement.name is not None:
                failed.add(statement.name)
            continue
        msg, plain = _schema_errors(statement)
        if msg is not None:
            errors.append((line, f"{filename}:{line}: {msg}"))
            if statement.name in _KINDS:
                failed.add(statement.name)
            continue
        values[statement.name] = plain  # a later assignment overrides an earlier one, as in Ruby
        lines_of[statement.name] = line
        failed.discard(statement.name)
    return values, lines_of, errors, failed


def _parse(text: str, filename: str) -> tuple[Config, dict[str, int]]:
    """(the configuration, the line that last set each parameter); ConfigError as documented
    for :func:`parse_config`."""
    values, lines_of, errors, failed = _read_values(text, filename)
    config = Config(**values)  # type: ignore[arg-type]  # types were checked above
    for names, msg in _checks(config, complete=False):
        if failed.intersection(names):
            continue  # a default stands in for a broken line; don't blame it twice
        set_at = [lines_of[n] for n in names if n in lines_of]
        line = max(set_at, default=0)
        errors.append((line, f"{filename}:{line}: {msg}" if line else f"{filename}: {msg}"))
    if errors:
        raise ConfigError([msg for _, msg in sorted(errors, key=lambda e: e[0])])
    return config, lines_of


def parse_config(text: str, filename: str = "<string>") -> Config:
    """The :class:`Config` described by ``text``; :class:`ConfigError` lists every problem.

    Parameters the text does not set keep their defaults.  Errors are ordered by
    line; a problem involving several parameters is reported at the last line
    that set one of them.
    """
    return _parse(text, filename)[0]


@dataclass(frozen=True)
class ConfigFile:
    """A configuration as read from :attr:`path`, with the line that last set each parameter,
    so that a problem found later (after command-line overrides, or by a look at the
    system) is still reported as ``FILE:LINE: what is wrong``."""

    path: str
    config: Config
    lines: dict[str, int] = field(default_factory=dict)

    def blame(self, names: Iterable[str], message: str, *, overridden: Iterable[str] = ()) -> str:
        """``message`` prefixed with where the parameters ``names`` were set: ``command
        line:`` if an option in ``overridden`` set one, else ``FILE:LINE:`` (the last such
        line), else ``FILE:`` (all defaults)."""
        names = tuple(names)
        if set(names).intersection(overridden):
            return f"command line: {message}"
        line = max((self.lines[n] for n in names if n in self.lines), default=0)
        return f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}"


def read_config_file(path: str | None) -> ConfigFile:
    """Read the configuration file at ``path`` (see :func:`load_config`), keeping its lines."""
    explicit = path is not None
    real = path if path is not None else DEFAULT_PATH
    try:
        with open(real, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{real}: no such file") from None
        return ConfigFile(real, Config())
    except OSError as exc:
        raise ConfigError(f"{real}: {exc.strerror or exc}") from None
    config, lines = _parse(data.decode("utf-8", "surrogateescape"), real)
    return ConfigFile(real, config, lines)


def load_config(path: str | None) -> Config:
    """Read the configuration file at ``path``.

    ``None`` means :data:`DEFAULT_PATH`, where a missing file means all defaults
    (as TPOPS could run without tpops.conf); an explicit path must exist.
    """
    return read_config_file(path).config


# ---------------------------------------------------------------- output

def _format_value(name: str, value: object) -> str:
    if name == "syslog_facility" and isinstance(value, int) and value in _FACILITY_BY_VALUE:
        return literal(Facility(_FACILITY_BY_VALUE[value], value))
    if isinstance(value, str) and name in _SECRETS:
        return literal(_SECRET)
    if value is None or isinstance(value, (bool, int, str)):
        return literal(value)
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
