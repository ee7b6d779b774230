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
        rows.append(f"| {entry['title']} | {fmt(entry['value'], entry['unit'])} | "
                    f"{fmt(entry['dovecot'], entry['unit'])} | {ratio} | {goal} |")
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
    return "\n".join(rows)
