"""Merging LoRA adapters: dense merges of their updates, concatenation, SVD
re-factorisation, and LoraHub's gradient-free composition.

**Canonical form.** An adapter is a pytree whose adapted weights are `LoraFactors` leaves
(other floating leaves are dense deltas, added as they are). The factors are stored in the
**Flax orientation**, like ``flax.nnx.LoRA`` and the ``(in, out)`` kernels of this library::

    a: (..., in, r)    the down-projection   (PEFT: lora_A.weight.T)
    b: (..., r, out)   the up-projection     (PEFT: lora_B.weight.T)
    delta = scaling * a @ b                  (..., in, out), a Flax Dense kernel

so ``delta`` is the transpose of PEFT's ``scaling * lora_B.weight @ lora_A.weight``
(``(out, in)``, PyTorch orientation), and ``scaling`` is PEFT's ``lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with rsLoRA), one value per adapted weight. Leading axes (a stack of
scanned layers) are batch axes. `from_peft` converts a PEFT state dict (``lora_A``/``lora_B``,
also ``lora_embedding_A``/``_B``, whose delta PEFT transposes to the ``(num, dim)`` table:
the same rule gives it) and `to_peft` converts back. Every function here returns the same
result, transposed, whichever orientation the adapters came from; ``layout="out_in"``
produces dense deltas in the PyTorch orientation instead.

**Methods** (registered as ``lora_linear``, ``lora_concat``, ``lora_svd``, ``lorahub``; call
them through `mergejax.merge` with ``base=None`` and the adapters as models):

* `lora_merge` / ``lora_linear``: turns each adapter into its dense ``delta`` and merges
  those with any registered method over a zero base (so the method's task vectors are the
  deltas: ``"task_arithmetic"``, ``"ties"``, ``"dare_ties"``, ...), optionally re-factorised
  to rank ``r`` by truncated SVD;
* `lora_concat`: PEFT's ``cat``: factors concatenated along the rank axis, exact;
* `lora_svd`: PEFT's ``svd``: ``sum_i w_i delta_i`` truncated to rank ``r``;
* `lora_combine`: element-wise combination of the factors (LoraHub's COMPOSE, PEFT's
  ``linear``), and `lorahub`, which searches its weights with CMA-ES on a few examples.

Example::

    from mergejax import lora

    adapters = [lora.from_peft(sd, alpha=16) for sd in peft_state_dicts]
    merged = lora.lora_svd(adapters, weights=[0.5, 0.5], rank=8)
    deltas = lora.lora_delta(merged)  # the adapter's paths, (in, out) dense updates
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax import rules as rules_lib
from mergejax.learned import search
from mergejax.methods import matrices
from mergejax.tree import MergeError, PyTree, full_precision, is_float, path_str

__all__ = [
    "LoraFactors",
    "LoraHubResult",
    "LoraMethod",
    "from_peft",
    "lora_combine",
    "lora_concat",
    "lora_delta",
    "lora_merge",
    "lora_svd",
    "lorahub",
    "to_peft",
]

Array = jax.Array
FAMILY = "lora"
LORA_PAPER = "Hu et al. 2021, LoRA: Low-rank adaptation of large language models (arXiv 2106.09685)"
PEFT = "; Hugging Face PEFT add_weighted_adapter"
FACTOR_SPLITS = ("peft", "balanced")
_PEFT_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
_PEFT_NAMES = {name for pair in _PEFT_PAIRS for name in pair}


class LoraFactors(NamedTuple):
    """One adapted weight: ``delta = scaling * a @ b`` of shape ``(..., in, out)``.

    Attributes:
      a: the down-projection ``(..., in, r)`` (PEFT's ``lora_A.weight`` transposed).
      b: the up-projection ``(..., r, out)`` (PEFT's ``lora_B.weight`` transposed).
      scaling: ``lora_alpha / r`` (a number or a scalar array).

    Example::

        f = LoraFactors(a=jnp.zeros((768, 8)), b=jnp.zeros((8, 768)), scaling=2.0)
    """

    a: Any
    b: Any
    scaling: Any = 1.0


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _passes_through(x: Any) -> bool:
    """Whether a leaf is neither factors nor floating (copied from the first adapter)."""
    return not _is_factors(x) and not is_float(x)


# --------------------------------------------------------------------------- conversion


def _nest(flat: Mapping[str, Any]) -> dict:
    """A flat ``{"a.b.c": x}`` state dict as nested dicts."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, name = str(key).split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise MergeError(f"from_peft: '{key}' nests under a tensor")
            node = child
        node[name] = value
    return tree


def _weight(node: Any, where: str) -> np.ndarray:
    if isinstance(node, Mapping):
        if set(node) != {"weight"}:
            raise MergeError(f"from_peft: expected a tensor or {{'weight': tensor}} at "
                             f"'{where}', got keys {sorted(node)}")
        node = node["weight"]
    return node


def from_peft(state_dict: Mapping[str, Any], *, alpha: float | None = None,
              scaling: float | None = None, use_rslora: bool = False) -> dict:
    """Converts a PEFT LoRA state dict into the canonical form (`LoraFactors` leaves).

    ``state_dict`` is PEFT's flat dict (``"...q_proj.lora_A.weight": (r, in)``,
    ``"...q_proj.lora_B.weight": (out, r)``) or the same nested; embedding adapters
    (``lora_embedding_A`` ``(r, num)`` / ``lora_embedding_B`` ``(dim, r)``) are accepted too.
    Each pair becomes ``LoraFactors(a=lora_A.T, b=lora_B.T, scaling)`` at the module's path
    (dots become nesting). PEFT does not store ``lora_alpha`` in the state dict: give
    ``alpha`` (scaling ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, ``r``
    read per module from the factors) or ``scaling`` directly. Entries that are not LoRA
    factors (``modules_to_save`` copies, DoRA magnitudes, LoRA biases) are full weights,
    not low-rank deltas, and raise.

    Example::

        adapter = from_peft(safetensors.numpy.load_file("adapter_model.safetensors"),
                            alpha=32)
    """
    if (alpha is None) == (scaling is None):
        raise MergeError("from_peft needs exactly one of alpha= (the adapter's lora_alpha; "
                         "PEFT state dicts do not store it) or scaling=")
    tree = _nest(state_dict) if any("." in str(k) for k in state_dict) else dict(state_dict)

    def convert(node: Any, where: str) -> Any:
        if not isinstance(node, Mapping):
            raise MergeError(f"from_peft: '{where}' is not a LoRA factor (lora_A/lora_B); "
                             "modules_to_save, bias or DoRA entries are full weights, not "
                             "low-rank deltas: remove them first")
        for a_name, b_name in _PEFT_PAIRS:
            if a_name in node or b_name in node:
                if a_name not in node or b_name not in node:
                    missing = b_name if a_name in node else a_name
                    raise MergeError(f"from_peft: '{where}' has no {missing}")
                extra = sorted(set(node) - {a_name, b_name})
                if extra:
                    raise MergeError(f"from_peft: '{where}' has {extra} next to its LoRA "
                                     "factors; only lora_A/lora_B are merged")
                a = np.asarray(_weight(node[a_name], f"{where}.{a_name}"))
                b = np.asarray(_weight(node[b_name], f"{where}.{b_name}"))
                if a.ndim != 2 or b.ndim != 2:
                    raise MergeError(f"from_peft: only 2-D factors are supported; '{where}' "
                                     f"has {a_name} {a.shape} and {b_name} {b.shape}")
                r = a.shape[0]
                s = scaling if scaling is not None else (
                    alpha / math.sqrt(r) if use_rslora else alpha / r)
                return LoraFactors(a=jnp.asarray(a.T), b=jnp.asarray(b.T), scaling=float(s))
        return {k: convert(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}

    return convert(tree, "")


def to_peft(adapter: PyTree, *, sep: str = ".") -> dict[str, np.ndarray]:
    """The PEFT state dict of an adapter (the inverse of `from_peft`).

    Each `LoraFactors` at path ``p`` gives ``p.lora_A.weight = a.T`` and
    ``p.lora_B.weight = scaling * b.T``: the scaling is folded into ``lora_B``, so load the
    result with ``lora_alpha == r`` (scaling 1), as PEFT's own ``add_weighted_adapter``
    does. Only 2-D factors are converted.

    Example::

        safetensors.numpy.save_file(to_peft(merged), "adapter_model.safetensors")
    """
    pairs, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_factors)
    out = {}
    for key_path, leaf in pairs:
        path = path_str(key_path).replace("/", sep)
        if not _is_factors(leaf):
            raise MergeError(f"to_peft: '{path}' is a dense leaf; PEFT state dicts hold only "
                             "LoRA factors")
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)
        if a.ndim != 2:
            raise MergeError(f"to_peft: '{path}' has batched factors {a.shape}; only 2-D "
                             "factors have a PEFT layout")
        out[f"{path}{sep}lora_A{sep}weight"] = a.T
        out[f"{path}{sep}lora_B{sep}weight"] = (
            np.asarray(leaf.scaling, np.float32) * b.astype(np.float32)).astype(b.dtype).T
    return out


# --------------------------------------------------------------------------- validation


class _Leaves(NamedTuple):
    """The adapters flattened leaf by leaf: ``columns[j][i]`` is leaf j of adapter i."""

    paths: list[str]
    treedef: Any
    columns: list[list[Any]]


def _describe(x: Any) -> str:
    return f"{tuple(np.shape(x))}"


def _check_factors(f: LoraFactors, path: str, name: str) -> None:
    a_shape, b_shape = np.shape(f.a), np.shape(f.b)
    if len(a_shape) < 2 or len(b_shape) != len(a_shape):
        raise MergeError(f"LoRA factors of {name} at '{path}' must be a (..., in, r) and "
                         f"b (..., r, out) with the same number of axes; got a "
                         f"{a_shape} and b {b_shape}")
    if a_shape[:-2] != b_shape[:-2]:
        raise MergeError(f"LoRA factors of {name} at '{path}' have different leading "
                         f"(batch) axes: a {a_shape}, b {b_shape}")
    if a_shape[-1] != b_shape[-2]:
        raise MergeError(f"LoRA factors of {name} at '{path}' do not fit: a {a_shape} has "
                         f"rank {a_shape[-1]} (last axis) but b {b_shape} has "
                         f"{b_shape[-2]} rows; expected a (..., in, r), b (..., r, out)")
    if np.ndim(f.scaling) != 0:
        raise MergeError(f"scaling of {name} at '{path}' must be a scalar, got shape "
                         f"{np.shape(f.scaling)}")
    for part, x in (("a", f.a), ("b", f.b)):
        if not is_float(x):
            raise MergeError(f"LoRA factor {part} of {name} at '{path}' must be floating, "
                             f"got {jnp.result_type(x)}")


def _matrix_shape(f: LoraFactors) -> tuple[int, ...]:
    """``(..., in, out)`` of the delta."""
    return tuple(np.shape(f.a)[:-1]) + (np.shape(f.b)[-1],)


def _rank(f: LoraFactors) -> int:
    return int(np.shape(f.a)[-1])


def _flatten(adapters: Sequence[PyTree], what: str) -> _Leaves:
    """Validates the adapters and flattens them with `LoraFactors` as leaves."""
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or isinstance(
            adapters, LoraFactors):
        raise MergeError(f"{what}: adapters must be a list of adapter pytrees, got "
                         f"{type(adapters).__name__}")
    adapters = list(adapters)
    if not adapters:
        raise MergeError(f"{what}: adapters is empty; give at least one adapter")
    flat = [jax.tree_util.tree_flatten_with_path(t, is_leaf=_is_factors) for t in adapters]
    paths = [path_str(p) for p, _ in flat[0][0]]
    for i, (pairs, treedef) in enumerate(flat):
        mine = [path_str(p) for p, _ in pairs]
        peft = [p for p in mine if _PEFT_NAMES & set(p.split("/"))]
        if peft:
            raise MergeError(f"{what}: adapters[{i}] is in PEFT layout ('{peft[0]}'); "
                             "convert it with mergejax.lora.from_peft(state_dict, alpha=...)")
        if treedef != flat[0][1]:
            missing = [p for p in paths if p not in set(mine)]
            extra = [p for p in mine if p not in set(paths)]
            detail = "; ".join(
                part for part in (f"missing {missing[:5]}" if missing else "",
                                  f"unexpected {extra[:5]}" if extra else "") if part)
            raise MergeError(f"{what}: adapters[{i}] does not have the structure of "
                             f"adapters[0]: {detail or 'containers differ'}")
    columns = [[pairs[j][1] for pairs, _ in flat] for j in range(len(paths))]
    for path, column in zip(paths, columns):
        first = column[0]
        for i, leaf in enumerate(column):
            name = f"adapters[{i}]"
            if _is_factors(leaf) != _is_factors(first):
                kinds = ("LoRA factors", "a dense array")
                raise MergeError(f"{what}: {name} has {kinds[not _is_factors(leaf)]} at "
                                 f"'{path}' where adapters[0] has "
                                 f"{kinds[not _is_factors(first)]}")
            if _is_factors(leaf):
                _check_factors(leaf, path, name)
                if _matrix_shape(leaf) != _matrix_shape(first):
                    raise MergeError(
                        f"{what}: {name} at '{path}' adapts a {_matrix_shape(leaf)} "
                        f"(..., in, out) weight, adapters[0] a {_matrix_shape(first)} one")
            elif np.shape(leaf) != np.shape(first):
                raise MergeError(f"{what}: shape mismatch at '{path}': adapters[0] has "
                                 f"{_describe(first)}, {name} has {_describe(leaf)}")
    return _Leaves(paths, flat[0][1], columns)


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MergeError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _weights(weights: Any, k: int, what: str) -> Array:
    if weights is None:
        return jnp.ones(k, jnp.result_type(float))
    try:
        w = jnp.asarray(weights, jnp.result_type(float))
    except (TypeError, ValueError) as e:
        raise MergeError(f"{what}: weights must be numbers, got {weights!r}") from e
    if w.shape == ():
        return jnp.full(k, w)
    if w.shape != (k,):
        raise MergeError(f"{what}: got weights of shape {w.shape} for {k} adapters; give "
                         "one per adapter, or one number for all")
    return w


def _compute_dtype(x: Any) -> Any:
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _scalings(column: list[Any]) -> Array:
    return jnp.stack([jnp.asarray(f.scaling, jnp.result_type(float)) for f in column])


def _resolve_ranks(rank: Any, leaves: _Leaves, what: str) -> list[int | None]:
    """One rank per leaf (None for dense leaves): an int, ``"max"`` (the largest adapter
    rank, capped at ``min(in, out)``), or a per-leaf form of `mergejax.rules`."""
    refs = [np.empty(_matrix_shape(c[0])[-2:], np.float32) if _is_factors(c[0]) else c[0]
            for c in leaves.columns]
    values = rules_lib.resolve_per_leaf(rank, leaves.paths, refs, name="rank")
    out: list[int | None] = []
    for path, column, r in zip(leaves.paths, leaves.columns, values):
        if not _is_factors(column[0]):
            out.append(None)
            continue
        size = min(_matrix_shape(column[0])[-2:])
        if r == "max":
            out.append(min(max(_rank(f) for f in column), size))
            continue
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise MergeError(f"{what}: rank at '{path}' must be a positive int or 'max', "
                             f"got {r!r}")
        if r > size:
            in_, out_ = _matrix_shape(column[0])[-2:]
            raise MergeError(f"{what}: rank {r} at '{path}' is larger than min(in, out) = "
                             f"{size} of its ({in_}, {out_}) weight")
        out.append(int(r))
    return out


# --------------------------------------------------------------------------- kernels


def _delta(f: LoraFactors) -> Array:
    cdt = _compute_dtype(f.a)
    return jnp.asarray(f.scaling, cdt) * (jnp.asarray(f.a, cdt) @ jnp.asarray(f.b, cdt))


def _to_layout(m: Array, layout: str) -> Array:
    return m if layout == "in_out" else jnp.swapaxes(m, -1, -2)


@functools.partial(jax.jit, static_argnames=("layout",))
@full_precision
def _deltas(leaves: list[Any], *, layout: str) -> list[Array]:
    return [_to_layout(_delta(x), layout).astype(jnp.result_type(x.a)) if _is_factors(x)
            else x for x in leaves]


def _refactor(m: Array, rank: int, split: str, clamp: float | None) -> tuple[Array, Array]:
    """``(a, b)`` of rank ``rank`` with ``a @ b`` the truncated SVD of ``m (.., in, out)``.

    ``split="peft"``: ``a = U_r``, ``b = S_r V_r^T`` (PEFT: ``lora_B = U S``, ``lora_A =
    V^T`` of the ``(out, in)`` matrix: the singular values sit on the output side);
    ``"balanced"``: ``a = U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T``. ``clamp`` (PEFT's
    ``svd_clamp``): both factors clipped to ``[-q, q]``, ``q`` the ``clamp`` quantile of
    all their entries (per matrix).
    """
    u, s, v = matrices.svd(m)
    u, s, v = u[..., :rank], s[..., :rank], v[..., :rank]
    vt = jnp.swapaxes(v, -1, -2)
    if split == "peft":
        a, b = u, s[..., :, None] * vt
    else:
        root = jnp.sqrt(s)
        a, b = u * root[..., None, :], root[..., :, None] * vt
    if clamp is not None:
        batch = a.shape[:-2]
        values = jnp.concatenate([b.reshape(batch + (-1,)), a.reshape(batch + (-1,))], -1)
        q = jnp.quantile(values, clamp, axis=-1)[..., None, None]
        a, b = jnp.clip(a, -q, q), jnp.clip(b, -q, q)
    return a, b


@functools.partial(jax.jit, static_argnames=("ranks", "split", "clamp"))
@full_precision
def _refactor_all(dense: list[Array], *, ranks: tuple[int | None, ...], split: str,
                  clamp: float | None) -> list[Any]:
    out = []
    for m, r in zip(dense, ranks):
        if r is None:
            out.append(m)
            continue
        a, b = _refactor(m.astype(_compute_dtype(m)), r, split, clamp)
        out.append((a.astype(m.dtype), b.astype(m.dtype)))
    return out


def _factor_output(pairs: list[Any], treedef: Any) -> PyTree:
    """The adapter of ``pairs``: ``(a, b)`` tuples as `LoraFactors` (scaling 1), the rest
    as they are."""
    out = [LoraFactors(a=p[0], b=p[1], scaling=1.0) if isinstance(p, tuple) else p
           for p in pairs]
    return treedef.unflatten(out)


def _check_split_clamp(factors: str, clamp: Any) -> None:
    _check_choice(factors, "factors", FACTOR_SPLITS)
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0 < clamp <= 1):
        raise MergeError(f"clamp must be None or a quantile in (0, 1], got {clamp!r}")


# --------------------------------------------------------------------------- public API


def lora_delta(adapter: PyTree, *, layout: str = "in_out") -> PyTree:
    """The dense update of every adapted weight: ``scaling * a @ b``.

    With ``layout="in_out"`` (default) each delta is ``(..., in, out)``, ready to add to a
    Flax kernel; ``"out_in"`` gives PEFT's ``scaling * lora_B @ lora_A`` ``(out, in)``
    (PyTorch orientation). Dense leaves come back unchanged. Computed in float32, returned
    in the factors' dtype.

    Example::

        delta = lora_delta({"q": LoraFactors(a, b, scaling=2.0)})["q"]
        params["attn"]["query"]["kernel"] += delta
    """
    matrices.check_layout(layout)
    leaves = _flatten([adapter], "lora_delta")
    return leaves.treedef.unflatten(_deltas([c[0] for c in leaves.columns], layout=layout))


def lora_from_delta(delta: PyTree, rank: int, *, factors: str = "peft") -> PyTree:
    """A rank-``rank`` adapter approximating a dense update (mergekit's ``extract-lora``):
    every 2-D matrix leaf (``matrix_split="auto"``'s rule: not ``bias``/``scale``)
    becomes `LoraFactors` of its truncated SVD (``factors`` as in `lora_svd`, scaling 1;
    the rank is capped at ``min(in, out)``, where the factors are exact); every other
    leaf stays as it is (a dense delta, added as one).

    Example::

        task_vector = mergejax.task_vector(base, fine_tuned)
        adapter = lora_from_delta(task_vector, rank=16)
        approx = mergejax.tree_add(base, lora_delta(adapter))
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"lora_from_delta's rank must be a positive int, got {rank!r}")
    _check_split_clamp(factors, None)
    flat, treedef = jax.tree_util.tree_flatten_with_path(delta)
    ranks = tuple(
        min(rank, *x.shape) if is_float(x) and x.ndim == 2
        and matrices.matrix_split(path_str(p), x.shape, "auto") is not None else None
        for p, x in flat)
    pairs = _refactor_all([x for _, x in flat], ranks=ranks, split=factors, clamp=None)
    return _factor_output(pairs, treedef)


def lora_merge(adapters: Sequence[PyTree], method: str = "task_arithmetic", *,
               weights: Any = None, rank: Any = None, layout: str = "in_out",
               factors: str = "peft", clamp: float | None = None, **hparams: Any) -> PyTree:
    """Merges the adapters' dense updates with a registered merge method.

    Each adapter becomes its delta pytree (`lora_delta` in ``layout``), and
    ``mergejax.merge(method, zero_base, deltas, weights=weights, **hparams)`` merges them
    with an all-zero base, so the method's task vectors are exactly the ``Delta W_i``
    (``"task_arithmetic"`` gives ``scale * sum_i w_i Delta W_i``, ``"linear"`` their
    weighted mean, ``"ties"``/``"dare_ties"``/``"knots"`` their sparse or aligned merges;
    ``key=`` reaches random methods). Methods that look at the input side of a matrix
    take their own layout switch (e.g. ``kernel_layout``), which should agree with
    ``layout``.

    With ``rank=None`` the merged deltas are returned (dense, in ``layout``). With a rank
    (an int, ``"max"`` = the largest adapter rank of each weight, or per-leaf path rules)
    every adapted weight is re-factorised by truncated SVD into ``LoraFactors`` of that
    rank with scaling 1 (``factors``/``clamp`` as in `lora_svd`); dense leaves stay dense.
    A rank larger than ``min(in, out)`` raises.

    Example::

        merged = lora_merge(adapters, "ties", density=0.2, rank=16)
    """
    matrices.check_layout(layout)
    _check_split_clamp(factors, clamp)
    if method in _LORA_METHODS:
        raise MergeError(f"lora_merge merges dense deltas with a registered method; "
                         f"{method!r} takes adapters itself: call it directly")
    leaves = _flatten(adapters, "lora_merge")
    ranks = None if rank is None else _resolve_ranks(rank, leaves, "lora_merge")
    deltas = [_deltas(list(col), layout=layout) for col in zip(*leaves.columns)]
    trees = [leaves.treedef.unflatten(d) for d in deltas]
    base = jax.tree.map(lambda x: jnp.zeros_like(x) if is_float(x) else x, trees[0])
    if weights is not None:
        hparams["weights"] = weights
    merged = registry.merge(method, base, trees, **hparams)
    if ranks is None:
        return merged
    dense = [_to_layout(x, layout) if r is not None else x
             for x, r in zip(leaves.treedef.flatten_up_to(merged), ranks)]
    return _factor_output(
        _refactor_all(dense, ranks=tuple(ranks), split=factors, clamp=clamp), leaves.treedef)


def _dense_column(column: list[Any], weights: Array) -> Any:
    """A leaf that is not a factor pair: passed through (integers), or the weighted sum of
    the adapters' dense updates in the compute dtype, cast back."""
    if _passes_through(column[0]):
        return column[0]
    cdt = _compute_dtype(column[0])
    total = sum(weights[i].astype(cdt) * x.astype(cdt) for i, x in enumerate(column))
    return total.astype(jnp.result_type(column[0]))


@jax.jit
@full_precision
def _concat_all(columns: list[list[Any]], weights: Array) -> list[Any]:
    out = []
    for column in columns:
        if not _is_factors(column[0]):
            out.append(_dense_column(column, weights))
            continue
        dtype = jnp.result_type(column[0].a)
        cdt = _compute_dtype(column[0].a)
        coef = weights.astype(cdt) * _scalings(column).astype(cdt)
        a = jnp.concatenate([coef[i] * f.a.astype(cdt) for i, f in enumerate(column)], -1)
        b = jnp.concatenate([f.b.astype(cdt) for f in column], -2)
        out.append((a.astype(dtype), b.astype(dtype)))
    return out


def lora_concat(adapters: Sequence[PyTree], weights: Any = None) -> PyTree:
    """Concatenates the adapters along the rank axis, so that the result's update is
    exactly ``sum_i w_i scaling_i a_i b_i`` (PEFT ``combination_type="cat"``).

    ``a = [w_1 s_1 a_1, w_2 s_2 a_2, ...]`` (columns), ``b = [b_1; b_2; ...]`` (rows),
    scaling 1: as PEFT, the weight and scaling go on the down-projection (its
    ``lora_A``). The rank is the sum of the adapters' ranks, which may differ. Dense leaves
    are summed with the weights. ``weights`` default to 1 and are traced (a sweep does not
    recompile).

    Example::

        both = lora_concat([adapter_a, adapter_b], weights=[1.0, 0.5])
    """
    leaves = _flatten(adapters, "lora_concat")
    w = _weights(weights, len(adapters), "lora_concat")
    return _factor_output(_concat_all(leaves.columns, w), leaves.treedef)


@functools.partial(jax.jit, static_argnames=("ranks", "split", "clamp"))
@full_precision
def _svd_all(columns: list[list[Any]], weights: Array, *, ranks: tuple[int | None, ...],
             split: str, clamp: float | None) -> list[Any]:
    dense = []
    for column in columns:
        if _passes_through(column[0]):
            dense.append(column[0])
            continue
        ref = column[0].a if _is_factors(column[0]) else column[0]
        cdt = _compute_dtype(ref)
        parts = [_delta(x) if _is_factors(x) else x.astype(cdt) for x in column]
        total = sum(weights[i].astype(cdt) * p for i, p in enumerate(parts))
        dense.append(total.astype(jnp.result_type(ref)))
    return _refactor_all(dense, ranks=ranks, split=split, clamp=clamp)


def lora_svd(adapters: Sequence[PyTree], weights: Any = None, rank: Any = "max", *,
             factors: str = "peft", clamp: float | None = None) -> PyTree:
    """``sum_i w_i scaling_i a_i b_i`` re-factorised to ``rank`` by truncated SVD (PEFT
    ``combination_type="svd"``).

    ``rank`` is an int, ``"max"`` (default, as PEFT: the largest adapter rank of each
    weight) or per-leaf path rules; larger than ``min(in, out)`` raises. The result has
    scaling 1 and ``factors="peft"``: ``a = U_r``, ``b = S_r V_r^T`` for ``delta = U S
    V^T`` in the ``(in, out)`` orientation, which is PEFT's ``lora_B = U S``, ``lora_A =
    V^T`` of the ``(out, in)`` matrix; ``"balanced"`` splits ``sqrt(S)`` over both.
    ``clamp`` is PEFT's ``svd_clamp`` quantile (None: no clamping). Dense leaves are
    summed. Differs from PEFT in one place: PEFT multiplies each adapter's delta, which
    already includes its scaling, by ``w_i * scaling_i`` again (``w_i s_i^2 B_i A_i``);
    here each update counts once, so PEFT's output is ``lora_svd`` with weights
    ``w_i * s_i`` (identical when ``lora_alpha == r``).

    Example::

        merged = lora_svd([adapter_a, adapter_b], weights=[0.7, 0.3], rank=8)
    """
    _check_split_clamp(factors, clamp)
    leaves = _flatten(adapters, "lora_svd")
    w = _weights(weights, len(adapters), "lora_svd")
    ranks = tuple(_resolve_ranks(rank, leaves, "lora_svd"))
    return _factor_output(_svd_all(leaves.columns, w, ranks=ranks, split=factors,
                                   clamp=clamp), leaves.treedef)


@jax.jit
@full_precision
def _combine_all(columns: list[list[Any]], weights: Array) -> list[Any]:
    out = []
    for column in columns:
        if not _is_factors(column[0]):
            out.append(_dense_column(column, weights))
            continue
        dtype = jnp.result_type(column[0].a)
        cdt = _compute_dtype(column[0].a)
        coef = weights.astype(cdt) * jnp.sqrt(_scalings(column).astype(cdt))
        a = sum(coef[i] * f.a.astype(cdt) for i, f in enumerate(column))
        b = sum(coef[i] * f.b.astype(cdt) for i, f in enumerate(column))
        out.append((a.astype(dtype), b.astype(dtype)))
    return out


def _check_combinable(leaves: _Leaves, what: str) -> None:
    for path, column in zip(leaves.paths, leaves.columns):
        if not _is_factors(column[0]):
            continue
        ranks = [_rank(f) for f in column]
        if len(set(ranks)) > 1:
            raise MergeError(f"{what} combines the factors element-wise, so all adapters "
                             f"need the same rank; at '{path}' the ranks are {ranks}")
        for i, f in enumerate(column):
            s = f.scaling
            if not isinstance(s, jax.core.Tracer) and not float(np.asarray(s)) > 0:
                raise MergeError(f"{what}: scaling of adapters[{i}] at '{path}' must be "
                                 f"positive, got {s}")


def lora_combine(adapters: Sequence[PyTree], weights: Any) -> PyTree:
    """Element-wise combination of the factors (LoraHub's COMPOSE step):
    ``a = sum_i w_i sqrt(s_i) a_i``, ``b = sum_i w_i sqrt(s_i) b_i``, scaling 1.

    The update is ``(sum_i w_i sqrt(s_i) a_i)(sum_i w_i sqrt(s_i) b_i)``, not the weighted
    sum of the updates (cross terms ``a_i b_j`` appear). With equal scalings ``s`` it is
    LoraHub's ``s (sum w_i A_i)(sum w_i B_i)`` (the official code scales every state-dict
    entry by ``w_i``); PEFT's ``combination_type="linear"`` is this with weights
    ``sqrt(w_i)``. All adapters need the same rank at each weight, and positive
    scalings. Dense leaves are summed with the weights. Traceable in ``weights``.

    Example::

        composed = lora_combine(adapters, jnp.array([0.5, 0.2, -0.1]))
    """
    leaves = _flatten(adapters, "lora_combine")
    _check_combinable(leaves, "lora_combine")
    w = _weights(weights, len(adapters), "lora_combine")
    return _factor_output(_combine_all(leaves.columns, w), leaves.treedef)


# --------------------------------------------------------------------------- LoraHub


class LoraHubResult(NamedTuple):
    """What `lorahub` found.

    Attributes:
      weights: the best combination weights found, (num_adapters,).
      adapter: ``lora_combine(adapters, weights)``.
      loss: the objective at ``weights`` (loss + l1 term).
      losses: the objective of every evaluation, in order (length: generations x popsize).
    """

    weights: Array
    adapter: PyTree
    loss: Array
    losses: Array


def lorahub(adapters: Sequence[PyTree], loss_fn: Callable[[PyTree], Any], *, key: Array,
            steps: int = 40, l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
            sigma0: float = 0.5, init: Any = None, popsize: int | None = None,
            vectorized: bool = False) -> LoraHubResult:
    """LoraHub (Huang et al. 2023, arXiv 2307.13269): searches the weights ``w`` of
    `lora_combine` that minimise ``loss_fn(lora_combine(adapters, w)) + l1 * mean|w|``
    on a few examples, without gradients.

    The official code minimises the same objective (``0.05 * sum|w| / N``) over
    ``w in [-1.5, 1.5]^N`` starting from ``w = 0`` with nevergrad's ``NGOpt`` and a budget
    of ``max_inference_step`` (40 in its BBH script) loss evaluations; the paper names
    CMA-ES. Here the search is `mergejax.learned.search` CMA-ES (clipping to the bounds)
    with ``ceil(steps / popsize)`` generations, so ``steps`` (the evaluation budget) is
    rounded up to whole generations. ``sigma0 = 0.5`` puts the bounds at ``w0 +- 3 sigma0``
    (Hansen's rule of thumb; NGOpt's internal choice is not reproduced), and the best
    evaluated point is returned.

    ``loss_fn(adapter) -> scalar`` gets a `LoraFactors` pytree (scaling 1). With
    ``vectorized=True`` it must be a pure JAX function and each generation is one jitted
    ``vmap`` over the population (adapters are arguments, not compiled constants);
    otherwise it is called once per candidate and may be any Python function (e.g. a
    model on a few examples returning a float).

    Example::

        result = lorahub(adapters, lambda ad: few_shot_loss(params, ad, batch),
                         key=jax.random.key(0), steps=40)
        merged = result.adapter
    """
    leaves = _flatten(adapters, "lorahub")
    _check_combinable(leaves, "lorahub")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MergeError(f"lorahub: steps must be a positive int (loss evaluations), "
                         f"got {steps!r}")
    k = len(adapters)
    strategy = search.CMAES.create(k, popsize, bounds)
    state = strategy.init(np.zeros(k) if init is None else init, sigma0)
    generations = -(-steps // strategy.popsize)

    def objective(w: Array, columns: list[list[Any]]) -> Array:
        adapter = _factor_output(_combine_all(columns, w), leaves.treedef)
        return jnp.asarray(loss_fn(adapter)).reshape(()) + l1 * jnp.mean(jnp.abs(w))

    if vectorized:
        batched = jax.jit(jax.vmap(objective, in_axes=(0, None)))

        def evaluate(population: Array) -> Array:
            return batched(population, leaves.columns)
    else:
        def evaluate(population: Array) -> list[float]:
            return [float(objective(w, leaves.columns)) for w in population]

    state, history = search.ask_tell_loop(
        strategy, state, jax.random.split(key, generations), evaluate)
    weights = state.best_x
    adapter = _factor_output(_combine_all(leaves.columns, weights), leaves.treedef)
    return LoraHubResult(weights=weights, adapter=adapter, loss=state.best_fitness,
                         losses=history.reshape(-1))


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True, eq=False)
class LoraMethod:
    """A registry entry for a merge of LoRA adapters: ``method(None, adapters, **hparams)``.

    The adapters are deltas already, so there is no base: ``base`` must be None.

    Example::

        mergejax.merge("lora_svd", None, adapters, weights=[0.5, 0.5], rank=8)
    """

    name: str
    fn: Callable[..., Any]
    paper: str
    family: str = FAMILY
    needs_base: bool = False
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sig = inspect.signature(self.fn)
        params = list(sig.parameters.values())[1:]
        object.__setattr__(self, "hparams", {p.name: p.default for p in params})
        object.__setattr__(self, "__doc__", self.fn.__doc__)
        base = inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        models = inspect.Parameter("models", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        object.__setattr__(self, "__signature__", inspect.Signature(
            [base, models] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]))

    def __call__(self, base: PyTree | None, models: Sequence[PyTree], **hparams: Any) -> Any:
        if base is not None:
            raise MergeError(f"{self.name} merges LoRA adapters, which are already deltas: "
                             "pass base=None and the adapters as models")
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise MergeError(f"{self.name} got unknown hyperparameter(s) {unknown}; valid "
                             f"ones are {sorted(self.hparams)}")
        return self.fn(models, **hparams)


def _lora_linear(adapters: Sequence[PyTree], weights: Any = None, scale: Any = 1.0,
                 normalize: bool = False, rank: Any = None, layout: str = "in_out",
                 factors: str = "peft") -> PyTree:
    """``scale * sum_i w_i Delta W_i`` (``/ sum_i w_i`` with ``normalize``): task
    arithmetic on the adapters' dense updates, re-factorised when ``rank`` is given
    (`lora_merge` with ``method="task_arithmetic"``).

    Example::

        mergejax.merge("lora_linear", None, adapters, weights=[1.0, 0.5])
    """
    return lora_merge(adapters, "task_arithmetic", weights=weights, rank=rank, layout=layout,
                      factors=factors, scale=scale, normalize=normalize)


_REQUIRED = inspect.Parameter.empty


def _lorahub_entry(adapters: Sequence[PyTree], loss_fn: Any = _REQUIRED, key: Any = _REQUIRED,
                   steps: int = 40, l1: float = 0.05,
                   bounds: tuple[float, float] = (-1.5, 1.5), sigma0: float = 0.5,
                   init: Any = None, popsize: int | None = None,
                   vectorized: bool = False) -> LoraHubResult:
    """`lorahub` through the registry: ``loss_fn`` and ``key`` are required."""
    if loss_fn is _REQUIRED or key is _REQUIRED:
        raise MergeError("lorahub needs loss_fn= (adapter -> loss on a few examples) and "
                         "key=jax.random.key(seed)")
    return lorahub(adapters, loss_fn, key=key, steps=steps, l1=l1, bounds=bounds,
                   sigma0=sigma0, init=init, popsize=popsize, vectorized=vectorized)


_LORA_METHODS = {
    m.name: registry.register(m) for m in (
        LoraMethod("lora_linear", _lora_linear, LORA_PAPER + "; linear merge of Delta W"),
        LoraMethod("lora_concat", lora_concat, LORA_PAPER + PEFT + " (cat)"),
        LoraMethod("lora_svd", lora_svd, LORA_PAPER + PEFT + " (svd)"),
        LoraMethod("lorahub", _lorahub_entry,
                   "Huang et al. 2023, LoraHub: Efficient cross-task generalization via "
                   "dynamic LoRA composition (arXiv 2307.13269)"),
    )}
