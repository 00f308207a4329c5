"""Smoke test of ``python -m experiments.bench_learned --quick``."""

import json
import subprocess
import sys

import pytest
from _helpers import REPO_ROOT, benchmark_env


# A quick run of a benchmark script takes 20-40 s of CPU (subprocesses, compiles): with
# -m slow, so that CI's default run stays well under its 20 minutes.
@pytest.mark.slow
def test_quick_run_reports_the_step_against_its_floor_and_the_reference(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_learned", "--quick", f"--out_dir={tmp_path}"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_learned.json") as f:
        report = json.load(f)
    (row,) = report["rows"]
    assert row["case"] == "adamerging_layer_step" and row["num_models"] == 2
    # One coefficient group per floating leaf of the quick ViT: conv1, class and positional
    # embeddings, ln_pre and ln_post (scale, bias), proj; 16 per block (2 blocks).
    assert row["groups"] == 8 + 2 * 16
    assert row["step_s"] > 0 and len(row["step_times_s"]) == 1
    assert row["compute_floor_s"] == pytest.approx(row["step_flops"]
                                                   / row["matmul_flops_per_s"])
    assert row["speedup_vs_reference"] == pytest.approx(52.7 / row["step_s"])
    assert len(row["losses"]) == 2 and row["losses"][1] < row["losses"][0]  # one Adam step
    assert "adamerging_layer_step" in proc.stdout
