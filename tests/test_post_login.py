"""Root mode's login/mail split (issue 12 item 1, :mod:`tpops.postlogin`), over the wire.

A root worker authenticates, then hands the connection, its lock and the Maildir to a
post-login process of the mailbox owner that it keeps for that owner's next login.
Checked here in /proc and on the wire: the lock moves and ends with the session, the
client's pipelined input survives the hand-off, SIGTERM and SIGKILL reach the session,
the bounds ($post_login_workers, $post_login_idle) hold, TLS sessions go on in a child
the worker forks (and the worker serves on), and the access log has one line per session.
"""

from __future__ import annotations

import base64
import os
import poplib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import (
    gone,
    idle_workers,
    kept_processes,
    parent_of,
    post_login_processes,
    post_login_serving,
    proc_children,
    proc_ids,
    proc_title,
    wait_for,
    worker_serving,
    worker_titles,
)
from tests.support.server import MAIL_UID, MailEnv, Server, free_port, make_message
from tests.support.tlscerts import CertFiles, issue

pytestmark = root_only("changes identities")


def start(env: MailEnv, **settings: str) -> Server:
    env.write_conf(**{"min_servers": "1", "max_servers": "1", **settings})
    return Server(env).start()


def the_worker(master: int) -> int:
    (worker,) = wait_for(lambda: idle_workers(master), what="the idle worker")
    return worker


def wire_size(message: bytes) -> int:
    """The RFC 1939 size: every line ending counted as CRLF."""
    return len(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def open_files(pid: int) -> list[str]:
    """What the descriptors of ``pid`` point at (``socket:[...]``, paths, ...)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def access_lines(env: MailEnv, login: str) -> list[str]:
    text = env.access_log.read_text() if env.access_log.exists() else ""
    return [line for line in text.splitlines() if line.split(" ")[5:6] == [login]]


def test_the_lock_moves_with_the_session_and_ends_with_it(mail_env: MailEnv) -> None:
    mail_env.add_user("lena", messages=[make_message("1"), make_message("2")])
    srv = start(mail_env, max_servers="2", min_servers="2")
    master = srv.proc.pid
    try:
        first = RawClient(srv.port)
        assert first.login("lena").startswith(b"+OK Logged in, 2 messages")
        holder = post_login_serving(master, "lena@127.0.0.1")
        # The post-login process holds the lock: a second session is refused ...
        second = RawClient(srv.port)
        assert second.login("lena") == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
        second.close()
        # ... and no worker kept a descriptor of it: QUIT frees it for the next login.
        assert first.cmd("DELE 1").startswith(b"+OK")
        assert first.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
        first.close()
        for _ in range(3):  # whichever worker takes it, and reusing the kept process
            again = RawClient(srv.port)
            assert again.login("lena") == b"+OK Logged in, 1 messages (%d octets)." % wire_size(make_message("2"))
            assert again.cmd("QUIT").startswith(b"+OK Bye")
            again.close()
        assert proc_ids(holder)["Uid"] == [MAIL_UID] * 4
        # An idle post-login process holds its channel to the worker and nothing of a
        # session (no client socket, no lock file) nor of the worker (no listener).
        for pid in post_login_processes(master):
            wait_for(lambda: post_login_processes(master).get(pid, "").endswith((" idle", " spare")), what="idle")
            targets = open_files(pid)
            assert sum(t.startswith("socket:") for t in targets) == 1, targets
            assert not [t for t in targets if t.startswith(str(mail_env.lock_dir))], targets
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()


def test_pipelined_input_after_the_login_reaches_the_post_login_process(mail_env: MailEnv) -> None:
    message = make_message("piped")
    mail_env.add_user("pia", messages=[message])
    srv = start(mail_env)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK tpops ready.")
            s.sendall(b"USER pia\r\nPASS secret\r\nSTAT\r\nNOOP\r\nQUIT\r\n")  # one segment
            assert f.readline() == b"+OK Send your password.\r\n"
            assert f.readline() == b"+OK Logged in, 1 messages (%d octets).\r\n" % wire_size(message)
            assert f.readline() == b"+OK 1 %d\r\n" % wire_size(message)
            assert f.readline() == b"+OK\r\n"
            assert f.readline().startswith(b"+OK Bye")
            assert f.readline() == b""
        # One access-log line, written by the post-login process, with the seed's fields.
        wait_for(lambda: access_lines(mail_env, "pia"), what="the access-log line")
        (line,) = access_lines(mail_env, "pia")
        assert line.split(" ")[0] == "127.0.0.1"
        assert line.split(" ")[6:] == ["1", str(wire_size(message)), "1", str(wire_size(message))]
    finally:
        srv.stop()


def test_sigkill_of_the_post_login_process_ends_only_that_session(mail_env: MailEnv) -> None:
    mail_env.add_user("kim", messages=[make_message()])
    srv = start(mail_env)
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        c = RawClient(srv.port)
        assert c.login("kim").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("DELE 1").startswith(b"+OK")
        victim = post_login_serving(master, "kim@127.0.0.1")
        os.kill(victim, signal.SIGKILL)
        assert c.closed()
        c.close()
        assert len(mail_env.messages("kim")) == 1  # no QUIT, no UPDATE: nothing deleted
        wait_for(lambda: "post-login process %d (uid %d) ended during the session of kim" % (victim, MAIL_UID)
                 in srv.output(), what="the worker's log line")
        # The worker lives on, root and idle, and the lock died with the process.
        wait_for(lambda: worker_titles(master).get(worker) == "tpops: worker idle", what="the worker idle")
        assert proc_ids(worker)["Uid"] == [0] * 4
        again = RawClient(srv.port)
        assert again.login("kim").startswith(b"+OK Logged in, 1 messages")
        assert again.cmd("QUIT").startswith(b"+OK Bye")
        again.close()
        assert gone(victim)
    finally:
        srv.stop()


def test_sigterm_reaches_a_handed_off_session_and_leaves_no_process(mail_env: MailEnv) -> None:
    mail_env.add_user("tom", messages=[make_message()])
    srv = start(mail_env)
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("tom").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("DELE 1").startswith(b"+OK")
        worker = worker_serving(master, "tom@127.0.0.1")
        processes = {worker, *post_login_processes(master), *worker_titles(master)}
        srv.proc.send_signal(signal.SIGTERM)
        assert c.readline() == b"-ERR [SYS/TEMP] Server shutting down."
        assert c.closed()
        c.close()
        assert srv.proc.wait(timeout=15) == 0
        wait_for(lambda: all(gone(p) for p in processes), what="every worker and post-login process gone")
        assert len(mail_env.messages("tom")) == 1  # cut before UPDATE: nothing deleted
    finally:
        srv.stop()


def test_post_login_workers_bounds_the_kept_processes(mail_env: MailEnv) -> None:
    """One kept process per worker: a second owner's login ends the first owner's process."""
    mail_env.add_user("ann", messages=[make_message()])
    mail_env.add_user("bob", messages=[make_message()], uid="12345", gid="23456")
    mail_env.chown(mail_env.maildir("bob").parent, 12345, 23456)
    srv = start(mail_env, post_login_workers="1")
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        pids = {}
        for user in ("ann", "bob"):
            c = RawClient(srv.port)
            assert c.login(user).startswith(b"+OK Logged in, 1 messages")
            pids[user] = post_login_serving(master, f"{user}@127.0.0.1")
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            c.close()
        wait_for(lambda: gone(pids["ann"]), what="ann's process ended for bob's")
        kept = wait_for(lambda: kept_processes(master), what="bob's process kept")
        assert set(kept) == {pids["bob"]}
        assert parent_of(pids["bob"]) == worker
        assert proc_ids(pids["bob"])["Uid"] == [12345] * 4
    finally:
        srv.stop()


def test_an_idle_post_login_process_ends_after_post_login_idle(mail_env: MailEnv) -> None:
    mail_env.add_user("ida", messages=[make_message()])
    srv = start(mail_env, post_login_idle="1")
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        c = RawClient(srv.port)
        assert c.login("ida").startswith(b"+OK")
        pid = post_login_serving(master, "ida@127.0.0.1")
        time.sleep(1.5)  # a session is never idle time: it is still served
        assert c.cmd("STAT").startswith(b"+OK 1 ")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        wait_for(lambda: gone(pid), timeout=5, what="the idle post-login process to end")
        # The worker stays, and forks a new one for the next login.
        assert worker_titles(master).get(worker) == "tpops: worker idle"
        c = RawClient(srv.port)
        assert c.login("ida").startswith(b"+OK")
        new = post_login_serving(master, "ida@127.0.0.1")
        assert new != pid
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        # The ended process's socket went when its worker reaped it; the new one's is there.
        names = [f.name for d in Path("/run/tpops").glob("postlogin.*") for f in d.iterdir()]
        assert [n for n in names if n.endswith(f".{new}")] and not [n for n in names if n.endswith(f".{pid}")]
    finally:
        srv.stop()


def tls_server(env: MailEnv, tmp_path: Path, **settings: str) -> tuple[Server, CertFiles, int]:
    """Root mode with a certificate (STLS on the port, implicit TLS on the returned one) and tess's mailbox."""
    env.add_user("tess", messages=[make_message()])
    certs = issue(tmp_path, "rsa", name="rsa")
    tls_port = free_port()
    srv = start(env, tls_cert_file=repr(str(certs.cert_file)), tls_key_file=repr(str(certs.key_file)),
                tls_port=str(tls_port), **settings)
    return srv, certs, tls_port


def pop3s_login(port: int, certs: CertFiles, login: str = "tess") -> poplib.POP3_SSL:
    """A POP3S client logged in as ``login`` (password ``secret``)."""
    client = poplib.POP3_SSL("127.0.0.1", port, context=certs.client_context(), timeout=10)
    client.user(login)
    assert client.pass_("secret").startswith(b"+OK")
    return client


def session_child(worker: int, who: str) -> int:
    """The child of ``worker`` titled as serving ``who``."""
    def find() -> int | None:
        for pid in proc_children(worker):
            if proc_title(pid) == f"tpops: worker {who}":
                return pid
        return None
    return int(wait_for(find, what=f"the session child serving {who}"))


def test_a_tls_session_goes_on_in_a_child_and_the_worker_serves_the_next(mail_env: MailEnv, tmp_path: Path) -> None:
    """An OpenSSL connection cannot be sent to a post-login process, but a fork carries
    it: over TLS (STLS and implicit) the worker forks, the child drops to the owner and
    serves the session, and the worker, still root, serves the next client (before, it
    dropped itself and ended: a new worker per TLS session)."""
    srv, certs, tls_port = tls_server(mail_env, tmp_path)
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        client = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        client.stls(certs.client_context())
        client.user("tess")
        client.pass_("secret")
        child = session_child(worker, "tess@127.0.0.1")
        assert proc_ids(child)["Uid"] == [MAIL_UID] * 4
        assert proc_ids(worker)["Uid"] == [0] * 4  # the worker did not drop
        assert kept_processes(master) == {}  # no post-login process: a TLS session stays in this family
        lock_file = [f for f in open_files(child) if f.startswith(str(mail_env.lock_dir))]
        assert lock_file and not [f for f in open_files(worker) if f.startswith(str(mail_env.lock_dir))]
        assert client.stat()[0] == 1
        client.quit()
        wait_for(lambda: gone(child), what="the session child to end")
        implicit = pop3s_login(tls_port, certs)
        second = session_child(worker, "tess@127.0.0.1")  # the same worker, still there
        assert second != child and parent_of(second) == worker
        assert implicit.retr(1)[0].startswith(b"+OK")
        implicit.quit()
        wait_for(lambda: gone(second), what="the second session child to end")
        assert set(worker_titles(master)) == {worker}
        assert len(access_lines(mail_env, "tess")) == 2  # one line per session, written by the child
    finally:
        srv.stop()


def test_a_killed_tls_session_child_frees_the_lock_and_the_worker_goes_on(mail_env: MailEnv, tmp_path: Path) -> None:
    srv, certs, tls_port = tls_server(mail_env, tmp_path)
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        client = pop3s_login(tls_port, certs)  # kept open: a collected client would end the session
        child = session_child(worker, "tess@127.0.0.1")
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: gone(child) and proc_title(worker) == "tpops: worker idle", what="the worker idle again")
        pop3s_login(tls_port, certs).quit()  # the lock died with the child
        assert set(worker_titles(master)) == {worker}
        client.close()
    finally:
        srv.stop()


def test_sigterm_ends_a_forked_tls_session_and_leaves_no_process(mail_env: MailEnv, tmp_path: Path) -> None:
    srv, certs, tls_port = tls_server(mail_env, tmp_path)
    master = srv.proc.pid
    try:
        worker = the_worker(master)
        client = pop3s_login(tls_port, certs)
        assert client.dele(1).startswith(b"+OK")
        child = session_child(worker, "tess@127.0.0.1")
        os.kill(master, signal.SIGTERM)
        wait_for(lambda: gone(child), what="the session child to end")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Server shutting down"):
            client.stat()  # the farewell the child wrote when its session was cut
        assert srv.proc.wait(timeout=20) == 0
        wait_for(lambda: gone(worker), what="the worker gone")
        assert len(mail_env.messages("tess")) == 1  # cut before UPDATE: nothing deleted
    finally:
        srv.stop()  # also when a check failed: no master left running


def test_any_worker_reuses_the_owners_process_and_it_outlives_its_worker(mail_env: MailEnv) -> None:
    """The post-login processes belong to the pool: a login accepted by any worker reuses
    the owner's idle process, and a worker that retires leaves its processes to the
    master (a subreaper), which reaps them when they end."""
    mail_env.add_user("ola", messages=[make_message()])
    srv = start(mail_env, min_servers="3", max_servers="3")
    master = srv.proc.pid
    try:
        wait_for(lambda: len(idle_workers(master)) == 3, what="three idle workers")
        c = RawClient(srv.port)
        assert c.login("ola").startswith(b"+OK")
        process = post_login_serving(master, "ola@127.0.0.1")
        forker = parent_of(process)
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        wait_for(lambda: post_login_processes(master).get(process, "").endswith(" idle"), what="idle")
        # Held connections keep the forking worker busy: the next login goes to another one.
        os.kill(forker, signal.SIGUSR1)  # the forking worker retires ...
        wait_for(lambda: gone(forker), what="the worker to retire")
        assert not gone(process)  # ... its post-login process stays, adopted by the master
        wait_for(lambda: parent_of(process) == master, what="the master to adopt it")
        for _ in range(3):
            c = RawClient(srv.port)
            assert c.login("ola").startswith(b"+OK")
            assert worker_serving(master, "ola@127.0.0.1") == process
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            c.close()
        directory = [Path(p) for p in Path("/run/tpops").glob("postlogin.*")] if Path("/run/tpops").exists() else []
        mine = [d for d in directory if any(f.name.endswith(f".{process}") for f in d.iterdir())]
        assert len(mine) == 1 and (mine[0].stat().st_mode & 0o777) == 0o700 and mine[0].stat().st_uid == 0
    finally:
        srv.stop()
    wait_for(lambda: gone(process), what="the post-login process to end with the server")
    assert not mine[0].exists()  # the socket directory goes with the master


def test_a_killed_masters_socket_directory_is_removed_at_the_next_start(mail_env: MailEnv) -> None:
    """A master ended by SIGKILL cannot remove its ``postlogin.PID.*`` directory; the next
    master removes those whose pid is gone, and leaves a running one's alone."""
    mail_env.add_user("stale", messages=[make_message()])
    run = Path("/run/tpops")
    run.mkdir(mode=0o755, exist_ok=True)
    victim = subprocess.Popen(["sleep", "60"])  # a master, killed as SIGKILL would
    victim.kill()
    victim.wait()
    dead = run / f"postlogin.{victim.pid}.k1ll3d"
    alive = run / f"postlogin.{os.getpid()}.l1v1ng"  # this test process stands for another tpops
    for d in (dead, alive):
        d.mkdir(mode=0o700)
        leftover = socket.socket(socket.AF_UNIX)
        leftover.bind(str(d / f"{MAIL_UID}.{MAIL_UID}.123"))
        leftover.close()
    try:
        srv = start(mail_env)
        try:
            master = srv.proc.pid
            c = RawClient(srv.port)
            assert c.login("stale").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            c.close()
            assert not dead.exists()
            assert alive.exists() and any(alive.iterdir())
            assert [p.name.split(".")[1] for p in run.glob(f"postlogin.{master}.*")] == [str(master)]
            wait_for(lambda: f"removed {dead}, left by tpops master {victim.pid}, which is gone" in srv.output(),
                     what="the log line")
        finally:
            srv.stop()
    finally:
        shutil.rmtree(alive, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)


def test_a_reload_ends_the_post_login_processes(mail_env: MailEnv) -> None:
    mail_env.add_user("rob", messages=[make_message()])
    srv = start(mail_env)
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("rob").startswith(b"+OK")
        old = post_login_serving(master, "rob@127.0.0.1")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: gone(old), what="the old configuration's post-login process to end")
        c = RawClient(srv.port)
        assert c.login("rob").startswith(b"+OK Logged in, 1 messages")
        assert post_login_serving(master, "rob@127.0.0.1") != old
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()


def test_a_sasl_login_is_handed_off_too(mail_env: MailEnv) -> None:
    """AUTH PLAIN ends in the same hand-off as PASS (the exchange's last line logs in)."""
    mail_env.add_user("sal", messages=[make_message()])
    srv = start(mail_env)
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        token = base64.b64encode(b"\0sal\0secret").decode()
        assert c.cmd(f"AUTH PLAIN {token}").startswith(b"+OK Logged in, 1 messages")
        pid = post_login_serving(master, "sal@127.0.0.1")
        assert proc_ids(pid)["Uid"] == [MAIL_UID] * 4
        assert c.cmd("STAT").startswith(b"+OK 1 ")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()


def spares(master: int) -> set[int]:
    return {pid for pid, title in post_login_processes(master).items() if title == "tpops: post-login spare"}


def test_a_new_owners_first_login_takes_a_spare_forked_ahead(mail_env: MailEnv) -> None:
    """After each session a worker keeps two spare post-login processes forked (root,
    bound to no one, like Dovecot's process_min_avail): a new owner's first login takes
    one, which drops to the owner before it touches the session, instead of a fork on
    the client's time."""
    mail_env.add_user("bob", messages=[make_message()], uid="12345", gid="23456")
    mail_env.chown(mail_env.maildir("bob").parent, 12345, 23456)
    srv = start(mail_env)
    master = srv.proc.pid
    try:
        ahead = wait_for(lambda: len(spares(master)) == 2 and spares(master), what="two spares")
        assert all(proc_ids(p)["Uid"] == [0] * 4 for p in ahead)  # nobody's yet
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK Logged in, 1 messages")
        pid = post_login_serving(master, "bob@127.0.0.1")
        assert pid in ahead
        assert proc_ids(pid)["Uid"] == [12345] * 4 and proc_ids(pid)["Gid"] == [23456] * 4
        names = [f.name for d in Path("/run/tpops").glob("postlogin.*") for f in d.iterdir()]
        assert f"12345.23456.{pid}" in names and f"spare.{pid}" not in names  # renamed by root
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        wait_for(lambda: len(spares(master)) == 2 and pid not in spares(master), what="the spares replenished")
    finally:
        srv.stop()
