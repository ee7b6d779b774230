"""Syslog, the access log and the error log as an admin (and fail2ban) reads them: exact
lines, secrets never written, client control characters escaped, reopened on signals."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, idle_workers, proc_title, wait_for, worker_titles
from tests.support.server import POOL_ARGS, MailEnv, Server, make_message
from tests.support.syslog import SyslogServer
from tpops import logs

needs_root = root_only("a private /dev/log (unshare --mount)")

#: glibc's syslog(3) datagram: <PRI>Mmm dd hh:mm:ss tpops[PID]: message
SYSLOG_LINE = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d tpops\[(\d+)\]: (.*)", re.DOTALL)
MAIL_INFO = (2 << 3) | 6  # LOG_MAIL | LOG_INFO
MAIL_WARNING = (2 << 3) | 4
#: The access log's format: IP START END LOGIN s_msgs s_octets e_msgs e_octets
STAMP = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"
ACCESS_LINE = re.compile(rf"127\.0\.0\.1 ({STAMP}) ({STAMP}) (\S+) (\d+) (\d+) (\d+) (\d+)")


def syslog_records(srv: SyslogServer) -> list[tuple[int, int, str]]:
    """(priority, pid, message) of every datagram, each checked against the syslog format."""
    out = []
    for datagram in srv.syslog.lines():
        match = SYSLOG_LINE.fullmatch(datagram)
        assert match, datagram
        out.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return out


def syslog_server(env: MailEnv, *args: str) -> SyslogServer:
    env.write_conf(syslog_facility="Syslog::LOG_MAIL")
    return SyslogServer(env, *args).start()  # type: ignore[return-value]


@needs_root
def test_syslog_lines(mail_env: MailEnv) -> None:
    mail_env.add_user("alice", messages=[make_message("one"), make_message("two")])
    srv = syslog_server(mail_env, *POOL_ARGS)
    try:
        c = RawClient(srv.port)
        assert c.cmd("USER mallory").startswith(b"+OK")
        assert c.cmd("PASS guess").startswith(b"-ERR [AUTH]")
        c.cmd("QUIT")
        c.close()
        c = RawClient(srv.port)
        assert c.login("alice").startswith(b"+OK Logged in, 2 messages")
        size = int(c.cmd("LIST 1").split()[2])
        other = RawClient(srv.port)
        assert other.login("alice").startswith(b"-ERR [IN-USE]")
        other.cmd("QUIT")
        other.close()
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        srv.syslog.wait_for("logout: alice")
        # After SIGHUP (syslog reopened by the master), new workers still reach syslog.
        old = set(worker_titles(srv.proc.pid))
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(gone(p) for p in old) and idle_workers(srv.proc.pid), what="fresh workers")
        c = RawClient(srv.port)
        c.cmd("QUIT")
        c.close()
        wait_for(lambda: sum("disconnect from 127.0.0.1 (quit)" in m for m in srv.syslog.lines()) >= 4,
                 what="the post-reload session in syslog")
    finally:
        srv.stop()
    records = syslog_records(srv)
    messages = [(pri, msg) for pri, _, msg in records]
    expected = [
        (MAIL_INFO, "connect from 127.0.0.1"),
        (MAIL_WARNING, "authentication failed: mallory from 127.0.0.1"),  # fail2ban: ^authentication failed: \S+ from <HOST>$
        (MAIL_INFO, f"login: alice has 2 messages ({2 * size} octets) from 127.0.0.1 (plain)"),
        (MAIL_WARNING, "cannot lock for alice from 127.0.0.1: mailbox in use"),
        (MAIL_INFO, f"logout: alice deleted 1 messages ({size} octets), 1 messages ({size} octets) left"),
        (MAIL_INFO, "disconnect from 127.0.0.1 (quit)"),
        (MAIL_INFO, "SIGHUP: configuration reloaded, replacing workers"),
    ]
    for item in expected:
        assert item in messages, item
    master = srv.proc.pid
    assert (MAIL_INFO, master, f"tpops master {master} stopped") in records
    assert any(pid != master for _, pid, msg in records if msg.startswith("login: alice"))


@needs_root
def test_debug_trace_masks_every_secret(mail_env: MailEnv) -> None:
    password, wrong = "S3cret-Passw0rd", "Wr0ng-Guess-77"
    mail_env.add_user("dave", password=password, messages=[make_message()])
    srv = syslog_server(mail_env, "--debug", *POOL_ARGS)
    titles: list[str] = []
    try:
        c = RawClient(srv.port)
        assert c.cmd("USER dave").startswith(b"+OK")
        assert c.cmd(f"PASS {wrong}").startswith(b"-ERR [AUTH]")
        assert c.cmd("USER dave").startswith(b"+OK")
        assert c.cmd(f"pass {password}").startswith(b"+OK Logged in")
        titles += [proc_title(p) or "" for p in worker_titles(srv.proc.pid)]
        c.cmd("QUIT")
        c.close()
        c = RawClient(srv.port)
        stamp = c.greeting.split()[-1].decode()
        digest = hashlib.md5((stamp + password).encode()).hexdigest()
        assert c.cmd(f"APOP dave {digest}").startswith(b"+OK Logged in")
        titles += [proc_title(p) or "" for p in worker_titles(srv.proc.pid)]
        c.cmd("QUIT")
        c.close()
        srv.syslog.wait_for("C: APOP dave ****")
        srv.syslog.wait_for("logout: dave")
    finally:
        srv.stop()
    syslog_text = "\n".join(srv.syslog.lines())
    for line in ("C: USER dave", "C: PASS ****", "C: APOP dave ****", "S: +OK Logged in, 1 messages"):
        assert line in syslog_text, line
    everything = {
        "syslog": syslog_text,
        "stderr": srv.output(),
        "error log": mail_env.error_log.read_text(),
        "access log": mail_env.access_log.read_text(),
        "titles": "\n".join(titles),
    }
    assert "tpops: worker dave@127.0.0.1" in everything["titles"]
    for where, text in everything.items():
        for secret in (password, wrong, digest):
            assert secret not in text, f"a secret in the {where}"


#: A login carrying CR, NUL, ESC, DEL and other control characters (LF would end the line).
NASTY_LOGIN = b"evil\rINFO forged\x00\x1b[2J\x7f\x01\x08"
NASTY_ESCAPED = r"evil\x0dINFO forged\x00\x1b[2J\x7f\x01\x08"


def _assert_one_line_each(text: str, where: str) -> None:
    for line in text.split("\n"):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line), f"raw control character in the {where}: {line!r}"


def _nasty_session(port: int) -> None:
    c = RawClient(port)
    assert c.cmd(b"USER " + NASTY_LOGIN).startswith(b"+OK")
    assert c.cmd("PASS whatever").startswith(b"-ERR [AUTH]")
    assert c.cmd(b"NO\rOP\x1b[2J").startswith(b"-ERR")
    c.cmd("QUIT")
    c.close()


def test_client_control_characters_are_escaped_in_files(mail_env: MailEnv) -> None:
    srv = Server(mail_env, "--debug").start()
    try:
        _nasty_session(srv.port)
    finally:
        srv.stop()
    access = mail_env.access_log.read_text()
    assert " ({}) 0 0 0 0\n".format(NASTY_ESCAPED.replace(" ", r"\x20")) in access  # LOGIN is one field
    error_log = mail_env.error_log.read_text()
    assert f"authentication failed: {NASTY_ESCAPED} from 127.0.0.1" in error_log
    assert r"C: NO\x0dOP\x1b[2J" in srv.output()
    for where, text in (("access log", access), ("error log", error_log), ("stderr", srv.output())):
        _assert_one_line_each(text, where)


@needs_root
def test_client_control_characters_are_escaped_in_syslog(mail_env: MailEnv) -> None:
    srv = syslog_server(mail_env, "--debug")
    try:
        _nasty_session(srv.port)
        srv.syslog.wait_for("disconnect from 127.0.0.1")
    finally:
        srv.stop()
    messages = [msg for _, _, msg in syslog_records(srv)]
    assert f"authentication failed: {NASTY_ESCAPED} from 127.0.0.1" in messages
    assert r"C: NO\x0dOP\x1b[2J" in messages
    for message in messages:
        _assert_one_line_each(message, "syslog")


#: A login that is one line to a byte-oriented reader but several to a Unicode-aware one
#: (Python's str.splitlines, journald viewers, editors): NEL, LS, PS and a C1 CSI.
UNICODE_BREAKS_LOGIN = "eve\u0085INFO forged\u2028two\u2029three\u009b2J"
UNICODE_BREAKS_ESCAPED = r"eve\u0085INFO forged\u2028two\u2029three\u009b2J"


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a\u0085b", r"a\u0085b"),                      # NEL
    ("a\u2028b\u2029c", r"a\u2028b\u2029c"),        # line and paragraph separators
    ("\x80\x9b\x9f", r"\u0080\u009b\u009f"),        # C1 controls, CSI among them
    ("\x1c\x1d\x1e\x7f", r"\x1c\x1d\x1e\x7f"),        # what str.splitlines also splits on
    ("caf\u00e9 \u65e5\u672c \u00a0\u00ad", "caf\u00e9 \u65e5\u672c \u00a0\u00ad"),  # printable text stays
    ("back\\slash", r"back\\slash"),
])
def test_escape_covers_unicode_line_breaks(raw: str, escaped: str) -> None:
    assert logs.escape(raw) == escaped
    assert logs.escape(raw.encode()) == escaped


def test_escape_keeps_undecodable_bytes_apart_from_c1_characters() -> None:
    assert logs.escape(b"\x85|\xc2\x85") == r"\x85|\u0085"


def test_nothing_python_splits_a_line_on_survives_escape() -> None:
    breakers = [chr(c) for c in range(0x110000)
                if not 0xD800 <= c <= 0xDFFF and len(f"a{chr(c)}b".splitlines()) > 1]
    assert "\u0085" in breakers and "\u2028" in breakers
    for ch in breakers:
        assert len(logs.escape(f"a{ch}b").splitlines()) == 1, hex(ord(ch))
        assert len(logs.one_line(f"a{ch}b").splitlines()) == 1, hex(ord(ch))


def test_the_fast_path_of_escape_skips_only_text_the_patterns_leave_alone() -> None:
    # escape() and one_line() return printable text unchanged without running their
    # patterns: that is right only if no printable character is one the patterns escape.
    printable = "".join(ch for ch in map(chr, range(0x110000)) if ch.isprintable())
    assert logs._UNSAFE.findall(printable) == ["\\"]  # the backslash, which escape() checks for
    assert logs._CONTROL.search(printable) is None
    for text in ("caf\u00e9 \u00a0 plain", "a\\b", "a\x85b", "a\u2028b", "\udc85", "a\u200bb"):
        assert logs.escape(text) == logs._UNSAFE.sub(logs._escape_char, text)
        assert logs.one_line(text) == logs._CONTROL.sub(logs._escape_char, text)


def _records() -> list[logging.LogRecord]:
    """Records of every shape a tpops line takes: arguments, a forged line break, a traceback, a stack."""
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    out = [
        logging.LogRecord("tpops.session", logging.INFO, "(unknown file)", 0,
                          "login: %s has %d messages (%d octets) from %s", ("l000", 5, 10663, "127.0.0.1"), None),
        logging.LogRecord("tpops.session", logging.WARNING, "(unknown file)", 0, "forged\r\nline %s", ("\x85",), None),
        logging.LogRecord("tpops.worker", logging.ERROR, "(unknown file)", 0, "internal error", None, exc_info),
        logging.LogRecord("tpops.worker", logging.ERROR, "(unknown file)", 0, "with stack", None, None,
                          sinfo="Stack (most recent call last):\n  File x"),
        logging.LogRecord("tpops.cli", logging.DEBUG, "(unknown file)", 0, "", None, None),
    ]
    out[0].created, out[0].msecs = 1764583443.9996, 999.6  # msecs are truncated, never rounded up
    return out


def test_line_formatter_writes_what_the_logging_formatter_writes() -> None:
    fast = logs._LineFormatter()
    for record in _records():
        reference = logging.makeLogRecord(record.__dict__)
        reference.process = os.getpid()
        expected = logs._OneLineFormatter(logs._LINE_FORMAT).format(reference)
        assert fast.format(record) == expected
        assert fast.format(record) == expected  # the cached date and time part, and a cached traceback
    assert "\nTraceback (most recent call last):\n" in fast.format(_records()[2])
    assert fast.format(_records()[1]).endswith(" WARNING forged\\x0d\\x0aline \\u0085")
    assert ",999 tpops[" in fast.format(_records()[0])


def test_unicode_line_breaks_from_a_client_are_escaped_in_files(mail_env: MailEnv) -> None:
    srv = Server(mail_env, "--debug").start()
    try:
        c = RawClient(srv.port)
        assert c.cmd(b"USER " + UNICODE_BREAKS_LOGIN.encode()).startswith(b"+OK")
        assert c.cmd("PASS whatever").startswith(b"-ERR [AUTH]")
        c.cmd("QUIT")
        c.close()
    finally:
        srv.stop()
    error_log = mail_env.error_log.read_text()
    assert f"authentication failed: {UNICODE_BREAKS_ESCAPED} from 127.0.0.1\n" in error_log
    assert f"C: USER {UNICODE_BREAKS_ESCAPED}" in srv.output()
    for where, text in (("access log", mail_env.access_log.read_text()), ("error log", error_log),
                        ("stderr", srv.output())):
        assert text.splitlines() == text.split("\n")[:-1], f"a Unicode line break in the {where}"


@pytest.mark.timeout(60)
def test_access_log_lines_exact_with_many_workers_appending(mail_env: MailEnv) -> None:
    users = [f"acc{i}" for i in range(24)]
    for user in users:
        mail_env.add_user(user, messages=[make_message(), make_message()])
    srv = Server(mail_env, *POOL_ARGS).start()
    size = 0
    try:
        c = RawClient(srv.port)
        assert c.login(users[0]).startswith(b"+OK")
        size = int(c.cmd("LIST 1").split()[2])
        c.cmd("QUIT")
        c.close()
        began = time.time()
        errors: list[BaseException] = []

        def sessions(user: str) -> None:
            try:
                for _ in range(2):
                    c = RawClient(srv.port)  # never logs in
                    c.cmd("QUIT")
                    c.close()
                    c = RawClient(srv.port)  # fails
                    c.cmd(f"USER {user}")
                    assert c.cmd("PASS nope").startswith(b"-ERR")
                    c.cmd("QUIT")
                    c.close()
                c = RawClient(srv.port)
                assert c.login(user).startswith(b"+OK")
                assert c.cmd("DELE 1").startswith(b"+OK")
                assert c.cmd("QUIT").startswith(b"+OK Bye")
                c.close()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=sessions, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        ended = time.time()
    finally:
        srv.stop()
    lines = mail_env.access_log.read_text().split("\n")
    assert lines.pop() == ""  # the file ends with a newline
    fields = []
    for line in lines:
        match = ACCESS_LINE.fullmatch(line)
        assert match, f"not an access-log line (interleaved?): {line!r}"
        fields.append(match.groups())
    lines_for = {(f[2], f[3], f[4], f[5], f[6]) for f in fields}
    counts: dict[str, int] = {}
    for f in fields:
        counts[f[2]] = counts.get(f[2], 0) + 1
        assert f[0] <= f[1]  # START <= END (same format, sorts as text)
    assert counts["()"] == 2 * len(users) + 1  # + the readiness probe
    for user in users:
        assert counts[f"({user})"] == 2
        assert (user, "2", str(2 * size), "1", str(size)) in lines_for
        assert counts[user] == (2 if user == users[0] else 1)
    stamps = [time.mktime(time.strptime(f[1], "%Y/%m/%d %H:%M:%S")) for f in fields[-10:]]
    assert all(began - 2 <= s <= ended + 2 for s in stamps)  # local time, as the seed wrote it


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=lambda s: s.name)
def test_logs_are_reopened_after_rename(mail_env: MailEnv, signum: int) -> None:
    mail_env.add_user("rolf", messages=[make_message()])
    srv = Server(mail_env, *POOL_ARGS).start()
    master = srv.proc.pid
    rotated_access = mail_env.base / "access.log.1"
    rotated_error = mail_env.base / "error.log.1"
    try:
        old = wait_for(lambda: idle_workers(master), what="idle workers")
        mail_env.access_log.rename(rotated_access)
        mail_env.error_log.rename(rotated_error)
        srv.proc.send_signal(signum)
        wait_for(lambda: all(gone(p) for p in old) and len(idle_workers(master)) >= 2, what="fresh workers")
        assert mail_env.access_log.exists() and mail_env.error_log.exists()
        c = RawClient(srv.port)
        c.cmd("USER rolf")
        assert c.cmd("PASS wrong").startswith(b"-ERR")
        assert c.login("rolf").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()
    assert " rolf 1 " in mail_env.access_log.read_text()
    assert " rolf " not in rotated_access.read_text()
    assert "authentication failed: rolf from 127.0.0.1" in mail_env.error_log.read_text()
    assert "authentication failed" not in rotated_error.read_text()


# ---------------------------------------------------------------- failing log writes

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_failures_are_counted_and_reported_once_per_interval() -> None:
    clock = FakeClock()
    failures = logs.LogFailures(interval=60, clock=clock)
    reports: list[str] = []

    def broken_sink(message: str) -> None:
        raise OSError("this sink is full too")

    failures.sinks = [broken_sink, reports.append]
    enospc = OSError(28, "No space left on device")
    failures.failed("/var/log/tpops/error.log", enospc)  # the first one: reported at once
    assert reports == [("1 log write failed (last: /var/log/tpops/error.log: [Errno 28] No space left "
                       "on device); further failures are counted and reported at most every 60 s")]
    for step in range(5):
        clock.now += 10
        failures.failed("/var/log/tpops/access.log", enospc)
        failures.tick()
    assert len(reports) == 1 and failures.count == 5
    clock.now += 10.5  # 60.5 s after the first report
    failures.tick()
    assert reports[1].startswith("5 log writes failed (last: /var/log/tpops/access.log: [Errno 28] ")
    clock.now += 3600
    failures.tick()  # nothing new: nothing to say
    assert len(reports) == 2 and failures.total == 6


def test_counts_survive_a_log_reopen() -> None:
    clock = FakeClock()
    old = logs.LogFailures(clock=clock)
    old.failed("/x", None)
    old.failed("/x", None)
    new = logs.LogFailures(clock=clock)
    new.adopt(old)
    reports: list[str] = []
    new.sinks = [reports.append]
    new.failed("/x", None)
    assert reports == [] and new.count == 2  # still within the minute of old's report
    clock.now += 60
    new.tick()
    assert reports[0].startswith("2 log writes failed (last: /x: write failed)")


LOG_FAILED = re.compile(r".* tpops\[(\d+)\]: ERROR (\d+) log writes? failed \(last: (.*?)\); further failures "
                        r"are counted and reported at most every 60 s")


def test_a_full_log_file_system_costs_no_session_and_prints_no_traceback(mail_env: MailEnv) -> None:
    # /dev/full fails every write with ENOSPC, exactly like a full file system.
    mail_env.add_user("fay", messages=[make_message()])
    mail_env.write_conf(error_log="'/dev/full'", access_log="'/dev/full'", min_servers="1", max_servers="1")
    srv = Server(mail_env).start()
    try:
        for _ in range(5):
            c = RawClient(srv.port)
            assert c.cmd("USER fay").startswith(b"+OK")
            assert c.cmd("PASS wrong").startswith(b"-ERR [AUTH]")  # a warning: the error log
            assert c.login("fay").startswith(b"+OK Logged in, 1 messages")
            assert c.cmd("QUIT").startswith(b"+OK Bye")  # a line in the access log
            c.close()
    finally:
        srv.stop()
    out = srv.output()
    assert "Traceback" not in out and "Logging error" not in out, out
    reports = [LOG_FAILED.fullmatch(line) for line in out.splitlines() if "log write" in line]
    assert reports and all(reports), out
    by_pid: dict[str, list[re.Match[str]]] = {}
    for match in reports:
        assert match is not None
        by_pid.setdefault(match.group(1), []).append(match)
        assert match.group(3) == "/dev/full: [Errno 28] No space left on device"
    # At least 10 failed writes (5 warnings, 5 access-log lines) in well under a minute:
    # one report per process, no more.
    assert all(len(matches) == 1 for matches in by_pid.values()), out
    assert "authentication failed: fay from 127.0.0.1" in out  # stderr still carries the log
    assert "logout: fay" in out


@needs_root
def test_failed_log_writes_are_reported_to_syslog(mail_env: MailEnv) -> None:
    mail_env.add_user("gil", messages=[make_message()])
    mail_env.write_conf(error_log="'/dev/full'", access_log="'/dev/full'")
    srv = syslog_server(mail_env, *POOL_ARGS)
    try:
        c = RawClient(srv.port)
        assert c.login("gil").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        srv.syslog.wait_for("log write failed")
    finally:
        srv.stop()
    assert "Traceback" not in srv.output() and "Logging error" not in srv.output()
    failed = [(pri, msg) for pri, _, msg in syslog_records(srv) if "log write" in msg]
    assert failed[0] == ((2 << 3) | 3,  # LOG_MAIL | LOG_ERR
                         ("1 log write failed (last: /dev/full: [Errno 28] No space left on device); "
                         "further failures are counted and reported at most every 60 s"))
