"""CMA-ES (`mergejax.learned.search`) against a NumPy transcription of Hansen's tutorial
(arXiv 1604.00772: Table 1 for the constants, Fig. 6 / Eqs. 39-47 for one generation,
positive weights only), written here from the paper, not from the code under test.

The update is checked generation by generation on the populations the code itself
sampled (sampling is random, the update is not); the sampler is checked against
``m + sigma * B D z`` with the state's own eigendecomposition. Convergence, bounds,
reproducibility, compilation caching and bad input are checked on small problems.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64

from mergejax import MergeError
from mergejax.learned import search
from mergejax.learned.search import CMAES, cma_es


def ref_constants(n: int, lam: int | None = None) -> dict:
    """Hansen's default strategy parameters (tutorial Table 1, positive weights)."""
    lam = lam or 4 + int(3 * math.log(n))
    mu = lam // 2
    w = np.array([math.log((lam + 1) / 2) - math.log(i) for i in range(1, mu + 1)])
    w /= w.sum()
    mueff = 1 / np.sum(w ** 2)
    cs = (mueff + 2) / (n + mueff + 5)
    ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n ** 2))
    return {"lam": lam, "w": w, "mueff": mueff, "cs": cs, "ds": ds, "cc": cc, "c1": c1,
            "cmu": cmu, "chin": chin}


def ref_tell(st: dict, pop: np.ndarray, f: np.ndarray, c: dict, g: int) -> dict:
    """One CMA-ES generation (g = number of generations before this one)."""
    n = st["m"].size
    w = c["w"]
    order = np.argsort(f, kind="stable")
    y = (pop[order[:w.size]] - st["m"]) / st["sigma"]
    yw = w @ y
    m = st["m"] + st["sigma"] * yw
    evals, vecs = np.linalg.eigh(st["C"])
    c_inv_sqrt = vecs @ np.diag(evals ** -0.5) @ vecs.T
    ps = (1 - c["cs"]) * st["ps"] + math.sqrt(c["cs"] * (2 - c["cs"]) * c["mueff"]) * (
        c_inv_sqrt @ yw)
    norm = np.linalg.norm(ps)
    hs = float(norm / math.sqrt(1 - (1 - c["cs"]) ** (2 * (g + 1)))
               < (1.4 + 2 / (n + 1)) * c["chin"])
    pc = (1 - c["cc"]) * st["pc"] + hs * math.sqrt(c["cc"] * (2 - c["cc"]) * c["mueff"]) * yw
    dh = (1 - hs) * c["cc"] * (2 - c["cc"])
    rank_mu = sum(wi * np.outer(yi, yi) for wi, yi in zip(w, y))
    cov = ((1 + c["c1"] * dh - c["c1"] - c["cmu"] * w.sum()) * st["C"]
           + c["c1"] * np.outer(pc, pc) + c["cmu"] * rank_mu)
    sigma = st["sigma"] * math.exp(c["cs"] / c["ds"] * (norm / c["chin"] - 1))
    best = min(st["best"], float(f.min()))
    return {"m": m, "sigma": sigma, "C": cov, "ps": ps, "pc": pc, "best": best, "hs": hs}


def sphere(x):
    return jnp.sum((x - 2.0) ** 2)


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


@pytest.mark.parametrize("n,lam", [(1, None), (2, None), (5, None), (20, None), (3, 10)])
def test_constants_are_hansens_defaults(n, lam):
    s = CMAES.create(n, lam)
    c = ref_constants(n, lam)
    assert s.popsize == c["lam"] and s.mu == c["w"].size
    np.testing.assert_allclose(s.weights, c["w"], rtol=1e-12)
    for name, key in (("mu_eff", "mueff"), ("c_sigma", "cs"), ("d_sigma", "ds"),
                      ("c_c", "cc"), ("c_1", "c1"), ("c_mu", "cmu"), ("chi_n", "chin")):
        assert getattr(s, name) == pytest.approx(c[key], rel=1e-12), name


SCALES = np.array([1.0, 10.0, 0.1, 3.0])


@pytest.mark.parametrize("fitness,sigma0,steps", [
    (lambda x: jnp.sum((SCALES * (x - 1.0)) ** 2), 0.7, 5),  # ill-conditioned quadratic
    (jnp.sum, 0.1, 12),  # linear: the path outgrows its bound, h_sigma = 0 happens
])
def test_generations_match_reference_update(fitness, sigma0, steps):
    """Generations in float64 against ref_tell, on the code's own samples."""
    with x64():
        n = 4
        s = CMAES.create(n)
        c = ref_constants(n)
        fit = jax.jit(jax.vmap(fitness))
        state = s.init(np.full(n, 0.5), sigma0)
        ref = {"m": np.full(n, 0.5), "sigma": sigma0, "C": np.eye(n), "ps": np.zeros(n),
                   "pc": np.zeros(n), "best": np.inf}
        stalls = []
        for g, key in enumerate(jax.random.split(jax.random.key(3), steps)):
            pop = s.ask(state, key)
            # the sampler: m + sigma * B D z with the state's own decomposition
            z = np.asarray(jax.random.normal(key, (s.popsize, n), jnp.float64))
            mean, sigma, basis, d = (np.asarray(v) for v in (
                state.mean, state.sigma, state.basis, state.scales))
            np.testing.assert_allclose(pop, mean + sigma * (z * d) @ basis.T, rtol=1e-12,
                                       atol=1e-12)
            np.testing.assert_allclose((basis * d ** 2) @ basis.T, ref["C"], atol=1e-12)
            f = fit(pop)
            state = s.tell(state, pop, f)
            ref = ref_tell(ref, np.asarray(pop), np.asarray(f), c, g)
            stalls.append(ref["hs"] == 0)
            for field, key_ in (("mean", "m"), ("cov", "C"), ("p_sigma", "ps"),
                                ("p_c", "pc")):
                np.testing.assert_allclose(getattr(state, field), ref[key_], rtol=1e-10,
                                           atol=1e-12, err_msg=f"{field} at generation {g}")
            assert float(state.sigma) == pytest.approx(ref["sigma"], rel=1e-10)
            assert float(state.best_fitness) == pytest.approx(ref["best"], rel=1e-12)
            assert int(state.generation) == g + 1
        assert any(stalls) == (steps == 12)


def test_minimises_shifted_sphere():
    res = cma_es(sphere, jnp.zeros(5), 1.0, 60, jax.random.key(0))  # 480 evaluations
    assert float(res.fitness) < 1e-4
    np.testing.assert_allclose(res.x, np.full(5, 2.0), atol=1e-2)
    assert float(res.fitness) == pytest.approx(float(np.sum((np.asarray(res.x) - 2.0) ** 2)),
                                               rel=1e-4, abs=1e-9)
    assert float(res.fitness) == pytest.approx(float(np.min(res.history)), rel=1e-6)


def test_minimises_rosenbrock():
    res = cma_es(rosenbrock, jnp.zeros(2), 0.5, 100, jax.random.key(1))  # 600 evaluations
    assert float(res.fitness) < 1e-6
    np.testing.assert_allclose(res.x, np.ones(2), atol=1e-2)
    assert res.history.shape == (100, 6)


def test_reproducible_and_modes_agree():
    a = cma_es(rosenbrock, jnp.zeros(2), 0.5, 100, jax.random.key(5))
    b = cma_es(rosenbrock, jnp.zeros(2), 0.5, 100, jax.random.key(5))
    np.testing.assert_array_equal(a.history, b.history)
    np.testing.assert_array_equal(a.x, b.x)
    other = cma_es(rosenbrock, jnp.zeros(2), 0.5, 100, jax.random.key(6))
    assert not np.array_equal(a.history, other.history)
    one = jax.jit(rosenbrock)
    loop = cma_es(lambda x: float(one(x)), jnp.zeros(2), 0.5, 100, jax.random.key(5),
                  vectorized=False)
    np.testing.assert_allclose(loop.history, a.history, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loop.x, a.x, rtol=1e-5, atol=1e-6)


def test_compiled_run_is_cached():
    cma_es(sphere, jnp.zeros(5), 1.0, 60, jax.random.key(0))
    size = search._run._cache_size()  # pylint: disable=protected-access
    for sigma, x0, seed in ((0.3, jnp.ones(5), 1), (2.0, -jnp.ones(5), 2)):
        res = cma_es(sphere, x0, sigma, 60, jax.random.key(seed))
        assert np.isfinite(float(res.fitness))
    assert search._run._cache_size() == size  # pylint: disable=protected-access


def test_bounds_keep_every_candidate_inside():
    seen = []

    def fitness(x):
        seen.append(np.asarray(x))
        return float(jnp.sum((x - jnp.array([3.0, -0.2])) ** 2))  # optimum outside in dim 0

    res = cma_es(fitness, jnp.zeros(2), 1.0, 25, jax.random.key(2), popsize=6,
                 bounds=([-1.0, -1.0], [1.0, 0.5]), vectorized=False)
    seen = np.stack(seen)
    assert seen.shape == (150, 2)
    assert np.all(seen >= [-1.0, -1.0]) and np.all(seen <= [1.0, 0.5])
    np.testing.assert_allclose(res.x, [1.0, -0.2], atol=2e-2)
    assert np.all(np.asarray(res.state.mean) <= np.array([1.0, 0.5]) + 1e-6)


def test_nan_fitness_ranks_last():
    def fitness(x):
        return jnp.where(x[0] > 0, jnp.nan, jnp.sum((x + 1.0) ** 2))

    res = cma_es(fitness, jnp.zeros(2), 0.5, 40, jax.random.key(4))
    assert np.isfinite(float(res.fitness)) and float(res.x[0]) <= 0
    np.testing.assert_allclose(res.x, [-1.0, -1.0], atol=1e-2)


def test_ask_tell_loop_matches_cma_es():
    s = CMAES.create(5)
    state, history = search.ask_tell_loop(
        s, s.init(jnp.zeros(5), 1.0), jax.random.split(jax.random.key(8), 60),
        jax.jit(jax.vmap(sphere)))
    res = cma_es(sphere, jnp.zeros(5), 1.0, 60, jax.random.key(8))
    np.testing.assert_allclose(history, res.history, rtol=1e-6)
    np.testing.assert_allclose(state.best_x, res.x, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: cma_es(sphere, jnp.zeros(2), 0.0, 5, jax.random.key(0)),
     "sigma0 must be a positive number"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 0, jax.random.key(0)),
     "steps must be a positive int"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 5, jax.random.key(0), popsize=1),
     "popsize must be an int >= 2"),
    (lambda: cma_es(sphere, jnp.zeros((2, 2)), 1.0, 5, jax.random.key(0)),
     r"x0 must be a vector \(1-D\)"),
    (lambda: cma_es(sphere, jnp.zeros(0), 1.0, 5, jax.random.key(0)),
     "at least one parameter"),
    (lambda: cma_es(sphere, jnp.array([0.0, jnp.nan]), 1.0, 5, jax.random.key(0)),
     "x0 has non-finite entries"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 5, jax.random.key(0), bounds=(0.5, 1.0)),
     r"x0\[0\] = 0.0 lies outside the bounds \[0.5, 1.0\]"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 5, jax.random.key(0), bounds=(1.0, -1.0)),
     "lower must be below upper"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 5, jax.random.key(0),
                    bounds=([-1, -1, -1], 1.0)),
     r"lower must be a number or 2 numbers"),
    (lambda: cma_es(sphere, jnp.zeros(2), 1.0, 5, jax.random.key(0), bounds=(-1.0,)),
     r"bounds must be None or \(lower, upper\)"),
    (lambda: cma_es(lambda x: x * 2, jnp.zeros(2), 1.0, 5, jax.random.key(0)),
     r"fitness must return a scalar per candidate, got \(2,\)"),
    (lambda: CMAES.create(2).tell(CMAES.create(2).init(jnp.zeros(2), 1.0),
                                  jnp.zeros((6, 2)), jnp.zeros(5)),
     r"one fitness value per candidate \(6\), got shape \(5,\)"),
])
def test_bad_input(call, match):
    with pytest.raises(MergeError, match=match):
        call()
