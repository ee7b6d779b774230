"""A real tpops for tests: a mail environment (passwd-file, Maildirs, tpops.conf) and the server on a free port.

:class:`MailEnv` builds the files a site needs; :class:`Server` runs ``tpops --fg`` on a
free loopback port against them; :func:`run_inetd` runs one ``tpops --inetd`` session on
pipes. When the suite runs as root (as CI does), Maildirs belong to ``nobody`` so
sessions are served as an unprivileged user, exactly as in production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.procs import stop_process

REPO = Path(__file__).resolve().parents[2]
TPOPS = str(Path(sys.executable).with_name("tpops"))
IS_ROOT = os.geteuid() == 0
#: The unprivileged owner of test Maildirs when the suite runs as root.
MAIL_UID = 65534
MAIL_GID = 65534

#: Arguments that keep workers alive across sessions: as root, ``--user nobody`` (the
#: virtual-mail set-up; without it a worker ends after each privilege-dropping login).
POOL_ARGS: tuple[str, ...] = ("--user", "nobody") if IS_ROOT else ()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Wait until a POP3 server greets on ``port`` (then QUIT and wait for its close).

    RuntimeError when ``proc`` exits first or no greeting comes within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    while s.recv(512):  # wait for the close: the probe's access-log line is written
                        pass
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no POP3 greeting on port {port} within {timeout:g} s")


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """``path``, the directories below it and their files to ``uid``/``gid``."""
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for n in files:
            os.chown(os.path.join(root, n), uid, gid)


def make_message(subject: str = "test", body: str = "Hello.\n", extra_headers: str = "") -> bytes:
    """A small RFC 5322 message with LF line ends, as a delivery agent stores it."""
    return (
        f"From: sender@example.org\nTo: user@example.org\nSubject: {subject}\n{extra_headers}\n{body}"
    ).encode()


class MailEnv:
    """A directory with a passwd-file, Maildirs, a lock dir, logs and a tpops.conf."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.passwd_file = base / "users"
        self.lock_dir = base / "locks"
        self.access_log = base / "access.log"
        self.error_log = base / "error.log"
        self.conf = base / "tpops.conf"
        self.passwd_file.write_text("")
        self.counter = 0
        self.settings: dict[str, str] = {
            "auth_type": "'File'",
            "auth_file": repr(str(self.passwd_file)),
            "passwd_lock_dir": repr(str(self.lock_dir)),
            "access_log": repr(str(self.access_log)),
            "error_log": repr(str(self.error_log)),
            "syslog_facility": "nil",
            "error_interval": "0",
            "max_auth_penalty": "0",  # every test client is 127.0.0.1; tests of the penalty set it
            "min_servers": "2",
            "max_servers": "8",
            "max_idle": "100",
            "hostname": "'test.example.org'",
            "control_socket": repr(str(base / "control")),  # each test's tpops its own --status socket
        }
        self.write_conf()

    def write_conf(self, **overrides: str) -> Path:
        self.settings.update(overrides)
        self.conf.write_text("".join(f"${k} = {v}\n" for k, v in self.settings.items()))
        return self.conf

    def maildir(self, user: str) -> Path:
        return self.base / "home" / user / "Maildir"

    def add_user(
        self,
        name: str,
        password: str = "secret",
        messages: list[bytes] | None = None,
        *,
        scheme: str = "{PLAIN}",
        uid: str = "",
        gid: str = "",
        extra: str = "",
    ) -> Path:
        """A passwd-file entry and a Maildir with ``messages`` in cur/, owned by the mail user."""
        maildir = self.maildir(name)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for data in messages or []:
            self.deliver(name, data, folder="cur")
        home = maildir.parent
        stored = password if scheme == "" else f"{scheme}{password}"
        with self.passwd_file.open("a") as f:
            f.write(f"{name}:{stored}:{uid}:{gid}::{home}::{extra}\n")
        self.chown(home)
        return maildir

    def deliver(self, name: str, data: bytes, folder: str = "new", unique: str | None = None) -> Path:
        self.counter += 1
        if unique is None:
            unique = f"{1700000000 + self.counter}.M{self.counter}P{os.getpid()}.test"
        path = self.maildir(name) / folder / (unique + (":2," if folder == "cur" else ""))
        path.write_bytes(data)
        if IS_ROOT:
            os.chown(path, MAIL_UID, MAIL_GID)
        return path

    def chown(self, path: Path, uid: int = MAIL_UID, gid: int = MAIL_GID) -> None:
        """``path`` and everything below it to ``uid``/``gid`` (the mail user's by default); only as root."""
        if IS_ROOT:
            chown_tree(path, uid, gid)

    def messages(self, name: str) -> list[Path]:
        md = self.maildir(name)
        return sorted(p for sub in ("cur", "new") for p in (md / sub).iterdir())


class Server:
    """A real ``tpops --fg`` on a free loopback port."""

    def __init__(self, env: MailEnv, *extra_args: str, port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.args = [TPOPS, "--fg", "-f", str(env.conf), "--port", str(self.port), "--bind", "127.0.0.1", *extra_args]
        self.stderr_path = env.base / f"stderr-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        try:
            wait_for_port(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"tpops: {exc}\n{self.output()}") from None
        return self

    def output(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 10 s); the exit status, None when never started."""
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=10.0)
        self.stderr.close()
        return self.proc.returncode


def run_inetd(env: MailEnv, data: bytes, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``tpops --inetd`` on plain pipes: feed ``data`` and collect everything it answers."""
    return subprocess.run(
        [TPOPS, "--inetd", "-f", str(env.conf), *extra],
        input=data,
        capture_output=True,
        timeout=timeout,
    )
