"""Git Re-Basin matching: planted permutations are recovered exactly by weight and
activation matching with both solvers; the solvers agree; coordinate ascent never lowers
its objective and stops at a fixed point; one permutation reaches the brute-force optimum;
sharded params give the same answer; matching (weights or STE) lowers the loss barrier
between two MLPs trained from different seeds; the registered merges; bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from mergejax import registry
from mergejax.align import features as features_lib
from mergejax.align import matching
from mergejax.align import spec as spec_lib
from mergejax.analysis import connectivity
from mergejax.suite import model as model_lib
from mergejax.tree import MergeError, flatten_with_paths

SOLVERS = matching.SOLVERS
X = np.random.default_rng(0).uniform(size=(2, 8, 8)).astype(np.float32)
# Unit counts shared by the MLP and the ResNet (16, 32, 64): one Hungarian compilation each.
MLP = model_lib.MLP((64, 32, 16))
MLP_SPEC = spec_lib.mlp_spec(["Dense_0", "Dense_1", "Dense_2", "Dense_3"])
CASES = {"mlp": (MLP, MLP_SPEC), "resnet": (model_lib.ResNet(8, 1), spec_lib.resnet_spec(8))}


def _random_params(module, seed):
    """Params with every leaf drawn from N(0, 1) (LayerNorm scales are all ones at init,
    which would make some assignments ties); drawn on the host, so no per-shape compiles."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                        jax.eval_shape(module.init, jax.random.key(0), X)["params"])


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_perms(p, q):
    return p.keys() == q.keys() and all(np.array_equal(p[k], q[k]) for k in p)


def _planted(module, spec, seed=1):
    a = _random_params(module, 0)
    planted = spec_lib.random_permutations(spec, a, jax.random.key(seed))
    return a, spec_lib.apply_permutation(spec, planted, a), planted


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_matching_recovers_a_planted_permutation_exactly(case, solver):
    module, spec = CASES[case]
    a, b, planted = _planted(module, spec)
    result = matching.weight_matching(spec, a, b, solver=solver, seed=3)
    assert _equal(spec_lib.apply_permutation(spec, result.perms, b), a)
    assert _same_perms(result.perms, spec_lib.invert_permutations(planted))
    assert all(v.dtype == jnp.int32 for v in result.perms.values())
    want = sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(x, np.float64)))
               for p, x in zip(*flatten_with_paths(a)[:2]) if p in spec.axes_to_perm)
    assert result.objective == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_solvers_agree_and_the_objective_never_decreases(case):
    module, spec = CASES[case]
    a, b = _random_params(module, 0), _random_params(module, 1)
    device, scipy = (matching.weight_matching(spec, a, b, solver=s, seed=7) for s in SOLVERS)
    assert _same_perms(device.perms, scipy.perms)
    assert device.iterations == scipy.iterations >= 2
    assert device.history == scipy.history and device.objective == device.history[-1]
    assert len(device.history) == device.iterations + 1
    assert np.all(np.diff(device.history) >= 0) and device.history[-1] > device.history[0]
    # The objective is what it says, computed independently in float64.
    aligned = spec_lib.apply_permutation(spec, device.perms, b)
    value = sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
                for p, x, y in zip(flatten_with_paths(a)[0], jax.tree.leaves(a),
                                   jax.tree.leaves(aligned)) if p in spec.axes_to_perm)
    assert device.objective == pytest.approx(value, rel=1e-5)
    # The last sweep changed nothing: a fixed point, where every assignment is optimal.
    again = matching.weight_matching(spec, a, b, init_perms=device.perms, seed=1)
    assert again.iterations == 1 and _same_perms(again.perms, device.perms)
    assert again.assignments == len(spec.perm_to_axes)


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_hidden_layer_reaches_the_brute_force_optimum(solver):
    """With one permutation, weight matching is one linear assignment: the global optimum."""
    spec = spec_lib.mlp_spec(["Dense_0", "Dense_1"])
    a, b = (_random_params(model_lib.MLP((5,)), s) for s in (0, 1))
    result = matching.weight_matching(spec, a, b, solver=solver)
    f = jax.tree.map(lambda x: np.asarray(x, np.float64), a)
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), b)

    def objective(p):
        p = list(p)
        return (np.vdot(f["Dense_0"]["kernel"], g["Dense_0"]["kernel"][:, p])
                + np.vdot(f["Dense_0"]["bias"], g["Dense_0"]["bias"][p])
                + np.vdot(f["Dense_1"]["kernel"], g["Dense_1"]["kernel"][p]))

    best = max(itertools.permutations(range(5)), key=objective)
    np.testing.assert_array_equal(result.perms["P_0"], best)
    assert result.objective == pytest.approx(objective(best), rel=1e-5)
    assert result.iterations == 2 and result.assignments == 1  # the 2nd sweep skips P_0
    sim = np.random.default_rng(2).normal(size=(5, 5))
    best = max(itertools.permutations(range(5)), key=lambda p: sum(sim[i, p[i]]
                                                                   for i in range(5)))
    np.testing.assert_array_equal(matching.solve_assignment(sim, solver), best)


def test_weight_matching_on_sharded_params_gives_the_same_permutations():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    module, spec = model_lib.MLP((32, 16)), spec_lib.mlp_spec(["Dense_0", "Dense_1",
                                                               "Dense_2"])
    a, b = _random_params(module, 0), _random_params(module, 1)

    def shard(x):
        axes = [None] * x.ndim
        if x.shape[-1] % 8 == 0:
            axes[-1] = "x"
        return jax.device_put(x, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*axes)))

    a_sharded, b_sharded = jax.tree.map(shard, a), jax.tree.map(shard, b)
    assert len(a_sharded["Dense_0"]["kernel"].sharding.device_set) == 8
    result = matching.weight_matching(spec, a_sharded, b_sharded, solver="scipy")
    assert _same_perms(result.perms, matching.weight_matching(spec, a, b, solver="scipy").perms)


def _mlp_features(names=("P_0", "P_1", "P_2")):
    """Pre-activation outputs: no dead units, whose correlations would all be 0."""
    return features_lib.linen_features(MLP, {p: f"Dense_{p[-1]}" for p in names})


def _inputs(n=4):
    rng = np.random.default_rng(5)
    return [rng.uniform(size=(32, 8, 8)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("solver", SOLVERS)
def test_activation_matching_recovers_a_planted_permutation(solver):
    a, b, planted = _planted(MLP, MLP_SPEC)
    result = matching.activation_matching(MLP_SPEC, a, b, _mlp_features(), _inputs(),
                                          solver=solver)
    assert _same_perms(result.perms, spec_lib.invert_permutations(planted))
    assert result.iterations == 0 and result.assignments == 3
    # Activations for P_1 only: P_0 and P_2 are matched by weights around it.
    only_p1 = _mlp_features(["P_1"])
    result = matching.activation_matching(MLP_SPEC, a, b, only_p1, _inputs(), solver=solver)
    assert _equal(spec_lib.apply_permutation(MLP_SPEC, result.perms, b), a)
    assert result.iterations >= 1 and result.assignments >= 3
    with pytest.raises(MergeError, match="no activations for \\['P_0', 'P_2'\\]"):
        matching.activation_matching(MLP_SPEC, a, b, only_p1, _inputs(), solver=solver,
                                     weight_fallback=False)


# --- two MLPs trained on digits from different seeds ------------------------------------


DIGITS_MLP = model_lib.MLP((64, 64))
DIGITS_SPEC = spec_lib.mlp_spec(["Dense_0", "Dense_1", "Dense_2"])


def _xent(params, batch):
    images, labels = batch
    logits = DIGITS_MLP.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.fixture(scope="module")
def digits():
    """(params_a, params_b, train batches, all data) of two MLPs trained on sklearn's
    digits for 400 Adam steps from different seeds."""
    data = load_digits()
    images = jnp.asarray(data.images / 16.0, jnp.float32)
    labels = jnp.asarray(data.target, jnp.int32)
    opt = optax.adam(3e-3)

    @jax.jit
    def train(key):
        params = DIGITS_MLP.init(key, images[:1])["params"]

        def step(carry, idx):
            params, state = carry
            grads = jax.grad(_xent)(params, (images[idx], labels[idx]))
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        idx = jax.random.randint(jax.random.fold_in(key, 1), (400, 128), 0, len(labels))
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
        return params

    batches = [(images[i:i + 256], labels[i:i + 256]) for i in range(0, 1536, 256)]
    return train(jax.random.key(0)), train(jax.random.key(1)), batches, (images, labels)


def _midpoint_loss(a, b, data):
    return float(_xent(jax.tree.map(lambda x, y: (x + y) / 2, a, b), data))


def test_matching_lowers_the_barrier_between_trained_models(digits):
    a, b, batches, data = digits
    assert float(_xent(a, data)) < 0.1 and float(_xent(b, data)) < 0.1  # both trained
    evaluate = jax.jit(lambda p: _xent(p, data))
    naive = connectivity.connectivity_curve(evaluate, a, b, num_points=5).barrier("loss")
    assert naive > 0.1
    wm = matching.weight_matching(DIGITS_SPEC, a, b)
    ste = matching.ste_matching(DIGITS_SPEC, a, b, _xent, itertools.cycle(batches), steps=12)
    assert ste.iterations == 12 and len(ste.history) == 12 and ste.assignments >= 12 * 2
    for name, perms in (("weight_matching", wm.perms), ("ste_matching", ste.perms)):
        aligned = spec_lib.apply_permutation(DIGITS_SPEC, perms, b)
        matched = connectivity.connectivity_curve(evaluate, a, aligned, num_points=5)
        assert matched.barrier("loss") < 0.5 * naive, (name, naive, matched)
        assert _midpoint_loss(a, aligned, data) < 0.6 * _midpoint_loss(a, b, data), name
    merged = registry.merge("weight_matching", None, [a, b], spec=DIGITS_SPEC)
    assert float(evaluate(merged)) < 0.6 * _midpoint_loss(a, b, data)
    with pytest.raises(MergeError, match="batches ran out after 2 of 3 steps"):
        matching.ste_matching(DIGITS_SPEC, a, b, _xent, batches[:2], steps=3)


# --- registered merges -------------------------------------------------------------------


def test_registered_merges_align_every_model_to_the_first():
    a = _random_params(MLP, 0)
    planted = [spec_lib.random_permutations(MLP_SPEC, a, jax.random.key(k)) for k in (1, 2)]
    b, c = (spec_lib.apply_permutation(MLP_SPEC, p, a) for p in planted)
    squared = lambda p, x: jnp.mean(MLP.apply({"params": p}, x) ** 2)  # noqa: E731
    for name, extra in (
            ("weight_matching", {}),
            ("activation_matching", dict(features_fn=_mlp_features(), inputs=_inputs(),
                                         num_batches=4)),
            ("ste_matching", dict(loss_fn=squared, batches=itertools.cycle(_inputs()),
                                  steps=1))):
        merged = registry.merge(name, None, [a, b, c], spec=MLP_SPEC, **extra)
        for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
        method = registry.get_method(name)
        assert method.family == "alignment" and not method.needs_base
        assert method.hparams["spec"] is registry.REQUIRED
    # Not planted: the weighted average of a and d aligned to a.
    d = _random_params(MLP, 4)
    aligned = spec_lib.apply_permutation(
        MLP_SPEC, matching.weight_matching(MLP_SPEC, a, d, solver="scipy").perms, d)
    merged = registry.merge("weight_matching", None, [a, d], spec=MLP_SPEC, solver="scipy",
                            weights=[3.0, 1.0])
    for x, y, z in zip(jax.tree.leaves(merged), jax.tree.leaves(a), jax.tree.leaves(aligned)):
        np.testing.assert_allclose(x, 0.75 * y + 0.25 * z, rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error():
    a, b = _random_params(MLP, 0), _random_params(MLP, 1)
    with pytest.raises(MergeError, match="solver must be one of \\('device', 'scipy'\\), "
                                         "not 'lapjv'"):
        matching.weight_matching(MLP_SPEC, a, b, solver="lapjv")
    with pytest.raises(MergeError, match="max_iter must be a positive int, got 0"):
        matching.weight_matching(MLP_SPEC, a, b, max_iter=0)
    other = _random_params(model_lib.MLP((64, 32, 8)), 1)
    with pytest.raises(MergeError, match="shape mismatch at 'Dense_2/bias'"):
        matching.weight_matching(MLP_SPEC, a, other)
    with pytest.raises(MergeError, match="params_b.* does not have the tree structure"):
        matching.weight_matching(MLP_SPEC, a, {"Dense_0": b["Dense_0"]})
    with pytest.raises(MergeError, match="do not have: \\['Dense_9/kernel'\\]"):
        matching.weight_matching(spec_lib.mlp_spec(["Dense_0", "Dense_9"]), a, b)
    perms = spec_lib.identity_permutations(MLP_SPEC, a)
    with pytest.raises(MergeError, match="init_perms\\['P_1'\\] is not a permutation of 32"):
        matching.weight_matching(MLP_SPEC, a, b, init_perms={**perms, "P_1": jnp.zeros(32)})
    with pytest.raises(MergeError, match="missing \\['P_2'\\]"):
        matching.weight_matching(MLP_SPEC, a, b, init_perms={"P_0": perms["P_0"],
                                                              "P_1": perms["P_1"]})
    with pytest.raises(MergeError, match="square matrix, got shape \\(2, 3\\)"):
        matching.solve_assignment(np.zeros((2, 3)))
    extra = features_lib.linen_features(MLP, {"P_9": "Dense_0"})
    with pytest.raises(MergeError, match="activations for \\['P_9'\\], which the spec"):
        matching.activation_matching(MLP_SPEC, a, b, extra, _inputs(1))
    wrong = features_lib.linen_features(MLP, {"P_1": "Dense_0"})
    with pytest.raises(MergeError, match="gives 64 units for 'P_1'; the spec's axes have 32"):
        matching.activation_matching(MLP_SPEC, a, b, wrong, _inputs(1))
    with pytest.raises(MergeError, match="steps must be a positive int"):
        matching.ste_matching(MLP_SPEC, a, b, lambda p, x: 0.0, [], steps=0)
    with pytest.raises(MergeError, match="aligning needs at least two models, got 1"):
        registry.merge("weight_matching", None, [a], spec=MLP_SPEC)
    with pytest.raises(MergeError, match="shape mismatch at 'Dense_2/bias': models\\[0\\] has "
                                         "float32\\[16\\], models\\[1\\] has float32\\[8\\]"):
        registry.merge("weight_matching", None, [a, other], spec=MLP_SPEC)
    with pytest.raises(MergeError, match="needs hyperparameter\\(s\\) \\['spec'\\]"):
        registry.merge("weight_matching", None, [a, b])
    with pytest.raises(MergeError, match="needs hyperparameter\\(s\\) \\['steps'\\]"):
        registry.merge("ste_matching", None, [a, b], spec=MLP_SPEC, loss_fn=None, batches=[])


def test_matching_uses_only_floating_leaves_named_in_the_spec():
    spec = spec_lib.PermutationSpec({"w": (None, "h"), "count": ("h",)})
    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    a = {"w": w, "count": np.arange(4, dtype=np.int32), "extra": np.ones(3, np.float32)}
    b = {"w": w[:, [2, 0, 3, 1]], "count": np.zeros(4, np.int32),
         "extra": np.zeros(3, np.float32)}
    result = matching.weight_matching(spec, a, b)
    np.testing.assert_array_equal(result.perms["h"], np.argsort([2, 0, 3, 1]))
    assert result.objective == pytest.approx(float(np.vdot(w, w)), rel=1e-6)
