"""Authentication through the real server: tpops with ``$auth_type`` 'MySQL', 'Passwd' and 'File', over the wire.

The authenticators' unit tests (tests/test_auth_*.py) call the backends directly;
these start ``tpops --fg`` against a real MariaDB (tests/support/mariadb.py) and real system
accounts, and talk to it with RawClient, poplib, curl and fetchmail: the 2003 schema
loaded verbatim, the new schema with hashed rows, APOP, injection attempts, a
database stopped or hung mid-run, GET_LOCK shared by two tpops instances, Passwd
accounts (yescrypt, SHA-512, locked, expired) with both APOP file formats and
``--domain``, which identity a session runs as, equal replies and delays for an
unknown user and a wrong password, and hostile logins in the logs.

System accounts are created with useradd/chpasswd and removed with ``userdel -r``
(tests/support/users.py), so the Passwd tests need root (CI runs as root).
"""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from passlib import hash as ph

from tests.support import mariadb
from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import idle_workers, post_login_processes, proc_ids, wait_for, worker_serving
from tests.support.server import IS_ROOT, MAIL_GID, MAIL_UID, MailEnv, Server, make_message
from tests.support.users import Accounts, run, shadow_hash

REPO = Path(__file__).resolve().parents[1]
SEED_SQL = REPO / "tests" / "data" / "tpops_auth-mysql.tpops051.sql"
NEW_SQL = REPO / "tpops_auth-mysql.sql"
#: The query of the 2003 tpops.conf.sample, '%s' quoted.
SEED_SAMPLE_QUERY = "select login,passwd,uid,maildir from user where login='%s'"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."

needs_root = root_only("creates system users")


# ------------------------------------------------------------------ helpers


def wire(data: bytes) -> bytes:
    """What RETR sends (unstuffed) for a message stored with LF line ends."""
    return data.replace(b"\n", b"\r\n")


def apop_digest(greeting: bytes, secret: str) -> str:
    """RFC 1939 APOP digest for the timestamp the greeting offers."""
    found = re.search(rb"<[^<>\s]+@[^<>\s]+>", greeting)
    assert found, f"no APOP timestamp in the greeting {greeting!r}"
    return hashlib.md5(found.group() + secret.encode()).hexdigest()


def new_env() -> MailEnv:
    base = Path(tempfile.mkdtemp(prefix="tpw-"))
    base.chmod(0o755)
    return MailEnv(base)


def conf_variant(env: MailEnv, tag: str, **overrides: str) -> Path:
    """Another configuration file next to ``env.conf``: its settings with ``overrides``."""
    path = env.base / f"tpops-{tag}.conf"
    settings = {**env.settings, **overrides}
    path.write_text("".join(f"${k} = {v}\n" for k, v in settings.items()))
    return path


def start(env: MailEnv, *args: str, conf: Path | None = None) -> Server:
    """A started tpops for ``env`` (or with another configuration file)."""
    srv = Server(env, *args)
    if conf is not None:
        srv.args[srv.args.index("-f") + 1] = str(conf)
    return srv.start()


def make_maildir(env: MailEnv, name: str, messages: list[bytes]) -> Path:
    """``env``'s Maildir for ``name`` with ``messages`` in new/, owned by the mail user when root."""
    maildir = env.maildir(name)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for data in messages:
        env.deliver(name, data)
    env.chown(maildir.parent)
    return maildir


def count_messages(maildir: Path) -> int:
    return sum(1 for sub in ("cur", "new") for _ in (maildir / sub).iterdir())


def assert_session_identity(srv: Server, login: str, uid: int, gid: int) -> None:
    assert srv.proc is not None
    ids = proc_ids(worker_serving(srv.proc.pid, f"{login}@127.0.0.1"))
    uids, gids, groups = ids["Uid"], ids["Gid"], ids["Groups"]
    assert uids == [uid] * 4, f"{login}: session runs with uids {uids}, expected {uid}"
    assert gids == [gid] * 4, f"{login}: session runs with gids {gids}, expected {gid}"
    if IS_ROOT:
        assert 0 not in groups, f"{login}: session kept supplementary group 0"


def user_pass(port: int, login: str | bytes, password: str | bytes) -> tuple[RawClient, bytes]:
    """A new connection that sent USER and PASS: (client, the PASS reply)."""
    c = RawClient(port)
    login = login.encode() if isinstance(login, str) else login
    password = password.encode() if isinstance(password, str) else password
    reply = c.cmd(b"USER " + login)
    assert reply == b"+OK Send your password.", (login, reply)
    return c, c.cmd(b"PASS " + password)


def login_fails(port: int, login: str | bytes, password: str | bytes = "secret") -> None:
    c, reply = user_pass(port, login, password)
    assert reply == AUTH_FAILED, (login, reply)
    assert c.cmd("STAT").startswith(b"-ERR")  # still in AUTHORIZATION
    c.cmd("QUIT")
    c.close()


def login_works(port: int, login: str, password: str, messages: int | None = None) -> None:
    c, reply = user_pass(port, login, password)
    assert reply.startswith(b"+OK Logged in"), (login, reply)
    if messages is not None:
        assert c.cmd("STAT").startswith(f"+OK {messages} ".encode())
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()


def try_login(port: int, login: str, password: str) -> bytes:
    """The PASS reply of a new connection, which then QUITs."""
    c, reply = user_pass(port, login, password)
    quit_and_wait(c)
    return reply


def quit_and_wait(c: RawClient) -> None:
    """QUIT, then wait until the server closed the connection (the session's UPDATE and logs are done)."""
    assert c.cmd("QUIT").startswith(b"+OK")
    assert c.closed()
    c.close()


class Site:
    """A fresh MailEnv (configuration, logs, locks) and, once started, the tpops serving it."""

    def __init__(self) -> None:
        self.env = new_env()
        self.server: Server | None = None

    @property
    def tpops(self) -> Server:
        assert self.server is not None, "the site's tpops is not started"
        return self.server

    @property
    def port(self) -> int:
        return self.tpops.port


# ------------------------------------------------------------------ MySQL sites


class MySQLSite(Site):
    """A database, a MailEnv whose Maildirs the rows point at, and a tpops serving them."""

    def __init__(self, srv: mariadb.Server, db: str, query: str | None) -> None:
        super().__init__()
        self.srv = srv
        self.db = db
        self.env.write_conf(
            auth_type="'MySQL'",
            mysql_server=repr(srv.host),
            mysql_port=str(srv.port),
            mysql_user=repr(srv.user),
            mysql_pass=repr(srv.password) if srv.password else "nil",
            mysql_db=repr(db),
        )
        if query is not None:
            assert "\\" not in query and '"' not in query and "#" not in query
            self.env.write_conf(mysql_auth_query=f'"{query}"')
        self.rows = 0

    def add(self, login: str, passwd: str, messages: list[bytes] | None = None, *, slash: bool = True) -> Path:
        """A row for ``login`` and its Maildir (stored with or without the trailing slash)."""
        self.rows += 1
        maildir = make_maildir(self.env, f"u{self.rows}", messages or [])
        stored = str(maildir) + ("/" if slash else "")
        conn = self.srv.connect(self.db)
        try:
            conn.cursor().execute(
                "insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                (login, passwd, f"m{self.rows}@example.org", stored),
            )
        finally:
            conn.close()
        return maildir

    def adopt(self, login: str, messages: list[bytes] | None = None, *, slash: bool = True) -> Path:
        """Point ``login``'s existing row (a fixture row: its password as loaded) at a new Maildir."""
        self.rows += 1
        maildir = make_maildir(self.env, f"u{self.rows}", messages or [])
        conn = self.srv.connect(self.db)
        try:
            changed = conn.cursor().execute("update user set maildir = %s where login = %s",
                                            (str(maildir) + ("/" if slash else ""), login))
        finally:
            conn.close()
        assert changed == 1, f"no row for {login!r} in the fixture"
        return maildir

    def stored_passwd(self, login: str) -> str:
        conn = self.srv.connect(self.db)
        try:
            cursor = conn.cursor()
            cursor.execute("select passwd from user where login = %s", (login,))
            return str(cursor.fetchone()[0])
        finally:
            conn.close()

    def row_count(self) -> int:
        conn = self.srv.connect(self.db)
        try:
            cursor = conn.cursor()
            cursor.execute("select count(*) from user")
            return int(cursor.fetchone()[0])
        finally:
            conn.close()

    def start(self, *args: str) -> Server:
        self.server = start(self.env, *args)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.env.base, ignore_errors=True)


MAIL_UIDGID = (MAIL_UID, MAIL_GID) if IS_ROOT else (os.getuid(), os.getgid())
SEED_MSGS = [make_message(f"seed{i}", f"seed body {i}\n.leading dot\n") for i in range(2)]
NEW_MSGS = [make_message("hashed", "hashed row body\n")]
FLOW_MSGS = [make_message(f"flow{i}", f"flow body {i}\n.\n..\n") for i in range(3)]


@pytest.fixture(scope="module")
def seed_site() -> Iterator[MySQLSite]:
    """TPOPS 0.5.1's schema and clear-text rows (tests/data) in a latin1 database, the sample's query."""
    with mariadb.temp_database(charset="latin1") as (srv, db):
        mariadb.load_sql(srv, db, str(SEED_SQL))
        site = MySQLSite(srv, db, SEED_SAMPLE_QUERY)
        try:
            assert len(str(site.env.maildir("u99")) + "/") <= 64, "the seed's maildir column is char(64)"
            site.adopt("tommy", SEED_MSGS)  # the fixture's clear-text rows: tanstaaf, quote"pw
            site.adopt("o'brien", [make_message("obrien")], slash=False)
            site.add("apopper", "apopsecret", [make_message("apop")])
            site.add("seedok", "okpw")
            site.start()
            yield site
        finally:
            site.close()


@pytest.fixture(scope="module")
def new_site() -> Iterator[MySQLSite]:
    """tpops's schema (tpops_auth-mysql.sql) with {SHA512-CRYPT}, $2b$ and {PLAIN} rows, the default query."""
    with mariadb.temp_database() as (srv, db):
        mariadb.load_sql(srv, db, str(NEW_SQL))
        site = MySQLSite(srv, db, None)
        try:
            site.add("sha@example.org", "{SHA512-CRYPT}" + ph.sha512_crypt.using(rounds=5000).hash("shapw"), NEW_MSGS)
            site.add("bcrypt", ph.bcrypt.using(rounds=4, ident="2b").hash("bcryptpw"), NEW_MSGS, slash=False)
            site.add("plainpfx", "{PLAIN}plainpw", NEW_MSGS)
            site.add("apopnew", "{PLAIN}apopsecret", NEW_MSGS)
            site.add("shared", "{PLAIN}sharedpw", NEW_MSGS)
            site.add("flow", "{PLAIN}flowpw", FLOW_MSGS)  # curl logs in with APOP when offered: see the flow test
            site.add("newok", "{PLAIN}okpw")
            site.start()
            yield site
        finally:
            site.close()


# ------------------------------------------------------------------ MySQL


def test_seed_schema_login_retr_dele_quit(seed_site: MySQLSite) -> None:
    maildir = seed_site.env.maildir("u1")
    pop = poplib.POP3("127.0.0.1", seed_site.port, timeout=10)
    try:
        assert pop.user("tommy").startswith(b"+OK")
        assert pop.pass_("tanstaaf").startswith(b"+OK Logged in, 2 messages")
        assert pop.stat() == (2, sum(len(wire(m)) for m in SEED_MSGS))
        _, lines, octets = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == wire(SEED_MSGS[0])
        assert octets == len(wire(SEED_MSGS[0]))  # poplib counts the unstuffed octets
        assert pop.dele(1).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()
    assert count_messages(maildir) == 1
    login_works(seed_site.port, "tommy", "tanstaaf", messages=1)
    login_fails(seed_site.port, "tommy", "tanstaaF")
    login_fails(seed_site.port, "tommy", "tanstaaf ")
    login_works(seed_site.port, "o'brien", 'quote"pw', messages=1)  # quotes in real data, maildir without '/'


def test_mysql_session_runs_as_the_maildir_owner(seed_site: MySQLSite) -> None:
    c, reply = user_pass(seed_site.port, "seedok", "okpw")
    assert reply.startswith(b"+OK Logged in")
    assert_session_identity(seed_site.tpops, "seedok", *MAIL_UIDGID)
    quit_and_wait(c)


def test_mysql_session_is_named_by_the_rows_login(new_site: MySQLSite) -> None:
    """The database's collation may match another spelling of a login (utf8mb4_general_ci: case- and
    accent-insensitive). Either tpops refuses it, or the session is the row's user: logged and
    accounted under the row's login, not under whatever spelling the client typed."""
    named = {}
    for spelling in ("PLAINPFX", "pla\u00efnpfx"):
        lines = len(new_site.env.access_log.read_bytes().splitlines())
        c, reply = user_pass(new_site.port, spelling, "plainpw")
        try:
            if reply == AUTH_FAILED:
                continue
            assert reply.startswith(b"+OK Logged in"), reply
        finally:
            quit_and_wait(c)
        wait_for(lambda: len(new_site.env.access_log.read_bytes().splitlines()) > lines, 5.0, what="the access-log line")
        named[spelling] = new_site.env.access_log.read_text().splitlines()[lines].split()[5]
    assert all(name == "plainpfx" for name in named.values()), f"sessions of row 'plainpfx' logged as {named}"


def test_new_schema_hashed_and_plain_rows(new_site: MySQLSite) -> None:
    assert new_site.stored_passwd("sha@example.org").startswith("{SHA512-CRYPT}$6$")
    assert new_site.stored_passwd("bcrypt").startswith("$2b$04$")
    assert new_site.stored_passwd("plainpfx") == "{PLAIN}plainpw"
    for login, password in (("sha@example.org", "shapw"), ("bcrypt", "bcryptpw"), ("plainpfx", "plainpw")):
        c, reply = user_pass(new_site.port, login, password)
        assert reply == f"+OK Logged in, 1 messages ({len(wire(NEW_MSGS[0]))} octets).".encode(), login
        status, body = c.multi("RETR 1")
        assert status.startswith(b"+OK") and body == wire(NEW_MSGS[0]), login
        assert_session_identity(new_site.tpops, login, *MAIL_UIDGID)
        quit_and_wait(c)
        login_fails(new_site.port, login, password + "x")
        login_fails(new_site.port, login, password.upper())
    login_fails(new_site.port, "plainpfx", "{PLAIN}plainpw")  # the stored value is not the password
    stored = new_site.stored_passwd("sha@example.org")
    login_fails(new_site.port, "sha@example.org", stored)  # nor is the hash
    login_fails(new_site.port, "sha@example.org", stored.removeprefix("{SHA512-CRYPT}"))


@pytest.mark.parametrize(("schema", "login"), [("seed", "apopper"), ("new", "apopnew")])
def test_apop_from_mysql(request: pytest.FixtureRequest, schema: str, login: str) -> None:
    site: MySQLSite = request.getfixturevalue(f"{schema}_site")
    c = RawClient(site.port)
    assert c.cmd(f"APOP {login} {apop_digest(c.greeting, 'apopsecret')}").startswith(b"+OK Logged in, 1 messages")
    assert c.multi("RETR 1")[0].startswith(b"+OK")
    quit_and_wait(c)
    pop = poplib.POP3("127.0.0.1", site.port, timeout=10)  # poplib computes the digest from the greeting itself
    try:
        assert pop.apop(login, "apopsecret").startswith(b"+OK")
        assert pop.stat()[0] == 1
        pop.quit()
    finally:
        pop.close()
    for who, secret in ((login, "apopsecreT"), (login, ""), ("nosuchuser", "apopsecret")):
        c = RawClient(site.port)
        assert c.cmd(f"APOP {who} {apop_digest(c.greeting, secret)}") == AUTH_FAILED, who
        c.close()
    c = RawClient(site.port)  # a digest for another timestamp (a replay) fails
    stale = hashlib.md5(b"<1.2@test.example.org>apopsecret").hexdigest()
    assert c.cmd(f"APOP {login} {stale}") == AUTH_FAILED
    c.close()


def test_apop_refused_for_hashed_rows(new_site: MySQLSite) -> None:
    c = RawClient(new_site.port)
    stored = new_site.stored_passwd("sha@example.org")
    assert c.cmd(f"APOP sha@example.org {apop_digest(c.greeting, 'shapw')}") == AUTH_FAILED
    assert c.cmd(f"APOP sha@example.org {apop_digest(c.greeting, stored)}") == AUTH_FAILED
    c.close()


#: SQL injections that are one POP3 argument: they reach the backend.
INJECTIONS = ["'OR'1'='1", "'OR''='", '"OR"1"="1', '"OR/**/1=1#', "tommy'#", "tommy'--", "\\", "tommy\\",
              "%s", "%", "tom%", "_ommy", "'%s'", "\\'OR\\'1\\'=\\'1", "';DROP/**/TABLE/**/user;#"]
#: The brief's injections with spaces: USER and APOP take the name with its spaces (as Dovecot), so
#: these reach the backend as data too.
SPACED_INJECTIONS = ["' OR '1'='1", '" OR 1=1 -- ', "' OR 1=1 #", "tommy' -- "]


@pytest.mark.parametrize("schema", ["seed", "new"])
def test_injection_attempts_are_refused(request: pytest.FixtureRequest, schema: str) -> None:
    site: MySQLSite = request.getfixturevalue(f"{schema}_site")
    rows = site.row_count()
    for login in INJECTIONS:
        for password in ("tanstaaf", "okpw", "' OR '1'='1", "x"):
            login_fails(site.port, login, password)
    for login in SPACED_INJECTIONS:
        c = RawClient(site.port)
        assert c.cmd(f"USER {login}") == b"+OK Send your password."
        assert c.cmd("PASS tanstaaf") == AUTH_FAILED
        assert c.cmd("STAT").startswith(b"-ERR")
        c.close()
    for login in INJECTIONS + SPACED_INJECTIONS:  # APOP names are data too
        c = RawClient(site.port)
        reply = c.cmd(f"APOP {login} {apop_digest(c.greeting, 'tanstaaf')}")
        assert reply == AUTH_FAILED, login
        c.close()
    good = "seedok" if schema == "seed" else "newok"
    login_fails(site.port, good, "' OR '1'='1")  # injections as the password
    login_fails(site.port, good, "okpw' OR '1'='1")
    login_works(site.port, good, "okpw")
    assert site.row_count() == rows
    assert "Traceback" not in site.env.error_log.read_text(errors="replace")


def database_sockets(pid: int, port: int) -> list[str]:
    """The TCP sockets of ``pid`` connected to ``port`` on the loopback (the database's)."""
    inodes = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as table:
            for row in list(table)[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target in inodes:
            held.append(target)
    return held


@root_only("post-login processes are root mode's")
def test_post_login_processes_hold_no_database_connection() -> None:
    """A post-login process serves a mailbox as its owner and never authenticates: the
    worker's connection (tpops's database credentials) must not live on in it. Letting go
    of it must not end the worker's: the worker's next login needs no reconnect.
    (File locks: a ``GET_LOCK`` lives on the worker's connection, so such a session is
    never handed off, it is served in the worker.)"""
    with mariadb.temp_database() as (srv, db):
        mariadb.load_sql(srv, db, str(NEW_SQL))
        site = MySQLSite(srv, db, None)
        try:
            site.add("owner1", "{PLAIN}pw1", NEW_MSGS)
            site.env.write_conf(min_servers="1", max_servers="1", post_login_workers="4", mailbox_lock="'local'")
            master = site.start().proc
            assert master is not None
            (worker,) = wait_for(lambda: idle_workers(master.pid), what="the idle worker")
            c, reply = user_pass(site.port, "owner1", "pw1")
            assert reply.startswith(b"+OK Logged in")
            assert database_sockets(worker, srv.port), "the worker's own connection (the test's premise)"
            quit_and_wait(c)
            # The owner's process took a spare; after the session the worker forks another,
            # its connection open then: every one of them must have let go of it.
            kept = wait_for(lambda: len(post_login_processes(master.pid)) >= 3 and post_login_processes(master.pid),
                            what="the owner's process and two spares")
            assert any(title.endswith(f"uid {MAIL_UID} idle") for title in kept.values()), kept
            for pid, title in kept.items():
                assert database_sockets(pid, srv.port) == [], f"{title} ({pid}) holds a database connection"
            login_works(site.port, "owner1", "pw1", messages=1)
            assert "reconnecting" not in site.tpops.output() + site.env.error_log.read_text()
        finally:
            site.close()


def test_two_instances_share_the_mailbox_lock(new_site: MySQLSite) -> None:
    other = start(new_site.env)  # a second tpops on the same database (think: another host)
    try:
        first, reply = user_pass(new_site.port, "shared", "sharedpw")
        assert reply.startswith(b"+OK Logged in")
        second, reply = user_pass(other.port, "shared", "sharedpw")
        assert reply == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
        second.close()
        quit_and_wait(first)  # releases the GET_LOCK before its +OK
        second, reply = user_pass(other.port, "shared", "sharedpw")
        assert reply.startswith(b"+OK Logged in")
        first, reply = user_pass(new_site.port, "shared", "sharedpw")  # and the other way round
        assert reply == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
        first.close()
        second.close()  # gone without QUIT: its session ends and releases the lock
        wait_for(lambda: try_login(new_site.port, "shared", "sharedpw").startswith(b"+OK"), 5.0,
                 what="the lock of a session that hung up to be released")
    finally:
        other.stop()
    log = new_site.env.error_log.read_text(errors="replace")
    assert "cannot lock for shared from 127.0.0.1: mailbox in use" in log


@pytest.fixture(scope="module")
def private_site() -> Iterator[tuple[mariadb.PrivateMariaDB, MySQLSite]]:
    """A MariaDB of our own, to stop, start and hang under a running tpops."""
    with mariadb.PrivateMariaDB() as dbserver, mariadb.temp_database(dbserver.server) as (srv, db):
        mariadb.load_sql(srv, db, str(NEW_SQL))
        site = MySQLSite(srv, db, None)
        try:
            site.add("tommy", "{PLAIN}pw", [make_message(f"p{i}") for i in range(3)])
            site.start()
            yield dbserver, site
        finally:
            site.close()
            dbserver.start()  # temp_database drops its database on it


def timed_pass(port: int, login: str, password: str) -> tuple[bytes, float]:
    c = RawClient(port)
    assert c.cmd(f"USER {login}").startswith(b"+OK")
    begin = time.monotonic()
    reply = c.cmd(f"PASS {password}")
    elapsed = time.monotonic() - begin
    c.close()
    return reply, elapsed


def test_database_stopped_mid_run_and_started_again(private_site: tuple[mariadb.PrivateMariaDB, MySQLSite]) -> None:
    dbserver, site = private_site
    dbserver.start()
    maildir = site.env.maildir("u1")
    before = count_messages(maildir)
    session, reply = user_pass(site.port, "tommy", "pw")
    assert reply.startswith(b"+OK Logged in")
    dbserver.stop()
    try:
        for _ in range(3):  # workers with and without a (now dead) connection
            reply, elapsed = timed_pass(site.port, "tommy", "pw")
            assert reply == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."
            assert elapsed < 5, f"[SYS/TEMP] took {elapsed:.1f} s"
        # a session logged in before the outage goes on reading (the mailbox needs no
        # database), but its GET_LOCK died with the server: QUIT must not enter UPDATE,
        # since another session may hold the mailbox by now (issue 8 item 17)
        assert session.multi("RETR 1")[0].startswith(b"+OK")
        assert session.cmd("DELE 1").startswith(b"+OK")
        assert session.cmd("QUIT") == b"-ERR [SYS/TEMP] Mailbox lock lost, nothing deleted; try again."
        session.close()
        assert count_messages(maildir) == before
    finally:
        dbserver.start()
    proc = site.tpops.proc
    assert proc is not None
    master = proc.pid
    for _ in range(3):  # no tpops restart: every worker finds the database again
        login_works(site.port, "tommy", "pw", messages=before)
    session, reply = user_pass(site.port, "tommy", "pw")  # and a new session deletes
    assert reply.startswith(b"+OK Logged in")
    assert session.cmd("DELE 1").startswith(b"+OK")
    quit_and_wait(session)
    assert count_messages(maildir) == before - 1
    assert proc.poll() is None and site.tpops.proc is proc and proc.pid == master
    log = site.env.error_log.read_text(errors="replace")
    assert re.search(r"authentication backend MySQL failed for tommy from 127\.0\.0\.1: MySQL: .*\S", log), log
    assert "Traceback" not in log


def test_hung_database_answers_sys_temp_within_5_seconds(
    private_site: tuple[mariadb.PrivateMariaDB, MySQLSite],
) -> None:
    dbserver, site = private_site
    dbserver.start()
    login_works(site.port, "tommy", "pw")
    dbserver.pause()  # SIGSTOP: connections and queries hang, as with a firewalled host
    try:
        reply, elapsed = timed_pass(site.port, "tommy", "pw")
    finally:
        dbserver.resume()
    assert reply == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."
    assert elapsed < 5, f"[SYS/TEMP] took {elapsed:.1f} s"
    login_works(site.port, "tommy", "pw")


# ------------------------------------------------------------------ Passwd


YES_MSGS = [make_message(f"yes{i}", f"yescrypt body {i}\n") for i in range(2)]


class PasswdSite(Site):
    """System accounts, an env for logs and locks, a text APOP file, and a Passwd tpops."""

    def __init__(self, accounts: Accounts) -> None:
        super().__init__()
        self.accounts = accounts
        self.apop_text = self.env.base / "apop-secrets"
        self.env.write_conf(auth_type="'Passwd'", apop_passwd_file=repr(str(self.apop_text)))


@pytest.fixture(scope="module")
def passwd_site() -> Iterator[PasswdSite]:
    assert os.geteuid() == 0, "only tests marked needs_root use system accounts"
    accounts = Accounts("tpw")
    site = PasswdSite(accounts)
    try:
        accounts.add("yes", messages=YES_MSGS)  # Debian 12: yescrypt by default
        accounts.add("sha", "-c", "SHA512", messages=[make_message("sha")])
        run("usermod", "-L", accounts.add("lock", messages=[make_message("lock")]))
        run("chage", "-E", "0", accounts.add("exp", messages=[make_message("exp")]))
        accounts.add("apop", messages=[make_message("apop")])
        accounts.add("flow", messages=FLOW_MSGS)
        accounts.add("d@example.org", messages=[make_message("domain")], badname=True)
        apop_user = accounts.name("apop")
        result = subprocess.run(  # the shipped tool writes the text file
            [str(Path(sys.executable).with_name("tpops-apoppasswd")), "-f", str(site.apop_text), apop_user],
            input="text-secret\n", capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        with site.apop_text.open("a") as f:
            f.write(f"{accounts.name('lock')}:locksecret\n{accounts.name('d@example.org')}:domainsecret\n")
        site.server = start(site.env)
        yield site
    finally:
        if site.server is not None:
            site.server.stop()
        accounts.remove_all()
        shutil.rmtree(site.env.base, ignore_errors=True)


@needs_root
def test_passwd_logins_yescrypt_sha512_locked_expired(passwd_site: PasswdSite) -> None:
    acc = passwd_site.accounts
    yes, sha, locked, expired = (acc.name(r) for r in ("yes", "sha", "lock", "exp"))
    assert shadow_hash(yes).startswith("$y$")
    assert shadow_hash(sha).startswith("$6$")
    assert shadow_hash(locked).startswith("!")
    c, reply = user_pass(passwd_site.port, yes, acc.passwords[yes])
    assert reply == f"+OK Logged in, 2 messages ({sum(len(wire(m)) for m in YES_MSGS)} octets).".encode()
    assert c.multi("RETR 2")[1] == wire(YES_MSGS[1])
    assert_session_identity(passwd_site.tpops, yes, *acc.ids(yes))
    assert c.cmd("DELE 1").startswith(b"+OK")
    quit_and_wait(c)
    assert count_messages(acc.maildir(yes)) == 1
    c, reply = user_pass(passwd_site.port, sha, acc.passwords[sha])
    assert reply.startswith(b"+OK Logged in, 1 messages")
    assert_session_identity(passwd_site.tpops, sha, *acc.ids(sha))
    quit_and_wait(c)
    for name in (yes, sha):
        login_fails(passwd_site.port, name, acc.passwords[name] + "x")
        login_fails(passwd_site.port, name, acc.passwords[name].upper())
        login_fails(passwd_site.port, name, shadow_hash(name))
    for name in (locked, expired):  # the right password, an unusable account
        login_fails(passwd_site.port, name, acc.passwords[name])
    login_fails(passwd_site.port, "root", "x")
    log = passwd_site.env.error_log.read_text(errors="replace")
    assert f"login {locked} refused: " in log and f"login {expired} refused: account expired" in log
    for name in (yes, sha, locked, expired):
        assert acc.passwords[name] not in log


@needs_root
def test_passwd_apop_with_a_text_file(passwd_site: PasswdSite) -> None:
    acc = passwd_site.accounts
    apop_user, locked = acc.name("apop"), acc.name("lock")
    assert f"{apop_user}:text-secret\n" in passwd_site.apop_text.read_text()
    c = RawClient(passwd_site.port)
    assert c.cmd(f"APOP {apop_user} {apop_digest(c.greeting, 'text-secret')}").startswith(b"+OK Logged in, 1 messages")
    assert_session_identity(passwd_site.tpops, apop_user, *acc.ids(apop_user))
    quit_and_wait(c)
    pop = poplib.POP3("127.0.0.1", passwd_site.port, timeout=10)
    try:
        assert pop.apop(apop_user, "text-secret").startswith(b"+OK")
        pop.quit()
    finally:
        pop.close()
    for who, secret in ((apop_user, "text-secreT"), (acc.name("yes"), ""), (locked, "locksecret"),
                        (acc.name("nosuch"), "text-secret")):
        c = RawClient(passwd_site.port)
        assert c.cmd(f"APOP {who} {apop_digest(c.greeting, secret)}") == AUTH_FAILED, who
        c.close()
    login_works(passwd_site.port, apop_user, acc.passwords[apop_user])  # USER/PASS still uses shadow
    login_fails(passwd_site.port, apop_user, "text-secret")  # ... not the APOP secret


@needs_root
def test_passwd_apop_with_a_berkeley_db_file(passwd_site: PasswdSite) -> None:
    acc = passwd_site.accounts
    apop_user, sha = acc.name("apop"), acc.name("sha")
    path = passwd_site.env.base / "apop.db"
    # postmap's layout: key and value NUL-terminated; the second pair without NULs
    run("db5.3_load", "-T", "-t", "hash", str(path), input=f"{apop_user}\\00\nbdb-secret\\00\n{sha}\nsha-secret\n")
    assert path.read_bytes()[12:16] in (b"\x61\x15\x06\x00", b"\x00\x06\x15\x61")  # a Berkeley DB hash file
    srv = start(passwd_site.env, conf=conf_variant(passwd_site.env, "bdb", apop_passwd_file=repr(str(path))))
    try:
        for who, secret in ((apop_user, "bdb-secret"), (sha, "sha-secret")):
            c = RawClient(srv.port)
            assert c.cmd(f"APOP {who} {apop_digest(c.greeting, secret)}").startswith(b"+OK Logged in"), who
            assert_session_identity(srv, who, *acc.ids(who))
            quit_and_wait(c)
        for who, secret in ((apop_user, "bdb-secret\0"), (apop_user, "text-secret"), (acc.name("yes"), "")):
            c = RawClient(srv.port)
            assert c.cmd(f"APOP {who} {apop_digest(c.greeting, secret)}") == AUTH_FAILED, who
            c.close()
        login_works(srv.port, acc.name("yes"), acc.passwords[acc.name("yes")])  # a missing entry crashed nothing
    finally:
        srv.stop()


@needs_root
def test_passwd_default_domain_for_user_pass_and_apop(passwd_site: PasswdSite) -> None:
    acc = passwd_site.accounts
    full = acc.name("d@example.org")
    short = full.split("@")[0]
    srv = start(passwd_site.env, "--domain", "example.org")
    try:
        c, reply = user_pass(srv.port, short, acc.passwords[full])
        assert reply.startswith(b"+OK Logged in, 1 messages")
        assert_session_identity(srv, full, *acc.ids(full))
        quit_and_wait(c)
        c = RawClient(srv.port)
        assert c.cmd(f"APOP {short} {apop_digest(c.greeting, 'domainsecret')}").startswith(b"+OK Logged in")
        assert_session_identity(srv, full, *acc.ids(full))
        quit_and_wait(c)
        login_works(srv.port, full, acc.passwords[full])  # a login with '@' is taken as it is
        yes = acc.name("yes")
        login_fails(srv.port, yes, acc.passwords[yes])  # tried as yes@example.org: no such account
    finally:
        srv.stop()
    login_fails(passwd_site.port, short, acc.passwords[full])  # without --domain: no such account


# ------------------------------------------------------------------ fetchmail and curl


def curl(port: int, login: str, password: str, path: str = "") -> tuple[bytes, str]:
    """curl's output and its verbose trace (which shows how it logged in)."""
    url = f"pop3://{urllib.parse.quote(login, safe='')}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}/{path}"
    result = subprocess.run(["curl", "-sSv", "--max-time", "20", url], capture_output=True, timeout=30)
    trace = result.stderr.decode(errors="replace")
    assert result.returncode == 0, trace
    return result.stdout, trace


def fetchmail(port: int, login: str, password: str, tmp_path: Path) -> list[bytes]:
    """Fetch everything with fetchmail's default (no keep: deleted at QUIT); the messages as delivered."""
    out = tmp_path / "got"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    rc.write_text(
        f"set no syslog\npoll 127.0.0.1 protocol pop3 port {port} auth password\n"
        f"  user \"{login}\" password \"{quoted}\" is root here\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "--sslproto", "", "-v"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(p.read_bytes() for p in out.iterdir())


@pytest.mark.parametrize("backend", [pytest.param("passwd", marks=needs_root), "mysql"])
def test_fetchmail_and_curl_whole_flow(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> None:
    """curl lists and reads everything, fetchmail fetches and deletes everything, the Maildir ends empty.

    curl prefers SASL (CAPA's SASL line) to APOP and APOP to USER/PASS, and never falls
    back (curl/curl#10073). tpops offers SASL PLAIN on loopback, so curl sends AUTH PLAIN
    whether or not the greeting has an APOP timestamp (Passwd here has no
    $apop_passwd_file; MySQL always offers APOP). fetchmail ('auth password') sends USER/PASS.
    """
    assert shutil.which("curl") and shutil.which("fetchmail"), "scripts/test installs curl and fetchmail"
    srv: Server | None = None
    try:
        if backend == "passwd":
            site: PasswdSite = request.getfixturevalue("passwd_site")
            srv = start(site.env, conf=conf_variant(site.env, "noapop", apop_passwd_file="nil"))
            port, login = srv.port, site.accounts.name("flow")
            password, maildir = site.accounts.passwords[login], site.accounts.maildir(login)
            probe = RawClient(port)
            assert b"<" not in probe.greeting  # no $apop_passwd_file: no APOP timestamp
            probe.close()
            method = "> AUTH PLAIN"
        else:
            new: MySQLSite = request.getfixturevalue("new_site")
            port, login, password, maildir = new.port, "flow", "flowpw", new.env.maildir("u6")
            method = "> AUTH PLAIN"
        assert count_messages(maildir) == len(FLOW_MSGS)
        listing, trace = curl(port, login, password)
        assert method in trace
        assert sorted(listing.split(b"\r\n")[:-1]) == sorted(f"{i} {len(wire(m))}".encode()
                                                             for i, m in enumerate(FLOW_MSGS, 1))
        got_by_curl = sorted(curl(port, login, password, str(i))[0] for i in range(1, len(FLOW_MSGS) + 1))
        assert got_by_curl == sorted(wire(m) for m in FLOW_MSGS)
        assert count_messages(maildir) == len(FLOW_MSGS)  # curl only read
        got = fetchmail(port, login, password, tmp_path)
        assert len(got) == len(FLOW_MSGS)
        for data in FLOW_MSGS:  # fetchmail adds a Received: header and hands LF-ended text to the MDA
            body = data.split(b"\n\n", 1)[1]
            assert any(g.endswith(b"\n\n" + body) for g in got), body
        assert count_messages(maildir) == 0
        assert curl(port, login, password)[0] in (b"", b"\r\n")  # curl 7.88 prints a CRLF for an empty LIST
    finally:
        if srv is not None:
            srv.stop()


# ------------------------------------------------------------------ File site (for the cross-backend tests)


@pytest.fixture(scope="module")
def file_site() -> Iterator[tuple[MailEnv, Server]]:
    env = new_env()
    env.add_user("fileok", "okpw", [make_message("file")])
    srv = start(env)
    try:
        yield env, srv
    finally:
        srv.stop()
        shutil.rmtree(env.base, ignore_errors=True)


@dataclass
class Target:
    """One backend under test: its env and server, a good login and an unknown name."""

    env: MailEnv
    server: Server
    login: str
    password: str
    unknown: str


def target(request: pytest.FixtureRequest, backend: str) -> Target:
    """The File site, the Passwd site (a yescrypt account) or a MySQL site (the seed's clear-text row,
    the new schema's SHA512-CRYPT row)."""
    if backend == "file":
        env, srv = request.getfixturevalue("file_site")
        return Target(env, srv, "fileok", "okpw", "nosuchuser")
    if backend == "passwd":
        site: PasswdSite = request.getfixturevalue("passwd_site")
        name = site.accounts.name("yes")
        return Target(site.env, site.tpops, name, site.accounts.passwords[name], site.accounts.name("none"))
    mysql: MySQLSite = request.getfixturevalue(f"{backend.removeprefix('mysql-')}_site")
    if backend == "mysql-seed":
        return Target(mysql.env, mysql.tpops, "seedok", "okpw", "nosuchuser")
    return Target(mysql.env, mysql.tpops, "sha@example.org", "shapw", "nosuch@example.org")


BACKENDS = ["file", pytest.param("passwd", marks=needs_root), "mysql-seed", "mysql-new"]


@pytest.mark.parametrize("backend", ["file", pytest.param("passwd", marks=needs_root), "mysql-new"])
def test_unknown_user_and_wrong_password_look_the_same(request: pytest.FixtureRequest, backend: str) -> None:
    t = target(request, backend)
    srv = start(t.env, conf=conf_variant(t.env, "interval", error_interval="1"))
    try:
        replies: dict[str, list[bytes]] = {"unknown": [], "wrong": []}
        delays: dict[str, list[float]] = {"unknown": [], "wrong": []}
        for _ in range(2):
            for kind, login in (("unknown", t.unknown), ("wrong", t.login)):
                reply, elapsed = timed_pass(srv.port, login, t.password + "-wrong")
                replies[kind].append(reply)
                delays[kind].append(elapsed)
        assert replies["unknown"] == replies["wrong"] == [AUTH_FAILED] * 2
        assert min(delays["unknown"] + delays["wrong"]) >= 1.0, delays
        mean = {k: sum(v) / len(v) for k, v in delays.items()}
        assert abs(mean["unknown"] - mean["wrong"]) < 0.3, delays
        reply, elapsed = timed_pass(srv.port, t.login, t.password)  # a good login is not delayed
        assert reply.startswith(b"+OK Logged in") and elapsed < 1.0, (reply, elapsed)
    finally:
        srv.stop()


# ------------------------------------------------------------------ hostile logins


#: (login as sent, its escaped form in the logs)
HOSTILE = [
    (b"'OR'1'='1", "'OR'1'='1"),
    (b'"OR/**/1=1#', '"OR/**/1=1#'),
    (b"\\", "\\\\"),
    (b"tom\\my", "tom\\\\my"),
    (b"%s", "%s"),
    (b"%", "%"),
    (b"100%%", "100%%"),
    (b"fileok\x00", "fileok\\x00"),
    (b"\x00", "\\x00"),
    (b"a\x1b[2Jb", "a\\x1b[2Jb"),
    (b"del\x7f", "del\\x7f"),
    ("tömmy".encode(), "tömmy"),
    ("😀".encode(), "😀"),
    (b"\xff\xfe", "\\xff\\xfe"),
    (b"o" * 250, "o" * 250),  # USER + a 250-octet name: 255 octets plus CRLF
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_logins_are_data(request: pytest.FixtureRequest, backend: str) -> None:
    t = target(request, backend)
    for login, _ in HOSTILE:
        login_fails(t.server.port, login, t.password)
    # a longer name does not fit in a command line: refused as such, not as a login
    c = RawClient(t.server.port)
    assert c.cmd(b"USER " + b"n" * 251) == b"-ERR Command line too long."
    assert c.cmd(b"USER " + "ü".encode() * 126) == b"-ERR Command line too long."
    assert c.cmd(b"PASS x").startswith(b"-ERR")
    c.close()
    # a bare CR inside the line: a separator (two arguments), or part of the name; never raw in a log
    c = RawClient(t.server.port)
    if c.cmd(b"USER ab\rcd") == b"+OK Send your password.":
        assert c.cmd(b"PASS " + t.password.encode()) == AUTH_FAILED
    c.close()
    login_works(t.server.port, t.login, t.password)  # still serving
    assert t.server.proc is not None and t.server.proc.poll() is None
    wanted = [f"({escaped}) 0 0 0 0" for _, escaped in HOSTILE]

    def all_logged() -> bool:
        text = t.env.access_log.read_text(encoding="utf-8", errors="replace")
        return all(w in text for w in wanted)

    wait_for(all_logged, 5.0, what="every hostile login in the access log")
    access, errors = t.env.access_log.read_bytes(), t.env.error_log.read_bytes()
    for data in (access, errors):
        assert b"\r" not in data and b"\x00" not in data and b"\x1b" not in data
        assert b"\xff" not in data  # undecodable bytes are escaped, the logs stay UTF-8
        data.decode("utf-8")
    line = re.compile(r"127\.0\.0\.1 \d{4}/\d\d/\d\d \d\d:\d\d:\d\d \d{4}/\d\d/\d\d \d\d:\d\d:\d\d \S+ \d+ \d+ \d+ \d+")
    for entry in access.decode().splitlines():
        assert line.fullmatch(entry), entry
    text = errors.decode()
    for _, escaped in HOSTILE:
        assert f"authentication failed: {escaped} from 127.0.0.1\n" in text, escaped
    assert "Traceback" not in text and "internal error" not in text
    assert "n" * 251 not in text
