r"""Benchmark of the sparse / sign-consensus family against task arithmetic.

On the synthetic ViT-shaped pytree of `experiments.benchlib` (``--params_millions``
float32 parameters, base + ``--num_models`` fine-tunes; the default 88M is ViT-B/32's
size), times ``ties`` (global and per-tensor scope), ``dare_ties``, ``della``,
``breadcrumbs``, ``pcb``, ``emr`` and ``magmax`` next to ``task_arithmetic`` on the same
inputs, each case in its own process (so that its peak RSS is its own). For every method
the ratio to task arithmetic is given twice: best / best across processes, and the median
over rounds in which the method and task arithmetic are timed alternately in the method's
process. Peak memory is reported in models' worth above the inputs, and the memory floor
(reading base + K models, writing one) is measured in the same run.

Targets (the issue's): global TIES <= 5x task arithmetic, per-tensor methods <= 2x, peak
memory <= inputs + 2 models; for scale, FusionBench's global TIES takes 36.4 s and peaks
at 22.7 GiB on these shapes (../shared/baselines.md).

Usage::

  python -m experiments.bench_sparse --out_dir=results/bench_sparse
  python -m experiments.bench_sparse --quick --out_dir=/tmp/bench   # seconds, for tests

Writes ``<out_dir>/bench_sparse.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags

import mergejax
from experiments import benchlib
from experiments.benchlib import GB

#: case -> (method, hparams, random, per-tensor target x task arithmetic or None)
METHODS: dict[str, tuple[str, dict[str, Any], bool, float | None]] = {
    "ties_global": ("ties", {"scope": "global"}, False, 5.0),
    "ties_tensor": ("ties", {"scope": "tensor", "topk": "mergekit"}, False, 2.0),
    "dare_ties": ("dare_ties", {"density": 0.1}, True, 2.0),
    "della": ("della", {"rank_axis": 0}, True, 2.0),
    "breadcrumbs": ("breadcrumbs", {}, False, 2.0),
    "pcb": ("pcb", {}, False, None),
    "emr": ("emr", {}, False, None),
    "magmax": ("magmax", {}, False, 2.0),
}
CASES = ("floor_base", "task_arithmetic", *METHODS)
FUSIONBENCH_TIES = dict(seconds=36.4, peak_gib=22.7)

_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench_sparse",
                               "Where bench_sparse.json is written.")
_PARAMS_MILLIONS = flags.DEFINE_float("params_millions", 88.0,
                                      "Parameters per model, in millions (at least).")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "K, the number of fine-tuned models.")
_WIDTH = flags.DEFINE_integer("width", 768, "Transformer width.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per case (after the warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the synthetic parameters.")
_SETTLE_S = flags.DEFINE_float("settle_s", 0.25, "Untimed pause after every call.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes and one repeat, for tests.")
_CASES = flags.DEFINE_list("cases", ",".join(CASES), f"Cases to run, from {CASES}.")
_MEMORY_SCHEDULER = flags.DEFINE_bool(
    "memory_scheduler", True,
    "Run the cases with XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false. "
    "XLA:CPU's default scheduler orders the per-leaf work of a large program for "
    "concurrency and keeps every leaf's intermediates alive at once: measured on a 22M "
    "model, per-tensor TIES holds 20.5 models' worth of temporaries with it, 2.0 without.")
_ONLY = flags.DEFINE_string("only", None, "Internal: run this one case.")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "Internal: see --only.")


def config() -> dict[str, Any]:
    if _QUICK.value:
        return dict(params_millions=0.4, num_models=3, width=64, repeats=1, seed=_SEED.value,
                    scale=0.3, settle_s=0.0)
    return dict(params_millions=_PARAMS_MILLIONS.value, num_models=_NUM_MODELS.value,
                width=_WIDTH.value, repeats=_REPEATS.value, seed=_SEED.value, scale=0.3,
                settle_s=_SETTLE_S.value)


def case_calls(name: str, base, models, scale: float
               ) -> tuple[Callable[[], Any], list[tuple[str, Callable[[], Any]]], int]:
    """``(timed call, [(label, call with a new coefficient)], trees read)``."""
    k = len(models)
    if name == "floor_base":
        return lambda: benchlib.floor_base(base, models), [], k + 1
    if name == "task_arithmetic":
        return (lambda: mergejax.task_arithmetic(base, models, scale=scale),
                [(f"scale={scale + 0.2:g}",
                  lambda: mergejax.task_arithmetic(base, models, scale=scale + 0.2))], k + 1)
    method_name, hparams, random, _ = METHODS[name]
    method = mergejax.get_method(method_name)
    extra = {"key": jax.random.key(0)} if random else {}
    call = lambda **more: method(base, models, **hparams, **extra, **more)  # noqa: E731
    if "scale" in method.hparams:
        return call, [(f"scale={scale + 0.2:g}", lambda: call(scale=scale + 0.2))], k + 1
    return call, [], k + 1


_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _run(name: str) -> dict[str, Any]:
    if _MEMORY_SCHEDULER.value and _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}".strip()
    return benchlib.run_in_subprocess(
        "experiments.bench_sparse", name,
        [f"--params_millions={_PARAMS_MILLIONS.value}", f"--num_models={_NUM_MODELS.value}",
         f"--width={_WIDTH.value}", f"--repeats={_REPEATS.value}", f"--seed={_SEED.value}",
         f"--settle_s={_SETTLE_S.value}", "--quick" if _QUICK.value else "--noquick"])


def summarize(rows: list[dict[str, Any]]) -> None:
    """Adds the ratios to task arithmetic and to the floor, and the target checks."""
    by_case = {r["case"]: r for r in rows}
    ta, floor = by_case.get("task_arithmetic"), by_case.get("floor_base")
    for r in rows:
        r["x_task_arithmetic"] = r["best_s"] / ta["best_s"] if ta else None
        r["x_task_arithmetic_paired"] = (r["paired_ratio_median"]
                                         if r.get("paired_with") == "task_arithmetic" else None)
        r["x_floor"] = r["best_s"] / floor["best_s"] if floor else None
        target = METHODS[r["case"]][3] if r["case"] in METHODS else None
        r["target_x_task_arithmetic"] = target
        ratio = r["x_task_arithmetic_paired"] or r["x_task_arithmetic"]
        r["meets_time_target"] = (ratio <= target) if target and ratio else None
        r["meets_memory_target"] = r["extra_first_call_models"] <= 2.0
        r["new_coefficient_recompiles"] = sum(c["compiles"] for c in r["new_coefficient"])
        if r["case"] == "ties_global":
            r["vs_fusionbench_ties"] = dict(
                speedup=FUSIONBENCH_TIES["seconds"] / r["best_s"],
                peak_gib=r["peak_rss"] / GB, fusionbench_peak_gib=FUSIONBENCH_TIES["peak_gib"])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("case", "compile s", "best s", "median s", "x TA", "x TA paired", "x floor",
              "peak GiB", "extra models", "recompiles", "target")
    fmt_ratio = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    lines = []
    for r in rows:
        target = r["target_x_task_arithmetic"]
        met = r["meets_time_target"]
        lines.append((r["case"], f"{r['compile_s']:.1f}", f"{r['best_s']:.3f}",
                      f"{r['median_s']:.3f}", fmt_ratio(r["x_task_arithmetic"]),
                      fmt_ratio(r["x_task_arithmetic_paired"]), fmt_ratio(r["x_floor"]),
                      f"{r['peak_rss'] / GB:.2f}", f"{r['extra_first_call_models']:.2f}",
                      str(r["new_coefficient_recompiles"]),
                      f"<= {target:g}x: {'yes' if met else 'NO'}" if target else "-"))
    return benchlib.format_table(header, lines)


LEGEND = """\
compile s: trace + lower + compile of the first call. best/median s: of the timed calls.
x TA: best / best of task_arithmetic (separate processes); x TA paired: median of
  method / task_arithmetic timed alternately in the method's process. x floor: best / best
  of floor_base (read base + K models, write one).
extra models: (peak RSS - RSS before the inputs - inputs) / model bytes after one call
  (the output itself is 1; target <= 2). recompiles: XLA compilations of a call with a new
  scale (target 0). --memory_scheduler (default) runs the cases with XLA:CPU's
  memory-minimising scheduler (see the flag's help)."""


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config()
    if _ONLY.value is not None:
        if _ONLY.value not in CASES or not _RESULT_FILE.value:
            raise app.UsageError(f"--only takes one of {CASES} and needs --result_file")
        partner = "task_arithmetic" if _ONLY.value in METHODS else None
        row = benchlib.run_case(_ONLY.value, cfg, case_calls, partner)
        with open(_RESULT_FILE.value, "w") as f:
            json.dump(row, f)
        return
    rows = benchlib.run_selected(CASES, _CASES.value, _run)
    summarize(rows)
    model = rows[0]["model"]
    print(f"\n{model['params'] / 1e6:.1f}M float32 params per model, {model['leaves']} "
          f"leaves, K={cfg['num_models']} + base (inputs "
          f"{(cfg['num_models'] + 1) * model['model_bytes'] / GB:.2f} GiB); best/median of "
          f"{cfg['repeats']}; {jax.default_backend()}, {os.cpu_count()} CPUs")
    print(format_table(rows))
    print(LEGEND)
    ties = next((r for r in rows if r["case"] == "ties_global"), None)
    if ties:
        v = ties["vs_fusionbench_ties"]
        print(f"Global TIES vs FusionBench (36.4 s, 22.7 GiB): {v['speedup']:.1f}x faster, "
              f"peak {v['peak_gib']:.2f} GiB.")
    others = max(r["others_cpu_fraction"] for r in rows)
    print(f"Other processes used up to {100 * others:.0f}% of the CPUs during a case.")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "bench_sparse.json")
    with open(path, "w") as f:
        json.dump(dict(config={**cfg, "memory_scheduler": _MEMORY_SCHEDULER.value},
                       machine=benchlib.machine_info(), model=model, rows=rows,
                       fusionbench_ties=FUSIONBENCH_TIES), f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
