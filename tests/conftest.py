"""Shared fixtures: a real tpops on a free loopback port, Maildirs, users and raw clients.

Tests talk to the real server over the wire. When the suite runs as root (as CI
does), Maildirs belong to ``nobody`` so sessions are served as an unprivileged user,
exactly as in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPOPS = str(Path(sys.executable).with_name("tpops"))
IS_ROOT = os.geteuid() == 0
#: CI runs as root: there a root-only test must run, never skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def root_only(why: str) -> pytest.MarkDecorator:
    """Mark a test that needs root (system users, identity changes, a private /dev/log).

    As an ordinary user outside CI it is skipped with ``why``; in CI (CI=true), which
    runs as root, it can never be skipped: without root it fails (pytest_runtest_setup).
    """
    return pytest.mark.root_only(why)


def pytest_runtest_setup(item: pytest.Item) -> None:
    mark = item.get_closest_marker("root_only")
    if mark is None or IS_ROOT:
        return
    why = mark.args[0] if mark.args else "root"
    if IN_CI:
        pytest.fail(f"needs root ({why}) and CI must run as root", pytrace=False)
    pytest.skip(f"needs root: {why} (CI runs as root)")
#: The unprivileged owner of test Maildirs when the suite runs as root.
MAIL_UID = 65534
MAIL_GID = 65534


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tpops exited with status {proc.returncode}")
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
    raise RuntimeError(f"tpops did not answer on port {port}")


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """``path``, the directories below it and their files to ``uid``/``gid``."""
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for n in files:
            os.chown(os.path.join(root, n), uid, gid)


def make_message(subject: str = "test", body: str = "Hello.\n", extra_headers: str = "") -> bytes:
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
            "min_servers": "2",
            "max_servers": "8",
            "max_idle": "100",
            "hostname": "'test.example.org'",
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


@pytest.fixture
def mail_env() -> Iterator[MailEnv]:
    base = Path(tempfile.mkdtemp(prefix="tpops-test-"))
    base.chmod(0o755)
    try:
        yield MailEnv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
            raise RuntimeError(f"{exc}\n{self.output()}") from None
        return self

    def output(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture
def server(mail_env: MailEnv) -> Iterator[Server]:
    srv = Server(mail_env).start()
    try:
        yield srv
    finally:
        srv.stop()


class RawClient:
    """Exact bytes over a socket: send lines, read status lines and multi-line bodies."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.readline()

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed")
        assert line.endswith(b"\r\n"), line
        return line[:-2]

    def read_body(self) -> bytes:
        """The raw multi-line body up to (not including) the terminating ``.CRLF``."""
        chunks = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed mid-body")
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line)

    def multi(self, line: str) -> tuple[bytes, bytes]:
        status = self.cmd(line)
        return status, (self.read_body() if status.startswith(b"+OK") else b"")

    def login(self, user: str, password: str = "secret") -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF)."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def unstuff(body: bytes) -> bytes:
    """Undo byte-stuffing of a multi-line body."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def run_inetd(env: MailEnv, data: bytes, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``tpops --inetd`` on plain pipes: feed ``data`` and collect everything it answers."""
    return subprocess.run(
        [TPOPS, "--inetd", "-f", str(env.conf), *extra],
        input=data,
        capture_output=True,
        timeout=timeout,
    )


# -- processes, pools, syslog: helpers for the daemon tests (issue 3) ------------------

#: Arguments that keep workers alive across sessions: as root, ``--user nobody`` (the
#: virtual-mail set-up; without it a worker ends after each privilege-dropping login).
POOL_ARGS: tuple[str, ...] = ("--user", "nobody") if IS_ROOT else ()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def proc_title(pid: int) -> str | None:
    """The process title (``/proc/PID/cmdline`` as setproctitle leaves it); None when gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0")[0].decode(errors="replace").strip()


def _proc_stats() -> Iterator[tuple[int, str, int]]:
    """(pid, state, ppid) of every process in /proc (those gone while reading are skipped)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        yield int(entry), fields[0], int(fields[1])


def proc_children(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    return [child for child, state, ppid in _proc_stats() if ppid == pid and state != "Z"]


def zombie_children(pid: int) -> list[int]:
    """Exited children of ``pid`` not reaped yet (zombies), from /proc."""
    return [child for child, state, ppid in _proc_stats() if ppid == pid and state == "Z"]


def worker_titles(master: int) -> dict[int, str]:
    """The master's workers (children titled ``tpops: worker ...``): pid -> title."""
    out = {}
    for pid in proc_children(master):
        title = proc_title(pid)
        if title and title.startswith("tpops: worker"):
            out[pid] = title
    return out


def idle_workers(master: int) -> set[int]:
    return {pid for pid, title in worker_titles(master).items() if title == "tpops: worker idle"}


def worker_serving(master: int, who: str, timeout: float = 5.0) -> int:
    """The pid of the worker whose title is ``tpops: worker WHO`` (e.g. ``alice@127.0.0.1``)."""
    def find() -> int | None:
        for pid, title in worker_titles(master).items():
            if title == f"tpops: worker {who}":
                return pid
        return None
    return wait_for(find, timeout, what=f"a worker serving {who}")


def proc_ids(pid: int) -> dict[str, list[int]]:
    """``Uid``, ``Gid`` (real, effective, saved, fs) and ``Groups`` from /proc/PID/status."""
    out: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (no process, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


class SyslogCatcher:
    """A /dev/log stand-in: an AF_UNIX datagram socket collecting what tpops sends to syslog."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # sessions served as nobody log too
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode("utf-8", "surrogateescape"))

    def lines(self) -> list[str]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """The first message containing ``text``."""
        def find() -> str | None:
            return next((m for m in self.lines() if text in m), None)
        return wait_for(find, timeout, what=f"syslog message with {text!r}")

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


#: Run a command in a private mount namespace whose /dev is a small tmpfs holding the
#: usual device nodes (bind-mounted from the real /dev) and ``log``, a symlink to the test's
#: syslog socket. Nothing outside the namespace changes; it vanishes with its processes.
_PRIVATE_DEV = r"""
set -e
real=$1; log=$2; shift 2
mount --rbind /dev "$real"
mount -t tmpfs -o mode=755,size=64k tpops-test-dev /dev
for n in null zero full random urandom tty; do
  if [ -e "$real/$n" ]; then : > "/dev/$n"; mount --bind "$real/$n" "/dev/$n"; fi
done
ln -s /proc/self/fd /dev/fd
ln -s "$log" /dev/log
umount -l "$real"
exec "$@"
"""


def with_dev_log(base: Path, log_socket: Path, argv: list[str]) -> list[str]:
    """``argv`` run where /dev/log is ``log_socket`` (needs root: ``unshare --mount``)."""
    real = base / "realdev"
    real.mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _PRIVATE_DEV,
            "sh", str(real), str(log_socket), *argv]


class SyslogServer(Server):
    """``tpops --fg`` whose syslog goes to a :class:`SyslogCatcher` (root only)."""

    def __init__(self, env: MailEnv, *extra_args: str, port: int | None = None) -> None:
        super().__init__(env, *extra_args, port=port)
        self.syslog = SyslogCatcher(env.base / "syslog.sock")
        self.args = with_dev_log(env.base, self.syslog.path, self.args)

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            self.syslog.close()


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
