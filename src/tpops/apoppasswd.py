"""``tpops-apoppasswd``: set or delete a login's APOP secret in the text secrets file.

Usage: ``tpops-apoppasswd [-c CONFIG] [-f FILE] [-d] LOGIN``

The file is the Passwd backend's ``$apop_passwd_file`` in its text form, one
``login:secret`` per line (``#`` comments kept). Without ``-f`` the path comes from
``$apop_passwd_file`` in the configuration (``/etc/tpops/tpops.conf``). The secret is
read twice from the terminal, or as one line from standard input when that is not
a terminal (for scripts). The file is rewritten atomically (a temporary file
renamed over it) with mode 0600, so the server never reads half a file and the
secrets stay root's. A Berkeley DB file (the 2003 format) is not edited: convert it
with ``db5.3_dump -p FILE`` first.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from typing import TextIO

from tpops.auth.passwd import is_bdb
from tpops.config import DEFAULT_PATH, ConfigError, load_config
from tpops.passwdtool import write_atomically

FILE_MODE = 0o600


class Failure(Exception):
    """A user-facing error: the message is printed and the exit status is 1."""


def _config_path(config: str) -> str:
    """``$apop_passwd_file`` from the tpops configuration file."""
    try:
        path = load_config(config).apop_passwd_file
    except ConfigError as e:  # it names the file, the line and the problem
        raise Failure(str(e)) from e
    if not path:
        raise Failure(f"no -f FILE given and $apop_passwd_file is not set in {config}")
    return path


def check_login(login: str) -> None:
    """Refuse logins the file format cannot hold (``:``, line breaks, NUL, a leading ``#``)."""
    if not login or any(c in login for c in ":\r\n\0") or login.lstrip().startswith("#"):
        raise Failure(f"login {login!r} cannot be stored: no ':', line breaks or NUL, no leading '#'")


def read_secret(stdin: TextIO | None = None) -> str:
    """The new secret: typed twice on the terminal, or one line of a non-terminal stdin."""
    stream = stdin if stdin is not None else sys.stdin
    if stream.isatty():
        first = getpass.getpass("New APOP secret: ")
        if getpass.getpass("Again: ") != first:
            raise Failure("the two secrets differ; nothing changed")
        secret = first
    else:
        secret = stream.readline().rstrip("\r\n")
    if not secret:
        raise Failure("empty secret; nothing changed")
    if any(c in secret for c in "\r\n\0"):
        raise Failure("the secret may not contain line breaks or NUL")
    return secret


def updated_lines(lines: list[str], login: str, secret: str | None) -> tuple[list[str], bool]:
    """The file's lines with ``login`` set to ``secret`` (or removed when None), and whether it was there.

    Comments and other users' lines stay as they are; the entry keeps the place of
    the first line for ``login``; later duplicates (which the server ignores) go.
    """
    out: list[str] = []
    found = False
    for line in lines:
        body = line.rstrip("\r\n")
        is_entry = body.strip() and not body.lstrip().startswith("#")
        if is_entry and body.partition(":")[0] == login:
            if not found and secret is not None:
                out.append(f"{login}:{secret}\n")
            found = True
            continue
        out.append(line if line.endswith("\n") else line + "\n")
    if not found and secret is not None:
        out.append(f"{login}:{secret}\n")
    return out, found


def run(path: str, login: str, delete: bool, stdin: TextIO | None = None) -> str:
    """Do the change; the message to print on success."""
    check_login(login)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
        if delete:
            raise Failure(f"{path} does not exist") from None
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror or e}") from e
    if is_bdb(data[:16]):
        raise Failure(f"{path} is a Berkeley DB file; convert it to login:secret text first "
                      f"(db5.3_dump -p {path})")
    lines = data.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    secret = None if delete else read_secret(stdin)
    new_lines, found = updated_lines(lines, login, secret)
    if delete and not found:
        raise Failure(f"{login!r} has no APOP secret in {path}")
    try:
        write_atomically(path, [line.encode("utf-8", "surrogateescape") for line in new_lines],
                         mode=FILE_MODE, prefix=".tpops-apoppasswd-")
    except OSError as e:
        raise Failure(f"cannot write {path}: {e.strerror or e}") from e
    if delete:
        return f"deleted the APOP secret of {login!r} in {path}"
    return f"{'changed' if found else 'added'} the APOP secret of {login!r} in {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``tpops-apoppasswd``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="tpops-apoppasswd",
        description="Set (or delete) a login's APOP secret in tpops's text secrets file.",
    )
    parser.add_argument("-f", "--file", help="the secrets file (default: $apop_passwd_file of the config)")
    parser.add_argument("-c", "--config", default=DEFAULT_PATH,
                        help=f"tpops configuration file (default: {DEFAULT_PATH})")
    parser.add_argument("-d", "--delete", action="store_true", help="delete LOGIN's secret")
    parser.add_argument("login", metavar="LOGIN")
    args = parser.parse_args(argv)
    try:
        path = args.file or _config_path(args.config)
        print(run(path, args.login, args.delete))
    except Failure as e:
        print(f"tpops-apoppasswd: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("tpops-apoppasswd: interrupted; nothing changed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
