"""Merges built from per-task masks and scores: EMR, PCB, SCE, Model Tailor, stitching.

EMR (and TALL masks, in `mergejax.methods.sparse`) keep more than one set of weights: one
shared task vector plus a binary mask and a rescaler per task. They return a
`ModulatedMerge`, whose `ModulatedMerge.task_model` materialises task t's model. The masks
are stored bit-packed (one bit per entry and task), so the result costs about one model
plus K/32 models' worth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax.method import LeafContext, StatisticsPass, leafwise, map_leaves
from mergejax.methods import stages
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    is_float,
)

__all__ = [
    "ModulatedMerge",
    "emr",
    "model_tailor",
    "modulated_merge",
    "pcb",
    "sce",
    "stitch",
]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModulatedMerge:
    """One shared task vector, and per task a binary mask and a rescaler.

    Task t's model is ``base + rescalers[t] * (masks[t] * vector)`` on every floating leaf
    (non-floating leaves are the base's). A pytree, so it can be passed through `jax.jit`.

    Attributes:
      base: the pretrained params.
      vector: the shared (unified) task vector, float32, with the base's structure;
        non-floating leaves are the base's.
      masks: per floating leaf, a uint8 array ``(K, ceil(size / 8))`` of bit-packed masks
        (`jnp.packbits` of the flattened mask), None elsewhere.
      rescalers: ``(K,)`` float32.
    """

    base: PyTree
    vector: PyTree
    masks: PyTree
    rescalers: Array

    @property
    def num_tasks(self) -> int:
        return int(self.rescalers.shape[0])

    def mask(self, t: int) -> PyTree:
        """Task t's mask as a pytree of booleans (None on non-floating leaves)."""
        self._check_task(t)
        return jax.tree.map(
            lambda v, m: None if m is None else _unpack(m[t], v.shape),
            self.vector, self.masks, is_leaf=lambda x: x is None)

    def task_model(self, t: int) -> PyTree:
        """Task t's model, ``base + rescalers[t] * masks[t] * vector``, in the base's dtypes.

        Example::

            result = mergejax.emr(base, [ft_a, ft_b])
            model_b = result.task_model(1)
        """
        self._check_task(t)
        return _task_model(self.base, self.vector, self.masks, self.rescalers, jnp.int32(t))

    def task_models(self) -> list[PyTree]:
        """Every task's model, in order."""
        return [self.task_model(t) for t in range(self.num_tasks)]

    def _check_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise MergeError(f"task index {t} out of range for {self.num_tasks} tasks")


def _unpack(packed: Array, shape: tuple[int, ...]) -> Array:
    return jnp.unpackbits(packed, count=math.prod(shape)).reshape(shape).astype(bool)


@jax.jit
def _task_model(base, vector, masks, rescalers, t):
    """Task ``t``'s model (``t`` traced: one compile serves every task)."""
    def leaf(b, v, m):
        if m is None:
            return b
        return (b.astype(jnp.float32)
                + rescalers[t] * jnp.where(_unpack(m[t], v.shape), v, 0.0)).astype(b.dtype)
    return jax.tree.map(leaf, base, vector, masks, is_leaf=lambda x: x is None)


def modulated_merge(base: PyTree, models: Sequence[PyTree], name: str, leaf_fn,
                    rescalers_fn, extra: PyTree | None = None) -> ModulatedMerge:
    """Builds a `ModulatedMerge` leaf by leaf, one compiled function per leaf shape.

    ``leaf_fn(base_leaf, model_leaves[, extra_leaf]) -> (vector, masks tuple, stats)``
    runs per floating leaf in float32 (``extra`` is an optional pytree like the base,
    e.g. a precomputed vector); ``rescalers_fn(summed stats) -> (K,)`` turns the stats
    summed over leaves into rescalers. ``leaf_fn`` and ``rescalers_fn`` are static
    arguments of the compiled functions: pass the same objects to reuse them.

    Leaf by leaf, because nothing but the small stats crosses leaves: one program over a
    ViT-B/32's 216 leaves took 35 s to compile and held four models of temporaries.
    """
    models = list(models)
    if not models:
        raise MergeError(f"{name}: models is empty; give at least one model")
    if base is None:
        raise MergeError(f"{name} needs a base (pretrained) model; got base=None")
    check_compatible(base, models)
    _, base_leaves, treedef = flatten_with_paths(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    extra_leaves = jax.tree.leaves(extra) if extra is not None else None
    floating = [i for i, b in enumerate(base_leaves) if is_float(b)]
    if not floating:
        raise MergeError(f"{name}: the params have no floating-point leaf to merge")
    built = map_leaves(functools.partial(_modulated_leaf, leaf_fn), [
        (base_leaves[i], tuple(ml[i] for ml in model_leaves),
         *(() if extra_leaves is None else (extra_leaves[i],))) for i in floating])
    vectors, masks = list(base_leaves), [None] * len(base_leaves)
    for i, (vector, packed, _) in zip(floating, built):
        vectors[i], masks[i] = vector, packed
    parts = [stats for _, _, stats in built]
    rescalers = _summed_rescalers(rescalers_fn, tuple(parts))
    return ModulatedMerge(base, treedef.unflatten(vectors), treedef.unflatten(masks), rescalers)


@functools.partial(jax.jit, static_argnums=0)
def _modulated_leaf(leaf_fn, base_leaf, model_leaves, *extra_leaf):
    """One floating leaf's ``(vector, bit-packed masks (K, ceil(size / 8)), stats)``."""
    xs = tuple(x.astype(jnp.float32) for x in model_leaves)
    vector, masks, stats = leaf_fn(base_leaf.astype(jnp.float32), xs, *extra_leaf)
    return vector, jnp.stack([jnp.packbits(m.reshape(-1)) for m in masks]), stats


@functools.partial(jax.jit, static_argnums=0)
def _summed_rescalers(rescalers_fn, parts):
    return rescalers_fn(jax.tree.map(lambda *s: functools.reduce(jnp.add, s), *parts))


def _emr_elect(taus: tuple[Array, ...]) -> tuple[Array, tuple[Array, ...]]:
    """EMR's unified task vector and per-task masks of one leaf."""
    sign = jnp.where(functools.reduce(jnp.add, taus) > 0, 1.0, -1.0)
    masks = tuple(t * sign > 0 for t in taus)
    magnitude = functools.reduce(jnp.maximum, (jnp.where(m, jnp.abs(t), 0.0)
                                               for t, m in zip(taus, masks)))
    return sign * magnitude, masks


def emr(base: PyTree, models: Sequence[PyTree], *, rescale_sum: str = "tensor_means"
        ) -> ModulatedMerge:
    """EMR-Merging (Huang et al. 2024, arXiv 2405.17461): elect, mask, rescale.

    * Elect: per entry, the sign of ``sum_t tau_t`` (a zero sum elects -1, as the paper's
      code and FusionBench) and the largest ``|tau_t|`` among the tasks that agree with
      it: the unified vector ``tau_uni``.
    * Mask: ``M_t = tau_t * tau_uni > 0`` (strict).
    * Rescale: ``lambda_t = sum |tau_t| / sum |M_t * tau_uni|``. With
      ``rescale_sum="tensor_means"`` the sums run over leaves of each leaf's *mean*
      absolute value (the official code and FusionBench); ``"entries"`` sums over every
      entry (the paper's formula).

    Task t's model is ``theta_0 + lambda_t * M_t * tau_uni`` (`ModulatedMerge.task_model`).
    Tuning-free: no hyperparameters.

    Example::

        result = mergejax.emr(base, [ft_a, ft_b, ft_c])
        params_b = result.task_model(1)
    """
    if rescale_sum not in ("tensor_means", "entries"):
        raise MergeError(f"rescale_sum must be 'tensor_means' or 'entries', got "
                         f"{rescale_sum!r}")
    return modulated_merge(base, models, "emr", _emr_leaf_stats(rescale_sum), _emr_rescalers)


@functools.cache
def _emr_leaf_stats(rescale_sum: str):
    """The leaf function of `emr` (cached: it keys the compiled function)."""
    reduce = jnp.mean if rescale_sum == "tensor_means" else jnp.sum

    def leaf(base, models):
        taus = tuple(x - base for x in models)
        unified, masks = _emr_elect(taus)
        stats = jnp.stack([
            jnp.stack([reduce(jnp.abs(t)) for t in taus]),
            jnp.stack([reduce(jnp.where(m, jnp.abs(unified), 0.0)) for m in masks])])
        return unified, masks, stats

    return leaf


def _emr_rescalers(stats: Array) -> Array:
    return stats[0] / stats[1]


emr.name = "emr"
emr.family = "sparse"
emr.paper = "Huang et al. 2024, EMR-Merging (arXiv 2405.17461)"
emr.hparams = {"rescale_sum": "tensor_means"}
emr.needs_base = True
emr.keeps = "one task vector + a bit mask and a scalar per task"
registry.register(emr)


@jax.jit
def _stitch(base, models, masks):
    def leaf(b, *rest):
        if not is_float(b):
            return b
        k = len(rest) // 2
        xs, ms = rest[:k], rest[k:]
        bf = b.astype(jnp.float32)
        total = functools.reduce(jnp.add, (jnp.where(m, x.astype(jnp.float32) - bf, 0.0)
                                           for x, m in zip(xs, ms)))
        count = functools.reduce(jnp.add, (m.astype(jnp.float32) for m in ms))
        return (bf + total / jnp.maximum(count, 1.0)).astype(b.dtype)
    return jax.tree.map(leaf, base, *models, *masks)


def stitch(base: PyTree, models: Sequence[PyTree], masks: Sequence[PyTree]) -> PyTree:
    """Localize-and-Stitch's stitching (He et al. 2024, arXiv 2408.13656): each entry is
    ``theta_0`` plus the mean of the task vectors of the tasks whose mask selects it
    (``theta_0`` where none does). ``masks[t]`` is a boolean pytree like ``models[t]``
    (non-floating leaves are ignored; give any placeholder there, e.g. True).

    Example::

        masks = [mergejax.learn_masks(base, ft, loss_fn, batches).mask for ft in fts]
        merged = mergejax.stitch(base, [ft_a, ft_b], masks)
    """
    models, masks = list(models), list(masks)
    if len(masks) != len(models):
        raise MergeError(f"stitch: got {len(masks)} masks for {len(models)} models")
    if not models:
        raise MergeError("stitch: models is empty; give at least one model")
    check_compatible(base, models)
    base_leaves = jax.tree.leaves(base)
    checked = []
    for t, m in enumerate(masks):
        try:
            leaves = jax.tree.structure(base).flatten_up_to(m)
        except (ValueError, TypeError) as e:
            raise MergeError(f"stitch: masks[{t}] does not have the models' structure: {e}"
                             ) from None
        leaves = [jnp.asarray(x, bool) if is_float(b) else b
                  for x, b in zip(leaves, base_leaves)]
        for x, b in zip(leaves, base_leaves):
            if is_float(b) and x.shape != b.shape:
                raise MergeError(f"stitch: masks[{t}] has shape {x.shape} where the model "
                                 f"has {b.shape}")
        checked.append(jax.tree.structure(base).unflatten(leaves))
    return _stitch(base, models, checked)


# ---------------------------------------------------------------------------------------
# SCE, Model Tailor, PCB: leaf kernels.


def _check_sce(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        if not 0.0 <= s["density"] <= 1.0:
            raise MergeError(f"density (select_topk) must be in [0, 1], got "
                             f"{s['density']!r} at '{path}'")


@leafwise("sce", family="sparse",
          paper="FuseChat 2 (arXiv 2408.07990); mergekit sce", coefficients=("scale",),
          min_models=1, validate=_check_sce)
def sce(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=1.0,
        density: float = 1.0) -> Array:
    """SCE: Select, Calculate, Erase (mergekit ``sce``), per leaf.

    Select: keep the entries whose variance across the task vectors is among the top
    ``int(density * #nonzero variances)`` (mergekit's ``select_topk``; 1.0 keeps all).
    Calculate: one weight per task, ``mean(tau_k^2)`` over the leaf, normalised to sum 1
    (uniform if they sum to < 1e-6). Erase: keep the entries agreeing with the sign of
    ``sum_k tau_k`` (zero elects +1). Result: ``theta_0 + scale * sum_k w_k m_k tau_k /
    sum_k w_k m_k`` (divisor clamped to >= 1e-6 as current mergekit; ``scale=1`` is
    mergekit, which has none).

    Example::

        merged = mergejax.sce(base, [ft_a, ft_b, ft_c], density=0.3)
    """
    del ctx
    taus = tuple(x - base for x in models)
    if density < 1.0:
        mean = functools.reduce(jnp.add, taus) / len(taus)
        variance = functools.reduce(jnp.add, ((t - mean) ** 2 for t in taus)) / len(taus)
        k = jnp.floor(density * jnp.sum(variance != 0)).astype(jnp.int32)
        threshold = stages.kth_largest(variance, jnp.maximum(k, 1))
        keep = (variance >= threshold) & (k > 0)
        taus = tuple(jnp.where(keep, t, 0.0) for t in taus)
    energy = jnp.stack([jnp.mean(t * t) for t in taus])
    total = jnp.sum(energy)
    w = jnp.where(total < 1e-6, 1.0 / len(taus), energy / jnp.where(total < 1e-6, 1.0, total))
    sign = stages.elect_sign(taus, "mass")
    agree = tuple(jnp.sign(t) == sign for t in taus)
    numerator = functools.reduce(jnp.add, (jnp.where(a, w[k] * t, 0.0)
                                           for k, (t, a) in enumerate(zip(taus, agree))))
    divisor = functools.reduce(jnp.add, (jnp.where(a, w[k], 0.0) for k, a in enumerate(agree)))
    return base + scale * numerator / jnp.maximum(divisor, 1e-6)


def _check_tailor(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        stages.check_density(path, s["density"])
        if not (isinstance(s["block_size"], int) and s["block_size"] > 0):
            raise MergeError(f"block_size must be a positive int, got {s['block_size']!r} "
                             f"at '{path}'")
        if not 0.0 <= s["salience_weight"] <= 1.0:
            raise MergeError(f"salience_weight must be in [0, 1], got "
                             f"{s['salience_weight']!r} at '{path}'")


def _row_zscore(x: Array) -> Array:
    """z-score along the last axis (unbiased std, as torch.std), NaN-padded entries
    ignored."""
    n = jnp.sum(~jnp.isnan(x), axis=-1, keepdims=True)
    mean = jnp.nansum(x, axis=-1, keepdims=True) / n
    var = jnp.nansum((x - mean) ** 2, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
    return (x - mean) / jnp.sqrt(var)


def tailor_mask(tau: Array, finetuned: Array, *, density: float, block_size: int,
                salience_weight: float, axis: int) -> Array:
    """Model Tailor's data-free patch mask of one leaf (see `model_tailor`)."""
    moved = jnp.moveaxis(tau, axis, -1) if tau.ndim >= 2 else tau.reshape(1, -1)
    ft = jnp.moveaxis(finetuned, axis, -1) if tau.ndim >= 2 else finetuned.reshape(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    ft_rows = ft.reshape(-1, ft.shape[-1])
    n = rows.shape[-1]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n

    def blocked(x):  # (rows, n) -> (blocks, rows, block_size), NaN padded
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=jnp.nan)
        return x.reshape(x.shape[0], blocks, block_size).transpose(1, 0, 2)

    score = (salience_weight * _row_zscore(blocked(jnp.abs(rows)))
             + (1.0 - salience_weight) * _row_zscore(blocked(ft_rows * ft_rows)))
    score = jnp.nan_to_num(score, nan=0.0)  # constant rows: z-score 0/0
    valid = np.full((blocks,), rows.shape[0] * block_size)
    valid[-1] = rows.shape[0] * (n - (blocks - 1) * block_size)
    flat = score.reshape(blocks, -1)
    order = jnp.sort(jnp.where(jnp.isnan(blocked(rows)).reshape(blocks, -1), jnp.inf, flat),
                     axis=-1)
    index = np.floor(valid * (1.0 - density)).astype(np.int32)
    threshold = jnp.take_along_axis(order, jnp.asarray(np.minimum(index, valid - 1))[:, None],
                                    axis=-1)
    keep = (flat > threshold) if density < 1.0 else jnp.ones_like(flat, bool)
    keep = keep.reshape(blocks, rows.shape[0], block_size).transpose(1, 0, 2)
    keep = keep.reshape(rows.shape[0], -1)[:, :n]
    if tau.ndim < 2:
        return keep.reshape(tau.shape)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


@leafwise("model_tailor", family="sparse",
          paper="Zhu et al. 2024, Model Tailor (arXiv 2402.12048)",
          coefficients=("weights", "scale"), per_model=("weights",), validate=_check_tailor)
def model_tailor(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
                 scale=1.0, density: float = 0.1, block_size: int = 128,
                 salience_weight: float = 0.8, axis: int = -1) -> Array:
    """Model Tailor, data-free: keep each task's most important fine-tuned entries (its
    "patch"), revert the rest to the pretrained value, and add the patches.

    Importance, per block of ``block_size`` consecutive entries along ``axis`` (the
    input dimension of PyTorch ``(out, in)`` weights, i.e. ``axis=0`` for a Flax
    ``(in, out)`` kernel), z-scored per row within the block: ``salience_weight *
    z(|tau|) + (1 - salience_weight) * z(theta_ft^2)``. The second term is the paper's
    sensitivity ``theta^2 / [H^-1]_jj^2`` with the Hessian taken as the identity (no
    data), and the paper's compensation step vanishes with it. Within each block the
    entries above the ``(1 - density)`` quantile are kept (the code's default keeps 10%).
    The official code is data-driven and single-task; with several models the patches
    are combined by task arithmetic: ``theta_0 + scale * sum_k w_k mask_k tau_k``.

    Example::

        merged = mergejax.model_tailor(base, [ft_a, ft_b], density=0.1, axis=0)
    """
    del ctx
    out = functools.reduce(jnp.add, (
        weights[k] * jnp.where(tailor_mask(x - base, x, density=density,
                                           block_size=block_size,
                                           salience_weight=salience_weight, axis=axis),
                               x - base, 0.0)
        for k, x in enumerate(models)))
    return base + scale * out


_PCB_PAPER = "Du et al. 2024, Parameter Competition Balancing / PCB-Merging (arXiv 2410.02396)"


def _pcb_clip_ranks(size: int, clip: float) -> tuple[int, int]:
    """Descending ranks of the clip bounds: the code's ascending indices ``int(D c)`` and
    ``int(D (1 - c) - 1)`` of the sorted magnitudes."""
    return size - int(size * clip), size - int(size * (1.0 - clip) - 1)


def _pcb_floor_rank(size: int, density: float) -> int:
    """Descending rank of the score floor (the code's ascending index ``int(D (1 - r))``)."""
    return size - int(size * (1.0 - density))


def _pcb_size(ctx: LeafContext, x: Array, scope: str) -> int:
    return ctx.total_size if scope == "global" else x.size


def _pcb_bounds(ctx: LeafContext, taus, ranks, scope: str, offset: int) -> list[list[Array]]:
    """Per task, the thresholds at ``ranks`` (model-wide from the four selection passes
    at ``ctx.stats[offset:]``, or per leaf)."""
    if scope == "global":
        th = stages.global_thresholds(ctx, ranks, len(taus), offset)
    else:
        th = stages.select_thresholds(tuple(taus), ranks)
    return [[th[i, k] for i in range(len(ranks))] for k in range(len(taus))]


def _pcb_scores(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, clip: float,
                scope: str, negated: bool = False):
    """Clipped task vectors and balancing scores ``intra * inter`` of one leaf.

    ``negated`` computes from ``base - x`` (the same scores; the statistics passes use it
    so that XLA does not share their intermediates with the merge's)."""
    taus = tuple(base - x if negated else x - base for x in models)
    size = _pcb_size(ctx, base, scope)
    clip_ranks = _pcb_clip_ranks(size, clip)
    bounds = _pcb_bounds(ctx, tuple(jnp.abs(t) for t in taus), clip_ranks, scope, 0)
    total = functools.reduce(jnp.add, taus)
    clipped, scores = [], []
    for t, (lo, hi) in zip(taus, bounds):
        a = jnp.clip(jnp.abs(t), lo, hi)
        span = hi - lo
        normalized = jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 0.0)
        intra = jnp.exp(len(taus) * normalized ** 2)
        inter = jnp.tanh(t * total)
        clipped.append(jnp.sign(t) * a)
        scores.append(intra * inter)
    return tuple(clipped), tuple(scores)


def _pcb_passes():
    def clip_ranks(ctx, *, scope, clip, **_):
        return _pcb_clip_ranks(ctx.total_size, clip) if scope == "global" else ()

    def floor_ranks(ctx, *, scope, density, **_):
        return (_pcb_floor_rank(ctx.total_size, density),) if scope == "global" else ()

    def is_global(*, scope, **_):
        return scope == "global"

    magnitudes = stages.global_threshold_passes(
        lambda ctx, base, models, **hp: tuple(jnp.abs(base - x) for x in models), clip_ranks,
        is_global)
    scores = lambda ctx, base, models, *, clip, scope, **_: _pcb_scores(  # noqa: E731
        ctx, base, models, clip=clip, scope=scope, negated=True)[1]
    floors = stages.global_threshold_passes(scores, floor_ranks, is_global)

    def top(ctx, acc, base, models, **hp):
        part = _pcb_top(scores(ctx, base, models, **hp))
        return part if acc is None else jnp.maximum(acc, part)

    tops = StatisticsPass(top, active=is_global, init=lambda ctx, num_models, **_: np.full(
        (num_models,), -np.inf, np.float32))
    return magnitudes + floors + (tops,)


def _pcb_top(scores: tuple[Array, ...]) -> Array:
    """Each task's largest score (the rank-1 threshold, by one fused float reduction: the
    top-k passes' windows around a sample's estimate miss the maximum, and their exact
    fallback passes compiled and ran for every leaf). A zero maximum may come as -0.0
    here where the top-k passes give 0.0; the merge does not depend on the zero's sign."""
    return jnp.stack([jnp.max(b) for b in scores])


def _check_pcb(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        stages.check_density(path, s["density"])
        if not 0.0 <= s["clip"] < 0.5:
            raise MergeError(f"clip must be in [0, 0.5), got {s['clip']!r} at '{path}'")
        if s["scope"] not in ("global", "tensor"):
            raise MergeError(f"scope must be 'global' or 'tensor', got {s['scope']!r} "
                             f"at '{path}'")
    if len({(s["density"], s["clip"]) for s in statics if s["scope"] == "global"}) > 1:
        raise MergeError("scope='global' ranks over the whole model, so density and clip "
                         "must be the same for every leaf; use scope='tensor' for per-leaf "
                         "values")


@leafwise("pcb", family="sparse", paper=_PCB_PAPER, coefficients=("weights", "scale"),
          per_model=("weights",), statistics=_pcb_passes(), validate=_check_pcb)
def pcb(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
        scale=1.0, density: float = 0.1, clip: float = 0.0001,
        scope: str = "global") -> Array:
    """PCB-Merging: balance parameter competition within and across tasks, drop the
    low scores, and merge with the scores as weights (the official ``PCB_merge``).

    Per task, over the whole model (``scope="global"``, the code) or per leaf:

    1. clip ``|tau_t|`` to its ``clip`` and ``1 - clip`` quantiles (the code's index
       quantiles of the sorted magnitudes): ``a_t``; ``tilde_tau_t = sign(tau_t) a_t``;
    2. intra-balancing ``exp(K * minmax(a_t)^2)``, inter-balancing
       ``tanh(tau_t * sum_j tau_j)``, score ``b_t`` their product;
    3. ``s_t = minmax(max(b_t, q_t))`` where ``q_t`` is the ``1 - density`` quantile of
       ``b_t``: all but the top ``density`` become 0, the largest 1;
    4. ``theta_0 + scale * sum_t w_t tilde_tau_t s_t / max(sum_t s_t, 1e-12)``.

    The code has no guard for a constant task vector (min-max 0/0); here it scores 0.
    The official vision script uses ``clip=0.01``, ``density=0.05`` and ``scale=1.2``
    (or searches per-task weights in [0.8, 1.3]); mergekit's ``pcb`` is a different,
    per-tensor softmax variant.

    Example::

        merged = mergejax.pcb(base, [ft_a, ft_b, ft_c], density=0.05, clip=0.01)
    """
    clipped, scores = _pcb_scores(ctx, base, models, clip=clip, scope=scope)
    size = _pcb_size(ctx, base, scope)
    floors = _pcb_bounds(ctx, scores, (_pcb_floor_rank(size, density),), scope, 4)
    tops = ctx.stats[8] if scope == "global" else _pcb_top(scores)
    weighted, total = [], []
    for k, (t, b, (floor,), top) in enumerate(zip(clipped, scores, floors, tops)):
        span = top - floor
        s = jnp.where(span > 0, (jnp.maximum(b, floor) - floor) / jnp.where(span > 0, span,
                                                                            1.0), 0.0)
        weighted.append(weights[k] * t * s)
        total.append(s)
    merged = functools.reduce(jnp.add, weighted) / jnp.maximum(functools.reduce(jnp.add, total),
                                                               1e-12)
    return base + scale * merged
