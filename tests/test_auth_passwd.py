"""Tests for the Passwd backend (real system accounts, real /etc/shadow) and tpops-apoppasswd.

Accounts are made with ``useradd``/``chpasswd``/``usermod``/``chage`` and removed with
``userdel -r`` afterwards, so these tests need root (CI runs as root).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.marks import root_only
from tests.support.users import Accounts, run, shadow_hash
from tpops.auth import make_authenticator
from tpops.auth.base import AuthUnavailable, MailUser
from tpops.auth.passwd import PasswdAuthenticator, shadow_refusal
from tpops.config import Config

needs_root = root_only("creates system users")
TS = "<4711.1234567890@pop.example.org>"


def apop(secret: str, ts: str = TS) -> str:
    return hashlib.md5((ts + secret).encode()).hexdigest()


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    assert os.geteuid() == 0, "only tests marked needs_root use system accounts"
    acc = Accounts("tpt")
    try:
        acc.add("yes")  # Debian 12: PAM's pam_unix writes yescrypt
        acc.add("sha", "-c", "SHA512")
        run("usermod", "-L", acc.add("lock"))
        run("chage", "-E", "0", acc.add("exp"))
        run("chage", "-d", "0", acc.add("chg"))
        run("chage", "-d", "2000-01-01", "-M", "30", acc.add("old"))
        acc.add("apop")
        acc.add("d@example.org", badname=True)
        yield acc
    finally:
        acc.remove_all()


def config(tmp_path: Path, **extra: object) -> Config:
    return Config(passwd_lock_dir=str(tmp_path / "locks"), **extra)


@needs_root
def test_yescrypt_account(tmp_path: Path, accounts: Accounts) -> None:
    name = accounts.name("yes")
    assert shadow_hash(name).startswith("$y$")
    entry = pwd.getpwnam(name)
    auth = make_authenticator(config(tmp_path))
    assert isinstance(auth, PasswdAuthenticator)
    user = auth.authenticate(name, accounts.passwords[name].encode())
    assert user == MailUser(name, os.path.join(entry.pw_dir, "Maildir"), entry.pw_uid, entry.pw_gid)
    assert auth.authenticate(name, b"wrong") is None
    assert auth.authenticate(name, b"") is None


@needs_root
def test_sha512_account(tmp_path: Path, accounts: Accounts) -> None:
    name = accounts.name("sha")
    assert shadow_hash(name).startswith("$6$")
    auth = PasswdAuthenticator(config(tmp_path))
    assert auth.authenticate(name, accounts.passwords[name].encode()) is not None
    assert auth.authenticate(name, accounts.passwords[name].encode() + b"x") is None


@needs_root
@pytest.mark.parametrize(
    ("role", "reason"),
    [("lock", "locked"), ("exp", "account expired"), ("chg", "must be changed"), ("old", "password expired")],
)
def test_unusable_accounts_are_refused_with_the_right_password(
    tmp_path: Path, accounts: Accounts, caplog: pytest.LogCaptureFixture, role: str, reason: str
) -> None:
    caplog.set_level(logging.INFO, "tpops")
    name = accounts.name(role)
    password = accounts.passwords[name]
    assert PasswdAuthenticator(config(tmp_path)).authenticate(name, password.encode()) is None
    assert reason in caplog.text
    assert password not in caplog.text
    assert shadow_hash(name)[4:20] not in caplog.text


@needs_root
def test_unknown_hostile_and_root_logins(tmp_path: Path, accounts: Accounts, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tpops")
    auth = PasswdAuthenticator(config(tmp_path))
    name = accounts.name("yes")
    password = accounts.passwords[name].encode()
    for login in ("tptnosuchuser", name + "\0", "", name + ":x", name.upper(), "x" * 250, "tömmy", "root"):
        assert auth.authenticate(login, password) is None
    assert "uid 0" in caplog.text


@needs_root
def test_unreadable_shadow_is_unavailable(tmp_path: Path, accounts: Accounts) -> None:
    name = accounts.name("yes")
    auth = PasswdAuthenticator(config(tmp_path), shadow_path=str(tmp_path / "no-shadow"))
    with pytest.raises(AuthUnavailable, match="no-shadow"):
        auth.authenticate(name, b"x")
    auth = PasswdAuthenticator(config(tmp_path))
    os.seteuid(65534)  # as a daemon that dropped root would be; the real uid stays 0
    try:
        with pytest.raises(AuthUnavailable, match="tpops must run as root for Passwd"):
            auth.authenticate(name, b"x")
    finally:
        os.seteuid(0)


def apoppasswd(path: Path, login: str, secret: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpops.apoppasswd", "-f", str(path), *extra, login],
        input=None if secret is None else secret + "\n", capture_output=True, text=True, timeout=30,
    )


@needs_root
def test_apop_with_text_file(tmp_path: Path, accounts: Accounts) -> None:
    path = tmp_path / "apop"
    path.write_text("# APOP secrets\nghost:ghostsecret\n")
    apop_user, locked, sha = accounts.name("apop"), accounts.name("lock"), accounts.name("sha")
    assert apoppasswd(path, apop_user, "s3cr:et").returncode == 0
    assert apoppasswd(path, locked, "locksecret").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("# APOP secrets\nghost:ghostsecret\n")
    auth = PasswdAuthenticator(config(tmp_path, apop_passwd_file=str(path)))
    assert auth.supports_apop
    user = auth.authenticate_apop(apop_user, TS, apop("s3cr:et"))
    assert user is not None and user.uid == pwd.getpwnam(apop_user).pw_uid
    assert auth.authenticate_apop(apop_user, TS, apop("wrong")) is None
    assert auth.authenticate_apop(sha, TS, apop("")) is None  # no secret in the file
    assert auth.authenticate_apop("ghost", TS, apop("ghostsecret")) is None  # no such account
    assert auth.authenticate_apop(locked, TS, apop("locksecret")) is None  # account locked
    assert apoppasswd(path, apop_user, "changed").returncode == 0  # re-read on change
    assert auth.authenticate_apop(apop_user, TS, apop("changed")) is not None
    assert apoppasswd(path, apop_user, None, "-d").returncode == 0
    assert auth.authenticate_apop(apop_user, TS, apop("changed")) is None
    assert path.read_text().count("\n") == 3
    path.unlink()
    with pytest.raises(AuthUnavailable):
        auth.authenticate_apop(apop_user, TS, apop("changed"))


@needs_root
def test_apop_with_berkeley_db_file(tmp_path: Path, accounts: Accounts) -> None:
    from berkeleydb import db

    apop_user, sha = accounts.name("apop"), accounts.name("sha")
    path = tmp_path / "apop.db"
    # postmap's layout: key and value NUL-terminated; the second pair without NULs
    run("db5.3_load", "-T", "-t", "hash", str(path),
        input=f"{apop_user}\\00\nbdbsecret\\00\n{sha}\nshasecret\n")
    table = db.DB()
    table.open(str(path), None, db.DB_HASH, db.DB_RDONLY)
    assert table.get(apop_user.encode() + b"\0") == b"bdbsecret\0"
    table.close()
    auth = PasswdAuthenticator(config(tmp_path, apop_passwd_file=str(path)))
    assert auth.authenticate_apop(apop_user, TS, apop("bdbsecret")) is not None
    assert auth.authenticate_apop(sha, TS, apop("shasecret")) is not None
    assert auth.authenticate_apop(apop_user, TS, apop("bdbsecret\0")) is None
    assert auth.authenticate_apop(accounts.name("yes"), TS, apop("")) is None  # not in the file: no crash
    assert auth.authenticate(apop_user, accounts.passwords[apop_user].encode()) is not None


@needs_root
def test_no_apop_file_means_no_apop(tmp_path: Path, accounts: Accounts) -> None:
    auth = PasswdAuthenticator(config(tmp_path))
    assert not auth.supports_apop
    assert auth.authenticate_apop(accounts.name("apop"), TS, apop("x")) is None


@needs_root
def test_default_domain_for_pass_and_apop(tmp_path: Path, accounts: Accounts) -> None:
    full = accounts.name("d@example.org")
    short = full.split("@")[0]
    path = tmp_path / "apop"
    path.write_text(f"{full}:domainsecret\n")
    auth = PasswdAuthenticator(config(tmp_path, default_domain="example.org", apop_passwd_file=str(path)))
    user = auth.authenticate(short, accounts.passwords[full].encode())
    assert user is not None and user.login == full
    assert auth.authenticate_apop(short, TS, apop("domainsecret")).login == full  # type: ignore[union-attr]
    assert auth.authenticate(accounts.name("yes"), accounts.passwords[accounts.name("yes")].encode()) is None


def test_shadow_aging_rules() -> None:
    today = 20000
    assert shadow_refusal("u:h:19990:0:99999:7:::".split(":"), today) is None
    assert shadow_refusal("u:h:19990::::::".split(":"), today) is None
    assert shadow_refusal("u:h:::::::".split(":"), today) is None
    assert shadow_refusal("u:h:19990:0:99999:7::20001:".split(":"), today) is None
    assert shadow_refusal("u:h:19990:0:99999:7::20000:".split(":"), today) == "account expired"
    assert shadow_refusal("u:h:19990:0:99999:7::0:".split(":"), today) == "account expired"
    assert shadow_refusal("u:h:0:0:99999:7:::".split(":"), today) == "password must be changed (lastchg 0)"
    assert shadow_refusal("u:h:19990:0:10:7:::".split(":"), today) is None
    assert shadow_refusal("u:h:19980:0:10:7:::".split(":"), today) == "password expired (max age)"
    assert shadow_refusal("u:h:19980:0:-1:7:::".split(":"), today) is None


def test_apoppasswd_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "apop"
    for login in ("a:b", "a\nb", "#a", ""):
        result = apoppasswd(path, login, "secret")
        assert result.returncode != 0 and not path.exists()
    assert apoppasswd(path, "a", "").returncode == 1  # empty secret
    assert apoppasswd(path, "a", None, "-d").returncode == 1  # no file yet
    assert apoppasswd(path, "a", "one").returncode == 0
    assert apoppasswd(path, "b", "two").returncode == 0
    assert apoppasswd(path, "c", None, "-d").returncode == 1  # not there
    assert path.read_text() == "a:one\nb:two\n"
    bdb = tmp_path / "apop.db"
    run("db5.3_load", "-T", "-t", "hash", str(bdb), input="a\\00\nx\\00\n")
    result = apoppasswd(bdb, "a", "secret")
    assert result.returncode == 1 and "Berkeley DB" in result.stderr
    conf = tmp_path / "tpops.conf"
    conf.write_text(f"$apop_passwd_file = '{path}'\n")
    result = subprocess.run([sys.executable, "-m", "tpops.apoppasswd", "-c", str(conf), "c"],
                            input="three\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert path.read_text() == "a:one\nb:two\nc:three\n"
