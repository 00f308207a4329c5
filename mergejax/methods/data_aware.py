"""Merges weighted by statistics of each task's data: Fisher merging, RegMean, RegMean++.

* ``fisher``: per entry ``sum_i c_i F_i theta_i / sum_i c_i F_i`` with diagonal Fishers
  ``F_i`` (Matena & Raffel 2022, arXiv 2111.09832).
* ``regmean``: per dense kernel the least-squares merge
  ``W = (sum_i G~_i)^-1 sum_i G~_i W_i`` with the input Gram matrices ``G_i`` of each task
  (Jin et al. 2023, arXiv 2212.09849).
* ``regmean_pp``: RegMean layer by layer, each layer's Grams taken from the inputs that the
  already merged earlier layers produce (Nguyen et al. 2025, arXiv 2508.03121).

The statistics come from `mergejax.statistics` (`diagonal_fisher`, `dense_input_grams`,
`task_fishers`, `task_grams`), one per model, in the models' order. Each merge is one
``jax.jit`` over the leaves (coefficients traced, so sweeping ``alpha`` or ``weights`` never
recompiles); non-floating leaves are copied from the base (or the first model). The
statistics are checked inside the same compiled call: non-finite (or negative Fisher)
statistics raise `MergeError` naming the model and the path.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax.methods import matrices
from mergejax.statistics import Gram, dense_input_grams
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    is_float,
)

__all__ = ["DEFAULT_LAYERS", "fisher", "regmean", "regmean_pp"]

REQUIRED = registry.REQUIRED

#: RegMean++'s default "layer": a transformer block, the first path segment such as
#: ``resblocks_3``, ``layers_3``, ``layers/3``, ``layer_3``, ``block_3``, ``blocks_3`` or
#: ``h/3`` (GPT-2); dense layers outside any block form their own group.
DEFAULT_LAYERS = r"(?:^|/)(?:resblocks|layers|layer|blocks|block|h)[_/]?\d+(?=/|$)"


# ---------------------------------------------------------------------------------------
# Checks shared by the three merges.


def _check_models(name: str, base: PyTree | None,
                  models: Sequence[PyTree]) -> tuple[list[PyTree], PyTree]:
    if isinstance(models, dict) or not isinstance(models, Sequence) or not models:
        raise MergeError(f"{name}: models must be a non-empty list of pytrees")
    models = list(models)
    if base is not None:
        check_compatible(base, models)
    else:
        check_compatible(models[0], models[1:], reference_name="models[0]")
    return models, (base if base is not None else models[0])


def _per_model(name: str, what: str, value: Any, k: int) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise MergeError(f"{name}: {what} must be a list with one entry per model, got "
                         f"{type(value).__name__}")
    if len(value) != k:
        raise MergeError(f"{name}: got {len(value)} {what} for {k} models; give one per "
                         "model, in the models' order")
    return list(value)


def _number(name: str, what: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            low <= float(value) <= high):
        raise MergeError(f"{name}: {what} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _first_bad(name: str, flags: Any, labels: list[str]) -> None:
    """Raises for the first False in ``flags`` (a flat bool array), naming its label."""
    bad = np.flatnonzero(~np.asarray(jax.device_get(flags)).reshape(-1))
    if bad.size:
        raise MergeError(f"{name}: {labels[bad[0]]} ({bad.size} problem(s) in all)")


def _compute_dtype(x: jax.Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


# ---------------------------------------------------------------------------------------
# Fisher merging.


@functools.partial(jax.jit, static_argnames=("normalize",))
def _fisher_merge(thetas, fishers, weights, min_fisher, *, normalize: bool):
    """Merged leaves, then flags: each statistic finite and >= 0, each output finite."""
    stats = [fs for fs in fishers if fs is not None]
    flags = [jnp.all(jnp.isfinite(f) & (f >= 0)) for fs in stats for f in fs]
    coef = weights
    if normalize:  # FusionBench normalize_fisher_weight: c_i ~ w_i / (||F_i|| + eps)
        norms = jnp.sqrt(sum(jnp.stack([jnp.sum(jnp.square(f)) for f in fs]) for fs in stats))
        inverse = 1.0 / (norms + min_fisher)
        coef = weights * inverse / jnp.sum(inverse)
    outs = []
    for xs, fs in zip(thetas, fishers):
        cdt = _compute_dtype(xs[0])
        xs = [x.astype(cdt) for x in xs]
        if fs is None:  # no Fisher: the weighted average (a constant Fisher)
            out = sum(w * x for w, x in zip(weights, xs)) / jnp.sum(weights)
        else:
            scaled = [c * (f.astype(cdt) + min_fisher) for c, f in zip(coef, fs)]
            out = sum(s * x for s, x in zip(scaled, xs)) / sum(scaled)
        outs.append(out)
    flags += [jnp.all(jnp.isfinite(out)) for out in outs]
    return outs, jnp.stack(flags)


def _fisher_leaves(name: str, stat: PyTree, i: int, shapes: dict[str, tuple[int, ...]]
                   ) -> dict[str, Any]:
    paths, leaves, _ = flatten_with_paths(stat)
    out = {}
    for path, leaf in zip(paths, leaves):
        if path not in shapes:
            raise MergeError(f"{name}: fishers[{i}] has '{path}', which is not a floating "
                             "leaf of the models")
        if np.shape(leaf) != shapes[path]:
            raise MergeError(f"{name}: fishers[{i}] at '{path}' has shape {np.shape(leaf)}, "
                             f"the parameter has {shapes[path]}")
        out[path] = jnp.asarray(leaf, jnp.float32)
    return out


def fisher(base: PyTree | None, models: Sequence[PyTree], *, fishers=REQUIRED, weights=None,
           min_fisher: float = 1e-6, normalize: bool = True,
           missing: str = "average") -> PyTree:
    """Fisher merging (Matena & Raffel 2022, arXiv 2111.09832, eq. 2): per entry
    ``sum_i c_i (F_i + min_fisher) theta_i / sum_i c_i (F_i + min_fisher)``.

    ``fishers``: one diagonal Fisher per model (`mergejax.statistics.diagonal_fisher` /
    `task_fishers`: a pytree like the params, None on leaves without a Fisher, or a flat
    ``{path: array}``). ``weights`` are the paper's ``lambda_i`` (default all 1), >= 0.
    Switches, FusionBench ``FisherMergingAlgorithm`` semantics (and defaults):

    * ``min_fisher`` is ``minimal_fisher_weight`` (1e-6), added to every Fisher entry;
    * ``normalize=True`` is ``normalize_fisher_weight``: ``c_i = w_i n_i / sum_j n_j`` with
      ``n_i = 1 / (||F_i|| + min_fisher)`` and ``||F_i||`` the L2 norm of model i's whole
      Fisher (over all leaves that have one), so that each model's Fisher has the same
      overall scale; ``normalize=False`` is the paper's ``c_i = w_i``. FusionBench's
      ``fisher_scaling_coefficients`` (uniform 1/K) are ``weights`` (a common factor cancels).
    * Floating leaves without a Fisher: ``missing="average"`` takes the weighted average
      (the merge with a constant Fisher); ``missing="base"`` keeps the base's value, as
      FusionBench does for parameters excluded by ``exclude_param_names_regex``.

    ``base`` may be None (the models themselves are merged). With equal Fishers the result
    is the weighted average (``linear``).

    Example::

        fishers = task_fishers(backbone_fn, fine_tuned, labelled, heads=heads, num_batches=8)
        merged = mergejax.merge("fisher", None, fine_tuned, fishers=fishers)
    """
    name = "fisher"
    models, ref = _check_models(name, base, models)
    k = len(models)
    stats = _per_model(name, "fishers", fishers, k)
    min_fisher = _number(name, "min_fisher", min_fisher, 0.0)
    if not isinstance(normalize, bool):
        raise MergeError(f"{name}: normalize must be True or False, got {normalize!r}")
    if missing not in ("average", "base"):
        raise MergeError(f"{name}: missing must be 'average' or 'base', got {missing!r}")
    if missing == "base" and base is None:
        raise MergeError(f"{name}: missing='base' needs a base model; got base=None")
    w = np.ones(k) if weights is None else np.asarray(
        _per_model(name, "weights", weights, k), np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise MergeError(f"{name}: weights must be finite, >= 0 and not all 0, got {w}")

    paths, ref_leaves, treedef = flatten_with_paths(ref)
    floating = [j for j, x in enumerate(ref_leaves) if is_float(x)]
    shapes = {paths[j]: np.shape(ref_leaves[j]) for j in floating}
    per_model = [_fisher_leaves(name, s, i, shapes) for i, s in enumerate(stats)]
    covered = set(per_model[0])
    for i, f in enumerate(per_model[1:], 1):
        if set(f) != covered:
            raise MergeError(f"{name}: fishers[{i}] covers other leaves than fishers[0]: "
                             f"{sorted(set(f) ^ covered)[:5]}")
    if not covered:
        raise MergeError(f"{name}: the fishers hold no leaf of the models")
    merged = [j for j in floating if missing == "average" or paths[j] in covered]
    model_leaves = [jax.tree.leaves(m) for m in models]
    thetas = [tuple(ml[j] for ml in model_leaves) for j in merged]
    fs = [tuple(f[paths[j]] for f in per_model) if paths[j] in covered else None
          for j in merged]
    outs, flags = _fisher_merge(thetas, fs, jnp.asarray(w, jnp.float32),
                                jnp.float32(min_fisher), normalize=normalize)
    labels = [f"fishers[{i}] at '{paths[j]}' is not finite or has negative entries"
              for j in merged if paths[j] in covered for i in range(k)]
    labels += [f"non-finite result at '{paths[j]}' (Fishers all zero there? use "
               "min_fisher > 0; or non-finite models)" for j in merged]
    _first_bad(name, flags, labels)
    leaves = list(ref_leaves)
    for j, out in zip(merged, outs):
        leaves[j] = out.astype(ref_leaves[j].dtype)
    return treedef.unflatten(leaves)


# ---------------------------------------------------------------------------------------
# RegMean.


@functools.partial(jax.jit, static_argnames=("splits",))
def _regmean_merge(thetas, grams, alpha, ridge, *, splits: tuple[int | None, ...]):
    """RegMean of every leaf with Grams (``splits[j]``: its matrix split), the plain mean
    of the others; then flags: each Gram finite, each output finite."""
    flags = [jnp.all(jnp.isfinite(g)) for gs in grams if gs is not None for g in gs]
    outs = []
    for xs, gs, split in zip(thetas, grams, splits):
        cdt = _compute_dtype(xs[0])
        xs = [x.astype(cdt) for x in xs]
        if gs is None:
            outs.append(sum(xs) / len(xs))
            continue
        # G~ = alpha G + (1 - alpha) diag(G) (+ ridge I): FusionBench reduce_non_diagonal
        eye = jnp.eye(gs[0].shape[0], dtype=cdt)
        reduced = [alpha * g + ((1.0 - alpha) * jnp.diagonal(g) + ridge) * eye
                   for g in (g.astype(cdt) for g in gs)]
        rhs = sum(g @ matrices.as_matrix(x, split) for g, x in zip(reduced, xs))
        outs.append(jnp.linalg.solve(sum(reduced), rhs).reshape(xs[0].shape))
    flags += [jnp.all(jnp.isfinite(out)) for out in outs]
    return outs, jnp.stack(flags)


def _split_for(shape: tuple[int, ...], d_in: int) -> int | None:
    """The smallest ``s`` with ``prod(shape[:s]) == d_in`` (a kernel's contracted axes
    lead its shape in Flax Linen and NNX), or None."""
    for s in range(1, len(shape)):
        if math.prod(shape[:s]) == d_in:
            return s
    return None


def _gram_matrix(name: str, gram: Any, i: int, path: str,
                 shapes: dict[str, tuple[int, ...]]) -> tuple[jax.Array, int]:
    """Model i's Gram at ``path`` as a float32 matrix (a `Gram` gives its mean) and the
    kernel's matrix split; `MergeError` for a path or size that does not fit."""
    if path not in shapes:
        raise MergeError(f"{name}: grams[{i}] has '{path}', which is not a floating leaf "
                         "of the models")
    matrix = gram.mean() if isinstance(gram, Gram) else jnp.asarray(gram)
    shape = shapes[path]
    d = matrix.shape[0] if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] else None
    split = _split_for(shape, d) if d is not None else None
    if split is None:
        raise MergeError(f"{name}: grams[{i}] at '{path}' has shape {tuple(matrix.shape)}; "
                         f"the kernel {shape} needs a square (d_in, d_in) Gram with d_in "
                         f"one of {[math.prod(shape[:s]) for s in range(1, len(shape))]}")
    return matrix.astype(jnp.float32), split


def _regmean_leaves(name: str, thetas: list[tuple[jax.Array, ...]], paths: list[str],
                    grams: list[Mapping[str, Any]], alpha: float, ridge: float,
                    shapes: dict[str, tuple[int, ...]]) -> list[jax.Array]:
    """RegMean of the leaves ``thetas`` (named ``paths``) given one Gram dict per model."""
    if not thetas:
        return []
    for i, g in enumerate(grams):
        if not isinstance(g, Mapping):
            raise MergeError(f"{name}: grams[{i}] must be a dict {{kernel path: Gram}}, got "
                             f"{type(g).__name__}")
        if set(g) != set(grams[0]):
            raise MergeError(f"{name}: grams[{i}] covers other kernels than grams[0]: "
                             f"{sorted(set(g) ^ set(grams[0]))[:5]}")
    per_leaf, splits = [], []
    for path in paths:
        if path in grams[0]:
            mats = [_gram_matrix(name, g[path], i, path, shapes) for i, g in enumerate(grams)]
            if len({s for _, s in mats}) != 1:
                raise MergeError(f"{name}: the grams at '{path}' differ in size between "
                                 "models")
            per_leaf.append(tuple(m for m, _ in mats))
            splits.append(mats[0][1])
        else:
            per_leaf.append(None)
            splits.append(None)
    outs, flags = _regmean_merge(thetas, per_leaf, jnp.float32(alpha), jnp.float32(ridge),
                                 splits=tuple(splits))
    labels = [f"grams[{i}] at '{p}' is not finite" for p in paths if p in grams[0]
              for i in range(len(grams))]
    labels += [f"non-finite result at '{p}': the sum of the Grams is singular there (an "
               "input feature never active?); use alpha < 1 or ridge > 0" for p in paths]
    _first_bad(name, flags, labels)
    return outs


def _regmean_hparams(name: str, alpha: Any, ridge: Any) -> tuple[float, float]:
    return _number(name, "alpha", alpha, 0.0, 1.0), _number(name, "ridge", ridge, 0.0)


def regmean(base: PyTree | None, models: Sequence[PyTree], *, grams=REQUIRED,
            alpha: float = 0.6, ridge: float = 0.0) -> PyTree:
    """RegMean (Jin et al. 2023, arXiv 2212.09849): every dense kernel ``W`` with a Gram
    becomes the minimiser of ``sum_i ||X_i W - X_i W_i||^2`` with regularised Grams,
    ``W = (sum_i G~_i)^-1 sum_i G~_i W_i``, ``G~ = alpha G + (1 - alpha) diag(G)``.

    ``grams``: one dict ``{kernel path: Gram}`` per model (`dense_input_grams` /
    `task_grams`; a `Gram` enters as its mean ``x^T x / rows``, a plain ``(d_in, d_in)``
    array as given). Kernels are Flax ``(in, out)``; a 3-D attention kernel is the matrix
    over its leading contracted axes (query/key/value ``(d, heads * head_dim)``, out
    ``(heads * head_dim, d)``), the split found from the Gram's size. Every other floating
    leaf (biases, norms, embeddings, kernels without a Gram) is the plain mean of the
    models, and ``base`` only supplies dtypes and non-floating leaves (may be None).

    Matches FusionBench ``RegMeanAlgorithm``: ``alpha`` is ``reduce_non_diagonal_ratio``
    (default 0.6 as its CLIP config; its base config says 0.1); Grams are means over rows
    (so each task weighs the same whatever its number of examples; with equal row counts,
    sums give the same merge, since a common factor cancels); FusionBench inverts the sum
    (``torch.inverse``), here it is solved (LU). ``ridge`` (not in FusionBench, default 0)
    adds ``ridge * I`` to every ``G~_i``, pulling towards the plain mean; a singular sum
    (an input feature zero for every task with ``alpha = 1``) raises `MergeError`.

    Example::

        grams = task_grams(backbone_fn, fine_tuned, batches, num_batches=8)
        merged = mergejax.merge("regmean", None, fine_tuned, grams=grams, alpha=0.6)
    """
    name = "regmean"
    models, ref = _check_models(name, base, models)
    grams = _per_model(name, "grams", grams, len(models))
    if isinstance(grams[0], Mapping) and not grams[0]:
        raise MergeError(f"{name}: grams[0] holds no kernel; nothing to merge by RegMean")
    alpha, ridge = _regmean_hparams(name, alpha, ridge)
    paths, ref_leaves, treedef = flatten_with_paths(ref)
    floating = [j for j, x in enumerate(ref_leaves) if is_float(x)]
    shapes = {paths[j]: np.shape(ref_leaves[j]) for j in floating}
    model_leaves = [jax.tree.leaves(m) for m in models]
    outs = _regmean_leaves(name, [tuple(ml[j] for ml in model_leaves) for j in floating],
                           [paths[j] for j in floating], grams, alpha, ridge, shapes)
    leaves = list(ref_leaves)
    for j, out in zip(floating, outs):
        leaves[j] = out.astype(ref_leaves[j].dtype)
    return treedef.unflatten(leaves)


# ---------------------------------------------------------------------------------------
# RegMean++.


def _groups(kernels: Iterable[str], layers: str | None) -> dict[str, list[str]]:
    """``{group prefix: kernel paths}`` in the order of each group's first kernel: the
    prefix matched by ``layers``, else the kernel's own module path."""
    pattern = re.compile(layers) if layers is not None else None
    groups: dict[str, list[str]] = {}
    for path in kernels:
        m = pattern.search(path) if pattern is not None else None
        prefix = path[:m.end()].rstrip("/") if m else path.rpartition("/")[0]
        if m and not path.startswith(prefix + "/"):
            raise MergeError(f"regmean_pp: layers matched '{prefix}' in '{path}', which does "
                             "not end at a '/'; the match must be whole path segments")
        groups.setdefault(prefix, []).append(path)
    return groups


def _group_of(path: str, prefixes: list[str]) -> int | None:
    for g, prefix in enumerate(prefixes):
        if path == prefix or path.startswith(prefix + "/") or not prefix:
            return g
    return None


def regmean_pp(base: PyTree | None, models: Sequence[PyTree], *, apply_fn=REQUIRED,
               batches=REQUIRED, alpha: float = 0.6, ridge: float = 0.0,
               layers: str | None = DEFAULT_LAYERS, num_batches: int | None = None) -> PyTree:
    """RegMean++ (Nguyen et al. 2025, arXiv 2508.03121): RegMean layer by layer, where the
    Grams of layer ``l`` for task ``i`` come from task i's data fed through the model whose
    layers before ``l`` are already merged (so later layers are merged for the inputs the
    merged model really produces).

    A "layer" is a group of dense layers: those whose kernel path matches ``layers`` (a
    regex; its first match is the group's prefix, default `DEFAULT_LAYERS`: transformer
    blocks), and each dense layer outside any block alone; groups run in the order of
    their first call. ``apply_fn(params, batch)`` is a Flax Linen model (as for
    `dense_input_grams`); ``batches`` one iterable per task, of which the first
    ``num_batches`` (None: all) are kept and reused for every group.

    Procedure (FusionBench ``RegMeanAlgorithmPlusPlus``): leaves outside every group
    (embeddings, the pre-block norm, ...) are averaged first. Then for each group ``l``:
    for each task ``i``, run ``apply_fn`` on task i's batches with the merged values for
    groups ``< l`` and the ungrouped leaves, and model i's own values elsewhere (so inside
    block ``l``, the Grams of later sub-layers come from model i's own block, as
    FusionBench runs task i's layer ``l`` on the merged prefix's outputs); merge group
    ``l`` by `regmean` (``alpha``, ``ridge``, Gram means) with those Grams, its other
    leaves by the plain mean. Differences: FusionBench caches each layer's inputs and
    leaves the final norm at its pretrained value; here the whole model runs for each
    group (``groups x tasks x batches`` forward passes) and every ungrouped leaf is
    averaged. ``base`` only supplies dtypes and non-floating leaves (may be None).

    Example::

        merged = mergejax.merge("regmean_pp", None, fine_tuned, apply_fn=backbone_fn,
                                batches=unlabelled_val, num_batches=8)
    """
    name = "regmean_pp"
    models, ref = _check_models(name, base, models)
    alpha, ridge = _regmean_hparams(name, alpha, ridge)
    if layers is not None:
        try:
            re.compile(layers)
        except (TypeError, re.error) as e:
            raise MergeError(f"{name}: layers must be a regex or None, got {layers!r}") from e
    if not callable(apply_fn):
        raise MergeError(f"{name}: apply_fn must be callable (apply_fn(params, batch))")
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int) or num_batches < 1):
        raise MergeError(f"{name}: num_batches must be a positive int or None, got "
                         f"{num_batches!r}")
    kept = [list(itertools.islice(iter(b), num_batches))
            for b in _per_model(name, "batch iterables", batches, len(models))]
    if not all(kept):
        raise MergeError(f"{name}: the batches of task(s) "
                         f"{[i for i, b in enumerate(kept) if not b]} are empty")
    paths, ref_leaves, treedef = flatten_with_paths(ref)
    floating = [j for j, x in enumerate(ref_leaves) if is_float(x)]
    shapes = {paths[j]: np.shape(ref_leaves[j]) for j in floating}
    model_leaves = [jax.tree.leaves(m) for m in models]

    def params_of(i: int, done: dict[int, jax.Array]) -> PyTree:
        return treedef.unflatten([done.get(j, leaf) for j, leaf in
                                  enumerate(model_leaves[i])])

    # The groups, in call order, from one batch of task 0; then group by group.
    groups = _groups(dense_input_grams(apply_fn, models[0], kept[0][:1]), layers)
    member = {j: _group_of(paths[j], list(groups)) for j in floating}
    done: dict[int, jax.Array] = {}
    for g, kernels in enumerate([None, *groups.values()]):
        leaves = [j for j in floating if member[j] == (None if kernels is None else g - 1)]
        grams = [{} for _ in models]  # ungrouped leaves first: the plain mean
        if kernels is not None:
            grams = [dense_input_grams(apply_fn, params_of(i, done), kept[i])
                     for i in range(len(models))]
            grams = [{p: task[p] for p in kernels} for task in grams]
        done.update(zip(leaves, _regmean_leaves(
            name, [tuple(ml[j] for ml in model_leaves) for j in leaves],
            [paths[j] for j in leaves], grams, alpha, ridge, shapes)))
    out = list(ref_leaves)
    for j, leaf in done.items():
        out[j] = leaf.astype(ref_leaves[j].dtype)
    return treedef.unflatten(out)


registry.register(registry.FunctionMethod(
    "fisher", fisher, family="data_aware", needs_base=False,
    paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging "
          "(arXiv 2111.09832)"))
registry.register(registry.FunctionMethod(
    "regmean", regmean, family="data_aware", needs_base=False,
    paper="Jin et al. 2023, Dataless knowledge fusion by merging weights of language "
          "models (arXiv 2212.09849)"))
registry.register(registry.FunctionMethod(
    "regmean_pp", regmean_pp, family="data_aware", needs_base=False,
    paper="Nguyen et al. 2025, RegMean++ (arXiv 2508.03121)"))
