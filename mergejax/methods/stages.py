"""The stages of the sparse / sign-consensus family: sparsify -> elect -> combine -> scale.

Each stage is a pure function on the task vectors of one leaf (a tuple of K arrays), so a
leaf kernel composes them and a researcher can recombine them in a kernel of their own
(see `mergejax.sparse_merge`, which exposes every combination the presets use)::

    from mergejax.methods.stages import disjoint_combine, elect_sign, topk_mask, topk_rank

    @mergejax.leafwise("my_ties", family="sparse", paper="...", coefficients=("scale",))
    def my_ties(ctx, base, models, *, density=0.2, scale=1.0):
        taus = tuple(x - base for x in models)
        kept = tuple(t * topk_mask(t, topk_rank(density, t.size)) for t in taus)
        sign = elect_sign(kept, method="count")
        return base + scale * disjoint_combine(kept, sign, mode="sum")

Exact top-k without a sort. Sorting is slow on XLA:CPU (about 0.3 us per entry, measured
here), so thresholds come from histograms of a uint32 key that orders like the float32
value (`order_key`). A strided sample locates the high 16 bits of the wanted value and a
window of such bins that holds it with high probability; one pass counts the keys above
the window and histograms the keys inside it at full resolution, which gives the exact
value. If the value fell outside the window, a two-pass radix select (high 16 bits, then
low 16 bits) runs instead, under `lax.cond` (`mergejax.speculate`: a streaming merge
compiles it only for a tensor that needs it). Inputs of up to 2**18 entries skip the
sample, and up to 2**12 (or float64 inputs) are sorted.

A global (model-wide) threshold folds the histograms over leaves
(`global_threshold_passes`), so it needs no concatenated copy of the model; its window is
narrowed to the sample's rank +- 4 standard deviations (1-4 bins). A whole-model program
over at most 2**16 entries per task (`_GLOBAL_SORT_MAX`) sorts the model's order keys
instead: the same bits, and a program that compiles 2.5-5x faster. Per tensor the window
is 4 bins centred on the sample's estimate; for inputs narrower than float32 it covers the
rank +- 4 standard deviations in up to 64 bins (`spread_window`), whose fine bins then
hold several keys, and a second, narrow pass over the fine bin holding the rank gives the
exact value. Either way the window pass histograms only
the rows of 16 entries that hold a key inside the window: a row test, the candidate rows
compacted, then a loop over chunks of them, so its cost follows the number of candidates.

Cost on XLA:CPU (2 cores, measured): a scatter-add costs ~3.4 ns per entry (it does not
vectorise), a fused row test ~0.3 ns, a cumsum ~10 ns per entry and ~0.2 s of compile
(hence the triangular products of `_exclusive_prefix` and the blockwise `_select_bin`).
Per-tensor selection of 8 x 2.4M entries: 4.4 ns per entry scattering every key, 2.0 ns
with the candidate rows. XLA:CPU does not fuse elementwise producers into reductions
(other than the few float patterns its YNNPACK fusions take): they are materialised, and a
fresh output buffer costs ~0.5 ns per byte in page faults. On XLA:CPU's default
scheduler, large programs keep every leaf's intermediates alive at once
(``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` avoids it; see
``experiments/bench_sparse.py``).

Ties at a threshold are kept: every entry with ``|x| >= v_r`` survives, where ``v_r`` is the
r-th largest magnitude. This is FusionBench's and the TIES paper's rule; mergekit keeps
exactly r entries, picked among equal magnitudes by its sort order, so the two differ
only where magnitudes tie exactly at the threshold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax.method import (
    StatisticsPass,
    as_stored,
    folds_leaf_by_leaf,
    fused_reduce,
    speculate,
)
from mergejax.tree import MergeError

__all__ = [
    "CHUNK",
    "CHUNKED_MIN_SIZE",
    "Chunks",
    "bernoulli_mask",
    "chunked_thresholds",
    "cut_chunks",
    "disjoint_combine",
    "elect_sign",
    "global_threshold_passes",
    "global_thresholds",
    "kth_largest",
    "magnitude_threshold",
    "magprune_probabilities",
    "order_key",
    "rescale_masked",
    "select_thresholds",
    "topk_mask",
    "topk_rank",
    "uniform_bits",
]

Array = jax.Array

_HALF = 16
_BINS = 1 << _HALF  # each pass histograms 16 of the 32 bits of the order key


def topk_rank(density: float, size: int, convention: str = "mergekit") -> int:
    """How many of ``size`` entries a magnitude top-k with ``density`` keeps (at least).

    ``"mergekit"``: ``int(density * size)`` (mergekit's ``magnitude``). ``"fusionbench"``:
    ``int(density * size) + 1``, because the TIES paper's code and FusionBench keep
    ``|x| >= kthvalue(size - int(density * size))``, the (int(d n) + 1)-th largest.
    """
    if convention not in ("mergekit", "fusionbench"):
        raise MergeError(f"topk must be 'mergekit' or 'fusionbench', got {convention!r}")
    rank = int(density * size) + (convention == "fusionbench")
    return min(rank, size)


def order_key(x: Array) -> Array:
    """A uint32 per entry that orders like the float32 value (flattened): the sign bit
    flipped for non-negative values, every bit flipped for negative ones."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key: Array) -> Array:
    positive = (key >> 31) == 1
    bits = jnp.where(positive, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


_DROP = 1 << 30  # a bin index past every histogram: the entry is not counted


def _histograms(acc: Array | None, inputs: tuple[Array, ...], values_of, bins_fn,
                width: int, rows: int = 1, stride: int = 1, valid: Array | None = None
                ) -> Array:
    """Adds histograms of ``width`` bins to ``acc`` (``(rows * K, width)`` int32): for row
    ``i`` and task ``k``, of ``bins_fn(keys_k, i, k)`` where ``keys_k`` are the order keys
    of ``values_of(inputs)[k]`` (elementwise in the inputs) at every ``stride``-th entry;
    `_DROP` indices are not counted, nor entries (of the flattened inputs) from ``valid``
    on (padding).

    One scatter per (row, task), written once inside a loop over tasks that computes the
    task's values from the (strided) inputs in a `lax.switch` branch: XLA:CPU compiles a
    scatter in ~20 ms, and a model has hundreds of leaves, so K unrolled scatters per leaf
    made compilation minutes long.
    """
    if stride > 1:
        inputs = tuple(x.reshape(-1)[::stride] for x in inputs)
    k = len(jax.eval_shape(values_of, inputs))
    if acc is None:
        acc = jnp.zeros((rows * k, width), jnp.int32)
    branches = [lambda m=m: values_of(inputs)[m] for m in range(k)]

    def task(j, acc):
        keys = order_key(lax.switch(j, branches))
        for i in range(rows):
            row = i * k + j
            bins = bins_fn(keys, i, j)
            if valid is not None:
                bins = jnp.where(lax.iota(jnp.int32, bins.size) < valid, bins, _DROP)
            acc = acc.at[row].set(acc[row].at[bins].add(1, mode="drop"))
        return acc

    return lax.fori_loop(0, k, task, acc)


def _high_bins(keys: Array, i: int, j: Array) -> Array:
    del i, j
    return (keys >> _HALF).astype(jnp.int32)


def _low_bins(high_bins: Array):
    """Bins of the low 16 bits of the keys in high bin ``high_bins[i, j]``; `_DROP` else."""
    def bins(keys, i, j):
        return jnp.where((keys >> _HALF).astype(jnp.int32) == high_bins[i, j],
                         (keys & jnp.uint32(_BINS - 1)).astype(jnp.int32), _DROP)
    return bins


_SELECT_BLOCK = 256


def _select_bin(hist: Array, rank: Array) -> tuple[Array, Array]:
    """The bin holding the ``rank``-th largest entry, and that entry's rank inside it.

    Batched: ``hist`` is ``(..., bins)`` and ``rank`` ``(...)``. A histogram longer than
    `_SELECT_BLOCK` bins (a multiple of it) is searched level by level: the block of
    `_SELECT_BLOCK` bins holding the rank (from the block sums, recursively), then the bin
    inside that block, so that every search is over at most `_SELECT_BLOCK` bins.
    """
    bins = hist.shape[-1]
    rank = jnp.broadcast_to(rank, hist.shape[:-1])
    if bins <= _SELECT_BLOCK or bins % _SELECT_BLOCK:
        return _select_bin_flat(hist, rank)
    blocks = hist.reshape(hist.shape[:-1] + (bins // _SELECT_BLOCK, _SELECT_BLOCK))
    block, rank_in_block = _select_bin(jnp.sum(blocks, axis=-1), rank)
    within = jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]
    b, rank_in_bin = _select_bin_flat(within, rank_in_block)
    return block * _SELECT_BLOCK + b, rank_in_bin


def _triangular_sums() -> bool:
    """Whether prefix sums go through integer products with a triangle of ones: on CPU,
    where XLA compiles a cumsum in ~0.1-0.3 s and such a product in tens of ms and both
    are exact. Elsewhere cumsum (exact there too, and not a compile-time concern)."""
    return jax.default_backend() == "cpu"


def _at_or_above(hist: Array) -> Array:
    """The count in each bin or higher (a reversed cumsum; on CPU, up to `_SELECT_BLOCK`
    bins, an integer product with a triangle of ones, `_triangular_sums`)."""
    bins = hist.shape[-1]
    if bins > _SELECT_BLOCK or not _triangular_sums():
        return jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return hist @ jnp.tril(jnp.ones((bins, bins), hist.dtype))


def _select_bin_flat(hist: Array, rank: Array) -> tuple[Array, Array]:
    at_or_above = _at_or_above(hist)  # this bin or higher
    b = jnp.maximum(jnp.sum(at_or_above >= rank[..., None], axis=-1) - 1, 0)
    pick = lambda a: jnp.take_along_axis(a, b[..., None], axis=-1)[..., 0]
    return b, rank - (pick(at_or_above) - pick(hist))


# Sampled window. A strided sample of about _SAMPLE entries per task locates the high bin
# of the wanted rank; one pass then histograms the keys within _WINDOW high bins around
# it at full resolution (a bin per key), and counts the keys above the window. When the
# rank falls outside the window (a misleading sample) two exact radix passes follow.
_SAMPLE = 1 << 18
_SORT_MAX = 1 << 12  # up to this many entries a sort is cheaper (to run and compile)
_WINDOW = 4
_FINE = _WINDOW * _BINS
_MAX_SHIFT = 4  # a per-tensor window spans up to _WINDOW << _MAX_SHIFT high bins
_REFINE = 1 << _MAX_SHIFT  # keys in one fine bin of the widest window


class Window(NamedTuple):
    """Each rank's and task's window of order keys, ``(R, K)`` uint32 arrays: the keys in
    ``[first, first + span)`` are histogrammed in fine bins of ``2**shift`` keys (shift 0:
    a bin per key, which gives the exact value), and the keys above are counted."""

    first: Array
    span: Array
    shift: Array


def high_bin_window(starts: Array, widths: Array) -> Window:
    """The `Window` of ``widths`` high bins from high bin ``starts``, a bin per key."""
    first = starts.astype(jnp.uint32) << _HALF
    return Window(first, widths.astype(jnp.uint32) << _HALF, jnp.zeros_like(first))


def sample_stride(size: int) -> int:
    """The stride of the sample of ``size`` entries."""
    return max(1, size // _SAMPLE)


def rank_fractions(ranks: tuple[int, ...], size: int) -> np.ndarray:
    """``(R,)`` float32: each rank as a fraction of the ``size`` entries it counts over,
    which the sample's histograms scale to their own count (`spread_window`)."""
    return np.asarray([r / size for r in ranks], np.float32)


def _scaled_ranks(sample_hist: Array, fractions: Array) -> tuple[Array, Array, Array]:
    """``(hist, counts, scaled)``: the sample's high-bin histograms ``(K, _BINS)``
    broadcast to ``(R, K, _BINS)``, the sample sizes ``(1, K)`` and each rank (given as
    `rank_fractions`) scaled to the sample ``(R, K)`` (float)."""
    counts = jnp.sum(sample_hist, axis=-1).astype(jnp.float32)[None, :]
    fraction = jnp.asarray(fractions, jnp.float32)[:, None]
    scaled = jnp.clip(counts * fraction, 1.0, jnp.maximum(counts, 1.0))
    return (jnp.broadcast_to(sample_hist, (fraction.shape[0],) + sample_hist.shape), counts,
            scaled)


def _sample_bin(hist: Array, counts: Array, rank: Array) -> Array:
    """The high bin holding the sample's ``rank``-th largest entry (``rank`` float,
    rounded up and clipped to the sample)."""
    rank = jnp.clip(jnp.ceil(rank), 1, jnp.maximum(counts, 1)).astype(jnp.int32)
    return _select_bin(hist, rank)[0]


def _centred(centre: Array) -> Array:
    return jnp.clip(centre - _WINDOW // 2, 0, _BINS - _WINDOW)


def _spread_bins(sample_hist: Array, fractions: Array) -> tuple[Array, Array, Array]:
    """``(bottom, top, centre)``, each ``(R, K)``: the high bins of the sample ranks ``s +
    spread``, ``s - spread`` and ``s``, where ``s`` is the wanted rank scaled to the ``m``
    sampled entries and ``spread = 4 sqrt(s (1 - s / m)) + 1`` (4 standard deviations)."""
    hist, counts, scaled = _scaled_ranks(sample_hist, fractions)
    spread = 4.0 * jnp.sqrt(scaled * (1.0 - scaled / jnp.maximum(counts, 1.0))) + 1.0
    # One search for the three; higher keys have smaller ranks.
    wanted = jnp.stack([scaled + spread, scaled - spread, scaled])
    bottom, top, centre = _sample_bin(jnp.broadcast_to(hist, (3,) + hist.shape), counts,
                                      wanted)
    return bottom, top, centre


def narrow_window(sample_hist: Array, fractions: Array) -> Window:
    """Each rank's (given as `rank_fractions`) window of 1 to 4 high bins, for the
    model-wide window pass, which wants few candidate rows: the high bins of the sample
    ranks ``s +- 4`` standard deviations (`_spread_bins`); where that needs more than
    `_WINDOW` bins, `_WINDOW` bins centred on the sample's estimate."""
    bottom, top, centre = _spread_bins(sample_hist, fractions)
    fits = top - bottom < _WINDOW
    return high_bin_window(jnp.where(fits, bottom, _centred(centre)),
                           jnp.where(fits, top - bottom + 1, _WINDOW))


def spread_window(sample_hist: Array, fractions: Array, max_shift: int = _MAX_SHIFT
                  ) -> Window:
    """Each rank's (given as `rank_fractions`) per-tensor window. With ``max_shift`` 0:
    `_WINDOW` high bins at full resolution centred on the sample's estimate (float32
    values: on ViT-B/32 shapes the
    sample ranks ``s +- 4`` standard deviations span 2 to 5 bins, and one search of the
    sample compiles faster than three, ~0.1 s per leaf). Else around the high bins of
    those ranks (`_spread_bins`, ``needed`` bins): `_WINDOW` bins centred on them where
    ``needed <= 2 * _WINDOW`` (the 4 bins hold at least +-2 sigma); else ``_WINDOW <<
    shift`` bins with the smallest shift (2 to ``max_shift``) that holds them, in `_FINE`
    fine bins of ``2**shift`` keys, which `refined_window` makes exact; where more are
    needed, the widest window centred on the sample's estimate.

    Values with few distinct magnitudes (task vectors of bfloat16 weights moved by about
    an ulp: multiples of a few ulps) leave most high bins near the rank empty, so 4
    standard deviations of rank span tens of bins: 4 centred bins missed 8 of 12 such
    leaves, each miss running the exact radix fallback (~7 ns per entry).
    """
    if max_shift == 0:
        hist, counts, scaled = _scaled_ranks(sample_hist, fractions)
        start = _centred(_sample_bin(hist, counts, scaled))
        return high_bin_window(start, jnp.full_like(start, _WINDOW))
    bottom, top, centre = _spread_bins(sample_hist, fractions)
    needed = top - bottom + 1
    smallest = sum((needed > (_WINDOW << s)).astype(jnp.int32) for s in range(max_shift))
    shift = jnp.where(needed > 2 * _WINDOW, smallest, 0)
    fits = needed <= _WINDOW << max_shift
    width = _WINDOW << shift
    start = jnp.where(fits, bottom - (width - needed) // 2, centre - width // 2)
    window = high_bin_window(jnp.clip(start, 0, _BINS - width), width)
    return window._replace(shift=shift.astype(jnp.uint32))


_ROW = 16  # entries per row of the window pass's row test
_CHUNK_ROWS = 1024  # candidate rows histogrammed per loop iteration
_PREFIX_BLOCK = 32


def _exclusive_prefix(flags: Array) -> Array:
    """Exclusive prefix sums of the int32 ``flags`` (0/1, or counts: exact while the total
    fits int32). On CPU (`_triangular_sums`) each level sums within blocks of
    `_PREFIX_BLOCK` by an integer product with a triangle of ones and recurses on the
    block totals: XLA:CPU's cumsum costs ~10 ns per entry and ~0.2 s to compile; on
    147456 flags this runs in half its time and compiles in two thirds."""
    n = flags.shape[0]
    if not _triangular_sums():
        return jnp.cumsum(flags) - flags
    if n <= _PREFIX_BLOCK:
        return flags @ jnp.triu(jnp.ones((n, n), flags.dtype), 1)
    blocks = jnp.pad(flags, (0, -n % _PREFIX_BLOCK)).reshape(-1, _PREFIX_BLOCK)
    inclusive = blocks @ jnp.triu(jnp.ones((_PREFIX_BLOCK, _PREFIX_BLOCK), flags.dtype))
    before = _exclusive_prefix(inclusive[:, -1])  # the totals of the blocks before
    return (inclusive - blocks + before[:, None]).reshape(-1)[:n]


def _identity(values: tuple[Array, ...]) -> tuple[Array, ...]:
    return values


def _window_histograms(acc: Array | None, inputs: tuple[Array, ...], values_of,
                       window: Window, bins: int = _FINE, valid: Array | None = None
                       ) -> Array:
    """Adds the window histograms of the K arrays ``values_of(inputs)`` to ``acc`` (``(R *
    K, bins + 1)``, zeros if None; row ``i * K + j``: rank i, task j): the count of keys
    in each fine bin of the `Window` (``(key - first) >> shift``), then the count above.
    Entries (of the flattened inputs) from ``valid`` on are padding, not counted.

    ``values_of`` is elementwise (e.g. ``|base - x_k|`` from ``inputs = (base, *models)``),
    so neither the values nor their keys are materialised: a row test per rank and task
    (one packed row sum over rows of `_ROW` entries gives the count above the window and
    whether the row holds a candidate) reads the inputs, the candidate rows' indices are
    compacted by `_exclusive_prefix`, and a loop over chunks of `_CHUNK_ROWS` of them, as
    long as there are any, gathers those rows of the inputs (inside the task's branch, so
    XLA drops the gathers its values do not use) and histograms their keys. A scatter
    costs ~3.4 ns per update on XLA:CPU, dropped ones included, so the work follows the
    number of candidates.
    """
    n_ranks, k = window.first.shape
    if acc is None:
        acc = jnp.zeros((n_ranks * k, bins + 1), jnp.int32)
    bins = acc.shape[-1] - 1
    n = inputs[0].size
    limit = n if valid is None else valid
    rows = -(-n // _ROW)
    tables = tuple(jnp.pad(x.reshape(-1), (0, rows * _ROW - n)).reshape(rows, _ROW)
                   for x in inputs)
    firsts, spans, shifts = window
    # Not padding (which may count above a window; padded candidates are dropped when
    # gathered).
    real = (lax.broadcasted_iota(jnp.int32, (rows, _ROW), 0) * _ROW
            + lax.broadcasted_iota(jnp.int32, (rows, _ROW), 1)) < limit
    keys_of_task = [order_key(v).reshape(rows, _ROW) for v in values_of(tables)]
    above, candidates = [], []
    for i in range(n_ranks):
        for j, keys in enumerate(keys_of_task):
            inside = keys - firsts[i, j] < spans[i, j]  # wraps around below the window
            higher = (~inside) & (keys >= firsts[i, j]) & real
            # One row sum carries both counts: above (at most _ROW) in the low byte.
            packed = jnp.sum(jnp.where(inside, jnp.uint32(256), jnp.uint32(0))
                             + higher.astype(jnp.uint32), axis=1)
            above.append(jnp.sum((packed & jnp.uint32(255)).astype(jnp.int32)))
            candidates.append(packed >> 8 > 0)  # bool: a quarter of int32's memory
    above, candidates = jnp.stack(above), jnp.stack(candidates)
    chunk = min(_CHUNK_ROWS, rows)
    slots = -(-rows // chunk) * chunk
    lanes = jnp.arange(_ROW, dtype=jnp.int32)[None, :]

    def task_values(picked: Array) -> list:
        return [lambda m=m: values_of(tuple(t[picked] for t in tables))[m] for m in range(k)]

    def rank_and_task(row_of_acc, acc):
        j = row_of_acc % k
        first, span = firsts.reshape(-1)[row_of_acc], spans.reshape(-1)[row_of_acc]
        shift = shifts.reshape(-1)[row_of_acc]
        candidate = candidates[row_of_acc].astype(jnp.int32)
        slot = jnp.where(candidate > 0, _exclusive_prefix(candidate), slots)
        row = jnp.zeros(slots, jnp.int32).at[slot].set(
            jnp.arange(rows, dtype=jnp.int32), mode="drop")
        count = jnp.sum(candidate)

        def add_chunk(c, hist):
            picked = lax.dynamic_slice_in_dim(row, c * chunk, chunk)
            live = (c * chunk + jnp.arange(chunk) < count)[:, None]
            offset = order_key(lax.switch(j, task_values(picked))).reshape(chunk, _ROW) - first
            keep = live & (picked[:, None] * _ROW + lanes < limit) & (offset < span)
            return hist.at[jnp.where(keep, (offset >> shift).astype(jnp.int32), _DROP)].add(
                1, mode="drop")

        hist = lax.fori_loop(0, (count + chunk - 1) // chunk, add_chunk, acc[row_of_acc])
        return acc.at[row_of_acc].set(hist.at[bins].add(above[row_of_acc]))

    return lax.fori_loop(0, n_ranks * k, rank_and_task, acc)


def _every_key_window_histograms(acc: Array | None, inputs: tuple[Array, ...], values_of,
                                 window: Window, bins: int = _FINE) -> Array:
    """`_window_histograms`' counts from one scatter of every key per rank and task, for
    small leaves: no row test, compaction or chunk loop, and the scatters write into
    ``acc`` in place, where the row pass updates a copy of each rank and task's row of
    ``acc`` (1 MB: ~2.7 ms per leaf of a few thousand entries, with K = 8)."""
    n_ranks, k = window.first.shape
    if acc is None:
        acc = jnp.zeros((n_ranks * k, bins + 1), jnp.int32)
    bins = acc.shape[-1] - 1
    keys_of_task = [order_key(v).reshape(-1) for v in values_of(inputs)]
    for i in range(n_ranks):
        for j, keys in enumerate(keys_of_task):
            offset = keys - window.first[i, j]  # wraps around below the window
            fine = jnp.where(offset < window.span[i, j],
                             (offset >> window.shift[i, j]).astype(jnp.int32),
                             jnp.where(keys >= window.first[i, j], bins, _DROP))
            acc = acc.at[i * k + j, fine].add(1, mode="drop")
    return acc


def _ranks_array(ranks: tuple[int, ...] | Array, k: int) -> Array:
    """``(R, K)`` int32 ranks from a tuple of ints or an ``(R,)`` array (traced ranks:
    one compiled finalize serves every tensor size, `chunked_thresholds`)."""
    if isinstance(ranks, tuple):
        ranks = jnp.asarray([min(max(r, 1), 2**31 - 1) for r in ranks], jnp.int32)
    return jnp.broadcast_to(jnp.asarray(ranks, jnp.int32)[:, None], (len(ranks), k))


def _fine_bin_keys(window_hist: Array, window: Window, ranks: tuple[int, ...]
                   ) -> tuple[Array, Array]:
    """``(key, found)``, each ``(R, K)``: the first key of the fine bin holding each rank,
    from the window histograms ``(R * K, bins + 1)``; ``found`` is False where the rank is
    outside the window."""
    n_ranks, k = window.first.shape
    bins = window_hist.shape[-1] - 1
    hist = window_hist.reshape(n_ranks, k, bins + 1)
    above, inside = hist[..., bins], hist[..., :bins]
    rank = _ranks_array(ranks, k)
    found = (above < rank) & (rank <= above + jnp.sum(inside, axis=-1))
    fine, _ = _select_bin(inside, rank - above)
    return window.first + (fine.astype(jnp.uint32) << window.shift), found


def window_thresholds(window_hist: Array, window: Window, ranks: tuple[int, ...]
                      ) -> tuple[Array, Array]:
    """``(thresholds, found)``, each ``(R, K)``, from the histograms of `_window_histograms`;
    exact where the window's shift is 0 (else the lowest value of the fine bin:
    `refined_window`); ``found`` is False where the rank is outside the window."""
    key, found = _fine_bin_keys(window_hist, window, ranks)
    return _from_key(key), found


def refined_window(window_hist: Array, window: Window, ranks: tuple[int, ...]) -> Window:
    """The fine bin holding each rank, a bin per key: the window of a second pass that
    makes a shifted window's thresholds exact."""
    key, _ = _fine_bin_keys(window_hist, window, ranks)
    return Window(key, jnp.uint32(1) << window.shift, jnp.zeros_like(key))


def _radix_high_bins(high: Array, ranks: tuple[int, ...]) -> Array:
    """``(R, K)`` high bins of the ranks, from the exact high histograms ``(K, _BINS)``."""
    k = high.shape[0]
    return _select_bin(jnp.broadcast_to(high, (len(ranks),) + high.shape),
                       _ranks_array(ranks, k))[0]


def _radix_thresholds(high: Array, low: Array, ranks: tuple[int, ...]) -> Array:
    """``(R, K)`` thresholds from the exact radix histograms (high ``(K, _BINS)``, low
    ``(R * K, _BINS)``)."""
    k = high.shape[0]
    b, inside = _select_bin(jnp.broadcast_to(high, (len(ranks),) + high.shape),
                            _ranks_array(ranks, k))
    lo, _ = _select_bin(low.reshape(len(ranks), k, _BINS), inside)
    return _from_key((b.astype(jnp.uint32) << _HALF) | lo.astype(jnp.uint32))


def _edges(found: Array, ranks: tuple[int, ...], size: int, k: int) -> Array:
    """``(len(ranks), k)`` thresholds from those of the live ranks (in (0, size]): ranks
    <= 0 keep nothing (+inf), ranks > size everything (-inf)."""
    rows, j = [], 0
    for r in ranks:
        if r <= 0:
            rows.append(jnp.full((k,), jnp.inf, jnp.float32))
        elif r > size:
            rows.append(jnp.full((k,), -jnp.inf, jnp.float32))
        else:
            rows.append(found[j])
            j += 1
    return jnp.stack(rows)


def _live(ranks: tuple[int, ...], size: int) -> tuple[int, ...]:
    return tuple(r for r in ranks if 0 < r <= size)


def _window_max_shift(inputs: tuple[Array, ...]) -> int:
    """`spread_window`'s ``max_shift`` for a per-tensor selection over ``inputs``:
    `_MAX_SHIFT` where one is a float narrower than float32 (differences of such values
    take few distinct values), else 0 (float32 ones rarely do, and the refinement pass
    costs compile time and memory: per-tensor TIES on ViT-B/32, compile 84 -> 146 s,
    peak +2.4 models' worth)."""
    low_precision = any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
                        for x in inputs)
    return _MAX_SHIFT if low_precision else 0


def select_thresholds(inputs: tuple[Array, ...], ranks: tuple[int, ...],
                      values_of=_identity) -> Array:
    """``(R, K)``: for each of the K arrays ``values_of(inputs)``, its ``ranks[i]``-th
    largest entry (exact).

    ``values_of`` is elementwise in the inputs (e.g. ``|base - x_k|`` from ``(base,
    *models)``; by default the inputs are the values): every pass reads the inputs
    through it, so the values are never materialised (XLA:CPU would write them to fresh
    memory and keep them alive as loop operands).

    A strided sample, then one histogram pass over a window around the sample's estimate;
    two exact radix passes when the window missed (`lax.cond`: they run only then).
    Inputs of up to 2**18 entries go straight to the exact radix passes, and up to 2**12
    entries to a sort of their order keys (cheaper there than 65536-bin histograms, to run
    and to compile; -0.0 ranks below 0.0 as in the histograms), and float64 values to a
    sort of the values (the radix keys are float32).
    """
    shapes = jax.eval_shape(values_of, inputs)
    size, k = shapes[0].size, len(shapes)
    live = _live(ranks, size)
    if not live:
        return _edges(jnp.zeros((0, k)), ranks, size, k)
    if size <= _SORT_MAX or shapes[0].dtype == jnp.float64:
        pick = _ascending(values_of(inputs))
        return _edges(jnp.stack([pick(size - r) for r in live]), ranks, size, k)

    def radix(_):
        high = _histograms(None, inputs, values_of, _high_bins, _BINS)
        high_bins = _radix_high_bins(high, live)
        low = _histograms(None, inputs, values_of, _low_bins(high_bins), _BINS,
                          rows=len(live))
        return _radix_thresholds(high, low, live)

    if size <= _SAMPLE:
        return _edges(radix(None), ranks, size, k)
    sample = _histograms(None, inputs, values_of, _high_bins, _BINS,
                         stride=sample_stride(size))
    max_shift = _window_max_shift(inputs)
    window = spread_window(sample, rank_fractions(live, size), max_shift)
    hist = _window_histograms(None, inputs, values_of, window)
    thresholds, found = window_thresholds(hist, window, live)

    def refine(_):
        fine = refined_window(hist, window, live)
        return window_thresholds(_window_histograms(None, inputs, values_of, fine,
                                                    bins=_REFINE), fine, live)[0]

    def windowed(_):
        if not max_shift:
            return thresholds
        return lax.cond(jnp.any(window.shift > 0), refine, lambda _: thresholds, None)

    return _edges(speculate(jnp.all(found), windowed, radix, None), ranks, size, k)


#: Entries per chunk of `chunked_thresholds`' passes: every tensor size runs the same
#: compiled passes (a streaming merge's per-tensor top-k compiles once, not per size).
CHUNK = 1 << 20
#: The smallest tensor a streaming merge selects over chunks: a smaller one would pad its
#: chunk to over 4x its size, and its own kernel's selection (radix passes only, or a
#: sort) compiles faster than a sampled one.
CHUNKED_MIN_SIZE = _SAMPLE + 1


class Chunks(NamedTuple):
    """A tensor's inputs cut for `chunked_thresholds` (`cut_chunks`).

    ``chunks``: tuples of 1-d arrays of `CHUNK` entries, one per input, the last chunk
    zero-padded (``valid[i]`` of chunk i's entries are the tensor's); ``sample``: every
    `sample_stride`-th entry of each input, zero-padded to ``2 * _SAMPLE`` entries
    (``sample_count`` of them real): the sample `select_thresholds` takes of the whole
    tensor, so both pick the same windows."""

    size: int
    chunks: tuple[tuple[Array, ...], ...]
    valid: tuple[int, ...]
    sample: tuple[Array, ...]
    sample_count: int


def cut_chunks(arrays: Sequence[np.ndarray]) -> Chunks:
    """The flat host arrays ``arrays`` (one per input, all of one size) as `Chunks` of
    device arrays; on CPU the full chunks alias the host memory (no copy).

    Example::

        chunks = cut_chunks([base.reshape(-1), ft.reshape(-1)])
    """
    size = arrays[0].size
    count = max(1, -(-size // CHUNK))
    stride = sample_stride(size)
    sample_count = -(-size // stride)

    def padded(x: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros(n, x.dtype)
        out[:x.size] = x
        return out

    chunks = []
    for i in range(count):
        part = [x[i * CHUNK:(i + 1) * CHUNK] for x in arrays]
        chunks.append(tuple(jax.device_put(x if x.size == CHUNK else padded(x, CHUNK),
                                           may_alias=True) for x in part))
    sample = tuple(jax.device_put(padded(x[::stride], 2 * _SAMPLE)) for x in arrays)
    return Chunks(size, tuple(chunks), tuple(min(CHUNK, size - i * CHUNK)
                                             for i in range(count)), sample, sample_count)


@functools.partial(jax.jit, static_argnames=("values_of",), donate_argnums=0)
def _chunk_high(acc: Array, inputs: tuple[Array, ...], valid: Array, *, values_of) -> Array:
    return _histograms(acc, inputs, values_of, _high_bins, _BINS, valid=valid)


@functools.partial(jax.jit, static_argnames=("values_of",), donate_argnums=0)
def _chunk_low(acc: Array, inputs: tuple[Array, ...], valid: Array, high_bins: Array, *,
               values_of) -> Array:
    return _histograms(acc, inputs, values_of, _low_bins(high_bins), _BINS,
                       rows=high_bins.shape[0], valid=valid)


@functools.partial(jax.jit, static_argnames=("values_of",), donate_argnums=0)
def _chunk_window(acc: Array, inputs: tuple[Array, ...], valid: Array, window: Window, *,
                  values_of) -> Array:
    return _window_histograms(acc, inputs, values_of, window, valid=valid)


_chunk_spread_window = jax.jit(spread_window, static_argnames=("max_shift",))
_chunk_window_thresholds = jax.jit(window_thresholds)
_chunk_refined_window = jax.jit(refined_window)
_chunk_radix_high_bins = jax.jit(_radix_high_bins)
_chunk_radix_thresholds = jax.jit(_radix_thresholds)


def chunked_thresholds(chunks: Chunks, ranks: tuple[int, ...], values_of) -> np.ndarray:
    """``(R, K)`` float32: `select_thresholds` of the tensor cut into ``chunks``
    (`cut_chunks`), the same values, from passes compiled once for every tensor size.

    ``values_of`` is elementwise in the inputs as there, and hashable (a module-level
    function: the compiled passes are cached by it). The same sample and window pass
    (`spread_window`), the refinement pass for inputs narrower than float32 and the two
    radix passes where the window missed, each folded chunk by chunk; padded entries are
    not counted. Ranks and sizes are traced in the finalizes. Tensors of up to
    ``_SAMPLE`` entries go straight to the radix passes, as there (their sort path for
    up to `_SORT_MAX` entries gives the same values). float64 values are not supported
    (the keys are float32).

    Example::

        thresholds = chunked_thresholds(cut_chunks(flat_inputs), (rank,), magnitudes)
    """
    size = chunks.size
    first = chunks.chunks[0]
    shapes = jax.eval_shape(values_of, first)
    k = len(shapes)
    if shapes[0].dtype == jnp.float64:
        raise MergeError("chunked_thresholds ranks float32 keys; float64 values need "
                         "select_thresholds")
    live = _live(ranks, size)
    live_thresholds = (_chunked_live_thresholds(chunks, live, values_of, k) if live
                       else jnp.zeros((0, k)))
    return np.asarray(_edges(live_thresholds, ranks, size, k))


def _chunked_live_thresholds(chunks: Chunks, live: tuple[int, ...], values_of,
                             k: int) -> Array:
    passes = tuple(zip(chunks.chunks, (np.int32(v) for v in chunks.valid)))
    ranks = np.asarray([min(r, 2**31 - 1) for r in live], np.int32)

    def fold(update, acc, *args):
        acc = jax.device_put(acc)
        for inputs, valid in passes:
            acc = update(acc, inputs, valid, *args, values_of=values_of)
        return acc

    def radix():
        high = fold(_chunk_high, np.zeros((k, _BINS), np.int32))
        high_bins = _chunk_radix_high_bins(high, ranks)
        low = fold(_chunk_low, np.zeros((len(live) * k, _BINS), np.int32), high_bins)
        return _chunk_radix_thresholds(high, low, ranks)

    if chunks.size <= _SAMPLE:
        return radix()
    sample = _chunk_high(jax.device_put(np.zeros((k, _BINS), np.int32)), chunks.sample,
                         np.int32(chunks.sample_count), values_of=values_of)
    max_shift = _window_max_shift(chunks.sample)
    window = _chunk_spread_window(sample, rank_fractions(live, chunks.size), max_shift)
    hist = fold(_chunk_window, np.zeros((len(live) * k, _FINE + 1), np.int32), window)
    thresholds, found = _chunk_window_thresholds(hist, window, ranks)
    if not np.all(np.asarray(found)):
        return radix()
    if max_shift and np.any(np.asarray(window.shift) > 0):
        fine = _chunk_refined_window(hist, window, ranks)
        hist = fold(_chunk_window, np.zeros((len(live) * k, _REFINE + 1), np.int32), fine)
        return _chunk_window_thresholds(hist, fine, ranks)[0]
    return thresholds


def _ascending(values: Sequence[Array]) -> Callable[[Any], Array]:
    """``pick(i)``: the ``i``-th smallest entry (0-based) of each of the K arrays, by a
    sort of their order keys (XLA:CPU sorts one uint32 operand ~5x faster than floats, and
    the keys rank -0.0 below 0.0 as the histograms do), or of the values for float64
    (the keys are float32)."""
    if values[0].dtype == jnp.float64:
        ordered = jnp.sort(jnp.stack([v.reshape(-1) for v in values]), axis=-1)
        return lambda i: ordered[:, i]
    keys = jnp.sort(jnp.stack([order_key(v) for v in values]), axis=-1)
    return lambda i: _from_key(keys[:, i])


def kth_largest(x: Array, rank: int | Array) -> Array:
    """Exact ``rank``-th largest entry of ``x`` (1-based), no sort (`select_thresholds`).
    ``rank`` may be traced (then by the two exact radix passes). ``rank <= 0`` gives +inf
    and ``rank > x.size`` -inf, so ``x >= kth_largest(x, rank)`` keeps nothing or
    everything there."""
    if isinstance(rank, int):
        return select_thresholds((x,), (rank,))[0, 0]
    if x.size <= _SORT_MAX or x.dtype == jnp.float64:
        value = _ascending((x,))(x.size - jnp.clip(jnp.asarray(rank, jnp.int32), 1, x.size))[0]
        return jnp.where(rank <= 0, jnp.inf, jnp.where(rank > x.size, -jnp.inf, value))
    r = jnp.clip(jnp.asarray(rank, jnp.int32), 1, x.size)
    high = _histograms(None, (x,), _identity, _high_bins, _BINS)[0]
    b, inside = _select_bin(high, r)
    low = _histograms(None, (x,), _identity, _low_bins(b.reshape(1, 1)), _BINS)[0]
    lo, _ = _select_bin(low, inside)
    value = _from_key((b.astype(jnp.uint32) << _HALF) | lo.astype(jnp.uint32))
    return jnp.where(rank <= 0, jnp.inf, jnp.where(rank > x.size, -jnp.inf, value))


def magnitude_threshold(x: Array, rank: int) -> Array:
    """Exact ``rank``-th largest ``|x|``; ``|x| >= threshold`` keeps the top ``rank``
    magnitudes and ties with the last one."""
    return kth_largest(jnp.abs(x), rank)


def topk_mask(x: Array, rank: int) -> Array:
    """Boolean mask of the entries of ``x`` whose magnitude is among the ``rank`` largest
    (ties at the threshold kept)."""
    return jnp.abs(x) >= magnitude_threshold(x, rank)


_BATCH_LEAF = 1 << 16  # leaves up to this size are histogrammed together, in batches
_BATCH_FLUSH = 1 << 21


def _fold(acc, values, add, init):
    """Adds a leaf's values to a histogram accumulator ``(hist, pending, pending_size)``.

    ``values`` is ``(leaf size, thunk)``; the thunk gives ``(inputs, values_of)``, the
    leaf's inputs and the elementwise function of them giving its K arrays. A large
    leaf's are computed inside ``add`` (so that a `lax.cond` there does not get them as
    materialised operands, and the window pass need not materialise them at all). Small
    leaves' values are kept back and concatenated, then added with one call of ``add``:
    a histogram per leaf compiles in tens of ms, and models have hundreds of small
    leaves (biases, norms); but not when each leaf's update is compiled on its own
    (`folds_leaf_by_leaf`), where that would compile one update per leaf.
    """
    hist, pending, size = acc if acc is not None else (init(), (), 0)
    leaf_size, thunk = values
    if leaf_size > _BATCH_LEAF or folds_leaf_by_leaf():
        return add(hist, thunk), pending, size
    pending, size = pending + (_leaf_values(thunk),), size + leaf_size
    if size >= _BATCH_FLUSH:
        return _flush((hist, pending, size), add), (), 0
    return hist, pending, size


def _flush(acc, add) -> Array:
    hist, pending, _ = acc
    if not pending:
        return hist
    joined = tuple(jnp.concatenate([p[k].reshape(-1) for p in pending])
                   for k in range(len(pending[0])))
    return add(hist, lambda: (joined, _identity))


def _leaf_values(thunk) -> tuple[Array, ...]:
    """The K arrays of a `_fold` thunk's leaf."""
    inputs, values_of = thunk()
    return values_of(inputs)


def _window_found(window_pass: Any) -> bool:
    """Whether the window pass (its ``(thresholds, found)``, None without live ranks) found
    every rank, so that the radix fallback passes change nothing (`StatisticsPass.idle`)."""
    return window_pass is None or bool(window_pass[1])


def global_threshold_passes(values_fn, ranks_fn, active=None) -> tuple[StatisticsPass, ...]:
    """The statistics passes of a model-wide `select_thresholds`, for `leafwise`.

    ``values_fn(ctx, base, models, **hparams)`` gives a leaf's K arrays to rank (e.g.
    ``|tau_k|``, elementwise: the sample pass calls it on strided slices, the window pass
    on the leaf's rows and on gathered rows; write it from
    ``base - x``, not ``x - base``, so that XLA does not share it with the merge's
    ``x - base`` and keep it alive for every leaf: measured, 7 models' worth);
    ``ranks_fn(ctx, **hparams)`` the static tuple of 1-based ranks wanted,
    counted over the whole model (``ctx.total_size`` entries per task), or () to skip;
    ``active(**static_hparams)`` False for leaves where ``ranks_fn`` gives () whatever the
    model's size (`StatisticsPass.active`: streaming merges then do not read them).
    Four passes: the sample, the window, and the two exact radix passes of the fallback,
    which skip their work (`lax.cond`) unless the window missed (and are `idle` then).
    `global_thresholds` reads the ``(R, K)`` thresholds from them. Histogram counts are
    int32, so a model has at most 2**31 - 1 entries per task.
    """

    def live(ctx, hp):
        return _live(ranks_fn(ctx, **hp), ctx.total_size)

    def full(ctx, inputs):
        return inputs

    def strided(ctx, inputs):
        stride = sample_stride(ctx.total_size)
        return tuple(x.reshape(-1)[::stride] for x in inputs)

    def pass_(make_add, init, finalize, read=full, idle=None, sorted_result=None,
              collects=False):
        """A pass that folds every leaf with live ranks into a histogram; ``read`` gives
        the leaf's inputs it ranks (the sample pass reads a strided slice, so that no
        full-size intermediate is shared with other passes: XLA would keep it alive).
        In a small whole-model program (`_sorts`) it folds nothing: its result is
        ``sorted_result(ctx, acc)``, and the pass that ``collects`` (the window pass)
        keeps every leaf's order keys in ``acc`` (`_Sorted`)."""
        def update(ctx, acc, base, models, **hp):
            ranks = live(ctx, hp)
            if not ranks:
                return acc
            check_global_size(ctx.total_size)
            if base.dtype == jnp.float64:
                raise MergeError(
                    f"scope='global' selects thresholds on float32 keys, which is not exact "
                    f"for float64 inputs (at '{ctx.path}'); use scope='tensor'")
            stored, upcast = as_stored(ctx, (base, *models))

            def values_of(inputs):
                inputs = upcast(inputs)
                return values_fn(ctx, inputs[0], inputs[1:], **hp)

            if _sorts(ctx):
                keys = acc.keys if acc is not None else ()
                if collects:
                    keys += (jnp.stack([order_key(v) for v in values_of(stored)]),)
                return _Sorted(ranks, keys)
            add = make_add(ctx, ranks)
            thunk = lambda: (read(ctx, stored), values_of)  # noqa: E731
            state = _fold(None if acc is None else acc[1], (base.size, thunk), add,
                          lambda: init(ranks, len(models)))
            return ranks, state

        def done(ctx, acc):
            if acc is None:
                return None
            if isinstance(acc, _Sorted):
                return sorted_result(ctx, acc)
            ranks, state = acc
            return finalize(ctx, ranks, _flush(state, make_add(ctx, ranks)))

        def start(ctx, num_models, **hp):
            """The accumulator `_fold` makes for the first leaf: zero histograms (NumPy:
            jnp.zeros outside jit would compile a program per histogram shape)."""
            ranks = live(ctx, hp)
            if not ranks:
                return None
            zeros = jax.eval_shape(lambda: init(ranks, num_models))
            return ranks, (np.zeros(zeros.shape, zeros.dtype), (), 0)

        return StatisticsPass(update, done, active, idle, start)

    def sample_add(ctx, ranks):
        return lambda h, v: _histograms(h, *v(), _high_bins, _BINS)

    def window_add(ctx, ranks):
        window = ctx.stats[-1]

        def add(h, v):
            inputs, values_of = v()
            small = inputs[0].size <= _BATCH_LEAF
            return (_every_key_window_histograms if small else _window_histograms)(
                h, inputs, values_of, window)
        return add

    def high_add(ctx, ranks):
        _, found = ctx.stats[-1]
        return lambda h, v: lax.cond(found, lambda a: a,
                                     lambda a: _histograms(a, *v(), _high_bins, _BINS), h)

    def low_add(ctx, ranks):
        _, found = ctx.stats[-2]
        high_bins = _radix_high_bins(ctx.stats[-1], ranks)
        return lambda h, v: lax.cond(
            found, lambda a: a,
            lambda a: _histograms(a, *v(), _low_bins(high_bins), _BINS,
                                  rows=len(ranks)), h)

    bins = lambda width, rows=False: (  # noqa: E731
        lambda ranks, k: jnp.zeros(((len(ranks) if rows else 1) * k, width), jnp.int32))
    nothing = lambda ctx, acc: None  # noqa: E731
    return (
        pass_(sample_add, bins(_BINS),
              lambda ctx, ranks, h: narrow_window(h, rank_fractions(ranks, ctx.total_size)),
              read=strided,
              sorted_result=nothing),
        pass_(window_add, bins(_FINE + 1, rows=True),
              lambda ctx, ranks, h: (lambda t, f: (t, jnp.all(f)))(
                  *window_thresholds(h, ctx.stats[-1], ranks)),
              sorted_result=lambda ctx, acc: (_sorted_thresholds(acc), jnp.bool_(True)),
              collects=True),
        pass_(high_add, bins(_BINS), lambda ctx, ranks, h: h,
              idle=lambda stats: _window_found(stats[-1]), sorted_result=nothing),
        pass_(low_add, bins(_BINS, rows=True),
              lambda ctx, ranks, h: jnp.where(ctx.stats[-2][1], ctx.stats[-2][0],
                                              _radix_thresholds(ctx.stats[-1], h, ranks)),
              idle=lambda stats: _window_found(stats[-2]),
              sorted_result=lambda ctx, acc: ctx.stats[-2][0]),
    )


#: Entries per task up to which a whole-model program (not a per-leaf or streaming merge)
#: selects model-wide thresholds by one sort of the model's order keys instead of the
#: four histogram passes: the same bits, and a program that compiles in a fraction of
#: the time (most small models and tests). Measured, global TIES on 2**16 entries, 8
#: tasks: first call 0.6 s against 2.8 s, then 22 ms a call against 10 ms.
_GLOBAL_SORT_MAX = 1 << 16


def _sorts(ctx) -> bool:
    """Whether `global_threshold_passes` sort (a small model in one program)."""
    return ctx.total_size <= _GLOBAL_SORT_MAX and not folds_leaf_by_leaf()


class _Sorted(NamedTuple):
    """`global_threshold_passes`' accumulator where they sort (`_sorts`): the live ranks
    and, for the window pass, each leaf's ``(K, leaf size)`` order keys."""
    ranks: tuple[int, ...]
    keys: tuple[Array, ...]


def _sorted_thresholds(acc: _Sorted) -> Array:
    """``(R, K)`` thresholds: the ranks' largest values of the concatenated keys (sorted
    as uint32 keys, so -0.0 ranks below 0.0 as in the histograms); a rank beyond the
    entries counted (leaves without live ranks) keeps them all (-inf)."""
    keys = jnp.sort(jnp.concatenate(acc.keys, axis=1), axis=-1)
    n = keys.shape[1]
    return jnp.stack([_from_key(keys[:, n - r]) if r <= n
                      else jnp.full((keys.shape[0],), -jnp.inf, jnp.float32)
                      for r in acc.ranks])


def global_thresholds(ctx, ranks: tuple[int, ...], k: int, offset: int = 0) -> Array:
    """``(len(ranks), k)`` thresholds for k tasks from the four passes of
    `global_threshold_passes` starting at ``ctx.stats[offset]``."""
    live = _live(ranks, ctx.total_size)
    found = ctx.stats[offset + 3] if live else jnp.zeros((0, k))
    return _edges(found, ranks, ctx.total_size, k)


def check_global_size(total_size: int) -> None:
    """Histogram counts are int32: a model-wide selection handles up to 2**31 - 1 entries."""
    if total_size >= 2**31:
        raise MergeError(f"scope='global' counts entries in int32 and handles at most "
                         f"2**31 - 1 of them per task; this model has {total_size}: use "
                         "scope='tensor'")


def _rank(r: int) -> Array:
    return jnp.int32(min(max(r, 1), 2**31 - 1))


def _mix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_bits(key: Array, shape: tuple[int, ...], stream: int = 0) -> Array:
    """Counter-based uint32 random bits: two rounds of `_mix32` over the entry's index
    and a 32-bit seed hashed from the words of ``key`` and ``stream`` (e.g. the task).

    Why not `jax.random.bits`: XLA:CPU's threefry costs ~16 ns per entry (measured: 1.4 s
    for 88M entries, where this hash takes 0.15 s, the time of a copy), and DARE draws one
    number per parameter and task; each threefry also adds to compile time. Distinct
    keys or streams give independent-looking bits; up to 2**32 entries per leaf.
    """
    seed = _mix32(jnp.uint32(stream) * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))
    for word in jax.random.key_data(key).reshape(-1).astype(jnp.uint32):
        seed = _mix32(seed ^ word)
    index = lax.iota(jnp.uint32, math.prod(shape))
    h = _mix32(index * jnp.uint32(0x9E3779B9) ^ seed)
    return _mix32(h ^ (seed * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1))).reshape(shape)


def bernoulli_mask(key: Array, p: Array | float, shape: tuple[int, ...],
                   stream: int = 0) -> Array:
    """Keep each entry with probability ``p`` (a scalar or an array of ``shape``), from
    `uniform_bits`: ``bits < p * 2**32`` (``p = 1`` keeps all but a 2**-32 chance)."""
    threshold = jnp.clip(jnp.asarray(p, jnp.float32) * 4294967296.0, 0.0, 4294967295.0)
    return uniform_bits(key, shape, stream) < threshold.astype(jnp.uint32)


def rescale_masked(x: Array, mask: Array, how: str, density: Array | float = 1.0,
                   eps: float = 1e-7, norms_mask: Array | None = None) -> Array:
    """``x * mask``, rescaled to make up for what the mask removed.

    ``how``: ``"none"``; ``"density"`` divides by the keep probability ``density`` (a
    scalar or per entry; DARE's and DELLA's papers); ``"l1"``, ``"l2"``, ``"linf"`` match
    the norm of ``x`` over the whole tensor (mergekit's ``rescale_norm``; unscaled when
    either norm is below ``eps``, as mergekit). ``norms_mask``, if given, is the same
    mask computed separately for the norms' pass (e.g. drawn from
    ``lax.optimization_barrier(key)``): XLA then recomputes it in that pass instead of
    writing ``mask`` out for the second one.
    """
    masked = jnp.where(mask, x, 0.0)
    if how == "none":
        return masked
    if how == "density":
        return masked / density
    if how not in ("l1", "l2", "linf"):
        raise MergeError(f"rescale must be one of 'none', 'density', 'l1', 'l2', 'linf'; "
                         f"got {how!r}")
    # One pass for both norms (`fused_reduce`): two sums would write x and masked out.
    size = (lambda v: v * v) if how == "l2" else jnp.abs
    kept = masked if norms_mask is None else jnp.where(norms_mask, x, 0.0)
    before, after = fused_reduce((size(x), size(kept)), ("max",) * 2 if how == "linf"
                                 else ("sum",) * 2)
    if how == "l2":
        before, after = jnp.sqrt(before), jnp.sqrt(after)
    small = (before < eps) | (after < eps)
    return masked * jnp.where(small, 1.0, before / jnp.where(small, 1.0, after))


def magprune_probabilities(x: Array, density: float, epsilon: float, axis: int = -1) -> Array:
    """DELLA's MAGPRUNE keep probabilities: ``density - epsilon`` for the smallest
    magnitude of each row up to ``density + epsilon`` for the largest, linear in the rank.

    A row runs along ``axis`` (a 0-d or 1-d leaf is one row). mergekit ranks along dim 1
    of PyTorch's ``(out, in)`` weights, which is axis 0 of a Flax ``(in, out)`` kernel.
    Ranks are exact (a stable sort, so equal magnitudes are ranked by position, as
    mergekit's ``argsort``); a row of one entry gets ``density``.
    """
    if x.ndim < 2:
        rows = x.reshape(1, -1)
    else:
        rows = jnp.moveaxis(x, axis, -1)
    moved_shape = rows.shape
    rows = rows.reshape(-1, moved_shape[-1])
    n = rows.shape[-1]
    order = jnp.argsort(jnp.abs(rows), axis=-1, stable=True)
    ranks = jnp.zeros_like(order).at[
        jnp.arange(rows.shape[0])[:, None], order].set(jnp.arange(n)[None, :])
    rank_norm = ranks.astype(jnp.float32) / (n - 1) if n > 1 else jnp.full(rows.shape, 0.5)
    p = ((density - epsilon) + 2.0 * epsilon * rank_norm).reshape(moved_shape)
    return p.reshape(x.shape) if x.ndim < 2 else jnp.moveaxis(p, -1, axis)


def elect_sign(taus: tuple[Array, ...], method: str = "mass") -> Array:
    """The elected sign (+1 or -1) of every entry.

    ``"mass"``: the sign of ``sum_k tau_k`` (the TIES paper); ``"count"``: the sign of
    ``sum_k sign(tau_k)`` (mergekit's ``consensus_method: count``). A zero sum elects +1,
    as mergekit (the TIES paper's code takes the sign of the whole model's sum there; the
    two differ only where the task values cancel exactly).
    """
    if method == "mass":
        total = functools.reduce(jnp.add, taus)
    elif method == "count":
        total = functools.reduce(jnp.add, (jnp.sign(t) for t in taus))
    else:
        raise MergeError(f"sign election must be 'mass' or 'count', got {method!r}")
    return jnp.where(total >= 0, 1.0, -1.0)


def disjoint_combine(taus: tuple[Array, ...], sign: Array, *, mode: str = "mean",
                     weights: Array | None = None) -> Array:
    """Combines the entries of ``taus`` that agree with ``sign`` (zeros never agree).

    ``taus`` are already weighted (``w_k tau_k``, as mergekit elects and sums weighted
    task vectors). ``"sum"``: ``sum_k taus_k [agree]`` (FusionBench's
    ``merge_func="sum"``); ``"mean"``: that sum divided by ``sum_k w_k [agree]`` (1 where
    it is 0): the TIES paper's disjoint mean, mergekit's ``normalize: true``.
    """
    if mode not in ("mean", "sum"):
        raise MergeError(f"disjoint must be 'mean' or 'sum', got {mode!r}")
    agree = tuple(jnp.sign(t) == sign for t in taus)
    total = functools.reduce(jnp.add, (jnp.where(a, t, 0.0) for t, a in zip(taus, agree)))
    if mode == "sum":
        return total
    w = jnp.ones(len(taus)) if weights is None else weights
    count = functools.reduce(jnp.add, (jnp.where(a, w[k], 0.0) for k, a in enumerate(agree)))
    return total / jnp.where(jnp.abs(count) < 1e-8, 1.0, count)


def check_density(path: str, density: float, name: str = "density") -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0
            and math.isfinite(density)):
        raise MergeError(f"{name} must be in (0, 1], got {density!r} at '{path}'")
