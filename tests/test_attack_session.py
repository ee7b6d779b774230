"""Issue 8, the session side: a network client attacks the limits, the login and the trace.

Each test performs the attack as a client would, over a real socket to the real
server: pipelining and reading slowly, reading a big RETR at a trickle, keeping
AUTHORIZATION busy, telling users apart by a backend failure's timing, pipelining past
the bad-command limit. Limits are shrunk to seconds; timings get generous slack
because the machine is shared.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import wait_for
from tests.support.server import POOL_ARGS, MailEnv, Server, make_message

#: A client receive buffer this small makes the server's writes block after a few KiB.
TINY_RCVBUF = 4096


def slow_client(port: int) -> socket.socket:
    """A connected client socket with a tiny receive buffer (set before connect: it sizes the window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One CRLF line, read octet by octet (nothing beyond it is consumed)."""
    line = b""
    while not line.endswith(b"\r\n"):
        octet = sock.recv(1)
        if not octet:
            raise ConnectionError(f"closed after {line!r}")
        line += octet
    return line[:-2]


def trickle(sock: socket.socket, rate: int, until: Callable[[], bool], give_up: float = 30) -> tuple[int, float]:
    """Read at about ``rate`` octets per second until ``until()`` holds (checked between reads).

    Returns (octets read, seconds it took). Measured on the server's side, through its
    log: what the kernel has already buffered may take the client much longer to read.
    """
    start = time.monotonic()
    total = 0
    step = max(rate // 20, 1)
    while time.monotonic() - start < give_up:
        if until():
            return total, time.monotonic() - start
        data = sock.recv(step)
        total += len(data)
        time.sleep(max(len(data), step) / rate)
    raise AssertionError(f"the server still serves after {give_up} s ({total} octets read)")


def eof(c: RawClient, timeout: float = 3.0) -> bool:
    """True when the server ends the connection within ``timeout`` (a reset counts as failure)."""
    c.sock.settimeout(timeout)
    try:
        return c.file.read(1) == b""
    except TimeoutError:
        return False


def limits(env: MailEnv, **settings: str) -> Server:
    env.write_conf(**settings)
    return Server(env, "--debug").start()


def test_pipelining_slow_reader_is_cut_at_connection_keep_time(mail_env: MailEnv) -> None:
    """Item 7: pipelined RETRs read slowly never let a read block; the deadline still holds."""
    mail_env.add_user("alice", messages=[make_message("100 KB", ("z" * 99 + "\n") * 1000)])
    srv = limits(mail_env, connection_keep_time="4", command_timeout="30")
    try:
        sock = slow_client(srv.port)
        start = time.monotonic()
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS secret\r\n" + b"RETR 1\r\n" * 2000)
        octets, _ = trickle(sock, 200_000, lambda: "disconnect from 127.0.0.1 (connection time limit)" in srv.output())
        assert octets < 2_000_000, "far from the 200 MB of replies pipelined"
        elapsed = time.monotonic() - start
        sock.close()
        assert 3.5 <= elapsed < 4 + 3, elapsed
        # Writes block the loop: the server parsed only what it could answer, not the whole pipeline.
        parsed = srv.output().count("C: RETR 1")
        assert parsed < 200, parsed
    finally:
        srv.stop()


def test_slow_retr_of_a_big_message_is_cut_and_deletes_nothing(mail_env: MailEnv) -> None:
    """Item 21: one RETR of a 16 MB message read at 256 KB/s ends at the limit; DELE/QUIT never run."""
    body = ("x" * 1023 + "\n") * (16 * 1024)
    mail_env.add_user("alice", messages=[make_message("huge", body)])
    srv = limits(mail_env, connection_keep_time="3", command_timeout="30")
    try:
        sock = slow_client(srv.port)
        start = time.monotonic()
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS secret\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
        assert read_line(sock) == b"+OK Send your password."
        assert read_line(sock).startswith(b"+OK Logged in, 1 messages")
        assert read_line(sock).startswith(b"+OK ")
        octets, _ = trickle(
            sock, 256 * 1024, lambda: "alice disconnected without QUIT (connection time limit): nothing deleted" in srv.output())
        elapsed = time.monotonic() - start
        sock.close()
        assert 2.5 <= elapsed < 3 + 3, elapsed
        assert octets < len(body) // 2, octets
    finally:
        srv.stop()
    assert len(mail_env.messages("alice")) == 1


def test_login_timeout_bounds_a_busy_authorization(mail_env: MailEnv) -> None:
    """Item 7: CAPA every 0.5 s never idles, yet AUTHORIZATION ends after $login_timeout."""
    mail_env.add_user("alice", messages=[make_message()])
    srv = limits(mail_env, login_timeout="2", command_timeout="30")
    try:
        c = RawClient(srv.port)
        start = time.monotonic()
        replies = []
        try:
            while time.monotonic() - start < 10:
                c.send(b"CAPA\r\n")
                status = c.readline()
                replies.append(status)
                if status.startswith(b"-ERR"):
                    break
                c.read_body()
                time.sleep(0.5)
        except ConnectionError:
            pass
        elapsed = time.monotonic() - start
        assert replies[-1] == b"-ERR Login time limit reached.", replies
        assert eof(c)
        assert 1.5 <= elapsed < 4, elapsed
        c.close()
        # A logged-in session is not bound by it: it outlives $login_timeout.
        c = RawClient(srv.port)
        assert c.login("alice").startswith(b"+OK Logged in")
        time.sleep(2.5)
        assert c.cmd("NOOP") == b"+OK"
        assert c.cmd("QUIT").startswith(b"+OK Bye")
        c.close()
        wait_for(lambda: "disconnect from 127.0.0.1 (login time limit)" in srv.output(), what="the disconnect log line")
        assert "no login within 2 seconds from 127.0.0.1, disconnecting" in mail_env.error_log.read_text()
    finally:
        srv.stop()


@root_only("workers re-read the passwd-file as --user nobody")
def test_backend_failure_looks_like_a_wrong_password(mail_env: MailEnv) -> None:
    """Item 12: the passwd-file becomes unreadable to the workers (a root-only 0600 copy
    replaces it): the [SYS/TEMP] answer waits $error_interval and counts towards
    $max_auth_failures exactly as a wrong password would, so timing tells nothing."""
    mail_env.add_user("alice", messages=[make_message()])
    mail_env.write_conf(error_interval="1", max_auth_failures="2")
    srv = Server(mail_env, *POOL_ARGS).start()
    try:
        c = RawClient(srv.port)
        assert c.cmd("USER nobody-here").startswith(b"+OK")
        start = time.monotonic()
        assert c.cmd("PASS guess") == b"-ERR [AUTH] Authentication failed."
        unknown = time.monotonic() - start
        # The file changes to one only root can read: the worker (nobody) fails to re-read it.
        replacement = mail_env.passwd_file.with_name("users.new")
        replacement.write_bytes(mail_env.passwd_file.read_bytes())
        replacement.chmod(0o600)
        os.replace(replacement, mail_env.passwd_file)
        assert c.cmd("USER alice").startswith(b"+OK")
        start = time.monotonic()
        assert c.cmd("PASS secret") == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."
        failing = time.monotonic() - start
        assert eof(c), "the backend failure did not count towards $max_auth_failures"
        c.close()
        assert 0.9 <= unknown < 3 and 0.9 <= failing < 3, (unknown, failing)
        assert "authentication backend File failed for alice from 127.0.0.1" in mail_env.error_log.read_text()
    finally:
        srv.stop()


#: (line sent, what the --debug trace must show for it); every "S3cr..." is a secret.
MASKED_LINES = [
    (b"PASS\tS3cret-tab", "C: PASS ****"),
    (b"pass\x0bS3cret-vtab", "C: PASS ****"),
    (b"PaSs\xc2\xa0S3cret-nbsp", "C: PASS ****"),
    (b" PASS S3cret-leading-space", "C: PASS ****"),
    (b"PASSS3cret-glued", "C: PASS ****"),
    (b"PASS\x00S3cret-nul", "C: PASS ****"),
    (b"APOP\talice S3cret-apop", "C: APOP ****"),
    (b"auth\tPLAIN S3cret-auth", "C: AUTH ****"),
    (b"AUTH PLAIN S3cret-initial-response", "C: AUTH PLAIN ****"),
    (b"APOP alice S3cret-digest", "C: APOP alice ****"),
    (b"PASS S3cret-plain", "C: PASS ****"),
]


def test_debug_trace_masks_secrets_after_any_whitespace(mail_env: MailEnv) -> None:
    """Item 15: PASS<TAB>secret was logged in clear; whatever follows the verb, it is masked."""
    mail_env.add_user("alice", messages=[make_message()])
    mail_env.write_conf(max_bad_commands="50", max_auth_failures="50")
    srv = Server(mail_env, "--debug").start()
    try:
        c = RawClient(srv.port)
        for line, _ in MASKED_LINES:
            assert c.cmd("USER alice").startswith(b"+OK")
            assert c.cmd(line).startswith(b"-ERR"), line
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
        wait_for(lambda: "disconnect from 127.0.0.1 (quit)" in srv.output(), what="the end of the session")
    finally:
        srv.stop()
    trace = srv.output()
    for line, shown in MASKED_LINES:
        assert shown in trace, (line, shown)
    assert "s3cr" not in trace.lower()  # the old trace upper-cased a malformed line: S3CRET-TAB
    assert "s3cr" not in mail_env.error_log.read_text().lower()


def test_pipelined_flood_past_the_bad_command_limit_reads_every_reply_then_eof(mail_env: MailEnv) -> None:
    """Item 25: the server closed with unread pipelined input, so the kernel reset the
    connection and clients lost the last replies (ECONNRESET). It must shut down its
    side and drain: every reply up to "Too many bad commands.", then a clean EOF."""
    srv = Server(mail_env).start()
    flood = b"BOGUS\r\n" * 50 + b"NOOP\r\n" * 6000  # ~36 KB: more than the server reads at once
    expected = [b"-ERR Unknown command."] * 9 + [b"-ERR Too many bad commands."]
    try:
        for attempt in range(20):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(flood)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                raise AssertionError(f"attempt {attempt}: reset after {received!r}") from None
            finally:
                sock.close()
            lines = received.split(b"\r\n")
            assert lines[0].startswith(b"+OK tpops ready.")
            assert lines[1:] == [*expected, b""], (attempt, received)
        wait_for(lambda: srv.output().count("disconnect from 127.0.0.1 (too many bad commands)") == 20,
                 what="20 disconnect lines with their own reason")
    finally:
        srv.stop()
