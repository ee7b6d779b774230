"""Logs that never vanish: with ``$syslog_facility`` set but no /dev/log (a container, a
minimal host), tpops says so once at start-up and writes the syslog lines to
``$error_log`` (or stderr) instead of dropping them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, idle_workers, wait_for, worker_titles
from tests.support.server import (
    POOL_ARGS,
    TPOPS,
    MailEnv,
    Server,
    free_port,
    wait_for_port,
)
from tests.support.syslog import with_dev_log
from tpops import logs

needs_root = root_only("a private /dev without /dev/log (unshare --mount)")


class NoSyslogServer(Server):
    """``tpops --fg`` where /dev/log does not exist."""

    def __init__(self, env: MailEnv, *extra_args: str) -> None:
        super().__init__(env, *extra_args)
        self.args = with_dev_log(env.base, None, self.args)


def fail_a_login(port: int, user: str = "mallory") -> None:
    c = RawClient(port)
    assert c.cmd(f"USER {user}").startswith(b"+OK")
    assert c.cmd("PASS guess").startswith(b"-ERR [AUTH]")
    c.cmd("QUIT")
    c.close()


@needs_root
def test_syslog_lines_reach_the_error_log_when_there_is_no_dev_log(mail_env: MailEnv) -> None:
    mail_env.write_conf(syslog_facility="Syslog::LOG_MAIL")
    srv = NoSyslogServer(mail_env, *POOL_ARGS).start()
    notice = f"syslog is unreachable (no /dev/log): its lines go to $error_log {mail_env.error_log} instead"
    try:
        fail_a_login(srv.port)
        wait_for(lambda: "authentication failed: mallory from 127.0.0.1" in mail_env.error_log.read_text(),
                 what="the failed login in $error_log")
        # A good reload (logs reopened) does not repeat the notice; a rejected one is logged.
        old = set(worker_titles(srv.proc.pid))
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(gone(p) for p in old) and idle_workers(srv.proc.pid), what="fresh workers")
        good = mail_env.conf.read_text()
        mail_env.conf.write_text(good + "$max_servers = 'many'\n")
        srv.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "configuration not reloaded" in mail_env.error_log.read_text(),
                 what="the rejected reload in $error_log")
        fail_a_login(srv.port, "trudy")
        wait_for(lambda: "authentication failed: trudy from 127.0.0.1" in mail_env.error_log.read_text(),
                 what="a failed login after the reloads")
    finally:
        srv.stop()
    text = mail_env.error_log.read_text()
    assert text.count(notice) == 1, text
    assert "INFO connect from 127.0.0.1" in text  # info lines too, as syslog would have had them
    assert "ERROR SIGUSR1: configuration not reloaded, keeping the running one and its workers: " in text
    assert "SIGHUP: configuration reloaded, replacing workers" in text


@needs_root
def test_the_daemon_says_so_on_stderr_before_detaching(mail_env: MailEnv) -> None:
    mail_env.write_conf(syslog_facility="Syslog::LOG_MAIL")
    port = free_port()
    pid_file = mail_env.base / "tpops.pid"
    argv = [TPOPS, "-f", str(mail_env.conf), "--port", str(port), "--bind", "127.0.0.1",
            "--pidfile", str(pid_file), *POOL_ARGS]
    out = subprocess.run(with_dev_log(mail_env.base, None, argv), capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, check=False)
    pid = 0
    try:
        assert out.returncode == 0, out.stderr
        assert out.stderr == (f"tpops: warning: syslog is unreachable (no /dev/log): its lines go to "
                              f"$error_log {mail_env.error_log} instead\n")
        pid = wait_for(lambda: int(pid_file.read_text()) if pid_file.exists() else None, what="the pid file")
        wait_for_port(port)
        fail_a_login(port)
        wait_for(lambda: "authentication failed: mallory from 127.0.0.1" in mail_env.error_log.read_text(),
                 what="the failed login in $error_log")
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: gone(pid), what="the daemon stopped")
    assert mail_env.error_log.read_text().count("syslog is unreachable (no /dev/log)") == 1


def test_without_error_log_the_foreground_notice_names_stderr(tmp_path: Path) -> None:
    """The routing itself, in-process: where the lines go, and what the notice says."""
    missing = str(tmp_path / "no-such-log-socket")
    error_log = str(tmp_path / "error.log")
    try:
        with_file = logs.setup(facility=2 << 3, error_log=error_log, access_log=None, debug=False,
                               to_stderr=False, dev_log=missing)
        assert with_file.syslog is None
        assert with_file.syslog_notice() == (f"syslog is unreachable (no {missing}): its lines go to "
                                             f"$error_log {error_log} instead")
        logs.get("test").info("an info line syslog would have had")
        logs.get("test").debug("no debug without --debug")
        text = Path(error_log).read_text()
        assert "INFO an info line syslog would have had" in text and "debug" not in text
        with_file.close()
        to_stderr = logs.setup(facility=2 << 3, error_log=None, access_log=None, debug=False, to_stderr=True,
                               dev_log=missing)
        assert to_stderr.syslog_notice() == f"syslog is unreachable (no {missing}): its lines go to stderr instead"
        lost = logs.setup(facility=2 << 3, error_log=None, access_log=None, debug=False, to_stderr=False,
                          dev_log=missing)
        assert lost.syslog_notice() == (f"syslog is unreachable (no {missing}): its lines are lost: set "
                                        "$error_log, or run a syslog daemon, or run tpops --fg under systemd")
        # Not a socket at all: the reason is given as the system puts it.
        Path(missing).write_text("")
        refused = logs.setup(facility=2 << 3, error_log=None, access_log=None, debug=False, to_stderr=False,
                             dev_log=missing)
        assert refused.syslog_notice() is not None
        assert refused.syslog_notice().startswith(f"syslog is unreachable ({missing}: connection refused)")
        assert logs.setup(facility=None, error_log=None, access_log=None, debug=False, to_stderr=False,
                          dev_log=missing).syslog_notice() is None
        # stderr is the journal: syslog is not used besides (under systemd /dev/log is the same
        # journal, every line would be there twice), so there is nothing missing to report.
        journal = logs.setup(facility=2 << 3, error_log=None, access_log=None, debug=False, to_stderr=True,
                             journal=True, dev_log=missing)
        assert journal.syslog is None and journal.syslog_notice() is None
    finally:
        root = logging.getLogger("tpops")
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()


def test_no_notice_and_no_rerouting_with_syslog_off(mail_env: MailEnv) -> None:
    """``$syslog_facility = nil`` means no syslog wanted: nothing to say, nothing rerouted."""
    srv = Server(mail_env).start()
    try:
        fail_a_login(srv.port)
        wait_for(lambda: "authentication failed" in mail_env.error_log.read_text(), what="the warning")
    finally:
        srv.stop()
    assert "syslog is unreachable" not in srv.output() + mail_env.error_log.read_text()
    assert "connect from" not in mail_env.error_log.read_text()  # warnings and errors only, as before
