"""The failed-login penalty per address, shared by every worker (issue 8 item 9).

Dovecot's auth penalty: each failed login from an address lengthens the pause before
the next failure's answer (0, 1, 2, 4, 8, then ``$max_auth_penalty`` seconds), for
every worker, whatever the connection; a successful login from the address forgives it.
Other addresses are not slowed down.
"""

from __future__ import annotations

import socket
import time

from tests.support.client import RawClient
from tests.support.server import MailEnv, Server, make_message


def failed_login(port: int, source: str = "127.0.0.1") -> float:
    """Seconds from a wrong PASS to its answer, on a fresh connection from ``source``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with sock, sock.makefile("rb") as f:
        assert f.readline().startswith(b"+OK")
        sock.sendall(b"USER pat\r\n")
        assert f.readline().startswith(b"+OK")
        started = time.monotonic()
        sock.sendall(b"PASS wrong\r\n")
        assert f.readline() == b"-ERR [AUTH] Authentication failed.\r\n"
        return time.monotonic() - started


def test_failures_from_one_address_slow_it_down_across_workers_until_a_success(mail_env: MailEnv) -> None:
    mail_env.add_user("pat", messages=[make_message()])
    mail_env.write_conf(max_auth_penalty="15", min_servers="4")
    srv = Server(mail_env).start()
    try:
        first = failed_login(srv.port)
        second = failed_login(srv.port)
        third = failed_login(srv.port)
        assert first < 0.8, first
        assert 0.9 <= second < 1.9, second
        assert 1.9 <= third < 3.5, third
        assert failed_login(srv.port, source="127.0.0.2") < 0.8  # another address: no penalty
        c = RawClient(srv.port)
        assert c.login("pat").startswith(b"+OK Logged in")  # forgives 127.0.0.1
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
        assert failed_login(srv.port) < 0.8
    finally:
        srv.stop()


def test_max_auth_penalty_zero_turns_it_off(mail_env: MailEnv) -> None:
    mail_env.add_user("pat", messages=[make_message()])
    srv = Server(mail_env).start()  # the test MailEnv sets $max_auth_penalty = 0
    try:
        assert all(failed_login(srv.port) < 0.8 for _ in range(4))
    finally:
        srv.stop()
