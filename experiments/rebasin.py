r"""Git Re-Basin on the embedded suite: two models from different seeds, before and after
alignment.

Trains two models (Git Re-Basin's MLP, or a ResNet-20) on one suite task from different
seeds, then aligns the second to the first with each alignment method and prints, for the
naive average and every method, the loss and accuracy barriers along the linear path
between the models and the accuracy of the merged model (the midpoint, or ZipIt!/MuDSC's
merge). Writes ``rebasin.{json,md}`` and the connectivity plots ``lmc_loss.png`` and
``lmc_accuracy.png`` to ``config.out_dir``.

    python -m experiments.rebasin --config=experiments/configs/rebasin.py
    python -m experiments.rebasin --config=experiments/configs/rebasin.py:resnet
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, logging
from flax import linen as nn
from ml_collections import config_flags

from mergejax import align
from mergejax.analysis import connectivity
from mergejax.suite import model as model_lib
from mergejax.suite import tasks as tasks_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/rebasin.py", "Re-basin configuration file.",
    lock_config=True)


#: The alignment methods the binary knows (registry names).
METHODS = ("weight_matching", "activation_matching", "ste_matching", "zipit", "mudsc")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The two trained models and everything the alignment methods take."""

    module: nn.Module
    spec: align.PermutationSpec
    features_fn: Callable[[Any, Any], dict[str, jax.Array]]
    params_a: Any
    params_b: Any
    inputs: Callable[[], Iterator[Any]]  # fresh iterator of train input batches
    labeled: Callable[[], Iterator[Any]]  # fresh iterator of (inputs, labels) batches


def build_model(config, num_classes: int) -> tuple[nn.Module, align.PermutationSpec,
                                                    dict[str, Any]]:
    """The module, its permutation spec and where each permutation's activations are."""
    if config.model == "mlp":
        features = tuple(config.mlp_features)
        layers = [f"Dense_{i}" for i in range(len(features) + 1)]
        sources = {f"P_{i}": (f"Dense_{i}", nn.relu) for i in range(len(features))}
        return model_lib.MLP(features, num_classes), align.mlp_spec(layers), sources
    if config.model == "resnet":
        depth = config.resnet_depth
        blocks = (depth - 2) // 6
        sources: dict[str, Any] = {}
        for s in range(3):
            sources[f"P_res{s}"] = [f"stage{s}_block{b}" for b in range(blocks)]
            for b in range(blocks):
                sources[f"P_s{s}b{b}"] = (f"stage{s}_block{b}/norm1", nn.relu)
        module = model_lib.ResNet(depth, config.resnet_width, num_classes, norm="layer")
        return module, align.resnet_spec(depth), sources
    raise ValueError(f"config.model must be 'mlp' or 'resnet', not {config.model!r}")


def _batches(arrays: tuple[np.ndarray, ...], batch_size: int, seed: int) -> Iterator[Any]:
    """Endless shuffled batches of ``arrays`` (shared first axis)."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(arrays[0]), size=batch_size)
        picked = tuple(a[idx] for a in arrays)
        yield picked if len(picked) > 1 else picked[0]


def _loss(module: nn.Module, params: Any, batch: tuple[Any, Any]) -> jax.Array:
    images, labels = batch
    logits = module.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(module: nn.Module, config, images: np.ndarray, labels: np.ndarray,
          seed: int) -> Any:
    """Adam on cross-entropy from initialisation ``seed``."""
    params = module.init(jax.random.key(seed), images[:1])["params"]
    opt = optax.adam(config.learning_rate)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: _loss(module, p, batch))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    batches = _batches((images, labels), config.batch_size, seed)
    for i in range(config.train_steps):
        params, state, loss = step(params, state, next(batches))
        if (i + 1) % max(config.train_steps // 4, 1) == 0:
            logging.info("seed %d: step %d/%d, loss %.4f", seed, i + 1, config.train_steps,
                         float(loss))
    return params


def evaluator(module: nn.Module, images: np.ndarray, labels: np.ndarray
              ) -> Callable[[Any], dict[str, jax.Array]]:
    """Test loss and accuracy of a params pytree (traceable, so curves can vmap it)."""
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def evaluate(params):
        logits = module.apply({"params": params}, x)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return evaluate


def permutation_methods(setup: Setup, config) -> dict[str, Callable[[], Any]]:
    """Method name -> a function returning the permutations aligning B to A."""
    spec, a, b = setup.spec, setup.params_a, setup.params_b
    return {
        "weight_matching": lambda: align.weight_matching(spec, a, b).perms,
        "weight_matching (scipy)": lambda: align.weight_matching(
            spec, a, b, solver="scipy").perms,
        "activation_matching": lambda: align.activation_matching(
            spec, a, b, setup.features_fn, setup.inputs(),
            num_batches=config.matching_batches).perms,
        "ste_matching": lambda: align.ste_matching(
            spec, a, b, lambda p, batch: _loss(setup.module, p, batch), setup.labeled(),
            steps=config.ste_steps).perms,
    }


def merging_methods(setup: Setup, config) -> dict[str, Callable[[], Any]]:
    """Method name -> a function returning the merged params (ZipIt!, MuDSC)."""
    models = [setup.params_a, setup.params_b]
    kwargs = dict(num_batches=config.matching_batches)
    return {
        "zipit": lambda: align.zipit(setup.spec, models, setup.features_fn, setup.inputs(),
                                     **kwargs),
        "mudsc": lambda: align.mudsc(setup.spec, models, setup.features_fn, setup.inputs(),
                                     **kwargs),
    }


def _row(name: str, evaluate, merged, curve=None, seconds=float("nan")) -> dict[str, Any]:
    values = {k: float(v) for k, v in evaluate(merged).items()}
    row = {"method": name, "merged_accuracy": values["accuracy"],
           "merged_loss": values["loss"], "seconds": seconds,
           "loss_barrier": float("nan"), "accuracy_barrier": float("nan")}
    if curve is not None:
        row["loss_barrier"] = connectivity.barrier(curve, "loss")
        row["accuracy_barrier"] = connectivity.barrier(curve, "accuracy")
    return row


def run(config) -> dict[str, Any]:
    """Trains, aligns, evaluates and writes the results; returns what it wrote."""
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown alignment method(s) {unknown} in config.methods; "
                         f"known: {METHODS}")
    train_x, train_y = tasks_lib.task_arrays(config.task, "train")
    test_x, test_y = tasks_lib.task_arrays(config.task, "test")
    num_classes = tasks_lib.TASKS[config.task].num_classes
    module, spec, sources = build_model(config, num_classes)
    seed_a, seed_b = config.seeds
    start = time.perf_counter()
    params_a = train(module, config, train_x, train_y, seed_a)
    params_b = train(module, config, train_x, train_y, seed_b)
    train_seconds = time.perf_counter() - start
    setup = Setup(module, spec, align.linen_features(module, sources), params_a, params_b,
                  inputs=lambda: _batches((train_x,), config.batch_size, 7),
                  labeled=lambda: _batches((train_x, train_y), config.batch_size, 8))
    evaluate = evaluator(module, test_x, test_y)

    def curve(b):
        return connectivity.connectivity_curve(evaluate, params_a, b,
                                               num_points=config.num_points)

    rows = [_row(f"model A (seed {seed_a})", evaluate, params_a),
            _row(f"model B (seed {seed_b})", evaluate, params_b)]
    curves = {"naive": curve(params_b)}
    rows.append(_row("naive average", evaluate, connectivity.interpolate(
        params_a, params_b, 0.5), curves["naive"]))
    for name, align_fn in permutation_methods(setup, config).items():
        if name.split(" ")[0] not in config.methods:
            continue
        t0 = time.perf_counter()
        perms = jax.block_until_ready(align_fn())
        seconds = time.perf_counter() - t0
        aligned = align.apply_permutation(spec, perms, params_b)
        curves[name] = curve(aligned)
        rows.append(_row(name, evaluate, connectivity.interpolate(params_a, aligned, 0.5),
                         curves[name], seconds))
    for name, merge_fn in merging_methods(setup, config).items():
        if name not in config.methods:
            continue
        t0 = time.perf_counter()
        merged = jax.block_until_ready(merge_fn())
        rows.append(_row(name, evaluate, merged, seconds=time.perf_counter() - t0))
    return write(config, rows, curves, train_seconds)


def _cell(x: Any, fmt: str) -> str:
    return "-" if isinstance(x, float) and np.isnan(x) else format(x, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """The before/after table as markdown."""
    lines = ["| method | loss barrier | acc. barrier | merged acc. | merged loss | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_cell(r['loss_barrier'], '.3f')} | "
                     f"{_cell(r['accuracy_barrier'], '.3f')} | "
                     f"{_cell(r['merged_accuracy'], '.3f')} | {_cell(r['merged_loss'], '.3f')}"
                     f" | {_cell(r['seconds'], '.2f')} |")
    return "\n".join(lines)


def write(config, rows, curves, train_seconds: float) -> dict[str, Any]:
    os.makedirs(config.out_dir, exist_ok=True)
    plots = {}
    for key in ("loss", "accuracy"):
        plots[key] = os.path.join(config.out_dir, f"lmc_{key}.png")
        connectivity.plot_connectivity(curves, key=key, path=plots[key])
    text = table(rows)
    print(text)
    result = {"config": config.to_dict(), "rows": rows, "train_seconds": train_seconds,
              "curves": {n: {"ts": c.ts.tolist(),
                             **{k: np.asarray(v).tolist() for k, v in c.values.items()}}
                         for n, c in curves.items()},
              "plots": plots, "jax": jax.__version__}
    with open(os.path.join(config.out_dir, "rebasin.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(config.out_dir, "rebasin.md"), "w") as f:
        f.write(text + "\n")
    print(f"trained in {train_seconds:.1f} s; wrote {config.out_dir}/rebasin.{{json,md}} "
          f"and {', '.join(plots.values())}")
    return result


def main(argv):
    del argv
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
