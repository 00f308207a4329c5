"""Localize-and-Stitch with learned masks (`mergejax.learned.localize`).

The toy problem: linear regression ``y = x @ W_ft + b_ft`` where the last input features
are always zero, so the task-vector entries of those kernel rows cannot change the loss.
Those "dead" entries are given the LARGEST |tau|, so the dataless top-k initialisation
selects them and none of the entries that matter; the learned mask must flip both. The
references are written in NumPy (float64) from the paper's objective (arXiv 2408.13656)
and do not call mergejax.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax
from mergejax import MergeError
from mergejax.learned import (
    LocalizationResult,
    init_logits,
    learn_masks,
    localize_and_stitch,
    mask_from_logits,
    masked_params,
    sparsity_penalty,
)
from mergejax.methods.masking import stitch
from mergejax.methods.sparse import localize_stitch

D_IN, D_OUT = 16, 4
NUM = D_IN * D_OUT + D_OUT  # floating entries: kernel + bias
DENSITY = 0.25  # int(0.25 * 68) = 17 entries start selected
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def make_task(live: int, seed: int):
    """(base, finetuned, needed kernel mask): features >= ``live`` are always zero."""
    rng = np.random.default_rng(seed)
    base = {"dense": {"kernel": rng.normal(size=(D_IN, D_OUT)).astype(np.float32),
                      "bias": rng.normal(size=(D_OUT,)).astype(np.float32)},
            "step": np.int32(3)}
    sign = rng.choice([-1.0, 1.0], size=(D_IN, D_OUT))
    tk = np.empty((D_IN, D_OUT))
    tk[:live] = sign[:live] * rng.uniform(0.5, 1.5, size=(live, D_OUT))
    tk[live:] = sign[live:] * rng.uniform(2.0, 4.0, size=(D_IN - live, D_OUT))  # dead, big
    tb = rng.choice([-1.0, 1.0], size=D_OUT) * rng.uniform(0.5, 1.5, size=D_OUT)
    ft = {"dense": {"kernel": (base["dense"]["kernel"] + tk).astype(np.float32),
                    "bias": (base["dense"]["bias"] + tb).astype(np.float32)},
          "step": np.int32(7)}
    needed = np.zeros((D_IN, D_OUT), bool)
    needed[:live] = True
    as_jax = lambda t: jax.tree.map(jnp.asarray, t)
    return as_jax(base), as_jax(ft), needed


def make_batches(ft, live: int, n: int, seed: int, batch_size: int = 32) -> list:
    rng = np.random.default_rng(seed)
    kernel, bias = np.asarray(ft["dense"]["kernel"]), np.asarray(ft["dense"]["bias"])
    out = []
    for _ in range(n):
        x = rng.normal(size=(batch_size, D_IN)).astype(np.float32)
        x[:, live:] = 0.0
        out.append((jnp.asarray(x), jnp.asarray(x @ kernel + bias)))
    return out


def loss_fn(params, batch):
    x, y = batch
    pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def np_loss(kernel, bias, batch) -> float:
    x, y = (np.asarray(a, np.float64) for a in batch)
    return float(np.mean(np.sum((x @ kernel + bias - y) ** 2, axis=-1)))


def np_sigmoid(s):
    return 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64)))


LIVE = 8
TOY = make_task(LIVE, seed=0)
TRAIN_KW = {"density": DENSITY, "l1": 10.0, "steps": 200}


@pytest.fixture(scope="module")
def trained() -> LocalizationResult:
    base, ft, _ = TOY
    return learn_masks(base, ft, loss_fn, make_batches(ft, LIVE, 200, seed=1), **TRAIN_KW)


# ----------------------------------------------------------------------------- learning


def test_dataless_init_selects_only_dead_entries():
    """The set-up is adversarial for the initialisation: its top-17 |tau| are all dead."""
    base, ft, needed = TOY
    s = init_logits(base, ft, density=DENSITY, sigmoid_bias=5.0)
    assert s["step"] is None
    sk, sb = np.asarray(s["dense"]["kernel"]), np.asarray(s["dense"]["bias"])
    assert set(np.unique(np.concatenate([sk.ravel(), sb]))) == {-5.0, 5.0}
    assert (sk > 0).sum() + (sb > 0).sum() == int(DENSITY * NUM)
    assert not (sk > 0)[needed].any() and not (sb > 0).any()


def test_learned_mask_recovers_needed_entries(trained):
    _, _, needed = TOY
    mk = np.asarray(trained.mask["dense"]["kernel"])
    np.testing.assert_array_equal(mk, needed)  # every needed entry kept, every dead dropped
    assert np.asarray(trained.mask["dense"]["bias"]).all()
    step_mask = trained.mask["step"]
    assert step_mask.dtype == bool and not np.asarray(step_mask).any()
    assert trained.logits["step"] is None
    assert trained.logits["dense"]["kernel"].dtype == jnp.float32


def test_loss_decreases_and_masked_model_fits(trained):
    base, ft, _ = TOY
    losses = trained.losses
    assert len(losses) == TRAIN_KW["steps"] and all(isinstance(v, float) for v in losses)
    assert losses[-1] < 0.2 * losses[0]
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    # The hard-masked model theta_0 + gamma * tau fits the task as well as theta_ft does.
    grafted = stitch(base, [ft], [trained.mask])
    batch = make_batches(ft, LIVE, 1, seed=99)[0]
    assert float(loss_fn(grafted, batch)) < 1e-8
    assert float(loss_fn(base, batch)) > 1.0
    assert int(grafted["step"]) == 3  # non-floating leaves are the base's


def test_step_compiles_once():
    base, ft, _ = TOY
    traces, compiles = [], []

    def counting_loss(params, batch):
        traces.append(1)  # runs only while tracing
        return loss_fn(params, batch)

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE and "_mask_step" in str(kw.get("fun_name", "")):
            compiles.append(kw["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = learn_masks(base, ft, counting_loss, make_batches(ft, LIVE, 30, seed=2),
                             density=DENSITY, steps=30)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(result.losses) == 30
    assert len(traces) == 1
    assert len(compiles) == 1, compiles


# ----------------------------------------------------------------------------- objective


def test_sparsity_penalty_matches_numpy():
    rng = np.random.default_rng(5)
    s = {"a": rng.normal(scale=4.0, size=(3, 5)).astype(np.float32),
         "b": {"c": rng.normal(scale=4.0, size=(7,)).astype(np.float32), "n": None}}
    expected = 2.5 * (np_sigmoid(s["a"]).sum() + np_sigmoid(s["b"]["c"]).sum()) / 22
    got = sparsity_penalty(jax.tree.map(jnp.asarray, s), 2.5)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # Fixed values: sigmoid(0) = 1/2, so S = 0 everywhere gives l1 / 2.
    np.testing.assert_allclose(float(sparsity_penalty({"w": jnp.zeros((4, 4))}, 3.0)), 1.5)


def test_first_objective_matches_numpy():
    """losses[0] = task loss at theta_0 + sigmoid(S_init) * tau + l1 * mean(sigmoid(S))."""
    base, ft, _ = TOY
    batch = make_batches(ft, LIVE, 1, seed=3)[0]
    l1 = 7.0
    result = learn_masks(base, ft, loss_fn, [batch], density=DENSITY, l1=l1, steps=1)
    bk, bb = (np.asarray(base["dense"][k], np.float64) for k in ("kernel", "bias"))
    tk = np.asarray(ft["dense"]["kernel"], np.float64) - bk
    tb = np.asarray(ft["dense"]["bias"], np.float64) - bb
    flat = np.abs(np.concatenate([tk.ravel(), tb]))
    k = int(DENSITY * flat.size)
    selected = flat >= np.sort(flat)[::-1][k - 1]
    s0 = np.where(selected, 5.0, -5.0)
    gk, gb = np_sigmoid(s0[:tk.size].reshape(tk.shape)), np_sigmoid(s0[tk.size:])
    expected = np_loss(bk + gk * tk, bb + gb * tb, batch) + l1 * np_sigmoid(s0).sum() / NUM
    np.testing.assert_allclose(result.losses[0], expected, rtol=1e-5)


def test_penalty_shrinks_the_mask_with_the_true_l1_sign():
    """With a constant task loss one SGD step is S - lr * l1 * sigmoid'(S) / N for every
    entry: selected logits move toward 0 (the official code moves them away)."""
    base, ft, _ = TOY
    s0 = init_logits(base, ft, density=DENSITY)
    lr, l1 = 3.0, 2.0
    result = learn_masks(base, ft, lambda p, b: jnp.float32(0.0), [None], density=DENSITY,
                         l1=l1, steps=1, learning_rate=lr)
    for path in (("dense", "kernel"), ("dense", "bias")):
        before = np.asarray(s0[path[0]][path[1]], np.float64)
        after = np.asarray(result.logits[path[0]][path[1]], np.float64)
        sig = np_sigmoid(before)
        np.testing.assert_allclose(after, before - lr * l1 * sig * (1 - sig) / NUM,
                                   rtol=1e-6)
        assert (np.abs(after[before > 0]) < np.abs(before[before > 0])).all()


def test_masked_params_and_mask_from_logits():
    base, ft, _ = TOY
    s = {"dense": {"kernel": jnp.full((D_IN, D_OUT), 0.3), "bias": jnp.array([-1e-3, 0.0,
                                                                          1e-3, 9.0])},
         "step": None}
    tau = mergejax.task_vector(base, ft)
    p = masked_params(base, tau, s)
    np.testing.assert_allclose(
        np.asarray(p["dense"]["kernel"]),
        np.asarray(base["dense"]["kernel"]) + np_sigmoid(0.3)
        * (np.asarray(ft["dense"]["kernel"]) - np.asarray(base["dense"]["kernel"])),
        rtol=1e-5, atol=1e-6)
    assert int(p["step"]) == 3
    m = mask_from_logits(base, s)
    np.testing.assert_array_equal(np.asarray(m["dense"]["bias"]), [False, False, True, True])
    assert np.asarray(m["dense"]["kernel"]).all() and not bool(m["step"])


def test_zero_steps_is_the_dataless_localize_stitch():
    """Rounding the initial logits gives the dataless mask of `localize_stitch`."""
    base, ft, _ = TOY
    result = learn_masks(base, ft, loss_fn, [], density=DENSITY, steps=0)
    assert result.losses == []
    ours = stitch(base, [ft], [result.mask])
    dataless = localize_stitch(base, [ft], density=DENSITY)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(dataless)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- stitching


def test_localize_and_stitch_equals_stitch_of_learned_masks():
    base, ft_a, _ = TOY
    _, ft_b, _ = make_task(5, seed=0)  # same base (same seed), another task vector
    batches = [make_batches(ft_a, LIVE, 60, seed=10), make_batches(ft_b, 5, 60, seed=11)]
    kw = {"density": DENSITY, "l1": 10.0, "steps": 60, "optimizer": optax.adam(0.2)}
    merged = localize_and_stitch(base, [ft_a, ft_b], [loss_fn, loss_fn], batches, **kw)
    masks = [learn_masks(base, ft, loss_fn, b, **kw).mask
             for ft, b in zip([ft_a, ft_b], batches)]
    expected = stitch(base, [ft_a, ft_b], masks)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # one loss function for all tasks is accepted
    again = localize_and_stitch(base, [ft_a, ft_b], loss_fn, batches, **kw)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- errors


def test_running_dry_raises():
    base, ft, _ = TOY
    with pytest.raises(MergeError, match=r"ran out after 3 batch.*steps=5"):
        learn_masks(base, ft, loss_fn, make_batches(ft, LIVE, 3, seed=4), steps=5)
    gen = iter(make_batches(ft, LIVE, 2, seed=4))
    with pytest.raises(MergeError, match="ran out after 2"):
        learn_masks(base, ft, loss_fn, gen, steps=3)
    # itertools.cycle gives epochs
    learn_masks(base, ft, loss_fn, itertools.cycle(make_batches(ft, LIVE, 2, seed=4)),
                steps=3)


def test_mismatched_lists_raise():
    base, ft, _ = TOY
    batches = make_batches(ft, LIVE, 2, seed=4)
    with pytest.raises(MergeError, match="2 models, 1 loss functions and 2"):
        localize_and_stitch(base, [ft, ft], [loss_fn], [batches, batches], steps=1)
    with pytest.raises(MergeError, match="2 models, 2 loss functions and 1"):
        localize_and_stitch(base, [ft, ft], [loss_fn, loss_fn], [batches], steps=1)
    with pytest.raises(MergeError, match="empty"):
        localize_and_stitch(base, [], [], [], steps=1)


@pytest.mark.parametrize("kw, match", [
    ({"density": 1.5}, "density"),
    ({"density": -0.1}, "density"),
    ({"sigmoid_bias": 0.0}, "sigmoid_bias"),
    ({"l1": -1.0}, "l1"),
    ({"steps": -1}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"log_every": -1}, "log_every"),
])
def test_bad_hyperparameters_raise(kw, match):
    base, ft, _ = TOY
    with pytest.raises(MergeError, match=match):
        learn_masks(base, ft, loss_fn, make_batches(ft, LIVE, 2, seed=4), **kw)


def test_bad_models_raise():
    base, ft, _ = TOY
    batches = make_batches(ft, LIVE, 2, seed=4)
    with pytest.raises(MergeError, match="base"):
        learn_masks(None, ft, loss_fn, batches)
    wrong = {"dense": {"kernel": ft["dense"]["kernel"][:3]}, "step": ft["step"]}
    with pytest.raises(MergeError):
        learn_masks(base, wrong, loss_fn, batches)
    with pytest.raises(MergeError, match="shape mismatch"):
        learn_masks(base, {**ft, "dense": {**ft["dense"], "bias": jnp.zeros(3)}}, loss_fn,
                    batches)
    with pytest.raises(MergeError, match="loss_fn"):
        learn_masks(base, ft, "mse", batches)
    with pytest.raises(MergeError, match="iterable"):
        learn_masks(base, ft, loss_fn, 3)
    with pytest.raises(MergeError, match="no floating leaves"):
        learn_masks({"n": jnp.int32(1)}, {"n": jnp.int32(2)}, loss_fn, batches)
