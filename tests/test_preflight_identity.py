"""The pre-flight worker checks what workers will do, as the workers' identity (issue 8 item 6).

A root master reads everything; a ``--user`` worker re-reads the passwd-file when it
changes and reads ``/etc/shadow`` at every Passwd login. Before, a root-only passwd-file
or the Passwd backend under ``--user`` started fine and then failed every login with
``[SYS/TEMP]``; now start-up stops with a message that says what to fix.
"""

from __future__ import annotations

import os
import subprocess

from tests.support.client import RawClient
from tests.support.marks import root_only
from tests.support.server import TPOPS, MailEnv, Server, free_port, make_message

pytestmark = root_only("--user workers")


def start_fg(env: MailEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """Start in the foreground and expect it to refuse (the test fails on a hang)."""
    return subprocess.run(
        [TPOPS, "--fg", "-f", str(env.conf), "--port", str(free_port()), "--bind", "127.0.0.1", *args],
        capture_output=True, text=True, timeout=30,
    )


def test_root_only_passwd_file_stops_start_up_under_user(mail_env: MailEnv) -> None:
    mail_env.add_user("rita", messages=[make_message()])
    os.chown(mail_env.passwd_file, 0, 0)
    os.chmod(mail_env.passwd_file, 0o600)
    mail_env.write_conf()
    started = start_fg(mail_env, "--user", "nobody")
    assert started.returncode != 0
    assert f"$auth_file {mail_env.passwd_file} cannot be read as uid 65534" in started.stderr
    assert "make it readable by that user or group" in started.stderr


def test_passwd_file_readable_by_user_starts_and_serves(mail_env: MailEnv) -> None:
    mail_env.add_user("rita", messages=[make_message()])
    os.chmod(mail_env.passwd_file, 0o644)
    srv = Server(mail_env, "--user", "nobody").start()
    try:
        c = RawClient(srv.port)
        assert c.login("rita").startswith(b"+OK Logged in, 1 messages")
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
    finally:
        srv.stop()


def test_passwd_backend_under_user_stops_start_up(mail_env: MailEnv) -> None:
    mail_env.write_conf(auth_type="'Passwd'")
    started = start_fg(mail_env, "--user", "nobody")
    assert started.returncode != 0
    assert "$auth_type 'Passwd' needs to read the shadow file /etc/shadow, which uid 65534" in started.stderr
    assert "use the File or MySQL authenticator" in started.stderr
