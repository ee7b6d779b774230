"""Property-based fuzzing of the line reader and the state machine: hostile bytes into a real Session.

Each example runs a real :class:`~tpops.session.Session` in a thread over
``socket.socketpair()`` (the harness of ``tests/test_session_memory.py``: a fake
authenticator, a temporary Maildir of three messages) and feeds it what hypothesis
draws: random octets, NUL, bare CR, lines of 254-257 octets and of 2 MiB, numbers beyond
2**64, sequences of valid and invalid commands in both states. The client sends in a
thread and reads everything in the test, so neither side can block the other. What must
hold for any input:

- every reply is a status line (``+OK``, ``-ERR``, ``+ ``) or part of a multi-line body
  ending with ``.``; every line ends with CRLF, and there is one reply per complete
  command line until a reply that closes the connection;
- a line longer than 255 octets (line end excluded) gets ``-ERR Command line too long.``
  and nothing else does;
- no exception escapes the session (no ``internal error`` record on ``tpops.session``),
  the session ends, the mailbox lock is released;
- the mailbox loses exactly the messages DELEd before a ``+OK Bye`` (none without one);
- memory stays bounded: a 2 MiB line and a 100k-command pipelined flood sent without
  reading leave the server's buffers (and the tracemalloc peak) under a fixed cap.

CI runs the ``ci`` profile (a fixed, derandomized number of examples, well under a
minute). ``scripts/fuzz`` runs the same tests with the ``fuzz`` profile, fresh random
examples, for as long as asked; ``TPOPS_FUZZ_EXAMPLES`` sets examples per test.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_session_memory import MESSAGES, Site
from tpops.protocol import MAX_COMMAND_OCTETS, READ_BLOCK, WRITE_BUFFER
from tpops.session import Session

settings.register_profile(
    "ci", max_examples=int(os.environ.get("TPOPS_FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("TPOPS_FUZZ_EXAMPLES", "2000")), deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("TPOPS_FUZZ_PROFILE", "ci"))

#: A status line: ``+OK`` with optional text, ``-ERR`` with text, or a continuation ``+ ``.
STATUS = re.compile(rb"\+OK( .*)?|-ERR .+|\+ .*", re.S)
#: Status texts that open a multi-line body whatever the command's spelling.
MULTI_TEXTS = (b"+OK Capability list follows", b"+OK Top of message follows", b"+OK Unique-ID list follows")
RETR_STATUS = re.compile(rb"\+OK \d+ octets")
LIST_STATUS = re.compile(rb"\+OK \d+ messages \(\d+ octets\)")  # LIST (multi-line) or RSET (not)
#: Replies after which the server may close without answering what follows.
CLOSING = (b"+OK Bye", b"-ERR Too many bad commands.", b"-ERR [AUTH] ", b"-ERR [SYS/")
TOO_LONG = b"-ERR Command line too long."
#: The message files of alice's Maildir: cur/NAME -> content.
ORIGINAL = dict(MESSAGES)


def complete_lines(data: bytes) -> list[bytes]:
    """The command lines a correct reader finds in ``data``: LF-terminated, one trailing CR dropped."""
    parts = data.split(b"\n")[:-1]  # what follows the last LF is never a complete line
    return [p[:-1] if p.endswith(b"\r") else p for p in parts]


def ascii_verb(line: bytes) -> bytes:
    """The verb as RFC 1939 defines it: up to the first SP, ASCII case-insensitive."""
    return line.partition(b" ")[0].upper()


@dataclass
class Reply:
    status: bytes
    body: list[bytes] | None = None


@dataclass
class Outcome:
    """What one conversation produced: the replies after the greeting (and the login) and more."""

    lines: list[bytes]
    replies: list[Reply]
    errors: list[logging.LogRecord]
    session: Session
    left: set[str]  #: alice's message files after the session
    held: set[str]  #: locks still held


class Capture(logging.Handler):
    """Collects error records and every exception logged under ``tpops``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "internal error" in record.getMessage():
            self.records.append(record)


def parse(raw: bytes, sent: list[bytes]) -> list[Reply]:
    """Split everything the server sent into replies; assert the framing as it goes."""
    assert raw == b"" or raw.endswith(b"\r\n"), raw[-80:]
    lines = raw[:-2].split(b"\r\n") if raw else []
    replies: list[Reply] = []
    i = 0
    while i < len(lines):
        status = lines[i]
        i += 1
        assert b"\n" not in status and b"\r" not in status, status
        assert STATUS.fullmatch(status), f"not a status line: {status[:100]!r} (reply {len(replies) + 1})"
        verb = ascii_verb(sent[len(replies)]) if len(replies) < len(sent) else b""
        multi = status in MULTI_TEXTS or bool(RETR_STATUS.fullmatch(status)) or (
            bool(LIST_STATUS.fullmatch(status)) and verb == b"LIST"
        )
        reply = Reply(status)
        if multi:
            reply.body = []
            while True:
                assert i < len(lines), f"multi-line reply to {verb!r} without its terminating '.'"
                line = lines[i]
                i += 1
                if line == b".":
                    break
                assert b"\n" not in line and b"\r" not in line, line
                assert not line.startswith(b".") or line.startswith(b".."), f"unstuffed body line {line!r}"
                reply.body.append(line)
        replies.append(reply)
    return replies


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes.

    A server that closes with client input unread makes an AF_UNIX peer see ECONNRESET
    instead of EOF, but only after every queued octet (unlike TCP, nothing is lost), so
    here a reset ends the stream like EOF; check() still demands a closing reply last.
    """
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def converse(
    data: bytes, *, login: bool = False, chunk: int = 65536, peak: list[int] | None = None, **overrides: object
) -> Outcome:
    """Run a fresh Session, send ``data`` (then end the input), read to EOF; the session must end.

    With ``peak``, the tracemalloc peak of the conversation (client included, its input
    built before) is appended to it.
    """
    base = Path(tempfile.mkdtemp(prefix="tpops-fuzz-"))
    capture = Capture()
    logger = logging.getLogger("tpops")
    logger.addHandler(capture)
    try:
        site = Site(base)
        site.maildir("alice", MESSAGES)
        sessions: list[Session] = []
        c = site.start(prepare=sessions.append, **overrides)  # type: ignore[arg-type]
        assert c.greeting.startswith(b"+OK ")
        if login:
            c.login()

        view = memoryview(data)

        def send() -> None:
            try:
                for start in range(0, len(data), chunk):
                    c.sock.sendall(view[start:start + chunk])
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server closed first (QUIT, too many bad commands): fine
                pass

        if peak is not None:
            tracemalloc.start()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        raw = read_to_end(c.sock)
        sender.join(10)
        assert not sender.is_alive()
        c.thread.join(10)
        if peak is not None:
            peak.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        assert not c.thread.is_alive(), "the session did not end"
        c.file.close()
        c.sock.close()
        sent = complete_lines(data)
        return Outcome(
            sent, parse(raw, sent), capture.records, sessions[0],
            set(os.listdir(base / "alice" / "cur")), set(site.held),
        )
    finally:
        logger.removeHandler(capture)
        shutil.rmtree(base, ignore_errors=True)


def check(out: Outcome) -> None:
    """The invariants every conversation keeps, whatever was sent."""
    assert not out.errors, [r.getMessage() for r in out.errors]
    assert not out.held, "the mailbox lock was left held"
    assert len(out.replies) <= len(out.lines), "more replies than command lines"
    if len(out.replies) < len(out.lines):
        assert out.replies and out.replies[-1].status.startswith(CLOSING), (
            f"{len(out.lines)} lines, {len(out.replies)} replies, the last {out.replies[-1:]!r}"
        )
    for line, reply in zip(out.lines, out.replies):
        too_long = len(line) > MAX_COMMAND_OCTETS
        if reply.status == b"-ERR Too many bad commands.":
            continue
        assert (reply.status == TOO_LONG) == too_long, f"{len(line)}-octet line {line[:60]!r}: {reply.status!r}"
    # No message lost: gone are exactly those DELEd (since the last RSET) before a +OK Bye.
    deleted: set[int] = set()
    committed = False
    for line, reply in zip(out.lines, out.replies):
        if m := re.fullmatch(rb"\+OK Message (\d+) deleted\.", reply.status):
            deleted.add(int(m[1]))
        elif ascii_verb(line) == b"RSET" and reply.status.startswith(b"+OK"):
            deleted.clear()
        elif reply.status.startswith(b"+OK Bye,"):
            committed = True
    names = [name for name, _ in MESSAGES]
    expected = {n for i, n in enumerate(names, 1) if not (committed and i in deleted)}
    assert out.left == expected


# ---------------------------------------------------------------------------
# Strategies

NUMBERS = st.one_of(
    st.integers(0, 4).map(str),
    st.integers(-3, 2**70).map(str),
    st.sampled_from(["18446744073709551616", "18446744073709551617", "99999999999999999999999999", "-1",
                     "0" * 12 + "1", "1" * 300, "+1", "1.0", "0x1", "١", "²", "1e3", ""]),
)
VERBS = st.sampled_from([
    "USER", "PASS", "APOP", "QUIT", "CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL",
    "user", "Pass", "list", "retr", "dele", "rset", "uidl", "top", "XTND", "AUTH", "STLS", "", "US ER", "\0",
])
SEPARATORS = st.sampled_from([" ", " ", " ", "  ", "\t", "\x0b", "\x1c", "\u00a0", "\0", "\r"])
ARGS = st.one_of(NUMBERS, st.sampled_from(["alice", "secret", "bob", "x"]), st.text(max_size=12))


@st.composite
def command_line(draw: st.DrawFn) -> bytes:
    """A plausible command: a verb, 0-3 arguments, odd separators, CRLF or bare LF."""
    parts = [draw(VERBS)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(SEPARATORS), draw(ARGS)]
    end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n"]))
    return "".join(parts).encode("utf-8", "surrogatepass") + end


LOGIN = st.sampled_from([b"USER alice\r\nPASS secret\r\n", b"USER alice\r\nPASS wrong\r\n", b"QUIT\r\n",
                         b"DELE 1\r\nDELE 3\r\n", b"RSET\r\n"])
EDGE_LINES = st.builds(
    lambda n, fill, end: fill * n + end,
    st.sampled_from([254, 255, 256, 257, 258, 16 * 1024 + 1]),
    st.sampled_from([b"a", b"\0", b"\r", b"\xff", b"LIST 1"[:1]]),
    st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
)
PIECES = st.one_of(
    command_line(),
    st.binary(max_size=300),
    st.sampled_from([b"\0", b"\r", b"\n", b"\r\n", b"\r\r\n", b"\n\r", b"\xff\xfe", b"\x1b[2J"]),
    EDGE_LINES,
    LOGIN,
)
STREAMS = st.lists(PIECES, max_size=25).map(b"".join)


# ---------------------------------------------------------------------------
# Properties


@given(data=st.binary(max_size=4096))
def test_random_octets_before_login(data: bytes) -> None:
    check(converse(data))


@given(data=STREAMS, patient=st.booleans())
def test_mixed_streams_before_login(data: bytes, patient: bool) -> None:
    """``patient``: no bad-command limit, so the fuzz reaches far into a stream."""
    check(converse(data, **({"max_bad_commands": 10**6, "max_auth_failures": 10**6} if patient else {})))


@given(data=STREAMS, patient=st.booleans())
def test_mixed_streams_logged_in(data: bytes, patient: bool) -> None:
    check(converse(data, login=True, **({"max_bad_commands": 10**6} if patient else {})))


@given(lines=st.lists(command_line(), min_size=1, max_size=40), quit=st.booleans())
def test_command_sequences_logged_in(lines: list[bytes], quit: bool) -> None:
    """Valid and invalid commands in TRANSACTION; with QUIT at the end the DELEs are applied."""
    data = b"".join(lines) + (b"QUIT\r\n" if quit else b"")
    out = converse(data, login=True, max_bad_commands=10**6)
    check(out)


@pytest.mark.parametrize("size", [254, 255, 256, 257])
@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_line_length_edges(size: int, end: bytes) -> None:
    """255 octets fit (RFC 2449: 255 with the CRLF, we allow the line end on top); 256 do not."""
    line = b"USER " + b"a" * (size - 5)
    out = converse(line + end + b"NOOP\r\n")
    check(out)
    assert [r.status for r in out.replies] == [
        TOO_LONG if size > MAX_COMMAND_OCTETS else b"+OK Send your password.",
        b"-ERR NOOP is not valid in the AUTHORIZATION state.",
    ]


@pytest.mark.parametrize("login", [False, True])
def test_two_mebibyte_line_is_discarded_in_bounded_memory(login: bool) -> None:
    data = b"NOOP " + os.urandom(1 << 20).hex().encode() + b"\r\nCAPA\r\n"  # a 2 MiB line, then CAPA
    peak: list[int] = []
    out = converse(data, login=login, peak=peak)
    check(out)
    assert [r.status for r in out.replies] == [TOO_LONG, b"+OK Capability list follows"]
    assert peak[0] < 256 * 1024, f"peak {peak[0]} octets while discarding a 2 MiB line"


def test_pipelined_flood_without_reading_stays_bounded() -> None:
    """100k commands sent without reading: the server blocks writing (as it must), its buffers
    stay under a cap, and once the client reads, every reply arrives in order."""
    cycle = [b"NOOP", b"STAT", b"LIST", b"UIDL 2", b"TOP 1 0", b"LIST 3", b"BOGUS"]
    count = 100_000
    commands = [cycle[i % len(cycle)] for i in range(count)]
    data = b"\r\n".join(commands) + b"\r\nQUIT\r\n"
    base = Path(tempfile.mkdtemp(prefix="tpops-flood-"))
    capture = Capture()
    logging.getLogger("tpops").addHandler(capture)
    try:
        site = Site(base)
        site.maildir("alice", MESSAGES)
        sessions: list[Session] = []
        c = site.start(prepare=sessions.append, command_timeout=60)
        c.login()
        session = sessions[0]
        progress = [0]

        def send() -> None:
            for start in range(0, len(data), 4096):
                c.sock.sendall(data[start:start + 4096])
                progress[0] = start + 4096

        tracemalloc.start()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        biggest = [0, 0]
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:  # until the sender has made no progress for 1 s
            biggest = [max(biggest[0], len(session.reader.buffer)), max(biggest[1], len(session.writer.buffer))]
            if progress[0] != last:
                last, still_since = progress[0], time.monotonic()
            time.sleep(0.005)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sender.is_alive() and progress[0] < len(data), "the flood went through without a reader"
        assert biggest[0] <= READ_BLOCK + MAX_COMMAND_OCTETS + 1, biggest
        assert biggest[1] <= 2 * WRITE_BUFFER, biggest
        assert peak < 4 << 20, f"tracemalloc peak {peak} octets with the client not reading"
        raw = c.file.read()  # now read: everything arrives
        sender.join(30)
        c.thread.join(10)
        assert not sender.is_alive() and not c.thread.is_alive()
        sent = [*commands, b"QUIT"]
        replies = parse(raw, sent)
        assert len(replies) == count + 1
        for cmd, reply in zip(sent, replies):
            want = {b"NOOP": b"+OK", b"STAT": b"+OK 3 ", b"LIST": b"+OK 3 messages", b"UIDL 2": b"+OK 2 ",
                    b"TOP 1 0": b"+OK Top of message follows", b"LIST 3": b"+OK 3 ",
                    b"BOGUS": b"-ERR Unknown command.", b"QUIT": b"+OK Bye, 0 messages deleted, 3 left."}[cmd]
            assert reply.status.startswith(want), (cmd, reply.status)
        assert not capture.records
        assert not site.held
        c.file.close()
        c.sock.close()
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        logging.getLogger("tpops").removeHandler(capture)
        shutil.rmtree(base, ignore_errors=True)
