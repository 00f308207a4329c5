r"""Benchmark of the basic merges against the memory-bandwidth floor.

Builds a synthetic ViT-shaped parameter pytree (``--params_millions`` float32 parameters,
nested ``blocks/<i>/attn/query/kernel``-style dicts with kernels, biases and LayerNorm
scales), a base and ``--num_models`` fine-tuned copies (base + small random deltas), all
generated on device with `jax.random`. Then it times, on the same inputs:

* ``floor``: the simplest jitted expression that reads the K models once and writes one
  output per leaf (``sum_k models[k][leaf]``): the memory floor for ``linear``;
* ``floor_base``: the same with the base as one more input (``base + sum_k ...``): the
  memory floor for ``task_arithmetic``, which reads K + 1 trees;
* ``mergejax.linear(None, models)`` and ``mergejax.task_arithmetic(base, models,
  scale=0.3)``, with and without the finiteness check (``*_nocheck``).

For each: the first call (trace + compile + one run) is reported apart, then the best and
the median of ``--repeats`` calls, each ended by `jax.block_until_ready` and followed by
an untimed ``--settle_s`` pause. The methods are then called with new coefficients
(``weights`` / ``scale``) to show that this does not recompile (the number of XLA
compilations of each such call is reported). The ratio to the floor is given twice:
best / best across processes, and the median over rounds in which the method and its
floor are timed alternately in the method's own process (less exposed to drift on a
shared machine). The share of CPU used by other processes during each case is recorded.

Every case runs in its own subprocess (this binary re-invoked with ``--only=<case>``), so
that the process's peak RSS (``getrusage(...).ru_maxrss``, monotonic) belongs to that case.
Peak memory is reported against the inputs (base + K models) in "models' worth" (the size
of one model): ``extra = (peak RSS - RSS before the inputs existed - inputs) / model``,
after the first call (one merge, compilation included) and after all calls. The output
of the merge is itself one model's worth, so the floor shows a little over 1.

Targets (the issue's): time within 1.5x of the floor; peak memory no more than the inputs
plus two models' worth.

Usage::

  python -m experiments.bench_basic --out_dir=results/bench_basic
  python -m experiments.bench_basic --quick --out_dir=/tmp/bench   # seconds, for tests

Writes ``<out_dir>/bench_basic.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags, logging

import mergejax
from experiments import benchlib
from experiments.benchlib import GB

CASES = ("floor", "floor_base", "linear", "linear_nocheck", "task_arithmetic",
         "task_arithmetic_nocheck")

_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench_basic",
                               "Where bench_basic.json is written.")
_PARAMS_MILLIONS = flags.DEFINE_float("params_millions", 100.0,
                                      "Parameters per model, in millions (at least).")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "K, the number of fine-tuned models.")
_WIDTH = flags.DEFINE_integer("width", 768,
                              "Transformer width; the depth is chosen to reach the size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case (after the warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the synthetic parameters.")
_SCALE = flags.DEFINE_float("scale", 0.3, "task_arithmetic scale.")
_SETTLE_S = flags.DEFINE_float(
    "settle_s", 0.25,
    "Pause after every measured call (not timed). The runtime frees a dropped output a "
    "few ms after its last reference goes; without a pause, back-to-back calls hold two "
    "outputs at once, which shows in the peak RSS (measured: +1 model's worth).")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Tiny sizes and one repeat (overrides the size flags), for tests.")
_MMAP_THRESHOLD = flags.DEFINE_integer(
    "malloc_mmap_threshold", -1,
    "If >= 0, sets glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the case subprocesses, so "
    "that large buffers are always mmapped and go back to the OS when freed. -1 leaves "
    "the allocator alone (its default raises the threshold as buffers are freed and then "
    "keeps freed outputs in its heap: RSS can grow by about one more output over repeated "
    "calls, the 'extra all' column).")
_CASES = flags.DEFINE_list("cases", ",".join(CASES), f"Cases to run, from {CASES}.")
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False,
    "Run every case in this process (faster; peak RSS is then not per case).")
_ONLY = flags.DEFINE_enum("only", None, CASES,
                          "Internal: run this one case and write its row to --result_file.")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "Internal: see --only.")

def config() -> dict[str, Any]:
    """The run's sizes, from the flags (``--quick`` overrides them)."""
    if _QUICK.value:
        return dict(params_millions=0.08, num_models=3, width=32, repeats=1,
                    seed=_SEED.value, scale=_SCALE.value, settle_s=0.0)
    return dict(params_millions=_PARAMS_MILLIONS.value, num_models=_NUM_MODELS.value,
                width=_WIDTH.value, repeats=_REPEATS.value, seed=_SEED.value,
                scale=_SCALE.value, settle_s=_SETTLE_S.value)


# ---------------------------------------------------------------------------------------
# The cases.


@jax.jit
def _floor(models):
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *models)


def _floor_of(case: str) -> str:
    """The floor a case is compared with: the one that reads the same trees."""
    return "floor_base" if case.startswith(("task_arithmetic", "floor_base")) else "floor"


def case_calls(name: str, base, models, scale: float
               ) -> tuple[Callable[[], Any], list[tuple[str, Callable[[], Any]]], int]:
    """``(timed call, [(label, call with a new coefficient)], trees read)`` of a case."""
    k = len(models)
    if name == "floor":
        return lambda: _floor(models), [], k
    if name == "floor_base":
        return lambda: benchlib.floor_base(base, models), [], k + 1
    check = not name.endswith("_nocheck")
    if name.startswith("linear"):
        w1 = [1.0 + i for i in range(k)]
        w2 = [float(k - i) for i in range(k)]
        return (lambda: mergejax.linear(None, models, check_finite=check),
                [(f"weights={w1}", lambda: mergejax.linear(None, models, weights=w1,
                                                           check_finite=check)),
                 (f"weights={w2}", lambda: mergejax.linear(None, models, weights=w2,
                                                           check_finite=check))],
                k)
    if name.startswith("task_arithmetic"):
        return (lambda: mergejax.task_arithmetic(base, models, scale=scale,
                                                 check_finite=check),
                [(f"scale={scale + 0.2:g}",
                  lambda: mergejax.task_arithmetic(base, models, scale=scale + 0.2,
                                                   check_finite=check))],
                k + 1)
    raise ValueError(f"unknown case {name!r}")


# ---------------------------------------------------------------------------------------
# Driver.


def _run_in_subprocess(name: str) -> dict[str, Any]:
    return benchlib.run_in_subprocess(
        "experiments.bench_basic", name,
        [f"--params_millions={_PARAMS_MILLIONS.value}", f"--num_models={_NUM_MODELS.value}",
         f"--width={_WIDTH.value}", f"--repeats={_REPEATS.value}", f"--seed={_SEED.value}",
         f"--scale={_SCALE.value}", f"--settle_s={_SETTLE_S.value}",
         "--quick" if _QUICK.value else "--noquick"], _MMAP_THRESHOLD.value)


def _run_case(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    partner = None if name in ("floor", "floor_base") else _floor_of(name)
    return benchlib.run_case(name, cfg, case_calls, partner)


def summarize(rows: list[dict[str, Any]]) -> None:
    """Adds ratio-to-floor and target checks to the rows, in place."""
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        floor = by_case.get(_floor_of(r["case"]))
        r["floor_case"] = floor["case"] if floor else None
        r["ratio_to_floor"] = r["best_s"] / floor["best_s"] if floor else None
        r["median_ratio_to_floor"] = r["median_s"] / floor["median_s"] if floor else None
        r["meets_time_target"] = (r["ratio_to_floor"] <= 1.5) if floor else None
        r["meets_time_target_paired"] = r["paired_ratio_median"] <= 1.5
        r["meets_memory_target"] = r["extra_first_call_models"] <= 2.0
        r["meets_memory_target_all_calls"] = r["extra_over_inputs_models"] <= 2.0
        r["new_coefficient_recompiles"] = sum(c["compiles"] for c in r["new_coefficient"])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "compile s", "1st call s", "best s", "median s", "host s", "x floor",
              "x floor paired", "GB/s", "peak RSS GB", "extra 1st", "extra all",
              "new coef s (compiles)")
    lines = []
    for r in rows:
        ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] is not None else "-"
        coef = (", ".join(f"{c['seconds']:.3f} ({c['compiles']})" for c in r["new_coefficient"])
                or "-")
        lines.append((r["case"], f"{r['compile_s']:.2f}", f"{r['first_call_s']:.2f}",
                      f"{r['best_s']:.3f}", f"{r['median_s']:.3f}", f"{r['host_best_s']:.3f}",
                      ratio, f"{r['paired_ratio_median']:.2f}", f"{r['gbps']:.1f}",
                      f"{r['peak_rss'] / GB:.2f}", f"{r['extra_first_call_models']:.2f}",
                      f"{r['extra_over_inputs_models']:.2f}", coef))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    return "\n".join(out)


LEGEND = """\
compile s: trace + lower + compile time of the first call (all jits it ran); 1st call s: its
  wall time. best/median s: of the timed calls, each until jax.block_until_ready.
host s: best time until the call returned (host-side work: Python, validation, dispatch;
  the whole call when it waits for the device, as check_finite=True does).
x floor: best / best of the floor reading the same trees (floor: K models; floor_base:
  base + K), each in its own process. x floor paired: median over --repeats rounds of
  method / floor timed alternately in the method's process. GB/s: (trees read + 1
  written) x model bytes / best.
extra 1st / all: (peak RSS - RSS before the inputs existed - inputs) / model bytes, after
  the first call / after all calls (RSS is the process's; the output itself is 1).
new coef s (compiles): wall time and XLA compilations of calls with new coefficients
  (linear: weights=[1..K] then weights=[K..1]; task_arithmetic: scale+0.2). Compiles on
  the first weights=list call are of small eager helpers, not of the merge.
Targets: x floor <= 1.5; extra 1st <= 2 (inputs + two models' worth, for one merge)."""


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config()

    if _ONLY.value is not None:  # child: one case, row to --result_file
        if not _RESULT_FILE.value:
            raise app.UsageError("--only needs --result_file")
        row = _run_case(_ONLY.value, cfg)
        with open(_RESULT_FILE.value, "w") as f:
            json.dump(row, f)
        return

    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {CASES}")
    cases = [c for c in CASES if c in _CASES.value]
    rows = []
    for name in cases:
        logging.info("running %s", name)
        t0 = time.perf_counter()
        if _IN_PROCESS.value:
            row = _run_case(name, cfg)
        else:
            row = _run_in_subprocess(name)
        rows.append(row)
        print(f"  {name}: best {row['best_s']:.3f}s ({time.perf_counter() - t0:.1f}s with "
              f"setup)", flush=True)
    summarize(rows)

    model = rows[0]["model"]
    k = cfg["num_models"]
    print()
    print(f"{model['params'] / 1e6:.1f}M float32 params per model "
          f"({model['model_bytes'] / GB:.2f} GB, {model['leaves']} leaves, depth "
          f"{model['depth']}, width {model['width']}), K={k} models + base "
          f"(inputs {(k + 1) * model['model_bytes'] / GB:.2f} GB); best/median of "
          f"{cfg['repeats']}; {jax.default_backend()} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs")
    print(format_table(rows))
    print(LEGEND)
    others = max(r["others_cpu_fraction"] for r in rows)
    print(f"Other processes used up to {100 * others:.0f}% of the {os.cpu_count()} CPUs "
          "during a case" + (" (times are noisier then)." if others > 0.05 else "."))

    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "bench_basic.json")
    with open(path, "w") as f:
        json.dump(dict(config=cfg, machine=benchlib.machine_info(_MMAP_THRESHOLD.value),
                       model=model, rows=rows, in_process=_IN_PROCESS.value,
                       targets=dict(max_ratio_to_floor=1.5, max_extra_models=2.0)),
                  f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
