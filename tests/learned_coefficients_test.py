"""AdaMerging, AdaMerging++ and the evolutionary search (`mergejax.learned.coefficients`),
and the shared loop (`mergejax.learned.loop`), on a tiny linear classifier.

The references are written here from the papers' definitions: the merged model
``theta_0 + sum_k lambda[g, k] tau_k`` (AdaMerging eq. 3/4), the entropy of the softmax
predictions summed over tasks (eq. 5), TIES's trim / elect / keep-agreeing (Yadav et al.,
arXiv 2306.01708) for AdaMerging++'s inputs; the gradient is checked by central finite
differences of that NumPy objective in float64.
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import x64

import mergejax
from mergejax import MergeError
from mergejax.learned import coefficients as coef
from mergejax.learned import loop

K = 3


def setup(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    base = {"dense": {"kernel": rng.standard_normal((4, 5)), "bias": rng.standard_normal(5)},
            "out": {"kernel": rng.standard_normal((5, 3))}, "step": np.int32(7)}
    models = []
    for _ in range(K):
        models.append({"dense": {"kernel": base["dense"]["kernel"] + rng.standard_normal((4, 5)),
                                 "bias": base["dense"]["bias"] + rng.standard_normal(5)},
                       "out": {"kernel": base["out"]["kernel"] + rng.standard_normal((5, 3))},
                       "step": np.int32(9)})
    cast = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jnp.asarray(x, dtype if np.asarray(x).dtype.kind == "f" else x.dtype), t)
    inputs = [rng.standard_normal((6, 4)) for _ in range(K)]
    return cast(base), [cast(m) for m in models], [jnp.asarray(x, dtype) for x in inputs]


def apply_fn(p, x):
    return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"]


def np_apply(p, x):
    return np.tanh(x @ p["dense/kernel"] + p["dense/bias"]) @ p["out/kernel"]


PATHS = ("dense/bias", "dense/kernel", "out/kernel")  # jax.tree.leaves order (sorted keys)


def np_flat(tree):
    return {"dense/kernel": np.asarray(tree["dense"]["kernel"], np.float64),
            "dense/bias": np.asarray(tree["dense"]["bias"], np.float64),
            "out/kernel": np.asarray(tree["out"]["kernel"], np.float64)}


def np_merge(base, models, lam, group_of):
    b = np_flat(base)
    ms = [np_flat(m) for m in models]
    return {p: b[p] + sum(lam[group_of[p], k] * (ms[k][p] - b[p]) for k in range(len(ms)))
            for p in PATHS}


def np_entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.mean(np.sum(np.exp(logp) * logp, -1))


def np_objective(base, models, lam, group_of, inputs):
    p = np_merge(base, models, lam, group_of)
    return sum(np_entropy(np_apply(p, np.asarray(x, np.float64))) for x in inputs)


def cycles(inputs):
    return [itertools.cycle([x]) for x in inputs]


def test_coefficient_groups():
    base, _, _ = setup()
    g = coef.coefficient_groups(base, "layer")
    assert g.names == PATHS and g.index == (0, 1, 2, None)
    g = coef.coefficient_groups(base, "task")
    assert g.names == ("all",) and g.index == (0, 0, 0, None)
    g = coef.coefficient_groups(base, "layer", [r"^dense"])
    assert g.names == ("dense", "out/kernel") and g.index == (0, 0, 1, None)
    with pytest.raises(MergeError, match=r"groups \['nothing'\] match no leaf path"):
        coef.coefficient_groups(base, "layer", ["nothing"])
    with pytest.raises(MergeError, match="granularity must be one of"):
        coef.coefficient_groups(base, "block")
    with pytest.raises(MergeError, match="is not a regular expression"):
        coef.coefficient_groups(base, "layer", ["("])


def test_merge_with_coefficients_matches_numpy():
    base, models, _ = setup(1)
    groups = coef.coefficient_groups(base, "layer")
    lam = np.random.default_rng(2).uniform(-1, 1, (3, K))
    out = coef.merge_with_coefficients(base, models, jnp.asarray(lam, jnp.float32), groups)
    expected = np_merge(base, models, lam, {p: i for i, p in enumerate(PATHS)})
    for p, v in np_flat(out).items():
        np.testing.assert_allclose(v, expected[p], rtol=1e-5, atol=1e-5)
    assert int(out["step"]) == 7 and out["step"].dtype == jnp.int32
    with pytest.raises(MergeError, match=r"coefficients must have shape \(groups, models\)"):
        coef.merge_with_coefficients(base, models, jnp.zeros((1, K)), groups)


def test_learning_another_methods_coefficients():
    """With every group at the same weights, learning TIES's weights per leaf is TIES."""
    base, models, _ = setup(3)
    groups = coef.coefficient_groups(base, "layer")
    w = jnp.array([0.2, 0.5, 0.9])
    out = coef.merge_with_coefficients(base, models, jnp.tile(w, (3, 1)), groups,
                                       method="ties", method_hparams={"density": 0.5})
    expected = mergejax.ties(base, models, weights=w, density=0.5)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeError, match="has no differentiable per-model coefficient"):
        coef.merge_with_coefficients(base, models, jnp.ones((3, K)), groups, method="ties",
                                     coefficient="density")


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_step_gradient_matches_finite_differences(granularity):
    with x64():
        base, models, inputs = setup(4, jnp.float64)
        groups = coef.coefficient_groups(base, granularity)
        group_of = {p: groups.index[i] for i, p in enumerate(PATHS)}
        lam0 = np.random.default_rng(5).uniform(0.1, 0.5, (len(groups.names), K))
        lr = 1e-3
        step = coef.adamerging_step(apply_fn, None, groups, optimizer=optax.sgd(lr))
        state = (jnp.asarray(lam0), optax.sgd(lr).init(jnp.asarray(lam0)))
        (lam1, _), loss = step(state, tuple(inputs), base, models)
        grad = (lam0 - np.asarray(lam1)) / lr
        np.testing.assert_allclose(float(loss), np_objective(base, models, lam0, group_of,
                                                             inputs), rtol=1e-10)
        eps = 1e-6
        fd = np.zeros_like(lam0)
        for idx in np.ndindex(lam0.shape):
            up, down = lam0.copy(), lam0.copy()
            up[idx] += eps
            down[idx] -= eps
            fd[idx] = (np_objective(base, models, up, group_of, inputs)
                       - np_objective(base, models, down, group_of, inputs)) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_heads_are_applied_per_task():
    with x64():
        base, models, inputs = setup(6, jnp.float64)
        # Heads with different numbers of classes.
        heads_np = [np.random.default_rng(10 + t).standard_normal((3, 2 + t))
                    for t in range(K)]
        heads = [lambda out, h=h: out @ jnp.asarray(h) for h in heads_np]
        groups = coef.coefficient_groups(base, "task")
        step = coef.adamerging_step(apply_fn, heads, groups, optimizer=optax.sgd(0.0))
        lam = jnp.full((1, K), 0.3)
        _, loss = step((lam, optax.sgd(0.0).init(lam)), tuple(inputs), base, models)
        p = np_merge(base, models, np.full((1, K), 0.3), {q: 0 for q in PATHS})
        expected = sum(np_entropy(np_apply(p, np.asarray(x)) @ h)
                       for x, h in zip(inputs, heads_np))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-10)


def test_adamerging_lowers_entropy_and_compiles_once():
    base, models, inputs = setup(7)
    traces = []

    def counting_apply(p, x):
        traces.append(1)
        return apply_fn(p, x)

    result = mergejax.adamerging(base, models, apply_fn=counting_apply,
                                 batches=cycles(inputs), steps=30, learning_rate=0.05)
    assert result.losses[-1] < result.losses[0] - 0.05
    # One trace of the per-task program (compiled once, run for each task); later steps
    # reuse it, and the final merge does not apply the model.
    assert len(traces) == 1
    assert result.coefficients.shape == (3, K)
    expected = np_merge(base, models, np.asarray(result.coefficients, np.float64),
                        {p: i for i, p in enumerate(PATHS)})
    for p, v in np_flat(result.params).items():
        np.testing.assert_allclose(v, expected[p], rtol=1e-5, atol=1e-5)


def test_clip_keeps_coefficients_in_bounds():
    base, models, inputs = setup(8)
    result = mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs),
                                 steps=20, learning_rate=0.5, clip=(0.0, 1.0))
    lam = np.asarray(result.coefficients)
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert np.any((lam == 0.0) | (lam == 1.0)), "a large step must reach a bound"
    with pytest.raises(MergeError, match="clip must be finite with low < high"):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs),
                            steps=1, clip=(1.0, 0.0))


def test_resume_reproduces_the_trajectory(tmp_path):
    base, models, inputs = setup(9)
    rng = np.random.default_rng(0)
    stream = [[jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), jnp.float32)
               for _ in range(12)] for x in inputs]
    kwargs = dict(apply_fn=apply_fn, steps=12, learning_rate=0.05, granularity="layer")
    full = mergejax.adamerging(base, models, batches=[iter(s) for s in stream], **kwargs)
    ckpt = str(tmp_path / "ckpt")
    part = mergejax.adamerging(base, models, batches=[iter(s) for s in stream],
                               checkpoint_dir=ckpt, checkpoint_every=4,
                               **{**kwargs, "steps": 6})
    assert sorted(os.listdir(ckpt)) == ["4", "6"]
    resumed = mergejax.adamerging(base, models, batches=[iter(s) for s in stream],
                                  checkpoint_dir=ckpt, checkpoint_every=4, **kwargs)
    np.testing.assert_array_equal(part.losses, full.losses[:6])
    np.testing.assert_array_equal(resumed.losses, full.losses)
    np.testing.assert_array_equal(resumed.coefficients, full.coefficients)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    base, models, inputs = setup(10)
    bad = [jnp.full_like(inputs[0], jnp.nan)]
    batches = [itertools.chain([x] * 5, bad) if t == 1 else itertools.cycle([x])
               for t, x in enumerate(inputs)]
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(MergeError, match=r"adamerging: loss nan at step 5; stopped \(the "
                                         r"last good checkpoint is step 4 in "):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=batches, steps=10,
                            checkpoint_dir=ckpt, checkpoint_every=2)
    assert sorted(os.listdir(ckpt)) == ["2", "4"]


def test_bad_inputs():
    base, models, inputs = setup(11)
    with pytest.raises(MergeError, match=r"task 2's batches ran out at step 3"):
        mergejax.adamerging(base, models, apply_fn=apply_fn,
                            batches=cycles(inputs[:2]) + [iter([inputs[2]] * 3)], steps=5)
    with pytest.raises(MergeError, match="got 2 batch iterables for 3 models"):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs[:2]))
    with pytest.raises(MergeError, match="got 2 heads for 3 models"):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs),
                            heads=[lambda x: x] * 2)
    with pytest.raises(MergeError, match=r"adamerging needs hyperparameter\(s\) \['apply_fn'"):
        mergejax.merge("adamerging", base, models)
    with pytest.raises(MergeError, match="steps must be a positive int"):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs), steps=0)
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        mergejax.adamerging(base, models, apply_fn=apply_fn, batches=cycles(inputs),
                            method="nope")


def np_ties_vectors(base, models, density):
    """Each task vector trimmed over the whole model as the TIES code's
    ``topk_values_mask`` (``|tau| >=`` the ``(d - int(d * density))``-th smallest
    magnitude), sign of the sum of the trimmed vectors, agreeing entries kept."""
    b = np_flat(base)
    taus = [{p: np_flat(m)[p] - b[p] for p in PATHS} for m in models]
    trimmed = []
    for tau in taus:
        flat = np.concatenate([np.abs(tau[p]).ravel() for p in PATHS])
        kth = np.sort(flat)[flat.size - int(density * flat.size) - 1]
        trimmed.append({p: np.where(np.abs(tau[p]) >= kth, tau[p], 0.0) for p in PATHS})
    sign = {p: np.where(sum(t[p] for t in trimmed) >= 0, 1.0, -1.0) for p in PATHS}
    return [{p: np.where(np.sign(t[p]) == sign[p], t[p], 0.0) for p in PATHS}
            for t in trimmed]


def test_ties_processed_models_match_numpy():
    base, models, _ = setup(12)
    got = coef.ties_processed_models(base, models, density=0.2)
    expected = np_ties_vectors(base, models, 0.2)
    b = np_flat(base)
    for g, e in zip(got, expected):
        for p in PATHS:
            np.testing.assert_allclose(np_flat(g)[p] - b[p], e[p], atol=1e-6)
        assert int(g["step"]) == 7


def test_adamerging_pp_learns_on_the_processed_vectors():
    base, models, inputs = setup(13)
    result = mergejax.merge("adamerging_pp", base, models, apply_fn=apply_fn,
                            batches=cycles(inputs), steps=3, density=0.3, granularity="task")
    taus = np_ties_vectors(base, models, 0.3)
    lam = np.asarray(result.coefficients, np.float64)[0]
    b = np_flat(base)
    for p in PATHS:
        np.testing.assert_allclose(np_flat(result.params)[p],
                                   b[p] + sum(lam[k] * taus[k][p] for k in range(K)),
                                   rtol=1e-5, atol=1e-5)


def test_evolutionary_finds_known_coefficients():
    base, models, _ = setup(14)
    target = np.array([0.7, 0.1, 0.4])
    b = np_flat(base)
    want = {p: b[p] + sum(target[k] * (np_flat(models[k])[p] - b[p]) for k in range(K))
            for p in PATHS}

    def fitness(params):
        got = np_flat(params)
        return -sum(float(np.sum((got[p] - want[p]) ** 2)) for p in PATHS)

    result = mergejax.merge("evolutionary", base, models, fitness=fitness,
                            granularity="task", steps=60, sigma0=0.2, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(result.coefficients)[0], target, atol=0.02)
    assert result.fitness == pytest.approx(fitness(result.params), rel=1e-5)
    assert result.history.shape[0] == 60
    with pytest.raises(MergeError, match="evolutionary is random: pass key="):
        mergejax.merge("evolutionary", base, models, fitness=fitness)


def test_entropy_and_task_logits():
    np.testing.assert_allclose(loop.entropy(jnp.zeros((4, 10))), np.log(10), rtol=1e-6)
    logits = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(loop.entropy(jnp.asarray(logits)), np_entropy(logits),
                               rtol=1e-5)
    heads = [lambda x: 2 * x, lambda x: -x]
    assert float(loop.task_logits(lambda p, b: p * b, heads, 3.0, 2.0, 1)) == -6.0
    assert float(loop.task_logits(lambda p, b: p * b, None, 3.0, 2.0, 1)) == 6.0


@pytest.mark.parametrize("tasks", ["fused", "unrolled"])
def test_task_modes_agree_with_sequential(tasks):
    """The one-program modes (all tasks' batches concatenated, or the tasks unrolled) give
    the default sequential step's losses and updates, ragged batch sizes included."""
    base, models, inputs = setup(15)
    groups = coef.coefficient_groups(base, "layer")
    lam = jnp.full((3, K), 0.3)
    state = (lam, optax.sgd(1.0).init(lam))
    for batches in (tuple(inputs), (inputs[0], inputs[1][:4], inputs[2])):
        (want, _), want_loss = coef.adamerging_step(
            apply_fn, None, groups, optimizer=optax.sgd(1.0))(state, batches, base, models)
        (got, _), loss = coef.adamerging_step(
            apply_fn, None, groups, optimizer=optax.sgd(1.0), tasks=tasks)(
                state, batches, base, models)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, lam)  # the step did move the coefficients
    with pytest.raises(MergeError, match="tasks must be one of"):
        coef.adamerging_step(apply_fn, None, groups, optimizer=optax.sgd(1.0), tasks="loop")


def test_all_task_logits_fuses_batches():
    base, _, inputs = setup(15)
    calls = []
    counting = lambda p, x: calls.append(x.shape) or apply_fn(p, x)  # noqa: E731
    ragged = [inputs[0], inputs[1][:4], inputs[2]]  # batch sizes may differ
    logits = loop.all_task_logits(counting, None, base, ragged)
    assert calls == [(16, 4)]
    np.testing.assert_allclose(logits[1], apply_fn(base, inputs[1][:4]), rtol=1e-5,
                               atol=1e-6)
    calls.clear()
    loop.all_task_logits(counting, None, base, ragged, fuse=False)
    assert calls == [(6, 4), (4, 4), (6, 4)]
    calls.clear()
    logits = loop.all_task_logits(counting, [lambda z: z, lambda z: -z, lambda z: 2 * z],
                                  base, inputs)
    assert calls == [(18, 4)]
    np.testing.assert_allclose(logits[1], -apply_fn(base, inputs[1]), rtol=1e-5, atol=1e-6)


def test_task_batches_peek_gives_the_first_batches_back():
    draw = loop.TaskBatches([iter([1, 2, 3]), iter("abc")], "t", 2)
    assert draw.peek() == (1, "a") and draw.peek() == (1, "a")
    assert draw(0) == (1, "a") and draw(1) == (2, "b") and draw(2) == (3, "c")
    with pytest.raises(MergeError, match="t: task 0's batches ran out at step 3"):
        draw(3)
    with pytest.raises(MergeError, match="batches must be a sequence of iterables"):
        loop.TaskBatches(iter([]), "t", 2)


def test_sequential_task_value_and_grad_sums_each_tasks_own_loss():
    """Task t's batch goes through task t's loss (the traced index picks it), the
    gradient is taken in the floating leaves only, and the sum equals jax.grad of the
    summed loss computed directly."""
    base, _, inputs = setup(21)
    scales = (1.0, -2.0, 0.5)
    losses = [lambda out, s=s: s * jnp.sum(out ** 2) for s in scales]
    traces = []

    def counting(p, x):
        traces.append(1)
        return apply_fn(p, x)

    value_and_grad = loop.sequential_task_value_and_grad(counting, losses)
    loss, grads = value_and_grad(base, inputs)
    leaves, rebuild = loop.floating_split(base)
    assert len(grads) == len(leaves) == 3  # the int32 "step" leaf is left out

    def direct(fl):
        return sum(s * jnp.sum(apply_fn(rebuild(fl), x) ** 2) for s, x in zip(scales, inputs))

    want_loss, want = jax.value_and_grad(direct)(leaves)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    value_and_grad(base, inputs)
    assert len(traces) == 1  # one program, run per task and reused by later calls
    with pytest.raises(MergeError, match="got 3 task losses for 2 batches"):
        value_and_grad(base, inputs[:2])
