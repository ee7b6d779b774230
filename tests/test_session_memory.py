"""In-memory protocol tests: a real Session over ``socket.socketpair()``, no server process.

The session runs in a thread on one end of a socket pair (the Transport works on
plain fds), with :class:`FakeAuthenticator` (the whole Authenticator interface,
honestly: clear-text and APOP checks, a lock that is really exclusive) and a
temporary Maildir. Table-driven cases send client lines and compare the exact server
lines. What needs a real process (signals, privileges, pools, the access-log file)
stays in the wire tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tpops.auth.base import AuthUnavailable, MailboxInUse, MailboxLock, MailUser
from tpops.auth.credentials import BackendCaps, ScramCredentials
from tpops.config import Config
from tpops.connection import Connection
from tpops.mailbox.maildir import Maildir, MaildirRoot
from tpops.privileges import Refused
from tpops.protocol import LineTooLong, Transport
from tpops.reply import Accounting, Reply, State, bad, more, ok
from tpops.session import FailurePenalty, Session, SessionRecord

TIMESTAMP = "<4711.1.1700000000.cafe@test.example.org>"
#: (file name in cur/, content): bare-LF messages, so each wire size is len + number of LFs.
MESSAGES = [
    ("1000000001.M1P1.mx:2,", b"Subject: one\n\nfirst body\n"),
    ("1000000002.M2P2.mx:2,S", b"Subject: two\nX: y\n\nline 1\n.dot line\nline 3\n"),
    ("1000000003.M3P3.mx:2,", b"Subject: three\n\nthird\n"),
]
SIZES = [len(body) + body.count(b"\n") for _, body in MESSAGES]
UIDS = [name.partition(":")[0] for name, _ in MESSAGES]
TOTAL = sum(SIZES)
LOGGED_IN = f"+OK Logged in, 3 messages ({TOTAL} octets).".encode()
#: CAPA's SASL line for the fake backend (clear secrets) where plain text is allowed.
SASL_ALL = b"SASL SCRAM-SHA-256 PLAIN LOGIN"  # CRAM-MD5 is opt-in ($sasl_mechanisms)
CLOSED = object()  #: marks the end of the connection in an expected reply list
#: A conversation: (client line, the exact server lines it gets, CLOSED for EOF).
Steps = Sequence[tuple[str | bytes, Sequence[object]]]


# ---------------------------------------------------------------------------
# The fake backend


@dataclass
class FakeLock:
    """A held lock of :class:`FakeAuthenticator`; release is idempotent."""

    held: set[str]
    key: str

    def release(self) -> None:
        self.held.discard(self.key)

    def still_held(self) -> bool:
        return self.key in self.held


@dataclass
class FakeAuthenticator:
    """The Authenticator interface over a dict of ``login -> (secret, Maildir)``.

    ``authenticate`` compares in constant time; ``authenticate_apop`` checks a real
    MD5 digest of timestamp + secret; ``lock`` refuses a second holder of one Maildir
    with MailboxInUse (``held`` is shared by every session of a test). The login
    ``outage`` makes the backend fail as a database would.
    """

    users: dict[str, tuple[str, Path]]
    held: set[str]
    apop: bool = True
    name: str = "Fake"
    calls: list[str] = field(default_factory=list)

    @property
    def supports_apop(self) -> bool:
        return self.apop

    def _user(self, login: str) -> MailUser:
        return MailUser(login, str(self.users[login][1]))

    def authenticate(self, login: str, password: bytes) -> MailUser | None:
        self.calls.append(f"authenticate {login}")
        if login == "outage":
            raise AuthUnavailable("simulated backend outage")
        secret = self.users.get(login, ("\0 no such user", Path()))[0]
        return self._user(login) if hmac.compare_digest(password, secret.encode()) else None

    def authenticate_apop(self, login: str, timestamp: str, digest: str) -> MailUser | None:
        self.calls.append(f"apop {login}")
        secret = self.users.get(login, ("\0 no such user", Path()))[0]
        expected = hashlib.md5((timestamp + secret).encode()).hexdigest()
        return self._user(login) if login in self.users and hmac.compare_digest(digest, expected) else None

    @property
    def sasl_caps(self) -> BackendCaps:
        return BackendCaps(clear_secrets=True)

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None:
        self.calls.append(f"clear_secret {login}")
        if login == "outage":
            raise AuthUnavailable("simulated backend outage")
        return (self._user(login), self.users[login][0].encode()) if login in self.users else None

    def scram_credentials(self, login: str) -> tuple[MailUser, ScramCredentials] | None:
        return None

    def lock(self, user: MailUser) -> MailboxLock:
        if user.login == "lockless":
            raise AuthUnavailable("simulated lock table outage")
        key = os.path.realpath(user.maildir)
        if key in self.held:
            raise MailboxInUse(user.login)
        self.held.add(key)
        return FakeLock(self.held, key)

    def prepare(self) -> None:
        self.calls.append("prepare")

    def close(self) -> None:
        self.calls.append("close")

    def detach(self) -> None:
        self.calls.append("detach")


# ---------------------------------------------------------------------------
# The harness


class Client:
    """The client end of the pair: exact lines in, exact lines out."""

    def __init__(self, sock: socket.socket, thread: threading.Thread, records: list[SessionRecord]) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.thread = thread
        self.records = records
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        raw = self.file.readline()
        if not raw:
            raise ConnectionError("closed")
        assert raw.endswith(b"\r\n"), raw
        return raw[:-2]

    def cmd(self, text: str | bytes) -> bytes:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line()

    def login(self, user: str = "alice", password: str = "secret") -> None:
        assert self.cmd(f"USER {user}") == b"+OK Send your password."
        assert self.cmd(f"PASS {password}").startswith(b"+OK Logged in")

    def closed(self) -> bool:
        """EOF from the server; the client then ends its side too, as a real client closes."""
        if self.file.read(1) != b"":
            return False
        self.sock.shutdown(socket.SHUT_WR)
        return True

    def record(self) -> SessionRecord:
        """The session's record once it has ended."""
        self.thread.join(5)
        assert not self.thread.is_alive()
        return self.records[0]


@dataclass
class Site:
    """A temporary mail site: users, their Maildirs, the shared lock set, a session factory."""

    base: Path
    held: set[str] = field(default_factory=set)
    clients: list[Client] = field(default_factory=list)

    def maildir(self, name: str, messages: list[tuple[str, bytes]]) -> Path:
        root = self.base / name
        for sub in ("cur", "new", "tmp"):
            (root / sub).mkdir(parents=True)
        for file_name, body in messages:
            (root / "cur" / file_name).write_bytes(body)
        return root

    def start(
        self,
        *,
        apop: bool = True,
        serve_as: Callable[[MailUser], bool] | None = None,
        prepare: Callable[[Session], None] | None = None,
        progress: Callable[[], None] | None = None,
        penalty: FailurePenalty | None = None,
        connection: Connection | None = None,
        **overrides: Any,
    ) -> Client:
        """A Session in a thread; ``overrides`` replace Config defaults (error_interval=0 always)."""
        config = dataclasses.replace(
            Config(),  # the defaults of tpops.conf
            **{
                "error_interval": 0,
                "hostname": "test.example.org",
                "passwd_lock_dir": str(self.base / "locks"),
                "command_timeout": 10,
                **overrides,
            },
        )
        users = {
            "alice": ("secret", self.base / "alice"),
            "bob": ("pass with  spaces ", self.base / "bob"),
            "empty": ("secret", self.base / "nothing-here"),
            "lockless": ("secret", self.base / "alice"),
            "broken": ("secret", self.base / "broken"),
        }
        authenticator = FakeAuthenticator(users, self.held, apop=apop)
        server, client = socket.socketpair()
        session = Session(
            Transport(server.fileno(), server.fileno(), progress=progress), "memory", config, authenticator,
            serve_as=serve_as, timestamp=TIMESTAMP, penalty=penalty, connection=connection,
        )
        if prepare is not None:
            prepare(session)
        records: list[SessionRecord] = []

        def serve() -> None:
            try:
                records.append(session.run())
                session.finish()
            finally:
                server.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client.settimeout(10)
        c = Client(client, thread, records)
        self.clients.append(c)
        return c


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    s.maildir("alice", MESSAGES)
    s.maildir("bob", MESSAGES[:1])
    yield s
    for c in s.clients:
        c.file.close()
        c.sock.close()
        c.thread.join(5)
    assert not s.held, "a session leaked its mailbox lock"


def converse(c: Client, steps: Steps) -> None:
    """Send each client line and compare the exact server lines (CLOSED: EOF expected)."""
    for sent, expected in steps:
        c.send((sent.encode() if isinstance(sent, str) else sent) + b"\r\n")
        for want in expected:
            if want is CLOSED:
                assert c.closed(), f"after {sent!r}: connection still open"
            else:
                assert c.line() == want, f"after {sent!r}"


def err(text: str) -> list[object]:
    return [b"-ERR " + text.encode()]


def okl(text: str) -> list[object]:
    return [b"+OK " + text.encode() if text else b"+OK"]


def apop_digest(secret: str) -> str:
    return hashlib.md5((TIMESTAMP + secret).encode()).hexdigest()


# ---------------------------------------------------------------------------
# AUTHORIZATION

AUTHORIZATION_CASES: dict[str, Steps] = {
    "user missing": [("USER", err("Missing argument for USER."))],
    "user trailing space": [("USER ", err("Missing argument for USER."))],
    "user with spaces is data": [("USER a b", okl("Send your password.")), ("PASS secret", err("[AUTH] Authentication failed."))],
    "pass first": [("PASS secret", err("USER first."))],
    "pass missing": [("USER alice", okl("Send your password.")), ("PASS", err("Missing argument for PASS."))],
    "pass consumes user": [("USER alice", okl("Send your password.")), ("PASS x", err("[AUTH] Authentication failed.")),
                           ("PASS secret", err("USER first."))],
    "password is the rest of the line": [("USER bob", okl("Send your password.")),
                                         ("PASS pass with  spaces ", [b"+OK Logged in, 1 messages (%d octets)." % SIZES[0]])],
    "leading space is part of the password": [("USER alice", okl("Send your password.")),
                                              ("PASS  secret", err("[AUTH] Authentication failed."))],
    "unknown user": [("USER nobody", okl("Send your password.")), ("PASS secret", err("[AUTH] Authentication failed."))],
    "verb case-insensitive": [("uSeR alice", okl("Send your password.")), ("pass secret", [LOGGED_IN])],
    "apop missing": [("APOP", err("Missing argument for APOP."))],
    "apop one word": [("APOP alice", err("Missing argument for APOP."))],
    "apop trailing space": [("APOP alice ", err("Missing argument for APOP."))],
    "apop good": [(f"APOP alice {apop_digest('secret')}", [LOGGED_IN])],
    "apop wrong digest": [(f"APOP alice {apop_digest('wrong')}", err("[AUTH] Authentication failed."))],
    "apop unknown user": [(f"APOP nobody {apop_digest('secret')}", err("[AUTH] Authentication failed."))],
    "backend outage": [("USER outage", okl("Send your password.")),
                       ("PASS x", err("[SYS/TEMP] Temporary authentication failure, try again later."))],
    "backend outages count as failures": [
        ("USER outage", okl("Send your password.")), ("PASS a", err("[SYS/TEMP] Temporary authentication failure, try again later.")),
        ("USER nobody", okl("Send your password.")), ("PASS b", err("[AUTH] Authentication failed.")),
        ("USER outage", okl("Send your password.")),
        ("PASS c", err("[SYS/TEMP] Temporary authentication failure, try again later.") + [CLOSED]),
    ],
    "empty mailbox": [("USER empty", okl("Send your password.")), ("PASS secret", okl("Logged in, 0 messages (0 octets).")),
                      ("STAT", okl("0 0")), ("LIST", [b"+OK 0 messages (0 octets)", b"."]), ("RETR 1", err("There's no message 1."))],
    "capa": [("CAPA", [b"+OK Capability list follows", b"TOP", b"UIDL", b"USER", b"RESP-CODES",
                       b"AUTH-RESP-CODE", b"PIPELINING", SASL_ALL, b"."])],
    "capa takes no argument": [("CAPA x", err("Too many arguments for CAPA."))],
    "quit": [("QUIT", okl("Bye.") + [CLOSED])],
    "quit takes no argument": [("QUIT now", err("Too many arguments for QUIT."))],
    "unknown": [("FOO", err("Unknown command."))],
    "empty line": [("", err("Unknown command."))],
    "leading space": [(" USER alice", err("Unknown command."))],
    "tab after verb": [("STAT\t", err("Unknown command."))],
    "long s in AUTHORIZATION": [("\u017ftat", err("Unknown command.")), ("u\u017fer alice", err("Unknown command."))],
    "binary garbage": [(b"\xff\xfe\x00\x01", err("Unknown command."))],
    **{
        f"{line} in AUTHORIZATION": [(line, err(f"{line.split()[0].upper()} is not valid in the AUTHORIZATION state."))]
        for line in ("STAT", "LIST", "LIST 1", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 1", "UIDL", "stat x", "top")
    },
    "longest line fits": [("USER " + "a" * 250, okl("Send your password."))],
    "line too long": [("USER " + "a" * 251, err("Command line too long.")), ("CAPA x", err("Too many arguments for CAPA."))],
    "huge line, session continues": [("NOOP " + "x" * 100_000, err("Command line too long.")), ("USER alice", okl("Send your password."))],
    "three auth failures close": [
        ("USER alice", okl("Send your password.")), ("PASS a", err("[AUTH] Authentication failed.")),
        ("USER alice", okl("Send your password.")), ("PASS b", err("[AUTH] Authentication failed.")),
        ("USER alice", okl("Send your password.")), ("PASS c", err("[AUTH] Authentication failed.") + [CLOSED]),
    ],
    "bad commands close": [("BOGUS", err("Unknown command."))] * 9 + [("BOGUS", err("Too many bad commands.") + [CLOSED])],
    "auth failure is not a bad command": [("BOGUS", err("Unknown command."))] * 9
    + [("USER alice", okl("Send your password.")), ("PASS no", err("[AUTH] Authentication failed."))]
    + [("BOGUS", err("Unknown command."))] * 9,
    "wrong-state counts as bad": [("STAT", err("STAT is not valid in the AUTHORIZATION state."))] * 9
    + [("RETR 1", err("Too many bad commands.") + [CLOSED])],
    "argument errors count as bad": [("USER", err("Missing argument for USER."))] * 5 + [("PASS x", err("USER first."))] * 4
    + [("APOP x", err("Too many bad commands.") + [CLOSED])],
}


@pytest.mark.parametrize("steps", AUTHORIZATION_CASES.values(), ids=AUTHORIZATION_CASES.keys())
def test_authorization(site: Site, steps: Steps) -> None:
    c = site.start()
    assert c.greeting == f"+OK tpops ready. {TIMESTAMP}".encode()
    converse(c, steps)


def test_no_apop_timestamp_without_apop_support(site: Site) -> None:
    c = site.start(apop=False)
    assert c.greeting == b"+OK tpops ready."
    converse(c, [(f"APOP alice {apop_digest('secret')}", err("APOP is not available.")), ("APOP", err("Missing argument for APOP."))])


def test_max_bad_commands_and_auth_failures_come_from_config(site: Site) -> None:
    c = site.start(max_bad_commands=2, max_auth_failures=1)
    converse(c, [("X", err("Unknown command.")), ("USER alice", okl("Send your password.")),
                 ("PASS no", err("[AUTH] Authentication failed.") + [CLOSED])])
    record = c.record()
    assert (record.login, record.logged_in) == ("alice", False)
    c = site.start(max_bad_commands=2)
    converse(c, [("X", err("Unknown command.")), ("X", err("Too many bad commands.") + [CLOSED])])
    assert c.record().login is None


def test_backend_outage_pays_the_same_delay_as_a_wrong_password(site: Site) -> None:
    """Issue 8 item 12: an AuthUnavailable must not answer at once where an unknown user waits."""
    c = site.start(error_interval=1)
    took = {}
    for login in ("outage", "nobody", "alice"):
        assert c.cmd(f"USER {login}") == b"+OK Send your password."
        start = time.monotonic()
        took[login] = (c.cmd("PASS wrong"), time.monotonic() - start)
    assert took["outage"][0] == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."
    assert took["nobody"][0] == took["alice"][0] == b"-ERR [AUTH] Authentication failed."
    for login, (_, seconds) in took.items():
        assert 0.9 <= seconds < 3, (login, seconds)
    assert c.closed()  # the third failure of $max_auth_failures, the outage counted


# ---------------------------------------------------------------------------
# TRANSACTION (logged in as alice, 3 messages)

M1, M2, M3 = (b"Subject: one", b"", b"first body"), (b"Subject: two", b"X: y", b"", b"line 1", b"..dot line", b"line 3"), \
    (b"Subject: three", b"", b"third")
LIST_ALL = [f"+OK 3 messages ({TOTAL} octets)".encode(), *(f"{i} {s}".encode() for i, s in enumerate(SIZES, 1)), b"."]
UIDL_ALL = [b"+OK Unique-ID list follows", *(f"{i} {u}".encode() for i, u in enumerate(UIDS, 1)), b"."]

TRANSACTION_CASES: dict[str, Steps] = {
    "stat": [("STAT", okl(f"3 {TOTAL}"))],
    "stat takes no argument": [("STAT 1", err("Too many arguments for STAT."))],
    "noop takes no argument": [("NOOP x", err("Too many arguments for NOOP."))],
    "rset takes no argument": [("RSET 1", err("Too many arguments for RSET."))],
    "list": [("LIST", LIST_ALL)],
    "list one": [("LIST 2", okl(f"2 {SIZES[1]}"))],
    "list extra spaces": [("LIST   3", okl(f"3 {SIZES[2]}"))],
    "list leading zero": [("LIST 001", okl(f"1 {SIZES[0]}"))],
    "list too many": [("LIST 1 2", err("Too many arguments for LIST."))],
    "uidl": [("UIDL", UIDL_ALL)],
    "uidl one": [("UIDL 3", okl(f"3 {UIDS[2]}"))],
    "uidl too many": [("UIDL 1 1", err("Too many arguments for UIDL."))],
    "retr": [("RETR 1", okl(f"{SIZES[0]} octets") + list(M1) + [b"."])],
    "retr byte-stuffs": [("RETR 2", okl(f"{SIZES[1]} octets") + list(M2) + [b"."])],
    "retr missing": [("RETR", err("Missing argument for RETR."))],
    "retr too many": [("RETR 1 2", err("Too many arguments for RETR."))],
    "msn 0": [("RETR 0", err("There's no message 0."))],
    "msn -1": [("RETR -1", err("Invalid message number: -1"))],
    "msn +1": [("RETR +1", err("Invalid message number: +1"))],
    "msn 1x": [("RETR 1x", err("Invalid message number: 1x"))],
    "msn x": [("DELE x", err("Invalid message number: x"))],
    "msn past the end": [("RETR 4", err("There's no message 4."))],
    "msn 99999999999": [("RETR 99999999999", err("There's no message 99999999999."))],
    "msn 4294967297": [("LIST 4294967297", err("There's no message 4294967297."))],
    "msn 2**64+1": [("UIDL 18446744073709551617", err("There's no message 18446744073709551617."))],
    "msn non-ASCII digit": [("RETR \uff11", err("Invalid message number: \uff11"))],
    "msn control character": [("RETR 1\x01", err("Invalid message number: 1?"))],
    "msn clipped": [("RETR " + "x" * 60, err("Invalid message number: " + "x" * 40 + "..."))],
    "msn long zero": [("RETR " + "0" * 30, err("There's no message " + "0" * 30 + "."))],
    "msn clipped when too long": [("RETR " + "9" * 45, err("There's no message " + "9" * 40 + "...."))],
    "top header only": [("TOP 1 0", okl("Top of message follows") + [b"Subject: one", b"", b"."])],
    "top one line": [("TOP 2 1", okl("Top of message follows") + [b"Subject: two", b"X: y", b"", b"line 1", b"."])],
    "top stuffed line": [("TOP 2 2", okl("Top of message follows") + list(M2[:5]) + [b"."])],
    "top huge count": [("TOP 3 99999999999999999999", okl("Top of message follows") + list(M3) + [b"."])],
    # Issue 8 item 24: ASCII verbs, SP-separated arguments (RFC 1939), no Unicode rules.
    "top tab is no separator": [("TOP 1\t0", err("Missing argument for TOP."))],
    "nbsp is no separator": [("LIST 1\xa0", err("Invalid message number: 1?"))],
    "file separator is no space": [("UIDL \x1c", err("Invalid message number: ?"))],
    "em space is no separator": [("TOP 1\u2003" + "0", err("Missing argument for TOP."))],
    "long s is no s": [("\u017ftat", err("Unknown command."))],
    "st ligature is no st": [("\ufb06at", err("Unknown command."))],
    "dotless i is no i": [("l\u0131st", err("Unknown command.")), ("L\u0130ST", err("Unknown command."))],
    "kelvin sign is no k": [("\u212aTOP", err("Unknown command."))],
    "fullwidth verb": [("\uff33\uff34\uff21\uff34", err("Unknown command."))],
    "tab after verb": [("STAT\t", err("Unknown command.")), ("NOOP\t1", err("Unknown command."))],
    "runs of SP still separate": [("TOP  1  0 ", okl("Top of message follows") + [b"Subject: one", b"", b"."])],
    "top missing both": [("TOP", err("Missing argument for TOP."))],
    "top missing count": [("TOP 1", err("Missing argument for TOP."))],
    "top too many": [("TOP 1 2 3", err("Too many arguments for TOP."))],
    "top bad count": [("TOP 1 x", err("Invalid number of lines: x"))],
    "top negative count": [("TOP 1 -1", err("Invalid number of lines: -1"))],
    "top count checked before message": [("TOP 9 x", err("Invalid number of lines: x"))],
    "top both bad": [("TOP x y", err("Invalid number of lines: y"))],
    "top bad message": [("TOP x 1", err("Invalid message number: x"))],
    "top no message": [("TOP 9 1", err("There's no message 9."))],
    "top message 0": [("TOP 0 0", err("There's no message 0."))],
    "dele then deleted everywhere": [
        ("DELE 2", okl("Message 2 deleted.")),
        ("DELE 2", err("Message 2 is deleted.")),
        ("RETR 2", err("Message 2 is deleted.")),
        ("LIST 2", err("Message 2 is deleted.")),
        ("UIDL 2", err("Message 2 is deleted.")),
        ("TOP 2 0", err("Message 2 is deleted.")),
        ("TOP 2 x", err("Invalid number of lines: x")),
        ("STAT", okl(f"2 {SIZES[0] + SIZES[2]}")),
        ("LIST", [f"+OK 2 messages ({SIZES[0] + SIZES[2]} octets)".encode(), f"1 {SIZES[0]}".encode(),
                  f"3 {SIZES[2]}".encode(), b"."]),
        ("UIDL", [UIDL_ALL[0], UIDL_ALL[1], UIDL_ALL[3], b"."]),
        ("RSET", okl(f"3 messages ({TOTAL} octets)")),
        ("RETR 2", okl(f"{SIZES[1]} octets") + list(M2) + [b"."]),
    ],
    "dele leading zeros names the number": [("DELE 02", okl("Message 2 deleted.")), ("DELE 002", err("Message 2 is deleted."))],
    **{
        f"{line.split()[0]} in TRANSACTION": [(line, err(f"{line.split()[0]} is not valid in the TRANSACTION state."))]
        for line in ("USER alice", "PASS secret", f"APOP alice {apop_digest('secret')}", "USER")
    },
    "unknown": [("XTND", err("Unknown command."))],
    "quit takes no argument": [("QUIT 1", err("Too many arguments for QUIT."))],
    "line too long": [("LIST " + "1" * 251, err("Command line too long.")), ("NOOP", okl(""))],
    "bad commands close": [("RETR 0", err("There's no message 0."))] * 9 + [("LIST x", err("Too many bad commands.") + [CLOSED])],
    "success resets the bad count": [("RETR 0", err("There's no message 0."))] * 9 + [("NOOP", okl(""))]
    + [("TOP 1 x", err("Invalid number of lines: x"))] * 9 + [("NOOP", okl(""))],
}


@pytest.mark.parametrize("steps", TRANSACTION_CASES.values(), ids=TRANSACTION_CASES.keys())
def test_transaction(site: Site, steps: Steps) -> None:
    c = site.start()
    c.login()
    converse(c, steps)
    if steps[-1][1][-1] is not CLOSED:
        assert c.cmd("NOOP") == b"+OK"  # nothing left over from the steps


def test_capa_after_login_names_the_implementation(site: Site) -> None:
    from tpops import __version__

    c = site.start()
    c.login()
    converse(c, [("CAPA", [b"+OK Capability list follows", b"TOP", b"UIDL", b"USER", b"RESP-CODES",
                           b"AUTH-RESP-CODE", b"PIPELINING", f"IMPLEMENTATION tpops-{__version__}".encode(), b"."])])


# ---------------------------------------------------------------------------
# Pipelining, UPDATE, locks, the record


def test_pipelined_batch_answers_in_order(site: Site) -> None:
    c = site.start()
    c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 2\r\nBOGUS\r\nTOP 1 0\r\nUIDL 1\nNOOP\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    expected = [
        b"+OK Send your password.", LOGGED_IN, f"+OK 3 {TOTAL}".encode(), f"+OK 2 {SIZES[1]}".encode(),
        b"-ERR Unknown command.", b"+OK Top of message follows", b"Subject: one", b"", b".",
        f"+OK 1 {UIDS[0]}".encode(), b"+OK", b"+OK Message 1 deleted.", b"+OK Bye, 1 messages deleted, 2 left.",
    ]
    assert [c.line() for _ in expected] == expected
    assert c.closed()  # the NOOP after QUIT is never answered
    assert not (site.base / "alice" / "cur" / MESSAGES[0][0]).exists()


def test_quit_updates_and_records(site: Site) -> None:
    c = site.start()
    c.login()
    converse(c, [("DELE 1", okl("Message 1 deleted.")), ("DELE 3", okl("Message 3 deleted.")),
                 ("QUIT", okl("Bye, 2 messages deleted, 1 left.") + [CLOSED])])
    record = c.record()
    assert (record.peer, record.login, record.logged_in) == ("memory", "alice", True)
    assert (record.start_msgs, record.start_octets, record.end_msgs, record.end_octets) == (3, TOTAL, 1, SIZES[1])
    assert sorted(os.listdir(site.base / "alice" / "cur")) == [MESSAGES[1][0]]
    assert record.access_log_line().split()[5:] == ["alice", "3", str(TOTAL), "1", str(SIZES[1])]


def test_disconnect_without_quit_deletes_nothing_and_unlocks(site: Site) -> None:
    c = site.start()
    c.login()
    assert c.cmd("DELE 1") == b"+OK Message 1 deleted."
    c.sock.shutdown(socket.SHUT_WR)
    record = c.record()
    assert (record.end_msgs, record.end_octets) == (3, TOTAL)
    assert len(os.listdir(site.base / "alice" / "cur")) == 3
    assert not site.held


def test_in_use_until_the_holder_quits(site: Site) -> None:
    first, second = site.start(), site.start()
    first.login()
    converse(second, [("USER alice", okl("Send your password.")),
                      ("PASS secret", err("[IN-USE] Mailbox is locked by another POP3 session.")),
                      ("STAT", err("STAT is not valid in the AUTHORIZATION state."))])
    converse(first, [("QUIT", okl("Bye, 0 messages deleted, 3 left.") + [CLOSED])])
    first.record()  # the lock is released before the reply; the thread has ended now
    converse(second, [(f"APOP alice {apop_digest('secret')}", [LOGGED_IN])])


@pytest.fixture
def broken_maildir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maildir.open fails (as for an unreadable directory) for the user ``broken``."""
    opener = Maildir.open

    def failing_open(root: MaildirRoot | str, **kw: bool) -> Maildir:
        path = root if isinstance(root, str) else root.path
        if path.endswith("/broken"):
            raise PermissionError(13, "Permission denied", path)
        return opener(root, **kw)

    monkeypatch.setattr(Maildir, "open", failing_open)


def test_login_failures_after_the_credentials_keep_authorization(site: Site, broken_maildir: None) -> None:
    c = site.start()
    converse(c, [
        ("USER broken", okl("Send your password.")),
        ("PASS secret", err("[SYS/TEMP] Cannot open the mailbox, try again later.")),
        ("USER lockless", okl("Send your password.")),
        ("PASS secret", err("[SYS/TEMP] Cannot lock the mailbox, try again later.")),
        ("USER alice", okl("Send your password.")), ("PASS secret", [LOGGED_IN]),
    ])
    assert site.held  # alice's lock only: the failed attempts released theirs


def test_refused_by_serve_as(site: Site) -> None:
    def refuse(user: MailUser) -> bool:
        raise Refused(f"{user.login} maps to uid 0", final=user.login == "bob")

    c = site.start(serve_as=refuse)
    converse(c, [("USER alice", okl("Send your password.")),
                 ("PASS secret", err("[SYS/PERM] This mailbox cannot be served.")),
                 ("USER bob", okl("Send your password.")),
                 ("PASS pass with  spaces ", err("[SYS/PERM] This mailbox cannot be served.") + [CLOSED])])
    assert c.record().login == "bob"


def test_open_failure_after_a_privilege_drop_closes(site: Site, broken_maildir: None) -> None:
    switched: list[str] = []

    def serve_as(user: MailUser) -> bool:
        switched.append(user.login)
        return True

    c = site.start(serve_as=serve_as)
    converse(c, [("USER broken", okl("Send your password.")),
                 ("PASS secret", err("[SYS/TEMP] Cannot open the mailbox, try again later.") + [CLOSED])])
    record = c.record()
    assert (switched, record.logged_in, record.dropped_privileges) == (["broken"], False, True)


def test_login_runs_serve_as_before_opening(site: Site) -> None:
    order: list[str] = []
    cache = site.base / "alice" / "tpops-sizecache"  # written by Maildir.open

    def serve_as(user: MailUser) -> bool:
        order.append(f"serve_as {user.login} locked={bool(site.held)} opened={cache.exists()}")
        return False

    c = site.start(serve_as=serve_as)
    c.login()
    c.sock.shutdown(socket.SHUT_WR)
    record = c.record()
    assert order == ["serve_as alice locked=True opened=False"]
    assert cache.exists()
    assert (record.logged_in, record.dropped_privileges) == (True, False)


# ---------------------------------------------------------------------------
# The loop's contract for the next states: exchanges, state switches, upgrades


@dataclass
class Echo:
    """A two-step exchange (as SASL will be): takes raw lines up to 8 KiB, ``*`` cancels."""

    seen: list[bytes | LineTooLong]
    max_line: int = 8192

    def step(self, line: bytes | LineTooLong) -> Reply:
        self.seen.append(line)
        if line == b"*":
            return bad("AUTH cancelled.")
        if isinstance(line, LineTooLong):
            return bad("Response too long.")
        if len(self.seen) == 1:
            return more("next", self)
        return ok(f"Done, {sum(len(x) for x in self.seen if isinstance(x, bytes))} octets.", state=Done())


@dataclass
class Done:
    """A state a completed exchange switches to: only PING, and it owns nothing."""

    name: str = "DONE"
    log_name: str = "done"
    ended: list[str] = field(default_factory=list)

    def execute(self, verb: str, rest: str) -> Reply | None:
        return ok("pong") if verb == "PING" else None

    def accounting(self) -> Accounting:
        return Accounting("done", True)

    def end(self, reason: str) -> None:
        self.ended.append(reason)


@dataclass
class Starter:
    """A state whose commands start an exchange (XAUTH) or ask for a transport upgrade (XTLS)."""

    seen: list[bytes | LineTooLong]
    upgrades: list[Transport]
    name: str = "START"
    log_name: str = ""

    def execute(self, verb: str, rest: str) -> Reply | None:
        if verb == "XAUTH":
            return more("", Echo(self.seen))
        if verb == "XTLS":
            def upgrade(transport: Transport) -> Transport:
                self.upgrades.append(transport)
                return Transport(transport.rfd, transport.wfd)
            return ok("Begin.", upgrade=upgrade)
        return None

    def accounting(self) -> Accounting:
        return Accounting()

    def end(self, reason: str) -> None:
        pass


def test_exchange_takes_raw_long_lines_then_switches_state(site: Site) -> None:
    seen: list[bytes | LineTooLong] = []
    starter: State = Starter(seen, [])

    def install(session: Session) -> None:
        session.state = starter

    c = site.start(prepare=install)
    long_line = b"A" * 8000  # a command line of this size would be refused
    converse(c, [("XAUTH", [b"+ "]), (long_line, [b"+ next"]), (b"STAT x", [b"+OK Done, 8006 octets."]),
                 ("PING", okl("pong")), ("XAUTH", err("Unknown command."))])
    assert seen == [long_line, b"STAT x"]
    c.sock.shutdown(socket.SHUT_WR)
    record = c.record()
    assert (record.login, record.logged_in) == ("done", True)


def test_exchange_cancel_and_too_long(site: Site) -> None:
    seen: list[bytes | LineTooLong] = []

    def install(session: Session) -> None:
        session.state = Starter(seen, [])

    c = site.start(prepare=install)
    converse(c, [("XAUTH", [b"+ "]), ("*", err("AUTH cancelled.")), ("PING", err("Unknown command.")),
                 ("XAUTH", [b"+ "]), (b"B" * 9000, err("Response too long.")), ("XTLS", okl("Begin."))])
    assert seen[0] == b"*" and isinstance(seen[1], LineTooLong)


def test_upgrade_discards_pipelined_input(site: Site) -> None:
    upgrades: list[Transport] = []

    def install(session: Session) -> None:
        session.state = Starter([], upgrades)

    c = site.start(prepare=install)
    c.send(b"XTLS\r\nBOGUS injected before the upgrade\r\n")
    assert c.line() == b"+OK Begin."
    assert c.cmd("XAUTH") == b"+ "  # the injected line was dropped, not answered
    assert len(upgrades) == 1


def test_debug_trace_masks_every_exchange_line(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 8 item 15: each line an exchange (SASL AUTH) takes is a secret, whatever it holds."""
    caplog.set_level(logging.DEBUG, logger="tpops")

    def install(session: Session) -> None:
        session.state = Starter([], [])

    c = site.start(prepare=install, debug=True)
    converse(c, [("XAUTH", [b"+ "]), ("c2VjcmV0LW9uZQ==", [b"+ next"]), ("PASS\tsecret-two", [b"+OK Done, 31 octets."])])
    c.sock.shutdown(socket.SHUT_WR)
    c.record()
    trace = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C: ")]
    assert trace == ["C: XAUTH", "C: ****", "C: ****"]
    assert "secret" not in caplog.text and "c2VjcmV0" not in caplog.text


def test_limit_closes_are_logged_with_their_own_reason(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 8 item 25: a close forced by a limit was logged as "quit"."""
    caplog.set_level(logging.INFO, logger="tpops")
    c = site.start(max_bad_commands=1)
    converse(c, [("X", err("Too many bad commands.") + [CLOSED])])
    c.record()
    c = site.start(max_auth_failures=1)
    converse(c, [("USER alice", okl("Send your password.")), ("PASS no", err("[AUTH] Authentication failed.") + [CLOSED])])
    c.record()
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect from")]
    assert reasons == ["disconnect from memory (too many bad commands)", "disconnect from memory (too many failed logins)"]



# ---------------------------------------------------------------------------
# Hooks for the worker: the watchdog heartbeat and the shared failed-login penalty


@dataclass
class FakePenalty:
    """One address's view of a shared penalty table (as tpops.limits.ClientLimits): records every call."""

    seconds: float
    calls: list[str] = field(default_factory=list)

    def penalty(self) -> float:
        self.calls.append("penalty")
        return self.seconds

    def record_failure(self) -> None:
        self.calls.append("failure")

    def record_success(self) -> None:
        self.calls.append("success")


def test_penalty_lengthens_the_pause_after_each_failed_login(site: Site) -> None:
    penalty = FakePenalty(0.5)
    c = site.start(penalty=penalty, error_interval=1)
    assert c.cmd("USER alice") == b"+OK Send your password."
    start = time.monotonic()
    assert c.cmd("PASS wrong") == b"-ERR [AUTH] Authentication failed."
    assert 1.45 <= time.monotonic() - start < 3.5  # $error_interval + the address's penalty
    assert penalty.calls == ["penalty", "failure"]
    # A backend outage is a failed login too; bad commands are not.
    converse(c, [("BOGUS", err("Unknown command.")), ("USER outage", okl("Send your password.")),
                 ("PASS x", err("[SYS/TEMP] Temporary authentication failure, try again later."))])
    assert penalty.calls[2:] == ["penalty", "failure"]
    c.login()
    assert penalty.calls[4:] == ["success"]
    converse(c, [("NOOP", okl(""))])
    assert len(penalty.calls) == 5


def test_progress_after_each_command_even_without_io(site: Site) -> None:
    """A pipelined batch is one read and one write; the watchdog still hears of each command."""
    beats: list[float] = []
    c = site.start(progress=lambda: beats.append(time.monotonic()))
    c.login()
    before = len(beats)
    c.send(b"NOOP\r\n" * 50)
    for _ in range(50):
        assert c.line() == b"+OK"
    assert len(beats) - before >= 50


def test_progress_is_called_for_every_chunk_of_a_slow_write() -> None:
    server, client = socket.socketpair()
    with server, client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        beats: list[int] = []
        data = b"z" * (1 << 20)
        received: list[int] = []
        first_write_done = threading.Event()

        def read() -> None:
            # Reading only after the first write took its part: that write cannot have
            # taken all 1 MiB (nobody drained the socket meanwhile), so the send needs
            # more writes, whatever the scheduler does.
            first_write_done.wait(10)
            while sum(received) < len(data):
                chunk = client.recv(8192)
                if not chunk:
                    return
                received.append(len(chunk))

        def beat() -> None:
            beats.append(1)
            first_write_done.set()

        reader = threading.Thread(target=read)
        reader.start()
        Transport(server.fileno(), server.fileno(), progress=beat).send(data, 10.0)
        reader.join(10)
        assert sum(received) == len(data)
        assert len(beats) > 1  # one heartbeat per chunk the kernel took, not one per send


# ---------------------------------------------------------------------------
# SASL AUTH (RFC 5034) in the AUTHORIZATION state; over the wire in tests/test_sasl_wire.py


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_capa_sasl_line_follows_plaintext_policy(site: Site) -> None:
    """PLAIN and LOGIN only where a password may cross; SCRAM (and CRAM-MD5 when allowed) always."""
    remote = Connection("192.0.2.1")
    base = [b"+OK Capability list follows", b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
    converse(site.start(connection=remote), [("CAPA", [*base, SASL_ALL, b"."])])
    no_user = [line for line in base if line != b"USER"]  # USER only where a password may cross
    converse(site.start(connection=remote, disable_plaintext_auth=True),
             [("CAPA", [*no_user, b"SASL SCRAM-SHA-256", b"."]),
              ("AUTH", [b"+OK Supported mechanisms follow", b"SCRAM-SHA-256", b"."]),
              ("AUTH PLAIN " + _b64(b"\0alice\0secret"),
               err("[AUTH] Plaintext authentication disallowed on non-secure connections.")),
              ("AUTH LOGIN", err("[AUTH] Plaintext authentication disallowed on non-secure connections."))])
    converse(site.start(connection=remote, disable_plaintext_auth=True, sasl_mechanisms="cram-md5, PLAIN"),
             [("CAPA", [*no_user, b"SASL CRAM-MD5", b"."])])
    loopback = Connection("127.0.0.1")
    converse(site.start(connection=loopback, disable_plaintext_auth=True),
             [("CAPA", [*base, SASL_ALL, b"."]),
              ("AUTH PLAIN " + _b64(b"\0alice\0secret"), [LOGGED_IN])])


AUTH_CASES: dict[str, Steps] = {
    "bare auth lists": [("AUTH", [b"+OK Supported mechanisms follow", b"SCRAM-SHA-256", b"PLAIN", b"LOGIN", b"."])],
    "plain initial response": [("AUTH PLAIN " + _b64(b"\0alice\0secret"), [LOGGED_IN])],
    "plain lower-case mechanism": [("auth plain " + _b64(b"alice\0alice\0secret"), [LOGGED_IN])],
    "plain continuation": [("AUTH PLAIN", [b"+ "]), (_b64(b"\0alice\0secret"), [LOGGED_IN])],
    "plain wrong": [("AUTH PLAIN " + _b64(b"\0alice\0nope"), err("[AUTH] Authentication failed."))],
    "plain other authzid": [("AUTH PLAIN " + _b64(b"bob\0alice\0secret"), err("[AUTH] Authentication failed."))],
    "empty initial response": [("AUTH PLAIN =", err("[AUTH] Authentication failed."))],
    "login": [("AUTH LOGIN", [b"+ " + _b64(b"Username:").encode()]),
              (_b64(b"alice"), [b"+ " + _b64(b"Password:").encode()]), (_b64(b"secret"), [LOGGED_IN])],
    "cancel": [("AUTH LOGIN", [b"+ " + _b64(b"Username:").encode()]), ("*", err("Authentication cancelled.")),
               ("USER alice", okl("Send your password."))],
    "bad base64 continued": [("AUTH LOGIN", [b"+ " + _b64(b"Username:").encode()]),
                             ("!!!!", err("Invalid base64 data in continued response.")), ("NOOP", err(
                                 "NOOP is not valid in the AUTHORIZATION state."))],
    "bad base64 initial": [("AUTH PLAIN @@@@", err("Invalid base64 data in initial response."))],
    "unknown mechanism": [("AUTH GSSAPI", err("Unsupported authentication mechanism.")),
                          ("AUTH CRAM-MD5", err("Unsupported authentication mechanism.")),  # not in the default
                          ("AUTH SCRAM-SHA-256-PLUS", err("Unsupported authentication mechanism."))],
    "too many arguments": [("AUTH PLAIN a b", err("Too many arguments for AUTH."))],
    "three sasl failures close": [("AUTH PLAIN " + _b64(b"\0alice\0x"), err("[AUTH] Authentication failed."))] * 2
    + [("AUTH PLAIN " + _b64(b"\0alice\0x"), err("[AUTH] Authentication failed.") + [CLOSED])],
    "sasl and pass failures add up": [("AUTH PLAIN " + _b64(b"\0alice\0x"), err("[AUTH] Authentication failed.")),
                                      ("USER alice", okl("Send your password.")),
                                      ("PASS x", err("[AUTH] Authentication failed.")),
                                      ("AUTH LOGIN", [b"+ " + _b64(b"Username:").encode()]),
                                      (_b64(b"alice"), [b"+ " + _b64(b"Password:").encode()]),
                                      (_b64(b"x"), err("[AUTH] Authentication failed.") + [CLOSED])],
    "backend outage": [("AUTH PLAIN " + _b64(b"\0outage\0x"),
                        err("[SYS/TEMP] Temporary authentication failure, try again later."))],
    "auth in transaction": [("USER alice", okl("Send your password.")), ("PASS secret", [LOGGED_IN]),
                            ("AUTH PLAIN", err("AUTH is not valid in the TRANSACTION state."))],
}


@pytest.mark.parametrize("steps", AUTH_CASES.values(), ids=AUTH_CASES.keys())
def test_auth(site: Site, steps: Steps) -> None:
    converse(site.start(), steps)


def test_cram_md5(site: Site) -> None:
    import base64

    from tpops import config, sasl

    assert set(config.SASL_MECHANISMS) == set(sasl.MECHANISMS)  # $sasl_mechanisms names what exists

    for secret, want in (("secret", [LOGGED_IN]), ("wrong", err("[AUTH] Authentication failed."))):
        c = site.start(sasl_mechanisms="CRAM-MD5")
        reply = c.cmd("AUTH CRAM-MD5")
        assert reply.startswith(b"+ ")
        challenge = base64.b64decode(reply[2:])
        assert challenge.startswith(b"<") and challenge.endswith(b"@test.example.org>")
        digest = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()
        converse(c, [(_b64(f"alice {digest}".encode()), want)])


def test_debug_trace_masks_auth_lines(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """The initial response and every continuation line are secrets in the --debug trace."""
    caplog.set_level(logging.DEBUG, logger="tpops")
    c = site.start(debug=True)
    converse(c, [("AUTH PLAIN " + _b64(b"\0alice\0nope"), err("[AUTH] Authentication failed.")),
                 ("AUTH LOGIN", [b"+ " + _b64(b"Username:").encode()]),
                 (_b64(b"alice"), [b"+ " + _b64(b"Password:").encode()]), (_b64(b"secret"), [LOGGED_IN])])
    trace = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C: ")]
    assert trace == ["C: AUTH PLAIN ****", "C: AUTH LOGIN", "C: ****", "C: ****"]
    for secret in (_b64(b"\0alice\0nope"), _b64(b"secret"), _b64(b"alice"), "nope"):
        assert secret not in caplog.text
