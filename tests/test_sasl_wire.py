"""POP3 AUTH (RFC 5034) over the wire: every mechanism against the File and MySQL backends, the
exchange's edge cases (cancel, bad base64, line lengths), failure limits, --domain, and curl.

Clients compute their side by hand (PLAIN, LOGIN), with :mod:`hmac` (CRAM-MD5) and with
``scramp.ScramClient`` (SCRAM-SHA-256); poplib has no AUTH, so the raw client is used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator

import pytest
import scramp

from tests.support import mariadb
from tests.support.client import RawClient
from tests.support.procs import wait_for
from tests.support.server import REPO, MailEnv, Server, make_message
from tpops.passwdtool import make_hash

BODY = "sasl body\n"
FAILED = b"-ERR [AUTH] Authentication failed."


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def logged_in(reply: bytes) -> bool:
    return reply.startswith(b"+OK Logged in")


def plain(c: RawClient, user: str, password: str) -> bytes:
    return c.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))


def login_mech(c: RawClient, user: str, password: str) -> bytes:
    assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
    assert c.cmd(b64(user)) == b"+ " + b64("Password:").encode()
    return c.cmd(b64(password))


def cram_md5(c: RawClient, user: str, password: str) -> bytes:
    reply = c.cmd("AUTH CRAM-MD5")
    assert reply.startswith(b"+ "), reply
    challenge = base64.b64decode(reply[2:])
    assert challenge.startswith(b"<") and challenge.endswith(b"@test.example.org>")
    return c.cmd(b64(f"{user} {hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()}"))


def scram(c: RawClient, user: str, password: str) -> bytes:
    """SCRAM-SHA-256 with scramp's client; the server's proof is checked before the empty answer."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    reply = c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
    assert reply.startswith(b"+ "), reply
    client.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = c.cmd(b64(client.get_client_final()))
    if not reply.startswith(b"+ "):
        return reply  # the server refused the proof
    client.set_server_final(base64.b64decode(reply[2:]).decode())  # raises if the server is not genuine
    return c.cmd("")


MECHANISMS = {"PLAIN": plain, "LOGIN": login_mech, "CRAM-MD5": cram_md5, "SCRAM-SHA-256": scram}


@pytest.fixture
def file_env(mail_env: MailEnv) -> MailEnv:
    """A passwd-file with a {PLAIN}, a {SHA512-CRYPT} and a {SCRAM-SHA-256} user; CRAM-MD5 allowed."""
    mail_env.add_user("plain", "plainpw", [make_message("p", BODY)])
    mail_env.add_user("sha", make_hash("shapw", "SHA512-CRYPT"), [make_message("s", BODY)], scheme="")
    mail_env.add_user("scram", make_hash("scrampw", "SCRAM-SHA-256"), [make_message("x", BODY)], scheme="")
    mail_env.write_conf(sasl_mechanisms="'SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN'", max_auth_failures="50")
    return mail_env


# Which mechanisms can work for which kind of stored password.
WORKS = {
    ("plain", "plainpw"): ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"),
    ("sha", "shapw"): ("PLAIN", "LOGIN"),
    ("scram", "scrampw"): ("PLAIN", "LOGIN", "SCRAM-SHA-256"),
}


def test_every_mechanism_with_a_right_and_a_wrong_secret(file_env: MailEnv) -> None:
    srv = Server(file_env).start()
    try:
        c = RawClient(srv.port)
        assert c.cmd("CAPA") == b"+OK Capability list follows"
        assert c.read_body().splitlines()[-1] == b"SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"
        c.close()
        for (user, password), works in WORKS.items():
            for name, mechanism in MECHANISMS.items():
                c = RawClient(srv.port)
                assert mechanism(c, user, password + "x") == FAILED, (user, name)
                reply = mechanism(c, user, password)
                if name in works:
                    assert logged_in(reply), (user, name, reply)
                    status, body = c.multi("RETR 1")
                    assert status.startswith(b"+OK") and body.endswith(b"sasl body\r\n")
                    assert c.cmd("QUIT").startswith(b"+OK")
                else:
                    assert reply == FAILED, (user, name)
                c.close()
            for name, mechanism in MECHANISMS.items():  # an unknown user fails the same way
                c = RawClient(srv.port)
                assert mechanism(c, "nobody", password) == FAILED, name
                c.close()
        c = RawClient(srv.port)  # a stored SCRAM-SHA-256 value works with USER/PASS too
        assert logged_in(c.login("scram", "scrampw"))
        c.close()
    finally:
        srv.stop()
    # Every mechanism looks an unknown user up once: one line per attempt (SCRAM used to
    # ask for stored credentials, then for a clear secret: two lookups, two lines).
    assert srv.output().count("login nobody refused: no such user") == len(WORKS) * len(MECHANISMS)
    log = file_env.error_log.read_text()
    assert "plainpw" not in log and "scrampw" not in log and "shapw" not in log
    assert "authentication failed: plain from 127.0.0.1" in log  # the line fail2ban reads, as for PASS


def test_exchange_edge_cases(file_env: MailEnv) -> None:
    """Bare AUTH, cancel, bad base64, unknown mechanism, '=', and the 8 KiB line limit."""
    long_password = "p" * 4700  # base64 of it: a line of over 6 KiB
    file_env.add_user("longpw", long_password, [make_message("l", BODY)])
    srv = Server(file_env).start()
    try:
        c = RawClient(srv.port)
        assert c.cmd("AUTH") == b"+OK Supported mechanisms follow"
        assert c.read_body() == b"SCRAM-SHA-256\r\nCRAM-MD5\r\nPLAIN\r\nLOGIN\r\n"
        assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
        assert c.cmd("*") == b"-ERR Authentication cancelled."
        assert c.cmd("AUTH PLAIN") == b"+ "  # no initial response: an empty challenge
        assert c.cmd("*") == b"-ERR Authentication cancelled."
        assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
        assert c.cmd("not base64!") == b"-ERR Invalid base64 data in continued response."
        assert c.cmd("AUTH PLAIN %%%%") == b"-ERR Invalid base64 data in initial response."
        assert c.cmd("AUTH KERBEROS_V4") == b"-ERR Unsupported authentication mechanism."
        assert c.cmd("AUTH PLAIN =") == FAILED  # '=' is an empty initial response, not none
        assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
        assert c.cmd(b64("x" * 6200)) == b"-ERR Response line too long."  # 8268 octets > 8 KiB
        assert c.cmd("NOOP") == b"-ERR NOOP is not valid in the AUTHORIZATION state."  # the session goes on
        assert c.cmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
        assert c.cmd(b64("longpw")) == b"+ " + b64("Password:").encode()
        line = b64(long_password)
        assert 6 * 1024 <= len(line) <= 8192
        assert logged_in(c.cmd(line))
        c.close()
    finally:
        srv.stop()


def test_failures_pay_error_interval_and_close_at_max_auth_failures(file_env: MailEnv) -> None:
    file_env.write_conf(error_interval="1", max_auth_failures="2")
    srv = Server(file_env).start()
    try:
        c = RawClient(srv.port)
        start = time.monotonic()
        assert scram(c, "plain", "wrong") == FAILED
        assert time.monotonic() - start >= 1.0
        start = time.monotonic()
        assert plain(c, "plain", "wrong") == FAILED
        assert time.monotonic() - start >= 1.0
        assert c.closed()
        c.close()
        c = RawClient(srv.port)  # a cancel is no failed login: no pause
        start = time.monotonic()
        assert c.cmd("AUTH PLAIN") == b"+ "
        assert c.cmd("*") == b"-ERR Authentication cancelled."
        assert time.monotonic() - start < 0.9
        c.close()
    finally:
        srv.stop()


def test_domain_applies_to_auth(mail_env: MailEnv) -> None:
    mail_env.add_user("tom@example.org", "tompw", [make_message("d", BODY)])
    srv = Server(mail_env, "--domain", "example.org").start()
    try:
        for mechanism in (plain, login_mech, scram):
            c = RawClient(srv.port)
            assert logged_in(mechanism(c, "tom", "tompw")), mechanism
            assert c.cmd("QUIT").startswith(b"+OK")
            c.close()
    finally:
        srv.stop()
    # the canonical login in the access log (written as each session ends, after its QUIT reply)
    wait_for(lambda: mail_env.access_log.read_text().count(" tom@example.org ") == 3, what="3 access-log lines")


def test_capa_over_loopback_offers_plain_even_when_disabled(file_env: MailEnv) -> None:
    """Loopback is secure: $disable_plaintext_auth keeps PLAIN/LOGIN there (the non-secure
    case is in tests/test_session_memory.py, with a 192.0.2.1 peer)."""
    file_env.write_conf(disable_plaintext_auth="true", sasl_mechanisms="nil")
    srv = Server(file_env).start()
    try:
        c = RawClient(srv.port)
        assert c.cmd("CAPA").startswith(b"+OK")
        assert b"SASL SCRAM-SHA-256 PLAIN LOGIN\r\n" in c.read_body()
        assert logged_in(plain(c, "sha", "shapw"))
        c.close()
    finally:
        srv.stop()


def test_curl_uses_auth_so_a_hashed_user_fetches_while_apop_is_offered(mail_env: MailEnv) -> None:
    """curl prefers SASL to APOP when CAPA lists SASL: a hashed-password user now logs in
    although a {PLAIN} user makes the greeting offer APOP (it failed with APOP before)."""
    mail_env.add_user("apopfan", "x")
    mail_env.add_user("hashed", make_hash("h4shed", "SHA512-CRYPT"), [make_message("curl", BODY)], scheme="")
    srv = Server(mail_env).start()
    try:
        assert b"<" in RawClient(srv.port).greeting  # APOP offered
        r = subprocess.run(["curl", "-v", "-sS", "--max-time", "20", f"pop3://hashed:h4shed@127.0.0.1:{srv.port}/1"],
                           capture_output=True, check=False, timeout=30)
    finally:
        srv.stop()
    assert r.returncode == 0, r.stderr
    assert b"sasl body\r\n" in r.stdout
    assert b"> AUTH PLAIN" in r.stderr or b"> AUTH LOGIN" in r.stderr
    assert b"> APOP" not in r.stderr


# ------------------------------------------------------------------ MySQL


@pytest.fixture
def mysql_env(mail_env: MailEnv) -> Iterator[MailEnv]:
    with mariadb.temp_database() as (srv, db):
        mariadb.load_sql(srv, db, str(REPO / "tpops_auth-mysql.sql"))
        rows = [("clear", "clearpw"), ("scramrow", make_hash("scrampw", "SCRAM-SHA-256")),
                ("sharow", make_hash("shapw", "SHA512-CRYPT"))]
        conn = srv.connect(db)
        try:
            for login, stored in rows:
                maildir = mail_env.add_user(login, "unused", [make_message(login, BODY)])  # the Maildir only
                conn.cursor().execute("insert into user (login, passwd, mail, maildir) values (%s, %s, %s, %s)",
                                      (login, stored, f"{login}@example.org", str(maildir)))
        finally:
            conn.close()
        mail_env.write_conf(auth_type="'MySQL'", mysql_server=repr(srv.host), mysql_port=str(srv.port),
                            mysql_user=repr(srv.user), mysql_pass=repr(srv.password) if srv.password else "nil",
                            mysql_db=repr(db), max_auth_failures="50")
        yield mail_env


def test_mysql_plain_and_scram(mysql_env: MailEnv) -> None:
    srv = Server(mysql_env).start()
    try:
        cases = [("clear", "clearpw", (plain, scram, login_mech)), ("scramrow", "scrampw", (plain, scram)),
                 ("sharow", "shapw", (plain,))]
        for user, password, working in cases:
            for mechanism in (plain, scram):
                c = RawClient(srv.port)
                assert mechanism(c, user, "wrong") == FAILED
                reply = mechanism(c, user, password)
                assert logged_in(reply) == (mechanism in working), (user, mechanism, reply)
                c.close()
    finally:
        srv.stop()
