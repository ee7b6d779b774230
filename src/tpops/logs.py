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
import socket
import syslog
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# No tpops log line shows the caller's file and line, the thread or the multiprocessing
# process name: do not collect them for every record (the settings of the logging
# HOWTO's "Optimization" section). A worker logs four lines per session.
logging._srcfile = None
logging.logThreads = False
logging.logMultiprocessing = False
# The pid in error-log and stderr lines comes from _LineFormatter (os.getpid() is a
# system call per record; the pid changes only at fork).
logging.logProcesses = False
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

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
    if text.isprintable() and "\\" not in text:  # the common case: nothing to escape
        return text
    return _UNSAFE.sub(_escape_char, text)


_CONTROL = re.compile(f"[{_BREAKS}]")


def one_line(text: str) -> str:
    """A log message kept to one line: control characters left unescaped by a caller
    (a bug) are escaped here, as a last line of defence against forged log lines."""
    if text.isprintable():  # every character _CONTROL matches is unprintable
        return text
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

    def __init__(self, facility: int, failures: LogFailures | None = None) -> None:
        super().__init__()
        self.facility = facility
        self.failures = failures if failures is not None else LogFailures()
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
        except Exception as exc:
            self.failures.failed("syslog", exc)

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        """Count the failure; never print logging's traceback (see :class:`LogFailures`)."""
        self.failures.failed("syslog", None)


class ReopenableFile:
    """An append-only log file written one whole line per ``write`` (O_APPEND).

    Concurrent workers appending to the same file never interleave a line, and
    :meth:`reopen` makes logrotate's rename-then-HUP work. With ``failures``, a
    write that fails (a full file system, an I/O error) or is cut short is counted
    there and :meth:`write` returns instead of raising, so a full disk costs no
    session and prints no traceback.
    """

    def __init__(self, path: str, failures: LogFailures | None = None) -> None:
        self.path = path
        self.fd = -1
        self.failures = failures
        self.reopen()

    def reopen(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "surrogateescape")
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            if self.failures is None:
                raise
            self.failures.failed(self.path, exc)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LogFailures:
    """Failed log writes of this process, counted and reported at most once per interval.

    A full log file system used to print logging's ``--- Logging error ---`` traceback
    on stderr for every failed write (and in inetd mode stderr may be the client's
    socket). Instead the first failure is reported at once and later ones are
    summed up, at most once per ``interval`` seconds, on the next log activity:
    ``N log writes failed (last: PATH: [Errno 28] No space left on device)``. The
    report goes to every sink set in :attr:`sinks` (syslog, the error log, stderr);
    a sink that fails too is skipped silently, so whichever still works carries it.
    Each process counts its own failures; counts carry over a log reopen.
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.count = 0
        self.total = 0
        self.last = ""
        self.reported_at: float | None = None
        self.sinks: list[Callable[[str], None]] = []

    def adopt(self, old: LogFailures) -> None:
        """Continue ``old``'s counts and schedule (the logs were reopened)."""
        self.count, self.total, self.last = old.count, old.total, old.last
        self.reported_at = old.reported_at

    def failed(self, where: str, exc: BaseException | None) -> None:
        """One write to ``where`` failed with ``exc``."""
        self.count += 1
        self.total += 1
        self.last = f"{where}: {exc}" if exc is not None else f"{where}: write failed"
        self.tick()

    def tick(self) -> None:
        """Report the failures counted so far if the interval has passed since the last report."""
        if not self.count:
            return
        now = self.clock()
        if self.reported_at is not None and now - self.reported_at < self.interval:
            return
        self.reported_at = now
        count, self.count = self.count, 0
        writes = "log write" if count == 1 else "log writes"
        message = (f"{count} {writes} failed (last: {one_line(self.last)}); further failures "
                   f"are counted and reported at most every {self.interval:g} s")
        for sink in self.sinks:
            try:
                sink(message)
            except Exception:  # noqa: S112 - the next sink may still work
                continue


class _OneLineFormatter(logging.Formatter):
    """The message on one line; a traceback (error log only) follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


_LINE_FORMAT = "%(asctime)s tpops[%(process)d]: %(levelname)s %(message)s"


class _LineFormatter(_OneLineFormatter):
    """:data:`_LINE_FORMAT`, what ``logging.Formatter(_LINE_FORMAT)`` writes, character for
    character, built without its generic steps: a worker writes four lines per session,
    and at hundreds of sessions a second the generic formatting was a measurable share
    of a login's CPU. The date and time part is formatted once per second."""

    def __init__(self) -> None:
        super().__init__(_LINE_FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage())
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        record.asctime = f"{self._stamp},{int(record.msecs):03d}"
        record.process = _pid
        line = f"{record.asctime} tpops[{_pid}]: {record.levelname} {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class _JournalFormatter(_OneLineFormatter):
    """journald's stderr convention: every line starts with ``<N>``, its syslog priority
    (RFC 5424 severity: 3 error, 4 warning, 6 info, 7 debug). journald adds the time, the
    ident and the pid itself, so the line is only the message (a traceback's lines each
    carry the record's priority, so they stay one priority in ``journalctl -p``)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def journal_priority(level: int) -> int:
    """The syslog severity for a logging level (what syslog(3) and journald call the priority)."""
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


class _FdHandler(logging.Handler):
    """Formats records (tracebacks included) into one append per record."""

    def __init__(self, target: ReopenableFile | int, failures: LogFailures, *, journal: bool = False) -> None:
        super().__init__()
        self.target = target
        self.failures = failures
        self.setFormatter(_JournalFormatter() if journal else _LineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if isinstance(self.target, ReopenableFile):
                self.target.write(text)
            else:
                data = text.encode("utf-8", "surrogateescape")
                if os.write(self.target, data) != len(data):
                    raise OSError("short write")
        except Exception as exc:
            self.failures.failed(self._where(), exc)
        else:
            self.failures.tick()

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        """Count the failure; never print logging's traceback (see :class:`LogFailures`)."""
        self.failures.failed(self._where(), None)

    def _where(self) -> str:
        return self.target.path if isinstance(self.target, ReopenableFile) else "stderr"


def _report_line(fd: int, message: str) -> None:
    """``message`` as one error line on ``fd``, formatted like every other log line."""
    record = logging.LogRecord("tpops.logs", logging.ERROR, __file__, 0, message, None, None)
    data = (_LineFormatter().format(record) + "\n").encode("utf-8", "surrogateescape")
    if os.write(fd, data) != len(data):
        raise OSError("short write")


@dataclass
class LogSetup:
    """The handles :func:`setup` opened, so they can be reopened on SIGHUP and kept across daemonizing."""

    error_log: ReopenableFile | None = None
    access_log: ReopenableFile | None = None
    syslog: SyslogHandler | None = None
    failures: LogFailures = field(default_factory=LogFailures)
    #: Why syslog is out of reach although ``$syslog_facility`` is set (None: it is
    #: reachable, or not wanted), and where its lines go instead.
    syslog_missing: str | None = None
    syslog_fallback: str = ""

    def syslog_notice(self) -> str | None:
        """The start-up notice when syslog is unreachable: what is wrong and where the lines go."""
        if self.syslog_missing is None:
            return None
        return f"syslog is unreachable ({self.syslog_missing}): {self.syslog_fallback}"

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
    journal: bool = False,
    dev_log: str = "/dev/log",
) -> LogSetup:
    """Route the ``tpops`` logger: syslog (info and up, debug with --debug), the error log
    (warnings, errors and tracebacks) and, in the foreground, stderr (every level
    configured; with ``journal``, stderr is journald's stream and each line carries its
    ``<N>`` priority instead of a time stamp, and syslog is left out: under systemd it
    is the same journal).

    Logs never vanish: when ``facility`` is set but syslog cannot be reached (no
    ``dev_log`` socket: a container, a minimal host), the lines meant for syslog go to
    the error log instead (every level syslog would get), or to stderr when tpops logs
    there; :attr:`LogSetup.syslog_missing` says why, for the caller's start-up notice.

    The files are opened before anything is changed: when one cannot be opened this
    raises OSError (a start-up error, or a failed reopen on SIGHUP) and the handlers in
    place keep working. The caller closes the previous :class:`LogSetup`'s files.

    A write that fails later (a full file system) never raises and prints no
    traceback: :class:`LogFailures` counts it and reports once a minute to syslog,
    the error log and (``to_stderr``) stderr, whichever still works.
    """
    result = LogSetup()
    failures = result.failures
    try:
        if error_log:
            result.error_log = ReopenableFile(error_log, failures)
        if access_log:
            result.access_log = ReopenableFile(access_log, failures)
    except BaseException:
        result.close()
        raise
    root = logging.getLogger("tpops")
    for handler in list(root.handlers):
        if isinstance(handler, (_FdHandler, SyslogHandler)):
            failures.adopt(handler.failures)
        root.removeHandler(handler)
        handler.close()  # the old SyslogHandler's closelog() comes before the new openlog()
    level = logging.DEBUG if debug else logging.INFO
    root.setLevel(level)
    root.propagate = False
    if journal and to_stderr:
        # stderr is the journal, and so is /dev/log under systemd: both would put every
        # line in the journal twice (and count each failed login twice for fail2ban).
        # The unit's SyslogFacility= gives the stderr lines their facility instead.
        facility = None
    if facility is not None:
        result.syslog_missing = syslog_unreachable(dev_log)
    if result.syslog_missing is not None:
        facility = None
        if result.error_log is not None:
            result.syslog_fallback = f"its lines go to $error_log {error_log} instead"
        elif to_stderr:
            result.syslog_fallback = "its lines go to stderr instead"
        else:
            result.syslog_fallback = ("its lines are lost: set $error_log, or run a syslog daemon, "
                                      "or run tpops --fg under systemd")
    if result.error_log is not None:
        handler = _FdHandler(result.error_log, failures)
        handler.setLevel(level if result.syslog_missing is not None else logging.WARNING)
        root.addHandler(handler)
        error_fd = result.error_log
        failures.sinks.append(lambda message: _report_line(error_fd.fd, message))
    if facility is not None:
        result.syslog = SyslogHandler(facility, failures)
        root.addHandler(result.syslog)
        failures.sinks.append(lambda message: syslog.syslog(syslog.LOG_ERR, message))
    if to_stderr:
        handler = _FdHandler(2, failures, journal=journal)
        handler.setLevel(level)
        root.addHandler(handler)
        failures.sinks.append(lambda message: _report_line(2, message))
    return result


def syslog_unreachable(path: str = "/dev/log") -> str | None:
    """Why syslog(3) cannot deliver to ``path`` (None: it can).

    glibc's syslog() connects to /dev/log as a datagram socket, else as a stream socket,
    and silently drops every line when neither works; this makes the same attempts.
    """
    problem = ""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(path)
            except FileNotFoundError:
                return f"no {path}"
            except OSError as exc:
                problem = f"{path}: {(exc.strerror or str(exc)).lower()}"
            else:
                return None
    return problem
