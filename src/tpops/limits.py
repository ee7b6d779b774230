"""Per-address state shared by the whole worker pool: connection counts, failed-login penalties, heartbeats.

The master creates one :class:`SharedLimits` before it forks any worker: an anonymous
shared memory file (``memfd_create``) mapped into every process, and locked with POSIX
record locks (``lockf``) on that same file. Record locks belong to a process and the
kernel drops them when it dies, so a worker killed with SIGKILL while holding the
lock (the watchdog does that) can never wedge the pool, which a semaphore would.

The table has two parts:

* one slot per worker (the master hands each worker its slot index at fork): the
  worker's last sign of life for the master's watchdog (:meth:`SharedLimits.beat`),
  and the key of the address it is serving. The number of connections from an
  address is the number of slots holding its key, so there is no counter to get
  wrong: when a worker dies, the master clears its slot and the count is right again.
* an open-addressing table of failed-login penalties per address (Dovecot's auth
  penalty): ``0, 1, 2, 4, 8, 15`` seconds after ``0, 1, 2, 3, 4, 5+`` failures, the
  cap set by ``$max_auth_penalty``; a success resets it, and an entry is forgotten
  :data:`PENALTY_EXPIRY` seconds after its last failure.

The lock is taken only where a decision needs a consistent view: counting an
address's connections against the limit, and changing a penalty entry. A worker
clears its own slot without it (one aligned store; only its worker writes a slot,
and a count that races with the clear is the same as one just before or after it),
and a successful login looks for a penalty entry without it first (the common case,
no entry, then costs no lock at all). With dozens of workers on two cores, a lock
held by a preempted process stalls every other one: a session now takes it once
(to be counted), where it took it five times.

Addresses are keyed by a keyed hash (a random key per master), so a client cannot
aim collisions at another address. An IPv6 client is keyed by its /64 network (one
subscriber's allocation: counting single addresses would let it take 2^64 of them);
an IPv4-mapped IPv6 address counts as the IPv4 address.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import mmap
import os
import secrets
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds after its last failure that an address's penalty is forgotten.
PENALTY_EXPIRY = 15 * 60
#: Entries in the penalty table; a full table evicts the stalest entry in the probe window.
PENALTY_ENTRIES = 4096
#: How many neighbouring entries a lookup probes (open addressing, linear probing).
PENALTY_PROBES = 16

#: A worker slot: last heartbeat (CLOCK_MONOTONIC, system-wide on Linux), address key.
_SLOT = struct.Struct("=dQ")
#: A penalty entry: address key, failures, last failure (CLOCK_MONOTONIC).
_ENTRY = struct.Struct("=QIxxxxd")
#: The key word at the start of a penalty entry.
_KEY = struct.Struct("=Q")


def address_key_text(address: str) -> str:
    """The unit an address is counted in: IPv4 as is, IPv6 as its /64, anything else verbatim."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def penalty_for(failures: int, cap: float) -> float:
    """Seconds of delay after ``failures`` failed logins: 0, 1, 2, 4, 8 ... capped at ``cap``."""
    if failures <= 0 or cap <= 0:
        return 0.0
    return float(min(2 ** min(failures - 1, 16), cap))


def shared_memory(name: str, size: int) -> tuple[int, mmap.mmap]:
    """``size`` zeroed octets the master maps before it forks, so every worker shares them:
    an anonymous ``memfd`` (no path anyone could open) and a ``MAP_SHARED`` mapping. The
    descriptor stays open for ``lockf`` locks, which die with their holder."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


class SharedTable:
    """Shared memory (:func:`shared_memory`) and its ``lockf`` lock: the base of the pool's
    tables (this module's, and :class:`tpops.postlogin.Registry`)."""

    def __init__(self, name: str, size: int) -> None:
        self.fd, self.map = shared_memory(name, size)

    def close(self) -> None:
        """Unmap and close (the master at exit; other processes keep their own mappings)."""
        self.map.close()
        os.close(self.fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


class SharedLimits(SharedTable):
    """The shared table (see the module docstring); every method is safe across processes.

    ``slots`` is the number of worker slots; the master never runs more workers than that.
    """

    def __init__(self, slots: int, penalty_entries: int = PENALTY_ENTRIES) -> None:
        self.slots = slots
        self.penalty_entries = penalty_entries
        self.secret = secrets.token_bytes(16)
        self._penalty_base = slots * _SLOT.size
        #: Every slot read at once as 64-bit words (heartbeat bits, key): counting an
        #: address's slots is one C call, not a Python loop over the table, under the lock.
        self._slot_words = struct.Struct(f"={2 * slots}Q")
        size = self._penalty_base + penalty_entries * _ENTRY.size
        self._last_address: str | None = None
        self._last_key = 0
        super().__init__("tpops-limits", size)

    def key(self, address: str) -> int:
        """The address's 64-bit key (never 0, which marks a free slot or entry).

        The last address's key is remembered: a worker asks for the same client's key
        several times per session (its connection, its penalty), and parsing the
        address and hashing it is most of the cost of each call."""
        if address == self._last_address:
            return self._last_key
        digest = hashlib.blake2b(address_key_text(address).encode("utf-8", "surrogateescape"),
                                 digest_size=8, key=self.secret).digest()
        key = int.from_bytes(digest, "little") or 1
        self._last_address, self._last_key = address, key
        return key

    # -- worker slots: heartbeat and the address being served -------------------

    def reset_slot(self, slot: int) -> None:
        """A fresh slot for a new worker, or a dead worker's slot given back (master)."""
        with self._locked():
            _SLOT.pack_into(self.map, slot * _SLOT.size, time.monotonic(), 0)

    def beat(self, slot: int) -> None:
        """The worker's sign of progress, read by the master's watchdog (no lock: one aligned store)."""
        self.map[slot * _SLOT.size:slot * _SLOT.size + 8] = struct.pack("=d", time.monotonic())

    def last_beat(self, slot: int) -> float:
        return float(struct.unpack_from("=d", self.map, slot * _SLOT.size)[0])

    def enter(self, slot: int, address: str, limit: int) -> int:
        """Record that ``slot`` serves ``address``; return how many slots (this one
        included) now serve it. With ``limit`` > 0 and the count above it, the slot is
        cleared again before returning (the caller refuses the connection)."""
        key = self.key(address)
        with self._locked():
            _SLOT.pack_into(self.map, slot * _SLOT.size, time.monotonic(), key)
            count = self._count(key)
            if limit > 0 and count > limit:
                _SLOT.pack_into(self.map, slot * _SLOT.size, time.monotonic(), 0)
        return count

    def leave(self, slot: int) -> None:
        """The session in ``slot`` ended (no lock: see the module docstring)."""
        _SLOT.pack_into(self.map, slot * _SLOT.size, time.monotonic(), 0)

    def connections(self, address: str) -> int:
        """How many workers serve ``address`` now."""
        key = self.key(address)
        with self._locked():
            return self._count(key)

    def _count(self, key: int) -> int:
        """How many slots hold ``key`` (called with the lock held)."""
        return self._slot_words.unpack_from(self.map, 0)[1::2].count(key)

    # -- failed-login penalty ----------------------------------------------------

    def _find(self, key: int, now: float, create: bool) -> int | None:
        """The offset of ``key``'s live entry; with ``create``, of a free, expired or
        stalest entry claimed for it. Called with the lock held."""
        start = key % self.penalty_entries
        victim: int | None = None
        victim_age = -1.0
        for probe in range(PENALTY_PROBES):
            offset = self._penalty_base + ((start + probe) % self.penalty_entries) * _ENTRY.size
            entry_key, _failures, last = _ENTRY.unpack_from(self.map, offset)
            expired = entry_key == 0 or now - last >= PENALTY_EXPIRY
            if entry_key == key and not expired:
                return offset
            age = float("inf") if expired else now - last
            if age > victim_age:
                victim, victim_age = offset, age
        if not create or victim is None:
            return None
        _ENTRY.pack_into(self.map, victim, key, 0, now)
        return victim

    def _may_have_entry(self, key: int) -> bool:
        """Whether ``key`` has an entry in its probe window, read without the lock (the
        key words only, each one aligned store): False is exact unless a failure is
        being recorded for this very address at this instant, which is the same as that
        failure coming just after the caller's question."""
        start = key % self.penalty_entries
        for probe in range(PENALTY_PROBES):
            offset = self._penalty_base + ((start + probe) % self.penalty_entries) * _ENTRY.size
            if _KEY.unpack_from(self.map, offset)[0] == key:
                return True
        return False

    def failures(self, address: str) -> int:
        """Failed logins from ``address`` not yet forgotten or reset by a success."""
        key = self.key(address)
        if not self._may_have_entry(key):
            return 0
        now = time.monotonic()
        with self._locked():
            offset = self._find(key, now, create=False)
            return 0 if offset is None else int(_ENTRY.unpack_from(self.map, offset)[1])

    def penalty(self, address: str, cap: float) -> float:
        """Seconds to wait before answering ``address``'s next login attempt (see :func:`penalty_for`)."""
        return penalty_for(self.failures(address), cap)

    def record_failure(self, address: str) -> int:
        """One more failed login from ``address``; returns its failure count."""
        key = self.key(address)
        now = time.monotonic()
        with self._locked():
            offset = self._find(key, now, create=True)
            assert offset is not None
            _, failures, _ = _ENTRY.unpack_from(self.map, offset)
            failures = min(failures + 1, 0xFFFFFFFF)
            _ENTRY.pack_into(self.map, offset, key, failures, now)
            return int(failures)

    def record_success(self, address: str) -> None:
        """A successful login from ``address`` forgives its failures."""
        key = self.key(address)
        if not self._may_have_entry(key):
            return
        now = time.monotonic()
        with self._locked():
            offset = self._find(key, now, create=False)
            if offset is not None:
                _ENTRY.pack_into(self.map, offset, 0, 0, 0.0)


class ClientLimits:
    """One session's view of the shared table: the failed-login penalty of its client's address.

    ``shared`` is None where there is no pool (``--inetd``, tests of a lone Session):
    then there is no penalty beyond the session's own ``$error_interval``.
    """

    def __init__(self, shared: SharedLimits | None, address: str, cap: float) -> None:
        self.shared = shared
        self.address = address
        self.cap = cap

    def penalty(self) -> float:
        """Seconds added to the pause after this client's next failed login (0 when none)."""
        if self.shared is None or self.cap <= 0:
            return 0.0
        return self.shared.penalty(self.address, self.cap)

    def record_failure(self) -> None:
        """A failed login (any failure path, so that failures cannot be told apart)."""
        if self.shared is not None and self.cap > 0:
            self.shared.record_failure(self.address)

    def record_success(self) -> None:
        """A successful login: the address's failures are forgiven."""
        if self.shared is not None:
            self.shared.record_success(self.address)
