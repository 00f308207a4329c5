"""Smoke test of ``python -m experiments.bench_sparse --quick`` on a few cases."""

import json
import subprocess
import sys

import pytest
from _helpers import REPO_ROOT, benchmark_env

CASES = ("floor_base", "task_arithmetic", "ties_global", "dare_ties")


# A quick run of a benchmark script takes 20-40 s of CPU (subprocesses, compiles): with
# -m slow, so that CI's default run stays well under its 20 minutes.
@pytest.mark.slow
def test_quick_run_reports_ratios_to_task_arithmetic(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_sparse", "--quick", f"--out_dir={tmp_path}",
         f"--cases={','.join(CASES)}"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_sparse.json") as f:
        report = json.load(f)
    rows = {r["case"]: r for r in report["rows"]}
    assert tuple(rows) == CASES
    assert rows["task_arithmetic"]["x_task_arithmetic"] == 1.0
    for name in ("ties_global", "dare_ties"):
        r = rows[name]
        assert r["paired_with"] == "task_arithmetic", name
        assert r["x_task_arithmetic"] > 0 and r["x_task_arithmetic_paired"] > 0, name
        assert r["peak_rss"] > r["inputs_bytes"] > 0, name
    # A new scale reuses the compiled merge.
    for name in ("ties_global", "dare_ties"):
        assert rows[name]["new_coefficient"][-1]["compiles"] == 0, rows[name]
    assert rows["ties_global"]["vs_fusionbench_ties"]["speedup"] > 0
    assert "Global TIES vs FusionBench" in proc.stdout
