"""A real MariaDB for tests: throwaway databases, and private servers to stop and start.

:func:`server` gives the MariaDB on 127.0.0.1:3306 (root, empty password) when it
answers, else starts a private ``mariadbd`` in a temporary directory for the rest of
the test run. :func:`temp_database` makes a uniquely named database and drops it
afterwards. :class:`PrivateMariaDB` is a server of one's own that a test may stop,
start, pause (SIGSTOP: a hung or firewalled server) and resume.

Tests never skip for want of MariaDB: when none can be had, they fail loudly.
Set ``TPOPS_TEST_MARIADB=private`` to ignore a running server.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import MySQLdb

from tests.support.server import free_port

#: Where a shared MariaDB is expected (CI has one there).
SHARED_HOST = "127.0.0.1"
SHARED_PORT = 3306
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/usr/local/libexec")


@dataclass(frozen=True)
class Server:
    """How to reach a MariaDB as a superuser."""

    host: str
    port: int
    user: str = "root"
    password: str = ""

    def connect(self, database: str | None = None, **extra: Any) -> Any:
        """A new autocommit connection (utf8mb4), optionally on ``database``."""
        params: dict[str, Any] = dict(
            host=self.host, port=self.port, user=self.user, password=self.password,
            charset="utf8mb4", autocommit=True, connect_timeout=5,
        )
        if database:
            params["database"] = database
        params.update(extra)
        return MySQLdb.connect(**params)

    def answers(self) -> bool:
        """Whether the server accepts our credentials right now."""
        try:
            self.connect(connect_timeout=2).close()
        except MySQLdb.Error:
            return False
        return True


def _program(*names: str) -> str:
    """The path of the first of ``names`` found in PATH or the sbin directories."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
        if found:
            return found
    raise RuntimeError(f"MariaDB is not installed (none of {', '.join(names)} found): "
                       "apt-get install mariadb-server")


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in the stopped state (``T``) per /proc."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


class PrivateMariaDB:
    """A ``mariadbd`` of our own in a temporary directory, on a free loopback port.

    The data directory is made once (``mariadb-install-db``, root with an empty
    password) and survives :meth:`stop`/:meth:`start`; :meth:`cleanup` removes it.
    """

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="tpops-mariadb-")
        self.datadir = os.path.join(self.base, "data")
        self.socket = os.path.join(self.base, "sock")
        self.port = free_port()
        self.server = Server("127.0.0.1", self.port)
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def _user_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def _install(self) -> None:
        """Create the data directory with root@localhost/127.0.0.1 and an empty password."""
        result = subprocess.run(
            [_program("mariadb-install-db", "mysql_install_db"), "--no-defaults",
             f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--innodb-log-file-size=8M", *self._user_args()],
            capture_output=True, timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError("mariadb-install-db failed:\n" + result.stdout.decode(errors="replace")
                               + result.stderr.decode(errors="replace"))

    def start(self, timeout: float = 60) -> Server:
        """Start the server (installing the data directory first time) and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self.server
        if not os.path.isdir(os.path.join(self.datadir, "mysql")):
            self._install()
        log = os.path.join(self.base, "error.log")
        self.process = subprocess.Popen(
            [_program("mariadbd", "mysqld"), "--no-defaults", f"--datadir={self.datadir}",
             f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--pid-file={os.path.join(self.base, 'pid')}", f"--log-error={log}",
             "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", "--skip-name-resolve",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
             *self._user_args()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with status {self.process.returncode}:\n"
                                   + self._log_tail(log))
            if self.server.answers():
                return self.server
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mariadbd did not answer within {timeout} s:\n" + self._log_tail(log))

    @staticmethod
    def _log_tail(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        """Shut the server down (cleanly, SIGKILL after 30 s) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP the server: connections and queries hang, like a firewalled host."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True
        # The stop reaches each of mariadbd's threads on its own schedule: wait until every
        # one is stopped, or a query sent right now may still be answered.
        deadline = time.monotonic() + 10
        while not _all_threads_stopped(self.process.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("mariadbd did not stop within 10 s of SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivateMariaDB:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@functools.lru_cache(maxsize=1)
def server() -> Server:
    """The MariaDB the tests use: the shared one on 127.0.0.1:3306, else a private one (stopped at exit)."""
    shared = Server(SHARED_HOST, SHARED_PORT)
    if os.environ.get("TPOPS_TEST_MARIADB") != "private" and shared.answers():
        return shared
    private = PrivateMariaDB()
    atexit.register(private.cleanup)
    try:
        return private.start()
    except Exception as e:
        raise RuntimeError(f"no MariaDB on {SHARED_HOST}:{SHARED_PORT} and none could be started: {e}") from e


@contextmanager
def temp_database(srv: Server | None = None, charset: str = "utf8mb4") -> Iterator[tuple[Server, str]]:
    """A new empty database ``tpops_test_<pid>_<random>`` on ``srv``, dropped afterwards.

    ``charset`` is its default character set (``latin1`` gives what a 2003-era
    ``mysqladmin create`` made).
    """
    srv = srv or server()
    name = f"tpops_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = srv.connect()
    try:
        conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET {charset}")
        yield srv, name
    finally:
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        except MySQLdb.OperationalError:
            conn = srv.connect()  # the test may have restarted the server
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def load_sql(srv: Server, database: str, path: str) -> None:
    """Load a schema file with the command-line client, as an administrator would (``mysql db < file``)."""
    client = _program("mariadb", "mysql")
    with open(path, "rb") as f:
        result = subprocess.run(
            [client, "--no-defaults", f"--host={srv.host}", f"--port={srv.port}", f"--user={srv.user}",
             f"--password={srv.password}", "--protocol=TCP", database],
            stdin=f, capture_output=True, timeout=60,
        )
    if result.returncode != 0:
        raise RuntimeError(f"loading {path} failed: " + result.stderr.decode(errors="replace"))
