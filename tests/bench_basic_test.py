"""Smoke test of the benchmark binary: ``python -m experiments.bench_basic --quick``."""

import json
import subprocess
import sys

from _helpers import REPO_ROOT, benchmark_env

# The checked-against-the-floor pairs; the *_nocheck cases run the same code with a static
# switch flipped (covered by tests/engine_test.py), so CI skips their two subprocesses.
CASES = ("floor", "floor_base", "linear", "task_arithmetic")


def test_quick_run_writes_every_row(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_basic", "--quick", f"--out_dir={tmp_path}",
         f"--cases={','.join(CASES)}"],
        cwd=REPO_ROOT, env=benchmark_env(), capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(tmp_path / "bench_basic.json") as f:
        report = json.load(f)
    rows = {r["case"]: r for r in report["rows"]}
    assert list(rows) == list(CASES)
    for name, r in rows.items():
        assert r["first_call_s"] > 0, name
        assert r["best_s"] > 0 and r["median_s"] >= r["best_s"], name
        assert len(r["times_s"]) == report["config"]["repeats"] == 1, name
        assert r["gbps"] > 0 and r["peak_rss"] > r["inputs_bytes"] > 0, name
        assert r["ratio_to_floor"] > 0, name
    assert rows["floor"]["ratio_to_floor"] == 1.0
    assert rows["task_arithmetic"]["floor_case"] == "floor_base"
    assert rows["linear"]["floor_case"] == "floor"
    # A new coefficient reuses the compiled merge: the last such call compiles nothing.
    for name in ("linear", "task_arithmetic"):
        assert rows[name]["new_coefficient"][-1]["compiles"] == 0, rows[name]["new_coefficient"]
        assert rows[name]["compiles_first_call"] >= 1, name
    machine = report["machine"]
    assert machine["jax"] and machine["cpu_count"] >= 1 and machine["devices"]
    assert report["model"]["params"] > 0 and report["model"]["leaves"] > 10
    for case in CASES:
        assert case in proc.stdout  # the printed table
