"""Two tpops nodes behind a real HAProxy (TCP, send-proxy-v2, tcp-check health checks), users in
MariaDB, one shared Maildir tree, cluster-wide locks ($mailbox_lock 'maildir', then 'mysql').

What docs/SCALING.md promises, shown end to end: clients spread over both nodes and logged with
their real address; a mailbox open on one node is [IN-USE] on the other; HUP/USR1 of a node
under load and 200+ concurrent client sessions lose no message and deliver none twice; a node
killed with SIGKILL mid-session deleted nothing, its lock is free, and HAProxy sends new clients
to the other node. TPOPS_CLUSTER_SECONDS sets the load phase (default 15 s; the issue's 60 s
run: TPOPS_CLUSTER_SECONDS=60).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import mariadb
from tests.support.marks import IN_CI
from tests.support.procs import proc_children, stop_process, wait_for, worker_serving
from tests.support.proxy import wait_for_proxied_port
from tests.support.server import POOL_ARGS, TPOPS, MailEnv, free_port, make_message

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LOAD_SECONDS = float(os.environ.get("TPOPS_CLUSTER_SECONDS", "15"))
CLIENT_ADDRESS = "127.0.0.9"
MAILBOXES = [f"u{i:02d}" for i in range(16)]
PER_MAILBOX = 40
SUBJECT = re.compile(rb"^Subject: (m-\S+)\r?$", re.MULTILINE)

# scripts/test installs haproxy; in CI (CI=true) a missing one fails instead of skipping.
pytestmark = pytest.mark.skipif(not os.path.exists(HAPROXY) and not IN_CI,
                                reason="haproxy not installed (scripts/test installs it)")


@dataclass
class Node:
    name: str
    host: str
    port: int
    conf: Path
    access_log: Path
    error_log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, base: Path) -> None:
        out = (base / f"{self.name}.out").open("ab")
        self.proc = subprocess.Popen(
            [TPOPS, "--fg", "-f", str(self.conf), "--port", str(self.port), "--bind", self.host, *POOL_ARGS],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.close()
        wait_for_proxied_port(self.port, self.proc, host=self.host)

    def kill9(self) -> None:
        """SIGKILL the master and every worker at once (a node that loses power)."""
        assert self.proc is not None
        pids = [self.proc.pid, *proc_children(self.proc.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


@dataclass
class Cluster:
    base: Path
    env: MailEnv
    nodes: list[Node]
    front: int
    haproxy: subprocess.Popen[bytes]
    delivered: list[bytes] = field(default_factory=list)


def _haproxy_config(front: int, nodes: list[Node]) -> str:
    servers = "\n".join(
        f"  server {n.name} {n.host}:{n.port} send-proxy-v2 check-send-proxy check inter 200ms fall 2 rise 2"
        for n in nodes)
    return f"""global
  maxconn 1000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 2
  option redispatch
frontend pop3
  bind 127.0.0.1:{front}
  default_backend tpops
backend tpops
  balance roundrobin
  option tcp-check
  tcp-check expect string +OK
  tcp-check send QUIT\\r\\n
{servers}
"""


@pytest.fixture(scope="module", params=["maildir", "mysql"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    lock = request.param
    base = Path(tempfile.mkdtemp(prefix="tpops-cluster-"))
    base.chmod(0o755)
    env = MailEnv(base)
    procs: list[subprocess.Popen[bytes]] = []
    with mariadb.temp_database() as (srv, db):
        conn = srv.connect(db)
        cur = conn.cursor()
        cur.execute("CREATE TABLE user (login VARCHAR(64) PRIMARY KEY, passwd VARCHAR(128), "
                    "uid INT, maildir VARCHAR(255))")
        for i, name in enumerate([*MAILBOXES, "tommy", "victim"]):
            messages = [make_message(f"m-{name}-{k}") for k in range(PER_MAILBOX if name in MAILBOXES else 3)]
            env.add_user(name, messages=messages)
            cur.execute("INSERT INTO user VALUES (%s, %s, %s, %s)",
                        (name, "{PLAIN}secret", i, str(env.maildir(name))))
        conn.commit()
        conn.close()
        nodes = []
        for k, host in enumerate(("127.0.0.2", "127.0.0.3"), 1):
            node = Node(f"n{k}", host, free_port(), base / f"n{k}.conf", base / f"n{k}-access.log",
                        base / f"n{k}-error.log")
            settings = {
                "auth_type": "'MySQL'", "mysql_server": "'127.0.0.1'" if srv.host == "127.0.0.1" else repr(srv.host),
                "mysql_port": str(srv.port), "mysql_user": repr(srv.user), "mysql_pass": repr(srv.password or ""),
                "mysql_db": repr(db), "mailbox_lock": repr(lock),
                "haproxy_trusted_networks": "'127.0.0.1'", "max_connections_per_ip": "0",
                "passwd_lock_dir": repr(str(base / f"locks-n{k}")),
                "access_log": repr(str(node.access_log)), "error_log": repr(str(node.error_log)),
                "syslog_facility": "nil", "error_interval": "0", "min_servers": "6", "max_servers": "16",
                "max_idle": "100", "hostname": f"'{node.name}.test'", "debug": "true",
            }
            node.conf.write_text("".join(f"${k} = {v}\n" for k, v in settings.items()))
            node.start(base)
            assert node.proc is not None
            procs.append(node.proc)
            nodes.append(node)
        front = free_port()
        (base / "haproxy.cfg").write_text(_haproxy_config(front, nodes))
        hap_out = (base / "haproxy.out").open("ab")
        haproxy = subprocess.Popen([HAPROXY, "-f", str(base / "haproxy.cfg"), "-db"],
                                   stdin=subprocess.DEVNULL, stdout=hap_out, stderr=hap_out)
        hap_out.close()
        procs.append(haproxy)
        try:
            wait_for(lambda: _greeting(front), timeout=10, what="HAProxy forwarding")
            yield Cluster(base, env, nodes, front, haproxy)
        finally:
            for p in procs:
                if p.poll() is None:
                    stop_process(p, timeout=10.0)
            shutil.rmtree(base, ignore_errors=True)


def _greeting(front: int) -> bool:
    try:
        with _client(front) as c:
            ok = c.line().startswith(b"+OK")
            c.send(b"QUIT\r\n")
            return ok
    except OSError:
        return False


class _client:
    """A POP3 client bound to 127.0.0.9, through HAProxy."""

    def __init__(self, front: int, timeout: float = 10) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        try:
            self.sock.bind((CLIENT_ADDRESS, 0))
            self.sock.connect(("127.0.0.1", front))
        except BaseException:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> _client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed")
        return line[:-2]

    def cmd(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def body(self) -> bytes:
        out = []
        while (line := self.file.readline()) != b".\r\n":
            if not line:
                raise ConnectionError("connection closed mid-body")
            out.append(line)
        return b"".join(out)

    def login(self, user: str) -> bytes:
        assert self.line().startswith(b"+OK")
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd("PASS secret")


def _access_lines(node: Node) -> list[str]:
    return node.access_log.read_text().splitlines() if node.access_log.exists() else []


def _node_serving(cluster: Cluster, who: str) -> Node:
    for node in cluster.nodes:
        assert node.proc is not None
        try:
            worker_serving(node.proc.pid, who, timeout=0.5)
            return node
        except AssertionError:
            continue
    raise AssertionError(f"no node serves {who}")


def test_clients_spread_over_both_nodes_with_their_real_address(cluster: Cluster) -> None:
    before = [len(_access_lines(n)) for n in cluster.nodes]
    for _ in range(6):
        with _client(cluster.front) as c:
            assert c.login("tommy").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
    time.sleep(0.3)
    for node, seen in zip(cluster.nodes, before, strict=True):
        new = _access_lines(node)[seen:]
        assert any("tommy" in line and CLIENT_ADDRESS in line for line in new), (node.name, new)
        assert not any("127.0.0.1" in line and "tommy" in line for line in new)  # never the balancer's address
    debug = "".join((cluster.base / f"{n.name}.out").read_text(errors="replace") for n in cluster.nodes)
    assert f"client {CLIENT_ADDRESS}" in debug  # --debug names the client


def test_one_mailbox_through_two_nodes_is_in_use(cluster: Cluster) -> None:
    with _client(cluster.front) as first:
        assert first.login("tommy").startswith(b"+OK")
        holder = _node_serving(cluster, f"tommy@{CLIENT_ADDRESS}")
        other = next(n for n in cluster.nodes if n is not holder)
        mark = other.error_log.stat().st_size if other.error_log.exists() else 0
        for _ in range(4):  # round robin: at least two of these land on the other node
            with _client(cluster.front) as second:
                assert second.login("tommy").startswith(b"-ERR [IN-USE]")
        refusals = other.error_log.read_bytes()[mark:].decode(errors="replace")
        assert f"cannot lock for tommy from {CLIENT_ADDRESS}: mailbox in use" in refusals
        assert first.cmd("QUIT").startswith(b"+OK")


def _session(cluster: Cluster, rng: random.Random, delivered: list[bytes], lock: threading.Lock) -> str:
    """One client: log in to a random mailbox, RETR and DELE up to 3 messages, QUIT.
    Deliveries count only when QUIT said +OK (the deletions are committed then)."""
    user = rng.choice(MAILBOXES)
    try:
        with _client(cluster.front, timeout=20) as c:
            reply = c.login(user)
            if reply.startswith(b"-ERR [IN-USE]"):
                return "in-use"
            assert reply.startswith(b"+OK"), reply
            count = int(c.cmd("STAT").split()[1])
            got = []
            for n in range(1, min(count, 3) + 1):
                assert c.cmd(f"RETR {n}").startswith(b"+OK")
                m = SUBJECT.search(c.body())
                assert m is not None
                got.append(m.group(1))
                assert c.cmd(f"DELE {n}").startswith(b"+OK")
            if c.cmd("QUIT").startswith(b"+OK"):
                with lock:
                    delivered.extend(got)
                return "ok"
            return "quit-failed"
    except (ConnectionError, TimeoutError, OSError):
        return "cut"  # a reload cut it: nothing it marked was deleted


def test_load_with_reloads_loses_nothing_and_duplicates_nothing(cluster: Cluster) -> None:
    lock = threading.Lock()
    results: list[str] = []
    deadline = time.monotonic() + LOAD_SECONDS
    node = cluster.nodes[0]
    assert node.proc is not None

    def signals() -> None:
        time.sleep(LOAD_SECONDS / 3)
        os.kill(node.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(LOAD_SECONDS / 3)
        os.kill(node.proc.pid, signal.SIGUSR1)  # type: ignore[union-attr]

    signaller = threading.Thread(target=signals)
    signaller.start()
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = []
        i = 0
        while time.monotonic() < deadline or i < 200:
            futures = [f for f in futures if not f.done()]
            if len(futures) >= 40:
                time.sleep(0.005)
                continue
            futures.append(pool.submit(_session, cluster, random.Random(i), cluster.delivered, lock))
            results.append("")  # counted as submitted
            i += 1
        # every submitted session's result
    signaller.join()
    assert i >= 200
    assert node.proc.poll() is None  # the reloads kept the node up
    delivered = cluster.delivered
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    remaining = set()
    for user in MAILBOXES:
        for p in cluster.env.messages(user):
            m = SUBJECT.search(p.read_bytes().replace(b"\n", b"\r\n"))
            assert m is not None
            remaining.add(m.group(1))
    everything = {f"m-{u}-{k}".encode() for u in MAILBOXES for k in range(PER_MAILBOX)}
    assert remaining | set(delivered) == everything, "a message was lost"
    assert not remaining & set(delivered), "a delivered message is still there"
    assert len(delivered) > 50  # real work was done
    for n in cluster.nodes:
        assert any(CLIENT_ADDRESS in line for line in _access_lines(n))


def test_node_killed_mid_session_deletes_nothing_frees_its_lock_and_is_routed_around(cluster: Cluster) -> None:
    c = _client(cluster.front)
    try:
        assert c.login("victim").startswith(b"+OK")
        victim_node = _node_serving(cluster, f"victim@{CLIENT_ADDRESS}")
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("DELE 2").startswith(b"+OK")
        victim_node.kill9()
    finally:
        c.sock.close()
    survivor = next(n for n in cluster.nodes if n is not victim_node)
    assert len(cluster.env.messages("victim")) == 3  # nothing deleted without QUIT
    # Until the health check marks the node down, HAProxy may still pick it (then retries/redispatches).
    wait_for(lambda: "DOWN" in (cluster.base / "haproxy.out").read_text(errors="replace"), timeout=10,
             what="HAProxy marking the killed node down")
    mark = len(_access_lines(survivor))
    for _ in range(4):
        with _client(cluster.front) as again:
            assert again.login("victim").startswith(b"+OK")  # the lock died with the node
            assert again.cmd("STAT").startswith(b"+OK 3 ")
            assert again.cmd("QUIT").startswith(b"+OK")
    time.sleep(0.3)
    assert sum("victim" in line for line in _access_lines(survivor)[mark:]) == 4  # all on the survivor
