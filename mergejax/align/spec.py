"""Permutation specs: which axes of which leaves share a permutation of hidden units.

A network computes the same function when the units of a hidden layer are permuted
consistently: the producing layer's output axis, the biases and normalisation parameters
of those units, and the consuming layer's input axis. A `PermutationSpec` declares that
sharing, as git-re-basin's ``axes_to_perm`` (Ainsworth et al. 2023, "Git Re-Basin",
arXiv 2209.04836): for each leaf, by its `/`-joined path, one entry per axis naming the
permutation acting on it, or None::

    spec = PermutationSpec({
        "Dense_0/kernel": (None, "P_0"), "Dense_0/bias": ("P_0",),
        "Dense_1/kernel": ("P_0", None), "Dense_1/bias": (None,),
    }, consumers={"Dense_1/kernel": (0,)})

``consumers`` says along which axes a leaf *reads* permuted features (a kernel's input
axes); every other named axis *produces* them. Permutations do not need it (it is the same
P either way); ZipIt's merge/unmerge matrices do.

A permutation ``perm`` (an int array of its units) acts as git-re-basin's: the permuted
leaf is ``jnp.take(leaf, perm, axis)``, i.e. unit ``i`` of the result is unit ``perm[i]``
of the input. `apply_permutation` is a pure, jit-compiled transform.

Builders cover the common architectures: `mlp_spec` (a chain of dense layers),
`resnet_spec` (`mergejax.suite.model.ResNet`: convolutions, residual streams shared per
stage, normalisation scale/bias and BatchNorm statistics) and `vit_spec` /
`transformer_block_spec` (the residual stream shared by every block, attention heads
permuted as units, the head dimension of queries/keys and of values/outputs, the MLP's
hidden units).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.tree import MergeError, PyTree, flatten_with_paths

__all__ = [
    "PermutationSpec",
    "Permutations",
    "apply_permutation",
    "identity_permutations",
    "invert_permutations",
    "mlp_spec",
    "random_permutations",
    "resnet_spec",
    "transformer_block_spec",
    "vit_spec",
]

#: Permutation name -> int array of its units' order.
Permutations = dict[str, jax.Array]
Axes = tuple[str | None, ...]


class PermutationSpec:
    """Which axes of which leaves (by `/`-joined path) share which permutation.

    ``axes_to_perm[path][axis]`` is a permutation name or None; ``consumers[path]`` lists
    the axes along which ``path`` consumes permuted features (None: unknown, which ZipIt
    refuses). A permutation may act on any number of leaves but on one axis per leaf.
    Specs are hashable, so they can be static arguments of `jax.jit`.

    Example::

        spec = PermutationSpec({"fc1/kernel": (None, "h"), "fc1/bias": ("h",),
                                "fc2/kernel": ("h", None)}, consumers={"fc2/kernel": (0,)})
        spec.perm_to_axes["h"]   # (("fc1/bias", 0), ("fc1/kernel", 1), ("fc2/kernel", 0))
    """

    def __init__(self, axes_to_perm: Mapping[str, Sequence[str | None]],
                 consumers: Mapping[str, Sequence[int]] | None = None):
        entries = {}
        for path, axes in axes_to_perm.items():
            axes = tuple(axes)
            named = [p for p in axes if p is not None]
            repeated = sorted({p for p in named if named.count(p) > 1})
            if repeated:
                raise MergeError(f"permutation spec: {path} has permutation(s) {repeated} on "
                                 f"more than one axis ({axes}); a permutation acts on one "
                                 "axis of each array")
            if not named:
                continue  # a leaf no permutation touches
            entries[path] = axes
        self._axes = dict(sorted(entries.items()))
        self._consumers = None
        if consumers is not None:
            self._consumers = {}
            for path, axes in sorted(consumers.items()):
                if path not in self._axes:
                    raise MergeError(f"permutation spec: consumers names {path}, which has no "
                                     "permuted axis")
                axes = tuple(sorted(int(a) for a in axes))
                bad = [a for a in axes if not 0 <= a < len(self._axes[path])
                       or self._axes[path][a] is None]
                if bad:
                    raise MergeError(f"permutation spec: consumer axes {bad} of {path} are not "
                                     f"permuted axes of {self._axes[path]}")
                self._consumers[path] = axes
        by_perm: dict[str, list[tuple[str, int]]] = {}
        for path, axes in self._axes.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    by_perm.setdefault(p, []).append((path, axis))
        self._perm_to_axes = {p: tuple(v) for p, v in sorted(by_perm.items())}
        self._key = (tuple(self._axes.items()), None if self._consumers is None
                     else tuple(self._consumers.items()))

    @property
    def axes_to_perm(self) -> dict[str, Axes]:
        """Path -> per-axis permutation names (None for an axis no permutation acts on)."""
        return dict(self._axes)

    @property
    def perm_to_axes(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Permutation name -> the (path, axis) pairs it acts on."""
        return dict(self._perm_to_axes)

    @property
    def consumers(self) -> dict[str, tuple[int, ...]] | None:
        """Path -> the axes along which it consumes permuted features; None if unknown."""
        return None if self._consumers is None else dict(self._consumers)

    def axes_of(self, path: str) -> Axes:
        """The per-axis permutation names of ``path`` (empty when no permutation acts on it)."""
        return self._axes.get(path, ())

    def is_consumer(self, path: str, axis: int) -> bool:
        """Whether ``path`` reads the permuted features along ``axis`` (a kernel's input)."""
        if self._consumers is None:
            raise MergeError("this permutation spec does not say which axes consume "
                             "features; build it with a builder or pass consumers=")
        return axis in self._consumers.get(path, ())

    def sizes(self, params: PyTree) -> dict[str, int]:
        """Each permutation's number of units in ``params``, checking that every named leaf
        exists, has one entry per axis, and that all axes of a permutation agree."""
        paths, leaves, _ = flatten_with_paths(params)
        shapes = {p: np.shape(x) for p, x in zip(paths, leaves)}
        missing = [p for p in self._axes if p not in shapes]
        if missing:
            raise MergeError(f"permutation spec names leaves the parameters do not have: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        sizes: dict[str, tuple[int, str, int]] = {}
        for path, axes in self._axes.items():
            shape = shapes[path]
            if len(axes) != len(shape):
                raise MergeError(f"permutation spec gives {path} {len(axes)} axes {axes}, but "
                                 f"the leaf has shape {shape}")
            for axis, p in enumerate(axes):
                if p is None:
                    continue
                if p in sizes and sizes[p][0] != shape[axis]:
                    n, first, first_axis = sizes[p]
                    raise MergeError(
                        f"permutation {p!r} has {n} units on axis {first_axis} of {first} but "
                        f"{shape[axis]} on axis {axis} of {path}")
                sizes.setdefault(p, (shape[axis], path, axis))
        return {p: v[0] for p, v in sorted(sizes.items())}

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PermutationSpec) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self._perm_to_axes)} permutations over "
                f"{len(self._axes)} leaves)")


def permute_leaf(spec: PermutationSpec, perms: Mapping[str, jax.Array], path: str,
                 leaf: jax.Array, except_axis: int | None = None) -> jax.Array:
    """``leaf`` with every permutation of ``spec`` applied along its axes (all but
    ``except_axis``); the building block of `apply_permutation` and the matchers."""
    for axis, p in enumerate(spec.axes_of(path)):
        if p is not None and axis != except_axis:
            leaf = jnp.take(leaf, perms[p], axis=axis)
    return leaf


def _check_perms(spec: PermutationSpec, sizes: Mapping[str, int],
                 perms: Mapping[str, Any]) -> None:
    missing = sorted(set(sizes) - set(perms))
    unknown = sorted(set(perms) - set(sizes))
    if missing or unknown:
        raise MergeError(f"permutations do not match the spec: missing {missing}, "
                         f"unknown {unknown}")
    for p, n in sizes.items():
        shape = np.shape(perms[p])
        if shape != (n,):
            raise MergeError(f"permutation {p!r} has shape {shape}; the spec's axes have {n} "
                             "units")


@functools.partial(jax.jit, static_argnums=0)
def _apply(spec: PermutationSpec, perms: Permutations, params: PyTree) -> PyTree:
    paths, leaves, treedef = flatten_with_paths(params)
    return jax.tree.unflatten(treedef, [permute_leaf(spec, perms, p, x)
                                        for p, x in zip(paths, leaves)])


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Any],
                      params: PyTree) -> PyTree:
    """``params`` with each permutation of ``spec`` applied to the axes it names (jit).

    Leaves the spec does not name are returned unchanged. ``perms`` must give every
    permutation of the spec, each an int array of its size.

    Example::

        perms = mergejax.align.weight_matching(spec, params_a, params_b).perms
        aligned_b = apply_permutation(spec, perms, params_b)
    """
    _check_perms(spec, spec.sizes(params), perms)
    return _apply(spec, {p: jnp.asarray(v, jnp.int32) for p, v in perms.items()}, params)


def identity_permutations(spec: PermutationSpec, params: PyTree) -> Permutations:
    """The identity permutation of every permutation in ``spec`` (sized from ``params``)."""
    return {p: jnp.arange(n, dtype=jnp.int32) for p, n in spec.sizes(params).items()}


def random_permutations(spec: PermutationSpec, params: PyTree, key: jax.Array) -> Permutations:
    """Independent uniformly random permutations, one per permutation of ``spec``; each
    comes from ``key`` folded with its position in the spec's sorted names.

    Example::

        planted = random_permutations(spec, params, jax.random.key(0))
        shuffled = apply_permutation(spec, planted, params)  # the same function
    """
    return {p: jax.random.permutation(jax.random.fold_in(key, i), n).astype(jnp.int32)
            for i, (p, n) in enumerate(spec.sizes(params).items())}


def invert_permutations(perms: Mapping[str, Any]) -> Permutations:
    """The inverse of each permutation: applying ``perms`` then the result is identity."""
    return {p: jnp.argsort(jnp.asarray(v)).astype(jnp.int32) for p, v in perms.items()}


# --- builders ---------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def mlp_spec(layers: Sequence[str], *, kernel: str = "kernel",
             bias: str | None = "bias") -> PermutationSpec:
    """A chain of dense layers (Flax kernels ``(in, out)``): the hidden units between
    layer ``i`` and ``i + 1`` share permutation ``P_i``; the input and output are fixed.

    Example::

        spec = mlp_spec(["Dense_0", "Dense_1", "Dense_2"])   # two hidden layers: P_0, P_1
    """
    if len(layers) < 2:
        raise MergeError(f"an MLP spec needs at least two layers, got {list(layers)}")
    axes: dict[str, Axes] = {}
    consumers = {}
    for i, layer in enumerate(layers):
        p_in = f"P_{i - 1}" if i > 0 else None
        p_out = f"P_{i}" if i < len(layers) - 1 else None
        axes[_join(layer, kernel)] = (p_in, p_out)
        if bias is not None:
            axes[_join(layer, bias)] = (p_out,)
        if p_in is not None:
            consumers[_join(layer, kernel)] = (0,)
    return PermutationSpec(axes, consumers)


def _norm(axes: dict[str, Axes], name: str, perm: str, stats_prefix: str | None,
          prefix: str) -> None:
    axes[_join(prefix, f"{name}/scale")] = (perm,)
    axes[_join(prefix, f"{name}/bias")] = (perm,)
    if stats_prefix is not None:
        axes[_join(stats_prefix, f"{name}/mean")] = (perm,)
        axes[_join(stats_prefix, f"{name}/var")] = (perm,)


def resnet_spec(depth: int = 20, *, stages: int = 3, prefix: str = "",
                stats_prefix: str | None = None) -> PermutationSpec:
    """`mergejax.suite.model.ResNet` (He et al. 2016's CIFAR ResNet, as Git Re-Basin's
    ResNet-20): the residual stream of stage ``s`` shares ``P_res{s}`` across the stem,
    every block's output and the stage's shortcut projection; each block's inner units
    have their own ``P_s{s}b{b}``; the classifier's input is the last stream.

    ``prefix`` is where the parameters sit (``"params"`` for a variables dict) and
    ``stats_prefix`` where BatchNorm's running statistics do (``"batch_stats"``; None
    for LayerNorm). Conv kernels are ``(h, w, in, out)``.

    Example::

        variables = model.init(key, images)         # ResNet(norm="batch")
        spec = resnet_spec(20, prefix="params", stats_prefix="batch_stats")
    """
    if (depth - 2) % (2 * stages) or depth < 2 + 2 * stages:
        raise MergeError(f"a CIFAR ResNet has depth 2 + 2*{stages}*n; got depth={depth}")
    blocks = (depth - 2) // (2 * stages)
    axes: dict[str, Axes] = {}
    consumers: dict[str, tuple[int, ...]] = {}

    def conv(name: str, p_in: str | None, p_out: str) -> None:
        path = _join(prefix, f"{name}/kernel")
        axes[path] = (None, None, p_in, p_out)
        if p_in is not None:
            consumers[path] = (2,)

    conv("stem_conv", None, "P_res0")
    _norm(axes, "stem_norm", "P_res0", stats_prefix, prefix)
    for s in range(stages):
        for b in range(blocks):
            block, inner = f"stage{s}_block{b}", f"P_s{s}b{b}"
            p_in = f"P_res{s - 1}" if b == 0 and s > 0 else f"P_res{s}"
            conv(f"{block}/conv1", p_in, inner)
            _norm(axes, f"{block}/norm1", inner, stats_prefix, prefix)
            conv(f"{block}/conv2", inner, f"P_res{s}")
            _norm(axes, f"{block}/norm2", f"P_res{s}", stats_prefix, prefix)
            if b == 0 and s > 0:
                conv(f"{block}/shortcut_conv", p_in, f"P_res{s}")
                _norm(axes, f"{block}/shortcut_norm", f"P_res{s}", stats_prefix, prefix)
    head = _join(prefix, "head/kernel")
    axes[head] = (f"P_res{stages - 1}", None)
    consumers[head] = (0,)
    return PermutationSpec(axes, consumers)


def transformer_block_spec(block: str, residual: str, *, index: int | str | None = None,
                           attention: str = "attn", norms: Sequence[str] = ("ln_1", "ln_2"),
                           mlp: Sequence[str] = ("mlp_fc", "mlp_proj")) -> tuple[
                               dict[str, Axes], dict[str, tuple[int, ...]]]:
    """The axes of one pre-LayerNorm block (Flax ``MultiHeadDotProductAttention`` layout:
    query/key/value kernels ``(width, heads, head_dim)``, out kernel ``(heads, head_dim,
    width)``), as ``(axes_to_perm, consumers)`` entries to combine into a spec.

    The residual stream ``residual`` is shared with the rest of the model. Attention heads
    are permuted as units (``P_heads{i}`` on the heads axis of q, k, v and out); the head
    dimension of queries and keys shares ``P_qk{i}`` and that of values and the output
    projection ``P_v{i}`` (one permutation for all heads); the MLP's hidden units
    ``P_mlp{i}``. ``index`` names the block's permutations (default: ``block``).

    Example::

        axes, consumers = transformer_block_spec("encoder/layer_0", "P_res", index=0)
    """
    i = block if index is None else index
    heads, qk, v, hidden = f"P_heads{i}", f"P_qk{i}", f"P_v{i}", f"P_mlp{i}"
    axes: dict[str, Axes] = {}
    consumers: dict[str, tuple[int, ...]] = {}
    for norm in norms:
        axes[_join(block, f"{norm}/scale")] = (residual,)
        axes[_join(block, f"{norm}/bias")] = (residual,)
    for proj, dim in (("query", qk), ("key", qk), ("value", v)):
        kernel = _join(block, f"{attention}/{proj}/kernel")
        axes[kernel] = (residual, heads, dim)
        axes[_join(block, f"{attention}/{proj}/bias")] = (heads, dim)
        consumers[kernel] = (0,)
    out = _join(block, f"{attention}/out/kernel")
    axes[out] = (heads, v, residual)
    consumers[out] = (0, 1)
    axes[_join(block, f"{attention}/out/bias")] = (residual,)
    fc, proj = mlp
    axes[_join(block, f"{fc}/kernel")] = (residual, hidden)
    axes[_join(block, f"{fc}/bias")] = (hidden,)
    consumers[_join(block, f"{fc}/kernel")] = (0,)
    axes[_join(block, f"{proj}/kernel")] = (hidden, residual)
    axes[_join(block, f"{proj}/bias")] = (residual,)
    consumers[_join(block, f"{proj}/kernel")] = (0,)
    return axes, consumers


def vit_spec(depth: int, *, prefix: str = "") -> PermutationSpec:
    """`mergejax.suite.model.VisionTransformer` (CLIP ViT-B/32's vision-tower layout): one
    residual-stream permutation ``P_res`` over the patch embedding's output, the class and
    positional embeddings, ``ln_pre``, every block (`transformer_block_spec`) and
    ``ln_post``; the projection's input. The embedding space (the heads' input) is fixed.

    Example::

        spec = vit_spec(suite.config.vit.depth)
        aligned = apply_permutation(spec, weight_matching(spec, a, b).perms, b)
    """
    res = "P_res"
    axes: dict[str, Axes] = {
        _join(prefix, "conv1/kernel"): (None, None, None, res),
        _join(prefix, "class_embedding"): (res,),
        _join(prefix, "positional_embedding"): (None, res),
        _join(prefix, "proj/kernel"): (res, None),
    }
    consumers = {_join(prefix, "proj/kernel"): (0,)}
    for norm in ("ln_pre", "ln_post"):
        axes[_join(prefix, f"{norm}/scale")] = (res,)
        axes[_join(prefix, f"{norm}/bias")] = (res,)
    for i in range(depth):
        block_axes, block_consumers = transformer_block_spec(
            _join(prefix, f"resblocks_{i}"), res, index=i)
        axes.update(block_axes)
        consumers.update(block_consumers)
    return PermutationSpec(axes, consumers)
