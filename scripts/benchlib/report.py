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
                f"shares the CPUs with the servers. Login and pool rows compare tpops root-drop (a worker per "
                f"session) with Dovecot's default (a pop3 process per session), and tpops --user nobody with "
                f"Dovecot reusing pop3 processes (service_count = 1000); both Dovecots keep 8 pop3 processes "
                f"pre-started. RETR/LIST/RSS rows: tpops {result['tpops']['data_metrics_mode']} vs Dovecot "
                f"per-session, sizes exact in tpops.")
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
