"""Daemon mode (no --fg): detaching, the pid file, and start-up errors reported before detaching."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, proc_children, proc_title, wait_for, zombie_children
from tests.support.server import TPOPS, MailEnv, free_port, make_message, wait_for_port
from tpops.daemonize import PidFile

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the daemon's adoptive parent, so the test can reap it and read
    its exit status (python-daemon's double fork would otherwise hand it to init)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in proc_children(os.getpid()):  # a daemon a failed test left behind: ours
            if proc_title(pid) == "tpops: master":
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        reap_orphans()


def reap_orphans() -> None:
    """Reap the exited intermediate processes of the double fork that were handed to us."""
    for pid in zombie_children(os.getpid()):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class Daemon:
    """``tpops`` without --fg: the starter exits, the daemon is found through its pid file."""

    def __init__(self, env: MailEnv, *args: str, pid_file: Path | None = None, cwd: Path | None = None) -> None:
        self.env = env
        self.cwd = cwd
        self.port = free_port()
        self.pid_file = pid_file or env.base / "tpops.pid"
        self.args = [TPOPS, "-f", str(env.conf), "--port", str(self.port), "--bind", "127.0.0.1",
                     "--pidfile", str(self.pid_file), *args]
        self.pid: int | None = None

    def start(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
                              cwd=self.cwd)

    def running(self) -> Daemon:
        out = self.start()
        assert out.returncode == 0, out.stderr
        assert out.stdout == out.stderr == ""
        self.pid = wait_for(self._master_in_pid_file, what="the pid file naming a tpops master")
        wait_for_port(self.port)
        return self

    def _master_in_pid_file(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if proc_title(pid) == "tpops: master" else None

    def stop(self) -> int | None:
        """SIGTERM, and the daemon's exit status (it is our child: we are its subreaper)."""
        if self.pid is None or gone(self.pid):
            return None
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the daemon did not stop within 5 s")


def test_daemon_detaches_serves_and_cleans_up(mail_env: MailEnv, subreaper: None) -> None:
    mail_env.add_user("dora", messages=[make_message()])
    daemon = Daemon(mail_env)
    try:
        daemon.running()
        pid = daemon.pid
        assert pid is not None
        assert daemon.pid_file.read_text() == f"{pid}\n"
        assert proc_title(pid) == "tpops: master"
        # A new session: python-daemon forks after setsid(), so the daemon is not even its
        # session's leader and can never acquire a controlling terminal.
        assert os.getsid(pid) != os.getsid(0)
        assert os.getsid(pid) == os.getpgid(pid) != pid
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4] == "0"  # tty_nr
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUmask:\t0022\n" in status
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/2") == str(mail_env.error_log)
        c = RawClient(daemon.port)
        assert c.login("dora").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        wait_for(lambda: " dora 1 " in mail_env.access_log.read_text(), what="the access-log line")
        began = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - began < 5
        assert not daemon.pid_file.exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=2)
    finally:
        daemon.stop()


def first_bad_reply(port: int) -> bytes:
    c = RawClient(port)
    try:
        return c.cmd("BOGUS")
    finally:
        c.close()


def test_reload_reads_the_file_given_by_a_relative_path(mail_env: MailEnv, subreaper: None) -> None:
    """Started with a relative ``-f`` from some directory, the daemon (which changes to /)
    still reloads that file on SIGHUP: -f was made absolute at start-up."""
    daemon = Daemon(mail_env, cwd=mail_env.base)
    daemon.args[daemon.args.index(str(mail_env.conf))] = mail_env.conf.name
    try:
        daemon.running()
        assert daemon.pid is not None
        assert first_bad_reply(daemon.port) == b"-ERR Unknown command."
        mail_env.write_conf(max_bad_commands="1")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_for(lambda: first_bad_reply(daemon.port) == b"-ERR Too many bad commands.",
                 what="$max_bad_commands = 1 from the reloaded file")
        assert "not reloaded" not in mail_env.error_log.read_text()
    finally:
        assert daemon.stop() == 0


def test_stale_pid_files_are_replaced(mail_env: MailEnv, subreaper: None) -> None:
    pid_file = mail_env.base / "tpops.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A live process whose command line merely mentions tpops is not a tpops either.
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "/etc/tpops/tpops.conf"])
    try:
        for stale in (dead.pid, lookalike.pid):
            pid_file.write_text(f"{stale}\n")
            daemon = Daemon(mail_env, pid_file=pid_file)
            try:
                daemon.running()
                assert daemon.pid != stale
                assert pid_file.read_text() == f"{daemon.pid}\n"
            finally:
                assert daemon.stop() == 0
            assert not pid_file.exists()
    finally:
        lookalike.kill()
        lookalike.wait()


def test_pid_file_held_by_a_live_tpops_is_refused_before_detaching(mail_env: MailEnv, subreaper: None) -> None:
    first = Daemon(mail_env).running()
    try:
        second = Daemon(mail_env, pid_file=first.pid_file)
        out = second.start()
        assert out.returncode == 1
        assert out.stderr == (f"tpops: cannot start: tpops is already running with pid {first.pid} "
                              f"(pid file {first.pid_file})\n")
        assert first.pid_file.read_text() == f"{first.pid}\n"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second.port), timeout=2)
    finally:
        assert first.stop() == 0


def test_pid_file_write_follows_no_planted_symlink(tmp_path: Path) -> None:
    """The attack on the old ``<pidfile>.<pid>.tmp``: a symlink planted at that name made
    root truncate and overwrite its target. Now the temp file has an unguessable name and
    is created with O_EXCL; the planted link and its target stay untouched."""
    target = tmp_path / "shadow"
    target.write_text("root:secret-hash:19000:0:99999:7:::\n")
    target.chmod(0o600)
    before = (target.read_text(), target.stat().st_mode, target.stat().st_uid)
    pid_path = tmp_path / "tpops.pid"
    planted = tmp_path / f"tpops.pid.{os.getpid()}.tmp"
    planted.symlink_to(target)
    pid_file = PidFile(str(pid_path))
    pid_file.write()
    assert (target.read_text(), target.stat().st_mode, target.stat().st_uid) == before
    assert planted.is_symlink() and os.readlink(planted) == str(target)
    assert pid_path.read_text() == f"{os.getpid()}\n"
    assert not pid_path.is_symlink()
    assert pid_path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shadow", "tpops.pid", planted.name]  # no temp left
    # A symlink planted at the pid file itself is replaced by the rename, not followed.
    pid_path.unlink()
    pid_path.symlink_to(target)
    pid_file.write()
    assert target.read_text() == before[0]
    assert not pid_path.is_symlink() and pid_path.read_text() == f"{os.getpid()}\n"
    pid_file.remove()
    assert not pid_path.exists() and target.read_text() == before[0]


def _holding_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("case", ["bad config", "port in use", "log is a directory", "log dir missing",
                                  "pid dir missing"])
def test_start_up_errors_fail_before_detaching(mail_env: MailEnv, case: str) -> None:
    daemon = Daemon(mail_env)
    held = None
    if case == "bad config":
        mail_env.conf.write_text("$port = = 110\n")
        status, message = 2, f"{mail_env.conf}:1:"
    elif case == "port in use":
        held = _holding_port()
        held_port = held.getsockname()[1]
        daemon.args[daemon.args.index(str(daemon.port))] = str(held_port)
        status, message = 1, (f"tpops: cannot listen on 127.0.0.1:{held_port}: address already in use "
                              "(another POP3 server running?)\n")
    elif case == "log is a directory":
        mail_env.write_conf(access_log=repr(str(mail_env.base)))
        status, message = 1, "tpops: cannot open a log file: [Errno 21] Is a directory"
    elif case == "log dir missing":
        mail_env.write_conf(error_log=repr(str(mail_env.base / "nowhere" / "error.log")))
        status, message = 1, "tpops: cannot open a log file: [Errno 2] No such file or directory"
    else:
        daemon.pid_file = mail_env.base / "nowhere" / "tpops.pid"
        daemon.args[-1] = str(daemon.pid_file)
        status, message = 1, "tpops: cannot start: cannot write pid file"
    try:
        began = time.monotonic()
        out = daemon.start()  # returns only when the starter exits: it did not detach
        assert time.monotonic() - began < 10
    finally:
        if held is not None:
            held.close()
    assert out.returncode == status
    assert message in out.stderr
    assert not daemon.pid_file.exists()
    assert "Traceback" not in out.stderr


@root_only("--user")
def test_workers_that_cannot_start_fail_before_detaching(mail_env: MailEnv) -> None:
    private = mail_env.base / "private"
    private.mkdir(mode=0o700)
    mail_env.write_conf(passwd_lock_dir=repr(str(private / "locks")))
    daemon = Daemon(mail_env, "--user", "nobody")
    out = daemon.start()
    assert out.returncode == 1
    assert "tpops: cannot start: workers cannot start: $passwd_lock_dir" in out.stderr
    assert not daemon.pid_file.exists()


def test_with_inetd_in_the_file_means_inetd(mail_env: MailEnv) -> None:
    mail_env.add_user("ines", messages=[make_message()])
    mail_env.write_conf(with_inetd="true")
    out = subprocess.run([TPOPS, "-f", str(mail_env.conf)], input=b"USER ines\r\nPASS secret\r\nSTAT\r\nQUIT\r\n",
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\r\n")
    assert lines[0].startswith(b"+OK tpops ready.")
    assert lines[2].startswith(b"+OK Logged in, 1 messages")
    assert lines[4].startswith(b"+OK Bye")
