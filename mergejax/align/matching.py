"""Git Re-Basin: permutations that align model B's hidden units to model A's.

Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", arXiv 2209.04836 (official code: samuela/git-re-basin). Three ways to find
the permutations of a `PermutationSpec`, each returning a `MatchResult` whose ``perms``
satisfy ``apply_permutation(spec, perms, params_b) ~ params_a``:

* `weight_matching` (paper §3.2, Algorithm 1): maximise ``sum_l <W_a^l, P(W_b^l)>`` over
  the spec's floating leaves by coordinate ascent. A *sweep* visits every permutation once,
  in a random order drawn from ``seed``; for permutation ``p`` with the others fixed the
  objective is ``const + <P_p, A_p>`` with ``A_p = sum over p's (leaf, axis) of W_a (axis
  first, flattened to (n, -1)) @ P_others(W_b) (same)^T``, so the best ``P_p`` is a linear
  assignment. Its solution replaces ``P_p`` only if it *improves* ``<P_p, A_p>`` by more
  than float rounding (``16 * eps`` of the entries that change; the official code accepts
  every solution and uses ``1e-12``), so the objective never decreases and exact ties keep
  the current assignment. Sweeps stop after one that changes no permutation, or after
  ``max_iter``. A permutation whose ``A_p`` cannot have changed since it was last solved
  (none of the permutations sharing a leaf with it has changed since) is not solved
  again: its solution would be the same, so this only saves time.
* `activation_matching` (§3.1): per permutation, the assignment maximising the Pearson
  correlation between A's and B's unit activations on the same inputs
  (`mergejax.align.features`); permutations without activations fall back to weight
  matching.
* `ste_matching` (§3.3): a straight-through estimator learns ``theta~`` so that the
  midpoint ``(theta_a + proj(theta~)) / 2`` has low loss, where ``proj(theta~)`` is
  ``theta_b`` weight-matched to ``theta~`` and the gradient passes straight through it.

Each step is three jit-compiled calls: the similarity (compiled once per leaf layout, so
blocks of the same shapes share it), the assignment and the acceptance test. Assignments
are solved on device by `optax.assignment.hungarian_algorithm` (``solver="device"``,
compiled once per size) or on the host by `scipy.optimize.linear_sum_assignment`
(``solver="scipy"``: only the ``(n, n)`` similarity leaves the device). Both see the same
similarity matrices and visit the permutations in the same order, so they reach the same
permutations unless an assignment problem has several optimal solutions (or the float32
Hungarian's rounding picks a near-optimal one). Params may be sharded: every other step is
a jitted pure function.

The registry's ``weight_matching``, ``activation_matching`` and ``ste_matching`` merges
(`weight_matching_merge`, `activation_matching_merge`, `ste_matching_merge`) align every
model to the first and average them with `mergejax.methods.basic.linear`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from mergejax import registry
from mergejax.align.features import FeaturesFn, feature_correlations
from mergejax.align.spec import (
    Permutations,
    PermutationSpec,
    apply_permutation,
    identity_permutations,
    permute_leaf,
)
from mergejax.learned.loop import cached_adam
from mergejax.methods.basic import linear
from mergejax.tree import MergeError, PyTree, check_compatible, flatten_with_paths, is_float

__all__ = [
    "MatchResult",
    "SOLVERS",
    "activation_matching",
    "activation_matching_merge",
    "solve_assignment",
    "ste_matching",
    "ste_matching_merge",
    "weight_matching",
    "weight_matching_merge",
]

#: The assignment solvers: on device (optax's Hungarian) or on the host (SciPy).
SOLVERS = ("device", "scipy")
_PAPER = "Ainsworth et al. 2023, Git Re-Basin (arXiv 2209.04836)"

LossFn = Callable[[PyTree, Any], jax.Array]
#: Static layout of one permutation's similarity: per (leaf, axis) term, the axis and the
#: leaf's other permuted axes. Equal layouts share one compilation.
_Layout = tuple[tuple[int, tuple[int, ...]], ...]


class MatchResult(NamedTuple):
    """Permutations aligning model B to model A: ``apply_permutation(spec, perms, b)``.

    ``iterations`` counts coordinate-ascent sweeps (weight matching; 0 when activations
    gave every permutation) or optimisation steps (STE); ``objective`` is ``sum <W_a,
    P(W_b)>`` over the spec's floating leaves at ``perms``; ``history`` is that objective
    before the first sweep and after each one (weight matching), or the loss at every step
    (STE); ``assignments`` counts the linear assignment problems solved.

    Example::

        result = weight_matching(spec, params_a, params_b)
        result.perms["P_0"], result.iterations, result.history[-1] == result.objective
    """

    perms: Permutations
    iterations: int
    objective: float
    history: tuple[float, ...] = ()
    assignments: int = 0


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise MergeError(f"solver must be one of {SOLVERS}, not {solver!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeError(f"{name} must be a positive int, got {value!r}")


@jax.jit
def _hungarian(similarity: jax.Array) -> jax.Array:
    rows, cols = optax.assignment.hungarian_algorithm(-similarity)
    return jnp.zeros(similarity.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


def solve_assignment(similarity: Any, solver: str = "device") -> jax.Array:
    """The permutation ``perm`` maximising ``sum_i similarity[i, perm[i]]`` (a square
    matrix): unit ``i`` of A is matched with unit ``perm[i]`` of B.

    Example::

        perm = solve_assignment(correlation_ab, "scipy")
    """
    _check_solver(solver)
    if np.ndim(similarity) != 2 or np.shape(similarity)[0] != np.shape(similarity)[1]:
        raise MergeError(f"an assignment needs a square matrix, got shape "
                         f"{np.shape(similarity)}")
    if solver == "device":
        return _hungarian(jnp.asarray(similarity))
    _, cols = optimize.linear_sum_assignment(np.asarray(similarity, np.float64), maximize=True)
    return jnp.asarray(cols, jnp.int32)


# --- weight matching ---------------------------------------------------------------------


def _similarity(layout: _Layout, a_leaves: tuple[jax.Array, ...],
                b_leaves: tuple[jax.Array, ...], others: tuple[tuple[jax.Array, ...], ...]
                ) -> jax.Array:
    """``A = sum_terms W_a (axis first, (n, -1)) @ P_others(W_b) (same)^T`` in float32+."""
    n = a_leaves[0].shape[layout[0][0]]
    dtype = functools.reduce(jnp.promote_types, [x.dtype for x in a_leaves], jnp.float32)
    total = jnp.zeros((n, n), dtype)
    for (axis, other_axes), wa, wb, perms in zip(layout, a_leaves, b_leaves, others):
        for other_axis, perm in zip(other_axes, perms):
            wb = jnp.take(wb, perm, axis=other_axis)
        wa = jnp.moveaxis(wa, axis, 0).reshape(n, -1).astype(dtype)
        wb = jnp.moveaxis(wb, axis, 0).reshape(n, -1).astype(dtype)
        total = total + jnp.dot(wa, wb.T, precision=jax.lax.Precision.HIGHEST)
    return total


def _accept(similarity: jax.Array, current: jax.Array, proposal: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """``(proposal, True)`` if it beats ``current`` on ``<P, A>`` by more than the rounding
    error of the entries that differ, else ``(current, False)``."""
    rows = jnp.arange(similarity.shape[0])
    new, old = similarity[rows, proposal], similarity[rows, current]
    gain = jnp.sum(new - old)
    noise = 16 * jnp.finfo(similarity.dtype).eps * jnp.sum(
        jnp.where(proposal != current, jnp.abs(new) + jnp.abs(old), 0))
    improved = gain > noise
    return jnp.where(improved, proposal, current), improved


_similarity_jit = jax.jit(_similarity, static_argnums=0)
_accept_jit = jax.jit(_accept)


class _Term(NamedTuple):
    path: str
    axis: int
    others: tuple[tuple[int, str], ...]  # the leaf's other permuted axes and their perms


def _float_leaves(spec: PermutationSpec, params: PyTree) -> dict[str, jax.Array]:
    """The floating leaves the spec names (the only ones that enter the objective)."""
    paths, leaves, _ = flatten_with_paths(params)
    return {p: x for p, x in zip(paths, leaves) if spec.axes_of(p) and is_float(x)}


def _terms(spec: PermutationSpec, leaves: Mapping[str, jax.Array]
           ) -> dict[str, tuple[_Term, ...]]:
    terms: dict[str, list[_Term]] = {}
    for p, axes in spec.perm_to_axes.items():
        terms[p] = [_Term(path, axis, tuple((i, q) for i, q in enumerate(spec.axes_of(path))
                                            if q is not None and i != axis))
                    for path, axis in axes if path in leaves]
    return {p: tuple(t) for p, t in terms.items()}


@functools.partial(jax.jit, static_argnums=0)
def _objective(spec: PermutationSpec, a: dict[str, jax.Array], b: dict[str, jax.Array],
               perms: Permutations) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for path, wa in a.items():
        wb = permute_leaf(spec, perms, path, b[path])
        dtype = jnp.promote_types(wa.dtype, jnp.float32)
        total = total + jnp.vdot(wa.astype(dtype), wb.astype(dtype),
                                 precision=jax.lax.Precision.HIGHEST)
    return total


def _descend(spec: PermutationSpec, a: dict[str, jax.Array], b: dict[str, jax.Array],
             perms: Permutations, free: Iterable[str], *, solver: str, max_iter: int,
             seed: int) -> MatchResult:
    """Coordinate ascent over the permutations in ``free``, the others held fixed."""
    perms = dict(perms)
    terms = _terms(spec, a)
    free = sorted(p for p in free if terms[p])
    depends = {p: {q for t in terms[p] for _, q in t.others} for p in free}
    changed_at = dict.fromkeys(perms, 0)  # step at which each permutation last changed
    solved_at: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    history = [float(_objective(spec, a, b, perms))]
    step = sweeps = 0
    for sweeps in range(1, max_iter + 1):
        changed = False
        for p in rng.permutation(free).tolist():
            if p in solved_at and all(changed_at[q] < solved_at[p] for q in depends[p]):
                continue  # A_p is what it was when p was last solved
            step += 1
            layout = tuple((t.axis, tuple(i for i, _ in t.others)) for t in terms[p])
            args = (tuple(a[t.path] for t in terms[p]), tuple(b[t.path] for t in terms[p]),
                    tuple(tuple(perms[q] for _, q in t.others) for t in terms[p]))
            similarity = _similarity_jit(layout, *args)
            perms[p], improved = _accept_jit(similarity, perms[p],
                                             solve_assignment(similarity, solver))
            solved_at[p] = step
            if bool(improved):
                changed_at[p] = step
                changed = True
        history.append(float(_objective(spec, a, b, perms)))
        if not changed:
            break
    return MatchResult(perms, sweeps, history[-1], tuple(history), step)


def _check_pair(spec: PermutationSpec, params_a: PyTree, params_b: PyTree) -> dict[str, int]:
    check_compatible(params_a, [params_b], reference_name="params_a", other_name="params_b")
    return spec.sizes(params_a)


def _initial(spec: PermutationSpec, params: PyTree, sizes: Mapping[str, int],
             init_perms: Mapping[str, Any] | None) -> Permutations:
    """The identity, or ``init_perms`` checked against the spec's sizes."""
    if init_perms is None:
        return identity_permutations(spec, params)
    missing, unknown = sorted(set(sizes) - set(init_perms)), sorted(set(init_perms) - set(sizes))
    if missing or unknown:
        raise MergeError(f"init_perms do not match the spec: missing {missing}, unknown "
                         f"{unknown}")
    out = {}
    for p, n in sizes.items():
        perm = np.asarray(init_perms[p])
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise MergeError(f"init_perms[{p!r}] is not a permutation of {n} units (shape "
                             f"{perm.shape})")
        out[p] = jnp.asarray(perm, jnp.int32)
    return out


def weight_matching(spec: PermutationSpec, params_a: PyTree, params_b: PyTree, *,
                    solver: str = "device", max_iter: int = 100, seed: int = 0,
                    init_perms: Mapping[str, Any] | None = None) -> MatchResult:
    """Permutations of ``params_b``'s units maximising ``sum <W_a, P(W_b)>`` over the
    spec's floating leaves (Git Re-Basin weight matching: coordinate ascent, one linear
    assignment per permutation and sweep; see the module docstring). ``seed`` draws the
    order of every sweep; ``init_perms`` starts from given permutations (default: the
    identity); ``max_iter`` caps the sweeps.

    Example::

        spec = mlp_spec(["Dense_0", "Dense_1", "Dense_2"])
        result = weight_matching(spec, params_a, params_b, solver="scipy")
        aligned_b = apply_permutation(spec, result.perms, params_b)
    """
    _check_solver(solver)
    _check_positive("max_iter", max_iter)
    sizes = _check_pair(spec, params_a, params_b)
    perms = _initial(spec, params_a, sizes, init_perms)
    return _descend(spec, _float_leaves(spec, params_a), _float_leaves(spec, params_b),
                    perms, sizes, solver=solver, max_iter=max_iter, seed=seed)


# --- activation matching -----------------------------------------------------------------


def _match_correlations(spec: PermutationSpec, params_a: PyTree, params_b: PyTree,
                        correlations: Mapping[str, jax.Array], *, solver: str,
                        weight_fallback: bool, max_iter: int, seed: int) -> MatchResult:
    """One assignment per correlated permutation; the rest by weight matching."""
    sizes = spec.sizes(params_a)
    unknown = sorted(set(correlations) - set(sizes))
    if unknown:
        raise MergeError(f"features_fn gives activations for {unknown}, which the spec does "
                         f"not have; its permutations are {sorted(sizes)}")
    rest = sorted(set(sizes) - set(correlations))
    if rest and not weight_fallback:
        raise MergeError(f"features_fn gives no activations for {rest}; add them, or pass "
                         "weight_fallback=True to match those by weights")
    perms = identity_permutations(spec, params_a)
    for p, corr in sorted(correlations.items()):
        if corr.shape != (sizes[p], sizes[p]):
            raise MergeError(f"features_fn gives {corr.shape[0]} units for {p!r}; the spec's "
                             f"axes have {sizes[p]}")
        perms[p] = solve_assignment(corr, solver)
    a, b = _float_leaves(spec, params_a), _float_leaves(spec, params_b)
    if rest:
        result = _descend(spec, a, b, perms, rest, solver=solver, max_iter=max_iter,
                          seed=seed)
        return result._replace(assignments=result.assignments + len(correlations))
    objective = float(_objective(spec, a, b, perms))
    return MatchResult(perms, 0, objective, (objective,), len(correlations))


def activation_matching(spec: PermutationSpec, params_a: PyTree, params_b: PyTree,
                        features_fn: FeaturesFn, inputs: Iterable[Any], *,
                        num_batches: int | None = None, solver: str = "device",
                        weight_fallback: bool = True, max_iter: int = 100,
                        seed: int = 0) -> MatchResult:
    """Per permutation, the assignment maximising the Pearson correlation of A's and B's
    unit activations on the same ``inputs`` (Git Re-Basin activation matching; the
    ``(n, n)`` block of `feature_correlations`, ``num_batches`` of ``inputs``).
    ``features_fn(params, batch) -> {permutation: (..., units)}`` (e.g.
    `mergejax.align.features.linen_features`). Permutations it gives no activations for
    are found by `weight_matching` (``max_iter``, ``seed``) with the activation-matched
    ones held fixed when ``weight_fallback``, and refused otherwise.

    Example::

        features_fn = linen_features(mlp, {"P_0": ("Dense_0", nn.relu),
                                           "P_1": ("Dense_1", nn.relu)})
        result = activation_matching(spec, a, b, features_fn, batches, num_batches=32)
    """
    _check_solver(solver)
    _check_positive("max_iter", max_iter)
    _check_pair(spec, params_a, params_b)
    stats = feature_correlations(features_fn, [params_a, params_b], inputs,
                                 num_batches=num_batches)
    return _match_correlations(spec, params_a, params_b,
                               {p: s.block(0, 1) for p, s in stats.items()}, solver=solver,
                               weight_fallback=weight_fallback, max_iter=max_iter, seed=seed)


# --- straight-through estimator ----------------------------------------------------------


def _with_floats(trained: Sequence[bool], leaves: Sequence[Any],
                 floats: Sequence[Any]) -> list[Any]:
    """``leaves`` with the ones marked ``trained`` replaced, in order, by ``floats``."""
    floats = iter(floats)
    return [next(floats) if t else x for t, x in zip(trained, leaves)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _ste_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, treedef: Any,
              trained: tuple[bool, ...], leaves_a: list[Any], theta: list[jax.Array],
              projected: list[jax.Array], state: Any, batch: Any):
    """One optimizer step on ``theta`` (the floating leaves of the B endpoint)."""

    def loss(theta):
        straight = [t + jax.lax.stop_gradient(p - t) for t, p in zip(theta, projected)]
        floats_a = [x for t, x in zip(trained, leaves_a) if t]
        mid = [((x + s) / 2).astype(x.dtype) for x, s in zip(floats_a, straight)]
        return loss_fn(jax.tree.unflatten(treedef, _with_floats(trained, leaves_a, mid)),
                       batch)

    value, grads = jax.value_and_grad(loss)(theta)
    updates, state = optimizer.update(grads, state, theta)
    return optax.apply_updates(theta, updates), state, value


def ste_matching(spec: PermutationSpec, params_a: PyTree, params_b: PyTree, loss_fn: LossFn,
                 batches: Iterable[Any], *, steps: int, learning_rate: float = 1e-3,
                 solver: str = "device", max_iter: int = 100, seed: int = 0) -> MatchResult:
    """Git Re-Basin's straight-through estimator: Adam (``learning_rate``) on ``theta~``,
    initialised at ``params_a``, minimising ``loss_fn((params_a + theta_b') / 2, batch)``
    with ``theta_b' = theta~ + stop_gradient(proj(theta~) - theta~)``, where
    ``proj(theta~)`` is ``params_b`` permuted by `weight_matching` to ``theta~``
    (warm-started from the previous step's permutations, ``seed + step``). Each of the
    ``steps`` steps draws one batch; running out raises. Returns the permutations of the
    step with the lowest loss, as the official code keeps (whose scripts use SGD with
    momentum 0.9 where the paper says Adam); ``history`` holds every step's loss.
    ``loss_fn(params, batch) -> scalar``; non-floating leaves are not trained.

    Example::

        result = ste_matching(spec, a, b, xent, itertools.cycle(train_batches), steps=500)
    """
    _check_solver(solver)
    _check_positive("steps", steps)
    _check_positive("max_iter", max_iter)
    sizes = _check_pair(spec, params_a, params_b)
    optimizer = cached_adam(float(learning_rate))
    leaves_a, treedef = jax.tree.flatten(params_a)
    trained = tuple(is_float(x) for x in leaves_a)
    theta = [x for t, x in zip(trained, leaves_a) if t]
    state = optimizer.init(theta)
    a, b = _float_leaves(spec, params_a), _float_leaves(spec, params_b)
    perms = identity_permutations(spec, params_a)
    iterator = iter(batches)
    losses: list[float] = []
    best_loss, best = np.inf, perms
    assignments = 0
    for step in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise MergeError(f"ste_matching: the batches ran out after {step} of {steps} "
                             "steps") from None
        theta_tree = jax.tree.unflatten(treedef, _with_floats(trained, leaves_a, theta))
        projection = _descend(spec, _float_leaves(spec, theta_tree), b, perms, sizes,
                              solver=solver, max_iter=max_iter, seed=seed + step)
        perms, assignments = projection.perms, assignments + projection.assignments
        projected = [x for t, x in zip(trained, jax.tree.leaves(
            apply_permutation(spec, perms, params_b))) if t]
        theta, state, loss = _ste_step(loss_fn, optimizer, treedef, trained, leaves_a, theta,
                                       projected, state, batch)
        loss = float(loss)
        if not np.isfinite(loss):
            raise MergeError(f"ste_matching: non-finite loss {loss} at step {step}; lower "
                             "learning_rate")
        losses.append(loss)
        if loss < best_loss:
            best_loss, best = loss, perms
    return MatchResult(best, steps, float(_objective(spec, a, b, best)), tuple(losses),
                       assignments)


# --- registered merges: align every model to the first, then average ---------------------


def _check_models(models: Sequence[PyTree]) -> list[PyTree]:
    models = list(models)
    if len(models) < 2:
        raise MergeError(f"aligning needs at least two models, got {len(models)}")
    check_compatible(models[0], models, reference_name="models[0]", other_name="models")
    return models


def _aligned_average(spec: PermutationSpec, models: list[PyTree],
                     match: Callable[[PyTree, PyTree, int], MatchResult],
                     weights: Any) -> PyTree:
    """``linear`` average of ``models[0]`` and every other model aligned to it by
    ``match(models[0], models[k], k)``."""
    aligned = [models[0]] + [apply_permutation(spec, match(models[0], m, k).perms, m)
                             for k, m in enumerate(models[1:], start=1)]
    return linear(None, aligned, weights=weights)


def weight_matching_merge(base: PyTree | None, models: Sequence[PyTree], *,
                          spec: PermutationSpec, solver: str = "device", max_iter: int = 100,
                          seed: int = 0, weights: Any = None) -> PyTree:
    """Aligns every model to ``models[0]`` by `weight_matching` (each pair on its own),
    then averages them (``weights``: as `linear`'s, normalised; None is uniform).
    ``base`` is ignored: the models need no common ancestor.

    Example::

        merged = mergejax.merge("weight_matching", None, [a, b], spec=spec)
    """
    del base
    return _aligned_average(spec, _check_models(models), lambda a, b, k: weight_matching(
        spec, a, b, solver=solver, max_iter=max_iter, seed=seed), weights)


def activation_matching_merge(base: PyTree | None, models: Sequence[PyTree], *,
                              spec: PermutationSpec, features_fn: FeaturesFn,
                              inputs: Iterable[Any], num_batches: int = 16,
                              solver: str = "device", seed: int = 0,
                              weights: Any = None) -> PyTree:
    """Aligns every model to ``models[0]`` by `activation_matching` (the statistics of all
    models from one pass over ``num_batches`` of ``inputs``; permutations without
    activations by weights), then averages as `weight_matching_merge`. ``base`` is ignored.

    Example::

        merged = mergejax.merge("activation_matching", None, [a, b], spec=spec,
                                features_fn=features_fn, inputs=batches)
    """
    del base
    _check_solver(solver)
    models = _check_models(models)
    stats = feature_correlations(features_fn, models, inputs, num_batches=num_batches)
    return _aligned_average(spec, models, lambda a, b, k: _match_correlations(
        spec, a, b, {p: s.block(0, k) for p, s in stats.items()}, solver=solver,
        weight_fallback=True, max_iter=100, seed=seed), weights)


def ste_matching_merge(base: PyTree | None, models: Sequence[PyTree], *,
                       spec: PermutationSpec, loss_fn: LossFn, batches: Iterable[Any],
                       steps: int, learning_rate: float = 1e-3, solver: str = "device",
                       seed: int = 0, weights: Any = None) -> PyTree:
    """Aligns every model to ``models[0]`` by `ste_matching` (``steps`` batches per pair,
    drawn in turn from ``batches``), then averages as `weight_matching_merge`. ``base`` is
    ignored.

    Example::

        merged = mergejax.merge("ste_matching", None, [a, b], spec=spec, loss_fn=xent,
                                batches=itertools.cycle(train_batches), steps=200)
    """
    del base
    iterator = iter(batches)
    return _aligned_average(spec, _check_models(models), lambda a, b, k: ste_matching(
        spec, a, b, loss_fn, iterator, steps=steps, learning_rate=learning_rate,
        solver=solver, seed=seed), weights)


for _name, _fn in (("weight_matching", weight_matching_merge),
                   ("activation_matching", activation_matching_merge),
                   ("ste_matching", ste_matching_merge)):
    registry.register(registry.FunctionMethod(_name, _fn, family="alignment", paper=_PAPER,
                                              needs_base=False))
