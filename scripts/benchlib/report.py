"""The Markdown table of a bench result, for the README."""

from __future__ import annotations


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    if unit in ("sessions/s", "msgs/s"):
        return f"{value:,.0f}/s".replace(",", " ")
    return f"{value:.4g} {unit}"


def other_variants(result: dict, prefix: str) -> str:
    """The Dovecot variants a login section's ratios do not use, level by level, from the rows' parameters:
    "per-session: 1 client 116/s (tpops/it: root-drop 0.95, user 4.74), ..." ("" when there are none)."""
    by_variant: dict[str, dict[int, list[str]]] = {}
    figures: dict[str, dict[int, float]] = {}
    for name, entry in result["metrics"].items():
        if not name.startswith(prefix):
            continue
        par = entry["parameters"]
        for variant, value in (par.get("dovecot_all_variants_sessions_per_s") or {}).items():
            if variant == par.get("dovecot_variant"):
                continue
            level = par["concurrency"]
            figures.setdefault(variant, {})[level] = value
            ratio = (par.get("ratio_by_dovecot_variant") or {}).get(variant)
            errors = (par.get("dovecot_errors_by_variant") or {}).get(variant)
            note = f"{par['mode']} {'—' if ratio is None else f'{ratio:.2f}'}"
            if errors:
                note += f"; Dovecot errors {errors}"
            by_variant.setdefault(variant, {}).setdefault(level, []).append(note)
    parts = []
    for variant, levels in by_variant.items():
        each = ", ".join(f"{c} client{'s' if c > 1 else ''} {fmt(figures[variant][c], 'sessions/s')} "
                         f"(tpops/it: {', '.join(notes)})" for c, notes in sorted(levels.items()))
        parts.append(f"Dovecot {variant}: {each}")
    return "; ".join(parts)


def markdown(result: dict) -> str:
    rows = ["| metric | tpops | dovecot | ratio | goal |", "|---|---:|---:|---:|---|"]
    for entry in result["metrics"].values():
        ratio = "—" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
        goal = entry["goal"] or "—"
        if entry["goal_met"] is True:
            goal += " ✅"
        elif entry["goal_met"] is False:
            goal += " ❌"
        other = fmt(entry["dovecot"], entry["unit"])
        if entry.get("baseline"):
            other = f"{fmt(entry['baseline']['value'], entry['unit'])} ({entry['baseline']['what']})"
        rows.append(f"| {entry['title']} | {fmt(entry['value'], entry['unit'])} | "
                    f"{other} | {ratio} | {goal} |")
    m = result["machine"]
    dv = result["dovecot"]["version"] if result["dovecot"] else f"not measured: {result['dovecot_unavailable_reason']}"
    rows.append("")
    rows.append(f"{result['tpops']['version']} vs Dovecot {dv}; {m['cpus']} CPUs, Linux {m['kernel']}, "
                f"Python {m['python']}, uid {m['uid']}; {result['started']}"
                f"{' (--quick)' if result['quick'] else ''}. Ratio = tpops / Dovecot. The Python load generator "
                f"shares the CPUs with the servers. Login rows compare both tpops modes (root-drop: workers "
                f"authenticate as root and hand each session to a kept post-login process of the mailbox owner; "
                f"--user nobody) with Dovecot in its high-performance login mode (pop3-login service_count = 0, "
                f"a pop3 process per session: issue 12's baseline); Dovecot reusing pop3 processes "
                f"(service_count = 1000) ran in the same runs (figures below "
f"and in the JSON). Pool rows compare root-drop with Dovecot's default and --user with Dovecot "
                f"reusing processes; both Dovecots keep 8 pop3 processes pre-started. RETR/LIST/RSS rows: tpops "
                f"{result['tpops']['data_metrics_mode']} vs Dovecot per-session, sizes exact in tpops.")
    login_others = other_variants(result, "login_sessions_per_s.")
    if login_others:
        rows.append("")
        rows.append(f"Login rows, the other Dovecot variant in the same runs: {login_others}.")
    uids = result.get("logins_uids")
    if uids:
        rows.append("")
        rows.append(f"Distinct-uid rows: {uids['users']} users with uids and gids {uids['uids']} (passwd-file uid "
                    f"and gid fields, Maildir trees chowned to them, no /etc/passwd entries), tpops root-drop "
                    f"against the Dovecot variant named in the goal: the one with more logins/s among those "
                    f"without errors (a reused Dovecot pop3 process cannot switch uid). "
                    f"{other_variants(result, 'login_uids_sessions_per_s.')}.")
    if result.get("cluster"):
        rows.append("")
        rows.append(f"Cluster rows: {result['cluster']['haproxy']} (TCP, send-proxy-v2, tcp-check) over two tpops "
                    f"--{result['cluster']['mode']} nodes on 127.0.0.2/127.0.0.3 sharing the Maildirs "
                    f"($mailbox_lock = 'maildir'); the 'dovecot' column holds the same clients straight to one "
                    f"node, ratio = via HAProxy / direct; every process shares the same CPUs.")
    if result.get("tls"):
        rows.append("")
        rows.append(f"TLS rows: {result['tls']['certificate']}; {result['tls']['client']}. tpops --user is "
                    f"compared with Dovecot reusing processes, root-drop with Dovecot's default.")
    for section, why in (result.get("skipped") or {}).items():
        rows.append("")
        rows.append(f"Section {section} skipped: {why}")
    return "\n".join(rows)
