"""The fault matrix against the real server: kill -9, signal storms, a full file system, a database that goes away.

Each fault is caused for real (SIGKILL to the serving worker, HUP/USR1 to the master
under 100 clients, a 1 MiB tmpfs filled to the last page, a TCP forwarder in front of
MariaDB that is closed or stalled), and afterwards the same three things must hold:

- no message is lost that no client deleted with a completed QUIT (``+OK Bye``
  received), and every remaining message is intact (content checked by unique name);
- no mailbox lock is left held (every lock file can be flocked, a new login works);
- the same master serves the next client, without a restart.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import mariadb
from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import gone, wait_for, worker_serving
from tests.support.server import IS_ROOT, MAIL_GID, MAIL_UID, POOL_ARGS, MailEnv, Server, make_message

REPO = Path(__file__).resolve().parents[1]
NEW_SQL = REPO / "tpops_auth-mysql.sql"


# ---------------------------------------------------------------------------
# What must hold after every fault


def contents(env: MailEnv, user: str, root: Path | None = None) -> dict[str, bytes]:
    """The user's messages: unique name -> content (``root``: the Maildir seen through another path)."""
    maildir = root or env.maildir(user)
    return {p.name.partition(":")[0]: p.read_bytes()
            for sub in ("cur", "new") for p in (maildir / sub).iterdir() if not p.name.startswith(".")}


def assert_no_lock_held(env: MailEnv) -> None:
    """Every lock file in ``$passwd_lock_dir`` can be taken now: no process holds one."""
    for path in env.lock_dir.iterdir() if env.lock_dir.exists() else ():
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held
        finally:
            os.close(fd)


def assert_serves(srv: Server, user: str, messages: int) -> None:
    """The same master answers a new client, who logs in (the lock is free) and sees ``messages``."""
    assert srv.proc is not None and srv.proc.poll() is None, "the master is gone"
    c = RawClient(srv.port)
    try:
        assert c.login(user).startswith(f"+OK Logged in, {messages} messages".encode())
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        assert c.closed()
    finally:
        c.close()


def assert_no_traceback(srv: Server, env: MailEnv) -> None:
    for text in (srv.output(), env.error_log.read_text(errors="replace") if env.error_log.exists() else ""):
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.fixture
def pool(mail_env: MailEnv) -> Iterator[Server]:
    """A tpops whose workers outlive sessions (as root: ``--user nobody``)."""
    srv = Server(mail_env, *POOL_ARGS).start()
    try:
        yield srv
    finally:
        srv.stop()


def kill_worker(srv: Server, who: str) -> int:
    assert srv.proc is not None
    pid = worker_serving(srv.proc.pid, who)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 5, what=f"worker {pid} to die")
    return pid


# ---------------------------------------------------------------------------
# a. b. c.: kill -9 of the serving worker


def test_kill9_after_dele_deletes_nothing(mail_env: MailEnv, pool: Server) -> None:
    mail_env.add_user("ann", messages=[make_message(f"m{i}") for i in range(3)])
    before = contents(mail_env, "ann")
    c = RawClient(pool.port)
    assert c.login("ann").startswith(b"+OK Logged in, 3 messages")
    assert c.cmd("DELE 1") == b"+OK Message 1 deleted."
    assert c.cmd("DELE 3") == b"+OK Message 3 deleted."
    kill_worker(pool, "ann@127.0.0.1")
    assert c.closed()
    c.close()
    assert contents(mail_env, "ann") == before
    assert_no_lock_held(mail_env)
    assert_serves(pool, "ann", 3)
    assert_no_traceback(pool, mail_env)


def test_kill9_during_retr_of_a_large_message(mail_env: MailEnv, pool: Server) -> None:
    big = make_message("big", "".join(f"line {i:08d} of a large message\n" for i in range(600_000)))  # ~20 MB
    mail_env.add_user("bea", messages=[big, make_message("small")])
    before = contents(mail_env, "bea")
    c = RawClient(pool.port)
    assert c.login("bea").startswith(b"+OK Logged in, 2 messages")
    assert c.cmd("DELE 2").startswith(b"+OK")
    assert c.cmd("RETR 1").startswith(b"+OK")
    assert c.file.read(64 * 1024)  # the body is flowing; the worker is blocked writing the rest
    kill_worker(pool, "bea@127.0.0.1")
    with pytest.raises(ConnectionError):  # what was in flight, then the end: never a complete reply
        c.read_body()
    c.close()
    assert contents(mail_env, "bea") == before
    assert_no_lock_held(mail_env)
    assert_serves(pool, "bea", 2)


def test_kill9_during_update_of_5000_deletions(mail_env: MailEnv, pool: Server) -> None:
    total, marked = 5100, 5000
    maildir = mail_env.add_user("cid", messages=[])
    for i in range(total):
        mail_env.deliver("cid", f"Subject: {i}\n\nbody {i}\n".encode(), folder="cur")
    quota = maildir / "maildirsize"
    quota.write_bytes(b"0S\n0 0\n")
    if IS_ROOT:
        os.chown(quota, MAIL_UID, MAIL_GID)
    before = contents(mail_env, "cid")
    c = RawClient(pool.port, timeout=60)
    assert c.login("cid").startswith(f"+OK Logged in, {total} messages".encode())
    c.send(b"UIDL\r\n")
    assert c.readline().startswith(b"+OK")
    order = [line.split()[1].decode() for line in c.read_body().splitlines()]
    c.send(b"".join(b"DELE %d\r\n" % n for n in range(1, marked + 1)))
    for n in range(1, marked + 1):
        assert c.readline() == b"+OK Message %d deleted." % n
    first = next((maildir / "cur").glob(order[0] + ":*"))
    pid = worker_serving(pool.proc.pid, "cid@127.0.0.1")  # type: ignore[union-attr]
    c.send(b"QUIT\r\n")
    while first.exists():  # UPDATE has begun once the first marked message is gone
        pass
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 5, what="the killed worker")
    c.close()
    after = contents(mail_env, "cid")
    unlinked = set(before) - set(after)
    assert 0 < len(unlinked) < marked, f"the kill was not during UPDATE: {len(unlinked)} unlinked"
    assert unlinked <= set(order[:marked]), "a message that was not DELEd is gone"
    assert all(after[u] == before[u] for u in after), "a remaining message changed"
    # Item 22: each removal was recorded as it went; at most one message off.
    removals = quota.read_bytes().splitlines()[2:]
    assert all(re.fullmatch(rb"-\d+ -1", r) for r in removals), removals[:5]
    assert len(unlinked) - 1 <= len(removals) <= len(unlinked), (len(removals), len(unlinked))
    assert_no_lock_held(mail_env)
    assert_serves(pool, "cid", len(after))


# ---------------------------------------------------------------------------
# d.: HUP and USR1 in a loop under 100 clients, then TERM


def test_hup_usr1_storm_under_100_clients_then_term(mail_env: MailEnv) -> None:
    clients, per_box, storm = 100, 40, 8.0
    for i in range(clients):
        mail_env.add_user(f"s{i}", messages=[make_message(f"s{i}-{n}", f"body {n}\n" * 20) for n in range(per_box)])
    before = {i: contents(mail_env, f"s{i}") for i in range(clients)}
    mail_env.write_conf(max_servers="20", min_servers="4")
    srv = Server(mail_env, *POOL_ARGS).start()
    assert srv.proc is not None
    master = srv.proc.pid
    stop = threading.Event()
    confirmed: dict[int, set[str]] = {i: set() for i in range(clients)}
    tallies = {"bye": 0, "cut": 0}
    tally_lock = threading.Lock()

    def client(i: int) -> None:
        """Sessions in turn: RETR + QUIT mostly; every sixth DELE + QUIT, or DELE and a dropped connection."""
        turn = 0
        while not stop.is_set():
            turn += 1
            try:
                c = RawClient(srv.port, timeout=10)
            except (OSError, AssertionError):
                continue
            try:
                if not c.login(f"s{i}").startswith(b"+OK Logged in"):
                    continue
                status, _ = c.multi("RETR 1")
                uidl = c.cmd("UIDL 1")
                if not (status.startswith(b"+OK") and uidl.startswith(b"+OK 1 ")):
                    time.sleep(0.05)
                    continue
                if turn % 6 not in (0, 3):
                    c.cmd("QUIT")
                    continue
                if c.cmd("DELE 1") != b"+OK Message 1 deleted.":
                    continue
                if turn % 6 == 3:
                    continue  # dropped without QUIT: nothing may be deleted
                if c.cmd("QUIT").startswith(b"+OK Bye, 1 messages deleted"):
                    confirmed[i].add(uidl.split()[2].decode())
                    with tally_lock:
                        tallies["bye"] += 1
            except (OSError, AssertionError):
                with tally_lock:
                    tallies["cut"] += 1
            finally:
                c.close()

    try:
        with ThreadPoolExecutor(clients) as executor:
            futures = [executor.submit(client, i) for i in range(clients)]
            began = time.monotonic()
            n = 0
            while time.monotonic() - began < storm:
                os.kill(master, signal.SIGHUP if n % 2 == 0 else signal.SIGUSR1)
                n += 1
                time.sleep(0.3)
            stop.set()
            for f in futures:
                f.result(timeout=30)
        assert srv.proc.poll() is None, f"the master died in the storm\n{srv.output()[-3000:]}"
        assert tallies["bye"] > 0, tallies
        for i in range(clients):
            after = contents(mail_env, f"s{i}")
            lost = set(before[i]) - set(after) - confirmed[i]
            assert not lost, f"s{i}: {len(lost)} messages gone without a completed QUIT ({tallies})"
            assert set(before[i]) - set(after) == confirmed[i], f"s{i}: a confirmed deletion did not happen"
            assert all(after[u] == before[i][u] for u in after)
        wait_for(lambda: not any(os.path.basename(p) for p in _busy_locks(mail_env)), 10, what="locks released")
        assert_serves(srv, "s0", per_box - len(confirmed[0]))
        began = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(5) == 0
        assert time.monotonic() - began < 5
    finally:
        stop.set()
        srv.stop()
    assert_no_lock_held(mail_env)
    assert_no_traceback(srv, mail_env)


def _busy_locks(env: MailEnv) -> list[str]:
    """Lock files someone holds right now."""
    busy = []
    for path in env.lock_dir.iterdir() if env.lock_dir.exists() else ():
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(str(path))
        finally:
            os.close(fd)
    return busy


# ---------------------------------------------------------------------------
# e.: a full file system under the Maildir

#: In a private mount namespace: a 1 MiB tmpfs on the user's home, the staged Maildir
#: copied in (with hard links of its messages in a shadow directory, so unlinking a message
#: frees no space), the rest filled to the last page; then tpops.
_FULL_FS = r"""
set -e
home=$1; stage=$2; shift 2
mount -t tmpfs -o size=1m,mode=755,uid=65534,gid=65534 tpops-test-full "$home"
cp -a "$stage/." "$home/"
mkdir "$home/shadow"
for f in "$home"/Maildir/cur/*; do ln "$f" "$home/shadow/"; done
dd if=/dev/zero of="$home/filler" bs=4096 2>/dev/null || true
sync
exec "$@"
"""


@root_only("a private mount namespace with a tmpfs (unshare --mount)")
def test_full_file_system_at_login_and_at_update(mail_env: MailEnv) -> None:
    maildir = mail_env.add_user("dan", messages=[make_message(f"d{i}", f"body {i}\n" * 10) for i in range(6)])
    # A page-sized maildirsize: the first append needs a new page, and there is none.
    (maildir / "maildirsize").write_bytes(b"0S\n" + b"0 0\n".rjust(4093, b"\n"))
    mail_env.chown(maildir.parent)
    before = contents(mail_env, "dan")
    stage = mail_env.base / "stage"
    maildir.parent.rename(stage)
    maildir.parent.mkdir()
    srv = Server(mail_env, *POOL_ARGS)
    srv.args = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _FULL_FS, "sh",
                str(maildir.parent), str(stage), *srv.args]
    srv.start()
    assert srv.proc is not None
    try:
        inside = Path(f"/proc/{srv.proc.pid}/root") / str(maildir).lstrip("/")
        assert os.statvfs(inside).f_bavail == 0, "the tmpfs is not full"
        assert not (inside / "tpops-sizecache").exists()
        # Login: the size cache cannot be written; the session works all the same.
        c = RawClient(srv.port)
        assert c.login("dan") == b"+OK Logged in, 6 messages (%d octets)." % sum(
            len(m) + m.count(b"\n") for m in before.values())
        assert c.multi("RETR 6")[0].startswith(b"+OK")
        assert c.cmd("LIST 6").startswith(b"+OK 6 ")
        assert not (inside / "tpops-sizecache").exists()
        # UPDATE: unlinking frees nothing (hard links), maildirsize cannot grow.
        assert c.cmd("DELE 1") == b"+OK Message 1 deleted."
        assert c.cmd("DELE 2") == b"+OK Message 2 deleted."
        bye = c.cmd("QUIT")
        assert bye == b"+OK Bye, 2 messages deleted, 4 left." or bye.startswith(b"-ERR [SYS/TEMP] "), bye
        assert c.closed()
        c.close()
        after = contents(mail_env, "dan", inside)
        gone_now = set(before) - set(after)
        assert gone_now == (set(sorted(before)[:2]) if bye.startswith(b"+OK") else gone_now & set(sorted(before)[:2]))
        assert all(after[u] == before[u] for u in after)
        assert (inside / "maildirsize").stat().st_size == 4096
        assert_no_lock_held(mail_env)
        assert_serves(srv, "dan", len(after))
        # Free space again: the next login writes the cache.
        (inside.parent / "filler").unlink()
        assert_serves(srv, "dan", len(after))
        assert (inside / "tpops-sizecache").exists()
    finally:
        srv.stop()
    assert_no_traceback(srv, mail_env)
    assert "cannot update" in mail_env.error_log.read_text() and "No space left" in mail_env.error_log.read_text()


# ---------------------------------------------------------------------------
# f.: the MySQL server unreachable, then back


class Forwarder:
    """127.0.0.1:port -> MariaDB, which the test can close (refuse), stall (accept, never answer) or resume."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "up"
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener.listen(64)
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            if self.mode == "closed":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST
                client.close()
                continue
            with self.lock:
                self.conns.append(client)
            if self.mode == "stalled":
                continue  # accepted, never answered: a firewalled or hung server
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set(self, mode: str) -> None:
        """``up``, ``closed`` (every connection cut, new ones reset) or ``stalled``."""
        self.mode = mode
        if mode != "up":
            with self.lock:
                conns, self.conns = self.conns, []
            for s in conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.set("closed")
        self.listener.close()


def timed_login(port: int, user: str) -> tuple[bytes, float]:
    c = RawClient(port, timeout=30)
    try:
        assert c.cmd(f"USER {user}") == b"+OK Send your password."
        began = time.monotonic()
        reply = c.cmd("PASS secret")
        took = time.monotonic() - began
        c.cmd("QUIT")
        return reply, took
    finally:
        c.close()


def test_mysql_unreachable_then_back(mail_env: MailEnv) -> None:
    with mariadb.temp_database() as (db_server, db):
        mariadb.load_sql(db_server, db, str(NEW_SQL))
        maildir = mail_env.add_user("eve", messages=[make_message("e1"), make_message("e2")])
        conn = db_server.connect(db)
        try:
            conn.cursor().execute("insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                                  ("eve", "{PLAIN}secret", "eve@example.org", str(maildir)))
        finally:
            conn.close()
        forwarder = Forwarder((db_server.host, db_server.port))
        mail_env.write_conf(auth_type="'MySQL'", mysql_server="'127.0.0.1'", mysql_port=str(forwarder.port),
                            mysql_user=repr(db_server.user),
                            mysql_pass=repr(db_server.password) if db_server.password else "nil",
                            mysql_db=repr(db), min_servers="1", max_servers="2")
        # Root mode, sessions served as the Maildir owner. What --user needs of the driver
        # (its lazy imports done before the drop, issue 8 item 20) is tests/test_mysql_imports.py.
        srv = Server(mail_env).start()
        assert srv.proc is not None
        master = srv.proc.pid
        try:
            assert timed_login(srv.port, "eve")[0].startswith(b"+OK Logged in, 2 messages")
            for mode, tries, bound in (("closed", 2, 2.0), ("stalled", 1, 6.0)):
                forwarder.set(mode)
                for _ in range(tries):
                    reply, took = timed_login(srv.port, "eve")
                    assert reply == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later.", (mode, reply)
                    assert took < bound, f"{mode}: the login took {took:.1f} s"
                forwarder.set("up")
                reply, took = timed_login(srv.port, "eve")
                assert reply.startswith(b"+OK Logged in, 2 messages"), (mode, reply)
            assert srv.proc.pid == master and srv.proc.poll() is None
            assert contents(mail_env, "eve").keys() == {p.name.partition(":")[0] for p in mail_env.messages("eve")}
            assert len(mail_env.messages("eve")) == 2
        finally:
            srv.stop()
            forwarder.close()
        assert_no_traceback(srv, mail_env)
        log = mail_env.error_log.read_text()
        assert "MySQL" in log and "cannot connect" in log, log[-2000:]
