"""Prometheus metrics (``$metrics_address``): prometheus-client's multiprocess mode, served by an exporter child.

Imported only when ``$metrics_address`` is set (``pip install 'tpops[metrics]'``).

How, and why:

* **Multiprocess mode**, made for prefork servers: every process writes its own
  ``<type>_<pid>.db`` file in ``PROMETHEUS_MULTIPROC_DIR``; a scrape sums them. The
  directory is private to this master: ``/run/tpops/metrics-<port>`` as root
  (``/var/tmp/tpops-<uid>.metrics-<port>`` otherwise), emptied at start, mode 2750,
  group = the exporter's group, removed at stop. :func:`mark_process_dead` removes a
  reaped worker's live-gauge files. Counters and histograms of processes that are gone
  must not vanish (the totals would drop when a worker is recycled), nor pile up (one
  pair of files per worker ever recycled and per post-login process ever ended, each
  read by every scrape): :meth:`Metrics.compact`, every :data:`COMPACT_INTERVAL`
  seconds in the master, folds them into ``counter_0.db`` and ``histogram_0.db`` (pid
  0 is no process's). It swaps the new archive in and removes the folded files under
  an exclusive ``flock`` of :data:`SCRAPE_LOCK`, which the exporter holds shared while
  it reads, so no scrape sees a file counted twice or not at all.
* **Privileges**: workers drop to ``--user`` or to each mailbox's owner. A directory
  they could write would let a local user forge or delete everyone's numbers, so they
  never create files after the drop: :meth:`Metrics.in_worker`, called in the fresh
  worker while still root, opens its files (prometheus-client opens them on a
  process's first update, and every label value is created in the master beforehand,
  so nothing new is opened later). The open memory mappings stay writable after the
  drop; the files and the directory stay root's (files 0640, directory 2750), so the
  identity a worker runs as cannot touch any file by name.
* **The exporter**: a dedicated child process forked by the master, which only reads
  the directory and answers HTTP (prometheus-client's own server). Not a thread in the
  master, which forks workers (threads and fork do not mix); not a responder in the
  master's loop, whose job is the pool. The exporter binds ``$metrics_address``, then
  drops to ``$user``/``$group`` (else ``nobody``) with the directory's group, so the
  HTTP parser never runs as root. The master reaps it with the workers and stops it
  with SIGTERM at exit; if it dies, metrics are unavailable until the next start (the
  pool goes on).

Metric names start with ``tpops_``: connections, logins by result, commands by verb,
octets and messages sent, messages deleted, session duration and login latency
histograms, pool busy/idle gauges (the master's), worker restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tpops import logs
from tpops.config import Config, parse_address
from tpops.mailbox.lock import DEFAULT_LOCK_PARENT

log = logs.get("metrics")

#: Verbs and login results labelled (every value is created in the master: see the module docstring).
#: How often the master folds the files of processes that are gone (see the module docstring).
COMPACT_INTERVAL = 10.0
#: The lock file that keeps scrapes and the master's swaps apart.
SCRAPE_LOCK = "scrape.lock"
#: The types whose files outlive their process (gauges are the master's or live ones).
_ARCHIVED_TYPES = ("counter", "histogram")
_ARCHIVE_PID = 0

VERBS = ("USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT", "STAT", "LIST", "RETR", "TOP",
         "DELE", "NOOP", "RSET", "UIDL", "other")
LOGIN_RESULTS = ("ok", "auth", "in-use", "sys")
SESSION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
AUTH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def metrics_dir(port: int) -> str:
    """The private multiprocess directory of a master serving POP3 on ``port``."""
    if os.geteuid() == 0:
        return os.path.join(DEFAULT_LOCK_PARENT, f"metrics-{port}")
    return f"/var/tmp/tpops-{os.geteuid()}.metrics-{port}"  # noqa: S108  (created private, checked)


def exporter_identity(config: Config) -> tuple[int, int] | None:
    """(uid, gid) the exporter drops to as root: ``$user``/``$group``, else ``nobody``; None when not root."""
    if os.geteuid() != 0:
        return None
    from tpops.privileges import lookup_identity

    if config.user is not None:
        identity = lookup_identity(config.user, config.group)
        return identity.uid, identity.gid
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _fresh_dir(path: str, gid: int | None) -> None:
    """``path`` emptied (or created), root's, 2750 with group ``gid``; never through a symlink."""
    parent = os.path.dirname(path)
    if parent == DEFAULT_LOCK_PARENT and os.geteuid() == 0:
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    os.mkdir(path, 0o700)
    if gid is not None:
        os.chown(path, 0, gid)
    os.chmod(path, 0o2750 if gid is not None else 0o700)
    os.close(os.open(os.path.join(path, SCRAPE_LOCK), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))


@dataclass
class Metrics:
    """The metric objects (made in the master, inherited by workers) and the exporter child."""

    path: str
    address: tuple[str, int]
    identity: tuple[int, int] | None
    objects: dict[str, Any]
    exporter_pid: int = 0

    @classmethod
    def start(cls, config: Config) -> Metrics | None:
        """Make the directory and the metrics; None (logged) when metrics cannot work."""
        assert config.metrics_address is not None
        try:
            address = parse_address(config.metrics_address)
            identity = exporter_identity(config)
            path = metrics_dir(config.port)
            _fresh_dir(path, identity[1] if identity else None)
        except (ValueError, KeyError, OSError) as exc:
            log.error("metrics disabled: %s", exc)
            return None
        # prometheus-client chooses its multiprocess value class when it is imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        try:
            import prometheus_client as prom
        except ImportError:
            log.error("metrics disabled: $metrics_address needs prometheus-client (pip install 'tpops[metrics]')")
            return None
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # in case something imported it earlier
        old_umask = os.umask(0o027)
        try:
            objects: dict[str, Any] = {
                "connections": prom.Counter("tpops_connections", "POP3 connections accepted"),
                "logins": prom.Counter("tpops_logins", "login attempts by result", ["result"]),
                "commands": prom.Counter("tpops_commands", "POP3 commands by verb", ["verb"]),
                "octets_sent": prom.Counter("tpops_sent_octets", "octets sent to clients"),
                "messages_sent": prom.Counter("tpops_messages_sent", "messages sent (RETR and TOP)"),
                "messages_deleted": prom.Counter("tpops_messages_deleted", "messages deleted in UPDATE"),
                "session_duration": prom.Histogram("tpops_session_duration_seconds", "session length",
                                                   buckets=SESSION_BUCKETS),
                "auth_latency": prom.Histogram("tpops_auth_duration_seconds",
                                               "time to check credentials and open the mailbox",
                                               buckets=AUTH_BUCKETS),
                "busy": prom.Gauge("tpops_workers_busy", "workers serving a session", multiprocess_mode="livesum"),
                "idle": prom.Gauge("tpops_workers_idle", "workers waiting for a connection",
                                   multiprocess_mode="livesum"),
                "restarts": prom.Counter("tpops_worker_restarts", "workers that died abnormally and were replaced"),
            }
            for verb in VERBS:
                objects["commands"].labels(verb)
            for result in LOGIN_RESULTS:
                objects["logins"].labels(result)
        finally:
            os.umask(old_umask)
        return cls(path, address, identity, objects)

    def __getattr__(self, name: str) -> Any:
        objects = self.__dict__.get("objects")
        if objects is not None and name in objects:
            return objects[name]
        raise AttributeError(name)

    # -- the exporter child ------------------------------------------------------

    def start_exporter(self, inherited: list[socket.socket]) -> None:
        """Bind ``$metrics_address`` and fork the exporter (see the module docstring)."""
        host, port = self.address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            log.error("metrics disabled: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            return
        pid = os.fork()
        if pid:
            sock.close()
            self.exporter_pid = pid
            log.info("metrics on http://%s:%d/metrics (exporter pid %d)", host, port, pid)
            return
        status = 1
        try:
            for other in inherited:
                other.close()
            self._serve(sock)
            status = 0
        except BaseException:
            log.exception("metrics exporter failed")
        finally:
            os._exit(status)

    def _serve(self, sock: socket.socket) -> None:
        """The exporter: drop privileges, then answer scrapes until SIGTERM."""
        from http.server import HTTPServer

        from prometheus_client import CollectorRegistry, multiprocess
        from prometheus_client.exposition import MetricsHandler

        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if self.identity is not None:
            uid, gid = self.identity
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        with contextlib.suppress(ImportError):
            from setproctitle import setproctitle

            setproctitle("tpops: metrics exporter")
        registry = CollectorRegistry()

        class Collector(multiprocess.MultiProcessCollector):
            """prometheus-client's multiprocess collector over the files that read whole."""

            def collect(self) -> Any:
                with _scrape_lock(self._path, fcntl.LOCK_SH):  # the master's swaps wait for it
                    files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _readable(f)]
                    return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]

        Collector(registry, path=self.path)  # type: ignore[no-untyped-call]

        class Handler(MetricsHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        Handler.registry = registry
        server = HTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.serve_forever()

    # -- the processes' updates ------------------------------------------------------

    def in_worker(self) -> None:
        """In a new worker, still root: open its files now (the first update after fork does)."""
        old_umask = os.umask(0o027)
        try:
            self.objects["connections"].inc(0)
        finally:
            os.umask(old_umask)

    def worker_gone(self, pid: int, *, failed: bool) -> None:
        """A reaped worker (or the exporter): its live gauges go; an abnormal death counts."""
        from prometheus_client import multiprocess

        if pid == self.exporter_pid:
            self.exporter_pid = 0
            log.error("the metrics exporter (pid %d) died; metrics unavailable until tpops restarts", pid)
            return
        multiprocess.mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
        if failed:
            self.objects["restarts"].inc()

    def compact(self) -> int:
        """Fold the counter and histogram files of processes that are gone into the
        archives (see the module docstring); the number of files folded. A scrape in
        progress makes this pass fold nothing: the next one will."""
        from prometheus_client.mmap_dict import MmapedDict, mmap_key
        from prometheus_client.multiprocess import MultiProcessCollector

        folded = 0
        for kind in _ARCHIVED_TYPES:
            gone = [path for path in glob.glob(os.path.join(self.path, f"{kind}_*.db")) if _gone(path)]
            if not gone:
                continue
            archive = os.path.join(self.path, f"{kind}_{_ARCHIVE_PID}.db")
            fresh = archive + ".new"  # not *.db: no scrape reads it before the swap
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fresh)
            # A process that died before sizing its file left nothing to fold (see _readable).
            sources = [path for path in [archive, *gone] if os.path.exists(path) and _readable(path)]
            old_umask = os.umask(0o027)
            try:
                values = MmapedDict(fresh)  # type: ignore[no-untyped-call]
                try:
                    for metric in MultiProcessCollector.merge(sources, accumulate=False):  # type: ignore[no-untyped-call]
                        for sample in metric.samples:
                            key = mmap_key(metric.name, sample.name, list(sample.labels),
                                           list(sample.labels.values()), metric.documentation)
                            values.write_value(key, sample.value, 0.0)  # type: ignore[no-untyped-call]
                finally:
                    values.close()  # type: ignore[no-untyped-call]
            finally:
                os.umask(old_umask)
            with _scrape_lock(self.path, fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
                if not locked:
                    os.unlink(fresh)
                    continue
                os.rename(fresh, archive)
                for path in gone:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            folded += len(gone)
        return folded

    def pool(self, busy: int, idle: int) -> None:
        self.objects["busy"].set(busy)
        self.objects["idle"].set(idle)

    def close(self) -> None:
        """Stop the exporter (the master at exit)."""
        if self.exporter_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.exporter_pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.exporter_pid, 0)
            self.exporter_pid = 0

    def remove_files(self) -> None:
        """Remove the directory (the master at exit, once its processes are gone): the
        next start would empty it anyway, and a stopped server leaves nothing in /run."""
        shutil.rmtree(self.path, ignore_errors=True)  # never follows a symlink


def _gone(path: str) -> bool:
    """Whether the file ``<type>_<pid>.db`` belongs to a process that no longer exists.

    The archive (pid 0) is no process's. A pid is taken again only after the kernel
    wrapped around ``pid_max``; a new process of that pid continues the old file, and is
    alive, so its file is left alone."""
    digits = os.path.basename(path).rsplit("_", 1)[-1].removesuffix(".db")
    if not digits.isdigit() or int(digits) == _ARCHIVE_PID:
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's (tpops without root)
        return False
    return False


@contextlib.contextmanager
def _scrape_lock(directory: str, operation: int) -> Iterator[bool]:
    """:data:`SCRAPE_LOCK` held with ``operation`` (``LOCK_SH``, or ``LOCK_EX | LOCK_NB``:
    then False when a scrape holds it)."""
    fd = os.open(os.path.join(directory, SCRAPE_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _readable(path: str) -> bool:
    """Whether a multiprocess file reads whole: a process that has just created its file
    (empty until prometheus-client sizes it) or is being removed must not fail a scrape."""
    from prometheus_client.mmap_dict import MmapedDict

    try:
        for _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
            pass
    except (OSError, ValueError, RuntimeError, struct.error):  # UnicodeDecodeError is a ValueError
        return False
    return True
