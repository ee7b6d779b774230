"""``$apop = false``: no timestamp in the greeting, APOP answered as unavailable, USER/PASS as before."""

from __future__ import annotations

import hashlib
import re
import subprocess

from tests.support.client import RawClient
from tests.support.server import MailEnv, Server, make_message
from tpops.passwdtool import make_hash

BODY = "apop switch body\n"


def test_default_offers_apop_and_false_stops_it(mail_env: MailEnv) -> None:
    mail_env.add_user("plain", "plainpw", [make_message("m")])  # {PLAIN}: APOP could work
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        stamp = re.search(rb"<[^>]+>", c.greeting)
        assert stamp is not None  # the default: APOP offered
        digest = hashlib.md5(stamp.group() + b"plainpw").hexdigest()
        assert c.cmd(f"APOP plain {digest}").startswith(b"+OK Logged in")
        c.cmd("QUIT")
        c.close()
    finally:
        srv.stop()
    mail_env.write_conf(apop="false")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        assert c.greeting == b"+OK tpops ready."
        assert c.cmd(f"APOP plain {digest}") == b"-ERR APOP is not available."
        assert c.login("plain", "plainpw").startswith(b"+OK Logged in, 1 messages")
        c.cmd("QUIT")
        c.close()
    finally:
        srv.stop()


def test_curl_logs_in_with_user_pass_for_a_hashed_password(mail_env: MailEnv) -> None:
    """curl picks a mechanism that needs the clear secret when one is offered (CRAM-MD5 in
    CAPA's SASL line, else APOP in the greeting): a hashed user then fails. With the default
    $sasl_mechanisms (no CRAM-MD5) curl uses AUTH PLAIN and succeeds, APOP offered or not
    (also tests/test_sasl_wire.py)."""
    mail_env.add_user("apopfan", "x")  # one {PLAIN} user makes the File backend offer APOP
    hashed = make_hash("h4shed", "SHA512-CRYPT")
    mail_env.add_user("hashed", hashed, [make_message("curl", BODY)], scheme="")
    url = "pop3://hashed:h4shed@127.0.0.1:{port}/1"
    mail_env.write_conf(sasl_mechanisms="'CRAM-MD5'")  # CAPA's SASL line: CRAM-MD5 only, which fails too
    srv = Server(mail_env).start()
    try:
        r = subprocess.run(["curl", "-sS", "--max-time", "20", url.format(port=srv.port)],
                           capture_output=True, check=False, timeout=30)
        assert r.returncode != 0  # CRAM-MD5 (or APOP) with a hashed password cannot work
    finally:
        srv.stop()
    mail_env.write_conf(apop="false", sasl_mechanisms="nil")
    srv = Server(mail_env).start()
    try:
        r = subprocess.run(["curl", "-sS", "--max-time", "20", url.format(port=srv.port)],
                           capture_output=True, check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        assert b"apop switch body\r\n" in r.stdout
    finally:
        srv.stop()
