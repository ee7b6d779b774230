"""Smoke test of scripts/bench: --quick runs without Dovecot write every metric, the opt-in cluster and TLS rows too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.marks import IN_CI

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


def opt_in_metrics() -> tuple[list[str], list[str]]:
    """The rows of the opt-in sections: two nodes behind HAProxy, and implicit TLS."""
    cluster = [f"cluster_login_sessions_per_s.c{c}" for c in (1, 32, 128)]
    modes = ["root-drop", "user"] if os.geteuid() == 0 else ["nonroot"]
    tls = [f"tls_login_sessions_per_s.{kind}.c{c}.{mode}"
           for kind in ("full", "resumed") for c in (1, 8, 32) for mode in modes]
    tls += [f"tls_retr_mb_per_s.1mib.{style}.{mode}" for style in ("lockstep", "pipelined") for mode in modes]
    return cluster, tls


@pytest.mark.timeout(180)
@pytest.mark.skipif(not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()) and not IN_CI,
                    reason="haproxy not installed (scripts/test installs it; in CI its absence fails)")
def test_bench_quick_cluster_and_tls_sections(tmp_path: Path) -> None:
    out = tmp_path / "opt.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-dovecot", "--only", "cluster,tls", "--out", str(out)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    cluster, tls = opt_in_metrics()
    assert result["skipped"] == {}, result["skipped"]
    for name in cluster + tls:
        assert name in metrics, f"{name} missing; got {sorted(metrics)}"
        entry = metrics[name]
        assert entry["value"] > 0, (name, entry)
        if "login" in name:
            assert entry["parameters"]["errors"] == 0, (name, entry["parameters"]["error_samples"])
    for name in cluster:
        params = metrics[name]["parameters"]
        # Both nodes served sessions through HAProxy, and the direct run is the ratio's baseline.
        assert all(n > 0 for n in params["sessions_per_node"]), params["sessions_per_node"]
        assert params["direct_detail"]["errors"] == 0, params["direct_detail"]["error_samples"]
        assert metrics[name]["baseline"]["what"] == "one node directly"
        assert metrics[name]["ratio"] == round(metrics[name]["value"] / metrics[name]["baseline"]["value"], 3)
    for name in tls:
        if "login" in name:
            params = metrics[name]["parameters"]
            assert params["tls_versions"] and all(v.startswith("TLSv1.") for v in params["tls_versions"])
            if ".full." in name:
                assert params["tls_resumed"] == 0, params
    health = result["tpops"]["health"]
    assert all(h["error_lines"] == 0 for h in health.values()), health
    assert "2 nodes via HAProxy" in proc.stdout and "(one node directly)" in proc.stdout
