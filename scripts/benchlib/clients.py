"""The load generators: logins over epoll, RETR (lockstep, pipelined), STAT+LIST+UIDL, a huge RETR."""

from __future__ import annotations

import collections
import errno
import multiprocessing
import os
import selectors
import socket
import ssl
import threading
import time

from benchlib.common import CONNECTION_LIMIT, GRACE, TERMINATOR
from benchlib.servers import Server
from tests.support.procs import proc_cmdline, proc_stat_fields, proc_status_kib


class Conn:
    """A blocking POP3 client connection with a small read buffer (lockstep use)."""

    def __init__(self, port: int, timeout: float = 60.0, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = bytearray()
        self.deadline = time.monotonic() + CONNECTION_LIMIT
        self.greeting = self.line()

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"connection open for more than {CONNECTION_LIMIT:.0f} s")

    def line(self) -> bytes:
        while True:
            self.check_deadline()
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text.split()[0]}: {reply[:100]!r}")
        return reply

    def multi(self, text: str) -> bytes:
        self.cmd(text)
        start = 0
        while True:
            self.check_deadline()
            i = self.buf.find(b".\r\n", start)
            if i == 0 or (i > 0 and self.buf[i - 2 : i] == b"\r\n"):
                out = bytes(self.buf[:i])
                del self.buf[: i + 3]
                return out
            if i > 0:
                start = i + 1
                continue
            start = max(0, len(self.buf) - 4)
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("connection closed in a multi-line reply")
            self.buf += data

    def login(self, user: str, password: str) -> None:
        self.cmd(f"USER {user}")
        self.cmd(f"PASS {password}")

    def quit(self) -> None:
        try:
            self.cmd("QUIT")
        finally:
            self.sock.close()


# -- login load generator: one process drives many connections with epoll

def _login_proc(port: int, creds: list[tuple[str, str]], t_begin: float, t_measure: float, t_end: float,
                q: multiprocessing.Queue, host: str = "127.0.0.1", source: str | None = None,
                clients: int | None = None) -> None:
    """``clients`` connections (default: one per user of ``creds``); each session takes the user that
    has been free the longest (round robin over ``creds``), so no two concurrent sessions share one."""
    addr = (host, port)
    sel = selectors.DefaultSelector()
    done = 0
    errors = 0
    error_samples: list[str] = []
    latencies: list[float] = []
    free = collections.deque((u.encode(), p.encode()) for u, p in creds)
    used: set[bytes] = set()
    slots: list[dict] = [{"sock": None} for _ in range(len(creds) if clients is None else clients)]
    assert len(slots) <= len(free), "fewer users than clients"
    active = 0

    def fail(slot: dict, why: str) -> None:
        nonlocal errors
        errors += 1
        if len(error_samples) < 5:
            error_samples.append(why)
        finish(slot, ok=False)

    def finish(slot: dict, ok: bool) -> None:
        nonlocal active, done
        sock = slot["sock"]
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        slot["sock"] = None
        free.append((slot["user"], slot["pw"]))
        active -= 1
        now = time.monotonic()
        if ok and t_measure <= now < t_end:
            done += 1
            latencies.append(now - slot["t0"])
        if now < t_end:
            start(slot)

    def start(slot: dict) -> None:
        nonlocal active
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.bind((source, 0))
        user, pw = free.popleft()
        used.add(user)
        slot.update(sock=sock, buf=b"", step=0, t0=time.monotonic(), user=user, pw=pw)
        active += 1
        rc = sock.connect_ex(addr)
        if rc in (0, errno.EINPROGRESS):
            slot["step"] = 0 if rc == 0 else -1
            sel.register(sock, selectors.EVENT_READ if rc == 0 else selectors.EVENT_WRITE, slot)
        else:
            slot["step"] = -2
            sel.register(sock, selectors.EVENT_READ, slot)
            fail(slot, f"connect: {os.strerror(rc)}")

    # steps: -1 connecting, 0 greeting, 1 USER, 2 PASS, 3 STAT, 4 QUIT, 5 waiting for the close
    def on_event(slot: dict) -> None:
        sock = slot["sock"]
        if slot["step"] == -1:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(slot, f"connect: {os.strerror(err)}")
                return
            slot["step"] = 0
            sel.modify(sock, selectors.EVENT_READ, slot)
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            fail(slot, f"recv: {exc}")
            return
        if not data:
            if slot["step"] == 5:
                finish(slot, ok=True)
            else:
                fail(slot, f"closed at step {slot['step']}: {slot['buf'][:80]!r}")
            return
        if slot["step"] == 5:
            return  # anything after the QUIT reply: ignore until the close
        buf = slot["buf"] + data
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if not line.startswith(b"+OK"):
                fail(slot, f"step {slot['step']}: {line[:80]!r}")
                return
            step = slot["step"]
            if step == 0:
                out = b"USER " + slot["user"] + b"\r\n"
            elif step == 1:
                out = b"PASS " + slot["pw"] + b"\r\n"
            elif step == 2:
                out = b"STAT\r\n"
            elif step == 3:
                out = b"QUIT\r\n"
            else:
                slot["step"] = 5
                break
            slot["step"] = step + 1
            sock.send(out)
        slot["buf"] = buf

    delay = t_begin - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    for slot in slots:
        start(slot)
    hard_stop = t_end + GRACE
    while active > 0:
        now = time.monotonic()
        if now >= hard_stop:
            for slot in slots:
                if slot["sock"] is not None:
                    errors += 1
                    slot["sock"].close()
            break
        for key, _ in sel.select(min(0.2, hard_stop - now)):
            if key.data["sock"] is not None:
                on_event(key.data)
    cpu = os.times()
    q.put({"done": done, "errors": errors, "error_samples": error_samples, "latencies": latencies,
           "cpu_s": cpu.user + cpu.system, "users": len(used)})


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live descendant, with what each has
    collected from its reaped children (so a process per session is counted too)."""
    stats: dict[int, tuple[int, float]] = {}
    for pid, fields in proc_stat_fields():
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        stats[pid] = (int(fields[1]), ticks / os.sysconf("SC_CLK_TCK"))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def login_rate(port: int, creds: list[tuple[str, str]], concurrency: int, warmup: float, secs: float, *,
               host: str = "127.0.0.1", source: str | None = None, rotate: bool = False,
               cpu_of: int | None = None) -> dict:
    """Login sessions/s at ``concurrency`` clients to ``host:port`` (clients bound to ``source`` if given).

    Without ``rotate`` the clients log in as the first ``concurrency`` users of ``creds``; with it
    every user of ``creds`` takes turns (each session the user free the longest), one user per
    concurrent session all the same. ``cpu_of``: the server's master pid; its process tree's
    CPU time over the measured seconds is reported per session (``server_cpu_ms_per_session``)."""
    return _rate(_login_proc, (port,), {"host": host, "source": source}, creds, concurrency, warmup, secs,
                 rotate=rotate, cpu_of=cpu_of)


def login_pass(port: int, creds: list[tuple[str, str]], concurrency: int = 8) -> dict:
    """Every user of ``creds`` logs in once (USER, PASS, STAT, QUIT), ``concurrency`` sessions at a
    time: logins/s of that one pass (for tpops root mode, each uid's first login forks its process)."""
    import poplib
    from concurrent.futures import ThreadPoolExecutor

    def one(cred: tuple[str, str]) -> bool:
        try:
            client = poplib.POP3("127.0.0.1", port, timeout=60)
            client.user(cred[0])
            client.pass_(cred[1])
            client.stat()
            client.quit()
            return True
        except (OSError, poplib.error_proto):
            return False

    began = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, creds))
    seconds = time.monotonic() - began
    return {"value": len(creds) / seconds, "errors": results.count(False), "seconds": round(seconds, 3),
            "concurrency": concurrency}


def _rate(target, head: tuple, tail: dict, creds: list[tuple[str, str]], concurrency: int,
          warmup: float, secs: float, *, rotate: bool = False, cpu_of: int | None = None) -> dict:
    """Run ``target(*head, creds_slice, t_begin, t_measure, t_end, q, **tail)`` in 1-2 client processes.

    ``rotate``: each process gets an equal share of all of ``creds`` and ``clients=`` its number of
    connections (``target`` must take that keyword), instead of one user per connection."""
    nprocs = 1 if concurrency == 1 else min(2, concurrency)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    t_begin = time.monotonic() + 0.2
    t_measure = t_begin + warmup
    t_end = t_measure + secs
    procs = []
    if len(creds) < concurrency:
        raise ValueError(f"{concurrency} clients need as many users, {len(creds)} given")
    for i in range(nprocs):
        mine = creds[i:concurrency:nprocs]
        kwargs = tail
        if rotate:
            kwargs = {**tail, "clients": len(mine)}
            mine = creds[i::nprocs]
        p = ctx.Process(target=target, args=(*head, mine, t_begin, t_measure, t_end, q), kwargs=kwargs, daemon=True)
        p.start()
        procs.append(p)
    cpu: list[float] = []
    sampler = None
    if cpu_of is not None:
        def sample() -> None:
            for when in (t_measure, t_end):
                time.sleep(max(0.0, when - time.monotonic()))
                cpu.append(tree_cpu_s(cpu_of))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    results = []
    for _ in procs:
        try:
            results.append(q.get(timeout=max(1.0, t_end - time.monotonic()) + GRACE + 10))
        except Exception:  # noqa: BLE001 - a stuck client process: reported as missing
            break
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.terminate()
            p.join(5)
    if len(results) != nprocs:
        raise RuntimeError(f"only {len(results)} of {nprocs} client processes reported")
    done = sum(r["done"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    def pct(v: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(v * len(lat)))] * 1000, 2) if lat else None
    out = {
        "value": done / secs,
        "sessions": done,
        "errors": sum(r["errors"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]][:5],
        "latency_ms_p50": pct(0.5),
        "latency_ms_p99": pct(0.99),
        "client_processes": nprocs,
        **({"users_logged_in": sum(r["users"] for r in results)} if rotate else {}),
        "client_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        "client_cpu_share_of_one_core": round(sum(r["cpu_s"] for r in results) / (secs + warmup), 3),
    }
    if sampler is not None:
        sampler.join(5)
        if len(cpu) == 2 and done:
            out["server_cpu_ms_per_session"] = round((cpu[1] - cpu[0]) * 1000 / done, 3)
    if any("resumed" in r for r in results):
        handshakes = sum(r["handshakes"] for r in results)
        out["tls_handshakes"] = handshakes
        out["tls_resumed"] = sum(r["resumed"] for r in results)
        out["tls_resumed_share"] = round(out["tls_resumed"] / handshakes, 3) if handshakes else None
        out["tls_versions"] = sorted({v for r in results for v in r["versions"]})
    return out


# -- login load generator over implicit TLS: blocking sockets, a thread per client (OpenSSL
#    releases the GIL during handshakes, reads and writes)

def _tls_login_proc(port: int, ca_file: str, resume: bool, creds: list[tuple[str, str]], t_begin: float,
                    t_measure: float, t_end: float, q: multiprocessing.Queue) -> None:
    ctx = ssl.create_default_context(cafile=ca_file)  # verifies the chain and 127.0.0.1, as a mail client does
    lock = threading.Lock()
    stats = {"done": 0, "errors": 0, "handshakes": 0, "resumed": 0}
    error_samples: list[str] = []
    latencies: list[float] = []
    versions: set[str] = set()
    hard_stop = t_end + GRACE

    def session(user: bytes, pw: bytes, ticket: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, str]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, hard_stop - time.monotonic()))
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=ticket)
            buf = b""
            for out in (None, b"USER " + user, b"PASS " + pw, b"STAT", b"QUIT"):
                if out is not None:
                    sock.sendall(out + b"\r\n")
                while b"\r\n" not in buf:
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionError(f"closed before the reply to {out!r}")
                    buf += data
                line, buf = buf.split(b"\r\n", 1)
                if not line.startswith(b"+OK"):
                    raise RuntimeError(f"{(out or b'greeting').split()[0]!r}: {line[:80]!r}")
            try:
                while sock.recv(4096):  # wait for the server's close
                    pass
            except (ssl.SSLError, ConnectionError):
                pass  # a close without close_notify, or a reset after QUIT: the session is over
            return sock.session, sock.session_reused, sock.version() or "?"
        finally:
            raw.close()

    def client(user: str, pw: str) -> None:
        ticket = None
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            try:
                new_ticket, reused, version = session(user.encode(), pw.encode(), ticket if resume else None)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and sampled
                with lock:
                    stats["errors"] += 1
                    if len(error_samples) < 5:
                        error_samples.append(repr(exc)[:160])
                time.sleep(0.01)
                continue
            now = time.monotonic()
            if resume and new_ticket is not None:
                ticket = new_ticket
            with lock:
                versions.add(version)
                if t_measure <= now < t_end:
                    stats["done"] += 1
                    stats["handshakes"] += 1
                    stats["resumed"] += int(reused)
                    latencies.append(now - t0)

    delay = t_begin - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    threads = [threading.Thread(target=client, args=c, daemon=True) for c in creds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, hard_stop + 5 - time.monotonic()))
    cpu = os.times()
    q.put({**stats, "error_samples": error_samples, "latencies": latencies, "versions": sorted(versions),
           "cpu_s": cpu.user + cpu.system})


def tls_login_rate(port: int, ca_file: str, creds: list[tuple[str, str]], concurrency: int, warmup: float,
                   secs: float, *, resume: bool, cpu_of: int | None = None) -> dict:
    """Login sessions/s over implicit TLS: full handshakes, or (``resume``) each client offering
    the session (ticket) its previous connection got; ``cpu_of`` as for :func:`login_rate`."""
    return _rate(_tls_login_proc, (port, ca_file, resume), {}, creds, concurrency, warmup, secs, cpu_of=cpu_of)


# -- RETR throughput

def retr_run(port: int, user: str, password: str, n: int, pipelined: bool,
             tls: ssl.SSLContext | None = None) -> dict:
    c = Conn(port, tls=tls)
    c.login(user, password)
    sock = c.sock
    assert not c.buf
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    total = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if pipelined:
        sock.sendall(b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)))
        seen = 0
        tail = b""
        first = True
        while seen < n:
            c.check_deadline()
            k = sock.recv_into(buf)
            if k == 0:
                raise ConnectionError("closed during pipelined RETR")
            if first and buf[:1] == b"-":
                raise RuntimeError(f"RETR 1: {bytes(mv[:min(k, 80)])!r}")
            first = False
            total += k
            seen += (tail + bytes(mv[: min(k, 4)])).count(TERMINATOR) + buf.count(TERMINATOR, 0, k)
            tail = (tail + bytes(mv[max(0, k - 4) : k]))[-4:]
    else:
        for i in range(1, n + 1):
            sock.sendall(b"RETR %d\r\n" % i)
            tail = b""
            first = True
            while True:
                c.check_deadline()
                k = sock.recv_into(buf)
                if k == 0:
                    raise ConnectionError("closed during RETR")
                if first and buf[:1] == b"-":
                    raise RuntimeError(f"RETR {i}: {bytes(mv[:min(k, 80)])!r}")
                first = False
                total += k
                tail = (tail + bytes(mv[max(0, k - 5) : k]))[-5:]
                if tail == TERMINATOR:
                    break
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    c.quit()
    return {"elapsed_s": elapsed, "wire_bytes": total, "messages": n, "client_cpu_s": cpu}


# -- STAT + LIST + UIDL timing

def listing_run(port: int, user: str, password: str) -> dict:
    c = Conn(port)
    c.cmd(f"USER {user}")
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    c.cmd(f"PASS {password}")
    t1 = time.perf_counter()
    stat = c.cmd("STAT")
    listing = c.multi("LIST")
    uidl = c.multi("UIDL")
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu0
    c.quit()
    return {"elapsed_s": t2 - t0, "pass_s": t1 - t0, "client_cpu_s": cpu, "stat": stat.decode(errors="replace"),
            "list_lines": listing.count(b"\r\n"), "uidl_lines": uidl.count(b"\r\n")}


# -- 200 MB RETR with the serving process's RSS sampled

def _huge_reader(port: int, user: str, password: str, ready, go, finished, leave, q) -> None:  # noqa: ANN001
    try:
        c = Conn(port, timeout=120)
        c.login(user, password)
        ready.set()
        if not go.wait(30):
            raise RuntimeError("no go signal")
        sock = c.sock
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        total = 0
        tail = b""
        t0 = time.perf_counter()
        sock.sendall(b"RETR 1\r\n")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            k = sock.recv_into(buf)
            if k == 0:
                raise ConnectionError("closed during RETR")
            total += k
            tail = (tail + bytes(mv[max(0, k - 5) : k]))[-5:]
            if tail == TERMINATOR:
                break
        elapsed = time.perf_counter() - t0
        finished.set()
        leave.wait(30)
        c.quit()
        q.put({"wire_bytes": total, "elapsed_s": elapsed})
    except Exception as exc:  # noqa: BLE001
        finished.set()
        q.put({"error": repr(exc)})


def huge_rss(server: Server, user: str, password: str) -> dict:
    ctx = multiprocessing.get_context("fork")
    ready, go, finished, leave = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    q = ctx.Queue()
    p = ctx.Process(target=_huge_reader, args=(server.port, user, password, ready, go, finished, leave, q),
                    daemon=True)
    p.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("login for the 200 MB RETR did not complete")
        pid = None
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            pid = server.serving_pid(user)
            if pid is None:
                time.sleep(0.02)
        if pid is None:
            raise RuntimeError(f"{server.label}: cannot find the process serving {user}")
        title = proc_cmdline(pid)
        baseline = proc_status_kib(pid).get("VmRSS", 0)
        samples = []
        go.set()
        deadline = time.monotonic() + 300
        while not finished.is_set() and time.monotonic() < deadline:
            st = proc_status_kib(pid)
            if "VmRSS" in st:
                samples.append(st["VmRSS"])
            finished.wait(0.05)
        end = proc_status_kib(pid)
        leave.set()
        result = q.get(timeout=60)
    finally:
        go.set()
        leave.set()
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
    if "error" in result:
        raise RuntimeError(result["error"])
    hwm = max(end.get("VmHWM", 0), *samples, baseline)
    return {
        "process_title": title,
        "rss_before_kib": baseline,
        "rss_sampled_max_kib": max(samples) if samples else None,
        "samples": len(samples),
        "hwm_kib": hwm,
        "growth_kib": hwm - baseline,
        "wire_bytes": result["wire_bytes"],
        "mb_per_s": round(result["wire_bytes"] / result["elapsed_s"] / 1e6, 1),
    }
