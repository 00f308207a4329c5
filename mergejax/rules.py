"""Per-leaf hyperparameters: path rules, callables and mergekit-style layer gradients.

Any merge hyperparameter may be given per leaf:

* a plain value, used for every leaf;
* ``[(regex, value), ...]`` or `PathRules`: the first regex that matches the leaf's
  `/`-joined path (``re.search``, so anchor with ``^``/``$`` when you mean it) wins;
  a leaf no rule matches is an error unless `PathRules` has a ``default``;
* a callable ``(path, leaf) -> value``;
* `LayerGradient`: a list of anchor values interpolated over the layer index found in the
  path, as mergekit's list-valued parameters.

The forms nest: a rule's value may itself be a `LayerGradient` or a callable.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from mergejax.tree import MergeError

__all__ = [
    "DEFAULT_LAYER_PATTERN",
    "is_finite_number",
    "LayerGradient",
    "PathRules",
    "layer_index",
    "is_per_leaf_form",
    "resolve_per_leaf",
]

_NO_DEFAULT = object()

#: Finds the layer index in a path: ``layers/3/...``, ``layer_3``, ``blocks.3``,
#: ``encoderblock_3``, ``h/3``, dotted Hugging Face names ``model.layers.3.mlp``.
#: Flax's automatic ``Dense_0`` names are deliberately not layer indices.
DEFAULT_LAYER_PATTERN = (
    r"(?:^|[/.])(?:[A-Za-z]*(?:layers?|blocks?)|h)[_./]?(\d+)(?:[/.]|$)")


@dataclasses.dataclass(frozen=True)
class PathRules:
    """Ordered ``(regex, value)`` rules over `/`-joined leaf paths; first match wins.

    Example::

        density = PathRules([(r"attn", 0.3), (r"mlp", 0.5)], default=0.2)
    """

    rules: Sequence[tuple[str, Any]]
    default: Any = _NO_DEFAULT

    def __post_init__(self):
        rules = tuple((str(p), v) for p, v in self.rules)
        for pattern, _ in rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise MergeError(f"invalid regex {pattern!r} in path rules: {e}") from e
        object.__setattr__(self, "rules", rules)

    def lookup(self, path: str, name: str = "value") -> Any:
        for pattern, value in self.rules:
            if re.search(pattern, path):
                return value
        if self.default is _NO_DEFAULT:
            patterns = ", ".join(repr(p) for p, _ in self.rules)
            raise MergeError(
                f"no rule for {name!r} matches leaf '{path}' (rules: {patterns}); "
                "add a matching rule or give PathRules(..., default=...)")
        return self.default


@dataclasses.dataclass(frozen=True)
class LayerGradient:
    """Anchor values interpolated over depth, as mergekit's list-valued parameters.

    A leaf in layer ``i`` of ``n`` (indices found by ``pattern``; ``n`` is the largest
    index + 1) sits at position ``p = i / (n - 1)`` (1 when ``n == 1``); with anchors
    ``v[0..m-1]`` its value is the linear interpolation at ``p * (m - 1)``. Leaves outside
    the layers (embeddings, final norm, heads) take ``outside``, which defaults to the
    first anchor. Both match mergekit (a ``models:`` config, one slice).
    """

    values: Sequence[Any]
    pattern: str = DEFAULT_LAYER_PATTERN
    outside: Any = _NO_DEFAULT

    def __post_init__(self):
        values = tuple(self.values)
        if not values:
            raise MergeError("LayerGradient needs at least one anchor value")
        object.__setattr__(self, "values", values)

    def at(self, position: float | None) -> Any:
        """The value at a depth ``position`` in [0, 1] (None: outside the layers)."""
        if position is None:
            return self.values[0] if self.outside is _NO_DEFAULT else self.outside
        scaled = position * (len(self.values) - 1)
        i0 = min(int(math.floor(scaled)), len(self.values) - 1)
        i1 = min(i0 + 1, len(self.values) - 1)
        frac = scaled - i0
        if frac == 0.0:
            return self.values[i0]
        return (1.0 - frac) * self.values[i0] + frac * self.values[i1]



def is_finite_number(x: Any) -> bool:
    """Whether a static hyperparameter is a finite real number (int or float, not bool):
    what validators check before comparing it with a range."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

def layer_index(path: str, pattern: str = DEFAULT_LAYER_PATTERN) -> int | None:
    """The layer index named in ``path`` by ``pattern``'s first group, or None."""
    match = re.search(pattern, path)
    return int(match.group(1)) if match else None


def _is_rule_list(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in value))


class _Depths:
    """Layer positions of every leaf, computed once per pattern."""

    def __init__(self, paths: Sequence[str]):
        self._paths = paths
        self._cache: dict[str, list[float | None]] = {}

    def position(self, pattern: str, i: int) -> float | None:
        if pattern not in self._cache:
            idx = [layer_index(p, pattern) for p in self._paths]
            found = [j for j in idx if j is not None]
            n = max(found) + 1 if found else 0
            self._cache[pattern] = [
                None if j is None else (j / (n - 1) if n > 1 else 1.0) for j in idx]
        return self._cache[pattern][i]


def resolve_per_leaf(value: Any, paths: Sequence[str], leaves: Sequence[Any], *,
                     name: str = "value") -> list[Any]:
    """Resolves a hyperparameter given in any per-leaf form to one value per leaf."""
    depths = _Depths(paths)

    def one(v: Any, i: int) -> Any:
        if isinstance(v, PathRules):
            return one(v.lookup(paths[i], name), i)
        if _is_rule_list(v):
            return one(PathRules(v).lookup(paths[i], name), i)
        if isinstance(v, LayerGradient):
            return one(v.at(depths.position(v.pattern, i)), i)
        if callable(v) and not hasattr(v, "shape"):
            return one(v(paths[i], leaves[i]), i)
        return v

    return [one(value, i) for i in range(len(paths))]


def is_per_leaf_form(value: Any) -> bool:
    """Whether ``value`` varies by leaf (rules, a callable or a layer gradient)."""
    return (isinstance(value, (PathRules, LayerGradient)) or _is_rule_list(value)
            or (callable(value) and not hasattr(value, "shape")))

