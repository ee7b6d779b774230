"""Process helpers from /proc: titles, children, workers of a tpops master, ids, exits; polling.

Shared by the daemon tests and scripts/bench. A process that is gone while being read
is skipped (or reported as gone), never an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


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



def proc_cmdline(pid: int) -> str:
    """The whole command line, arguments joined by spaces (Dovecot's titles span them); "" when gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def proc_stat_fields() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name: state, ppid, ...) of every
    process (those gone while reading are skipped)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        yield int(entry), stat[stat.rindex(")") + 2:].split()


def _proc_stats() -> Iterator[tuple[int, str, int]]:
    """(pid, state, ppid) of every process in /proc."""
    for pid, fields in proc_stat_fields():
        yield pid, fields[0], int(fields[1])


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
    """The pid of the process serving ``who``'s session (e.g. ``alice@127.0.0.1``): the
    worker titled ``tpops: worker WHO``, or in root mode the post-login process titled
    ``tpops: post-login WHO`` a worker handed the session to."""
    def find() -> int | None:
        for pid, title in worker_titles(master).items():
            if title == f"tpops: worker {who}":
                return pid
        for pid, title in post_login_processes(master).items():
            if title == f"tpops: post-login {who}":
                return pid
        return None
    return wait_for(find, timeout, what=f"a worker serving {who}")


def post_login_processes(master: int) -> dict[int, str]:
    """Root mode's post-login processes: pid -> title. They are children of the worker that
    forked them, or of the master once that worker has ended (it adopts them)."""
    out = {}
    for parent in [master, *worker_titles(master)]:
        for pid in proc_children(parent):
            title = proc_title(pid)
            if title and title.startswith("tpops: post-login"):
                out[pid] = title
    return out


def kept_processes(master: int) -> dict[int, str]:
    """The post-login processes bound to an identity (spares, forked ahead and still
    without one, left out): pid -> title."""
    return {pid: title for pid, title in post_login_processes(master).items() if title != "tpops: post-login spare"}


def post_login_serving(master: int, who: str, timeout: float = 5.0) -> int:
    """The pid of the post-login process titled ``tpops: post-login WHO`` (e.g. ``alice@127.0.0.1``)."""
    def find() -> int | None:
        for pid, title in post_login_processes(master).items():
            if title == f"tpops: post-login {who}":
                return pid
        return None
    return wait_for(find, timeout, what=f"a post-login process serving {who}")


def parent_of(pid: int) -> int:
    """The parent pid of ``pid``, from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


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



def proc_status_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB, from /proc/PID/status (empty when gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_pss_kib(pid: int) -> int | None:
    """The proportional set size of ``pid`` in KiB (/proc/PID/smaps_rollup); None when unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM to a process we started (by its PID), SIGKILL after ``timeout`` s; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
