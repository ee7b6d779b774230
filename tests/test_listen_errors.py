"""Start-up errors about the listening address name the address and the likely fix."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.support.marks import root_only
from tests.support.server import MAIL_GID, MAIL_UID, TPOPS, MailEnv, free_port
from tests.support.users import as_user


def start(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)


@root_only("running tpops as an unprivileged user (setpriv)")
def test_a_privileged_port_as_an_ordinary_user(mail_env: MailEnv) -> None:
    tmp_path = mail_env.base / "site"  # reachable by nobody (pytest's tmp_path is 0700)
    tmp_path.mkdir()
    users = tmp_path / "users"
    users.write_text("")
    locks = tmp_path / "nobody"
    locks.mkdir()
    os.chown(locks, MAIL_UID, MAIL_GID)
    conf = tmp_path / "tpops.conf"
    conf.write_text(f"$auth_type = 'File'\n$auth_file = '{users}'\n$passwd_lock_dir = '{locks / 'locks'}'\n"
                    "$syslog_facility = nil\n")
    out = start(as_user(tmp_path, MAIL_UID, MAIL_GID, [TPOPS, "--fg", "-f", str(conf), "--port", "110",
                                                       "--bind", "127.0.0.1"]))
    assert (out.returncode, out.stderr) == (
        1, "tpops: cannot listen on 127.0.0.1:110: permission denied (run as root, or pick --port above 1023)\n")


def test_an_address_in_use(mail_env: MailEnv) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = start([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", str(port), "--bind", "127.0.0.1"])
    assert (out.returncode, out.stderr) == (
        1, f"tpops: cannot listen on 127.0.0.1:{port}: address already in use (another POP3 server running?)\n")


def test_an_address_that_is_not_ours(mail_env: MailEnv) -> None:
    port = free_port()
    out = start([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", str(port), "--bind", "192.0.2.1"])
    expected = (f"tpops: cannot listen on 192.0.2.1:{port}: address not available (not an address of this "
                "host: check --bind/$bind_address)\n")
    assert (out.returncode, out.stderr) == (1, expected)
