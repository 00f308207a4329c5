"""End to end: ``python -m experiments.rebasin`` with the tiny config prints its
before/after table and writes the JSON, the markdown table and the plots."""

import json
import subprocess
import sys

import numpy as np
from _helpers import REPO_ROOT, benchmark_env


def test_rebasin_binary_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.rebasin",
         f"--config={REPO_ROOT}/experiments/configs/rebasin.py:tiny",
         f"--config.out_dir={tmp_path}"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=900,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "rebasin.json") as f:
        report = json.load(f)
    rows = {r["method"]: r for r in report["rows"]}
    methods = ("naive average", "weight_matching", "weight_matching (scipy)",
               "activation_matching", "ste_matching", "zipit", "mudsc")
    assert set(methods) <= set(rows)
    for name in methods:
        assert 0.0 <= rows[name]["merged_accuracy"] <= 1.0, name
        assert f"| {name} |" in proc.stdout
    for name in methods[:5]:  # permutation methods: barriers along the aligned path
        curve = report["curves"]["naive" if name == "naive average" else name]
        assert rows[name]["loss_barrier"] >= 0.0
        assert len(curve["ts"]) == 5 and curve["ts"][0] == 0.0 and curve["ts"][-1] == 1.0
        # The barrier is what the curve says: the largest gap above the chord.
        loss, ts = np.array(curve["loss"]), np.array(curve["ts"])
        chord = (1 - ts) * loss[0] + ts * loss[-1]
        assert rows[name]["loss_barrier"] == np.max(loss - chord)
    # Both solvers found the same permutations, so the same aligned model.
    assert rows["weight_matching"]["merged_loss"] == rows["weight_matching (scipy)"][
        "merged_loss"]
    for key in ("loss", "accuracy"):
        assert (tmp_path / f"lmc_{key}.png").stat().st_size > 0
    assert (tmp_path / "rebasin.md").read_text().startswith("| method |")


def test_rebasin_unknown_method_fails_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.rebasin",
         f"--config={REPO_ROOT}/experiments/configs/rebasin.py:tiny",
         f"--config.out_dir={tmp_path}", "--config.methods=('weight_matching','zipitt')"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode != 0
    assert "unknown alignment method(s) ['zipitt']" in proc.stderr
    assert not (tmp_path / "rebasin.json").exists()
