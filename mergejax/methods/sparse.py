"""The sparse and sign-consensus family: TIES, DARE, DELLA, Breadcrumbs, MagMax.

All of them are presets of one pipeline over the task vectors ``tau_k = theta_k - theta_0``
of each leaf (mergekit's "generalized task arithmetic"), exposed whole as `sparse_merge`:

1. **sparsify** each ``tau_k``: ``"magnitude"`` (keep the top ``density`` by ``|tau|``),
   ``"random"`` (DARE: keep each entry with probability ``density``), ``"outliers"``
   (Breadcrumbs: drop the top ``gamma`` and the smallest, keep ``density``),
   ``"magprune"`` (DELLA: keep probability rising with the rank of ``|tau|`` in its row),
   or ``"none"``; then ``rescale`` what survives (see `stages.rescale_masked`);
2. **elect** a sign per entry from the weighted ``w_k tau_k``: ``"mass"`` (sign of the
   sum), ``"count"`` (sign of the sum of signs), or ``"none"`` (no consensus);
3. **combine**: with an election, the ``disjoint`` ``"mean"`` or ``"sum"`` of the agreeing
   entries; without one, ``sum_k w_k tau_k`` (divided by ``sum_k w_k`` if ``normalize``);
4. **scale**: ``theta_0 + scale * combined``.

Fidelity switches and which reference each setting matches:

* ``scope``: ``"global"`` ranks magnitudes over the whole model (TIES paper, FusionBench),
  ``"tensor"`` per leaf (mergekit). A global top-k is a model-wide reduction (two
  histogram passes over all leaves, `stages.global_threshold_passes`).
* ``topk``: ``"fusionbench"`` keeps ``|tau| >= `` the (int(d n)+1)-th largest magnitude
  (TIES paper code, FusionBench), ``"mergekit"`` the int(d n)-th. Ties at the threshold
  are kept (mergekit keeps exactly int(d n), choosing among equal values by sort order).
* ``disjoint``: ``"mean"`` (TIES paper; mergekit ``normalize: true``), ``"sum"``
  (FusionBench ``merge_func: sum``).
* ``rescale`` (DARE, DELLA): ``"density"`` divides by the keep probability (the papers),
  ``"l1"`` matches the tensor's L1 norm (current mergekit ``rescale: true``), ``"none"``.
* ``elect``: ``"mass"`` (TIES paper, mergekit ``consensus_method: sum``) or ``"count"``.
  A zero sum elects +1, as mergekit.

Masks from top-k and Bernoulli draws are constants for ``jax.grad``: gradients with
respect to ``weights`` and ``scale`` flow through the kept entries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax.method import REQUIRED, LeafContext, TensorThresholds, as_stored, leafwise
from mergejax.methods import stages
from mergejax.methods.masking import ModulatedMerge, modulated_merge
from mergejax.tree import MergeError

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus",
    "dare_linear",
    "dare_ties",
    "darex",
    "della",
    "della_linear",
    "localize_stitch",
    "magmax",
    "sparse_merge",
    "tall_masks",
    "ties",
    "ties_task_vector",
]

Array = jax.Array

# Stage settings of a preset that does not expose them (the pipeline's neutral values).
_STAGE_DEFAULTS = dict(sparsify="none", scope="tensor", density=1.0, gamma=0.0, epsilon=0.0,
                       rescale="none", topk="mergekit", elect="none", disjoint="mean",
                       normalize=False, rank_axis=-1)
_SPARSIFIERS = ("none", "magnitude", "random", "outliers", "magprune")
_MAGNITUDE_BASED = ("magnitude", "outliers")
_RANDOM = ("random", "magprune")


def _outlier_ranks(size: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, n_top + kept): Breadcrumbs drops the n_top largest magnitudes and keeps the
    next ``kept``; mergekit's ``magnitude_outliers`` counts, with n_top cut down so that
    ``density`` is reached."""
    kept = int(density * size)
    top = int(gamma * size)
    bottom = size - kept - top
    if bottom < 0:
        top += bottom
    return top, top + kept


def _ranks(size: int, *, sparsify: str, density: float, gamma: float,
           topk: str) -> tuple[int, ...]:
    """The 1-based magnitude ranks whose values are the thresholds of this leaf (or of the
    whole model when ``size`` is the model's size)."""
    if sparsify == "magnitude":
        return (stages.topk_rank(density, size, topk),)
    if sparsify == "outliers":
        return _outlier_ranks(size, density, gamma)
    return ()


def _settings(fixed: dict, hparams: dict) -> dict:
    """A preset's stage settings: neutral defaults, then what the preset fixes, then the
    user's hyperparameters."""
    return {**_STAGE_DEFAULTS, **fixed,
            **{k: v for k, v in hparams.items() if k in _STAGE_DEFAULTS}}


def _is_global(settings: dict) -> bool:
    """Whether these settings select a model-wide threshold."""
    return settings["scope"] == "global" and settings["sparsify"] in ("magnitude", "outliers")


def _global_ranks(ctx: LeafContext, settings: dict) -> tuple[int, ...]:
    if not _is_global(settings):
        return ()
    return _ranks(ctx.total_size, sparsify=settings["sparsify"], density=settings["density"],
                  gamma=settings["gamma"], topk=settings["topk"])


def _fixed(fixed: dict):
    """The settings function of a preset that fixes some stages."""
    return lambda hparams: _settings(fixed, hparams)


def _statistics(settings_fn):
    """The model-wide threshold passes of a method whose stage settings are
    ``settings_fn(hparams)`` (the passes do nothing for tensor scope)."""
    return stages.global_threshold_passes(
        lambda ctx, base, models, **hp: _magnitudes((base, *models)),
        lambda ctx, **hp: _global_ranks(ctx, settings_fn(hp)),
        lambda **hp: _is_global(settings_fn(hp)))


def _validator(settings_fn):
    def validate(paths: list[str], statics: list[dict]) -> None:
        _validate(paths, [settings_fn(s) for s in statics])
    return validate


def _validate(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        for name, allowed in (("sparsify", _SPARSIFIERS), ("scope", ("global", "tensor")),
                              ("elect", ("none", "mass", "count")),
                              ("disjoint", ("mean", "sum")),
                              ("rescale", ("none", "density", "l1", "l2", "linf")),
                              ("topk", ("mergekit", "fusionbench"))):
            if s[name] not in allowed:
                raise MergeError(f"{name} must be one of {allowed}, got {s[name]!r} "
                                 f"at '{path}'")
        stages.check_density(path, s["density"])
        if s["sparsify"] == "outliers" and not 0.0 <= s["gamma"] < 1.0:
            raise MergeError(f"gamma must be in [0, 1), got {s['gamma']!r} at '{path}'")
        if s["sparsify"] == "magprune":
            eps = s["epsilon"]
            if not (0.0 < s["density"] - eps and s["density"] + eps < 1.0):
                raise MergeError(
                    f"DELLA needs density - epsilon and density + epsilon in (0, 1); got "
                    f"density={s['density']}, epsilon={eps} at '{path}'")
    ranked = {(s["density"], s["gamma"], s["sparsify"], s["topk"]) for s in statics
              if s["sparsify"] in _MAGNITUDE_BASED and s["scope"] == "global"}
    if len(ranked) > 1:
        raise MergeError("scope='global' ranks magnitudes over the whole model, so density, "
                         "gamma, sparsify and topk must be the same for every leaf; use "
                         "scope='tensor' for per-leaf values")


def _magnitudes(inputs: tuple[Array, ...]) -> tuple[Array, ...]:
    """``|tau_k|`` from ``(base, *models)``, for the threshold selection, written
    ``|base - x|`` (equal to ``|x - base|``) so that XLA does not share it with the
    merge's ``x - base`` and materialise it."""
    base, *models = inputs
    return tuple(jnp.abs(base - x) for x in models)


def _prunes(sparsify: str, density: float) -> bool:
    """Whether the sparsifier removes anything (Breadcrumbs' outliers even at density 1)."""
    return sparsify != "none" and (density < 1.0 or sparsify == "outliers")


def _sparsified(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, sparsify: str,
                scope: str, density: float, gamma: float, epsilon: float, rescale: str,
                topk: str, rank_axis: int) -> tuple[Array, ...]:
    """The task vectors ``x_k - base`` after the sparsifier (and its rescale)."""
    taus = tuple(x - base for x in models)
    if not _prunes(sparsify, density):
        return taus
    if sparsify in _RANDOM:
        if ctx.key is None:
            raise MergeError(f"sparsify={sparsify!r} is random: pass key=jax.random.key(seed)")
        out = []
        for k, t in enumerate(taus):
            p = (density if sparsify == "random"
                 else stages.magprune_probabilities(t, density, epsilon, rank_axis))
            def draw(key, p=p, k=k, shape=t.shape):
                return stages.bernoulli_mask(key, p, shape, stream=k)
            # The norms of rescale="l1"/"l2"/"linf" draw the same mask from a key XLA
            # cannot identify with this one, so it hashes again there instead of writing
            # the mask out between the two passes (4096x1024, K=3: 33 -> 12 ms).
            out.append(stages.rescale_masked(
                t, draw(ctx.key), rescale, p,
                norms_mask=draw(jax.lax.optimization_barrier(ctx.key))))
        return tuple(out)
    masks = _magnitude_masks(ctx, base, models, sparsify=sparsify, scope=scope,
                             density=density, gamma=gamma, topk=topk)
    return tuple(stages.rescale_masked(t, m, rescale if rescale != "density" else "none")
                 for t, m in zip(taus, masks))


def _magnitude_masks(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                     sparsify: str, scope: str, density: float, gamma: float,
                     topk: str) -> tuple[Array, ...]:
    """The masks of a magnitude-based sparsifier ("magnitude" or "outliers") of the task
    vectors ``x_k - base``, with thresholds per leaf or, for ``scope="global"``, from the
    model-wide passes."""
    magnitudes = tuple(jnp.abs(x - base) for x in models)
    if scope == "global":
        ranks = _ranks(ctx.total_size, sparsify=sparsify, density=density, gamma=gamma,
                       topk=topk)
        thresholds = stages.global_thresholds(ctx, ranks, len(models))
    elif ctx.thresholds is not None:  # selected over the whole tensor (`_chunked`)
        thresholds = ctx.thresholds
    else:
        ranks = _ranks(base.size, sparsify=sparsify, density=density, gamma=gamma,
                       topk=topk)
        stored, upcast = as_stored(ctx, (base, *models))
        thresholds = stages.select_thresholds(stored, ranks,
                                              lambda inputs: _magnitudes(upcast(inputs)))
    if sparsify == "magnitude":
        return tuple(m >= thresholds[0, k] for k, m in enumerate(magnitudes))
    # outliers: drop the n_top largest magnitudes, keep the next ones down to ranks[1]
    return tuple((m >= thresholds[1, k]) & (m < thresholds[0, k])
                 for k, m in enumerate(magnitudes))


def sparse_task_vector(ctx: LeafContext, base: Array, models: tuple[Array, ...],
                       weights: Array, scale: Array, *, sparsify: str, scope: str,
                       density: float, gamma: float, epsilon: float, rescale: str, topk: str,
                       elect: str, disjoint: str, normalize: bool, rank_axis: int) -> Array:
    """The whole pipeline for one leaf: ``scale * combine(elect(sparsify(tau)))``."""
    taus = _sparsified(ctx, base, models, sparsify=sparsify, scope=scope, density=density,
                       gamma=gamma, epsilon=epsilon, rescale=rescale, topk=topk,
                       rank_axis=rank_axis)
    weighted = tuple(weights[k] * t for k, t in enumerate(taus))
    if elect == "none":
        combined = functools.reduce(jnp.add, weighted)
        if normalize:
            total = jnp.sum(weights)
            combined = combined / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
    else:
        sign = stages.elect_sign(weighted, elect)
        combined = stages.disjoint_combine(weighted, sign, mode=disjoint, weights=weights)
    return scale * combined


def _stored_magnitudes(stored: tuple[Array, ...]) -> tuple[Array, ...]:
    """`_magnitudes` of ``(base, *models)`` as stored, upcast as the engine does."""
    return _magnitudes(tuple(x.astype(jnp.promote_types(x.dtype, jnp.float32))
                             for x in stored))


def _chunked(settings_fn):
    """`leafwise`'s ``tensor_thresholds``: per-tensor magnitude and outlier trims without
    a norm-matching rescale are elementwise once their thresholds are known."""
    def spec(hparams):
        s = settings_fn(hparams)
        if (s["scope"] != "tensor" or s["sparsify"] not in _MAGNITUDE_BASED
                or s["rescale"] not in ("none", "density")
                or not _prunes(s["sparsify"], s["density"])):
            return None
        ranks = functools.partial(_ranks, sparsify=s["sparsify"], density=s["density"],
                                  gamma=s["gamma"], topk=s["topk"])
        return TensorThresholds(ranks, _stored_magnitudes)
    return spec


def _reshape_invariant(settings_fn):
    """`leafwise`'s ``reshape_invariant`` for stage settings ``settings_fn(hparams)``:
    magnitude and outlier trims (exact thresholds from counts), random masks (drawn by
    flat index), the rescales (`mergejax.fused_reduce` sums a canonical view), sign
    election and the disjoint combine depend on a tensor's entries, not its shape; DELLA's
    "magprune" ranks within rows."""
    return lambda hparams: settings_fn(hparams)["sparsify"] != "magprune"


def _preset(name: str, paper: str, *, uses_key: bool = False, **fixed):
    """`leafwise` for a preset of the pipeline; ``fixed`` are the stage settings it does
    not expose as hyperparameters (e.g. ``sparsify="magnitude"`` for TIES)."""
    return leafwise(name, family="sparse", paper=paper, coefficients=("weights", "scale"),
                    per_model=("weights",), uses_key=uses_key,
                    statistics=_statistics(_fixed(fixed)), validate=_validator(_fixed(fixed)),
                    reshape_invariant=_reshape_invariant(_fixed(fixed)),
                    tensor_thresholds=_chunked(_fixed(fixed)))


_TIES_PAPER = "Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)"
_DARE_PAPER = "Yu et al. 2024, Language models are Super Mario / DARE (arXiv 2311.03099)"
_DELLA_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)"
_BREADCRUMBS_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv 2312.06795)"


@leafwise("sparse_merge", family="sparse",
          paper="mergekit generalized task arithmetic; the stages of TIES / DARE / DELLA",
          coefficients=("weights", "scale"), per_model=("weights",), uses_key="optional",
          statistics=_statistics(_fixed({})), validate=_validator(_fixed({})),
          reshape_invariant=_reshape_invariant(_fixed({})),
          tensor_thresholds=_chunked(_fixed({})))
def sparse_merge(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                 weights=None, scale=1.0, sparsify: str = "magnitude", density: float = 1.0,
                 scope: str = "tensor", topk: str = "mergekit", gamma: float = 0.01,
                 epsilon: float = 0.15, rescale: str = "none", elect: str = "none",
                 disjoint: str = "mean", normalize: bool = False, rank_axis: int = -1) -> Array:
    """Any combination of the family's stages (module docstring); the presets below are
    this function with fixed defaults. Random sparsifiers need ``key=``.

    Example::

        # TIES with DARE's random pruning and count-based election:
        merged = mergejax.sparse_merge(base, fts, sparsify="random", density=0.3,
                                       rescale="density", elect="count",
                                       key=jax.random.key(0))
    """
    return base + sparse_task_vector(
        ctx, base, models, weights, scale, sparsify=sparsify, scope=scope, density=density,
        gamma=gamma, epsilon=epsilon, rescale=rescale, topk=topk, elect=elect,
        disjoint=disjoint, normalize=normalize, rank_axis=rank_axis)


def _pipeline(ctx, base, models, weights, scale, **stage_hparams):
    return base + sparse_task_vector(ctx, base, models, weights, scale,
                                     **{**_STAGE_DEFAULTS, **stage_hparams})


@_preset("ties", _TIES_PAPER, sparsify="magnitude")
def ties(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
         scale=1.0, density: float = 0.2, scope: str = "global", topk: str = "fusionbench",
         elect: str = "mass", disjoint: str = "mean") -> Array:
    """TIES-Merging: trim each task vector to its top ``density`` magnitudes, elect a sign
    per entry, average the agreeing entries (disjoint mean), add ``scale`` times that.

    Defaults follow the paper and its code (global top-20%, ``|tau| >= kthvalue``,
    sign of the sum, disjoint mean). FusionBench ``ties_merging``: ``disjoint="sum",
    scale=0.5``. mergekit ``ties``: ``scope="tensor", topk="mergekit"`` (its
    ``normalize: true`` is ``disjoint="mean"``, ``lambda`` is ``scale``).

    Example::

        merged = mergejax.ties(base, [ft_a, ft_b, ft_c], density=0.2, scale=1.0)
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="magnitude", scope=scope,
                     density=density, topk=topk, elect=elect, disjoint=disjoint)


@leafwise("ties_task_vector", family="sparse", paper=_TIES_PAPER, register=False,
          statistics=_statistics(_fixed({"sparsify": "magnitude"})),
          validate=_validator(_fixed({"sparsify": "magnitude"})))
def ties_task_vector(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                     task: int = 0, density: float = 0.2, scope: str = "global",
                     topk: str = "fusionbench", elect: str = "mass") -> Array:
    """``theta_0 + tau_hat_task``: task ``task``'s vector after TIES's trim and sign
    election (its entries that survive the top-``density`` trim and agree with the elected
    sign, zero elsewhere), as the AdaMerging++ code's ``ties_merging_split`` (not summed).
    Not registered (it returns one task's model, not a merge).

    Example::

        processed = [ties_task_vector(base, fts, task=t) for t in range(len(fts))]
    """
    if not 0 <= task < len(models):
        raise MergeError(f"task must be in [0, {len(models)}), got {task!r}")
    taus = _sparsified(ctx, base, models, sparsify="magnitude",
                       scope=scope, density=density, gamma=0.0, epsilon=0.0, rescale="none",
                       topk=topk, rank_axis=-1)
    sign = stages.elect_sign(taus, elect)
    return base + jnp.where(jnp.sign(taus[task]) == sign, taus[task], 0.0)


@_preset("dare_linear", _DARE_PAPER, uses_key=True, sparsify="random")
def dare_linear(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
                scale=1.0, density: float = 0.5, rescale: str = "density",
                normalize: bool = False) -> Array:
    """DARE with task arithmetic: drop each task-vector entry with probability
    ``1 - density``, rescale the survivors by ``1 / density`` (``rescale="density"``,
    the paper; ``"l1"`` is current mergekit's norm-matching ``rescale: true``), then
    ``theta_0 + scale * sum_k w_k tau_k``. The mask of task k at a leaf comes from
    `stages.bernoulli_mask` with the leaf's key (`mergejax.leaf_key`) and stream k.

    Example::

        merged = mergejax.dare_linear(base, fts, density=0.1, key=jax.random.key(0))
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="random", density=density,
                     rescale=rescale, normalize=normalize)


@_preset("dare_ties", _DARE_PAPER, uses_key=True, sparsify="random")
def dare_ties(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
              scale=1.0, density: float = 0.5, rescale: str = "density", elect: str = "mass",
              disjoint: str = "sum") -> Array:
    """DARE's random drop and rescale, then TIES's sign election and disjoint combination.
    Defaults as mergekit ``dare_ties`` (``normalize: false``, i.e. ``disjoint="sum"``)
    except the rescale, which is the paper's ``1 / density`` (``"l1"`` for mergekit).

    Example::

        merged = mergejax.dare_ties(base, fts, density=0.3, key=jax.random.key(0))
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="random", density=density,
                     rescale=rescale, elect=elect, disjoint=disjoint)


@_preset("breadcrumbs", _BREADCRUMBS_PAPER, sparsify="outliers")
def breadcrumbs(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
                scale=1.0, density: float = 0.9, gamma: float = 0.01,
                scope: str = "tensor") -> Array:
    """Model Breadcrumbs: per leaf, drop the ``gamma`` fraction of largest-magnitude
    task-vector entries (outliers) and the smallest ones, keeping a ``density`` fraction,
    then task arithmetic. Counts as mergekit ``breadcrumbs`` (``int(gamma n)`` dropped at
    the top, cut down if needed to reach ``int(density n)`` kept), except that mergekit
    keeps nothing when ``int(gamma n) == 0`` (its slice ``[n_bot:-0]`` is empty); here no
    outlier is dropped then. Ties at the thresholds: kept at the low one, dropped at the
    high one.

    Example::

        merged = mergejax.breadcrumbs(base, fts, density=0.9, gamma=0.01, scale=0.3)
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="outliers", scope=scope,
                     density=density, gamma=gamma)


@_preset("breadcrumbs_ties", _BREADCRUMBS_PAPER, sparsify="outliers")
def breadcrumbs_ties(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                     weights=None, scale=1.0, density: float = 0.9, gamma: float = 0.01,
                     scope: str = "tensor", elect: str = "mass",
                     disjoint: str = "sum") -> Array:
    """`breadcrumbs` followed by TIES's sign election and disjoint combination (mergekit
    ``breadcrumbs_ties``: sum consensus, ``normalize: false``, i.e. ``disjoint="sum"``).

    Example::

        merged = mergejax.breadcrumbs_ties(base, fts, density=0.9, gamma=0.01)
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="outliers", scope=scope,
                     density=density, gamma=gamma, elect=elect, disjoint=disjoint)


@_preset("della", _DELLA_PAPER, uses_key=True, sparsify="magprune")
def della(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
          scale=1.0, density: float = 0.7, epsilon: float = 0.15, rescale: str = "density",
          rank_axis: int = -1, elect: str = "mass", disjoint: str = "mean") -> Array:
    """DELLA-Merging: MAGPRUNE (keep each entry with probability between
    ``density - epsilon`` and ``density + epsilon``, rising with its magnitude's rank in
    its row), rescale, elect signs, disjoint mean (mergekit ``della``: sum consensus,
    ``normalize: true``).

    ``rescale="density"`` divides each survivor by its own keep probability (the paper
    and its code); mergekit uses ``"l1"`` (one L1-matching factor per tensor). mergekit
    ranks along dim 1 of PyTorch ``(out, in)`` weights: ``rank_axis=0`` for a Flax
    ``(in, out)`` kernel. Its ``epsilon`` (default 0.15) is the half-width used here.

    Example::

        merged = mergejax.della(base, fts, density=0.7, epsilon=0.15, key=jax.random.key(0))
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="magprune", density=density,
                     epsilon=epsilon, rescale=rescale, rank_axis=rank_axis, elect=elect,
                     disjoint=disjoint)


@_preset("della_linear", _DELLA_PAPER, uses_key=True, sparsify="magprune")
def della_linear(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
                 scale=1.0, density: float = 0.7, epsilon: float = 0.15,
                 rescale: str = "density", rank_axis: int = -1,
                 normalize: bool = False) -> Array:
    """MAGPRUNE and rescale (as `della`, with the same switches), then task arithmetic
    without sign election (mergekit ``della_linear``: ``normalize: false``).

    Example::

        merged = mergejax.della_linear(base, fts, density=0.7, key=jax.random.key(0))
    """
    return _pipeline(ctx, base, models, weights, scale, sparsify="magprune", density=density,
                     epsilon=epsilon, rescale=rescale, rank_axis=rank_axis,
                     normalize=normalize)




@leafwise("darex", family="sparse",
          paper="Deng et al. 2024, DARE the Extreme (arXiv 2410.09344)",
          coefficients=("weights", "scale", "q"), per_model=("weights",), uses_key=True,
          validate=_validator(_fixed({"sparsify": "random"})))
def darex(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
          scale=1.0, density: float = 0.01, q=REQUIRED, elect: str = "none",
          disjoint: str = "mean") -> Array:
    """DAREx-q: DARE for extreme drop rates. Each task-vector entry is kept with
    probability ``density`` (drop rate ``p = 1 - density``, typically 0.99) and the
    survivors are divided by ``q`` instead of DARE's ``1 - p``; ``q >= 1 - p`` shrinks
    them to undo the variance that breaks plain DARE at extreme rates. The paper picks
    ``q`` by a search on validation data (or on the change of the model's outputs); ``q``
    is a traced coefficient here, so a search over it compiles once
    (the suite's ``search`` does this). ``elect="mass"`` adds TIES's sign election.

    Example::

        merged = mergejax.darex(base, fts, density=0.01, q=0.05, key=jax.random.key(0))
    """
    taus = tuple(x - base for x in models)
    kept = tuple(stages.bernoulli_mask(ctx.key, density, t.shape, stream=k)
                 for k, t in enumerate(taus))
    weighted = tuple(weights[k] * jnp.where(m, t, 0.0) / q
                     for k, (t, m) in enumerate(zip(taus, kept)))
    if elect == "none":
        combined = functools.reduce(jnp.add, weighted)
    else:
        sign = stages.elect_sign(weighted, elect)
        combined = stages.disjoint_combine(weighted, sign, mode=disjoint, weights=weights)
    return base + scale * combined


@leafwise("magmax", family="sparse",
          paper="Marczak et al. 2024, MagMax (arXiv 2407.06322)", coefficients=("scale",))
def magmax(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
           scale=1.0) -> Array:
    """Per entry, the task-vector value of largest magnitude: ``theta_0 + scale *
    tau_{argmax_k |tau_k|}``. Equal magnitudes go to the later model, as the paper's code
    and FusionBench (whose default ``scaling_factor`` is 0.5).

    Example::

        merged = mergejax.magmax(base, [ft_a, ft_b, ft_c], scale=0.5)
    """
    del ctx
    best = models[0] - base
    for x in models[1:]:
        tau = x - base
        best = jnp.where(jnp.abs(tau) >= jnp.abs(best), tau, best)
    return base + scale * best


# ---------------------------------------------------------------------------------------
# TALL masks / Consensus, and Localize-and-Stitch: masks over the task vectors.

_TALL_PAPER = "Wang et al. 2024, Localizing task information / TALL masks (arXiv 2405.07813)"


def _multitask_settings(hparams: dict) -> dict:
    """Stage settings of the multi-task vector: a plain sum, or unscaled TIES with a
    disjoint sum (the TALL-masks code's ``use_ties``)."""
    ties_based = hparams.get("merged", "task_arithmetic") == "ties"
    return _settings({"sparsify": "magnitude" if ties_based else "none",
                      "topk": "fusionbench", "elect": "mass" if ties_based else "none",
                      "disjoint": "sum"}, hparams)


def _check_multitask(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        if s["merged"] not in ("task_arithmetic", "ties"):
            raise MergeError(f"merged must be 'task_arithmetic' or 'ties', got "
                             f"{s['merged']!r} at '{path}'")
    _validate(paths, [_multitask_settings(s) for s in statics])


def _multitask_vector(ctx: LeafContext, base: Array, models: tuple[Array, ...],
                      hparams: dict) -> Array:
    s = _multitask_settings(hparams)
    return sparse_task_vector(ctx, base, models, jnp.ones(len(models)), 1.0, **s)


def _tall_masks(taus: tuple[Array, ...], vector: Array, mask_lambda: Array
                ) -> tuple[Array, ...]:
    return tuple(jnp.abs(t) > mask_lambda * jnp.abs(vector - t) for t in taus)


@leafwise("consensus", family="sparse", paper=_TALL_PAPER,
          coefficients=("scale", "mask_lambda"), statistics=_statistics(_multitask_settings),
          validate=_check_multitask)
def consensus(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=0.3,
              mask_lambda=0.6, min_agree: int = 2, merged: str = "task_arithmetic",
              density: float = 0.2, scope: str = "global") -> Array:
    """Consensus merging: keep only the entries of the multi-task vector that at least
    ``min_agree`` tasks' TALL masks select.

    The multi-task vector ``tau_MTL`` is ``sum_t tau_t`` (``merged="task_arithmetic"``) or
    unscaled TIES with a disjoint sum (``merged="ties"``: top ``density`` per task over
    ``scope``). Task t's TALL mask is ``|tau_t| > mask_lambda * |tau_MTL - tau_t|``
    (strict, as the code). Result ``theta_0 + scale * [count >= min_agree] * tau_MTL``.
    The paper picks ``mask_lambda`` per task in [0.2, 0.6] and ``scale`` on validation
    data; FusionBench uses one ``tall_mask_lambda`` (0.6). Both are traced coefficients.

    Example::

        merged = mergejax.consensus(base, fts, min_agree=2, merged="ties", scale=0.5)
    """
    hp = dict(merged=merged, density=density, scope=scope)
    vector = _multitask_vector(ctx, base, models, hp)
    masks = _tall_masks(tuple(x - base for x in models), vector, mask_lambda)
    count = functools.reduce(jnp.add, (m.astype(jnp.int32) for m in masks))
    return base + scale * jnp.where(count >= min_agree, vector, 0.0)


@leafwise("_tall_vector", family="sparse", paper=_TALL_PAPER,
          statistics=_statistics(_multitask_settings), validate=_check_multitask,
          register=False)
def _tall_vector(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                 merged: str = "task_arithmetic", density: float = 0.2,
                 scope: str = "global") -> Array:
    return _multitask_vector(ctx, base, models, dict(merged=merged, density=density,
                                                     scope=scope))


def tall_masks(base, models, *, mask_lambda: float | Sequence[float] = 0.6,
               merged: str = "task_arithmetic", density: float = 0.2,
               scope: str = "global") -> ModulatedMerge:
    """TALL masks: per task, the entries of the multi-task vector that matter for it;
    task t's model is ``theta_0 + m_t * tau_MTL`` (`ModulatedMerge.task_model`).

    ``tau_MTL`` and the masks ``m_t = |tau_t| > mask_lambda_t * |tau_MTL - tau_t|`` are
    as in `consensus`; ``mask_lambda`` is one value or one per task (the paper picks each
    in [0.2, 0.6] on validation data). Rescalers are 1, as the code (and FusionBench's
    ``tall_mask_task_arithmetic``).

    Example::

        result = mergejax.tall_masks(base, fts, mask_lambda=0.4)
        params_a = result.task_model(0)
    """
    models = list(models)
    if isinstance(mask_lambda, (int, float)):
        lambdas = [float(mask_lambda)] * len(models)
    else:
        lambdas = [float(v) for v in mask_lambda]
        if len(lambdas) != len(models):
            raise MergeError(f"tall_masks: got {len(lambdas)} mask_lambda for "
                             f"{len(models)} models")
    vector = _tall_vector(base, models, merged=merged, density=density, scope=scope,
                          out_dtype=jnp.float32)
    leaf, rescalers = _tall_leaf(tuple(lambdas))
    return modulated_merge(base, models, "tall_masks", leaf, rescalers, extra=vector)


@functools.cache
def _tall_leaf(lambdas: tuple[float, ...]):
    """The leaf and rescaler functions of `tall_masks` (cached: they key its jit)."""
    lam = np.asarray(lambdas, np.float32)

    def leaf(b, xs, v):
        masks = tuple(jnp.abs(x - b) > lam[k] * jnp.abs(v - (x - b))
                      for k, x in enumerate(xs))
        return v, masks, jnp.zeros(())

    return leaf, lambda _: jnp.ones(len(lambdas), jnp.float32)


tall_masks.name = "tall_masks"
tall_masks.family = "sparse"
tall_masks.paper = _TALL_PAPER
tall_masks.hparams = {"mask_lambda": 0.6, "merged": "task_arithmetic", "density": 0.2,
                      "scope": "global"}
tall_masks.needs_base = True
tall_masks.keeps = "one task vector + a bit mask per task"
registry.register(tall_masks)


@leafwise("localize_stitch", family="sparse",
          paper="He et al. 2024, Localize-and-Stitch (arXiv 2408.13656)",
          statistics=_statistics(_fixed({"sparsify": "magnitude"})),
          validate=_validator(_fixed({"sparsify": "magnitude"})))
def localize_stitch(ctx: LeafContext, base: Array, models: tuple[Array, ...], *,
                    density: float = 0.1, scope: str = "global",
                    topk: str = "mergekit") -> Array:
    """Localize-and-Stitch, dataless: each task keeps its top ``density`` task-vector
    entries by magnitude over the whole model (``scope="global"``, the paper), and every
    entry becomes ``theta_0`` plus the mean of the selected tasks' values there
    (`stitch`). No scaling. The code keeps ``|tau| >`` the k-th largest (k - 1 entries);
    here ``>=`` (k entries, ties kept). The data-driven variant learns the masks:
    `mergejax.learn_masks` then `mergejax.stitch` (or `mergejax.localize_and_stitch`).

    Example::

        merged = mergejax.localize_stitch(base, [ft_a, ft_b, ft_c], density=0.05)
    """
    taus = tuple(x - base for x in models)
    masks = _magnitude_masks(ctx, base, models, sparsify="magnitude", scope=scope,
                             density=density, gamma=0.0, topk=topk)
    total = functools.reduce(jnp.add, (jnp.where(m, t, 0.0) for t, m in zip(taus, masks)))
    count = functools.reduce(jnp.add, (m.astype(jnp.float32) for m in masks))
    return base + total / jnp.maximum(count, 1.0)
