"""How tpops scales (issue 12): the Maildir growth curve (--large) and a million users (--million).

curve    first and later STAT+LIST+UIDL at 1k, 20k and 100k messages, tpops and Dovecot
million  a 1,000,000-user passwd-file against the bench's small one (start-up, memory,
         logins/s, logins right after the file changed), and a MySQL table with
         1,000,000 rows against a small one (logins/s), all with tpops --user
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchlib.clients import listing_run, login_rate
from benchlib.common import IS_ROOT, log
from benchlib.servers import Server, TpopsServer
from benchlib.world import World
from tests.support.procs import proc_pss_kib, proc_status_kib

#: Rows of the big user base.
MILLION = 1_000_000
#: Concurrent clients of the user-base login runs.
CLIENTS = 32

Add = Callable[..., None]


def curve(world: World, servers: list[Server], reps: int, add: Add) -> None:
    """First and later login of ``curve<n>`` for every n in ``world.curve_sizes``."""
    tpops = servers[0]
    for n in world.curve_sizes:
        user = f"curve{n}"
        md = world.maildir(user)
        first: dict[str, list[float]] = {}
        later: dict[str, list[float]] = {}
        for _ in range(reps if n <= 20000 else 1):
            for srv in servers:
                srv.first_login_reset(md)
                first.setdefault(srv.label, []).append(listing_run(srv.port, user, f"pw-{user}")["elapsed_s"])
                later.setdefault(srv.label, []).append(listing_run(srv.port, user, f"pw-{user}")["elapsed_s"])
        for which, data in (("first", first), ("later", later)):
            t = statistics.median(data[tpops.label])
            d = data.get("dovecot")
            add(f"curve_s.{which}.{n}", f"STAT+LIST+UIDL {n} msgs, {which} login (curve)", t, "s", "lower",
                {"messages": n, "names": "bare", "runs_s": [round(x, 4) for x in data[tpops.label]],
                 "dovecot_runs_s": [round(x, 4) for x in d] if d else None,
                 "tpops_mode": tpops.mode, "per_message_us": round(t / n * 1e6, 2)},
                dovecot=statistics.median(d) if d else None, goal="", server=tpops.label)


def _synthetic_lines(count: int) -> str:
    """``count`` passwd-file users that never log in (no Maildir), one {PLAIN} each."""
    return "".join(f"x{i:07d}@million.example.org:{{PLAIN}}pw{i}::::/nonexistent/x{i:07d}::\n"
                   for i in range(count))


def _start_timed(srv: TpopsServer) -> float:
    t0 = time.monotonic()
    srv.start()
    return time.monotonic() - t0


def _memory(srv: TpopsServer) -> dict:
    time.sleep(0.5)
    master = srv.master_pid()
    idle = srv.idle_workers()
    return {
        "master_rss_kib": proc_status_kib(master).get("VmRSS", 0),
        "master_pss_kib": proc_pss_kib(master),
        "idle_worker_rss_kib_median": statistics.median(proc_status_kib(w).get("VmRSS", 0) for w in idle)
        if idle else None,
        "idle_worker_pss_kib_median": statistics.median(x for x in (proc_pss_kib(w) for w in idle) if x is not None)
        if idle else None,
        "idle_workers": len(idle),
    }


def million(world: World, warmup: float, secs: float, add: Add, count: int = MILLION) -> None:
    """The File backend with ``count`` more users, then the MySQL backend with ``count`` more rows."""
    if not IS_ROOT:
        log("million: needs root (tpops --user); skipped")
        return
    creds = world.login_users[:CLIENTS]
    big = world.base / "users-million"
    t0 = time.monotonic()
    with big.open("w") as f:
        f.write(_synthetic_lines(count))
        f.write("".join(world.lines))  # the real users last: the far end of the file
    big.chmod(0o644)
    log(f"million: wrote {count} users ({big.stat().st_size >> 20} MiB) in {time.monotonic() - t0:.1f} s")
    results = {}
    for name, path in (("small", world.passwd_file), ("million", big)):
        srv = TpopsServer(world, "user", name=f"user, {name} passwd-file",
                          overrides={"auth_file": repr(str(path))})
        try:
            startup = _start_timed(srv)
            memory = _memory(srv)
            rate = login_rate(srv.port, creds, CLIENTS, warmup, secs)
            with path.open("a") as f:  # the usual change: a user added
                f.write(f"added-{name}@example.org:{{PLAIN}}pw::::/nonexistent/added::\n")
            changed = login_rate(srv.port, creds, CLIENTS, 0.0, secs)
            time.sleep(2)  # the master has re-indexed the append by now
            text = path.read_bytes()  # a rewrite: one password in the middle changed, a new inode
            middle = text.index(b":{PLAIN}pw", len(text) // 2)
            tmp = path.with_suffix(".new")
            tmp.write_bytes(text[:middle] + b":{PLAIN}PW" + text[middle + 10 :])
            tmp.chmod(0o644)
            os.replace(tmp, path)
            rewritten = login_rate(srv.port, creds, CLIENTS, 0.0, secs)
        finally:
            srv.stop()
        results[name] = {"startup_s": startup, **memory, "rate": rate, "after_change": changed,
                         "after_rewrite": rewritten}
    small, large = results["small"], results["million"]
    users_small = len(world.lines)
    params = {"users": count + users_small, "small_file_users": users_small, "clients": CLIENTS, "mode": "user",
              "small": {k: v for k, v in small.items() if k not in ("rate", "after_change", "after_rewrite")},
              "million": {k: v for k, v in large.items() if k not in ("rate", "after_change", "after_rewrite")}}
    ratio = large["rate"]["value"] / small["rate"]["value"]
    add("million.file.logins_per_s", f"logins/s, {CLIENTS} clients, 1M-user passwd-file (user)",
        large["rate"]["value"], "sessions/s", "higher",
        {**params, "small_file_sessions_per_s": round(small["rate"]["value"], 1), "ratio_to_small_file": round(ratio, 3),
         "errors": large["rate"]["errors"]},
        goal=f"within 10% of the small file ({small['rate']['value']:.0f}/s): {ratio:.2f}",
        goal_met=ratio >= 0.9)
    for which, title, note in (
        ("after_change", "a user was appended to", "the stale index answers for the old lines, the new ones are "
                                                   "scanned, until the master re-indexes once and replaces workers"),
        ("after_rewrite", "a rewrite (one password changed) replaced",
         "workers scan the whole file (niced) until the master re-indexes once and replaces them"),
    ):
        after = large[which]
        base = small[which]["value"]
        add(f"million.file.logins_per_s_{which}", f"logins/s in the {secs:.0f} s after {title} the 1M-user file",
            after["value"], "sessions/s", "higher",
            {"latency_ms_p50": after["latency_ms_p50"], "latency_ms_p99": after["latency_ms_p99"],
             "errors": after["errors"], "small_file_same_change": round(base, 1), "note": note},
            goal=f"no stall ({after['value'] / base:.2f} of the small file's rate)" if base else "no stall",
            goal_met=after["errors"] == 0 and base > 0 and after["value"] >= 0.5 * base)
    add("million.file.startup_s", "start-up (until the port answers), 1M-user passwd-file", large["startup_s"], "s",
        "lower", {"small_file_startup_s": round(small["startup_s"], 3)}, goal="")
    growth = (large["master_rss_kib"] - small["master_rss_kib"]) / 1024
    add("million.file.master_rss_mib", "master RSS, 1M-user passwd-file", large["master_rss_kib"] / 1024, "MiB",
        "lower", {**params, "growth_mib": round(growth, 1)}, goal="growth < 1 GB", goal_met=growth < 1000)
    add("million.file.idle_worker_pss_mib", "idle worker PSS, 1M-user passwd-file",
        (large["idle_worker_pss_kib_median"] or 0) / 1024, "MiB", "lower",
        {"small_file_kib": small["idle_worker_pss_kib_median"],
         "rss_kib": large["idle_worker_rss_kib_median"],
         "note": "PSS: the index is shared copy-on-write with the master and the other workers"}, goal="")
    mysql_rows(world, warmup, secs, add, count)


def _mysql_server() -> object | None:
    try:
        from tests.support import mariadb

        srv = mariadb.Server(mariadb.SHARED_HOST, mariadb.SHARED_PORT)
        return srv if srv.answers() else None
    except Exception:  # noqa: BLE001 - no client library, no server: the row says so
        return None


def mysql_rows(world: World, warmup: float, secs: float, add: Add, count: int) -> None:
    """The MySQL backend with the login users only, then with ``count`` more rows."""
    db_server = _mysql_server()
    if db_server is None:
        log("million: no MariaDB on 127.0.0.1:3306; MySQL rows skipped")
        return
    name = f"tpops_bench_{os.getpid()}_{secrets.token_hex(3)}"
    conn = db_server.connect()  # type: ignore[attr-defined]
    cur = conn.cursor()
    schema = (Path(__file__).resolve().parents[2] / "tpops_auth-mysql.sql").read_text()
    cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        cur.execute(f"USE `{name}`")
        code = "\n".join(x.split("--", 1)[0] for x in schema.splitlines())
        for statement in code.split(";"):
            if statement.strip():
                cur.execute(statement)
        creds = world.login_users[:CLIENTS]
        cur.executemany("INSERT INTO user (login, passwd, mail, maildir) VALUES (%s, %s, %s, %s)",
                        [(u, "{PLAIN}" + p, f"{u}@bench.example.org", str(world.maildir(u))) for u, p in creds])
        overrides = {"auth_type": "'MySQL'", "mysql_server": "'127.0.0.1'", "mysql_port": str(db_server.port),  # type: ignore[attr-defined]
                     "mysql_user": "'root'", "mysql_pass": "''", "mysql_db": repr(name)}
        rates = {}
        for label in ("small", "million"):
            if label == "million":
                t0 = time.monotonic()
                cur.execute(
                    "INSERT INTO user (login, passwd, mail, maildir) SELECT CONCAT('x', seq, '@million.example.org'),"
                    " CONCAT('{PLAIN}pw', seq), CONCAT('x', seq, '@million.example.org'), CONCAT('/nonexistent/x', seq)"
                    f" FROM seq_1_to_{count}")
                log(f"million: inserted {count} rows in {time.monotonic() - t0:.1f} s")
            srv = TpopsServer(world, "user", name=f"user, MySQL {label}", overrides=overrides)
            try:
                srv.start()
                rates[label] = login_rate(srv.port, creds, CLIENTS, warmup, secs)
            finally:
                srv.stop()
        ratio = rates["million"]["value"] / rates["small"]["value"]
        add("million.mysql.logins_per_s", f"logins/s, {CLIENTS} clients, MySQL with 1M rows (user)",
            rates["million"]["value"], "sessions/s", "higher",
            {"rows": count + len(creds), "small_table_rows": len(creds),
             "small_table_sessions_per_s": round(rates["small"]["value"], 1), "ratio": round(ratio, 3),
             "errors": rates["million"]["errors"], "index": "unique (login) in tpops_auth-mysql.sql"},
            goal=f"within 10% of {len(creds)} rows ({rates['small']['value']:.0f}/s): {ratio:.2f}",
            goal_met=ratio >= 0.9)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log(f"million: MySQL rows failed: {exc}")
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()
