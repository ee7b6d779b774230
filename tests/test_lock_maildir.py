"""$mailbox_lock = 'maildir': the OFD lock file in the Maildir root, and the size cache written by two processes at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.server import IS_ROOT, MAIL_GID, MAIL_UID, MailEnv, make_message
from tpops.auth.base import AuthUnavailable, MailboxInUse, MailUser, lock_on_host
from tpops.config import Config, check_config
from tpops.mailbox import maildir as maildir_module
from tpops.mailbox.lock import (
    MAILDIR_LOCK_NAME,
    NoMailboxLock,
    acquire_in_maildir,
    lock_kind,
)
from tpops.mailbox.maildir import SIZE_CACHE_NAME, Maildir


def make_maildir(base: Path, messages: int = 0) -> Path:
    md = base / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    for i in range(messages):
        (md / "cur" / f"{1700000000 + i}.M{i}P1.host:2,").write_bytes(make_message(f"m{i}"))
    return md


def _hold(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    acquire_in_maildir(path, "x")
    ready.set()
    time.sleep(60)


def test_second_lock_is_refused_and_release_frees_it(tmp_path: Path) -> None:
    md = str(make_maildir(tmp_path))
    held = acquire_in_maildir(md, "tommy")
    with pytest.raises(MailboxInUse):
        acquire_in_maildir(md, "tommy")  # an OFD lock conflicts even within one process
    assert held.still_held()
    held.release()
    held.release()  # idempotent
    assert not held.still_held()
    acquire_in_maildir(md, "tommy").release()


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path) -> None:
    md = str(make_maildir(tmp_path))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(md, ready))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(MailboxInUse):
            acquire_in_maildir(md, "x")
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        acquire_in_maildir(md, "x").release()  # nothing stale on disk
    finally:
        if holder.is_alive():
            holder.kill()


def test_lock_file_is_never_a_message_and_is_the_owners(tmp_path: Path) -> None:
    md = make_maildir(tmp_path, messages=2)
    if IS_ROOT:
        for p in (md, md / "cur", md / "new", md / "tmp", *(md / "cur").iterdir()):
            os.chown(p, MAIL_UID, MAIL_GID)
    lock = acquire_in_maildir(str(md), "tommy")
    try:
        st = (md / MAILDIR_LOCK_NAME).stat()
        assert st.st_mode & 0o777 == 0o600
        if IS_ROOT:
            assert (st.st_uid, st.st_gid) == (MAIL_UID, MAIL_GID)  # created by root, handed to the owner
        mailbox = Maildir.open(str(md))
        assert len(mailbox.messages) == 2
    finally:
        lock.release()


def test_symlink_or_fifo_in_place_of_the_lock_file_is_refused(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    (md / MAILDIR_LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AuthUnavailable):
        lock_on_host("maildir", MailUser("tommy", str(md)), str(tmp_path / "locks"))
    assert not (tmp_path / "elsewhere").exists()
    (md / MAILDIR_LOCK_NAME).unlink()
    os.mkfifo(md / MAILDIR_LOCK_NAME)
    with pytest.raises(AuthUnavailable):  # opened O_NONBLOCK: no hang, then refused
        lock_on_host("maildir", MailUser("tommy", str(md)), str(tmp_path / "locks"))


def test_missing_maildir_needs_no_lock(tmp_path: Path) -> None:
    lock = acquire_in_maildir(str(tmp_path / "nothing"), "tommy")
    assert isinstance(lock, NoMailboxLock) and lock.still_held()
    lock.release()
    assert not lock.still_held()


def test_mailbox_lock_parameter() -> None:
    assert lock_kind(None, "MySQL") == "mysql" and lock_kind(None, "File") == "local"
    assert lock_kind("maildir", "MySQL") == "maildir"
    assert any("$mailbox_lock must be one of" in e for e in check_config(Config(mailbox_lock="nfs")))
    assert any("not an address" in e for e in check_config(Config(haproxy_trusted_networks="10.0.0.0/40")))
    assert not check_config(Config(mailbox_lock="maildir", haproxy_trusted_networks="127.0.0.2 127.0.0.3"))


def test_file_backend_with_maildir_lock_over_the_wire(mail_env: MailEnv) -> None:
    """Two servers on one Maildir tree (different lock directories): 'maildir' makes them exclude each other."""
    from tests.support.client import RawClient
    from tests.support.server import Server

    mail_env.add_user("tommy", messages=[make_message("one")])
    mail_env.write_conf(mailbox_lock="'maildir'")
    one = Server(mail_env).start()
    mail_env.write_conf(passwd_lock_dir=repr(str(mail_env.base / "locks2")))
    two = Server(mail_env).start()
    try:
        first = RawClient(one.port)
        assert first.login("tommy").startswith(b"+OK")
        second = RawClient(two.port)
        assert second.login("tommy").startswith(b"-ERR [IN-USE]")
        first.cmd("QUIT")
        first.close()
        second.close()
        time.sleep(0.2)
        third = RawClient(two.port)
        assert third.login("tommy").startswith(b"+OK")
        third.cmd("QUIT")
        third.close()
    finally:
        one.stop()
        two.stop()


def _rebuild(md: str, rounds: int) -> None:
    for _ in range(rounds):
        fd = os.open(md, os.O_RDONLY | os.O_DIRECTORY)
        try:
            cache = maildir_module._SizeCache(fd, md)
            assert cache.valid  # never a half-written cache, whoever renamed last
            cache.valid = False  # rewrite it anyway: both processes race on every round
            cache.save({f"{1700000000 + i}.M{i}P1.host": 100 + i for i in range(50)}, {"1700000000.M0P1.host"})
        finally:
            os.close(fd)


def test_size_cache_rebuilt_by_two_processes_at_once_stays_whole(tmp_path: Path) -> None:
    """Two nodes rebuilding ``tpops-sizecache`` at once: unique temp names (host, pid,
    random), atomic renames: the cache is always whole and no temporary file is left."""
    md = str(make_maildir(tmp_path))
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_rebuild, args=(md, 200)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    data = (Path(md) / SIZE_CACHE_NAME).read_bytes()
    entries, verbatim = maildir_module._SizeCache._parse(data)
    assert entries == {f"{1700000000 + i}.M{i}P1.host": 100 + i for i in range(50)}
    assert verbatim == {"1700000000.M0P1.host"}
    assert sorted(os.listdir(md)) == sorted(["cur", "new", "tmp", SIZE_CACHE_NAME])
    assert maildir_module._HOST and "/" not in maildir_module._HOST


def test_file_backend_with_mysql_locks(tmp_path: Path) -> None:
    """$mailbox_lock = 'mysql' for a File backend: GET_LOCK through a connection of its own,
    seen by another node's authenticator; released, the other one gets it."""
    from tests.support import mariadb
    from tpops.auth import make_authenticator

    users = tmp_path / "users"
    users.write_text(f"tommy:{{PLAIN}}secret::::{tmp_path}::\n")
    with mariadb.temp_database() as (srv, db):
        config = Config(auth_type="File", auth_file=str(users), mailbox_lock="mysql", mysql_server=srv.host,
                        mysql_port=srv.port, mysql_user=srv.user, mysql_pass=srv.password, mysql_db=db)
        one, two = make_authenticator(config), make_authenticator(config)
        try:
            one.prepare()
            one.check()
            user = MailUser("tommy", str(tmp_path / "Maildir"))
            held = one.lock(user)
            with pytest.raises(MailboxInUse):
                two.lock(user)
            assert held.still_held()
            held.release()
            two.lock(user).release()
        finally:
            one.close()
            two.close()
