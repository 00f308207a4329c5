"""Basic merge methods against small, independent NumPy references.

Every reference below is written from the definitions in ``notes/reference_semantics.md``
(mergekit's semantics) and the papers (MetaGPT arXiv 2406.11385, Model Stock arXiv
2403.19522, Model soups arXiv 2203.05482); none of it calls or copies mergejax code.
References run in float64 on the exact (already rounded) input values. mergejax runs either
in float32 (compared with rtol ~1e-5) or, through the ``prec`` fixture, in float64 with x64
switched on for that one test only (compared with rtol ~1e-10).

Each test tree has three floating leaves of different ranks (a matrix, a vector, a 3-D
tensor) and an int32 step counter, which must come back from the base unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, walk, x64
from hypothesis import given, settings
from hypothesis import strategies as st

import mergejax
from mergejax import MergeError
from mergejax.methods import basic

SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "conv/kernel": (2, 3, 2)}
PATHS = tuple(SHAPES)
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())
THRESHOLD = 0.9995  # mergekit's DOT_THRESHOLD for slerp

PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- trees


def rand_leaves(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {p: scale * rng.standard_normal(s) for p, s in SHAPES.items()}


def add(a: dict, b: dict, cb: float = 1.0) -> dict:
    return {p: a[p] + cb * b[p] for p in a}


def unflatten(vec: np.ndarray) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for p, s in SHAPES.items():
        n = int(np.prod(s))
        out[p] = vec[i:i + n].reshape(s)
        i += n
    return out


def flatten(leaves: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(leaves[p], np.float64).ravel() for p in PATHS])


def per_leaf(fn, base: dict | None, models: list[dict]) -> dict[str, np.ndarray]:
    """Applies a per-tensor reference ``fn(base_leaf, [model leaves])`` to every path."""
    return {p: fn(None if base is None else base[p], [m[p] for m in models]) for p in PATHS}


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: object
    rtol: float
    atol: float


@pytest.fixture(params=["float32", "float64"])
def prec(request):
    """float32 inputs, or float64 inputs with x64 switched on for this test only."""
    if request.param == "float32":
        yield Precision(jnp.float32, rtol=1e-5, atol=1e-5)
        return
    with x64():
        yield Precision(jnp.float64, rtol=1e-10, atol=1e-11)


def setup_models(seed: int, k: int, dtype, *, base_scale=1.0, delta_scale=0.5):
    """A base tree and ``k`` fine-tunes of it (steps differ so pass-through is visible)."""
    rng = np.random.default_rng(seed)
    base = make_tree(rand_leaves(rng, base_scale), step=7, dtype=dtype)
    models = [make_tree(add(floats(base), rand_leaves(rng, delta_scale)), step=100 + i,
                        dtype=dtype) for i in range(k)]
    return base, models


# ------------------------------------------------------------------ NumPy references


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(x))))


def ref_linear(xs, w, normalize=True):
    """mergekit linear: sum_i w_i X_i, divided by sum_i w_i when normalize."""
    out = sum(wi * x for wi, x in zip(w, xs))
    return out / sum(w) if normalize else out


def ref_task_arithmetic(b, xs, w, lam=1.0, normalize=False):
    """mergekit GTA without sparsification: B + lam * sum w_i (X_i - B) [/ sum w]."""
    mixed = sum(wi * (x - b) for wi, x in zip(w, xs))
    div = float(sum(w))
    if abs(div) < 1e-8:
        div = 1.0
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def ref_slerp(t, v0, v1, thr=THRESHOLD, eps=1e-8):
    """mergekit slerp: angle from normalised copies, coefficients on raw tensors."""
    n0, n1 = _norm(v0), _norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float(np.sum(u0 * u1))
    if abs(dot) > thr:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    s = np.sin(theta)
    return np.sin(theta - t * theta) / s * v0 + np.sin(t * theta) / s * v1


def ref_nearswap(t, a, b):
    """mergekit nearswap (newest rule): w = clamp(t / max(|a-b|, 1e-6), 0, 1)."""
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def ref_multislerp(b, xs, w, normalize_weights=True, eps=1e-8):
    """mergekit multislerp; the base is not an interpolated point."""
    if len(xs) == 1:
        return xs[0]
    w = np.asarray(w, np.float64)
    if normalize_weights:
        w = w / w.sum()
    ys = [x - b if b is not None else x for x in xs]
    ns = np.array([_norm(y) for y in ys])
    us = [y / (n + eps) for y, n in zip(ys, ns)]
    m = sum(wi * u for wi, u in zip(w, us))
    if _norm(m) < eps:
        if len(xs) != 2:
            raise ValueError("antipodal")
        out = w[0] * ys[0] + w[1] * ys[1]
    else:
        m = m / _norm(m)
        g = sum(wi * (u - np.sum(u * m) * m) for wi, u in zip(w, us))
        tau = _norm(g) + eps
        r = np.cos(tau) * m + np.sin(tau) / tau * g
        out = float(np.sum(w * ns)) * r
    return out + b if b is not None else out


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit karcher: uniform alpha over ALL inputs; tiny norms drop out of the
    direction (weights renormalised) but count in the scale."""
    n_in = len(xs)
    if n_in == 1:
        return xs[0]
    alpha = np.full(n_in, 1.0 / n_in)
    ns = [_norm(x) for x in xs]
    us = [np.zeros_like(x) if n == 0 else x / n for x, n in zip(xs, ns)]
    valid = [i for i in range(n_in) if ns[i] > tol]
    if not valid:
        return np.zeros_like(xs[0])
    a = {i: alpha[i] / sum(alpha[j] for j in valid) for i in valid}
    mu = sum(a[i] * us[i] for i in valid)
    mu = us[valid[0]] if _norm(mu) < tol else mu / _norm(mu)
    for _ in range(max_iter):
        step = np.zeros_like(mu)
        for i in valid:
            c = float(np.clip(np.sum(mu * us[i]), -1.0, 1.0))
            theta = np.arccos(c)
            if theta < tol:
                continue
            step = step + a[i] * theta / np.sin(theta) * (us[i] - c * mu)
        ns_step = _norm(step)
        if ns_step < tol:
            break
        mu = np.cos(ns_step) * mu + np.sin(ns_step) * step / ns_step
        if _norm(mu) > tol:
            mu = mu / _norm(mu)
    return float(np.sum(alpha * np.array(ns))) * mu


def ref_model_stock(b, xs):
    """mergekit model_stock (filter_wise=False, 2026 singular guard)."""
    offs = [x - b for x in xs]
    n = len(offs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            den = max(_norm(offs[i]) * _norm(offs[j]), 1e-6)
            cos.append(float(np.clip(np.sum(offs[i] * offs[j]) / den, -1.0, 1.0)))
    c = float(np.mean(cos))
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return t * (sum(xs) / n) + (1 - t) * b


def ref_metagpt(base: dict, models: list[dict], scope: str) -> dict[str, np.ndarray]:
    """MetaGPT: theta_0 + sum_t lambda_t tau_t, lambda_t = |tau_t|^2 / sum_k |tau_k|^2,
    with whole-model norms (scope='global') or per-tensor norms (scope='tensor')."""
    taus = [{p: m[p] - base[p] for p in PATHS} for m in models]

    def lambdas(paths):
        sq = np.array([sum(np.sum(tau[p] ** 2) for p in paths) for tau in taus])
        total = sq.sum()
        return sq / total if total > 0 else np.zeros_like(sq)

    out = {}
    for p in PATHS:
        lam = lambdas(PATHS if scope == "global" else [p])
        out[p] = base[p] + sum(l * tau[p] for l, tau in zip(lam, taus))
    return out


def ref_greedy_soup(models: list[dict], evaluate) -> tuple[list[int], dict, list[float]]:
    """Model soups' greedy soup as in the official code: seed with the best model,
    walk the rest by descending individual score, accept on strict improvement."""
    scores = [evaluate(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        cand = {p: np.mean([models[j][p] for j in kept + [i]], axis=0) for p in PATHS}
        s = evaluate(cand)
        if s > best:
            kept, best = kept + [i], s
    soup = {p: np.mean([models[j][p] for j in kept], axis=0) for p in PATHS}
    return kept, soup, scores


# -------------------------------------------------------------- reference comparisons


@pytest.mark.parametrize("weights,normalize", [
    (None, True), ([0.2, 0.5, 1.3], True), ([0.2, -0.5, 1.3], False)])
def test_linear_matches_reference(prec, weights, normalize):
    base, models = setup_models(0, 3, prec.dtype)
    out = mergejax.linear(base, models, weights=weights, normalize=normalize)
    w = [1.0] * 3 if weights is None else weights
    xs = [floats(m) for m in models]
    expected = per_leaf(lambda _, ls: ref_linear(ls, w, normalize), None, xs)
    # The base only supplies the step counter (and dtypes): it is not averaged.
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


@pytest.mark.parametrize("weights,scale,normalize", [
    (None, 1.0, False),
    ([0.3, -0.7, 1.1], 0.6, False),
    ([0.3, -0.7, 1.1], 0.6, True),
    ([0.5, -0.25, -0.25], 2.0, True),  # |sum w| < 1e-8: the divisor is taken as 1
])
def test_task_arithmetic_matches_reference(prec, weights, scale, normalize):
    base, models = setup_models(1, 3, prec.dtype)
    out = mergejax.task_arithmetic(base, models, weights=weights, scale=scale,
                                   normalize=normalize)
    w = [1.0] * 3 if weights is None else weights
    expected = per_leaf(lambda b, xs: ref_task_arithmetic(b, xs, w, scale, normalize),
                        floats(base), [floats(m) for m in models])
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


@pytest.mark.parametrize("mode", ["base_to_model", "model_to_model", "task_vectors"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_slerp_matches_reference(prec, mode, t):
    base, models = setup_models(2, 2, prec.dtype)
    b, x0, x1 = floats(base), floats(models[0]), floats(models[1])
    if mode == "base_to_model":  # mergekit: base_model is t=0
        out = mergejax.slerp(base, [models[0]], t=t)
        expected = {p: ref_slerp(t, b[p], x0[p]) for p in PATHS}
        like = base
    elif mode == "model_to_model":
        out = mergejax.slerp(None, models, t=t)
        expected = {p: ref_slerp(t, x0[p], x1[p]) for p in PATHS}
        like = models[0]
    else:  # slerp between the task vectors, added back to the base
        out = mergejax.slerp(base, models, t=t)
        expected = {p: b[p] + ref_slerp(t, x0[p] - b[p], x1[p] - b[p]) for p in PATHS}
        like = base
    check_tree(out, expected, like, rtol=prec.rtol, atol=prec.atol)


@pytest.mark.parametrize("cos", [0.3, -0.8])
def test_slerp_gradients_match_finite_differences_of_the_reference(cos):
    """Gradients with respect to both endpoints and ``t`` (the one-pass dot and norms has
    its own JVP) against central differences of the NumPy reference, in float64."""
    rng = np.random.default_rng(11)
    v0 = rng.standard_normal((3, 4))
    v1 = _at_cosine(rng, v0, cos, 1.7)
    weights = rng.standard_normal((3, 4))
    t = 0.3
    loss = lambda t, a, b: float(np.sum(weights * ref_slerp(t, a, b)))  # noqa: E731
    with x64():
        grads = jax.grad(lambda t, a, b: jnp.sum(weights * basic.slerp_arrays(t, a, b)),
                         argnums=(0, 1, 2))(t, jnp.asarray(v0), jnp.asarray(v1))
    h = 1e-6
    for arg, got in zip(range(3), grads):
        point = [t, v0, v1]
        if arg == 0:
            want = (loss(t + h, v0, v1) - loss(t - h, v0, v1)) / (2 * h)
        else:
            want = np.zeros_like(point[arg])
            for i in np.ndindex(want.shape):
                up, down = [np.array(x, copy=True) for x in point[1:]], [
                    np.array(x, copy=True) for x in point[1:]]
                up[arg - 1][i] += h
                down[arg - 1][i] -= h
                want[i] = (loss(t, *up) - loss(t, *down)) / (2 * h)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-8)


def test_slerp_gradients_are_finite_at_a_zero_endpoint():
    """A zero tensor is left unnormalised (theta = pi/2); its norm's derivative is taken as
    0 there, so gradients stay finite (the derivative of a square root at 0 is not)."""
    v0, v1 = jnp.zeros((3, 4)), jnp.ones((3, 4))
    grads = jax.grad(lambda a, b: jnp.sum(basic.slerp_arrays(0.3, a, b)), argnums=(0, 1))(
        v0, v1)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def _unit(v):
    return v / np.linalg.norm(v)


def _at_cosine(rng, v0: np.ndarray, cos: float, ratio: float) -> np.ndarray:
    """A tensor whose normalised dot with ``v0`` is ``cos``, with norm ratio*|v0|."""
    u0 = _unit(v0.ravel())
    w = rng.standard_normal(u0.size)
    w = _unit(w - np.dot(w, u0) * u0)
    v1 = ratio * np.linalg.norm(v0) * (cos * u0 + np.sqrt(max(0.0, 1 - cos * cos)) * w)
    return v1.reshape(v0.shape)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp(prec):
    rng = np.random.default_rng(3)
    b = rand_leaves(rng)
    x = {
        "dense/kernel": _at_cosine(rng, b["dense/kernel"], 0.99999, 2.0),  # nearly parallel
        "dense/bias": -3.0 * b["dense/bias"],                             # anti-parallel
        "conv/kernel": _at_cosine(rng, b["conv/kernel"], 0.3, 0.5),       # plain slerp
    }
    base, model = make_tree(b, 7, prec.dtype), make_tree(x, 9, prec.dtype)
    t = 0.3
    out = mergejax.slerp(base, [model], t=t)
    bi, xi = floats(base), floats(model)
    expected = {p: ref_slerp(t, bi[p], xi[p]) for p in PATHS}
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)
    got = floats(out)
    for p in ("dense/kernel", "dense/bias"):  # the fallback is lerp of the ORIGINAL tensors
        np.testing.assert_allclose(got[p], (1 - t) * bi[p] + t * xi[p], rtol=prec.rtol,
                                   atol=prec.atol)
    assert not np.allclose(got["conv/kernel"], (1 - t) * bi["conv/kernel"]
                           + t * xi["conv/kernel"], rtol=1e-3, atol=0)


def test_slerp_threshold_sides_and_zero_tensor(prec):
    """cos = 0.999 is below the 0.9995 threshold (slerp, which is measurably not lerp);
    cos = 0.9999 is above it (lerp); a zero tensor stays unnormalised (theta = pi/2)."""
    rng = np.random.default_rng(4)
    b = rand_leaves(rng)
    b["conv/kernel"] = np.zeros(SHAPES["conv/kernel"])
    x = {"dense/kernel": _at_cosine(rng, b["dense/kernel"], 0.999, 1.5),
         "dense/bias": _at_cosine(rng, b["dense/bias"], 0.9999, 0.7),
         "conv/kernel": rng.standard_normal(SHAPES["conv/kernel"])}
    base, model = make_tree(b, 7, prec.dtype), make_tree(x, 9, prec.dtype)
    t = 0.5
    out = mergejax.slerp(base, [model], t=t)
    bi, xi = floats(base), floats(model)
    check_tree(out, {p: ref_slerp(t, bi[p], xi[p]) for p in PATHS}, base,
               rtol=prec.rtol, atol=prec.atol)
    got = floats(out)
    lerp = {p: (1 - t) * bi[p] + t * xi[p] for p in PATHS}
    # Below the threshold the slerp weights sum to 1/cos(theta/2) > 1: about 2.5e-4 off lerp.
    assert not np.allclose(got["dense/kernel"], lerp["dense/kernel"], rtol=1e-4, atol=0)
    np.testing.assert_allclose(got["dense/bias"], lerp["dense/bias"], rtol=prec.rtol,
                               atol=prec.atol)
    np.testing.assert_allclose(got["conv/kernel"], np.sin(t * np.pi / 2) * xi["conv/kernel"],
                               rtol=prec.rtol, atol=prec.atol)


def test_nearswap_matches_reference(prec):
    rng = np.random.default_rng(5)
    b = rand_leaves(rng)
    t = 0.1
    diff = {}
    for p, s in SHAPES.items():
        # Every leaf gets equal entries (0), near ones (|d| <= t) and far ones (|d| > t).
        d = np.resize([0.0, 0.04, 0.5, -0.07, -2.0, 0.1, 0.0, -0.1], s)
        diff[p] = d * (1.0 + 0.01 * rng.random(s))  # keep exact zeros exact
    base = make_tree(b, 7, prec.dtype)
    model = make_tree(add(floats(base), diff), 9, prec.dtype)
    out = mergejax.nearswap(base, [model], t=t)
    bi, xi = floats(base), floats(model)
    check_tree(out, {p: ref_nearswap(t, bi[p], xi[p]) for p in PATHS}, base,
               rtol=prec.rtol, atol=prec.atol)
    got = floats(out)
    for p in PATHS:
        d = xi[p] - bi[p]
        equal = d == 0
        near = (np.abs(d) <= t) & ~equal
        far = np.abs(d) > t
        assert equal.any() and near.any() and far.any()
        np.testing.assert_array_equal(got[p][equal], bi[p][equal])  # equal values: base
        np.testing.assert_allclose(got[p][near], xi[p][near], rtol=prec.rtol, atol=prec.atol)
        np.testing.assert_allclose(got[p][far], bi[p][far] + t * np.sign(d[far]),
                                   rtol=prec.rtol, atol=prec.atol)


def test_nearswap_below_the_difference_floor(prec):
    """For |a - b| < 1e-6 the newest rule divides by the 1e-6 floor, not by |a - b|
    (the older rule), so w = t / 1e-6 there. Values near 0 keep the tiny steps visible."""
    t = 1e-7
    d = np.resize([5e-7, -2e-7, 4e-6, 0.0], 12)
    b = {p: np.resize([0.0, 1e-3, -2e-3], s) for p, s in SHAPES.items()}
    x = {p: b[p] + np.resize(d, s) for p, s in SHAPES.items()}
    base, model = make_tree(b, 7, prec.dtype), make_tree(x, 9, prec.dtype)
    out = mergejax.nearswap(base, [model], t=t)
    bi, xi = floats(base), floats(model)
    expected = {p: ref_nearswap(t, bi[p], xi[p]) for p in PATHS}
    # float32 rounding near |x| = 2e-3 is ~1e-10; the old rule would be off by >= 2e-8.
    atol = 2e-10 if prec.dtype == jnp.float32 else 1e-15
    check_tree(out, expected, base, rtol=prec.rtol, atol=atol)
    step = floats(out)["dense/kernel"] - bi["dense/kernel"]
    diff = xi["dense/kernel"] - bi["dense/kernel"]
    small = (np.abs(diff) < 1e-6) & (diff != 0)
    assert small.sum() >= 4
    np.testing.assert_allclose(step[small], 0.1 * diff[small], rtol=1e-3, atol=atol)


def test_nearswap_identical_models_and_tiny_t():
    base, _ = setup_models(6, 0, jnp.float32)
    twin = make_tree(floats(base), 9)
    for t in (1e-9, 0.5):  # t below the 1e-6 floor still returns the (equal) values
        out = mergejax.nearswap(base, [twin], t=t)
        check_tree(out, floats(base), base, rtol=1e-6, atol=0)
    with pytest.raises(MergeError):
        mergejax.nearswap(base, [twin])  # t is required (no default in mergekit)


@pytest.mark.parametrize("with_base,weights,normalize_weights", [
    (True, None, True), (False, [1.0, 2.0, 0.5], True), (True, [0.2, 0.3, 0.1], False),
    (False, [0.2, 0.3, 0.1], False)])
def test_multislerp_matches_reference(prec, with_base, weights, normalize_weights):
    base, models = setup_models(7, 3, prec.dtype, delta_scale=0.8)
    w = [1.0] * 3 if weights is None else weights
    out = mergejax.multislerp(base if with_base else None, models, weights=weights,
                              normalize_weights=normalize_weights)
    expected = per_leaf(lambda b, xs: ref_multislerp(b, xs, w, normalize_weights),
                        floats(base) if with_base else None, [floats(m) for m in models])
    check_tree(out, expected, base if with_base else models[0], rtol=prec.rtol,
               atol=prec.atol)


def test_multislerp_one_model_is_returned_unchanged(prec):
    base, models = setup_models(8, 1, prec.dtype)
    out = mergejax.multislerp(base, models, weights=[3.0])
    # mergekit: one non-base tensor is returned as is (no base add-back).
    check_tree(out, per_leaf(lambda b, xs: ref_multislerp(b, xs, [3.0]), floats(base),
                             [floats(models[0])]), base, rtol=0, atol=0)


def test_multislerp_two_antipodal_task_vectors_fall_back_to_linear(prec):
    """Task vectors tau and -2 tau with equal weights: the mean of the unit vectors
    vanishes, and mergekit returns the weighted linear combination (-tau/2) + base.
    Values lie on a dyadic grid so that the differences are exact in every dtype."""
    rng = np.random.default_rng(9)
    b = {p: rng.integers(-32, 32, size=s) / 8.0 for p, s in SHAPES.items()}
    tau = {p: rng.choice([-1.0, -0.75, -0.5, 0.5, 0.75, 1.0], size=s)
           for p, s in SHAPES.items()}
    base = make_tree(b, 7, prec.dtype)
    m0 = make_tree(add(b, tau), 8, prec.dtype)
    m1 = make_tree(add(b, tau, -2.0), 9, prec.dtype)
    bi, x0, x1 = floats(base), floats(m0), floats(m1)
    for p in PATHS:
        np.testing.assert_array_equal(x0[p] - bi[p], tau[p])
        np.testing.assert_array_equal(x1[p] - bi[p], -2.0 * tau[p])
    out = mergejax.multislerp(base, [m0, m1])
    expected = per_leaf(lambda bb, xs: ref_multislerp(bb, xs, [1.0, 1.0]), bi, [x0, x1])
    for p in PATHS:
        np.testing.assert_allclose(expected[p], bi[p] - 0.5 * tau[p], rtol=1e-12)
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


@pytest.mark.parametrize("max_iter", [1, 10])
def test_karcher_matches_reference(prec, max_iter):
    _, models = setup_models(10, 3, prec.dtype, delta_scale=1.0)
    out = mergejax.karcher(None, models, max_iter=max_iter)
    expected = per_leaf(lambda _, xs: ref_karcher(xs, max_iter=max_iter), None,
                        [floats(m) for m in models])
    check_tree(out, expected, models[0], rtol=prec.rtol, atol=prec.atol)


def test_karcher_base_is_one_more_input_in_mergekit(prec):
    """mergekit adds base_model to the inputs; mergejax reproduces that with base=None."""
    base, models = setup_models(11, 2, prec.dtype, delta_scale=1.0)
    out = mergejax.karcher(None, [base] + models)
    expected = per_leaf(lambda _, xs: ref_karcher(xs), None,
                        [floats(base)] + [floats(m) for m in models])
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


def test_karcher_with_base_averages_task_vectors(prec):
    """Documented mergejax extension: with a base, the Karcher mean of the task vectors
    (mergekit's rule applied to them) is added back to the base."""
    base, models = setup_models(12, 3, prec.dtype, delta_scale=1.0)
    out = mergejax.karcher(base, models)
    expected = per_leaf(lambda b, xs: b + ref_karcher([x - b for x in xs]), floats(base),
                        [floats(m) for m in models])
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


def test_karcher_zero_and_tiny_norm_inputs(prec):
    rng = np.random.default_rng(13)
    x0, x1 = rand_leaves(rng), rand_leaves(rng)
    zero = {p: np.zeros(s) for p, s in SHAPES.items()}
    tiny = {p: 1e-7 * rng.standard_normal(s) for p, s in SHAPES.items()}  # 0 < |x| <= tol
    models = [make_tree(x0, 1, prec.dtype), make_tree(zero, 2, prec.dtype),
              make_tree(x1, 3, prec.dtype)]
    out = mergejax.karcher(None, models)
    xs = [floats(m) for m in models]
    expected = per_leaf(lambda _, ls: ref_karcher(ls), None, xs)
    check_tree(out, expected, models[0], rtol=prec.rtol, atol=prec.atol)
    # The zero input drops out of the direction but still counts in the scale (1/3 of it).
    got = floats(out)
    two = per_leaf(lambda _, ls: ref_karcher(ls), None, [xs[0], xs[2]])
    for p in PATHS:
        np.testing.assert_allclose(got[p], two[p] * (2.0 / 3.0), rtol=1e-4, atol=1e-5)
    # A tiny (but nonzero) input and the all-zero case.
    models_tiny = [make_tree(x0, 1, prec.dtype), make_tree(tiny, 2, prec.dtype),
                   make_tree(x1, 3, prec.dtype)]
    out = mergejax.karcher(None, models_tiny)
    expected = per_leaf(lambda _, ls: ref_karcher(ls), None, [floats(m) for m in models_tiny])
    check_tree(out, expected, models_tiny[0], rtol=prec.rtol, atol=prec.atol)
    zeros = [make_tree(zero, i, prec.dtype) for i in range(3)]
    check_tree(mergejax.karcher(None, zeros), zero, zeros[0], rtol=0, atol=0)


def test_karcher_one_model_is_identity(prec):
    _, models = setup_models(14, 1, prec.dtype)
    out = mergejax.karcher(None, models)
    check_tree(out, floats(models[0]), models[0], rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_matches_reference(prec, n):
    rng = np.random.default_rng(15 + n)
    b = rand_leaves(rng)
    common = rand_leaves(rng, 0.5)
    base = make_tree(b, 7, prec.dtype)
    models = [make_tree(add(add(b, common), rand_leaves(rng, 0.5)), 100 + i, prec.dtype)
              for i in range(n)]
    out = mergejax.model_stock(base, models)
    expected = per_leaf(ref_model_stock, floats(base), [floats(m) for m in models])
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


def test_model_stock_negative_cosine_extrapolates(prec):
    rng = np.random.default_rng(18)
    b = rand_leaves(rng)
    tau = rand_leaves(rng, 0.5)
    other = {p: -0.5 * tau[p] + 0.2 * rng.standard_normal(s) for p, s in SHAPES.items()}
    base = make_tree(b, 7, prec.dtype)
    models = [make_tree(add(b, tau), 8, prec.dtype), make_tree(add(b, other), 9, prec.dtype)]
    out = mergejax.model_stock(base, models)
    expected = per_leaf(ref_model_stock, floats(base), [floats(m) for m in models])
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


def test_model_stock_degenerate_cases_return_base(prec):
    base, _ = setup_models(19, 0, prec.dtype)
    bi = floats(base)
    # Zero task vectors: cos = 0, t = 0.
    same = [make_tree(bi, 100 + i, prec.dtype) for i in range(3)]
    check_tree(mergejax.model_stock(base, same), bi, base, rtol=0, atol=0)
    # N = 2 with opposite task vectors tau and -2 tau: c = -1, 1 + (N-1)c = 0, so t = 0
    # (2026 guard; classic versions give inf/nan) even though mean(models) != base.
    # Dyadic values keep the differences exact, so the cosine is exactly -1.
    rng = np.random.default_rng(20)
    b = {p: rng.integers(-32, 32, size=s) / 8.0 for p, s in SHAPES.items()}
    tau = {p: rng.choice([-1.0, -0.5, 0.25, 0.75], size=s) for p, s in SHAPES.items()}
    base2 = make_tree(b, 7, prec.dtype)
    opposite = [make_tree(add(b, tau), 8, prec.dtype),
                make_tree(add(b, tau, -2.0), 9, prec.dtype)]
    expected = per_leaf(ref_model_stock, b, [floats(m) for m in opposite])
    for p in PATHS:
        np.testing.assert_array_equal(expected[p], b[p])
    check_tree(mergejax.model_stock(base2, opposite), b, base2, rtol=0, atol=0)
    # Fewer than 3 tensors (base + one fine-tune) raises.
    with pytest.raises(ValueError):
        mergejax.model_stock(base, same[:1])


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_metagpt_matches_reference(prec, scope):
    base, models = setup_models(21, 3, prec.dtype)
    out = mergejax.metagpt(base, models, scope=scope)
    expected = ref_metagpt(floats(base), [floats(m) for m in models], scope)
    check_tree(out, expected, base, rtol=prec.rtol, atol=prec.atol)


def test_metagpt_global_and_tensor_scopes_differ():
    """Model 0 moves the matrix a lot and the rest a little; model 1 the opposite, so the
    per-tensor ratios differ from the whole-model ones."""
    rng = np.random.default_rng(22)
    b = rand_leaves(rng)
    big = {"dense/kernel": 3.0, "dense/bias": 0.1, "conv/kernel": 0.2}
    t0 = {p: big[p] * rng.standard_normal(s) for p, s in SHAPES.items()}
    t1 = {p: (3.2 - big[p]) * 0.3 * rng.standard_normal(s) for p, s in SHAPES.items()}
    base = make_tree(b, 7)
    models = [make_tree(add(b, t0), 8), make_tree(add(b, t1), 9)]
    xs = [floats(m) for m in models]
    out_g = mergejax.metagpt(base, models, scope="global")
    out_t = mergejax.metagpt(base, models, scope="tensor")
    ref_g = ref_metagpt(floats(base), xs, "global")
    ref_t = ref_metagpt(floats(base), xs, "tensor")
    check_tree(out_g, ref_g, base, rtol=1e-5, atol=1e-5)
    check_tree(out_t, ref_t, base, rtol=1e-5, atol=1e-5)
    for p in PATHS:
        assert not np.allclose(floats(out_g)[p], floats(out_t)[p], rtol=1e-3, atol=1e-3), p
    # Default scope is the paper's whole-model form.
    check_tree(mergejax.metagpt(base, models), ref_g, base, rtol=1e-5, atol=1e-5)


def test_metagpt_zero_task_vectors_and_single_task(prec):
    base, models = setup_models(23, 1, prec.dtype)
    bi = floats(base)
    same = [make_tree(bi, 100 + i, prec.dtype) for i in range(2)]
    for scope in ("global", "tensor"):
        check_tree(mergejax.metagpt(base, same, scope=scope), bi, base, rtol=0, atol=0)
        # One task: lambda = 1, the fine-tune itself.
        check_tree(mergejax.metagpt(base, models, scope=scope), floats(models[0]), base,
                   rtol=prec.rtol, atol=prec.atol)


# ------------------------------------------------------------------------ greedy soup


def _distance_score(target: dict[str, np.ndarray]):
    def evaluate(params) -> float:
        leaves = params if set(params) == set(PATHS) else floats(params)
        return -float(sum(np.sum((np.asarray(leaves[p], np.float64) - target[p]) ** 2)
                          for p in PATHS))
    return evaluate


def test_greedy_soup_known_answer():
    """Models at target + c*D + e*E (D, E orthonormal), score = -|theta - target|^2 =
    -(c^2 + e^2). By construction the best soup is {a, b}: adding the duplicate of a ties
    (rejected on strict >), adding e or far makes it worse."""
    rng = np.random.default_rng(24)
    target = rand_leaves(rng)
    q, _ = np.linalg.qr(rng.standard_normal((SIZE, 2)))
    d, e = q[:, 0], q[:, 1]

    def at(c, s, step):
        return make_tree(unflatten(flatten(target) + c * d + s * e), step)

    a = at(1.0, 0.0, 1)            # score -1
    b = at(-1.1, 0.0, 2)           # score -1.21; avg(a, b) has c = -0.05: score -0.0025
    e_model = at(0.0, 1.5, 3)      # score -2.25; avg(a, b, e) scores about -0.251
    far = at(3.0, 0.0, 4)          # score -9; avg(a, b, far) scores about -0.934
    dup = jax.tree.map(lambda x: x, a)  # same values as a: score ties with a
    models = [a, b, e_model, far, dup]
    evaluate = _distance_score(target)

    result = mergejax.greedy_soup_search(models, evaluate)
    assert result.ingredients == [0, 1]  # equal scores keep the models' order: a before dup
    assert int(result.soup["step"]) == 1  # non-float leaves come from the best model, a
    np.testing.assert_allclose(result.scores, [-1.0, -1.21, -2.25, -9.0, -1.0], rtol=1e-5)
    fa, fb = floats(a), floats(b)
    expected = {p: (fa[p] + fb[p]) / 2 for p in PATHS}
    np.testing.assert_allclose(evaluate(result.soup), -0.05 ** 2, rtol=1e-3)
    for p in PATHS:
        np.testing.assert_allclose(floats(result.soup)[p], expected[p], rtol=1e-6, atol=1e-6)
    # The registered wrapper and merge() give the same soup.
    for soup in (mergejax.greedy_soup(None, models, evaluate=evaluate),
                 mergejax.merge("greedy_soup", None, models, evaluate=evaluate)):
        for p in PATHS:
            np.testing.assert_allclose(floats(soup)[p], expected[p], rtol=1e-6, atol=1e-6)


def test_greedy_soup_nothing_improves_returns_best_model():
    rng = np.random.default_rng(25)
    target = rand_leaves(rng)
    direction = _unit(rng.standard_normal(SIZE))
    models = [make_tree(unflatten(flatten(target) + c * direction), i)
              for i, c in enumerate([2.0, 1.0, 3.0])]  # same side: averaging only hurts
    result = mergejax.greedy_soup_search(models, _distance_score(target))
    assert result.ingredients == [1]
    check_tree(result.soup, floats(models[1]), models[1], rtol=0, atol=0)


@pytest.mark.parametrize("seed", [26, 27, 28])
def test_greedy_soup_matches_reference(seed):
    rng = np.random.default_rng(seed)
    target = rand_leaves(rng)
    sigmas = rng.uniform(0.5, 1.2, size=6)
    models = [make_tree(add(target, rand_leaves(rng, s)), i) for i, s in enumerate(sigmas)]
    evaluate = _distance_score(target)
    kept, soup, scores = ref_greedy_soup([floats(m) for m in models], evaluate)
    result = mergejax.greedy_soup_search(models, evaluate)
    assert 1 < len(kept) < len(models)  # exercises both acceptance and rejection
    assert result.ingredients == kept
    np.testing.assert_allclose(result.scores, scores, rtol=1e-6)
    got = floats(result.soup)
    for p in PATHS:
        np.testing.assert_allclose(got[p], soup[p], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ property tests

SEEDS = st.integers(0, 2**31 - 1)
SCALES = st.sampled_from([0.01, 1.0, 30.0])


def _merge_copies(name: str, base, theta, k: int, rng):
    """``name`` applied to k copies of theta (with ``base`` where the method takes one)."""
    w = list(rng.uniform(0.5, 2.0, size=k))
    if name == "linear":
        return mergejax.linear(base, [theta] * k, weights=w)
    if name == "task_arithmetic":
        return mergejax.task_arithmetic(base, [theta] * k, weights=w, normalize=True)
    if name == "multislerp":
        return mergejax.multislerp(base, [theta] * k, weights=w)
    if name == "karcher":
        return mergejax.karcher(None, [theta] * k)
    if name == "karcher_base":
        return mergejax.karcher(base, [theta] * k)
    if name == "model_stock":
        return mergejax.model_stock(base, [theta] * max(k, 2))
    if name == "metagpt":
        return mergejax.metagpt(base, [theta] * k)
    if name == "metagpt_tensor":
        return mergejax.metagpt(base, [theta] * k, scope="tensor")
    if name == "slerp":
        t = float(rng.uniform())
        return {1: lambda: mergejax.slerp(theta, [theta], t=t),
                2: lambda: mergejax.slerp(None, [theta, theta], t=t),
                3: lambda: mergejax.slerp(base, [theta, theta], t=t)}[min(k, 3)]()
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "multislerp", "karcher",
                                  "karcher_base", "model_stock", "metagpt",
                                  "metagpt_tensor", "slerp"])
@PROPERTY_SETTINGS
@given(seed=SEEDS, k=st.integers(1, 3), scale=SCALES)
def test_merging_copies_returns_theta(name, seed, k, scale):
    rng = np.random.default_rng(seed)
    b = rand_leaves(rng)
    base = make_tree(b, 7)
    theta = make_tree(add(b, rand_leaves(rng, scale)), 11)
    out = _merge_copies(name, base, theta, k, rng)
    like = theta if name in ("karcher",) or (name == "slerp" and k <= 2) else base
    check_tree(out, floats(theta), like, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@PROPERTY_SETTINGS
@given(seed=SEEDS, k=st.integers(1, 3))
def test_task_arithmetic_scale_zero_returns_base(seed, k):
    rng = np.random.default_rng(seed)
    base = make_tree(rand_leaves(rng), 7)
    models = [make_tree(rand_leaves(rng, 3.0), i) for i in range(k)]
    out = mergejax.task_arithmetic(base, models, weights=list(rng.normal(size=k)), scale=0.0)
    check_tree(out, floats(base), base, rtol=0, atol=0)


@PROPERTY_SETTINGS
@given(seed=SEEDS, w=st.floats(0.1, 10.0))
def test_linear_of_one_model_is_identity(seed, w):
    rng = np.random.default_rng(seed)
    theta = make_tree(rand_leaves(rng, 5.0), 3)
    check_tree(mergejax.linear(None, [theta]), floats(theta), theta, rtol=0, atol=0)
    check_tree(mergejax.linear(None, [theta], weights=[w]), floats(theta), theta,
               rtol=1e-6, atol=0)


def _merge(name: str, base, models):
    if name == "linear":
        return mergejax.linear(base, models)
    if name == "task_arithmetic":
        return mergejax.task_arithmetic(base, models, scale=0.7)
    if name == "multislerp":
        return mergejax.multislerp(base, models)
    if name == "karcher":
        return mergejax.karcher(None, models)
    if name == "model_stock":
        return mergejax.model_stock(base, models)
    if name == "metagpt":
        return mergejax.metagpt(base, models)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "multislerp", "karcher",
                                  "model_stock", "metagpt"])
@PROPERTY_SETTINGS
@given(seed=SEEDS, k=st.integers(2, 4))
def test_symmetric_methods_ignore_model_order(name, seed, k):
    base, models = setup_models(seed, k, jnp.float32)
    perm = np.random.default_rng(seed).permutation(k)
    if list(perm) == list(range(k)):
        perm = perm[::-1]
    a = _merge(name, base, models)
    b = _merge(name, base, [models[i] for i in perm])
    # Float leaves agree up to summation order; the step counter comes from the base.
    like = models[0] if name == "karcher" else base
    check_tree(a, floats(b), like, rtol=1e-5, atol=5e-5)
    check_tree(b, floats(a), base if name != "karcher" else models[perm[0]], rtol=1e-5,
               atol=5e-5)


@pytest.mark.parametrize("mode", ["base_to_model", "model_to_model", "task_vectors"])
@PROPERTY_SETTINGS
@given(seed=SEEDS, scale=SCALES)
def test_slerp_endpoints(mode, seed, scale):
    base, models = setup_models(seed, 2, jnp.float32, delta_scale=scale)
    if mode == "base_to_model":
        run = lambda t: mergejax.slerp(base, models[:1], t=t)  # noqa: E731
        ends, like = (base, models[0]), base
    elif mode == "model_to_model":
        run = lambda t: mergejax.slerp(None, models, t=t)  # noqa: E731
        ends, like = (models[0], models[1]), models[0]
    else:
        run = lambda t: mergejax.slerp(base, models, t=t)  # noqa: E731
        ends, like = (models[0], models[1]), base
    check_tree(run(0.0), floats(ends[0]), like, rtol=1e-5, atol=1e-5)
    check_tree(run(1.0), floats(ends[1]), like, rtol=1e-5, atol=1e-5)


BF16_REFERENCES = {
    "linear": (lambda base, ms: mergejax.linear(base, ms),
               lambda b, xs: per_leaf(lambda _, ls: ref_linear(ls, [1.0] * len(ls)), None, xs)),
    "task_arithmetic": (
        lambda base, ms: mergejax.task_arithmetic(base, ms, scale=0.5),
        lambda b, xs: per_leaf(lambda bb, ls: ref_task_arithmetic(bb, ls, [1.0] * len(ls),
                                                                  0.5), b, xs)),
    "slerp": (lambda base, ms: mergejax.slerp(base, ms[:1], t=0.4),
              lambda b, xs: {p: ref_slerp(0.4, b[p], xs[0][p]) for p in PATHS}),
    "nearswap": (lambda base, ms: mergejax.nearswap(base, ms[:1], t=0.2),
                 lambda b, xs: {p: ref_nearswap(0.2, b[p], xs[0][p]) for p in PATHS}),
    "multislerp": (lambda base, ms: mergejax.multislerp(base, ms),
                   lambda b, xs: per_leaf(lambda bb, ls: ref_multislerp(bb, ls, [1.0] * 3),
                                          b, xs)),
    "karcher": (lambda base, ms: mergejax.karcher(None, ms),
                lambda b, xs: per_leaf(lambda _, ls: ref_karcher(ls), None, xs)),
    "model_stock": (lambda base, ms: mergejax.model_stock(base, ms),
                    lambda b, xs: per_leaf(ref_model_stock, b, xs)),
    "metagpt": (lambda base, ms: mergejax.metagpt(base, ms),
                lambda b, xs: ref_metagpt(b, xs, "global")),
}


@pytest.mark.parametrize("name", sorted(BF16_REFERENCES))
@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_bf16_inputs_give_bf16_outputs(name, seed):
    base, models = setup_models(seed, 3, jnp.bfloat16)
    run, reference = BF16_REFERENCES[name]
    out = run(base, models)
    expected = reference(floats(base), [floats(m) for m in models])
    like = models[0] if name in ("karcher",) else base
    for path, leaf in walk(out):
        want = jnp.int32 if path == "step" else jnp.bfloat16
        assert jnp.result_type(leaf) == want, path
    # Computed in float32 from the bf16 values, then rounded once to bf16 (2^-8 relative).
    check_tree(out, expected, like, rtol=1e-2, atol=1e-2)
