"""Logging: syslog, the error log, the access log, and escaping of client data.

Every module logs through the stdlib ``logging`` tree under the ``tpops`` logger;
:func:`setup` routes it to syslog (stdlib ``syslog``, ident ``tpops``) and to the
error log. Anything that came from a client passes through :func:`escape` first, so
CR, LF and other control characters can never forge or split a log line.
"""

from __future__ import annotations

import logging
import os
import re
import syslog
from dataclasses import dataclass

#: Characters that could end, split or disguise a log line: C0 controls and DEL, the C1
#: controls U+0080-U+009F (U+0085 is NEL, a line break to Unicode-aware readers), and the
#: Unicode line and paragraph separators (categories Zl and Zp: U+2028, U+2029).
_BREAKS = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
_UNSAFE = re.compile(rf"[{_BREAKS}\\]|[\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    """``\\xNN`` for an ASCII control or an undecodable byte, ``\\uNNNN`` for any other
    character, so a C1 character (U+0085) and the raw byte 0x85 stay distinguishable."""
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def escape(text: str | bytes) -> str:
    """Client data made safe for one log line: control characters, line and paragraph
    separators and backslashes escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return _UNSAFE.sub(_escape_char, text)


_CONTROL = re.compile(f"[{_BREAKS}]")


def one_line(text: str) -> str:
    """A log message kept to one line: control characters left unescaped by a caller
    (a bug) are escaped here, as a last line of defence against forged log lines."""
    return _CONTROL.sub(_escape_char, text)


def get(name: str) -> logging.Logger:
    """The logger for one tpops module (``tpops.<name>``)."""
    return logging.getLogger(f"tpops.{name}")


class SyslogHandler(logging.Handler):
    """Sends records to syslog through the stdlib ``syslog`` module (ident ``tpops``)."""

    _PRIORITIES = (
        (logging.ERROR, syslog.LOG_ERR),
        (logging.WARNING, syslog.LOG_WARNING),
        (logging.INFO, syslog.LOG_INFO),
        (0, syslog.LOG_DEBUG),
    )

    def __init__(self, facility: int) -> None:
        super().__init__()
        self.facility = facility
        self.open()

    def open(self) -> None:
        syslog.openlog("tpops", syslog.LOG_PID | syslog.LOG_NDELAY, self.facility)

    def close(self) -> None:
        syslog.closelog()
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = next(p for level, p in self._PRIORITIES if record.levelno >= level)
            message = record.getMessage()
            if record.exc_info:  # tracebacks go to the error log; syslog gets one line
                message += f" ({record.exc_info[1]!r})"
            syslog.syslog(priority, one_line(message))
        except Exception:  # pragma: no cover - logging must never kill a session
            self.handleError(record)


class ReopenableFile:
    """An append-only log file written one whole line per ``write`` (O_APPEND).

    Concurrent workers appending to the same file never interleave a line, and
    :meth:`reopen` makes logrotate's rename-then-HUP work.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def write(self, line: str) -> None:
        os.write(self.fd, line.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _OneLineFormatter(logging.Formatter):
    """The message on one line; a traceback (error log only) follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)


class _FdHandler(logging.Handler):
    """Formats records (tracebacks included) into one append per record."""

    def __init__(self, target: ReopenableFile | int) -> None:
        super().__init__()
        self.target = target
        self.setFormatter(_OneLineFormatter("%(asctime)s tpops[%(process)d]: %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if isinstance(self.target, ReopenableFile):
                self.target.write(text)
            else:
                os.write(self.target, text.encode("utf-8", "surrogateescape"))
        except Exception:  # pragma: no cover
            self.handleError(record)


@dataclass
class LogSetup:
    """The handles :func:`setup` opened, so they can be reopened on SIGHUP and kept across daemonizing."""

    error_log: ReopenableFile | None = None
    access_log: ReopenableFile | None = None
    syslog: SyslogHandler | None = None

    def fds(self) -> list[int]:
        return [f.fd for f in (self.error_log, self.access_log) if f is not None]

    def reopen(self) -> None:
        for f in (self.error_log, self.access_log):
            if f is not None:
                f.reopen()

    def close(self) -> None:
        for f in (self.error_log, self.access_log):
            if f is not None:
                f.close()


def setup(
    *,
    facility: int | None,
    error_log: str | None,
    access_log: str | None,
    debug: bool,
    to_stderr: bool,
) -> LogSetup:
    """Route the ``tpops`` logger: syslog (info and up, debug with --debug), the error log
    (warnings, errors and tracebacks) and, in the foreground, stderr.

    The files are opened before anything is changed: when one cannot be opened this
    raises OSError (a start-up error, or a failed reopen on SIGHUP) and the handlers in
    place keep working. The caller closes the previous :class:`LogSetup`'s files.
    """
    result = LogSetup()
    try:
        if error_log:
            result.error_log = ReopenableFile(error_log)
        if access_log:
            result.access_log = ReopenableFile(access_log)
    except BaseException:
        result.close()
        raise
    root = logging.getLogger("tpops")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()  # the old SyslogHandler's closelog() comes before the new openlog()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if result.error_log is not None:
        handler = _FdHandler(result.error_log)
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    if facility is not None:
        result.syslog = SyslogHandler(facility)
        root.addHandler(result.syslog)
    if to_stderr:
        handler = _FdHandler(2)
        handler.setLevel(logging.DEBUG if debug else logging.INFO)
        root.addHandler(handler)
    return result
