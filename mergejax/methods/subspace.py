"""Merges in a basis shared by the tasks, per matrix: KnOTS, HO-GSVD, and OPCM (continual).

* `knots` (Stoica et al. 2024): one SVD of the task matrices concatenated along their input
  side, ``[D_1 ... D_K] = U S [V_1 ... V_K]^T``, so every task is a coefficient block
  ``S V_k^T`` on the shared left basis ``U``; the blocks are merged by TIES (or DARE-TIES, or
  summed) and mapped back through ``U``.
* `ho_gsvd`: the higher-order generalized SVD ``D_k = B_k V^T`` with one right basis ``V``
  shared by all tasks (Ponnapalli et al. 2011, in the regularised form of Kempf et al. 2021);
  the per-task coefficient columns are combined direction by direction.
* `opcm` (Tang et al. 2025): models arrive one at a time; each new task matrix loses its
  components on the merged matrix's leading singular directions, and the merged task vector is
  rescaled to the running mean task-vector norm. `opcm_init` / `opcm_update` are the streaming
  form (pure, jit-compiled), equal to the batch method.

Which leaves are matrices is `matrices.matrix_split` (the ``matrix_split`` hyperparameter);
each method documents what it does with the others. Sources and the exact reference behaviour
are in ``notes/refs_subspace.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from mergejax import rules as rules_lib
from mergejax.method import LeafContext, leafwise
from mergejax.methods import matrices, stages
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    full_precision,
    is_float,
)

__all__ = ["OPCMState", "ho_gsvd", "ho_gsvd_factors", "knots", "opcm", "opcm_init",
           "opcm_project", "opcm_update"]

Array = jax.Array

_KNOTS_MERGES = ("ties", "dare_ties", "task_arithmetic")
_KNOTS_DENSITY = {"ties": 0.2, "dare_ties": 0.9, "task_arithmetic": 1.0}
_HO_GSVD_MERGES = ("participation", "select", "mean", "sum")
_SCOPES = ("global", "tensor")


def _choice(path: str, name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MergeError(f"{name} must be one of {tuple(allowed)}, got {value!r} at '{path}'")


def _positive(path: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and np.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise MergeError(f"{name} must be a finite number {bound}, got {value!r} at '{path}'")


def _task_matrices(base: Array, models: tuple[Array, ...], split: int,
                   layout: str) -> Array:
    """``(K, out, in)``: the task matrices in PyTorch orientation."""
    return jnp.stack([matrices.torch_view(matrices.as_matrix(x - base, split), layout)
                      for x in models])


def _to_leaf(m: Array, layout: str, shape: tuple[int, ...]) -> Array:
    return matrices.from_torch_view(m, layout).reshape(shape)


# ---------------------------------------------------------------------------------------
# KnOTS

def _check_knots(paths: list[str], statics: list[dict]) -> None:
    matrices.check_matrix_split(paths, statics)
    for path, s in zip(paths, statics):
        _choice(path, "merge", s["merge"], _KNOTS_MERGES)
        if s["density"] is not None:
            stages.check_density(path, s["density"])
        _choice(path, "elect", s["elect"], ("mass", "count"))
        _choice(path, "disjoint", s["disjoint"], ("mean", "sum"))
        _choice(path, "topk", s["topk"], ("fusionbench", "mergekit"))
        matrices.check_layout(s["kernel_layout"], path)
        rank = s["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or rank < 1):
            raise MergeError(f"rank must be None or a positive int, got {rank!r} at '{path}'")
        _positive(path, "rank_tol", s["rank_tol"], allow_zero=True)


def _consensus(ctx: LeafContext, values: tuple[Array, ...], rank: int | Array, *,
               merge: str, density: float, elect: str, disjoint: str) -> Array:
    """KnOTS's merge of K same-shaped arrays: their sum (``"task_arithmetic"``), or the
    TIES disjoint mean (or sum) of the agreeing entries after keeping the top ``rank``
    magnitudes of each (``"ties"``; ``rank`` static or traced) or a random ``density`` of
    each, rescaled by ``1 / density`` (``"dare_ties"``)."""
    if merge == "task_arithmetic":
        return functools.reduce(jnp.add, values)
    if merge == "ties":
        magnitudes = tuple(jnp.abs(v) for v in values)
        if isinstance(rank, int):
            thresholds = stages.select_thresholds(magnitudes, (rank,))[0]
        else:
            thresholds = jax.vmap(stages.kth_largest, in_axes=(0, None))(
                jnp.stack(magnitudes), rank)
        kept = tuple(jnp.where(m >= thresholds[k], v, 0.0)
                     for k, (v, m) in enumerate(zip(values, magnitudes)))
    else:
        if ctx.key is None:
            raise MergeError("knots with merge='dare_ties' is random: pass "
                             "key=jax.random.key(seed)")
        kept = tuple(stages.rescale_masked(
            v, stages.bernoulli_mask(ctx.key, density, v.shape, stream=k), "density", density)
            for k, v in enumerate(values))
    sign = stages.elect_sign(kept, elect)
    return stages.disjoint_combine(kept, sign, mode=disjoint)


@leafwise("knots", family="spectral",
          paper="Stoica et al. 2024, Model merging with SVD to tie the KnOTS (arXiv 2410.19735)",
          coefficients=("scale",), uses_key="optional", validate=_check_knots,
          batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def knots(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=1.0,
          merge: str = "ties", density: float | None = None, elect: str = "mass",
          disjoint: str = "mean", topk: str = "fusionbench", rank: int | None = None,
          rank_tol: float = 1e-5, kernel_layout: str = "in_out",
          matrix_split: Any = "auto") -> Array:
    """KnOTS: merge the tasks' coefficients in the basis of one joint SVD.

    Per matrix, the K task matrices ``D_k`` (PyTorch ``(out, in)`` orientation, from
    ``kernel_layout``) are concatenated along the input side, ``[D_1 ... D_K] (out, K*in)
    = U diag(s) [V_1 ... V_K]^T``; components with ``s <= rank_tol`` are dropped (and
    beyond the top ``rank`` when given), and task k becomes the block ``C_k = diag(s)
    V_k^T (r, in)`` (the official code's ``s_on_V=True``). The blocks are merged by
    ``merge`` and the result is ``theta_0 + scale * U C_merged`` (in the leaf's layout):

    * ``"ties"``: keep each block's top ``density`` magnitudes (counted over the ``r * in``
      entries of the kept components, ``topk="fusionbench"``: ``|c| >= `` the
      (int(density n) + 1)-th largest, as the code's ``kthvalue``), elect a sign per entry
      (``elect``: ``"mass"`` = the code's ``sum_of_values``, ``"count"`` =
      ``sum_of_signs``), and take the ``disjoint`` mean (the code) or sum of the agreeing
      entries; ``density`` defaults to 0.2 (the code's ``topK: 20``);
    * ``"dare_ties"``: DARE on the blocks (keep each entry with probability ``density``,
      default 0.9 = the code's ``dare_pruning_coeffs: 0.1``, rescale by ``1 / density``),
      then the sign election and disjoint mean without trimming (the code's ``topK: 100``);
      needs ``key=``;
    * ``"task_arithmetic"``: the plain sum of the blocks, which is task arithmetic.

    The official config for CLIP ViT-B/32 LoRA rank 16 on 8 tasks is ``merge="ties",
    density=0.2, scale=0.6`` (``dare_ties``: ``density=0.9, scale=0.7``).

    Differences from the official code (``gstoica27/KnOTS``, ``task_merger.py``): the code
    ranks magnitudes over all layers' blocks together (one top-k per task for the whole
    model); here per leaf. It takes the SVD in float64; here in the compute dtype (float32
    unless float64 inputs with x64). A zero sum elects +1 (the code: the majority sign),
    so flipping a component's signs could change the result: each component's signs are
    fixed (its largest ``|U|`` entry positive, scikit-learn's ``svd_flip``), so that it
    does not depend on the SVD routine's sign convention (LAPACK's and cuSolver's differ).
    Leaves that are not matrices (biases, norms, convolutions) get the same ``merge`` on
    their raw task vectors, top-k per leaf: the code's ``merge_other_params=True``
    (by default it leaves them at the base; with LoRA updates they are zero anyway). LoRA
    adapters are merged by passing full updates ``Delta W = B A`` as task vectors.

    Example::

        merged = mergejax.knots(base, [ft_a, ft_b, ft_c], density=0.2, scale=0.6)
    """
    if density is None:
        density = _KNOTS_DENSITY[merge]
    hp = {"merge": merge, "density": density, "elect": elect, "disjoint": disjoint}
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    if split is None:
        taus = tuple(x - base for x in models)
        rank_ = stages.topk_rank(density, base.size, topk)
        return base + scale * _consensus(ctx, taus, rank_, **hp)

    d = _task_matrices(base, models, split, kernel_layout)  # (K, out, in)
    k, n_out, n_in = d.shape
    r = min(n_out, k * n_in)
    if rank is not None and rank > r:
        raise MergeError(f"rank {rank} is larger than the {r} components of the joint SVD "
                         f"of {k} {n_out}x{n_in} task matrices at '{ctx.path}'")
    joint = jnp.swapaxes(d, 0, 1).reshape(n_out, k * n_in)  # [D_1 ... D_K]
    # Its signs are fixed below, so LAPACK's own on ``joint`` need not be kept.
    u, s, v = matrices.svd(joint, any_signs=True)  # (out, r), (r,), (K*in, r)
    u, v = _canonical_signs(u, v)
    keep = s > rank_tol
    if rank is not None:
        keep = keep & (jnp.arange(r) < rank)
    coeff = jnp.where(keep[:, None], s[:, None] * v.T, 0.0)  # (r, K*in)
    blocks = tuple(coeff[:, j * n_in:(j + 1) * n_in] for j in range(k))
    rank_ = 0
    if merge == "ties":  # the top-k count of the kept components, r_kept * in entries
        table = np.asarray([stages.topk_rank(density, j * n_in, topk) for j in range(r + 1)],
                           np.int32)
        rank_ = jnp.asarray(table)[jnp.sum(keep)]
    merged = u @ _consensus(ctx, blocks, rank_, **hp)
    return base + scale * _to_leaf(merged, kernel_layout, base.shape)


def _canonical_signs(u: Array, v: Array) -> tuple[Array, Array]:
    """``(u, v)`` with each column pair's sign flipped where needed so that the entry of
    largest magnitude in ``u``'s column is positive (scikit-learn's ``svd_flip``)."""
    top = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None, :], axis=0)
    flip = jnp.where(top < 0, -1.0, 1.0).astype(u.dtype)
    return u * flip, v * flip


# ---------------------------------------------------------------------------------------
# HO-GSVD

def _check_ho_gsvd(paths: list[str], statics: list[dict]) -> None:
    matrices.check_matrix_split(paths, statics)
    for path, s in zip(paths, statics):
        _choice(path, "merge", s["merge"], _HO_GSVD_MERGES)
        _positive(path, "pi", s["pi"])
        _positive(path, "ridge", s["ridge"])
        matrices.check_layout(s["kernel_layout"], path)


_ISO_TOL = 1e-4  # relative window below tau_max of the isolated HO-GSVD subspace


@full_precision
def ho_gsvd_factors(d: Array, pi: float = 1e-3, ridge: float = 1e-6
                    ) -> tuple[Array, Array, Array]:
    """The HO-GSVD ``D_k = B_k V^T`` of ``d (K, p, n)``: returns ``B (K, p, n)``, the
    generalized singular values ``sigma (K, n)`` (column norms of ``B_k``) and ``V^T
    (n, n)`` (not orthogonal), so that ``d[k] == B[k] @ vt``.

    Kempf, Goulart & Duncan 2021 (arXiv 2102.09822): with ``G = sum_k D_k^T D_k + delta I
    = R^T R`` (Cholesky; ``delta = ridge * trace(G) / n``, a padding that keeps ``R``
    invertible for rank-deficient stacks, e.g. LoRA updates) and ``Q_k = D_k R^{-1}``,
    ``Z`` are the eigenvectors of the symmetric ``T = (1/K) sum_k (Q_k^T Q_k + pi I)^{-1}``,
    ``V = R^T Z`` and ``B_k = Q_k Z``, so ``sum_k sigma_k^2 <= 1`` per direction. For
    ``pi, delta -> 0`` and full-column-rank ``D_k`` the directions (columns of ``V``) are
    those of Ponnapalli et al. 2011: the eigenvectors of ``S = 1/(K(K-1)) sum_{i<j} (A_i
    A_j^{-1} + A_j A_i^{-1})``, ``A_k = D_k^T D_k``. Eigenvalues of ``T`` near
    ``tau_min = 1 / (1/K + pi)`` mark directions all tasks share equally; near
    ``tau_max = (K-1)/(K pi) + 1/(K(1+pi))``, directions one task owns (isolated).

    The isolated eigenvalue is degenerate whenever several tasks own directions (always for
    updates with independent row spaces, such as LoRA's), and an eigensolver returns any
    basis of that eigenspace, mixing tasks. As Kempf et al.'s code, the basis of the
    isolated subspace (``tau >= tau_max - 1e-4 (tau_max - tau_min)``, which includes the
    directions no task uses) is re-chosen so that each vector belongs to one task: here as
    the eigenvectors there of ``sum_k (k + 1) Q_k^T Q_k`` (vmappable, where their code
    deflates task by task; skipped, under `lax.cond`, when there is at most one isolated
    direction, as for full fine-tunes).
    """
    k, p, n = d.shape
    eye = jnp.eye(n, dtype=d.dtype)
    g = jnp.einsum("kpi,kpj->ij", d, d)
    delta = ridge * jnp.trace(g) / n
    delta = jnp.where(delta > 0, delta, 1.0)
    lower = matrices.cholesky(g + delta * eye)  # G = L L^T, R = L^T
    q = solve_triangular(lower, d.reshape(k * p, n).T, lower=True).T.reshape(k, p, n)
    grams = jnp.einsum("kpi,kpj->kij", q, q)
    t = jnp.mean(matrices.inv(grams + pi * eye), axis=0)
    tau, z = matrices.eigh((t + t.T) / 2)
    tau_max = (k - 1) / (k * pi) + 1 / (k * (1 + pi))
    tau_min = 1 / (1 / k + pi)
    iso = tau >= tau_max - _ISO_TOL * (tau_max - tau_min)

    def align(z: Array) -> Array:
        owners = z.T @ jnp.einsum("k,kij->ij", jnp.arange(1, k + 1, dtype=d.dtype), grams) @ z
        # Outside the isolated subspace: distinct 1x1 blocks above its spectrum (in [0, K]
        # as Q_k^T Q_k <= I), so the rotation is the identity there.
        far = jnp.arange(k + 1, k + 1 + n, dtype=d.dtype)
        owners = jnp.where(iso[:, None] & iso[None, :], owners, 0.0) + jnp.diag(
            jnp.where(iso, 0.0, far))
        return z @ matrices.eigh(owners)[1]

    z = jax.lax.cond(jnp.sum(iso) > 1, align, lambda z: z, z)
    b = q @ z
    return b, jnp.linalg.norm(b, axis=1), z.T @ lower.T


@leafwise("ho_gsvd", family="spectral",
          paper="Ponnapalli et al. 2011 / Kempf et al. 2021, higher-order GSVD (arXiv "
                "2102.09822); as a model-merging basis: Skorobogat et al. 2025, "
                "Subspace-Boosted Model Merging (arXiv 2506.16506)",
          coefficients=("scale",), validate=_check_ho_gsvd, batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def ho_gsvd(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=1.0,
            merge: str = "participation", pi: float = 1e-3, ridge: float = 1e-6,
            kernel_layout: str = "in_out", matrix_split: Any = "auto") -> Array:
    """Merge in a higher-order GSVD basis: per matrix, ``D_k = B_k V^T`` with one right
    (input-side) basis ``V`` shared by the K task matrices (`ho_gsvd_factors`, PyTorch
    ``(out, in)`` orientation from ``kernel_layout``); the coefficient columns ``b_{k,j}``
    of each shared direction ``j`` are combined and mapped back: ``theta_0 + scale *
    B_merged V^T``.

    ``merge`` (``p_{k,j} = sigma_{k,j}^2 / sum_i sigma_{i,j}^2``, task k's share of
    direction j):

    * ``"participation"``: ``sum_k b_{k,j} / n_j`` with ``n_j = 1 / sum_k p_{k,j}^2`` the
      number of tasks that share direction j (1 when one task owns it: kept whole; K when
      all share it equally: averaged, not counted K times);
    * ``"select"``: the column of the task with the largest ``sigma_{k,j}``;
    * ``"mean"`` / ``"sum"``: the plain mean / sum, which are the mean of the task vectors
      and task arithmetic (the decomposition is exact).

    No published merge rule is defined on this basis: Skorobogat et al. use the HO-GSVD to
    compare tasks and pick experts, not to merge them. The rules above are this library's
    (``notes/refs_subspace.md``). ``pi`` is Kempf et al.'s regulariser (1e-3 in their Python
    code), ``ridge`` the relative padding of ``G`` (see `ho_gsvd_factors`). Leaves that are
    not matrices get the mean of their task vectors (the sum for ``merge="sum"``). Cost:
    ``O(K p n^2 + K n^3)`` per matrix with ``n`` the input size.

    Example::

        merged = mergejax.ho_gsvd(base, [ft_a, ft_b, ft_c], scale=1.0)
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    if split is None:
        total = functools.reduce(jnp.add, (x - base for x in models))
        return base + scale * (total if merge == "sum" else total / len(models))
    d = _task_matrices(base, models, split, kernel_layout)
    b, sigma, vt = ho_gsvd_factors(d, pi, ridge)
    if merge == "sum":
        merged = jnp.sum(b, axis=0)
    elif merge == "mean":
        merged = jnp.mean(b, axis=0)
    elif merge == "select":
        owner = jax.nn.one_hot(jnp.argmax(sigma, axis=0), len(models), axis=0, dtype=b.dtype)
        merged = jnp.sum(b * owner[:, None, :], axis=0)
    else:
        energy = sigma * sigma
        total = jnp.sum(energy, axis=0)
        squares = jnp.sum(energy * energy, axis=0)
        shared = jnp.where(squares > 0, total * total / jnp.where(squares > 0, squares, 1.0),
                           1.0)
        merged = jnp.sum(b, axis=0) / shared
    return base + scale * _to_leaf(merged @ vt, kernel_layout, base.shape)


# ---------------------------------------------------------------------------------------
# OPCM

def _check_opcm(paths: list[str], statics: list[dict]) -> None:
    matrices.check_matrix_split(paths, statics)
    for path, s in zip(paths, statics):
        _choice(path, "scope", s["scope"], _SCOPES)
    if len({s["scope"] for s in statics}) > 1:
        raise MergeError("opcm: scope='global' rescales by the whole model's task-vector "
                         "norms, so scope must be the same for every leaf")


@full_precision
def opcm_project(total: Array, tau: Array, alpha: Array | float) -> Array:
    """``tau`` without its components on the leading singular directions of ``total``
    (both ``(p, q)`` matrices), as FusionBench's ``OPCMForCLIP.merge_linear_weights``.

    With ``total = U diag(s) V^T``, ``c = U^T tau V`` and ``m`` the number of singular
    values before the cumulative share ``cumsum(s) / sum(s)`` first exceeds ``alpha``, the
    entries ``c_ii`` (every i) and ``c_ij`` (``i, j < m``) are removed: ``tau - U (M * c)
    V^T``. Everything else of ``tau``, including what lies outside the span of ``U`` and
    ``V``, is kept. (``alpha >= 1`` or a zero ``total`` give ``m = 0``: only the diagonal
    goes, as there.)
    """
    u, s, v = matrices.svd(total)
    share = jnp.cumsum(s) / jnp.sum(s)
    m = jnp.argmax((share > alpha).astype(jnp.int32))
    idx = jnp.arange(s.shape[0])
    top = idx < m
    removed = (idx[:, None] == idx[None, :]) | (top[:, None] & top[None, :])
    coords = jnp.swapaxes(u, -1, -2) @ tau @ v
    return tau - u @ jnp.where(removed, coords, 0.0) @ jnp.swapaxes(v, -1, -2)


def _opcm_add(total: Array, tau: Array, alpha: Array | float, split: int | None) -> Array:
    """One OPCM step on a leaf's unscaled merged task vector: ``total + P(tau)``."""
    if split is None:
        return total + tau
    shaped = matrices.as_matrix(tau, split)
    projected = opcm_project(matrices.as_matrix(total, split), shaped, alpha)
    return total + projected.reshape(tau.shape)


def _opcm_sum(base: Array, models: tuple[Array, ...], alpha: Array | float,
              split: int | None) -> Array:
    total = models[0] - base
    for x in models[1:]:
        total = _opcm_add(total, x - base, alpha, split)
    return total


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x))


def _opcm_norms(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, alpha,
                scope: str, matrix_split: Any) -> tuple[Array, Array] | None:
    """Global scope: this leaf's squared norms of the K task vectors and of the unscaled
    merged task vector (summed over leaves by the engine)."""
    if scope != "global" or len(models) == 1:
        return None
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    total = _opcm_sum(base, models, alpha, split)
    return (jnp.stack([jnp.sum(jnp.square(x - base)) for x in models]),
            jnp.sum(total * total))


def _rescaled(base: Array, total: Array, mean_norm: Array, total_norm: Array) -> Array:
    factor = jnp.where(total_norm > 0, mean_norm / jnp.where(total_norm > 0, total_norm, 1.0),
                       0.0)
    return base + total * factor


@leafwise("opcm", family="spectral",
          paper="Tang et al. 2025, Merging models on the fly without retraining: a sequential "
                "approach to scalable continual model merging (arXiv 2501.09522)",
          coefficients=("alpha",), statistics=(_opcm_norms,), validate=_check_opcm,
          batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def opcm(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, alpha=0.5,
         scope: str = "global", matrix_split: Any = "auto") -> Array:
    """OPCM: continual merging by orthogonal projection, models taken in the given order.

    The unscaled merged task vector starts as ``S_1 = tau_1``; model t adds its task vector
    without the components on the leading singular directions of ``S_{t-1}`` (matrices,
    `opcm_project` with threshold ``alpha``) or as it is (other leaves): ``S_t = S_{t-1} +
    P(tau_t)``. The merged model is ``theta_0 + S_K * mean_t ||tau_t|| / ||S_K||``, so its
    task vector has the mean norm of the task vectors. ``scope="global"`` takes the norms
    over the whole model (FusionBench; a statistics pass that runs the projections too),
    ``"tensor"`` per leaf. With one model it returns that model.

    Matches FusionBench ``opcm`` (``OPCMForCLIP``, default ``alpha: 0.5``, also the paper's
    setting for CLIP ViT-B/32) with ``shuffle_order: false`` (shuffle ``models`` yourself),
    whose per-step rescaling by ``lambda_t`` telescopes to the form above. FusionBench
    projects ``nn.Linear`` weights only; ``matrix_split="auto"`` also projects other 2-D
    leaves (embedding tables): give ``matrix_split`` a path rule with None for them to
    match exactly. For models that arrive one at a time use `opcm_init` / `opcm_update`,
    which give the same result. ``alpha`` is a traced coefficient.

    Example::

        merged = mergejax.opcm(base, [ft_a, ft_b, ft_c], alpha=0.5)
    """
    if len(models) == 1:
        return models[0]
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    total = _opcm_sum(base, models, alpha, split)
    if scope == "global":
        sq_norms, sq_total = ctx.stats[0]
        return _rescaled(base, total, jnp.mean(jnp.sqrt(sq_norms)), jnp.sqrt(sq_total))
    mean_norm = jnp.mean(jnp.stack([_norm(x - base) for x in models]))
    return _rescaled(base, total, mean_norm, _norm(total))


class OPCMState(NamedTuple):
    """The state of a streaming OPCM merge (a pytree; see `opcm_update`).

    Attributes:
      base: the base model.
      total: the unscaled merged task vector ``S_t`` (float leaves, compute dtype; other
        leaves copied from the base).
      norm_sum: ``sum_t ||tau_t||`` over the whole model.
      leaf_norm_sums: ``sum_t ||tau_t||`` per float leaf, in flattening order.
      count: the number of models merged so far.
    """

    base: PyTree
    total: PyTree
    norm_sum: Array
    leaf_norm_sums: Array
    count: Array


def _compute_dtype(x: Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


def opcm_init(base: PyTree) -> OPCMState:
    """The state of a streaming OPCM merge before any model (see `opcm_update`).

    Example::

        state = mergejax.opcm_init(base)
    """
    leaves = jax.tree.leaves(base)
    n_float = sum(is_float(x) for x in leaves)
    total = jax.tree.map(
        lambda x: jnp.zeros(jnp.shape(x), _compute_dtype(jnp.asarray(x))) if is_float(x) else x,
        base)
    dtype = jnp.result_type(float)
    return OPCMState(base, total, jnp.zeros((), dtype), jnp.zeros((n_float,), dtype),
                     jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("scope", "splits"))
def _opcm_step(state: OPCMState, model: PyTree, alpha: Array, *, scope: str,
               splits: tuple[int | None, ...]) -> tuple[OPCMState, PyTree]:
    base_leaves, treedef = jax.tree.flatten(state.base)
    total_leaves = treedef.flatten_up_to(state.total)
    model_leaves = treedef.flatten_up_to(model)
    first = state.count == 0
    new_totals, norms, j = [], [], 0
    for b, s, x in zip(base_leaves, total_leaves, model_leaves):
        if not is_float(b):
            new_totals.append(s)
            continue
        cdt = _compute_dtype(b)
        tau = x.astype(cdt) - b.astype(cdt)
        new_totals.append(jnp.where(first, tau, _opcm_add(s, tau, alpha, splits[j])))
        norms.append(_norm(tau))
        j += 1
    dtype = state.norm_sum.dtype
    norms = jnp.stack(norms).astype(dtype) if norms else jnp.zeros((0,), dtype)
    count = state.count + 1
    norm_sum = state.norm_sum + jnp.sqrt(jnp.sum(norms * norms))
    leaf_norm_sums = state.leaf_norm_sums + norms
    floats = [t for b, t in zip(base_leaves, new_totals) if is_float(b)]
    if scope == "global":
        total_norm = jnp.sqrt(sum(jnp.sum(t * t) for t in floats)) if floats else 0.0
    merged, j = [], 0
    for b, t in zip(base_leaves, new_totals):
        if not is_float(b):
            merged.append(b)
            continue
        if scope == "global":
            mean_norm, t_norm = norm_sum / count, total_norm
        else:
            mean_norm, t_norm = leaf_norm_sums[j] / count, _norm(t)
        merged.append(_rescaled(b.astype(t.dtype), t, mean_norm, t_norm).astype(b.dtype))
        j += 1
    new_state = OPCMState(state.base, treedef.unflatten(new_totals), norm_sum,
                          leaf_norm_sums, count)
    return new_state, treedef.unflatten(merged)


def opcm_update(state: OPCMState, model: PyTree, *, alpha: Any = 0.5,
                scope: str = "global", matrix_split: Any = "auto"
                ) -> tuple[OPCMState, PyTree]:
    """Adds one model to a streaming OPCM merge; returns the new state and the merged model
    of all models so far (in the base's dtypes).

    Pure and jit-compiled (one compilation per tree structure, ``scope`` and
    ``matrix_split``; ``alpha`` is traced). Merging models one by one from `opcm_init` gives
    what `opcm` gives for the same list, hyperparameters and order; only one model, the
    base and the running sum are held at a time.

    Example::

        state = mergejax.opcm_init(base)
        for ft in finetuned_stream:
            state, merged = mergejax.opcm_update(state, ft, alpha=0.5)
    """
    _choice("", "scope", scope, _SCOPES)
    check_compatible(state.base, [model])
    paths, leaves, _ = flatten_with_paths(state.base)
    floats = [(p, x) for p, x in zip(paths, leaves) if is_float(x)]
    values = rules_lib.resolve_per_leaf(matrix_split, [p for p, _ in floats],
                                        [x for _, x in floats], name="matrix_split")
    splits = tuple(matrices.matrix_split(p, jnp.shape(x), v)
                   for (p, x), v in zip(floats, values))
    return _opcm_step(state, model, jnp.asarray(alpha, jnp.float32), scope=scope,
                      splits=splits)
