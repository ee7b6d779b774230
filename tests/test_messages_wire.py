"""Exact bytes and sizes on nasty messages, huge messages, crashes and concurrent delivery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.client import RawClient, unstuff
from tests.support.procs import worker_serving
from tests.support.server import MailEnv, Server, make_message


def expected_wire(data: bytes) -> bytes:
    """What RETR must send (before stuffing): bare LF -> CRLF, CRLF kept, final CRLF added."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return out


NASTY = {
    "nul": b"Subject: nul\n\nbefore\x00after\n\x00\x00\n",
    "bare_cr": b"Subject: cr\n\nline\rwith bare CR\r\nmixed\n\rstart\n",
    "no_final_newline": b"Subject: nofinal\n\nlast line without newline",
    "ends_with_cr": b"Subject: cr-end\n\nlast\r",
    "dots": b"Subject: dots\n\n.\n..\n.x\n...\r\n.\r\n",
    "long_line": b"Subject: long\n\n" + b"L" * 10_000 + b"\n" + b"." * 10_000 + b"\n",
    "crlf": b"Subject: crlf\r\n\r\nwindows\r\nstyle\r\n",
    "empty_body": b"Subject: nobody\n\n",
    "only_dot": b".",
    "utf8": "Subject: =?UTF-8?B?w6k=?=\n\nüñíçødé ✓\n".encode(),
}


@pytest.fixture
def nasty(mail_env: MailEnv) -> MailEnv:
    mail_env.add_user("nasty", messages=list(NASTY.values()))
    return mail_env


def test_nasty_messages_exact_bytes_and_sizes(nasty: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.login("nasty").startswith(b"+OK")
    _, listing = c.multi("LIST")
    sizes = [int(line.split()[1]) for line in listing.split(b"\r\n")[:-1]]
    assert len(sizes) == len(NASTY)
    for msn, (name, data) in enumerate(NASTY.items(), 1):
        status, body = c.multi(f"RETR {msn}")
        want = expected_wire(data)
        assert unstuff(body) == want, name
        assert sizes[msn - 1] == len(want), name
        assert status == f"+OK {len(want)} octets".encode(), name
        for line in body.split(b"\r\n")[:-1]:
            assert not line.startswith(b".") or line.startswith(b".."), name
    c.cmd("QUIT")


def test_sizes_are_the_same_in_the_next_session(nasty: MailEnv, server: Server) -> None:
    listings = []
    for _ in range(2):
        c = RawClient(server.port)
        c.login("nasty")
        listings.append(c.multi("LIST")[1] + c.multi("UIDL")[1])
        c.cmd("QUIT")
    assert listings[0] == listings[1]
    assert (nasty.maildir("nasty") / "tpops-sizecache").exists()


def test_top_on_nasty_messages(nasty: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    c.login("nasty")
    names = list(NASTY)
    _, body = c.multi(f"TOP {names.index('dots') + 1} 2")
    assert body == b"Subject: dots\r\n\r\n..\r\n...\r\n"
    _, body = c.multi(f"TOP {names.index('no_final_newline') + 1} 5")
    assert body == b"Subject: nofinal\r\n\r\nlast line without newline\r\n"
    c.cmd("QUIT")


def test_curl_fetches_exact_message(nasty: MailEnv, server: Server) -> None:
    assert shutil.which("curl"), "curl is installed by scripts/test"
    names = list(NASTY)
    for name in ("dots", "no_final_newline", "crlf"):
        out = subprocess.run(
            ["curl", "-s", "--max-time", "20", f"pop3://nasty:secret@127.0.0.1:{server.port}/{names.index(name) + 1}"],
            capture_output=True, check=True,
        ).stdout
        assert out == expected_wire(NASTY[name]), name
    listing = subprocess.run(
        ["curl", "-s", "--max-time", "20", f"pop3://nasty:secret@127.0.0.1:{server.port}/"],
        capture_output=True, check=True,
    ).stdout
    assert listing.count(b"\r\n") == len(NASTY)


def test_fetchmail_downloads_everything(mail_env: MailEnv, server: Server, tmp_path: Path) -> None:
    assert shutil.which("fetchmail"), "fetchmail is installed by scripts/test"
    bodies = [make_message(f"fm{i}", f"fetchmail body {i}\n.dot line\n") for i in range(3)]
    mail_env.add_user("fm", "fmpass", bodies)
    out_dir = tmp_path / "got"
    out_dir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"set no syslog\npoll 127.0.0.1 protocol pop3 port {server.port} auth password\n"
        f"  user fm password fmpass is root here\n"
        f"  mda \"/bin/sh -c 'cat > {out_dir}/msg.$$'\"\n  no keep\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--sslproto", "", "-v"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = sorted(p.read_bytes() for p in out_dir.iterdir())
    assert len(got) == 3
    for i in range(3):
        assert any(f"fetchmail body {i}".encode() in g and b"\n.dot line\n" in g for g in got)
    assert mail_env.messages("fm") == []  # 'no keep': deleted at QUIT


def test_kill_9_mid_retr_deletes_nothing_and_frees_lock(mail_env: MailEnv, server: Server) -> None:
    big = b"Subject: big\n\n" + (b"z" * 999 + b"\n") * 30_000
    mail_env.add_user("victim", messages=[big, make_message()])
    c = RawClient(server.port)
    c.login("victim")
    c.cmd("DELE 2")
    c.send(b"RETR 1\r\n")
    assert c.readline().startswith(b"+OK")
    c.file.read(10_000)  # mid-transfer
    assert server.proc is not None
    os.kill(worker_serving(server.proc.pid, "victim@127.0.0.1"), signal.SIGKILL)
    with pytest.raises((ConnectionError, OSError)):  # the connection dies with the worker
        while c.file.read(1 << 16):
            pass
        raise ConnectionError("closed")
    c.close()
    c2 = RawClient(server.port)
    assert c2.login("victim").startswith(b"+OK Logged in, 2 messages")
    c2.cmd("QUIT")
    assert len(mail_env.messages("victim")) == 2


def test_delivery_during_session_is_invisible_and_untouched(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("busy", messages=[make_message("old")])
    c = RawClient(server.port)
    c.login("busy")
    new_cur = mail_env.deliver("busy", make_message("new-in-cur"), folder="cur")
    new_new = mail_env.deliver("busy", make_message("new-in-new"), folder="new")
    assert c.cmd("STAT").startswith(b"+OK 1 ")
    assert c.cmd("DELE 1").startswith(b"+OK")
    assert c.cmd("RETR 2") == b"-ERR There's no message 2."
    assert c.cmd("QUIT").startswith(b"+OK Bye, 1 messages deleted")
    assert new_cur.exists() and new_new.exists()
    c2 = RawClient(server.port)
    assert c2.login("busy").startswith(b"+OK Logged in, 2 messages")
    c2.cmd("QUIT")


def test_message_removed_by_someone_else(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("racer", messages=[make_message("a"), make_message("b")])
    c = RawClient(server.port)
    c.login("racer")
    first = mail_env.messages("racer")[0]
    first.unlink()
    assert c.cmd("RETR 1") == b"-ERR Message 1 no longer exists."
    status, body = c.multi("RETR 2")
    assert status.startswith(b"+OK")
    c.cmd("DELE 1")
    assert c.cmd("QUIT").startswith(b"+OK Bye, 1 messages deleted, 1 left.")


def test_flag_rename_by_another_reader_is_followed(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("flags", messages=[make_message("flagged", "payload\n")])
    c = RawClient(server.port)
    c.login("flags")
    path = mail_env.messages("flags")[0]
    path.rename(path.with_name(path.name.split(":")[0] + ":2,S"))
    status, body = c.multi("RETR 1")
    assert b"payload" in body
    c.cmd("DELE 1")
    c.cmd("QUIT")
    assert mail_env.messages("flags") == []


def test_missing_maildir_is_an_empty_mailbox(mail_env: MailEnv, server: Server) -> None:
    md = mail_env.add_user("empty")
    shutil.rmtree(md)
    c = RawClient(server.port)
    assert c.login("empty") == b"+OK Logged in, 0 messages (0 octets)."
    assert c.cmd("STAT") == b"+OK 0 0"
    assert c.multi("LIST") == (b"+OK 0 messages (0 octets)", b"")
    assert c.cmd("QUIT").startswith(b"+OK")


@pytest.mark.timeout(300)
def test_200mb_message_streams_with_bounded_memory(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("huge")
    line = b"." + b"h" * 98 + b"\n"  # every line needs stuffing and CRLF conversion
    path = mail_env.deliver("huge", b"", folder="cur")
    with path.open("wb") as f:
        f.write(b"Subject: huge\n\n")
        block = line * 10_000
        for _ in range(200):
            f.write(block)
    raw_size = path.stat().st_size
    assert raw_size > 200_000_000
    c = RawClient(server.port, timeout=120)
    c.login("huge")
    status = c.cmd("LIST 1")
    lines = 2 + 200 * 10_000  # every LF becomes CRLF
    assert status == f"+OK 1 {raw_size + lines}".encode()
    c.send(b"RETR 1\r\n")
    assert c.readline() == f"+OK {raw_size + lines} octets".encode()
    assert server.proc is not None
    worker = worker_serving(server.proc.pid, "huge@127.0.0.1")
    received = 0
    peak_kb = 0
    stuffed = 0
    carry = tail = b""
    while True:
        chunk = c.file.read1(1 << 20)
        assert chunk
        received += len(chunk)
        stuffed += (carry + chunk).count(b"\n..")
        carry = chunk[-2:]
        tail = (tail + chunk)[-5:]
        if received % (32 << 20) < (1 << 20):
            status_text = Path(f"/proc/{worker}/status").read_text()
            rss = int(next(x for x in status_text.splitlines() if x.startswith("VmRSS")).split()[1])
            peak_kb = max(peak_kb, rss)
        if tail == b"\r\n.\r\n":
            break
    assert received - 3 - stuffed == raw_size + lines
    assert stuffed == 200 * 10_000
    assert 0 < peak_kb < 80_000, f"worker RSS {peak_kb} kB while streaming"
    c.cmd("QUIT")
