"""The privilege ladder, checked in /proc: sessions served as the mailbox owner, --user
workers, uid 0 refused, and a server run by an unprivileged user."""

from __future__ import annotations

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import (
    gone,
    idle_workers,
    kept_processes,
    parent_of,
    post_login_processes,
    post_login_serving,
    proc_ids,
    wait_for,
    worker_serving,
    worker_titles,
)
from tests.support.server import MAIL_GID, MAIL_UID, MailEnv, Server, make_message
from tests.support.users import as_user

pytestmark = root_only("changes identities")


def assert_runs_as(pid: int, uid: int, gid: int) -> None:
    ids = proc_ids(pid)
    assert ids["Uid"] == [uid] * 4, ids  # real, effective, saved, filesystem
    assert ids["Gid"] == [gid] * 4, ids
    assert ids["Groups"] == [], ids


def test_root_without_user_serves_each_session_as_the_mailbox_owner(mail_env: MailEnv) -> None:
    """Root mode: the worker authenticates as root and hands the session to a post-login
    process of the mailbox owner (its child), which is kept for that owner's next login;
    the worker itself stays root and serves on."""
    mail_env.add_user("owned", messages=[make_message(), make_message()])  # no ids in the file: the Maildir's owner
    mail_env.add_user("numbered", messages=[make_message(), make_message()], uid="12345", gid="23456")
    mail_env.chown(mail_env.maildir("numbered").parent, 12345, 23456)
    mail_env.write_conf(min_servers="1", max_servers="1")
    srv = Server(mail_env).start()
    master = srv.proc.pid
    try:
        assert_runs_as(master, 0, 0)
        (worker,) = wait_for(lambda: idle_workers(master), what="the idle worker")
        assert_runs_as(worker, 0, 0)  # it authenticates as root
        for user, uid, gid in (("owned", MAIL_UID, MAIL_GID), ("numbered", 12345, 23456)):
            served_by = set()
            for left in (1, 0):
                c = RawClient(srv.port)
                assert c.login(user).startswith(b"+OK Logged in, ")
                pid = post_login_serving(master, f"{user}@127.0.0.1")
                assert parent_of(pid) == worker
                assert_runs_as(pid, uid, gid)
                assert worker_titles(master)[worker].startswith("tpops: worker 127.0.0.1 (post-login uid ")
                assert c.cmd("DELE 1").startswith(b"+OK")
                assert c.cmd("QUIT") == f"+OK Bye, 1 messages deleted, {left} left.".encode()
                c.close()
                served_by.add(pid)
                # The worker is root and idle again; the owner's process waits for the next login.
                wait_for(lambda: worker_titles(master).get(worker) == "tpops: worker idle", what="the worker idle")
                assert_runs_as(worker, 0, 0)
                wait_for(lambda: post_login_processes(master).get(pid) == f"tpops: post-login uid {uid} idle",
                         what="the post-login process idle")
            assert len(served_by) == 1, "the owner's second login did not reuse its post-login process"
            assert mail_env.messages(user) == []
        # One process per owner, both kept (no process ever served both uids).
        kept = kept_processes(master)
        assert sorted(proc_ids(p)["Uid"][0] for p in kept) == sorted([MAIL_UID, 12345]), kept
        assert idle_workers(master) == {worker}
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()


def test_without_post_login_workers_a_session_ends_its_worker(mail_env: MailEnv) -> None:
    """$post_login_workers = 0: the worker itself drops to the owner for the session, and,
    never able to be root again, ends after it (the pre-split behaviour)."""
    mail_env.add_user("owned", messages=[make_message()])
    mail_env.write_conf(post_login_workers="0")
    srv = Server(mail_env).start()
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        assert c.login("owned").startswith(b"+OK Logged in, 1 messages")
        pid = worker_serving(master, "owned@127.0.0.1")
        assert_runs_as(pid, MAIL_UID, MAIL_GID)
        assert post_login_processes(master) == {}
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 0 left."
        c.close()
        wait_for(lambda: gone(pid), what="the worker to end after the session")
        wait_for(lambda: len(idle_workers(master) - {pid}) >= 2, what="replacement workers")
        assert mail_env.messages("owned") == []
    finally:
        srv.stop()


def test_user_and_group_run_workers_for_good(mail_env: MailEnv) -> None:
    mail_env.add_user("vera", messages=[make_message(), make_message()])
    for args, gid in ((["--user", "nobody", "--group", "nogroup"], MAIL_GID), (["--user", "65534", "--group", "4242"], 4242)):
        srv = Server(mail_env, *args).start()
        master = srv.proc.pid
        try:
            assert_runs_as(master, 0, 0)
            workers = wait_for(lambda: idle_workers(master), what="idle workers")
            for pid in workers:
                assert_runs_as(pid, MAIL_UID, gid)
            c = RawClient(srv.port)
            assert c.login("vera").startswith(b"+OK")
            pid = worker_serving(master, "vera@127.0.0.1")
            assert_runs_as(pid, MAIL_UID, gid)
            assert c.cmd("QUIT").startswith(b"+OK Bye")
            c.close()
            wait_for(lambda: worker_titles(master).get(pid) == "tpops: worker idle", what="the same worker idle again")
        finally:
            srv.stop()


def test_a_session_that_would_run_as_root_is_refused(mail_env: MailEnv) -> None:
    mail_env.add_user("rooted", messages=[make_message()], uid="0", gid="0")
    mail_env.add_user("rootowned", messages=[make_message()])
    mail_env.chown(mail_env.maildir("rootowned").parent, 0, 0)
    srv = Server(mail_env).start()
    master = srv.proc.pid
    try:
        c = RawClient(srv.port)
        # A File line naming uid 0 never authenticates (the backend refuses the line) ...
        assert c.login("rooted") == b"-ERR [AUTH] Authentication failed."
        # ... and a Maildir owned by root, with no ids in the line, is refused after login.
        assert c.login("rootowned") == b"-ERR [SYS/PERM] This mailbox cannot be served."
        pid = worker_serving(master, "127.0.0.1")
        assert_runs_as(pid, 0, 0)  # nothing was switched: the worker may serve on
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
    finally:
        srv.stop()
    log = mail_env.error_log.read_text()
    assert "refusing to serve rootowned from 127.0.0.1: would serve the mailbox as root (uid 0)" in log
    assert len(mail_env.messages("rooted")) == len(mail_env.messages("rootowned")) == 1


def test_not_root_runs_everything_as_the_invoking_user(mail_env: MailEnv) -> None:
    mail_env.add_user("nora", messages=[make_message(), make_message()])
    mail_env.chown(mail_env.base)  # the whole set-up belongs to nobody, who starts tpops
    srv = Server(mail_env)
    srv.args = as_user(mail_env.base, MAIL_UID, MAIL_GID, srv.args)
    srv.start()
    master = srv.proc.pid
    try:
        assert_runs_as(master, MAIL_UID, MAIL_GID)
        for pid in wait_for(lambda: idle_workers(master), what="idle workers"):
            assert_runs_as(pid, MAIL_UID, MAIL_GID)
        c = RawClient(srv.port)
        assert c.login("nora").startswith(b"+OK Logged in, 2 messages")
        pid = worker_serving(master, "nora@127.0.0.1")
        assert_runs_as(pid, MAIL_UID, MAIL_GID)
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
        c.close()
        wait_for(lambda: worker_titles(master).get(pid) == "tpops: worker idle", what="the worker serving again")
    finally:
        srv.stop()
    assert len(mail_env.messages("nora")) == 1
    assert mail_env.lock_dir.stat().st_uid == MAIL_UID
