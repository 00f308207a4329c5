"""How the spectral and data-free methods see a leaf as a matrix, and the batched linear
algebra they share.

**Which leaves are matrices** (the ``matrix_split`` hyperparameter, per leaf by path rules):
an int ``s`` views a leaf of shape ``(d0, ..., dn)`` as the matrix
``(d0*...*d{s-1}, ds*...*dn)``; None means "not a matrix" (the method's documented fallback,
usually the plain average or task arithmetic, applies). ``"auto"`` (the default) is:

* 2-D leaves: split 1 (a Dense kernel, an embedding table, a positional table), except
  leaves named ``bias`` or ``scale`` (Flax attention biases are ``(heads, head_dim)``);
* 3-D Flax attention kernels (``MultiHeadDotProductAttention`` / ``DenseGeneral``):
  ``.../query|key|value/kernel`` ``(d, heads, head_dim)`` split 1, ``.../out/kernel``
  ``(heads, head_dim, d)`` split 2, i.e. the (in, out) matrix of the fused projection;
* anything else (biases, norms, convolution kernels, scalars): not a matrix, as in
  FusionBench, which applies the spectral step to ``len(shape) == 2`` tensors only.

**Layout.** Flax kernels are ``(in, out)``, PyTorch weights ``(out, in)``. Methods that
distinguish the input side (WUDI's ``tau tau^T`` Gram) take ``kernel_layout="in_out"`` (Flax,
default) or ``"out_in"`` (PyTorch) and work on `torch_view`, so both layouts give the same
(transposed) result. Purely spectral methods (TSV, ISO) commute with transposition anyway.

**Batched decompositions.** jaxlib before 0.11.2 runs a batched LAPACK call (SVD, eigh,
Cholesky) by handing the batch to XLA:CPU's intra-op thread pool and blocking a pool thread
until it is done, so as many concurrent batched calls as pool threads deadlock (measured
here: a 2-core machine's merge hangs intermittently). With such a jaxlib (`SERIAL_LAPACK`),
the decompositions below make one unbatched call per matrix, and methods that decompose
pass ``batched=LAPACK_BATCHED`` (False then) so the engine does not `jax.vmap` them back
into batched calls.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

from mergejax.tree import MergeError, full_precision

__all__ = [
    "LAPACK_BATCHED",
    "QR_FIRST_RATIO",
    "RECOVERY_MIN_RATIO",
    "SERIAL_LAPACK",
    "as_matrix",
    "batch_key",
    "check_layout",
    "check_matrix_split",
    "cholesky",
    "eigh",
    "from_torch_view",
    "inv",
    "matrix_split",
    "per_matrix",
    "polar",
    "svd",
    "top_singular",
    "torch_view",
]

Array = jax.Array

_ATTENTION_IN = re.compile(r"(^|/)(query|key|value)/kernel$")
_ATTENTION_OUT = re.compile(r"(^|/)out/kernel$")
LAYOUTS = ("in_out", "out_in")
#: Leaf names that "auto" never treats as matrices (Flax attention biases are 2-D).
_NEVER_MATRICES = frozenset({"bias", "scale"})


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


#: Whether batched LAPACK calls must be split into one call per matrix (module docstring).
SERIAL_LAPACK = _version(jaxlib.version.__version__) < (0, 11, 2)


def matrix_split(path: str, shape: Sequence[int], split: Any) -> int | None:
    """The split point of leaf ``path`` (see the module docstring), or None."""
    if split is None:
        return None
    if split == "auto":
        if path.rsplit("/", 1)[-1] in _NEVER_MATRICES:
            return None
        if len(shape) == 2:
            return 1
        if len(shape) == 3 and _ATTENTION_IN.search(path):
            return 1
        if len(shape) == 3 and _ATTENTION_OUT.search(path):
            return 2
        return None
    if isinstance(split, bool) or not isinstance(split, int) or not 0 < split < len(shape):
        raise MergeError(f"matrix_split at '{path}' must be 'auto', None or an int in "
                         f"[1, {len(shape) - 1}] for shape {tuple(shape)}, got {split!r}")
    return split


def batch_key(path: str, shape: Sequence[int], static: dict[str, Any]) -> int | None:
    """For ``leafwise(batched=batch_key)``: leaves batched together must agree on their
    matrix split (``"auto"`` decides from the path, and a batched kernel sees only the
    first leaf's path)."""
    return matrix_split(path, shape, static.get("matrix_split", "auto"))


#: ``leafwise(batched=LAPACK_BATCHED)`` for methods whose kernels decompose matrices:
#: `batch_key` where batched LAPACK calls are safe, else False (no engine batching).
LAPACK_BATCHED = False if SERIAL_LAPACK else batch_key


def check_matrix_split(paths: Sequence[str], statics: Sequence[dict[str, Any]],
                       shapes: Sequence[Sequence[int]] | None = None) -> None:
    """Raises `MergeError` for a ``matrix_split`` that is neither 'auto', None nor an int."""
    for j, (path, hp) in enumerate(zip(paths, statics)):
        split = hp.get("matrix_split", "auto")
        if split in ("auto", None):
            continue
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise MergeError(f"matrix_split at '{path}' must be 'auto', None or a positive "
                             f"int, got {split!r}")
        if shapes is not None:
            matrix_split(path, shapes[j], split)


def check_layout(layout: Any, path: str = "") -> None:
    if layout not in LAYOUTS:
        where = f" at '{path}'" if path else ""
        raise MergeError(f"kernel_layout{where} must be one of {LAYOUTS}, got {layout!r}")


def as_matrix(x: Array, split: int) -> Array:
    """``x`` reshaped to ``(prod(shape[:split]), prod(shape[split:]))``."""
    return x.reshape(math.prod(x.shape[:split]), math.prod(x.shape[split:]))


def torch_view(m: Array, layout: str) -> Array:
    """The ``(out, in)`` (PyTorch) orientation of matrix ``m`` given in ``layout``."""
    check_layout(layout)
    return m.T if layout == "in_out" else m


def from_torch_view(m: Array, layout: str) -> Array:
    """The inverse of `torch_view`."""
    return torch_view(m, layout)


def per_matrix(fn: Callable[..., Any], *arrays: Array) -> Any:
    """``fn`` of the matrices (last two axes) of ``arrays``, which share their leading axes:
    one batched call, or with `SERIAL_LAPACK` one call per matrix, stacked back."""
    lead = arrays[0].shape[:-2]
    if not (SERIAL_LAPACK and lead):
        return fn(*arrays)
    flat = [a.reshape(-1, *a.shape[-2:]) for a in arrays]
    outs = [fn(*(a[i] for a in flat)) for i in range(flat[0].shape[0])]
    return jax.tree.map(lambda *o: jnp.stack(o).reshape(*lead, *o[0].shape), *outs)


def _svd(m: Array) -> tuple[Array, Array, Array]:
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return u, s, jnp.swapaxes(vt, -1, -2)


def _on_tall(fn: Callable[[Array], tuple[Array, Array, Array]], m: Array
             ) -> tuple[Array, Array, Array]:
    """``fn``'s ``(U, S, V)`` of the tall orientation of ``m``, given back for ``m``."""
    if m.shape[-2] < m.shape[-1]:
        v, s, u = fn(jnp.swapaxes(m, -1, -2))
        return u, s, v
    return fn(m)


def _svd_via_tall(m: Array) -> tuple[Array, Array, Array]:
    return _on_tall(_svd, m)


def svd(m: Array, *, any_signs: bool = False) -> tuple[Array, Array, Array]:
    """Thin SVD ``m = U diag(S) V^T`` over the last two axes (batched over the others),
    singular values descending. Returns ``(U, S, V)`` with V, not V^T.

    ``any_signs=True`` is for callers whose result does not depend on the signs of the
    singular pairs (``U V^T``, projections, polar factors): a wide matrix is then
    decomposed through its tall transpose, where LAPACK's gesdd is ~20% faster ((768,
    3072): 0.44 -> 0.35 s), and its pairs' signs may differ from LAPACK's (NumPy's,
    PyTorch's) on ``m`` itself. (KnOTS, which elects signs, fixes each pair's signs
    itself, so that no convention matters.)"""
    return per_matrix(_svd_via_tall if any_signs else _svd, m)


def eigh(m: Array) -> tuple[Array, Array]:
    """``jnp.linalg.eigh`` over the last two axes (ascending eigenvalues), `per_matrix`."""
    return per_matrix(jnp.linalg.eigh, m)


def cholesky(m: Array) -> Array:
    """Lower Cholesky factor over the last two axes, `per_matrix`."""
    return per_matrix(jnp.linalg.cholesky, m)


def inv(m: Array) -> Array:
    """Matrix inverse over the last two axes, `per_matrix`."""
    return per_matrix(jnp.linalg.inv, m)


@full_precision
def top_singular(m: Array, r: int, *, solver: str = "svd", any_signs: bool = False
                 ) -> tuple[Array, Array, Array]:
    """The ``r`` largest singular triplets ``(U (.., p, r), S (.., r), V (.., q, r))`` of
    ``m (.., p, q)``, descending.

    ``solver="svd"`` truncates LAPACK's thin SVD (exact, as FusionBench's
    ``torch.linalg.svd``); with ``any_signs`` a long matrix takes `_top_singular_via_r`,
    the same decomposition (of its tall orientation) without forming the unneeded columns
    (~1.5x faster).
    ``solver="gram"`` diagonalises the Gram matrix of the smaller side (``eigh``, about 2x
    cheaper than the SVD on CPU) and recovers the other side by one product: the kept
    triplets are accurate to float32 tolerance when ``sigma_1 / sigma_r`` is moderate
    (relative error ~ eps * (sigma_1 / sigma_i)^2), which holds for the top fraction of a
    task matrix's spectrum. ``any_signs`` as in `svd`.
    """
    p, q = m.shape[-2:]
    if not 0 < r <= min(p, q):
        raise MergeError(f"rank {r} is outside [1, {min(p, q)}] for a {p}x{q} matrix")
    if solver == "svd":
        if any_signs and max(p, q) >= QR_FIRST_RATIO * min(p, q):
            return per_matrix(functools.partial(_on_tall, functools.partial(
                _top_singular_via_r, r=r)), m)
        u, s, v = svd(m, any_signs=any_signs)
        return u[..., :r], s[..., :r], v[..., :r]
    if solver != "gram":
        raise MergeError(f"solver must be 'svd' or 'gram', got {solver!r}")
    mt = jnp.swapaxes(m, -1, -2)
    small, other = (mt @ m, m) if p >= q else (m @ mt, mt)
    w, vecs = eigh(small)
    w, vecs = w[..., ::-1][..., :r], vecs[..., ::-1][..., :r]
    s = jnp.sqrt(jnp.maximum(w, 0.0))
    far = (other @ vecs) / jnp.where(s > 0, s, 1.0)[..., None, :]
    return (far, s, vecs) if p >= q else (vecs, s, far)


#: `top_singular` takes `_top_singular_via_r` for matrices at least this many times longer
#: than wide (measured here, 8 matrices: (1536, 768) 0.170 -> 0.124 s, (3072, 768) 0.241 ->
#: 0.146 s; (1152, 768) 0.122 -> 0.113 s).
QR_FIRST_RATIO = 1.5
#: `_top_singular_via_r` falls back to the thin SVD unless ``s_r > RECOVERY_MIN_RATIO * s_1``.
RECOVERY_MIN_RATIO = 1e-2


def _top_singular_via_r(tall: Array, r: int) -> tuple[Array, Array, Array]:
    """`top_singular` of tall matrices with ``p >= QR_FIRST_RATIO q`` (batched).

    As LAPACK's gesdd does for a long matrix, S and V come from the SVD of the small
    triangular factor R of ``tall = Q R`` (Householder QR, backward stable); but U's ``r``
    columns are recovered as ``tall V_r / S_r`` instead of forming Q and the product ``Q U_R``.
    Those columns lose orthogonality as ``eps * s_1 / s_i`` (measured in float32: 6e-6 at
    ``s_r = s_1 / 100``, 6e-4 at ``s_1 / 10^4``; gesdd's ~1e-6), so if any matrix's ``s_r``
    is not above `RECOVERY_MIN_RATIO` ``* s_1`` (rank below ``r``, a zero task matrix, a
    steep spectrum) the thin SVD runs instead, by `jax.lax.cond`, after the QR and the
    small SVD (under `jax.vmap` both branches run). Signs pair U with V, not as LAPACK's
    on the matrix (``any_signs``)."""
    _, s, vt = jnp.linalg.svd(jnp.linalg.qr(tall, mode="r"))
    s, v = s[..., :r], jnp.swapaxes(vt[..., :r, :], -1, -2)

    def recovered():
        return tall @ v / s[..., None, :], s, v

    def thin():
        u_all, s_all, v_all = _svd(tall)
        return u_all[..., :r], s_all[..., :r], v_all[..., :r]

    well_conditioned = jnp.all(s[..., -1] > RECOVERY_MIN_RATIO * s[..., 0])
    return jax.lax.cond(well_conditioned, recovered, thin)


@full_precision
def polar(m: Array) -> Array:
    """The orthogonal polar factor ``U V^T`` of ``m = U S V^T`` (batched)."""
    u, _, v = svd(m, any_signs=True)
    return u @ jnp.swapaxes(v, -1, -2)
