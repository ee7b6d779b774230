"""The prefork pool against real processes: growth, shrinking, recycling, crashes, overload, titles."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, idle_workers, proc_title, wait_for, worker_serving, worker_titles
from tests.support.server import POOL_ARGS, TPOPS, MailEnv, Server, make_message


def start(env: MailEnv, *args: str, **settings: str) -> Server:
    env.write_conf(**settings)
    return Server(env, *args).start()


def run_clients(count: int, target) -> list[object]:  # type: ignore[no-untyped-def]
    """``target(i)`` in ``count`` threads at once; their results (or exceptions)."""
    results: list[object] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_titles_master_idle_and_logged_in(mail_env: MailEnv) -> None:
    mail_env.add_user("tina", password="Titl3Secr3t", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS)
    try:
        master = srv.proc.pid
        assert proc_title(master) == "tpops: master"
        wait_for(lambda: len(idle_workers(master)) >= 2, what="two idle workers")
        c = RawClient(srv.port)
        before_login = worker_serving(master, "127.0.0.1")
        assert c.login("tina", "Titl3Secr3t").startswith(b"+OK")
        assert worker_serving(master, "tina@127.0.0.1") == before_login
        titles = " ".join(proc_title(p) or "" for p in [master, *worker_titles(master)])
        assert "Titl3Secr3t" not in titles
        c.cmd("QUIT")
        c.close()
        wait_for(lambda: proc_title(before_login) in ("tpops: worker idle", None), what="worker idle again")
    finally:
        srv.stop()


@pytest.mark.timeout(60)
def test_pool_grows_at_once_under_40_sessions_and_shrinks_after_max_idle(mail_env: MailEnv) -> None:
    for i in range(40):
        mail_env.add_user(f"g{i}", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, min_servers="2", max_servers="50", max_idle="1",
                max_connections_per_ip="0")  # 40 clients from one address: load, not an attack
    master = srv.proc.pid
    clients: list[RawClient] = []
    try:
        wait_for(lambda: len(idle_workers(master)) == 2, what="the pool at $min_servers")
        began = time.monotonic()

        def session(i: int) -> tuple[RawClient, float, bytes]:
            c = RawClient(srv.port)
            greeted = time.monotonic() - began
            return c, greeted, c.login(f"g{i}")

        results = run_clients(40, session)
        assert all(isinstance(r, tuple) for r in results), [r for r in results if not isinstance(r, tuple)]
        clients = [r[0] for r in results]  # type: ignore[index]
        assert all(r[2].startswith(b"+OK Logged in") for r in results)  # type: ignore[index]
        # Busy reports reach the master at once and it forks for the whole listen queue:
        # with a 1 s poll (or two new workers per round trip) this took many seconds.
        slowest = max(r[1] for r in results)  # type: ignore[index]
        assert slowest < 3.0, f"the 40th client waited {slowest:.2f} s for a worker"
        workers = worker_titles(master)
        assert 40 <= len(workers) <= 50
        assert sum(t.startswith("tpops: worker g") for t in workers.values()) == 40
        for c in clients:
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            c.close()
        clients = []
        shrink_began = time.monotonic()
        wait_for(lambda: len(worker_titles(master)) == 2, timeout=10, what="the pool back at $min_servers")
        assert time.monotonic() - shrink_began >= 0.5  # $max_idle = 1: not before it elapsed
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_max_use_recycles_workers(mail_env: MailEnv) -> None:
    mail_env.add_user("rita", messages=[make_message() for _ in range(3)])
    srv = start(mail_env, *POOL_ARGS, min_servers="2", max_servers="4", max_use="2")
    master = srv.proc.pid
    try:
        served: list[int] = []
        for _ in range(8):
            c = RawClient(srv.port)
            assert c.login("rita").startswith(b"+OK")
            served.append(worker_serving(master, "rita@127.0.0.1"))
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            assert c.closed()
            c.close()
        # the readiness probe used one session of some worker too, hence "at most 2"
        assert max(Counter(served).values()) <= 2, served
        assert len(set(served)) >= 4
        wait_for(lambda: all(gone(p) for p in served if Counter(served)[p] == 2), what="used-up workers gone")
        assert len(mail_env.messages("rita")) == 3
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()


def test_a_worker_is_free_once_a_lockstep_client_has_its_quit_reply(mail_env: MailEnv) -> None:
    """After QUIT the worker shuts down its side and lingers (up to a second) only for a
    client still sending: one that read its reply and EOF but keeps its socket open
    must not hold the worker, or every session would cost a worker one more round trip."""
    mail_env.add_user("lena", messages=[make_message()])
    srv = start(mail_env, *POOL_ARGS, min_servers="1", max_servers="1")
    try:
        first = RawClient(srv.port)
        assert first.login("lena").startswith(b"+OK")
        assert first.cmd("QUIT").startswith(b"+OK Bye")
        assert first.closed()  # EOF; the socket stays open on this side
        began = time.monotonic()
        second = RawClient(srv.port)  # the only worker greets it
        waited = time.monotonic() - began
        assert second.greeting.startswith(b"+OK"), second.greeting
        assert waited < 0.5, f"greeted after {waited:.2f} s: the worker lingered on the first client"
        assert second.login("lena").startswith(b"+OK")
        assert second.cmd("QUIT").startswith(b"+OK Bye")
        second.close()
        first.close()
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()


def test_kill9_busy_and_idle_workers_are_replaced(mail_env: MailEnv) -> None:
    mail_env.add_user("kim", messages=[make_message("one"), make_message("two")])
    srv = start(mail_env, *POOL_ARGS, min_servers="2", max_servers="6")
    master = srv.proc.pid
    try:
        # A busy worker, mid-session with a DELE pending.
        c = RawClient(srv.port)
        assert c.login("kim").startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        busy = worker_serving(master, "kim@127.0.0.1")
        os.kill(busy, signal.SIGKILL)
        assert c.closed()
        c.close()
        wait_for(lambda: gone(busy), what="the killed worker gone")
        assert len(mail_env.messages("kim")) == 2  # no UPDATE without QUIT
        # An idle one.
        idle = wait_for(lambda: idle_workers(master), what="idle workers")
        victim = min(idle)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim) and len(idle_workers(master) - {victim}) >= 2, what="replacement workers")
        # The lock died with the busy worker: kim logs in again at once and sees both.
        c = RawClient(srv.port)
        assert c.login("kim").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye, 0 messages deleted")
        c.close()
    finally:
        srv.stop()
    out = srv.output()
    assert f"worker {busy} killed by signal SIGKILL; replacing it" in out
    assert f"worker {victim} killed by signal SIGKILL; replacing it" in out


def test_workers_exit_when_the_master_dies(mail_env: MailEnv) -> None:
    mail_env.add_user("orph", messages=[make_message(), make_message()])
    srv = start(mail_env, *POOL_ARGS)
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("orph").startswith(b"+OK")
        busy = worker_serving(master, "orph@127.0.0.1")
        idle = wait_for(lambda: idle_workers(master), what="idle workers")
        srv.proc.kill()
        srv.proc.wait()
        # Orphans would hold the port forever: idle ones notice at once ...
        wait_for(lambda: all(gone(p) for p in idle), timeout=5, what="idle orphans gone")
        # ... a busy one finishes its session (the QUIT still deletes) and then exits.
        assert not gone(busy)
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
        c.close()
        wait_for(lambda: gone(busy), timeout=5, what="the busy orphan gone after its session")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2)
    finally:
        srv.stop()
    assert len(mail_env.messages("orph")) == 1


@pytest.mark.timeout(90)
def test_300_clients_against_max_servers_20(mail_env: MailEnv) -> None:
    # As root without --user (every login ends its worker): the most churn the pool sees.
    users = 60
    for i in range(users):
        mail_env.add_user(f"c{i}", messages=[make_message()])
    srv = start(mail_env, min_servers="2", max_servers="20", max_idle="1", max_use="0",
                max_connections_per_ip="0")  # 300 clients from one address: load, not an attack
    master = srv.proc.pid
    counts: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            counts.append(len(worker_titles(master)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    locks = [threading.Lock() for _ in range(users)]  # one session per mailbox at a time

    def session(i: int) -> bytes:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            f = s.makefile("rb")
            greeting = f.readline()
            with locks[i % users]:
                s.sendall(f"USER c{i % users}\r\nPASS secret\r\nSTAT\r\nQUIT\r\n".encode())
                replies = [f.readline() for _ in range(4)]
            return greeting + b"".join(replies)

    try:
        results = run_clients(300, session)
    finally:
        sampling.set()
        sampler.join()
    try:
        failures = [r for r in results if not isinstance(r, bytes) or not r.endswith(b"+OK Bye, 0 messages deleted, 1 left.\r\n")]
        assert not failures, failures[:3]
        assert counts and max(counts) <= 20, max(counts)
        wait_for(lambda: len(worker_titles(master)) <= 3, timeout=15, what="the pool back to a few workers")
        assert all(len(mail_env.messages(f"c{i}")) == 1 for i in range(users))
    finally:
        srv.stop()


@root_only("--user")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "no-such-user-tpops"], "no such user: no-such-user-tpops"),
        (["--user", "nobody", "--group", "no-such-group-tpops"], "no such group: no-such-group-tpops"),
        (["--user", "root"], "refusing to run workers as root"),
    ],
)
def test_workers_that_cannot_start_fail_before_serving(mail_env: MailEnv, args: list[str], message: str) -> None:
    out = subprocess.run([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", "0", "--bind", "127.0.0.1", *args],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert message in out.stderr
    assert "tpops: cannot start:" in out.stderr


@root_only("--user and a lock directory nobody can reach")
def test_unusable_lock_dir_is_a_start_up_error(mail_env: MailEnv) -> None:
    private = mail_env.base / "private"
    private.mkdir(mode=0o700)
    mail_env.write_conf(passwd_lock_dir=repr(str(private / "locks")))
    out = subprocess.run([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", "0", "--bind", "127.0.0.1",
                          "--user", "nobody"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert f"tpops: cannot start: workers cannot start: $passwd_lock_dir {private / 'locks'}" in out.stderr


class _BrokenBackend:
    """An authenticator that fails before the session even starts (a bug in a backend)."""

    name = "broken"

    @property
    def supports_apop(self) -> bool:
        raise ImportError("cannot import name 'metadata'")

    def close(self) -> None:
        pass


def test_a_worker_survives_an_error_outside_the_session(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from setproctitle import getproctitle, setproctitle

    from tpops import logs
    from tpops.config import Config
    from tpops.privileges import SessionPrivileges
    from tpops.worker import Worker

    title = getproctitle()
    server_end, client_end = socket.socketpair()
    wake_r, wake_w = os.pipe()
    try:
        worker = Worker(Config(), [], None, logs.LogSetup())
        worker.serve(server_end, "192.0.2.1", _BrokenBackend(), SessionPrivileges(False), wake_r)  # type: ignore[arg-type]
        client_end.settimeout(5)
        assert client_end.recv(200) == b"-ERR [SYS/TEMP] Internal server error.\r\n"
        assert client_end.recv(200) == b""  # closed, and serve() returned: the worker lives on
    finally:
        setproctitle(title)
        client_end.close()
        os.close(wake_r)
        os.close(wake_w)


def test_listens_on_every_bind_address_close_on_exec(mail_env: MailEnv) -> None:
    mail_env.add_user("ivy", messages=[make_message()])
    srv = start(mail_env, "--bind", "::1", *POOL_ARGS)
    master = srv.proc.pid
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s:
                s.settimeout(5)
                s.connect((host, srv.port))
                assert s.recv(100).startswith(b"+OK tpops ready.")
                s.sendall(b"QUIT\r\n")
        listening = []
        for fd in os.listdir(f"/proc/{master}/fd"):
            target = os.readlink(f"/proc/{master}/fd/{fd}")
            if target.startswith("socket:"):
                fdinfo = Path(f"/proc/{master}/fdinfo/{fd}").read_text().splitlines()
                flags = int(next(line.split()[1] for line in fdinfo if line.startswith("flags:")), 8)
                listening.append(flags)
        assert len(listening) >= 2
        assert all(flags & os.O_CLOEXEC for flags in listening)  # never inherited by programs run later
    finally:
        srv.stop()
    assert "listening on 127.0.0.1:%d, [::1]:%d" % (srv.port, srv.port) in srv.output()
