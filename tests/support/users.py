"""System users for tests: throwaway accounts for the Passwd tests, and commands run as another uid.

Accounts are made with ``useradd``/``chpasswd`` and removed with ``userdel -r``, so the
tests that use them need root (CI runs as root). Each caller passes its own name prefix,
so the accounts of one test module are told apart from another's. :func:`as_user` runs
a command as an unprivileged uid/gid (root only) with the Python interpreter reachable.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

from tests.support.server import chown_tree


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


def _unreachable_ancestor(path: str) -> tuple[str, str] | None:
    """(dir, child) when ``dir``, an ancestor of ``path``, cannot be searched by others."""
    parts = Path(os.path.realpath(path)).parts
    for i in range(1, len(parts)):
        directory = os.path.join(*parts[:i])
        if not os.stat(directory).st_mode & 0o001:
            return directory, parts[i]
    return None


#: Run a command as another (unprivileged) uid/gid in a private mount namespace where the
#: Python interpreter stays reachable: when it lives under a directory others cannot
#: search (a pyenv in /root), that directory is covered by a tmpfs holding only the
#: interpreter's tree. Nothing changes outside the namespace.
_AS_USER = r"""
set -e
uid=$1; gid=$2; real=$3; blocked=$4; child=$5; shift 5
if [ -n "$blocked" ]; then
  mount --rbind "$blocked" "$real"
  mount -t tmpfs -o mode=755,size=64k tpops-test-hide "$blocked"
  mkdir -p "$blocked/$child"
  mount --rbind "$real/$child" "$blocked/$child"
  umount -l "$real"
fi
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
"""


def as_user(base: Path, uid: int, gid: int, argv: list[str]) -> list[str]:
    """``argv`` run as ``uid``/``gid`` (needs root), with the interpreter reachable."""
    hide = _unreachable_ancestor(sys.base_prefix) or ("", "")
    real = base / "realhide"
    real.mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _AS_USER,
            "sh", str(uid), str(gid), str(real), hide[0], hide[1], *argv]
