"""What every part of the bench shares: repository paths, the run profiles and the log line."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
TPOPS = VENV / "bin" / "tpops"
IS_ROOT = os.geteuid() == 0
MIB = 1 << 20
TERMINATOR = b"\r\n.\r\n"
GRACE = 5.0  # seconds in-flight sessions may take to finish after a timed window
CONNECTION_LIMIT = 300.0  # no client connection of the bench lasts longer
#: Users of the login rows (and of the distinct-uid rows): at least this many, and at least one per
#: client of the highest login level, so that no two concurrent sessions share a mailbox (issue 12 item 1).
LOGIN_USERS = 160
#: First uid/gid of the distinct-uid users (``--only logins-uids``): not in /etc/passwd, at or above
#: tpops's $first_valid_uid default (500) and inside the bench Dovecot's first_valid_uid..last_valid_uid.
DISTINCT_UID_BASE = 20000


@dataclass(frozen=True)
class Profile:
    login_levels: tuple[int, ...]
    login_secs: float
    warmup_secs: float
    big_n: int
    big_size: int
    small_n: int
    small_size: int
    list_n: int
    huge_size: int
    reps: int
    list_reps: int


FULL = Profile((1, 8, 32, 128), 5.0, 1.0, 50, MIB, 2000, 4096, 20000, 200 * MIB, 3, 3)
QUICK = Profile((1, 8, 32, 128), 1.0, 0.3, 8, MIB, 200, 4096, 1000, 16 * MIB, 1, 1)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
