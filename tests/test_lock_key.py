"""The mailbox lock follows the login, not a path the user controls (issue 8 item 4)."""

from __future__ import annotations

import os

from tests.support.client import RawClient
from tests.support.server import MailEnv, Server, make_message


def test_symlinked_maildir_cannot_take_anothers_lock(mail_env: MailEnv) -> None:
    """mallory makes his ~/Maildir a symlink to alice's and holds a session open: alice
    still logs in (before, both keyed one lock by the real path: -ERR [IN-USE] for alice)."""
    mail_env.add_user("alice", messages=[make_message("for alice")])
    mallory = mail_env.maildir("mallory")
    mallory.parent.mkdir(parents=True)
    os.symlink(mail_env.maildir("alice"), mallory)
    with mail_env.passwd_file.open("a") as f:
        f.write(f"mallory:{{PLAIN}}secret:::::{mallory.parent}::\n")
    mail_env.chown(mallory.parent)
    srv = Server(mail_env).start()
    try:
        attacker = RawClient(srv.port)
        attacker.login("mallory")  # served or refused: either way he holds no lock of alice's
        victim = RawClient(srv.port)
        reply = victim.login("alice")
        assert reply.startswith(b"+OK Logged in, 1 messages"), reply
        assert victim.cmd("QUIT").startswith(b"+OK")
        victim.close()
        attacker.close()
        # and alice's own lock still excludes a second alice session
        first = RawClient(srv.port)
        assert first.login("alice").startswith(b"+OK")
        second = RawClient(srv.port)
        assert second.login("alice") == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
        first.close()
        second.close()
    finally:
        srv.stop()
