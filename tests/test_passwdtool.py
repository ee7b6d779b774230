"""tpops-passwd: hashes tpops verifies (a real login over the wire), atomic passwd-file edits, --mysql."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mariadb
from tests.support.client import RawClient
from tests.support.marks import IS_ROOT
from tests.support.server import REPO, MailEnv, Server, make_message
from tpops.auth import hashes
from tpops.passwdtool import Failure, edited_lines, make_hash

TPOPS_PASSWD = str(Path(sys.executable).with_name("tpops-passwd"))


def passwd(*args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([TPOPS_PASSWD, *args], check=False, input=stdin, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def login(port: int, user: str, password: str) -> bytes:
    c = RawClient(port)
    try:
        assert c.cmd(f"USER {user}").startswith(b"+OK")
        reply = c.cmd(f"PASS {password}")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


# ------------------------------------------------------------------ hashes


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SSHA512", "PLAIN"])
def test_hash_prints_a_value_tpops_verifies(scheme: str) -> None:
    rounds = ["-r", "4"] if scheme == "BLF-CRYPT" else []
    out = passwd("hash", "-s", scheme.lower(), *rounds, "--stdin", stdin="pass word ü\n").stdout.strip()
    assert out.startswith("{" + scheme + "}")
    assert hashes.identify(out) == scheme
    assert hashes.verify_password("pass word ü".encode(), out)
    assert not hashes.verify_password(b"pass word", out)


def test_default_is_sha512_crypt_with_doveadm_rounds() -> None:
    out = passwd("hash", "--stdin", stdin="x\n").stdout.strip()
    assert out.startswith("{SHA512-CRYPT}$6$") and "rounds=" not in out  # crypt(3)'s implicit 5000
    assert "rounds=20000$" in make_hash("x", "SHA512-CRYPT", 20000)


def test_scram_sha256_in_dovecots_format() -> None:
    """``{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey``, checked with PASS too."""
    import base64

    import scramp

    out = passwd("hash", "-s", "SCRAM-SHA-256", "--stdin", stdin="pencil\n").stdout.strip()
    rounds, salt, stored, server = out.removeprefix("{SCRAM-SHA-256}").split(",")
    assert out.startswith("{SCRAM-SHA-256}4096,") and len(base64.b64decode(salt)) == 16
    _, want_stored, want_server, _ = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        "pencil", iteration_count=4096, salt=base64.b64decode(salt))
    assert (base64.b64decode(stored), base64.b64decode(server)) == (want_stored, want_server)
    assert hashes.verify_password(b"pencil", out) and not hashes.verify_password(b"pencil2", out)
    assert make_hash("x", "SCRAM-SHA-256", 5000).startswith("{SCRAM-SHA-256}5000,")
    r = passwd("hash", "-s", "SCRAM-SHA-256", "-r", "1000", "--stdin", stdin="x\n", check=False)
    assert r.returncode == 1 and "at least 4096 iterations" in r.stderr


def test_bad_scheme_and_empty_password_are_refused() -> None:
    r = passwd("hash", "-s", "MD4", "--stdin", stdin="x\n", check=False)
    assert r.returncode == 1 and "unknown scheme 'MD4'" in r.stderr
    r = passwd("hash", "--stdin", stdin="\n", check=False)
    assert r.returncode == 1 and "empty password" in r.stderr
    r = passwd("hash", check=False)  # no terminal and no --stdin
    assert r.returncode == 1 and "--stdin" in r.stderr and r.stdout == ""


# ------------------------------------------------------------------ editing the file


def test_edits_keep_every_other_line_byte_for_byte() -> None:
    lines = [b"# comment \xe9 latin1\n", b"\n", b"alice:{PLAIN}a::::/h::\r\n", b"  # indented\n",
             b"bob:{PLAIN}b::::/srv/bob::maildir=/m/bob\n", b"bob:{PLAIN}dup::::/x\n", b"carol:{PLAIN}c::::/c"]
    out, found = edited_lines(lines, "bob", "{PLAIN}new")
    assert found
    assert out == lines[:4] + [b"bob:{PLAIN}new::::/srv/bob::maildir=/m/bob\n"] + lines[5:]
    out, found = edited_lines(lines, "dave", "{PLAIN}d", {"home": "/srv/dave"})
    assert not found
    assert out == lines[:6] + [b"carol:{PLAIN}c::::/c\n", b"dave:{PLAIN}d::::/srv/dave\n"]
    out, found = edited_lines(lines, "bob", None)
    assert found and out == lines[:4] + lines[5:]  # the first line goes; the ignored duplicate stays
    out, _ = edited_lines(lines, "alice", "{PLAIN}z", {"uid": "5000", "mail": "/m/alice"})
    assert out[2] == b"alice:{PLAIN}z:5000:::/h::userdb_mail=maildir:/m/alice\r\n"


def test_lines_tpops_would_refuse_are_not_written() -> None:
    with pytest.raises(Failure, match="no home and no maildir"):
        edited_lines([], "nohome", "{PLAIN}x")
    with pytest.raises(Failure, match="not an absolute path"):
        edited_lines([], "rel", "{PLAIN}x", {"home": "srv/rel"})


def test_set_and_delete_atomically_keep_mode_and_owner(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"# users\nkeep:{PLAIN}k::::/srv/keep\n")
    path.chmod(0o640)
    if IS_ROOT:
        os.chown(path, 65534, 65534)
    before = path.stat()
    passwd("set", "new", "-f", str(path), "--home", "/srv/new", "-s", "PLAIN", "--stdin", stdin="pw\n")
    after = path.stat()
    assert after.st_ino != before.st_ino  # replaced by rename, never rewritten in place
    assert stat.S_IMODE(after.st_mode) == 0o640 and (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert path.read_bytes() == b"# users\nkeep:{PLAIN}k::::/srv/keep\nnew:{PLAIN}pw::::/srv/new\n"
    passwd("delete", "keep", "-f", str(path))
    assert path.read_bytes() == b"# users\nnew:{PLAIN}pw::::/srv/new\n"
    r = passwd("delete", "keep", "-f", str(path), check=False)
    assert r.returncode == 1 and "'keep' is not in" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left


def test_bad_logins_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    for bad in ("a:b", "#x", " x"):
        r = passwd("set", bad, "-f", str(path), "--home", "/h", "--stdin", stdin="pw\n", check=False)
        assert r.returncode == 1 and "cannot be stored" in r.stderr
    assert not path.exists()


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SSHA512"])
def test_set_password_then_log_in_over_the_wire(mail_env: MailEnv, scheme: str) -> None:
    mail_env.add_user("old", "oldpw", [make_message("m")])
    rounds = ["-r", "4"] if scheme == "BLF-CRYPT" else []
    passwd("set", "old", "-c", str(mail_env.conf), "-s", scheme, *rounds, "--stdin", stdin="n3w pw\n")
    assert f"old:{{{scheme}}}" in mail_env.passwd_file.read_text()
    home = mail_env.maildir("new").parent
    mail_env.add_user("tmp")  # make a Maildir the new user's line points at
    os.rename(mail_env.maildir("tmp").parent, home)
    passwd("delete", "tmp", "-c", str(mail_env.conf))
    passwd("set", "new", "-c", str(mail_env.conf), "--home", str(home), "-s", scheme, *rounds, "--stdin",
           stdin="fresh\n")
    srv = Server(mail_env).start()
    try:
        assert login(srv.port, "old", "n3w pw").startswith(b"+OK Logged in, 1 messages")
        assert login(srv.port, "old", "oldpw").startswith(b"-ERR [AUTH]")
        assert login(srv.port, "new", "fresh").startswith(b"+OK Logged in, 0 messages")
        passwd("delete", "new", "-c", str(mail_env.conf))
        assert login(srv.port, "new", "fresh").startswith(b"-ERR [AUTH]")
    finally:
        srv.stop()


# ------------------------------------------------------------------ --mysql


@pytest.fixture
def mysql_env(mail_env: MailEnv) -> Iterator[tuple[MailEnv, mariadb.Server, str]]:
    with mariadb.temp_database() as (srv, db):
        mariadb.load_sql(srv, db, str(REPO / "tpops_auth-mysql.sql"))
        mail_env.write_conf(auth_type="'MySQL'", mysql_server=repr(srv.host), mysql_port=str(srv.port),
                            mysql_user=repr(srv.user), mysql_pass=repr(srv.password) if srv.password else "nil",
                            mysql_db=repr(db))
        yield mail_env, srv, db


def test_mysql_sets_the_rows_password_and_tpops_accepts_it(mysql_env: tuple[MailEnv, mariadb.Server, str]) -> None:
    env, srv, db = mysql_env
    maildir = env.add_user("tommy", messages=[make_message("m")])
    conn = srv.connect(db)
    try:
        conn.cursor().execute("insert into user (login, passwd, mail, maildir) values (%s, %s, %s, %s)",
                              ("tommy", "cleartext", "t@example.org", str(maildir)))
        conn.cursor().execute("insert into user (login, passwd, mail, maildir) values (%s, %s, %s, %s)",
                              ("other'; --", "untouched", "o@example.org", str(maildir)))
    finally:
        conn.close()
    out = passwd("set", "tommy", "--mysql", "-c", str(env.conf), "--stdin", stdin="hashed pw\n").stdout
    assert f"changed the password of 'tommy' in {db}.user" in out
    r = passwd("set", "nobody-here", "--mysql", "-c", str(env.conf), "--stdin", stdin="x\n", check=False)
    assert r.returncode == 1 and "no row for 'nobody-here'" in r.stderr
    r = passwd("set", "tommy", "--mysql", "--table", "user; drop table user", "-c", str(env.conf), "--stdin",
               stdin="x\n", check=False)
    assert r.returncode == 1 and "not a plain SQL identifier" in r.stderr
    conn = srv.connect(db)
    try:
        cursor = conn.cursor()
        cursor.execute("select login, passwd from user order by uid")
        rows = cursor.fetchall()
    finally:
        conn.close()
    assert rows[0][1].startswith("{SHA512-CRYPT}$6$") and rows[1] == ("other'; --", "untouched")
    srv_tpops = Server(env).start()
    try:
        assert login(srv_tpops.port, "tommy", "hashed pw").startswith(b"+OK Logged in, 1 messages")
        assert login(srv_tpops.port, "tommy", "cleartext").startswith(b"-ERR [AUTH]")
    finally:
        srv_tpops.stop()
