"""Data-free optimisation methods: merges found by minimising an objective built from the
task vectors alone.

* `wudi` (WUDI-Merging, arXiv 2503.08099): per weight matrix, the merged task matrix that
  least disturbs each task's inputs, which the task matrix itself spans. A leaf kernel: the
  objective is a quadratic in ``tau_m`` (`WudiQuadratic`), minimised by Adam (the paper's
  optimiser, an optax loop inside the kernel with one matmul per iteration) or solved in
  closed form.
* `awd` (Adaptive Weight Disentanglement, arXiv 2411.18729): one redundant vector ``delta``
  for the whole model that makes the task vectors ``tau_i - delta`` as orthogonal as
  possible; the model-level cosines make it a pytree transform (`awd_disentangle`), not a
  leaf kernel. The disentangled task vectors are then merged by a registered method
  (task arithmetic by default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mergejax import registry
from mergejax.method import LeafContext, leafwise
from mergejax.methods import matrices
from mergejax.rules import is_finite_number
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    is_float,
)

__all__ = ["AWDResult", "WudiQuadratic", "awd", "awd_disentangle", "wudi", "wudi_quadratic"]

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST
WUDI_PAPER = ("Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding "
              "Data-Free Model Merging via Task Vectors (arXiv 2503.08099)")
AWD_PAPER = ("Xiong et al. 2024, Multi-Task Model Merging via Adaptive Weight Disentanglement "
             "(arXiv 2411.18729)")
#: ``omega`` when none is given: the paper's unregularised loss for the Adam form, the
#: official code's ``--reg`` default for the closed form.
WUDI_DEFAULT_OMEGA = {"gradient": 0.0, "closed": 1e-5}


# ------------------------------------------------------------------------------- WUDI


class WudiQuadratic(NamedTuple):
    """The WUDI objective of one task matrix as a quadratic in ``M`` (PyTorch (out, in)
    orientation): ``loss(M) = tr(M A M^T) - 2 tr(M B^T) + c``, gradient ``2 (M A - B)``.

    Attributes:
      a: ``sum_i (G_i + omega I) / ||tau_i||^2``, (in, in), with ``G_i = tau_i^T tau_i``.
      b: ``sum_i tau_i (G_i + omega I) / ||tau_i||^2``, (out, in).
      c: the constant ``sum_i (||G_i||_F^2 + omega ||tau_i||^2) / ||tau_i||^2``.
    """

    a: Array
    b: Array
    c: Array

    def loss(self, m: Array) -> Array:
        """``sum_i [||(M - tau_i) tau_i^T||_F^2 + omega ||M - tau_i||_F^2] / ||tau_i||^2``."""
        return (jnp.sum(m * jnp.matmul(m, self.a, precision=_HIGHEST))
                - 2.0 * jnp.sum(m * self.b) + self.c)

    def gradient(self, m: Array) -> Array:
        """``d loss / d M = 2 (M A - B)``: one (out x in) @ (in x in) matmul."""
        return 2.0 * (jnp.matmul(m, self.a, precision=_HIGHEST) - self.b)

    def minimizer(self) -> Array:
        """``B A^-1`` by a Cholesky solve (``A`` is symmetric positive definite when
        ``omega > 0`` or the stacked task matrices have full column rank)."""
        factor = jax.scipy.linalg.cho_factor(self.a, lower=True)
        return jax.scipy.linalg.cho_solve(factor, self.b.T).T


def wudi_quadratic(taus: Array, omega: float | Array = 0.0) -> WudiQuadratic:
    """The `WudiQuadratic` of K task matrices ``taus`` (K, out, in), PyTorch orientation.

    Tasks whose matrix is zero carry no information and are left out (weight 0); when all
    are zero, ``A`` is the identity and ``B`` zero, so the minimiser is 0. The Grams are
    formed on the smaller side: ``B = sum_i w_i (tau_i tau_i^T) tau_i`` when out < in.

    Example::

        q = wudi_quadratic(jnp.stack([tau_a, tau_b]), omega=1e-5)
        merged_tau = q.minimizer()          # the closed form
        q.loss(tau_a + tau_b)               # the loss at the task-arithmetic start
    """
    _, p, q = taus.shape
    sq = jnp.sum(jnp.square(taus), axis=(1, 2))
    present = sq > 0
    w = jnp.where(present, 1.0 / jnp.where(present, sq, 1.0), 0.0)
    wt = w[:, None, None] * taus
    eye = jnp.eye(q, dtype=taus.dtype)
    if p < q:
        small = jnp.einsum("kpi,kri->kpr", taus, taus, precision=_HIGHEST)
        b = jnp.einsum("kpr,kri->pi", w[:, None, None] * small, taus, precision=_HIGHEST)
        a = jnp.einsum("kpi,kpj->ij", wt, taus, precision=_HIGHEST)
    else:
        small = jnp.einsum("kpi,kpj->kij", taus, taus, precision=_HIGHEST)
        b = jnp.einsum("kpi,kij->pj", wt, small, precision=_HIGHEST)
        a = jnp.einsum("k,kij->ij", w, small, precision=_HIGHEST)
    c = jnp.sum(w * (jnp.sum(jnp.square(small), axis=(1, 2)) + omega * sq))
    a = a + omega * jnp.sum(w) * eye + jnp.where(jnp.any(present), 0.0, 1.0) * eye
    b = b + omega * jnp.einsum("k,kpi->pi", w, taus)
    return WudiQuadratic(a, b, c)


def _check_wudi(paths: list[str], statics: list[dict]) -> None:
    """`leafwise` validator of `wudi`'s static hyperparameters."""
    matrices.check_matrix_split(paths, statics)
    for path, hp in zip(paths, statics):
        form, omega, iterations, lr = hp["form"], hp["omega"], hp["iterations"], hp["lr"]
        if form not in WUDI_DEFAULT_OMEGA:
            raise MergeError(f"form at '{path}' must be 'gradient' or 'closed', got {form!r}")
        if omega is not None and (not is_finite_number(omega) or not omega >= 0):
            raise MergeError(f"omega at '{path}' must be a number >= 0 (or None for the "
                             f"form's default), got {omega!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise MergeError(f"iterations at '{path}' must be an int >= 0, got {iterations!r}")
        if not is_finite_number(lr) or not lr > 0:
            raise MergeError(f"lr at '{path}' must be a number > 0, got {lr!r}")
        if hp["non_matrix"] not in ("mean", "base"):
            raise MergeError(f"non_matrix at '{path}' must be 'mean' or 'base', got "
                             f"{hp['non_matrix']!r}")
        matrices.check_layout(hp["kernel_layout"], path)




@leafwise("wudi", family="datafree", paper=WUDI_PAPER, coefficients=("scale",),
          validate=_check_wudi, batched=matrices.LAPACK_BATCHED,
          runs_per_leaf=False)
def wudi(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=1.0,
         form: str = "gradient", iterations: int = 300, lr: float = 1e-5,
         omega: float | None = None, kernel_layout: str = "in_out",
         matrix_split: Any = "auto", non_matrix: str = "mean") -> Array:
    """WUDI-Merging: per weight matrix, ``base + scale * tau_m`` with ``tau_m`` minimising
    ``sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` (PyTorch (out, in) orientation,
    so ``tau_i^T tau_i`` is the (in x in) Gram of the task's inputs, which the task matrix
    approximately spans).

    ``form="gradient"`` is the paper's optimiser, as the official code and FusionBench
    ``wudi_merging``: Adam (``lr``, betas 0.9/0.999, eps 1e-8, no weight decay) from the sum
    of the task matrices for ``iterations`` steps, each one ``(out x in) @ (in x in)`` matmul
    through the Gram form of `WudiQuadratic`. ``form="closed"`` solves the regularised
    normal equations ``tau_m = [sum_i tau_i (G_i + omega I) / ||tau_i||^2]
    [sum_i (G_i + omega I) / ||tau_i||^2]^-1`` (the official repository's closed form, which
    uses ``pinv``; here a Cholesky solve), i.e. the minimiser of the loss plus
    ``omega sum_i ||tau_m - tau_i||^2 / ||tau_i||^2``. ``omega=None`` takes 0 for the
    gradient form (the paper's loss) and 1e-5 for the closed form (the official ``--reg``).
    ``omega`` is absolute: it adds ``omega sum_i 1/||tau_i||^2`` to the diagonal of a matrix
    whose eigenvalues sum to K, so it bounds the condition number by about
    ``K / (omega sum_i 1/||tau_i||^2)`` (about 1e3-1e5 for CLIP-sized task matrices); with
    ``omega=0`` the system is singular unless K * out >= in with full column rank.

    Matrices (``matrix_split``, see `mergejax.methods.matrices`; "auto": every 2-D leaf and
    the 3-D Flax attention kernels, as FusionBench, which optimises every 2-D tensor) are
    optimised; other leaves get ``non_matrix="mean"``: ``base + scale * mean_i tau_i``
    (FusionBench) or ``"base"``: the pretrained value (the official code, which optimises
    only ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight`` and
    ``mlp.c_proj.weight`` and leaves every other tensor pretrained; reproduce it with a
    ``matrix_split`` rule that sends the other leaves to None). ``kernel_layout`` is
    "in_out" for Flax Dense kernels, "out_in" for PyTorch weights; Flax ``nn.Embed`` tables
    are (vocab, dim) like PyTorch's, so give them "out_in" by a path rule to match
    FusionBench. Flax's separate query/key/value kernels give separate Grams, as Hugging
    Face CLIP in FusionBench; open_clip's fused ``in_proj_weight`` (official code) shares one.
    ``scale=1`` reproduces both references (neither rescales). Only ``scale`` is traced.

    Example::

        merged = mergejax.wudi(base, finetuned)                          # Adam, 300 steps
        merged = mergejax.wudi(base, finetuned, form="closed", omega=1e-4)
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    if split is None:
        if non_matrix == "base":
            return base
        return base + scale * functools.reduce(jnp.add, [x - base for x in models]) / len(models)
    if omega is None:
        omega = WUDI_DEFAULT_OMEGA[form]
    taus = jnp.stack([matrices.torch_view(matrices.as_matrix(x - base, split), kernel_layout)
                      for x in models])
    quadratic = wudi_quadratic(taus, omega)
    if form == "closed":
        merged = quadratic.minimizer()
    else:
        optimizer = optax.adam(lr)

        def step(_, carry):
            m, state = carry
            updates, state = optimizer.update(quadratic.gradient(m), state, m)
            return optax.apply_updates(m, updates), state

        start = jnp.sum(taus, axis=0)
        merged, _ = lax.fori_loop(0, iterations, step, (start, optimizer.init(start)))
    merged = matrices.from_torch_view(merged, kernel_layout).reshape(base.shape)
    return base + scale * merged


# -------------------------------------------------------------------------------- AWD


class AWDResult(NamedTuple):
    """What `awd_disentangle` found.

    Attributes:
      delta: the redundant vector: the base's structure, float32 on its floating leaves,
        zeros of the base's dtype on the others (so `mergejax.tree_sub` applies it).
      losses: (steps + 1,) the objective before every step and after the last.
    """

    delta: PyTree
    losses: Array


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(x)`` for ``x >= 0`` with gradient 0 (not inf) at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _awd_objective(gram: Array, c: Array, n: Array, alpha: Array) -> Array:
    """The AWD loss from inner products only: ``gram[i, j] = <tau_i, tau_j>``,
    ``c[i] = <tau_i, delta>``, ``n = ||delta||^2``."""
    k = gram.shape[0]
    dots = gram - c[:, None] - c[None, :] + n
    norms = _safe_sqrt(jnp.diagonal(dots))
    den = norms[:, None] * norms[None, :]
    cos = jnp.where(den > 0, dots / jnp.where(den > 0, den, 1.0), 0.0)
    off = 1.0 - jnp.eye(k, dtype=gram.dtype)
    return jnp.sum(jnp.abs(cos) * off) / (k * (k - 1)) + alpha * _safe_sqrt(n)


def _dots(taus: list[Array], tree: list[Array]) -> Array:
    """``[sum over leaves <tau_i, x>]_i`` for stacked task vectors ``taus`` (K, ...)."""
    return functools.reduce(jnp.add, [
        jnp.einsum("kn,n->k", t.reshape(t.shape[0], -1), x.reshape(-1), precision=_HIGHEST)
        for t, x in zip(taus, tree)])


def _mv(m: Array, v: Array) -> Array:
    return jnp.matmul(m, v, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("steps", "optimizer"))
def _disentangle(base: list[Array], models: list[list[Array]], alpha: Array, lr: Array, *,
                 steps: int, optimizer: Any) -> tuple[list[Array], Array]:
    """`awd_disentangle` on the lists of floating leaves (``models[i][leaf]``)."""
    taus = [jnp.stack([m[j].astype(jnp.float32) for m in models]) - b.astype(jnp.float32)
            for j, b in enumerate(base)]
    flat = [t.reshape(t.shape[0], -1) for t in taus]
    gram = functools.reduce(jnp.add, [jnp.matmul(f, f.T, precision=_HIGHEST) for f in flat])
    k = gram.shape[0]

    if optimizer == "sgd":
        # Plain gradient descent from delta = 0 never leaves span{tau_i}: the loss depends
        # on delta only through c = <tau_i, delta> and n = ||delta||^2, so its gradient is
        # sum_i (dL/dc_i) tau_i + 2 (dL/dn) delta. With delta = sum_i a_i tau_i the steps
        # are exactly those of the coefficients a along u = dL/dc + 2 (dL/dn) a.
        grad_cn = jax.value_and_grad(_awd_objective, argnums=(1, 2))
        transform = optax.sgd(lr)

        def step(carry, _):
            a, state = carry
            loss, (g_c, g_n) = grad_cn(gram, _mv(gram, a), a @ _mv(gram, a), alpha)
            updates, state = transform.update(g_c + 2.0 * g_n * a, state, a)
            return (optax.apply_updates(a, updates), state), loss

        a0 = jnp.zeros(k, jnp.float32)
        (a, _), losses = lax.scan(step, (a0, transform.init(a0)), None, length=steps)
        final = _awd_objective(gram, _mv(gram, a), a @ _mv(gram, a), alpha)
        delta = [jnp.einsum("k,k...->...", a, t, precision=_HIGHEST) for t in taus]
        return delta, jnp.append(losses, final)

    transform = optax.adam(lr) if optimizer == "adam" else optimizer

    def loss_fn(delta: list[Array]) -> Array:
        n = sum(jnp.sum(jnp.square(d)) for d in delta)
        return _awd_objective(gram, _dots(taus, delta), n, alpha)

    def step(carry, _):
        delta, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(delta)
        updates, state = transform.update(grads, state, delta)
        return (optax.apply_updates(delta, updates), state), loss

    delta0 = [jnp.zeros(b.shape, jnp.float32) for b in base]
    (delta, _), losses = lax.scan(step, (delta0, transform.init(delta0)), None, length=steps)
    return delta, jnp.append(losses, loss_fn(delta))


def _check_awd(models: Sequence[PyTree], base: PyTree, alpha: Any, lr: Any, steps: Any,
               optimizer: Any) -> list[PyTree]:
    if base is None:
        raise MergeError("awd needs a base (pretrained) model; got base=None")
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise MergeError(f"awd: models must be a list of pytrees, got {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise MergeError(f"awd needs at least 2 models (its loss is over pairs of task "
                         f"vectors), got {len(models)}")
    check_compatible(base, models)
    if not is_finite_number(alpha) or not alpha >= 0:
        raise MergeError(f"awd: alpha must be a number >= 0, got {alpha!r}")
    if not is_finite_number(lr) or not lr > 0:
        raise MergeError(f"awd: lr must be a number > 0, got {lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MergeError(f"awd: steps must be an int >= 0, got {steps!r}")
    if optimizer not in ("sgd", "adam") and not isinstance(optimizer,
                                                          optax.GradientTransformation):
        raise MergeError(f"awd: optimizer must be 'sgd', 'adam' or an "
                         f"optax.GradientTransformation, got {optimizer!r}")
    return models


def awd_disentangle(base: PyTree, models: Sequence[PyTree], *, alpha: float = 0.1,
                    lr: float = 0.01, steps: int = 300, optimizer: Any = "sgd") -> AWDResult:
    """The redundant vector ``delta`` of Adaptive Weight Disentanglement (Xiong et al. 2024,
    arXiv 2411.18729, Eq. 9-11 and Algorithm 1).

    Over the whole model's flattened task vectors ``tau_i`` (all floating leaves), minimises
    ``L = 1/(K(K-1)) sum_{i != j} |cos(tau_i - delta, tau_j - delta)| + alpha ||delta||_2``
    from ``delta = 0`` for ``steps`` steps. ``optimizer="sgd"`` is the paper's Algorithm 1,
    plain gradient descent ``delta <- delta - lr grad L``; it runs exactly in the span of the
    task vectors (K coefficients, after one K x K Gram pass over the model), so its cost is
    that of the Gram. ``"adam"`` (``optax.adam(lr)``) or any ``optax.GradientTransformation``
    (``lr`` then unused) runs in the full parameter space, one pass over the K task vectors a
    step. The defaults alpha=0.1, lr=0.01, 300 steps are the paper's (section 4.3, as quoted
    by third parties: the official repository FarisXiong/AWD publishes no code). The
    subgradient of ``||delta||`` at 0 is taken as 0. One jit-compiled function; ``alpha`` and
    ``lr`` are traced, ``steps`` and ``optimizer`` static.

    Example::

        result = awd_disentangle(base, finetuned)
        # sweep the task-arithmetic scale without re-running the optimisation
        models = [mergejax.tree_sub(m, result.delta) for m in finetuned]
        merged = mergejax.task_arithmetic(base, models, scale=0.3)
    """
    models = _check_awd(models, base, alpha, lr, steps, optimizer)
    _, leaves, treedef = flatten_with_paths(base)
    floats = [i for i, leaf in enumerate(leaves) if is_float(leaf)]
    if not floats:
        raise MergeError("awd: the base has no floating leaves to disentangle")
    model_leaves = [jax.tree.leaves(m) for m in models]
    delta, losses = _disentangle([leaves[i] for i in floats],
                                 [[ml[i] for i in floats] for ml in model_leaves],
                                 np.float32(alpha), np.float32(lr), steps=steps,
                                 optimizer=optimizer)
    out = [jnp.zeros_like(leaf) for leaf in leaves]
    for i, d in zip(floats, delta):
        out[i] = d
    return AWDResult(treedef.unflatten(out), losses)


def awd(base: PyTree, models: Sequence[PyTree], *, scale=1.0, alpha: float = 0.1,
        lr: float = 0.01, steps: int = 300, optimizer: Any = "sgd",
        merge: str = "task_arithmetic", merge_hparams: dict[str, Any] | None = None
        ) -> PyTree:
    """Adaptive Weight Disentanglement (Xiong et al. 2024, arXiv 2411.18729): merges the
    disentangled task vectors ``tau_i - delta`` (``delta`` from `awd_disentangle`, which
    documents ``alpha``, ``lr``, ``steps`` and ``optimizer``) with the registered method
    ``merge`` (default "task_arithmetic": ``base + scale * sum_i (tau_i - delta)``; "ties"
    is the paper's AWD-TIES), called as ``merge(base, [theta_i - delta], scale=scale,
    **merge_hparams)``. The disentangled models are formed in float32 and each merged leaf is
    returned in its base dtype; non-floating leaves come from the base. ``scale`` is traced
    by the merge method, so a sweep does not recompile (but re-runs the optimisation: for a
    sweep, call `awd_disentangle` once and merge its result yourself).

    Example::

        merged = mergejax.awd(base, finetuned, scale=0.3)
        merged = mergejax.merge("awd", base, finetuned, merge="ties", scale=1.0,
                                merge_hparams={"density": 0.2})
    """
    method = registry.get_method(merge)
    result = awd_disentangle(base, models, alpha=alpha, lr=lr, steps=steps,
                             optimizer=optimizer)

    def f32(x):
        return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if is_float(x) else x

    disentangled = [jax.tree.map(lambda x, d: f32(x) - d if is_float(x) else x, m,
                                 result.delta) for m in models]
    merged = method(jax.tree.map(f32, base), disentangled, scale=scale,
                    **(merge_hparams or {}))
    return jax.tree.map(lambda out, ref: out.astype(ref.dtype) if is_float(ref) else ref,
                        merged, base)


awd.name = "awd"
awd.family = "datafree"
awd.paper = AWD_PAPER
awd.hparams = {"scale": 1.0, "alpha": 0.1, "lr": 0.01, "steps": 300, "optimizer": "sgd",
               "merge": "task_arithmetic", "merge_hparams": None}
awd.needs_base = True
registry.register(awd)
