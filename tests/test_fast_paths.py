"""The performance fast paths give byte-identical results to the plain ones (issue 12).

Each fast path is checked against the slow path it replaces, on the tricky messages:
bare LF, mixed CRLF/LF, lines starting with ".", no final newline, an empty message, a
single "." line, a CR alone, a CR at a read boundary.

* sizing a message file whole (:func:`maildir._exact_octets`) and by chunks
  (:func:`encode.wire_size_verbatim_fd`) against :func:`encode.wire_size_bytes`, and the
  "verbatim" flag (the file is its own wire form) against :func:`encode.encode_whole`;
* sizing a Maildir in threads against sizing it in one thread, cache included;
* the version 3 size cache (flags) and the reading of a version 2 one;
* the reply writer's gathered ``writev`` and ``sendfile`` against the plain writes;
* over the wire: RETR and TOP of large verbatim and non-verbatim messages.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tpops.mailbox import encode
from tpops.mailbox import maildir as maildir_module
from tpops.mailbox.encode import VERBATIM_MIN_OCTETS, VerbatimFile, encode_whole, wire_message, wire_size_bytes
from tpops.mailbox.maildir import SIZE_CACHE_HEADER, SIZE_CACHE_NAME, Maildir
from tpops.protocol import ReplyWriter, Transport
from tests.support.client import RawClient, unstuff
from tests.support.server import MailEnv, Server

TRICKY = {
    "bare_lf": b"Subject: lf\n\nline one\nline two\n",
    "mixed": b"Subject: mixed\r\n\r\ncrlf\r\nlf\nagain\r\n",
    "dots": b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
    "dot_first": b".starts with a dot\r\nsecond\r\n",
    "no_final_newline": b"Subject: nofinal\r\n\r\nlast line",
    "empty": b"",
    "single_dot": b".",
    "single_dot_line": b".\r\n",
    "cr_alone": b"\r",
    "cr_inside": b"Subject: cr\r\n\r\na\rb\r\n\r\r\n",
    "ends_with_cr": b"Subject: x\r\n\r\nlast\r",
    "crlf_clean": b"Subject: clean\r\n\r\nbody\r\n",
    "lf_only_line": b"\n",
}


def padded(data: bytes, clean: bool = True) -> bytes:
    """``data`` after a large CRLF prefix, so the verbatim threshold is passed."""
    line = b"x" * 78 + (b"\r\n" if clean else b"\n")
    return line * (VERBATIM_MIN_OCTETS // len(line) + 1) + data


def cases() -> list[tuple[str, bytes]]:
    out = []
    for name, data in TRICKY.items():
        out.append((name, data))
        out.append((name + "+large", padded(data)))
    out.append(("large_lf", padded(b"end\n", clean=False)))
    # a "." and a CRLF right at the chunk boundaries of the chunked readers
    out.append(("boundary_dot", b"a" * (65536 - 2) + b"\r\n.dot\r\n"))
    out.append(("boundary_crlf", b"a" * (65536 - 1) + b"\r\nend\r\n"))
    return out


def expected(data: bytes) -> tuple[int, bool]:
    """The slow path's answer: the wire size, and whether the wire form is the file."""
    return wire_size_bytes(data), bool(data) and encode_whole(data) == data


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("name", "data"), cases())
def test_sizing_and_verbatim_flag_match_the_slow_path(tmp_path: Path, name: str, data: bytes) -> None:
    size, verbatim = expected(data)
    write(tmp_path / "m", data)
    fd = os.open(tmp_path / "m", os.O_RDONLY)
    try:
        for chunk in (1, 2, 3, 7, 4096, 65536):
            assert encode.wire_size_verbatim_fd(fd, chunk) == (size, verbatim), (name, chunk)
        assert encode.wire_size_fd(fd) == size
    finally:
        os.close(fd)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        octets, flag = maildir_module._exact_octets(dir_fd, "m", "1.x.host")
    finally:
        os.close(dir_fd)
    assert octets == size, name
    # the whole-file sizer only decides for messages large enough to be sent verbatim
    assert flag == (verbatim and len(data) >= VERBATIM_MIN_OCTETS), name


def test_w_names_are_never_verbatim_and_keep_the_final_newline_rule(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for data, w in ((padded(b"end\r\n"), 999), (padded(b"end"), 999), (b"", 5)):
            write(tmp_path / "m", data)
            octets, flag = maildir_module._exact_octets(dir_fd, "m", f"1.x.host,W={w}")
            assert not flag
            assert octets == (0 if not data else w if data.endswith(b"\n") else w + 2)
    finally:
        os.close(dir_fd)


def make_maildir(root: Path, messages: list[bytes]) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(messages):
        write(root / "cur" / f"{1700000000 + i}.M{i}.host:2,", data)
    return root


def snapshot(md: Maildir) -> list[tuple[str, str, int, bool]]:
    return [(m.uid, m.name, m.octets, m.verbatim) for m in md.messages]


def test_threaded_sizing_equals_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = [data for _, data in cases()] * 6
    results = []
    caches = []
    for threads in (1, 4):
        root = make_maildir(tmp_path / f"t{threads}", messages)
        (root / "cur" / "1800000000.dir.host").mkdir()  # not a message
        os.mkfifo(root / "cur" / "1800000001.fifo.host")  # listed as a file type? never a message
        monkeypatch.setattr(maildir_module, "SIZING_THREADS", threads)
        monkeypatch.setattr(maildir_module, "_PROBE_MESSAGES", 3)
        monkeypatch.setattr(maildir_module, "_THREAD_BATCH", 5)
        monkeypatch.setattr(maildir_module, "_IO_BOUND_SECONDS", 0.0 if threads > 1 else 1e9)
        results.append(snapshot(Maildir.open(str(root))))
        caches.append((root / SIZE_CACHE_NAME).read_bytes())
    assert results[0] == results[1]
    assert caches[0] == caches[1]
    assert [octets for _, _, octets, _ in results[0]] == [wire_size_bytes(d) for d in messages]
    assert [v for _, _, _, v in results[0]] == [
        bool(d) and encode_whole(d) == d and len(d) >= VERBATIM_MIN_OCTETS for d in messages
    ]


def test_cache_v3_records_verbatim_and_the_cached_path_keeps_it(tmp_path: Path) -> None:
    clean, dirty = padded(b"end\r\n"), padded(b".end\r\n")
    root = make_maildir(tmp_path, [clean, dirty, b"small\r\n"])
    first = snapshot(Maildir.open(str(root)))
    assert [v for *_, v in first] == [True, False, False]
    text = (root / SIZE_CACHE_NAME).read_bytes()
    assert text == SIZE_CACHE_HEADER + b"1700000000.M0.host %d v\n1700000001.M1.host %d\n1700000002.M2.host 7\n" % (
        len(clean), wire_size_bytes(dirty))
    assert snapshot(Maildir.open(str(root))) == first  # from the cache alone


def test_version_2_cache_is_read_then_upgraded(tmp_path: Path) -> None:
    clean = padded(b"end\r\n")
    root = make_maildir(tmp_path, [clean])
    (root / SIZE_CACHE_NAME).write_bytes(b"tpops-sizecache 2\n1700000000.M0.host 4242\n")
    md = Maildir.open(str(root))
    assert [(m.octets, m.verbatim) for m in md.messages] == [(4242, False)]  # read, not re-sized
    write(root / "cur" / "1700000001.M1.host:2,", b"new\n")
    md = Maildir.open(str(root))
    assert [(m.octets, m.verbatim) for m in md.messages] == [(4242, False), (5, False)]
    assert (root / SIZE_CACHE_NAME).read_bytes() == SIZE_CACHE_HEADER + b"1700000000.M0.host 4242\n1700000001.M1.host 5\n"
    # flags were never part of version 2: such a file is corrupt, re-sized and rewritten
    (root / SIZE_CACHE_NAME).write_bytes(b"tpops-sizecache 2\n1700000000.M0.host 4242 v\n1700000001.M1.host 5\n")
    md = Maildir.open(str(root))
    assert [(m.octets, m.verbatim) for m in md.messages] == [(len(clean), True), (5, False)]


def test_verbatim_file_needs_the_announced_size(tmp_path: Path) -> None:
    data = padded(b"end\r\n")
    write(tmp_path / "m", data)
    body = wire_message(os.open(tmp_path / "m", os.O_RDONLY), None, len(data))
    assert isinstance(body, VerbatimFile)
    assert b"".join(body) == data and body.fd == -1
    other = wire_message(os.open(tmp_path / "m", os.O_RDONLY), None, len(data) + 1)  # size changed: slow path
    assert not isinstance(other, VerbatimFile) and b"".join(other) == encode_whole(data)
    top = wire_message(os.open(tmp_path / "m", os.O_RDONLY), 0, len(data))  # TOP never
    assert not isinstance(top, VerbatimFile)
    small = wire_message(os.open(tmp_path / "m", os.O_RDONLY), None, VERBATIM_MIN_OCTETS - 1)
    assert not isinstance(small, VerbatimFile)


def collect(read_fd: int, out: list[bytes]) -> None:
    while chunk := os.read(read_fd, 1 << 20):
        out.append(chunk)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_reply_writer_gathers_and_sendfiles_the_same_bytes(tmp_path: Path, kind: str) -> None:
    """Status lines, small and large chunks, a VerbatimFile: the same stream as plain writes."""
    big = padded(b"end\r\n")
    path = write(tmp_path / "m", big)
    small_chunks = [b"a\r\n", b"b" * 100 + b"\r\n"]
    large_chunks = [b"L" * 70000 + b"\r\n", b"M" * 20000 + b"\r\n", b"s\r\n", b"N" * 2_000_000 + b"\r\n"]
    if kind == "pipe":
        r, w = os.pipe()
    else:
        import socket

        a, b = socket.socketpair()
        r, w = b.detach(), a.detach()
    received: list[bytes] = []
    reader = threading.Thread(target=collect, args=(r, received))
    reader.start()
    try:
        writer = ReplyWriter(Transport(w, w), timeout=10.0)
        writer.line("+OK first")
        writer.raw(iter(small_chunks))
        writer.line(".")
        writer.line("+OK second")
        writer.raw(iter(large_chunks))
        writer.line(".")
        writer.line("+OK third")
        writer.raw(VerbatimFile(os.open(path, os.O_RDONLY), len(big)))
        writer.line(".")
        writer.line("+OK last")
        writer.flush()
    finally:
        os.close(w)
        reader.join(30)
        os.close(r)
    want = (b"+OK first\r\n" + b"".join(small_chunks) + b".\r\n+OK second\r\n" + b"".join(large_chunks)
            + b".\r\n+OK third\r\n" + big + b".\r\n+OK last\r\n")
    assert b"".join(received) == want


# --- over the wire -----------------------------------------------------------------


WIRE_MESSAGES = {
    "large_clean": padded(b"end\r\n"),  # sent with sendfile
    "large_dotted": padded(b".end\r\n"),
    "large_lf": padded(b"end\n", clean=False),
    "large_no_final": padded(b"end"),
    "large_cr_alone": padded(b"\r"),
    "small_clean": b"Subject: s\r\n\r\nbody\r\n",
    "single_dot_line": b".\r\n",
    "empty": b"",
}


def wire_form(data: bytes) -> bytes:
    """What a client reconstructs after unstuffing (see tests/test_messages_wire.py)."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return out


def test_retr_and_top_of_verbatim_and_other_messages_are_exact(mail_env: MailEnv) -> None:
    mail_env.add_user("fast", messages=list(WIRE_MESSAGES.values()))
    srv = Server(mail_env).start()
    try:
        for session in ("first login", "from the cache"):
            c = RawClient(srv.port)
            assert c.login("fast").startswith(b"+OK"), session
            _, listing = c.multi("LIST")
            sizes = [int(line.split()[1]) for line in listing.split(b"\r\n")[:-1]]
            for msn, (name, data) in enumerate(WIRE_MESSAGES.items(), 1):
                want = wire_form(data)
                status, body = c.multi(f"RETR {msn}")
                assert status == b"+OK %d octets" % len(want), (session, name)
                assert unstuff(body) == want and sizes[msn - 1] == len(want), (session, name)
                _, top = c.multi(f"TOP {msn} 0")
                assert want.startswith(unstuff(top)), (session, name)
            # pipelined: every reply in order, nothing lost between sendfile and buffered writes
            c.send(b"".join(b"RETR %d\r\n" % msn for msn in range(1, len(WIRE_MESSAGES) + 1)) + b"NOOP\r\n")
            for msn, (name, data) in enumerate(WIRE_MESSAGES.items(), 1):
                status = c.readline()
                assert status == b"+OK %d octets" % len(wire_form(data)), (session, name)
                assert unstuff(c.read_body()) == wire_form(data), (session, name)
            assert c.readline() == b"+OK"
            assert c.cmd("QUIT").startswith(b"+OK")
        cache = (mail_env.maildir("fast") / SIZE_CACHE_NAME).read_bytes()
        assert cache.count(b" v\n") == 1  # only large_clean is verbatim
    finally:
        srv.stop()


def test_a_changed_large_passwd_file_is_reindexed_by_the_master(mail_env: MailEnv) -> None:
    """60,000 users (past REINDEX_MAX_LOGINS): after a change the workers answer by scanning
    (a user added a moment ago logs in), and the master re-indexes once and replaces them."""
    from tests.support.procs import proc_children, wait_for

    mail_env.add_user("alice", messages=[b"Subject: a\n\nhi\n"])
    with mail_env.passwd_file.open("a") as f:
        f.write("".join(f"x{i}:{{PLAIN}}p{i}::::/nonexistent/x{i}::\n" for i in range(60_000)))
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.login("alice").startswith(b"+OK")
        c.cmd("QUIT")
        assert srv.proc is not None
        before = proc_children(srv.proc.pid)
        mail_env.add_user("bob", messages=[b"Subject: b\n\nhi\n"])  # appended: the file changed
        c = RawClient(srv.port)
        assert c.login("bob").startswith(b"+OK")  # at once, from a scan or the new index
        c.cmd("QUIT")
        # the master re-indexes within a second or so and replaces every worker of before
        wait_for(lambda: not set(before) & set(proc_children(srv.proc.pid)), timeout=20, what="new workers")
        for user in ("alice", "bob"):
            c = RawClient(srv.port)
            assert c.login(user).startswith(b"+OK"), user
            c.cmd("QUIT")
    finally:
        srv.stop()
    log = srv.output()  # --fg: the log goes to stderr
    assert "changed: looking logins up (only its new lines are scanned)" in log
    assert "indexed 60002 logins" in log and "user list changed: re-read by the master, replacing workers" in log
