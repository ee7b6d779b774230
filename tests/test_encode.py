"""Tests for tpops.mailbox.encode: the RFC 1939 wire encoding and the size it implies.

The encoder is compared against a deliberately naive line-by-line reference
(:func:`reference_lines`), over hand-picked edge cases and over random messages read
in random chunk sizes (1, 2, 3 octets and larger), so chunk boundaries are exercised.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from typing import BinaryIO

import pytest

from tpops.mailbox.encode import (
    iter_wire_chunks,
    wire_size,
    wire_size_bytes,
    wire_size_fd,
)


def reference_lines(data: bytes, body_lines: int | None = None) -> list[bytes]:
    """The message's lines as RFC 1939 sends them, before stuffing, without line ends.

    A line ends at LF; one CR right before that LF belongs to the line end. A last line
    without LF is still a line. For TOP: the lines up to and including the first empty
    line, then ``body_lines`` more.
    """
    pieces = data.split(b"\n")
    terminated = pieces[:-1]
    lines = [p[:-1] if p.endswith(b"\r") else p for p in terminated]
    if pieces[-1]:
        lines.append(pieces[-1])  # unterminated last line: a lone CR there is data
    if body_lines is not None:
        for index, line in enumerate(lines):
            if line == b"" and index < len(terminated):
                return lines[: index + 1 + body_lines]
    return lines


def reference_wire(data: bytes, body_lines: int | None = None) -> bytes:
    """What RETR/TOP must send (without the terminator), built one line at a time."""
    return b"".join(
        (b"." if line.startswith(b".") else b"") + line + b"\r\n"
        for line in reference_lines(data, body_lines)
    )


def unstuff(wire: bytes) -> bytes:
    """What a client reconstructs: the wire text with one leading "." removed per line."""
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"", "wire text must end in CRLF"
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


def encode(data: bytes, body_lines: int | None = None, chunk_size: int = 256 * 1024) -> bytes:
    """The joined output of iter_wire_chunks over an in-memory file."""
    return b"".join(iter_wire_chunks(io.BytesIO(data), body_lines, chunk_size))


class CountingReader(io.BytesIO):
    """A BytesIO that records the size of every read() call."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.requests: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.requests.append(-1 if size is None else size)
        return super().read(size)


EXPLICIT_CASES = [
    (b"", b""),
    (b".", b"..\r\n"),
    (b"..", b"...\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n"),
    (b"a\nb", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\r", b"a\r\r\n"),
    (b"\r", b"\r\r\n"),
    (b"a\rb\n", b"a\rb\r\n"),
    (b"a\r\r\n", b"a\r\r\n"),
    (b"\x00\n\x00.\x00\r\n.\x00", b"\x00\r\n\x00.\x00\r\n..\x00\r\n"),
    (b"\n", b"\r\n"),
    (b"\n\n.\n", b"\r\n\r\n..\r\n"),
    (b".\r\n..\n", b"..\r\n...\r\n"),
    (b"x\n.\r.\n", b"x\r\n..\r.\r\n"),
]


@pytest.mark.parametrize(("data", "expected"), EXPLICIT_CASES)
def test_explicit_cases(data: bytes, expected: bytes) -> None:
    stuffed = expected.count(b"\r\n.") + expected.startswith(b".")
    for chunk_size in (1, 2, 3, 1024):
        assert encode(data, chunk_size=chunk_size) == expected
        assert wire_size(io.BytesIO(data), chunk_size) == len(expected) - stuffed
    assert wire_size_bytes(data) == len(expected) - stuffed


def test_empty_message_yields_no_chunks() -> None:
    assert list(iter_wire_chunks(io.BytesIO(b""))) == []
    assert list(iter_wire_chunks(io.BytesIO(b""), body_lines=3)) == []
    assert wire_size(io.BytesIO(b"")) == 0


def test_long_line() -> None:
    line = b"." + b"x" * 9_999
    data = b"Subject: long\n\n" + line
    expected = b"Subject: long\r\n\r\n." + line + b"\r\n"
    for chunk_size in (7, 4096, 256 * 1024):
        assert encode(data, chunk_size=chunk_size) == expected
    assert wire_size(io.BytesIO(data)) == len(expected) - 1
    assert len(expected) - 1 == 10_000 + 15 + 2 + 2


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    data = b"ab\r\ncd\r\n"
    # chunk size 3 splits "ab\r" | "\ncd" | "\r\n"
    assert encode(data, chunk_size=3) == data
    assert wire_size(io.BytesIO(data), 3) == len(data)


def test_dot_at_chunk_start_after_lf_is_stuffed() -> None:
    data = b"abc\n.def\n"
    # chunk size 4 puts the "." first in the second chunk
    assert encode(data, chunk_size=4) == b"abc\r\n..def\r\n"


MESSAGE = b"From: a@example.org\nSubject: hi\n\nline 1\n.line 2\nline 3\n"


@pytest.mark.parametrize(
    ("body_lines", "expected"),
    [
        (0, b"From: a@example.org\r\nSubject: hi\r\n\r\n"),
        (1, b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n"),
        (2, b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n..line 2\r\n"),
        (3, b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n"),
        (99, b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n"),
    ],
)
def test_top(body_lines: int, expected: bytes) -> None:
    for chunk_size in (1, 2, 3, 5, 1024):
        assert encode(MESSAGE, body_lines, chunk_size) == expected


def test_top_without_blank_line_sends_whole_message() -> None:
    data = b"From: a\nSubject: no body\n.x"
    for chunk_size in (1, 2, 3, 1024):
        assert encode(data, 0, chunk_size) == b"From: a\r\nSubject: no body\r\n..x\r\n"


def test_top_crlf_blank_line_and_empty_header() -> None:
    assert encode(b"H: v\r\n\r\nbody\r\nmore\r\n", 1) == b"H: v\r\n\r\nbody\r\n"
    # A message starting with an empty line has an empty header.
    assert encode(b"\nbody\nmore\n", 0) == b"\r\n"
    assert encode(b"\r\nbody\nmore\n", 1) == b"\r\nbody\r\n"
    # "\r\r\n" is a line holding a CR, not an empty line.
    assert encode(b"H: v\n\r\r\nbody\n\nafter\n", 0) == b"H: v\r\n\r\r\nbody\r\n\r\n"


def test_top_last_body_line_without_lf() -> None:
    assert encode(b"H: v\n\nonly", 5) == b"H: v\r\n\r\nonly\r\n"
    assert encode(b"H: v\n\nonly\r", 5) == b"H: v\r\n\r\nonly\r\r\n"


def test_top_stops_reading_early() -> None:
    data = b"Subject: big\n\n" + b"body line\n" * 200_000
    reader = CountingReader(data)
    out = b"".join(iter_wire_chunks(reader, 2, chunk_size=4096))
    assert out == b"Subject: big\r\n\r\nbody line\r\nbody line\r\n"
    assert len(reader.requests) == 1


def test_retr_reads_fixed_chunks_and_yields_bounded_chunks() -> None:
    data = (b"\n." * 5000) + b"x" * 10_000
    reader = CountingReader(data)
    chunks = list(iter_wire_chunks(reader, chunk_size=1000))
    assert set(reader.requests) == {1000}
    assert all(0 < len(c) <= 2 * 1000 + 2 for c in chunks)
    assert b"".join(chunks) == reference_wire(data)


def test_negative_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        list(iter_wire_chunks(io.BytesIO(b"x"), body_lines=-1))
    with pytest.raises(ValueError):
        list(iter_wire_chunks(io.BytesIO(b"x"), chunk_size=0))
    with pytest.raises(ValueError):
        wire_size(io.BytesIO(b"x"), 0)


def random_message(rng: random.Random) -> bytes:
    """Mostly line-structure octets, sometimes arbitrary binary, up to 300 octets."""
    length = rng.choice([0, 1, 2, 3, rng.randint(0, 40), rng.randint(0, 300)])
    if rng.random() < 0.2:
        return rng.randbytes(length)
    alphabet = b"\r\n.\x00a :"
    return bytes(rng.choice(alphabet) for _ in range(length))


def test_property_random_messages() -> None:
    rng = random.Random(1939)
    for _ in range(4000):
        data = random_message(rng)
        chunk_size = rng.choice([1, 2, 3, 4, 7, 64, 4096])
        body_lines = rng.choice([None, None, 0, 1, 2, 5])
        out = encode(data, body_lines, chunk_size)
        assert out == reference_wire(data, body_lines), (data, body_lines, chunk_size)
        normalised = b"".join(line + b"\r\n" for line in reference_lines(data, body_lines))
        assert unstuff(out) == normalised
        if body_lines is None:
            stuffed = len(out) - len(normalised)
            assert wire_size(io.BytesIO(data), chunk_size) == len(out) - stuffed
            assert wire_size_bytes(data) == len(normalised)


def test_wire_size_fd_matches_and_reads_from_current_position() -> None:
    rng = random.Random(11)
    with tempfile.TemporaryFile() as tmp:
        data = b"".join(random_message(rng) for _ in range(500))
        tmp.write(data)
        tmp.flush()
        for chunk_size in (1, 3, 4096, 65536):
            os.lseek(tmp.fileno(), 0, os.SEEK_SET)
            assert wire_size_fd(tmp.fileno(), chunk_size) == wire_size_bytes(data)
        assert wire_size_bytes(data) == len(b"".join(l + b"\r\n" for l in reference_lines(data)))


def test_works_on_real_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "msg")
    data = b"Subject: x\r\n\r\n.hello\nworld"
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        reader: BinaryIO = f
        assert b"".join(iter_wire_chunks(reader)) == b"Subject: x\r\n\r\n..hello\r\nworld\r\n"
    with open(path, "rb") as f:
        assert wire_size(f) == len(b"Subject: x\r\n\r\n.hello\r\nworld\r\n")


@pytest.mark.parametrize(
    "data",
    [b"", b".", b"..\n", b"a\r", b"a\r\n.b", b"x\n" * 5, b"\r\n.\r\n", b"no newline", b"\x00.\n.\x00"],
)
def test_encode_whole_equals_streaming(data: bytes) -> None:
    from tpops.mailbox.encode import encode_whole, wire_message

    streamed = b"".join(iter_wire_chunks(io.BytesIO(data)))
    assert encode_whole(data) == streamed
    assert b"".join(wire_message(_fd_of(data))) == streamed


def _fd_of(data: bytes) -> int:
    """A read descriptor on a temporary file holding ``data``."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("factor", [1, 3])
def test_wire_message_streams_large_messages_and_closes(factor: int) -> None:
    from tpops.mailbox.encode import DEFAULT_CHUNK_OCTETS, wire_message

    for data in ((b".line\n" * (factor * DEFAULT_CHUNK_OCTETS // 6)) + b"tail", b"x" * DEFAULT_CHUNK_OCTETS):
        fd = _fd_of(data)
        chunks = list(wire_message(fd))
        assert b"".join(chunks) == b"".join(iter_wire_chunks(io.BytesIO(data)))
        assert not _is_open(fd)
    small = _fd_of(b"short\n")
    assert list(wire_message(small)) == [b"short\r\n"]
    assert not _is_open(small)
    top = _fd_of(b"H: v\n\nb1\nb2\n")
    assert b"".join(wire_message(top, 1)) == b"H: v\r\n\r\nb1\r\n"
    assert not _is_open(top)
