"""A MySQL GET_LOCK lost with its connection is noticed before UPDATE (issue 8 item 17)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mariadb
from tpops.auth.base import MailboxInUse
from tpops.auth.mysql import MySQLAuthenticator
from tpops.config import Config
from tpops.mailbox.lock import acquire

NEW_SQL = Path(__file__).resolve().parents[1] / "tpops_auth-mysql.sql"


@pytest.fixture(scope="module")
def db() -> Iterator[tuple[mariadb.Server, str]]:
    with mariadb.temp_database() as (srv, name):
        mariadb.load_sql(srv, name, str(NEW_SQL))
        conn = srv.connect(name)
        try:
            conn.cursor().execute(
                "insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                ("tommy", "{PLAIN}pw", "tommy@example.org", "/srv/mail/tommy"))
        finally:
            conn.close()
        yield srv, name


def backend(srv: mariadb.Server, name: str) -> MySQLAuthenticator:
    return MySQLAuthenticator(Config(auth_type="MySQL", mysql_server=srv.host, mysql_port=srv.port,
                                     mysql_user=srv.user, mysql_pass=srv.password, mysql_db=name))


def test_killed_connection_loses_the_lock_and_still_held_says_so(db: tuple[mariadb.Server, str]) -> None:
    srv, name = db
    worker, other = backend(srv, name), backend(srv, name)
    admin = srv.connect()
    try:
        user = worker.authenticate("tommy", b"pw")
        assert user is not None
        lock = worker.lock(user)
        assert lock.still_held()
        with pytest.raises(MailboxInUse):
            other.lock(user)
        # mid-session, the server drops the worker's connection (restart, wait_timeout, KILL)
        admin.cursor().execute(f"KILL {worker._conn.thread_id()}")
        taken = None
        for _ in range(100):  # the server frees the lock as it processes the kill
            try:
                taken = other.lock(user)
                break
            except MailboxInUse:
                time.sleep(0.05)
        assert taken is not None, "another session can take the mailbox once the connection is gone"
        assert not lock.still_held()  # so the first session must not enter UPDATE
        assert not lock.still_held()  # and it stays lost: no silent reconnect re-takes anything
        lock.release()  # a no-op on a dead connection, no exception
        assert taken.still_held()
        # the worker serves its next login on a new connection
        assert worker.authenticate("tommy", b"pw") is not None
        with pytest.raises(MailboxInUse):
            worker.lock(user)
        taken.release()
        assert not taken.still_held()
        fresh = worker.lock(user)
        assert fresh.still_held()
        fresh.release()
    finally:
        admin.close()
        worker.close()
        other.close()


def test_file_lock_is_held_until_released(tmp_path: Path) -> None:
    held = acquire(str(tmp_path), hashlib.sha256(b"x").hexdigest())
    assert held.still_held()
    held.release()
    assert not held.still_held()


def test_quit_after_the_lock_was_lost_deletes_nothing(db: tuple[mariadb.Server, str], tmp_path: Path) -> None:
    """Over the wire: the worker's MySQL connection is killed mid-session, so its GET_LOCK is
    gone; QUIT must not enter UPDATE (another session may hold the mailbox by now)."""
    from tests.support.client import RawClient
    from tests.support.server import MailEnv, Server, make_message

    srv, name = db
    (tmp_path / "site").mkdir()
    env = MailEnv(tmp_path / "site")
    maildir = env.add_user("lost", messages=[make_message("one"), make_message("two")])
    conn = srv.connect(name)
    try:
        conn.cursor().execute("insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                              ("lost", "{PLAIN}pw", "lost@example.org", str(maildir)))
    finally:
        conn.close()
    env.write_conf(auth_type="'MySQL'", mysql_server=repr(srv.host), mysql_port=str(srv.port),
                   mysql_user=repr(srv.user), mysql_pass=repr(srv.password) if srv.password else "nil",
                   mysql_db=repr(name), min_servers="1", max_servers="2")
    tpops = Server(env).start()
    admin = srv.connect()
    try:
        c = RawClient(tpops.port)
        assert c.login("lost", "pw").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("DELE 1").startswith(b"+OK")
        cursor = admin.cursor()
        cursor.execute("select id from information_schema.processlist where db = %s and id <> connection_id()",
                       (name,))
        for (thread,) in cursor.fetchall():
            cursor.execute(f"KILL {int(thread)}")
        assert c.cmd("QUIT") == b"-ERR [SYS/TEMP] Mailbox lock lost, nothing deleted; try again."
        c.close()
        assert len(env.messages("lost")) == 2
        c = RawClient(tpops.port)  # the worker reconnects for the next login; the mail is all there
        assert c.login("lost", "pw").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        admin.close()
        tpops.stop()
    assert "the mailbox lock was lost during the session" in env.error_log.read_text()
