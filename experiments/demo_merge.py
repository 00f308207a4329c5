r"""End-to-end merge demo: pretrain a Flax MLP, fine-tune it per task, merge, evaluate.

The README's main job until the embedded benchmark suite lands. Each task is a synthetic
regression problem sharing one input distribution: ``y = tanh(x @ W_task)``, with the task
matrices drawn around a common matrix so that a pretrained model (fit to their mean) is a
sensible starting point. Every registered basic method merges the fine-tuned experts; the
table reports each task's test MSE and the average.

    python -m experiments.demo_merge --out_dir=results/demo
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import linen as nn

import mergejax

_OUT_DIR = flags.DEFINE_string("out_dir", "results/demo", "Where to write demo.json.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 4, "Number of fine-tuned experts.")
_STEPS = flags.DEFINE_integer("steps", 300, "Optimisation steps for pretraining and each "
                              "fine-tune.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

_IN, _OUT, _HIDDEN = 16, 4, 64


class Mlp(nn.Module):
    """A two-layer MLP."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(_OUT)(nn.gelu(nn.Dense(_HIDDEN)(x)))


def _make_tasks(rng: np.random.Generator, num_tasks: int):
    common = rng.normal(size=(_IN, _OUT)) / np.sqrt(_IN)
    tasks = []
    for _ in range(num_tasks):
        w = common + 0.6 * rng.normal(size=(_IN, _OUT)) / np.sqrt(_IN)
        x_train, x_test = rng.normal(size=(512, _IN)), rng.normal(size=(256, _IN))
        tasks.append({"train": (x_train, np.tanh(x_train @ w)),
                      "test": (x_test, np.tanh(x_test @ w))})
    return common, tasks


def _fit(params, x, y, steps: int, lr: float):
    model = Mlp()
    opt = optax.adam(lr)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    for _ in range(steps):
        params, state, _ = step(params, state)
    return params


def _mse(params, x, y) -> float:
    return float(jnp.mean((Mlp().apply({"params": params}, x) - y) ** 2))


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    common, tasks = _make_tasks(rng, _NUM_TASKS.value)
    x_pre = rng.normal(size=(1024, _IN))
    init = Mlp().init(jax.random.key(_SEED.value), jnp.zeros((1, _IN)))["params"]
    base = _fit(init, x_pre, np.tanh(x_pre @ common), _STEPS.value, 1e-2)
    experts = [_fit(base, *t["train"], _STEPS.value, 3e-3) for t in tasks]

    def evaluate(params) -> list[float]:
        return [_mse(params, *t["test"]) for t in tasks]

    candidates = {
        "pretrained": lambda: base,
        "linear": lambda: mergejax.linear(None, experts),
        "task_arithmetic": lambda: mergejax.task_arithmetic(base, experts, scale=0.5),
        "metagpt": lambda: mergejax.metagpt(base, experts),
        "model_stock": lambda: mergejax.model_stock(base, experts),
        "multislerp": lambda: mergejax.multislerp(base, experts),
        "karcher": lambda: mergejax.karcher(base, experts),
        "slerp(expert0,expert1)": lambda: mergejax.slerp(base, experts[:2], t=0.5),
        "greedy_soup": lambda: mergejax.greedy_soup(
            None, experts, evaluate=lambda p: -float(np.mean(evaluate(p)))),
    }
    rows = [{"method": "experts (each on its task)",
             "mse": [evaluate(e)[i] for i, e in enumerate(experts)], "seconds": 0.0}]
    for name, build in candidates.items():
        start = time.perf_counter()
        merged = jax.block_until_ready(build())
        rows.append({"method": name, "mse": evaluate(merged),
                     "seconds": time.perf_counter() - start})

    header = f"{'method':<28}" + "".join(f"{'task' + str(i):>9}" for i in range(len(tasks)))
    print(header + f"{'mean':>9}{'merge s':>9}")
    for row in rows:
        row["mean_mse"] = float(np.mean(row["mse"]))
        print(f"{row['method']:<28}" + "".join(f"{v:9.4f}" for v in row["mse"])
              + f"{row['mean_mse']:9.4f}{row['seconds']:9.3f}")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "demo.json")
    with open(path, "w") as f:
        json.dump({"rows": rows, "num_tasks": len(tasks), "jax": jax.__version__}, f, indent=1)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    app.run(main)
