"""Tests for tpops.mailbox.lock: one session per mailbox, freed when the holder dies."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tpops.mailbox.lock import MailboxInUse
from tpops.mailbox.lock import acquire, lock_file_name

KEY = "/home/tommy/Maildir"


def test_second_acquire_in_same_process_conflicts(tmp_path: Path) -> None:
    first = acquire(str(tmp_path), KEY)
    with pytest.raises(MailboxInUse):
        acquire(str(tmp_path), KEY)
    assert first.held
    first.release()


def test_release_allows_reacquire_and_is_idempotent(tmp_path: Path) -> None:
    first = acquire(str(tmp_path), KEY)
    first.release()
    first.release()
    assert not first.held
    second = acquire(str(tmp_path), KEY)
    with pytest.raises(MailboxInUse):
        acquire(str(tmp_path), KEY)
    second.release()


def test_context_manager_releases(tmp_path: Path) -> None:
    with acquire(str(tmp_path), KEY) as held:
        assert held.held
    assert not held.held
    acquire(str(tmp_path), KEY).release()


def test_different_keys_do_not_conflict(tmp_path: Path) -> None:
    a = acquire(str(tmp_path), KEY)
    b = acquire(str(tmp_path), KEY + "2")
    assert a.path != b.path
    a.release()
    b.release()


def test_lock_file_is_digest_named_0600_and_kept(tmp_path: Path) -> None:
    held = acquire(str(tmp_path), KEY)
    path = tmp_path / lock_file_name(KEY)
    assert held.path == str(path)
    assert re.fullmatch(r"tpops-[0-9a-f]{64}\.lock", path.name)
    assert lock_file_name(KEY + "/") != path.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    held.release()
    assert path.exists()  # never unlinked: that would race with other lockers


def test_lock_dir_created_0700(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    acquire(str(lock_dir), KEY).release()
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700


def test_unsafe_lock_dir_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError):
        acquire(str(open_dir), KEY)
    link = tmp_path / "link"
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    link.symlink_to(safe)
    with pytest.raises(PermissionError):
        acquire(str(link), KEY)


def test_symlink_lock_file_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    (lock_dir / lock_file_name(KEY)).symlink_to(target)
    with pytest.raises(OSError):
        acquire(str(lock_dir), KEY)
    assert not target.exists()


def test_lock_fd_not_inherited_by_exec(tmp_path: Path) -> None:
    held = acquire(str(tmp_path), KEY)
    flags = os.get_inheritable(held._fd)  # noqa: SLF001 - checking the descriptor itself
    assert flags is False
    held.release()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from tpops.mailbox.lock import acquire
    held = acquire(sys.argv[1], sys.argv[2])
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_killed_holder_frees_lock(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(MailboxInUse):
            acquire(str(tmp_path), KEY)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        acquire(str(tmp_path), KEY).release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
