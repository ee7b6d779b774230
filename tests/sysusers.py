"""Throwaway system accounts for the Passwd tests (test_auth_passwd.py, test_auth_wire.py).

Accounts are made with ``useradd``/``chpasswd`` and removed with ``userdel -r``, so the
tests that use them need root (CI runs as root). Each caller passes its own name prefix,
so the accounts of one test module are told apart from another's.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from pathlib import Path

from tests.conftest import chown_tree


def run(*args: str, input: str | None = None) -> str:
    """Run a command; its stdout, or RuntimeError with its stderr when it fails."""
    result = subprocess.run(args, input=input, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr}")
    return result.stdout


def shadow_hash(name: str) -> str:
    """The password field of ``name``'s /etc/shadow entry."""
    for entry in Path("/etc/shadow").read_text().splitlines():
        fields = entry.split(":")
        if fields[0] == name:
            return fields[1]
    raise KeyError(name)


class Accounts:
    """Throwaway system accounts ``<prefix><random><role>``, each with its own password.

    ``add(..., messages=[...])`` also gives the account a ~/Maildir holding ``messages``
    in new/, owned by the account.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix + secrets.token_hex(3)
        self.made: list[str] = []
        self.passwords: dict[str, str] = {}

    def name(self, role: str) -> str:
        return self.prefix + role

    def add(self, role: str, *chpasswd_args: str, messages: list[bytes] | None = None, badname: bool = False) -> str:
        name = self.name(role)
        run("useradd", "-m", "-s", "/usr/sbin/nologin", *(["--badname"] if badname else []), name)
        self.made.append(name)
        password = "pw-" + secrets.token_urlsafe(12)
        run("chpasswd", *chpasswd_args, input=f"{name}:{password}\n")
        self.passwords[name] = password
        if messages is not None:
            self._make_maildir(name, messages)
        return name

    def _make_maildir(self, name: str, messages: list[bytes]) -> None:
        entry = pwd.getpwnam(name)
        maildir = self.maildir(name)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(messages):
            (maildir / "new" / f"{1700000000 + i}.M{i}P{os.getpid()}.wire").write_bytes(data)
        chown_tree(maildir, entry.pw_uid, entry.pw_gid)

    def maildir(self, name: str) -> Path:
        return Path(pwd.getpwnam(name).pw_dir) / "Maildir"

    def ids(self, name: str) -> tuple[int, int]:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def remove_all(self) -> None:
        for name in self.made:
            subprocess.run(["userdel", "-r", name], capture_output=True)
