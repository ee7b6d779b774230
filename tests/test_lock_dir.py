"""The lock-directory policy (tpops.mailbox.lock.prepare_lock_dir / check_lock_dir) and the
root-chown-through-a-symlink attack on ``$passwd_lock_dir`` (issue 8 item 2)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import wait_for
from tests.support.server import IS_ROOT, MAIL_GID, MAIL_UID, TPOPS, MailEnv, Server
from tpops.config import Config
from tpops.mailbox.lock import (
    DEFAULT_LOCK_PARENT,
    LockDirError,
    acquire,
    check_lock_dir,
    default_lock_dir,
    prepare_lock_dir,
)

KEY = "tommy"


def test_default_is_under_root_run_as_root_else_per_user() -> None:
    expected = "/run/tpops/locks" if IS_ROOT else f"/var/tmp/tpops-{os.geteuid()}"
    assert default_lock_dir() == expected
    assert Config().passwd_lock_dir == expected
    assert DEFAULT_LOCK_PARENT == "/run/tpops"


def test_prepare_creates_0700_and_check_accepts(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    prepare_lock_dir(str(lock_dir))
    st = lock_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    check_lock_dir(str(lock_dir))
    prepare_lock_dir(str(lock_dir))  # idempotent
    acquire(str(lock_dir), KEY).release()


@pytest.mark.parametrize("target_kind", ["dir", "file"])
def test_symlink_refused_target_untouched(tmp_path: Path, target_kind: str) -> None:
    target = tmp_path / "target"
    if target_kind == "dir":
        target.mkdir(mode=0o755)
    else:
        target.write_text("precious\n")
    before = target.stat()
    lock_dir = tmp_path / "locks"
    lock_dir.symlink_to(target)
    with pytest.raises(LockDirError, match=r"refused: it is a symbolic link") as info:
        prepare_lock_dir(str(lock_dir), (MAIL_UID, MAIL_GID))
    assert str(lock_dir) in str(info.value)
    with pytest.raises(LockDirError, match=r"is not usable as uid \d+: refused: it is a symbolic link"):
        check_lock_dir(str(lock_dir))
    with pytest.raises(PermissionError):
        acquire(str(lock_dir), KEY)
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert lock_dir.is_symlink()


def test_not_a_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "locks").write_text("")
    with pytest.raises(LockDirError, match="refused: it is not a directory"):
        prepare_lock_dir(str(tmp_path / "locks"))


def test_writable_parent_without_sticky_bit_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(LockDirError, match=r"its parent .* is writable by group or others without the sticky bit"):
        prepare_lock_dir(str(parent / "locks"))
    assert not (parent / "locks").exists()
    parent.chmod(0o1777)  # /var/tmp-like: sticky, so only the owner may replace its entry
    prepare_lock_dir(str(parent / "locks"))
    assert (parent / "locks").is_dir()


def test_group_writable_lock_dir_refused(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    lock_dir.chmod(0o770)
    with pytest.raises(LockDirError, match="writable by group or others"):
        prepare_lock_dir(str(lock_dir))


@root_only("fchown to --user")
def test_root_hands_the_dir_to_the_user_and_refuses_strangers(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    lock_dir = tmp_path / "locks"
    prepare_lock_dir(str(lock_dir), (MAIL_UID, MAIL_GID))
    st = lock_dir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (MAIL_UID, MAIL_GID, 0o700)
    with pytest.raises(LockDirError, match=r"belongs to uid 65534, and only root or the --user"):
        prepare_lock_dir(str(lock_dir))  # without --user now: nobody's directory is not root's to use
    os.chown(lock_dir, 0, 0)
    prepare_lock_dir(str(lock_dir), (MAIL_UID, MAIL_GID))  # an old root-owned dir is handed over
    assert lock_dir.stat().st_uid == MAIL_UID
    os.chown(lock_dir, 1, 1)  # daemon: neither root nor the --user
    with pytest.raises(LockDirError, match=r"refused: it belongs to uid 1, and only root or the --user may own it"):
        prepare_lock_dir(str(lock_dir), (MAIL_UID, MAIL_GID))
    assert lock_dir.stat().st_uid == 1


def _as_nobody(script: str) -> None:
    """Run ``sh -c script`` as the unprivileged mail user (the attacker owning the lock dir)."""
    subprocess.run(["setpriv", f"--reuid={MAIL_UID}", f"--regid={MAIL_GID}", "--clear-groups", "sh", "-c", script],
                   check=True, timeout=10)


def _targets(base: Path) -> tuple[Path, Path]:
    """A root-owned file and a root-owned directory, the attacker's targets."""
    file_target = base / "root-file"
    file_target.write_text("root's\n")
    file_target.chmod(0o644)
    dir_target = base / "root-dir"
    dir_target.mkdir(mode=0o755)
    return file_target, dir_target


@root_only("--user, root-owned targets")
@pytest.mark.parametrize("target_kind", ["file", "dir"])
def test_symlinked_lock_dir_stops_start_up_and_root_chowns_nothing(mail_env: MailEnv, target_kind: str) -> None:
    file_target, dir_target = _targets(mail_env.base)
    target = file_target if target_kind == "file" else dir_target
    spool = mail_env.base / "spool"
    spool.mkdir()
    spool.chmod(0o1777)  # /var/tmp-like: anyone may plant the lock dir name first
    lock_dir = spool / "locks"
    _as_nobody(f"ln -s {target} {lock_dir}")
    mail_env.write_conf(passwd_lock_dir=repr(str(lock_dir)))
    out = subprocess.run([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", "0", "--bind", "127.0.0.1",
                          "--user", "nobody"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert (f"tpops: cannot start: workers cannot start: $passwd_lock_dir {lock_dir}: "
            "refused: it is a symbolic link") in out.stderr
    assert "Traceback" not in out.stderr
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


@root_only("--user, a HUP, root-owned targets")
@pytest.mark.parametrize("target_kind", ["file", "dir"])
def test_lock_dir_swapped_for_a_symlink_before_hup(mail_env: MailEnv, target_kind: str) -> None:
    """The attack as issue 8 reproduced it: the --user owns the lock dir in a /var/tmp-like
    directory, swaps it for a symlink to a root-owned file or directory and waits for a reload."""
    file_target, dir_target = _targets(mail_env.base)
    target = file_target if target_kind == "file" else dir_target
    spool = mail_env.base / "spool"
    spool.mkdir()
    spool.chmod(0o1777)
    lock_dir = spool / "locks"
    mail_env.write_conf(passwd_lock_dir=repr(str(lock_dir)))
    mail_env.add_user("alice", uid=str(MAIL_UID), gid=str(MAIL_GID))
    srv = Server(mail_env, "--user", "nobody").start()
    try:
        assert lock_dir.stat().st_uid == MAIL_UID  # handed to --user through its descriptor
        client = RawClient(srv.port)
        assert client.login("alice").startswith(b"+OK")
        assert client.cmd("QUIT").startswith(b"+OK")
        client.close()
        _as_nobody(f"mv {lock_dir} {spool}/old && ln -s {target} {lock_dir}")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        message = f"$passwd_lock_dir {lock_dir}: refused: it is a symbolic link"
        try:
            wait_for(lambda: message in srv.output(), timeout=30, what="the reload refused")
        except AssertionError as exc:  # say what the server did say
            raise AssertionError(f"{exc}\n--- tpops said:\n{srv.output()[-4000:]}") from None
        assert "configuration not reloaded" in srv.output()
    finally:
        srv.stop()
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert lock_dir.is_symlink()
    assert "Traceback" not in srv.output()
