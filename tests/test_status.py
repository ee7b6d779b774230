"""``tpops --status``: the pool and one line per live session, from the master's 0600 control socket."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.procs import wait_for
from tests.support.server import TPOPS, MailEnv, Server, make_message
from tests.support.users import as_user
from tpops.status import SessionBoard, format_status

MESSAGE = make_message("status", "x" * 1000 + "\n")


def status(env: MailEnv, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPOPS, "--status", "-f", str(env.conf), *extra], capture_output=True, text=True,
                          timeout=30, check=False)


def test_status_shows_a_live_session_and_forgets_it_after_quit(mail_env: MailEnv) -> None:
    mail_env.add_user("tommy", messages=[MESSAGE])
    srv = Server(mail_env).start()
    try:
        sock = mail_env.base / "control"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        c = RawClient(srv.port)
        assert c.login("tommy").startswith(b"+OK")
        status_line, body = c.multi("RETR 1")
        assert status_line.startswith(b"+OK") and len(body) > 1000
        # greeting + USER/PASS replies + the RETR status line and body with its terminator
        least = len(c.greeting) + len(status_line) + len(body) + 3

        def tommy_line() -> list[str] | None:
            r = status(mail_env)
            assert r.returncode == 0, r.stderr
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith("tommy "))
            fields = line.split()
            # a write is counted once it returned: the client may have read it a moment before
            return fields if int(fields[5]) >= least else None

        fields = wait_for(tommy_line)
        assert fields[1] == "127.0.0.1" and fields[2] == "TRANSACTION"
        r = status(mail_env)
        assert re.search(r"^workers: \d+ \(1 busy, \d+ idle\)", r.stdout, re.MULTILINE), r.stdout
        assert "sessions: 1" in r.stdout
        c.cmd("QUIT")
        assert c.closed()
        c.close()
        assert wait_for(lambda: "tommy" not in status(mail_env).stdout, timeout=10)
        r = status(mail_env)
        assert "sessions: 0" in r.stdout and "0 busy" in r.stdout
    finally:
        srv.stop()
    assert not (mail_env.base / "control").exists()  # removed at exit
    r = status(mail_env)
    assert r.returncode == 3 and "not running" in r.stderr


def test_status_counts_a_session_before_login(mail_env: MailEnv) -> None:
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        r = status(mail_env)
        assert re.search(r"^-\s+127\.0\.0\.1\s+AUTHORIZATION\s", r.stdout, re.MULTILINE), r.stdout
        c.close()
    finally:
        srv.stop()


@root_only("runs tpops --status as an unprivileged user")
def test_status_refuses_a_non_root_user_clearly(mail_env: MailEnv) -> None:
    srv = Server(mail_env).start()
    try:
        os.chmod(mail_env.conf, 0o644)
        r = subprocess.run(as_user(mail_env.base, 65534, 65534, [TPOPS, "--status", "-f", str(mail_env.conf)]),
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 1
        assert "permission denied on the control socket" in r.stderr and "run tpops --status as root" in r.stderr
        assert r.stdout == ""
    finally:
        srv.stop()


def test_a_second_tpops_does_not_steal_the_socket(mail_env: MailEnv) -> None:
    srv = Server(mail_env).start()
    try:
        other = Server(mail_env).start()
        try:
            assert "belongs to another running tpops" in other.output()
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(mail_env.base / "control"))
                doc = json.loads(s.makefile().read())
            assert doc["listening"] == f"127.0.0.1:{srv.port}"
        finally:
            other.stop()
        assert (mail_env.base / "control").exists()  # the second one did not remove the first one's
    finally:
        srv.stop()


def test_board_and_format_units() -> None:
    board = SessionBoard(4)
    try:
        board.begin(2, "192.0.2.7")
        board.set_state(2, 2, "ünïcode\nuser")
        board.add_octets(2, 10)
        board.add_octets(2, 5)
        (s,) = board.sessions()
        assert (s["slot"], s["state"], s["octets"], s["login"], s["peer"]) == (
            2, "TRANSACTION", 15, "ünïcode\nuser", "192.0.2.7")
        text = format_status({"pid": 1, "started": 0, "listening": "x", "workers": 3, "busy": 1, "idle": 2,
                              "spares": 2, "min_servers": 2, "max_servers": 8, "sessions": [s]})
        assert "ünïcode\\x0auser" in text and "\nuser" not in text  # a login cannot forge a line
        board.clear(2)
        assert board.sessions() == []
    finally:
        board.close()
