"""The prefork master: keeps the worker pool sized, reloads on signals, never serves a client.

TServer semantics, made robust (gunicorn's arbiter is the model): the master starts
``$min_servers`` workers and forks more while fewer than two are idle, up to
``$max_servers``; workers report busy/idle through a pipe, so a burst is seen at
once, and the master then forks one more worker for each connection waiting in the
listen queue. Signal handlers only queue the signal; the loop reaps, rescales and
handles SIGTERM/SIGINT (stop), SIGHUP (reload, workers forced off) and SIGUSR1
(reload, workers finish their session). A reload whose configuration does not load or
whose pre-flight worker cannot boot changes nothing: the running workers go on.
Workers idle longer than ``$max_idle`` are retired while more than ``$min_servers``
run. Workers that keep failing at start-up stop the master only if no worker ever
booted (a start-up that never worked); once the server has served, a failing boot
is retried with a growing delay (1, 2, 4 ... 60 s, one worker at a time) until the
cause is removed. Workers whose master died exit by themselves.

TLS: the master loads the certificate (:func:`tpops.tls.tls_from_config`) before it
forks, so every worker inherits one context, one set of session-ticket keys (a client
resumes on any worker) and a key file that may be readable by root only. A reload
loads it again: new workers use the new certificate; a reload whose certificate does
not load is refused like a configuration that does not load (logged, nothing changes).

The watchdog (gunicorn's ``murder_workers``): a busy worker marks its progress in the
pool's shared table (:mod:`tpops.limits`) on every read and write; one silent for
longer than ``$command_timeout`` plus a grace period (hung in a backend call, an NFS
read, a user's FIFO, or SIGSTOPped by the user it runs as) is killed with SIGKILL and
replaced. Nothing is deleted (UPDATE runs only after QUIT, and a killed process
writes nothing more) and its mailbox lock dies with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import os
import select
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from setproctitle import setproctitle

from tpops import logs
from tpops.auth.base import Authenticator
from tpops.config import Config, ConfigError
from tpops.connection import Connection
from tpops.limits import SharedLimits
from tpops.postlogin import Registry, become_subreaper, make_directory, remove_socket
from tpops.protocol import drain
from tpops.status import Monitor
from tpops.systemd import Notifier
from tpops.tls import ServerTLS, TLSConfigError, tls_from_config
from tpops.worker import (
    BUSY,
    EXIT_BOOT_FAILED,
    IDLE,
    MASTER_SIGNALS,
    REPORT,
    Worker,
    warm_up,
)

log = logs.get("arbiter")

#: Consecutive workers dying before they could serve that make the master give up.
MAX_BOOT_FAILURES = 5
#: How long stop waits for workers before SIGKILL (the whole stop stays under 5 s).
STOP_GRACE = 4.0
#: Idle workers kept ready while fewer than $max_servers run (TServer's rule).
SPARE_WORKERS = 2
#: The loop's wake-up interval for ``$max_idle`` checks when nothing happens.
TICK = 1.0
#: Seconds the loop waits after a pass that only worker reports woke, so that reports
#: arriving meanwhile are read in one pass (a signal or a --status query waits that long at most).
REPORT_BATCH = 0.005
#: Longest wait between two attempts to start a worker once boots fail after a good start.
MAX_BACKOFF = 60.0
#: Worker slots in the shared table at least (a reload may raise $max_servers up to
#: the table's size; beyond it, a restart).
MIN_SLOTS = 256
#: The watchdog's grace beyond $command_timeout: $command_timeout itself, within these bounds.
WATCHDOG_GRACE_MIN = 2
WATCHDOG_GRACE_MAX = 60


def watchdog_limit(config: Config) -> float:
    """Seconds without progress after which a busy worker is killed.

    A session never waits longer than ``$command_timeout`` for its client, so silence
    beyond it is a worker stuck elsewhere; the grace leaves room for slow but working
    backend calls and Maildir scans.
    """
    timeout = config.command_timeout
    return float(timeout + min(max(timeout, WATCHDOG_GRACE_MIN), WATCHDOG_GRACE_MAX))


@dataclass
class WorkerInfo:
    """The master's view of one worker."""

    pid: int
    started: float
    state: int = IDLE
    since: float = 0.0
    booted: bool = False
    retiring: bool = False
    #: Its slot in the shared table, and the watchdog's limit under its configuration.
    slot: int = 0
    limit: float = 0.0
    killed: bool = False


@dataclass
class Arbiter:
    """The master process. ``reload_config()`` returns a fresh Config (or raises ConfigError)."""

    config: Config
    listeners: list[socket.socket]
    log_files: logs.LogSetup
    reload_config: Callable[[], Config]
    reopen_logs: Callable[[Config], logs.LogSetup]
    workers: dict[int, WorkerInfo] = field(default_factory=dict)
    signals: list[int] = field(default_factory=list)
    boot_failures: int = 0
    #: A worker has booted since the master started: boot failures then back off instead of stopping.
    ever_booted: bool = False
    #: Current delay between boot attempts (0: workers boot fine) and when the next may start.
    backoff: float = 0.0
    spawn_after: float = 0.0
    #: When :meth:`refresh_backend` may next look at the user list.
    refresh_after: float = 0.0
    stopping: bool = False
    exit_status: int = 0
    #: The backend prepared in the master (user list read, modules imported), inherited by workers.
    authenticator: Authenticator | None = None
    #: Per-worker heartbeats and per-address state shared with the workers (made in :meth:`run`).
    limits: SharedLimits | None = None
    #: Root mode: the pool's post-login processes (see tpops.postlogin); None otherwise.
    post_login: Registry | None = None
    slots_warned: bool = False
    #: ``tpops --status`` control socket, session board and metrics (:mod:`tpops.status`).
    monitor: Monitor | None = None
    started: float = field(default_factory=time.time)
    #: systemd's ``Type=notify`` channel (does nothing outside systemd): READY=1 once the
    #: first worker booted, RELOADING=1/READY=1 around a reload, STOPPING=1, STATUS= lines.
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    #: The listeners came from systemd (socket activation): their addresses are the socket
    #: unit's business, never compared with ``$port``/``$bind_address`` on reload.
    inherited: bool = False
    last_status: str = ""
    status_at: float = 0.0
    #: The loaded certificate (None: TLS off) and the fds of the implicit-TLS listeners
    #: (``$tls_port``, systemd's ``pop3s``), among :attr:`listeners`.
    server_tls: ServerTLS | None = None
    tls_listeners: frozenset[int] = frozenset()
    #: Loads the certificate of a reloaded configuration (raises TLSConfigError).
    load_tls: Callable[[Config], ServerTLS | None] = tls_from_config

    # -- signal plumbing ---------------------------------------------------

    def _queue_signal(self, signum: int, frame: object) -> None:
        # Only record it (the loop does the work). A signal already queued is not queued
        # twice, so a storm of SIGCHLD can never push out a SIGTERM.
        if signum not in self.signals:
            self.signals.append(signum)

    def run(self) -> int:
        """The master loop; returns the process exit status."""
        setproctitle("tpops: master")
        self.monitor = Monitor(self.config, max(self.config.max_servers, MIN_SLOTS))
        self.monitor.start(self.listeners)
        self.report_r, self.report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for signum in MASTER_SIGNALS:
            signal.signal(signum, self._queue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.authenticator = warm_up(self.config)
        if self.limits is None:
            self.limits = SharedLimits(max(self.config.max_servers, MIN_SLOTS))
        self.start_post_login()
        gc.freeze()  # workers share the master's objects: no collection copies their pages
        addresses = ", ".join(address_of(s) for s in self.listeners)
        log.info("tpops master %d listening on %s", os.getpid(), addresses)
        if self.server_tls is not None:
            log.info("TLS certificate %s (%s)", self.server_tls.cert_file, self.server_tls.subject)
        warn_plaintext(self.config, self.listeners)
        try:
            while not self.stopping:
                self.scale()
                if self.stopping:
                    break
                ready, _, _ = select.select([self.report_r, self.wake_r, *self.monitor.fds()], [], [], TICK)
                self.monitor.handle(ready, self.status)
                if self.wake_r in ready:
                    drain(self.wake_r)
                if self.report_r in ready:
                    self.read_reports()
                self.handle_signals()
                self.reap()
                self.murder_stuck()
                self.retire_idle()
                self.monitor.pool(*self.busy_idle())
                self.monitor.maintain(time.monotonic())
                self.report_status()
                self.refresh_backend()
                if ready == [self.report_r] and not self.signals:
                    # Only workers' busy/idle reports woke us: let the next ones gather
                    # (at hundreds of logins a second, a full pass per report costs more
                    # than the few milliseconds of reaction this gives away).
                    time.sleep(REPORT_BATCH)
        finally:
            self.monitor.close()  # first: it reaps its exporter by pid, before shutdown reaps any child
            self.shutdown()
            self.stop_post_login()
            self.monitor.remove_files()  # last: no process that could still open one is left
        return self.exit_status

    # -- systemd -------------------------------------------------------------

    def pool_status(self) -> str:
        """One line for ``systemctl status``: the pool's size and how busy it is."""
        busy = sum(1 for w in self.workers.values() if w.state == BUSY)
        return (f"{len(self.workers)} workers ({busy} busy, {len(self.workers) - busy} idle), "
                f"max {self.config.max_servers}")

    def report_status(self) -> None:
        """Send STATUS= when the pool changed, at most once a second (no datagram per connection)."""
        if not self.notifier.enabled or not self.ever_booted:
            return
        now = time.monotonic()
        status = self.pool_status()
        if status != self.last_status and now - self.status_at >= TICK:
            self.notifier.status(status)
            self.last_status, self.status_at = status, now

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.stopping:  # a reload queued behind SIGTERM would only fork to no end
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping", signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.reload(force=True)
            elif signum == signal.SIGUSR1:
                self.reload(force=False)

    # -- the pool ----------------------------------------------------------

    def scale(self) -> None:
        """Fork workers: at least $min_servers, and while below $max_servers two idle ones
        plus one for each connection already waiting in the listen queue (a burst is met
        with as many workers at once, not two per round trip)."""
        waiting = None
        if self.backoff:
            # Workers fail to boot: one attempt at a time, each after the current delay.
            if time.monotonic() < self.spawn_after or any(not w.booted for w in self.workers.values()):
                return
            self.spawn()
            return
        while True:
            active = [w for w in self.workers.values() if not w.retiring]
            idle = sum(1 for w in active if w.state == IDLE)
            total = len(self.workers)
            if total >= self.config.max_servers:
                return
            if len(active) >= self.config.min_servers and idle >= SPARE_WORKERS:
                if waiting is None:
                    waiting = waiting_connections(self.listeners)
                if idle >= SPARE_WORKERS + waiting:
                    return
            if not self.spawn():
                return

    def start_post_login(self) -> None:
        """Root mode: the registry of post-login processes and their socket directory;
        the master adopts those whose worker ended (it reaps them, and waits for them)."""
        if os.geteuid() != 0 or self.config.user is not None or self.config.post_login_workers <= 0:
            return
        try:
            become_subreaper()
            self.post_login = Registry(self.config.post_login_workers, make_directory())
        except OSError as exc:
            log.error("no post-login processes (each root-mode session ends its worker): %s", exc)

    def retire_post_login(self, signum: int) -> None:
        """End every post-login process (a reload: new ones start with the new configuration;
        SIGUSR1 lets a session finish, SIGTERM cuts it). Their entries go at once, so no
        worker hands them another session."""
        if self.post_login is None:
            return
        for entry in self.post_login.retire():
            remove_socket(self.post_login.path(entry.pid, entry.identity))
            try:
                os.kill(entry.pid, signum)
            except ProcessLookupError:
                pass

    def stop_post_login(self) -> None:
        """At exit: no post-login process left running, the socket directory removed."""
        if self.post_login is None:
            return
        self.retire_post_login(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
        shutil.rmtree(self.post_login.directory, ignore_errors=True)
        self.post_login.close()

    def _free_slot(self) -> int | None:
        assert self.limits is not None
        used = {w.slot for w in self.workers.values()}
        for slot in range(self.limits.slots):
            if slot not in used:
                return slot
        if not self.slots_warned:
            log.warning("$max_servers above %d needs a restart; running %d workers",
                        self.limits.slots, len(self.workers))
            self.slots_warned = True
        return None

    def spawn(self) -> bool:
        slot = self._free_slot()
        if slot is None:
            return False
        assert self.limits is not None
        self.limits.reset_slot(slot)
        # Blocked across fork(): a signal meant for the new worker waits until the worker
        # has its own handlers (it unblocks them), instead of landing in the master's queue
        # it inherited, where nobody would ever look at it.
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            log.error("cannot fork a worker: %s", exc)
            return False
        if pid == 0:  # the child: never return into the master's loop
            status = 1
            try:
                status = self._worker_main(slot)
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
                status = 1
            finally:
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        now = time.monotonic()
        self.workers[pid] = WorkerInfo(pid, now, IDLE, now, slot=slot, limit=watchdog_limit(self.config))
        return True

    def _worker_main(self, slot: int) -> int:
        os.close(self.report_r)
        os.close(self.wake_r)
        os.close(self.wake_w)
        signal.set_wakeup_fd(-1)
        self.signals.clear()
        worker = Worker(self.config, self.listeners, self.report_w, self.log_files, self.authenticator,
                        limits=self.limits, slot=slot, monitor=self.monitor, server_tls=self.server_tls,
                        tls_listeners=self.tls_listeners, registry=self.post_login)
        return worker.run()

    def read_reports(self) -> None:
        """Drain the report pipe (so workers never find it full) and update the pool's view."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.report_r, REPORT.size * 4096)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        now = time.monotonic()
        for offset in range(0, len(data) - len(data) % REPORT.size, REPORT.size):
            pid, state = REPORT.unpack_from(data, offset)
            info = self.workers.get(pid)
            if info is None:
                continue
            if not info.booted:
                info.booted = True
                self.boot_failures = 0
                if not self.ever_booted:  # listeners bound and a worker serving: ready
                    self.ever_booted = True
                    info.state = state
                    self.notifier.ready(self.pool_status())
                if self.backoff:
                    log.warning("worker %d started: workers boot again, the pool is refilled", pid)
                    self.backoff = 0.0
            info.state = state
            info.since = now

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.workers.pop(pid, None)
            if info is None and self.post_login is not None:  # an adopted post-login process
                entry = self.post_login.free(pid)
                if entry is not None:
                    remove_socket(self.post_login.path(pid, entry.identity))
            code = os.waitstatus_to_exitcode(status)
            if self.monitor is not None:  # its session line goes; an abnormal death counts as a restart
                self.monitor.worker_gone(pid, info.slot if info else None,
                                         failed=info is not None and code != 0 and not info.retiring)
            if info is None:
                continue
            if self.limits is not None:  # its connection no longer counts for its client's address
                self.limits.reset_slot(info.slot)
            if code == 0 or info.retiring:
                continue
            if not info.booted or code == EXIT_BOOT_FAILED:
                self.boot_failures += 1
                if self.ever_booted:
                    # The server has worked with this configuration: the cause is in the
                    # environment (a file, a directory, a backend) and may go away. Never
                    # take the whole service down for it; retry with a growing delay.
                    self.backoff = min(max(1.0, self.backoff * 2), MAX_BACKOFF)
                    self.spawn_after = time.monotonic() + self.backoff
                    log.error("worker %d failed to start (exit status %d); next attempt in %d s",
                              pid, code, self.backoff)
                    continue
                log.error("worker %d failed to start (exit status %d)", pid, code)
                if self.boot_failures >= MAX_BOOT_FAILURES and not self.stopping:
                    log.error(
                        "workers keep failing at start-up (%d in a row): stopping; see the errors above",
                        self.boot_failures,
                    )
                    self.stopping = True
                    self.exit_status = EXIT_BOOT_FAILED
            elif code < 0:
                log.error("worker %d killed by signal %s; replacing it", pid, signal.Signals(-code).name)
            else:
                log.error("worker %d exited with status %d; replacing it", pid, code)

    def murder_stuck(self) -> None:
        """The watchdog: SIGKILL busy workers silent for longer than their limit."""
        if self.limits is None:
            return
        now = time.monotonic()
        for info in self.workers.values():
            if info.state != BUSY or info.killed:
                continue
            silent = now - max(info.since, self.limits.last_beat(info.slot))
            if silent > info.limit:
                log.error("worker %d made no progress for %d s (limit %d s: $command_timeout and a grace): "
                          "killing it", info.pid, silent, info.limit)
                for pid in self.post_login.serving(info.slot) if self.post_login is not None else []:
                    log.error("killing post-login process %d, which serves that worker's session", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._signal(info, signal.SIGKILL)
                info.killed = True

    def retire_idle(self) -> None:
        """Ask workers idle for more than $max_idle to exit while more than $min_servers run."""
        now = time.monotonic()
        active = [w for w in self.workers.values() if not w.retiring]
        surplus = len(active) - self.config.min_servers
        for info in sorted(active, key=lambda w: w.since):
            if surplus <= 0:
                return
            if info.state == IDLE and info.booted and now - info.since >= self.config.max_idle:
                self._signal(info, signal.SIGUSR1)
                info.retiring = True
                surplus -= 1

    def refresh_backend(self) -> None:
        """At most once a second: let the prepared backend re-read a changed user list
        (File: a large passwd-file is re-indexed here once, not in every worker); when
        it did, replace the workers after their session so the new ones share it."""
        now = time.monotonic()
        if now < self.refresh_after:
            return
        self.refresh_after = now + TICK
        refresh = getattr(self.authenticator, "refresh", None)
        if refresh is None or not refresh():
            return
        gc.freeze()
        log.info("user list changed: re-read by the master, replacing workers")
        for info in self.workers.values():
            if not info.retiring:
                self._signal(info, signal.SIGUSR1)
                info.retiring = True

    def _signal(self, info: WorkerInfo, signum: int) -> None:
        try:
            os.kill(info.pid, signum)
        except ProcessLookupError:
            pass

    def busy_idle(self) -> tuple[int, int]:
        busy = sum(1 for w in self.workers.values() if w.state == BUSY)
        return busy, len(self.workers) - busy

    def status(self) -> dict[str, object]:
        """The pool for ``tpops --status`` (the sessions come from the board)."""
        from tpops import __version__

        busy, idle = self.busy_idle()
        return {"version": __version__, "pid": os.getpid(), "started": self.started,
                "listening": ", ".join(address_of(s) for s in self.listeners), "workers": len(self.workers),
                "busy": busy, "idle": idle, "spares": SPARE_WORKERS, "min_servers": self.config.min_servers,
                "max_servers": self.config.max_servers}

    # -- reload and stop ---------------------------------------------------

    def reload(self, force: bool) -> None:
        """SIGHUP (force) / SIGUSR1: new configuration, reopened logs, fresh workers.

        A configuration that does not load, or whose pre-flight worker cannot boot, is
        logged and changes nothing: the running configuration and workers go on (their
        replacements might not boot, and a reload must never take the service down).
        The master still reopens its own logs (logrotate's rename-then-signal); the
        running workers write to the files they have until they are recycled
        (``$max_use``, ``$max_idle``) or the next good reload.
        """
        name = "SIGHUP" if force else "SIGUSR1"
        self.notifier.reloading(f"reloading ({name})")
        try:
            self._reload(name, force)
        finally:
            self.notifier.ready(self.pool_status())

    def _reload(self, name: str, force: bool) -> None:
        try:
            config = self.reload_config()
            server_tls = self._reload_tls(name, config)
        except TLSConfigError as exc:
            log.error("%s: certificate not reloaded, keeping the running configuration, certificate "
                      "and workers: %s", name, _one_line(exc))
            try:
                self.log_files.reopen()
            except OSError as reopen_error:
                log.error("%s: cannot reopen the logs, keeping the open ones: %s", name, reopen_error)
            return
        except (ConfigError, OSError, ValueError) as exc:
            log.error("%s: configuration not reloaded, keeping the running one and its workers: %s",
                      name, _one_line(exc))
            try:
                self.log_files.reopen()
            except OSError as reopen_error:
                log.error("%s: cannot reopen the logs, keeping the open ones: %s", name, reopen_error)
            return
        if not self.inherited and (config.port, config.bind_address) != (self.config.port, self.config.bind_address):
            log.warning("%s: a new $port or $bind_address needs a restart; still listening on %s",
                        name, ", ".join(address_of(s) for s in self.listeners))
        elif not self.inherited and config.tls_port != self.config.tls_port:
            log.warning("%s: a new $tls_port needs a restart; still listening on %s",
                        name, ", ".join(address_of(s) for s in self.listeners))
        config = dataclasses.replace(config, port=self.config.port, bind_address=self.config.bind_address,
                                     tls_port=self.config.tls_port)
        try:
            new_logs = self.reopen_logs(config)
        except OSError as exc:
            log.error("%s: cannot reopen the logs, keeping the open ones: %s", name, exc)
        else:
            old_logs, self.log_files = self.log_files, new_logs
            old_logs.close()  # the workers being replaced keep their own copies until they exit
        self.config = config
        self.server_tls = server_tls
        self.authenticator = warm_up(config)
        gc.freeze()
        log.info("%s: configuration reloaded, replacing workers", name)
        self.retire_post_login(signal.SIGTERM if force else signal.SIGUSR1)
        for info in self.workers.values():
            if not info.retiring or force:
                self._signal(info, signal.SIGTERM if force else signal.SIGUSR1)
            info.retiring = True

    def _reload_tls(self, name: str, config: Config) -> ServerTLS | None:
        """The certificate of the reloaded configuration, loaded anew (a renewed one takes
        effect for new connections). Raises TLSConfigError. TLS cannot be switched off
        while an implicit-TLS listener is open: that needs a restart (the running
        certificate stays)."""
        server_tls = self.load_tls(config)
        if server_tls is None and self.tls_listeners:
            log.warning("%s: removing $tls_cert_file needs a restart (the TLS port is open); "
                        "keeping the running certificate", name)
            return self.server_tls
        if server_tls is not None:
            if self.server_tls is None and config.tls_port is not None and not self.inherited:
                log.warning("%s: TLS is now on for STLS; the TLS port %d opens at the next restart",
                            name, config.tls_port)
            log.info("%s: TLS certificate %s (%s)", name, server_tls.cert_file, server_tls.subject)
        return server_tls

    def shutdown(self) -> None:
        """Stop accepting, end every worker (SIGKILL after STOP_GRACE), reap them all."""
        self.notifier.stopping(f"stopping {len(self.workers)} workers")
        for listener in self.listeners:
            listener.close()
        for info in self.workers.values():
            self._signal(info, signal.SIGTERM)
        self.retire_post_login(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.workers and time.monotonic() < deadline:
            self.reap_quietly()
            time.sleep(0.02)
        for info in list(self.workers.values()):
            log.warning("worker %d did not stop in time: killing it", info.pid)
            self._signal(info, signal.SIGKILL)
        while self.workers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.pop(pid, None)
        log.info("tpops master %d stopped", os.getpid())

    def reap_quietly(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            self.workers.pop(pid, None)


#: ``struct tcp_info`` up to ``tcpi_unacked``, which on a listening socket is the number
#: of connections waiting to be accepted (Linux).
_TCP_INFO = struct.Struct("=8B5I")


def waiting_connections(listeners: list[socket.socket]) -> int:
    """Connections in the listen queues, not yet accepted by a worker (0 where unknown)."""
    total = 0
    for sock in listeners:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except (OSError, AttributeError):
            continue
        if len(info) >= _TCP_INFO.size:
            total += _TCP_INFO.unpack_from(info)[-1]
    return total


def _one_line(exc: BaseException) -> str:
    return "; ".join(str(exc).splitlines())


def address_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenError(Exception):
    """A listening address cannot be bound; the message names it and the likely fix."""


#: What a bind error means to an admin, and what to do about it.
_LISTEN_HINTS = {
    errno.EACCES: "permission denied (run as root, or pick --port above 1023)",
    errno.EADDRINUSE: "address already in use (another POP3 server running?)",
    errno.EADDRNOTAVAIL: "address not available (not an address of this host: check --bind/$bind_address)",
}


def _listen_error(family: int, sockaddr: tuple, exc: OSError) -> ListenError:  # type: ignore[type-arg]
    host, port = sockaddr[0], sockaddr[1]
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    reason = _LISTEN_HINTS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    return ListenError(f"cannot listen on {where}: {reason}")


def warn_plaintext(config: Config, listeners: list[socket.socket]) -> bool:
    """Log one warning when passwords may cross the network in clear: a listener on a
    non-loopback address and ``$disable_plaintext_auth`` off. True when it warned."""
    if config.plaintext_auth_disabled():
        return False
    exposed = [address_of(s) for s in listeners if not _loopback_listener(s)]
    if not exposed:
        return False
    log.warning("passwords travel in clear: listening on %s with $disable_plaintext_auth = false "
                "(USER/PASS and APOP allowed without TLS); configure $tls_cert_file and set "
                "$disable_plaintext_auth = true", ", ".join(exposed))
    return True


def _loopback_listener(sock: socket.socket) -> bool:
    try:
        host = str(sock.getsockname()[0])
    except OSError:
        return False
    return Connection(host).loopback  # the wildcard addresses are not loopback


def make_listeners(config: Config, port: int | None = None) -> list[socket.socket]:
    """Bind every ``$bind_address`` (default: all addresses, IPv6 and IPv4) on ``$port``
    (or ``port``: the implicit-TLS listeners are made on ``$tls_port`` the same way).

    Raises :class:`ListenError` naming the address and the likely fix
    (``cannot listen on 0.0.0.0:110: permission denied (run as root, or pick --port
    above 1023)``).
    """
    addresses = config.bind_addresses()
    port = config.port if port is None else port
    sockets: list[socket.socket] = []
    try:
        if not addresses:
            try:
                sockets.append(_listen(socket.AF_INET6, ("::", port), dual_stack=True))
            except OSError as exc:
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                    raise _listen_error(socket.AF_INET6, ("::", port), exc) from None
                sockets.append(_listen(socket.AF_INET, ("0.0.0.0", port)))  # noqa: S104  ($bind_address nil: all)
            return sockets
        for address in addresses:
            try:
                infos = socket.getaddrinfo(
                    address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                raise ListenError(f"cannot listen on {address}: {exc.strerror} (check --bind/$bind_address)") from None
            family, _, _, _, sockaddr = infos[0]
            sockets.append(_listen(family, sockaddr))
        return sockets
    except BaseException:
        for sock in sockets:
            sock.close()
        raise


def _listen(family: int, sockaddr: tuple, dual_stack: bool = False) -> socket.socket:  # type: ignore[type-arg]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(family, sockaddr, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock
