r"""Benchmark of one layer-wise AdaMerging step on a ViT-B/32-sized vision transformer.

The step (`mergejax.learned.adamerging_step`) merges base + K task vectors with one
coefficient per parameter tensor and task, runs the merged model on K tasks' batches of
random 224x224 RGB images, sums the entropies of the frozen heads' predictions,
differentiates with respect to the coefficients and applies Adam. The model is
`mergejax.suite.model.VisionTransformer` at CLIP ViT-B/32's sizes (patch 32, width 768,
12 blocks, 12 heads, embedding 512; 87.8M parameters) with random weights. The reference
(../shared/baselines.md, this machine): 52.7 s/step at 7.2 GiB peak (the step written with
``torch.func``), 59.5 s at 10.5 GiB (FusionBench's wrapper); the target is >= 2x faster
with no more memory. ``--tasks`` picks how the step runs the tasks (`adamerging_step`):
one compiled forward and backward run per task (default), or one program for the whole
step. Peak memory is the process's peak RSS, inputs (base + K models) included; compile
time is the first step's time less a later step's.

The compute floor is the step's FLOPs (K times XLA's cost analysis of one task's forward
and backward) over the float32 matmul rate measured in the same run (a 2048^2 matmul); the
step is compute-bound, so bytes moved are not the floor here.

Usage::

  python -m experiments.bench_learned --out_dir=results/bench_learned
  python -m experiments.bench_learned --quick --out_dir=/tmp/bench   # seconds, for tests

Writes ``<out_dir>/bench_learned.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from experiments import benchlib
from experiments.benchlib import GB
from mergejax.learned import coefficients as coefficients_lib
from mergejax.learned import loop
from mergejax.suite import model as model_lib

#: The reference step on the same model and machine (../shared/baselines.md).
REFERENCE_S, REFERENCE_PEAK_GIB = 52.7, 7.2
FUSIONBENCH_S, FUSIONBENCH_PEAK_GIB = 59.5, 10.5
TARGET_SPEEDUP = 2.0

_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench_learned",
                               "Where bench_learned.json is written.")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "K, the number of tasks.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per task per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after the compiling one).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes, for tests.")
_TASKS = flags.DEFINE_enum("tasks", "sequential", list(coefficients_lib.TASK_MODES),
                           "How the step runs the tasks (adamerging_step's tasks=).")


def config() -> dict[str, Any]:
    if _QUICK.value:
        vit = model_lib.ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2,
                                  mlp_ratio=2, embed_dim=16)
        return dict(vit=vit, num_models=2, batch_size=2, steps=1, classes=5)
    vit = model_lib.ViTConfig(image_size=224, patch_size=32, width=768, depth=12, heads=12,
                              mlp_ratio=4, embed_dim=512)
    return dict(vit=vit, num_models=_NUM_MODELS.value, batch_size=_BATCH.value,
                steps=_STEPS.value, classes=10)


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul rate (FLOP/s) of this machine under XLA."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def task_flops(apply_fn, head, params, batch) -> float:
    """XLA's FLOP count of one task's forward and backward (the step runs K of them; the
    merge and the optimiser update are memory-bound and left out of the floor)."""
    grad = jax.jit(jax.value_and_grad(lambda p, x: loop.entropy(head(apply_fn(p, x)))))
    cost = grad.lower(params, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def make_inputs(cfg: dict[str, Any]):
    """Random ViT params (base + K perturbed copies), heads and one batch per task."""
    vit = cfg["vit"]
    model = model_lib.VisionTransformer(vit)
    shape = (cfg["batch_size"], vit.image_size, vit.image_size, 3)
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))["params"]

    @jax.jit  # base is an argument: a closure would make it a constant of each program
    def finetune(base, key):
        leaves, treedef = jax.tree.flatten(base)
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                                  for x, k in zip(leaves, keys)])

    models = [finetune(base, jax.random.key(100 + k)) for k in range(cfg["num_models"])]
    rng = np.random.default_rng(0)
    batches = tuple(jnp.asarray(rng.random(shape, np.float32)) for _ in models)
    head_arrays = [jnp.asarray(rng.standard_normal((vit.embed_dim, cfg["classes"])),
                               jnp.float32) for _ in models]
    heads = [lambda e, h=h: model_lib.logits(e, h) for h in head_arrays]
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return base, models, batches, apply_fn, heads


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    base, models, batches, apply_fn, heads = make_inputs(cfg)
    params = sum(int(np.size(x)) for x in jax.tree.leaves(base))
    groups = coefficients_lib.coefficient_groups(base, "layer")
    opt = optax.adam(1e-3)
    step = coefficients_lib.adamerging_step(apply_fn, heads, groups, optimizer=opt,
                                            tasks=_TASKS.value)
    lam = jnp.full((len(groups.names), len(models)), 0.3, jnp.float32)
    state = (lam, opt.init(lam))
    start = time.perf_counter()
    state, loss = step(state, batches, base, models)  # compiles
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start
    flops = len(models) * task_flops(apply_fn, heads[0], base, batches[0])
    times, losses = [], [float(loss)]
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        state, loss = step(state, batches, base, models)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    rate = matmul_flops_per_s(512 if _QUICK.value else 2048)
    step_s = statistics.median(times)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    inputs_gib = (len(models) + 1) * params * 4 / GB
    return dict(
        case="adamerging_layer_step", tasks=_TASKS.value, params=params,
        num_models=len(models), batch_size=cfg["batch_size"], groups=len(groups.names),
        first_step_s=first_s, compile_s=first_s - statistics.median(times),
        step_times_s=times, step_s=step_s, losses=losses,
        step_flops=flops, matmul_flops_per_s=rate, compute_floor_s=flops / rate,
        ratio_to_floor=step_s * rate / flops, peak_rss_gib=peak_gib, inputs_gib=inputs_gib,
        reference_s=REFERENCE_S, reference_peak_gib=REFERENCE_PEAK_GIB,
        speedup_vs_reference=REFERENCE_S / step_s,
        speedup_vs_fusionbench=FUSIONBENCH_S / step_s,
        meets_target=bool(REFERENCE_S / step_s >= TARGET_SPEEDUP
                          and peak_gib <= REFERENCE_PEAK_GIB),
        quick=_QUICK.value)


def format_table(row: dict[str, Any]) -> str:
    header = ("case", "tasks", "step s", "floor s", "x floor", "vs ref 52.7 s",
              "peak GiB", "inputs GiB", "compile s")
    line = (row["case"], row["tasks"], f"{row['step_s']:.2f}", f"{row['compute_floor_s']:.2f}",
            f"{row['ratio_to_floor']:.2f}", f"{row['speedup_vs_reference']:.2f}x",
            f"{row['peak_rss_gib']:.2f}", f"{row['inputs_gib']:.2f}",
            f"{row['compile_s']:.1f}")
    return benchlib.format_table(header, [line])


def main(argv: list[str]) -> None:
    del argv
    cfg = config()
    row = run(cfg)
    result = dict(rows=[row], machine=benchlib.machine_info(),
                  config={k: (v.__dict__ if hasattr(v, "__dict__") else v)
                          for k, v in cfg.items()})
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "bench_learned.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(format_table(row))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
