"""Issue 8, the mailbox side: a local user attacks tpops through the Maildir it reads.

Each test does what the attacker would do — a ``~/Maildir`` symlink to another user's
mail, FIFOs and symlinks where tpops expects files, duplicate unique names, a kill -9
in the middle of UPDATE — against the real server over the wire, and checks that the
answer comes promptly and precisely, no other user's mail is touched, the lock is
not leaked and the worker serves the next client.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient, unstuff
from tests.support.marks import root_only
from tests.support.procs import gone, wait_for, worker_serving
from tests.support.server import MAIL_UID, MailEnv, Server, make_message
from tpops.mailbox.maildir import SIZE_CACHE_HEADER, SIZE_CACHE_NAME

#: Two local users with no passwd entry: uids are just numbers to the kernel.
VICTIM_UID = 12001
ATTACKER_UID = 12002
#: A reply that comes later than this means the worker was blocked.
PROMPT = 5.0

REFUSED = b"-ERR [SYS/PERM] This mailbox cannot be served."


def timed(client: RawClient, line: str) -> bytes:
    """Send one command; its reply, which must come within PROMPT seconds."""
    start = time.monotonic()
    reply = client.cmd(line)
    assert time.monotonic() - start < PROMPT, f"{line!r} took too long"
    return reply


def victim_and_attacker(env: MailEnv) -> tuple[Path, Path]:
    """A victim with two messages and an attacker whose ~/Maildir is theirs to shape."""
    victim = env.add_user("bob", messages=[make_message("bob's secret"), make_message("more")])
    env.chown(victim.parent, VICTIM_UID, VICTIM_UID)
    attacker_home = env.base / "home" / "alice"
    attacker_home.mkdir(parents=True)
    with env.passwd_file.open("a") as f:
        f.write(f"alice:{{PLAIN}}secret::::{attacker_home}::\n")
    os.chown(attacker_home, ATTACKER_UID, ATTACKER_UID)
    return victim, attacker_home


def symlink_as(link: Path, target: Path | str, uid: int) -> None:
    link.symlink_to(target)
    os.chown(link, uid, uid, follow_symlinks=False)


# ---------------------------------------------------------------- item 1: identity


@root_only("serves mailboxes as their owners")
def test_maildir_symlink_to_another_users_maildir_is_refused(mail_env: MailEnv) -> None:
    victim, attacker_home = victim_and_attacker(mail_env)
    symlink_as(attacker_home / "Maildir", victim, ATTACKER_UID)
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("alice") == REFUSED  # not served as bob
        c.close()
        # bob himself is still served, and his mail is all there
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye, 0 messages deleted")
        c.close()
    finally:
        srv.stop()
    assert len(mail_env.messages("bob")) == 2
    log = mail_env.error_log.read_text()
    assert "refusing to serve alice from 127.0.0.1:" in log
    assert "the Maildir is a symbolic link" in log


@root_only("serves mailboxes as their owners")
def test_symlink_on_the_way_to_the_maildir_is_refused_unless_roots(mail_env: MailEnv) -> None:
    victim, attacker_home = victim_and_attacker(mail_env)
    # alice's entry names home/alice/mail/Maildir, and she makes "mail" point at bob's home
    lines = mail_env.passwd_file.read_text().replace(
        f"{attacker_home}::", f"{attacker_home}::maildir={attacker_home}/mail/Maildir"
    )
    mail_env.passwd_file.write_text(lines)
    symlink_as(attacker_home / "mail", victim.parent, ATTACKER_UID)
    # A symlink root made (an admin's /home -> /srv/home) is followed as before.
    real_home = victim.parent
    (mail_env.base / "homes").symlink_to(mail_env.base / "home")  # owned by root
    lines = mail_env.passwd_file.read_text().replace(
        f"bob:{{PLAIN}}secret::::{real_home}::", f"bob:{{PLAIN}}secret::::{mail_env.base}/homes/bob::"
    )
    assert f"{mail_env.base}/homes/bob" in lines
    mail_env.passwd_file.write_text(lines)
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("alice") == REFUSED
        c.close()
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK Logged in, 2 messages")
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
    finally:
        srv.stop()
    assert "symbolic link 'mail' on the way belongs to uid 12002" in mail_env.error_log.read_text()
    assert len(mail_env.messages("bob")) == 2


@root_only("serves mailboxes as their owners")
def test_owner_outside_the_valid_uid_range_or_gid_0_is_refused(mail_env: MailEnv) -> None:
    low = mail_env.add_user("low", messages=[make_message()])
    mail_env.chown(low.parent, 300, 300)
    grouped = mail_env.add_user("grouped", messages=[make_message()])
    mail_env.chown(grouped.parent, VICTIM_UID, 0)
    srv = Server(mail_env).start()
    try:
        for user in ("low", "grouped"):
            c = RawClient(srv.port)
            assert c.login(user) == REFUSED
            c.close()
    finally:
        srv.stop()
    log = mail_env.error_log.read_text()
    assert "uid 300 is outside $first_valid_uid..$last_valid_uid (500..unlimited)" in log
    assert "would serve the mailbox with the root group (gid 0)" in log
    # The range is the administrator's: lowering it admits uid 300, an upper bound
    # below 65534 refuses the test suite's usual owner.
    mail_env.write_conf(first_valid_uid="300", last_valid_uid="60000")
    mail_env.add_user("usual", messages=[make_message()])
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("low").startswith(b"+OK Logged in, 1 messages")
        c.close()
        c = RawClient(srv.port)
        assert c.login("usual") == REFUSED
        c.close()
    finally:
        srv.stop()
    assert f"uid {MAIL_UID} is outside $first_valid_uid..$last_valid_uid (300..60000)" in mail_env.error_log.read_text()


@root_only("serves mailboxes as their owners")
def test_maildir_not_owned_by_the_backends_uid_is_refused_after_the_drop(mail_env: MailEnv) -> None:
    # The backend names uid 12002 (alice), but the Maildir there is bob's.
    victim = mail_env.add_user("bob", messages=[make_message()])
    mail_env.chown(victim.parent, VICTIM_UID, VICTIM_UID)
    with mail_env.passwd_file.open("a") as f:
        f.write(f"alice:{{PLAIN}}secret:{ATTACKER_UID}:{ATTACKER_UID}::{victim.parent}::\n")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("alice") == REFUSED
        assert c.closed()  # the worker changed identity: it serves nobody else
        c.close()
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK Logged in, 1 messages")
        c.close()
    finally:
        srv.stop()
    assert f"belongs to uid {VICTIM_UID}, not to uid {ATTACKER_UID}" in mail_env.error_log.read_text()
    assert len(mail_env.messages("bob")) == 1


# ---------------------------------------------------------------- item 3: FIFOs, symlinks


def next_client_is_served(srv: Server, user: str, count: int) -> None:
    """The lock was released and a worker answers: the user logs in again at once."""
    c = RawClient(srv.port)
    assert timed(c, f"USER {user}").startswith(b"+OK")
    assert timed(c, "PASS secret").startswith(f"+OK Logged in, {count} messages".encode())
    assert timed(c, "QUIT").startswith(b"+OK Bye")
    c.close()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_hostile_size_cache_is_ignored_and_rebuilt(mail_env: MailEnv, kind: str) -> None:
    md = mail_env.add_user("carol", messages=[make_message("one"), make_message("two")])
    cache = md / SIZE_CACHE_NAME
    if kind == "fifo":
        os.mkfifo(cache)
    elif kind == "dev-zero":
        cache.symlink_to("/dev/zero")
    else:
        with cache.open("wb") as f:  # sparse: 1 TiB the worker must not read
            f.write(SIZE_CACHE_HEADER)
            f.truncate(1 << 40)
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert timed(c, "USER carol").startswith(b"+OK")
        assert timed(c, "PASS secret").startswith(b"+OK Logged in, 2 messages")
        status, body = c.multi("RETR 1")
        assert status.startswith(b"+OK") and b"Subject: one" in unstuff(body)
        assert timed(c, "QUIT").startswith(b"+OK Bye")
        c.close()
        next_client_is_served(srv, "carol", 2)
    finally:
        srv.stop()
    assert not cache.is_symlink() and cache.is_file()  # rebuilt as a real cache
    assert cache.read_bytes().startswith(SIZE_CACHE_HEADER) and cache.stat().st_size < 4096
    assert "size cache" in mail_env.error_log.read_text()


def test_fifo_and_shadow_symlink_listed_in_a_forged_cache_are_not_messages(mail_env: MailEnv) -> None:
    md = mail_env.add_user("dave", messages=[make_message("real")])
    (real,) = os.listdir(md / "cur")
    os.mkfifo(md / "cur" / "1800000000.fifo.host:2,")
    (md / "cur" / "1800000001.shadow.host:2,").symlink_to("/etc/shadow")
    forged = SIZE_CACHE_HEADER + f"{real.partition(':')[0]} 100\n1800000000.fifo.host 50\n1800000001.shadow.host 60\n".encode()
    (md / SIZE_CACHE_NAME).write_bytes(forged)
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert timed(c, "USER dave").startswith(b"+OK")
        assert timed(c, "PASS secret").startswith(b"+OK Logged in, 1 messages")
        assert timed(c, "RETR 2") == b"-ERR There's no message 2."
        # Swapped after login: the listed message becomes a FIFO, then a symlink.
        os.rename(md / "cur" / real, md / "real.bak")
        os.mkfifo(md / "cur" / real)
        assert timed(c, "RETR 1") == b"-ERR Message 1 no longer exists."
        os.unlink(md / "cur" / real)
        (md / "cur" / real).symlink_to("/etc/shadow")
        assert timed(c, "TOP 1 0") == b"-ERR Message 1 no longer exists."
        assert timed(c, "DELE 1").startswith(b"+OK")
        assert timed(c, "QUIT").startswith(b"+OK Bye, 1 messages deleted")  # gone is gone
        c.close()
        next_client_is_served(srv, "dave", 0)
    finally:
        srv.stop()
    assert Path("/etc/shadow").exists()
    assert (md / "cur" / real).is_symlink()  # the symlink is not the message: left alone
    assert (md / "cur" / "1800000000.fifo.host:2,").exists()


def test_maildirsize_fifo_does_not_block_quit(mail_env: MailEnv) -> None:
    md = mail_env.add_user("erin", messages=[make_message(), make_message(), make_message()])
    os.mkfifo(md / "maildirsize", 0o600)
    mail_env.chown(md)  # the user's own FIFO
    srv = Server(mail_env).start()
    holder = -1
    try:
        for left in (2, 1):  # without a reader on the FIFO, then with one
            c = RawClient(srv.port)
            assert c.login("erin").startswith(b"+OK")
            assert timed(c, "DELE 1").startswith(b"+OK")
            assert timed(c, "QUIT") == f"+OK Bye, 1 messages deleted, {left} left.".encode()
            c.close()
            holder = os.open(md / "maildirsize", os.O_RDONLY | os.O_NONBLOCK)
        next_client_is_served(srv, "erin", 1)
    finally:
        if holder >= 0:
            os.close(holder)
        srv.stop()
    log = mail_env.error_log.read_text()
    assert "maildirsize: No such device or address" in log  # no reader: ENXIO at once
    assert "maildirsize: not a regular file" in log
    assert len(mail_env.messages("erin")) == 1


# ---------------------------------------------------------------- item 18: duplicates


def test_dele_of_one_duplicate_never_removes_the_other(mail_env: MailEnv) -> None:
    md = mail_env.add_user("fay")
    cur = md / "cur"
    marked, kept = "1700000001.dup.host:2,", "1700000001.dup.host:2,S"  # message 1, message 2
    srv = Server(mail_env).start()
    try:
        for outside in ("nothing", "delete", "rename"):
            for name in os.listdir(cur):
                os.unlink(cur / name)
            mail_env.deliver("fay", b"Subject: marked\n\nA\n", folder="cur", unique="1700000001.dup.host")
            mail_env.deliver("fay", b"Subject: kept\n\nB\n", folder="cur", unique="tmp")
            os.rename(cur / "tmp:2,", cur / kept)
            c = RawClient(srv.port)
            assert c.login("fay").startswith(b"+OK Logged in, 2 messages")
            _, body = c.multi("UIDL")
            assert body == b"1 1700000001.dup.host\r\n2 1700000001.dup.host\r\n"
            assert timed(c, "DELE 1").startswith(b"+OK")
            if outside == "delete":  # another reader removes the marked file
                os.unlink(cur / marked)
            elif outside == "rename":  # another reader changes its flags
                os.rename(cur / marked, cur / "1700000001.dup.host:2,RS")
            assert timed(c, "QUIT") == b"+OK Bye, 1 messages deleted, 1 left."
            c.close()
            assert os.listdir(cur) == [kept], outside
            assert (cur / kept).read_bytes() == b"Subject: kept\n\nB\n"
    finally:
        srv.stop()


# ---------------------------------------------------------------- item 22: kill -9 in UPDATE


def quota_removed(maildirsize: Path) -> tuple[int, int]:
    """(bytes, files) the removal lines of a maildirsize record."""
    octets = files = 0
    for line in maildirsize.read_text().splitlines()[1:]:
        size, count = line.split()
        if size.startswith("-"):
            octets -= int(size)
            files -= int(count)
    return octets, files


@root_only("finds and kills the serving worker by its process title")
def test_kill_9_during_update_leaves_the_quota_at_most_one_message_off(mail_env: MailEnv) -> None:
    total = 3000
    md = mail_env.add_user("gus")
    cur = md / "cur"
    for i in range(total):
        (cur / f"{1700000000 + i}.M{i}.host,S={100 + i % 7}:2,").write_bytes(b"x\n")
    (md / "maildirsize").write_bytes(b"1000000000S,100000C\n%d %d\n" % (sum(100 + i % 7 for i in range(total)), total))
    mail_env.chown(md)
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port, timeout=60)
        assert c.login("gus").startswith(f"+OK Logged in, {total} messages".encode())
        c.send(b"".join(b"DELE %d\r\n" % n for n in range(1, total + 1)))
        for _ in range(total):
            assert c.readline().startswith(b"+OK")
        pid = worker_serving(srv.proc.pid, "gus@127.0.0.1")
        c.send(b"QUIT\r\n")
        wait_for(lambda: len(os.listdir(cur)) < total, timeout=30, interval=0.001, what="UPDATE to start")
        os.kill(pid, signal.SIGKILL)
        try:
            c.readline()
        except (ConnectionError, socket.timeout, AssertionError):
            pass
        c.close()
        wait_for(lambda: gone(pid), what="the worker to die")
        left = os.listdir(cur)
        removed_octets = sum(100 + i % 7 for i in range(total)) - sum(
            int(n.partition(",S=")[2].partition(":")[0]) for n in left
        )
        removed = total - len(left)
        recorded_octets, recorded = quota_removed(md / "maildirsize")
        assert 0 <= removed - recorded <= 1, (removed, recorded)
        assert 0 <= removed_octets - recorded_octets <= 106
        next_client_is_served(srv, "gus", len(left))  # the lock died with the worker
    finally:
        srv.stop()


def test_update_records_each_removal(mail_env: MailEnv) -> None:
    md = mail_env.add_user("hal", messages=[make_message(), make_message(), make_message()])
    (md / "maildirsize").write_bytes(b"1000000S\n")
    mail_env.chown(md)
    size = len(make_message())
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("hal").startswith(b"+OK Logged in, 3 messages")
        assert c.cmd("DELE 1").startswith(b"+OK") and c.cmd("DELE 3").startswith(b"+OK")
        assert c.cmd("QUIT") == b"+OK Bye, 2 messages deleted, 1 left."
        c.close()
    finally:
        srv.stop()
    assert (md / "maildirsize").read_text() == f"1000000S\n-{size} -1\n-{size} -1\n"
