"""Smoke test of scripts/bench: a --quick run without Dovecot writes every metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"


def expected_metrics() -> list[str]:
    modes = ["root-drop", "user"] if os.geteuid() == 0 else ["nonroot"]
    names = []
    for mode in modes:
        names += [f"login_sessions_per_s.c{c}.{mode}" for c in (1, 32, 128)]
        names += [f"rss_master_mib.{mode}", f"rss_idle_worker_mib.{mode}"]
        names += [f"pss_master_mib.{mode}", f"pss_idle_worker_mib.{mode}"]
    for size in ("1mib", "4kib"):
        names += [f"retr_mb_per_s.{size}.{style}" for style in ("lockstep", "pipelined")]
    names += [f"retr_msgs_per_s.4kib.{style}" for style in ("lockstep", "pipelined")]
    names += [f"list_s.{which}.{style}" for which in ("first", "second") for style in ("bare", "S", "W")]
    names += ["rss_worker_mib.retr_200mb", "retr_mb_per_s.huge"]
    return names


@pytest.mark.timeout(180)
def test_bench_quick_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "tmp.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-dovecot", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["dovecot"] is None
    assert result["dovecot_unavailable_reason"] == "--no-dovecot"
    metrics = result["metrics"]
    for name in expected_metrics():
        assert name in metrics, f"{name} missing; got {sorted(metrics)}"
        entry = metrics[name]
        assert isinstance(entry["value"], (int, float)) and entry["value"] > 0, (name, entry)
        assert entry["unit"] and entry["parameters"], name
        assert entry["dovecot"] is None and entry["ratio"] is None, name
        if name.startswith("login_"):
            assert entry["parameters"]["errors"] == 0, (name, entry["parameters"]["error_samples"])
    # The Markdown table for the README goes to stdout.
    assert proc.stdout.startswith("| metric | tpops | dovecot | ratio | goal |")
    assert proc.stdout.count("\n| ") >= len(expected_metrics())
