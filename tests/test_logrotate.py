"""contrib/logrotate/tpops: parsed by logrotate, and a real rotation against a running tpops
moves new lines to the new files while a session in flight goes on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import IN_CI
from tests.support.procs import gone, idle_workers, wait_for
from tests.support.server import POOL_ARGS, REPO, MailEnv, Server, make_message

LOGROTATE = shutil.which("logrotate") or next(
    (p for p in ("/usr/sbin/logrotate", "/sbin/logrotate") if Path(p).exists()), None)
needs_logrotate = pytest.mark.skipif(LOGROTATE is None and not IN_CI,
                                     reason="logrotate (Debian package logrotate) is not installed")
SNIPPET = REPO / "contrib" / "logrotate" / "tpops"


def run_logrotate(*args: str) -> subprocess.CompletedProcess[str]:
    assert LOGROTATE is not None
    return subprocess.run([LOGROTATE, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_logrotate
def test_the_snippet_parses(tmp_path: Path) -> None:
    out = run_logrotate("--debug", "-s", str(tmp_path / "state"), str(SNIPPET))
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stderr.lower(), out.stderr
    assert "rotating pattern: /var/log/tpops/*.log /var/log/tpops.log /var/log/tpops.err" in out.stderr


@needs_logrotate
def test_rotation_reopens_the_logs_and_spares_a_session_in_flight(mail_env: MailEnv) -> None:
    logs = mail_env.base / "log"
    logs.mkdir()
    access, error = logs / "access.log", logs / "error.log"
    pid_file = mail_env.base / "tpops.pid"
    mail_env.write_conf(access_log=repr(str(access)), error_log=repr(str(error)))
    mail_env.add_user("alice", messages=[make_message("one"), make_message("two")])
    mail_env.add_user("bob", messages=[make_message("three")])
    # The snippet with this test's paths: the log glob and the pid file.
    text = SNIPPET.read_text()
    text = text.replace("/var/log/tpops/*.log /var/log/tpops.log /var/log/tpops.err", f"{logs}/*.log")
    text = text.replace("/run/tpops/tpops.pid /run/tpops.pid", str(pid_file))
    assert f"{logs}/*.log {{" in text and str(pid_file) in text
    conf = mail_env.base / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)  # logrotate ignores a file others can write
    srv = Server(mail_env, "--pidfile", str(pid_file), *POOL_ARGS).start()
    try:
        bad = RawClient(srv.port)
        bad.cmd("USER mallory")
        assert bad.cmd("PASS guess").startswith(b"-ERR [AUTH]")
        bad.close()
        wait_for(lambda: "authentication failed: mallory" in error.read_text(), what="a line in error.log")
        in_flight = RawClient(srv.port)
        assert in_flight.login("alice").startswith(b"+OK Logged in, 2 messages")
        assert srv.proc is not None
        idle_before = idle_workers(srv.proc.pid)
        out = run_logrotate("-f", "-s", str(mail_env.base / "logrotate.state"), str(conf))
        assert out.returncode == 0, out.stderr
        # Renamed (not compressed yet: delaycompress), and tpops reopened the names.
        wait_for(lambda: access.exists() and error.exists(), what="tpops reopening the logs")
        assert (logs / "error.log.1").exists()
        # The idle workers of before (they hold the old files) end; fresh ones replace them.
        wait_for(lambda: all(gone(pid) for pid in idle_before), what="the old idle workers to end")
        # New sessions log into the new files ...
        c = RawClient(srv.port)
        c.cmd("USER trudy")
        assert c.cmd("PASS guess").startswith(b"-ERR [AUTH]")
        c.close()
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
        wait_for(lambda: " bob " in access.read_text(), what="bob's session in the new access.log")
        # ... while the session in flight was not cut: it goes on and ends normally.
        assert in_flight.cmd("STAT").startswith(b"+OK 2 ")
        assert in_flight.cmd("DELE 1").startswith(b"+OK")
        assert in_flight.cmd("QUIT").startswith(b"+OK")
        in_flight.close()
        wait_for(lambda: " alice " in (logs / "access.log.1").read_text(), what="alice's line in access.log.1")
    finally:
        srv.stop()
    assert "authentication failed: trudy from 127.0.0.1" in error.read_text()
    assert "authentication failed: mallory" not in error.read_text()
    assert "authentication failed: mallory from 127.0.0.1" in (logs / "error.log.1").read_text()
    # The session that began before the rotation is logged whole, where its worker wrote.
    assert " alice 2 " in (logs / "access.log.1").read_text() and " alice " not in access.read_text()
    assert len(mail_env.messages("alice")) == 1  # its DELE was committed at QUIT
