"""The world both servers serve: a Dovecot-format passwd-file and every Maildir, in a temp dir."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from benchlib.common import DISTINCT_UID_BASE, IS_ROOT, LOGIN_USERS, Profile, log
from tests.support.server import chown_tree


def login_user_count(levels: tuple[int, ...]) -> int:
    """How many login users a profile needs: :data:`LOGIN_USERS`, or one per client of its highest level."""
    return max(LOGIN_USERS, *levels)


class World:
    """Temp dir with the passwd-file and every Maildir, owned by nobody when root (the
    distinct-uid users excepted: each owns its own tree)."""

    def __init__(self, base: Path, profile: Profile) -> None:
        self.base = base
        self.profile = profile
        self.passwd_file = base / "users"
        self.home_root = base / "home"
        self.home_root.mkdir()
        if IS_ROOT:
            self.uid, self.gid = 65534, 65534
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.lines: list[str] = []
        self.login_users: list[tuple[str, str]] = []
        rng = random.Random(1939)
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;-'"
        base_lines = ["".join(rng.choice(alphabet) for _ in range(76)) for _ in range(600)]
        pool = []
        for i in range(13618 * 2):
            t = base_lines[(i * 7) % len(base_lines)]
            if i % 97 == 0:
                t = "." + t[1:]  # some lines need byte-stuffing
            pool.append(t + "\n")
        self.pool = "".join(pool).encode()
        self.chunk = self.pool[: 77 * 13618]  # ~1 MiB, whole lines
        self.counter = 0
        #: Maildir sizes of the growth curve (``--large``): one user ``curve<n>`` each.
        self.curve_sizes: tuple[int, ...] = ()
        #: How many distinct-uid users to build (``--only logins-uids``, root only; 0: none).
        self.distinct_uid_count = 0
        #: The distinct-uid users: ``u000`` has uid and gid DISTINCT_UID_BASE, ``u001`` the next, ...
        self.uid_users: list[tuple[str, str]] = []
        #: login -> (uid, gid) of the users whose passwd-file line names their owner.
        self.owners: dict[str, tuple[int, int]] = {}

    # -- messages
    def message(self, size: int, tag: str) -> bytes:
        self.counter += 1
        header = (
            f"Return-Path: <sender@example.org>\nFrom: Bench Sender <sender@example.org>\n"
            f"To: <{tag}@example.org>\nSubject: bench message {self.counter} for {tag}\n"
            f"Message-ID: <{self.counter}.{tag}@bench.example.org>\n"
            f"Date: Mon, 03 Jun 2024 05:00:00 +0000\n\n"
        ).encode()
        need = max(size - len(header), 1)
        off = (self.counter * 977) % (len(self.pool) - need) if need < len(self.pool) else 0
        body = self.pool[off : off + need]
        return header + body[:-1] + b"\n"

    def add_user(self, name: str, password: str, owner: tuple[int, int] | None = None) -> Path:
        """A passwd-file line and an empty Maildir; ``owner`` = (uid, gid) written in the line's
        uid and gid fields and given the user's home tree (else both empty: the world's owner)."""
        home = self.home_root / name
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, mode=0o700)
        uid, gid = ("", "") if owner is None else owner
        if owner is not None:
            self.owners[name] = owner
        self.lines.append(f"{name}:{{PLAIN}}{password}:{uid}:{gid}:bench user:{home}::\n")
        return maildir

    def put(self, maildir: Path, data: bytes, index: int, style: str = "bare") -> None:
        unique = f"{1700000000 + index}.M{index}P4242Q{self.counter}.bench.example.org"
        if style in ("S", "W"):
            unique += f",S={len(data)}"
        if style == "W":
            unique += ",W=%d" % (len(data) + data.count(b"\n"))
        fd = os.open(maildir / "cur" / (unique + ":2,"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def finish(self) -> None:
        self.passwd_file.write_text("".join(self.lines))
        self.passwd_file.chmod(0o644)
        chown_tree(self.home_root, self.uid, self.gid)
        for name, (uid, gid) in self.owners.items():
            chown_tree(self.home_root / name, uid, gid)
        os.chown(self.home_root, 0 if IS_ROOT else self.uid, 0 if IS_ROOT else self.gid)

    def build(self) -> None:
        p = self.profile
        t0 = time.monotonic()
        for i in range(login_user_count(p.login_levels)):
            name = f"l{i:03d}"
            md = self.add_user(name, f"pw-{name}")
            for k in range(5):
                self.put(md, self.message(1500 + 300 * k, name), k)
            self.login_users.append((name, f"pw-{name}"))
        for i in range(self.distinct_uid_count):
            name = f"u{i:03d}"
            md = self.add_user(name, f"pw-{name}", owner=(DISTINCT_UID_BASE + i, DISTINCT_UID_BASE + i))
            for k in range(5):
                self.put(md, self.message(1500 + 300 * k, name), k)
            self.uid_users.append((name, f"pw-{name}"))
        md = self.add_user("big", "pw-big")
        for k in range(p.big_n):
            self.put(md, self.message(p.big_size, "big"), k)
        md = self.add_user("small", "pw-small")
        for k in range(p.small_n):
            self.put(md, self.message(p.small_size, "small"), k)
        rng = random.Random(3206)
        sizes = [rng.randint(800, 6000) for _ in range(p.list_n)]
        for style, user in (("bare", "lbare"), ("S", "lsize"), ("W", "lwsize")):
            md = self.add_user(user, f"pw-{user}")
            for k in range(p.list_n):
                self.put(md, self.message(sizes[k], user), k, style)
        md = self.add_user("huge", "pw-huge")
        self.put_huge(md, p.huge_size)
        for n in self.curve_sizes:
            md = self.add_user(f"curve{n}", f"pw-curve{n}")
            for k in range(n):
                self.put(md, self.message(sizes[k % len(sizes)] // 3, f"curve{n}"), k)
        self.finish()
        log(f"built Maildirs in {time.monotonic() - t0:.1f} s under {self.base}")

    def put_huge(self, maildir: Path, size: int) -> None:
        header = b"From: sender@example.org\nTo: huge@example.org\nSubject: huge\n\n"
        path = maildir / "cur" / "1700000000.M1P4242.huge.bench.example.org:2,"
        with open(path, "wb") as f:
            f.write(header)
            written = len(header)
            while written + len(self.chunk) <= size:
                f.write(self.chunk)
                written += len(self.chunk)
            rest = size - written
            if rest > 1:
                f.write(self.chunk[: rest - 1] + b"\n")

    def maildir(self, user: str) -> Path:
        return self.home_root / user / "Maildir"
