"""WIDEN and FREE-Merging against small, independent NumPy references.

The references are written from the definitions in ``notes/refs_decomposition.md`` (the
official ``yule-BUAA/MergeLLM`` ``widen_merging`` and the official FREE-Merging ViT code):
float64, loops and ``numpy.fft``, no mergejax code. Each tree has two same-shaped Dense
kernels (one batched group), an odd rectangular kernel, a bias, a 3-D attention kernel
(a matrix by the "auto" rule), a 3-D convolution kernel and a scalar (not matrices), and an
int32 step counter that must come back unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, walk

import mergejax
from mergejax import MergeError
from mergejax import method as method_lib
from mergejax.method import LeafContext
from mergejax.methods import decomposition
from mergejax.methods.decomposition import free_merging, free_merging_experts, widen

SHAPES = {
    "dense/kernel": (6, 10),
    "dense2/kernel": (6, 10),
    "head/kernel": (5, 7),
    "dense/bias": (10,),
    "attn/query/kernel": (6, 2, 4),
    "conv/kernel": (3, 2, 4),
    "temp": (),
}
PATHS = tuple(SHAPES)
F32 = {"rtol": 1e-4, "atol": 1e-5}


def gaussian(seed: int, k: int, dtype=jnp.float32, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    b = {p: rng.normal(size=s) for p, s in SHAPES.items()}
    models = [make_tree({p: b[p] + spread * rng.normal(size=s) for p, s in SHAPES.items()},
                        i + 1, dtype) for i in range(k)]
    return make_tree(b, 0, dtype), models


def ref_split(path: str, shape: tuple[int, ...]) -> int | None:
    """The "auto" matrix rule, restated: 2-D leaves and attention q/k/v kernels."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3 and path.endswith(("query/kernel", "key/kernel", "value/kernel")):
        return 1
    return None


def as_matrix(x: np.ndarray, split: int) -> np.ndarray:
    return x.reshape(math.prod(x.shape[:split]), -1)


# ------------------------------------------------------------------------- WIDEN ref


def ref_scores(sig, temperature, ratio, calibration, above=None):
    z = sig / temperature
    e = np.exp(z - z.max(axis=0))
    soft = e / e.sum(axis=0)
    if above is None:
        above = sig > ratio * sig.mean(axis=1, keepdims=True)
    return np.where(above, calibration, soft)


def ref_ranked_scores(diff, temperature, ratio, calibration):
    """Scores of the within-model ranks / n; their mean is exactly (n - 1) / (2 n), so
    "above ratio * mean" is decided on the integer ranks (no rounding at ties)."""
    n = diff.shape[1]
    rank = np.empty_like(diff)
    for k in range(diff.shape[0]):
        rank[k, np.argsort(diff[k], kind="stable")] = np.arange(n)
    return ref_scores(rank / n, temperature, ratio, calibration,
                      above=rank > ratio * (n - 1) / 2)


def ref_widen_leaf(path, b, xs, *, ratio=1.0, calibration=1.0, temperature=1.0, scale=1.0,
                   layout="in_out"):
    taus = [x - b for x in xs]
    split = ref_split(path, b.shape)
    args = (temperature, ratio, calibration)
    if split is None:
        s = ref_scores(np.stack([np.abs(t).ravel() for t in taus]), *args)
        return b + scale * sum(t * s[k].reshape(b.shape) for k, t in enumerate(taus))

    def torch(x):
        m = as_matrix(x, split)
        return m.T if layout == "in_out" else m

    w0 = torch(b)
    m0 = np.linalg.norm(w0, axis=0)
    d0 = w0 / m0
    mags, dirs = [], []
    for x in xs:
        w = torch(x)
        m = np.linalg.norm(w, axis=0)
        d = w / m
        mags.append(np.abs(m - m0))
        cos = (d * d0).sum(0) / (np.linalg.norm(d, axis=0) * np.linalg.norm(d0, axis=0))
        dirs.append(1.0 - cos)
    s = 0.5 * (ref_ranked_scores(np.stack(mags), *args)
               + ref_ranked_scores(np.stack(dirs), *args))
    merged = sum(torch(t) * s[k][None, :] for k, t in enumerate(taus))
    if layout == "in_out":
        merged = merged.T
    return b + scale * merged.reshape(b.shape)


def ref_widen(b, xs, **kw):
    return {p: ref_widen_leaf(p, b[p], [x[p] for x in xs], **kw) for p in b}


# ------------------------------------------------------------------ FREE-Merging ref


def ref_mask(p, q, ratio, cutoff):
    mask = np.ones((p, q))
    for i in range(p):
        for j in range(q):
            if ratio is not None:
                d = math.hypot(i - p // 2, j - q // 2)
                inner, outer = min(p, q) // 10, min(p, q) * ratio
                mask[i, j] = float(d <= inner) + float(inner <= d <= outer)
            if cutoff > 0:
                fi = i if i < (p + 1) // 2 else i - p
                fj = j if j < (q + 1) // 2 else j - q
                mask[i, j] *= math.hypot(fi, fj) >= cutoff * min(p, q)
    return mask


def ref_vectors(path, b, xs, ratio, cutoff, align):
    """FR-Merging's filtered (matrix leaves) and aligned task vectors of one leaf."""
    split = ref_split(path, b.shape)
    vs = []
    for x in xs:
        t = x - b
        if split is not None:
            m = as_matrix(t, split)
            m = np.real(np.fft.ifft2(np.fft.fft2(m) * ref_mask(*m.shape, ratio, cutoff)))
            t = m.reshape(b.shape)
        vs.append(t)
    if align:
        a = np.array([np.mean(np.abs(v)) for v in vs])
        vs = [v * a.max() / a[k] for k, v in enumerate(vs)]
    return split, vs


def ref_backbone_vector(path, b, xs, *, weights, scale, ratio=0.7, cutoff=0.0, align=True,
                        non_matrix="sum"):
    split, vs = ref_vectors(path, b, xs, ratio, cutoff, align)
    if split is None and non_matrix == "base":
        return np.zeros_like(b), vs
    return scale * sum(w * v for w, v in zip(weights, vs)), vs


def ref_free(b, xs, *, weights=None, scale=0.7, **kw):
    weights = np.ones(len(xs)) if weights is None else weights
    return {p: b[p] + ref_backbone_vector(p, b[p], [x[p] for x in xs], weights=weights,
                                          scale=scale, **kw)[0] for p in b}


def ref_rows(path, x, layout):
    split = ref_split(path, x.shape)
    if split is None:
        return x.reshape(1, -1)
    m = as_matrix(x, split)
    return m.T if layout == "in_out" else m


def ref_unrows(path, m, shape, layout):
    if ref_split(path, shape) is None:
        return m.reshape(shape)
    return (m.T if layout == "in_out" else m).reshape(shape)


def ref_experts(b, xs, *, scale=0.25, ratio=0.7, cutoff=0.0, align=False, non_matrix="sum",
                density=0.01, rescale=True, expert_scale=0.5, combine="replace",
                layout="in_out"):
    """Every task's model: backbone vector, per-row top-k experts, official rescalers."""
    kk = len(xs)
    vectors, kept, e_v, e_m = {}, {}, np.zeros(kk), np.zeros(kk)
    for p in b:
        ts = [x[p] - b[p] for x in xs]
        vectors[p], vs = ref_backbone_vector(p, b[p], [x[p] for x in xs],
                                             weights=np.ones(kk), scale=scale, ratio=ratio,
                                             cutoff=cutoff, align=align,
                                             non_matrix=non_matrix)
        kept[p] = []
        for t in range(kk):
            rows = ref_rows(p, ts[t], layout)
            k = rows.shape[1] if b[p].ndim == 0 else int(rows.shape[1] * density)
            keep = np.zeros(rows.shape, bool)
            for r in range(rows.shape[0]):
                keep[r, np.argsort(-np.abs(rows[r]), kind="stable")[:k]] = True
            kept[p].append(keep)
            e_v[t] += np.mean(np.abs(vs[t])) / len(b)
            e_m[t] += np.sum(np.abs(rows[keep])) / (b[p].size * density) / len(b)
    mu = -e_m * np.log10(density) / e_v if rescale else np.ones(kk)
    rescalers = expert_scale * mu
    out = []
    for t in range(kk):
        model = {}
        for p in b:
            rows = ref_rows(p, vectors[p], layout).copy()
            expert = rescalers[t] * ref_rows(p, xs[t][p] - b[p], layout)
            keep = kept[p][t]
            rows[keep] = expert[keep] if combine == "replace" else rows[keep] + expert[keep]
            model[p] = b[p] + ref_unrows(p, rows, b[p].shape, layout)
        out.append(model)
    return out, rescalers


# ---------------------------------------------------------------------------- WIDEN


@pytest.mark.parametrize("kw", [
    {},
    {"above_average_value_ratio": 1.5, "score_calibration_value": 0.2, "temperature": 0.3,
     "scale": 0.6},
    {"kernel_layout": "out_in", "above_average_value_ratio": 0.5,
     "score_calibration_value": 0.7, "temperature": 2.0},
])
def test_widen_matches_reference(kw):
    base, models = gaussian(0, 3)
    ref_kw = {"ratio": kw.get("above_average_value_ratio", 1.0),
              "calibration": kw.get("score_calibration_value", 1.0),
              "temperature": kw.get("temperature", 1.0), "scale": kw.get("scale", 1.0),
              "layout": kw.get("kernel_layout", "in_out")}
    out = widen(base, models, **kw)
    check_tree(out, ref_widen(floats(base), [floats(m) for m in models], **ref_kw), base,
               **F32)


def test_widen_kernel_layout_changes_the_merge():
    """The reference itself depends on the layout (so the layout test below can fail)."""
    base, models = gaussian(1, 3)
    b, xs = floats(base), [floats(m) for m in models]
    a = ref_widen_leaf("dense/kernel", b["dense/kernel"], [x["dense/kernel"] for x in xs])
    c = ref_widen_leaf("dense/kernel", b["dense/kernel"], [x["dense/kernel"] for x in xs],
                       layout="out_in")
    assert np.max(np.abs(a - c)) > 1e-3


def _transposed(tree: dict) -> dict:
    """Every 2-D leaf transposed (the PyTorch layout of the Flax kernels)."""
    out = {}
    for path, v in walk(tree):
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = v.T if jnp.ndim(v) == 2 else v
    return out


#: The PyTorch layout of every 2-D kernel; the 3-D attention kernel stays in Flax layout.
TORCH_LAYOUT = [("attn/.*", "in_out"), (".*", "out_in")]


@pytest.mark.parametrize("method", ["widen", "free_merging"])
def test_layout_invariance(method):
    """Transposing every kernel and switching kernel_layout transposes the result (the
    FFT filter commutes with transposition, so free_merging has no layout switch)."""
    base, models = gaussian(2, 3)
    fn = widen if method == "widen" else free_merging
    flax = fn(base, models)
    tb, tms = _transposed(base), [_transposed(m) for m in models]
    torch = fn(tb, tms, kernel_layout=TORCH_LAYOUT) if method == "widen" else fn(tb, tms)
    expected = {p: np.asarray(v, np.float64) for p, v in walk(_transposed(flax))
                if p != "step"}
    check_tree(torch, expected, tb, **F32)


def test_widen_models_equal_to_base_give_base():
    base, _ = gaussian(3, 1)
    out = widen(base, [base, base, base])
    check_tree(out, floats(base), base, rtol=0, atol=1e-6)


def test_widen_one_model_calibrated_to_one_gives_it_back():
    base, models = gaussian(4, 1)
    out = widen(base, models[:1], score_calibration_value=1.0)
    check_tree(out, floats(models[0]), base, **F32)


@pytest.mark.parametrize("method", [widen, free_merging])
def test_kernels_vmap(method):
    """The kernels run under jax.vmap (as the engine's batched groups do)."""
    rng = np.random.default_rng(5)
    b = jnp.asarray(rng.normal(size=(4, 6, 10)), jnp.float32)
    xs = tuple(b + jnp.asarray(rng.normal(size=b.shape), jnp.float32) for _ in range(3))
    hp = {n: v for n, v in method.hparams.items() if n != "weights"}
    if method is free_merging:
        hp["weights"] = jnp.ones(3)
    ctx = LeafContext("dense/kernel", None, (), 60)
    one = jax.jit(lambda b, *xs: method.kernel(ctx, b, xs, **hp))
    batched = jax.jit(jax.vmap(one))(b, *xs)
    for i in range(4):
        np.testing.assert_allclose(batched[i], one(b[i], *(x[i] for x in xs)), rtol=1e-5,
                                   atol=1e-6)


# --------------------------------------------------------------------- FREE-Merging


def test_frequency_mask_matches_reference_and_transposes():
    for shape, ratio, cutoff in [((20, 20), 0.7, 0.0), ((6, 10), 0.3, 0.0),
                                 ((5, 7), None, 0.2), ((12, 30), 0.7, 0.1)]:
        mask = decomposition.frequency_mask(shape, ratio, cutoff)
        np.testing.assert_array_equal(mask, ref_mask(*shape, ratio, cutoff))
        np.testing.assert_array_equal(decomposition.frequency_mask(shape[::-1], ratio,
                                                                   cutoff), mask.T)
    mask = decomposition.frequency_mask((20, 20), 0.7)
    assert mask[0, 0] == 0 and mask[10, 10] == 1 and mask[10, 12] == 2  # DC off, ring x2
    assert decomposition.frequency_mask((20, 20), None, 0.0) is None


@pytest.mark.parametrize("kw", [
    {},
    {"filter_ratio": 0.3, "cutoff": 0.1, "non_matrix": "base", "align": False,
     "scale": 0.5},
    {"filter_ratio": None, "cutoff": 0.2, "weights": [1.0, 0.5, 2.0]},
])
def test_free_merging_matches_reference(kw):
    base, models = gaussian(6, 3)
    ref_kw = {"ratio": kw.get("filter_ratio", 0.7), "cutoff": kw.get("cutoff", 0.0),
              "align": kw.get("align", True), "non_matrix": kw.get("non_matrix", "sum"),
              "scale": kw.get("scale", 0.7), "weights": kw.get("weights")}
    out = free_merging(base, models, **kw)
    check_tree(out, ref_free(floats(base), [floats(m) for m in models], **ref_kw), base,
               **F32)


def test_free_merging_without_filter_is_task_arithmetic():
    base, models = gaussian(7, 3)
    out = free_merging(base, models, filter_ratio=None, cutoff=0.0, align=False, scale=0.4)
    b, xs = floats(base), [floats(m) for m in models]
    expected = {p: b[p] + 0.4 * sum(x[p] - b[p] for x in xs) for p in b}
    check_tree(out, expected, base, **F32)
    check_tree(out, floats(mergejax.task_arithmetic(base, models, scale=0.4)), base, **F32)
    filtered = floats(free_merging(base, models, scale=0.4))
    assert np.max(np.abs(filtered["dense/kernel"] - expected["dense/kernel"])) > 1e-3


@pytest.mark.parametrize("kw", [
    {"density": 0.3},
    {"density": 0.3, "combine": "add", "align": True},
    {"density": 0.5, "rescale": False, "expert_scale": 2.0, "kernel_layout": "out_in",
     "filter_ratio": None, "cutoff": 0.15, "non_matrix": "base"},
])
def test_free_merging_experts_match_reference(kw):
    base, models = gaussian(8, 3)
    result = free_merging_experts(base, models, **kw)
    assert isinstance(result, decomposition.FreeMergeExperts) and result.num_tasks == 3
    expected, rescalers = ref_experts(
        floats(base), [floats(m) for m in models], density=kw["density"],
        combine=kw.get("combine", "replace"), align=kw.get("align", False),
        rescale=kw.get("rescale", True), expert_scale=kw.get("expert_scale", 0.5),
        layout=kw.get("kernel_layout", "in_out"), ratio=kw.get("filter_ratio", 0.7),
        cutoff=kw.get("cutoff", 0.0), non_matrix=kw.get("non_matrix", "sum"))
    np.testing.assert_allclose(result.rescalers, rescalers, rtol=1e-4)
    for t, model in enumerate(result.task_models()):
        check_tree(model, expected[t], base, **F32)


def test_experts_backbone_is_free_merging():
    base, models = gaussian(9, 3)
    result = free_merging_experts(base, models)
    check_tree(result.backbone(), floats(free_merging(base, models, scale=0.25, align=False)),
               base, **F32)


def test_experts_full_density_gives_back_each_model():
    base, models = gaussian(10, 3)
    result = free_merging_experts(base, models, density=1.0, rescale=False, expert_scale=1.0)
    for t in range(3):
        check_tree(result.task_model(t), floats(models[t]), base, **F32)


# --------------------------------------------------------- compiles, dtypes, registry


@pytest.mark.parametrize("method", [widen, free_merging])
def test_scale_sweep_compiles_once(method):
    base, models = gaussian(11, 3)
    b, xs = floats(base), [floats(m) for m in models]
    reference = ((lambda s: ref_widen(b, xs, scale=s)) if method is widen
                 else (lambda s: ref_free(b, xs, scale=s)))
    check_tree(method(base, models, scale=0.8), reference(0.8), base, **F32)
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for s in (0.2, 1.0, 3.0):
        check_tree(method(base, models, scale=s), reference(s), base, **F32)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


def test_experts_scale_sweep_compiles_once():
    base, models = gaussian(12, 3)
    b, xs = floats(base), [floats(m) for m in models]
    first = free_merging_experts(base, models, density=0.3, scale=0.8)
    first.task_model(0)
    sizes = tuple(f._cache_size() for f in (  # pylint: disable=protected-access
        decomposition._free_expert_leaf, decomposition._free_rescalers,  # noqa: SLF001
        decomposition._free_task_model))  # pylint: disable=protected-access
    for s, es in ((0.2, 1.0), (1.0, 0.1)):
        result = free_merging_experts(base, models, density=0.3, scale=s, expert_scale=es)
        expected, _ = ref_experts(b, xs, density=0.3, scale=s, expert_scale=es)
        for t in range(3):
            check_tree(result.task_model(t), expected[t], base, **F32)
    assert sizes == tuple(f._cache_size() for f in (  # pylint: disable=protected-access
        decomposition._free_expert_leaf, decomposition._free_rescalers,  # noqa: SLF001
        decomposition._free_task_model))  # pylint: disable=protected-access


def test_bfloat16_in_bfloat16_out():
    base, models = gaussian(13, 3, jnp.bfloat16)
    b, xs = floats(base), [floats(m) for m in models]
    loose = {"rtol": 2e-2, "atol": 2e-2}
    check_tree(widen(base, models), ref_widen(b, xs), base, **loose)
    check_tree(free_merging(base, models), ref_free(b, xs), base, **loose)
    result = free_merging_experts(base, models, density=0.3)
    expected, _ = ref_experts(b, xs, density=0.3)
    check_tree(result.task_model(2), expected[2], base, **loose)
    check_tree(result.backbone(), ref_free(b, xs, scale=0.25, align=False), base, **loose)


def test_registered():
    assert mergejax.get_method("widen") is widen
    assert mergejax.get_method("free_merging") is free_merging
    assert mergejax.get_method("free_merging_experts") is free_merging_experts
    base, models = gaussian(14, 3)
    out = mergejax.merge("free_merging_experts", base, models, density=1.0, rescale=False,
                         expert_scale=1.0)
    check_tree(out.task_model(1), floats(models[1]), base, **F32)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0 at"),
    ({"temperature": -1.0}, r"temperature must be a finite number > 0, got -1.0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number > 0, got nan"),
    ({"above_average_value_ratio": -0.5},
     r"above_average_value_ratio must be a finite number >= 0, got -0.5"),
    ({"score_calibration_value": -1.0},
     r"score_calibration_value must be a finite number >= 0, got -1.0"),
    ({"kernel_layout": "io"}, r"kernel_layout at '.*' must be one of \('in_out', 'out_in'\)"),
    ({"matrix_split": 0}, r"matrix_split at '.*' must be 'auto', None or a positive int"),
])
def test_widen_bad_input(kw, match):
    base, models = gaussian(15, 2)
    with pytest.raises(MergeError, match=match):
        widen(base, models, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"filter_ratio": 0.0}, r"filter_ratio must be None or a finite number > 0, got 0.0"),
    ({"filter_ratio": -0.1}, r"filter_ratio must be None or a finite number > 0, got -0.1"),
    ({"cutoff": -1.0}, r"cutoff must be a finite number >= 0, got -1.0"),
    ({"align": "yes"}, r"align must be True or False, got 'yes'"),
    ({"non_matrix": "mean"}, r"non_matrix must be 'sum' or 'base', got 'mean'"),
    ({"matrix_split": [("dense/kernel", 3), (".*", "auto")]},
     r"matrix_split at 'dense/kernel' must be 'auto', None or an int in \[1, 1\]"),
])
def test_free_merging_bad_input(kw, match):
    base, models = gaussian(16, 2)
    with pytest.raises(MergeError, match=match):
        free_merging(base, models, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ({"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    ({"rescale": "yes"}, r"rescale must be True or False, got 'yes'"),
    ({"combine": "mix"}, r"combine must be 'replace' or 'add', got 'mix'"),
    ({"weights": [1.0, 2.0, 3.0]}, r"weights must have one value per model \(2\)"),
    ({"scale": [0.1, 0.2]}, r"scale and expert_scale must be scalars"),
    ({"cutoff": -0.5}, r"cutoff must be a finite number >= 0, got -0.5"),
    ({"kernel_layout": "io"}, r"kernel_layout at '.*' must be one of"),
])
def test_experts_bad_input(kw, match):
    base, models = gaussian(17, 2)
    with pytest.raises(MergeError, match=match):
        free_merging_experts(base, models, **kw)


def test_experts_bad_models_and_task_index():
    base, models = gaussian(18, 2)
    with pytest.raises(MergeError, match=r"models is empty"):
        free_merging_experts(base, [])
    with pytest.raises(MergeError, match=r"needs a base \(pretrained\) model"):
        free_merging_experts(None, models)
    result = free_merging_experts(base, models)
    with pytest.raises(MergeError, match=r"task index 2 out of range for 2 tasks"):
        result.task_model(2)
