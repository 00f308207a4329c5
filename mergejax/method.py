"""How a merge method runs over pytrees: one jit-compiled, pure transform.

A method is written once, as a *leaf kernel* that merges the K values of one leaf::

    @leafwise("task_arithmetic", coefficients=("weights", "scale"), per_model=("weights",),
              family="basic", paper="arXiv 2212.04089")
    def task_arithmetic(ctx, base, models, *, weights=None, scale=1.0, normalize=False):
        ...

`leafwise` turns it into a `MergeMethod`: ``method(base, models, **hparams)`` validates the
trees, resolves every hyperparameter per leaf (`mergejax.rules`), upcasts to float32, runs
the kernels for all leaves inside one cached ``jax.jit`` (or, for large models of concrete
arrays, one cached compiled kernel per group of same-shaped leaves: `LeafKernels`), and
casts each leaf back to its base dtype. Non-floating leaves are copied from the base (or
the first model).

Static structure, traced numbers: hyperparameters named in ``coefficients`` are passed to
the compiled function as arrays, so sweeping them never recompiles and ``jax.grad`` flows
through them; all others (densities, scopes, switches) are static and part of the cache key.

Kernels receive the K models as a tuple of arrays, not one stacked ``[K, ...]`` array:
on XLA:CPU, ``jnp.stack`` followed by a reduction over K is 10-40x slower than the unrolled
sum (measured in this repo), so kernels stack only when they need a sort or top-k over K.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax import registry
from mergejax import rules as rules_lib
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    full_precision,
    is_float,
)

__all__ = ["PER_LEAF_MIN_SIZE", "REQUIRED", "LeafContext", "LeafKernels", "LeafPlan",
           "MergeMethod", "StatisticsPass", "TensorThresholds", "as_stored",
           "canonical_view", "fold_statistics", "folds_leaf_by_leaf", "fused_reduce",
           "leaf_key", "leafwise", "speculate", "speculation"]

REQUIRED = registry.REQUIRED


class LeafContext(NamedTuple):
    """What a leaf kernel knows besides its inputs.

    Attributes:
      path: the leaf's `/`-joined path.
      key: the leaf's PRNG key (`leaf_key` of the user's key), or None.
      stats: a tuple with the total over all leaves of each statistics pass run so far
        (all of them, in a kernel); empty for a method without statistics.
      total_size: the number of entries in all merged leaves together (for model-wide
        ranks such as a global top-k).
      stored_dtype: the dtype the leaf's inputs are stored in, before the engine upcasts
        them for the kernel (None: as the kernel gets them); see `as_stored`.
      thresholds: for a method with `TensorThresholds`, the ``(R, K)`` values it ranks
        within the whole tensor, when a streaming merge selected them over fixed-size
        chunks and runs the kernel chunk by chunk; None: the kernel selects them itself.
    """

    path: str
    key: jax.Array | None
    stats: tuple[Any, ...]
    total_size: int
    stored_dtype: Any = None
    thresholds: jax.Array | None = None


class TensorThresholds(NamedTuple):
    """What a kernel ranks within its tensor, declared to `leafwise` by a kernel whose
    only tensor-wide quantities are those ranked values and which is otherwise
    elementwise (TIES or Breadcrumbs per tensor). A streaming merge then selects them over
    fixed-size chunks (`mergejax.methods.stages.chunked_thresholds`) and runs the kernel
    on each chunk with them in ``ctx.thresholds``: one compilation for every tensor size,
    the same bits.

    Attributes:
      ranks: ``ranks(size)``, the 1-based ranks (largest first) wanted in a tensor of
        ``size`` entries (`stages.select_thresholds`' ``ranks``).
      values: ``values(stored_inputs)``, the K arrays ranked, elementwise in ``(base,
        *models)`` as stored (it upcasts them as the engine does); a module-level
        function (compiled passes are cached by it).

    Example (a per-tensor top-20% trim of each task vector)::

        def magnitudes(stored):
            base, *models = (x.astype(jnp.float32) for x in stored)
            return tuple(jnp.abs(base - x) for x in models)

        @mergejax.leafwise("top20", family="sparse", paper="-",
                           tensor_thresholds=lambda hp: mergejax.TensorThresholds(
                               lambda size: (size // 5,), magnitudes))
        def top20(ctx, base, models):
            thresholds = ctx.thresholds
            if thresholds is None:
                thresholds = select_thresholds((base, *models), (base.size // 5,),
                                               magnitudes)
            return base + sum(jnp.where(jnp.abs(x - base) >= thresholds[0, k], x - base, 0)
                              for k, x in enumerate(models))
    """

    ranks: Callable[[int], tuple[int, ...]]
    values: Callable[[tuple[jax.Array, ...]], tuple[jax.Array, ...]]


def as_stored(ctx: LeafContext, arrays: Sequence[jax.Array]
              ) -> tuple[tuple[jax.Array, ...], Callable[[Sequence[jax.Array]],
                                                          tuple[jax.Array, ...]]]:
    """``(stored, upcast)``: a kernel's inputs cast back to ``ctx.stored_dtype`` (exact:
    they were upcast from it) and the function that upcasts such arrays again.

    XLA folds the convert pair, so a loop (or `lax.cond`) that reads ``stored`` and
    upcasts inside its body reads the stored arrays, where reading the kernel's inputs
    makes XLA materialise a float32 copy of each as the loop's operand (for bfloat16
    inputs, the copies doubled the time of a per-tensor top-k).

    Example::

        stored, upcast = as_stored(ctx, (base, *models))
        thresholds = stages.select_thresholds(stored, ranks, lambda s: magnitudes(upcast(s)))
    """
    arrays = tuple(arrays)
    dtype = ctx.stored_dtype
    if dtype is None or all(x.dtype == dtype for x in arrays):
        return arrays, tuple
    compute = [x.dtype for x in arrays]
    return (tuple(x.astype(dtype) for x in arrays),
            lambda stored: tuple(x.astype(d) for x, d in zip(stored, compute)))


def canonical_view(size: int) -> tuple[int, int]:
    """``(size // c, c)``, ``c`` the largest power of 2 up to 1024 that divides ``size``
    and leaves a multiple of 8 rows (if any does; else ``gcd(size, 1024)``): the 2-D view of
    a tensor's entries (row-major) that `fused_reduce` reduces and that a streaming merge
    gives reshape-invariant kernels, so that their bits depend on a tensor's size, not its
    shape (XLA:CPU runs 1-D views of millions of entries about 1.3x slower).

    Example::

        canonical_view(4096 * 1024)  # (4096, 1024), also for a (1024, 4096) tensor
        canonical_view(1024)  # (8, 128)
    """
    cols = math.gcd(size, 1024) or 1
    fitting = cols
    while fitting > 1 and (size // fitting) % 8:
        fitting //= 2
    cols = fitting if (size // fitting) % 8 == 0 else cols
    return size // cols, cols


#: ``fused_reduce`` kinds: (combiner, identity, the per-operand reference reduction).
_REDUCTIONS: dict[str, tuple[Callable[..., jax.Array], float, Callable[..., jax.Array]]] = {
    "sum": (lax.add, 0.0, jnp.sum), "max": (lax.max, -float("inf"), jnp.max)}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fused_reduce(operands: tuple[jax.Array, ...], kinds: tuple[str, ...]
                 ) -> tuple[jax.Array, ...]:
    """The total ``"sum"`` or ``"max"`` (per ``kinds``) of each of ``operands``, which
    share a shape, in one pass: one multi-output reduction of every group of (up to) 8
    consecutive rows of their `canonical_view`, then ``jnp.sum`` / ``jnp.max`` of those
    partial results (an eighth of the entries). The order of the additions, so the
    rounding, depends on the operands' size only: a reshaped operand gives the same bits.

    Why, on XLA:CPU: a lone ``jnp.sum`` is a YNNPACK fusion, which takes a materialised
    operand, so what produces it elementwise (an upcast from bfloat16, ``x - base``, a
    random mask) is written to memory first. A multi-output reduction keeps the
    producers fused, and reducing 8 rows at a time (unrolled, vectorised along the
    rows) runs at the speed of an elementwise pass, where reducing whole rows does not
    vectorise (4096x1024, two sums of a masked difference: 12.6 ms by rows, 2.1 ms by 8
    rows, 4.3 ms as two ``jnp.sum``). Differentiable: the JVP is that of the per-operand
    ``jnp.sum`` / ``jnp.max``.

    Example::

        l1, peak = fused_reduce((jnp.abs(x - base), jnp.abs(x)), ("sum", "max"))
    """
    unknown = set(kinds) - set(_REDUCTIONS)
    if unknown or len(kinds) != len(operands):
        raise MergeError(f"fused_reduce: one kind per operand, each of {sorted(_REDUCTIONS)}"
                         f"; got {kinds!r} for {len(operands)} operands")
    combine = [_REDUCTIONS[k][0] for k in kinds]
    rows, cols = canonical_view(math.prod(np.shape(operands[0])))
    fold = next(f for f in (8, 4, 2, 1) if rows % f == 0)
    partial = lax.reduce(tuple(jnp.reshape(x, (rows // fold, fold, cols)) for x in operands),
                         tuple(jnp.asarray(_REDUCTIONS[k][1], x.dtype)
                               for k, x in zip(kinds, operands)),
                         lambda a, b: tuple(f(u, v) for f, u, v in zip(combine, a, b)), (1,))
    return tuple(_REDUCTIONS[k][2](r) for k, r in zip(kinds, partial))


@fused_reduce.defjvp
def _fused_reduce_jvp(kinds, primals, tangents):
    (operands,), (directions,) = primals, tangents
    _, out_tangents = jax.jvp(
        lambda xs: tuple(_REDUCTIONS[k][2](x) for k, x in zip(kinds, xs)),
        (operands,), (directions,))
    return fused_reduce(operands, kinds), out_tangents


class _Assumptions(threading.local):
    """The predicates `speculate` assumed while tracing under `speculation` (per thread)."""

    held: list[jax.Array] | None = None


_ASSUMED = _Assumptions()


def speculate(pred: jax.Array, common: Callable[..., Any], rare: Callable[..., Any],
              *operands: Any) -> Any:
    """``lax.cond(pred, common, rare, *operands)``, for a ``rare`` branch that is expensive
    to compile (an exact fallback, say). Traced under `speculation`, only ``common`` is
    traced and ``pred`` is recorded; the caller then reruns the computation without
    speculation where a recorded ``pred`` was False, so results are those of the cond.
    A kernel must return the same as the cond would whenever ``pred`` holds.

    Example::

        thresholds = speculate(jnp.all(found), lambda: windowed, exact_fallback)
    """
    if _ASSUMED.held is None:
        return lax.cond(pred, common, rare, *operands)
    _ASSUMED.held.append(jnp.asarray(pred, bool))
    return lax.optimization_barrier(common(*operands))


@contextlib.contextmanager
def speculation() -> Iterator[list[jax.Array]]:
    """Within it, tracing compiles only the common branch of each `speculate` and collects
    its (traced) predicates in the yielded list: return ``jnp.all`` of them from the
    compiled function, and where that is False, run the function compiled outside
    `speculation`. Per-leaf and streaming merges (`LeafKernels`) use it so that a kernel
    does not compile an exact fallback that the leaves rarely need (per-tensor top-k: the
    radix select; a 0.5B Llama's TIES, first calls of its 5 kernels: 14.4 -> 10.9 s).
    The common branch's result passes through ``lax.optimization_barrier``: without it
    XLA fused its small outputs into their consumers and the kernels ran 1.5x slower.

    Example::

        @jax.jit
        def fast(x):
            with speculation() as assumed:
                y = kernel(x)
            return y, jnp.all(jnp.stack(assumed)) if assumed else True

        y, held = fast(x)
        if not held:
            y = jax.jit(kernel)(x)
    """
    outer, _ASSUMED.held = _ASSUMED.held, []
    try:
        yield _ASSUMED.held
    finally:
        _ASSUMED.held = outer


class StatisticsPass(NamedTuple):
    """A pass over all leaves that folds them into one accumulator.

    ``update(ctx, acc, base, models, **hparams) -> acc`` is called leaf by leaf in the
    leaves' order, with ``acc=None`` for the first leaf (so in-place accumulators, e.g.
    a histogram filled by scatter-adds, need no per-leaf buffer); ``finalize(ctx, acc)``
    turns the last accumulator into the pass's entry of ``ctx.stats``. ``ctx.path`` is
    "" there and ``ctx.key`` None. As for kernels, layer numbers must not matter to
    ``update``: run leaf by leaf (`fold_statistics`), it sees the path with them replaced
    by ``#``, so that every layer's leaf shares one compiled update.
    ``active(**static_hparams)`` is False for a leaf whose ``update`` would return the
    accumulator unchanged (a model-wide top-k pass under ``scope="tensor"``):
    `run_statistics` then skips the leaf, so a streaming merge does not read it from
    disk. None: every leaf counts. ``idle(stats)``, given the earlier
    passes' concrete results, is True when no leaf's ``update`` would change the
    accumulator its first leaf made (a fallback pass that is not needed): per-leaf and
    streaming merges (`fold_statistics`) then run ``update`` on the smallest wanted leaf
    only. ``init(ctx, num_models, **static_hparams)`` (optional) is an accumulator with
    which the first leaf's ``update`` gives the bits it gives from None (zero histograms):
    `fold_statistics` then starts from it, so that the first leaf shares its group's
    compiled update instead of compiling one of its own (0.2-0.3 s per pass).
    """

    update: Callable[..., Any]
    finalize: Callable[..., Any] = lambda ctx, acc: acc
    active: Callable[..., bool] | None = None
    idle: Callable[[tuple[Any, ...]], bool] | None = None
    init: Callable[..., Any] | None = None

    def wants(self, static_hparams: dict[str, Any]) -> bool:
        """Whether `update` needs a leaf with these static hyperparameters."""
        return self.active is None or bool(self.active(**static_hparams))


class LeafPlan(NamedTuple):
    """A method's hyperparameters resolved for every merged leaf (`MergeMethod.plan`).

    Attributes:
      paths: the merged leaves' `/`-joined paths.
      static: per leaf, ``(path, sorted (name, value) items)`` of its static
        hyperparameters (hashable: part of the compiled function's cache key).
      coefficients: per coefficient name, one float array per leaf (traced).
      out_dtypes: per leaf, the output dtype's name.
      shapes: per leaf, its shape.
    """

    paths: tuple[str, ...]
    static: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    coefficients: dict[str, list[Any]]
    out_dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...] = ()


def _summed(per_leaf: Callable[..., Any]) -> StatisticsPass:
    """A pass from a per-leaf function whose results (pytrees, or None) are summed."""

    def update(ctx, acc, base, models, **hparams):
        part = per_leaf(ctx, base, models, **hparams)
        if part is None:
            return acc
        return part if acc is None else jax.tree.map(jnp.add, acc, part)

    return StatisticsPass(update)


def _path_hash(path: str) -> int:
    return int.from_bytes(hashlib.blake2s(path.encode(), digest_size=4).digest(), "little")


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of leaf ``path``: ``fold_in(key, hash32(path))``.

    It depends only on the user's key and the path, so an in-memory merge and a
    tensor-by-tensor (streaming) merge of the same checkpoint draw the same numbers.
    """
    return jax.random.fold_in(key, _path_hash(path))


def _key_parts(key: jax.Array | None, path: str) -> tuple[jax.Array, np.uint32] | None:
    """What a per-leaf compiled call (`_merge_leaf`, `_update_leaf`) derives leaf
    ``path``'s `leaf_key` from, inside the call (`_leaf_key_of`): the user's key and the
    path's hash. Keys split outside and indexed leaf by leaf cost one eager op each: 80 ms
    for ViT-B's 216 leaves, measured on a busy 2-core machine."""
    return None if key is None else (key, np.uint32(_path_hash(path)))


def _leaf_key_of(parts: tuple[jax.Array, Any] | None) -> jax.Array | None:
    return None if parts is None else jax.random.fold_in(*parts)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _holds_tracer(value: Any) -> bool:
    """Whether ``value`` is (or holds) a traced value; concrete arrays count as numbers."""
    return _is_tracer(value) or (
        isinstance(value, (list, tuple)) and any(_holds_tracer(v) for v in value))


def _checked_coefficient(value: Any, name: str, path: str, shape: tuple[int, ...]) -> Any:
    """``value`` as an array of ``shape``, or a `MergeError` saying what is wrong."""
    if not shape and isinstance(value, (list, tuple)):
        raise MergeError(
            f"{name!r} at '{path}' is a list; give one number, or "
            "mergejax.LayerGradient([...]) for a value interpolated over depth")
    if _holds_tracer(value):
        arr = jnp.stack(value) if isinstance(value, (list, tuple)) else jnp.asarray(value)
    else:
        try:
            arr = np.asarray(value, jnp.result_type(float))
        except (TypeError, ValueError) as e:
            raise MergeError(f"{name!r} at '{path}' must be numeric, got {value!r}") from e
    if arr.shape != shape:
        what = f"one value per model ({shape[0]})" if shape else "a scalar"
        raise MergeError(f"{name!r} at '{path}' must be {what}, got shape {arr.shape}")
    return arr


def _per_leaf_coefficients(name: str, values: list[Any], paths: list[str],
                           shape: tuple[int, ...]) -> list[Any]:
    """Per-leaf coefficient values as float arrays of ``shape``, one per leaf.

    Concrete values (Python, NumPy or jax numbers) become NumPy arrays, which the compiled
    call transfers with no per-leaf device op on the host, and which share one jit cache
    entry whatever their origin; traced values are used as they are.
    """
    dtype = jnp.result_type(float)
    if values and not any(_holds_tracer(v) for v in values):
        try:
            arr = np.asarray(values, dtype)
        except (TypeError, ValueError):
            arr = None
        if arr is not None and arr.shape == (len(values),) + shape:
            return list(arr)
    return [_checked_coefficient(v, name, p, shape).astype(dtype)
            for v, p in zip(values, paths)]


def _hashable(value: Any, name: str, path: str) -> Any:
    if _is_tracer(value) or isinstance(value, jax.Array):
        raise MergeError(
            f"{name!r} at '{path}' fixes the structure of the computation and must be a "
            "Python value, not an array")
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v, name, path) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    try:
        hash(value)
    except TypeError as e:
        raise MergeError(f"{name!r} at '{path}' has unhashable value {value!r}") from e
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class MergeMethod:
    """A registered merge: a leaf kernel plus what the engine needs to run it.

    Call it as ``method(base, models, *, key=None, out_dtype=None, check_finite=True,
    per_leaf=None, **hparams)``. ``hparams`` are listed in `hparams` with their defaults.

    ``per_leaf`` picks how the leaves run, with the same result bit for bit: False, one
    compiled program over all leaves (what ``jax.jit`` of a merge traces into); True, one
    compiled kernel per group of same-shaped leaves (`LeafKernels`), run leaf by leaf
    (from `leaf_workers` threads), so compile time grows with the number of distinct leaf
    shapes, not with depth, and memory holds a few leaves' temporaries, one per thread
    (ViT-B/32 shapes, 8 models, global TIES: first call ~74 -> ~16 s, peak 6.0 -> 1.9
    models above the inputs; later calls about as fast, and task arithmetic's ~0.06 s
    slower: 216 calls).
    None (default): per leaf for concrete inputs with at least `PER_LEAF_MIN_SIZE` entries
    and a method that is neither ``batched`` nor declared ``runs_per_leaf=False``.
    """

    name: str
    kernel: Callable[..., jax.Array]
    hparams: dict[str, Any]
    coefficients: frozenset[str]
    per_model: frozenset[str]
    family: str
    paper: str
    needs_base: bool
    uses_key: bool | str = False
    min_models: int = 1
    max_models: int | None = None
    statistics: tuple[Callable[..., Any], ...] = ()
    validate: Callable[..., None] | None = None
    batched: bool | Callable[..., Any] = False
    reshape_invariant: bool | Callable[[dict[str, Any]], bool] = False
    runs_per_leaf: bool = True
    tensor_thresholds: Callable[[dict[str, Any]], TensorThresholds | None] | None = None

    def is_reshape_invariant(self, static_hparams: dict[str, Any]) -> bool:
        """Whether the kernel, with these static hyperparameters, gives every leaf's
        result bit for bit from any reshaped view of it (`leafwise`'s
        ``reshape_invariant``).

        Example::

            mergejax.get_method("ties").is_reshape_invariant({"scope": "tensor"})  # True
        """
        if callable(self.reshape_invariant):
            return bool(self.reshape_invariant(static_hparams))
        return self.reshape_invariant

    def __call__(self, base: PyTree | None, models: Sequence[PyTree], *,
                 key: jax.Array | None = None, out_dtype: Any = None,
                 check_finite: bool = True, per_leaf: bool | None = None,
                 **hparams: Any) -> PyTree:
        models = self._check_models(base, models)
        reference = base if base is not None else models[0]
        paths, ref_leaves, treedef = flatten_with_paths(reference)
        model_leaves = [jax.tree.leaves(m) for m in models]
        base_leaves = jax.tree.leaves(base) if base is not None else None
        merged = [i for i, leaf in enumerate(ref_leaves) if is_float(leaf)]
        plan = self.plan([paths[i] for i in merged], [ref_leaves[i] for i in merged],
                         len(models), key=key, out_dtype=out_dtype, **hparams)
        args = ([base_leaves[i] for i in merged] if base_leaves is not None else None,
                [tuple(ml[i] for ml in model_leaves) for i in merged], plan.coefficients, key)
        if per_leaf is None:
            per_leaf = (self.runs_per_leaf and not self.batched
                        and not _holds_tracer(jax.tree.leaves(args))
                        and sum(ref_leaves[i].size for i in merged) >= PER_LEAF_MIN_SIZE)
        if per_leaf:
            outs, peaks = _run_per_leaf(self, plan, bool(check_finite), *args)
        else:
            outs, peaks = _run_kernels(self, plan.static, plan.out_dtypes, bool(check_finite),
                                       *args)
        if peaks and not _is_tracer(peaks[0]):
            self._raise_if_not_finite(peaks, merged, plan.paths, base_leaves, model_leaves)

        leaves = list(ref_leaves)
        for i, out in zip(merged, outs):
            leaves[i] = out
        return treedef.unflatten(leaves)

    def plan(self, paths: Sequence[str], references: Sequence[Any], num_models: int, *,
             key: jax.Array | None = None, out_dtype: Any = None,
             **hparams: Any) -> LeafPlan:
        """Checks ``hparams`` and resolves them for the merged (floating) leaves ``paths``.

        ``references`` are those leaves of the base (or first model): arrays, or anything
        with ``shape`` and ``dtype`` such as `jax.ShapeDtypeStruct` (what a streaming merge
        knows before reading a tensor); per-leaf callables receive them. Raises
        `MergeError` for unknown, missing or invalid hyperparameters and a missing key.

        Example::

            plan = mergejax.ties.plan(["w"], [jax.ShapeDtypeStruct((4, 4), jnp.float32)],
                                      2, density=0.2)
        """
        self._check_count(num_models)
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise MergeError(
                f"{self.name} got unknown hyperparameter(s) {unknown}; valid ones are "
                f"{sorted(self.hparams)} (plus key, out_dtype, check_finite)")
        if self.uses_key is True and key is None:
            raise MergeError(f"{self.name} is random: pass key=jax.random.key(seed)")
        values = {**self.hparams, **hparams}
        missing = sorted(n for n, v in values.items() if v is REQUIRED)
        if missing:
            raise MergeError(f"{self.name} needs hyperparameter(s) {missing}")
        paths, references = list(paths), list(references)

        static_per_leaf: list[dict[str, Any]] = [{} for _ in paths]
        coefficients: dict[str, list[Any]] = {}
        for name, value in values.items():
            if name in self.per_model:
                per_leaf = self._resolve_per_model(name, value, num_models, paths, references)
            else:
                per_leaf = rules_lib.resolve_per_leaf(value, paths, references, name=name)
            if name in self.coefficients:
                shape = (num_models,) if name in self.per_model else ()
                coefficients[name] = _per_leaf_coefficients(name, per_leaf, paths, shape)
            else:
                for j, v in enumerate(per_leaf):
                    static_per_leaf[j][name] = _hashable(v, name, paths[j])
        if self.validate is not None:
            self.validate(paths, static_per_leaf)
        return LeafPlan(
            paths=tuple(paths),
            static=tuple((p, tuple(sorted(s.items()))) for p, s in zip(paths, static_per_leaf)),
            coefficients=coefficients,
            out_dtypes=tuple(jnp.dtype(out_dtype if out_dtype is not None else r.dtype).name
                             for r in references),
            shapes=tuple(tuple(r.shape) for r in references))

    def _check_models(self, base: PyTree | None, models: Sequence[PyTree]) -> list[PyTree]:
        if isinstance(models, dict) or not isinstance(models, Sequence):
            raise MergeError(
                f"{self.name}: models must be a list of pytrees, got {type(models).__name__}")
        models = list(models)
        self._check_count(len(models))
        if self.needs_base and base is None:
            raise MergeError(f"{self.name} needs a base (pretrained) model; got base=None")
        if base is not None:
            check_compatible(base, models)
        else:
            check_compatible(models[0], models[1:], reference_name="models[0]")
        return models

    def _check_count(self, num_models: int) -> None:
        if num_models == 0:
            raise MergeError(f"{self.name}: models is empty; give at least one model")
        if num_models < self.min_models:
            raise MergeError(f"{self.name} needs at least {self.min_models} models, "
                             f"got {num_models}")
        if self.max_models is not None and num_models > self.max_models:
            raise MergeError(f"{self.name} takes at most {self.max_models} models, "
                             f"got {num_models}")

    def _resolve_per_model(self, name: str, value: Any, k: int, paths: list[str],
                           refs: list[Any]) -> list[Any]:
        """One value per model for every leaf: a length-K sequence or array per leaf."""
        if value is None:
            return [np.ones(k)] * len(paths)
        if rules_lib.is_per_leaf_form(value):
            return rules_lib.resolve_per_leaf(value, paths, refs, name=name)
        if hasattr(value, "shape"):
            return [value] * len(paths)
        if isinstance(value, (list, tuple)):
            if len(value) != k:
                raise MergeError(f"{self.name}: got {len(value)} {name} for {k} models; "
                                 f"give one per model")
            columns = [rules_lib.resolve_per_leaf(v, paths, refs, name=name) for v in value]
            return [[col[j] for col in columns] for j in range(len(paths))]
        raise MergeError(f"{self.name}: {name!r} must be a list with one value per "
                         f"model, got {value!r}")

    def _raise_if_not_finite(self, peaks, merged, paths, base_leaves, model_leaves) -> None:
        if np.isfinite(float(_all_of(peaks, jnp.max))):  # one transfer, not one per leaf
            return
        bad = np.flatnonzero(~np.isfinite(np.asarray(jax.device_get(peaks))))
        if bad.size == 0:
            return
        i = merged[bad[0]]
        raise_not_finite(self.name, paths[bad[0]],
                         base_leaves[i] if base_leaves is not None else None,
                         [ml[i] for ml in model_leaves], f" ({len(bad)} leaves affected)")


def _leaf_keys(key: jax.Array | None, paths: list[str]) -> list[jax.Array | None]:
    """`leaf_key` of every path, with one vectorised ``fold_in`` (one threefry in the
    compiled program instead of one per leaf)."""
    if key is None or not paths:
        return [None] * len(paths)
    hashes = jnp.asarray(np.asarray([_path_hash(p) for p in paths], np.uint32))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, hashes)
    return [keys[i] for i in range(len(paths))]


def raise_not_finite(name: str, path: str, base: Any, models: Sequence[Any],
                     extent: str = "") -> None:
    """Raises the `MergeError` for a merged leaf with NaN or Inf: naming the input that
    holds non-finite values, or saying the method produced them from finite inputs."""
    inputs = ([("base", base)] if base is not None else []) + [
        (f"models[{k}]", x) for k, x in enumerate(models)]
    for label, x in inputs:
        if not bool(jnp.all(jnp.isfinite(x))):
            raise MergeError(f"non-finite values (NaN or Inf) in {label} at '{path}'")
    raise MergeError(f"{name} produced non-finite values at '{path}' from finite inputs"
                     f"{extent}; check the hyperparameters")


def leaf_inputs(path: str, static: tuple[tuple[str, Any], ...], base: Any,
                models: Sequence[Any], coefficients: dict[str, Any]):
    """``(path, base, models, hparams, stored_dtype)`` of one leaf as its kernel gets them:
    inputs upcast to float32 (or wider), static hyperparameters and this leaf's
    coefficients merged into one dict, and the inputs' own dtype (for the kernel's
    `LeafContext`). Shared by the in-memory engine and `mergejax.io.streaming`."""
    cdt = jnp.promote_types(models[0].dtype, jnp.float32)
    hp = dict(static)
    hp.update({n: jnp.asarray(c).astype(cdt) for n, c in coefficients.items()})
    return (path, base.astype(cdt) if base is not None else None,
            tuple(x.astype(cdt) for x in models), hp, models[0].dtype)


def run_statistics(method: MergeMethod, leaves: Callable[[StatisticsPass], Any],
                   total_size: int) -> tuple[Any, ...]:
    """Runs ``method.statistics`` pass after pass; ``leaves(statistics_pass)`` starts a new
    iteration over ``(path, base, models, hparams, stored_dtype, key)`` of the merged
    leaves that the pass `wants` (in memory, or read from disk again for each pass by
    `mergejax.io.streaming`; it may also give every leaf). Returns ``ctx.stats``."""
    stats: tuple[Any, ...] = ()
    for statistics_pass in method.statistics:
        if not isinstance(statistics_pass, StatisticsPass):
            statistics_pass = _summed(statistics_pass)
        acc = None
        for path, base, xs, hp, stored_dtype, key in leaves(statistics_pass):
            ctx = LeafContext(path, key, stats, total_size, stored_dtype)
            acc = statistics_pass.update(ctx, acc, base, xs, **hp)
        stats = stats + (statistics_pass.finalize(LeafContext("", None, stats, total_size),
                                                  acc),)
    return stats


#: Entries (over all merged leaves) from which a merge of concrete arrays runs per leaf
#: (`MergeMethod`'s ``per_leaf=None``): 4M, so small models (and most tests) compile one
#: program, and a ViT-B's (88M) or an LLM's compile time follows its distinct leaf shapes.
PER_LEAF_MIN_SIZE = 1 << 22


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_kernels(method: MergeMethod, plan, out_dtypes, check_finite: bool, base_leaves,
                 model_leaves, coefficients, key):
    """Runs ``method.kernel`` on every merged leaf inside one compiled function.

    Returns the merged leaves and, with ``check_finite``, each leaf's ``max|out|`` (NaN or
    Inf exactly when the leaf has a non-finite entry), else None. They stay separate
    scalars: one stacked array would make XLA fuse all leaves' reductions together, which
    measured 2-3x slower to compile.
    """
    inputs = [leaf_inputs(path, static, base_leaves[j] if base_leaves is not None else None,
                          model_leaves[j], {n: c[j] for n, c in coefficients.items()})
              for j, (path, static) in enumerate(plan)]
    total_size = sum(xs[0].size for _, _, xs, _, _ in inputs)
    keys = _leaf_keys(key, [path for path, *_ in inputs])
    stats = run_statistics(method, lambda _: (i + (k,) for i, k in zip(inputs, keys)),
                           total_size)
    if method.batched:
        outs = _batched_kernels(method, plan, out_dtypes, inputs, keys, stats, total_size)
    else:
        outs = [method.kernel(LeafContext(path, k, stats, total_size, stored), base, xs,
                              **hp).astype(out_dtype)
                for (path, base, xs, hp, stored), out_dtype, k in zip(inputs, out_dtypes,
                                                                     keys)]
    peaks = [jnp.max(jnp.abs(out)).astype(jnp.float32) if out.size else jnp.float32(0)
             for out in outs] if check_finite else []
    return outs, (peaks if check_finite else None)


class _Folding(threading.local):
    active: bool = False


_FOLDING = _Folding()


def folds_leaf_by_leaf() -> bool:
    """Whether a `StatisticsPass.update` is being traced for one leaf in its own compiled
    function (`fold_statistics`: per-leaf and streaming merges). A pass that keeps small
    leaves back to add them together (one histogram for hundreds of biases, which saves
    compiling one per leaf inside a whole-model program) should then add each at once:
    one compiled update per leaf group, whatever the leaves before it."""
    return _FOLDING.active


#: The static part (`_split_stats`' rest) of what a statistics step returned, per
#: `_step_key`, recorded when it traces: a compiled function returns arrays only.
_STEP_STATIC: dict[Any, Any] = {}


def _step_key(name: str, statics: dict[str, Any], arrays: Any) -> Any:
    leaves, treedef = jax.tree.flatten(arrays)
    return (name, tuple(sorted(statics.items())), treedef,
            tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x))))
                  for x in leaves))


def _as_pass(statistics_pass: Any) -> StatisticsPass:
    return (statistics_pass if isinstance(statistics_pass, StatisticsPass)
            else _summed(statistics_pass))


@functools.partial(jax.jit, donate_argnums=0, static_argnames=(
    "method", "index", "path", "static", "acc_static", "stats_static", "total_size"))
def _update_leaf(acc_arrays, base, models, coefficients, key_parts, stats_arrays, **statics):
    """One leaf's `StatisticsPass.update` (pass ``index`` of ``method``): the new
    accumulator's arrays, updated in place (a histogram is not copied per leaf)."""
    arrays_in = (acc_arrays, base, models, coefficients, key_parts, stats_arrays)
    key = _leaf_key_of(key_parts)
    path, base, xs, hp, stored = leaf_inputs(statics["path"], statics["static"], base,
                                             models, coefficients)
    ctx = _WatchedContext(path, key, _join_stats(stats_arrays, statics["stats_static"]),
                          statics["total_size"], stored)
    acc = None if statics["acc_static"] is None else _join_stats(acc_arrays,
                                                                 statics["acc_static"])
    outer, _FOLDING.active = _FOLDING.active, True
    try:
        acc = _as_pass(statics["method"].statistics[statics["index"]]).update(
            ctx, acc, base, xs, **hp)
    finally:
        _FOLDING.active = outer
    arrays, _STEP_STATIC[_step_key("update", statics, arrays_in)] = _split_stats(acc)
    return arrays


@functools.partial(jax.jit, static_argnames=("method", "index", "acc_static",
                                             "stats_static", "total_size"))
def _finalize_pass(acc_arrays, stats_arrays, **statics):
    """`StatisticsPass.finalize` of pass ``index``: its result's arrays."""
    stats = _join_stats(stats_arrays, statics["stats_static"])
    acc = None if statics["acc_static"] is None else _join_stats(acc_arrays,
                                                                 statics["acc_static"])
    out = _as_pass(statics["method"].statistics[statics["index"]]).finalize(
        LeafContext("", None, stats, statics["total_size"]), acc)
    arrays, _STEP_STATIC[_step_key("finalize", statics, (acc_arrays, stats_arrays))] = \
        _split_stats(out)
    return arrays


def fold_statistics(method: MergeMethod, plan: LeafPlan,
                    read: Callable[[int], tuple[Any, Sequence[Any]]],
                    key: jax.Array | None, total_size: int, *,
                    release: Callable[[int], None] = lambda j: None) -> tuple[Any, ...]:
    """``ctx.stats`` of ``method`` over the leaves of ``plan``, each leaf's update in a
    compiled function shared by its leaf group (as `LeafKernels` runs kernels):
    ``read(j)`` gives leaf ``j``'s ``(base, models)`` (from memory, or from disk once per
    pass; ``release(j)`` follows); ``key`` is the user's key (each leaf gets its
    `leaf_key`, derived inside the compiled update). An update that reads ``ctx.path``
    gets it with layer numbers replaced by ``#`` (`LeafKernels`' rule). Passes skip the
    leaves they do not `StatisticsPass.wants`, and all but one when
    `StatisticsPass.idle` (given concrete statistics). Accumulators are updated in place
    (donated). The result is `run_statistics`' bit for bit: the leaves are folded in the
    same order.

    Example::

        stats = fold_statistics(method, plan, lambda j: (bases[j], models[j]), key, n)
    """
    stats: tuple[Any, ...] = ()
    for index, raw in enumerate(method.statistics):
        statistics_pass = _as_pass(raw)
        wanted = [j for j, (_, static) in enumerate(plan.static)
                  if statistics_pass.wants(dict(static))]
        if (wanted and statistics_pass.idle is not None
                and not _holds_tracer(jax.tree.leaves(stats)) and statistics_pass.idle(stats)):
            wanted = [min(wanted, key=lambda j: math.prod(plan.shapes[j]))]
        stats_arrays, stats_static = _split_stats(stats)
        acc_arrays, acc_static = [], None
        for j in wanted:
            path, static = plan.static[j]
            base, models = read(j)
            if acc_static is None and statistics_pass.init is not None:
                start = statistics_pass.init(LeafContext(path, None, stats, total_size),
                                             len(models), **dict(static))
                if start is not None:
                    acc_arrays, acc_static = _split_stats(start)
            group = (index, tuple((x.shape, x.dtype) for x in (base, *models) if x is not None),
                     static, acc_static, stats_static)
            shares = (method, "update", group, total_size)
            statics = dict(method=method, index=index,
                           path=_SHARED_PATH.get(shares, _path_class(path)),
                           static=static, acc_static=acc_static, stats_static=stats_static,
                           total_size=total_size)
            args = (acc_arrays, base, tuple(models),
                    {n: c[j] for n, c in plan.coefficients.items()},
                    _key_parts(key, plan.paths[j]), stats_arrays)
            step = _step_key("update", statics, args)  # before `acc_arrays` are donated
            traces, reads = _WatchedContext.snapshot()
            acc_arrays = _update_leaf(*args, **statics)
            if shares not in _SHARED_PATH and _WatchedContext.snapshot() == (traces + 1, reads):
                _SHARED_PATH[shares] = statics["path"]  # the update never read the path
            acc_static = _STEP_STATIC[step]
            release(j)
        statics = dict(method=method, index=index, acc_static=acc_static,
                       stats_static=stats_static, total_size=total_size)
        arrays = _finalize_pass(acc_arrays, stats_arrays, **statics)
        stats = stats + (_join_stats(arrays, _STEP_STATIC[_step_key(
            "finalize", statics, (acc_arrays, stats_arrays))]),)
    return stats


def _run_per_leaf(method: MergeMethod, plan: LeafPlan, check_finite: bool, base_leaves,
                  model_leaves, coefficients, key):
    """`_run_kernels`' results from `LeafKernels`, leaf by leaf (concrete inputs from
    `leaf_workers` threads, `_dispatch_leaves`). Kernels that
    `speculate` are checked once all leaves ran (one device-to-host copy), and the
    leaves whose assumption failed run again without speculation."""
    concrete = not _holds_tracer(jax.tree.leaves((base_leaves, model_leaves, coefficients,
                                                  key)))
    total_size = sum(math.prod(xs[0].shape) for xs in model_leaves)
    bases = base_leaves if base_leaves is not None else [None] * len(model_leaves)
    stats = fold_statistics(method, plan, lambda j: (bases[j], model_leaves[j]), key,
                            total_size)
    kernels = LeafKernels(method, plan, stats, total_size, check_finite=check_finite,
                          speculative=concrete)
    results = _dispatch_leaves(
        lambda j: kernels.run(j, bases[j], model_leaves[j], key),
        [kernels.group(j, bases[j], model_leaves[j]) for j in range(len(model_leaves))],
        [xs[0].size for xs in model_leaves], workers=leaf_workers() if concrete else 1)
    if concrete and results and not _all_of([r[2] for r in results], jnp.all):
        held = np.asarray(jax.device_get([r[2] for r in results]), bool)
        for j in np.flatnonzero(~held):
            results[j] = kernels.run_exact(j, bases[j], model_leaves[j], key) + (None,)
    outs = [r[0] for r in results]
    return outs, ([r[1] for r in results] if check_finite else None)


#: Most threads `leaf_workers` gives: each holds one leaf's temporaries.
MAX_LEAF_WORKERS = 4


def leaf_workers() -> int:
    """Threads that dispatch a per-leaf merge's kernels: ``$MERGEJAX_LEAF_WORKERS`` if set;
    else on the CPU backend the cores this process may use (at most `MAX_LEAF_WORKERS`),
    and 1 elsewhere. Each thread holds one leaf's temporaries: 1 gives the least memory
    (ViT-B/32 shapes, 8 models, per-tensor TIES: 1.9 models' worth above the inputs,
    2.5 with 2 threads).

    XLA:CPU runs one thread's calls one after another, and a kernel's LAPACK calls, sorts
    and scatters on one core each; calls from several threads run side by side (ViT-B/32
    shapes, 8 models, 2 cores: Iso-C 17.5 -> 9.3 s, per-tensor TIES 3.35 -> 1.94 s, task
    arithmetic unchanged). Accelerators already queue one thread's calls asynchronously.
    """
    given = os.environ.get("MERGEJAX_LEAF_WORKERS")
    if given is not None:
        if not given.strip().isdigit() or int(given) < 1:
            raise MergeError(f"MERGEJAX_LEAF_WORKERS must be a positive integer, got {given!r}")
        return int(given)
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return max(1, min(cores, MAX_LEAF_WORKERS))


#: Leaf size (entries) from which `_dispatch_leaves` queues no call behind a running one.
_QUEUE_BELOW = 1 << 20


def _dispatch_leaves(run: Callable[[int], Any], groups: Sequence[Any], sizes: Sequence[int],
                     *, workers: int) -> list[Any]:
    """``[run(j) for j in range(len(groups))]``, with ``workers`` threads calling ``run``.

    XLA:CPU runs the calls one thread dispatched one after another, so a thread takes its
    next leaf only once its last but one has finished (one call queued behind the running
    one; none behind a leaf of `_QUEUE_BELOW` entries or more, whose temporaries would
    then be held twice per thread): the leaves are shared out as the threads free up,
    largest first (``sizes``), and the last to finish is a small one. The first leaf of
    each group (leaves sharing one compiled kernel) runs before the rest of its group,
    so a group is traced and compiled once, not once per thread. Only the calls' order
    changes: the results are the same bit for bit. New threads see JAX's global
    configuration, not the caller's context managers (``jax.enable_x64()``,
    ``jax.default_matmul_precision(...)``), so with one of those in force the leaves run
    in the calling thread.
    """
    if workers <= 1 or len(groups) <= 1:
        return [run(j) for j in range(len(groups))]
    first: dict[Any, int] = {}
    for j in range(len(groups)):
        first.setdefault(groups[j], j)
    largest_first = sorted(range(len(groups)), key=lambda j: (-sizes[j], j))
    queued = threading.local()

    def dispatch(j: int) -> Any:
        if first[groups[j]] != j:
            leads[groups[j]].result()
        result = run(j)
        jax.block_until_ready(getattr(queued, "last", None))
        queued.last = result
        if sizes[j] >= _QUEUE_BELOW:
            jax.block_until_ready(result)  # nothing queued behind a large leaf
            queued.last = None
        return result

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        if pool.submit(lambda: dict(jax.config.values)).result() != jax.config.values:
            return [run(j) for j in range(len(groups))]
        leads = {groups[j]: pool.submit(dispatch, j) for j in largest_first
                 if first[groups[j]] == j}
        # Submitted after every lead, so a thread waits only on a lead already running.
        rest = {j: pool.submit(dispatch, j) for j in largest_first if first[groups[j]] != j}
        return [(leads[groups[j]] if first[groups[j]] == j else rest[j]).result()
                for j in range(len(groups))]


def map_leaves(fn: Callable[..., Any], leaf_args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in leaf_args]`` for a jitted per-leaf function, dispatched as a
    per-leaf merge's kernels are: from `leaf_workers` threads when every array is concrete
    (`_dispatch_leaves`), calls with the same non-array arguments and array shapes sharing
    one compiled function.

    Example::

        vectors = map_leaves(jitted_leaf_fn, [(b, xs) for b, xs in zip(bases, models)])
    """
    def group(args: tuple[Any, ...]) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        return treedef, tuple((x.shape, x.dtype) if hasattr(x, "shape") else x
                              for x in leaves)

    arrays = jax.tree.leaves(leaf_args)
    return _dispatch_leaves(
        lambda j: fn(*leaf_args[j]), [group(a) for a in leaf_args],
        [sum(math.prod(np.shape(x)) for x in jax.tree.leaves(a)) for a in leaf_args],
        workers=1 if _holds_tracer(arrays) else leaf_workers())


@functools.partial(jax.jit, static_argnums=1)
def _all_of(scalars: Sequence[jax.Array], reduce: Callable[..., jax.Array]) -> jax.Array:
    """``reduce`` of per-leaf scalars (their max, their all) in one compiled call."""
    return reduce(jnp.stack(scalars))


def _path_class(path: str) -> str:
    """``path`` with its layer numbers (``layers/3``, Flax's ``block_3``) replaced by ``#``:
    leaves of every layer share one compiled kernel (kernels decide from names such as
    ``kernel``/``bias``, never from a layer number)."""
    return re.sub(r"(?:^|(?<=/)|(?<=_))\d+(?=/|$)", "#", path)


#: Per (method, leaf group): the path a kernel that never read ``ctx.path`` was traced
#: with, which every leaf of the group then passes (one trace, one compiled function).
_SHARED_PATH: dict[Any, str] = {}
#: The leaf groups (`LeafKernels._shares`) whose speculation failed once: they run the
#: exact kernel (the same bits; its rare branch runs only where needed).
_NEEDS_EXACT: set[Any] = set()


def _split_stats(stats: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """Statistics as traced arrays plus a hashable rest (Python values such as counts)."""
    leaves, treedef = jax.tree.flatten(stats)
    arrays = [x for x in leaves if isinstance(x, (jax.Array, np.ndarray, np.generic))]
    rest = tuple((i, x) for i, x in enumerate(leaves)
                 if not isinstance(x, (jax.Array, np.ndarray, np.generic)))
    return arrays, (treedef, rest)


def _join_stats(arrays: Sequence[Any], static: Any) -> tuple[Any, ...]:
    treedef, rest = static
    leaves: list[Any] = [None] * treedef.num_leaves
    fixed = dict(rest)
    it = iter(arrays)
    for i in range(treedef.num_leaves):
        leaves[i] = fixed[i] if i in fixed else next(it)
    return treedef.unflatten(leaves)


class _WatchedContext(LeafContext):
    """A `LeafContext` that counts, per thread, its creations (traces of `_merge_leaf`,
    which happen in the calling thread) and the kernel's reads of ``ctx.path``, so that
    leaves which differ only by name can share a trace when the kernel never reads it."""

    __slots__ = ()
    counts = threading.local()

    def __new__(cls, *fields):
        cls.counts.traces = getattr(cls.counts, "traces", 0) + 1
        return super().__new__(cls, *fields)

    @property
    def path(self) -> str:
        self.counts.path_reads = getattr(self.counts, "path_reads", 0) + 1
        return tuple.__getitem__(self, 0)

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        """``(traces, path reads)`` so far in this thread."""
        return getattr(cls.counts, "traces", 0), getattr(cls.counts, "path_reads", 0)


@functools.partial(jax.jit, static_argnames=("method", "path", "static", "out_dtype",
                                             "total_size", "stats_static", "check_finite",
                                             "speculative"))
def _merge_leaf(base, models, coefficients, key_parts, stats_arrays, thresholds, *,
                method: MergeMethod, path: str, static, out_dtype: str, total_size: int,
                stats_static, check_finite: bool, speculative: bool):
    """One leaf's merge: the method's kernel on the upcast inputs, cast to ``out_dtype``,
    its ``max|out|`` when ``check_finite`` (as `_run_kernels` gives), and whether every
    `speculate` of a ``speculative`` kernel took its common branch (if not, the result is
    to be computed again without speculation). ``thresholds``: ``ctx.thresholds``."""
    path, base, xs, hp, stored = leaf_inputs(path, static, base, models, coefficients)
    stats, key = _join_stats(stats_arrays, stats_static), _leaf_key_of(key_parts)
    with speculation() if speculative else contextlib.nullcontext([]) as assumed:
        out = method.kernel(_WatchedContext(path, key, stats, total_size, stored, thresholds),
                            base, xs, **hp)
    out = out.astype(out_dtype)
    peak = (jnp.max(jnp.abs(out)).astype(jnp.float32) if out.size else jnp.float32(0)) \
        if check_finite else None
    return out, peak, jnp.all(jnp.stack(assumed)) if assumed else jnp.bool_(True)


class LeafKernels:
    """A method's kernel run one leaf at a time: the engine's ``per_leaf`` mode, and what
    a streaming merge (`mergejax.io.streaming`) runs on every tensor it reads.

    Each group of leaves with the same input shapes and dtypes, static hyperparameters and
    output dtype shares one compiled function. A kernel that never reads ``ctx.path``
    (most) is traced once per group, so the projections of every block of a transformer
    share one compilation; one that reads it gets the path with its numbers replaced by
    ``#`` (layers never matter to a kernel). With ``speculative``, kernels are compiled
    under `speculation`: `run` returns whether the assumptions held, and `run_exact`
    computes a leaf whose did not (its group then runs the exact kernel from then on, in
    later merges too: each would otherwise run such leaves twice).
    ``stats`` are the method's ``ctx.stats`` for the whole model, ``total_size`` its
    number of merged entries. The results are `_run_kernels`' bit for bit.

    Example::

        kernels = LeafKernels(method, plan, stats=(), total_size=n)
        out, peak, held = kernels.run(j, base_leaf, model_leaves)
        if not held:
            out, peak = kernels.run_exact(j, base_leaf, model_leaves)
    """

    def __init__(self, method: MergeMethod, plan: LeafPlan, stats: tuple[Any, ...],
                 total_size: int, *, check_finite: bool = True, speculative: bool = True):
        self._method, self._plan, self._total_size = method, plan, total_size
        self._check_finite, self._speculative = check_finite, speculative
        self._stats_arrays, self._stats_static = _split_stats(stats)

    def group(self, j: int, base: Any, models: Sequence[Any], thresholds: Any = None
              ) -> Any:
        """The compiled function plan leaf ``j`` shares with the other leaves of its
        group (same input shapes and dtypes, static hyperparameters, output dtype, and
        whether the tensor's thresholds are given)."""
        return (tuple((x.shape, x.dtype) for x in (base, *models) if x is not None),
                self._plan.static[j][1], self._plan.out_dtypes[j], thresholds is None)

    def run(self, j: int, base: Any, models: Sequence[Any], key: jax.Array | None = None,
            thresholds: Any = None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """``(merged leaf, max|merged| or None, assumptions held)`` of plan leaf ``j``
        from its inputs (any view of them for a reshape-invariant kernel); ``key`` is the
        user's key (the kernel gets the leaf's `leaf_key`). With ``thresholds`` (the
        method's `TensorThresholds` of the whole leaf), the inputs may be any chunk of
        the leaf's flattened entries."""
        group = self.group(j, base, models, thresholds)
        return self._call(j, group, base, models, key,
                          self._speculative and self._shares(group) not in _NEEDS_EXACT,
                          thresholds)

    def run_exact(self, j: int, base: Any, models: Sequence[Any],
                  key: jax.Array | None = None, thresholds: Any = None
                  ) -> tuple[jax.Array, jax.Array | None]:
        """`run` without speculation, for leaf ``j`` and the rest of its group."""
        group = self.group(j, base, models, thresholds)
        _NEEDS_EXACT.add(self._shares(group))
        return self._call(j, group, base, models, key, False, thresholds)[:2]

    def _shares(self, group: Any) -> Any:
        """What the leaves sharing a compiled function have in common."""
        return self._method, group, self._stats_static, self._total_size

    def _call(self, j, group, base, models, key, speculative, thresholds=None):
        path, static = self._plan.static[j]
        shares = self._shares(group)
        shared = _SHARED_PATH.get(shares, _path_class(path))
        traces, reads = _WatchedContext.snapshot()
        result = _merge_leaf(
            base, tuple(models), {n: c[j] for n, c in self._plan.coefficients.items()},
            _key_parts(key, self._plan.paths[j]), self._stats_arrays, thresholds,
            method=self._method,
            path=shared, static=static, out_dtype=self._plan.out_dtypes[j],
            total_size=self._total_size, stats_static=self._stats_static,
            check_finite=self._check_finite, speculative=speculative)
        if shares not in _SHARED_PATH and _WatchedContext.snapshot() == (traces + 1, reads):
            _SHARED_PATH[shares] = shared  # traced now, and the kernel never read the path
        return result


def _batched_kernels(method: MergeMethod, plan, out_dtypes, inputs, keys, stats,
                     total_size: int) -> list[jax.Array]:
    """Runs the kernel once per group of leaves with the same shape, dtype and static
    hyperparameters, `jax.vmap`-ed over the group's stacked leaves (e.g. the twelve
    identical blocks of a ViT: one batched SVD instead of twelve). Stacking copies the
    group's inputs once; the kernel sees ``ctx.path`` of the group's first leaf."""
    groups: dict[Any, list[int]] = {}
    for j, ((path, static), out_dtype) in enumerate(zip(plan, out_dtypes)):
        _, base, xs, _, _ = inputs[j]
        key = (xs[0].shape, xs[0].dtype.name, static, out_dtype)
        if callable(method.batched):
            key += (method.batched(path, xs[0].shape, dict(static)),)
        groups.setdefault(key, []).append(j)
    outs: list[Any] = [None] * len(inputs)
    for members in groups.values():
        path, base, xs, hp, stored = inputs[members[0]]
        static = dict(plan[members[0]][1])
        coefficient_names = [n for n in hp if n not in static]
        key = keys[members[0]]
        if len(members) == 1:
            out = method.kernel(LeafContext(path, key, stats, total_size, stored), base, xs,
                                **hp)
            outs[members[0]] = out.astype(out_dtypes[members[0]])
            continue

        def one(base, xs, coefficients, key, path=path, static=static, stored=stored):
            return method.kernel(LeafContext(path, key, stats, total_size, stored), base, xs,
                                 **static, **coefficients)

        stack = lambda get, members=members: jnp.stack([get(inputs[j]) for j in members])
        stacked = jax.vmap(one)(
            stack(lambda leaf: leaf[1]) if base is not None else None,
            tuple(stack(lambda leaf, k=k: leaf[2][k]) for k in range(len(xs))),
            {n: stack(lambda leaf, n=n: leaf[3][n]) for n in coefficient_names},
            jnp.stack([keys[j] for j in members]) if key is not None else None)
        for i, j in enumerate(members):
            outs[j] = stacked[i].astype(out_dtypes[j])
    return outs


def _at_full_precision(statistics_pass: Any) -> Any:
    """A statistics pass (as `leafwise` takes them) whose functions run `full_precision`."""
    if not isinstance(statistics_pass, StatisticsPass):
        return full_precision(statistics_pass)
    return statistics_pass._replace(update=full_precision(statistics_pass.update),
                                    finalize=full_precision(statistics_pass.finalize))


def leafwise(name: str, *, family: str, paper: str, coefficients: Sequence[str] = (),
             per_model: Sequence[str] = (), needs_base: bool = True,
             uses_key: bool | str = False,
             min_models: int = 1, max_models: int | None = None,
             statistics: Sequence[Callable[..., Any]] = (),
             validate: Callable[..., None] | None = None,
             batched: bool | Callable[..., Any] = False,
             reshape_invariant: bool | Callable[[dict[str, Any]], bool] = False,
             runs_per_leaf: bool = True,
             tensor_thresholds: Callable[[dict[str, Any]], TensorThresholds | None]
             | None = None,
             register: bool = True) -> Callable[[Callable[..., jax.Array]], MergeMethod]:
    """Decorator: turns a leaf kernel into a `MergeMethod`, registered unless
    ``register=False`` (for a private method used only by its own code).

    The kernel's signature is ``kernel(ctx, base, models, *, <hparams with defaults>)``:
    ``base`` is the leaf of the base model (None when the method runs without one),
    ``models`` a tuple of the K models' leaves, all upcast to float32 or wider;
    per-model hyperparameters arrive as arrays of shape (K,). It returns the merged leaf.
    Kernels and statistics passes are traced under `full_precision` (float32 matmuls
    at full precision on GPUs too, as in PyTorch).

    ``statistics`` is a sequence of passes over all leaves, for model-wide quantities
    (norms, a global top-k threshold). A pass is a `StatisticsPass` (a fold over the
    leaves) or a function with the kernel's signature returning a pytree of arrays per
    leaf (or None), which are summed. Each pass's result is appended to ``ctx.stats``
    before the next pass runs, and the kernels see all of them. Each pass is one read of
    every leaf, so a streaming merge runs them one after another.
    ``uses_key=True`` requires ``key=`` (a random method); ``"optional"`` accepts it for
    methods that are random only under some settings.
    ``validate(paths, static_hparams)`` gets every leaf's path and static hyperparameters
    (one dict per leaf) and raises `MergeError` for bad values.
    ``batched=True`` runs the kernel `jax.vmap`-ed over groups of same-shaped leaves with
    equal static hyperparameters (for kernels dominated by per-leaf linear algebra such
    as SVDs, whose batched form is one call); the kernel must then be vmappable and use
    ``ctx.path`` only in messages. A function ``batched(path, shape, static_hparams) ->
    hashable`` also splits groups by its value, for kernels that decide something from
    the path (`mergejax.methods.matrices.batch_key`: which leaves are matrices). It costs
    one copy of each group's inputs.
    ``reshape_invariant=True`` declares that each entry of a leaf's result depends only
    on the inputs at that entry (in row-major order) and on tensor-wide quantities that
    do not depend on the shape (exact order statistics, counts; not floating-point sums,
    whose rounding follows the layout), so the kernel run on any reshaped view gives the
    same bits: a streaming merge then compiles one kernel per tensor size, not per shape (a
    Llama's ``gate_proj``, ``up_proj`` and ``down_proj`` share one). A function of the
    leaf's static hyperparameters when it depends on them.
    ``runs_per_leaf=False`` keeps large merges of concrete arrays in one program by
    default (`MergeMethod`'s ``per_leaf``), for kernels that make several independent
    LAPACK calls per leaf, which XLA:CPU runs two at a time within a program. Per leaf,
    `leaf_workers` threads run leaves side by side instead; measure before declaring it
    (ViT-B/32 shapes, 8 models, 2 cores, one program -> per leaf: Iso-C 12.2 -> 9.3 s,
    TSV-M 92 -> 72 s, Iso-CTS 88 -> 77 s; WUDI's closed form 42 s either way).
    ``tensor_thresholds(static_hparams)`` gives the leaf's `TensorThresholds` (or None)
    for a kernel that reads ``ctx.thresholds`` when they are given.
    """

    def wrap(kernel: Callable[..., jax.Array]) -> MergeMethod:
        sig = inspect.signature(kernel)
        hparams = {p.name: p.default for p in sig.parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}
        method = MergeMethod(
            name=name, kernel=full_precision(kernel), hparams=hparams,
            coefficients=frozenset(coefficients), per_model=frozenset(per_model),
            family=family, paper=paper, needs_base=needs_base, uses_key=uses_key,
            min_models=min_models, max_models=max_models,
            statistics=tuple(_at_full_precision(p) for p in statistics),
            validate=validate, batched=batched, reshape_invariant=reshape_invariant,
            runs_per_leaf=runs_per_leaf, tensor_thresholds=tensor_thresholds)
        object.__setattr__(method, "__doc__", kernel.__doc__)
        params = [inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter("models", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [p for p in sig.parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if uses_key:
            params.append(inspect.Parameter(
                "key", inspect.Parameter.KEYWORD_ONLY,
                default=None if uses_key == "optional" else inspect.Parameter.empty))
        params += [inspect.Parameter("out_dtype", inspect.Parameter.KEYWORD_ONLY, default=None),
                   inspect.Parameter("check_finite", inspect.Parameter.KEYWORD_ONLY,
                                     default=True),
                   inspect.Parameter("per_leaf", inspect.Parameter.KEYWORD_ONLY, default=None)]
        object.__setattr__(method, "__signature__", inspect.Signature(params))
        if register:
            registry.register(method)
        return method

    return wrap
