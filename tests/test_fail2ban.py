"""contrib/fail2ban: the filter, run by fail2ban-regex over lines tpops itself wrote, in the
three places they end up (syslog's mail.log, $error_log, the journal), matches the failed
logins with the address tpops appended, and nothing else."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import IN_CI, root_only
from tests.support.procs import wait_for
from tests.support.server import REPO, MailEnv, Server, make_message
from tests.support.syslog import SyslogServer, with_dev_log

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
needs_fail2ban = pytest.mark.skipif(FAIL2BAN_REGEX is None and not IN_CI,
                                    reason="fail2ban-regex (Debian package fail2ban) is not installed")
FILTER = REPO / "contrib" / "fail2ban" / "filter.d" / "tpops.conf"
JAIL = REPO / "contrib" / "fail2ban" / "jail.d" / "tpops.local"
HOST = socket.gethostname().split(".")[0] or "host"

#: What each run provokes: three failed logins (one whose login carries " from 1.2.3.4",
#: one whose login is itself a forged failure line, seen in the --debug trace too), a
#: successful login, and lines that mention addresses (connect, disconnect).
FAILURES = ["bob", "x from 1.2.3.4", "authentication failed: y from 1.2.3.5"]
EXPECTED = [f"{user}|127.0.0.1" for user in FAILURES]


def provoke(port: int) -> None:
    for user in FAILURES:
        c = RawClient(port)
        assert c.cmd(f"USER {user}").startswith(b"+OK")
        assert c.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
        c.cmd("QUIT")
        c.close()
    c = RawClient(port)
    assert c.login("alice").startswith(b"+OK")
    c.cmd("QUIT")
    c.close()


def matches(log: Path) -> list[str]:
    """``LOGIN|IP`` for every line the filter matches, in order."""
    assert FAIL2BAN_REGEX is not None
    out = subprocess.run([FAIL2BAN_REGEX, "-o", "<F-USER>|<ip>", str(log), str(FILTER)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


def env_with_alice(env: MailEnv, **conf: str) -> None:
    env.add_user("alice", messages=[make_message("one")])
    env.write_conf(**conf)


@needs_fail2ban
@root_only("a private /dev/log (unshare --mount)")
def test_syslog_format(mail_env: MailEnv, tmp_path: Path) -> None:
    """/var/log/mail.log as rsyslog writes it: tpops's datagrams with the host name added."""
    env_with_alice(mail_env, syslog_facility="Syslog::LOG_MAIL")
    srv = SyslogServer(mail_env, "--debug").start()
    try:
        provoke(srv.port)
        srv.syslog.wait_for("logout: alice")
    finally:
        srv.stop()
    lines = []
    for datagram in srv.syslog.lines():
        match = re.fullmatch(r"<\d+>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (tpops\[\d+\]: .*)", datagram, re.DOTALL)
        assert match, datagram
        lines.append(f"{match.group(1)} {HOST} {match.group(2)}")
    assert any(": C: USER authentication failed: y from 1.2.3.5" in line for line in lines)  # the trace
    log = tmp_path / "mail.log"
    log.write_text("\n".join(lines) + "\n")
    assert matches(log) == EXPECTED


@needs_fail2ban
@root_only("a private /dev without /dev/log (unshare --mount)")
def test_error_log_format(mail_env: MailEnv) -> None:
    """$error_log, every level in it: syslog unreachable, so its lines (the --debug trace too) land there."""
    env_with_alice(mail_env, syslog_facility="Syslog::LOG_MAIL")
    srv = Server(mail_env, "--debug")
    srv.args = with_dev_log(mail_env.base, None, srv.args)
    srv.start()
    try:
        provoke(srv.port)
        wait_for(lambda: "logout: alice" in mail_env.error_log.read_text(), what="alice's logout")
    finally:
        srv.stop()
    text = mail_env.error_log.read_text()
    assert "DEBUG C: USER authentication failed: y from 1.2.3.5" in text
    assert "INFO connect from 127.0.0.1" in text
    assert matches(mail_env.error_log) == EXPECTED


@needs_fail2ban
def test_journal_format(mail_env: MailEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal, as fail2ban's systemd backend and ``journalctl -o short`` show it:
    tpops's ``<N>`` stderr lines under the master's pid, with the time and host."""
    env_with_alice(mail_env)
    srv = Server(mail_env, "--debug")
    srv.stderr_path.touch()
    st = srv.stderr_path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    srv.start()
    try:
        provoke(srv.port)
        wait_for(lambda: "logout: alice" in srv.output(), what="alice's logout")
    finally:
        srv.stop()
    assert srv.proc is not None
    stamp = time.strftime("%b %d %H:%M:%S")
    lines = []
    for line in srv.output().splitlines():
        match = re.fullmatch(r"<[0-7]>(.*)", line)
        assert match, line
        lines.append(f"{stamp} {HOST} tpops[{srv.proc.pid}]: {match.group(1)}")
    assert any(": C: USER authentication failed: y from 1.2.3.5" in line for line in lines)
    log = tmp_path / "journal.txt"
    log.write_text("\n".join(lines) + "\n")
    assert matches(log) == EXPECTED


@needs_fail2ban
def test_the_filter_takes_the_last_from_and_nothing_else(tmp_path: Path) -> None:
    """Edge cases written by hand: IPv6, a login ending in an address, look-alike lines."""
    log = tmp_path / "mail.log"
    log.write_text(
        "Dec  1 10:00:00 mx tpops[10]: authentication failed: bob from 2001:db8::7\n"
        "Dec  1 10:00:01 mx tpops[10]: authentication failed: bob from 198.51.100.1 from 192.0.2.9\n"
        "Dec  1 10:00:02 mx tpops[10]: authentication failed:  from 192.0.2.10\n"
        "Dec  1 10:00:03 mx tpops[10]: connect from 192.0.2.11\n"
        "Dec  1 10:00:04 mx tpops[10]: disconnect from 192.0.2.12 (authentication failed: x from 1.2.3.4)\n"
        "Dec  1 10:00:05 mx tpops[10]: C: USER authentication failed: x from 1.2.3.4\n"
        "Dec  1 10:00:06 mx otherd[11]: authentication failed: bob from 192.0.2.13\n"
        "Dec  1 10:00:07 mx tpops[10]: login: bob has 1 messages (10 octets) from 192.0.2.14\n"
        "2025-12-01 10:00:08,123 tpops[10]: WARNING authentication failed: eve from 192.0.2.15\n"
        "2025-12-01 10:00:09,123 tpops[10]: ERROR authentication failed: eve from 192.0.2.16\n"
    )
    assert matches(log) == ["bob|2001:db8::7", "bob from 198.51.100.1|192.0.2.9", "|192.0.2.10", "eve|192.0.2.15"]


def test_the_jail() -> None:
    text = JAIL.read_text()
    settings = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
                for line in text.splitlines() if "=" in line and not line.startswith("#")}
    assert "[tpops]" in text
    assert settings["filter"] == "tpops" and settings["enabled"] == "true"
    assert settings["port"] == "pop3,pop3s" and settings["backend"] == "systemd"
    assert "_SYSTEMD_UNIT=tpops.service" in FILTER.read_text()
