"""A prefork worker: accepts one connection at a time and serves it with a Session.

The worker tells the master (through the report pipe) when it turns busy and idle,
ends after ``$max_use`` sessions, after a session that changed its identity, or when
the master tells it to: SIGUSR1 means "finish the current session, then exit"
(also used for ``$max_idle``), SIGTERM means "stop now" — a session cut that way does
not enter UPDATE, while one already in UPDATE finishes it. Signal handlers only
record the request; the wake-up pipe makes a blocked wait notice it. A worker whose
master died (the report pipe's reader is gone) finishes its session and exits, so
orphans never keep the port.

Every accepted connection is counted against ``$max_connections_per_ip`` in the
pool's shared table (:mod:`tpops.limits`) before the worker turns busy: one over the
limit is answered ``-ERR [SYS/TEMP]`` and closed at once. While serving, the worker
marks its progress in its slot of that table: each read and write on the client's
connection, each second of a pause. The master's watchdog reads it.

TLS: a connection accepted on an implicit-TLS listener (``$tls_port``, or systemd's
``pop3s``) is wrapped with the master's :class:`~tpops.tls.ServerTLS` context (inherited
across fork: one set of session-ticket keys for the whole pool) and handshaken within
``$command_timeout`` before the greeting, after any PROXY header; on the plain port STLS
does the same later (:meth:`Worker.start_tls`). A failed handshake is logged with the
peer and the reason and ends only that connection.

Root mode (no ``--user``): after a login the worker hands the session to a post-login
process of the mailbox owner (:mod:`tpops.postlogin`; :meth:`Worker.post_login_main`
is that process's life, :meth:`Worker.serve_resumed` its side of a session) and waits
for its end, staying root; a session it cannot hand off (TLS, the MySQL lock) it
serves as the owner itself, and then ends.

Before its first accept a worker boots (:func:`boot`): backend built and modules
imported while still root, the lock directory prepared (created, handed to
``--user``) by :func:`tpops.mailbox.lock.prepare_lock_dir`, then ``--user`` applied for
good, then the lock directory checked as the identity that will use it. The master runs the same boot once in a
throw-away child (:func:`preflight`) before detaching and before accepting a reload.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pickle
import select
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from setproctitle import setproctitle

from tpops import logs, systemd
from tpops.auth import make_authenticator
from tpops.auth.base import Authenticator
from tpops.authorization import StartTLS, open_transaction
from tpops.config import Config
from tpops.connection import BALANCER_TLS, IMPLICIT_TLS, PLAIN, STARTTLS, Connection
from tpops.limits import ClientLimits, SharedLimits
from tpops.mailbox.lock import DescriptorLock, check_lock_dir, lock_kind, prepare_lock_dir
from tpops.mailbox.maildir import MaildirRoot
from tpops.postlogin import (
    DONE,
    MAX_FDS,
    MAX_MESSAGE,
    NO_IDENTITY,
    TAKE_OVER_TIMEOUT,
    TAKEN,
    HandOff,
    PostLoginPool,
    Registry,
    Resume,
    peer_is_root,
    rebuild_lock,
)
from tpops.privileges import Identity, Refused, SessionPrivileges, become, check_identity, lookup_identity
from tpops.protocol import (
    HandshakeFailed,
    Interrupted,
    Timeout,
    TLSTransport,
    Transport,
    drain,
)
from tpops.proxy import ProxyError, ProxyInfo, TrustedNetworks, read_header
from tpops.session import Session, SessionRecord, make_timestamp
from tpops.status import CountingTLSTransport, CountingTransport, Monitor, SessionObserver
from tpops.tls import ServerTLS, TLSConfigError, describe_handshake_error, describe_session, tls_from_config
from tpops.transaction import Transaction

log = logs.get("worker")

#: Exit status of a worker that could not start (the master stops instead of fork-looping).
EXIT_BOOT_FAILED = 3

#: Signals the master blocks around fork() and a new worker unblocks once its handlers are set.
MASTER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD})

#: Report-pipe message: (pid, state), small enough to be written atomically.
REPORT = struct.Struct("=iB")
IDLE, BUSY = 0, 1

#: The answer to a connection over ``$max_connections_per_ip`` (instead of the greeting).
TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections from your address\r\n"
#: A worker logs refused connections at most this often (a flood must not flood the log).
REFUSAL_LOG_INTERVAL = 10.0


def peer_name(address: object) -> str:
    """The client's address for logs: plain dotted quad for IPv4-mapped IPv6."""
    if isinstance(address, tuple) and address:
        host = str(address[0])
        return host[7:] if host.startswith("::ffff:") and "." in host else host
    return "unknown"


@dataclass
class StopRequest:
    """What the signal handlers recorded: ``force`` (SIGTERM) or ``graceful`` (SIGUSR1)."""

    force: bool = False
    graceful: bool = False

    def on_term(self, signum: int, frame: object) -> None:
        self.force = True

    def on_usr1(self, signum: int, frame: object) -> None:
        self.graceful = True


@dataclass
class Accepted:
    """One accepted connection's socket: the plain one, then the :class:`ssl.SSLSocket`
    that took it over (wrapping detaches the plain one), so the worker closes the right one."""

    sock: socket.socket


@dataclass
class Worker:
    """One worker process's life; :meth:`run` returns the process exit status."""

    config: Config
    listeners: list[socket.socket]
    report_fd: int | None
    log_files: logs.LogSetup
    authenticator: Authenticator | None = None  # the master's prepared one, if it has one
    stop: StopRequest = field(default_factory=StopRequest)
    sessions: int = 0
    #: The pool's shared table (None for a worker without a master) and this worker's slot in it.
    limits: SharedLimits | None = None
    slot: int = 0
    #: Connections refused since the last log line about them, and when that was.
    refused: int = 0
    refused_logged: float = float("-inf")
    #: Status board and metrics (:mod:`tpops.status`), inherited from the master; None without one.
    monitor: Monitor | None = None
    #: The master's TLS context (None: TLS not configured) and the fds of the listeners that
    #: speak implicit TLS.
    server_tls: ServerTLS | None = None
    #: Root mode: the pool's post-login processes (None: sessions drop privileges here),
    #: and this worker's side of them.
    registry: Registry | None = None
    post_login: PostLoginPool | None = None
    #: In a post-login process: the identity it serves (NO_IDENTITY: a spare, still root).
    post_login_identity: Identity = NO_IDENTITY
    #: The wake-up pipe and the poller of :meth:`run` (a post-login process closes them).
    wake_fds: tuple[int, int] = (-1, -1)
    poller_fd: int = -1
    tls_listeners: frozenset[int] = frozenset()

    def progress(self) -> None:
        """A sign of life for the master's watchdog (cheap: one store into shared memory)."""
        if self.limits is not None:
            self.limits.beat(self.slot)

    def client_limits(self, peer: str) -> ClientLimits:
        """The failed-login penalty API for a session with ``peer`` (shared across the pool)."""
        return ClientLimits(self.limits, peer, self.config.max_auth_penalty)

    def admit(self, conn: socket.socket, peer: str, tls: bool = False) -> bool:
        """Count the connection from ``peer`` across the pool; over ``$max_connections_per_ip``
        it is answered ``-ERR [SYS/TEMP]`` (not on a TLS listener: the client expects a
        handshake) and closed here (False), before any session starts."""
        if self.limits is None:
            return True
        limit = self.config.max_connections_per_ip
        count = self.limits.enter(self.slot, peer, limit)
        if not limit or count <= limit:
            return True
        try:
            if not tls:
                conn.send(TOO_MANY_CONNECTIONS, socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d connection(s) over $max_connections_per_ip (%d), the last from %s",
                        self.refused, limit, logs.escape(peer))
            self.refused, self.refused_logged = 0, now
        return False

    def release(self) -> None:
        """This connection no longer counts for its address: done before the client can
        see the connection close, so a client that QUITs and reconnects at once is never
        refused over ``$max_connections_per_ip`` by its own finished session."""
        if self.limits is not None:
            self.limits.leave(self.slot)

    def read_proxy(self, conn: socket.socket, peer: str, wake_r: int) -> ProxyInfo | None:
        """The PROXY header a trusted balancer at ``peer`` must send first (see
        :mod:`tpops.proxy`), read exactly and within ``$command_timeout``; None when it is
        missing or malformed: the connection is then closed here, with a log line."""
        setproctitle(f"tpops: worker {peer} (PROXY header)")
        self.progress()
        try:
            info = read_header(conn, self.config.command_timeout, lambda: self.stop.force, wake_fd=wake_r)
        except ProxyError as exc:
            log.warning("closing the connection from %s ($haproxy_trusted_networks): %s", logs.escape(peer), exc)
            conn.close()
            setproctitle("tpops: worker idle")
            return None
        if self.config.debug:
            log.debug("PROXY v%d header from %s: client %s%s", info.version, logs.escape(peer),
                      logs.escape(info.client(peer)), ", TLS terminated by the balancer" if info.ssl else "")
        return info

    def report(self, state: int) -> None:
        if self.report_fd is not None:
            try:
                os.write(self.report_fd, REPORT.pack(os.getpid(), state))
            except BlockingIOError:  # the master is behind: it re-learns our state at the next report
                pass
            except OSError:  # EPIPE: the master is gone; finish up and exit
                self.stop.graceful = True

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fds = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self.stop.on_term)
        signal.signal(signal.SIGUSR1, self.stop.on_usr1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The master blocks these around fork(): one sent before this point is pending
        # and reaches the handlers above now, instead of the master's inherited queue.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        setproctitle("tpops: worker starting")
        if self.monitor is not None:  # still root: metrics files opened before any drop
            self.monitor.in_worker()
        try:
            privileges, authenticator = boot(self.config, self.authenticator)
        except Exception as exc:
            log.error("worker cannot start: %s", exc)
            return EXIT_BOOT_FAILED
        self.authenticator = authenticator
        if privileges.switch_per_session and self.registry is not None and self.config.post_login_workers > 0:
            self.post_login = PostLoginPool(self.registry, self.slot, self.post_login_main)
        setproctitle("tpops: worker idle")
        self.report(IDLE)
        poller, listen_events = listener_poller()
        self.poller_fd = poller.fileno() if isinstance(poller, select.epoll) else -1
        for listener in self.listeners:
            poller.register(listener.fileno(), listen_events)
        poller.register(wake_r, select.POLLIN)
        if self.report_fd is not None:  # POLLERR on the write end: the master died
            poller.register(self.report_fd, 0)
        by_fd = {listener.fileno(): listener for listener in self.listeners}
        trusted = TrustedNetworks.parse(self.config.haproxy_trusted_networks)
        try:
            while not (self.stop.force or self.stop.graceful):
                if self.config.max_use and self.sessions >= self.config.max_use:
                    break
                for fd, _ in poller.poll():
                    if fd == wake_r:
                        drain(wake_r)
                        continue
                    if fd == self.report_fd:
                        log.error("worker %d: the master is gone, exiting", os.getpid())
                        self.stop.graceful = True
                        break
                    if self.stop.force or self.stop.graceful:
                        break
                    try:
                        conn, address = by_fd[fd].accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                            continue
                        raise
                    peer = peer_name(address)
                    proxy: ProxyInfo | None = None
                    if peer in trusted:  # before the slot is counted: it counts the client, not the balancer
                        proxy = self.read_proxy(conn, peer, wake_r)
                        if proxy is None:
                            continue
                        peer = proxy.client(peer)
                    implicit_tls = fd in self.tls_listeners and self.server_tls is not None
                    if not self.admit(conn, peer, implicit_tls):
                        continue
                    try:
                        self.serve(conn, peer, authenticator, privileges, wake_r, proxy, implicit_tls)
                    finally:
                        self.release()  # again, in case serve() never reached its own
                    if privileges.changed:
                        return 0
                    if self.post_login is not None:  # the client is gone: keep spares forked ahead
                        self.post_login.replenish()
                    break  # re-check the limits before the next accept
        finally:
            if self.post_login is not None:
                self.post_login.reap()  # the rest outlive this worker: the master adopts them
            authenticator.close()
            if isinstance(poller, select.epoll):
                poller.close()
        return 0

    def serve(
        self,
        conn: socket.socket,
        peer: str,
        authenticator: Authenticator,
        privileges: SessionPrivileges,
        wake_r: int,
        proxy: ProxyInfo | None = None,
        implicit_tls: bool = False,
    ) -> None:
        """Serve one accepted connection to its end.

        ``peer`` is the client's address (a trusted balancer's PROXY header already
        applied); ``proxy`` what that header said (``proxy.ssl``: the balancer terminated
        TLS), None for a direct connection. ``implicit_tls``: it came from a TLS
        listener; the handshake runs first.
        """
        self.progress()
        self.report(BUSY)
        self.sessions += 1
        setproctitle(f"tpops: worker {peer}")
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        observer = self.monitor.session(self.slot) if self.monitor is not None else None
        accepted = Accepted(conn)
        on_sent = observer.sent if observer is not None else None
        try:
            if observer is not None:
                observer.begin(peer)
            connection = Connection(peer, BALANCER_TLS if proxy is not None and proxy.ssl else PLAIN)
            transport: Transport
            if implicit_tls:
                transport = self.handshake(accepted, peer, wake_r, on_sent)  # before the greeting
                connection = self.tls_connection(connection, IMPLICIT_TLS, transport)
            elif on_sent is not None:
                transport = CountingTransport(conn.fileno(), conn.fileno(), wake_r,
                                              lambda: self.stop.force, self.progress, on_sent=on_sent)
            else:
                transport = Transport(conn.fileno(), conn.fileno(), wake_r, lambda: self.stop.force, self.progress)

            def start_tls(plain: Transport, before: Connection) -> tuple[Transport, Connection]:
                upgraded = self.handshake(accepted, peer, wake_r, on_sent)
                return upgraded, self.tls_connection(before, STARTTLS, upgraded)

            def hand_off(handoff: HandOff, resume: Resume) -> bool:
                if isinstance(accepted.sock, ssl.SSLSocket):  # OpenSSL's state cannot be sent: fork it
                    return self.fork_session(handoff, peer, wake_r)
                if self.post_login is None:
                    return False  # $post_login_workers = 0: the login is served here
                setproctitle(f"tpops: worker {peer} (post-login uid {handoff.identity.uid})")
                return self.post_login.serve(handoff, resume, conn.fileno(), wake_r, lambda: self.stop.force)

            session = Session(
                transport,
                peer,
                self.config,
                authenticator,
                serve_as=privileges,
                on_login=lambda who: setproctitle(f"tpops: worker {who}"),
                timestamp=make_timestamp(self.config.hostname, self.sessions),
                observer=observer,
                penalty=self.client_limits(peer),
                connection=connection,
                start_tls=start_tls if self.server_tls is not None else None,
                # root mode: to a post-login process, or over TLS to a forked child
                hand_off=hand_off if privileges.switch_per_session and (
                    self.post_login is not None or self.server_tls is not None) else None,
            )
            record = session.run()
            if session.handed_off:  # the post-login process accounted for it
                observer = None
            else:
                self.conclude(session, record, observer)
                observer = None
        except (HandshakeFailed, Interrupted):
            pass  # implicit TLS that did not start (logged by handshake()) or SIGTERM during it
        except Exception:
            # A bug outside the session loop (it catches its own): this client gets a
            # short error, the worker lives on. Dying here would turn one bad input
            # into a crash, and a fork, per connection.
            log.exception("internal error serving %s", peer)
            if not isinstance(accepted.sock, ssl.SSLSocket):  # on TLS, clear text would be noise
                try:
                    conn.send(b"-ERR [SYS/TEMP] Internal server error.\r\n", socket.MSG_DONTWAIT)
                except OSError:
                    pass
        finally:
            if observer is not None:  # an internal error: the record must not outlive the session
                observer.finished(False, 0, 0, quit=False)
            self.release()
            accepted.sock.close()
        if not privileges.changed:
            setproctitle("tpops: worker idle")
            self.report(IDLE)


    def fork_session(self, handoff: HandOff, peer: str, wake_r: int) -> bool:
        """Root mode over TLS: the logged-in session goes on in a child of this worker
        (OpenSSL's state is in memory, so a fork carries it), which drops to the owner,
        serves the session and ends; this worker waits for it and serves the next
        client, instead of dropping itself and ending (a fork by the master and a cold
        worker per session). In the child this returns False (the caller then serves
        the login, switching identity); here True once the child has ended. A failed
        fork returns False here: the worker serves the login itself, as before."""
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot fork for the TLS session of %s from %s: %s", logs.escape(handoff.user.login), peer, exc)
            return False
        if pid == 0:
            self._in_session_child()
            return False
        # The child holds the lock's open file description and the Maildir now.
        if isinstance(handoff.lock, DescriptorLock):
            handoff.lock.hand_over()
        if handoff.root is not None:
            handoff.root.close()
        setproctitle(f"tpops: worker {peer} (session in {pid})")
        wait_session_child(pid, wake_r, self.stop)
        return True

    def _in_session_child(self) -> None:
        """The child of :meth:`fork_session`, still root: nothing of the worker's that
        serves other clients stays here (listeners, the master's pipe, spares to fork,
        the database connection), and its metrics files are opened before the drop."""
        for listener in self.listeners:
            listener.close()
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None
        if self.poller_fd >= 0:
            os.close(self.poller_fd)
            self.poller_fd = -1
        self.post_login = None
        if self.authenticator is not None:
            self.authenticator.detach()
        if self.monitor is not None:
            self.monitor.in_worker()
        # A wake-up pipe of its own under the same numbers (the session's transports and
        # the signal wake-up hold the numbers): the worker drains the one they shared.
        fresh = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for new, old in zip(fresh, self.wake_fds, strict=True):
            os.dup2(new, old, inheritable=False)
            os.close(new)

    def conclude(self, session: Session, record: SessionRecord, observer: SessionObserver | None,
                 before_close: Callable[[], None] | None = None) -> None:
        """After :meth:`Session.run`: board and metrics, the access log, the address's
        count (and ``before_close``), then the clean end of the connection: a client
        that sees EOF sees the session accounted, and may reconnect at once."""
        if observer is not None:
            observer.finished(record.logged_in, record.start_msgs, record.end_msgs,
                              quit=isinstance(session.state, Transaction) and session.state.updating)
        write_access_log(self.log_files, record.access_log_line())
        self.release()
        if before_close is not None:
            before_close()
        session.finish()

    # -- root mode's post-login process (see tpops.postlogin) ---------------------

    def post_login_main(self, identity: Identity, listener: socket.socket, close_fds: list[int]) -> None:
        """The life of a post-login process forked by :class:`PostLoginPool`; never returns."""
        status = 1
        try:
            status = self._post_login(identity, listener, close_fds)
        except BaseException:
            log.exception("post-login process %d (uid %d) failed", os.getpid(), identity.uid)
        finally:  # the registry entry and the socket go when the process is reaped
            os._exit(status)

    def _post_login(self, identity: Identity, listener: socket.socket, close_fds: list[int]) -> int:
        gc.freeze()  # the worker's objects: never scanned here, so their pages stay shared
        # Nothing of the worker's may stay open here: the session being handed off (its
        # socket, its lock: a copy would keep the lock after the session), the listeners,
        # the master's report pipe, the worker's wake-ups.
        for fd in [*close_fds, *self.wake_fds, self.poller_fd]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for server_socket in self.listeners:
            server_socket.close()
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None
        if self.authenticator is not None:  # never used here: no database handle as the mailbox owner
            self.authenticator.detach()
        self.post_login = None
        self.stop = StopRequest()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self.stop.on_term)
        signal.signal(signal.SIGUSR1, self.stop.on_usr1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})
        if self.monitor is not None:  # still root: this process's metrics files
            self.monitor.in_worker()
        self.post_login_identity = identity
        if identity != NO_IDENTITY:
            become(identity)
        setproctitle(self._post_login_title())
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        served = 0
        while not (self.stop.force or self.stop.graceful):
            ready = poller.poll(self.config.post_login_idle * 1000)
            if not ready:
                break  # idle for $post_login_idle: a worker forks another when needed
            if any(fd == wake_r for fd, _ in ready):
                drain(wake_r)
            if not any(fd == listener.fileno() for fd, _ in ready):
                continue
            try:
                channel, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            with channel:
                if not self._take_over(channel, wake_r):
                    continue
            served += 1
            setproctitle(self._post_login_title())
            if self.config.max_use and served >= self.config.max_use:
                break
        return 0

    def _post_login_title(self) -> str:
        identity = self.post_login_identity
        return "tpops: post-login spare" if identity == NO_IDENTITY else f"tpops: post-login uid {identity.uid} idle"

    def _take_over(self, channel: socket.socket, wake_r: int) -> bool:
        """One hand-off from a worker: the session, served to its end; False when the
        connection carried none (or not from root, or not for this identity). A spare
        drops to the identity of its first hand-off here, before it touches the session."""
        if not peer_is_root(channel):
            log.warning("post-login process %d: a connection not from root, ignored", os.getpid())
            return False
        channel.settimeout(TAKE_OVER_TIMEOUT)
        try:
            message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
        except OSError:
            return False
        resume: Resume | None = pickle.loads(message) if message else None  # noqa: S301  (root sent it)
        wanted = resume.identity if resume is not None else None
        if wanted is not None and self.post_login_identity == NO_IDENTITY:
            try:
                check_identity(wanted, self.config.first_valid_uid, self.config.last_valid_uid)
                become(wanted)
            except (Refused, OSError) as exc:
                log.error("spare post-login process %d cannot serve uid %d: %s", os.getpid(), wanted.uid, exc)
                self.stop.graceful = True  # never serve anyone after a failed change
                resume = None
            else:
                self.post_login_identity = wanted
        if resume is None or resume.identity != self.post_login_identity:
            for fd in fds:
                os.close(fd)
            return False
        try:
            channel.send(TAKEN)
        except OSError:
            for fd in fds:
                os.close(fd)
            return False
        self.slot = resume.slot
        idle = [False]

        def now_idle() -> None:  # before the client sees the end: its next login finds us idle
            if self.registry is not None and not idle[0]:
                self.registry.idle(os.getpid())
            idle[0] = True

        self.serve_resumed(resume, fds, wake_r, now_idle)
        now_idle()
        try:
            channel.send(DONE)
        except OSError:  # the worker is gone (killed): the session is over all the same
            pass
        return True

    def serve_resumed(self, resume: Resume, fds: list[int], wake_r: int,
                      before_close: Callable[[], None] | None = None) -> None:
        """Serve a handed-off session to its end: the login's ``+OK`` (or why the mailbox
        cannot be opened), then the TRANSACTION state, as :meth:`serve` would have."""
        conn = socket.socket(fileno=fds.pop(0))
        lock = rebuild_lock(resume.lock_kind, resume.lock_path, fds)
        root = None
        if resume.root_path is not None and resume.root_stat is not None and fds:
            root = MaildirRoot(resume.root_path, fds.pop(0), resume.root_stat)
        for fd in fds:  # nothing else was meant to come
            os.close(fd)
        setproctitle(f"tpops: post-login {resume.user.login}@{resume.peer}")
        observer = self.monitor.session(self.slot) if self.monitor is not None else None
        try:
            transport: Transport
            if observer is not None:
                transport = CountingTransport(conn.fileno(), conn.fileno(), wake_r, lambda: self.stop.force,
                                              self.progress, on_sent=observer.sent)
            else:
                transport = Transport(conn.fileno(), conn.fileno(), wake_r, lambda: self.stop.force, self.progress)
            assert self.authenticator is not None
            session = Session(transport, resume.peer, self.config, self.authenticator, observer=observer,
                              connection=resume.connection)
            session.resume(resume)
            first = open_transaction(self.config, resume.user, lock, root, resume.peer, resume.connection,
                                     dropped_privileges=True)
            if observer is not None:
                observer.resumed(resume.verb, resume.command_started, resume.session_started, first)
            record = session.run(first)
            self.conclude(session, record, observer, before_close)
            observer = None
        except Exception:
            log.exception("internal error serving %s from %s", logs.escape(resume.user.login), resume.peer)
            lock.release()
            try:
                conn.send(b"-ERR [SYS/TEMP] Internal server error.\r\n", socket.MSG_DONTWAIT)
            except OSError:
                pass
        finally:
            if observer is not None:
                observer.finished(False, 0, 0, quit=False)
            self.release()
            conn.close()

    def handshake(self, accepted: Accepted, peer: str, wake_r: int,
                  on_sent: Callable[[int], None] | None) -> TLSTransport:
        """:func:`tls_handshake` on the accepted socket with the master's context, the
        process title saying so meanwhile."""
        assert self.server_tls is not None
        setproctitle(f"tpops: worker {peer} (TLS handshake)")
        try:
            return tls_handshake(self.server_tls, accepted, peer, self.config.command_timeout, wake_r,
                                 lambda: self.stop.force, self.progress, on_sent)
        finally:
            setproctitle(f"tpops: worker {peer}")

    def tls_connection(self, before: Connection, security: str, transport: TLSTransport) -> Connection:
        """``before`` after a successful handshake: protection, channel binding, description."""
        assert self.server_tls is not None
        return secured(before, security, self.server_tls, transport)


def wait_session_child(pid: int, wake_r: int, stop: StopRequest) -> None:
    """Wait for the session child of :meth:`Worker.fork_session` to end, and reap it.

    SIGTERM to the worker is passed on once (the child's session then ends as the
    worker's own would); SIGUSR1 is not (a graceful stop lets the session finish). The
    heartbeat in the worker's slot is the child's (its transport's), so a stuck session
    gets its worker killed by the master's watchdog as before."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # a kernel before 5.3: look every 100 ms instead
        pidfd = -1
    try:
        poller = select.poll()
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        forwarded = False
        while True:
            ready = [fd for fd, _ in poller.poll(1000 if pidfd >= 0 else 100)]
            if (pidfd < 0 or pidfd in ready) and _exited(pid):
                return
            if wake_r in ready:
                drain(wake_r)
            if stop.force and not forwarded:
                forwarded = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _exited(pid: int) -> bool:
    """Reap ``pid`` if it has ended (True); False while it runs."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def tls_handshake(server_tls: ServerTLS, accepted: Accepted, peer: str, timeout: float, wake_r: int | None,
                  should_stop: Callable[[], bool], progress: Callable[[], None] | None = None,
                  on_sent: Callable[[int], None] | None = None) -> TLSTransport:
    """Wrap the accepted socket with ``server_tls``'s context and run the server handshake
    within ``timeout`` seconds (``$command_timeout``, for the whole handshake); the TLS
    transport (counting octets for the status board when ``on_sent`` is given).

    ``accepted.sock`` becomes the :class:`ssl.SSLSocket`, so the caller closes the right
    one. A failed handshake is logged (peer and reason) and raised as
    :class:`~tpops.protocol.HandshakeFailed`; :class:`~tpops.protocol.Interrupted`
    (SIGTERM) passes through.
    """
    tls_sock = server_tls.context.wrap_socket(accepted.sock, server_side=True, do_handshake_on_connect=False)
    accepted.sock = tls_sock
    transport: TLSTransport
    if on_sent is not None:
        transport = CountingTLSTransport(tls_sock, wake_r, should_stop, progress, on_sent=on_sent)
    else:
        transport = TLSTransport(tls_sock, wake_r, should_stop, progress)
    try:
        transport.handshake(time.monotonic() + timeout)
    except (ssl.SSLError, OSError, Timeout) as exc:
        reason = describe_handshake_error(TimeoutError() if isinstance(exc, Timeout) else exc)
        log.warning("TLS handshake failed from %s: %s", logs.escape(peer), reason)
        raise HandshakeFailed(reason) from None
    return transport


def secured(before: Connection, security: str, server_tls: ServerTLS, transport: TLSTransport) -> Connection:
    """``before`` after a successful handshake: protection, channel binding, description."""
    return before.upgraded(security, end_point=server_tls.end_point,
                           tls_description=describe_session(transport.sock))


def listener_poller() -> tuple[select.poll | select.epoll, int]:
    """The poller a worker waits on, and the events to register the listeners with.

    On Linux an epoll with ``EPOLLEXCLUSIVE`` on the shared listeners: a new connection
    wakes one idle worker, not all of them (with ``poll()`` every idle worker woke, and
    all but one went back to sleep after a failed ``accept()``: a dozen wasted wake-ups
    per connection with a dozen idle workers). A woken worker that stops instead of
    accepting leaves the connection queued for the next wake-up or the replacement the
    master forks (a new epoll reports a listener that is already ready). Elsewhere,
    ``poll()``.
    """
    if hasattr(select, "epoll") and hasattr(select, "EPOLLEXCLUSIVE"):
        return select.epoll(), select.EPOLLIN | select.EPOLLEXCLUSIVE
    return select.poll(), select.POLLIN


def boot(config: Config, authenticator: Authenticator | None = None) -> tuple[SessionPrivileges, Authenticator]:
    """What every worker does before its first accept: privileges, backend, lock directory.

    Raises (ValueError, OSError, ImportError) with a message for the log when the
    worker cannot serve at all; the master then counts a boot failure.
    """
    # Import everything while still root: after the drop the interpreter's own files may
    # be out of reach (as with a Python under /root), and nothing else should be loaded
    # from disk by an unprivileged process anyway.
    if authenticator is None:
        authenticator = prepared_authenticator(config)
    try:
        locking = lock_kind(config.mailbox_lock, config.auth_type) == "local"
        if locking:  # as root: created and handed to --user, or refused
            prepare_lock_dir(config.passwd_lock_dir, lock_dir_owner(config))
        privileges = boot_privileges(config)
        if locking:  # as the identity that will lock
            check_lock_dir(config.passwd_lock_dir)
    except BaseException:
        authenticator.close()
        raise
    return privileges, authenticator


def prepared_authenticator(config: Config) -> Authenticator:
    """The backend, built and prepared (files read, modules imported) while still root."""
    authenticator = make_authenticator(config)
    authenticator.prepare()
    return authenticator


def warm_up(config: Config) -> Authenticator | None:
    """The master's prepared backend, inherited by every worker it forks: a worker then
    starts in a few milliseconds and never re-reads the user list on its first login.
    None when it cannot be built (each worker's boot then reports why)."""
    try:
        return prepared_authenticator(config)
    except Exception:
        return None


def preflight(config: Config) -> str | None:
    """Boot a throw-away worker in a child process: None if it could, else the reason.

    Run by the master before it detaches (so the error reaches stderr) and before it
    accepts a reloaded configuration. A child, because the boot drops privileges for good.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller
        status = EXIT_BOOT_FAILED
        try:
            os.close(read_fd)
            _, authenticator = boot(config)
            authenticator.check()  # one real backend round trip as the worker's identity
            authenticator.close()
            status = 0
        except BaseException as exc:
            try:
                os.write(write_fd, str(exc).encode("utf-8", "replace")[:4000] or b"unknown error")
            except BaseException:  # noqa: S110  (the throw-away child exits either way)
                pass
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return b"".join(chunks).decode("utf-8", "replace") or f"exit status {os.waitstatus_to_exitcode(status)}"


def lock_dir_owner(config: Config) -> tuple[int, int] | None:
    """Who will lock in ``$passwd_lock_dir``: the ``--user`` a root worker drops to, else None (this process)."""
    if os.geteuid() != 0 or config.user is None:
        return None
    identity = lookup_identity(config.user, config.group)
    return identity.uid, identity.gid


def boot_privileges(config: Config) -> SessionPrivileges:
    """Drop to ``--user``/``--group`` for good if given (as root); decide the per-session rule."""
    if os.geteuid() != 0:
        return SessionPrivileges(switch_per_session=False)
    if config.user is not None or config.group is not None:
        if config.user is None:
            raise ValueError("--group needs --user")
        identity = lookup_identity(config.user, config.group)
        if identity.uid == 0:
            raise ValueError("refusing to run workers as root (--user is uid 0)")
        become(identity)
        return SessionPrivileges(switch_per_session=False)
    return SessionPrivileges(True, first_valid_uid=config.first_valid_uid, last_valid_uid=config.last_valid_uid)


def write_access_log(log_files: logs.LogSetup, line: str) -> None:
    if log_files.access_log is not None:
        try:
            log_files.access_log.write(line)
        except OSError as exc:
            log.error("cannot write the access log: %s", exc)


def serve_inetd(config: Config, log_files: logs.LogSetup) -> int:
    """``--inetd``: one session on stdin/stdout (a socket from inetd, or plain pipes).

    With a certificate configured and a TCP socket from inetd, TLS works as in the
    daemon: a connection to ``$tls_port`` (995 unless set, the rule systemd's unnamed
    listeners follow) speaks implicit TLS, any other port offers STLS. The context is
    loaded before ``--user`` applies, so a key readable by root only works. Plain pipes
    cannot carry TLS: no STLS there.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stop = StopRequest()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, stop.on_term)
    peer = "stdin"
    sock: socket.socket | None = None
    local_port: int | None = None
    network = False  # a TCP connection, not pipes or a UNIX socket from a local program
    try:
        sock = socket.socket(fileno=os.dup(0))
        network = sock.family in (socket.AF_INET, socket.AF_INET6)
        peer = peer_name(sock.getpeername())
        if not network:
            raise OSError("not TCP")  # a socketpair (stunnel's exec mode): no port, no TLS of ours
        local_port = sock.getsockname()[1]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        if sock is not None:  # served as plain pipes on fds 0 and 1
            sock.close()
            sock = None
    tls_port = systemd.implicit_tls_port(config.tls_port)
    implicit_tls = local_port is not None and local_port == tls_port
    try:
        server_tls = tls_from_config(config)
        if implicit_tls and server_tls is None:
            raise TLSConfigError(f"a connection to the implicit-TLS port {tls_port} ($tls_port), but no "
                                 "certificate is configured ($tls_cert_file, $tls_key_file)")
        privileges, authenticator = boot(config)
    except Exception as exc:
        log.error("cannot start the session: %s", exc)
        if not implicit_tls:  # a TLS client would read a clear-text line as a broken record
            try:
                os.write(1, b"-ERR [SYS/TEMP] Server not available.\r\n")
            except OSError:
                pass
        if sock is not None:
            sock.close()
        return EXIT_BOOT_FAILED
    setproctitle(f"tpops: inetd {peer}")
    accepted = Accepted(sock) if sock is not None else None
    try:
        connection = Connection(peer, local=not network)
        transport: Transport
        if implicit_tls:
            assert accepted is not None and server_tls is not None
            try:
                transport = tls_handshake(server_tls, accepted, peer, config.command_timeout, wake_r,
                                          lambda: stop.force)
            except (HandshakeFailed, Interrupted):
                return 0  # logged by tls_handshake; SIGTERM during it: nothing to say in clear text
            connection = secured(connection, IMPLICIT_TLS, server_tls, transport)
        else:
            transport = Transport(0, 1, wake_r, lambda: stop.force)
        start_tls: StartTLS | None = None
        if server_tls is not None and accepted is not None and not implicit_tls:
            tls = server_tls
            tls_accepted = accepted

            def start_tls(plain: Transport, before: Connection) -> tuple[Transport, Connection]:
                upgraded = tls_handshake(tls, tls_accepted, peer, config.command_timeout, wake_r,
                                         lambda: stop.force)
                return upgraded, secured(before, STARTTLS, tls, upgraded)

        session = Session(
            transport,
            peer,
            config,
            authenticator,
            serve_as=privileges,
            timestamp=make_timestamp(config.hostname, 1),
            connection=connection,
            start_tls=start_tls,
        )
        record = session.run()
        write_access_log(log_files, record.access_log_line())
        session.finish()
    finally:
        authenticator.close()
        if accepted is not None:
            accepted.sock.close()
        sys.stdout.flush()
    return 0
