"""Statistics that data-aware merges need, computed from the user's own model and batches.

* `diagonal_fisher`: the diagonal Fisher information of one model (Fisher merging, Matena &
  Raffel 2022, arXiv 2111.09832), from per-example gradients (``jax.vmap`` of ``jax.grad``).
* `dense_input_grams` (Flax Linen) and `nnx_dense_input_grams` (Flax NNX): the input Gram
  matrix ``sum x^T x`` of every dense layer (RegMean, Jin et al. 2023, arXiv 2212.09849),
  recorded without changing the model's code, keyed by the kernel's `/`-joined param path.
* `task_fishers`, `task_grams`: the above for K fine-tuned models, model i on task i's
  batches, in the calling convention of `mergejax.learned.loop` (``apply_fn``, ``heads``,
  ``batches``): what ``fisher`` / ``regmean`` in `mergejax.methods.data_aware` take.

Every per-batch function is one ``jax.jit`` (compiled once per batch shape); sums are
accumulated on the device in float32 and divided once at the end.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from mergejax.learned.loop import check_heads, check_task_batches, task_logits
from mergejax.tree import MergeError, PyTree, is_float, unjitted

__all__ = [
    "FISHER_MODES",
    "Gram",
    "dense_input_grams",
    "diagonal_fisher",
    "nnx_dense_input_grams",
    "task_fishers",
    "task_grams",
]

LogitsFn = Callable[[PyTree, Any], jax.Array]
#: ``mode`` values of `diagonal_fisher` (see its docstring).
FISHER_MODES = ("empirical", "sampled", "exact")


class Gram(NamedTuple):
    """The input statistics of one dense layer.

    Attributes:
      matrix: ``sum x^T x`` (float32, ``(d_in, d_in)``) over every row ``x`` of the layer's
        inputs flattened to ``(rows, d_in)`` (all batch and sequence positions).
      count: the number of rows summed. RegMean uses the mean ``matrix / count``
        (`mean`), as FusionBench does.
    """

    matrix: jax.Array
    count: int

    def mean(self) -> jax.Array:
        """``matrix / count``: FusionBench's running mean of ``x^T x`` over rows.

        Example::

            Gram(jnp.eye(3) * 4.0, 2).mean()   # 2 * I
        """
        return self.matrix / self.count


def _take(batches: Iterable[Any], num_batches: int | None, name: str) -> Iterator[Any]:
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int) or num_batches < 1):
        raise MergeError(f"{name}: num_batches must be a positive int or None, got "
                         f"{num_batches!r}")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise MergeError(f"{name}: batches must be an iterable of batches, got "
                         f"{type(batches).__name__}")
    return itertools.islice(iter(batches), num_batches)


# ---------------------------------------------------------------------------------------
# Diagonal Fisher.


def _float_split(params: PyTree) -> tuple[list[Any], list[bool], Any]:
    leaves, treedef = jax.tree.flatten(params)
    return leaves, [is_float(x) for x in leaves], treedef


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fisher_batch(logits_fn: LogitsFn, mode: str, params: PyTree, inputs: Any,
                  labels: jax.Array | None, key: jax.Array | None) -> list[jax.Array]:
    """The sum over the batch's examples of the squared per-example gradients of
    ``log p(y|x)``, one float32 array per floating leaf of ``params``."""
    leaves, floating, treedef = _float_split(params)
    trainable = [x for x, f in zip(leaves, floating) if f]

    def log_probs(train: list[jax.Array], x: Any) -> jax.Array:
        it = iter(train)
        full = treedef.unflatten([next(it) if f else v for v, f in zip(leaves, floating)])
        one = jax.tree.map(lambda a: a[None], x)  # one example as a batch of one
        logits = logits_fn(full, one)
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise MergeError("diagonal_fisher: logits_fn(params, inputs) must return "
                             f"logits of shape (N, classes), got {logits.shape} for N=1")
        return jax.nn.log_softmax(logits[0].astype(jnp.float32))

    def squared(grads: list[jax.Array]) -> list[jax.Array]:
        return [jnp.square(g.astype(jnp.float32)) for g in grads]

    def per_example(x: Any, y: jax.Array | None, k: jax.Array | None) -> list[jax.Array]:
        if mode == "exact":  # E_{y ~ p(y|x)} exactly: sum_c p_c g_c^2
            probs = jax.lax.stop_gradient(jnp.exp(log_probs(trainable, x)))
            grads = jax.vmap(lambda c: jax.grad(lambda t: log_probs(t, x)[c])(trainable))(
                jnp.arange(probs.shape[0]))
            return [jnp.tensordot(probs, g, axes=1) for g in squared(grads)]
        if mode == "sampled":
            logits = jax.lax.stop_gradient(log_probs(trainable, x))
            y = jax.random.categorical(k, logits)
        return squared(jax.grad(lambda t: log_probs(t, x)[y])(trainable))

    n = jax.tree.leaves(inputs)[0].shape[0]
    keys = jax.random.split(key, n) if key is not None else None
    per = jax.vmap(per_example)(inputs, labels, keys)
    return [jnp.sum(p, axis=0) for p in per]


def diagonal_fisher(logits_fn: LogitsFn, params: PyTree, batches: Iterable[Any], *,
                    mode: str = "empirical", key: jax.Array | None = None,
                    num_batches: int | None = None) -> PyTree:
    """The diagonal Fisher ``F = mean_n E_y[(d log p(y|x_n) / d theta)^2]`` of one model
    (Matena & Raffel 2022, arXiv 2111.09832, eq. 4): the mean over examples of the squared
    per-example gradient of ``log softmax(logits)[y]``.

    ``logits_fn(params, inputs) -> (N, classes)`` logits (it is called on one example at a
    time, as a batch of one, inside ``jax.vmap``). ``mode`` chooses ``y``:

    * ``"empirical"``: the batch's label; batches yield ``(inputs, labels)``.
    * ``"sampled"``: ``y ~ Categorical(softmax(logits))`` drawn with ``key`` (a new key per
      batch and example); the paper's Monte-Carlo estimate with one sample.
    * ``"exact"``: the expectation over all classes, ``sum_c p_c g_c^2`` (one gradient per
      class: for few classes), the paper's exact Fisher.

    In the last two modes a batch is ``inputs``, or ``(inputs, labels)`` (a 2-tuple/list,
    whose labels are ignored). FusionBench's CLIP Fisher merging squares instead the
    gradient of the *batch sum* ``sum_n sum_c sqrt(p_nc) log p_nc`` (one backward pass per
    batch, cross-example terms included) and divides by the number of examples; it is not
    a per-example estimate and is not offered. ``num_batches`` stops after that many
    batches (FusionBench's ``num_fisher_examples`` / batch size); None reads them all.

    Returns a pytree like ``params``: float32 Fisher values on floating leaves, None on the
    others.

    Example::

        fisher_a = diagonal_fisher(lambda p, x: model.apply({"params": p}, x), params_a,
                                   labelled_batches_a, num_batches=8)
    """
    if mode not in FISHER_MODES:
        raise MergeError(f"diagonal_fisher: mode must be one of {FISHER_MODES}, got {mode!r}")
    if mode == "sampled" and key is None:
        raise MergeError("diagonal_fisher: mode='sampled' draws labels; pass "
                         "key=jax.random.key(seed)")
    _, floating, treedef = _float_split(params)
    if not any(floating):
        raise MergeError("diagonal_fisher: params has no floating leaves")
    totals: list[jax.Array] | None = None
    count = 0
    for b, batch in enumerate(_take(batches, num_batches, "diagonal_fisher")):
        labels = None
        if mode == "empirical":
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise MergeError("diagonal_fisher: mode='empirical' needs batches of "
                                 f"(inputs, labels), got {type(batch).__name__}")
            inputs, labels = batch
            labels = jnp.asarray(labels)
        else:
            inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
        n = jax.tree.leaves(inputs)[0].shape[0]
        if labels is not None and labels.shape != (n,):
            raise MergeError(f"diagonal_fisher: batch {b} has {n} inputs but labels of "
                             f"shape {labels.shape}; give one integer label per example")
        k = jax.random.fold_in(key, b) if mode == "sampled" else None
        sums = _fisher_batch(logits_fn, mode, params, inputs, labels, k)
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
        count += n
    if totals is None:
        raise MergeError("diagonal_fisher: batches is empty")
    it = iter(t / count for t in totals)
    return treedef.unflatten([next(it) if f else None for f in floating])


# ---------------------------------------------------------------------------------------
# Dense-layer input Gram matrices.


def _contracted_rows(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """``x`` with its contracted ``axes`` (in the kernel's order) moved last and flattened:
    ``(rows, prod(contracted))``, the rows a ``(d_in, d_out)`` kernel view multiplies."""
    ndim = x.ndim
    axes = [a % ndim for a in axes]
    moved = jnp.moveaxis(x, axes, list(range(ndim - len(axes), ndim)))
    d_in = math.prod(x.shape[a] for a in axes)
    return moved.reshape(-1, d_in).astype(jnp.float32)


def _gram_of(rows: jax.Array) -> tuple[jax.Array, int]:
    gram = jnp.einsum("ri,rj->ij", rows, rows, precision=jax.lax.Precision.HIGHEST)
    return gram, rows.shape[0]


def _axes(axis: int | Sequence[int]) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else tuple(axis)


def _record(records: dict[str, list[Any]], path: str, rows: jax.Array) -> None:
    """Adds one call's rows to ``records[path] = [sum x^T x, rows, order of first call]``."""
    matrix, count = _gram_of(rows)
    entry = records.get(path)
    records[path] = ([matrix, count, len(records)] if entry is None
                     else [entry[0] + matrix, entry[1] + count, entry[2]])


def _outputs(records: dict[str, list[Any]]) -> dict[str, tuple[jax.Array, ...]]:
    """The jitted functions' outputs; the call order travels as an array because jit
    returns dicts with sorted keys."""
    return {p: (m, jnp.asarray(c), jnp.asarray(o)) for p, (m, c, o) in records.items()}


@functools.partial(jax.jit, static_argnums=0)
def _linen_grams(apply_fn: Callable[[PyTree, Any], Any], params: PyTree,
                 batch: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """One batch's ``{kernel path: (sum x^T x, rows)}``, recorded at trace time."""
    records: dict[str, list[Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense,
                                                                     nn.DenseGeneral)):
            x = args[0] if args else kwargs["inputs"]
            if isinstance(module, nn.DenseGeneral) and module.batch_dims:
                raise MergeError(f"dense_input_grams: DenseGeneral at "
                                 f"'{'/'.join(module.path)}' has batch_dims; not supported")
            axes = (-1,) if isinstance(module, nn.Dense) else _axes(module.axis)
            _record(records, "/".join(map(str, module.path + ("kernel",))),
                    _contracted_rows(jnp.asarray(x), axes))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(params, batch)
    return _outputs(records)


def _accumulate(name: str, per_batch: Callable[[Any], dict[str, Any]],
                batches: Iterable[Any], num_batches: int | None) -> dict[str, Gram]:
    """Sums the per-batch records; the result is ordered by each layer's first call."""
    totals: dict[str, list[Any]] | None = None
    for batch in _take(batches, num_batches, name):
        grams = per_batch(batch)
        if totals is None:
            totals = {p: [m, c, o] for p, (m, c, o) in grams.items()}
        else:
            if set(grams) != set(totals):
                raise MergeError(f"{name}: batches call different dense layers "
                                 f"({sorted(set(grams) ^ set(totals))})")
            for p, (m, c, _) in grams.items():
                totals[p] = [totals[p][0] + m, totals[p][1] + c, totals[p][2]]
    if totals is None:
        raise MergeError(f"{name}: batches is empty")
    if not totals:
        raise MergeError(f"{name}: the model called no dense layer")
    ordered = sorted(totals.items(), key=lambda item: int(item[1][2]))
    return {p: Gram(m, int(c)) for p, (m, c, _) in ordered}


def dense_input_grams(apply_fn: Callable[[PyTree, Any], Any], params: PyTree,
                      batches: Iterable[Any], *,
                      num_batches: int | None = None) -> dict[str, Gram]:
    """The input `Gram` of every Flax Linen ``nn.Dense`` / ``nn.DenseGeneral`` call made by
    ``apply_fn(params, batch)`` (which calls some ``module.apply``), summed over batches.

    Inputs are recorded by ``flax.linen.intercept_methods`` while ``apply_fn`` is traced
    under ``jax.jit``, so the model's code is unchanged (a jitted ``apply_fn`` is traced
    unwrapped; one that calls the model through an inner ``jax.jit`` raises `MergeError`).
    Each input is flattened to rows ``(rows, d_in)`` over the contracted axes: the last
    axis for ``Dense`` and for attention's query/key/value ``DenseGeneral`` (kernel ``(d,
    heads, head_dim)``), the last two for attention's output (kernel ``(heads, head_dim,
    d)``), ``axis`` in general.
    A layer called several times (shared weights) sums all its calls. Keys are the module's
    scope path + ``/kernel``, e.g. ``"resblocks_0/mlp_fc/kernel"``: the paths of the
    ``params`` collection of the module that ``apply_fn`` applies. Layers inside
    ``nn.scan``/``nn.vmap`` (stacked kernels) are not supported.

    The dict is ordered by each layer's first call. ``num_batches`` stops after that many
    batches (None: all). Compiles once per batch shape (cached on ``apply_fn``).

    Example::

        grams = dense_input_grams(lambda p, x: vit.apply({"params": p}, x), params, batches)
        grams["resblocks_0/mlp_fc/kernel"].mean()   # (width, width)
    """
    apply_fn = unjitted(apply_fn)

    def per_batch(batch):
        try:
            return _linen_grams(apply_fn, params, batch)
        except jax.errors.UnexpectedTracerError as e:
            raise MergeError(
                "dense_input_grams: apply_fn runs the model inside a jax.jit of its own, so "
                "the layers' inputs are values of that inner trace; pass apply_fn without "
                "the inner jax.jit (dense_input_grams compiles it)") from e

    return _accumulate("dense_input_grams", per_batch, batches, num_batches)


_NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral)


@contextlib.contextmanager
def _recording_nnx(records: dict[str, list[Any]], paths: dict[int, str]):
    """Wraps ``nnx.Linear.__call__`` / ``nnx.LinearGeneral.__call__`` to record the inputs
    of the layers in ``paths`` (by ``id``), restoring both in ``finally``."""
    originals = {cls: cls.__call__ for cls in _NNX_LAYERS}

    def wrapper(cls):
        def call(self, inputs, *args, **kwargs):
            path = paths.get(id(self))
            if path is not None:
                if isinstance(self, nnx.LinearGeneral):
                    if self.batch_axis:
                        raise MergeError(f"nnx_dense_input_grams: LinearGeneral at "
                                         f"'{path}' has batch_axis; not supported")
                    axes = _axes(self.axis)
                else:
                    axes = (-1,)
                _record(records, path, _contracted_rows(jnp.asarray(inputs), axes))
            return originals[cls](self, inputs, *args, **kwargs)
        return call

    try:
        for cls in _NNX_LAYERS:
            cls.__call__ = wrapper(cls)
        yield
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_grams(graphdef: Any, call: Callable[[Any, Any], Any], state: Any,
               batch: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    model = nnx.merge(graphdef, state)
    paths = {id(m): "/".join(map(str, p + ("kernel",)))
             for p, m in nnx.iter_modules(model) if isinstance(m, _NNX_LAYERS)}
    records: dict[str, list[Any]] = {}
    with _recording_nnx(records, paths):
        call(model, batch)
    return _outputs(records)


def _call_model(model: Any, batch: Any) -> Any:
    return model(batch)


def nnx_dense_input_grams(model: nnx.Module, batches: Iterable[Any], *,
                          call: Callable[[Any, Any], Any] | None = None,
                          num_batches: int | None = None) -> dict[str, Gram]:
    """The input `Gram` of every ``nnx.Linear`` / ``nnx.LinearGeneral`` of a Flax NNX
    ``model``, summed over batches (see `dense_input_grams` for the flattening).

    ``call(model, batch)`` runs the model (default ``model(batch)``). The layers' class
    ``__call__`` is wrapped while the jitted call is traced (and restored in ``finally``;
    not thread-safe while tracing), so subclasses overriding ``__call__`` are not seen.
    Keys are the layer's path in the module graph + ``/kernel``, the paths of
    ``nnx.to_pure_dict(nnx.state(model))``, e.g. ``"layers/0/kernel"``.

    Example::

        grams = nnx_dense_input_grams(mlp, batches)
        grams["fc1/kernel"].matrix
    """
    graphdef, state = nnx.split(model)
    fn = _call_model if call is None else call
    return _accumulate("nnx_dense_input_grams",
                       lambda batch: _nnx_grams(graphdef, fn, state, batch),
                       batches, num_batches)


# ---------------------------------------------------------------------------------------
# K models, one task each (the suite's calling convention).


def _check_tasks(name: str, models: Sequence[PyTree], batches: Sequence[Any]) -> None:
    if isinstance(models, dict) or not isinstance(models, Sequence) or not models:
        raise MergeError(f"{name}: models must be a non-empty list of pytrees")
    check_task_batches(batches, len(models), name)


def task_fishers(apply_fn: Callable[[PyTree, Any], Any], models: Sequence[PyTree],
                 batches: Sequence[Iterable[Any]], *, heads: Sequence[Any] | None = None,
                 mode: str = "empirical", key: jax.Array | None = None,
                 num_batches: int | None = None) -> list[PyTree]:
    """``[diagonal_fisher(model i's logits, models[i], batches[i]) for i]``: the
    ``fishers=`` of ``fisher``. Model i's logits are ``heads[i](apply_fn(params, inputs))``
    (or ``apply_fn`` alone without heads); batches as `diagonal_fisher` reads them.

    Example::

        fishers = task_fishers(backbone_fn, fine_tuned, labelled_val, heads=heads,
                               num_batches=8)
        merged = mergejax.merge("fisher", None, fine_tuned, fishers=fishers)
    """
    _check_tasks("task_fishers", models, batches)
    check_heads(heads, len(models), "task_fishers")
    out = []
    for i, (params, task_batches) in enumerate(zip(models, batches)):
        k = jax.random.fold_in(key, i) if key is not None else None
        out.append(diagonal_fisher(functools.partial(task_logits, apply_fn, heads, task=i),
                                   params, task_batches,
                                   mode=mode, key=k, num_batches=num_batches))
    return out


def task_grams(apply_fn: Callable[[PyTree, Any], Any], models: Sequence[PyTree],
               batches: Sequence[Iterable[Any]], *,
               num_batches: int | None = None) -> list[dict[str, Gram]]:
    """``[dense_input_grams(apply_fn, models[i], batches[i]) for i]``: the ``grams=`` of
    ``regmean`` (Flax Linen models; ``apply_fn(params, batch)`` gets each batch as is).

    Example::

        grams = task_grams(backbone_fn, fine_tuned, unlabelled_val, num_batches=8)
        merged = mergejax.merge("regmean", None, fine_tuned, grams=grams)
    """
    _check_tasks("task_grams", models, batches)
    return [dense_input_grams(apply_fn, m, b, num_batches=num_batches)
            for m, b in zip(models, batches)]
