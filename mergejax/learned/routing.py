"""Routing merges: the model's weights depend on the input.

**WEMoE** (Tang et al. 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture of
Experts", arXiv 2402.00433; semantics of FusionBench ``we_moe`` for CLIP,
``fusion_bench/models/we_moe.py`` and ``fusion_bench/method/we_moe/``): every parameter
outside the routed MLPs is merged by task arithmetic with ``scale = init_lambda``; each
routed MLP (the routed ``nn.Dense`` layers of one block) becomes
``W(x) = W_0 + sum_k r_k(x) tau_k`` with a small router ``r`` on the MLP's input hidden
states, trained to minimise the entropy of every task's predictions on unlabeled test
inputs (test-time adaptation).

**Twin-Merging** (Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise
in Model Merging", arXiv 2406.15479; semantics of the official code
LZY-the-boys/Twin-Merging, ``discriminative/``): shared knowledge ``theta_s`` = a merge of
the experts (task arithmetic by default), exclusive knowledge ``theta_k - theta_s``
compressed per matrix by truncated SVD, and a router (an MLP on the shared model's
features) trained with cross-entropy to tell which task an input comes from; an input is
run by ``theta_s + sum_k softmax(router)_k * exclusive_k``.

Both take the calling convention of `mergejax.learned.loop` (``apply_fn``, ``heads``,
``batches``) and return a result with ``apply(batch)`` and ``predict(task, batch)``.

Example::

    from mergejax.learned import routing

    moe = routing.wemoe(base, experts, apply_fn=model_fn, heads=heads,
                        batches=[itertools.cycle(test_x[t]) for t in tasks], steps=1000)
    twin = routing.twin_merging(base, experts, apply_fn=model_fn, heads=heads,
                                batches=[itertools.cycle(val_x[t]) for t in tasks])
    logits = twin.predict(3, images)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mergejax import registry
from mergejax.learned import loop
from mergejax.methods import matrices
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    full_precision,
    is_float,
    unjitted,
)

__all__ = [
    "DEFAULT_ROUTED",
    "ExclusiveKnowledge",
    "TwinMergingResult",
    "WEMoEResult",
    "exclusive_knowledge",
    "twin_merging",
    "wemoe",
]

Array = jax.Array
ApplyFn = Callable[[PyTree, Any], Any]

#: The default ``routed`` pattern (`re.search` on a Dense module's ``/``-joined path): the
#: MLP ``nn.Dense`` layers of numbered blocks, e.g. ``resblocks_3/mlp_fc`` and
#: ``resblocks_3/mlp_proj`` (the suite's ViT, CLIP), ``encoderblock_0/MlpBlock_0/Dense_1``
#: (Flax ViT / transformer examples), ``layers_2/mlp/Dense_0`` or ``layers_2/Dense_0``.
DEFAULT_ROUTED = (r"(^|/)(resblocks|layers|blocks|encoderblock|decoderblock)_\d+/"
                  r"(mlp\w*|(mlp|MlpBlock)\w*/\w+|Dense_\d+)$")


# ---------------------------------------------------------------------------------------
# Shared pieces: checks, MLPs.


def _check_models(base: PyTree, models: Sequence[PyTree], name: str) -> list[PyTree]:
    if isinstance(models, dict) or not isinstance(models, Sequence) or not models:
        raise MergeError(f"{name}: models must be a non-empty list of fine-tuned models")
    models = list(models)
    check_compatible(base, models)
    return models


def _check_common(name: str, apply_fn: Any, heads: Any, k: int, learning_rate: Any,
                  optimizer: Any) -> optax.GradientTransformation:
    if not callable(apply_fn):
        raise MergeError(f"{name}: apply_fn must be a function (params, batch) -> outputs")
    loop.check_heads(heads, k, name)
    if optimizer is not None:
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise MergeError(f"{name}: optimizer must be an optax GradientTransformation, "
                             f"got {type(optimizer).__name__}")
        return optimizer
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate)
            and learning_rate > 0):
        raise MergeError(f"{name}: learning_rate must be a finite number > 0, got "
                         f"{learning_rate!r}")
    return loop.cached_adam(float(learning_rate))


def _init_mlp(key: Array, sizes: Sequence[int], std: float | None,
              last_bias: float = 0.0) -> list[dict[str, Array]]:
    """Dense layers ``sizes[i] -> sizes[i + 1]``: kernels N(0, std^2) (LeCun normal when
    std is None), biases 0 except ``last_bias`` on the last layer."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        scale = std if std is not None else fan_in ** -0.5
        bias = last_bias if i == len(sizes) - 2 else 0.0
        layers.append({"kernel": scale * jax.random.normal(sub, (fan_in, fan_out),
                                                           jnp.float32),
                       "bias": jnp.full((fan_out,), bias, jnp.float32)})
    return layers


def _mlp(layers: Sequence[dict[str, Array]], x: Array,
         activation: Callable[[Array], Array]) -> Array:
    """``activation`` between Dense layers, none after the last."""
    x = x.astype(jnp.float32)
    for i, layer in enumerate(layers):
        if i:
            x = activation(x)
        x = x @ layer["kernel"] + layer["bias"]
    return x


def _token_mean(x: Array) -> Array:
    """(B, ..., D) -> (B, D): the mean over every axis between the first and the last."""
    return x if x.ndim == 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


# ---------------------------------------------------------------------------------------
# WEMoE.


Layout = tuple[tuple[str, ...], ...]


def _dense_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path)


def _dense_input(args: tuple, kwargs: dict) -> Array:
    return args[0] if args else kwargs["inputs"]


def _discover(apply_fn: ApplyFn, params: PyTree, batch: Any, routed: str,
              ) -> tuple[Layout, tuple[int, ...]]:
    """Traces ``apply_fn`` once (no compute) and records the routed Dense calls: their
    groups (one per parent module, in call order) and each group's router input width."""
    pattern = re.compile(routed)
    seen: list[str] = []
    groups: dict[str, list[str]] = {}
    widths: dict[str, int] = {}

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, nn.Dense):
            path = _dense_path(ctx.module)
            seen.append(path)
            if pattern.search(path):
                parent = path.rsplit("/", 1)[0] if "/" in path else path
                members = groups.setdefault(parent, [])
                if path not in members:
                    members.append(path)
                widths.setdefault(parent, int(_dense_input(args, kwargs).shape[-1]))
        return next_fun(*args, **kwargs)

    def traced(p, b):
        with nn.intercept_methods(record):
            return unjitted(apply_fn)(p, b)  # its layers must run in this trace

    jax.eval_shape(traced, params, batch)
    if not groups:
        shown = ", ".join(f"'{p}'" for p in dict.fromkeys(seen)) or "none"
        raise MergeError(f"wemoe: routed={routed!r} matches no flax.linen.Dense layer that "
                         f"apply_fn calls (Dense layers called: {shown})")
    return tuple(tuple(m) for m in groups.values()), tuple(widths[g] for g in groups)


def _route(router: dict[str, Any], x: Array, batch_reduce: bool) -> Array:
    """The routing weights of one block for its input hidden states ``x`` (B, ..., D):
    per token, averaged over the tokens (B, K), and over the batch (K,) with
    ``batch_reduce`` (FusionBench ``WeightEnsemblingMoE.forward``, ``batch_first``)."""
    if "weight" in router:  # router_hidden_layers=0: input-independent weights
        return router["weight"]
    gates = _token_mean(_mlp(router["layers"], x, jax.nn.relu))
    return jnp.mean(gates, axis=0) if batch_reduce else gates


def _expert_delta(x: Array, expert: dict[str, Array], w: Array) -> Array:
    """``sum_k w_k (x tau_k + tau_bias_k)`` for one routed Dense; ``w`` is (K,) or (B, K)
    (per sample, without forming per-sample weights)."""
    x = x.astype(jnp.float32)
    if w.ndim == 1:
        delta = x @ jnp.tensordot(w, expert["kernel"], 1)
        bias = jnp.tensordot(w, expert["bias"], 1) if "bias" in expert else 0.0
        return delta + bias
    delta = jnp.einsum("b...ko,bk->b...o",
                       jnp.einsum("b...i,kio->b...ko", x, expert["kernel"]), w)
    if "bias" in expert:
        bias = w @ expert["bias"]
        delta = delta + bias.reshape(bias.shape[:1] + (1,) * (x.ndim - 2) + bias.shape[1:])
    return delta


def _moe_apply(apply_fn: ApplyFn, layout: Layout, batch_reduce: bool, params: PyTree,
               experts: tuple, routers: tuple, batch: Any) -> Any:
    """``apply_fn(params, batch)`` with every routed Dense's output ``y`` replaced by
    ``y + sum_k r_k(x) (x tau_k + tau_bias_k)``; the router of a group runs on the input of
    its first Dense (re-run each time that Dense is called)."""
    where = {path: (g, j) for g, group in enumerate(layout) for j, path in enumerate(group)}
    weights: dict[int, Array] = {}

    def intercept(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not isinstance(ctx.module, nn.Dense):
            return next_fun(*args, **kwargs)
        hit = where.get(_dense_path(ctx.module))
        if hit is None:
            return next_fun(*args, **kwargs)
        g, j = hit
        x = _dense_input(args, kwargs)
        if j == 0:
            weights[g] = _route(routers[g], x, batch_reduce)
        y = next_fun(*args, **kwargs)
        return y + _expert_delta(x, experts[g][j], weights[g]).astype(y.dtype)

    with nn.intercept_methods(intercept):
        return unjitted(apply_fn)(params, batch)


@functools.partial(jax.jit, static_argnames=("apply_fn", "head", "layout", "batch_reduce"))
def _wemoe_forward(params, experts, routers, batch, *, apply_fn, head, layout, batch_reduce):
    outputs = _moe_apply(apply_fn, layout, batch_reduce, params, experts, routers, batch)
    return outputs if head is None else head(outputs)


@functools.partial(jax.jit, static_argnames=("apply_fn", "heads", "layout", "batch_reduce",
                                             "optimizer"))
def _wemoe_step(state, batches, params, experts, *, apply_fn, heads, layout, batch_reduce,
                optimizer):
    """One Adam step on the sum over tasks of the entropy of each task's predictions."""
    routers, opt_state = state
    routed = functools.partial(_moe_apply, apply_fn, layout, batch_reduce, params, experts)

    def objective(r):
        return sum(loop.entropy(loop.task_logits(routed, heads, r, batch, t))
                   for t, batch in enumerate(batches))

    loss, grads = jax.value_and_grad(objective)(routers)
    updates, opt_state = optimizer.update(grads, opt_state, routers)
    return (optax.apply_updates(routers, updates), opt_state), loss


@dataclasses.dataclass(frozen=True, eq=False)
class WEMoEResult:
    """A weight-ensembling MoE (arXiv 2402.00433): one model for every task whose routed
    MLPs depend on the input. Keeps the MLP task vectors and the routers.

    Attributes:
      params: the base's structure: task arithmetic (``scale = init_lambda``) outside the
        routed Dense layers, the base's own values on them (their ``W_0``).
      experts: per block, per routed Dense (in call order), ``{"kernel": (K, in, out),
        "bias": (K, out)}``: the float32 task vectors of that layer.
      routers: per block, ``{"layers": [{"kernel", "bias"}, ...]}`` (an MLP with ReLU) or
        ``{"weight": (K,)}`` (``router_hidden_layers=0``).
      layout: per block, the ``/``-joined paths of its routed Dense modules, in call order.
      apply_fn, heads: as given to `wemoe` (heads as a tuple, or None).
      batch_reduce: route with the mean weights over the batch (True) or each sample on
        its own (False, the default: FusionBench's intended "sample-wise adaptation").
      losses: the summed entropy objective at each training step.
    """

    params: PyTree
    experts: tuple
    routers: tuple
    layout: Layout
    apply_fn: ApplyFn
    heads: tuple | None
    batch_reduce: bool = False
    losses: np.ndarray | None = None

    def _forward(self, head, batch):
        return _wemoe_forward(self.params, self.experts, self.routers, batch,
                              apply_fn=self.apply_fn, head=head, layout=self.layout,
                              batch_reduce=self.batch_reduce)

    def apply(self, batch: Any) -> Any:
        """``apply_fn``'s outputs for ``batch`` with the routed MLPs (jit-compiled).

        Example::

            features = result.apply(images)
        """
        return self._forward(None, batch)

    def predict(self, task: int, batch: Any) -> Array:
        """Task ``task``'s logits: its head on `apply` (the outputs without heads).

        Example::

            logits = result.predict(0, images)
        """
        return self._forward(None if self.heads is None else self.heads[task], batch)


def _check_wemoe(routed: Any, init_lambda: Any, router_hidden_layers: Any) -> None:
    if not isinstance(routed, str):
        raise MergeError(f"wemoe: routed must be a regular expression string, got "
                         f"{type(routed).__name__}")
    try:
        re.compile(routed)
    except re.error as e:
        raise MergeError(f"wemoe: routed={routed!r} is not a valid regex: {e}") from None
    if not (isinstance(init_lambda, (int, float)) and math.isfinite(init_lambda)):
        raise MergeError(f"wemoe: init_lambda must be a finite number, got {init_lambda!r}")
    if router_hidden_layers not in (0, 1, 2) or isinstance(router_hidden_layers, bool):
        raise MergeError(f"wemoe: router_hidden_layers must be 0, 1 or 2, got "
                         f"{router_hidden_layers!r}")


def wemoe(base: PyTree, models: Sequence[PyTree], *, apply_fn: ApplyFn = registry.REQUIRED,
          batches: Sequence[Iterable[Any]] = registry.REQUIRED,
          heads: Sequence[Callable[[Any], Array]] | None = None,
          routed: str = DEFAULT_ROUTED, init_lambda: float = 0.3,
          router_hidden_layers: int = 2, batch_reduce: bool = True,
          sample_wise: bool = True, steps: int = 1000, learning_rate: float = 1e-4,
          optimizer: optax.GradientTransformation | None = None,
          checkpoint_dir: str | None = None, checkpoint_every: int = 100,
          log_every: int = 0, key: Array | None = None) -> WEMoEResult:
    """Weight-Ensembling MoE (Tang et al. 2024, arXiv 2402.00433), FusionBench
    ``clip_weight_ensembling_moe`` semantics.

    * Outside the routed layers: task arithmetic ``theta_0 + init_lambda * sum_k tau_k``
      (FusionBench merges the whole model so before up-scaling the MLPs).
    * Routed layers: the ``nn.Dense`` modules whose ``/``-joined path matches ``routed``
      (`re.search`; default `DEFAULT_ROUTED`: every transformer block's MLP), grouped by
      parent module (one block's MLP = one expert group, one router). Their output is
      ``x W_0 + b_0 + sum_k r_k (x tau_k + tau_bias_k)`` with ``W_0, b_0`` the base's.
      ``apply_fn`` must call a Linen ``module.apply({"params": params}, ...)`` on the
      params tree as given; it runs inside `flax.linen.intercept_methods`.
    * Router of a block (FusionBench ``Depth_{0,1,2}_Gate``): on the input hidden states of
      the block's first routed Dense, ``router_hidden_layers=2``: ``fc2(relu(fc1(h)))``
      (``fc1`` D -> D), 1: ``fc(h)``, 0: a constant vector. Kernels start N(0, 0.01^2),
      ``fc1``'s bias at 0 and the output bias at ``init_lambda``, so every routing weight
      starts near ``init_lambda`` (no softmax). Routing weights are per token, averaged
      over the tokens (per sample), and with ``batch_reduce`` averaged over the batch.
    * Training (test-time adaptation): ``steps`` steps of ``optimizer`` (default
      ``optax.adam(learning_rate)``, FusionBench: Adam, lr 1e-4, 1000 steps, batch 16) on
      the sum over tasks of the mean entropy of each task's predictions
      (`loop.entropy`) on one unlabeled batch per task, routers only, one jitted step
      through `loop.optimize` (checkpoints and NaN guard as documented there).
    * The result routes each sample on its own when ``sample_wise`` (FusionBench sets
      ``batch_reduce = False`` after training for this; its attribute is set on the
      wrapper model and does not reach the MoE modules, so it evaluates batch-reduced:
      pass ``sample_wise=False`` for that).

    Args:
      base, models: the pretrained params and the K fine-tuned ones (same structure).
      apply_fn: ``(params, batch) -> outputs`` (`mergejax.learned.loop`).
      batches: one iterator per task of unlabeled test batches (same shapes each step).
      heads: None or one ``head(outputs) -> logits`` per task.
      key: seeds the router kernels (default ``jax.random.key(0)``).

    Example::

        result = wemoe(base, experts, apply_fn=lambda p, x: vit.apply({"params": p}, x),
                       heads=heads, batches=[itertools.cycle(b) for b in test_batches],
                       steps=500)
        logits = result.predict(2, images)
    """
    name = "wemoe"
    models = _check_models(base, models, name)
    k = len(models)
    optimizer = _check_common(name, apply_fn, heads, k, learning_rate, optimizer)
    _check_wemoe(routed, init_lambda, router_hidden_layers)
    draw = loop.TaskBatches(batches, name, k)
    heads = None if heads is None else tuple(heads)
    first = draw.peek()

    layout, widths = _discover(apply_fn, base, first[0], routed)
    paths, base_leaves, treedef = flatten_with_paths(base)
    merged = jax.tree.leaves(registry.merge("task_arithmetic", base, models,
                                            scale=float(init_lambda)))
    model_leaves = {p: leaf for p, leaf in zip(paths, zip(*(jax.tree.leaves(m)
                                                             for m in models)))}
    base_of = dict(zip(paths, base_leaves))
    routed_modules = [p for group in layout for p in group]
    for module in routed_modules:
        if f"{module}/kernel" not in base_of:
            raise MergeError(f"wemoe: the routed Dense '{module}' has no '{module}/kernel' in "
                             "the params; apply_fn must apply the module to the params "
                             "tree as given (module.apply({'params': params}, ...))")
    params = treedef.unflatten([b if p.rsplit("/", 1)[0] in routed_modules else m
                                for p, b, m in zip(paths, base_leaves, merged)])

    def task_vectors(leaf_path):
        b = base_of[leaf_path].astype(jnp.float32)
        return jnp.stack([m.astype(jnp.float32) - b for m in model_leaves[leaf_path]])

    experts = tuple(tuple({leaf: task_vectors(f"{module}/{leaf}") for leaf in ("kernel", "bias")
                           if f"{module}/{leaf}" in base_of} for module in group)
                    for group in layout)
    keys = jax.random.split(jax.random.key(0) if key is None else key, len(layout))
    if router_hidden_layers == 0:
        routers = tuple({"weight": jnp.full((k,), init_lambda, jnp.float32)} for _ in layout)
    else:
        routers = tuple({"layers": _init_mlp(sub, [d] * router_hidden_layers + [k], 0.01,
                                             float(init_lambda))}
                        for sub, d in zip(keys, widths))

    step = functools.partial(_wemoe_step, params=params, experts=experts, apply_fn=apply_fn,
                             heads=heads, layout=layout, batch_reduce=bool(batch_reduce),
                             optimizer=optimizer)
    trained = loop.optimize(step, (routers, optimizer.init(routers)), draw,
                            steps=steps, name=name, checkpoint_dir=checkpoint_dir,
                            checkpoint_every=checkpoint_every, log_every=log_every)
    return WEMoEResult(params, experts, trained.state[0], layout, apply_fn, heads,
                       batch_reduce=not sample_wise, losses=trained.losses)


# ---------------------------------------------------------------------------------------
# Twin-Merging.


class ExclusiveKnowledge(NamedTuple):
    """The K compressed exclusive vectors ``theta_k - theta_shared`` (arXiv 2406.15479).

    Attributes:
      left: the shared model's structure; on matrix leaves (`matrices.matrix_split`
        "auto") ``U_r diag(S_r)`` stacked ``(K, m, r)``, on other floating leaves the
        dense differences ``(K, *shape)``, None on non-floating leaves.
      right: ``V_r`` ``(K, n, r)`` on matrix leaves, None elsewhere.
    """

    left: PyTree
    right: PyTree

    @full_precision
    def mix(self, shared: PyTree, weights: Array) -> PyTree:
        """``theta_shared + sum_k weights[k] * exclusive_k`` (weights (K,)), in the shared
        model's dtypes; non-floating leaves are the shared model's.

        Example::

            params = result.exclusive.mix(result.shared, jnp.array([0.9, 0.1]))
        """
        weights = jnp.asarray(weights, jnp.float32)

        def leaf(a, s, b):
            if a is None:
                return s
            delta = (jnp.tensordot(weights, a, 1) if b is None
                     else jnp.einsum("k,kmr,knr->mn", weights, a, b).reshape(s.shape))
            return (s.astype(jnp.promote_types(s.dtype, jnp.float32)) + delta).astype(s.dtype)

        return jax.tree.map(leaf, self.left, shared, self.right, is_leaf=lambda x: x is None)

    @full_precision
    def dense(self, shared: PyTree, task: int) -> PyTree:
        """Task ``task``'s decompressed exclusive vector (float32, the shared model's
        structure; zeros on non-floating leaves).

        Example::

            tau = result.exclusive.dense(result.shared, 0)
        """
        onehot = jax.nn.one_hot(task, jax.tree.leaves(self.left)[0].shape[0])
        zero = jax.tree.map(lambda s: jnp.zeros(np.shape(s), jnp.float32), shared)
        return self.mix(zero, onehot)


def _matrix_rank(rank: float, path: str, shape: tuple[int, ...]) -> int:
    p, q = shape
    if isinstance(rank, float):
        return int(rank * min(p, q))  # the official ``int(density * len(S))``
    if rank > min(p, q):
        raise MergeError(f"twin_merging: rank {rank} is larger than the {p}x{q} matrix at "
                         f"'{path}' allows (at most {min(p, q)})")
    return rank


def exclusive_knowledge(shared: PyTree, models: Sequence[PyTree], *,
                        rank: float = 0.1) -> ExclusiveKnowledge:
    """Twin-Merging's compressed exclusive knowledge (arXiv 2406.15479, Sec. 3.2): per
    model, ``theta_k - theta_shared`` in float32, each matrix leaf (`matrices.matrix_split`
    "auto": Dense kernels, embeddings, attention projections) truncated to its top
    ``rank`` singular triplets; other floating leaves (biases, norms, convolution
    kernels) are kept dense, as the official ``sparsify.svd`` keeps 1-D tensors.

    ``rank``: an int (the same rank for every matrix; larger than a matrix allows raises)
    or a float fraction in (0, 1]: ``int(rank * min(m, n))`` per matrix, the official
    ``density = 1 - mask_rate`` (default script ``mask_rate=0.9``, i.e. 0.1), which may be
    0 (that matrix's exclusive part is dropped).

    Example::

        ex = exclusive_knowledge(shared, [ft_a, ft_b], rank=8)
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or (
            isinstance(rank, int) and rank < 1) or (
            isinstance(rank, float) and not 0.0 < rank <= 1.0):
        raise MergeError(f"twin_merging: rank must be an int >= 1 or a float in (0, 1], got "
                         f"{rank!r}")
    models = list(models)
    check_compatible(shared, models, reference_name="shared", check_dtypes=False)
    paths, leaves, treedef = flatten_with_paths(shared)
    per_model = [jax.tree.leaves(m) for m in models]
    left, right = [], []
    for j, (path, s) in enumerate(zip(paths, leaves)):
        if not is_float(s):
            left.append(None)
            right.append(None)
            continue
        diff = jnp.stack([m[j].astype(jnp.float32) for m in per_model]) - s.astype(jnp.float32)
        split = matrices.matrix_split(path, np.shape(s), "auto")
        if split is None:
            left.append(diff)
            right.append(None)
            continue
        mats = jax.vmap(lambda x, sp=split: matrices.as_matrix(x, sp))(diff)
        r = _matrix_rank(rank, path, mats.shape[1:])
        if r == 0:
            left.append(jnp.zeros(mats.shape[:2] + (0,), jnp.float32))
            right.append(jnp.zeros((mats.shape[0], mats.shape[2], 0), jnp.float32))
            continue
        u, sv, v = matrices.top_singular(mats, r)
        left.append(u * sv[..., None, :])
        right.append(v)
    return ExclusiveKnowledge(treedef.unflatten(left), treedef.unflatten(right))


def _twin_features(apply_fn: ApplyFn, shared: PyTree, batch: Any) -> Array:
    """The router's input: ``apply_fn(shared, batch)``, averaged over token axes (the
    official code averages the last hidden state over the tokens)."""
    return _token_mean(apply_fn(shared, batch))


def _twin_route(router: list, features: Array) -> Array:
    return _mlp(router, features, jax.nn.leaky_relu)


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer"))
def _twin_step(state, batches, shared, *, apply_fn, optimizer):
    """One step of cross-entropy between the router's logits and the task ids."""
    router, opt_state = state
    feats = jnp.concatenate([_twin_features(apply_fn, shared, b) for b in batches])
    labels = jnp.concatenate([jnp.full((jax.tree.leaves(b)[0].shape[0],), t, jnp.int32)
                              for t, b in enumerate(batches)])

    def objective(r):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            _twin_route(r, feats), labels))

    loss, grads = jax.value_and_grad(objective)(router)
    updates, opt_state = optimizer.update(grads, opt_state, router)
    return (optax.apply_updates(router, updates), opt_state), loss


@functools.partial(jax.jit, static_argnames=("apply_fn", "head", "batch_reduce"))
def _twin_forward(shared, exclusive, router, batch, *, apply_fn, head, batch_reduce):
    probs = jax.nn.softmax(_twin_route(router, _twin_features(apply_fn, shared, batch)))
    if batch_reduce:
        outputs = apply_fn(exclusive.mix(shared, jnp.mean(probs, axis=0)), batch)
    else:
        outputs = jax.lax.map(
            lambda pb: jax.tree.map(lambda o: o[0], apply_fn(
                exclusive.mix(shared, pb[0]), jax.tree.map(lambda x: x[None], pb[1]))),
            (probs, batch))
    return outputs if head is None else head(outputs)


@dataclasses.dataclass(frozen=True, eq=False)
class TwinMergingResult:
    """Twin-Merging (arXiv 2406.15479): keeps the shared model, the K compressed
    exclusive vectors and the router; the weights for an input are
    ``shared + sum_k softmax(router(features(x)))_k * exclusive_k``.

    Attributes:
      shared: the shared-knowledge model (a merge of the experts).
      exclusive: the compressed exclusive knowledge (`ExclusiveKnowledge`).
      router: the router MLP's layers ``[{"kernel", "bias"}, ...]`` (leaky ReLU between).
      apply_fn, heads: as given to `twin_merging` (heads as a tuple, or None).
      batch_reduce: one model per batch from the mean routing probabilities (True) or
        one per sample (False, the default: the official code routes sample by sample).
      losses: the router's cross-entropy at each training step.
    """

    shared: PyTree
    exclusive: ExclusiveKnowledge
    router: list
    apply_fn: ApplyFn
    heads: tuple | None
    batch_reduce: bool = False
    losses: np.ndarray | None = None

    def route(self, batch: Any) -> Array:
        """The routing probabilities ``softmax(router(features))`` (B, K) of ``batch``.

        Example::

            probs = result.route(images)   # probs.argmax(-1): the task each input is from
        """
        return jax.nn.softmax(_twin_route(
            self.router, _twin_features(self.apply_fn, self.shared, batch)))

    def _forward(self, head, batch):
        return _twin_forward(self.shared, self.exclusive, self.router, batch,
                             apply_fn=self.apply_fn, head=head,
                             batch_reduce=self.batch_reduce)

    def apply(self, batch: Any) -> Any:
        """``apply_fn``'s outputs with each input's routed weights (jit-compiled; every
        leaf of ``batch`` has the batch axis first).

        Example::

            features = result.apply(images)
        """
        return self._forward(None, batch)

    def predict(self, task: int, batch: Any) -> Array:
        """Task ``task``'s logits; ``task`` only selects the head (routing is from the
        input).

        Example::

            logits = result.predict(1, images)
        """
        return self._forward(None if self.heads is None else self.heads[task], batch)


def twin_merging(base: PyTree, models: Sequence[PyTree], *,
                 apply_fn: ApplyFn = registry.REQUIRED,
                 batches: Sequence[Iterable[Any]] = registry.REQUIRED,
                 heads: Sequence[Callable[[Any], Array]] | None = None,
                 shared: str = "task_arithmetic", shared_hparams: dict | None = None,
                 rank: float = 0.1, router_hidden: int | None = None,
                 batch_reduce: bool = False, steps: int = 1000,
                 learning_rate: float = 5e-4,
                 optimizer: optax.GradientTransformation | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                 log_every: int = 0, key: Array | None = None) -> TwinMergingResult:
    """Twin-Merging (Lu et al. 2024, arXiv 2406.15479), official-code semantics
    (LZY-the-boys/Twin-Merging ``discriminative/``).

    * Shared knowledge: ``mergejax.merge(shared, base, models, **shared_hparams)``; default
      task arithmetic with ``scale=0.3`` (the official GLUE script uses 0.29).
    * Exclusive knowledge: `exclusive_knowledge` (``theta_k - theta_shared``, truncated SVD
      to ``rank`` per matrix; default 0.1 of each matrix's rank, the script's
      ``mask_rate=0.9`` with ``mask_strategy=svd``).
    * Router: an MLP ``D -> H -> H -> K`` with leaky ReLU (``H = router_hidden``, default
      ``2 D`` as the official ``SimpleMLP``; its BatchNorm and dropout are left out) on
      the features ``apply_fn(shared, batch)`` (averaged over token axes; the official
      router reads the shared model's last hidden state averaged over tokens), trained
      with cross-entropy to predict the task an input comes from: task ``t``'s inputs are
      ``batches[t]`` (held-out, validation-like data; no class labels needed). ``steps``
      steps of ``optimizer`` (default ``optax.adam(learning_rate)``; official: AdamW
      without decay, lr 5e-4, batch 1024, 50 epochs), one jitted step over all tasks via
      `loop.optimize`.
    * Inference: ``theta_shared + sum_k softmax(router(x))_k * exclusive_k`` per sample
      (the official code runs one input at a time), or per batch from the mean
      probabilities with ``batch_reduce``.

    Example::

        result = twin_merging(base, experts, apply_fn=model_fn, heads=heads,
                              batches=[itertools.cycle(v) for v in val_batches], rank=16)
        acc = (result.predict(0, images).argmax(-1) == labels).mean()
    """
    name = "twin_merging"
    models = _check_models(base, models, name)
    k = len(models)
    optimizer = _check_common(name, apply_fn, heads, k, learning_rate, optimizer)
    if not isinstance(shared, str):
        raise MergeError(f"{name}: shared must be a registered method name, got "
                         f"{type(shared).__name__}")
    if router_hidden is not None and (isinstance(router_hidden, bool) or not isinstance(
            router_hidden, int) or router_hidden < 1):
        raise MergeError(f"{name}: router_hidden must be None or an int >= 1, got "
                         f"{router_hidden!r}")
    draw = loop.TaskBatches(batches, name, k)
    heads = None if heads is None else tuple(heads)
    hparams = {"scale": 0.3} if shared_hparams is None and shared == "task_arithmetic" \
        else dict(shared_hparams or {})
    shared_params = registry.merge(shared, base, models, **hparams)
    exclusive = exclusive_knowledge(shared_params, models, rank=rank)

    first = draw.peek()
    width = jax.eval_shape(functools.partial(_twin_features, apply_fn), shared_params,
                           first[0]).shape[-1]
    hidden = 2 * width if router_hidden is None else router_hidden
    router = _init_mlp(jax.random.key(0) if key is None else key, [width, hidden, hidden, k],
                       None)
    step = functools.partial(_twin_step, shared=shared_params, apply_fn=apply_fn,
                             optimizer=optimizer)
    trained = loop.optimize(step, (router, optimizer.init(router)), draw,
                            steps=steps, name=name, checkpoint_dir=checkpoint_dir,
                            checkpoint_every=checkpoint_every, log_every=log_every)
    return TwinMergingResult(shared_params, exclusive, trained.state[0], apply_fn, heads,
                             batch_reduce=bool(batch_reduce), losses=trained.losses)


registry.register(registry.FunctionMethod(
    "wemoe", wemoe, family="routing",
    paper="Tang et al. 2024, Merging Multi-Task Models via Weight-Ensembling MoE "
          "(arXiv 2402.00433)",
    uses_key="optional", keeps="MLP task vectors + routers"))
registry.register(registry.FunctionMethod(
    "twin_merging", twin_merging, family="routing",
    paper="Lu et al. 2024, Twin-Merging (arXiv 2406.15479)",
    uses_key="optional", keeps="shared model + SVD-compressed exclusive vectors + router"))
