"""ZipIt! and MuDSC: merging models of different initialisations by zipping their features.

**ZipIt!** (Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without
Training", ICLR, arXiv 2305.03053; official code gstoica27/ZipIt, ``match_tensors_zipit``)
merges K models feature space by feature space. A feature space is a permutation of a
`mergejax.align.spec.PermutationSpec`: the ``n`` hidden units shared by the leaves (and
axes) that name it. From the correlation of the K models' units side by side (``K*n``
square, model k at ``[k*n:(k+1)*n]``, `mergejax.align.features.feature_correlations`) it
greedily merges the most correlated pair of features, *within or across* models, until
``n`` merged features are left (`zip_features`):

* every feature starts as its own group; the diagonal is never matched;
* each step merges the two groups with the highest similarity; the merged group keeps the
  smaller index (so merged features come in the order of their first member) and its
  similarity to any other group ``x`` becomes ``alpha * min(S[g, x], S[h, x])``
  ("repeated matching", paper §4.3: a merged feature may be matched again, its similarity
  decayed by ``alpha``); with ``alpha = 0`` there is no decay but a merged group is never
  matched with a group sharing one of its models (with two models a cross-model pair
  leaves the pool: matching without replacement);
* ``beta`` is the same-model budget: each model may make at most
  ``floor(beta * floor((K - 1) n / K))`` merges of two groups that both hold only its own
  features; when it is spent, such pairs are never matched again (nor, through the
  ``min``, any group formed from them).

The defaults ``alpha=0.3, beta=0.125`` are ``match_tensors_zipit``'s; the paper tunes
them per experiment on held-out data (the released scripts use ``a=1e-4, b=0.075`` for
CIFAR-50 ResNet-20 and ``a=0.7, b=0.15`` for the multi-dataset ResNet-50).

**Merge and unmerge matrices** (shapes ``(K, n, n)``): ``merge[k][j, i]`` is ``1/|g_j|``
when model k's unit ``i`` belongs to merged group ``g_j`` (M_k averages the group) and
``unmerge[k][i, j]`` is 1 then (U_k copies merged feature j back to each member). So
``sum_k merge[k] @ unmerge[k] = I``; for a permutation-only match ``unmerge[k]`` is a
permutation matrix and ``K * merge[k]`` its transpose.

**Applying them** (`apply_zip`): every leaf goes to the merged space of each zipped
feature space it touches: along a *producing* axis (kernel outputs, biases, norm scales,
embeddings) it is contracted with ``K * M_k``, along a *consuming* axis (kernel inputs,
``spec.consumers``) with ``U_k``; the merged leaf is the mean over the K models. For a
layer with one output space this is ZipIt's ``W = sum_k M_k W_k U_k``; biases and norm
parameters become the average of their matched features, and a leaf with no zipped output
(a classifier reading the last feature space) the average of its unmerged copies. When
every match is across models this is exactly "permute each model onto the merged order,
then average" (MuDSC's official merged state dict is this formula).

**Partial zipping** (paper §4.3): ``zip_perms`` names the feature spaces to zip (default
all). It must be a prefix of the network: a leaf producing a zipped space must have all
its permuted axes zipped. Leaves whose permuted axes are all zipped are merged once and
shared; every other leaf stays per model, model k's copy reading the merged features
through ``U_k`` on its zipped consuming axes; leaves no feature space touches (a
classifier bias) are averaged by a full zip and kept per model by a partial one. A full
zip returns one params pytree; a partial zip one per model (the shared leaves are the same
arrays in each), i.e. one backbone per task.

**MuDSC** (Xu et al. 2024, "Training-Free Pretrained Model Merging", CVPR, arXiv
2403.01753; official code zju-vipa/training_free_model_merging, ``WeightFusion``) matches
on a dual-space similarity ``S = balance * S_weight + (1 - balance) * S_act``
(`weight_similarity`, the official ``fix_rate``, default 0.5): ``S_act`` is the feature
correlation above, ``S_weight`` the Pearson correlation of the units' weight vectors, the
slices along the feature space of every leaf that names it (producing and consuming),
their other permuted axes mapped to the merged space by the current matrices of those
spaces. It starts from the activation-only matching and sweeps over the feature spaces
until no matching changes, then zips (``mode="zip"``, official ``a=0.5, b=1``) or
permutes every model onto model 0 (``mode="permute"``, a linear assignment on the cross
block) and applies the matrices as above. Multi-head layers need no group matching here:
`mergejax.align.spec.vit_spec` permutes whole heads (``P_heads``) and one head dimension
shared by all heads (``P_qk``, ``P_v``).

Matching runs on the host (NumPy: greedy zipping, SciPy's linear assignment); the
statistics, the weight similarities and the application of the matrices are jit-compiled.

**Deviations from the official code.** ZipIt!: a same-model merge is one of two groups
holding only that model's features (the official code compares the models of the groups'
first members, so a cross-model group can spend a budget), a budget of 0 allows no
same-model merge (the official code allows one before closing), ``alpha = 0`` blocks the
groups sharing a model with the merged one (the official code blocks index ranges that go
stale as columns are removed), a matching that gets stuck (possible with more than two
models) is an error, and merge weights are exactly ``1/|g|`` (the official code divides by
``|g| + 1e-5``). MuDSC: the sweeps visit the feature spaces in sorted order and stop at a
fixed point (the official code shuffles the order and keeps the sweep with the best mean
merged similarity, patience 5, at most 100), and every leaf of the spec enters the weight
vectors (the official code leaves BatchNorm running statistics out).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from mergejax import registry
from mergejax.align.features import FeaturesFn, feature_correlations
from mergejax.align.spec import PermutationSpec
from mergejax.tree import MergeError, PyTree, check_compatible, flatten_with_paths, is_float

__all__ = [
    "apply_zip",
    "mudsc",
    "mudsc_merge",
    "weight_similarity",
    "zip_features",
    "zipit",
    "zipit_merge",
]

_ZIPIT_PAPER = ("Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without "
                "Training (arXiv 2305.03053)")
_MUDSC_PAPER = "Xu et al. 2024, Training-Free Pretrained Model Merging (arXiv 2403.01753)"

#: Feature space name -> ``(K, n, n)`` merge or unmerge matrices.
Matrices = Mapping[str, Any]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_unit(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise MergeError(f"{name} must be in [0, 1], got {value!r}")


def _group_matrices(groups: Sequence[Sequence[int]], num_models: int,
                    n: int) -> tuple[jax.Array, jax.Array]:
    """``(merge, unmerge)`` of ``groups`` (lists of flat unit indices ``k*n + i``)."""
    merge = np.zeros((num_models, n, n))
    unmerge = np.zeros((num_models, n, n))
    for j, members in enumerate(groups):
        for unit in members:
            k, i = divmod(unit, n)
            merge[k, j, i] = 1.0 / len(members)
            unmerge[k, i, j] = 1.0
    return jnp.asarray(merge), jnp.asarray(unmerge)


def _check_similarity(similarity: Any, num_models: int) -> np.ndarray:
    s = np.array(similarity, dtype=np.float64)
    if num_models < 2:
        raise MergeError(f"zipping needs at least 2 models, got num_models={num_models}")
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] % num_models:
        raise MergeError(f"the similarity must be a square (K*n, K*n) matrix for K="
                         f"{num_models} models, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise MergeError("the similarity has non-finite entries (NaN features?)")
    return (s + s.T) / 2


def zip_features(correlation: Any, num_models: int, *, alpha: float = 0.3,
                 beta: float = 0.125) -> tuple[jax.Array, jax.Array]:
    """ZipIt!'s greedy matching of ``num_models`` models' features (module docstring):
    ``correlation`` is ``(K*n, K*n)``, model k's units at ``[k*n:(k+1)*n]``; returns the
    ``(K, n, n)`` ``(merge, unmerge)`` matrices of the ``n`` merged features.

    Example::

        stats = feature_correlations(features_fn, [a, b], batches, num_batches=16)
        merge, unmerge = zip_features(stats["P_0"].correlation(), 2)
    """
    s = _check_similarity(correlation, num_models)
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    size = s.shape[0]
    n = size // num_models
    np.fill_diagonal(s, -np.inf)
    members = [[i] for i in range(size)]
    masks = 1 << (np.arange(size) // n)  # bit k: the group holds a feature of model k
    pure = np.arange(size) // n  # the model a group's features all come from, or -1
    alive = np.ones(size, bool)
    budget = np.full(num_models, int(((num_models - 1) * n // num_models) * beta + 1e-4))

    def close_budget(model: int) -> None:
        own = np.flatnonzero(alive & (pure == model))
        s[np.ix_(own, own)] = -np.inf

    for model in np.flatnonzero(budget <= 0):
        close_budget(model)
    for _ in range((num_models - 1) * n):
        g, h = sorted(divmod(int(np.argmax(s)), size))
        if s[g, h] == -np.inf:
            raise MergeError(
                f"zipping is stuck with {int(alive.sum())} groups for {n} merged features: "
                f"the same-model budget (beta={beta}) and alpha={alpha} forbid every "
                "remaining pair (possible with more than 2 models); raise alpha or beta")
        within = pure[g] >= 0 and pure[g] == pure[h]
        row = np.minimum(s[g], s[h])
        members[g] += members[h]
        masks[g] |= masks[h]
        alive[h] = False
        if alpha > 0:
            row *= alpha
        else:
            row[(masks & masks[g]) != 0] = -np.inf
        s[g, :] = s[:, g] = row
        s[h, :] = s[:, h] = -np.inf
        if within:
            budget[pure[g]] -= 1
            if budget[pure[g]] <= 0:
                close_budget(pure[g])
        else:
            pure[g] = -1
    return _group_matrices([members[i] for i in np.flatnonzero(alive)], num_models, n)


def _permute_features(similarity: Any, num_models: int) -> tuple[jax.Array, jax.Array]:
    """Every model permuted onto model 0 (a linear assignment maximising the cross-block
    similarity, ZipIt's ``match_tensors_permute``), as ``(merge, unmerge)`` matrices."""
    s = _check_similarity(similarity, num_models)
    n = s.shape[0] // num_models
    groups = [[j] for j in range(n)]
    for k in range(1, num_models):
        rows, cols = optimize.linear_sum_assignment(s[:n, k * n:(k + 1) * n], maximize=True)
        for j, i in zip(rows, cols):
            groups[j].append(k * n + int(i))
    return _group_matrices(groups, num_models, n)


def _contract(x: jax.Array, axis: int, mat: jax.Array) -> jax.Array:
    """``x`` with ``axis`` replaced by ``mat @`` it (``mat`` is (new, old))."""
    y = jnp.tensordot(mat.astype(x.dtype), x, axes=([1], [axis]), precision=_HIGHEST)
    return jnp.moveaxis(y, 0, axis)


def _compute_dtype(x: jax.Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


def _zip_set(spec: PermutationSpec, zip_perms: Iterable[str] | None) -> tuple[str, ...]:
    """The sorted feature spaces to zip, checked to be a prefix of the network."""
    every = tuple(spec.perm_to_axes)
    if zip_perms is None:
        zipped = every
    else:
        if isinstance(zip_perms, str):
            raise MergeError(f"zip_perms must be a collection of feature space names, not "
                             f"the string {zip_perms!r}")
        zipped = tuple(sorted(set(zip_perms)))
        unknown = [p for p in zipped if p not in spec.perm_to_axes]
        if unknown:
            raise MergeError(f"zip_perms names feature spaces the spec does not have: "
                             f"{unknown}; it has {list(every)}")
        if not zipped:
            raise MergeError("zip_perms is empty: name at least one feature space to zip")
    for path, axes in spec.axes_to_perm.items():
        for axis, p in enumerate(axes):
            if p not in zipped or spec.is_consumer(path, axis):
                continue
            unzipped = [q for q in axes if q is not None and q not in zipped]
            if unzipped:
                raise MergeError(
                    f"zip_perms is not a prefix of the network: {path} produces the zipped "
                    f"feature space {p!r} but also carries unzipped {unzipped}; zip those "
                    f"too or leave {p!r} unzipped")
    return zipped


def _prepare(spec: PermutationSpec, models: Sequence[PyTree],
             zip_perms: Iterable[str] | None) -> tuple[list[PyTree], dict[str, int],
                                                       tuple[str, ...]]:
    models = list(models)
    if len(models) < 2:
        raise MergeError(f"zipping needs at least 2 models, got {len(models)}")
    check_compatible(models[0], models[1:], reference_name="models[0]", other_name="models")
    sizes = spec.sizes(models[0])
    return models, sizes, _zip_set(spec, zip_perms)


def _to_merged_space(spec: PermutationSpec, zipped: tuple[str, ...], path: str,
                     x: jax.Array, k: int, num_models: int, merges: Matrices,
                     unmerges: Matrices) -> jax.Array:
    """Model k's leaf with ``K * M_k`` on its zipped producing axes and ``U_k`` on its
    zipped consuming axes."""
    x = x.astype(_compute_dtype(x))
    for axis, p in enumerate(spec.axes_of(path)):
        if p in zipped:
            mat = (unmerges[p][k].T if spec.is_consumer(path, axis)
                   else num_models * merges[p][k])
            x = _contract(x, axis, mat)
    return x


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zip_leaves(spec: PermutationSpec, zipped: tuple[str, ...], models: tuple[PyTree, ...],
                merges: Matrices, unmerges: Matrices
                ) -> tuple[dict[str, jax.Array], list[dict[str, jax.Array]]]:
    full = len(zipped) == len(spec.perm_to_axes)
    num_models = len(models)
    flat = [flatten_with_paths(m) for m in models]
    shared: dict[str, jax.Array] = {}
    per_model: list[dict[str, jax.Array]] = [{} for _ in models]
    for i, path in enumerate(flat[0][0]):
        leaves = [f[1][i] for f in flat]
        named = [p for p in spec.axes_of(path) if p is not None]
        is_shared = full or (named and all(p in zipped for p in named))
        if not is_float(leaves[0]):
            if is_shared:
                shared[path] = leaves[0]
            else:
                for k, leaf in enumerate(leaves):
                    per_model[k][path] = leaf
            continue
        moved = [_to_merged_space(spec, zipped, path, leaf, k, num_models, merges, unmerges)
                 for k, leaf in enumerate(leaves)]
        if is_shared:
            shared[path] = (sum(moved) / num_models).astype(leaves[0].dtype)
        else:
            for k, leaf in enumerate(leaves):
                per_model[k][path] = moved[k].astype(leaf.dtype)
    return shared, per_model


def apply_zip(spec: PermutationSpec, models: Sequence[PyTree], merges: Matrices,
              unmerges: Matrices, zip_perms: Iterable[str] | None = None
              ) -> PyTree | list[PyTree]:
    """Zips ``models`` with given ``(K, n, n)`` merge/unmerge matrices per zipped feature
    space (module docstring; jit-compiled): one params pytree when every feature space of
    ``spec`` is zipped, else one per model (shared leaves are the same arrays).

    Example::

        merge, unmerge = zip_features(stats["P_0"].correlation(), 2)
        backbones = apply_zip(spec, [a, b], {"P_0": merge}, {"P_0": unmerge},
                              zip_perms=["P_0"])
    """
    models, sizes, zipped = _prepare(spec, models, zip_perms)
    num_models = len(models)
    for name, mats in (("merges", merges), ("unmerges", unmerges)):
        missing = [p for p in zipped if p not in mats]
        extra = sorted(set(mats) - set(zipped))
        if missing or extra:
            raise MergeError(f"{name} must give exactly the zipped feature spaces: missing "
                             f"{missing}, not zipped {extra}")
        for p in zipped:
            shape = np.shape(mats[p])
            if shape != (num_models, sizes[p], sizes[p]):
                raise MergeError(f"{name}[{p!r}] has shape {shape}; {num_models} models with "
                                 f"{sizes[p]} units need {(num_models, sizes[p], sizes[p])}")
    shared, per_model = _zip_leaves(spec, zipped, tuple(models),
                                    {p: jnp.asarray(merges[p]) for p in zipped},
                                    {p: jnp.asarray(unmerges[p]) for p in zipped})
    paths, _, treedef = flatten_with_paths(models[0])
    if len(zipped) == len(spec.perm_to_axes):
        return jax.tree.unflatten(treedef, [shared[p] for p in paths])
    return [jax.tree.unflatten(treedef, [shared[p] if p in shared else own[p] for p in paths])
            for own in per_model]


def _activation_correlations(models: list[PyTree], sizes: Mapping[str, int],
                             zipped: tuple[str, ...], features_fn: FeaturesFn,
                             inputs: Iterable[Any], num_batches: int
                             ) -> dict[str, np.ndarray]:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise MergeError(f"num_batches must be a positive int, got {num_batches!r}")
    stats = feature_correlations(features_fn, models, inputs, num_batches=num_batches)
    missing = [p for p in zipped if p not in stats]
    if missing:
        raise MergeError(f"features_fn gives no features for the zipped feature space(s) "
                         f"{missing}; it gives {sorted(stats)}")
    for p in zipped:
        if stats[p].mean.shape[0] != len(models) * sizes[p]:
            raise MergeError(f"features of {p!r} have {stats[p].mean.shape[0] // len(models)} "
                             f"units; the spec's axes have {sizes[p]}")
    return {p: np.asarray(stats[p].correlation(), np.float64) for p in zipped}


def _match(fn: Callable[..., tuple[jax.Array, jax.Array]], perm: str, similarity: Any,
           **kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """``fn(similarity, **kwargs)``, its errors naming the feature space."""
    try:
        return fn(similarity, **kwargs)
    except MergeError as e:
        raise MergeError(f"feature space {perm!r}: {e}") from None


def zipit(spec: PermutationSpec, models: Sequence[PyTree], features_fn: FeaturesFn,
          inputs: Iterable[Any], *, num_batches: int = 16, alpha: float = 0.3,
          beta: float = 0.125, zip_perms: Iterable[str] | None = None
          ) -> PyTree | list[PyTree]:
    """ZipIt! (module docstring): feature correlations of ``models`` on ``num_batches``
    batches of ``inputs`` (``features_fn(params, batch) -> {feature space: (..., units)}``),
    `zip_features` per zipped feature space, `apply_zip`. Returns one params pytree, or one
    per model when ``zip_perms`` zips a prefix of the network only.

    Example::

        features_fn = linen_features(mlp, {"P_0": "Dense_0", "P_1": "Dense_1"})
        merged = zipit(mlp_spec(["Dense_0", "Dense_1", "Dense_2"]), [a, b], features_fn,
                       iter(batches))
    """
    models, sizes, zipped = _prepare(spec, models, zip_perms)
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    correlations = _activation_correlations(models, sizes, zipped, features_fn, inputs,
                                            num_batches)
    mats = {p: _match(zip_features, p, c, num_models=len(models), alpha=alpha, beta=beta)
            for p, c in correlations.items()}
    return apply_zip(spec, models, {p: m for p, (m, _) in mats.items()},
                     {p: u for p, (_, u) in mats.items()}, zip_perms=zipped)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _weight_similarity(spec: PermutationSpec, models: tuple[PyTree, ...], perm: str,
                       merges: Matrices, unmerges: Matrices) -> jax.Array:
    num_models = len(models)
    rows = []
    for k, params in enumerate(models):
        paths, leaves, _ = flatten_with_paths(params)
        by_path = dict(zip(paths, leaves))
        parts = []
        for path, axis in spec.perm_to_axes[perm]:
            x = by_path[path].astype(_compute_dtype(by_path[path]))
            for other, p in enumerate(spec.axes_of(path)):
                if other != axis and p in merges:
                    mat = (num_models * merges[p][k] if spec.is_consumer(path, other)
                           else unmerges[p][k].T)
                    x = _contract(x, other, mat)
            parts.append(jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1))
        rows.append(jnp.concatenate(parts, axis=1))
    x = jnp.concatenate(rows)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    cov = jnp.matmul(x, x.T, precision=_HIGHEST) / x.shape[1]
    std = jnp.sqrt(jnp.diagonal(cov))
    return cov / jnp.maximum(jnp.outer(std, std), 1e-7)


def weight_similarity(spec: PermutationSpec, models: Sequence[PyTree], perm: str,
                      merges: Matrices | None = None,
                      unmerges: Matrices | None = None) -> jax.Array:
    """MuDSC's weight-space similarity of feature space ``perm``: the ``(K*n, K*n)``
    Pearson correlation (across weights) of the K models' units, each unit's vector the
    concatenated slices along ``perm`` of every leaf naming it, with each other permuted
    axis mapped to the merged space of its feature space when ``merges``/``unmerges`` give
    it (the official ``get_weight_vectors``: ``K * M_k`` along a consuming axis, ``U_k``
    along a producing one; axes of other feature spaces are left as they are).

    Example::

        s_w = weight_similarity(spec, [a, b], "P_1", {"P_0": merge}, {"P_0": unmerge})
    """
    models = list(models)
    if len(models) < 2:
        raise MergeError(f"weight_similarity needs at least 2 models, got {len(models)}")
    check_compatible(models[0], models[1:], reference_name="models[0]", other_name="models")
    sizes = spec.sizes(models[0])
    if perm not in sizes:
        raise MergeError(f"the spec has no feature space {perm!r}; it has {list(sizes)}")
    merges, unmerges = dict(merges or {}), dict(unmerges or {})
    if set(merges) != set(unmerges) or perm in merges:
        raise MergeError(f"merges and unmerges must give the same feature spaces, other than "
                         f"{perm!r}: got {sorted(merges)} and {sorted(unmerges)}")
    return _weight_similarity(spec, tuple(models), perm,
                              {p: jnp.asarray(m) for p, m in merges.items()},
                              {p: jnp.asarray(u) for p, u in unmerges.items()})


def mudsc(spec: PermutationSpec, models: Sequence[PyTree], features_fn: FeaturesFn,
          inputs: Iterable[Any], *, num_batches: int = 16, balance: float = 0.5,
          mode: str = "zip", alpha: float = 0.5, beta: float = 1.0,
          zip_perms: Iterable[str] | None = None, max_sweeps: int = 100
          ) -> PyTree | list[PyTree]:
    """MuDSC (module docstring): matching on ``balance * S_weight + (1 - balance) *
    S_act``, starting from the activation-only matching and sweeping over the zipped
    feature spaces (sorted) until a sweep changes no matching or ``max_sweeps`` sweeps;
    ``mode="zip"`` zips with ``alpha``/``beta`` (`zip_features`), ``"permute"`` permutes
    every model onto model 0. Returns what `zipit` returns.

    Example::

        merged = mudsc(spec, [a, b], features_fn, iter(batches), balance=0.5)
    """
    models, sizes, zipped = _prepare(spec, models, zip_perms)
    _check_unit("balance", balance)
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    if mode not in ("zip", "permute"):
        raise MergeError(f"mode must be 'zip' or 'permute', got {mode!r}")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise MergeError(f"max_sweeps must be a positive int, got {max_sweeps!r}")
    activation = _activation_correlations(models, sizes, zipped, features_fn, inputs,
                                          num_batches)
    match = (functools.partial(zip_features, num_models=len(models), alpha=alpha, beta=beta)
             if mode == "zip" else functools.partial(_permute_features,
                                                     num_models=len(models)))
    mats = {p: _match(match, p, c) for p, c in activation.items()}
    for _ in range(max_sweeps if balance > 0 else 0):
        changed = False
        for p in zipped:
            others = [q for q in zipped if q != p]
            s_w = weight_similarity(spec, models, p, {q: mats[q][0] for q in others},
                                    {q: mats[q][1] for q in others})
            new = _match(match, p, balance * np.asarray(s_w, np.float64)
                         + (1 - balance) * activation[p])
            changed |= not np.array_equal(new[1], mats[p][1])
            mats[p] = new
        if not changed:
            break
    return apply_zip(spec, models, {p: m for p, (m, _) in mats.items()},
                     {p: u for p, (_, u) in mats.items()}, zip_perms=zipped)


def _registry_form(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(spec, models, features_fn, inputs, **hparams)`` as a registry merge
    ``(base, models, *, spec, features_fn, inputs, **hparams)``, ``fn``'s defaults kept.
    ``base`` is ignored: ZipIt! and MuDSC merge models trained from different
    initialisations, without a shared pretrained model.

    Example::

        zipit_merge = _registry_form(zipit)
        zipit_merge(None, [a, b], spec=spec, features_fn=features_fn, inputs=batches)
    """

    def merge(base: PyTree | None, models: Sequence[PyTree], *, spec: PermutationSpec,
              features_fn: FeaturesFn, inputs: Iterable[Any], **hparams: Any) -> Any:
        del base
        return fn(spec, models, features_fn, inputs, **hparams)

    keyword = inspect.Parameter.KEYWORD_ONLY
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    sig = inspect.signature(fn)
    merge.__signature__ = sig.replace(parameters=[
        inspect.Parameter("base", positional), inspect.Parameter("models", positional),
        *(p.replace(kind=keyword) for name, p in sig.parameters.items() if name != "models")])
    merge.__name__ = merge.__qualname__ = f"{fn.__name__}_merge"
    merge.__doc__ = (f"`{fn.__name__}` in the registry's form ``(base, models, *, spec, "
                     f"features_fn, inputs, ...)``; ``base`` is ignored.\n\n{fn.__doc__}")
    return merge


zipit_merge = _registry_form(zipit)
mudsc_merge = _registry_form(mudsc)

for _fn, _name, _paper in ((zipit_merge, "zipit", _ZIPIT_PAPER),
                           (mudsc_merge, "mudsc", _MUDSC_PAPER)):
    registry.register(registry.FunctionMethod(_name, _fn, family="alignment", paper=_paper,
                                              needs_base=False))
