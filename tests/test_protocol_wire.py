"""RFC 1939 / 2449 behaviour of the real server over loopback: every command and error."""

from __future__ import annotations

import poplib
import re
import socket
import time

import pytest

from tests.support.client import RawClient, unstuff
from tests.support.server import MailEnv, Server, make_message

from tpops import __version__


@pytest.fixture
def alice(mail_env: MailEnv) -> MailEnv:
    mail_env.add_user(
        "alice",
        "secret",
        [make_message("one", "first\n"), make_message("two", "second\n.dotted\n"), make_message("three", "x" * 50 + "\n")],
    )
    return mail_env


def test_greeting_has_unique_apop_timestamp(alice: MailEnv, server: Server) -> None:
    stamps = set()
    for _ in range(3):
        c = RawClient(server.port)
        m = re.fullmatch(rb"\+OK .* (<[^<>@\s]+@test\.example\.org>)", c.greeting)
        assert m, c.greeting
        stamps.add(m.group(1))
        c.close()
    assert len(stamps) == 3


def test_poplib_full_session(alice: MailEnv, server: Server) -> None:
    p = poplib.POP3("127.0.0.1", server.port, timeout=10)
    p.user("alice")
    p.pass_("secret")
    count, octets = p.stat()
    assert count == 3
    resp, listing, _ = p.list()
    sizes = [int(line.split()[1]) for line in listing]
    assert sum(sizes) == octets
    for msn in range(1, 4):
        resp, lines, length = p.retr(msn)
        # poplib strips CRLF and un-stuffs; the wire size is the lines joined with CRLF + final CRLF
        assert sum(len(line) + 2 for line in lines) == sizes[msn - 1]
    resp, uidls, _ = p.uidl()
    assert [u.split()[0] for u in uidls] == [b"1", b"2", b"3"]
    assert p.quit().startswith(b"+OK")


def test_sizes_match_retr_bytes_exactly(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.login("alice").startswith(b"+OK")
    status, listing = c.multi("LIST")
    for line in listing.split(b"\r\n")[:-1]:
        msn, size = line.split()
        st, body = c.multi(f"RETR {int(msn)}")
        assert st == b"+OK " + size + b" octets"
        assert len(unstuff(body)) == int(size)
    c.cmd("QUIT")


def test_byte_stuffing_on_the_wire(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    c.login("alice")
    _, body = c.multi("RETR 2")
    assert b"\r\n..dotted\r\n" in body
    c.cmd("QUIT")


def test_capa_before_and_after_login(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    status, body = c.multi("CAPA")
    assert status.startswith(b"+OK")
    caps = body.decode().split("\r\n")[:-1]
    assert caps == ["TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                    "SASL SCRAM-SHA-256 PLAIN LOGIN"]  # alice is {PLAIN}: SCRAM can work
    c.login("alice")
    _, body = c.multi("CAPA")
    assert f"IMPLEMENTATION tpops-{__version__}" in body.decode().split("\r\n")
    assert not any(line.startswith("SASL") for line in body.decode().split("\r\n"))  # AUTH is over
    c.cmd("QUIT")


def test_verbs_are_case_insensitive(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.cmd("user alice").startswith(b"+OK")
    assert c.cmd("pAsS secret").startswith(b"+OK")
    assert c.cmd("stat") == b"+OK 3 " + str(_total(c)).encode()
    c.cmd("quit")


def _total(c: RawClient) -> int:
    _, listing = c.multi("LIST")
    return sum(int(line.split()[1]) for line in listing.split(b"\r\n")[:-1])


def test_password_with_spaces(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("spacey", "pass with  spaces ")
    c = RawClient(server.port)
    assert c.login("spacey", "pass with  spaces ").startswith(b"+OK")
    c.cmd("QUIT")


def test_wrong_state_and_unknown_commands(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.cmd("STAT") == b"-ERR STAT is not valid in the AUTHORIZATION state."
    assert c.cmd("RETR 1").startswith(b"-ERR RETR is not valid")
    assert c.cmd("PASS secret") == b"-ERR USER first."
    assert c.cmd("FOO") == b"-ERR Unknown command."
    assert c.cmd("USER") == b"-ERR Missing argument for USER."
    assert c.cmd("USER a b") == b"+OK Send your password."  # a login is data, spaces included
    assert c.cmd("PASS secret") == b"-ERR [AUTH] Authentication failed."
    assert c.cmd("APOP alice") == b"-ERR Missing argument for APOP."
    c.login("alice")
    assert c.cmd("USER alice") == b"-ERR USER is not valid in the TRANSACTION state."
    assert c.cmd("APOP alice 0123").startswith(b"-ERR APOP is not valid")
    c.cmd("QUIT")


@pytest.mark.parametrize(
    "command, reply",
    [
        ("RETR", b"-ERR Missing argument for RETR."),
        ("RETR 1 2", b"-ERR Too many arguments for RETR."),
        ("RETR x", b"-ERR Invalid message number: x"),
        ("RETR -1", b"-ERR Invalid message number: -1"),
        ("RETR +1", b"-ERR Invalid message number: +1"),
        ("RETR 0", b"-ERR There's no message 0."),
        ("RETR 4", b"-ERR There's no message 4."),
        ("LIST 4294967297", b"-ERR There's no message 4294967297."),
        ("LIST 99999999999999999999999", b"-ERR There's no message 99999999999999999999999."),
        ("TOP 1", b"-ERR Missing argument for TOP."),
        ("TOP 1 x", b"-ERR Invalid number of lines: x"),
        ("TOP 9 1", b"-ERR There's no message 9."),
        ("DELE 0", b"-ERR There's no message 0."),
        ("UIDL 5", b"-ERR There's no message 5."),
        ("STAT 1", b"-ERR Too many arguments for STAT."),
        ("NOOP x", b"-ERR Too many arguments for NOOP."),
    ],
)
def test_argument_errors(alice: MailEnv, server: Server, command: str, reply: bytes) -> None:
    c = RawClient(server.port)
    c.login("alice")
    assert c.cmd(command) == reply
    assert c.cmd("NOOP") == b"+OK"
    c.cmd("QUIT")


def test_dele_rset_and_deleted_message_errors(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    c.login("alice")
    sizes = [int(x.split()[1]) for x in c.multi("LIST")[1].split(b"\r\n")[:-1]]
    assert c.cmd("DELE 2") == b"+OK Message 2 deleted."
    assert c.cmd("DELE 2") == b"-ERR Message 2 is deleted."
    assert c.cmd("RETR 2") == b"-ERR Message 2 is deleted."
    assert c.cmd("LIST 2") == b"-ERR Message 2 is deleted."
    assert c.cmd("UIDL 2") == b"-ERR Message 2 is deleted."
    assert c.cmd("TOP 2 0") == b"-ERR Message 2 is deleted."
    assert c.cmd("STAT") == f"+OK 2 {sizes[0] + sizes[2]}".encode()
    _, listing = c.multi("LIST")
    assert [x.split()[0] for x in listing.split(b"\r\n")[:-1]] == [b"1", b"3"]
    assert c.cmd("RSET") == f"+OK 3 messages ({sum(sizes)} octets)".encode()
    assert c.cmd("DELE 1").startswith(b"+OK")
    c.close()  # no QUIT: nothing may be deleted
    time.sleep(0.3)
    assert len(alice.messages("alice")) == 3


def test_quit_deletes_marked_messages(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    c.login("alice")
    _, uidls = c.multi("UIDL")
    c.cmd("DELE 1")
    c.cmd("DELE 3")
    assert c.cmd("QUIT") == b"+OK Bye, 2 messages deleted, 1 left."
    assert c.closed()
    left = alice.messages("alice")
    assert len(left) == 1
    second_uid = uidls.split(b"\r\n")[1].split()[1].decode()
    assert left[0].name.startswith(second_uid)


def test_uidl_is_the_unique_name_and_stable(alice: MailEnv, server: Server) -> None:
    names = sorted(p.name.split(":")[0] for p in alice.messages("alice"))
    for _ in range(2):
        c = RawClient(server.port)
        c.login("alice")
        _, body = c.multi("UIDL")
        uids = [line.split()[1].decode() for line in body.split(b"\r\n")[:-1]]
        assert sorted(uids) == names
        assert c.cmd("UIDL 1") == f"+OK 1 {uids[0]}".encode()
        c.cmd("QUIT")


def test_top(mail_env: MailEnv, server: Server) -> None:
    mail_env.add_user("topper", messages=[b"Subject: t\nX: y\n\nl1\n.l2\nl3\n"])
    c = RawClient(server.port)
    c.login("topper")
    assert c.multi("TOP 1 0") == (b"+OK Top of message follows", b"Subject: t\r\nX: y\r\n\r\n")
    assert c.multi("TOP 1 2")[1] == b"Subject: t\r\nX: y\r\n\r\nl1\r\n..l2\r\n"
    assert c.multi("TOP 1 100")[1] == b"Subject: t\r\nX: y\r\n\r\nl1\r\n..l2\r\nl3\r\n"
    c.cmd("QUIT")


def test_noop_stat_list_single(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    c.login("alice")
    assert c.cmd("NOOP") == b"+OK"
    status, listing = c.multi("LIST")
    first = listing.split(b"\r\n")[0]
    assert c.cmd("LIST 1") == b"+OK " + first
    assert status == f"+OK 3 messages ({_total(c)} octets)".encode()
    c.cmd("QUIT")


def test_bad_password_then_success_and_auth_code(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.login("alice", "wrong") == b"-ERR [AUTH] Authentication failed."
    assert c.login("nosuchuser", "secret") == b"-ERR [AUTH] Authentication failed."
    assert c.login("alice", "secret").startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_max_auth_failures_closes(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    for _ in range(2):
        assert c.login("alice", "bad") == b"-ERR [AUTH] Authentication failed."
    assert c.login("alice", "bad") == b"-ERR [AUTH] Authentication failed."
    assert c.closed()


def test_error_interval_delays_failures_equally(mail_env: MailEnv) -> None:
    mail_env.add_user("delayed")
    mail_env.write_conf(error_interval="1")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        times = []
        for user in ("delayed", "ghost"):
            c.cmd(f"USER {user}")
            t0 = time.monotonic()
            assert c.cmd("PASS nope") == b"-ERR [AUTH] Authentication failed."
            times.append(time.monotonic() - t0)
        assert all(t >= 0.95 for t in times), times
        t0 = time.monotonic()
        assert c.cmd("STAT").startswith(b"-ERR")  # errors other than auth are answered at once
        assert time.monotonic() - t0 < 0.5
    finally:
        srv.stop()


def test_in_use(alice: MailEnv, server: Server) -> None:
    a = RawClient(server.port)
    assert a.login("alice").startswith(b"+OK")
    b = RawClient(server.port)
    assert b.login("alice") == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
    a.cmd("QUIT")
    assert b.login("alice").startswith(b"+OK")
    b.cmd("QUIT")


def test_long_line_rejected_then_session_continues(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    ok_line = "USER " + "a" * 250  # 255 octets plus CRLF: a 250-octet login fits
    assert c.cmd(ok_line).startswith(b"+OK")
    c.send(ok_line.encode() + b"\n")
    assert c.readline().startswith(b"+OK")
    assert c.cmd("USER " + "a" * 251) == b"-ERR Command line too long."
    assert c.cmd("NOOP " + "a" * 251) == b"-ERR Command line too long."
    c.send(b"NOOP" + b"x" * 100_000 + b"\r\n")
    assert c.readline() == b"-ERR Command line too long."
    assert c.login("alice").startswith(b"+OK")
    c.cmd("QUIT")


def pipelined_login(c: RawClient, *more: bytes, eol: bytes = b"\r\n") -> None:
    """USER alice, PASS secret, STAT and then ``more`` in one write, each line ended by ``eol``;
    checks the replies to the first three (the replies to ``more`` are the caller's to read)."""
    c.send(eol.join([b"USER alice", b"PASS secret", b"STAT", *more]) + eol)
    assert c.readline().startswith(b"+OK")
    assert c.readline().startswith(b"+OK Logged in")
    assert c.readline().startswith(b"+OK 3 ")


def test_bare_lf_accepted(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    pipelined_login(c, eol=b"\n")
    c.cmd("QUIT")


def test_pipelining_replies_in_order(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    pipelined_login(c, b"LIST", b"RETR 1", b"NOOP", b"UIDL 1", b"QUIT")
    assert c.readline().startswith(b"+OK 3 messages")
    assert c.read_body().count(b"\r\n") == 3
    assert c.readline().startswith(b"+OK ")
    assert b"first" in c.read_body()
    assert c.readline() == b"+OK"
    assert c.readline().startswith(b"+OK 1 ")
    assert c.readline().startswith(b"+OK Bye")


def test_too_many_bad_commands(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    for _ in range(9):
        assert c.cmd("BOGUS") == b"-ERR Unknown command."
    assert c.cmd("BOGUS") == b"-ERR Too many bad commands."
    assert c.closed()


def test_bad_command_counter_resets_on_success(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    for _ in range(3):
        for _ in range(9):
            assert c.cmd("BOGUS") == b"-ERR Unknown command."
        assert c.cmd("CAPA").startswith(b"+OK")
        c.read_body()
    c.cmd("QUIT")


def test_quit_in_authorization(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    assert c.cmd("QUIT") == b"+OK Bye."
    assert c.closed()


def test_no_traceback_for_binary_garbage(alice: MailEnv, server: Server) -> None:
    c = RawClient(server.port)
    for junk in (b"\x00\xff\xfe", b"USER \xff\xfe", b"\x1b[31m", b"PASS"):
        reply = c.cmd(junk)
        assert reply.startswith(b"-ERR") or reply.startswith(b"+OK")
        assert b"Traceback" not in reply and b"Error" not in reply
    c.cmd("QUIT")


def test_idle_timeout_closes_without_update(mail_env: MailEnv) -> None:
    mail_env.add_user("idler", messages=[make_message()])
    mail_env.write_conf(command_timeout="1")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        c.login("idler")
        c.cmd("DELE 1")
        c.sock.settimeout(5)
        assert c.readline() == b"-ERR Disconnected for inactivity."
        assert c.closed()
        assert len(mail_env.messages("idler")) == 1
    finally:
        srv.stop()


def test_connection_keep_time(mail_env: MailEnv) -> None:
    mail_env.add_user("keeper", messages=[make_message()])
    mail_env.write_conf(connection_keep_time="2")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        c.login("keeper")
        c.cmd("DELE 1")
        deadline = time.monotonic() + 6
        reply = b""
        while time.monotonic() < deadline:
            reply = c.cmd("NOOP")
            if reply != b"+OK":
                break
            time.sleep(0.2)
        assert reply == b"-ERR Connection time limit reached."
        assert len(mail_env.messages("keeper")) == 1
    finally:
        srv.stop()


def test_client_that_stops_reading_is_dropped(mail_env: MailEnv) -> None:
    big = b"Subject: big\n\n" + (b"y" * 1000 + b"\n") * 20000
    mail_env.add_user("stuck", messages=[big])
    mail_env.write_conf(command_timeout="1")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.login("stuck")
        c.send(b"RETR 1\r\n")
        time.sleep(3)  # never read: the server's send must give up after $command_timeout
        c2 = RawClient(srv.port)  # the mailbox lock must be free again
        assert c2.login("stuck").startswith(b"+OK")
        c2.cmd("QUIT")
        assert len(mail_env.messages("stuck")) == 1
    finally:
        srv.stop()


def test_access_log_line(alice: MailEnv, server: Server) -> None:
    before = len(alice.access_log.read_text().splitlines())  # the readiness probe's line
    c = RawClient(server.port)
    c.login("alice")
    total = _total(c)
    _, listing = c.multi("LIST")
    first = int(listing.split(b"\r\n")[0].split()[1])
    c.cmd("DELE 1")
    c.cmd("QUIT")
    c.closed()
    for password in ("bad", None):
        c2 = RawClient(server.port)
        if password:
            c2.login("alice", password)
        c2.cmd("QUIT")
        c2.closed()
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = alice.access_log.read_text().splitlines()[before:]
        if len(lines) >= 3:
            break
        time.sleep(0.05)
    stamp = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"127\.0\.0\.1 {stamp} {stamp} alice 3 {total} 2 {total - first}", lines[0]), lines
    assert re.fullmatch(rf"127\.0\.0\.1 {stamp} {stamp} \(alice\) 0 0 0 0", lines[1]), lines
    assert re.fullmatch(rf"127\.0\.0\.1 {stamp} {stamp} \(\) 0 0 0 0", lines[2]), lines
