"""Activation statistics for feature matching: streaming correlations of every
permutation's units across models, from a user's batches.

Activation matching (Git Re-Basin, arXiv 2209.04836), ZipIt! (arXiv 2305.03053) and MuDSC
(arXiv 2403.01753) compare units by how their activations correlate on the same inputs.
The user says where the activations of each permutation's units are with a
``features_fn(params, batch) -> {permutation name: array (..., units)}``; every leading
axis is a sample (batch, tokens, pixels). `linen_features` builds one for a Flax Linen
module from its submodules' outputs, without changing the model's code.

`feature_correlations` streams batches once and accumulates, per permutation, the sums and
the cross-products of the K models' units side by side (a ``K*n``-square matrix), so
memory is bounded by the statistics, not the data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mergejax.tree import MergeError, PyTree

__all__ = ["FeatureCorrelation", "FeaturesFn", "feature_correlations", "linen_features"]

FeaturesFn = Callable[[PyTree, Any], Mapping[str, jax.Array]]


def linen_features(module: nn.Module, sources: Mapping[str, Any], *,
                   variables: Callable[[PyTree], PyTree] | None = None,
                   **apply_kwargs: Any) -> FeaturesFn:
    """A ``features_fn`` reading Flax Linen submodules' outputs (``capture_intermediates``).

    ``sources`` maps a permutation name to the `/`-joined path of the submodule whose
    output holds its units on the last axis (e.g. ``"resblocks_0/mlp_fc"``), to a list of
    such paths (their outputs are pooled as more samples of the same units: a residual
    stream read after every block), or to ``(path or paths, fn)`` with ``fn`` applied to
    each output first (e.g. ``nn.gelu`` for post-activation features). ``variables``
    turns ``params`` into the ``apply`` variables (default ``{"params": params}``).

    Example::

        features_fn = linen_features(model, {"P_0": ("Dense_0", nn.relu),
                                             "P_1": ("Dense_1", nn.relu)})
    """
    wanted: dict[str, tuple[tuple[str, ...], Callable[[jax.Array], jax.Array] | None]] = {}
    for perm, source in sources.items():
        fn = None
        if isinstance(source, tuple) and len(source) == 2 and callable(source[1]):
            source, fn = source
        paths = (source,) if isinstance(source, str) else tuple(source)
        wanted[perm] = (paths, fn)
    all_paths = {p for paths, _ in wanted.values() for p in paths}
    to_variables = variables or (lambda params: {"params": params})

    def capture(mdl: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and "/".join(mdl.scope.path) in all_paths

    def features_fn(params: PyTree, batch: Any) -> dict[str, jax.Array]:
        _, state = module.apply(to_variables(params), batch, capture_intermediates=capture,
                                mutable=["intermediates"], **apply_kwargs)
        found: dict[str, jax.Array] = {}
        for path, value in jax.tree_util.tree_flatten_with_path(
                state.get("intermediates", {}))[0]:
            keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            found["/".join(keys[:-1])] = value  # drop the trailing "__call__"
        out = {}
        for perm, (paths, fn) in wanted.items():
            missing = [p for p in paths if p not in found]
            if missing:
                raise MergeError(f"linen_features: no submodule output at {missing} for "
                                 f"{perm!r}; captured: {sorted(found)}")
            outs = [fn(found[p]) if fn else found[p] for p in paths]
            out[perm] = jnp.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])
        return out

    return features_fn


class FeatureCorrelation(NamedTuple):
    """Streaming statistics of one permutation's units across K models.

    ``mean`` is ``(K*n,)`` and ``covariance`` ``(K*n, K*n)``, model k's units at
    ``[k*n:(k+1)*n]``; `correlation` is the Pearson correlation."""

    mean: jax.Array
    covariance: jax.Array
    count: int
    num_models: int

    def correlation(self, eps: float = 1e-7) -> jax.Array:
        """Pearson correlation of every pair of units (0 for a constant unit)."""
        std = jnp.sqrt(jnp.clip(jnp.diagonal(self.covariance), 0.0))
        return self.covariance / (std[:, None] * std[None, :] + eps)

    def block(self, i: int, j: int) -> jax.Array:
        """The ``(n, n)`` correlation block between model i's and model j's units."""
        n = self.mean.shape[0] // self.num_models
        return self.correlation()[i * n:(i + 1) * n, j * n:(j + 1) * n]


@functools.partial(jax.jit, static_argnums=0)
def _batch_moments(features_fn: FeaturesFn, models: Sequence[PyTree], batch: Any
                   ) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    per_model = [features_fn(m, batch) for m in models]
    out = {}
    for perm in per_model[0]:
        x = jnp.concatenate([f[perm].reshape(-1, f[perm].shape[-1]).astype(jnp.float32)
                             for f in per_model], axis=-1)
        out[perm] = (jnp.sum(x, axis=0), x.T @ x, jnp.asarray(x.shape[0], jnp.float32))
    return out


def feature_correlations(features_fn: FeaturesFn, models: Sequence[PyTree],
                         batches: Iterable[Any], *, num_batches: int | None = None,
                         ) -> dict[str, FeatureCorrelation]:
    """Per permutation, the means and covariance of the K models' units side by side,
    accumulated over ``batches`` (the same inputs to every model; ``num_batches`` caps how
    many are drawn; an iterator with fewer raises).

    Example::

        stats = feature_correlations(features_fn, [params_a, params_b], batches,
                                     num_batches=32)
        corr_ab = stats["P_0"].block(0, 1)   # (512, 512)
    """
    if len(models) < 1:
        raise MergeError("feature_correlations needs at least one model")
    sums: dict[str, list[jax.Array]] = {}
    drawn = 0
    models = list(models)
    for batch in batches:
        if num_batches is not None and drawn >= num_batches:
            break
        moments = _batch_moments(features_fn, models, batch)
        for perm, (s, xx, n) in moments.items():
            width = s.shape[0] // len(models)
            if s.shape[0] != width * len(models):
                raise MergeError(f"features of {perm!r} differ in width across models")
            acc = sums.setdefault(perm, [jnp.zeros_like(s), jnp.zeros_like(xx), 0.0])
            acc[0], acc[1], acc[2] = acc[0] + s, acc[1] + xx, acc[2] + n
        drawn += 1
    if drawn == 0 or (num_batches is not None and drawn < num_batches):
        raise MergeError(f"feature_correlations: the batches ran dry after {drawn} of "
                         f"{num_batches if num_batches is not None else 'at least 1'}")
    out = {}
    for perm, (s, xx, n) in sorted(sums.items()):
        mean = s / n
        cov = xx / n - jnp.outer(mean, mean)
        out[perm] = FeatureCorrelation(mean, cov, int(np.asarray(n)), len(models))
    return out
