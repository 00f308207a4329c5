"""Pytree algebra for merging: `/`-joined paths, structure checks, task vectors.

Parameters are any pytree of arrays (Flax Linen ``params`` dicts, ``nnx.to_pure_dict``
states, nested dicts read from a checkpoint). Leaves are named by their ``/``-joined key
path (``encoder/layer_3/attn/query/kernel``); every error about a leaf names that path.

Arithmetic here acts on *floating* leaves only. Integer, boolean and PRNG-key leaves (step
counters, position ids, RNG state) are never averaged: each function says which input they
are copied from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "MergeError",
    "PyTree",
    "apply_task_vector",
    "check_compatible",
    "flatten_with_paths",
    "full_precision",
    "is_float",
    "leaf_paths",
    "path_str",
    "stack_trees",
    "task_vector",
    "task_vectors",
    "tree_add",
    "tree_scale",
    "tree_sub",
    "tree_weighted_sum",
    "unjitted",
    "unstack_tree",
]


class MergeError(ValueError):
    """Bad input to a merge: mismatched trees, bad hyperparameters, non-finite values."""


def path_str(key_path: Sequence[Any]) -> str:
    """The `/`-joined name of a leaf's key path, e.g. ``encoder/layers/3/kernel``."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def flatten_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """Flattens ``tree`` into (paths, leaves, treedef), paths `/`-joined."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in pairs], [leaf for _, leaf in pairs], treedef


def leaf_paths(tree: PyTree) -> list[str]:
    """The `/`-joined paths of ``tree``'s leaves, in flattening order."""
    return flatten_with_paths(tree)[0]


def is_float(x: Any) -> bool:
    """Whether a leaf is a real floating-point array (the leaves merges act on)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return jnp.issubdtype(dtype, jnp.floating)


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", ())
    dtype = getattr(x, "dtype", type(x).__name__)
    return f"{dtype}{list(shape)}"


def check_compatible(reference: PyTree, others: Sequence[PyTree], *,
                     reference_name: str = "base",
                     other_name: str = "models",
                     check_dtypes: bool = True) -> None:
    """Raises `MergeError` unless every tree in ``others`` matches ``reference``.

    Compares tree structure (reporting the missing and unexpected leaf paths), then each
    leaf's shape and, with ``check_dtypes``, its dtype, naming the first offending path.
    """
    ref_leaves, ref_def = jax.tree.flatten(reference)
    ref_sig = [_signature(x, check_dtypes) for x in ref_leaves]
    for i, other in enumerate(others):
        leaves, treedef = jax.tree.flatten(other)
        if treedef == ref_def and [_signature(x, check_dtypes) for x in leaves] == ref_sig:
            continue  # the fast path; paths are built only to name what is wrong
        name = f"{other_name}[{i}]"
        ref_paths = leaf_paths(reference)
        paths, leaves, treedef = flatten_with_paths(other)
        if treedef != ref_def:
            missing = [p for p in ref_paths if p not in set(paths)]
            extra = [p for p in paths if p not in set(ref_paths)]
            detail = []
            if missing:
                detail.append(f"missing {_preview(missing)}")
            if extra:
                detail.append(f"unexpected {_preview(extra)}")
            if not detail:
                detail.append(f"containers differ: {treedef} vs {ref_def}")
            raise MergeError(
                f"{name} does not have the tree structure of {reference_name}: "
                + "; ".join(detail))
        for path, a, b in zip(ref_paths, ref_leaves, leaves):
            if np.shape(a) != np.shape(b):
                raise MergeError(
                    f"shape mismatch at '{path}': {reference_name} has {_describe(a)}, "
                    f"{name} has {_describe(b)}")
            if check_dtypes and jnp.result_type(a) != jnp.result_type(b):
                raise MergeError(
                    f"dtype mismatch at '{path}': {reference_name} has {_describe(a)}, "
                    f"{name} has {_describe(b)}")


def _signature(x: Any, with_dtype: bool) -> tuple:
    dtype = getattr(x, "dtype", None)
    return (np.shape(x), (dtype if dtype is not None else jnp.result_type(x)) if with_dtype
            else None)


def _preview(paths: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{p}'" for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _float_map(fn, first: PyTree, *rest: PyTree) -> PyTree:
    """Maps ``fn`` over floating leaves; other leaves are copied from ``first``."""
    return jax.tree.map(lambda x, *ys: fn(x, *ys) if is_float(x) else x, first, *rest)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` on floating leaves (in ``a``'s dtype); other leaves from ``a``."""
    return _float_map(lambda x, y: (x + y).astype(x.dtype), a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` on floating leaves (in ``a``'s dtype); other leaves from ``a``."""
    return _float_map(lambda x, y: (x - y).astype(x.dtype), a, b)


def tree_scale(a: PyTree, s: Any) -> PyTree:
    """``s * a`` on floating leaves (in ``a``'s dtype); other leaves from ``a``."""
    return _float_map(lambda x: (s * x).astype(x.dtype), a)


def tree_weighted_sum(weights: Any, trees: Sequence[PyTree]) -> PyTree:
    """``sum_k weights[k] * trees[k]`` on floating leaves; other leaves from ``trees[0]``.

    Computed in float32 (or wider) and returned in each leaf's dtype in ``trees[0]``.
    """
    if not trees:
        raise MergeError("tree_weighted_sum needs at least one tree")
    weights = jnp.asarray(weights)
    if weights.shape != (len(trees),):
        raise MergeError(f"expected {len(trees)} weights, got shape {weights.shape}")

    def combine(x, *ys):
        cdt = jnp.promote_types(x.dtype, jnp.float32)
        total = sum(weights[k].astype(cdt) * y.astype(cdt) for k, y in enumerate((x,) + ys))
        return total.astype(x.dtype)

    return _float_map(combine, trees[0], *trees[1:])


def task_vector(base: PyTree, finetuned: PyTree) -> PyTree:
    """The task vector ``tau = finetuned - base`` (Ilharco et al., arXiv 2212.04089).

    Non-floating leaves are copied from ``finetuned``.
    """
    return tree_sub(finetuned, base)


def task_vectors(base: PyTree, finetuned: Sequence[PyTree]) -> list[PyTree]:
    """``[task_vector(base, m) for m in finetuned]``."""
    return [task_vector(base, m) for m in finetuned]


def apply_task_vector(base: PyTree, tau: PyTree, scale: Any = 1.0) -> PyTree:
    """``base + scale * tau`` in ``base``'s dtypes; non-floating leaves from ``base``."""
    return _float_map(
        lambda x, t: (x.astype(jnp.promote_types(x.dtype, jnp.float32))
                      + scale * t.astype(jnp.promote_types(t.dtype, jnp.float32))
                      ).astype(x.dtype), base, tau)


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
    """Stacks K trees leaf by leaf on a new leading axis (the per-leaf ``[K, ...]`` form)."""
    if not trees:
        raise MergeError("stack_trees needs at least one tree")
    check_compatible(trees[0], trees[1:], reference_name="trees[0]", other_name="trees")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(stacked: PyTree) -> list[PyTree]:
    """Inverse of `stack_trees`: splits every leaf's leading axis into a list of trees."""
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        return []
    k = leaves[0].shape[0]
    return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(k)]


def full_precision(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced with ``jax.default_matmul_precision("highest")``: its float32 matmuls
    (those that name no precision of their own) run at full float32 precision.

    XLA:GPU otherwise runs them in TF32 (a 10-bit mantissa): relative errors near 1e-3,
    and worse after a Gram matrix (on an H100, HO-GSVD's merged matrix came out wrong
    in every entry). PyTorch, and so mergekit and FusionBench, computes float32 matmuls
    at full precision by default; every merge kernel runs under this. XLA:CPU computes
    float32 matmuls at full precision anyway: there nothing changes.

    Example::

        gram = full_precision(lambda m: m.T @ m)(jnp.ones((4, 3)))
    """

    @functools.wraps(fn)
    def at_highest(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return at_highest


def unjitted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` without its ``jax.jit`` wrappers. Code that intercepts a model's layers
    (`flax.linen.intercept_methods`) must run the layers in its own trace: through a jitted
    ``apply_fn`` they would run in the inner jit's trace (a leaked tracer) or, cached, not
    at all. The caller's own jit compiles the unwrapped function anyway.

    Example::

        apply_fn = unjitted(jax.jit(lambda p, x: model.apply({"params": p}, x)))
    """
    while hasattr(fn, "lower") and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn
