"""Tests for the MySQL backend against a real MariaDB: both schemas, hostile logins, GET_LOCK, a server that dies."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from passlib import hash as ph

from tests.support import mariadb
from tpops.auth import make_authenticator
from tpops.auth.base import AuthUnavailable, MailboxInUse, MailUser
from tpops.auth.mysql import MySQLAuthenticator, compile_query, lock_name
from tpops.config import Config

REPO = Path(__file__).resolve().parents[1]
#: TPOPS 0.5.1's schema with its clear-text rows (tommy, o'brien): our own fixture.
SEED_SQL = REPO / "tests" / "data" / "tpops_auth-mysql.tpops051.sql"
NEW_SQL = REPO / "tpops_auth-mysql.sql"
SEED_SAMPLE_QUERY = "select login,passwd,uid,maildir from user where login='%s'"
DEFAULT_QUERY = 'select login,passwd,uid,maildir from user where login="%s"'
TS = "<17.1700000000@pop.example.org>"

HOSTILE = [
    "' OR '1'='1",
    "' OR '1'='1' -- ",
    '" OR 1=1 -- ',
    "tommy' -- ",
    'tommy" -- ',
    "\\",
    "tommy\\",
    "%s",
    "%",
    "tommy%",
    "_ommy",
    "tommy\0",
    "\0",
    "t" * 250,
    "tömmy",
    "😀",
    "'; DROP TABLE user; -- ",
    "",
]


def apop(secret: str, ts: str = TS) -> str:
    return hashlib.md5((ts + secret).encode()).hexdigest()


def config(srv: mariadb.Server, db: str, **extra: Any) -> Config:
    return Config(auth_type="MySQL", mysql_server=srv.host, mysql_port=srv.port, mysql_user=srv.user,
                  mysql_pass=srv.password, mysql_db=db, **extra)


def insert(srv: mariadb.Server, db: str, rows: list[tuple[str, str, str]]) -> None:
    conn = srv.connect(db)
    try:
        cursor = conn.cursor()
        for i, (login, passwd, maildir) in enumerate(rows):
            cursor.execute("insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                           (login, passwd, f"m{i}@example.org", maildir))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def seed_db() -> Iterator[tuple[mariadb.Server, str]]:
    """The 2003 schema and its clear-text rows, loaded with the mysql client into a latin1 database."""
    with mariadb.temp_database(charset="latin1") as (srv, db):
        mariadb.load_sql(srv, db, str(SEED_SQL))
        yield srv, db


@pytest.fixture(scope="module")
def new_db() -> Iterator[tuple[mariadb.Server, str]]:
    """tpops's schema with hashed, {PLAIN} and clear-text rows."""
    with mariadb.temp_database() as (srv, db):
        mariadb.load_sql(srv, db, str(NEW_SQL))
        insert(srv, db, [
            ("sha@example.org", "{SHA512-CRYPT}" + ph.sha512_crypt.using(rounds=5000).hash("shapw"), "/srv/mail/sha/"),
            ("bcrypt", ph.bcrypt.using(rounds=4).hash("bcryptpw"), "/srv/mail/bcrypt"),
            ("plainpfx", "{PLAIN}plainpw", "/srv/mail/plainpfx"),
            ("clear", "clearpw", "/srv/mail/clear"),
            ("argon", "{ARGON2ID}" + ph.argon2.using(memory_cost=1024, rounds=2).hash("argonpw"), "/srv/mail/argon"),
            ("ünïcødé😀", "{PLAIN}unipw", "/srv/mail/uni"),
            ("relative", "{PLAIN}x", "Maildir/"),
            ("u" * 250, "{PLAIN}longpw", "/srv/mail/long"),
        ])
        yield srv, db


BARE_QUERY = "select login,passwd,uid,maildir from user where login=%s"


@pytest.mark.parametrize("query", [SEED_SAMPLE_QUERY, DEFAULT_QUERY, BARE_QUERY])
def test_seed_schema_with_clear_text_rows(seed_db: tuple[mariadb.Server, str], query: str) -> None:
    srv, db = seed_db
    auth = MySQLAuthenticator(config(srv, db, mysql_auth_query=query))
    try:
        assert auth.supports_apop
        assert auth.authenticate("tommy", b"tanstaaf") == MailUser("tommy", "/home/tommy/Maildir/")
        assert auth.authenticate("tommy", b"tanstaaF") is None
        assert auth.authenticate("nosuch", b"tanstaaf") is None
        assert auth.authenticate("o'brien", b'quote"pw') == MailUser("o'brien", "/home/obrien/Maildir")
        assert auth.authenticate_apop("tommy", TS, apop("tanstaaf")) is not None
        assert auth.authenticate_apop("tommy", TS, apop("wrong")) is None
        assert auth.authenticate_apop("nosuch", TS, apop("tanstaaf")) is None
    finally:
        auth.close()


def test_factory_uses_the_config_default_query(seed_db: tuple[mariadb.Server, str]) -> None:
    srv, db = seed_db
    auth = make_authenticator(config(srv, db))
    assert isinstance(auth, MySQLAuthenticator)
    assert auth.authenticate("tommy", b"tanstaaf") is not None
    auth.close()


def test_new_schema_with_hashes(new_db: tuple[mariadb.Server, str]) -> None:
    srv, db = new_db
    auth = MySQLAuthenticator(config(srv, db, default_domain="example.org"))
    try:
        assert auth.authenticate("sha", b"shapw") == MailUser("sha@example.org", "/srv/mail/sha/")
        assert auth.authenticate("sha@example.org", b"shapw") is not None
        assert auth.authenticate("sha", b"wrong") is None
        assert auth.authenticate("bcrypt+x", b"bcryptpw") is None
    finally:
        auth.close()
    auth = MySQLAuthenticator(config(srv, db))
    try:
        for login, pw in (("bcrypt", "bcryptpw"), ("plainpfx", "plainpw"), ("clear", "clearpw"),
                          ("argon", "argonpw"), ("ünïcødé😀", "unipw"), ("u" * 250, "longpw")):
            assert auth.authenticate(login, pw.encode()) is not None, login
            assert auth.authenticate(login, pw.encode() + b"!") is None, login
        assert auth.authenticate("relative", b"x") is None  # a relative maildir is never served
        assert auth.authenticate_apop("plainpfx", TS, apop("plainpw")) is not None
        assert auth.authenticate_apop("clear", TS, apop("clearpw")) is not None
        assert auth.authenticate_apop("bcrypt", TS, apop("bcryptpw")) is None  # a hash: no APOP
    finally:
        auth.close()


@pytest.mark.parametrize("schema", ["seed", "new"])
def test_hostile_logins_are_just_data(
    request: pytest.FixtureRequest, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "tpops")
    srv, db = request.getfixturevalue(f"{schema}_db")
    for query in (SEED_SAMPLE_QUERY, DEFAULT_QUERY):
        auth = MySQLAuthenticator(config(srv, db, mysql_auth_query=query))
        try:
            for login in HOSTILE:
                for password in (b"tanstaaf", b"clearpw", b"' OR '1'='1", b""):
                    assert auth.authenticate(login, password) is None, login
                assert auth.authenticate_apop(login, TS, apop("tanstaaf")) is None
            assert auth.authenticate(b"\xff\xfe".decode("utf-8", "surrogateescape"), b"x") is None
        finally:
            auth.close()
    conn = srv.connect(db)
    cursor = conn.cursor()
    cursor.execute("select count(*) from user")
    assert cursor.fetchone()[0] > 0  # the table survived
    conn.close()
    for secret in ("tanstaaf", "clearpw"):
        assert secret not in caplog.text


def test_compile_query() -> None:
    assert compile_query(DEFAULT_QUERY) == "select login,passwd,uid,maildir from user where login=%s"
    assert compile_query(SEED_SAMPLE_QUERY) == "select login,passwd,uid,maildir from user where login=%s"
    assert compile_query("select * from u where login = %s and x like 'a%'") == \
        "select * from u where login = %s and x like 'a%%'"
    assert compile_query("select * from u where login='%s' and x like 'a%%'") == \
        "select * from u where login=%s and x like 'a%%'"
    for bad in ("select * from user", "select * from u where a='%s' or b='%s'", "select * from u where a='%s@x'"):
        with pytest.raises(ValueError, match="mysql_auth_query"):
            compile_query(bad)
    with pytest.raises(ValueError):
        make_authenticator(Config(auth_type="MySQL", mysql_auth_query="select 1"))


def test_query_with_a_literal_percent(new_db: tuple[mariadb.Server, str]) -> None:
    srv, db = new_db
    query = "select login,passwd,uid,maildir from user where login='%s' and maildir like '/srv/%%'"
    auth = MySQLAuthenticator(config(srv, db, mysql_auth_query=query))
    assert auth.authenticate("clear", b"clearpw") is not None
    auth.close()


def test_broken_query_or_credentials_are_unavailable(new_db: tuple[mariadb.Server, str]) -> None:
    srv, db = new_db
    auth = MySQLAuthenticator(config(srv, db, mysql_auth_query="select login from nosuchtable where login=%s"))
    with pytest.raises(AuthUnavailable, match="MySQL"):
        auth.authenticate("clear", b"clearpw")
    auth.close()
    auth = MySQLAuthenticator(config(srv, db, mysql_auth_query="select login, passwd from user where login=%s"))
    with pytest.raises(AuthUnavailable, match="columns"):
        auth.authenticate("clear", b"clearpw")
    auth.close()
    bad = Config(auth_type="MySQL", mysql_server=srv.host, mysql_port=srv.port, mysql_user="tpops_nosuchuser",
                 mysql_pass="hunter2-secret", mysql_db=db)
    with pytest.raises(AuthUnavailable) as info:
        MySQLAuthenticator(bad).authenticate("clear", b"clearpw")
    assert "hunter2-secret" not in str(info.value)
    closed = Config(auth_type="MySQL", mysql_server="127.0.0.1", mysql_port=mariadb.free_port(), mysql_db=db)
    start = time.monotonic()
    with pytest.raises(AuthUnavailable, match="cannot connect"):
        MySQLAuthenticator(closed).authenticate("clear", b"clearpw")
    assert time.monotonic() - start < 5


def test_get_lock_is_one_per_login(new_db: tuple[mariadb.Server, str]) -> None:
    srv, db = new_db
    one, two = MySQLAuthenticator(config(srv, db)), MySQLAuthenticator(config(srv, db))
    try:
        user = one.authenticate("clear", b"clearpw")
        assert user is not None
        held = one.lock(user)
        with pytest.raises(MailboxInUse):
            two.lock(MailUser(user.login, "/srv/mail/elsewhere"))  # keyed on the login, not the path
        with pytest.raises(MailboxInUse):
            one.lock(user)  # not re-entrant within one worker either
        two.lock(MailUser("x", user.maildir)).release()  # another login pointing at the same Maildir
        held.release()
        held.release()
        again = two.lock(user)
        with pytest.raises(MailboxInUse):
            one.lock(user)
        two.close()  # the worker exits: the server drops its locks (as it processes the disconnect)
        deadline = time.monotonic() + 5
        while True:
            try:
                one.lock(user).release()
                break
            except MailboxInUse:
                assert time.monotonic() < deadline, "the server kept a closed connection's lock"
                time.sleep(0.05)
        again.release()  # its connection is gone: a no-op
    finally:
        one.close()
        two.close()
    assert len(lock_name("/x" * 200)) <= 64


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[mariadb.PrivateMariaDB, str]]:
    """A private MariaDB of our own, to stop, restart and hang."""
    with mariadb.PrivateMariaDB() as server, mariadb.temp_database(server.server) as (srv, db):
        mariadb.load_sql(srv, db, str(NEW_SQL))
        insert(srv, db, [("tommy", "{PLAIN}pw", "/srv/mail/tommy")])
        yield server, db


def timed_unavailable(auth: MySQLAuthenticator) -> float:
    start = time.monotonic()
    with pytest.raises(AuthUnavailable, match="MySQL"):
        auth.authenticate("tommy", b"pw")
    return time.monotonic() - start


def test_database_stopped_and_started(
    private: tuple[mariadb.PrivateMariaDB, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tpops")
    server, db = private
    auth = MySQLAuthenticator(config(server.server, db))
    try:
        assert auth.authenticate("tommy", b"pw") is not None
        server.stop()
        assert timed_unavailable(auth) < 5
        assert timed_unavailable(auth) < 5
        server.start()
        assert auth.authenticate("tommy", b"pw") is not None  # same instance, no restart
        server.stop()
        server.start()
        caplog.clear()
        assert auth.authenticate("tommy", b"pw") is not None  # lost connection: one transparent retry
        assert "reconnecting" in caplog.text
        assert auth.lock(MailUser("tommy", "/srv/mail/tommy")) is not None
    finally:
        auth.close()


def test_unix_socket(private: tuple[mariadb.PrivateMariaDB, str]) -> None:
    server, db = private
    auth = MySQLAuthenticator(Config(auth_type="MySQL", mysql_socket=server.socket, mysql_user="root", mysql_db=db))
    assert auth.authenticate("tommy", b"pw") is not None
    auth.close()


def test_hung_database_is_unavailable_within_5_seconds(private: tuple[mariadb.PrivateMariaDB, str]) -> None:
    server, db = private
    connected = MySQLAuthenticator(config(server.server, db))
    fresh = MySQLAuthenticator(config(server.server, db))
    try:
        assert connected.authenticate("tommy", b"pw") is not None
        server.pause()
        try:
            assert timed_unavailable(connected) < 5  # query on an open connection hangs
            assert timed_unavailable(fresh) < 5  # the handshake hangs
        finally:
            server.resume()
        assert connected.authenticate("tommy", b"pw") is not None
        assert fresh.authenticate("tommy", b"pw") is not None
    finally:
        connected.close()
        fresh.close()
