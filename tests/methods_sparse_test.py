"""Sparse / sign-consensus / mask-based merges against small, independent NumPy references.

References are written from the definitions in ``notes/refs_sparse_a.md``,
``notes/refs_sparse_b.md`` and the docstrings' stated switches (mergekit, FusionBench, the
official PCB / EMR / TALL / Localize-and-Stitch / Model Tailor code); none of them calls
mergejax, except that the random methods' masks are drawn with the documented
``stages.bernoulli_mask(mergejax.leaf_key(key, path), p, shape, stream=k)`` (and DELLA's
keep probabilities with ``stages.magprune_probabilities``, itself checked against NumPy).

Inputs that go through a magnitude ranking are dyadic (``base`` on a 1/16 grid, task
vectors on a 1/256 grid, distinct magnitudes), so ``x - base`` is exact in float32 and the
float64 reference ranks exactly what mergejax ranks. Each tree has a matrix, a vector, a
3-D tensor and an int32 step counter that must come back unchanged.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, spy, walk, x64
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import mergejax
from mergejax import MergeError, PathRules
from mergejax import method as method_lib
from mergejax.methods import stages

SHAPES = {"dense/kernel": (8, 6), "dense/bias": (6,), "conv/kernel": (4, 3, 5)}
PATHS = tuple(SHAPES)
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())

PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
F32 = dict(rtol=2e-5, atol=2e-6)

# ----------------------------------------------------------------------------- trees


def dyadic(seed: int, k: int, *, zeros: float = 0.0, shared_signs: bool = False,
           dtype=jnp.float32):
    """A base and k fine-tunes whose task vectors are exact in float32 (and every value
    exact in bfloat16 when ``dtype`` is bfloat16), with distinct magnitudes within each
    task over the whole model (a fraction ``zeros`` set to 0)."""
    rng = np.random.default_rng(seed)
    bf16 = dtype == jnp.bfloat16
    grid, lim, tgrid = (8.0, 16, 64.0) if bf16 else (16.0, 48, 256.0)
    b = {p: rng.integers(-lim, lim, size=s) / grid for p, s in SHAPES.items()}
    signs = rng.choice([-1.0, 1.0], size=SIZE)
    models = []
    for i in range(k):
        mags = (rng.permutation(SIZE) + 1) / tgrid
        s = signs if shared_signs else rng.choice([-1.0, 1.0], size=SIZE)
        vec = s * mags * (rng.random(SIZE) >= zeros)
        tau, j = {}, 0
        for p, shape in SHAPES.items():
            n = int(np.prod(shape))
            tau[p] = vec[j:j + n].reshape(shape)
            j += n
        models.append(make_tree({p: b[p] + tau[p] for p in PATHS}, 100 + i, dtype))
    return make_tree(b, 7, dtype), models


def gaussian(seed: int, k: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    b = {p: rng.standard_normal(s) for p, s in SHAPES.items()}
    models = [make_tree({p: b[p] + 0.5 * rng.standard_normal(s) for p, s in SHAPES.items()},
                        100 + i, dtype) for i in range(k)]
    return make_tree(b, 7, dtype), models


def taus_of(base: dict, models: list[dict]) -> list[dict[str, np.ndarray]]:
    return [{p: m[p] - base[p] for p in PATHS} for m in models]


# ------------------------------------------------------------------ NumPy references


def ref_kth_largest(x: np.ndarray, r: int) -> float:
    if r <= 0:
        return np.inf
    if r > x.size:
        return -np.inf
    return float(np.sort(x.ravel())[::-1][r - 1])


def ref_topk_keep(mag: np.ndarray, r: int) -> np.ndarray:
    """|tau| >= the r-th largest magnitude (nothing for r <= 0, everything for r >= n)."""
    return mag >= ref_kth_largest(mag, r)


def ref_fusionbench_keep(flat_mag: np.ndarray, density: float) -> np.ndarray:
    """FusionBench / TIES code: keep |tau| >= kthvalue(|tau|, n - int(n d)) (1-based)."""
    n = flat_mag.size
    kth = n - int(n * density)
    if kth <= 0:
        return np.ones(n, bool)
    return flat_mag >= np.sort(flat_mag)[kth - 1]


def ref_combine(d: list[np.ndarray], w, elect: str, disjoint: str,
                normalize: bool = False) -> np.ndarray:
    """mergekit GTA after sparsification; ``d`` are the weighted task vectors w_k tau_k."""
    if elect == "none":
        mixed = sum(d)
        if normalize:
            div = float(sum(w))
            mixed = mixed / (1.0 if abs(div) < 1e-8 else div)
        return mixed
    if elect == "mass":
        s = np.where(sum(d) >= 0, 1.0, -1.0)
    else:
        s = np.where(sum(np.sign(x) for x in d) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == s for x in d]
    mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, d))
    if disjoint == "sum":
        return mixed
    div = sum(np.where(a, wk, 0.0) for a, wk in zip(agree, w))
    return mixed / np.where(div == 0, 1.0, div)


def ref_magnitude_masks(taus, density, scope, topk):
    """Per task and path, the masks of a magnitude top-k."""
    masks = []
    for tau in taus:
        if scope == "global":
            flat = np.concatenate([np.abs(tau[p]).ravel() for p in PATHS])
            if topk == "fusionbench":
                keep = ref_fusionbench_keep(flat, density)
            else:
                keep = ref_topk_keep(flat, int(density * flat.size))
            m, j = {}, 0
            for p in PATHS:
                n = tau[p].size
                m[p] = keep[j:j + n].reshape(tau[p].shape)
                j += n
        else:
            m = {}
            for p in PATHS:
                mag = np.abs(tau[p])
                if topk == "fusionbench":
                    m[p] = ref_fusionbench_keep(mag.ravel(), density).reshape(mag.shape)
                else:
                    m[p] = ref_topk_keep(mag, int(density * mag.size))
        masks.append(m)
    return masks


def ref_ties(b, xs, *, density, scope, topk, elect, disjoint, weights=None, scale=1.0):
    w = [1.0] * len(xs) if weights is None else list(weights)
    taus = taus_of(b, xs)
    masks = ref_magnitude_masks(taus, density, scope, topk)
    out = {}
    for p in PATHS:
        d = [wk * np.where(m[p], t[p], 0.0) for wk, t, m in zip(w, taus, masks)]
        out[p] = b[p] + scale * ref_combine(d, w, elect, disjoint)
    return out


def ref_breadcrumbs_mask(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = tau.size
    kept, top = int(density * n), int(gamma * n)
    if top + kept > n:
        top = n - kept
    order = np.argsort(-np.abs(tau.ravel()), kind="stable")  # descending magnitude
    keep = np.zeros(n, bool)
    keep[order[top:top + kept]] = True  # ranks top+1 .. top+kept
    return keep.reshape(tau.shape)


def ref_breadcrumbs(b, xs, *, density, gamma, weights, scale, elect="none", disjoint="sum"):
    taus = taus_of(b, xs)
    out = {}
    for p in PATHS:
        d = [wk * np.where(ref_breadcrumbs_mask(t[p], density, gamma), t[p], 0.0)
             for wk, t in zip(weights, taus)]
        out[p] = b[p] + scale * ref_combine(d, weights, elect, disjoint)
    return out


def ref_magmax(b, xs, scale):
    taus = taus_of(b, xs)
    out = {}
    for p in PATHS:
        cur = taus[0][p]
        for t in taus[1:]:
            cur = np.where(np.abs(t[p]) >= np.abs(cur), t[p], cur)  # later task wins ties
        out[p] = b[p] + scale * cur
    return out


def ref_sce(b, xs, density, scale):
    out = {}
    for p in PATHS:
        taus = [x[p] - b[p] for x in xs]
        if density < 1:
            var = np.var(np.stack(taus), axis=0)  # population variance over models
            k = int(density * np.count_nonzero(var))
            keep = (np.zeros(var.shape, bool) if k == 0
                    else var >= np.sort(var.ravel())[::-1][k - 1])
            taus = [np.where(keep, t, 0.0) for t in taus]
        w = np.array([np.mean(t * t) for t in taus])
        w = np.full(len(taus), 1.0 / len(taus)) if w.sum() < 1e-6 else w / w.sum()
        s = np.where(sum(taus) >= 0, 1.0, -1.0)
        agree = [np.sign(t) == s for t in taus]
        num = sum(np.where(a, wk * t, 0.0) for a, wk, t in zip(agree, w, taus))
        div = sum(np.where(a, wk, 0.0) for a, wk in zip(agree, w))
        out[p] = b[p] + scale * num / np.maximum(div, 1e-6)
    return out


def ref_mtl_vector(b, xs, merged, density=0.2, scope="global"):
    """TALL / consensus multi-task vector: plain sum, or unscaled TIES (FusionBench top-k,
    sign of the sum, disjoint sum)."""
    if merged == "task_arithmetic":
        taus = taus_of(b, xs)
        return {p: sum(t[p] for t in taus) for p in PATHS}
    tied = ref_ties(b, xs, density=density, scope=scope, topk="fusionbench", elect="mass",
                    disjoint="sum")
    return {p: tied[p] - b[p] for p in PATHS}


def ref_tall_masks(b, xs, vector, lambdas):
    taus = taus_of(b, xs)
    return [{p: np.abs(t[p]) > lam * np.abs(vector[p] - t[p]) for p in PATHS}
            for t, lam in zip(taus, lambdas)]


def ref_consensus(b, xs, *, merged, scale, mask_lambda, min_agree, density=0.2,
                  scope="global"):
    vector = ref_mtl_vector(b, xs, merged, density, scope)
    masks = ref_tall_masks(b, xs, vector, [mask_lambda] * len(xs))
    return {p: b[p] + scale * np.where(sum(m[p].astype(int) for m in masks) >= min_agree,
                                       vector[p], 0.0) for p in PATHS}


def ref_emr(b, xs, rescale_sum):
    """EMR: (unified vector, masks, rescalers)."""
    taus = taus_of(b, xs)
    unified, masks = {}, [dict() for _ in xs]
    for p in PATHS:
        g = np.where(sum(t[p] for t in taus) > 0, 1.0, -1.0)  # zero sum -> -1
        eps = np.zeros_like(g)
        for i, t in enumerate(taus):
            masks[i][p] = t[p] * g > 0
            eps = np.maximum(eps, np.where(masks[i][p], np.abs(t[p]), 0.0))
        unified[p] = eps * g
    red = np.mean if rescale_sum == "tensor_means" else np.sum
    lam = [sum(red(np.abs(t[p])) for p in PATHS)
           / sum(red(np.abs(np.where(m[p], unified[p], 0.0))) for p in PATHS)
           for t, m in zip(taus, masks)]
    return unified, masks, lam


def _minmax_rows(v):
    mn, mx = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    span = mx - mn
    return np.where(span > 0, (v - mn) / np.where(span > 0, span, 1.0), 0.0)


def ref_pcb_rows(x: np.ndarray, lam, density: float, clip: float) -> np.ndarray:
    """Official PCB_merge on a (T, D) matrix of flat task vectors."""
    t, d = x.shape
    s = np.sort(np.abs(x), axis=1)
    lo, hi = s[:, int(d * clip)], s[:, int(d * (1 - clip) - 1)]
    a = np.clip(np.abs(x), lo[:, None], hi[:, None])
    clamped = np.sign(x) * a
    intra = np.exp(t * _minmax_rows(a) ** 2)
    inter = np.tanh(x * x.sum(axis=0))
    bal = intra * inter
    sb = np.sort(bal, axis=1)
    lo_b, hi_b = sb[:, int(d * (1 - density))], sb[:, int(d * (1 - 0.0) - 1)]
    scores = _minmax_rows(np.clip(bal, lo_b[:, None], hi_b[:, None]))
    return (np.asarray(lam)[:, None] * clamped * scores).sum(0) / np.maximum(
        scores.sum(0), 1e-12)


def ref_pcb(b, xs, *, density, clip, scope, weights, scale):
    taus = taus_of(b, xs)
    out = {}
    if scope == "global":
        x = np.stack([np.concatenate([t[p].ravel() for p in PATHS]) for t in taus])
        merged, j = ref_pcb_rows(x, weights, density, clip), 0
        for p in PATHS:
            n = b[p].size
            out[p] = b[p] + scale * merged[j:j + n].reshape(b[p].shape)
            j += n
    else:
        for p in PATHS:
            x = np.stack([t[p].ravel() for t in taus])
            out[p] = b[p] + scale * ref_pcb_rows(x, weights, density, clip).reshape(b[p].shape)
    return out


def _zscore_rows(v):
    """Per-row z-score (unbiased std); a constant row (0/0) scores 0, as documented."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one-column block: ddof 1 of 1
        z = (v - v.mean(axis=1, keepdims=True)) / v.std(axis=1, ddof=1, keepdims=True)
    return np.nan_to_num(z, nan=0.0)


def ref_tailor_mask(tau, ft, density, block, sw, axis):
    if tau.ndim < 2:
        moved_shape, rows, frows = None, tau.reshape(1, -1), ft.reshape(1, -1)
    else:
        moved = np.moveaxis(tau, axis, -1)
        moved_shape = moved.shape
        rows = moved.reshape(-1, moved.shape[-1])
        frows = np.moveaxis(ft, axis, -1).reshape(rows.shape)
    keep = np.zeros(rows.shape, bool)
    for j in range(0, rows.shape[1], block):
        a, s = np.abs(rows[:, j:j + block]), frows[:, j:j + block] ** 2
        score = sw * _zscore_rows(a) + (1 - sw) * _zscore_rows(s)
        thr = np.sort(score.ravel())[int(score.size * (1 - density))]
        keep[:, j:j + block] = score > thr
    if moved_shape is None:
        return keep.reshape(tau.shape)
    return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def ref_model_tailor(b, xs, *, density, block, sw, axis, weights, scale):
    out = {}
    for p in PATHS:
        total = sum(wk * np.where(ref_tailor_mask(x[p] - b[p], x[p], density, block, sw, axis),
                                  x[p] - b[p], 0.0) for wk, x in zip(weights, xs))
        out[p] = b[p] + scale * total
    return out


def ref_stitch(b, xs, masks):
    out = {}
    for p in PATHS:
        total = sum(np.where(m[p], x[p] - b[p], 0.0) for x, m in zip(xs, masks))
        count = sum(m[p].astype(float) for m in masks)
        out[p] = b[p] + total / np.maximum(count, 1.0)
    return out


def ref_localize_stitch(b, xs, density, scope):
    masks = ref_magnitude_masks(taus_of(b, xs), density, scope, "mergekit")
    return ref_stitch(b, xs, masks)


def np_mask(key, path, p, shape, k) -> np.ndarray:
    """The documented mask of task k at ``path``."""
    return np.asarray(stages.bernoulli_mask(mergejax.leaf_key(key, path), p, shape, stream=k))


def np_magprune(tau: np.ndarray, density, epsilon, axis) -> np.ndarray:
    """mergejax's keep probabilities (for building masks; checked separately below)."""
    return np.asarray(stages.magprune_probabilities(jnp.asarray(tau, jnp.float32), density,
                                                    epsilon, axis), np.float64)


def ref_rescale(t, m, how, p):
    masked = np.where(m, t, 0.0)
    if how == "none":
        return masked
    if how == "density":
        return masked / p
    before, after = np.sum(np.abs(t)), np.sum(np.abs(masked))
    return masked if (before < 1e-7 or after < 1e-7) else masked * (before / after)


def ref_random(b, xs, key, *, sparsify, density, rescale="density", epsilon=0.15,
               rank_axis=-1, weights=None, scale=1.0, elect="none", disjoint="mean",
               normalize=False, q=None):
    w = [1.0] * len(xs) if weights is None else list(weights)
    taus = taus_of(b, xs)
    out = {}
    for p in PATHS:
        d = []
        for k, t in enumerate(taus):
            prob = (density if sparsify == "random"
                    else np_magprune(t[p], density, epsilon, rank_axis))
            m = np_mask(key, p, prob, t[p].shape, k)
            kept = np.where(m, t[p], 0.0) / q if q is not None else ref_rescale(
                t[p], m, rescale, prob)
            d.append(w[k] * kept)
        out[p] = b[p] + scale * ref_combine(d, w, elect, disjoint, normalize)
    return out


def ref_task_arithmetic(b, xs, w, scale):
    return {p: b[p] + scale * sum(wk * (x[p] - b[p]) for wk, x in zip(w, xs)) for p in PATHS}


# ------------------------------------------------------------- thresholds (stages)

THRESHOLD_SIZES = [1, 64, 2**18, 2**18 + 1]


def _values(rng, kind: str, n: int) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "duplicates":
        x = rng.integers(-3, 4, size=n).astype(float)  # zeros, negatives, many ties
    elif kind == "zeros":
        x = np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n))
        x[rng.random(n) < 0.3] = -0.0
    elif kind == "wide":
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, size=n)
    else:  # "negative"
        x = -np.abs(rng.standard_normal(n)) - 1.0
    return x.astype(np.float32)


_select = jax.jit(stages.select_thresholds, static_argnums=1)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from(THRESHOLD_SIZES),
       kinds=st.tuples(*[st.sampled_from(["normal", "duplicates", "zeros", "wide",
                                          "negative"])] * 2))
def test_select_thresholds_matches_sort(seed, n, kinds):
    rng = np.random.default_rng(seed)
    xs = [_values(rng, kind, n) for kind in kinds]
    ranks = (0, 1, max(1, n // 3), n, n + 1)  # fixed per size: one compile per size
    got = np.asarray(_select(tuple(jnp.asarray(x) for x in xs), ranks))
    assert got.shape == (len(ranks), 2)
    for j, x in enumerate(xs):
        for i, r in enumerate(ranks):
            assert got[i, j] == ref_kth_largest(x.astype(np.float64), r), (r, kinds[j])


_kth_traced = jax.jit(stages.kth_largest)


def ref_window_histogram(keys: np.ndarray, start: int, width: int, shift: int = 0
                         ) -> np.ndarray:
    """Counts of the keys in [start << 16, (start + width) << 16) in bins of 2**shift
    keys (`_FINE` bins), then the count above."""
    first, span = start << 16, width << 16
    keys = keys.astype(np.int64)
    inside = (keys[(keys >= first) & (keys < first + span)] - first) >> shift
    hist = np.bincount(inside, minlength=stages._FINE + 1)  # noqa: SLF001
    hist[stages._FINE] = np.sum(keys >= first + span)  # noqa: SLF001
    return hist


#: The row pass (large leaves) and the every-key pass (small ones) count the same.
WINDOW_PASSES = {
    "rows": jax.jit(stages._window_histograms, static_argnums=2),  # noqa: SLF001
    "every_key": jax.jit(stages._every_key_window_histograms, static_argnums=2),  # noqa: SLF001
}


def _reverse(inputs):
    return inputs[::-1]


@pytest.mark.parametrize("triangular", [True, False])
@pytest.mark.parametrize("bins", [200, 300, 65536, 262144])
def test_select_bin_finds_the_bin_of_each_rank(bins, triangular, monkeypatch):
    """`_select_bin` (one level up to 256 bins or off the block size, else a level per
    block of 256: two for 65536 bins, three for 262144), with CPU's triangular products
    and with the cumsums of other backends, against a NumPy count from the top: the bin
    holding the rank-th largest entry and the rank inside it, for ranks from 1 to the
    total."""
    monkeypatch.setattr(stages, "_triangular_sums", lambda: triangular)
    rng = np.random.default_rng(bins)
    hist = np.where(rng.random((3, bins)) < 0.01, rng.integers(1, 9, (3, bins)), 0)
    hist[1, :] = 0
    hist[1, 17] = 5  # all of one row in one bin
    totals = hist.sum(axis=1)
    ranks = np.stack([rng.integers(1, t + 1, 40) for t in totals], axis=1)  # (40, 3)
    ranks[0] = totals  # the smallest entry
    ranks[1] = 1  # the largest
    select = lambda h, r: stages._select_bin(h, r)  # noqa: E731, SLF001 (a fresh trace)
    got_bin, got_rank = jax.jit(select)(
        jnp.asarray(np.broadcast_to(hist, (40, 3, bins)), jnp.int32), jnp.asarray(ranks))
    for i in range(40):
        for j in range(3):
            at_or_above = np.cumsum(hist[j, ::-1])[::-1]
            b = np.flatnonzero(at_or_above >= ranks[i, j]).max()
            assert (int(got_bin[i, j]), int(got_rank[i, j])) == (
                b, ranks[i, j] - (at_or_above[b] - hist[j, b]))


@pytest.mark.parametrize("triangular", [True, False])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1025, 40000])
def test_exclusive_prefix_matches_numpy(n, triangular, monkeypatch):
    """The prefix sums (CPU's recursive blockwise products, or cumsum) against NumPy's,
    for 0/1 flags and counts."""
    monkeypatch.setattr(stages, "_triangular_sums", lambda: triangular)
    rng = np.random.default_rng(n)
    for flags in (rng.random(n) < 0.3, rng.integers(0, 1000, n)):
        prefix = lambda f: stages._exclusive_prefix(f)  # noqa: E731, SLF001 (a fresh trace)
        got = jax.jit(prefix)(jnp.asarray(flags, jnp.int32))
        expected = np.cumsum(flags) - flags
        np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("size", [4, 5000])
def test_small_and_radix_selections_rank_negative_zero_below_zero(size):
    """Up to 2**12 entries `select_thresholds` and `kth_largest` (also with a traced rank)
    sort order keys, above it they histogram them: both rank -0.0 below 0.0 (a float sort
    holds them equal and keeps their order)."""
    x = np.full(size, 7.0, np.float32)
    x[:4] = [3.0, 0.0, -0.0, 1.0]
    got = np.asarray(stages.select_thresholds((jnp.asarray(x),), (size - 1, size)))[:, 0]
    assert got[0] == 0.0 and not np.signbit(got[0])  # the second smallest: 0.0
    assert got[1] == 0.0 and np.signbit(got[1])  # the smallest: -0.0
    traced = jax.jit(stages.kth_largest)(jnp.asarray(x), jnp.int32(size))  # traced rank
    assert traced == 0.0 and np.signbit(traced)


def _window_case_keys(case: str, n: int, start: int, width: int, seed: int) -> np.ndarray:
    """Order keys of non-negative floats (none inside the window), then the case's keys
    inside it."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0x8000 << 16, 0xB000 << 16, size=n, dtype=np.int64)
    in_window = lambda k: ((k >> 16) >= start) & ((k >> 16) < start + width)  # noqa: E731
    keys = np.where(in_window(keys), keys + (4 << 16), keys)  # none inside yet
    if case == "sparse":  # ~0.2% of keys inside, one of them in row 0
        pick = rng.random(n) < 0.002
        pick[3] = True
        keys[pick] = rng.integers(start << 16, (start + width) << 16, size=pick.sum())
    elif case == "dense":  # a key inside in every row
        keys[::7] = (start << 16) + 5
    elif case == "padded_at_zero":  # the window holds 0.0, the padding's value
        pick = rng.random(n) < 0.002
        pick[-1] = True  # the padded last row is a candidate
        keys[pick] = rng.integers(start << 16, (start + 2) << 16, size=pick.sum())
    return keys


@pytest.mark.parametrize("window_pass", sorted(WINDOW_PASSES))
@pytest.mark.parametrize("case", ["sparse", "dense", "padded_at_zero", "empty"])
def test_window_histograms_count_the_candidate_rows_exactly(case, window_pass):
    """The window pass histograms only the rows holding a key in the window, in chunks of
    candidate rows; for two tasks with their own windows it equals a NumPy histogram
    whether the candidates fill part of one chunk (with row 0 a candidate, which the
    unused slots of a chunk point at), many chunks (a key inside in every row), none, or
    sit where the padding is (a size that is not a multiple of the row, with the window
    holding 0.0, the value of the padding). The values come from the inputs through a
    function of them, as the model-wide pass gives them."""
    n = 32 * 5000 + (13 if case == "padded_at_zero" else 0)
    # In the padded case, task 1's window holds negative floats: the padding (0.0) is
    # above it but must not count.
    windows = ([(0x8000, 2), (0x7F00, 1)] if case == "padded_at_zero"
               else [(0x9000, 3), (0x9100, 4)])
    keys = [_window_case_keys(case, n, start, width, seed)
            for seed, (start, width) in enumerate(windows)]
    row = stages._ROW  # noqa: SLF001
    expected_chunks = {"sparse": (1, 1), "dense": (10, 10), "padded_at_zero": (1, 1),
                       "empty": (0, 0)}[case]
    for k, (start, width), want_chunks in zip(keys, windows, expected_chunks):
        inside = ((k >> 16) >= start) & ((k >> 16) < start + width)
        rows = np.pad(inside, (0, -n % row)).reshape(-1, row).any(axis=1)
        assert -(-rows.sum() // stages._CHUNK_ROWS) == want_chunks  # noqa: SLF001
    # The floats of the keys (the inverse of `order_key`).
    floats = [np.where(k >> 31 == 1, k & 0x7FFFFFFF, ~k & 0xFFFFFFFF).astype(np.uint32)
              .view(np.float32) for k in keys]
    want = np.stack([ref_window_histogram(k.astype(np.uint32), start, width)
                     for k, (start, width) in zip(keys, windows)])
    start_from = jnp.broadcast_to(jnp.arange(stages._FINE + 1, dtype=jnp.int32),  # noqa: SLF001
                                  want.shape)
    window = stages.high_bin_window(*(jnp.asarray([[w[i] for w in windows]], jnp.int32)
                                      for i in range(2)))
    # The values are the inputs in reverse order (no arithmetic: XLA:CPU flushes the
    # subnormal floats near 0.0 to zero).
    got = WINDOW_PASSES[window_pass](start_from, tuple(jnp.asarray(f) for f in floats[::-1]),
                                     _reverse, window)
    np.testing.assert_array_equal(np.asarray(got), want + np.asarray(start_from))


@pytest.mark.parametrize("window_pass", sorted(WINDOW_PASSES))
def test_window_histograms_bin_a_shifted_window(window_pass):
    """A window of 16 high bins in fine bins of 4 keys (shift 2), as `spread_window` gives
    for values with few distinct magnitudes, against a NumPy histogram."""
    n = 32 * 5000
    start, width, shift = 0x9000, 16, 2
    keys = _window_case_keys("sparse", n, start, width, 3)
    floats_ = np.where(keys >> 31 == 1, keys & 0x7FFFFFFF, ~keys & 0xFFFFFFFF).astype(
        np.uint32).view(np.float32)
    window = stages.high_bin_window(jnp.asarray([[start]]), jnp.asarray([[width]]))
    window = window._replace(shift=jnp.asarray([[shift]], jnp.uint32))
    got = WINDOW_PASSES[window_pass](None, (jnp.asarray(floats_),), stages._identity,  # noqa: SLF001
                                     window)
    want = ref_window_histogram(keys.astype(np.uint32), start, width, shift)
    assert want[:stages._FINE].sum() > 0  # noqa: SLF001
    np.testing.assert_array_equal(np.asarray(got)[0], want)


def _ulp_deltas(seed: int, k: int = 1, shape=(1024, 512)):
    """bfloat16 weights and k fine-tunes that moved them by about one ulp: |tau| takes few
    distinct values, most high bins near a rank are empty."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    models = [(base + 0.01 * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)
              for _ in range(k)]
    return base.astype(ml_dtypes.bfloat16), models


def _ulp_magnitudes(inputs):
    """|base - x| (float32) from bfloat16 ``(base, x)``, with the low bits of a third
    input (uint32, 0 for none) set in the nonzero ones."""
    base, x, low = inputs
    mags = jnp.abs(base.astype(jnp.float32) - x.astype(jnp.float32))
    bits = lax.bitcast_convert_type(mags, jnp.uint32)
    return (lax.bitcast_convert_type(jnp.where(mags > 0, bits | low, bits), jnp.float32),)


@pytest.mark.parametrize("seed,jitter", [(0, False), (3, True),
                                         pytest.param(1, False, marks=pytest.mark.slow),
                                         pytest.param(4, True, marks=pytest.mark.slow)])
def test_select_thresholds_is_exact_where_few_distinct_values_need_a_wide_window(seed,
                                                                              jitter):
    """These bfloat16 leaves' ranks missed a 4-bin window (and fell back to the radix
    passes): the spread window holds them in wider, shifted bins, the refinement pass gives
    the exact value, no fallback. Differences of bfloat16 values are the first key of
    their fine bin; ``jitter`` sets random low bits, so that only the refinement finds
    the key."""
    base, (model,) = _ulp_deltas(seed)
    low = np.random.default_rng(seed).integers(0, 8 if jitter else 1, base.shape,
                                               dtype=np.uint32)
    inputs = (jnp.asarray(base), jnp.asarray(model), jnp.asarray(low))
    values = _ulp_magnitudes(inputs)
    n = values[0].size
    ranks = (n // 5, n // 2)
    found, window = _sampled_window(values, ranks, inputs)
    assert int(jnp.max(window.shift)) > 0
    assert found
    got = np.asarray(jax.jit(lambda ins: stages.select_thresholds(ins, ranks,
                                                                  _ulp_magnitudes))(inputs))
    np.testing.assert_array_equal(
        got[:, 0], [ref_kth_largest(np.asarray(values[0], np.float64), r) for r in ranks])


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_on_bfloat16_leaves_reads_the_stored_inputs(scope):
    """bfloat16 leaves over the sample size take the sampled window reading the stored
    inputs (`as_stored`): the result is the float32 merge of the same values rounded to
    bfloat16, bit for bit, and the NumPy reference's within bfloat16's rounding."""
    base, models = _ulp_deltas(7, k=2)
    kw = dict(density=0.2, scope=scope, topk="mergekit")
    got = jax.jit(lambda b, ms: mergejax.ties(b, ms, **kw))(
        {"w": jnp.asarray(base)}, [{"w": jnp.asarray(m)} for m in models])["w"]
    assert got.dtype == jnp.bfloat16
    wide = jax.jit(lambda b, ms: mergejax.ties(b, ms, **kw))(
        {"w": jnp.asarray(base, jnp.float32)},
        [{"w": jnp.asarray(m, jnp.float32)} for m in models])["w"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(wide.astype(jnp.bfloat16)))
    b = base.astype(np.float64)
    taus = [m.astype(np.float64) - b for m in models]
    kept = [np.where(ref_topk_keep(np.abs(t), int(0.2 * t.size)), t, 0.0) for t in taus]
    expected = b + ref_combine(kept, [1.0, 1.0], "mass", "mean")
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=8e-3, atol=1e-6)


def test_as_stored_casts_back_exactly_and_upcasts_again():
    base, (model,) = _ulp_deltas(2, shape=(5, 3))
    up = (jnp.asarray(base, jnp.float32), jnp.asarray(model, jnp.float32))
    ctx = method_lib.LeafContext("w", None, (), 15, jnp.dtype(jnp.bfloat16))
    stored, upcast = method_lib.as_stored(ctx, up)
    assert [x.dtype for x in stored] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_array_equal(np.asarray(stored[1]), model)
    again = upcast(stored)
    assert [x.dtype for x in again] == [jnp.float32, jnp.float32]
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(up[0]))
    same, identity = method_lib.as_stored(ctx._replace(stored_dtype=None), up)
    assert same[0] is up[0] and identity(same)[1] is up[1]


@settings(max_examples=16, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 5, 64, 2**18 + 1]),
       kind=st.sampled_from(["normal", "duplicates", "zeros", "wide", "negative"]),
       data=st.data())
def test_kth_largest_traced_rank_matches_sort(seed, n, kind, data):
    x = _values(np.random.default_rng(seed), kind, n)
    r = data.draw(st.one_of(st.sampled_from([0, 1, n, n + 1, -3]), st.integers(1, n)))
    got = float(_kth_traced(jnp.asarray(x), jnp.int32(r)))
    assert got == ref_kth_largest(x.astype(np.float64), r)


@pytest.mark.parametrize("n,rank", [(1, 1), (7, 0), (7, 3), (7, 7), (7, 8), (1000, 250)])
def test_kth_largest_and_magnitude_threshold_static_ranks(n, rank):
    x = _values(np.random.default_rng(n + rank), "duplicates" if n == 1000 else "normal", n)
    assert float(stages.kth_largest(jnp.asarray(x), rank)) == ref_kth_largest(
        x.astype(np.float64), rank)
    mag = np.abs(x.astype(np.float64))
    th = stages.magnitude_threshold(jnp.asarray(x), rank)
    assert float(th) == ref_kth_largest(mag, rank)
    np.testing.assert_array_equal(np.asarray(stages.topk_mask(jnp.asarray(x), rank)),
                                  ref_topk_keep(mag, rank))


def _sampled_window(values, ranks, inputs=None):
    """``(found, window)``: the per-tensor sampled window of ``values`` (computed from
    ``inputs``, by default the values themselves) and whether it holds every rank (False:
    the exact fallback runs), as `select_thresholds` computes them."""
    n = values[0].size
    sample = stages._histograms(None, values, stages._identity,  # noqa: SLF001
                                stages._high_bins, stages._BINS,  # noqa: SLF001
                                stride=stages.sample_stride(n))
    max_shift = stages._window_max_shift(values if inputs is None else inputs)  # noqa: SLF001
    window = stages.spread_window(sample, stages.rank_fractions(ranks, n), max_shift)
    hist = stages._window_histograms(None, values, stages._identity, window)  # noqa: SLF001
    return bool(jnp.all(stages.window_thresholds(hist, window, ranks)[1])), window


def _model_magnitudes(inputs):
    """|base - x_k| in float32 from ``(base, *models)`` (module level: the chunked passes
    are compiled once for it)."""
    base, *models = inputs
    return tuple(jnp.abs(base.astype(jnp.float32) - x.astype(jnp.float32)) for x in models)


def _negated_magnitudes(inputs):
    """-|base - x_k|: the padding's zeros would rank first if they were counted."""
    return tuple(-m for m in _model_magnitudes(inputs))


@pytest.mark.parametrize("case", ["window", "refined", "radix", "missed", "negated",
                                  "negated_radix"])
def test_chunked_thresholds_match_sort(case, monkeypatch):
    """`chunked_thresholds` over chunks of 2**16 entries (the last one padded): NumPy's
    ranked values through each path: the float32 window, the bfloat16 window refined, the
    radix passes of a tensor of up to 2**18 entries, and those of a missed window; the
    padding is not counted (negated magnitudes rank its zeros first)."""
    monkeypatch.setattr(stages, "CHUNK", 1 << 16)
    rng = np.random.default_rng(7)
    if case == "refined":
        base, models = _ulp_deltas(0, k=2, shape=(1021, 517))
        inputs = [base.reshape(-1)] + [x.reshape(-1) for x in models]
    else:
        n = 70_001 if case.endswith("radix") else 300_001
        base = rng.standard_normal(n).astype(np.float32)
        inputs = [base] + [base + rng.standard_normal(n).astype(np.float32) * s
                           for s in (0.01, 1.0)]
    n = inputs[0].size
    ranks = (0, 1, n // 5, n // 2, n, n + 1)
    if case == "missed":  # a window of the lowest keys: every magnitude lies above it
        monkeypatch.setattr(stages, "_chunk_spread_window", lambda h, f, s: stages.Window(
            *(jnp.zeros(f.shape + (2,), jnp.uint32) + v for v in (0, 1 << 16, 0))))
    refines = spy(monkeypatch, stages, "_chunk_refined_window")
    radix = spy(monkeypatch, stages, "_chunk_low")
    chunks = stages.cut_chunks(inputs)
    assert len(chunks.chunks) == -(-n // (1 << 16)) and 0 < chunks.valid[-1] < 1 << 16
    negated = case.startswith("negated")
    got = stages.chunked_thresholds(chunks, ranks, _negated_magnitudes if negated
                                    else _model_magnitudes)
    assert got.shape == (len(ranks), 2) and got.dtype == np.float32
    for k, x in enumerate(inputs[1:]):
        mags = np.abs(inputs[0].astype(np.float32) - x.astype(np.float32)).astype(np.float64)
        values = -mags if negated else mags
        np.testing.assert_array_equal(got[:, k], [ref_kth_largest(values, r) for r in ranks])
    assert (len(refines) > 0) == (case == "refined")
    assert (len(radix) > 0) == (case in ("radix", "missed", "negated_radix"))


def test_chunked_thresholds_reject_float64():
    x = np.zeros(300_000, np.float64)
    with x64(), pytest.raises(MergeError, match="float64"):
        stages.chunked_thresholds(stages.cut_chunks([x, x]), (10,), _float64_magnitudes)


def _float64_magnitudes(inputs):
    base, *models = inputs
    return tuple(jnp.abs(base - x) for x in models)


@pytest.mark.parametrize("huge", [1e30, -1e30])
def test_select_thresholds_misleading_sample_falls_back_to_exact(huge):
    n = 2**19 + 3
    stride = stages.sample_stride(n)
    assert stride == 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    x[::stride] = huge  # the strided sample sees nothing but the huge value
    ranks = (n // 4, 3 * n // 4)
    values = (jnp.asarray(x),)
    assert not _sampled_window(values, ranks)[0]  # the layout does mislead the sample
    got = np.asarray(_select(values, ranks))[:, 0]
    np.testing.assert_array_equal(got, [ref_kth_largest(x.astype(np.float64), r)
                                        for r in ranks])
    # A benign layout of the same size takes the window path, same answers as a sort.
    y = rng.standard_normal(n).astype(np.float32)
    assert _sampled_window((jnp.asarray(y),), ranks)[0]
    np.testing.assert_array_equal(np.asarray(_select((jnp.asarray(y),), ranks))[:, 0],
                                  [ref_kth_largest(y.astype(np.float64), r) for r in ranks])


def test_global_scope_sorts_a_small_model_and_histograms_a_large_one():
    """A whole-model program over at most `_GLOBAL_SORT_MAX` entries per task selects by one
    sort (compiles in a fraction of the four histogram passes' time); a larger one, and a
    per-leaf merge of the small one, fold histograms. Both give the same bits."""
    base, models = dyadic(3, 2, zeros=0.2)
    program = str(jax.make_jaxpr(lambda b, ms: mergejax.ties(b, ms, density=0.3))(
        base, models))
    assert " sort[" in program and "scatter-add" not in program
    whole = mergejax.ties(base, models, density=0.3)
    per_leaf = mergejax.ties(base, models, density=0.3, per_leaf=True)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(per_leaf)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    n = stages._GLOBAL_SORT_MAX + 1  # pylint: disable=protected-access
    big = str(jax.make_jaxpr(lambda b, ms: mergejax.ties(b, ms, density=0.3))(
        jnp.zeros(n), [jnp.ones(n)] * 2))
    assert "scatter-add" in big


@pytest.mark.parametrize("adversarial", [False, True])
def test_ties_global_scope_on_a_big_model(adversarial):
    """Model-wide top-k over > 2**18 entries (the four statistics passes): a benign layout
    takes the sampled window, the misleading one the exact fallback."""
    shapes = {"big": (1024, 520), "small": (7,)}
    total = 1024 * 520 + 7
    stride = stages.sample_stride(total)
    assert stride == 2
    rng = np.random.default_rng(1)
    b = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
    taus = []
    for _ in range(2):
        t = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
        if adversarial:
            t["big"].reshape(-1)[::stride] = 64.0  # the sample sees only the huge value
        taus.append(t)
    base = {p: jnp.asarray(v) for p, v in b.items()}
    models = [{p: jnp.asarray(b[p] + t[p]) for p in shapes} for t in taus]
    out = mergejax.ties(base, models, density=0.3)
    # Reference on the float32 task vectors (x - base rounded as float32, as ranked).
    f_taus = [{p: (np.asarray(models[k][p]) - b[p]).astype(np.float64) for p in shapes}
              for k in range(2)]
    kept = []
    for t in f_taus:
        flat = np.concatenate([np.abs(t[p]).ravel() for p in shapes])
        keep = ref_fusionbench_keep(flat, 0.3)
        kept.append({"big": keep[:-7].reshape(shapes["big"]), "small": keep[-7:]})
    for p in shapes:
        d = [np.where(k[p], t[p], 0.0) for k, t in zip(kept, f_taus)]
        np.testing.assert_allclose(np.asarray(out[p], np.float64),
                                   b[p] + ref_combine(d, [1.0, 1.0], "mass", "mean"),
                                   rtol=1e-6, atol=1e-6, err_msg=p)


def test_magnitude_threshold_float64_is_exact():
    """Under x64 the threshold of float64 values must be the exact r-th largest |x|."""
    with x64():
        x = np.random.default_rng(3).standard_normal(5000)
        for r in (1, 10, 30, 1234):
            th = stages.magnitude_threshold(jnp.asarray(x), r)
            assert int(np.sum(np.abs(x) >= np.asarray(th, np.float64))) == r


def test_ties_float64_global_is_a_clear_error():
    """Model-wide selection runs on float32 keys: float64 inputs are refused, not rounded."""
    with x64():
        base, models = gaussian(0, 2, jnp.float64)
        with pytest.raises(MergeError, match=r"float64 .*use scope='tensor'"):
            mergejax.ties(base, models, density=0.3, scope="global")


def test_ties_float64_tensor_matches_reference():
    with x64():
        base, models = gaussian(40, 2, jnp.float64)
        out = mergejax.ties(base, models, density=0.3, scope="tensor", topk="mergekit")
        expected = ref_ties(floats(base), [floats(m) for m in models], density=0.3,
                            scope="tensor", topk="mergekit", elect="mass", disjoint="mean")
        check_tree(out, expected, base, rtol=1e-10, atol=1e-11)


# ---------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("scope,topk,elect,disjoint", [
    ("global", "fusionbench", "mass", "mean"),
    ("global", "fusionbench", "count", "sum"),
    ("tensor", "mergekit", "mass", "mean"),
    ("tensor", "mergekit", "count", "sum"),
])
@pytest.mark.parametrize("weights,scale", [(None, 1.0), ([0.7, -0.4, 1.3], 0.6)])
def test_ties_matches_reference(scope, topk, elect, disjoint, weights, scale):
    base, models = dyadic(10, 3, zeros=0.1)
    out = mergejax.ties(base, models, density=0.3, scope=scope, topk=topk, elect=elect,
                        disjoint=disjoint, weights=weights, scale=scale)
    expected = ref_ties(floats(base), [floats(m) for m in models], density=0.3, scope=scope,
                        topk=topk, elect=elect, disjoint=disjoint, weights=weights,
                        scale=scale)
    check_tree(out, expected, base, **F32)


def test_ties_defaults_are_global_fusionbench_and_scopes_differ():
    base, models = dyadic(11, 3)
    xs = [floats(m) for m in models]
    kw = dict(density=0.2, elect="mass", disjoint="mean")
    check_tree(mergejax.ties(base, models),
               ref_ties(floats(base), xs, scope="global", topk="fusionbench", **kw), base,
               **F32)
    g = floats(mergejax.ties(base, models, density=0.3))
    t = floats(mergejax.ties(base, models, density=0.3, scope="tensor", topk="mergekit"))
    assert any(not np.allclose(g[p], t[p]) for p in PATHS)


def test_ties_zero_weighted_sum_elects_plus_and_empty_divisor_is_one():
    """mergekit: a zero weighted sum elects +1; where no task agrees the divisor is 1."""
    b = {p: np.zeros(s) for p, s in SHAPES.items()}
    t0 = {p: np.resize([0.5, -0.25, 0.0, 1.0], s) for p, s in SHAPES.items()}
    t1 = {p: np.resize([-0.5, 0.25, 0.0, 0.5], s) for p, s in SHAPES.items()}
    base = make_tree(b, 7)
    models = [make_tree(t0, 1), make_tree(t1, 2)]
    out = floats(mergejax.ties(base, models, density=1.0, scope="tensor", topk="mergekit"))
    for p in PATHS:
        want = np.resize([0.5, 0.25, 0.0, 0.75], SHAPES[p])  # +1 elected where sums cancel
        np.testing.assert_allclose(out[p], want, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- Breadcrumbs, MagMax


@pytest.mark.parametrize("density,gamma,with_ties", [(0.5, 0.1, True), (0.9, 0.2, False),
                                                    (0.3, 0.0, False)])
def test_breadcrumbs_matches_reference(density, gamma, with_ties):
    base, models = dyadic(12, 3)
    w, scale = [0.5, 1.5, -0.75], 0.8
    xs = [floats(m) for m in models]
    out = mergejax.breadcrumbs(base, models, density=density, gamma=gamma, weights=w,
                               scale=scale)
    check_tree(out, ref_breadcrumbs(floats(base), xs, density=density, gamma=gamma,
                                    weights=w, scale=scale), base, **F32)
    if not with_ties:
        return
    out = mergejax.breadcrumbs_ties(base, models, density=density, gamma=gamma, weights=w,
                                    scale=scale)
    check_tree(out, ref_breadcrumbs(floats(base), xs, density=density, gamma=gamma,
                                    weights=w, scale=scale, elect="mass", disjoint="sum"),
               base, **F32)


def test_breadcrumbs_drops_exactly_the_top_and_keeps_the_next():
    base, models = dyadic(13, 1)
    out = floats(mergejax.breadcrumbs(base, models, density=0.5, gamma=0.1))
    tau = taus_of(floats(base), [floats(models[0])])[0]
    for p in PATHS:
        n = tau[p].size
        kept = (out[p] - floats(base)[p]) != 0
        assert kept.sum() == int(0.5 * n)
        assert not kept.ravel()[np.argmax(np.abs(tau[p]).ravel())] or int(0.1 * n) == 0


def test_magmax_matches_reference_and_later_task_wins_ties():
    b = {p: np.random.default_rng(14).integers(-8, 8, size=s) / 4.0 for p, s in SHAPES.items()}
    rng = np.random.default_rng(15)
    t0 = {p: rng.choice([-1.0, -0.5, 0.5, 1.0, 2.0], size=s) for p, s in SHAPES.items()}
    t1 = {p: -t0[p] * rng.choice([1.0, 0.5], size=s) for p, s in SHAPES.items()}  # ties
    t2 = {p: rng.choice([-0.25, 0.25, 3.0], size=s) for p, s in SHAPES.items()}
    base = make_tree(b, 7)
    models = [make_tree({p: b[p] + t[p] for p in PATHS}, i) for i, t in
              enumerate([t0, t1, t2])]
    xs = [floats(m) for m in models]
    check_tree(mergejax.magmax(base, models, scale=0.5), ref_magmax(b, xs, 0.5), base, **F32)
    out = floats(mergejax.magmax(base, models[:2]))
    for p in PATHS:
        tie = np.abs(t1[p]) == np.abs(t0[p])
        assert tie.any()
        np.testing.assert_array_equal(out[p][tie] - b[p][tie], t1[p][tie])


# --------------------------------------------------------------------------- SCE


@pytest.mark.parametrize("density,scale", [(1.0, 1.0), (0.4, 0.7), (0.05, 1.0)])
def test_sce_matches_reference(density, scale):
    base, models = dyadic(16, 3, zeros=0.15)
    b = floats(base)
    # Entries where every model agrees have zero variance (not counted by select_topk).
    same = {p: np.random.default_rng(17).random(s) < 0.3 for p, s in SHAPES.items()}
    x0 = floats(models[0])
    models = [make_tree({p: np.where(same[p], x0[p], floats(m)[p]) for p in PATHS}, 100 + i)
              for i, m in enumerate(models)]
    out = mergejax.sce(base, models, density=density, scale=scale)
    check_tree(out, ref_sce(b, [floats(m) for m in models], density, scale), base, **F32)


# --------------------------------------------------------- consensus and TALL masks


@pytest.mark.parametrize("merged,scope", [("task_arithmetic", "global"), ("ties", "global"),
                                          ("ties", "tensor")])
@pytest.mark.parametrize("min_agree", [1, 2])
def test_consensus_matches_reference(merged, scope, min_agree):
    base, models = dyadic(18, 4)
    out = mergejax.consensus(base, models, merged=merged, scope=scope, density=0.3,
                             min_agree=min_agree, mask_lambda=0.5, scale=0.4)
    check_tree(out, ref_consensus(floats(base), [floats(m) for m in models], merged=merged,
                                  scale=0.4, mask_lambda=0.5, min_agree=min_agree,
                                  density=0.3, scope=scope), base, **F32)


@pytest.mark.parametrize("merged", ["task_arithmetic", "ties"])
def test_tall_masks_task_models_match_reference(merged):
    base, models = dyadic(19, 3)
    lambdas = [0.2, 0.4, 0.6]
    result = mergejax.tall_masks(base, models, mask_lambda=lambdas, merged=merged,
                                 density=0.3)
    b, xs = floats(base), [floats(m) for m in models]
    vector = ref_mtl_vector(b, xs, merged, 0.3, "global")
    masks = ref_tall_masks(b, xs, vector, lambdas)
    assert result.num_tasks == 3
    for t in range(3):
        check_tree(result.task_model(t),
                   {p: b[p] + np.where(masks[t][p], vector[p], 0.0) for p in PATHS},
                   base, **F32)
        got_mask = dict(walk(result.mask(t)))
        for p in PATHS:
            np.testing.assert_array_equal(np.asarray(got_mask[p]), masks[t][p])
    # One lambda for all tasks.
    single = mergejax.tall_masks(base, models, mask_lambda=0.4, merged=merged, density=0.3)
    masks = ref_tall_masks(b, xs, vector, [0.4] * 3)
    check_tree(single.task_model(2), {p: b[p] + np.where(masks[2][p], vector[p], 0.0)
                                      for p in PATHS}, base, **F32)


# --------------------------------------------------------------------------- EMR


@pytest.mark.parametrize("rescale_sum", ["tensor_means", "entries"])
def test_emr_task_models_match_reference(rescale_sum):
    base, models = dyadic(20, 3, zeros=0.1)
    # A few entries whose task values sum to exactly 0 (elect -1).
    b = floats(base)
    xs = [floats(m) for m in models]
    xs[1]["dense/bias"][:2] = b["dense/bias"][:2] - (xs[0]["dense/bias"][:2]
                                                     - b["dense/bias"][:2])
    xs[2]["dense/bias"][:2] = b["dense/bias"][:2]
    models = [make_tree(x, 100 + i) for i, x in enumerate(xs)]
    result = mergejax.emr(base, models, rescale_sum=rescale_sum)
    unified, masks, lam = ref_emr(b, xs, rescale_sum)
    np.testing.assert_allclose(np.asarray(result.rescalers), lam, rtol=1e-5)
    for t in range(3):
        check_tree(result.task_model(t), {p: b[p] + lam[t] * np.where(masks[t][p],
                                                                      unified[p], 0.0)
                                          for p in PATHS}, base, rtol=2e-5, atol=2e-5)
    lam_other = ref_emr(b, xs, "entries" if rescale_sum == "tensor_means"
                        else "tensor_means")[2]
    assert not np.allclose(lam, lam_other, rtol=1e-3)  # the two modes are distinguishable


def test_emr_compiles_once_per_leaf_shape_and_once_for_every_task_model():
    """Six layers of two shapes: two leaf compiles (not one program over every leaf), and
    one task-model compile serves every task."""
    from mergejax.methods import masking  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(3)
    layers = lambda: {f"layer_{i}": {"kernel": rng.normal(size=(7, 5)).astype(np.float32),  # noqa: E731
                                     "bias": rng.normal(size=(5,)).astype(np.float32)}
                      for i in range(6)}
    base, models = layers(), [layers() for _ in range(3)]
    masking._modulated_leaf.clear_cache()  # pylint: disable=protected-access
    masking._task_model.clear_cache()  # pylint: disable=protected-access
    result = mergejax.emr(base, models)
    assert masking._modulated_leaf._cache_size() == 2  # pylint: disable=protected-access
    for t in range(3):
        tau = {p: models[t][p]["kernel"] - base[p]["kernel"] for p in base}
        got = result.task_model(t)
        for p in base:  # the task model keeps only entries that agree with the elected sign
            kept = np.asarray(got[p]["kernel"]) != base[p]["kernel"]
            assert np.all(np.sign(np.asarray(got[p]["kernel"]) - base[p]["kernel"])[kept]
                          == np.sign(tau[p])[kept])
    assert masking._task_model._cache_size() == 1  # pylint: disable=protected-access


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_emr_one_task_gives_back_that_model(seed):
    base, models = dyadic(seed, 1, zeros=0.2)
    result = mergejax.emr(base, models)
    check_tree(result.task_model(0), floats(models[0]), base, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- PCB


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_pcb_matches_official_pcb_merge(scope):
    base, models = gaussian(21, 3)
    w, scale = [1.2, 0.8, 1.0], 0.9
    out = mergejax.pcb(base, models, density=0.3, clip=0.05, scope=scope, weights=w,
                       scale=scale)
    check_tree(out, ref_pcb(floats(base), [floats(m) for m in models], density=0.3,
                            clip=0.05, scope=scope, weights=w, scale=scale), base,
               rtol=1e-4, atol=1e-5)


def test_pcb_global_finds_its_bounds_without_the_fallback_passes(monkeypatch):
    """On a model large enough for sampled windows (533k entries per task, sampled every
    2nd), PCB's score maximum comes from its own reduction, so no window misses and no
    radix fallback pass runs (a window around the sample's largest score missed the
    maximum); the merge still matches the official PCB_merge. (The sampled window of the
    score floor misses on some seeds, 5 and 10 here: see notes/STATUS.md.)"""
    rng = np.random.default_rng(7)
    shapes = {"kernel": (1024, 520), "bias": (1024,)}
    b = {p: rng.standard_normal(s) for p, s in shapes.items()}
    # Small task vectors, as fine-tunes': tanh(tau * sum tau) does not saturate, so the
    # largest score is one entry's, not a value many entries share.
    xs = [{p: b[p] + 1e-3 * rng.standard_normal(s) for p, s in shapes.items()}
          for _ in range(3)]
    found = []
    original = stages._window_found  # pylint: disable=protected-access
    monkeypatch.setattr(stages, "_window_found",
                        lambda window_pass: found.append(original(window_pass)) or found[-1])
    as_tree = lambda d: {p: jnp.asarray(v, jnp.float32) for p, v in d.items()}  # noqa: E731
    out = mergejax.pcb(as_tree(b), [as_tree(x) for x in xs], density=0.2, clip=0.05,
                       per_leaf=True)
    assert found == [True] * 4  # the fallback passes of the clip bounds and score floor
    flat = lambda d: np.concatenate([np.float32(d[p]).astype(np.float64).ravel()  # noqa: E731
                                     for p in sorted(shapes)])
    merged = ref_pcb_rows(np.stack([flat(x) - flat(b) for x in xs]), [1.0] * 3, 0.2, 0.05)
    got = np.concatenate([np.asarray(out[p], np.float64).ravel() for p in sorted(shapes)])
    np.testing.assert_allclose(got, flat(b) + merged, rtol=1e-4, atol=1e-5)


def test_pcb_global_and_tensor_differ():
    base, models = gaussian(21, 3)
    g = floats(mergejax.pcb(base, models, density=0.3, clip=0.05))
    t = floats(mergejax.pcb(base, models, density=0.3, clip=0.05, scope="tensor"))
    assert any(not np.allclose(g[p], t[p], rtol=1e-3) for p in PATHS)


# ------------------------------------------------------------------- Model Tailor


@pytest.mark.parametrize("density,block,sw,axis", [(0.1, 5, 0.8, -1), (0.3, 5, 0.5, 0),
                                                   (0.5, 128, 1.0, -1)])
def test_model_tailor_matches_data_free_reference(density, block, sw, axis):
    base, models = gaussian(22, 2)
    w, scale = [0.6, 1.4], 0.9
    out = mergejax.model_tailor(base, models, density=density, block_size=block,
                                salience_weight=sw, axis=axis, weights=w, scale=scale)
    check_tree(out, ref_model_tailor(floats(base), [floats(m) for m in models],
                                     density=density, block=block, sw=sw, axis=axis,
                                     weights=w, scale=scale), base, **F32)


# -------------------------------------------------------------- Localize-and-Stitch


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_localize_stitch_matches_reference(scope):
    base, models = dyadic(23, 3)
    out = mergejax.localize_stitch(base, models, density=0.25, scope=scope)
    check_tree(out, ref_localize_stitch(floats(base), [floats(m) for m in models], 0.25,
                                        scope), base, **F32)


def test_stitch_matches_reference():
    base, models = gaussian(24, 3)
    rng = np.random.default_rng(25)
    masks_np = [{p: rng.random(s) < 0.4 for p, s in SHAPES.items()} for _ in models]
    masks = [make_tree(m, 0, jnp.bool_) for m in masks_np]
    for m in masks:
        m["step"] = True  # placeholder on the non-floating leaf
    out = mergejax.stitch(base, models, masks)
    check_tree(out, ref_stitch(floats(base), [floats(m) for m in models], masks_np), base,
               **F32)


# ----------------------------------------------------------------- random methods

KEY = jax.random.key(42)


@pytest.mark.parametrize("rescale", ["density", "l1", "none"])
def test_dare_linear_matches_reference(rescale):
    base, models = gaussian(30, 3)
    w, scale = [0.5, 1.0, -0.3], 0.7
    out = mergejax.dare_linear(base, models, density=0.4, rescale=rescale, weights=w,
                               scale=scale, key=KEY)
    check_tree(out, ref_random(floats(base), [floats(m) for m in models], KEY,
                               sparsify="random", density=0.4, rescale=rescale, weights=w,
                               scale=scale), base, **F32)


def test_dare_linear_normalize_and_dare_ties_match_reference():
    base, models = gaussian(31, 3)
    b, xs = floats(base), [floats(m) for m in models]
    w = [0.5, 1.0, 0.3]
    out = mergejax.dare_linear(base, models, density=0.6, weights=w, normalize=True, key=KEY)
    check_tree(out, ref_random(b, xs, KEY, sparsify="random", density=0.6, weights=w,
                               normalize=True), base, **F32)
    for elect, disjoint in [("mass", "sum"), ("count", "mean")]:
        out = mergejax.dare_ties(base, models, density=0.5, weights=w, scale=0.9, key=KEY,
                                 elect=elect, disjoint=disjoint)
        check_tree(out, ref_random(b, xs, KEY, sparsify="random", density=0.5, weights=w,
                                   scale=0.9, elect=elect, disjoint=disjoint), base, **F32)


@pytest.mark.parametrize("elect", ["none", "mass"])
def test_darex_matches_reference(elect):
    base, models = gaussian(32, 2)
    out = mergejax.darex(base, models, density=0.3, q=0.45, elect=elect, weights=[1.0, 0.5],
                         scale=0.8, key=KEY)
    check_tree(out, ref_random(floats(base), [floats(m) for m in models], KEY,
                               sparsify="random", density=0.3, q=0.45, elect=elect,
                               weights=[1.0, 0.5], scale=0.8), base, **F32)


@pytest.mark.parametrize("rescale,rank_axis,linear", [("density", -1, False), ("l1", 0, True)])
def test_della_matches_reference(rescale, rank_axis, linear):
    base, models = dyadic(33, 3)
    b, xs = floats(base), [floats(m) for m in models]
    w = [1.0, 0.6, 0.8]
    kw = dict(density=0.5, epsilon=0.2, rescale=rescale, rank_axis=rank_axis, weights=w,
              key=KEY)
    if not linear:
        check_tree(mergejax.della(base, models, scale=0.9, **kw),
                   ref_random(b, xs, KEY, sparsify="magprune", density=0.5, epsilon=0.2,
                              rescale=rescale, rank_axis=rank_axis, weights=w, scale=0.9,
                              elect="mass", disjoint="mean"), base, **F32)
        return
    check_tree(mergejax.della_linear(base, models, **kw),
               ref_random(b, xs, KEY, sparsify="magprune", density=0.5, epsilon=0.2,
                          rescale=rescale, rank_axis=rank_axis, weights=w), base, **F32)


@pytest.mark.parametrize("sparsify", ["random", "magprune"])
def test_sparse_merge_random_sparsifiers_match_reference(sparsify):
    base, models = dyadic(34, 3)
    kw = dict(sparsify=sparsify, density=0.5, epsilon=0.1, rescale="density", elect="count",
              disjoint="sum")
    out = mergejax.sparse_merge(base, models, key=KEY, scale=0.5, **kw)
    check_tree(out, ref_random(floats(base), [floats(m) for m in models], KEY, scale=0.5,
                               **kw), base, **F32)


@pytest.mark.parametrize("shape,axis", [((5, 7), -1), ((5, 7), 0), ((3, 4, 6), 1),
                                        ((9,), -1), ((1, 4), 0), ((), -1)])
def test_magprune_probabilities_match_numpy_ranks(shape, axis):
    rng = np.random.default_rng(35)
    x = rng.integers(-4, 5, size=shape).astype(np.float32)  # many equal magnitudes
    d, e = 0.5, 0.2
    got = np.asarray(stages.magprune_probabilities(jnp.asarray(x), d, e, axis))
    rows = np.abs(x).reshape(1, -1) if x.ndim < 2 else np.moveaxis(np.abs(x), axis, -1)
    flat = rows.reshape(-1, rows.shape[-1])
    n = flat.shape[-1]
    ranks = np.empty_like(flat)
    for i, row in enumerate(flat):
        ranks[i, np.argsort(row, kind="stable")] = np.arange(n)
    p = np.full(flat.shape, d) if n == 1 else (d - e) + 2 * e * ranks / (n - 1)
    p = p.reshape(rows.shape)
    expected = p.reshape(x.shape) if x.ndim < 2 else np.moveaxis(p, -1, axis)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_dare_density_one_is_task_arithmetic():
    base, models = gaussian(36, 3)
    w = [0.3, 1.0, -0.5]
    expected = ref_task_arithmetic(floats(base), [floats(m) for m in models], w, 0.7)
    for fn in (mergejax.dare_linear, mergejax.sparse_merge):
        kw = {"sparsify": "random"} if fn is mergejax.sparse_merge else {}
        check_tree(fn(base, models, density=1.0, weights=w, scale=0.7, key=KEY, **kw),
                   expected, base, **F32)
    check_tree(mergejax.task_arithmetic(base, models, weights=w, scale=0.7), expected, base,
               **F32)


def test_dare_linear_is_unbiased_over_keys():
    base, models = gaussian(37, 2)
    b, xs = floats(base), [floats(m) for m in models]
    w, d, n_keys = [1.0, 0.5], 0.5, 200
    keys = jax.random.split(jax.random.key(7), n_keys)
    total = {p: np.zeros(s) for p, s in SHAPES.items()}
    for k in keys:
        out = floats(mergejax.dare_linear(base, models, density=d, weights=w, key=k))
        for p in PATHS:
            total[p] += out[p]
    taus = taus_of(b, xs)
    for p in PATHS:
        mean = total[p] / n_keys
        sd = np.sqrt(sum(wk**2 * t[p] ** 2 for wk, t in zip(w, taus)) * (1 - d) / d / n_keys)
        np.testing.assert_array_less(np.abs(mean - (b[p] + sum(wk * t[p] for wk, t in
                                                                zip(w, taus)))),
                                     5 * sd + 1e-5)


def test_mask_frequency_is_density():
    # The realised keep frequency of a big mask, and of one task of dare_linear.
    for d in (0.1, 0.5, 0.9):
        m = np.asarray(stages.bernoulli_mask(jax.random.key(3), d, (400, 250), stream=1))
        assert abs(m.mean() - d) < 5 * np.sqrt(d * (1 - d) / m.size)
    big_base = {"w": jnp.zeros((300, 200))}
    big = [{"w": jnp.ones((300, 200))}]
    out = np.asarray(mergejax.dare_linear(big_base, big, density=0.2, rescale="none",
                                          key=jax.random.key(4))["w"])
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert abs(out.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / out.size)
    # Streams differ: two identical tasks get different masks.
    m0, m1 = (np.asarray(stages.bernoulli_mask(jax.random.key(5), 0.5, (1000,), stream=s))
              for s in (0, 1))
    assert not np.array_equal(m0, m1)


# ---------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scope=st.sampled_from(["global", "tensor"]),
       topk=st.sampled_from(["fusionbench", "mergekit"]))
def test_ties_density_one_without_conflicts_is_task_arithmetic(seed, scope, topk):
    base, models = dyadic(seed, 3, shared_signs=True, zeros=0.1)
    w = list(np.random.default_rng(seed).uniform(0.2, 2.0, size=3))
    out = mergejax.ties(base, models, density=1.0, disjoint="sum", scope=scope, topk=topk,
                        weights=w, scale=0.8)
    check_tree(out, ref_task_arithmetic(floats(base), [floats(m) for m in models], w, 0.8),
               base, **F32)


# Every method: (run(base, models, scale, key), reference(b, xs, scale, key)) on 3-model
# trees. Static settings match the reference tests above (one compilation each).
def _ref_emr_task(b, xs, t):
    u, m, lam = ref_emr(b, xs, "tensor_means")
    return {p: b[p] + lam[t] * np.where(m[t][p], u[p], 0.0) for p in PATHS}


def _ref_tall_task(b, xs, t, lam):
    v = ref_mtl_vector(b, xs, "task_arithmetic")
    m = ref_tall_masks(b, xs, v, [lam] * len(xs))[t]
    return {p: b[p] + np.where(m[p], v[p], 0.0) for p in PATHS}


W3 = [1.0, 1.0, 1.0]
CASES = {
    "ties": (lambda b, ms, s, k: mergejax.ties(b, ms, density=0.3, scale=s),
             lambda b, xs, s, k: ref_ties(b, xs, density=0.3, scope="global",
                                          topk="fusionbench", elect="mass", disjoint="mean",
                                          scale=s)),
    "ties_tensor": (
        lambda b, ms, s, k: mergejax.ties(b, ms, density=0.3, scope="tensor",
                                          topk="mergekit", scale=s),
        lambda b, xs, s, k: ref_ties(b, xs, density=0.3, scope="tensor", topk="mergekit",
                                     elect="mass", disjoint="mean", scale=s)),
    "breadcrumbs": (
        lambda b, ms, s, k: mergejax.breadcrumbs(b, ms, density=0.5, gamma=0.1, scale=s),
        lambda b, xs, s, k: ref_breadcrumbs(b, xs, density=0.5, gamma=0.1, weights=W3,
                                            scale=s)),
    "breadcrumbs_ties": (
        lambda b, ms, s, k: mergejax.breadcrumbs_ties(b, ms, density=0.5, gamma=0.1, scale=s),
        lambda b, xs, s, k: ref_breadcrumbs(b, xs, density=0.5, gamma=0.1, weights=W3,
                                            scale=s, elect="mass", disjoint="sum")),
    "magmax": (lambda b, ms, s, k: mergejax.magmax(b, ms, scale=s),
               lambda b, xs, s, k: ref_magmax(b, xs, s)),
    "sce": (lambda b, ms, s, k: mergejax.sce(b, ms, density=0.4, scale=s),
            lambda b, xs, s, k: ref_sce(b, xs, 0.4, s)),
    "consensus": (
        lambda b, ms, s, k: mergejax.consensus(b, ms, scale=s, density=0.3),
        lambda b, xs, s, k: ref_consensus(b, xs, merged="task_arithmetic", scale=s,
                                          mask_lambda=0.6, min_agree=2)),
    "pcb": (lambda b, ms, s, k: mergejax.pcb(b, ms, density=0.3, clip=0.05, scale=s),
            lambda b, xs, s, k: ref_pcb(b, xs, density=0.3, clip=0.05, scope="global",
                                        weights=W3, scale=s)),
    "model_tailor": (
        lambda b, ms, s, k: mergejax.model_tailor(b, ms, density=0.3, block_size=5,
                                                  salience_weight=0.5, axis=0, scale=s),
        lambda b, xs, s, k: ref_model_tailor(b, xs, density=0.3, block=5, sw=0.5, axis=0,
                                             weights=W3, scale=s)),
    "localize_stitch": (lambda b, ms, s, k: mergejax.localize_stitch(b, ms, density=0.25),
                        lambda b, xs, s, k: ref_localize_stitch(b, xs, 0.25, "global")),
    "dare_linear": (
        lambda b, ms, s, k: mergejax.dare_linear(b, ms, density=0.4, scale=s, key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="random", density=0.4, scale=s)),
    "dare_ties": (
        lambda b, ms, s, k: mergejax.dare_ties(b, ms, density=0.5, scale=s, key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="random", density=0.5, scale=s,
                                       elect="mass", disjoint="sum")),
    "darex": (
        lambda b, ms, s, k: mergejax.darex(b, ms, density=0.3, q=0.5, scale=s, key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="random", density=0.3, q=0.5,
                                       scale=s)),
    "della": (
        lambda b, ms, s, k: mergejax.della(b, ms, density=0.5, epsilon=0.2, scale=s, key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="magprune", density=0.5,
                                       epsilon=0.2, scale=s, elect="mass", disjoint="mean")),
    "della_linear": (
        lambda b, ms, s, k: mergejax.della_linear(b, ms, density=0.5, epsilon=0.2,
                                                  rescale="l1", rank_axis=0, scale=s, key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="magprune", density=0.5,
                                       epsilon=0.2, rescale="l1", rank_axis=0, scale=s)),
    "sparse_merge": (
        lambda b, ms, s, k: mergejax.sparse_merge(b, ms, sparsify="random", density=0.5,
                                                  epsilon=0.1, rescale="density",
                                                  elect="count", disjoint="sum", scale=s,
                                                  key=k),
        lambda b, xs, s, k: ref_random(b, xs, k, sparsify="random", density=0.5, scale=s,
                                       elect="count", disjoint="sum")),
    "emr": (lambda b, ms, s, k: mergejax.emr(b, ms).task_model(1),
            lambda b, xs, s, k: _ref_emr_task(b, xs, 1)),
    "tall_masks": (lambda b, ms, s, k: mergejax.tall_masks(b, ms, mask_lambda=0.4
                                                           ).task_model(0),
                   lambda b, xs, s, k: _ref_tall_task(b, xs, 0, 0.4)),
}
NO_SCALE = ("emr", "tall_masks", "localize_stitch")
RANDOM_CASES = ("dare_linear", "dare_ties", "darex", "della", "della_linear", "sparse_merge")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_jits_and_keeps_bf16_and_int_leaves(name):
    """Inside a user's jax.jit, bf16 in gives bf16 out (int32 step from the base), close
    to the float64 reference on the bf16 values."""
    base, models = dyadic(50, 3, dtype=jnp.bfloat16)
    run, reference = CASES[name]
    out = jax.jit(lambda b, ms, s, k: run(b, ms, s, k))(base, models, 0.8, KEY)
    for path, leaf in walk(out):
        assert jnp.result_type(leaf) == (jnp.int32 if path == "step" else jnp.bfloat16), path
    expected = reference(floats(base), [floats(m) for m in models], 0.8, KEY)
    check_tree(out, expected, base, rtol=1e-2, atol=1e-2)


def test_stitch_jits_and_keeps_bf16():
    base, models = gaussian(51, 2, jnp.bfloat16)
    masks = [make_tree({p: np.ones(s, bool) for p, s in SHAPES.items()}, 0, jnp.bool_)
             for _ in models]
    out = jax.jit(mergejax.stitch)(base, models, masks)
    expected = {p: np.mean([floats(m)[p] for m in models], axis=0) for p in PATHS}
    check_tree(out, expected, base, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in NO_SCALE))
def test_scale_sweep_and_keys_compile_once(name):
    """float32 against the reference at several scales (and, for random methods, keys),
    with no new compilation after the first call; same key, same result."""
    base, models = dyadic(52, 3)
    b, xs = floats(base), [floats(m) for m in models]
    run, reference = CASES[name]
    check_tree(run(base, models, 0.8, KEY), reference(b, xs, 0.8, KEY), base, **F32)
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for s in (0.2, 1, 3.0):
        check_tree(run(base, models, s, KEY), reference(b, xs, s, KEY), base, **F32)
    if name in RANDOM_CASES:
        other = jax.random.key(9)
        a = floats(run(base, models, 0.8, other))
        check_tree(run(base, models, 0.8, other), a, base, rtol=0, atol=0)
        check_tree(run(base, models, 0.8, other), reference(b, xs, 0.8, other), base, **F32)
        first = floats(run(base, models, 0.8, KEY))
        assert any(not np.array_equal(a[p], first[p]) for p in PATHS)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


# ---------------------------------------------------------------------- bad input

RANDOM = {"dare_linear": {}, "dare_ties": {}, "darex": {"q": 0.5},
          "della": {"epsilon": 0.05}, "della_linear": {"epsilon": 0.05}}


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan")])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "localize_stitch",
                                  "dare_linear", "dare_ties", "darex", "model_tailor", "pcb",
                                  "sparse_merge"])
def test_bad_density_raises(name, density):
    base, models = gaussian(60, 2)
    kw = dict(RANDOM.get(name, {}))
    if name in RANDOM:
        kw["key"] = KEY
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\]"):
        mergejax.get_method(name)(base, models, density=density, **kw)


def test_bad_density_raises_for_sce_consensus_and_della():
    base, models = gaussian(61, 2)
    for d in (1.5, -0.1):
        with pytest.raises(MergeError, match=r"density \(select_topk\) must be in \[0, 1\]"):
            mergejax.sce(base, models, density=d)
    for d in (0, 1.5):
        with pytest.raises(MergeError, match=r"density must be in \(0, 1\]"):
            mergejax.consensus(base, models, merged="ties", density=d)
    for fn in (mergejax.della, mergejax.della_linear):
        for d, e in [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5), (0.0, 0.0)]:
            with pytest.raises(MergeError, match="density"):
                fn(base, models, density=d, epsilon=e, key=KEY)
        with pytest.raises(MergeError, match=r"DELLA needs density - epsilon and density "
                                             r"\+ epsilon in \(0, 1\)"):
            fn(base, models, density=0.9, epsilon=0.15, key=KEY)
        with pytest.raises(MergeError, match="DELLA needs"):
            fn(base, models, density=0.1, epsilon=0.1, key=KEY)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_methods_need_a_key(name):
    base, models = gaussian(62, 2)
    with pytest.raises(MergeError, match=rf"{name} is random: pass key="):
        mergejax.get_method(name)(base, models, **RANDOM[name])


@pytest.mark.parametrize("sparsify", ["random", "magprune"])
def test_sparse_merge_random_sparsifier_needs_a_key(sparsify):
    base, models = gaussian(63, 2)
    with pytest.raises(MergeError, match=rf"sparsify='{sparsify}' is random: pass key="):
        mergejax.sparse_merge(base, models, sparsify=sparsify, density=0.5, epsilon=0.1)


@pytest.mark.parametrize("name,kwargs,match", [
    ("ties", {"scope": "model"}, r"scope must be one of"),
    ("ties", {"disjoint": "max"}, r"disjoint must be one of"),
    ("ties", {"elect": "vote"}, r"elect must be one of"),
    ("ties", {"topk": "torch"}, r"topk must be one of"),
    ("dare_linear", {"rescale": "l3", "key": KEY}, r"rescale must be one of"),
    ("della", {"rescale": "mean", "key": KEY}, r"rescale must be one of"),
    ("sparse_merge", {"sparsify": "topk"}, r"sparsify must be one of"),
    ("breadcrumbs", {"scope": "row"}, r"scope must be one of"),
    ("breadcrumbs", {"gamma": 1.0}, r"gamma must be in \[0, 1\)"),
    ("localize_stitch", {"topk": "exact"}, r"topk must be one of"),
    ("pcb", {"scope": "row"}, r"scope must be 'global' or 'tensor'"),
    ("pcb", {"clip": 0.5}, r"clip must be in \[0, 0.5\)"),
    ("consensus", {"merged": "magmax"}, r"merged must be 'task_arithmetic' or 'ties'"),
    ("model_tailor", {"block_size": 0}, r"block_size must be a positive int"),
    ("model_tailor", {"salience_weight": 1.5}, r"salience_weight must be in \[0, 1\]"),
    ("darex", {"key": KEY}, r"darex needs hyperparameter\(s\) \['q'\]"),
    ("ties", {"threshold": 20}, r"unknown hyperparameter"),
])
def test_bad_switches_raise(name, kwargs, match):
    base, models = gaussian(64, 2)
    with pytest.raises(MergeError, match=match):
        mergejax.get_method(name)(base, models, **kwargs)


def test_bad_switches_raise_for_emr_and_tall_masks():
    base, models = gaussian(65, 2)
    with pytest.raises(MergeError, match=r"rescale_sum must be 'tensor_means' or 'entries'"):
        mergejax.emr(base, models, rescale_sum="mean")
    with pytest.raises(MergeError, match=r"tall_masks: got 3 mask_lambda for 2 models"):
        mergejax.tall_masks(base, models, mask_lambda=[0.2, 0.3, 0.4])
    with pytest.raises(MergeError, match=r"merged must be"):
        mergejax.tall_masks(base, models, merged="sum")
    with pytest.raises(MergeError, match=r"emr needs a base"):
        mergejax.emr(None, models)


GLOBAL_RULES = PathRules([("dense", 0.3)], default=0.2)


@pytest.mark.parametrize("name,kwargs", [
    ("ties", {"density": GLOBAL_RULES}),
    ("ties", {"topk": PathRules([("bias", "mergekit")], default="fusionbench")}),
    ("breadcrumbs", {"scope": "global", "gamma": PathRules([("bias", 0.1)], default=0.0)}),
    ("localize_stitch", {"density": GLOBAL_RULES}),
    ("consensus", {"merged": "ties", "density": GLOBAL_RULES}),
    ("sparse_merge", {"scope": "global", "density": GLOBAL_RULES}),
])
def test_global_scope_with_per_leaf_ranks_raises(name, kwargs):
    base, models = gaussian(66, 2)
    with pytest.raises(MergeError, match=r"scope='global' ranks magnitudes over the whole "
                                         r"model"):
        mergejax.get_method(name)(base, models, **kwargs)
    # The same per-leaf values are fine per tensor.
    if name in ("ties", "localize_stitch", "sparse_merge"):
        mergejax.get_method(name)(base, models, **{**kwargs, "scope": "tensor"})


def test_pcb_global_scope_with_per_leaf_ranks_raises():
    base, models = gaussian(67, 2)
    with pytest.raises(MergeError, match=r"scope='global'"):
        mergejax.pcb(base, models, density=GLOBAL_RULES)


@pytest.mark.parametrize("name", ["ties", "dare_linear", "breadcrumbs", "magmax", "sce",
                                  "consensus", "pcb", "model_tailor", "localize_stitch",
                                  "della", "emr", "tall_masks"])
def test_structure_and_shape_mismatch_raise(name):
    base, models = gaussian(68, 2)
    kw = {"key": KEY} if name in ("dare_linear", "della") else {}
    fn = mergejax.get_method(name)
    extra = dict(models[1])
    extra["head"] = jnp.zeros(3)
    with pytest.raises(MergeError, match=r"models\[1\] does not have the tree structure of "
                                         r"base: unexpected 'head'"):
        fn(base, [models[0], extra], **kw)
    missing = {"dense": models[1]["dense"], "step": models[1]["step"]}
    with pytest.raises(MergeError, match=r"missing 'conv/kernel'"):
        fn(base, [models[0], missing], **kw)
    wrong = jax.tree.map(lambda x: x, models[1])
    wrong["dense"]["bias"] = jnp.zeros(5)
    with pytest.raises(MergeError, match=r"shape mismatch at 'dense/bias'"):
        fn(base, [models[0], wrong], **kw)


def test_stitch_bad_masks_raise():
    base, models = gaussian(69, 2)
    ok = make_tree({p: np.ones(s, bool) for p, s in SHAPES.items()}, 0, jnp.bool_)
    with pytest.raises(MergeError, match=r"stitch: got 1 masks for 2 models"):
        mergejax.stitch(base, models, [ok])
    with pytest.raises(MergeError, match=r"stitch: got 3 masks for 2 models"):
        mergejax.stitch(base, models, [ok] * 3)
    bad_shape = jax.tree.map(lambda x: x, ok)
    bad_shape["dense"]["bias"] = jnp.ones(4, bool)
    with pytest.raises(MergeError, match=r"stitch: masks\[1\] has shape \(4,\)"):
        mergejax.stitch(base, models, [ok, bad_shape])
    with pytest.raises(MergeError, match=r"stitch: masks\[0\] does not have the models' "
                                         r"structure"):
        mergejax.stitch(base, models, [{"dense": ok["dense"]}, ok])
