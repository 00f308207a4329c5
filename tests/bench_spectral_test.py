"""Smoke test of ``python -m experiments.bench_spectral --quick``."""

import json
import subprocess
import sys

import pytest
from _helpers import REPO_ROOT, benchmark_env

CASES = ("floor_base", "task_arithmetic", "tsv_m", "iso_c", "wudi_gradient")


# A quick run of a benchmark script takes 20-40 s of CPU (subprocesses, compiles): with
# -m slow, so that CI's default run stays well under its 20 minutes.
@pytest.mark.slow
def test_quick_run_reports_speedups_against_fusionbench(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_spectral", "--quick", f"--out_dir={tmp_path}",
         f"--cases={','.join(CASES)}"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_spectral.json") as f:
        report = json.load(f)
    rows = {r["case"]: r for r in report["rows"]}
    assert tuple(rows) == CASES
    assert rows["task_arithmetic"]["x_task_arithmetic"] == 1.0
    # The quick CLIP layout: conv1, class/positional embeddings, 2 blocks, proj.
    assert report["model"]["leaves"] == 5 + 2 * 12 + 3
    for name in ("tsv_m", "iso_c", "wudi_gradient"):
        r = rows[name]
        assert r["speedup_vs_fusionbench"] > 0 and r["fusionbench_s"] > 0, name
        assert r["new_coefficient_recompiles"] == 0, name
    assert rows["wudi_gradient"]["fusionbench_s"] == 80.0 * report["config"]["wudi_iterations"]
    assert "speed-up" in proc.stdout
