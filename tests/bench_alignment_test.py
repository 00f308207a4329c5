"""Smoke test of ``python -m experiments.bench_alignment --quick``."""

import json
import subprocess
import sys

import pytest
from _helpers import REPO_ROOT, benchmark_env


# A quick run of a benchmark script takes 20-40 s of CPU (subprocesses, compiles): with
# -m slow, so that CI's default run stays well under its 20 minutes.
@pytest.mark.slow
def test_quick_run_times_both_solvers_and_recovers_planted_permutations(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_alignment", "--quick",
         f"--out_dir={tmp_path}", "--cases=vit_b32_planted,resnet20x4"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_alignment.json") as f:
        rows = json.load(f)["rows"]
    cases = {(r["case"], r["solver"]) for r in rows}
    # One planted and one independent pair (CI time); the full run has all four.
    assert cases == {(c, s) for c in ("vit_b32_planted", "resnet20x4")
                     for s in ("device", "scipy")}
    for r in rows:
        assert r["sweeps"] >= 1 and r["warm_s"] > 0 and r["objective"] > 0, r
        assert r["assignments"] >= r["permutations"] and r["compile_s"] >= 0, r
        assert 0 < r["lap_s_largest"] <= r["warm_s"] and 0 < r["lap_share"] <= 1, r
        assert str(r["largest"]) in r["lap_s_by_size"], r
        assert r["history"][-1] == r["objective"] and len(r["history"]) == r["sweeps"] + 1, r
        assert r["units_differing_between_solvers"] == 0, r
        if r["case"].endswith("planted"):
            assert r["recovered"] is True, r
    assert "solvers differ" in proc.stdout
