"""Git Re-Basin matching: planted permutations are recovered, the two solvers agree, the
objective never decreases, and matching lowers the barrier between two trained models."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import mergejax
from mergejax import align
from mergejax.analysis import connectivity
from mergejax.suite import model as model_lib
from mergejax.tree import MergeError

X = np.random.default_rng(0).uniform(size=(128, 28, 28)).astype(np.float32)
MLP_SPEC = align.mlp_spec(["Dense_0", "Dense_1", "Dense_2"])


def _mlp(seed, features=(32, 16)):
    module = model_lib.MLP(features)
    return module, jax.jit(module.init)(jax.random.key(seed), X[:1])["params"]


def _assert_same(tree_a, tree_b):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("solver", align.SOLVERS)
@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_planted_permutation_is_recovered_exactly(solver, model):
    if model == "mlp":
        _, a = _mlp(0)
        spec = MLP_SPEC
    else:
        resnet = model_lib.ResNet(8, 1)
        a = jax.jit(resnet.init)(jax.random.key(0), X[:1])["params"]
        spec = align.resnet_spec(8)
    planted = align.random_permutations(spec, a, jax.random.key(3))
    b = align.apply_permutation(spec, planted, a)
    result = align.weight_matching(spec, a, b, solver=solver)
    _assert_same(align.apply_permutation(spec, result.perms, b), a)
    inverse = align.invert_permutations(planted)
    for p in planted:
        np.testing.assert_array_equal(result.perms[p], inverse[p])
    # The objective is <a, a> over the spec's leaves: computed independently.
    want = sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(x, np.float64)))
               for x in jax.tree.leaves(a))
    assert result.objective == pytest.approx(want, rel=1e-5)


def test_device_and_scipy_solvers_agree_and_never_decrease_the_objective():
    _, a = _mlp(0, (48, 24))
    _, b = _mlp(1, (48, 24))
    device = align.weight_matching(MLP_SPEC, a, b, solver="device", seed=4)
    host = align.weight_matching(MLP_SPEC, a, b, solver="scipy", seed=4)
    for p in device.perms:
        np.testing.assert_array_equal(device.perms[p], host.perms[p])
    assert device.iterations == host.iterations >= 2
    history = np.array(device.history)
    assert np.all(np.diff(history) >= -1e-4 * np.abs(history[:-1]))
    assert history[-1] > history[0]  # it did improve on the identity
    # No single permutation can be improved any more (coordinate-wise optimum), checked by
    # brute force on the assignment each one solves, in NumPy.
    aligned = align.apply_permutation(MLP_SPEC, device.perms, b)
    value = lambda t: sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(t)))
    assert value(aligned) == pytest.approx(device.objective, rel=1e-5)
    assert value(aligned) >= value(b)


def test_solve_assignment_matches_brute_force():
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(5, 5))
    best = max(itertools.permutations(range(5)),
               key=lambda p: sum(sim[i, p[i]] for i in range(5)))
    for solver in align.SOLVERS:
        np.testing.assert_array_equal(align.solve_assignment(sim, solver), best)


def test_activation_matching_recovers_a_planted_permutation_with_and_without_fallback():
    module, a = _mlp(0)
    planted = align.random_permutations(MLP_SPEC, a, jax.random.key(5))
    b = align.apply_permutation(MLP_SPEC, planted, a)
    inverse = align.invert_permutations(planted)
    both = align.linen_features(module, {"P_0": ("Dense_0", nn.relu),
                                         "P_1": ("Dense_1", nn.relu)})
    first = align.linen_features(module, {"P_0": ("Dense_0", nn.relu)})
    for features_fn in (both, first):  # P_1 by weight matching in the second case
        result = align.activation_matching(MLP_SPEC, a, b, features_fn, [X[:64], X[64:]])
        for p in planted:
            np.testing.assert_array_equal(result.perms[p], inverse[p])
    with pytest.raises(MergeError, match="no activations for \\['P_1'\\]"):
        align.activation_matching(MLP_SPEC, a, b, first, [X], weight_fallback=False)


def _xent(module):
    def loss(params, batch):
        logits = module.apply({"params": params}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    return loss


def _train(module, seed, x, y, steps=300):
    params = jax.jit(module.init)(jax.random.key(seed), x[:1])["params"]
    opt = optax.adam(3e-3)
    loss = _xent(module)

    @jax.jit
    def step(params, state, idx):
        grads = jax.grad(loss)(params, (x[idx], y[idx]))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, state = step(params, state, rng.integers(0, len(x), 64))
    return params


@pytest.fixture(scope="module")
def trained_pair():
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    x = jnp.asarray(digits.images / 16.0, jnp.float32)
    y = jnp.asarray(digits.target, jnp.int32)
    module = model_lib.MLP((64, 64))
    return module, x, y, _train(module, 0, x, y), _train(module, 1, x, y)


def test_barrier_after_matching_is_below_the_barrier_before(trained_pair):
    module, x, y, a, b = trained_pair
    loss = _xent(module)
    evaluate = lambda p: loss(p, (x, y))
    naive = connectivity.connectivity_curve(evaluate, a, b, num_points=9)
    for method in ("weight_matching", "ste_matching"):
        if method == "weight_matching":
            perms = align.weight_matching(MLP_SPEC, a, b).perms
        else:
            batches = itertools.repeat((x[:256], y[:256]))
            perms = align.ste_matching(MLP_SPEC, a, b, loss, batches, steps=10).perms
        aligned = align.apply_permutation(MLP_SPEC, perms, b)
        matched = connectivity.connectivity_curve(evaluate, a, aligned, num_points=9)
        assert matched.barrier("loss") < 0.5 * naive.barrier("loss"), method
        assert naive.barrier("loss") > 0.05


def test_ste_matching_records_losses_and_runs_dry_clearly(trained_pair):
    module, x, y, a, b = trained_pair
    loss = _xent(module)
    result = align.ste_matching(MLP_SPEC, a, b, loss, itertools.repeat((x, y)), steps=3)
    assert result.iterations == 3 and len(result.history) == 3
    assert all(np.isfinite(result.history))
    with pytest.raises(MergeError, match="ran out"):
        align.ste_matching(MLP_SPEC, a, b, loss, [(x, y)], steps=2)


def test_registered_merges_align_then_average(trained_pair):
    module, x, y, a, b = trained_pair
    perms = align.weight_matching(MLP_SPEC, a, b).perms
    aligned = align.apply_permutation(MLP_SPEC, perms, b)
    merged = mergejax.merge("weight_matching", None, [a, b], spec=MLP_SPEC)
    want = jax.tree.map(lambda u, v: (np.asarray(u, np.float64) + np.asarray(v)) / 2,
                        a, aligned)
    for got, exp in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)
    assert mergejax.get_method("weight_matching").family == "alignment"
    with pytest.raises(MergeError, match="needs hyperparameter\\(s\\) \\['spec'\\]"):
        mergejax.merge("weight_matching", None, [a, b])


def test_bad_input_is_a_clear_error():
    _, a = _mlp(0)
    _, c = _mlp(0, (32, 8))
    with pytest.raises(MergeError, match="solver"):
        align.weight_matching(MLP_SPEC, a, a, solver="lapjv")
    with pytest.raises(MergeError):
        align.weight_matching(MLP_SPEC, a, c)
    with pytest.raises(MergeError, match="max_iter"):
        align.weight_matching(MLP_SPEC, a, a, max_iter=0)
    with pytest.raises(MergeError, match="square"):
        align.solve_assignment(np.zeros((2, 3)))
