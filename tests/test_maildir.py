"""Tests for tpops.mailbox.maildir: the per-session Maildir snapshot, on real temp Maildirs."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tpops.mailbox import maildir as maildir_module
from tpops.mailbox.encode import iter_wire_chunks, wire_size_bytes
from tpops.mailbox.maildir import (
    SIZE_CACHE_HEADER,
    SIZE_CACHE_NAME,
    Maildir,
    MessageGone,
    uidl_for,
)

BODY = b"From: a@example.org\nSubject: test\n\nHello\n.dot line\n"


def make_maildir(root: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def put(root: Path, sub: str, name: str | bytes, data: bytes = BODY) -> Path:
    """Write one message file as a deliverer would (directly, for test purposes)."""
    directory = os.fsencode(root / sub)
    path = os.path.join(directory, os.fsencode(name))
    with open(path, "wb") as f:
        f.write(data)
    return Path(os.fsdecode(path))


def cache_text(root: Path) -> bytes:
    return (root / SIZE_CACHE_NAME).read_bytes()


def names(md: Maildir) -> list[str]:
    return [m.name for m in md.messages]


# --- the snapshot -------------------------------------------------------------------


def test_missing_maildir_is_empty(tmp_path: Path) -> None:
    assert Maildir.open(str(tmp_path / "nope")).messages == []
    assert Maildir.open(str(tmp_path)).messages == []  # exists, but no cur/ or new/
    (tmp_path / "file").write_bytes(b"x")
    assert Maildir.open(str(tmp_path / "file")).messages == []
    assert not (tmp_path / SIZE_CACHE_NAME).exists()


def test_order_is_delivery_time_then_unique_name(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1000.b.host:2,S")
    put(root, "new", "999.z.host")
    put(root, "cur", "1000.a.host:2,")
    put(root, "new", "1000.B.host")
    put(root, "cur", "nonumber.host:2,")
    put(root, "cur", "20x.host:2,")
    put(root, "cur", "10000.c.host:2,")
    expected = [
        "nonumber.host:2,",
        "20x.host:2,",
        "999.z.host:2,",
        "1000.B.host:2,",
        "1000.a.host:2,",
        "1000.b.host:2,S",
        "10000.c.host:2,",
    ]
    first = Maildir.open(str(root))
    assert names(first) == expected
    assert names(Maildir.open(str(root))) == expected


def test_new_is_moved_to_cur_with_info(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "new", "1.a.host")
    put(root, "new", "2.b.host:2,S")  # already has info: keeps its name
    md = Maildir.open(str(root))
    assert names(md) == ["1.a.host:2,", "2.b.host:2,S"]
    assert os.listdir(root / "new") == []
    assert sorted(os.listdir(root / "cur")) == ["1.a.host:2,", "2.b.host:2,S"]
    with md.open_message(md.messages[0]) as f:
        assert f.read() == BODY


def test_missing_cur_is_created_for_new_mail(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    put(tmp_path, "new", "1.a.host")
    md = Maildir.open(str(tmp_path))
    assert names(md) == ["1.a.host:2,"]
    assert (tmp_path / "cur" / "1.a.host:2,").is_file()


def test_new_moved_by_another_reader_is_taken_from_cur(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_maildir(tmp_path)
    put(root, "new", "1.a.host")
    put(root, "new", "2.b.host")
    real_rename = os.rename

    def racing_rename(src: str, dst: str, **dir_fds: int) -> None:
        if src.endswith("1.a.host"):  # another reader wins the race, with its own flags
            real_rename(root / "new" / "1.a.host", root / "cur" / "1.a.host:2,S")
        elif src.endswith("2.b.host"):  # another reader deleted it
            os.unlink(root / "new" / "2.b.host")
        real_rename(src, dst, **dir_fds)

    monkeypatch.setattr(os, "rename", racing_rename)
    md = Maildir.open(str(root))
    assert names(md) == ["1.a.host:2,S"]


def test_non_messages_are_ignored(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.real.host:2,")
    put(root, "tmp", "2.delivering.host")
    put(root, "cur", ".hidden:2,")
    put(root, "new", ".hidden-new")
    (root / "cur" / "3.dir.host:2,").mkdir()
    (root / "cur" / "4.link.host:2,").symlink_to(root / "cur" / "1.real.host:2,")
    (root / "new" / "5.link.host").symlink_to(root / "cur" / "1.real.host:2,")
    os.mkfifo(root / "cur" / "6.fifo.host:2,")
    md = Maildir.open(str(root))
    assert names(md) == ["1.real.host:2,"]
    assert sorted(os.listdir(root / "new")) == [".hidden-new", "5.link.host"]
    assert os.listdir(root / "tmp") == ["2.delivering.host"]


# --- UIDL ---------------------------------------------------------------------------


def sha1_hex(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()


def test_uidl_rules() -> None:
    assert uidl_for("1700000000.M1P2.host") == "1700000000.M1P2.host"
    assert uidl_for("x" * 70) == "x" * 70
    assert uidl_for("x" * 71) == sha1_hex(b"x" * 71)
    assert uidl_for("") == sha1_hex(b"")
    assert uidl_for("has space") == sha1_hex(b"has space")
    assert uidl_for("caf\u00e9") == sha1_hex("caf\u00e9".encode())
    assert uidl_for("tab\there") == sha1_hex(b"tab\there")
    assert uidl_for("del\x7f") == sha1_hex(b"del\x7f")
    assert uidl_for("!~") == "!~"


def test_uidl_from_files_and_stable_across_flag_changes(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    long_unique = "1." + "L" * 80
    put(root, "cur", "3.plain.host,S=10:2,")
    put(root, "cur", long_unique + ":2,")
    put(root, "cur", b"2.caf\xc3\xa9.host:2,")
    put(root, "cur", b"4.raw\xff.host:2,")
    md = Maildir.open(str(root))
    assert [m.uid for m in md.messages] == [
        sha1_hex(long_unique.encode()),
        sha1_hex(b"2.caf\xc3\xa9.host"),
        "3.plain.host,S=10",
        sha1_hex(b"4.raw\xff.host"),
    ]
    for m in md.messages:
        assert 1 <= len(m.uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in m.uid)
    # Another reader sets flags: UIDLs, sizes and order stay the same.
    for name in os.listdir(os.fsencode(root / "cur")):
        os.rename(
            os.path.join(os.fsencode(root / "cur"), name),
            os.path.join(os.fsencode(root / "cur"), name.split(b":")[0] + b":2,RS"),
        )
    again = Maildir.open(str(root))
    assert [m.uid for m in again.messages] == [m.uid for m in md.messages]
    assert [m.octets for m in again.messages] == [m.octets for m in md.messages]
    assert all(m.name.endswith(":2,RS") for m in again.messages)


# --- sizes --------------------------------------------------------------------------


def retr_octets(md: Maildir, index: int) -> int:
    """What RETR sends for messages[index], minus stuffing: the size LIST must report."""
    with md.open_message(md.messages[index]) as f:
        wire = b"".join(iter_wire_chunks(f))
    stuffed = wire.count(b"\r\n..") + wire.startswith(b"..")
    return len(wire) - stuffed


def test_exact_sizes_match_retr(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    rng = random.Random(5)
    samples = [b"", b"x", b"a\r", b".\n", b"a\r\nb\r\n", b"a\nb", BODY]
    samples += [rng.randbytes(rng.randint(0, 300)) for _ in range(20)]
    for i, data in enumerate(samples):
        put(root, "cur", f"{i + 1}.m.host:2,", data)
    md = Maildir.open(str(root))
    assert len(md.messages) == len(samples)
    for i, (msg, data) in enumerate(zip(md.messages, samples)):
        assert msg.octets == wire_size_bytes(data) == retr_octets(md, i)


def test_w_field_with_last_octet_check(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    ends_in_lf = b"a\nb\n"  # W (virtual CRLF size) = 6
    no_final_lf = b"a\nb"  # W = 4, but RETR appends CRLF: 6
    put(root, "cur", "1.a.host,S=4,W=6:2,", ends_in_lf)
    put(root, "cur", "2.b.host,S=3,W=4:2,", no_final_lf)
    put(root, "cur", "3.c.host,W=999:2,", b"short\n")  # W= is trusted, not re-counted
    put(root, "cur", "4.d.host,W=7:2,", b"")  # empty file sends nothing
    md = Maildir.open(str(root))
    assert [m.octets for m in md.messages] == [6, 6, 999, 0]
    assert retr_octets(md, 0) == 6 and retr_octets(md, 1) == 6


def test_maildir_extended_trusts_s_field(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host,S=1234:2,", BODY)
    put(root, "cur", "2.b.host:2,", BODY)  # no S=: exact size
    md = Maildir.open(str(root), maildir_extended=True)
    assert [m.octets for m in md.messages] == [1234, wire_size_bytes(BODY)]
    # without the setting, S= is ignored in favour of the exact size
    plain = Maildir.open(str(root))
    assert [m.octets for m in plain.messages] == [wire_size_bytes(BODY)] * 2


def test_maildir_extended_trusts_w_without_the_final_newline_check(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host,S=4,W=4:2,", b"abcd")  # no final LF: 6 octets on the wire
    assert [m.octets for m in Maildir.open(str(root), maildir_extended=True).messages] == [4]
    assert [m.octets for m in Maildir.open(str(root)).messages] == [6]


def test_maildir_use_filesize(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host,S=1234:2,", BODY)
    put(root, "cur", "2.b.host:2,", BODY)
    md = Maildir.open(str(root), maildir_use_filesize=True)
    assert [m.octets for m in md.messages] == [len(BODY), len(BODY)]
    both = Maildir.open(str(root), maildir_extended=True, maildir_use_filesize=True)
    assert [m.octets for m in both.messages] == [1234, len(BODY)]
    assert not (root / SIZE_CACHE_NAME).exists()


def test_unreadable_message_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    put(root, "cur", "2.b.host:2,")
    real_open = os.open

    def failing_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if str(path).endswith("1.a.host:2,"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    md = Maildir.open(str(root))
    assert names(md) == ["2.b.host:2,"]


# --- the size cache -----------------------------------------------------------------


def fill(root: Path, count: int, seed: int = 3) -> dict[str, bytes]:
    """``count`` messages with bare names in shuffled creation order; unique -> content."""
    rng = random.Random(seed)
    contents: dict[str, bytes] = {}
    order = list(range(count))
    rng.shuffle(order)
    for i in order:
        unique = f"{1_600_000_000 + i}.M{i}P1.host"
        data = b"Subject: %d\n\n" % i + b"line\n" * rng.randint(0, 30) + rng.choice([b"", b"x"])
        put(root, "cur", unique + ":2,", data)
        contents[unique] = data
    return contents


def count_cur_opens(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Record every os.open of a message file (a name under cur/) from now on."""
    opened: list[str] = []
    real_open = os.open
    messages = set(os.listdir(root / "cur"))

    def recording_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if os.fsdecode(path) in messages:
            opened.append(os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    return opened


def test_size_cache_written_then_used_without_reading_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_maildir(tmp_path)
    contents = fill(root, 500)
    first = Maildir.open(str(root))
    expected = [wire_size_bytes(contents[m.uid]) for m in first.messages]
    assert [m.octets for m in first.messages] == expected
    assert [m.uid for m in first.messages] == sorted(contents)  # equal-width numbers
    text = cache_text(root)
    assert text.startswith(SIZE_CACHE_HEADER)
    assert text.count(b"\n") == 501
    inode = (root / SIZE_CACHE_NAME).stat().st_ino

    opened = count_cur_opens(monkeypatch, root)
    second = Maildir.open(str(root))
    assert opened == []
    assert [(m.uid, m.name, m.octets) for m in second.messages] == [
        (m.uid, m.name, m.octets) for m in first.messages
    ]
    assert (root / SIZE_CACHE_NAME).stat().st_ino == inode  # unchanged: not rewritten


def test_size_cache_is_the_source_of_sizes(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    Maildir.open(str(root))
    (root / SIZE_CACHE_NAME).write_bytes(SIZE_CACHE_HEADER + b"1.a.host 4242\n")
    assert [m.octets for m in Maildir.open(str(root)).messages] == [4242]


def test_size_cache_gains_and_prunes_entries(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    put(root, "cur", "2.b.host:2,")
    Maildir.open(str(root))
    size = wire_size_bytes(BODY)
    assert cache_text(root) == SIZE_CACHE_HEADER + b"1.a.host %d\n2.b.host %d\n" % (size, size)
    os.unlink(root / "cur" / "1.a.host:2,")
    put(root, "new", "3.c.host", b"x")
    Maildir.open(str(root))
    assert cache_text(root) == SIZE_CACHE_HEADER + b"2.b.host %d\n3.c.host 3\n" % size
    assert [p for p in os.listdir(root) if p.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff garbage",
        SIZE_CACHE_HEADER + b"1.a.host 12",  # truncated: no final LF
        SIZE_CACHE_HEADER + b"1.a.host twelve\n",
        SIZE_CACHE_HEADER + b"no-size-here\n",
        b"tpops-sizecache 0\n1.a.host 5\n",  # other format version
    ],
)
def test_corrupt_size_cache_is_ignored_and_rewritten(tmp_path: Path, garbage: bytes) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    (root / SIZE_CACHE_NAME).write_bytes(garbage)
    md = Maildir.open(str(root))
    assert [m.octets for m in md.messages] == [wire_size_bytes(BODY)]
    assert cache_text(root) == SIZE_CACHE_HEADER + b"1.a.host %d\n" % wire_size_bytes(BODY)


def test_size_cache_odd_names(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    odd = [b"1.with space .host", b"2.raw\xfe\xff.host", b"3.new\nline.host", b"4. 77"]
    for i, unique in enumerate(odd):
        put(root, "cur", unique + b":2,", b"x" * (i + 1))
    first = Maildir.open(str(root))
    text = cache_text(root)
    assert b"1.with space .host 3\n" in text
    assert b"2.raw\xfe\xff.host 4\n" in text
    assert b"4. 77 6\n" in text
    assert b"3.new" not in text  # a name with LF cannot be a line: just not cached
    inode = (root / SIZE_CACHE_NAME).stat().st_ino
    second = Maildir.open(str(root))
    assert [m.octets for m in second.messages] == [m.octets for m in first.messages] == [
        3,
        4,
        5,
        6,
    ]
    assert (root / SIZE_CACHE_NAME).stat().st_ino == inode


def test_unwritable_size_cache_is_skipped(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    (root / SIZE_CACHE_NAME).mkdir()  # neither readable nor replaceable as a file
    md = Maildir.open(str(root))
    assert [m.octets for m in md.messages] == [wire_size_bytes(BODY)]
    assert (root / SIZE_CACHE_NAME).is_dir()
    assert sorted(os.listdir(root)) == sorted(["cur", "new", "tmp", SIZE_CACHE_NAME])


def test_approximate_modes_leave_cache_alone(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host,S=50:2,")
    put(root, "cur", "2.b.host:2,")
    Maildir.open(str(root))
    before = cache_text(root)
    inode = (root / SIZE_CACHE_NAME).stat().st_ino
    Maildir.open(str(root), maildir_extended=True)
    Maildir.open(str(root), maildir_use_filesize=True)
    assert cache_text(root) == before
    assert (root / SIZE_CACHE_NAME).stat().st_ino == inode


# --- reading ------------------------------------------------------------------------


def test_open_message_follows_flag_rename_and_reports_gone(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,", b"first\n")
    put(root, "cur", "2.b.host:2,", b"second\n")
    put(root, "cur", "3.c.host:2,", b"third\n")
    md = Maildir.open(str(root))
    os.rename(root / "cur" / "1.a.host:2,", root / "cur" / "1.a.host:2,S")
    with md.open_message(md.messages[0]) as f:
        assert f.read() == b"first\n"
    assert md.messages[0].name == "1.a.host:2,S"
    os.unlink(root / "cur" / "2.b.host:2,")
    with pytest.raises(MessageGone):
        md.open_message(md.messages[1])
    os.unlink(root / "cur" / "3.c.host:2,")
    os.symlink(root / "cur" / "1.a.host:2,S", root / "cur" / "3.c.host:2,")
    with pytest.raises(MessageGone):
        md.open_message(md.messages[2])


# --- UPDATE -------------------------------------------------------------------------


def test_commit_deletes_only_marked(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    for i in range(1, 5):
        put(root, "cur", f"{i}.m.host:2,")
    md = Maildir.open(str(root))
    md.messages[1].deleted = True
    md.messages[3].deleted = True
    result = md.commit()
    assert (result.deleted, result.failures) == (2, [])
    assert result.deleted_octets == md.messages[1].octets + md.messages[3].octets
    assert sorted(os.listdir(root / "cur")) == ["1.m.host:2,", "3.m.host:2,"]


def test_commit_with_gone_renamed_and_failing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_maildir(tmp_path)
    for i in range(1, 7):
        put(root, "cur", f"{i}.m.host:2,")
    md = Maildir.open(str(root))
    for msg in md.messages:
        msg.deleted = True
    os.unlink(root / "cur" / "1.m.host:2,")  # someone else deleted it
    os.rename(root / "cur" / "2.m.host:2,", root / "cur" / "2.m.host:2,S")  # flags changed
    os.unlink(root / "cur" / "4.m.host:2,")
    (root / "cur" / "4.m.host:2,").mkdir()  # another file took the name: not ours to remove
    real_unlink = os.unlink

    def failing_unlink(path: str, **kwargs: int) -> None:
        if str(path) == "3.m.host:2,":
            raise PermissionError(13, "Permission denied", path)
        real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    result = md.commit()
    assert result.deleted == 5
    assert result.deleted_octets == sum(m.octets for i, m in enumerate(md.messages) if i != 2)
    assert result.failures == ["unlink cur/3.m.host:2,: Permission denied"]
    assert sorted(os.listdir(root / "cur")) == ["3.m.host:2,", "4.m.host:2,"]
    assert (root / "cur" / "4.m.host:2,").is_dir()


def test_commit_removes_only_the_marked_duplicate(tmp_path: Path) -> None:
    """Issue 8 item 18: two files share a unique name; DELE marks one, another reader
    then renames it (or deletes it): the unmarked duplicate must survive."""
    root = make_maildir(tmp_path)
    put(root, "cur", "1.dup.host:2,", b"first copy\n")
    put(root, "cur", "1.dup.host:2,S", b"second copy\n")
    for rename in (True, False):
        md = Maildir.open(str(root))
        assert [m.uid for m in md.messages] == ["1.dup.host", "1.dup.host"]
        marked, kept = md.messages
        marked.deleted = True
        if rename:  # another reader changes its flags: found again by inode
            os.rename(root / "cur" / marked.name, root / "cur" / "1.dup.host:2,T")
            survivors = [kept.name]
        else:  # another reader deletes it: nothing else is taken for it
            os.unlink(root / "cur" / marked.name)
            survivors = [kept.name]
        result = md.commit()
        assert (result.deleted, result.failures) == (1, [])
        assert os.listdir(root / "cur") == survivors
        assert (root / "cur" / kept.name).read_bytes() in (b"first copy\n", b"second copy\n")
        put(root, "cur", "1.dup.host:2,", b"first copy\n")  # a duplicate again for the next round


def test_commit_appends_maildirsize_line(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    (root / "maildirsize").write_bytes(b"1000000S,1000C\n500 3\n")
    put(root, "cur", "1.a.host,S=40:2,", b"y" * 37)  # S= is what quota counted
    put(root, "cur", "2.b.host:2,", b"z" * 25)  # no S=: size on disk
    put(root, "cur", "3.c.host:2,", b"kept")
    put(root, "cur", "4.d.host:2,", b"gone")
    md = Maildir.open(str(root))
    for msg in md.messages[:2] + md.messages[3:]:
        msg.deleted = True
    os.unlink(root / "cur" / "4.d.host:2,")  # removed by someone else: not ours to count
    result = md.commit()
    assert result.deleted == 3
    # one line per removed file, written as it goes (a crash loses at most one)
    assert (root / "maildirsize").read_bytes() == b"1000000S,1000C\n500 3\n-40 -1\n-25 -1\n"


def test_commit_without_maildirsize_creates_none(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    md = Maildir.open(str(root))
    md.messages[0].deleted = True
    assert md.commit().deleted == 1
    assert not (root / "maildirsize").exists()


def test_commit_nothing_deleted_touches_nothing(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    (root / "maildirsize").write_bytes(b"0S\n")
    put(root, "cur", "1.a.host:2,")
    md = Maildir.open(str(root))
    result = md.commit()
    assert (result.deleted, result.deleted_octets, result.failures) == (0, 0, [])
    assert (root / "maildirsize").read_bytes() == b"0S\n"
    assert os.listdir(root / "cur") == ["1.a.host:2,"]


def test_mail_delivered_during_session_is_invisible_and_untouched(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    md = Maildir.open(str(root))
    put(root, "new", "2.b.host")
    put(root, "cur", "3.c.host:2,")  # e.g. moved there by an IMAP session
    assert names(md) == ["1.a.host:2,"]
    md.messages[0].deleted = True
    result = md.commit()
    assert result.deleted == 1
    assert os.listdir(root / "new") == ["2.b.host"]
    assert os.listdir(root / "cur") == ["3.c.host:2,"]
    assert names(Maildir.open(str(root))) == ["2.b.host:2,", "3.c.host:2,"]


def test_public_helpers_agree_with_snapshot(tmp_path: Path) -> None:
    helpers: list[Callable[[str], object]] = [
        maildir_module.unique_name,
        maildir_module.delivery_order_key,
        maildir_module.size_fields,
    ]
    assert [h("12.x.host,S=5,W=7:2,S") for h in helpers] == [
        "12.x.host,S=5,W=7",
        (12, "12.x.host,S=5,W=7", "12.x.host,S=5,W=7:2,S"),
        {"S": 5, "W": 7},
    ]
    assert maildir_module.delivery_order_key("abc") == (0, "abc", "abc")
    assert maildir_module.delivery_order_key("123abc.x") == (123, "123abc.x", "123abc.x")
    # Non-ASCII digits are not a delivery time.
    assert maildir_module.delivery_order_key("\u0663.x") == (0, "\u0663.x", "\u0663.x")


# --- the unchanged-Maildir fast path ----------------------------------------------------


def _snapshot(md: Maildir) -> list[tuple[str, str, int]]:
    return [(m.uid, m.name, m.octets) for m in md.messages]


def test_fast_path_matches_full_scan_through_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_maildir(tmp_path)
    rng = random.Random(7)
    for i in rng.sample(range(1000), 40):
        put(root, "cur", f"{1700000000 + i}.M{i}.host:2,", BODY * (i % 5 + 1))
    put(root, "cur", "nonumber.host:2,S")
    first = _snapshot(Maildir.open(str(root)))
    calls: list[int] = []
    real = maildir_module._from_cache

    def spy(*args: object) -> object:
        result = real(*args)  # type: ignore[arg-type]
        calls.append(result is not None)
        return result

    monkeypatch.setattr(maildir_module, "_from_cache", spy)
    assert _snapshot(Maildir.open(str(root))) == first
    assert calls[-1] is True  # unchanged: served from the cache
    # a flag change, a delivery and a stray directory each force the full scan,
    # whose result the fast path must then reproduce exactly
    victim = root / "cur" / first[3][1]
    victim.rename(victim.with_name(victim.name + "S"))
    put(root, "new", "1600000000.early.host")
    (root / "cur" / "1800000000.dir.host").mkdir()
    full = _snapshot(Maildir.open(str(root)))
    assert calls[-1] is False
    assert [u for u, _, _ in full][:2] == ["nonumber.host", "1600000000.early.host"]
    assert len(full) == len(first) + 1
    (root / "cur" / "1800000000.dir.host").rmdir()
    again = _snapshot(Maildir.open(str(root)))
    assert again == full
    assert _snapshot(Maildir.open(str(root))) == full
    assert calls[-1] is True


# --- hostile files (issue 8 items 1, 3, 22) ---------------------------------------


def test_open_root_refuses_a_symlinked_maildir_when_told(tmp_path: Path) -> None:
    real = make_maildir(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(maildir_module.UnsafeMaildir):
        maildir_module.open_root(str(tmp_path / "link"), follow_last=False)
    followed = maildir_module.open_root(str(tmp_path / "link"))  # our own (root's/euid's) link
    assert followed.stat.st_ino == real.stat().st_ino
    missing = maildir_module.open_root(str(tmp_path / "real" / "no" / "Maildir"))
    assert missing.fd is None and missing.stat.st_ino == real.stat().st_ino  # nearest ancestor


def test_hostile_size_cache_files_are_ignored_and_replaced(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    put(root, "cur", "1.a.host:2,")
    for plant in (os.mkfifo, lambda p: os.symlink("/dev/zero", p), lambda p: os.truncate(open(p, "wb").name, 1 << 40)):
        cache = root / SIZE_CACHE_NAME
        if cache.exists() or cache.is_symlink():
            cache.unlink()
        plant(str(cache))
        md = Maildir.open(str(root))  # returns: neither blocks nor reads without bound
        assert [m.octets for m in md.messages] == [wire_size_bytes(BODY)]
        assert cache.is_file() and not cache.is_symlink()
        assert cache_text(root) == SIZE_CACHE_HEADER + b"1.a.host %d\n" % wire_size_bytes(BODY)
    assert sorted(os.listdir(root)) == sorted(["cur", "new", "tmp", SIZE_CACHE_NAME])  # no temp left


def test_kill_9_in_commit_leaves_maildirsize_at_most_one_message_off(tmp_path: Path) -> None:
    root = make_maildir(tmp_path)
    (root / "maildirsize").write_bytes(b"0S\n")
    for i in range(200):
        put(root, "cur", f"{1000 + i}.m.host,S=10:2,", b"x\n")
    pid = os.fork()
    if pid == 0:  # the session: killed right after its 73rd unlink, before anything else
        try:
            md = Maildir.open(str(root))
            for msg in md.messages:
                msg.deleted = True
            real_unlink, done = os.unlink, [0]

            def unlink_then_die(path: str, **kwargs: int) -> None:
                real_unlink(path, **kwargs)
                done[0] += 1
                if done[0] == 73:
                    os.kill(os.getpid(), 9)

            os.unlink = unlink_then_die  # type: ignore[assignment]
            md.commit()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    assert len(os.listdir(root / "cur")) == 200 - 73
    lines = (root / "maildirsize").read_bytes().splitlines()[1:]
    assert lines == [b"-10 -1"] * 72  # the one unlinked just before the kill is the only one missing
