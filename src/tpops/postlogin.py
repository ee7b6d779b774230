"""Root mode's post-login processes: the rest of a session served by a kept process of the mailbox owner.

Without ``--user`` a worker runs as root, because a login may need ``/etc/shadow``, and
a session must run as the mailbox owner. Giving up root inside the worker means the
worker can never serve again: every login then paid a fork, an exit and the
copy-on-write faults of a fresh CPython process. Dovecot splits the work instead (a
login process authenticates, a mail process of the user's uid serves), and so does
tpops: the root worker authenticates, takes the mailbox lock and decides the owner's
identity (:class:`HandOff`); then it passes the client's socket, the lock's descriptor
and the opened Maildir directory (``SCM_RIGHTS``) with the session's state
(:class:`Resume`) to a **post-login process** that already runs as that identity, and
waits until that process says the session is over.

The root worker forks its post-login processes itself (:class:`PostLoginPool`) and keeps
up to ``$post_login_workers`` of them, one per identity, the least recently used ending
first; an idle one ends by itself after ``$post_login_idle`` seconds. So a burst of
logins of virtual users sharing one owner (vmail) reuses one process per worker, and a
system user who logs in again reuses the process of the last login.

The rules that keep this as safe as the in-worker drop:

* A post-login process drops to its identity (groups cleared, real/effective/saved ids)
  before it reads anything from its channel and never regains root; it serves only
  sessions of that identity (the pool is keyed by it); uid 0 and gid 0 were refused by
  :func:`tpops.privileges.check_identity` before any hand-off.
* It dies with its root worker (``PR_SET_PDEATHSIG``): the master's watchdog and its
  SIGKILL reach the session as before, and an orphan never keeps a lock.
* Only root speaks ``pickle`` on the channel, towards the less privileged process; the
  post-login process answers with single octets (``A``: taken over; ``D``: session
  over), so a compromised one cannot feed the root worker anything to parse.
* The worker's slot (per-address count, heartbeat, status board) stays the worker's:
  it is busy until the post-login process reports the end, so ``$max_servers``,
  ``$max_connections_per_ip``, ``$max_use`` and the watchdog mean what they meant.
* The lock and UPDATE rules are unchanged: the lock's open file description moves to
  the post-login process (the root worker closes its descriptor without unlocking), so
  the lock ends when that session ends or that process dies.

What is not handed off (served in the worker, which then ends, as before): a session
over TLS that tpops terminates (an OpenSSL connection cannot move between processes;
Dovecot keeps its login process as a TLS proxy instead), a lock that lives in a
database connection (``$mailbox_lock = 'mysql'``), and any hand-off that fails (no
fork, a post-login process that died): the login is then served in the worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import select
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tpops import logs
from tpops.auth.base import MailUser
from tpops.connection import Connection
from tpops.mailbox.lock import FileMailboxLock, MailboxLock, NoMailboxLock, OfdMailboxLock
from tpops.mailbox.maildir import MaildirRoot
from tpops.privileges import Identity

log = logs.get("worker")

#: The post-login process's answers on its channel.
TAKEN, DONE = b"A", b"D"
#: Seconds a root worker waits for a post-login process to take a session over; an idle
#: one answers at once, so a silent one is wedged (it is killed, and another forked).
TAKE_OVER_TIMEOUT = 10.0
#: The largest hand-off message (the state plus any pipelined client input).
MAX_MESSAGE = 256 * 1024
#: Descriptors in one hand-off: the client's socket, the lock, the Maildir directory.
MAX_FDS = 3

_PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class HandOff:
    """A login as far as root takes it: credentials checked, lock held, identity decided.

    ``root`` is the Maildir directory opened (as root) to decide the owner, when the
    backend named no uid; the post-login process serves exactly that directory.
    """

    user: MailUser
    identity: Identity
    lock: MailboxLock
    root: MaildirRoot | None


def transferable(lock: MailboxLock) -> bool:
    """Whether this lock can move to another process with its descriptor."""
    return isinstance(lock, FileMailboxLock | OfdMailboxLock | NoMailboxLock)


@dataclass(slots=True)
class Resume:
    """What a post-login process needs, besides the descriptors, to continue a session.

    Times: ``start`` is the wall-clock connect time (access log); the monotonic ones
    (``connection_deadline``, ``command_started``, ``session_started``) are valid across
    processes on Linux (CLOCK_MONOTONIC is system-wide).
    """

    user: MailUser
    peer: str
    connection: Connection
    start: float
    connection_deadline: float
    #: Client input already read by the worker after the login command (pipelining).
    pending: bytes
    #: The worker was discarding an overlong line when the login ended (the rest goes too).
    discarding: bool
    #: The login command (PASS, APOP, AUTH) and when it started, for the status board and metrics.
    verb: str
    command_started: float
    session_started: float
    #: "flock", "ofd" or "none", and the lock file's path (for logs).
    lock_kind: str
    lock_path: str
    #: The Maildir directory sent as a descriptor: its path and its stat when opened.
    root_path: str | None
    root_stat: os.stat_result | None


def lock_kind(lock: MailboxLock) -> str:
    if isinstance(lock, FileMailboxLock):
        return "flock"
    if isinstance(lock, OfdMailboxLock):
        return "ofd"
    return "none"


def rebuild_lock(kind: str, path: str, fds: list[int]) -> MailboxLock:
    """The received lock (taking its descriptor from the front of ``fds``)."""
    if kind == "flock":
        return FileMailboxLock(fds.pop(0), path)
    if kind == "ofd":
        return OfdMailboxLock(fds.pop(0), path)
    return NoMailboxLock()


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the process that forked us ends (Linux
    ``PR_SET_PDEATHSIG``; set after the identity change, which clears it). Raises
    OSError when that cannot be arranged, or the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "the worker ended before its post-login process started")


@dataclass(slots=True)
class PostLoginProcess:
    """A kept post-login process, as its root worker sees it."""

    pid: int
    identity: Identity
    channel: socket.socket


#: What runs in a freshly forked post-login process (still root): never returns.
ChildMain = Callable[[Identity, socket.socket, list[int]], None]


class PostLoginPool:
    """A root worker's post-login processes, one per identity, at most ``capacity``.

    ``child_main(identity, channel, close_fds)`` runs in a new process: it must close
    ``close_fds`` (the worker's descriptors of the session being handed off and of
    other post-login channels), drop to ``identity`` and serve hand-offs from
    ``channel`` until it ends; it never returns.
    """

    def __init__(self, capacity: int, child_main: ChildMain) -> None:
        self.capacity = capacity
        self.child_main = child_main
        self.processes: OrderedDict[Identity, PostLoginProcess] = OrderedDict()
        self.ended: set[int] = set()

    def serve(self, handoff: HandOff, resume: Resume, client_fd: int, wake_fd: int,
              stop_requested: Callable[[], bool]) -> bool:
        """Hand the session to a post-login process of ``handoff.identity`` and wait
        for its end. True when a post-login process took it over (the session is then
        over, whatever happened to that process); False when none could, with nothing
        sent to the client: the caller serves the login itself."""
        self.reap()
        fds = [client_fd]
        if resume.lock_kind != "none":
            fds.append(handoff.lock.fileno())  # type: ignore[attr-defined]
        if handoff.root is not None and handoff.root.fd is not None:
            fds.append(handoff.root.fd)
        message = pickle.dumps(resume, protocol=pickle.HIGHEST_PROTOCOL)
        if len(message) > MAX_MESSAGE:
            return False
        for _ in range(2):  # a kept process may have just ended (idle timeout): one more, new
            process = self._process_for(handoff.identity, fds)
            if process is None:
                return False
            try:
                socket.send_fds(process.channel, [message], fds)
                answer = self._answer(process, time.monotonic() + TAKE_OVER_TIMEOUT, wake_fd, None)
            except OSError:
                answer = b""
            if answer == TAKEN:
                break
            self._end(process, kill=True)
        else:
            return False
        # The post-login process holds the lock's description and the Maildir now.
        if resume.lock_kind != "none":
            handoff.lock.hand_over()  # type: ignore[attr-defined]
        if handoff.root is not None:
            handoff.root.close()
        if self._answer(process, None, wake_fd, stop_requested) != DONE:
            log.error("post-login process %d (uid %d) ended during the session of %s from %s",
                      process.pid, process.identity.uid, logs.escape(resume.user.login), resume.peer)
            self._end(process, kill=True)
        return True

    def _process_for(self, identity: Identity, session_fds: list[int]) -> PostLoginProcess | None:
        """The kept process of ``identity``, else a new one (ending the least recently used)."""
        process = self.processes.get(identity)
        if process is not None:
            self.processes.move_to_end(identity)
            return process
        while len(self.processes) >= max(self.capacity, 1):
            self._end(next(iter(self.processes.values())), kill=False)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        close_fds = [*session_fds, parent_end.fileno(), *(p.channel.fileno() for p in self.processes.values())]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            parent_end.close()
            child_end.close()
            log.error("cannot fork a post-login process: %s", exc)
            return None
        if pid == 0:  # the child: never returns into the worker's session
            try:
                self.child_main(identity, child_end, close_fds)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_end.close()
        process = PostLoginProcess(pid, identity, parent_end)
        self.processes[identity] = process
        return process

    def _answer(self, process: PostLoginProcess, deadline: float | None, wake_fd: int,
                stop_requested: Callable[[], bool] | None) -> bytes:
        """The process's next answer (b"" when it ended or ``deadline`` passed). With
        ``stop_requested`` (SIGTERM to the worker), the process is asked to stop too,
        once: its session then ends as the worker's own would."""
        poller = select.poll()
        poller.register(process.channel.fileno(), select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        forwarded = False
        while True:
            if stop_requested is not None and not forwarded and stop_requested():
                forwarded = True
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0) * 1000
            ready = dict(poller.poll(timeout))
            if not ready:
                return b""
            if wake_fd in ready:
                try:
                    while os.read(wake_fd, 512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            if process.channel.fileno() in ready:
                try:
                    return process.channel.recv(1)
                except OSError:
                    return b""

    def _end(self, process: PostLoginProcess, *, kill: bool) -> None:
        """Forget ``process``: its channel closes (an idle one then exits by itself)."""
        if self.processes.get(process.identity) is process:
            del self.processes[process.identity]
        process.channel.close()
        if kill:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.ended.add(process.pid)
        self.reap()

    def reap(self) -> None:
        """Collect the post-login processes that have exited (no zombies left behind)."""
        for pid in list(self.ended) + [p.pid for p in self.processes.values()]:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                self.ended.discard(pid)
                for identity, process in list(self.processes.items()):
                    if process.pid == pid:
                        del self.processes[identity]
                        process.channel.close()

    def close(self) -> None:
        """The worker is ending: every post-login process is told to end (its channel closes)."""
        for process in list(self.processes.values()):
            self._end(process, kill=False)
