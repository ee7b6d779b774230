"""Tests for the File backend (Dovecot passwd-file), the password checks in tpops.auth.hashes, and the factory."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import pytest
from passlib import hash as ph

from tpops.auth import make_authenticator
from tpops.auth import hashes
from tpops.auth.base import AuthUnavailable, MailboxInUse, MailUser
from tpops.auth.file import FileAuthenticator
from tpops.config import Config

SECRET = "Tr0ub4dor&3"
B = SECRET.encode()
TS = "<1896.697170952@dbc.mtview.ca.us>"


def apop(secret: str, ts: str = TS) -> str:
    return hashlib.md5((ts + secret).encode()).hexdigest()


def ssha(digest: str, secret: bytes, salt: bytes) -> str:
    return base64.b64encode(hashlib.new(digest, secret + salt).digest() + salt).decode()


#: scheme label -> stored value for SECRET, made with passlib (cheap costs: tests stay fast)
STORED: dict[str, str] = {
    "plain": "{PLAIN}" + SECRET,
    "cleartext": "{CLEARTEXT}" + SECRET,
    "sha512-crypt": "{SHA512-CRYPT}" + ph.sha512_crypt.using(rounds=5000).hash(B),
    "sha256-crypt": "{SHA256-CRYPT}" + ph.sha256_crypt.using(rounds=5000).hash(B),
    "md5-crypt": "{MD5-CRYPT}" + ph.md5_crypt.hash(B),
    "blf-crypt": "{BLF-CRYPT}" + ph.bcrypt.using(rounds=4, ident="2y").hash(B),
    "ssha": "{SSHA}" + ph.ldap_salted_sha1.hash(B)[len("{SSHA}"):],
    "ssha256": "{SSHA256}" + ph.ldap_salted_sha256.hash(B)[len("{SSHA256}"):],
    "ssha512": "{SSHA512}" + ph.ldap_salted_sha512.hash(B)[len("{SSHA512}"):],
    "ssha512-longsalt": "{SSHA512}" + ssha("sha512", B, os.urandom(32)),
    "argon2id": "{ARGON2ID}" + ph.argon2.using(memory_cost=1024, rounds=2).hash(B),
    "crypt-des": "{CRYPT}" + ph.des_crypt.hash(B),
    "crypt-sha512": "{crypt}" + ph.sha512_crypt.using(rounds=5000).hash(B),
    "bare-sha512": ph.sha512_crypt.using(rounds=5000).hash(B),
    "bare-sha256": ph.sha256_crypt.using(rounds=5000).hash(B),
    "bare-md5": ph.md5_crypt.hash(B),
    "bare-2b": ph.bcrypt.using(rounds=4).hash(B),
    "bare-2y": ph.bcrypt.using(rounds=4, ident="2y").hash(B),
    "bare-argon2id": ph.argon2.using(memory_cost=1024, rounds=2).hash(B),
}


def config(tmp_path: Path, users: Path, **extra: object) -> Config:
    return Config(auth_type="File", auth_file=str(users), passwd_lock_dir=str(tmp_path / "locks"), **extra)


def write(path: Path, text: str) -> None:
    """Replace the file atomically (a new inode, as editors and tools do)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def line(login: str, stored: str, uid: str = "", gid: str = "", home: str = "/home/vmail/x", extra: str = "") -> str:
    return f"{login}:{stored}:{uid}:{gid}::{home}::{extra}\n"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("# test users\n\n" + "".join(
        line(name, stored, home=f"/home/vmail/{name}") for name, stored in STORED.items()
    ))
    return path


@pytest.mark.parametrize("scheme", sorted(STORED))
def test_every_scheme_accepts_right_and_refuses_wrong_password(tmp_path: Path, users: Path, scheme: str) -> None:
    auth = FileAuthenticator(config(tmp_path, users))
    assert auth.authenticate(scheme, B) == MailUser(scheme, f"/home/vmail/{scheme}/Maildir", None, None)
    assert auth.authenticate(scheme, b"x" + B) is None  # (DES looks at 8 octets only)
    assert auth.authenticate(scheme, b"") is None


def test_unknown_user_and_wrong_password_are_both_none(tmp_path: Path, users: Path) -> None:
    auth = FileAuthenticator(config(tmp_path, users))
    assert auth.authenticate("nobody-here", B) is None
    assert auth.authenticate("sha512-crypt", b"wrong") is None
    for hostile in ("", "plain\0", "plain:x", "plain\r\nUSER root", "PLAIN", " plain", "ß" * 300):
        assert auth.authenticate(hostile, B) is None


def test_apop_needs_a_plain_entry(tmp_path: Path, users: Path) -> None:
    auth = FileAuthenticator(config(tmp_path, users))
    assert auth.supports_apop
    assert auth.authenticate_apop("plain", TS, apop(SECRET)) is not None
    assert auth.authenticate_apop("cleartext", TS, apop(SECRET).upper()) is not None
    assert auth.authenticate_apop("plain", TS, apop(SECRET + "x")) is None
    assert auth.authenticate_apop("plain", "<other@ts>", apop(SECRET)) is None
    assert auth.authenticate_apop("sha512-crypt", TS, apop(SECRET)) is None
    assert auth.authenticate_apop("nobody-here", TS, apop(SECRET)) is None


def test_no_plain_entry_means_no_apop(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(line("a", STORED["bare-sha512"]))
    assert not FileAuthenticator(config(tmp_path, path)).supports_apop


def test_bad_lines_refuse_only_their_user_and_are_logged_once_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users"
    path.write_text(
        line("good", "{PLAIN}goodpw")
        + line("bare", "barepassword")  # line 2: clear text without {PLAIN}
        + line("odd", "{NOSUCH}oddpassword")  # line 3: unknown scheme
        + "nohome:{PLAIN}nohomepw\n"  # line 4: no home and no maildir=: nothing to serve
        + "pasted-secret-alone\n"  # line 5: no colon at all (content never logged)
        + line("mbox", "{PLAIN}mboxpw", extra="userdb_mail=mbox:~/mail")  # line 6
        + line("root", "{PLAIN}rootpw", uid="0")  # line 7
        + line("later", "{PLAIN}laterpw")
    )
    caplog.set_level(logging.DEBUG, "tpops")
    auth = FileAuthenticator(config(tmp_path, path))
    for login, pw in (("bare", "barepassword"), ("odd", "oddpassword"), ("nohome", "nohomepw"),
                      ("mbox", "mboxpw"), ("root", "rootpw")):
        assert auth.authenticate(login, pw.encode()) is None
    assert auth.authenticate("good", b"goodpw") is not None
    assert auth.authenticate("later", b"laterpw") is not None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for n in (2, 3, 4, 5, 6, 7):
        assert sum(f"line {n}:" in m for m in errors) == 1, errors
    assert auth.authenticate("bare", b"x") is None  # not reloaded: still logged once
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == len(errors)
    for secret in ("barepassword", "oddpassword", "nohomepw", "goodpw", "mboxpw", "rootpw", "pasted-secret"):
        assert secret not in caplog.text


def test_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write(path, line("a", "{PLAIN}apw"))
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("a", b"apw") is not None
    assert auth.authenticate("b", b"bpw") is None
    write(path, line("b", "{PLAIN}bpw"))  # replaced: a gone, b new
    assert auth.authenticate("b", b"bpw") is not None
    assert auth.authenticate("a", b"apw") is None
    with path.open("a") as f:  # edited in place: same inode, new size
        f.write(line("c", "{PLAIN}cpw"))
    assert auth.authenticate("c", b"cpw") is not None
    write(path, line("b", "{PLAIN}BPW"))  # same size, new password
    assert auth.authenticate("b", b"bpw") is None
    assert auth.authenticate("b", b"BPW") is not None


def test_uid_gid_home_and_maildir_settings(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        line("empty", "{PLAIN}x")
        + line("numeric", "{PLAIN}x", uid="1234", gid="5678")
        + line("named", "{PLAIN}x", uid="nobody", gid="nogroup")
        + line("md", "{PLAIN}x", extra="quota=1G maildir=/srv/mail/md/")
        + line("tilde", "{PLAIN}x", home="/home/t", extra="userdb_mail=maildir:~/Mail:LAYOUT=fs")
        + line("dovecot@example.org", "{PLAIN}x", extra="userdb_mail=maildir:/srv/%d/%n")
        + "nohome:{PLAIN}x::::::maildir=/srv/mail/nohome\n"
        + "short:{PLAIN}x:7:8::/home/short\n"
    )
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("empty", b"x") == MailUser("empty", "/home/vmail/x/Maildir", None, None)
    assert auth.authenticate("numeric", b"x") == MailUser("numeric", "/home/vmail/x/Maildir", 1234, 5678)
    assert auth.authenticate("named", b"x") == MailUser("named", "/home/vmail/x/Maildir", 65534, 65534)
    assert auth.authenticate("md", b"x").maildir == "/srv/mail/md/"  # type: ignore[union-attr]
    assert auth.authenticate("tilde", b"x").maildir == "/home/t/Mail"  # type: ignore[union-attr]
    assert auth.authenticate("dovecot@example.org", b"x").maildir == "/srv/example.org/dovecot"  # type: ignore[union-attr]
    assert auth.authenticate("nohome", b"x").maildir == "/srv/mail/nohome"  # type: ignore[union-attr]
    assert auth.authenticate("short", b"x") == MailUser("short", "/home/short/Maildir", 7, 8)


def test_missing_or_unreadable_file_is_unavailable(tmp_path: Path) -> None:
    auth = FileAuthenticator(config(tmp_path, tmp_path / "missing"))
    with pytest.raises(AuthUnavailable, match="missing"):
        auth.authenticate("a", b"x")
    with pytest.raises(AuthUnavailable):
        auth.authenticate_apop("a", TS, apop("x"))
    assert not auth.supports_apop
    (tmp_path / "missing").write_text(line("a", "{PLAIN}x"))
    assert auth.authenticate("a", b"x") is not None  # appears later: works without a restart
    (tmp_path / "missing").unlink()
    with pytest.raises(AuthUnavailable):
        auth.authenticate("a", b"x")


def test_duplicate_login_first_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users"
    path.write_text(line("a", "{PLAIN}first") + line("a", "{PLAIN}second"))
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("a", b"first") is not None
    assert auth.authenticate("a", b"second") is None
    assert "line 2: duplicate login a" in caplog.text


def test_default_domain_applies_to_user_and_apop(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(line("tommy@example.org", "{PLAIN}pw") + line("local", "{PLAIN}pw"))
    auth = FileAuthenticator(config(tmp_path, path, default_domain="example.org"))
    assert auth.authenticate("tommy", b"pw").login == "tommy@example.org"  # type: ignore[union-attr]
    assert auth.authenticate_apop("tommy", TS, apop("pw")).login == "tommy@example.org"  # type: ignore[union-attr]
    assert auth.authenticate("tommy@example.org", b"pw") is not None
    assert auth.authenticate("local", b"pw") is None  # became local@example.org


def test_file_lock_is_keyed_on_the_login(tmp_path: Path) -> None:
    path = tmp_path / "users"
    (tmp_path / "md").mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "Maildir").symlink_to(tmp_path / "md")  # b's Maildir is a symlink to a's
    path.write_text(line("a", "{PLAIN}pw", extra=f"maildir={tmp_path}/md")
                    + line("b", "{PLAIN}pw", extra=f"maildir={tmp_path}/home/Maildir"))
    one, two = (FileAuthenticator(config(tmp_path, path)) for _ in range(2))
    a, b = one.authenticate("a", b"pw"), two.authenticate("b", b"pw")
    assert a is not None and b is not None
    held_by_b = two.lock(b)  # b cannot take a's lock by pointing his Maildir at a's ...
    held_by_a = one.lock(a)  # ... a still gets her own
    with pytest.raises(MailboxInUse):
        two.lock(MailUser("a", f"{tmp_path}/elsewhere"))  # a's lock, whatever the path
    held_by_a.release()
    held_by_b.release()
    one.close()


def test_factory(tmp_path: Path, users: Path) -> None:
    assert isinstance(make_authenticator(config(tmp_path, users)), FileAuthenticator)
    with pytest.raises(ValueError, match="auth_type"):
        make_authenticator(Config(auth_type="LDAP"))
    with pytest.raises(ValueError, match="auth_file"):
        make_authenticator(Config(auth_type="File"))


# -- tpops.auth.hashes ------------------------------------------------------------------


def test_plain_text_only_where_allowed(caplog: pytest.LogCaptureFixture) -> None:
    assert not hashes.verify_password(b"secret", "secret")
    assert hashes.verify_password(b"secret", "secret", plain_ok=True)
    assert not hashes.verify_password(b"secreT", "secret", plain_ok=True)
    assert hashes.verify_password(b"$1$abc", "$1$abc", plain_ok=True)  # not a hash: a bare setting
    assert not hashes.verify_password(b"", "", plain_ok=True)
    assert "secret" not in caplog.text


def test_unknown_scheme_is_logged_by_name_only(caplog: pytest.LogCaptureFixture) -> None:
    assert not hashes.verify_password(b"x", "{WHIRLPOOL}c2VjcmV0aGFzaA==")
    assert not hashes.verify_password(b"x", "{WHIRLPOOL}c2VjcmV0aGFzaA==", plain_ok=True)
    assert "WHIRLPOOL" in caplog.text
    assert "c2VjcmV0aGFzaA" not in caplog.text


def test_more_dovecot_forms() -> None:
    assert hashes.verify_password(b"secret", "{PLAIN-TRUNC}3-sec")
    assert not hashes.verify_password(b"se", "{PLAIN-TRUNC}3-sec")
    assert hashes.verify_password(b"secret", "{PLAIN.B64}" + base64.b64encode(b"secret").decode())
    assert hashes.verify_password(b"secret", "{SSHA256.HEX}" + (hashlib.sha256(b"secretsalt").digest() + b"salt").hex())
    assert hashes.verify_password(b"secret", "{PLAIN-MD5}" + hashlib.md5(b"secret").hexdigest())
    assert hashes.verify_password(b"secret", "{SHA}" + base64.b64encode(hashlib.sha1(b"secret").digest()).decode())
    assert not hashes.verify_password(b"secret", "{SSHA}!!notbase64")
    assert not hashes.verify_password(b"secret", "{SHA512-CRYPT}$6$malformed")


def test_long_and_odd_secrets() -> None:
    long72 = ph.bcrypt.using(rounds=4).hash(b"x" * 72)
    assert hashes.verify_password(b"x" * 100, long72)  # bcrypt looks at 72 octets, like crypt(3)
    assert not hashes.verify_password(b"x\0", STORED["bare-sha512"])
    assert not hashes.verify_password(b"\xff\xfe", STORED["bare-2b"])
    utf8 = ph.sha512_crypt.using(rounds=5000).hash("pässwörd".encode())
    assert hashes.verify_password("pässwörd".encode(), utf8)
    assert hashes.verify_password(b"\xff", "{PLAIN}" + b"\xff".decode("utf-8", "surrogateescape"))


def test_system_crypt_knows_yescrypt() -> None:
    stored = "$y$j9T$abcdefghijklmnopqrst$NR51gc/5sS6liFt0f9ndGOFyfHzjCFVe7KXETcO5fI9"  # "pw"
    assert hashes.crypt_verify(b"pw", stored)
    assert not hashes.crypt_verify(b"px", stored)
    assert hashes.verify_password(b"pw", stored)  # bare yescrypt: handed to crypt(3)
    assert hashes.verify_password(b"pw", "{CRYPT}" + stored)
    assert not hashes.crypt_verify(b"pw", "!" + stored)
    assert not hashes.crypt_verify(b"", "")
    assert not hashes.crypt_verify(b"p\0w", stored)


def test_plain_secret_and_apop_digest() -> None:
    assert hashes.plain_secret("{PLAIN}x:y") == "x:y"
    assert hashes.plain_secret("{cleartext}z") == "z"
    assert hashes.plain_secret("bare") is None
    assert hashes.plain_secret("bare", plain_ok=True) == "bare"
    assert hashes.plain_secret(STORED["bare-sha512"], plain_ok=True) is None
    assert hashes.plain_secret("{PLAIN-TRUNC}3-abc") is None
    # RFC 1939's example
    assert hashes.apop_digest_ok(TS, "tanstaaf", "c4c9334bac560ecc979e58001b3e22fb")
    assert hashes.apop_digest_ok(TS, "tanstaaf", "C4C9334BAC560ECC979E58001B3E22FB")
    assert not hashes.apop_digest_ok(TS, "tanstaaf", "c4c9334bac560ecc979e58001b3e22fc")
    assert not hashes.apop_digest_ok(TS, "tanstaaf", "")
    assert not hashes.apop_digest_ok(TS, "tanstaaf", "ü" * 32)


def test_dummy_verify_costs_like_a_real_check() -> None:
    import time

    real = ph.sha512_crypt.using(rounds=5000).hash(b"pw")
    start = time.perf_counter()
    for _ in range(5):
        hashes.verify_password(b"wrong", real)
    t_real = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        hashes.dummy_verify(b"wrong")
    t_dummy = time.perf_counter() - start
    assert t_real / 3 < t_dummy < t_real * 3


def test_index_lookups_on_odd_layouts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The load indexes lines without parsing them: every layout still finds the right line."""
    path = tmp_path / "users"
    body = "".join(line(f"u{i}", f"{{PLAIN}}pw{i}") for i in range(2000))
    path.write_bytes(
        b"# comment: with a colon\r\n"
        + b"  \t\r\n"
        + line("crlf", "{PLAIN}crlfpw").replace("\n", "\r\n").encode()
        + body.encode()
        + line("bad", "{NOSUCH}x").encode()  # line 2004
        + b"  # indented comment:x\n"
        + b"last:{PLAIN}lastpw::::/home/vmail/last::"  # no final newline
    )
    caplog.set_level(logging.INFO, "tpops")
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("crlf", b"crlfpw") is not None
    for i in (0, 1, 999, 1999):
        found = auth.authenticate(f"u{i}", f"pw{i}".encode())
        assert found is not None and found.login == f"u{i}" and found.maildir == "/home/vmail/x/Maildir"
    assert auth.authenticate("last", b"lastpw") is not None
    assert auth.authenticate("# comment", b"x") is None
    assert auth.authenticate("  # indented comment", b"x") is None
    assert auth.authenticate("bad", b"x") is None
    assert "line 2004: bad entry, login bad refused" in caplog.text
    assert "indexed 2003 logins" in caplog.text  # crlf, 2000, bad, last


def test_a_changed_large_file_is_scanned_until_the_master_reindexes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past REINDEX_MAX_LOGINS a worker does not re-index a changed file: it scans it per
    lookup (same answers, chunk boundaries included); refresh() re-indexes it (the master)."""
    from tpops.auth import file as file_module

    monkeypatch.setattr(file_module, "REINDEX_MAX_LOGINS", 3)
    niced: list[bool] = []
    monkeypatch.setattr(file_module, "_yield_cpu", lambda: niced.append(True))  # not this test process
    monkeypatch.setattr(file_module, "SCAN_CHUNK_OCTETS", 7)  # lines straddle every read
    path = tmp_path / "users"
    write(path, "".join(line(f"u{i}", f"{{PLAIN}}pw{i}") for i in range(5)))
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("u1", b"pw1") is not None
    caplog.set_level(logging.INFO, "tpops")
    write(path, "# u9:{PLAIN}commented\n"
          + line("u0", "{PLAIN}new0")
          + "".join(line(f"u{i}", f"{{PLAIN}}pw{i}") for i in range(2, 5))
          + line("u0", "{PLAIN}duplicate")
          + line("bad", "{NOSUCH}x")
          + "u9:{PLAIN}pw9::::/home/vmail/u9::")  # no final newline
    assert auth.authenticate("u0", b"new0") is not None and auth.authenticate("u0", b"pw0") is None
    assert auth.authenticate("u0", b"duplicate") is None  # the first line wins
    assert auth.authenticate("u1", b"pw1") is None  # removed
    assert auth.authenticate("u4", b"pw4") is not None
    assert auth.authenticate("u9", b"pw9") is not None  # the last line; the comment is not it
    assert auth.authenticate("bad", b"x") is None
    assert "line 7: bad entry, login bad refused" in caplog.text
    assert "changed: looking logins up (scanning it)" in caplog.text
    assert "indexed 6 logins" not in caplog.text  # no worker-side re-index
    assert niced == [True]  # once: the scanning worker yields the CPU to the master
    assert auth.refresh() is True and "indexed 6 logins" in caplog.text
    assert auth.refresh() is False  # unchanged now
    assert auth.authenticate("u9", b"pw9") is not None and auth.authenticate("u1", b"pw1") is None


def test_scan_finds_the_same_lines_as_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpops.auth import file as file_module

    data = ("# a:comment\n\n" + "".join(line(f"user{i}", f"{{PLAIN}}p{i}") for i in range(300))
            + " user7:{PLAIN}spaced::::/x::\r\nuser7:{PLAIN}dup::::/x::\nlast:{PLAIN}l::::/x::").encode()
    path = tmp_path / "users"
    path.write_bytes(data)
    found = file_module.index(data, str(path))
    for chunk in (1, 5, 64, 1 << 20):
        monkeypatch.setattr(file_module, "SCAN_CHUNK_OCTETS", chunk)
        for login, offset in found.items():
            assert file_module.scan(str(path), login) == (offset, data[offset:].split(b"\n")[0].decode().rstrip("\r"))
        assert file_module.scan(str(path), b"# a") is None
        assert file_module.scan(str(path), b"nobody") is None


def test_lines_appended_to_a_large_file_need_no_full_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual change, users appended: the stale index answers for the old part and
    only the new lines are scanned (no priority drop); the first line still wins."""
    from tpops.auth import file as file_module

    monkeypatch.setattr(file_module, "REINDEX_MAX_LOGINS", 3)
    niced: list[bool] = []
    monkeypatch.setattr(file_module, "_yield_cpu", lambda: niced.append(True))
    scanned: list[int] = []
    real_scan = file_module.scan
    monkeypatch.setattr(file_module, "scan", lambda path, login, start=0: scanned.append(start) or real_scan(path, login, start))
    path = tmp_path / "users"
    path.write_text("".join(line(f"u{i}", f"{{PLAIN}}pw{i}") for i in range(5)))
    old_size = path.stat().st_size
    auth = FileAuthenticator(config(tmp_path, path))
    assert auth.authenticate("u1", b"pw1") is not None
    with path.open("a") as f:
        f.write(line("new", "{PLAIN}newpw") + line("u1", "{PLAIN}duplicate"))
    assert auth.authenticate("new", b"newpw") is not None
    assert auth.authenticate("u1", b"pw1") is not None and auth.authenticate("u1", b"duplicate") is None
    assert auth.authenticate("nobody", b"x") is None
    assert scanned and set(scanned) == {old_size} and not niced
    path.write_text(line("u1", "{PLAIN}changed"))  # not an append: scanned whole, niced once
    assert auth.authenticate("u1", b"changed") is not None and auth.authenticate("new", b"newpw") is None
    assert scanned[-1] == 0 and niced == [True]
