"""One bench run: build the world, start the servers, measure each metric against Dovecot, the JSON result."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib.certs import KEY_TYPE, TlsFiles, bench_certificate
from benchlib.clients import huge_rss, listing_run, login_pass, login_rate, retr_run, tls_login_rate
from benchlib.common import DISTINCT_UID_BASE, FULL, IS_ROOT, MIB, QUICK, REPO, TPOPS, log
from benchlib.scale import MILLION, curve, million
from benchlib.servers import (
    DovecotServer,
    HAProxyFront,
    Server,
    TpopsServer,
    ensure_dovecot,
    ensure_haproxy,
)
from benchlib.world import World, login_user_count
from tests.support.procs import proc_pss_kib, proc_status_kib

#: The parts of a run, in order; ``--only`` picks some (curve, million, cluster and tls are opt-in).
SECTIONS = ("logins", "logins-uids", "retr", "listing", "huge", "curve", "million", "cluster", "tls")
OPT_IN = ("curve", "million", "cluster", "tls")

#: Login concurrency of the TLS rows (issue 9).
TLS_LEVELS = (1, 8, 32)

#: Where the cluster rows put their two nodes, and the address the direct clients come from
#: (outside $haproxy_trusted_networks, so no PROXY header is expected of them).
NODE_HOSTS = ("127.0.0.2", "127.0.0.3")
DIRECT_SOURCE = "127.0.0.9"

#: tpops mode -> the Dovecot variant with the same process model (pool RSS, TLS rows).
PAIRING = {"root-drop": "per-session", "user": "reuse", "nonroot": "reuse"}

#: tpops mode -> (the Dovecot variant its login rows' ratio uses, the goal factor, the goal's words).
#: Issue 12 item 1: root-drop at 1.5x Dovecot's fastest login mode (pop3 processes reused), --user
#: keeping its 4x. Both variants' figures are in each row's parameters.
#: Issue 12 measured Dovecot "in its high-performance login mode": pop3-login with
#: service_count = 0 and pop3 processes per session (the per-session variant here). The
#: reuse variant's figures are reported beside it.
LOGIN_GOALS = {
    "root-drop": ("per-session", 1.5, "≥ 1.5x Dovecot"),
    "user": ("per-session", 4.0, "keep ≥ 4x Dovecot"),
    "nonroot": ("per-session", 1.0, "≥ Dovecot"),
}


def median_run(runs: list[dict]) -> dict:
    """Of several runs of one measurement, the one with the median ``value`` (the lower
    middle for an even count): a real run, its figures consistent with each other."""
    ordered = sorted(runs, key=lambda r: r["value"])
    return ordered[(len(ordered) - 1) // 2]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.profile = QUICK if args.quick else FULL
        self.metrics: dict[str, dict] = {}
        self.tpops: list[TpopsServer] = []
        self.dovecots: dict[str, DovecotServer] = {}
        self.dovecot_reason: str | None = None
        self.certs: TlsFiles | None = None
        #: section -> why its rows are missing from this run
        self.skipped: dict[str, str] = {}
        self.extra: dict[str, dict] = {}
        #: servers the opt-in sections started (nodes, HAProxy, TLS tpops); teardown stops them
        self.extra_servers: list[TpopsServer | HAProxyFront] = []

    @property
    def dovecot(self) -> DovecotServer | None:
        """The Dovecot the data metrics (RETR, LIST, RSS) compare with."""
        return self.dovecots.get("per-session")

    def paired(self, srv: TpopsServer) -> DovecotServer | None:
        """The Dovecot with the same process model as ``srv``."""
        return self.dovecots.get(PAIRING[srv.mode])

    def add(self, name: str, title: str, value: float, unit: str, better: str, parameters: dict,
            dovecot: float | None = None, goal: str = "", reference: str | None = None,
            goal_met: bool | None = None, server: str | None = None,
            baseline: tuple[str, float] | None = None) -> None:
        """Record a metric; ``baseline`` = (what, value) compares with something other than Dovecot."""
        ratio = None
        against = dovecot if baseline is None else baseline[1]
        if against:
            ratio = round(value / against, 3)
            if goal_met is None and goal.startswith(("≥", "≤")):
                goal_met = ratio >= 1 if better == "higher" else ratio <= 1
        entry = {
            "title": title,
            "value": round(value, 4),
            "unit": unit,
            "better": better,
            "server": server,
            "parameters": parameters,
            "dovecot": None if dovecot is None else round(dovecot, 4),
            "ratio": ratio,
            "goal": goal + (f" (issue: Dovecot {reference})" if reference else ""),
            "goal_met": goal_met,
        }
        if baseline is not None:
            entry["baseline"] = {"what": baseline[0], "value": round(baseline[1], 4)}
        elif dovecot is None and self.dovecot_reason:
            entry["dovecot_reason"] = self.dovecot_reason
        self.metrics[name] = entry
        d = "-" if dovecot is None else f"{dovecot:.4g}"
        b = f", {baseline[0]} {baseline[1]:.4g}" if baseline else ""
        log(f"{name}: {value:.4g} {unit} (dovecot {d}{b})")

    def servers_for_data(self) -> list[Server]:
        out: list[Server] = [self.tpops[0]]
        if self.dovecot:
            out.append(self.dovecot)
        return out

    # -- setup
    def setup(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="tpops-bench-", dir=self.args.tmpdir))
        base.chmod(0o755)
        self.base = base
        self.world = World(base, self.profile)
        if "curve" in self.args.sections:
            self.world.curve_sizes = (200, 1000) if self.args.quick else (1000, 20000, 100000)
        if "logins-uids" in self.args.sections and IS_ROOT:  # chown to uids of their own needs root
            self.world.distinct_uid_count = login_user_count(self.profile.login_levels)
        self.world.build()
        if "tls" in self.args.sections:
            self.certs = bench_certificate(base)
        modes = ["root-drop", "user"] if IS_ROOT else ["nonroot"]
        for mode in modes:
            overrides = dict(item.split("=", 1) for item in self.args.tpops_setting)
            self.tpops.append(TpopsServer(self.world, mode, overrides=overrides).start())
        if self.args.no_dovecot:
            self.dovecot_reason = "--no-dovecot"
        else:
            self.dovecot_reason = ensure_dovecot()
        if self.dovecot_reason is None:
            try:
                for variant in ("per-session", "reuse"):
                    self.dovecots[variant] = DovecotServer(self.world, variant, tls=self.certs).start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                for d in self.dovecots.values():
                    d.stop()
                self.dovecots = {}
                self.dovecot_reason = f"dovecot could not be started: {exc}"
                log(self.dovecot_reason)

    def teardown(self) -> None:
        for s in self.tpops:
            s.stop()
        for s in self.extra_servers:
            s.stop()
        for d in self.dovecots.values():
            d.stop()
        if self.args.keep:
            log(f"kept {self.base}")
        elif getattr(self, "base", None):
            shutil.rmtree(self.base, ignore_errors=True)

    def repeated(self, order: list[Server], run: Callable[[Server], dict]) -> tuple[dict[str, dict], dict[str, list[float]]]:
        """``run(server)`` ``reps`` times per server of ``order``, alternating servers run by
        run, so that one slow stretch of a noisy machine does not decide a ratio: each
        server's median run (by ``value``), and every run's value."""
        runs: dict[str, list[dict]] = {s.label: [] for s in order}
        for _ in range(self.profile.reps):
            for s in order:
                runs[s.label].append(run(s))
        return ({label: median_run(rs) for label, rs in runs.items()},
                {label: [round(r["value"], 1) for r in rs] for label, rs in runs.items()})

    def runs_params(self, values: dict[str, list[float]], srv: Server) -> dict:
        """The parameters that say how a row was aggregated, with every run of every server."""
        return {"repetitions": self.profile.reps, "aggregate": "the median run, by sessions/s",
                "runs_sessions_per_s": values[srv.label],
                "other_servers_runs_sessions_per_s": {k: v for k, v in values.items() if k != srv.label}}

    # -- 1. logins
    def login_order(self, tpops: list[TpopsServer]) -> list[Server]:
        """``tpops`` and every Dovecot, alternating (the order of one login level's runs)."""
        order: list[Server] = []
        dovecots = list(self.dovecots.values())
        for k in range(max(len(tpops), len(dovecots))):
            order += tpops[k : k + 1] + dovecots[k : k + 1]
        return order

    def dovecot_login_params(self, results: dict[str, dict], value: float, compared: str | None) -> dict:
        """Both Dovecot variants' login figures beside a tpops row whose ratio uses ``compared``."""
        params: dict = {}
        if compared is not None:
            params["dovecot_variant"] = compared
            params["dovecot_detail"] = {k: v for k, v in results[self.dovecots[compared].label].items()
                                        if k != "value"}
        ran = [d for d in self.dovecots.values() if d.label in results]
        if ran:
            params["dovecot_all_variants_sessions_per_s"] = {
                d.variant: round(results[d.label]["value"], 1) for d in ran}
            params["ratio_by_dovecot_variant"] = {
                d.variant: round(value / results[d.label]["value"], 3) if results[d.label]["value"] else None
                for d in ran}
            params["dovecot_errors_by_variant"] = {d.variant: results[d.label]["errors"] for d in ran}
            samples = {d.variant: results[d.label]["error_samples"][:2] for d in ran if results[d.label]["errors"]}
            if samples:
                params["dovecot_error_samples_by_variant"] = samples
        return params

    def bench_logins(self) -> None:
        """Logins/s at each level: tpops root-drop and --user against Dovecot in its high-performance
        login mode (pop3 per session; the reuse variant measured in the same run, in the parameters),
        and the server CPU per login (the process tree's CPU over the measured seconds). The login
        users (160, or one per client of the highest level) all belong to nobody."""
        p = self.profile
        creds = self.world.login_users
        refs = {1: "250/s", 32: "360/s"}
        for c in p.login_levels:
            order = self.login_order(self.tpops)
            results, values = self.repeated(order, lambda srv: login_rate(
                srv.port, creds, c, p.warmup_secs, p.login_secs, rotate=True, cpu_of=srv.master_pid()))
            for srv in self.tpops:
                r = results[srv.label]
                variant, factor, goal = LOGIN_GOALS[srv.mode]
                pair = self.dovecots.get(variant)
                dv = results[pair.label] if pair else None
                params = {k: v for k, v in r.items() if k != "value"}
                params.update(self.runs_params(values, srv))
                params.update(concurrency=c, duration_s=p.login_secs, warmup_s=p.warmup_secs, mode=srv.mode,
                              session="connect, greeting, USER, PASS, STAT, QUIT, wait for the close",
                              users=f"{len(creds)} ({creds[0][0]}..{creds[-1][0]}), all owned by "
                                    f"uid {self.world.uid}; each session logs in as the user free the longest: "
                                    "one user per concurrent client (tpops allows one session per mailbox), "
                                    "every user in turn")
                if srv.launcher_note:
                    params["launcher"] = srv.launcher_note
                params.update(self.dovecot_login_params(results, r["value"], variant if pair else None))
                if pair:
                    params["ratio_note"] = (f"ratio and goal against Dovecot {variant} "
                                            f"({pair.config_note}); every variant's figure in "
                                            "dovecot_all_variants_sessions_per_s")
                ratio = r["value"] / dv["value"] if dv and dv["value"] else None
                self.add(f"login_sessions_per_s.c{c}.{srv.mode}",
                         f"logins/s, {c} client{'s' if c > 1 else ''} ({srv.mode})",
                         r["value"], "sessions/s", "higher", params,
                         dovecot=dv["value"] if dv else None, goal=goal, reference=refs.get(c),
                         goal_met=None if ratio is None else ratio >= factor, server=srv.label)
                cpu = r.get("server_cpu_ms_per_session")
                if cpu is not None:
                    dv_cpu = dv.get("server_cpu_ms_per_session") if dv else None
                    self.add(f"login_server_cpu_ms.c{c}.{srv.mode}",
                             f"server CPU per login, {c} client{'s' if c > 1 else ''} ({srv.mode})",
                             cpu, "ms", "lower",
                             {"how": "user+system CPU of the server's process tree (reaped children included) "
                                     "over the measured seconds, divided by the sessions",
                              "concurrency": c, "mode": srv.mode,
                              **({"dovecot_variant": variant} if pair else {})},
                             dovecot=dv_cpu, goal="≤ 3 ms" if srv.mode == "root-drop" else "(reported)",
                             goal_met=cpu <= 3.0 if srv.mode == "root-drop" else None, server=srv.label)
        for srv in self.tpops:
            self.pool_rss(srv)

    def bench_logins_uids(self) -> None:
        """Root-mode logins/s where every user has a uid and gid of its own (given in the passwd-file's
        uid and gid fields, its Maildir tree chowned to them): tpops root-drop against both Dovecots.
        Dovecot cannot hand a pop3 process that dropped to one uid a session of another uid, so its
        reuse variant is reported too, but the ratio uses whichever variant logged in more users/s
        without an error (or more users/s, when both had errors)."""
        if not IS_ROOT:
            self.skip("logins-uids", "needs root: the users' Maildirs belong to uids of their own "
                                     "and tpops must switch to them per session")
            return
        srv = next(s for s in self.tpops if s.mode == "root-drop")
        p = self.profile
        creds = self.world.uid_users
        first, last = DISTINCT_UID_BASE, DISTINCT_UID_BASE + len(creds) - 1
        self.extra["logins_uids"] = {
            "users": len(creds), "uids": f"{first}..{last}", "gids": f"{first}..{last}",
            "how": "passwd-file lines 'u000:{PLAIN}pw-u000:20000:20000:bench user:HOME::' (uid and gid fields "
                   "set, read by tpops's File backend and Dovecot's passwd-file userdb); each home tree "
                   "chowned to its uid/gid; no /etc/passwd entries",
            "tpops": "root-drop (root, no --user; $first_valid_uid default 500)",
            "dovecot": "first_valid_uid = 100, last_valid_uid = 0 (no upper bound); both variants",
        }
        # The first login of every uid, once (tpops root mode forks each uid's post-login process
        # here; the rows after it measure the steady state, where users log in again and again).
        order = self.login_order([srv])
        first_pass = {s.label: login_pass(s.port, creds) for s in order}
        per_session = self.dovecots.get("per-session")
        dv_first = first_pass.get(per_session.label) if per_session else None
        self.add(f"login_uids_first_pass_per_s.{srv.mode}",
                 f"first login of each of {len(creds)} distinct uids, 8 clients ({srv.mode})",
                 first_pass[srv.label]["value"], "sessions/s", "higher",
                 {**first_pass[srv.label], "mode": srv.mode,
                  "dovecot_all_variants": {k: v for k, v in first_pass.items() if k != srv.label}},
                 dovecot=dv_first["value"] if dv_first else None, goal="(reported)", server=srv.label)
        for c in p.login_levels:
            order = self.login_order([srv])
            results, values = self.repeated(order, lambda s: login_rate(
                s.port, creds, c, p.warmup_secs, p.login_secs, rotate=True))
            r = results[srv.label]
            ran = [d for d in self.dovecots.values() if d.label in results]
            clean = [d for d in ran if results[d.label]["errors"] == 0] or ran
            best = max(clean, key=lambda d: results[d.label]["value"]) if clean else None
            dv = results[best.label] if best else None
            params = {k: v for k, v in r.items() if k != "value"}
            params.update(self.runs_params(values, srv))
            params.update(concurrency=c, duration_s=p.login_secs, warmup_s=p.warmup_secs, mode=srv.mode,
                          session="connect, greeting, USER, PASS, STAT, QUIT, wait for the close",
                          users=f"{len(creds)} ({creds[0][0]}..{creds[-1][0]}), user k with uid and gid "
                                f"{first}+k; each session logs in as the user free the longest: one user "
                                "per concurrent client, every user (so every uid) in turn")
            if srv.launcher_note:
                params["launcher"] = srv.launcher_note
            params.update(self.dovecot_login_params(results, r["value"], best.variant if best else None))
            if best:
                params["ratio_note"] = (f"ratio against Dovecot {best.variant}: the variant with more logins/s "
                                        "among those without errors; a reused pop3 process cannot switch to "
                                        "another uid")
            self.add(f"login_uids_sessions_per_s.c{c}.{srv.mode}",
                     f"logins/s, {len(creds)} distinct uids, {c} client{'s' if c > 1 else ''} ({srv.mode})",
                     r["value"], "sessions/s", "higher", params, dovecot=dv["value"] if dv else None,
                     goal=f"≥ Dovecot {best.variant}" if best else "≥ Dovecot", server=srv.label)

    def pool_rss(self, srv: TpopsServer) -> None:
        time.sleep(0.5)
        master = srv.master_pid()
        m = proc_status_kib(master)
        idle = srv.idle_workers()
        rss = [proc_status_kib(w).get("VmRSS", 0) for w in idle]
        pss = [x for x in (proc_pss_kib(w) for w in idle) if x is not None]
        dv_master = dv_idle = dv_master_pss = dv_idle_pss = None
        dv_params: dict = {}
        pair = self.paired(srv)
        if pair:
            dm = pair.master_pid()
            dv_master = proc_status_kib(dm).get("VmRSS", 0) / 1024
            dv_master_pss = (proc_pss_kib(dm) or 0) / 1024
            idlers = pair.idle_workers()
            lr = [proc_status_kib(w).get("VmRSS", 0) for w in idlers]
            if lr:
                dv_idle = statistics.median(lr) / 1024
            lp = [x for x in (proc_pss_kib(w) for w in idlers) if x is not None]
            if lp:
                dv_idle_pss = statistics.median(lp) / 1024
            dv_params = {"dovecot_variant": pair.variant, "dovecot_master_pss_kib": proc_pss_kib(dm),
                         "dovecot_idle_processes": len(idlers)}
        self.add(f"rss_master_mib.{srv.mode}", f"master RSS ({srv.mode})", m.get("VmRSS", 0) / 1024, "MiB",
                 "lower", {"pss_kib": proc_pss_kib(master), "when": "after the login runs", **dv_params},
                 dovecot=dv_master, goal="", server=srv.label)
        self.add(f"rss_idle_worker_mib.{srv.mode}", f"idle worker RSS, median ({srv.mode})",
                 statistics.median(rss) / 1024 if rss else 0.0, "MiB", "lower",
                 {"idle_workers": len(idle), "rss_kib_min_max": [min(rss), max(rss)] if rss else None,
                  "pss_kib_median": statistics.median(pss) if pss else None,
                  "note": "RSS counts pages shared with the master; PSS splits them",
                  "dovecot_compared_process": "a pre-started pop3 process waiting for a session", **dv_params},
                 dovecot=dv_idle, goal="", server=srv.label)
        self.add(f"pss_master_mib.{srv.mode}", f"master PSS ({srv.mode})", (proc_pss_kib(master) or 0) / 1024, "MiB",
                 "lower", {"when": "after the login runs", "note": "PSS splits shared pages among their users",
                           **dv_params}, dovecot=dv_master_pss, goal="", server=srv.label)
        self.add(f"pss_idle_worker_mib.{srv.mode}", f"idle worker PSS, median ({srv.mode})",
                 statistics.median(pss) / 1024 if pss else 0.0, "MiB", "lower",
                 {"idle_workers": len(idle), **dv_params,
                  "dovecot_compared_process": "a pre-started pop3 process waiting for a session"},
                 dovecot=dv_idle_pss, goal="", server=srv.label)

    # -- 2. RETR
    def bench_retr(self) -> None:
        p = self.profile
        cases = [("1mib", "big", p.big_n, p.big_size), ("4kib", "small", p.small_n, p.small_size)]
        for tag, user, n, size in cases:
            for pipelined in (False, True):
                style = "pipelined" if pipelined else "lockstep"
                runs: dict[str, list[dict]] = {}
                for _ in range(p.reps):
                    for srv in self.servers_for_data():
                        runs.setdefault(srv.label, []).append(retr_run(srv.port, user, f"pw-{user}", n, pipelined))
                med = {}
                for label, rs in runs.items():
                    rates = [r["wire_bytes"] / r["elapsed_s"] / 1e6 for r in rs]
                    msgs = [r["messages"] / r["elapsed_s"] for r in rs]
                    med[label] = (statistics.median(rates), statistics.median(msgs), rs)
                srv = self.tpops[0]
                t = med[srv.label]
                d = med.get("dovecot")
                params = {"messages": n, "message_file_octets": size, "mode": style, "repetitions": p.reps,
                          "aggregate": "median", "wire_bytes": t[2][0]["wire_bytes"],
                          "runs_mb_per_s": [round(r["wire_bytes"] / r["elapsed_s"] / 1e6, 1) for r in t[2]],
                          "client_cpu_share": round(sum(r["client_cpu_s"] for r in t[2])
                                                    / sum(r["elapsed_s"] for r in t[2]), 3),
                          "unit_note": "MB = 10^6 octets as received on the wire (CRLF, byte-stuffing, status lines); "
                                       "timed from the first RETR to the last terminator, login excluded",
                          "tpops_mode": srv.mode}
                if d:
                    params["dovecot_wire_bytes"] = d[2][0]["wire_bytes"]
                    params["dovecot_runs_mb_per_s"] = [round(r["wire_bytes"] / r["elapsed_s"] / 1e6, 1) for r in d[2]]
                    params["dovecot_client_cpu_share"] = round(sum(r["client_cpu_s"] for r in d[2])
                                                               / sum(r["elapsed_s"] for r in d[2]), 3)
                ref = "260 MB/s" if tag == "1mib" else None
                self.add(f"retr_mb_per_s.{tag}.{style}", f"RETR {n} x {size // 1024} KiB, {style}", t[0], "MB/s",
                         "higher", params, dovecot=d[0] if d else None, goal="≥ Dovecot", reference=ref,
                         server=srv.label)
                if tag == "4kib":
                    ref = "43 000 msgs/s" if pipelined else None
                    self.add(f"retr_msgs_per_s.{tag}.{style}", f"RETR {n} x 4 KiB, {style} (msgs/s)", t[1], "msgs/s",
                             "higher", {"messages": n, "mode": style, "repetitions": p.reps, "aggregate": "median",
                                        "runs_msgs_per_s": [round(r["messages"] / r["elapsed_s"]) for r in t[2]],
                                        "tpops_mode": srv.mode},
                             dovecot=d[1] if d else None, goal="≥ Dovecot", reference=ref, server=srv.label)

    # -- 3. STAT + LIST + UIDL on a big Maildir
    def bench_listing(self) -> None:
        p = self.profile
        refs = {"bare": ("1.25 s", "0.02-0.06 s"), "S": ("0.94 s", "0.02-0.06 s"), "W": ("0.30 s", "0.02-0.06 s")}
        names = {"bare": "bare names", "S": ",S= names", "W": ",W= names"}
        for style, user in (("bare", "lbare"), ("S", "lsize"), ("W", "lwsize")):
            md = self.world.maildir(user)
            first: dict[str, list[dict]] = {}
            second: dict[str, list[dict]] = {}
            for _ in range(p.list_reps):
                for srv in self.servers_for_data():
                    srv.first_login_reset(md)
                    first.setdefault(srv.label, []).append(listing_run(srv.port, user, f"pw-{user}"))
                    second.setdefault(srv.label, []).append(listing_run(srv.port, user, f"pw-{user}"))
            srv = self.tpops[0]
            for which, data, ref in (("first", first, refs[style][0]), ("second", second, refs[style][1])):
                t = data[srv.label]
                d = data.get("dovecot")
                params = {
                    "messages": p.list_n, "names": names[style], "repetitions": p.list_reps, "aggregate": "median",
                    "runs_s": [round(r["elapsed_s"], 4) for r in t],
                    "pass_s_median": round(statistics.median(r["pass_s"] for r in t), 4),
                    "client_cpu_s_median": round(statistics.median(r["client_cpu_s"] for r in t), 4),
                    "stat": t[0]["stat"], "list_lines": t[0]["list_lines"], "uidl_lines": t[0]["uidl_lines"],
                    "timed": "from sending PASS to the end of the UIDL listing",
                    "first_login_means": "tpops: tpops-sizecache deleted; dovecot: all dovecot* index/uidlist "
                                         "files in the Maildir root deleted (indexes on disk, default location)",
                    "tpops_mode": srv.mode,
                    "tpops_sizes": "exact (computed: ,S= is not trusted unless $maildir_extended)"
                    if style != "W" else "exact (from ,W= plus a check of the last octet)",
                }
                if d:
                    params["dovecot_runs_s"] = [round(r["elapsed_s"], 4) for r in d]
                    params["dovecot_stat"] = d[0]["stat"]
                    params["dovecot_pass_s_median"] = round(statistics.median(r["pass_s"] for r in d), 4)
                self.add(f"list_s.{which}.{style}", f"STAT+LIST+UIDL {p.list_n} msgs, {which} login, {names[style]}",
                         statistics.median(r["elapsed_s"] for r in t), "s", "lower", params,
                         dovecot=statistics.median(r["elapsed_s"] for r in d) if d else None,
                         goal="≤ Dovecot", reference=ref, server=srv.label)

    # -- 4. RSS during a 200 MB RETR
    def bench_huge(self) -> None:
        size = self.profile.huge_size
        res = {}
        for srv in self.servers_for_data():
            res[srv.label] = huge_rss(srv, "huge", "pw-huge")
        srv = self.tpops[0]
        t = res[srv.label]
        d = res.get("dovecot")
        params = dict(t, message_file_octets=size, sampling="VmRSS every 50 ms; value = VmHWM at the end of the RETR",
                      tpops_mode=srv.mode)
        if d:
            params["dovecot_detail"] = d
        growth_ok = t["growth_kib"] < 10 * 1024
        self.add("rss_worker_mib.retr_200mb", f"worker peak RSS during a {size // MIB} MiB RETR",
                 t["hwm_kib"] / 1024, "MiB", "lower", params, dovecot=d["hwm_kib"] / 1024 if d else None,
                 goal="flat: grows < 10 MiB during the RETR", goal_met=growth_ok, server=srv.label)
        self.add("retr_mb_per_s.huge", f"RETR 1 x {size // MIB} MiB", t["mb_per_s"], "MB/s", "higher",
                 {"wire_bytes": t["wire_bytes"], "tpops_mode": srv.mode}, dovecot=d["mb_per_s"] if d else None,
                 goal="≥ Dovecot", server=srv.label)

    # -- 5. growth curve and user base (opt-in: --large, --million)
    def bench_curve(self) -> None:
        curve(self.world, self.servers_for_data(), self.profile.list_reps, self.add)

    def bench_million(self) -> None:
        p = self.profile
        million(self.world, p.warmup_secs, p.login_secs, self.add, count=MILLION if not self.args.quick else 20000)

    # -- 6. two nodes behind HAProxy (opt-in: --cluster)
    def skip(self, section: str, reason: str) -> None:
        self.skipped[section] = reason
        log(f"{section}: skipped: {reason}")

    def started(self, srv):  # any server with start() and stop()
        """Start ``srv`` and have teardown stop it."""
        self.extra_servers.append(srv)
        return srv.start()

    def bench_cluster(self) -> None:
        """Logins/s through a private HAProxy (TCP, send-proxy-v2) over two tpops nodes on 127.0.0.2 and
        127.0.0.3 sharing the Maildirs ($mailbox_lock = 'maildir', File auth), against one node directly:
        the cost of the proxy hop on a machine whose cores every process shares (no speed-up expected)."""
        reason = ensure_haproxy()
        if reason:
            self.skip("cluster", reason)
            return
        mode = "user" if IS_ROOT else "nonroot"
        nodes = [self.started(TpopsServer(self.world, mode, name=f"node{k}", host=host, probe_source=DIRECT_SOURCE,
                                          overrides={"haproxy_trusted_networks": "'127.0.0.1'",
                                                     "mailbox_lock": "'maildir'"}))
                 for k, host in enumerate(NODE_HOSTS, 1)]
        front = self.started(HAProxyFront(self.base, nodes))
        self.extra["cluster"] = {"haproxy": front.version(), "haproxy_config": front.conf.read_text(),
                                 "nodes": [f"{n.host}:{n.port}" for n in nodes], "mode": mode,
                                 "node_config": nodes[0].settings}
        p = self.profile
        creds = self.world.login_users
        for c in p.login_levels:
            before = [self.node_sessions(n) for n in nodes]
            via = login_rate(front.port, creds, c, p.warmup_secs, p.login_secs)
            spread = [self.node_sessions(n) - b for n, b in zip(nodes, before)]
            direct = login_rate(nodes[0].port, creds, c, p.warmup_secs, p.login_secs, host=nodes[0].host,
                                source=DIRECT_SOURCE)
            params = {k: v for k, v in via.items() if k != "value"}
            params.update(concurrency=c, duration_s=p.login_secs, warmup_s=p.warmup_secs, mode=mode,
                          nodes=2, node_addresses=list(NODE_HOSTS), mailbox_lock="maildir", auth="File",
                          sessions_per_node=spread,
                          sessions_per_node_note="access-log lines added during the HAProxy run (warm-up and "
                                                 "HAProxy's tcp-check health checks every 2 s included)",
                          direct_detail={k: v for k, v in direct.items() if k != "value"},
                          direct="the same clients bound to 127.0.0.9 (outside $haproxy_trusted_networks) "
                                 "straight to node 1, no PROXY header",
                          session="connect, greeting, USER, PASS, STAT, QUIT, wait for the close")
            self.add(f"cluster_login_sessions_per_s.c{c}", f"logins/s, {c} client{'s' if c > 1 else ''}, "
                     f"2 nodes via HAProxy ({mode})", via["value"], "sessions/s", "higher", params,
                     goal="cost of the proxy hop (2 shared cores: no speed-up expected)", server="haproxy + 2 x tpops",
                     baseline=("one node directly", direct["value"]))

    @staticmethod
    def node_sessions(node: TpopsServer) -> int:
        try:
            return node.access_log.read_bytes().count(b"\n")
        except OSError:
            return 0

    # -- 7. implicit TLS against Dovecot with the same certificate (opt-in: --tls)
    def bench_tls(self) -> None:
        """Logins/s over implicit TLS at 1, 8 and 32 clients (full handshakes; session resumption)
        and RETR 50 x 1 MiB over TLS, each tpops mode against the Dovecot with its process model."""
        assert self.certs is not None
        servers: list[TpopsServer] = []
        for base in self.tpops:
            srv = TpopsServer(self.world, base.mode, name=f"{base.mode}, TLS", tls=self.certs)
            try:
                self.started(srv)
            except RuntimeError as exc:
                self.skip("tls", "tpops does not serve TLS yet: with $tls_cert_file, $tls_key_file and $tls_port "
                                 f"set it did not greet over implicit TLS ({str(exc).splitlines()[0]})")
                return
            servers.append(srv)
        self.extra["tls"] = {
            "certificate": f"trustme {KEY_TYPE.upper()} leaf for 127.0.0.1/localhost + its CA, the same files "
                           "for tpops ($tls_cert_file/$tls_key_file) and Dovecot (ssl_cert/ssl_key)",
            "client": "Python ssl, create_default_context(cafile=CA): chain and 127.0.0.1 verified; "
                      "full = no session offered; resumed = each client offers the session its previous "
                      "connection got (TLS 1.3 ticket)",
            "tpops_config": servers[0].settings,
        }
        p = self.profile
        creds = self.world.login_users
        ca = str(self.certs.ca_file)
        refs = {"full": "full handshake per session", "resumed": "session resumption"}
        for c in TLS_LEVELS:
            for resume in (False, True):
                kind = "resumed" if resume else "full"
                order: list[Server] = []
                for srv in servers:
                    order.append(srv)
                    pair = self.paired(srv)
                    if pair and pair.tls_port and pair not in order:
                        order.append(pair)
                results, values = self.repeated(order, lambda s: tls_login_rate(
                    s.tls_port, ca, creds, c, p.warmup_secs, p.login_secs, resume=resume,
                    cpu_of=s.master_pid()))
                for srv in servers:
                    r = results[srv.label]
                    pair = self.paired(srv)
                    dv = results.get(pair.label) if pair else None
                    params = {k: v for k, v in r.items() if k != "value"}
                    params.update(self.runs_params(values, srv))
                    params.update(concurrency=c, duration_s=p.login_secs, warmup_s=p.warmup_secs, mode=srv.mode,
                                  handshake=refs[kind], port="implicit TLS ($tls_port / pop3s)",
                                  session="connect, TLS handshake, greeting, USER, PASS, STAT, QUIT, wait for the close")
                    if srv.launcher_note:
                        params["launcher"] = srv.launcher_note
                    if dv:
                        params["dovecot_variant"] = pair.variant
                        params["dovecot_detail"] = {k: v for k, v in dv.items() if k != "value"}
                    self.add(f"tls_login_sessions_per_s.{kind}.c{c}.{srv.mode}",
                             f"TLS logins/s, {kind} handshake, {c} client{'s' if c > 1 else ''} ({srv.mode})",
                             r["value"], "sessions/s", "higher", params, dovecot=dv["value"] if dv else None,
                             goal="≥ Dovecot" if srv.mode != "root-drop" else "(reported)", server=srv.label)
        ctx = self.certs.client_context()
        for srv in servers:
            pair = self.paired(srv)
            for pipelined in (False, True):
                style = "pipelined" if pipelined else "lockstep"
                runs: dict[str, list[dict]] = {}
                for _ in range(p.reps):
                    for s in ([srv, pair] if pair and pair.tls_port else [srv]):
                        runs.setdefault(s.label, []).append(
                            retr_run(s.tls_port, "big", "pw-big", p.big_n, pipelined, tls=ctx))
                rate = {label: statistics.median(r["wire_bytes"] / r["elapsed_s"] / 1e6 for r in rs)
                        for label, rs in runs.items()}
                t = runs[srv.label]
                params = {"messages": p.big_n, "message_file_octets": p.big_size, "mode": style,
                          "repetitions": p.reps, "aggregate": "median", "tpops_mode": srv.mode,
                          "runs_mb_per_s": [round(r["wire_bytes"] / r["elapsed_s"] / 1e6, 1) for r in t],
                          "client_cpu_share": round(sum(r["client_cpu_s"] for r in t) / sum(r["elapsed_s"] for r in t), 3),
                          "unit_note": "MB = 10^6 octets of POP3 data as decrypted by the client; timed from the "
                                       "first RETR to the last terminator, login and handshake excluded"}
                if pair and pair.label in runs:
                    params["dovecot_variant"] = pair.variant
                    params["dovecot_runs_mb_per_s"] = [round(r["wire_bytes"] / r["elapsed_s"] / 1e6, 1)
                                                       for r in runs[pair.label]]
                self.add(f"tls_retr_mb_per_s.1mib.{style}.{srv.mode}",
                         f"TLS RETR {p.big_n} x {p.big_size // MIB} MiB, {style} ({srv.mode})", rate[srv.label],
                         "MB/s", "higher", params, dovecot=rate.get(pair.label) if pair else None,
                         goal="≥ Dovecot" if srv.mode != "root-drop" else "(reported)", server=srv.label)

    def health(self) -> dict:
        out = {}
        for srv in [*self.tpops, *(s for s in self.extra_servers if isinstance(s, TpopsServer))]:
            text = srv.problems()
            lines = [line for line in text.splitlines() if "Traceback" in line or "ERROR" in line.upper()]
            try:
                access_lines = srv.access_log.read_bytes().count(b"\n")
            except OSError:
                access_lines = 0
            out[srv.label] = {"error_lines": len(lines), "first": lines[:5], "access_log_lines": access_lines,
                              "launcher": srv.launcher_note}
        return out

    def run(self) -> dict:
        started = time.time()
        t0 = time.monotonic()
        try:
            self.setup()
            for section in SECTIONS:
                if section in self.args.sections:
                    getattr(self, f"bench_{section.replace('-', '_')}")()
            health = self.health()
        finally:
            self.teardown()
        try:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                                   capture_output=True, text=True, timeout=30).stdout.split("\n")
            git = {"head": head, "uncommitted_src_files": sorted(x[3:] for x in dirty if x.strip())}
        except (OSError, subprocess.SubprocessError):
            git = {}
        try:
            tpops_version = subprocess.run([str(TPOPS), "--version"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            tpops_version = "?"
        return {
            "tool": "scripts/bench",
            "format": 1,
            "quick": self.args.quick,
            "tpops_settings": self.args.tpops_setting,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.monotonic() - t0, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "uid": os.geteuid(),
                "note": "the load generator (Python, multiprocessing + epoll, 1 process at 1 client, 2 above) "
                        "shares the CPUs with the server under test; its CPU time is in each login entry",
            },
            "tpops": {"version": tpops_version, "git": git, "modes": [s.mode for s in self.tpops],
                      "config": self.tpops[0].settings if self.tpops else {}, "health": health,
                      "data_metrics_mode": self.tpops[0].mode if self.tpops else None},
            "dovecot": None if self.dovecot is None else {
                "version": self.dovecot.version(),
                "variants": {
                    d.variant: {"config": d.config_summary,
                                "compared_with": [m for m, v in PAIRING.items() if v == d.variant],
                                "login_rows_compared_with": [m for m, g in LOGIN_GOALS.items() if g[0] == d.variant]}
                    for d in self.dovecots.values()
                },
                "data_metrics_variant": self.dovecot.variant,
                "index_handling": "indexes on disk in the Maildir root (mail_location = maildir:~/Maildir); all "
                                  "dovecot* files there deleted before each first-login repetition",
            },
            "dovecot_unavailable_reason": self.dovecot_reason if self.dovecot is None else None,
            "skipped": self.skipped,
            **self.extra,
            "metrics": self.metrics,
        }
