r"""Benchmark of Git Re-Basin weight matching: time to convergence, both solvers.

Two pairs of independently initialised models (float32):

* ``vit_b32``: `mergejax.suite.model.VisionTransformer` at CLIP ViT-B/32's sizes (patch 32,
  width 768, 12 blocks, 12 heads, MLP 3072; about 88M parameters), `vit_spec(12)`;
* ``resnet20x4``: `mergejax.suite.model.ResNet(20, width=4)` (4.3M parameters),
  `resnet_spec(20)`;

and, as a sanity row for each, a *planted* pair (B = A with random permutations applied
plus 1% noise) whose permutations must be recovered. Each case runs weight matching with
the on-device Hungarian solver (``optax.assignment.hungarian_algorithm``) and SciPy's
``linear_sum_assignment``, twice: the first call includes compilation, the second is
the converged run's steady-state time (first - warm is the compilation). During the warm
call every linear assignment is timed on its own (the similarity made ready first), giving
the seconds per assignment of the largest size and the share of the run spent in them.
Both start from the same seed, so they visit the permutations in the same order; the table
gives how many units' assignments differ.

Usage::

  python -m experiments.bench_alignment --out_dir=results/bench_alignment
  python -m experiments.bench_alignment --quick --out_dir=/tmp/bench   # seconds, for tests

Writes ``<out_dir>/bench_alignment.json`` and prints a table.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchlib
from mergejax import align
from mergejax.align import matching
from mergejax.suite import model as model_lib
from mergejax.tree import flatten_with_paths

CASES = ("vit_b32", "vit_b32_planted", "resnet20x4", "resnet20x4_planted")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench_alignment",
                               "Where bench_alignment.json is written.")
_CASES = flags.DEFINE_list("cases", ",".join(CASES), f"Cases to run, from {CASES}.")
_SOLVERS = flags.DEFINE_list("solvers", ",".join(align.SOLVERS), "Assignment solvers.")
_MAX_ITER = flags.DEFINE_integer("max_iter", 100, "Most coordinate-descent sweeps.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny models, for tests.")


def make_pair(case: str, quick: bool) -> tuple[Any, Any, align.PermutationSpec, Any]:
    """(params_a, params_b, spec, planted permutations or None) of a case."""
    if case.startswith("vit"):
        cfg = (model_lib.ViTConfig(image_size=28, patch_size=7, width=32, depth=2, heads=4)
               if quick else model_lib.ViTConfig(image_size=224, patch_size=32, width=768,
                                                  depth=12, heads=12, mlp_ratio=4,
                                                  embed_dim=512))
        module = model_lib.VisionTransformer(cfg)
        spec = align.vit_spec(cfg.depth)
        x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    else:
        module = model_lib.ResNet(8 if quick else 20, 1 if quick else 4)
        spec = align.resnet_spec(8 if quick else 20)
        x = jnp.zeros((1, 32, 32, 3))
    init = jax.jit(lambda k: module.init(k, x)["params"])
    params_a = init(jax.random.key(0))
    if not case.endswith("planted"):
        return params_a, init(jax.random.key(1)), spec, None
    planted = align.random_permutations(spec, params_a, jax.random.key(2))
    noise = init(jax.random.key(3))
    shuffled = align.apply_permutation(spec, planted, params_a)
    params_b = jax.tree.map(lambda s, n: s + 0.01 * n, shuffled, noise)
    return params_a, params_b, spec, planted


@contextlib.contextmanager
def _timed_assignments() -> Iterator[dict[int, list[float]]]:
    """Times every `solve_assignment` call inside the block, by matrix size."""
    times: dict[int, list[float]] = {}
    solve = matching.solve_assignment

    def timed(similarity, solver="device"):
        jax.block_until_ready(similarity)
        start = time.perf_counter()
        out = jax.block_until_ready(solve(similarity, solver))
        times.setdefault(int(np.shape(similarity)[0]), []).append(time.perf_counter() - start)
        return out

    with mock.patch.object(matching, "solve_assignment", timed):
        yield times


def _timed_match(spec, params_a, params_b, solver: str) -> tuple[float, Any]:
    start = time.perf_counter()
    result = align.weight_matching(spec, params_a, params_b, solver=solver,
                                   max_iter=_MAX_ITER.value)
    jax.block_until_ready(result.perms)
    return time.perf_counter() - start, result


def run_case(case: str, quick: bool, solvers: list[str]) -> list[dict[str, Any]]:
    params_a, params_b, spec, planted = make_pair(case, quick)
    _, leaves, _ = flatten_with_paths(params_a)
    num_params = int(sum(np.size(x) for x in leaves))
    sizes = spec.sizes(params_a)
    rows, results = [], {}
    for solver in solvers:
        first_s, _ = _timed_match(spec, params_a, params_b, solver)
        with _timed_assignments() as lap_times:
            warm_s, result = _timed_match(spec, params_a, params_b, solver)
        largest = max(sizes.values())
        results[solver] = result
        recovered = None
        if planted is not None:
            inverse = align.invert_permutations(planted)
            recovered = all(np.array_equal(result.perms[p], inverse[p]) for p in planted)
        rows.append(dict(case=case, solver=solver, params=num_params,
                         permutations=len(sizes), largest=largest,
                         sweeps=result.iterations, assignments=result.assignments,
                         first_s=first_s, warm_s=warm_s, compile_s=max(first_s - warm_s, 0.0),
                         s_per_sweep=warm_s / result.iterations,
                         lap_s_by_size={n: statistics.median(t) for n, t in lap_times.items()},
                         lap_s_largest=statistics.median(lap_times.get(largest, [np.nan])),
                         lap_share=sum(map(sum, lap_times.values())) / warm_s,
                         history=list(result.history),
                         objective=result.objective, recovered=recovered,
                         peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         / 2**20))
    if len(results) == 2:
        first, second = results.values()
        differ = int(sum(int(np.sum(np.asarray(first.perms[p]) != np.asarray(second.perms[p])))
                         for p in sizes))
        for row in rows:
            row["units_differing_between_solvers"] = differ
    return rows


def _format(rows: list[dict[str, Any]]) -> str:
    header = ("case", "solver", "params M", "perms", "sweeps", "LAPs", "first s", "compile s",
              "warm s", "s/sweep", "LAP s (n)", "in LAPs", "objective", "recovered",
              "solvers differ", "peak GiB")
    lines = [(r["case"], r["solver"], f"{r['params'] / 1e6:.2f}", str(r["permutations"]),
              str(r["sweeps"]), str(r["assignments"]), f"{r['first_s']:.2f}",
              f"{r['compile_s']:.2f}", f"{r['warm_s']:.2f}", f"{r['s_per_sweep']:.3f}",
              f"{r['lap_s_largest']:.3f} ({r['largest']})", f"{100 * r['lap_share']:.0f}%",
              f"{r['objective']:.7g}",
              "-" if r["recovered"] is None else str(r["recovered"]),
              str(r.get("units_differing_between_solvers", "-")), f"{r['peak_rss_gib']:.2f}")
             for r in rows]
    return benchlib.format_table(header, lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {CASES}")
    rows = []
    for case in (c for c in CASES if c in _CASES.value):
        print(f"running {case}", flush=True)
        rows.extend(run_case(case, _QUICK.value, _SOLVERS.value))
    print(_format(rows))
    print("first s: the first call (tracing and compilation included); warm s: the same "
          "call again; compile s: their difference (0 where an earlier run in this process "
          "compiled the same shapes).\nLAPs: assignment problems solved; LAP s "
          "(n): median seconds of one n x n assignment (n the largest permutation); in LAPs: "
          "share of warm s spent solving them.\nsolvers differ: units whose assignment "
          "differs between the two solvers; peak GiB: the process's peak RSS so far.")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "bench_alignment.json")
    with open(path, "w") as f:
        json.dump(dict(config=dict(quick=_QUICK.value, max_iter=_MAX_ITER.value),
                       machine=benchlib.machine_info(), rows=rows), f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
