"""Data-free optimisation methods (WUDI, AWD) against small, independent NumPy references.

The references below are written from the papers and the reference code described in
``notes/refs_datafree_a.md`` (FusionBench ``wudi_merging`` and the official WUDI repository
for WUDI; the paper's Eq. 9-11 and Algorithm 1 for AWD): float64, direct (not Gram) forms,
hand-written Adam and gradient descent. None of it calls mergejax code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import check_tree, floats, make_tree, walk, x64

import mergejax
from mergejax import MergeError
from mergejax import method as method_lib
from mergejax.methods import datafree

# Flax layouts: Dense kernels (in, out); attention query (d, heads, head_dim), out
# (heads, head_dim, d). Each maps to a PyTorch (out, in) matrix in TORCH below.
SHAPES = {"dense/kernel": (10, 6), "dense/bias": (6,), "attn/query/kernel": (6, 2, 3),
          "attn/out/kernel": (2, 3, 6), "conv/kernel": (2, 3, 2)}
PATHS = tuple(SHAPES)
TORCH = {
    "dense/kernel": (lambda x: x.T, lambda m: m.T),
    "attn/query/kernel": (lambda x: x.reshape(6, 6).T, lambda m: m.T.reshape(6, 2, 3)),
    "attn/out/kernel": (lambda x: x.reshape(6, 6).T, lambda m: m.T.reshape(2, 3, 6)),
}
F32 = {"rtol": 1e-5, "atol": 1e-5}


def setup_models(seed: int, k: int, dtype=jnp.float32, shapes=SHAPES, delta_scale=0.3):
    rng = np.random.default_rng(seed)
    base = make_tree({p: rng.standard_normal(s) for p, s in shapes.items()}, 7, dtype)
    b = floats(base)
    models = [make_tree({p: b[p] + delta_scale * rng.standard_normal(s)
                         for p, s in shapes.items()}, 100 + i, dtype) for i in range(k)]
    return base, models


def correlated_models(seed: int, k: int, dtype=jnp.float32):
    """A base and k fine-tunes whose task vectors share a component (|cos| ~ 0.8), so AWD
    has something to disentangle (random task vectors are already nearly orthogonal)."""
    rng = np.random.default_rng(seed)
    b = {p: rng.standard_normal(s) for p, s in SHAPES.items()}
    shared = {p: 0.1 * rng.standard_normal(s) for p, s in SHAPES.items()}
    models = [make_tree({p: b[p] + shared[p] + 0.05 * rng.standard_normal(s)
                         for p, s in SHAPES.items()}, 100 + i, dtype) for i in range(k)]
    return make_tree(b, 7, dtype), models


GRADIENT = {"lr": 1e-3, "iterations": 40}  # shared by tests, so they share compilations


# ------------------------------------------------------------------ NumPy references


def ref_wudi_adam(taus: np.ndarray, lr: float, iterations: int) -> np.ndarray:
    """FusionBench / official WUDI: torch Adam (betas 0.9/0.999, eps 1e-8) on
    sum_i ||(M - tau_i) tau_i^T||^2 / ||tau_i||^2 from M = sum_i tau_i, direct gradient."""
    m = taus.sum(0)
    norms = np.array([np.sum(t * t) for t in taus])
    mom, vel = np.zeros_like(m), np.zeros_like(m)
    for step in range(1, iterations + 1):
        grad = sum(2.0 * ((m - t) @ t.T) @ t / n for t, n in zip(taus, norms))
        mom = 0.9 * mom + 0.1 * grad
        vel = 0.999 * vel + 0.001 * grad * grad
        m_hat = mom / (1 - 0.9 ** step)
        v_hat = vel / (1 - 0.999 ** step)
        m = m - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return m


def ref_wudi_closed(taus: np.ndarray, omega: float) -> np.ndarray:
    """Official WUDI closed form: left @ pinv(right), left = sum tau (tau^T tau + wI)/n,
    right = sum (tau^T tau + wI)/n."""
    q = taus.shape[2]
    norms = [np.sum(t * t) for t in taus]
    right = sum((t.T @ t + omega * np.eye(q)) / n for t, n in zip(taus, norms))
    left = sum(t @ (t.T @ t + omega * np.eye(q)) / n for t, n in zip(taus, norms))
    return left @ np.linalg.pinv(right)


def ref_wudi_lstsq(taus: np.ndarray) -> np.ndarray:
    """argmin_M sum_i ||(M - tau_i) tau_i^T||^2 / ||tau_i||^2 as one least-squares problem
    M X = Y, X = [tau_i^T / ||tau_i||], Y = [tau_i tau_i^T / ||tau_i||]."""
    x = np.concatenate([t.T / np.linalg.norm(t) for t in taus], axis=1)
    y = np.concatenate([t @ t.T / np.linalg.norm(t) for t in taus], axis=1)
    return np.linalg.lstsq(x.T, y.T, rcond=None)[0].T


def ref_wudi(base: dict, models: list[dict], matrix_fn, scale=1.0, non_matrix="mean",
             torch=TORCH) -> dict[str, np.ndarray]:
    """theta_0 + scale * tau_m per matrix leaf; non-matrix leaves by ``non_matrix``."""
    out = {}
    for p, b in base.items():
        taus = [m[p] - b for m in models]
        if p in torch:
            to, back = torch[p]
            out[p] = b + scale * back(matrix_fn(np.stack([to(t) for t in taus])))
        elif non_matrix == "mean":
            out[p] = b + scale * np.mean(taus, axis=0)
        else:
            out[p] = b.copy()
    return out


def direct_loss(m, taus, omega=0.0):
    """The WUDI loss as the paper writes it (works on NumPy and jax arrays)."""
    total = 0.0
    for t in taus:
        n = (t * t).sum()
        total = total + (((m - t) @ t.T) ** 2).sum() / n + omega * ((m - t) ** 2).sum() / n
    return total


def flat(leaves: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([leaves[p].ravel() for p in PATHS])


def unflat(vec: np.ndarray) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for p, s in SHAPES.items():
        n = int(np.prod(s))
        out[p] = vec[i:i + n].reshape(s)
        i += n
    return out


def ref_awd_loss_grad(taus: np.ndarray, delta: np.ndarray, alpha: float):
    """AWD Eq. 9-11: L = 1/(K(K-1)) sum_{i!=j} |cos(v_i, v_j)| + alpha ||delta||,
    v_i = tau_i - delta; analytic gradient (subgradient 0 of ||delta|| at 0)."""
    k = len(taus)
    v = taus - delta
    nv = np.linalg.norm(v, axis=1)
    loss, grad = 0.0, np.zeros_like(delta)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            cos = v[i] @ v[j] / (nv[i] * nv[j])
            loss += abs(cos) / (k * (k - 1))
            dcos_dvi = v[j] / (nv[i] * nv[j]) - cos * v[i] / nv[i] ** 2
            dcos_dvj = v[i] / (nv[i] * nv[j]) - cos * v[j] / nv[j] ** 2
            grad -= np.sign(cos) * (dcos_dvi + dcos_dvj) / (k * (k - 1))
    nd = np.linalg.norm(delta)
    loss += alpha * nd
    if nd > 0:
        grad += alpha * delta / nd
    return loss, grad


def ref_awd(taus: np.ndarray, alpha: float, lr: float, steps: int, optimizer="sgd"):
    """Algorithm 1 (gradient descent from delta = 0), or torch-style Adam."""
    delta = np.zeros(taus.shape[1])
    mom, vel, losses = np.zeros_like(delta), np.zeros_like(delta), []
    for step in range(1, steps + 1):
        loss, grad = ref_awd_loss_grad(taus, delta, alpha)
        losses.append(loss)
        if optimizer == "sgd":
            delta = delta - lr * grad
        else:
            mom = 0.9 * mom + 0.1 * grad
            vel = 0.999 * vel + 0.001 * grad * grad
            delta = delta - lr * (mom / (1 - 0.9 ** step)) / (
                np.sqrt(vel / (1 - 0.999 ** step)) + 1e-8)
    losses.append(ref_awd_loss_grad(taus, delta, alpha)[0])
    return delta, np.array(losses)


def mean_abs_cos(vectors: np.ndarray) -> float:
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    c = u @ u.T
    k = len(u)
    return float(np.abs(c[~np.eye(k, dtype=bool)]).mean())


# ------------------------------------------------------------------------------- WUDI


@pytest.mark.parametrize("lr,iterations", [(1e-5, 300), (GRADIENT["lr"], GRADIENT["iterations"])])
def test_wudi_gradient_matches_fusionbench_adam(lr, iterations):
    base, models = setup_models(0, 3)
    out = datafree.wudi(base, models, lr=lr, iterations=iterations)
    b, xs = floats(base), [floats(m) for m in models]
    expected = ref_wudi(b, xs, lambda t: ref_wudi_adam(t, lr, iterations))
    check_tree(out, expected, base, rtol=1e-5, atol=2e-5)
    if iterations == 40:  # the optimiser moved the matrices away from the plain sum
        start = ref_wudi(b, xs, lambda t: t.sum(0))
        assert np.abs(expected["dense/kernel"] - start["dense/kernel"]).max() > 1e-2


@pytest.mark.parametrize("omega", [None, 0.5])
def test_wudi_closed_matches_official_formula(omega):
    base, models = setup_models(1, 3)
    out = datafree.wudi(base, models, form="closed", omega=omega, scale=0.7)
    w = 1e-5 if omega is None else omega
    expected = ref_wudi(floats(base), [floats(m) for m in models],
                        lambda t: ref_wudi_closed(t, w), scale=0.7)
    check_tree(out, expected, base, rtol=1e-4, atol=1e-4)


def test_wudi_closed_without_omega_solves_the_least_squares_problem():
    with x64():
        base, models = setup_models(2, 3, jnp.float64)
        out = datafree.wudi(base, models, form="closed", omega=0.0)
        expected = ref_wudi(floats(base), [floats(m) for m in models], ref_wudi_lstsq)
        check_tree(out, expected, base, rtol=1e-9, atol=1e-9)


def test_wudi_gradient_form_converges_to_the_closed_form():
    shapes = {"w/kernel": (4, 6)}  # torch (6, 4): 3 tasks span the 4 inputs, well posed
    base, models = setup_models(3, 3, shapes=shapes)
    closed = floats(datafree.wudi(base, models, form="closed", omega=0.0))["w/kernel"]
    start = floats(datafree.wudi(base, models, iterations=0))["w/kernel"]
    adam = floats(datafree.wudi(base, models, lr=1e-3, iterations=6000))["w/kernel"]
    assert np.abs(start - closed).max() > 0.1
    np.testing.assert_allclose(adam, closed, atol=3e-3)


def test_wudi_quadratic_matches_the_direct_loss_and_its_gradient():
    rng = np.random.default_rng(4)
    taus = rng.standard_normal((3, 5, 7))
    m = rng.standard_normal((5, 7))
    tall = rng.standard_normal((2, 7, 4))  # out > in: B through tau^T tau, not tau tau^T

    @jax.jit
    def evaluate(taus, m, omega):
        q = datafree.wudi_quadratic(taus, omega)
        direct = jax.grad(lambda x: direct_loss(x, list(taus), omega))(m)
        return q.loss(m), q.gradient(m), jax.grad(q.loss)(m), direct, q.minimizer()

    with x64():
        for t, x in ((taus, m), (tall, tall[0] + 1.0)):
            for omega in (0.0, 0.3):
                loss, grad, auto_q, auto_direct, minimizer = evaluate(
                    jnp.asarray(t), jnp.asarray(x), omega)
                np.testing.assert_allclose(float(loss), direct_loss(x, list(t), omega),
                                           rtol=1e-10)
                np.testing.assert_allclose(np.asarray(grad), np.asarray(auto_direct),
                                           rtol=1e-10, atol=1e-10)
                np.testing.assert_allclose(np.asarray(auto_q), np.asarray(auto_direct),
                                           rtol=1e-10, atol=1e-10)
                np.testing.assert_allclose(np.asarray(minimizer), ref_wudi_closed(t, omega),
                                           rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("form", ["gradient", "closed"])
def test_wudi_layout_transposes_the_result(form):
    shapes = {"a/kernel": (10, 6), "b/kernel": (6, 4), "a/bias": (6,)}
    base, models = setup_models(5, 3, shapes=shapes)

    def transposed(tree):
        return jax.tree.map(lambda x: x.T if x.ndim == 2 else x, tree)

    kw = dict(form=form, **GRADIENT)
    flax_out = floats(datafree.wudi(base, models, **kw))
    torch_out = floats(datafree.wudi(transposed(base), [transposed(m) for m in models],
                                     kernel_layout="out_in", **kw))
    for p in shapes:
        got = torch_out[p].T if torch_out[p].ndim == 2 else torch_out[p]
        np.testing.assert_allclose(got, flax_out[p], rtol=1e-5, atol=1e-6, err_msg=p)
    if form == "closed":  # the layout matters: the Grams are over the input side
        other = floats(datafree.wudi(base, models, kernel_layout="out_in", **kw))
        assert np.abs(other["a/kernel"] - flax_out["a/kernel"]).max() > 1e-3


def test_wudi_official_scope_leaves_other_leaves_pretrained():
    base, models = setup_models(6, 3)
    rules = [(r"^attn/", "auto"), (".*", None)]
    out = datafree.wudi(base, models, form="closed", matrix_split=rules, non_matrix="base")
    torch = {p: f for p, f in TORCH.items() if p.startswith("attn/")}
    expected = ref_wudi(floats(base), [floats(m) for m in models],
                        lambda t: ref_wudi_closed(t, 1e-5), non_matrix="base", torch=torch)
    check_tree(out, expected, base, rtol=1e-4, atol=1e-4)
    assert np.array_equal(floats(out)["dense/kernel"], floats(base)["dense/kernel"])


@pytest.mark.parametrize("k", [1, 3])
def test_wudi_closed_of_copies_returns_theta(k):
    # Copies add no rank: the (10 x 10) input Gram of dense/kernel has rank 6, so the system
    # is only as well conditioned as omega makes it (1e-5 would lose 2 digits in float32).
    base, models = setup_models(7, 1)
    out = datafree.wudi(base, models * k, form="closed", omega=0.1)
    check_tree(out, floats(models[0]), base, rtol=1e-4, atol=1e-4)


def test_wudi_zero_task_vectors_are_ignored():
    base, models = setup_models(8, 2)
    out = datafree.wudi(base, models + [base], form="closed", non_matrix="base")
    expected = ref_wudi(floats(base), [floats(m) for m in models],
                        lambda t: ref_wudi_closed(t, 1e-5), non_matrix="base")
    check_tree(out, expected, base, rtol=1e-4, atol=1e-4)
    same = datafree.wudi(base, [base] * 3, form="closed", non_matrix="base")  # all zero
    check_tree(same, floats(base), base, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["gradient", "closed"])
def test_wudi_scale_sweep_compiles_once(form):
    base, models = setup_models(9, 3)
    b, xs = floats(base), [floats(m) for m in models]
    if form == "closed":
        fn = lambda t: ref_wudi_closed(t, 1e-5)
    else:
        fn = lambda t: ref_wudi_adam(t, GRADIENT["lr"], GRADIENT["iterations"])
    kw = dict(form=form, **GRADIENT)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    check_tree(datafree.wudi(base, models, scale=0.8, **kw), ref_wudi(b, xs, fn, 0.8), base,
               **tol)
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for s in (0.2, 1, 3.0):
        check_tree(datafree.wudi(base, models, scale=s, **kw), ref_wudi(b, xs, fn, s), base,
                   **tol)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


@pytest.mark.parametrize("form", ["gradient", "closed"])
def test_wudi_keeps_bf16(form):
    base, models = setup_models(10, 3, jnp.bfloat16)
    out = datafree.wudi(base, models, form=form, omega=1e-2, **GRADIENT)
    for path, leaf in walk(out):
        assert jnp.result_type(leaf) == (jnp.int32 if path == "step" else jnp.bfloat16), path
    b, xs = floats(base), [floats(m) for m in models]
    if form == "closed":
        fn = lambda t: ref_wudi_closed(t, 1e-2)
    else:
        fn = lambda t: ref_wudi_adam(t, 1e-3, 40)
    check_tree(out, ref_wudi(b, xs, fn), base, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"omega": -1.0}, r"omega at '.*' must be a number >= 0"),
    ({"omega": "small"}, r"omega at '.*' must be a number >= 0"),
    ({"iterations": -1}, r"iterations at '.*' must be an int >= 0, got -1"),
    ({"iterations": 2.5}, r"iterations at '.*' must be an int >= 0, got 2.5"),
    ({"lr": 0.0}, r"lr at '.*' must be a number > 0, got 0.0"),
    ({"lr": -1e-3}, r"lr at '.*' must be a number > 0"),
    ({"form": "adam"}, r"form at '.*' must be 'gradient' or 'closed', got 'adam'"),
    ({"kernel_layout": "xy"}, r"kernel_layout at '.*' must be one of"),
    ({"non_matrix": "sum"}, r"non_matrix at '.*' must be 'mean' or 'base', got 'sum'"),
    ({"matrix_split": "rows"}, r"matrix_split at '.*' must be 'auto', None or a positive int"),
    ({"matrix_split": 3}, r"matrix_split at '.*' must be 'auto', None or an int in \[1, "),
    ({"scale": [1.0, 2.0]}, r"'scale' at '.*' is a list"),
    ({"rank": 2}, r"wudi got unknown hyperparameter\(s\) \['rank'\]"),
])
def test_wudi_bad_input_raises(kwargs, match):
    base, models = setup_models(11, 2)
    with pytest.raises(MergeError, match=match):
        datafree.wudi(base, models, **kwargs)


def test_wudi_singular_closed_form_is_reported():
    # One rank-1 task matrix and omega = 0: A = v v^T / |v|^2 is singular.
    u, v = np.arange(1.0, 7.0), np.linspace(-1.0, 1.0, 10)
    base = {"w": jnp.zeros((10, 6))}
    model = {"w": jnp.asarray(np.outer(v, u), jnp.float32)}
    with pytest.raises(MergeError, match=r"wudi produced non-finite values at 'w'"):
        datafree.wudi(base, [model], form="closed", omega=0.0)
    with pytest.raises(MergeError, match=r"wudi needs a base"):
        datafree.wudi(None, [model])


# -------------------------------------------------------------------------------- AWD


def _taus(base, models) -> np.ndarray:
    b = flat(floats(base))
    return np.stack([flat(floats(m)) - b for m in models])


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.01)])
def test_awd_disentangle_matches_reference(optimizer, lr):
    base, models = correlated_models(20, 3)
    result = datafree.awd_disentangle(base, models, alpha=0.1, lr=lr, steps=25,
                                      optimizer=optimizer)
    delta, losses = ref_awd(_taus(base, models), 0.1, lr, 25, optimizer)
    np.testing.assert_allclose(flat(floats(result.delta)), delta, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(result.losses), losses, rtol=1e-4, atol=1e-6)
    assert int(result.delta["step"]) == 0 and result.delta["step"].dtype == jnp.int32


def test_awd_span_descent_equals_full_space_descent():
    base, models = correlated_models(21, 4)
    span = datafree.awd_disentangle(base, models, lr=0.05, steps=25)
    full = datafree.awd_disentangle(base, models, steps=25, optimizer=optax.sgd(0.05))
    np.testing.assert_allclose(flat(floats(span.delta)), flat(floats(full.delta)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(span.losses), np.asarray(full.losses), rtol=1e-5)


def test_awd_reduces_its_loss_and_the_cosines():
    base, models = correlated_models(22, 4)
    result = datafree.awd_disentangle(base, models)  # the paper's defaults
    losses = np.asarray(result.losses)
    assert losses.shape == (301,)
    assert losses[-1] < 0.2 * losses[0]
    taus = _taus(base, models)
    before = mean_abs_cos(taus)
    after = mean_abs_cos(taus - flat(floats(result.delta)))
    np.testing.assert_allclose(losses[0], before, rtol=1e-5)
    assert before > 0.7 and after < 0.1


def test_awd_without_steps_is_task_arithmetic():
    base, models = correlated_models(23, 3)
    out = datafree.awd(base, models, steps=0, scale=0.4)
    b = floats(base)
    expected = {p: b[p] + 0.4 * sum(floats(m)[p] - b[p] for m in models) for p in PATHS}
    check_tree(out, expected, base, **F32)


def test_awd_merges_the_disentangled_vectors():
    base, models = correlated_models(24, 3)
    delta, _ = ref_awd(_taus(base, models), 0.1, 0.05, 25)
    b = floats(base)
    d = unflat(delta)
    expected = {p: b[p] + 0.3 * sum(floats(m)[p] - b[p] - d[p] for m in models)
                for p in PATHS}
    out = datafree.awd(base, models, scale=0.3, lr=0.05, steps=25)
    check_tree(out, expected, base, rtol=1e-4, atol=1e-4)
    # Through the registry, with TIES as the merge (the paper's AWD-TIES).
    result = datafree.awd_disentangle(base, models, lr=0.05, steps=25)
    disentangled = [mergejax.tree_sub(m, result.delta) for m in models]
    ties = mergejax.ties(base, disentangled, density=0.5, scale=0.8)
    via = mergejax.merge("awd", base, models, lr=0.05, steps=25, merge="ties", scale=0.8,
                         merge_hparams={"density": 0.5})
    check_tree(via, floats(ties), base, **F32)


def test_awd_scale_sweep_compiles_once():
    base, models = correlated_models(25, 3)
    datafree.awd(base, models, scale=0.5, steps=25)
    sizes = (datafree._disentangle._cache_size(),  # pylint: disable=protected-access
             method_lib._run_kernels._cache_size())  # pylint: disable=protected-access
    delta, _ = ref_awd(_taus(base, models), 0.2, 0.02, 25)
    b, d = floats(base), unflat(delta)
    for s in (0.1, 1.0, 2.0):
        out = datafree.awd(base, models, scale=s, alpha=0.2, lr=0.02, steps=25)
        expected = {p: b[p] + s * sum(floats(m)[p] - b[p] - d[p] for m in models)
                    for p in PATHS}
        check_tree(out, expected, base, rtol=1e-4, atol=1e-4)
    assert (datafree._disentangle._cache_size(),  # pylint: disable=protected-access
            method_lib._run_kernels._cache_size()) == sizes  # pylint: disable=protected-access


def test_awd_keeps_bf16():
    base, models = correlated_models(26, 3, jnp.bfloat16)
    out = datafree.awd(base, models, scale=0.3, lr=0.05, steps=25)
    for path, leaf in walk(out):
        assert jnp.result_type(leaf) == (jnp.int32 if path == "step" else jnp.bfloat16), path
    delta, _ = ref_awd(_taus(base, models), 0.1, 0.05, 25)
    b, d = floats(base), unflat(delta)
    expected = {p: b[p] + 0.3 * sum(floats(m)[p] - b[p] - d[p] for m in models)
                for p in PATHS}
    check_tree(out, expected, base, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": -0.1}, r"awd: alpha must be a number >= 0, got -0.1"),
    ({"lr": 0.0}, r"awd: lr must be a number > 0, got 0.0"),
    ({"lr": -1.0}, r"awd: lr must be a number > 0"),
    ({"steps": -1}, r"awd: steps must be an int >= 0, got -1"),
    ({"steps": 2.0}, r"awd: steps must be an int >= 0, got 2.0"),
    ({"optimizer": "lbfgs"}, r"awd: optimizer must be 'sgd', 'adam' or an optax"),
    ({"merge": "nope"}, r"unknown merge method 'nope'"),
    ({"merge_hparams": {"density": 0.5}}, r"task_arithmetic got unknown hyperparameter"),
])
def test_awd_bad_input_raises(kwargs, match):
    base, models = correlated_models(27, 2)
    with pytest.raises(MergeError, match=match):
        mergejax.merge("awd", base, models, **kwargs)


def test_awd_bad_models_raise():
    base, models = correlated_models(28, 2)
    with pytest.raises(MergeError, match=r"awd needs at least 2 models"):
        datafree.awd(base, models[:1])
    with pytest.raises(MergeError, match=r"awd needs a base"):
        datafree.awd(None, models)
    with pytest.raises(MergeError, match=r"models must be a list of pytrees"):
        datafree.awd(base, {"a": models[0]})
    with pytest.raises(MergeError, match=r"shape mismatch|dense/kernel"):
        datafree.awd(base, [models[0], {**models[1], "dense": {"kernel": jnp.zeros((2, 2)),
                                                                "bias": jnp.zeros(6)}}])
    with pytest.raises(MergeError, match=r"unknown merge hyperparameter|got unknown"):
        mergejax.merge("awd", base, models, rank=3)
