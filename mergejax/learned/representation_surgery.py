"""Representation surgery: per-task modules that remove the merged model's representation
bias, trained without labels to match each expert's representations.

* `surgery` (Yang et al. 2024, "Representation Surgery for Multi-Task Model Merging",
  arXiv 2402.02705; code EnnengYang/RepresentationSurgery, FusionBench
  ``fusion_bench/models/surgery``): on the merged model's output features ``z``,
  ``z_hat = z - Phi_t(z)`` with ``Phi_t(z) = ReLU(z W_down) W_up`` (rank 16, no biases).
* `surgery_v2` (Yang et al. 2024, "SurgeryV2: Bridging the Gap Between Model Merging and
  Multi-Task Learning with Deep Representation Surgery", arXiv 2410.14389; code
  EnnengYang/SurgeryV2): the same module after every transformer block as well, its
  corrected output flowing into the next block, the L1 summed over the blocks and the
  output.
* `probsurgery` (Wei et al., "Representation Surgery in Model Merging with Probabilistic
  Modeling", ICML 2025; code 1998v7/ProbSurgery): the module predicts the mean and the
  log-variance of the bias, training samples it (reparameterisation) and adds a KL term
  to ``N(0, I)``; inference subtracts the mean.

Modules (float32 dicts, Flax ``(in, out)`` layout): ``{"down": (D, r), "up": (r, D)}``,
plus ``"logvar": (r, D)`` for ProbSurgery, whose ``"up"`` is the mean head (the official
``linear_mean``). Init as the official code: ``down ~ U(-1/sqrt(D), 1/sqrt(D))`` (PyTorch's
``kaiming_uniform_(a=sqrt(5))``), ``up`` and ``logvar`` zero, so training starts from the
merged model's own features.

**Objective** (unlabeled test batches): every step draws one batch per task; the expert's
representations ``apply_fn(models[t], batch_t)`` and the merged model's are computed in
the step (nothing is cached across batches), and Adam minimises the sum over tasks of the
mean absolute error ``mean |z_hat_t - z_expert_t|`` (PyTorch ``L1Loss``). The official
code steps each task's module on its own batch in turn; one step on the sum is the same
update, since each module's gradient comes from its own task's term only and Adam is
per-parameter.

**Deep surgery** (`surgery_v2`, Flax Linen models): ``apply_fn`` must call a Linen
``module.apply``. It runs inside ``flax.linen.intercept_methods``; every ``__call__`` of a
submodule whose '/'-joined path matches the ``layers`` regex (``re.search``; default: a
last path component ``resblocks_<i>``, ``layers_<i>``, ``block_<i>`` or ``blocks_<i>``)
is captured on the expert, and on the merged model its output ``h`` is replaced by
``h - Phi_{t,l}(h)`` (applied per token on the last axis) before later layers see it.
The output of ``apply_fn`` gets its own module (key `OUTPUT`), as in the paper.

Results are `SurgeryResult`: the merged params, the modules, the loss history, and
``features(task, batch)`` / ``predict(task, batch)`` (jit-compiled).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mergejax import registry
from mergejax.learned.loop import (
    ApplyFn,
    Head,
    TaskBatches,
    cached_adam,
    check_heads,
    optimize,
    task_logits,
)
from mergejax.tree import MergeError, PyTree, check_compatible, unjitted

__all__ = [
    "DEFAULT_LAYERS",
    "OUTPUT",
    "SurgeryResult",
    "bias",
    "correct",
    "forward",
    "init_module",
    "kl_divergence",
    "probsurgery",
    "surgery",
    "surgery_v2",
]

Array = jax.Array
Module = dict[str, Array]

#: The key of the module on ``apply_fn``'s output in ``SurgeryResult.modules[task]``.
OUTPUT = "output"
#: `surgery_v2`'s default ``layers``: transformer blocks as the suite's ViT
#: (``resblocks_<i>``) and common Flax models name them.
DEFAULT_LAYERS = r"(^|/)(resblocks|layers|blocks?)_\d+$"

_SURGERY_PAPER = ("Yang et al. 2024, Representation Surgery for Multi-Task Model Merging "
                  "(arXiv 2402.02705)")
_V2_PAPER = ("Yang et al. 2024, SurgeryV2: Deep Representation Surgery for model merging "
             "(arXiv 2410.14389)")
_PROB_PAPER = ("Wei et al. 2025, Representation Surgery in Model Merging with "
               "Probabilistic Modeling (ICML 2025)")


# ---------------------------------------------------------------------------------------
# The module.


def init_module(key: Array, dim: int, rank: int, *, probabilistic: bool = False) -> Module:
    """A fresh surgery module for ``dim`` features: ``down ~ U(-1/sqrt(dim), 1/sqrt(dim))``
    (the official ``kaiming_uniform_(a=sqrt(5))``), ``up = 0`` (and ``logvar = 0`` with
    ``probabilistic``, as ProbSurgery's ``linear_var``), all float32.

    Example::

        module = init_module(jax.random.key(0), 512, 16)   # {"down": (512, 16), "up": ...}
    """
    bound = 1.0 / math.sqrt(dim)
    module = {"down": jax.random.uniform(key, (dim, rank), jnp.float32, -bound, bound),
              "up": jnp.zeros((rank, dim), jnp.float32)}
    if probabilistic:
        module["logvar"] = jnp.zeros((rank, dim), jnp.float32)
    return module


def _hidden(module: Module, z: Array) -> Array:
    return jax.nn.relu(z.astype(jnp.float32) @ module["down"])


def bias(module: Module, z: Array) -> Array:
    """The estimated representation bias ``Phi(z) = ReLU(z W_down) W_up`` on the last axis
    of ``z`` (float32); for a ProbSurgery module, its mean ``mu``.

    Example::

        b = bias(result.modules[0][OUTPUT], z)
    """
    return _hidden(module, z) @ module["up"]


def correct(module: Module, z: Array) -> Array:
    """The surgery ``z - Phi(z)`` (`bias`), in ``z``'s dtype. ProbSurgery's inference
    (the official ``ImageClassifierWithMapping``) also subtracts the mean.

    Example::

        z_hat = correct(module, merged_features)
    """
    return (z.astype(jnp.float32) - bias(module, z)).astype(z.dtype)


def kl_divergence(mu: Array, logvar: Array) -> Array:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` summed over the last axis and averaged
    over the others: ProbSurgery's ``KL_reg``,
    ``mean_n -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))``.

    Example::

        kl_divergence(jnp.zeros((4, 8)), jnp.zeros((4, 8)))   # 0.0
    """
    mu = mu.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    per_row = -0.5 * jnp.sum(1.0 + logvar - mu ** 2 - jnp.exp(logvar), axis=-1)
    return jnp.mean(per_row)


# ---------------------------------------------------------------------------------------
# Forward passes with surgery.


def forward(apply_fn: ApplyFn, params: PyTree, batch: Any,
            modules: Mapping[str, Module] | None = None,
            layers: str | None = None) -> tuple[Any, dict[str, Array]]:
    """``apply_fn(params, batch)`` with deep surgery: returns ``(outputs, layer_outputs)``.

    With ``layers`` (a regex), ``apply_fn`` runs inside ``flax.linen.intercept_methods``:
    each ``__call__`` of a Linen submodule whose '/'-joined path matches
    (``re.search``) gives an output ``h``, replaced by ``correct(modules[path], h)`` when
    ``modules`` has that path, and recorded (after the correction) in ``layer_outputs``.
    Then ``outputs`` is corrected by ``modules[OUTPUT]`` when present. Without
    ``modules`` this captures a model's layer outputs; without ``layers`` it is plain
    output surgery and ``apply_fn`` may be any JAX function.

    Example::

        out, hidden = forward(model_fn, params, images, layers=DEFAULT_LAYERS)
    """
    modules = modules or {}
    recorded: dict[str, Array] = {}
    if layers is None:
        outputs = apply_fn(params, batch)
    else:
        apply_fn = unjitted(apply_fn)  # its layers must run in this trace
        pattern = re.compile(layers)

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = "/".join(str(p) for p in context.module.path)
            if context.method_name != "__call__" or not pattern.search(path):
                return out
            if path in recorded:
                raise MergeError(f"surgery: layer '{path}' is called more than once per "
                                 "forward pass; give a `layers` regex matching modules "
                                 "that run once")
            if not isinstance(out, jax.Array):
                raise MergeError(f"surgery: layer '{path}' returns {type(out).__name__}, "
                                 "not one array; match modules that return an array")
            if path in modules:
                out = correct(modules[path], out)
            recorded[path] = out
            return out

        with nn.intercept_methods(interceptor):
            outputs = apply_fn(params, batch)
    if OUTPUT in modules:
        outputs = correct(modules[OUTPUT], outputs)
    return outputs, recorded


# ---------------------------------------------------------------------------------------
# The result.


@dataclasses.dataclass(frozen=True)
class SurgeryResult:
    """A merged model with per-task surgery modules.

    Attributes:
      merged: the merged params the modules correct.
      modules: one dict per task (models' order) mapping a layer path, or `OUTPUT` for
        ``apply_fn``'s output, to its module (`init_module`'s dict, trained).
      losses: the training objective at each step (before that step's update).
      apply_fn, heads: the model and the per-task heads (None: outputs are logits).
      layers: the regex of the corrected layers (`surgery_v2`), or None.

    Example::

        logits = result.predict(2, images)
    """

    merged: PyTree
    modules: tuple[dict[str, Module], ...]
    losses: np.ndarray
    apply_fn: ApplyFn
    heads: tuple[Head, ...] | None
    layers: str | None = None

    def features(self, task: int, batch: Any) -> Any:
        """Task ``task``'s corrected representation of ``batch`` (jit-compiled).

        Example::

            z_hat = result.features(0, images)
        """
        return _features(self.merged, self.modules[self._task(task)], batch,
                         apply_fn=self.apply_fn, layers=self.layers)

    def predict(self, task: int, batch: Any) -> Array:
        """Task ``task``'s logits: ``heads[task]`` on `features` (jit-compiled).

        Example::

            accuracy = jnp.mean(result.predict(0, images).argmax(-1) == labels)
        """
        return _predict(self.merged, self.modules[self._task(task)], batch,
                        apply_fn=self.apply_fn, heads=self.heads, task=self._task(task),
                        layers=self.layers)

    def _task(self, task: int) -> int:
        if not 0 <= task < len(self.modules):
            raise MergeError(f"task {task} is out of range for {len(self.modules)} tasks")
        return int(task)


@functools.partial(jax.jit, static_argnames=("apply_fn", "layers"))
def _features(merged, modules, batch, *, apply_fn, layers):
    return forward(apply_fn, merged, batch, modules, layers)[0]


@functools.partial(jax.jit, static_argnames=("apply_fn", "heads", "task", "layers"))
def _predict(merged, modules, batch, *, apply_fn, heads, task, layers):
    def corrected(params, b):
        return forward(apply_fn, params, b, modules, layers)[0]
    return task_logits(corrected, heads, merged, batch, task)


# ---------------------------------------------------------------------------------------
# Training steps (module-level jits: one compilation per model, optimizer and shapes).


def _l1(a: Array, b: Array) -> Array:
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def _pool(h: Array) -> Array:
    """Mean over the axes between the batch and the features (the official ``x.mean(1)``
    over tokens)."""
    return jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h


def _update(optimizer, loss_fn, modules, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(modules)
    updates, opt_state = optimizer.update(grads, opt_state, modules)
    return optax.apply_updates(modules, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer", "layers", "pool"))
def _surgery_step(state, batches, merged, models, *, apply_fn, optimizer, layers, pool):
    modules, opt_state = state
    experts = [jax.lax.stop_gradient(forward(apply_fn, m, b, None, layers))
               for m, b in zip(models, batches)]

    def loss_fn(mods):
        total = jnp.zeros((), jnp.float32)
        for mod, b, (target, target_layers) in zip(mods, batches, experts):
            out, hidden = forward(apply_fn, merged, b, mod, layers)
            total += _l1(out, target)
            for path, h in hidden.items():
                h, e = (_pool(h), _pool(target_layers[path])) if pool else (
                    h, target_layers[path])
                total += _l1(h, e)
        return total

    modules, opt_state, loss = _update(optimizer, loss_fn, modules, opt_state)
    return (modules, opt_state), loss


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer"))
def _prob_step(state, batches, merged, models, noise_key, kl_weight, *, apply_fn,
               optimizer):
    modules, opt_state, step = state
    targets = [jax.lax.stop_gradient(apply_fn(m, b)) for m, b in zip(models, batches)]
    features = [jax.lax.stop_gradient(apply_fn(merged, b)) for b in batches]
    key = jax.random.fold_in(noise_key, step)

    def loss_fn(mods):
        total = jnp.zeros((), jnp.float32)
        for t, (mod, z, target) in enumerate(zip(mods, features, targets)):
            module = mod[OUTPUT]
            hidden = _hidden(module, z)
            mu, logvar = hidden @ module["up"], hidden @ module["logvar"]
            eps = jax.random.normal(jax.random.fold_in(key, t), mu.shape, jnp.float32)
            sample = mu + jnp.exp(0.5 * logvar) * eps
            total += _l1(z.astype(jnp.float32) - sample, target)
            total += kl_weight * kl_divergence(mu, logvar)
        return total

    modules, opt_state, loss = _update(optimizer, loss_fn, modules, opt_state)
    return (modules, opt_state, step + 1), loss


# ---------------------------------------------------------------------------------------
# Shared setup.


@dataclasses.dataclass(frozen=True)
class _Setup:
    merged: PyTree
    models: tuple[PyTree, ...]
    heads: tuple[Head, ...] | None
    first: tuple[Any, ...]
    draw: TaskBatches
    init_key: Array
    noise_key: Array
    optimizer: optax.GradientTransformation


def _setup(name: str, base: PyTree, models: Sequence[PyTree], *, apply_fn: ApplyFn,
           batches: Sequence[Iterable[Any]], heads: Sequence[Head] | None, merge: str,
           merge_hparams: Mapping[str, Any] | None, merged: PyTree | None, rank: int,
           learning_rate: float, key: Array | None) -> _Setup:
    """Checks the inputs, merges, and peeks at one batch per task (for the shapes)."""
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Sequence) \
            or not models:
        raise MergeError(f"{name}: models must be a non-empty list of fine-tuned params")
    models = tuple(models)
    if base is not None:
        check_compatible(base, models)
    if not callable(apply_fn):
        raise MergeError(f"{name}: apply_fn must be a function (params, batch) -> outputs")
    check_heads(heads, len(models), name)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise MergeError(f"{name}: rank must be a positive int, got {rank!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate)
            and learning_rate > 0):
        raise MergeError(f"{name}: learning_rate must be a finite number > 0, got "
                         f"{learning_rate!r}")
    if key is None:
        raise MergeError(f"{name} is random (module init): pass key=jax.random.key(seed)")
    if merged is None:
        if not isinstance(merge, str):
            raise MergeError(f"{name}: merge must be a registered method's name, got "
                             f"{type(merge).__name__}; pass a merged pytree as merged=")
        if merge_hparams is None:
            merge_hparams = {"scale": 0.3} if merge == "task_arithmetic" else {}
        if not isinstance(merge_hparams, Mapping):
            raise MergeError(f"{name}: merge_hparams must be a dict of {merge}'s "
                             f"hyperparameters, got {type(merge_hparams).__name__}")
        merged = registry.merge(merge, base, models, **merge_hparams)
    check_compatible(models[0], [merged], reference_name="models[0]", other_name="merged")
    draw = TaskBatches(batches, name, len(models))
    first = draw.peek()
    init_key, noise_key = jax.random.split(key)
    return _Setup(merged, models, None if heads is None else tuple(heads), first, draw,
                  init_key, noise_key, cached_adam(float(learning_rate)))


def _feature_dim(name: str, shape: Any, what: str) -> int:
    if not isinstance(shape, jax.ShapeDtypeStruct) or len(shape.shape) < 1:
        raise MergeError(f"{name}: {what} must be one array with a feature axis, got "
                         f"{shape}")
    return int(shape.shape[-1])


def _output_dim(name: str, setup: _Setup, apply_fn: ApplyFn) -> int:
    dims = {_feature_dim(name, jax.eval_shape(apply_fn, setup.merged, b), "apply_fn's output")
            for b in setup.first}
    if len(dims) != 1:
        raise MergeError(f"{name}: apply_fn's feature size differs between tasks: "
                         f"{sorted(dims)}")
    return dims.pop()


def _result(setup: _Setup, state: PyTree, losses: np.ndarray, apply_fn: ApplyFn,
            layers: str | None) -> SurgeryResult:
    return SurgeryResult(setup.merged, tuple(state[0]), losses, apply_fn, setup.heads, layers)


# ---------------------------------------------------------------------------------------
# Methods.


def surgery(base: PyTree, models: Sequence[PyTree], *,
            apply_fn: ApplyFn = registry.REQUIRED,
            batches: Sequence[Iterable[Any]] = registry.REQUIRED,
            heads: Sequence[Head] | None = None, merge: str = "task_arithmetic",
            merge_hparams: Mapping[str, Any] | None = None, merged: PyTree | None = None,
            rank: int = 16, learning_rate: float = 1e-3, steps: int = 1000,
            key: Array | None = None, checkpoint_dir: str | None = None,
            checkpoint_every: int = 100, log_every: int = 0) -> SurgeryResult:
    """Representation Surgery (Yang et al. 2024, arXiv 2402.02705) on ``apply_fn``'s
    output features ``z``: per task ``z_hat = z - ReLU(z W_down) W_up``, trained with
    Adam(``learning_rate``) on ``sum_t mean |z_hat_t - apply_fn(models[t], batch_t)|``
    over unlabeled batches (see the module docstring).

    Defaults follow the official code and FusionBench's
    ``clip_layer_wise_adamerging_surgery``: rank 16 (SurgeryV2's code: 4 for ViT-L/14),
    no biases, Adam lr 1e-3, 1000 steps of one batch per task (FusionBench
    ``surgery_steps``; the official script's 500 iterations of two batches is the same
    count), batch size 16 (the caller's batches). The merged model is
    ``mergejax.merge(merge, base, models, **merge_hparams)`` (task arithmetic with
    ``scale=0.3`` by default, the paper's setting), or ``merged`` when given. The
    surgery sits on ``apply_fn``'s output, before the heads (CLIP's heads normalise
    after it).

    Args:
      base, models: the pretrained params and the fine-tuned experts (one per task).
      apply_fn: ``(params, batch) -> features`` (features ``(..., D)``); must be
        hashable and the same object across calls to reuse the compiled step.
      batches: one iterator of unlabeled batches per task (``steps`` each).
      heads: None (outputs are logits) or one ``head(features) -> logits`` per task;
        used by ``predict`` only.
      merge, merge_hparams, merged: how the merged model is made (see above).
      rank: the module's hidden width ``r``.
      learning_rate, steps: Adam's step size and the number of steps.
      key: seeds the modules' init (``jax.random.key``).
      checkpoint_dir, checkpoint_every, log_every: `mergejax.learned.loop.optimize`.

    Returns:
      `SurgeryResult` with ``modules[t] = {OUTPUT: {"down", "up"}}``.

    Example::

        result = surgery(base, experts, apply_fn=encode, heads=heads, key=jax.random.key(0),
                         batches=[itertools.cycle(test_batches[t]) for t in tasks])
        logits = result.predict(0, images)
    """
    setup = _setup("surgery", base, models, apply_fn=apply_fn, batches=batches, heads=heads,
                   merge=merge, merge_hparams=merge_hparams, merged=merged, rank=rank,
                   learning_rate=learning_rate, key=key)
    dim = _output_dim("surgery", setup, apply_fn)
    modules = tuple({OUTPUT: init_module(k, dim, int(rank))}
                    for k in jax.random.split(setup.init_key, len(setup.models)))
    return _train_deterministic("surgery", setup, modules, apply_fn, None, False, steps,
                                checkpoint_dir, checkpoint_every, log_every)


def _train_deterministic(name, setup, modules, apply_fn, layers, pool, steps,
                         checkpoint_dir, checkpoint_every, log_every) -> SurgeryResult:
    step = functools.partial(_surgery_step, merged=setup.merged, models=setup.models,
                             apply_fn=apply_fn, optimizer=setup.optimizer, layers=layers,
                             pool=pool)
    out = optimize(step, (modules, setup.optimizer.init(modules)), setup.draw, steps=steps,
                   name=name, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=checkpoint_every, log_every=log_every)
    return _result(setup, out.state, out.losses, apply_fn, layers)


def surgery_v2(base: PyTree, models: Sequence[PyTree], *,
               apply_fn: ApplyFn = registry.REQUIRED,
               batches: Sequence[Iterable[Any]] = registry.REQUIRED,
               heads: Sequence[Head] | None = None, layers: str = DEFAULT_LAYERS,
               pool: bool = True, merge: str = "task_arithmetic",
               merge_hparams: Mapping[str, Any] | None = None,
               merged: PyTree | None = None, rank: int = 16, learning_rate: float = 1e-3,
               steps: int = 1000, key: Array | None = None,
               checkpoint_dir: str | None = None, checkpoint_every: int = 100,
               log_every: int = 0) -> SurgeryResult:
    """SurgeryV2, deep representation surgery (Yang et al. 2024, arXiv 2410.14389): a
    surgery module on the output of every Linen submodule matching ``layers`` (default:
    every transformer block, as the official code's 12 ``resblocks``) and on
    ``apply_fn``'s output. On the merged model each matched output ``h`` becomes
    ``h - ReLU(h W_down) W_up`` (per token) and flows into the following layers
    (`forward`). Loss: ``sum_t [sum_l L1(pool(h_hat_{t,l}), pool(h^expert_{t,l})) +
    L1(z_hat_t, z^expert_t)]``, where ``pool`` averages over the token axes (the official
    ``x.mean(1)``) when ``pool`` is True.

    Official defaults: rank 16 (4 for ViT-L/14), Adam lr 1e-3, 500 iterations x 2 batches
    of 16 per task (``steps=1000``). The other arguments are `surgery`'s; ``apply_fn``
    must call a Linen ``module.apply``.

    Returns:
      `SurgeryResult` with ``modules[t] = {path: module for each matched layer,
      OUTPUT: module}`` and ``layers`` set (``features`` / ``predict`` apply the deep
      surgery).

    Example::

        result = surgery_v2(base, experts, apply_fn=lambda p, x: vit.apply({"params": p}, x),
                            batches=test_iterators, heads=heads, key=jax.random.key(0))
    """
    name = "surgery_v2"
    setup = _setup(name, base, models, apply_fn=apply_fn, batches=batches, heads=heads,
                   merge=merge, merge_hparams=merge_hparams, merged=merged, rank=rank,
                   learning_rate=learning_rate, key=key)
    try:
        re.compile(layers)
    except (re.error, TypeError) as e:
        raise MergeError(f"{name}: layers must be a regex over module paths, got "
                         f"{layers!r} ({e})") from None
    out_dim = _output_dim(name, setup, apply_fn)
    _, shapes = jax.eval_shape(
        lambda p, b: forward(apply_fn, p, b, None, layers), setup.merged, setup.first[0])
    if not shapes:
        raise MergeError(f"{name}: no Linen module matched layers={layers!r} (apply_fn must "
                         "call a Linen module's apply; the regex is searched in "
                         "'/'-joined module paths such as 'resblocks_0')")
    dims = {path: _feature_dim(name, s, f"layer '{path}''s output")
            for path, s in shapes.items()}
    dims[OUTPUT] = out_dim
    modules = []
    for task_key in jax.random.split(setup.init_key, len(setup.models)):
        keys = jax.random.split(task_key, len(dims))
        modules.append({p: init_module(k, d, int(rank)) for k, (p, d) in
                        zip(keys, sorted(dims.items()))})
    return _train_deterministic(name, setup, tuple(modules), apply_fn, layers, bool(pool),
                                steps, checkpoint_dir, checkpoint_every, log_every)


def probsurgery(base: PyTree, models: Sequence[PyTree], *,
                apply_fn: ApplyFn = registry.REQUIRED,
                batches: Sequence[Iterable[Any]] = registry.REQUIRED,
                heads: Sequence[Head] | None = None, merge: str = "task_arithmetic",
                merge_hparams: Mapping[str, Any] | None = None,
                merged: PyTree | None = None, rank: int = 128, kl_weight: float = 1e-4,
                learning_rate: float = 1e-3, steps: int = 500, key: Array | None = None,
                checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                log_every: int = 0) -> SurgeryResult:
    """ProbSurgery (Wei et al., ICML 2025; code 1998v7/ProbSurgery): per task, from the
    merged features ``z``, ``h = ReLU(z W_down)``, ``mu = h W_up``,
    ``logvar = h W_logvar``; training samples the bias ``b = mu + exp(logvar / 2) * eps``
    (``eps ~ N(0, I)``, fresh each step from ``key``) and minimises
    ``sum_t [mean |z - b - z^expert_t| + kl_weight * kl_divergence(mu, logvar)]`` (prior
    ``N(0, I)``); inference (``features``/``predict``) uses ``z - mu``.

    Official defaults: hidden width 128 (``--hidden_layer``, here ``rank``), one down
    projection per task (``--one False``), ``KL_weight = 1e-4``, Adam lr 1e-3, 5 x 100
    batches of 16 per task (``steps=500``). The official code precomputes the merged
    features without gradient, as here. The other arguments are `surgery`'s.

    Returns:
      `SurgeryResult` with ``modules[t] = {OUTPUT: {"down", "up", "logvar"}}``.

    Example::

        result = probsurgery(base, experts, apply_fn=encode, batches=test_iterators,
                             heads=heads, key=jax.random.key(0))
    """
    name = "probsurgery"
    setup = _setup(name, base, models, apply_fn=apply_fn, batches=batches, heads=heads,
                   merge=merge, merge_hparams=merge_hparams, merged=merged, rank=rank,
                   learning_rate=learning_rate, key=key)
    if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight)
            and kl_weight >= 0):
        raise MergeError(f"{name}: kl_weight must be a finite number >= 0, got "
                         f"{kl_weight!r}")
    dim = _output_dim(name, setup, apply_fn)
    modules = tuple({OUTPUT: init_module(k, dim, int(rank), probabilistic=True)}
                    for k in jax.random.split(setup.init_key, len(setup.models)))
    step = functools.partial(_prob_step, merged=setup.merged, models=setup.models,
                             noise_key=setup.noise_key, kl_weight=jnp.float32(kl_weight),
                             apply_fn=apply_fn, optimizer=setup.optimizer)
    state = (modules, setup.optimizer.init(modules), jnp.zeros((), jnp.int32))
    out = optimize(step, state, setup.draw, steps=steps, name=name,
                   checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                   log_every=log_every)
    return _result(setup, out.state, out.losses, apply_fn, None)


_KEEPS = "the merged model and one low-rank surgery MLP per task"
registry.register(registry.FunctionMethod(
    "surgery", surgery, family="routing", paper=_SURGERY_PAPER, uses_key=True,
    keeps=_KEEPS + " on the output features"))
registry.register(registry.FunctionMethod(
    "surgery_v2", surgery_v2, family="routing", paper=_V2_PAPER, uses_key=True,
    keeps=_KEEPS + " per matched layer and on the output"))
registry.register(registry.FunctionMethod(
    "probsurgery", probsurgery, family="routing", paper=_PROB_PAPER, uses_key=True,
    keeps=_KEEPS + " (mean and log-variance heads) on the output features"))
