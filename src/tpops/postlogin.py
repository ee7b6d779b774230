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

The post-login processes belong to the whole pool: a :class:`Registry` in shared memory
(made by the master, at most ``$post_login_workers`` entries) says which process serves
which identity and whether it is idle; any worker claims an idle one of the right
identity, or forks a new one (taking a free entry, or ending the least recently used
idle process). So a burst of logins of virtual users sharing one owner (vmail) reuses a
few processes, and 160 system users who log in again and again each reuse their own,
whichever worker accepted the connection. Two spares (root, no identity yet) are kept
forked ahead, so a uid's first login does not wait for a fork. An idle process ends after
``$post_login_idle`` seconds; a reload retires them all (new ones start with the new
configuration); the master ends them when it stops.

A worker reaches a post-login process through a Unix socket named
``UID.GID.PID`` in a directory only root can enter (:func:`make_directory`), created
(bound, as root) by the worker that forks the process. Only root can create a name
there, so a name is proof of the identity it claims, and only root can connect; the
post-login process checks its peer is root (``SO_PEERCRED``) before reading anything.
The table in shared memory is only a hint: whatever it says, a session reaches a
process of the right identity or none.

The rules that keep this as safe as the in-worker drop:

* A post-login process drops to its identity (groups cleared, real/effective/saved ids)
  before it reads a byte from a client (a spare: on its first hand-off, after checking
  the identity again) and never regains root; it serves only sessions of that identity;
  uid 0 and gid 0 are refused by :func:`tpops.privileges.check_identity`.
* Only root speaks ``pickle`` on a channel, towards the less privileged process; the
  post-login process answers with single octets (``A``: taken over; ``D``: session
  over), so a compromised one cannot feed a root worker anything to parse.
* The handing worker's slot (per-address count, heartbeat, status board) stays that
  worker's: it is busy until the post-login process reports the end, so
  ``$max_servers``, ``$max_connections_per_ip``, ``$max_use`` and the master's watchdog
  mean what they meant; the watchdog also kills the post-login process serving a
  silent slot.
* The lock and UPDATE rules are unchanged: the lock's open file description moves to
  the post-login process (the worker closes its descriptor without unlocking), so the
  lock ends when that session ends or that process dies.
* A post-login process outlives the worker that forked it (the master adopts it as
  a subreaper), so a worker retiring never cuts a session it did not hand off.

What is not handed off: a session over TLS that tpops terminates (an OpenSSL
connection cannot move between processes; Dovecot keeps its login process as a TLS
proxy instead) goes on in a child the worker forks (:meth:`tpops.worker.Worker.fork_session`);
a lock that lives in a database connection (``$mailbox_lock = 'mysql'``) and any
hand-off that fails (every entry busy, no fork, a process that died) are served in
the worker, which then ends.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tpops import logs
from tpops.auth.base import MailUser
from tpops.connection import Connection
from tpops.limits import SharedTable
from tpops.mailbox.lock import DescriptorLock, FileMailboxLock, MailboxLock, NoMailboxLock, OfdMailboxLock
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

_PR_SET_CHILD_SUBREAPER = 36
#: Root's runtime directory (also the default lock directory's parent).
RUN_DIR = "/run/tpops"


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
    return isinstance(lock, DescriptorLock | NoMailboxLock)


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
    #: The identity the session must be served as, and the handing worker's slot
    #: (its heartbeat, per-address count and status board record); set by the pool.
    identity: Identity | None = None
    slot: int = -1


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



# ---------------------------------------------------------------------------
# The registry: the pool's post-login processes, in shared memory


#: An entry: pid, the worker slot it serves now (-1: none), uid, gid, state, last use.
_ENTRY = struct.Struct("=iiIIBxxxd")
FREE, STARTING, IDLE, BUSY, SPARE = 0, 1, 2, 3, 4
#: The identity of a spare: none yet (uid 0 is never served, so it cannot be a real one).
NO_IDENTITY = Identity(0, 0)
#: Spare post-login processes the pool keeps forked ahead (Dovecot's process_min_avail):
#: a uid's first login takes one instead of forking on the client's time.
SPARES = 2


@dataclass(frozen=True, slots=True)
class Entry:
    pid: int
    slot: int
    identity: Identity
    state: int
    last_used: float


class Registry(SharedTable):
    """Which post-login process serves which identity, and which are idle; every method
    is safe across processes (the ``lockf``'d shared file of :class:`tpops.limits.SharedTable`).

    ``directory`` is where the processes' sockets live (see :func:`make_directory`).
    """

    def __init__(self, capacity: int, directory: str) -> None:
        self.capacity = capacity
        self.directory = directory
        super().__init__("tpops-postlogin", max(capacity, 1) * _ENTRY.size)

    def _read(self, index: int) -> Entry:
        pid, slot, uid, gid, state, last = _ENTRY.unpack_from(self.map, index * _ENTRY.size)
        return Entry(pid, slot, Identity(uid, gid), state, last)

    def _write(self, index: int, pid: int, slot: int, identity: Identity, state: int) -> None:
        _ENTRY.pack_into(self.map, index * _ENTRY.size, pid, slot, identity.uid, identity.gid, state,
                         time.monotonic())

    def _rows(self) -> Iterator[tuple[int, int, int, int, int, int, float]]:
        """(index, pid, slot, uid, gid, state, last use) of every entry: one pass, no objects
        (a claim runs once per login, under the lock)."""
        for index, row in enumerate(_ENTRY.iter_unpack(self.map)):
            yield (index, *row)

    def entries(self) -> list[Entry]:
        with self._locked():
            return [self._read(i) for i in range(self.capacity)]

    def path(self, pid: int, identity: Identity) -> str:
        """The socket of post-login process ``pid`` (its name states its identity; a
        spare's says ``spare``)."""
        if identity == NO_IDENTITY:
            return os.path.join(self.directory, f"spare.{pid}")
        return os.path.join(self.directory, f"{identity.uid}.{identity.gid}.{pid}")

    def claim(self, identity: Identity, slot: int) -> int | None:
        """An idle process of ``identity``, now busy for ``slot`` (its pid); None if there is none.
        The most recently used one: its pages are the warmest, and the others can age out."""
        uid, gid = identity.uid, identity.gid
        with self._locked():
            best = -1
            best_pid = 0
            newest = float("-inf")
            for index, pid, _, e_uid, e_gid, state, last in self._rows():
                if state == IDLE and e_uid == uid and e_gid == gid and last > newest:
                    best, best_pid, newest = index, pid, last
            if best < 0:
                return None
            self._write(best, best_pid, slot, identity, BUSY)
            return best_pid

    def claim_spare(self, identity: Identity, slot: int) -> int | None:
        """A spare, now bound to ``identity`` and busy for ``slot`` (its pid); None if there is none."""
        with self._locked():
            for index, pid, _, _, _, state, _ in self._rows():
                if state == SPARE:
                    self._write(index, pid, slot, identity, BUSY)
                    return pid
            return None

    def reserve_spare(self) -> int | None:
        """A free entry for a new spare while fewer than :data:`SPARES` exist (counting
        those starting); None otherwise. Spares never push out a kept process."""
        with self._locked():
            rows = list(self._rows())
            if sum(1 for r in rows if r[5] == SPARE or (r[5] == STARTING and r[3:5] == (0, 0))) >= SPARES:
                return None
            for index, _, _, _, _, state, _ in rows:
                if state == FREE:
                    self._write(index, 0, -1, NO_IDENTITY, STARTING)
                    return index
            return None

    def reserve(self, slot: int, identity: Identity) -> tuple[int, Entry | None] | None:
        """An entry for a new process of ``identity``: a free one, else the least recently
        used idle one, whose process the caller must end (returned); None when all are busy."""
        with self._locked():
            victim = -1
            oldest = float("inf")
            for index, _, _, _, _, state, last in self._rows():
                if state == FREE:
                    self._write(index, 0, slot, identity, STARTING)
                    return index, None
                if state == IDLE and last < oldest:
                    victim, oldest = index, last
            if victim < 0:
                return None
            old = self._read(victim)
            self._write(victim, 0, slot, identity, STARTING)
            return victim, old

    def started(self, index: int, pid: int, identity: Identity, slot: int) -> bool:
        """Register the process forked for a reserved entry; False when the entry was
        taken back meanwhile (a reload retired everything): that process must end."""
        with self._locked():
            if self._read(index).state != STARTING:
                return False
            self._write(index, pid, slot, identity, SPARE if identity == NO_IDENTITY else BUSY)
            return True

    def retire(self) -> list[Entry]:
        """Free every entry, those being started too; the processes that had one (the
        caller ends them). A process forked for an entry freed here is ended by its
        worker (:meth:`started` says False)."""
        with self._locked():
            gone = []
            for index in range(self.capacity):
                entry = self._read(index)
                if entry.state != FREE:
                    if entry.state in (IDLE, BUSY, SPARE):
                        gone.append(entry)
                    self._write(index, 0, -1, NO_IDENTITY, FREE)
            return gone

    def unreserve(self, index: int) -> None:
        with self._locked():
            if self._read(index).state == STARTING:
                self._write(index, 0, -1, Identity(0, 0), FREE)

    def idle(self, pid: int) -> None:
        """``pid`` finished a session and waits for the next one."""
        self._set(pid, IDLE)

    def free(self, pid: int) -> Entry | None:
        """``pid`` ended or must not be used again; its entry (None if it had none)."""
        return self._set(pid, FREE)

    def _set(self, pid: int, state: int) -> Entry | None:
        with self._locked():
            for index, e_pid, _, _, _, e_state, _ in self._rows():
                if e_pid == pid and e_state in (IDLE, BUSY, SPARE):
                    entry = self._read(index)
                    if state == FREE:
                        self._write(index, 0, -1, Identity(0, 0), FREE)
                    else:
                        self._write(index, pid, -1, entry.identity, state)
                    return entry
        return None

    def serving(self, slot: int) -> list[int]:
        """The processes busy with a session of worker slot ``slot`` (for the watchdog)."""
        with self._locked():
            return [pid for _, pid, e_slot, _, _, state, _ in self._rows() if state == BUSY and e_slot == slot]


def make_directory() -> str:
    """A new directory for post-login sockets that only root can enter (mode 0700, in
    root's ``/run/tpops`` when it can be made, else in the temporary directory), named
    ``postlogin.MASTERPID.RANDOM``; those a master left when it was killed go first
    (:func:`remove_stale_directories`)."""
    parent: str | None = RUN_DIR
    try:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        st = os.lstat(RUN_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            parent = None
    except OSError:
        parent = None
    if parent is not None:
        for path, pid in remove_stale_directories(parent):
            log.info("removed %s, left by tpops master %d, which is gone", path, pid)
    return tempfile.mkdtemp(prefix=f"postlogin.{os.getpid()}.", dir=parent)


_STALE_NAME = re.compile(r"postlogin\.([0-9]+)\.[A-Za-z0-9_]+")


def remove_stale_directories(parent: str) -> list[tuple[str, int]]:
    """Remove the post-login socket directories in ``parent`` whose master is not running
    (a master killed with SIGKILL cannot remove its own); (path, master pid) of each.

    Only root's own directories named by :func:`make_directory` go; one whose pid runs
    (another tpops, or the pid reused) stays. Never raises.
    """
    removed: list[tuple[str, int]] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = _STALE_NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # running
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists, not ours to judge
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append((path, pid))
    return removed


def remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def become_subreaper() -> None:
    """Adopt orphaned descendants (``PR_SET_CHILD_SUBREAPER``): the master then reaps the
    post-login processes of workers that have ended, and can wait for them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def peer_is_root(conn: socket.socket) -> bool:
    """The connecting process runs as root (``SO_PEERCRED``): only a worker may hand off."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid) == 0


#: What runs in a freshly forked post-login process (still root): never returns.
ChildMain = Callable[[Identity, socket.socket, list[int]], None]


class PostLoginPool:
    """A worker's side of the pool: claim or fork a post-login process, hand the session
    over, wait for its end.

    ``child_main(identity, listener, close_fds)`` runs in a new process: it must close
    ``close_fds`` (the worker's descriptors of the session being handed off), drop to
    ``identity`` and serve hand-offs arriving on ``listener`` until it ends; it never
    returns.
    """

    def __init__(self, registry: Registry, slot: int, child_main: ChildMain) -> None:
        self.registry = registry
        self.slot = slot
        self.child_main = child_main
        #: The processes this worker forked (it reaps them while it lives).
        self.children: dict[int, Identity] = {}

    def serve(self, handoff: HandOff, resume: Resume, client_fd: int, wake_fd: int,
              stop_requested: Callable[[], bool]) -> bool:
        """Hand the session to a post-login process of ``handoff.identity`` and wait
        for its end. True when a post-login process took it over (the session is then
        over, whatever happened to that process); False when none could, with nothing
        sent to the client: the caller serves the login itself."""
        self.reap()
        identity = handoff.identity
        fds = [client_fd]
        if isinstance(handoff.lock, DescriptorLock):
            fds.append(handoff.lock.fileno())
        if handoff.root is not None and handoff.root.fd is not None:
            fds.append(handoff.root.fd)
        resume.identity, resume.slot = identity, self.slot
        message = pickle.dumps(resume, protocol=pickle.HIGHEST_PROTOCOL)
        if len(message) > MAX_MESSAGE:
            return False
        for _ in range(3):  # a claimed process may have just ended (idle, reload): try another
            pid = self.registry.claim(identity, self.slot)
            if pid is None:
                pid = self._take_spare(identity)
            if pid is None:
                pid = self._fork(identity, fds)
                if pid is None:
                    return False
            channel = self._connect(pid, identity)
            answer = b""
            if channel is not None:
                try:
                    socket.send_fds(channel, [message], fds)
                    answer = _answer(channel, pid, time.monotonic() + TAKE_OVER_TIMEOUT, wake_fd, None)
                except OSError:
                    answer = b""
            if answer == TAKEN:
                break
            if channel is not None:
                channel.close()
            self._discard(pid, identity)
        else:
            return False
        assert channel is not None
        # The post-login process holds the lock's description and the Maildir now.
        if isinstance(handoff.lock, DescriptorLock):
            handoff.lock.hand_over()
        if handoff.root is not None:
            handoff.root.close()
        with channel:
            answer = _answer(channel, pid, None, wake_fd, stop_requested)
        if answer != DONE:
            log.error("post-login process %d (uid %d) ended during the session of %s from %s",
                      pid, identity.uid, logs.escape(resume.user.login), resume.peer)
            self._discard(pid, identity)
        return True

    def _take_spare(self, identity: Identity) -> int | None:
        """A spare for ``identity``: its entry and its socket's name now state the identity
        (root renames it: the name stays proof), and the first hand-off makes it drop."""
        pid = self.registry.claim_spare(identity, self.slot)
        if pid is None:
            return None
        try:
            os.rename(self.registry.path(pid, NO_IDENTITY), self.registry.path(pid, identity))
        except OSError:  # it ended meanwhile: the caller's connect fails and discards it
            pass
        return pid

    def replenish(self) -> None:
        """Fork a spare while the pool has fewer than :data:`SPARES` (after a session, so
        never on a client's time)."""
        if self.registry.capacity > SPARES:
            for _ in range(SPARES):
                if self._fork(NO_IDENTITY, [], spare=True) is None:
                    break

    def _connect(self, pid: int, identity: Identity) -> socket.socket | None:
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            channel.connect(self.registry.path(pid, identity))
        except OSError:
            channel.close()
            return None
        return channel

    def _discard(self, pid: int, identity: Identity) -> None:
        """Never use ``pid`` again: its entry freed, its socket removed, the process killed."""
        self.registry.free(pid)
        remove_socket(self.registry.path(pid, identity))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap()

    def _fork(self, identity: Identity, session_fds: list[int], *, spare: bool = False) -> int | None:
        """A new post-login process of ``identity`` (registered busy for this slot), or
        with ``spare`` one without an identity yet (registered spare)."""
        victim: Entry | None = None
        if spare:
            spare_index = self.registry.reserve_spare()
            if spare_index is None:
                return None
            index = spare_index
        else:
            reserved = self.registry.reserve(self.slot, identity)
            if reserved is None:
                log.warning("all $post_login_workers (%d) post-login processes are busy: serving in the worker",
                            self.registry.capacity)
                return None
            index, victim = reserved
        if victim is not None:  # the least recently used idle process makes room
            remove_socket(self.registry.path(victim.pid, victim.identity))
            try:
                os.kill(victim.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        provisional = os.path.join(self.registry.directory, f"new.{os.getpid()}.{index}")
        try:
            remove_socket(provisional)
            listener.bind(provisional)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            self.registry.unreserve(index)
            log.error("cannot create a post-login socket in %s: %s", self.registry.directory, exc)
            return None
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            listener.close()
            remove_socket(provisional)
            self.registry.unreserve(index)
            log.error("cannot fork a post-login process: %s", exc)
            return None
        if pid == 0:  # the child: never returns into the worker's session
            try:
                self.child_main(identity, listener, session_fds)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        listener.close()
        try:
            os.rename(provisional, self.registry.path(pid, identity))
        except OSError as exc:
            log.error("cannot name the post-login socket: %s", exc)
        self.children[pid] = identity
        if not self.registry.started(index, pid, identity, self.slot):  # retired by a reload meanwhile
            remove_socket(self.registry.path(pid, identity))
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return None
        return pid

    def reap(self) -> None:
        """Collect the post-login processes this worker forked that have exited."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                del self.children[pid]
                entry = self.registry.free(pid)
                if entry is not None:  # its identity now: a spare's socket was renamed when it was taken
                    remove_socket(self.registry.path(pid, entry.identity))


def _answer(channel: socket.socket, pid: int, deadline: float | None, wake_fd: int,
            stop_requested: Callable[[], bool] | None) -> bytes:
    """The process's next answer (b"" when it ended or ``deadline`` passed). With
    ``stop_requested`` (SIGTERM to the worker), the process is asked to stop too, once:
    its session then ends as the worker's own would."""
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    forwarded = False
    while True:
        if stop_requested is not None and not forwarded and stop_requested():
            forwarded = True
            try:
                os.kill(pid, signal.SIGTERM)
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
        if channel.fileno() in ready:
            try:
                return channel.recv(1)
            except OSError:
                return b""
