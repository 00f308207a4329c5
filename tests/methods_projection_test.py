"""DOGE and DOP against small, independent NumPy references.

The references below are written from the definitions in ``notes/refs_datafree_b.md``
(FusionBench's ``doge_ta.py`` and ``dop.py``, Sener and Koltun's min-norm solver) in float64,
with their own Adam loop and analytic gradients (checked against finite differences
here); none of it calls mergejax code. Inputs are dyadic, so task vectors are exact in
float32 and magnitudes are distinct within each task (no ties at a top-k threshold).

Leaves: a Flax Dense kernel (3, 10) and a 3-D attention kernel (4, 2, 3) are matrices
(``matrix_split="auto"``); a bias and a 3-D convolution kernel are not. The Dense kernel's
(out, in) view (10, 3) is over twice its rank on the output side, so DOP takes its factored
product there and the Gram products elsewhere.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, walk, x64

import mergejax
from mergejax import MergeError, PathRules
from mergejax import method as method_lib
from mergejax.methods import projection

SHAPES = {"dense/kernel": (3, 10), "dense/bias": (10,), "attn/query/kernel": (4, 2, 3),
          "conv/kernel": (2, 3, 2)}
MATRICES = ("dense/kernel", "attn/query/kernel")
PATHS = tuple(SHAPES)
SIZE = sum(math.prod(s) for s in SHAPES.values())
ADAM = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # optax / torch defaults


def dyadic(seed: int, k: int, shapes=SHAPES, dtype=jnp.float32):
    """A base and k fine-tunes with task vectors exact in float32 and distinct magnitudes
    over the whole model within each task."""
    rng = np.random.default_rng(seed)
    size = sum(math.prod(s) for s in shapes.values())
    b = {p: rng.integers(-48, 48, size=s) / 16.0 for p, s in shapes.items()}
    models = []
    for i in range(k):
        flat = (rng.permutation(size) + 1) / 256.0 * rng.choice([-1.0, 1.0], size=size)
        tau, at = {}, 0
        for p, s in shapes.items():
            n = math.prod(s)
            tau[p] = flat[at:at + n].reshape(s)
            at += n
        models.append(make_tree({p: b[p] + tau[p] for p in shapes}, 100 + i, dtype))
    return make_tree(b, 7, dtype), models


def view(a: np.ndarray, layout: str = "in_out") -> np.ndarray:
    """The (out, in) matrix of a leaf split after its first axis."""
    m = a.reshape(a.shape[0], -1)
    return m.T if layout == "in_out" else m


def unview(m: np.ndarray, shape, layout: str = "in_out") -> np.ndarray:
    return (m.T if layout == "in_out" else m).reshape(shape)


def ref_adam(grad_fn, x0: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """Adam (Kingma and Ba) with bias correction, as torch.optim.Adam and optax.adam."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    for t in range(1, steps + 1):
        g = grad_fn(x)
        m = ADAM["b1"] * m + (1 - ADAM["b1"]) * g
        v = ADAM["b2"] * v + (1 - ADAM["b2"]) * g * g
        mh, vh = m / (1 - ADAM["b1"] ** t), v / (1 - ADAM["b2"] ** t)
        x = x - lr * mh / (np.sqrt(vh) + ADAM["eps"])
    return x


def finite_difference(loss, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (loss(x + e) - loss(x - e)) / (2 * h)
    return g


# ------------------------------------------------------------------ DOGE reference


def ref_projector(taus: np.ndarray, subspace: float) -> np.ndarray:
    """FusionBench DOGE_TA: each task's top n // K left singular vectors side by side,
    then the top int(n / subspace) left singular vectors of that: P = U_k U_k^T."""
    k, p, q = taus.shape
    n = min(p, q)
    r = n // k
    stacked = np.concatenate([np.linalg.svd(t)[0][:, :r] for t in taus], axis=1)
    u = np.linalg.svd(stacked)[0][:, :int(n / subspace)]
    return u @ u.T


def doge_loss(taus, lam, delta):
    """sum_j sum_rows (sum_cols tau_j * (tau_j - M))^2, M = sum_i lam_i (tau_i + delta)."""
    m = np.einsum("k,kpq->pq", lam, taus + delta)
    return float(sum(np.sum(np.sum(t * (t - m), axis=1) ** 2) for t in taus))


def doge_grad(taus, lam, delta):
    m = np.einsum("k,kpq->pq", lam, taus + delta)
    rows = [np.sum(t * (t - m), axis=1) for t in taus]
    return lam.sum() * sum(-2.0 * r[:, None] * t for r, t in zip(rows, taus))


def kth_threshold(values: np.ndarray, density: float) -> float:
    """FusionBench topk_values_mask: |x| >= kthvalue(d - int(d * density)) (smallest);
    density 1 keeps everything."""
    d = values.size
    k = d - int(d * density)
    return -np.inf if k == 0 else float(np.sort(np.abs(values).ravel())[k - 1])


def ref_doge(b, xs, *, scale=0.07, lr=1e-4, steps=400, subspace=6, density=0.3,
             scope="global", nonmatrix="base"):
    taus = {p: np.stack([view(x[p] - b[p]) for x in xs]) for p in MATRICES}
    k = len(xs)
    if scope == "global":
        flat = [np.concatenate([taus[p][j].ravel() for p in MATRICES]) for j in range(k)]
        thr = {p: [kth_threshold(flat[j], density) for j in range(k)] for p in MATRICES}
    else:
        thr = {p: [kth_threshold(taus[p][j], density) for j in range(k)] for p in MATRICES}
    out = {}
    for p in PATHS:
        if p not in MATRICES:
            out[p] = b[p] if nonmatrix == "base" else np.mean([x[p] for x in xs], axis=0)
            continue
        t = taus[p]
        lam = scale / np.sqrt(np.sum(t * t, axis=(1, 2)))
        proj = ref_projector(t, subspace)
        delta = ref_adam(lambda d, t=t, lam=lam, proj=proj:
                         (np.eye(len(proj)) - proj) @ doge_grad(t, lam, d),
                         np.zeros(t.shape[1:]), lr, steps)
        merged = sum(lam[j] * (t[j] + delta) * (np.abs(t[j]) >= thr[p][j]) for j in range(k))
        out[p] = b[p] + unview(merged, SHAPES[p])
    return out


# ------------------------------------------------------------------- DOP reference


def sk_pair(v11, v12, v22):
    """Sener and Koltun's _min_norm_element_from2: (weight on x1, squared norm)."""
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return gamma, v22 + gamma * (v12 - v22)


def dop_terms(tau, eps, space):
    """(U_r S_r, V_r S_r) of tau's SVD, r = searchsorted(cumsum(S) / sum(S), eps)."""
    u, s, vt = np.linalg.svd(tau, full_matrices=False)
    r = int(np.searchsorted(np.cumsum(s) / s.sum(), eps))
    us, vs = u[:, :r] * s[:r], vt[:r].T * s[:r]
    return (us if "u" in space else None), (vs if "v" in space else None)


def dop_loss(w, x, terms):
    """|S U^T (W - X)|^2 + |(W - X) V S|^2 (each term where its side is projected)."""
    us, vs = terms
    d = w - x
    return float((np.sum((us.T @ d) ** 2) if us is not None else 0.0)
                 + (np.sum((d @ vs) ** 2) if vs is not None else 0.0))


def dop_grad(w, x, terms):
    us, vs = terms
    d = w - x
    return ((2 * us @ (us.T @ d) if us is not None else 0.0)
            + (2 * (d @ vs) @ vs.T if vs is not None else 0.0))


def ref_dop_pair(b, xa, xb, *, lr, steps, alpha, mgda, ema, ema_beta, eps, space):
    """FusionBench DOP _optimize_weight for (merged, new) with their SVD terms."""
    xs = (xa, xb)
    terms = [dop_terms(x - b, eps, space) for x in xs]
    sol = [alpha, 1 - alpha]

    def grad(w):
        nonlocal sol
        g = [dop_grad(w, x, t) for x, t in zip(xs, terms)]
        if mgda:
            losses = [dop_loss(w, x, t) for x, t in zip(xs, terms)]
            n = [gi / li for gi, li in zip(g, losses)]
            c, _ = sk_pair(np.sum(n[0] * n[0]), np.sum(n[0] * n[1]), np.sum(n[1] * n[1]))
            new = [c, 1 - c]
            sol = [ema_beta * s + (1 - ema_beta) * c for s, c in zip(sol, new)] if ema else new
        return sol[0] * g[0] + sol[1] * g[1]

    return ref_adam(grad, (xa + xb) / 2, lr, steps)


def ref_dop(b, xs, *, lr=1e-4, steps=200, alpha=0.8, mgda=True, ema=True, ema_beta=0.999,
            svd_epsilon=0.99999, proj_space="uv", layout="in_out", shapes=SHAPES,
            matrices=MATRICES):
    """FusionBench ContinualDOPForCLIP in the given order (no shuffling)."""
    out = {}
    for p in shapes:
        m = xs[0][p]
        for x in xs[1:]:
            if p in matrices:
                merged = ref_dop_pair(view(b[p], layout), view(m, layout), view(x[p], layout),
                                      lr=lr, steps=steps, alpha=alpha, mgda=mgda, ema=ema,
                                      ema_beta=ema_beta, eps=svd_epsilon, space=proj_space)
                m = unview(merged, shapes[p], layout)
            else:
                m = (m + x[p]) / 2
        out[p] = m
    return out


# ------------------------------------------------------- the references' own checks


def test_reference_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    taus = rng.standard_normal((3, 4, 5))
    lam = rng.uniform(0.1, 1.0, 3)
    delta = rng.standard_normal((4, 5))
    np.testing.assert_allclose(doge_grad(taus, lam, delta),
                               finite_difference(lambda d: doge_loss(taus, lam, d), delta),
                               rtol=1e-6, atol=1e-6)
    x, w = rng.standard_normal((2, 4, 5))
    for space in ("u", "v", "uv"):
        terms = dop_terms(rng.standard_normal((4, 5)), 0.9, space)
        np.testing.assert_allclose(dop_grad(w, x, terms),
                                   finite_difference(lambda v, t=terms: dop_loss(v, x, t), w),
                                   rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- MGDA


def simplex_grid(k: int, n: int) -> np.ndarray:
    points = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([list(c) + [n - sum(c)] for c in points], np.float64) / n


@pytest.mark.parametrize("k,seed", [(3, 0), (3, 1), (4, 2), (5, 3)])
def test_min_norm_weights_beat_a_simplex_grid(k, seed):
    """K > 2: a point of the simplex whose norm is at most the best of a fine grid's."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((k, 6)) + rng.uniform(-1, 1, 6)  # conflicting gradients
    gram = g @ g.T
    solve = jax.jit(projection.min_norm_weights, static_argnames="iters")
    with x64():
        w = np.asarray(solve(jnp.asarray(gram)))
    grid = simplex_grid(k, {3: 200, 4: 60, 5: 24}[k])
    best = np.min(np.einsum("ni,ij,nj->n", grid, gram, grid))
    assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-12
    assert w @ gram @ w <= best + 1e-9
    # More iterations do not move it: the Frank-Wolfe steps have converged.
    with x64():
        w2 = np.asarray(solve(jnp.asarray(gram), iters=400))
    assert w @ gram @ w <= w2 @ gram @ w2 + 1e-4 * (w2 @ gram @ w2) + 1e-12


def test_min_norm_weights_two_tasks_closed_form():
    """Two gradients: the minimiser on the segment (grid check) where it is interior, and
    Sener and Koltun's 0.999 / 0.001 where it is a vertex."""
    rng = np.random.default_rng(4)
    grid = np.linspace(0, 1, 100001)
    solve = jax.jit(projection.min_norm_weights)
    for _ in range(5):
        a, b = rng.standard_normal((2, 5))
        b = b - 0.5 * a
        gram = np.array([[a @ a, a @ b], [a @ b, b @ b]])
        w = np.asarray(solve(jnp.asarray(gram, jnp.float32)))
        norms = (grid[:, None] * a + (1 - grid[:, None]) * b) ** 2
        best = grid[np.argmin(norms.sum(axis=1))]
        if 0 < best < 1:
            np.testing.assert_allclose(w, [best, 1 - best], atol=1e-4)
    # a inside the ball of b's projection: the optimum is a, reported as 0.999.
    a, b = np.array([1.0, 0.0]), np.array([2.0, 1.0])
    gram = np.array([[a @ a, a @ b], [a @ b, b @ b]])
    np.testing.assert_allclose(solve(jnp.asarray(gram, jnp.float32)), [0.999, 0.001],
                               atol=1e-7)
    np.testing.assert_allclose(solve(jnp.asarray(gram[::-1, ::-1], jnp.float32)),
                               [0.001, 0.999], atol=1e-7)
    np.testing.assert_array_equal(projection.min_norm_weights(jnp.ones((1, 1))), [1.0])


# ------------------------------------------------------------------------- DOGE

SUBSPACE = jax.jit(projection.shared_subspace, static_argnums=1)


@pytest.mark.parametrize("k,subspace", [(3, 6), (2, 2), (4, 1)])
def test_shared_subspace_matches_reference(k, subspace):
    rng = np.random.default_rng(5 + k)
    taus = rng.standard_normal((k, 12, 8))
    with x64():
        basis = np.asarray(SUBSPACE(jnp.asarray(taus), subspace))
    assert basis.shape == (12, int(8 / subspace))
    np.testing.assert_allclose(basis @ basis.T, ref_projector(taus, subspace), atol=1e-10)


def test_shared_subspace_drops_arbitrary_directions():
    rng = np.random.default_rng(8)
    taus = rng.standard_normal((3, 12, 8))
    with x64():
        # More tasks than ranks: no task contributes a direction.
        assert SUBSPACE(jnp.asarray(taus), 1).shape == (12, 6)
        assert SUBSPACE(jnp.zeros((9, 12, 8)), 1).shape == (12, 0)
        # A zero task vector contributes nothing; the basis spans only the other's.
        pair = jnp.asarray(np.stack([taus[0], np.zeros((12, 8))]))
        basis = np.asarray(SUBSPACE(pair, 1))
    u = np.linalg.svd(taus[0])[0][:, :4]
    np.testing.assert_allclose(basis @ basis.T, u @ u.T, atol=1e-10)


@pytest.mark.parametrize("k,steps,scope,subspace", [(3, 8, "global", 2), (1, 8, "global", 1),
                                                    (3, 1, "tensor", 2)])
def test_doge_matches_reference(k, steps, scope, subspace):
    """float32 against the float64 reference: the global top-k over both matrices, one
    task, and a single Adam step (``-lr * g / (|g| + eps)``) with per-tensor masks. (One
    task uses subspace=1: a single task's stacked singular vectors are orthonormal, so a
    smaller shared subspace is an arbitrary choice among equal singular values.)"""
    base, models = dyadic(10 + k, k)
    hp = {"scale": 0.3, "lr": 1e-2, "steps": steps, "subspace": subspace, "density": 0.4,
          "scope": scope}
    out = projection.doge(base, models, **hp)
    expected = ref_doge(floats(base), [floats(m) for m in models], **hp)
    check_tree(out, expected, base, rtol=1e-4, atol=1e-5)


def test_doge_float64_per_tensor_and_mean_rule():
    with x64():
        base, models = dyadic(14, 3, dtype=jnp.float64)
        hp = {"scale": 0.5, "lr": 5e-3, "steps": 20, "subspace": 3, "density": 0.6,
              "scope": "tensor", "nonmatrix": "mean"}
        out = projection.doge(base, models, **hp)
        expected = ref_doge(floats(base), [floats(m) for m in models], **hp)
        check_tree(out, expected, base, rtol=1e-9, atol=1e-11)


def test_doge_without_steps_is_normalised_task_arithmetic():
    """steps=0, density=1: theta_0 + scale * sum_j tau_j / |tau_j| on matrices; the
    other leaves keep the base. One task is therefore not returned as itself."""
    base, models = dyadic(15, 2)
    b, xs = floats(base), [floats(m) for m in models]
    expected = {p: b[p] + (sum(0.2 * (x[p] - b[p]) / np.linalg.norm(x[p] - b[p]) for x in xs)
                           if p in MATRICES else 0.0) for p in PATHS}
    hp = {"scale": 0.2, "steps": 0, "density": 1.0, "scope": "tensor"}
    check_tree(projection.doge(base, models, **hp), expected, base, rtol=1e-6, atol=1e-6)
    one = projection.doge(base, models[:1], **hp)
    assert not np.allclose(floats(one)["dense/kernel"], xs[0]["dense/kernel"], atol=1e-2)


def test_doge_loss_decreases():
    base, models = dyadic(16, 3)
    b, xs = floats(base), [floats(m) for m in models]
    out = floats(projection.doge(base, models, scale=0.5, lr=1e-2, steps=60, subspace=3,
                                 density=1.0, scope="tensor"))
    for p in MATRICES:
        taus = np.stack([view(x[p] - b[p]) for x in xs])
        lam = 0.5 / np.sqrt(np.sum(taus ** 2, axis=(1, 2)))
        delta = (view(out[p] - b[p]) - np.einsum("k,kpq->pq", lam, taus)) / lam.sum()
        assert np.abs(delta).max() > 1e-3
        assert doge_loss(taus, lam, delta) < 0.9 * doge_loss(taus, lam, 0 * delta), p


LAYOUT_SHAPES = {"dense/kernel": (6, 10), "dense/bias": (10,), "mlp/kernel": (2, 9)}


def _transposed(tree):
    return {k: (_transposed(v) if isinstance(v, dict)
                else v.T if getattr(v, "ndim", 0) == 2 else v) for k, v in tree.items()}


@pytest.mark.parametrize("name,hp", [
    ("doge", {"steps": 5, "lr": 1e-2, "scale": 0.3, "subspace": 2, "density": 0.5,
              "scope": "tensor"}),
    ("dop", {"steps": 5, "lr": 1e-2, "proj_space": "u"}),
])
def test_transposed_kernels_with_switched_layout_give_transposed_result(name, hp):
    base, models = dyadic(17, 3, shapes=LAYOUT_SHAPES)
    method = getattr(projection, name)
    out = method(base, models, kernel_layout="in_out", **hp)
    flipped = method(_transposed(base), [_transposed(m) for m in models],
                     kernel_layout="out_in", **hp)
    check_tree(_transposed(flipped), floats(out), base, rtol=1e-5, atol=1e-6)
    # The layout matters: reading Flax kernels as PyTorch ones changes the result.
    wrong = method(base, models, kernel_layout="out_in", **hp)
    assert not np.allclose(floats(wrong)["dense/kernel"], floats(out)["dense/kernel"],
                           atol=1e-4)


@pytest.mark.parametrize("name,hp", [
    ("doge", {"steps": 3, "lr": 1e-2, "subspace": 2, "scope": "tensor"}),
    ("dop", {"steps": 3, "lr": 1e-2, "mode": "joint"}),
])
def test_kernels_are_vmappable(name, hp):
    """Two same-shaped leaves merged by one vmapped kernel call give the per-leaf results
    (the engine batches same-shaped leaves this way)."""
    rng = np.random.default_rng(18)
    base = jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
    models = tuple(base + 0.1 * jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
                   for _ in range(3))
    method = getattr(projection, name)
    statics = {**method.hparams, **hp}
    ctx = method_lib.LeafContext("layer/kernel", None, (), base[0].size)

    def one(b, xs):
        return method.kernel(ctx, b, xs, **statics)

    batched = jax.jit(jax.vmap(one))(base, models)
    for i in range(2):
        single = jax.jit(one)(base[i], tuple(x[i] for x in models))
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- DOP


@pytest.mark.parametrize("k,hp", [
    (3, {"mgda": True, "ema": True, "ema_beta": 0.9, "alpha": 0.7}),
    (3, {"mgda": True, "ema": False, "svd_epsilon": 0.8, "proj_space": "v"}),
    (2, {"mgda": False, "alpha": 0.3, "proj_space": "u"}),
])
def test_dop_matches_reference(k, hp):
    with x64():
        base, models = dyadic(20 + k, k, dtype=jnp.float64)
        hp = dict(lr=1e-2, steps=6, **hp)
        out = projection.dop(base, models, **hp)
        expected = ref_dop(floats(base), [floats(m) for m in models], **hp)
        check_tree(out, expected, base, rtol=1e-9, atol=1e-11)


def test_dop_float32_defaults_match_reference():
    base, models = dyadic(24, 3)
    out = projection.dop(base, models, steps=4, lr=1e-2)
    check_tree(out, ref_dop(floats(base), [floats(m) for m in models], steps=4, lr=1e-2),
               base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["continual", "joint"])
def test_dop_one_model_returns_it(mode):
    base, models = dyadic(25, 1)
    out = projection.dop(base, models, steps=5, lr=1e-2, mode=mode)
    check_tree(out, floats(models[0]), base, rtol=0, atol=0)


def _pair_loss(b, xs, w, alpha, space="uv"):
    return sum(a * dop_loss(view(w), view(x), dop_terms(view(x - b), 0.99999, space))
               for a, x in zip(alpha, xs))


@pytest.mark.parametrize("mode", ["continual", "joint"])
def test_dop_loss_decreases(mode):
    """Fixed weights (mgda=False): the weighted loss falls from the starting mean."""
    k = 2 if mode == "continual" else 3
    base, models = dyadic(26, k)
    b, xs = floats(base), [floats(m) for m in models]
    out = floats(projection.dop(base, models, steps=80, lr=1e-2, mgda=False, alpha=0.6,
                                mode=mode))
    weights = [0.6, 0.4] if mode == "continual" else [1 / 3] * 3
    p = "dense/kernel"
    start = _pair_loss(b[p], [x[p] for x in xs], np.mean([x[p] for x in xs], axis=0), weights)
    end = _pair_loss(b[p], [x[p] for x in xs], out[p], weights)
    assert end < 0.8 * start
    if mode == "joint":  # non-matrix leaves: the mean of all models
        np.testing.assert_allclose(out["dense/bias"], np.mean([x["dense/bias"] for x in xs], 0),
                                   rtol=1e-6)


def test_dop_joint_mgda_runs_k_task_weights():
    """Joint mode with K-task MGDA moves the merge off the plain mean (and stays finite)."""
    base, models = dyadic(27, 3)
    xs = [floats(m) for m in models]
    out = floats(projection.dop(base, models, steps=30, lr=1e-2, mode="joint", ema=False))
    mean = np.mean([x["dense/kernel"] for x in xs], axis=0)
    assert np.all(np.isfinite(out["dense/kernel"]))
    assert np.abs(out["dense/kernel"] - mean).max() > 1e-2


# ----------------------------------------------------------- compile, dtype, registry


@pytest.mark.parametrize("name,coefficient,values", [
    ("doge", "scale", (0.1, 0.5, 2.0)),
    ("doge", "lr", (1e-3, 3e-2)),
    ("dop", "lr", (1e-3, 3e-2)),
])
def test_coefficient_sweep_compiles_once(name, coefficient, values):
    base, models = dyadic(30, 3)
    b, xs = floats(base), [floats(m) for m in models]
    # The statics of test_doge_matches_reference / test_dop_float32_defaults_match_reference.
    hp = {"steps": 4, "lr": 1e-2} if name == "dop" else {
        "steps": 8, "subspace": 2, "density": 0.4, "scale": 0.3, "lr": 1e-2}
    reference = ref_dop if name == "dop" else ref_doge
    method = getattr(projection, name)
    method(base, models, **{**hp, coefficient: 0.05})
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for v in values:
        out = method(base, models, **{**hp, coefficient: v})
        check_tree(out, reference(b, xs, **{**hp, coefficient: v}), base, rtol=1e-4,
                   atol=1e-5)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["doge", "dop"])
def test_bf16_in_bf16_out(name):
    """Computed in float32 from the bf16 values, rounded once to bf16 (2^-8 relative)."""
    base, models = dyadic(31, 3, dtype=jnp.bfloat16)
    hp = dict(steps=3, lr=1e-2, **({"scope": "tensor"} if name == "doge" else {}))
    out = mergejax.merge(name, base, models, **hp)
    for path, leaf in walk(out):
        assert jnp.result_type(leaf) == (jnp.int32 if path == "step" else jnp.bfloat16), path
    reference = ref_dop if name == "dop" else ref_doge
    check_tree(out, reference(floats(base), [floats(m) for m in models], **hp), base,
               rtol=1e-2, atol=1e-2)


def test_registered():
    for name in ("doge", "dop"):
        method = mergejax.get_method(name)
        assert method.family == "datafree" and method.needs_base


# -------------------------------------------------------------------- bad input

BAD = [
    ("doge", {"steps": -1}, r"steps must be an int >= 0, got -1"),
    ("doge", {"steps": 2.5}, r"steps must be an int >= 0, got 2.5"),
    ("doge", {"subspace": 0.5}, r"subspace must be a number >= 1"),
    ("doge", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ("doge", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    ("doge", {"scope": "layer"}, r"scope must be one of \('global', 'tensor'\)"),
    ("doge", {"nonmatrix": "sum"}, r"nonmatrix must be one of \('base', 'mean'\)"),
    ("doge", {"kernel_layout": "io"}, r"kernel_layout at '.*' must be one of"),
    ("doge", {"matrix_split": "rows"}, r"matrix_split at '.*' must be 'auto', None"),
    ("doge", {"density": PathRules([("dense", 0.3)], default=0.2)},
     r"scope='global' ranks magnitudes over the whole model"),
    ("dop", {"steps": -3}, r"steps must be an int >= 0, got -3"),
    ("dop", {"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ("dop", {"ema_beta": -0.1}, r"ema_beta must be in \[0, 1\], got -0.1"),
    ("dop", {"svd_epsilon": 2.0}, r"svd_epsilon must be in \[0, 1\], got 2.0"),
    ("dop", {"mgda": "yes"}, r"mgda must be True or False, got 'yes'"),
    ("dop", {"mgda_iters": -1}, r"mgda_iters must be an int >= 0, got -1"),
    ("dop", {"proj_space": "w"}, r"proj_space must be one of \('u', 'v', 'uv'\)"),
    ("dop", {"mode": "batch"}, r"mode must be one of \('continual', 'joint'\)"),
    ("dop", {"kernel_layout": "io"}, r"kernel_layout at '.*' must be one of"),
]


@pytest.mark.parametrize("name,hp,message", BAD)
def test_bad_input_raises(name, hp, message):
    base, models = dyadic(40, 2)
    with pytest.raises(MergeError, match=message):
        getattr(projection, name)(base, models, **hp)


def test_doge_per_leaf_density_allowed_with_tensor_scope():
    base, models = dyadic(41, 2)
    rules = PathRules([("dense", 0.3)], default=0.5)
    out = projection.doge(base, models, steps=2, lr=1e-2, scope="tensor", density=rules)
    assert all(np.all(np.isfinite(v)) for v in floats(out).values())


@pytest.mark.parametrize("name", ["doge", "dop"])
def test_needs_base(name):
    _, models = dyadic(42, 2)
    with pytest.raises(MergeError, match=f"{name} needs a base"):
        getattr(projection, name)(None, models)
