"""Task-vector geometry: how much fine-tuned models agree, where they conflict, and whether
their task vectors act independently.

* `cosine_similarity_matrix`: pairwise cosines of task vectors ``tau_t = theta_t -
  theta_0`` (task arithmetic, Ilharco et al. 2023, arXiv 2212.04089, reports them near 0:
  task vectors are close to orthogonal), with `plot_similarity`.
* `sign_conflict_rate`: how often the task vectors disagree in sign on an entry (the
  interference that TIES-Merging, Yadav et al. 2023, arXiv 2306.01708, resolves by electing
  a sign), per leaf or per layer; `norms_by_layer`: the L2 norms behind them.
* `weight_disentanglement_error`, `disentanglement_grid`, `plot_disentanglement`: the
  weight disentanglement of Ortiz-Jimenez et al. 2023 (arXiv 2305.12827): adding
  ``alpha_t tau_t`` for the other tasks should not change the model's predictions on task
  ``t``'s inputs.

Every function takes any pytrees (nested dicts of arrays, Flax ``params``); only floating
leaves are used, other leaves (step counters) are ignored. Reductions are jit-compiled and
accumulate in float32 (float64 when ``jax_enable_x64`` is on).

Example::

    import mergejax
    from mergejax.analysis import cosine_similarity_matrix, plot_similarity

    taus = mergejax.task_vectors(base, [ft_a, ft_b, ft_c])
    plot_similarity(cosine_similarity_matrix(taus), ["a", "b", "c"], path="cos.png")
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.analysis.plotting import new_axes, save_figure
from mergejax.rules import DEFAULT_LAYER_PATTERN, layer_index
from mergejax.tree import (
    MergeError,
    PyTree,
    apply_task_vector,
    check_compatible,
    flatten_with_paths,
    is_float,
    tree_weighted_sum,
)

__all__ = [
    "OUTSIDE_LAYERS",
    "cosine_similarity_matrix",
    "disentanglement_grid",
    "norms_by_layer",
    "plot_disentanglement",
    "plot_similarity",
    "sign_conflict_rate",
    "weight_disentanglement_error",
]

ApplyFn = Callable[[PyTree, Any], Any]
Distance = Callable[[Any, Any], Any]

#: The key under which ``by="layer"`` groups leaves whose path names no layer index.
OUTSIDE_LAYERS = "other"


def _accumulator() -> jnp.dtype:
    """float32, or float64 when ``jax_enable_x64`` is on."""
    return jnp.dtype(jnp.result_type(float))


def _check_trees(trees: Any, name: str, minimum: int) -> list[PyTree]:
    if isinstance(trees, (str, bytes, Mapping)) or not isinstance(trees, Sequence):
        raise MergeError(f"{name} must be a sequence of pytrees (one per task), got "
                         f"{type(trees).__name__}")
    trees = list(trees)
    if len(trees) < minimum:
        raise MergeError(f"{name} needs at least {minimum} pytrees, got {len(trees)}")
    check_compatible(trees[0], trees, reference_name=f"{name}[0]", other_name=name)
    return trees


def _float_leaves(trees: Sequence[PyTree], name: str) -> tuple[list[str], list[tuple]]:
    """The floating leaves' paths and, per leaf, the tuple of that leaf in every tree."""
    paths, leaves, _ = flatten_with_paths(trees[0])
    keep = [i for i, x in enumerate(leaves) if is_float(x)]
    if not keep:
        raise MergeError(f"{name}[0] has no floating leaves (paths: {paths[:5]})")
    per_tree = [jax.tree.leaves(t) for t in trees]
    return [paths[i] for i in keep], [tuple(ls[i] for ls in per_tree) for i in keep]


def _groups(paths: Sequence[str], by: str, layer_pattern: str) -> dict[str, list[int]]:
    """Leaf indices per group: one group per path (``"leaf"``), or per layer index found by
    ``layer_pattern`` (``"layer_<i>"`` in increasing ``i``, then `OUTSIDE_LAYERS`)."""
    if by == "leaf":
        return {p: [i] for i, p in enumerate(paths)}
    if by != "layer":
        raise MergeError(f"by must be 'leaf' or 'layer', got {by!r}")
    try:
        indices = [layer_index(p, layer_pattern) for p in paths]
    except (re.error, IndexError) as e:
        raise MergeError(f"invalid layer_pattern {layer_pattern!r} (a regex whose first "
                         f"group is the layer index): {e}") from e
    groups: dict[str, list[int]] = {}
    for layer in sorted({j for j in indices if j is not None}):
        groups[f"layer_{layer}"] = [i for i, j in enumerate(indices) if j == layer]
    outside = [i for i, j in enumerate(indices) if j is None]
    if outside:
        groups[OUTSIDE_LAYERS] = outside
    return groups


def _stacked(leaves: tuple) -> jax.Array:
    """``(T, size)``: one leaf of every tree, flattened, in the accumulation dtype."""
    return jnp.stack([x.reshape(-1).astype(_accumulator()) for x in leaves])


@jax.jit
def _gram(per_leaf: list[tuple]) -> jax.Array:
    total = 0.0
    for leaves in per_leaf:
        m = _stacked(leaves)
        total = total + jnp.matmul(m, m.T, precision=jax.lax.Precision.HIGHEST)
    return total


def cosine_similarity_matrix(task_vectors: Sequence[PyTree]) -> np.ndarray:
    """The ``(T, T)`` matrix of cosines ``<tau_i, tau_j> / (|tau_i| |tau_j|)`` between the
    task vectors, each flattened over all its floating leaves (one vector per model).
    Computed leaf by leaf as a Gram matrix (no copy of a whole flattened model), clipped
    to ``[-1, 1]``. A task vector that is all zeros has no direction: `MergeError`.

    Example::

        cos = cosine_similarity_matrix(mergejax.task_vectors(base, fts))
    """
    trees = _check_trees(task_vectors, "task_vectors", 2)
    _, per_leaf = _float_leaves(trees, "task_vectors")
    gram = np.asarray(_gram(per_leaf))
    norms = np.sqrt(np.diag(gram))
    zero = [i for i, n in enumerate(norms) if n == 0]
    if zero:
        raise MergeError(f"task_vectors {zero} are all zeros; their cosine similarity is "
                         "undefined")
    return np.clip(gram / np.outer(norms, norms), -1.0, 1.0)


def plot_similarity(matrix: Any, labels: Sequence[str], path: str | None = None,
                    ax: Any = None) -> Any:
    """Heatmap of a ``(T, T)`` similarity matrix with every value written in its cell and
    ``labels`` on both axes. Draws on ``ax`` or a new Agg figure; saves a png at ``path``
    when given; returns the matplotlib ``Figure``.

    Example::

        fig = plot_similarity(cos, ["cars", "dtd", "svhn"], path="cosine.png")
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise MergeError(f"plot_similarity needs a square matrix, got shape {matrix.shape}")
    if len(labels) != matrix.shape[0]:
        raise MergeError(f"got {len(labels)} labels for a {matrix.shape[0]}x"
                         f"{matrix.shape[0]} matrix")
    fig, ax = new_axes(ax)
    image = ax.imshow(matrix, cmap="viridis")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, [str(s) for s in labels], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(s) for s in labels])
    middle = (np.nanmax(matrix) + np.nanmin(matrix)) / 2
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="black" if v > middle else "white")
    return save_figure(fig, path)


@jax.jit
def _conflict_counts(per_leaf: list[tuple]) -> list[jax.Array]:
    counts = []
    for leaves in per_leaf:
        m = jnp.stack([x.reshape(-1) for x in leaves])
        counts.append(jnp.sum(jnp.any(m > 0, axis=0) & jnp.any(m < 0, axis=0)))
    return counts


def sign_conflict_rate(task_vectors: Sequence[PyTree], *, by: str = "leaf",
                       layer_pattern: str = DEFAULT_LAYER_PATTERN) -> dict[str, float]:
    """The fraction of entries with a sign conflict, per leaf path (``by="leaf"``) or per
    layer (``by="layer"``).

    An entry has a sign conflict when, among the T task vectors' values there, at least
    one is > 0 and at least one is < 0; zeros (and NaNs) take no side, so an entry where
    fewer than two tasks are nonzero never conflicts. This is TIES-Merging's notion
    (arXiv 2306.01708: a parameter with positive values in some task vectors and negative
    in others); TIES counts conflicts after trimming each task vector to its largest
    entries, so pass trimmed task vectors (zeros elsewhere) to reproduce its counts. The
    rate of a group is (conflicting entries) / (all entries) over its leaves.

    ``by="layer"`` groups the leaves by `mergejax.rules.layer_index` with
    ``layer_pattern``: keys ``"layer_0"``, ``"layer_1"``, ... and ``"other"`` for leaves
    outside the layers (embeddings, heads). Needs at least 2 task vectors.

    Example::

        rates = sign_conflict_rate(mergejax.task_vectors(base, fts), by="layer")
    """
    trees = _check_trees(task_vectors, "task_vectors", 2)
    paths, per_leaf = _float_leaves(trees, "task_vectors")
    groups = _groups(paths, by, layer_pattern)
    counts = [int(c) for c in _conflict_counts(per_leaf)]
    sizes = [int(np.size(leaves[0])) for leaves in per_leaf]
    return {key: sum(counts[i] for i in idx) / max(sum(sizes[i] for i in idx), 1)
            for key, idx in groups.items()}


@jax.jit
def _squared_norms(per_leaf: list[tuple]) -> list[jax.Array]:
    return [jnp.sum(jnp.square(_stacked(leaves)), axis=1) for leaves in per_leaf]


def norms_by_layer(trees: Sequence[PyTree], *, by: str = "leaf",
                   layer_pattern: str = DEFAULT_LAYER_PATTERN) -> dict[str, np.ndarray]:
    """The L2 norm of every tree's floating entries per leaf path (``by="leaf"``) or per
    layer (``by="layer"``, grouped as in `sign_conflict_rate`): ``{key: (T,) array}``,
    entry ``t`` the norm of tree ``t`` over that group. Works on task vectors and on
    params alike.

    Example::

        norms = norms_by_layer(mergejax.task_vectors(base, fts), by="layer")
        norms["layer_3"]   # one norm per task
    """
    trees = _check_trees(trees, "trees", 1)
    paths, per_leaf = _float_leaves(trees, "trees")
    groups = _groups(paths, by, layer_pattern)
    squares = [np.asarray(s, np.float64) for s in _squared_norms(per_leaf)]
    return {key: np.sqrt(sum(squares[i] for i in idx)) for key, idx in groups.items()}


def _prediction_error(single: jax.Array, merged: jax.Array) -> jax.Array:
    """Per-example ``1[argmax single != argmax merged]`` over the last axis."""
    return (jnp.argmax(single, axis=-1) != jnp.argmax(merged, axis=-1)).astype(
        _accumulator())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _xi(apply_fn: ApplyFn, distance: Distance, alphas: jax.Array, base: PyTree,
        taus: list[PyTree], inputs: list[Any]) -> jax.Array:
    merged = tree_weighted_sum(jnp.concatenate([jnp.ones((1,), alphas.dtype), alphas]),
                               [base, *taus])
    total = jnp.zeros((), _accumulator())
    for t, (tau, x) in enumerate(zip(taus, inputs)):
        single = apply_task_vector(base, tau, alphas[t])
        total = total + jnp.mean(distance(apply_fn(single, x), apply_fn(merged, x)))
    return total


def _check_disentanglement(apply_fn: ApplyFn, base: PyTree, taus: Any, inputs: Any,
                           distance: str | Distance) -> tuple[list, list, Distance]:
    if not callable(apply_fn):
        raise MergeError("apply_fn must be a function (params, inputs) -> outputs")
    taus = _check_trees(taus, "task_vectors", 2)
    check_compatible(base, taus, other_name="task_vectors")
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) \
            or len(inputs) != len(taus):
        got = f"{len(inputs)}" if isinstance(inputs, Sequence) else type(inputs).__name__
        raise MergeError(f"task_inputs must be a sequence of {len(taus)} input batches, one "
                         f"per task vector, got {got}")
    if distance == "prediction":
        distance = _prediction_error
    elif not callable(distance):
        raise MergeError(f"distance must be 'prediction' or a callable (outputs_a, "
                         f"outputs_b) -> distances, got {distance!r}")
    return taus, list(inputs), distance


def weight_disentanglement_error(apply_fn: ApplyFn, base: PyTree,
                                 task_vectors: Sequence[PyTree],
                                 task_inputs: Sequence[Any], *,
                                 coefficients: Any = 1.0,
                                 distance: str | Distance = "prediction") -> float:
    """The weight disentanglement error of Ortiz-Jimenez et al. (arXiv 2305.12827):

        xi(alpha) = sum_t E_{x in D_t} [ dist( f(x; theta_0 + alpha_t tau_t),
                                               f(x; theta_0 + sum_t' alpha_t' tau_t') ) ]

    ``f(x; params) = apply_fn(params, x)``; ``task_inputs[t]`` is a batch of task ``t``'s
    inputs (its examples along the leading axis), the expectation their mean.
    ``coefficients`` is one ``alpha`` for all tasks or one per task. ``dist`` is, by
    default (``"prediction"``), the paper's prediction error ``1[argmax f != argmax f']``
    over the outputs' last axis (logits); or a callable ``distance(outputs_single,
    outputs_merged)`` returning per-example distances (or their mean). 0 means the task
    vectors are perfectly disentangled at ``alpha``; with the prediction error the value
    lies in ``[0, T]``. ``apply_fn`` and ``distance`` are traced under ``jax.jit``.

    Example::

        taus = mergejax.task_vectors(base, [ft_a, ft_b])
        xi = weight_disentanglement_error(logits_fn, base, taus, [x_a, x_b],
                                          coefficients=0.5)
    """
    taus, inputs, distance = _check_disentanglement(apply_fn, base, task_vectors,
                                                    task_inputs, distance)
    alphas = jnp.broadcast_to(jnp.asarray(coefficients, _accumulator()), (len(taus),)) \
        if np.ndim(coefficients) == 0 else jnp.asarray(coefficients, _accumulator())
    if alphas.shape != (len(taus),):
        raise MergeError(f"coefficients must be one number or one per task ({len(taus)}), "
                         f"got shape {alphas.shape}")
    return float(_xi(apply_fn, distance, alphas, base, taus, inputs))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _xi_grid(apply_fn: ApplyFn, distance: Distance, pairs: jax.Array, base: PyTree,
             taus: list[PyTree], inputs: list[Any]) -> jax.Array:
    return jax.lax.map(lambda a: _xi(apply_fn, distance, a, base, taus, inputs), pairs)


def disentanglement_grid(apply_fn: ApplyFn, base: PyTree, tau_1: PyTree, tau_2: PyTree,
                         inputs_1: Any, inputs_2: Any, alphas: Any, *,
                         distance: str | Distance = "prediction") -> np.ndarray:
    """``grid[i, j] = xi(alpha_1 = alphas[i], alpha_2 = alphas[j])``: the two-task
    `weight_disentanglement_error` over a grid of coefficients, the map that
    Ortiz-Jimenez et al. plot (one compiled program; the points run one after another).

    Example::

        alphas = np.linspace(-3, 3, 21)
        grid = disentanglement_grid(logits_fn, base, tau_a, tau_b, x_a, x_b, alphas)
        plot_disentanglement(grid, alphas, path="xi.png")
    """
    taus, inputs, distance = _check_disentanglement(apply_fn, base, [tau_1, tau_2],
                                                    [inputs_1, inputs_2], distance)
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size < 1:
        raise MergeError(f"alphas must be a non-empty 1-D array, got shape {alphas.shape}")
    a1, a2 = np.meshgrid(alphas, alphas, indexing="ij")
    pairs = jnp.asarray(np.stack([a1.ravel(), a2.ravel()], axis=1), _accumulator())
    values = _xi_grid(apply_fn, distance, pairs, base, taus, inputs)
    return np.asarray(values, np.float64).reshape(alphas.size, alphas.size)


def plot_disentanglement(grid: Any, alphas: Any, path: str | None = None,
                         ax: Any = None) -> Any:
    """Heatmap of a `disentanglement_grid` with ``alpha_1`` on the x axis and ``alpha_2``
    on the y axis, as in Ortiz-Jimenez et al.'s figures. Draws on ``ax`` or a new Agg
    figure; saves a png at ``path`` when given; returns the matplotlib ``Figure``.

    Example::

        fig = plot_disentanglement(grid, alphas, path="xi.png")
    """
    grid = np.asarray(grid, np.float64)
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or grid.shape != (alphas.size, alphas.size):
        raise MergeError(f"grid must have shape (len(alphas), len(alphas)) = "
                         f"{(alphas.size,) * 2}, got {grid.shape}")
    fig, ax = new_axes(ax)
    mesh = ax.pcolormesh(alphas, alphas, grid.T, shading="nearest", cmap="magma_r")
    fig.colorbar(mesh, ax=ax, label="disentanglement error")
    ax.set_xlabel("alpha_1")
    ax.set_ylabel("alpha_2")
    ax.set_aspect("equal")
    return save_figure(fig, path)
