"""The pool's shared per-address table (tpops.limits) across real forked processes:
connection counts, failed-login penalties, heartbeats, and a lock that dies with its holder."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from tpops import limits
from tpops.limits import PENALTY_EXPIRY, ClientLimits, SharedLimits, address_key_text, penalty_for


def in_children(count: int, job: Callable[[int], int]) -> list[int]:
    """Run ``job(i)`` in ``count`` forked processes at once; their exit statuses (job's return)."""
    go_r, go_w = os.pipe()
    pids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            status = 99
            try:
                os.close(go_w)
                os.read(go_r, 1)  # start together, to contend for the lock
                status = job(i)
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(go_r)
    os.close(go_w)  # EOF: everyone starts
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@pytest.fixture
def table() -> Iterator[SharedLimits]:
    shared = SharedLimits(16)
    yield shared
    shared.close()


def test_penalty_schedule_grows_and_is_capped() -> None:
    assert [penalty_for(n, 15) for n in range(8)] == [0, 1, 2, 4, 8, 15, 15, 15]
    assert penalty_for(1000, 15) == 15
    assert penalty_for(5, 0) == 0


def test_addresses_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    assert address_key_text("192.0.2.1") == "192.0.2.1"
    assert address_key_text("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key_text("2001:db8:1:2:aaaa::1") == address_key_text("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key_text("2001:db8:1:3::1") != address_key_text("2001:db8:1:2::1")
    assert address_key_text("unknown") == "unknown"


def test_failures_are_shared_across_processes_and_a_success_resets_them(table: SharedLimits) -> None:
    def fail_50(i: int) -> int:
        for _ in range(50):
            table.record_failure("192.0.2.7")
        return 0

    assert in_children(8, fail_50) == [0] * 8
    assert table.failures("192.0.2.7") == 400  # no update lost under contention
    assert table.penalty("192.0.2.7", 15) == 15
    assert table.failures("192.0.2.8") == 0
    assert table.penalty("192.0.2.8", 15) == 0
    # A success in another worker forgives the address everywhere.
    assert in_children(1, lambda i: table.record_success("192.0.2.7") or 0) == [0]
    assert table.failures("192.0.2.7") == 0
    table.record_failure("192.0.2.7")
    table.record_failure("192.0.2.7")
    assert table.penalty("192.0.2.7", 15) == 2


def test_failures_are_forgotten_after_the_expiry(table: SharedLimits, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(4):
        table.record_failure("198.51.100.1")
    assert table.penalty("198.51.100.1", 15) == 8
    now = time.monotonic()
    monkeypatch.setattr(limits.time, "monotonic", lambda: now + PENALTY_EXPIRY + 1)
    assert table.failures("198.51.100.1") == 0
    assert table.record_failure("198.51.100.1") == 1  # a fresh count


def test_a_full_penalty_table_evicts_instead_of_failing() -> None:
    shared = SharedLimits(1, penalty_entries=32)
    try:
        for i in range(1000):
            shared.record_failure(f"10.0.{i // 256}.{i % 256}")
        assert shared.failures("10.0.3.231") == 1  # the latest is there
        assert sum(shared.failures(f"10.0.{i // 256}.{i % 256}") for i in range(1000)) <= 32
    finally:
        shared.close()


def test_client_limits_without_a_pool_or_with_penalty_off_do_nothing(table: SharedLimits) -> None:
    lone = ClientLimits(None, "192.0.2.9", 15)
    lone.record_failure()
    assert lone.penalty() == 0
    off = ClientLimits(table, "192.0.2.9", 0)
    off.record_failure()
    assert off.penalty() == 0 and table.failures("192.0.2.9") == 0
    on = ClientLimits(table, "192.0.2.9", 15)
    for expected in (1, 2, 4, 8, 15):
        on.record_failure()
        assert on.penalty() == expected
    on.record_success()
    assert on.penalty() == 0


def test_connection_counts_admit_exactly_the_limit_across_processes(table: SharedLimits) -> None:
    # Eight workers accept a connection from one address at the same moment; limit 3.
    results = in_children(8, lambda slot: table.enter(slot, "203.0.113.5", 3))
    admitted = [n for n in results if n <= 3]
    assert sorted(admitted) == [1, 2, 3]
    assert table.connections("203.0.113.5") == 3  # the refused ones cleared their slots
    assert table.enter(10, "203.0.113.6", 3) == 1  # another address is not affected
    for slot in range(16):
        table.leave(slot)
    assert table.connections("203.0.113.5") == 0


def test_heartbeats_are_seen_by_the_master(table: SharedLimits) -> None:
    table.reset_slot(4)
    before = table.last_beat(4)
    time.sleep(0.01)
    assert in_children(1, lambda i: table.beat(4) or 0) == [0]
    assert table.last_beat(4) > before
    assert table.last_beat(5) == 0.0


@contextmanager
def lock_held_in_child(table: SharedLimits, hold: float) -> Iterator[int]:
    """A child process that holds the table's lock (until the block ends, ``hold`` seconds
    at most); yields its pid once the lock is held. The block may kill and reap it."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with table._locked():
                os.write(ready_w, b"x")
                select.select([release_r], [], [], hold)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield pid
    finally:
        os.write(release_w, b"x")
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)


def test_a_worker_killed_while_holding_the_lock_does_not_wedge_the_pool(table: SharedLimits) -> None:
    with lock_held_in_child(table, 60.0) as pid:
        os.kill(pid, signal.SIGKILL)  # the watchdog's way
        os.waitpid(pid, 0)
        began = time.monotonic()
        assert table.record_failure("192.0.2.77") == 1
        assert time.monotonic() - began < 1.0


def test_a_session_end_and_a_clean_login_do_not_wait_for_the_lock(table: SharedLimits) -> None:
    # With dozens of workers on two cores, a lock held by a preempted worker stalls
    # every process that asks for it: only counting a connection needs it.
    assert table.record_failure("192.0.2.80") == 1
    assert table.enter(3, "192.0.2.81", 0) == 1
    with lock_held_in_child(table, 3.0):
        began = time.monotonic()
        table.leave(3)  # the session from 192.0.2.81 ended
        table.record_success("192.0.2.81")  # no failures: nothing to forgive
        assert table.failures("192.0.2.81") == 0
        assert time.monotonic() - began < 0.5
    assert table.connections("192.0.2.81") == 0
    # An address with failures still goes through the lock, and is forgiven.
    assert table.failures("192.0.2.80") == 1
    table.record_success("192.0.2.80")
    assert table.failures("192.0.2.80") == 0


def test_the_remembered_key_follows_the_address(table: SharedLimits) -> None:
    a, b = table.key("192.0.2.90"), table.key("2001:db8::1")
    assert a != b
    assert table.key("192.0.2.90") == a and table.key("2001:db8::1") == b
    assert table.key("2001:db8::2") == b  # the same /64
    assert table.key("::ffff:192.0.2.90") == a  # IPv4-mapped counts as the IPv4 address
