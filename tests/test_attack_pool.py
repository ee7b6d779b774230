"""The pool under attack and faults (issue 8): reloads that must not take the service down,
a watchdog for hung or stopped workers, per-address connection limits. Each test performs
the attack over loopback against a real ``tpops --fg``."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, idle_workers, wait_for, worker_serving
from tests.support.server import POOL_ARGS, MailEnv, Server, make_message


def start(env: MailEnv, *args: str, **settings: str) -> Server:
    env.write_conf(**settings)
    return Server(env, *args).start()


# -- item 19: a reload must never take the server down ---------------------------------


def _unbootable_lock_dir(env: MailEnv, case: str) -> str:
    """A ``$passwd_lock_dir`` the reloaded configuration's workers cannot use."""
    if case == "under-a-file":  # cannot even be created (any user)
        blocker = env.base / "blocker"
        blocker.write_text("")
        return repr(str(blocker / "locks"))
    private = env.base / "private"  # the pre-flight worker (--user nobody) cannot enter it
    private.mkdir(mode=0o700)
    return repr(str(private / "locks"))


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=lambda s: s.name)
@pytest.mark.parametrize(
    "case",
    ["under-a-file", pytest.param("preflight-as-user", marks=root_only("--user and a private lock directory"))],
)
def test_a_reload_whose_workers_cannot_boot_keeps_the_running_workers(
    mail_env: MailEnv, signum: int, case: str
) -> None:
    mail_env.add_user("rita", messages=[make_message("1"), make_message("2")])
    srv = start(mail_env, *POOL_ARGS, min_servers="3", max_servers="6")
    master = srv.proc.pid
    try:
        rita = RawClient(srv.port)  # a busy worker, mid-session
        assert rita.login("rita").startswith(b"+OK")
        assert rita.cmd("DELE 1").startswith(b"+OK")
        idle = wait_for(lambda: len(idle_workers(master)) >= 2 and idle_workers(master), what="idle workers")
        mail_env.write_conf(passwd_lock_dir=_unbootable_lock_dir(mail_env, case), min_servers="5")
        srv.proc.send_signal(signum)
        wait_for(lambda: "configuration not reloaded" in srv.output(), what="the failed reload logged")
        time.sleep(1.5)  # give a wrong master time to end its workers
        assert srv.proc.poll() is None
        assert idle <= idle_workers(master), "the idle workers were replaced"
        # The busy session goes on, and its QUIT still deletes.
        assert rita.cmd("STAT").startswith(b"+OK 1 ")
        assert rita.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
        rita.close()
        # The same configuration ($min_servers = 3, the old lock directory) still serves.
        c = RawClient(srv.port)
        assert c.login("rita").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        assert "failed to start" not in srv.output()
    finally:
        srv.stop()
    name = signal.Signals(signum).name
    assert f"{name}: configuration not reloaded, keeping the running one and its workers: " in srv.output()
    assert "configuration reloaded, replacing workers" not in srv.output()


@root_only("--user and a lock directory nobody can reach")
def test_workers_failing_after_a_good_start_back_off_and_recover(mail_env: MailEnv) -> None:
    mail_env.add_user("bart", messages=[make_message()])
    private = mail_env.base / "private"
    private.mkdir(mode=0o755)
    srv = start(mail_env, "--user", "nobody", passwd_lock_dir=repr(str(private / "locks")))
    master = srv.proc.pid
    try:
        workers = wait_for(lambda: idle_workers(master), what="idle workers")
        private.chmod(0o700)  # the environment changes under a running server ...
        for pid in workers:  # ... and its workers must be replaced
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "next attempt in 4 s" in srv.output(), timeout=15, what="a growing back-off")
        assert srv.proc.poll() is None  # the master lives on
        out = srv.output()
        assert "next attempt in 1 s" in out and "next attempt in 2 s" in out
        assert out.count("failed to start") == 3  # one attempt at a time, no fork loop
        private.chmod(0o755)  # the cause is removed: the next attempt boots
        wait_for(lambda: "workers boot again" in srv.output(), timeout=10, what="recovery logged")
        wait_for(lambda: len(idle_workers(master)) >= 2, what="the pool refilled")
        c = RawClient(srv.port)
        assert c.login("bart").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()
    assert "workers keep failing at start-up" not in srv.output()
    assert f"$passwd_lock_dir {private / 'locks'} is not usable as uid 65534" in srv.output()


def test_a_start_up_that_never_worked_stops_the_master(mail_env: MailEnv) -> None:
    """Workers that fail to boot before any ever booted: the master exits (status 3) after
    a few attempts instead of fork-looping; nothing else does (see the back-off above)."""
    from tpops import logs
    from tpops.arbiter import MAX_BOOT_FAILURES, Arbiter
    from tpops.config import load_config
    from tpops.worker import EXIT_BOOT_FAILED

    config = load_config(str(mail_env.conf))
    pid = os.fork()
    if pid == 0:  # the master under test, in a child so its signal handlers stay out of pytest
        status = 1
        try:
            log_files = logs.setup(facility=None, error_log=str(mail_env.error_log), access_log=None,
                                   debug=False, to_stderr=False)
            arbiter = Arbiter(config, [], log_files, lambda: config, lambda c: log_files)
            arbiter._worker_main = lambda slot: EXIT_BOOT_FAILED  # type: ignore[method-assign]
            status = arbiter.run()
        finally:
            os._exit(status)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the master did not give up")
    assert os.waitstatus_to_exitcode(done[1]) == EXIT_BOOT_FAILED
    out = mail_env.error_log.read_text()
    assert f"workers keep failing at start-up ({MAX_BOOT_FAILURES} in a row): stopping" in out
    assert "next attempt in" not in out


# -- items 10 and 11: the watchdog ----------------------------------------------------


def test_a_stopped_worker_is_killed_by_the_watchdog_and_nothing_is_lost(mail_env: MailEnv) -> None:
    """A user SIGSTOPs the worker serving them (or it hangs in a backend call): after
    $command_timeout + grace without progress the master kills it; the lock dies with
    it, no message is deleted, and the pool serves the mailbox again."""
    mail_env.add_user("sam", messages=[make_message("1"), make_message("2")])
    srv = start(mail_env, *POOL_ARGS, command_timeout="2")  # limit: 2 s + 2 s grace
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("sam").startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        busy = worker_serving(master, "sam@127.0.0.1")
        os.kill(busy, signal.SIGSTOP)
        began = time.monotonic()
        c.send(b"QUIT\r\n")  # never answered: the worker is stopped, then killed
        wait_for(lambda: gone(busy), timeout=10, what="the stopped worker killed")
        took = time.monotonic() - began
        assert 3.0 <= took <= 7.0, took
        assert c.closed()
        c.close()
        assert len(mail_env.messages("sam")) == 2  # nothing deleted without an UPDATE
        c = RawClient(srv.port)  # the lock is free at once
        assert c.login("sam").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye, 0 messages deleted")
        c.close()
    finally:
        srv.stop()
    out = srv.output()
    assert re.search(rf"worker {busy} made no progress for [4-9] s \(limit 4 s: \$command_timeout and a grace\): "
                     r"killing it", out), out
    assert f"worker {busy} killed by signal SIGKILL; replacing it" in out


def test_a_slow_but_working_session_is_not_killed(mail_env: MailEnv) -> None:
    """Progress is what counts, not the session's length: a client that sends a command
    every second for longer than the watchdog's limit keeps its worker."""
    mail_env.add_user("sue", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, command_timeout="1")  # limit: 1 s + 2 s grace
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("sue").startswith(b"+OK")
        busy = worker_serving(master, "sue@127.0.0.1")
        for _ in range(6):
            time.sleep(0.6)
            assert c.cmd("NOOP").startswith(b"+OK")
        assert not gone(busy)
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()
    assert "made no progress" not in srv.output()


# -- item 8: connections per address -----------------------------------------------------

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections from your address"


def connect_from(port: int, source: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def first_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(200)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\r\n")


def test_the_eleventh_connection_from_one_address_is_refused_at_once(mail_env: MailEnv) -> None:
    mail_env.add_user("ivy", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, min_servers="2", max_servers="16")  # $max_connections_per_ip: default 10
    master = srv.proc.pid
    held: list[RawClient] = []
    try:
        held = [RawClient(srv.port) for _ in range(10)]
        assert all(c.greeting.startswith(b"+OK") for c in held)
        began = time.monotonic()
        extra = connect_from(srv.port, "127.0.0.1")
        assert first_line(extra) == TOO_MANY
        assert extra.recv(100) == b""  # and closed
        extra.close()
        assert time.monotonic() - began < 1.0
        # Another address is not affected.
        other = connect_from(srv.port, "127.0.0.2")
        assert first_line(other).startswith(b"+OK")
        other.close()
        # A session that ends gives its place back ...
        assert held.pop().cmd("QUIT").startswith(b"+OK")
        c = wait_for(lambda: _greeted(srv.port), what="a place given back")
        held.append(c)
        # ... and so does a worker that dies (the master clears its slot).
        victim = worker_serving(master, "127.0.0.1")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), what="the killed worker gone")
        c = wait_for(lambda: _greeted(srv.port), what="the dead worker's place given back")
        held.append(c)
    finally:
        for c in held:
            c.close()
        srv.stop()
    assert "refused 1 connection(s) over $max_connections_per_ip (10), the last from 127.0.0.1" in srv.output()


def _greeted(port: int) -> RawClient | None:
    c = RawClient(port)
    if c.greeting.startswith(b"+OK"):
        return c
    c.close()
    return None


def test_fifty_slow_clients_from_one_address_leave_room_for_another(mail_env: MailEnv) -> None:
    """50 idle connections from 127.0.0.1 against $max_servers = 20: all but
    $max_connections_per_ip are refused at once, so a client from 127.0.0.2 logs in
    within a second."""
    mail_env.add_user("liv", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, min_servers="2", max_servers="20", max_connections_per_ip="3")
    slow: list[socket.socket] = []
    try:
        slow = [connect_from(srv.port, "127.0.0.1") for _ in range(50)]  # connect, never speak
        answers = [first_line(s) for s in slow]
        assert answers.count(TOO_MANY) == 47, answers
        assert sum(a.startswith(b"+OK") for a in answers) == 3
        began = time.monotonic()
        legit = connect_from(srv.port, "127.0.0.2")
        f = legit.makefile("rb")
        assert f.readline().startswith(b"+OK")
        legit.sendall(b"USER liv\r\nPASS secret\r\n")
        assert f.readline().startswith(b"+OK")
        assert f.readline().startswith(b"+OK Logged in, 1 messages")
        assert time.monotonic() - began < 1.0
        legit.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"+OK Bye")
        f.close()
        legit.close()
    finally:
        for s in slow:
            s.close()
        srv.stop()


def test_a_client_that_quits_and_reconnects_at_once_is_never_refused(mail_env: MailEnv) -> None:
    """With $max_connections_per_ip = 1, a client that sees its session end (EOF after
    QUIT) and reconnects at once is greeted every time: the finished session stops
    counting for its address before the client can see the close (fetchmail polling
    several accounts one after another from one address does exactly this)."""
    mail_env.add_user("liv", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, min_servers="3", max_servers="3", max_connections_per_ip="1")
    try:
        for attempt in range(60):
            s = connect_from(srv.port, "127.0.0.1")
            f = s.makefile("rb")
            greeting = f.readline()
            assert greeting.startswith(b"+OK"), (attempt, greeting)
            s.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"+OK"), attempt
            assert f.readline() == b"", attempt  # the server's close
            f.close()
            s.close()
    finally:
        srv.stop()
    assert "over $max_connections_per_ip" not in srv.output()
