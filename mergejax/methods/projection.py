"""Projection-based data-free merges: DOGE and DOP, each a small optimisation per matrix.

Both run an optax Adam loop inside the leaf kernel (`jax.lax.fori_loop`), on the
PyTorch ``(out, in)`` view of each matrix leaf (`matrices.torch_view`, switched by
``kernel_layout``), so that a Flax ``(in, out)`` kernel and its transpose give transposed
results. Which leaves are matrices is `matrices.matrix_split` (``matrix_split="auto"``);
the others follow each method's documented rule.

* `doge` (DOGE-TA, Wei et al. 2025): one modification ``Delta`` shared by all tasks is
  fitted to a data-free surrogate of the gap between the merged and the expert models,
  with its gradients kept orthogonal to a shared subspace of the task vectors
  (`shared_subspace`); tasks are combined with norm-normalised coefficients.
* `dop` (Yang et al. 2025): the merged matrix is fitted to every model inside that
  model's own singular subspaces (both sides: "dual projections"), the per-model losses
  balanced by MGDA (`min_norm_weights`), models merged one at a time (continual).

The learning rate (and DOGE's ``scale``) are traced coefficients: sweeping them does not
recompile.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mergejax.method import LeafContext, StatisticsPass, leafwise
from mergejax.methods import matrices, stages
from mergejax.rules import is_finite_number
from mergejax.tree import MergeError

__all__ = ["doge", "dop", "min_norm_weights", "shared_subspace"]

Array = jax.Array


# ------------------------------------------------------------------------------- MGDA


def _min_norm_pair(v11: Array, v12: Array, v22: Array, clamp: bool) -> tuple[Array, Array]:
    """``(gamma, cost)``: the weight on ``x1`` minimising ``|gamma x1 + (1-gamma) x2|^2``
    given the inner products, and that minimum. ``clamp`` reproduces Sener and Koltun's
    solver, which returns 0.999 / 0.001 instead of the vertices 1 / 0."""
    hi, lo = (0.999, 0.001) if clamp else (1.0, 0.0)
    denominator = v11 + v22 - 2.0 * v12
    inner = (v22 - v12) / jnp.where(denominator > 0, denominator, 1.0)
    first, second = v12 >= v11, v12 >= v22
    gamma = jnp.where(first, hi, jnp.where(second, lo, inner))
    cost = jnp.where(first, v11, jnp.where(second, v22, v22 + inner * (v12 - v22)))
    return gamma, cost


def min_norm_weights(gram: Array, *, iters: int = 50) -> Array:
    """MGDA weights: the point ``w`` of the simplex minimising ``|sum_i w_i g_i|^2``, from
    the Gram matrix ``gram[i, j] = <g_i, g_j>`` of K gradients (Sener and Koltun 2018,
    Multi-task learning as multi-objective optimization, arXiv 1810.04650).

    Two gradients: the closed form of Sener and Koltun's ``MinNormSolver`` (used by
    FusionBench's DOP), including its quirk of returning 0.999 / 0.001 where the optimum
    is a vertex. More: the best pair by that closed form, then ``iters`` Frank-Wolfe
    steps with exact line search (no clamping), as their ``find_min_norm_element_FW``
    without the early stop. One gradient: ``[1.0]``.

    Example::

        w = min_norm_weights(jnp.array([[2.0, 0.5], [0.5, 1.0]]))  # [0.25, 0.75]
    """
    k = gram.shape[-1]
    if k == 1:
        return jnp.ones((1,), gram.dtype)
    rows, cols = np.triu_indices(k, 1)
    gammas, costs = _min_norm_pair(gram[rows, rows], gram[rows, cols], gram[cols, cols],
                                   clamp=k == 2)
    best = jnp.argmin(costs)  # the first minimum, as the reference's strict ``<``
    eye = jnp.eye(k, dtype=gram.dtype)
    start = (gammas[best] * eye[jnp.asarray(rows)[best]]
             + (1.0 - gammas[best]) * eye[jnp.asarray(cols)[best]])
    if k == 2:
        return start

    def step(_, w):
        g = gram @ w
        t = jnp.argmin(g)
        gamma, _ = _min_norm_pair(w @ g, g[t], gram[t, t], clamp=False)
        return gamma * w + (1.0 - gamma) * eye[t]

    return lax.fori_loop(0, iters, step, start)


# ------------------------------------------------------------------------------- DOGE


def shared_subspace(taus: Array, subspace: float) -> Array:
    """DOGE's shared subspace of K task matrices ``taus (K, p, q)`` (PyTorch ``(out, in)``
    views): an orthonormal basis ``(p, k)`` of output directions, some columns zero.

    With ``n = min(p, q)``, each task contributes its top ``n // K`` left singular
    vectors; the top ``int(n / subspace)`` left singular vectors of those stacked columns
    are the basis (FusionBench ``DOGE_TA_Algorithm``). Directions the reference leaves
    arbitrary are dropped (their columns are zero): singular vectors of zero singular
    values, and ranks beyond what the stacked columns span.

    Example::

        basis = shared_subspace(jnp.stack([tau_a, tau_b]), subspace=6)
        projected = g - basis @ (basis.T @ g)  # the part DOGE lets Delta move along
    """
    k_tasks, p, q = taus.shape
    n = min(p, q)
    per_task, keep = n // k_tasks, int(n / subspace)
    if per_task == 0 or keep == 0:
        return jnp.zeros((p, 0), taus.dtype)
    u, s, _ = matrices.svd(taus)
    eps = jnp.finfo(taus.dtype).eps
    live = s[:, :per_task] > max(p, q) * eps * s[:, :1]
    columns = u[:, :, :per_task] * live[:, None, :]
    stacked = jnp.swapaxes(columns, 0, 1).reshape(p, k_tasks * per_task)
    ub, sb, _ = matrices.svd(stacked)
    keep = min(keep, ub.shape[-1])
    return ub[:, :keep] * (sb[:keep] > max(stacked.shape) * eps * sb[0])


def _doge_delta(taus: Array, lam: Array, lr: Array, steps: int, subspace: float) -> Array:
    """The shared modification after ``steps`` Adam steps on DOGE's data-free loss
    ``sum_j |rowsum(tau_j * (tau_j - M))|^2``, ``M = sum_i lam_i (tau_i + Delta)``, from
    ``Delta = 0``, each gradient projected off `shared_subspace`."""
    basis = shared_subspace(taus, subspace)
    total = jnp.sum(lam)
    anchor = jnp.einsum("k,kpq->pq", lam, taus)

    def grad(delta):
        rows = jnp.sum(taus * (taus - anchor - total * delta), axis=-1)  # (K, p)
        g = -2.0 * total * jnp.einsum("kp,kpq->pq", rows, taus)
        return g - basis @ (basis.T @ g)

    opt = optax.adam(lr)
    delta = jnp.zeros(taus.shape[1:], taus.dtype)

    def step(_, carry):
        delta, state = carry
        updates, state = opt.update(grad(delta), state, delta)
        return optax.apply_updates(delta, updates), state

    delta, _ = lax.fori_loop(0, steps, step, (delta, opt.init(delta)))
    return delta


def _count_matrices() -> StatisticsPass:
    """``(entries, paths)`` of the matrix leaves: DOGE's global top-k ranks them only.
    Python values, fixed at trace time from the shapes (the rank must be static). The
    paths are ``ctx.path`` as every pass sees it (layer numbers as ``#`` when the passes
    run leaf by leaf), which `_doge_magnitudes` looks up: its values are strided slices in
    the sample pass, so it cannot decide from the leaf's shape itself."""
    def update(ctx, acc, base, models, *, matrix_split, **hp):
        size, paths = acc if acc is not None else (0, frozenset())
        if matrices.matrix_split(ctx.path, base.shape, matrix_split) is None:
            return size, paths
        return size + base.size, paths | {ctx.path}

    return StatisticsPass(update)


def _doge_ranks(ctx: LeafContext, density: float, scope: str) -> tuple[int, ...]:
    if scope != "global":
        return ()
    return (stages.topk_rank(density, ctx.stats[0][0], "fusionbench"),)


def _doge_magnitudes(ctx: LeafContext, base: Array, models: tuple[Array, ...],
                     **hp: Any) -> tuple[Array, ...]:
    """``|tau_k|`` of a matrix leaf; zeros for the others, which rank below every kept
    entry (their count keeps the passes' sample consistent with ``ctx.total_size``)."""
    if ctx.path in ctx.stats[0][1]:
        return tuple(jnp.abs(base - x) for x in models)
    return tuple(jnp.zeros_like(base) for _ in models)


_DOGE_STATS = (_count_matrices(),) + stages.global_threshold_passes(
    _doge_magnitudes, lambda ctx, *, density, scope, **hp: _doge_ranks(ctx, density, scope),
    lambda *, scope, **hp: scope == "global")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)




def _check_choice(path: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise MergeError(f"{name} must be one of {allowed}, got {value!r} at '{path}'")


def _check_steps(path: str, steps: Any) -> None:
    if not (_is_int(steps) and steps >= 0):
        raise MergeError(f"steps must be an int >= 0, got {steps!r} at '{path}'")


def _check_doge(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        _check_steps(path, s["steps"])
        subspace = s["subspace"]
        if not (is_finite_number(subspace) and subspace >= 1 and not math.isnan(subspace)):
            raise MergeError(f"subspace must be a number >= 1 (the shared subspace keeps "
                             f"min(p, q) / subspace directions), got {subspace!r} at "
                             f"'{path}'")
        stages.check_density(path, s["density"])
        _check_choice(path, "scope", s["scope"], ("global", "tensor"))
        _check_choice(path, "nonmatrix", s["nonmatrix"], ("base", "mean"))
        matrices.check_layout(s["kernel_layout"], path)
    matrices.check_matrix_split(paths, statics)
    if any(s["scope"] == "global" for s in statics) and len(
            {(s["scope"], s["density"]) for s in statics}) > 1:
        raise MergeError("scope='global' ranks magnitudes over the whole model, so scope and "
                         "density must be the same for every leaf; use scope='tensor' for "
                         "per-leaf values")


@leafwise("doge", family="datafree",
          paper="Wei et al. 2025, Modeling multi-task model merging as adaptive projective "
                "gradient descent (arXiv 2501.01230)",
          coefficients=("scale", "lr"), statistics=_DOGE_STATS, validate=_check_doge,
          batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def doge(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=0.07, lr=1e-4,
         steps: int = 400, subspace: float = 6, density: float = 0.3, scope: str = "global",
         nonmatrix: str = "base", kernel_layout: str = "in_out",
         matrix_split: Any = "auto") -> Array:
    """DOGE-TA: ``theta_0 + sum_j lam_j * mask_j * (tau_j + Delta)`` per matrix.

    On the ``(out, in)`` view of each matrix leaf (`matrices.torch_view`):

    * ``lam_j = scale / |tau_j|_F`` (the paper's task-aware coefficients; per leaf, as
      FusionBench's ``compute_layer_lamdas``; 0 for a zero task vector);
    * ``Delta`` (shared by the tasks) starts at 0 and takes ``steps`` Adam steps
      (learning rate ``lr``) on the data-free loss
      ``sum_j |rowsum(tau_j * (tau_j - M))|^2``, ``M = sum_i lam_i (tau_i + Delta)``
      (each output row's inner product with ``tau_j``'s row stands in for the task's
      inputs), every gradient projected onto the orthogonal complement of
      `shared_subspace` (``subspace`` sets its size);
    * ``mask_j`` keeps the entries with ``|tau_j|`` at least the
      ``(int(density * n) + 1)``-th largest of the ``n`` magnitudes of ``tau_j`` over all
      matrix leaves together (``scope="global"``, FusionBench's ``topk_values_mask``) or
      per leaf (``scope="tensor"``); it is applied to ``tau_j + Delta``.

    Leaves that are not matrices keep the base (``nonmatrix="base"``: FusionBench merges
    only encoder weight matrices and copies every other parameter from the pretrained
    model) or take the mean of the models (``"mean"``). With one task the result is
    ``theta_0 + lam * mask * (tau + Delta)``, not the task model: ``lam`` rescales the
    task vector to norm ``scale``.

    Defaults are FusionBench's ``doge_ta.yaml`` for CLIP ViT-B/32 (``lamda=0.07``,
    ``subspace=6``, ``K=30`` as ``density=0.3``) and its code (Adam, ``lr=1e-4``, 400
    steps per layer). FusionBench also restricts matrices to ``encoder`` weights; give
    ``matrix_split=PathRules(...)`` with None for the embeddings to match it.

    Example::

        merged = mergejax.merge("doge", base, [ft_a, ft_b, ft_c], scale=0.07)
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    if split is None:
        if nonmatrix == "base":
            return base
        return functools.reduce(jnp.add, models) / len(models)
    taus = jnp.stack([matrices.torch_view(matrices.as_matrix(x - base, split), kernel_layout)
                      for x in models])
    norms = jnp.sqrt(jnp.sum(taus * taus, axis=(1, 2)))
    lam = jnp.where(norms > 0, scale / jnp.where(norms > 0, norms, 1.0), 0.0)
    delta = _doge_delta(taus, lam, lr, steps, subspace)
    magnitudes = jnp.abs(taus)
    if scope == "global":
        ranks = _doge_ranks(ctx, density, scope)
        thresholds = stages.global_thresholds(ctx, ranks, len(models), offset=1)[0]
    else:
        rank = stages.topk_rank(density, taus[0].size, "fusionbench")
        thresholds = stages.select_thresholds(tuple(magnitudes), (rank,))[0]
    kept = magnitudes >= thresholds.astype(taus.dtype)[:, None, None]
    merged = jnp.einsum("k,kpq->pq", lam, jnp.where(kept, taus + delta, 0.0))
    return base + matrices.from_torch_view(merged, kernel_layout).reshape(base.shape)


# -------------------------------------------------------------------------------- DOP


def _dop_merge(base: Array, xs: Array, weights: Array, lr: Array, *, steps: int, mgda: bool,
               ema: bool, ema_beta: float, svd_epsilon: float, proj_space: str,
               mgda_iters: int) -> Array:
    """One DOP optimisation: the matrix ``W`` near every ``xs[i]`` (``(n, p, q)``) in
    ``tau_i``'s singular subspaces, from the mean of ``xs``; ``weights`` are the fixed
    loss weights without MGDA and the EMA's start with it."""
    u, s, v = matrices.svd(xs - base)
    total = jnp.sum(s, axis=-1, keepdims=True)
    ratio = jnp.cumsum(s, axis=-1) / jnp.where(total > 0, total, 1.0)
    energy = jnp.where((ratio < svd_epsilon) & (total > 0), s * s, 0.0)  # S^2, kept ranks
    scaled_u, scaled_v = u * jnp.sqrt(energy)[:, None, :], v * jnp.sqrt(energy)[:, None, :]
    rank = s.shape[-1]
    # U S^2 U^T D (|S U^T D|^2 = <D, U S^2 U^T D>) and D V S^2 V^T (|D V S|^2 = <D, D V S^2
    # V^T>), through the (p, p) / (q, q) Gram matrices or, where a side is over twice the
    # rank (a 3072 x 768 MLP kernel), through the factors: whichever multiplies less.
    gram_u = (jnp.einsum("npr,nsr->nps", scaled_u, scaled_u)
              if "u" in proj_space and xs.shape[1] <= 2 * rank else None)
    gram_v = (jnp.einsum("nqr,nsr->nqs", scaled_v, scaled_v)
              if "v" in proj_space and xs.shape[2] <= 2 * rank else None)

    def losses_and_grads(w):
        d = w[None] - xs
        h = jnp.zeros_like(d)
        if gram_u is not None:
            h = h + gram_u @ d
        elif "u" in proj_space:
            h = h + scaled_u @ (jnp.swapaxes(scaled_u, 1, 2) @ d)
        if gram_v is not None:
            h = h + d @ gram_v
        elif "v" in proj_space:
            h = h + (d @ scaled_v) @ jnp.swapaxes(scaled_v, 1, 2)
        return jnp.sum(d * h, axis=(1, 2)), 2.0 * h

    opt = optax.adam(lr)
    w = jnp.mean(xs, axis=0)

    def step(_, carry):
        w, state, mix = carry
        losses, grads = losses_and_grads(w)
        if mgda:
            normed = grads / jnp.where(losses > 0, losses, 1.0)[:, None, None]
            sol = min_norm_weights(jnp.einsum("npq,mpq->nm", normed, normed),
                                   iters=mgda_iters)
            mix = ema_beta * mix + (1.0 - ema_beta) * sol if ema else sol
        updates, state = opt.update(jnp.einsum("n,npq->pq", mix, grads), state, w)
        return optax.apply_updates(w, updates), state, mix

    w, _, _ = lax.fori_loop(0, steps, step, (w, opt.init(w), weights.astype(w.dtype)))
    return w


def _check_dop(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        _check_steps(path, s["steps"])
        for name in ("alpha", "ema_beta", "svd_epsilon"):
            value = s[name]
            if not (is_finite_number(value) and 0.0 <= value <= 1.0):
                raise MergeError(f"{name} must be in [0, 1], got {value!r} at '{path}'")
        for name in ("mgda", "ema"):
            if not isinstance(s[name], bool):
                raise MergeError(f"{name} must be True or False, got {s[name]!r} at "
                                 f"'{path}'")
        if not (_is_int(s["mgda_iters"]) and s["mgda_iters"] >= 0):
            raise MergeError(f"mgda_iters must be an int >= 0, got {s['mgda_iters']!r} at "
                             f"'{path}'")
        _check_choice(path, "proj_space", s["proj_space"], ("u", "v", "uv"))
        _check_choice(path, "mode", s["mode"], ("continual", "joint"))
        matrices.check_layout(s["kernel_layout"], path)
    matrices.check_matrix_split(paths, statics)


@leafwise("dop", family="datafree",
          paper="Yang et al. 2025, Continual model merging without data: dual projections "
                "for balancing stability and plasticity (NeurIPS 2025)",
          coefficients=("lr",), validate=_check_dop, batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def dop(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, lr=1e-4,
        steps: int = 200, alpha: float = 0.8, mgda: bool = True, ema: bool = True,
        ema_beta: float = 0.999, svd_epsilon: float = 0.99999, proj_space: str = "uv",
        mode: str = "continual", mgda_iters: int = 50, kernel_layout: str = "in_out",
        matrix_split: Any = "auto") -> Array:
    """DOP, dual orthogonal projections: merged matrices fitted to each model inside that
    model's singular subspaces, the losses balanced by MGDA.

    ``mode="continual"`` (the paper and FusionBench): models arrive in the given order;
    ``m_1 = theta_1``, and ``m_t`` merges ``(m_{t-1}, theta_t)``. Each merge, on the
    ``(out, in)`` view of every matrix leaf, starts at ``W = (m_{t-1} + theta_t) / 2``
    and takes ``steps`` Adam steps (``lr``) on ``sum_i w_i L_i`` with, for ``X_i`` in
    ``(m_{t-1}, theta_t)`` and ``tau_i = X_i - theta_0 = U S V^T``,
    ``L_i = |S_r U_r^T (W - X_i)|^2 + |(W - X_i) V_r S_r|^2`` (``proj_space="uv"``; ``"u"``
    or ``"v"`` keep one term). ``r`` counts the singular values whose cumulative share
    ``cumsum(S) / sum(S)`` is below ``svd_epsilon`` (FusionBench's ``searchsorted``; a
    zero ``tau_i`` adds no loss). The weights ``w``:

    * ``mgda=True``: MGDA each step, `min_norm_weights` of the gradients divided by their
      losses; with ``ema=True`` smoothed, ``w <- ema_beta w + (1 - ema_beta) w_mgda``,
      from ``w = (alpha, 1 - alpha)``;
    * ``mgda=False``: ``(alpha, 1 - alpha)``.

    Leaves that are not matrices take the running mean ``(m_{t-1} + theta_t) / 2`` (as
    FusionBench averages biases, norms and embeddings). ``mode="joint"`` (a mergejax
    variant, not in the paper) optimises one merge of all K models, from their mean, with
    K-task MGDA (``mgda_iters`` Frank-Wolfe steps) and weights starting at ``1/K``
    (``alpha`` unused); non-matrix leaves take the mean. One model returns that model.

    Defaults are FusionBench's ``dop.yaml`` for CLIP ViT-B/32 (``lr=1e-4``, 200 steps,
    ``alpha=0.8``, ``ema_beta=0.999``, ``svd_epsilon=0.99999``, ``"uv"``). FusionBench
    shuffles the model order by default (``shuffle_order: true``); here the order is
    the list's. Only ``"u"`` / ``"v"`` depend on ``kernel_layout``.

    Example::

        merged = mergejax.merge("dop", base, [ft_a, ft_b, ft_c])
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    if split is None:
        if mode == "joint":
            return functools.reduce(jnp.add, models) / len(models)
        return functools.reduce(lambda m, x: (m + x) / 2.0, models)
    settings = {"steps": steps, "mgda": mgda, "ema": ema, "ema_beta": ema_beta,
                "svd_epsilon": svd_epsilon, "proj_space": proj_space, "mgda_iters": mgda_iters}

    def view(x):
        return matrices.torch_view(matrices.as_matrix(x, split), kernel_layout)

    b = view(base)
    xs = jnp.stack([view(x) for x in models])
    if mode == "joint":
        weights = jnp.full((len(models),), 1.0 / len(models), b.dtype)
        out = _dop_merge(b, xs, weights, lr, **settings)
    else:
        weights = jnp.asarray([alpha, 1.0 - alpha], b.dtype)

        def merge_next(merged, x):
            return _dop_merge(b, jnp.stack([merged, x]), weights, lr, **settings), None

        out, _ = lax.scan(merge_next, xs[0], xs[1:])
    return matrices.from_torch_view(out, kernel_layout).reshape(base.shape)
