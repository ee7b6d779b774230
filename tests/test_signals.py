"""Signals to the master (TERM, INT, HUP, USR1) against real processes: nothing lost, nothing
deleted that was not QUIT, reloads that take effect, bad reloads that change nothing."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.procs import gone, idle_workers, wait_for, worker_serving, worker_titles
from tests.support.server import POOL_ARGS, MailEnv, Server, free_port, make_message

SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down."


def uids(env: MailEnv, user: str) -> set[str]:
    return {p.name.partition(":")[0] for p in env.messages(user)}


def split_users(env: MailEnv, first: list[str]) -> Path:
    """Keep ``first`` in the passwd-file; move every other user to a second file (returned)."""
    lines = env.passwd_file.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.split(":")[0] in first]
    second = env.base / "users2"
    second.write_text("".join(line for line in lines if line not in keep))
    env.passwd_file.write_text("".join(keep))
    return second


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_cuts_sessions_without_update_and_removes_the_pid_file(mail_env: MailEnv, signum: int) -> None:
    mail_env.add_user("tom", messages=[make_message("1"), make_message("2")])
    pid_file = mail_env.base / "tpops.pid"
    srv = Server(mail_env, "--pidfile", str(pid_file), *POOL_ARGS).start()
    master = srv.proc.pid
    try:
        assert pid_file.read_text() == f"{master}\n"
        c = RawClient(srv.port)
        assert c.login("tom").startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        workers = set(worker_titles(master))
        began = time.monotonic()
        srv.proc.send_signal(signum)
        assert c.readline() == SHUTTING_DOWN
        assert c.closed()
        c.close()
        assert srv.proc.wait(5) == 0
        assert time.monotonic() - began < 5
        assert not pid_file.exists()
        assert all(gone(pid) for pid in workers)
        assert refused(srv.port)
        assert len(mail_env.messages("tom")) == 2
    finally:
        srv.stop()
    assert f"received {signal.Signals(signum).name}: stopping" in srv.output()


def test_sigterm_lets_an_update_in_progress_finish(mail_env: MailEnv) -> None:
    count = 300
    mail_env.add_user("ulla", messages=[make_message(str(i)) for i in range(count)])
    srv = Server(mail_env, *POOL_ARGS).start()
    try:
        c = RawClient(srv.port)
        assert c.login("ulla").startswith(b"+OK")
        c.send(b"".join(b"DELE %d\r\n" % i for i in range(1, count + 1)))
        assert all(c.readline().startswith(b"+OK") for _ in range(count))
        c.send(b"QUIT\r\n")
        srv.proc.send_signal(signal.SIGTERM)
        reply = c.readline()
        assert srv.proc.wait(5) == 0
    finally:
        srv.stop()
    left = len(mail_env.messages("ulla"))
    # All or nothing, and the reply tells which: never a half-done UPDATE.
    if reply.startswith(b"+OK Bye"):
        assert left == 0
    else:
        assert reply == SHUTTING_DOWN
        assert left == count


def test_sighup_reloads_reopens_logs_and_forces_clients_off(mail_env: MailEnv) -> None:
    mail_env.add_user("alice", messages=[make_message("a1"), make_message("a2")])
    mail_env.add_user("bob", messages=[make_message("b1")])
    users2 = split_users(mail_env, ["alice"])
    srv = Server(mail_env, *POOL_ARGS)
    at = srv.args.index("--port")
    del srv.args[at:at + 2]  # the port comes from the file, so that changing it there means something
    mail_env.write_conf(port=str(srv.port))
    srv.start()
    master = srv.proc.pid
    clients: list[RawClient] = []
    try:
        alice = RawClient(srv.port)
        assert alice.login("alice").startswith(b"+OK")
        assert alice.cmd("DELE 1").startswith(b"+OK")
        old_workers = set(worker_titles(master))
        mail_env.access_log.rename(mail_env.base / "access.log.1")
        mail_env.error_log.rename(mail_env.base / "error.log.1")
        mail_env.write_conf(auth_file=repr(str(users2)), min_servers="3", max_servers="3", port=str(free_port()),
                            error_interval="1")
        srv.proc.send_signal(signal.SIGHUP)
        assert alice.readline() == SHUTTING_DOWN
        assert alice.closed()
        alice.close()
        wait_for(lambda: all(gone(p) for p in old_workers), what="every old worker gone")
        wait_for(lambda: len(idle_workers(master)) == 3, what="three fresh workers ($min_servers = 3)")
        # The new auth file is in force.
        c = RawClient(srv.port)
        assert c.cmd("USER alice").startswith(b"+OK")
        began = time.monotonic()
        assert c.cmd("PASS secret").startswith(b"-ERR [AUTH]")
        assert time.monotonic() - began >= 0.9  # the new $error_interval delays a failed login
        assert c.login("bob").startswith(b"+OK Logged in, 1 messages")
        clients.append(c)
        # $max_servers = 3: a fourth client waits in the listen backlog until one leaves.
        clients += [RawClient(srv.port), RawClient(srv.port)]
        waiting = socket.create_connection(("127.0.0.1", srv.port), timeout=0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(100)
        assert len(worker_titles(master)) == 3
        assert clients.pop().cmd("QUIT").startswith(b"+OK")
        waiting.settimeout(5)
        assert waiting.recv(100).startswith(b"+OK tpops ready.")
        waiting.close()
        assert clients[0].cmd("QUIT").startswith(b"+OK Bye")
    finally:
        for c in clients:
            c.close()
        srv.stop()
    assert len(mail_env.messages("alice")) == 2  # cut without UPDATE
    new_access = mail_env.access_log.read_text()
    assert " bob 1 " in new_access  # the session that tried alice, then logged in as bob
    assert " alice " not in new_access
    assert " alice 2 " in (mail_env.base / "access.log.1").read_text()
    assert "authentication failed: alice from 127.0.0.1" in mail_env.error_log.read_text()
    assert "authentication failed" not in (mail_env.base / "error.log.1").read_text()
    out = srv.output()
    assert "SIGHUP: a new $port or $bind_address needs a restart; still listening on 127.0.0.1:" in out
    assert "SIGHUP: configuration reloaded, replacing workers" in out


def test_sigusr1_lets_busy_sessions_finish(mail_env: MailEnv) -> None:
    mail_env.add_user("alice", messages=[make_message("a1"), make_message("a2")])
    mail_env.add_user("bob", messages=[make_message("b1")])
    users2 = split_users(mail_env, ["alice"])
    srv = Server(mail_env, *POOL_ARGS).start()
    master = srv.proc.pid
    try:
        alice = RawClient(srv.port)
        assert alice.login("alice").startswith(b"+OK")
        assert alice.cmd("DELE 1").startswith(b"+OK")
        busy = worker_serving(master, "alice@127.0.0.1")
        idle = wait_for(lambda: idle_workers(master), what="idle workers")
        mail_env.write_conf(auth_file=repr(str(users2)))
        srv.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: all(gone(p) for p in idle), what="the idle workers gone at once")
        wait_for(lambda: len(idle_workers(master) - idle) >= 2, what="fresh idle workers")
        assert not gone(busy)
        bob = RawClient(srv.port)
        assert bob.login("bob").startswith(b"+OK")  # the new configuration serves new sessions
        assert bob.cmd("QUIT").startswith(b"+OK Bye")
        bob.close()
        # alice's session goes on under the old worker until she quits, and her QUIT deletes.
        assert alice.cmd("STAT").startswith(b"+OK 1 ")
        assert alice.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
        alice.close()
        wait_for(lambda: gone(busy), what="the old busy worker gone after its session")
    finally:
        srv.stop()
    assert len(mail_env.messages("alice")) == 1
    assert "SIGUSR1: configuration reloaded, replacing workers" in srv.output()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_configuration_that_fails_to_load_is_logged_and_the_running_one_kept(
    mail_env: MailEnv, signum: int
) -> None:
    mail_env.add_user("carl", messages=[make_message()])
    srv = Server(mail_env, *POOL_ARGS).start()
    master = srv.proc.pid
    try:
        idle = wait_for(lambda: idle_workers(master), what="idle workers")
        good = mail_env.conf.read_text()
        mail_env.conf.write_text(good + "$max_servers = = 3\n")
        srv.proc.send_signal(signum)
        wait_for(lambda: "configuration not reloaded" in srv.output(), what="the reload error logged")
        time.sleep(0.5)
        assert idle <= idle_workers(master), "the running workers must be kept"
        c = RawClient(srv.port)
        assert c.login("carl").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        assert srv.proc.poll() is None
    finally:
        srv.stop()
    name = signal.Signals(signum).name
    assert f"{name}: configuration not reloaded, keeping the running one and its workers: {mail_env.conf}:" \
        in srv.output()


class Load:
    """One client per user looping sessions on its own mailbox: note message 1's UIDL,
    DELE 1, then QUIT — or hang up without QUIT every third session. Only a ``+OK Bye``
    counts as a deletion; connections cut by a signal are simply retried."""

    def __init__(self, port: int, users: list[str]) -> None:
        self.port = port
        self.deleted: dict[str, set[str]] = {u: set() for u in users}
        self.sessions: dict[str, int] = dict.fromkeys(users, 0)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(u,)) for u in users]
        for t in self.threads:
            t.start()

    def run(self, user: str) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                c = RawClient(self.port, timeout=5)
            except OSError:
                time.sleep(0.01)
                continue
            try:
                if not c.login(user).startswith(b"+OK"):
                    continue
                uid = c.cmd("UIDL 1").split()[2].decode()
                assert c.cmd("DELE 1").startswith(b"+OK")
                n += 1
                if n % 3 and c.cmd("QUIT").startswith(b"+OK Bye, 1 messages deleted"):
                    self.deleted[user].add(uid)
                self.sessions[user] += 1
            except (OSError, AssertionError, IndexError):
                pass
            finally:
                c.close()

    def wait_sessions(self, more: int) -> None:
        target = {u: n + more for u, n in self.sessions.items()}
        wait_for(lambda: all(self.sessions[u] >= target[u] for u in target), timeout=20, what="sessions under load")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_during_load_loses_nothing(mail_env: MailEnv, signum: int) -> None:
    users = [f"load{i}" for i in range(4)]
    for user in users:
        mail_env.add_user(user, messages=[make_message(f"{user} {i}") for i in range(80)])
    before = {u: uids(mail_env, u) for u in users}
    mail_env.write_conf(min_servers="2", max_servers="6")
    srv = Server(mail_env).start()  # as root: every login ends its worker, the most churn
    load = Load(srv.port, users)
    try:
        load.wait_sessions(5)
        srv.proc.send_signal(signum)
        if signum == signal.SIGTERM:
            assert srv.proc.wait(5) == 0
        else:
            load.wait_sessions(5)  # and it keeps serving
            assert srv.proc.poll() is None
    finally:
        load.finish()
        srv.stop()
    for user in users:
        assert load.deleted[user], f"no session of {user} completed"
        assert uids(mail_env, user) == before[user] - load.deleted[user], user
