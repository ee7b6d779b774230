"""``tpops --status``: who is connected now, read from the pool's shared session board through a control socket.

Design (and why):

* **Session board** (:class:`SessionBoard`): a shared memory table the master makes
  before it forks, one record per worker slot (the slots of :mod:`tpops.limits`):
  pid, state (AUTHORIZATION, TRANSACTION, UPDATE), the session's start, octets sent,
  login and client address. Only the worker owning a slot writes it (a sequence
  counter, odd while a write is in progress, lets the reader retry a torn record),
  so a session never waits for a lock, and a worker killed mid-session leaves a
  record the master clears when it reaps it. A separate table from
  :class:`tpops.limits.SharedLimits`: the limits stay a small locked table the
  connection admission depends on; this one is display data.
* **Control socket** (:class:`ControlSocket`): a Unix stream socket (``$control_socket``,
  default ``/run/tpops/control`` as root), created 0600, so only the daemon's owner
  (root) can ask. The master answers it in its own ``select`` loop, without a thread:
  on a connection it writes one JSON document (pool and sessions) and closes; it reads
  nothing, so there is no request to parse and a client cannot make it wait for input.
  A status *file* rewritten periodically would be stale by up to its period and cost
  writes while nobody looks; the socket answers with the state of this instant.
* **Observer** (:class:`SessionObserver`): the worker hands one to each
  :class:`tpops.session.Session`; the loop reports every command and reply to it, and
  the worker's counting transport the octets sent. It updates the board and, with
  ``$metrics_address``, the Prometheus metrics (:mod:`tpops.metrics`).

``tpops --status`` (:func:`print_status`) connects, prints the pool and one line per
session (like ``doveadm who``), and explains a refusal: not running, or a socket it
may not open (run it as root).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tpops import logs
from tpops.limits import shared_memory
from tpops.mailbox.lock import DEFAULT_LOCK_PARENT
from tpops.protocol import TLSTransport, Transport
from tpops.reply import Reply

if TYPE_CHECKING:
    from tpops.config import Config
    from tpops.metrics import Metrics

log = logs.get("status")

#: States as stored in a board record (0: the slot serves nobody).
STATES = ("", "AUTHORIZATION", "TRANSACTION", "UPDATE")
FREE, AUTHORIZATION, TRANSACTION, UPDATE = range(4)
_LOGIN_MAX = 96
_PEER_MAX = 64
#: seq, pid, state, start (wall clock), octets sent, login, peer.
_RECORD = struct.Struct(f"=QiB3xdQ{_LOGIN_MAX}s{_PEER_MAX}s")
#: The sequence word and the octet counter, and where the counter is in a record.
_WORD = struct.Struct("=Q")
_OCTETS_AT = struct.calcsize("=QiB3xd")
#: Seconds the master gives a ``--status`` client to take the answer.
ANSWER_TIMEOUT = 1.0
#: Verbs counted under their own name in the metrics (anything else is "other").
VERBS = ("USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT", "STAT", "LIST", "RETR", "TOP",
         "DELE", "NOOP", "RSET", "UIDL")
#: Login results counted by the metrics.
LOGIN_RESULTS = ("ok", "auth", "in-use", "sys")


def default_control_socket() -> str:
    """``/run/tpops/control`` as root (beside the lock directory), else ``/var/tmp/tpops-UID.control``."""
    if os.geteuid() == 0:
        return os.path.join(DEFAULT_LOCK_PARENT, "control")
    return f"/var/tmp/tpops-{os.geteuid()}.control"  # noqa: S108  (a 0600 socket of ours)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _field(text: str, size: int) -> bytes:
    return text.encode("utf-8", "surrogateescape")[:size]


class SessionBoard:
    """One record per worker slot in anonymous shared memory (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        size = max(slots, 1) * _RECORD.size
        self.fd, self.map = shared_memory("tpops-status", size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def _read(self, slot: int) -> tuple[Any, ...]:
        return _RECORD.unpack_from(self.map, slot * _RECORD.size)

    def _write(self, slot: int, **changes: Any) -> None:
        seq, pid, state, start, octets, login, peer = self._read(slot)
        values = {"pid": pid, "state": state, "start": start, "octets": octets, "login": login, "peer": peer}
        values.update(changes)
        offset = slot * _RECORD.size
        struct.pack_into("=Q", self.map, offset, seq + 1)  # odd: being written
        _RECORD.pack_into(self.map, offset, seq + 1, values["pid"], values["state"], values["start"],
                          values["octets"], values["login"], values["peer"])
        struct.pack_into("=Q", self.map, offset, seq + 2)

    def begin(self, slot: int, peer: str) -> None:
        """A worker accepted a connection from ``peer``."""
        self._write(slot, pid=os.getpid(), state=AUTHORIZATION, start=time.time(), octets=0,
                    login=b"", peer=_field(peer, _PEER_MAX))

    def set_state(self, slot: int, state: int, login: str | None = None) -> None:
        if login is None:
            self._write(slot, state=state)
        else:
            self._write(slot, state=state, login=_field(login, _LOGIN_MAX))

    def add_octets(self, slot: int, count: int) -> None:
        """``count`` more octets sent: only the counter and the sequence word are written
        (it runs after every write to the client)."""
        offset = slot * _RECORD.size
        seq = _WORD.unpack_from(self.map, offset)[0]
        _WORD.pack_into(self.map, offset, seq + 1)  # odd: being written
        octets = _WORD.unpack_from(self.map, offset + _OCTETS_AT)[0]
        _WORD.pack_into(self.map, offset + _OCTETS_AT, octets + count)
        _WORD.pack_into(self.map, offset, seq + 2)

    def clear(self, slot: int) -> None:
        """The session ended (worker), or the worker is gone (master)."""
        self._write(slot, pid=0, state=FREE, start=0.0, octets=0, login=b"", peer=b"")

    def sessions(self) -> list[dict[str, Any]]:
        """Every slot serving a session now, as plain values (the master, for the control socket)."""
        out = []
        for slot in range(self.slots):
            for _ in range(100):
                record = self._read(slot)
                if record[0] % 2 == 0 and self._read(slot)[0] == record[0]:
                    break
            _, pid, state, start, octets, login, peer = record
            if state == FREE or state >= len(STATES):
                continue
            out.append({"slot": slot, "pid": pid, "state": STATES[state], "start": start, "octets": octets,
                        "login": _text(login), "peer": _text(peer)})
        return out


# ---------------------------------------------------------------------------
# The worker's side


class CountingTransport(Transport):
    """A :class:`~tpops.protocol.Transport` that reports the octets it sends."""

    def __init__(self, *args: Any, on_sent: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_sent = on_sent

    def sent(self, octets: int) -> None:
        self.on_sent(octets)


class CountingTLSTransport(CountingTransport, TLSTransport):
    """A :class:`~tpops.protocol.TLSTransport` that reports the (clear-text) octets it sends."""


class SessionObserver:
    """What one session reports (see :class:`tpops.session.Session`'s ``observer``): board and metrics."""

    def __init__(self, board: SessionBoard | None, slot: int, metrics: Metrics | None) -> None:
        self.board = board
        self.slot = slot
        self.metrics = metrics
        self.started = time.monotonic()
        self._command_start = 0.0
        self._state = "AUTHORIZATION"

    def begin(self, peer: str) -> None:
        if self.board is not None:
            self.board.begin(self.slot, peer)
        if self.metrics is not None:
            self.metrics.connections.inc()

    def sent(self, count: int) -> None:
        if self.board is not None:
            self.board.add_octets(self.slot, count)
        if self.metrics is not None:
            self.metrics.octets_sent.inc(count)

    def command(self, verb: str, state: str) -> None:
        """Before the state executes ``verb``."""
        self._command_start = time.monotonic()
        self._state = state
        if verb == "QUIT" and state == "TRANSACTION" and self.board is not None:
            self.board.set_state(self.slot, UPDATE)
        if self.metrics is not None:
            self.metrics.commands.labels(verb if verb in VERBS else "other").inc()

    def replied(self, verb: str, reply: Reply) -> None:
        """After the state answered ``verb``: logins, messages sent."""
        if (self._state == "AUTHORIZATION" and verb in ("PASS", "APOP")) or reply.state is not None:
            result = login_result(reply)
            if result is not None:
                if result == "ok" and self.board is not None:
                    user = getattr(reply.state, "user", None)
                    self.board.set_state(self.slot, TRANSACTION, getattr(user, "login", "?"))
                if self.metrics is not None:
                    self.metrics.logins.labels(result).inc()
                    self.metrics.auth_latency.observe(time.monotonic() - self._command_start)
        if self.metrics is not None and verb in ("RETR", "TOP") and reply.ok and reply.data is not None:
            self.metrics.messages_sent.inc()

    def resumed(self, verb: str, command_started: float, session_started: float, reply: Reply) -> None:
        """In a post-login process: continue the worker's record of this session (its
        start, its login command's start) and count the login's result."""
        self.started = session_started
        self._command_start = command_started
        self._state = "AUTHORIZATION"
        self.replied(verb, reply)

    def finished(self, logged_in: bool, start_msgs: int, end_msgs: int, quit: bool) -> None:
        """The session is over (also after an internal error); frees the board record."""
        if self.board is not None:
            self.board.clear(self.slot)
        if self.metrics is not None:
            self.metrics.session_duration.observe(time.monotonic() - self.started)
            if logged_in and quit and start_msgs > end_msgs:
                self.metrics.messages_deleted.inc(start_msgs - end_msgs)


def login_result(reply: Reply) -> str | None:
    """The metrics' name for a login attempt's reply; None for a reply that is no login result."""
    if reply.state is not None and reply.ok:
        return "ok"
    if reply.auth_failed:
        return "auth"
    if reply.text.startswith("[IN-USE]"):
        return "in-use"
    if reply.text.startswith("[SYS/"):
        return "sys"
    return None


# ---------------------------------------------------------------------------
# The master's side: the control socket


class ControlSocket:
    """The 0600 Unix socket the master answers ``tpops --status`` on (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._ino = 0

    def open(self) -> bool:
        """Bind and listen; False (logged) when the path is taken by a live tpops or cannot be used."""
        parent = os.path.dirname(self.path)
        if parent == DEFAULT_LOCK_PARENT and os.geteuid() == 0:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, 0o755)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("control socket %s: %s; tpops --status will not work", self.path, exc.strerror)
            return False
        else:
            if not stat.S_ISSOCK(st.st_mode):
                log.error("control socket %s: the path exists and is no socket; tpops --status will not work",
                          self.path)
                return False
            if _answers(self.path):
                log.warning("control socket %s belongs to another running tpops; tpops --status shows that "
                            "one (set $control_socket)", self.path)
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a stale socket of a tpops that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old_umask = os.umask(0o177)  # created 0600: no moment in which others could connect
        try:
            sock.bind(self.path)
            sock.listen(16)
            self._ino = os.stat(self.path).st_ino
        except OSError as exc:
            sock.close()
            log.error("control socket %s: %s; tpops --status will not work", self.path, exc.strerror or exc)
            return False
        finally:
            os.umask(old_umask)
        self.sock = sock
        return True

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def answer(self, document: Callable[[], dict[str, Any]]) -> None:
        """Answer every waiting client with ``document()`` as JSON (the master's loop calls this)."""
        if self.sock is None:
            return
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("control socket %s: accept: %s", self.path, exc)
                return
            try:
                try:
                    answer = json.dumps(document()).encode() + b"\n"
                except Exception:  # a bug here must never take the master down
                    log.exception("control socket %s: cannot build the status", self.path)
                    answer = b""
                conn.settimeout(ANSWER_TIMEOUT)
                conn.sendall(answer)
            except OSError:
                pass  # the client went away or does not read: its problem
            finally:
                conn.close()

    def close_in_child(self) -> None:
        """A forked worker must not hold the listening socket (nor ever remove its path)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        """Stop listening and remove the path, if it is still ours."""
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


class Monitor:
    """The master's status and metrics plumbing, inherited by every worker it forks.

    The arbiter makes one at start (:meth:`start`), passes it to each worker, and calls
    :meth:`fds` / :meth:`handle` in its loop, :meth:`worker_gone` on each reap,
    :meth:`pool` after each change of the pool, :meth:`maintain` on each pass and
    :meth:`close` at exit.
    """

    def __init__(self, config: Config, slots: int) -> None:
        self.board = SessionBoard(slots)
        self.control = ControlSocket(config.control_socket or default_control_socket())
        self.metrics: Metrics | None = None
        self.next_compact = 0.0
        if config.metrics_address:
            from tpops.metrics import Metrics

            self.metrics = Metrics.start(config)

    def start(self, listeners: list[socket.socket]) -> None:
        self.control.open()
        if self.metrics is not None:
            self.metrics.start_exporter(listeners + ([self.control.sock] if self.control.sock else []))

    def fds(self) -> list[int]:
        return [self.control.fileno()] if self.control.sock is not None else []

    def handle(self, ready: list[int], pool: Callable[[], dict[str, Any]]) -> None:
        if self.control.sock is not None and self.control.fileno() in ready:
            self.control.answer(lambda: {**pool(), "sessions": self.board.sessions()})

    def in_worker(self) -> None:
        """In a freshly forked worker, still root: drop the master's socket, open the metrics files."""
        self.control.close_in_child()
        if self.metrics is not None:
            self.metrics.in_worker()

    def session(self, slot: int) -> SessionObserver:
        return SessionObserver(self.board, slot, self.metrics)

    def worker_gone(self, pid: int, slot: int | None, *, failed: bool) -> None:
        """A reaped child: a worker (its slot) or the metrics exporter (no slot)."""
        if slot is not None:
            self.board.clear(slot)
        if self.metrics is not None:
            self.metrics.worker_gone(pid, failed=failed)

    def pool(self, busy: int, idle: int) -> None:
        if self.metrics is not None:
            self.metrics.pool(busy, idle)

    def maintain(self, now: float) -> None:
        """The master's periodic chores (each pass of its loop; ``now`` is monotonic): every
        ``COMPACT_INTERVAL`` s, fold the metrics files of processes that are gone."""
        if self.metrics is None or now < self.next_compact:
            return
        from tpops.metrics import COMPACT_INTERVAL

        self.next_compact = now + COMPACT_INTERVAL
        try:
            self.metrics.compact()
        except Exception as exc:  # a full /run, a damaged file: they stay, scrapes go on, the master too
            log.warning("cannot fold the metrics files of finished processes: %s", exc)

    def close(self) -> None:
        self.control.close()
        if self.metrics is not None:
            self.metrics.close()

    def remove_files(self) -> None:
        """At exit, after every worker and post-login process is gone: the metrics files."""
        if self.metrics is not None:
            self.metrics.remove_files()


# ---------------------------------------------------------------------------
# tpops --status

EXIT_NOT_RUNNING = 3


def _since(start: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))


def format_status(doc: dict[str, Any]) -> str:
    """The ``tpops --status`` text of a control socket answer."""
    lines = [
        (f"tpops {doc.get('version', '')} master {doc['pid']} up since {_since(doc['started'])}, "
         f"listening on {doc['listening']}"),
        (f"workers: {doc['workers']} ({doc['busy']} busy, {doc['idle']} idle); keeps {doc['spares']} spare, "
         f"min {doc['min_servers']}, max {doc['max_servers']}"),
    ]
    sessions = sorted(doc["sessions"], key=lambda s: s["start"])
    lines.append(f"sessions: {len(sessions)}")
    if sessions:
        rows = [("USER", "ADDRESS", "STATE", "SINCE", "OCTETS-SENT", "PID")]
        for s in sessions:
            user = logs.escape(s["login"]) if s["login"] else "-"
            rows.append((user, logs.escape(s["peer"]), s["state"], _since(s["start"]), str(s["octets"]),
                         str(s["pid"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def fetch_status(path: str) -> dict[str, Any]:
    """The running master's answer on ``path``; OSError as the connection failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def _pid_from(pid_file: str | None) -> int | None:
    if not pid_file:
        return None
    try:
        with open(pid_file) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def print_status(config: Config, as_json: bool = False) -> int:
    """``tpops --status``: print the running daemon's pool and sessions; the exit status."""
    path = config.control_socket or default_control_socket()
    pid = _pid_from(config.pid_file)
    try:
        doc = fetch_status(path)
    except PermissionError:
        print(f"tpops: permission denied on the control socket {path}: it is root's (mode 0600); "
              f"run tpops --status as root", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            where = f" (pid file {config.pid_file}: {'pid ' + str(pid) if pid else 'none'})" if config.pid_file else ""
            print(f"tpops: not running: nothing answers on the control socket {path}{where}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        print(f"tpops: cannot ask the daemon on {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"tpops: the daemon's answer on {path} is not valid: {exc}", file=sys.stderr)
        return 1
    if pid is not None and pid != doc.get("pid"):
        print(f"tpops: note: the pid file {config.pid_file} names pid {pid}, the control socket's master is "
              f"pid {doc.get('pid')}", file=sys.stderr)
    sys.stdout.write(json.dumps(doc, indent=1) + "\n" if as_json else format_status(doc))
    return 0
