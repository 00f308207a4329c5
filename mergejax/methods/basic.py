"""Basic and weighted merges: averages, task arithmetic, spherical interpolation.

Every function here is a `MergeMethod`: call it as ``method(base, models, **hparams)``.
Coefficients (``weights``, ``scale``, ``t``) are traced: sweeping them never recompiles and
``jax.grad`` flows through them. Norms and angles are taken per leaf over the whole
flattened tensor, as mergekit does, so a Flax ``(in, out)`` kernel and its PyTorch
``(out, in)`` transpose give transposed results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mergejax.method import REQUIRED, LeafContext, fused_reduce, leafwise
from mergejax.tree import MergeError

__all__ = [
    "karcher",
    "linear",
    "metagpt",
    "model_stock",
    "multislerp",
    "nearswap",
    "slerp",
    "task_arithmetic",
]

Array = jax.Array


def weighted_sum(weights: Array, xs: tuple[Array, ...]) -> Array:
    """``sum_k weights[k] * xs[k]``, unrolled over K so that XLA fuses it into one loop."""
    return functools.reduce(jnp.add, (weights[k] * x for k, x in enumerate(xs)))


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x))


def _dot_and_norms(v0: Array, v1: Array) -> tuple[Array, Array, Array]:
    """``(<v0, v1>, |v0|, |v1|)`` in one pass (`fused_reduce`): three separate sums would
    write both float32 upcasts of bfloat16 leaves out first (a 5632x2048 bfloat16 slerp:
    ~46 ms; 9.6 ms fused by whole rows, 4.7 ms by 8 rows). A norm's derivative at a zero
    tensor is 0 (finite gradients)."""
    dot, sq0, sq1 = fused_reduce((v0 * v1, v0 * v0, v1 * v1), ("sum",) * 3)
    def norm(sq):
        positive = sq > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)

    return dot, norm(sq0), norm(sq1)


def _guarded_divisor(total: Array, tiny: float) -> Array:
    """``total``, or 1 where ``|total| < tiny`` (mergekit's guard against dividing by 0)."""
    return jnp.where(jnp.abs(total) < tiny, jnp.ones_like(total), total)


@leafwise("linear", family="basic", paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
          coefficients=("weights",), per_model=("weights",), needs_base=False,
          reshape_invariant=True)
def linear(ctx: LeafContext, base: Array | None, models: tuple[Array, ...], *,
           weights=None, normalize: bool = True) -> Array:
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (a uniform soup when ``weights``
    is None). With ``normalize=False`` the weighted sum itself. The base is not averaged
    (as mergekit's ``linear``); it only supplies non-floating leaves and dtypes when given.

    Matches mergekit ``linear`` (``normalize`` defaults to True there too). Weights that
    sum to zero divide by zero, as in mergekit; the finiteness check then raises.

    Example::

        soup = mergejax.linear(None, [ft_a, ft_b, ft_c])
    """
    del ctx, base
    total = weighted_sum(weights, models)
    if normalize:
        total = total / jnp.sum(weights)
    return total


@leafwise("task_arithmetic", family="basic",
          paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
          coefficients=("weights", "scale"), per_model=("weights",), reshape_invariant=True)
def task_arithmetic(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                    weights=None, scale=1.0, normalize: bool = False) -> Array:
    """``theta_0 + scale * sum_i w_i (theta_i - theta_0)``.

    Negative weights forget a task (negation); signed weights give analogies
    (``tau_c + (tau_b - tau_a)``). ``normalize=True`` divides the sum by ``sum_i w_i``.
    Matches mergekit ``task_arithmetic`` (``lambda`` is ``scale``; ``normalize`` default
    False) and FusionBench ``task_arithmetic`` (``scaling_factor`` is ``scale``).

    Example::

        merged = mergejax.task_arithmetic(base, [ft_a, ft_b], scale=0.3)
        forgotten = mergejax.task_arithmetic(base, [ft_toxic], weights=[-1.0])
    """
    del ctx
    delta = weighted_sum(weights, tuple(x - base for x in models))
    if normalize:
        delta = delta / _guarded_divisor(jnp.sum(weights), 1e-8)
    return base + scale * delta


def slerp_arrays(t: Array, v0: Array, v1: Array, *, parallel_threshold: float = 0.9995,
                 eps: float = 1e-8) -> Array:
    """Spherical interpolation between two arrays (mergekit's ``slerp``).

    The angle is that of the normalised copies (a norm ``<= eps`` is left unnormalised),
    whose dot product is computed as ``<v0, v1> / (|v0| |v1|)``: mergekit's value up to
    rounding, without two normalised copies (~20% faster on XLA:CPU). The result combines
    the *unnormalised* arrays. When ``|cos| > parallel_threshold`` it falls back to
    ``lerp``. Written so that gradients stay finite in both branches.
    """
    dot, n0, n1 = _dot_and_norms(v0, v1)
    dot = dot / (jnp.where(n0 > eps, n0, 1.0) * jnp.where(n1 > eps, n1, 1.0))
    parallel = jnp.abs(dot) > parallel_threshold
    theta0 = jnp.arccos(jnp.where(parallel, 0.0, dot))
    sin0 = jnp.where(parallel, 1.0, jnp.sin(theta0))
    s0 = jnp.sin(theta0 - theta0 * t) / sin0
    s1 = jnp.sin(theta0 * t) / sin0
    return jnp.where(parallel, (1.0 - t) * v0 + t * v1, s0 * v0 + s1 * v1)


@leafwise("slerp", family="basic", paper="Shoemake 1985; mergekit slerp",
          coefficients=("t",), needs_base=False, max_models=2, reshape_invariant=True)
def slerp(ctx: LeafContext, base: Array | None, models: tuple[Array, ...], *,
          t=0.5, parallel_threshold: float = 0.9995, eps: float = 1e-8) -> Array:
    """Spherical linear interpolation, ``t=0`` at the first endpoint, ``t=1`` at the second.

    * one model: from ``base`` to ``models[0]`` (mergekit: ``base_model`` is ``t=0``);
    * two models, ``base=None``: from ``models[0]`` to ``models[1]``;
    * two models and a base: between the task vectors ``models[i] - base``, added back
      to the base.

    Angles are per leaf over the flattened tensor; nearly parallel leaves
    (``|cos| > parallel_threshold``) are interpolated linearly, as in mergekit.
    ``t`` may differ per leaf (`mergejax.LayerGradient`, path rules).

    Example::

        merged = mergejax.slerp(base, [ft], t=mergejax.LayerGradient([0.0, 0.5, 1.0]))
    """
    if len(models) == 1:
        if base is None:
            raise MergeError(f"slerp with one model interpolates from the base; "
                             f"got base=None at '{ctx.path}'")
        return slerp_arrays(t, base, models[0], parallel_threshold=parallel_threshold, eps=eps)
    if base is None:
        return slerp_arrays(t, models[0], models[1], parallel_threshold=parallel_threshold,
                            eps=eps)
    return base + slerp_arrays(t, models[0] - base, models[1] - base,
                               parallel_threshold=parallel_threshold, eps=eps)


@leafwise("nearswap", family="basic", paper="mergekit nearswap",
          coefficients=("t",), min_models=1, max_models=1)
def nearswap(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, t=REQUIRED) -> Array:
    """Takes the fine-tuned value where it is within ``t`` of the base, and moves only
    ``t`` toward it elsewhere: ``w = clip(t / max(|base - theta|, 1e-6), 0, 1)``,
    ``w * theta + (1 - w) * base``. ``t`` is a closeness threshold, not an interpolation
    factor. Matches mergekit ``nearswap`` (its current rule; older releases differ only
    where ``0 < |base - theta| < 1e-6``).

    Example::

        merged = mergejax.nearswap(base, [ft], t=1e-4)
    """
    del ctx
    other = models[0]
    w = jnp.clip(t / jnp.maximum(jnp.abs(base - other), 1e-6), 0.0, 1.0)
    return w * other + (1.0 - w) * base


def _relative(base: Array | None, models: tuple[Array, ...]) -> tuple[Array, ...]:
    return models if base is None else tuple(x - base for x in models)


def _restore(base: Array | None, x: Array) -> Array:
    return x if base is None else base + x


@leafwise("multislerp", family="basic", paper="mergekit multislerp (spherical weighted mean)",
          coefficients=("weights",), per_model=("weights",), needs_base=False)
def multislerp(ctx: LeafContext, base: Array | None, models: tuple[Array, ...], *,
               weights=None, normalize_weights: bool = True, eps: float = 1e-8) -> Array:
    """Spherical weighted mean of N models (of their task vectors when a base is given).

    Unit vectors are averaged, projected onto the tangent space at their normalised mean,
    averaged there with the weights, mapped back by the exponential map, and rescaled by
    the weighted mean norm. Matches mergekit ``multislerp``. Where the mean of the unit
    vectors vanishes (antipodal inputs) the weighted linear combination is returned:
    mergekit does this for two models and raises for more.

    Example::

        merged = mergejax.multislerp(base, [ft_a, ft_b, ft_c], weights=[1.0, 1.0, 2.0])
    """
    del ctx
    if len(models) == 1:
        return models[0]
    vs = _relative(base, models)
    w = weights / jnp.sum(weights) if normalize_weights else weights
    norms = jnp.stack([_norm(v) for v in vs])
    units = tuple(v / (n + eps) for v, n in zip(vs, norms))
    mean = weighted_sum(w, units)
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    tangents = tuple(u - jnp.sum(u * mean) * mean for u in units)
    tangent_mean = weighted_sum(w, tangents)
    tangent_norm = _norm(tangent_mean) + eps
    on_sphere = mean * jnp.cos(tangent_norm) + tangent_mean * (jnp.sin(tangent_norm)
                                                               / tangent_norm)
    result = jnp.where(degenerate, weighted_sum(w, vs), on_sphere * jnp.sum(norms * w))
    return _restore(base, result)


@leafwise("karcher", family="basic", paper="Karcher 1977 (Riemannian mean); mergekit karcher",
          coefficients=("weights",), per_model=("weights",), needs_base=False)
def karcher(ctx: LeafContext, base: Array | None, models: tuple[Array, ...], *,
            weights=None, max_iter: int = 10, tol: float = 1e-5) -> Array:
    """Karcher (Riemannian) mean on the unit sphere, rescaled by the weighted mean norm.

    With ``a_i = w_i / sum(w)``: leaves of norm ``<= tol`` are left out of the direction
    (the others' weights renormalised) but still count in the scale ``sum_i a_i ||x_i||``.
    The mean starts at the normalised weighted mean of the unit vectors and takes up to
    ``max_iter`` exponential-map steps along ``sum_i a_i theta_i / sin(theta_i)
    (u_i - cos(theta_i) mu)``, stopping once a step is shorter than ``tol``.

    ``base=None`` with uniform weights is mergekit ``karcher``, which treats a
    ``base_model`` as one more input (pass it in ``models`` to reproduce that); with a
    base, the mean of the task vectors is added to it.

    Example::

        merged = mergejax.karcher(None, [ft_a, ft_b, ft_c])
    """
    del ctx
    if len(models) == 1:
        return models[0]
    vs = _relative(base, models)
    alpha = weights / jnp.sum(weights)
    norms = jnp.stack([_norm(v) for v in vs])
    valid = norms > tol
    a = jnp.where(valid, alpha, 0.0)
    a = a / jnp.where(jnp.sum(a) == 0, 1.0, jnp.sum(a))
    units = tuple(v / jnp.where(valid[k], norms[k], 1.0) for k, v in enumerate(vs))
    start = weighted_sum(a, units)
    start_norm = _norm(start)
    first_valid = weighted_sum(jnp.arange(len(vs)) == jnp.argmax(valid), units)
    mean = jnp.where(start_norm < tol, first_valid,
                     start / jnp.where(start_norm < tol, 1.0, start_norm))

    def step(_, carry):
        mean, done = carry
        tangents = []
        for u in units:
            cos = jnp.clip(jnp.sum(mean * u), -1.0, 1.0)
            theta = jnp.arccos(cos)
            moving = theta >= tol
            factor = jnp.where(moving, theta / jnp.where(moving, jnp.sin(theta), 1.0), 0.0)
            tangents.append(factor * (u - cos * mean))
        update = weighted_sum(a, tuple(tangents))
        update_norm = _norm(update)
        done = done | (update_norm < tol)
        direction = update / jnp.where(update_norm < tol, 1.0, update_norm)
        moved = jnp.cos(update_norm) * mean + jnp.sin(update_norm) * direction
        moved_norm = _norm(moved)
        moved = moved / jnp.where(moved_norm > tol, moved_norm, 1.0)
        return jnp.where(done, mean, moved), done

    mean, _ = lax.fori_loop(0, max_iter, step, (mean, jnp.array(False)))
    result = jnp.where(jnp.any(valid), mean * jnp.sum(alpha * norms), jnp.zeros_like(mean))
    return _restore(base, result)


@leafwise("model_stock", family="basic",
          paper="Jang et al. 2024, Model Stock (arXiv 2403.19522)", min_models=2,
          reshape_invariant=True)
def model_stock(ctx: LeafContext, base: Array, models: tuple[Array, ...]) -> Array:
    """``t * mean_i theta_i + (1 - t) * theta_0`` with ``t = N c / (1 + (N - 1) c)``.

    ``c`` is the mean of the pairwise cosines between the N task vectors of the leaf,
    each ``<tau_i, tau_j> / max(||tau_i|| ||tau_j||, 1e-6)`` clipped to [-1, 1]; where
    ``|1 + (N - 1) c| < 1e-6`` we take ``t = 0``. Matches mergekit ``model_stock`` with
    ``filter_wise: false`` (the paper applies the formula per layer).

    Example::

        merged = mergejax.model_stock(base, [ft_a, ft_b, ft_c])
    """
    del ctx
    taus = tuple(x - base for x in models)
    n = len(taus)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    dots = dict(zip(pairs, fused_reduce(tuple(taus[i] * taus[j] for i, j in pairs),
                                        ("sum",) * len(pairs))))  # one pass for all
    norms = [jnp.sqrt(dots[i, i]) for i in range(n)]
    cosines = [jnp.clip(dots[i, j] / jnp.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
               for i, j in pairs if i < j]
    c = jnp.mean(jnp.stack(cosines))
    denominator = 1.0 + (n - 1) * c
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, n * c / jnp.where(singular, 1.0, denominator))
    average = functools.reduce(jnp.add, models) / n
    return t * average + (1.0 - t) * base


def check_scope(paths: list[str], statics: list[dict]) -> None:
    """`leafwise` validator: ``scope`` is "global" or "tensor" at every leaf."""
    for path, static in zip(paths, statics):
        if static["scope"] not in ("global", "tensor"):
            raise MergeError(f"scope must be 'global' or 'tensor', got {static['scope']!r} "
                             f"at '{path}'")


def _squared_norms(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                   scope: str) -> Array | None:
    del ctx
    if scope != "global":
        return None
    # base - x, not x - base: sharing the kernel's x - base would keep every leaf's task
    # vectors alive until the merge (measured: 7 models' worth on a 22M model).
    return jnp.stack(_squares(base, models))


def _squares(base: Array, models: tuple[Array, ...]) -> tuple[Array, ...]:
    """``||x_k - base||^2`` for every model, in one pass (`fused_reduce`)."""
    return fused_reduce(tuple(jnp.square(base - x) for x in models), ("sum",) * len(models))


@leafwise("metagpt", family="basic",
          paper="Zhou et al. 2024, MetaGPT: model exclusive task arithmetic (arXiv 2406.11385)",
          statistics=(_squared_norms,), validate=check_scope, reshape_invariant=True)
def metagpt(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
            scope: str = "global") -> Array:
    """Task arithmetic with closed-form per-task coefficients
    ``lambda_i = ||tau_i||^2 / sum_j ||tau_j||^2``.

    ``scope="global"`` takes the norms over the whole model (one lambda per task, the
    paper's model-exclusive form; a global reduction over all leaves), ``"tensor"`` per
    leaf. Where every task vector is zero the base is returned.

    Example::

        merged = mergejax.metagpt(base, [ft_a, ft_b, ft_c])
    """
    taus = tuple(x - base for x in models)
    sq = ctx.stats[0] if scope == "global" else jnp.stack(_squares(base, models))
    total = jnp.sum(sq)
    lam = sq / jnp.where(total > 0, total, 1.0)
    return base + weighted_sum(lam, taus)
