"""`mergejax.finetune` against references written here from the papers' definitions:

* the linearized model ``f(x; theta_0) + J f(x; theta_0) (theta - theta_0)``
  (Ortiz-Jimenez et al., arXiv 2305.12827) of a Flax Linen MLP, its Jacobian-vector
  product recomputed by hand in NumPy, and its exact linearity in the task vectors that
  `linearized_finetune` produces;
* one SAM step (Foret et al., arXiv 2010.01412) and one ASAM step (Kwon et al., arXiv
  2102.11600) with SGD on ``L(theta) = theta^T A theta / 2 - b^T theta``:
  ``theta - lr * grad L(theta + eps)``, ``eps = rho g / |g|`` resp.
  ``rho T^2 g / |T g|``, ``T = |theta| + eta``, computed in float64 NumPy.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import x64
from flax import linen as nn

import mergejax
from mergejax import MergeError
from mergejax.finetune import (
    default_optimizer,
    linearize,
    linearized_finetune,
    sam,
    sam_finetune,
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(8, name="hidden")(x)))


MODEL = MLP()


def apply_fn(params, batch):
    return MODEL.apply({"params": params["net"]}, batch["x"])


def xent(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def init_params() -> dict:
    net = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    return {"net": net, "step": jnp.asarray(7, jnp.int32)}


def task_batches(seed: int, num: int = 4) -> list[dict]:
    r = np.random.RandomState(seed)
    w = r.randn(4, 3)
    out = []
    for _ in range(num):
        x = r.randn(16, 4).astype(np.float32)
        out.append({"x": x, "y": (x @ w).argmax(-1)})
    return out


def np_linearized(p0: dict, p: dict, x: np.ndarray) -> np.ndarray:
    """f(x; p0) + J f(x; p0) (p - p0) for out(tanh(hidden(x))), by the chain rule."""
    g = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p0["net"].items()}
    d = {k: {n: np.asarray(p["net"][k][n], np.float64) - g[k][n] for n in v}
         for k, v in g.items()}
    h = np.tanh(x @ g["hidden"]["kernel"] + g["hidden"]["bias"])
    dh = (1 - h ** 2) * (x @ d["hidden"]["kernel"] + d["hidden"]["bias"])
    f0 = h @ g["out"]["kernel"] + g["out"]["bias"]
    return f0 + dh @ g["out"]["kernel"] + h @ d["out"]["kernel"] + d["out"]["bias"]


def mean_loss(apply, params, batches) -> float:
    return float(np.mean([np.mean(xent(apply(params, b), b)) for b in batches]))


def test_linearize_at_the_expansion_point_is_the_model():
    params0 = init_params()
    x = {"x": task_batches(0)[0]["x"]}
    np.testing.assert_allclose(linearize(apply_fn, params0)(params0, x), apply_fn(params0, x),
                               rtol=1e-6, atol=1e-6)


def test_linearized_finetune_is_linear_in_its_task_vectors():
    params0 = init_params()
    apply_lin = linearize(apply_fn, params0)
    data = [task_batches(1), task_batches(2)]
    experts = [linearized_finetune(apply_fn, params0, xent, itertools.cycle(b), steps=12,
                                   optimizer=optax.adam(3e-2)) for b in data]
    for expert, batches in zip(experts, data):
        assert int(expert["step"]) == 7                       # non-float leaf kept
        assert jax.tree.structure(expert) == jax.tree.structure(params0)
        assert mean_loss(apply_lin, expert, batches) < mean_loss(apply_lin, params0,
                                                                 batches) - 0.05
    x = np.concatenate([b[0]["x"] for b in data])
    f0 = np.asarray(apply_fn(params0, {"x": x}), np.float64)
    f1, f2 = (np.asarray(apply_lin(e, {"x": x}), np.float64) for e in experts)
    for expert, fi in zip(experts, (f1, f2)):
        np.testing.assert_allclose(fi, np_linearized(params0, expert, x), rtol=1e-4,
                                   atol=1e-5)
        assert np.abs(fi - f0).max() > 0.1                   # the experts really moved
    for a, b in ((0.5, 0.5), (1.0, -0.7), (2.0, 0.3)):
        merged = mergejax.task_arithmetic(params0, experts, weights=[a, b])
        got = np.asarray(apply_lin(merged, {"x": x}), np.float64)
        np.testing.assert_allclose(got, f0 + a * (f1 - f0) + b * (f2 - f0), rtol=1e-4,
                                   atol=1e-4)
        nonlinear = np.asarray(apply_fn(merged, {"x": x}), np.float64)
        assert np.abs(nonlinear - got).max() > 1e-3        # the plain model is not linear


def quadratic(seed: int = 0):
    r = np.random.RandomState(seed)
    m = r.randn(5, 5)
    a = m @ m.T + 5 * np.eye(5)
    b = r.randn(5)
    theta = r.randn(5)
    return a, b, theta


def split(v) -> dict:
    return {"first": jnp.asarray(v[:2]), "rest": {"x": jnp.asarray(v[2:])}}


def join(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree["first"]), np.asarray(tree["rest"]["x"])])


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_its_definition(adaptive):
    a, b, theta = quadratic()
    lr, rho, eta = 0.05, 0.3, 0.01
    with x64():
        def loss(p):
            v = jnp.concatenate([p["first"], p["rest"]["x"]])
            return 0.5 * v @ jnp.asarray(a) @ v - jnp.asarray(b) @ v

        grad_fn = jax.grad(loss)
        opt = sam(optax.sgd(lr), rho, adaptive=adaptive, eta=eta)
        params = split(theta)
        state = opt.init(params)
        step = jax.jit(lambda p, s: opt.update(grad_fn(p), s, p, grad_fn=grad_fn))
        expected = theta.copy()
        for _ in range(3):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
            g = a @ expected - b
            if adaptive:
                t = np.abs(expected) + eta
                eps = rho * t ** 2 * g / np.linalg.norm(t * g)
            else:
                eps = rho * g / np.linalg.norm(g)
            expected = expected - lr * (a @ (expected + eps) - b)
            np.testing.assert_allclose(join(params), expected, rtol=1e-12, atol=1e-12)
        # at theta = 0 with b = 0, g = 0 exactly: eps must be 0 (not NaN), so g_sam = 0
        flat_grad = jax.grad(lambda p: loss(p) + jnp.asarray(b) @ jnp.concatenate(
            [p["first"], p["rest"]["x"]]))
        zero = split(np.zeros(5))
        updates, _ = opt.update(flat_grad(zero), state, zero, grad_fn=flat_grad)
        np.testing.assert_array_equal(join(updates), 0.0)


def regression_batches(seed: int, num: int) -> list[dict]:
    r = np.random.RandomState(seed)
    w = r.randn(3)
    out = []
    for _ in range(num):
        x = r.randn(32, 3).astype(np.float32)
        out.append({"x": x, "y": x @ w + 0.01 * r.randn(32).astype(np.float32)})
    return out


def regression_loss(params, batch):
    return (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_finetune_reduces_the_loss(adaptive):
    batches = regression_batches(0, 4)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(()), "step": jnp.asarray(2, jnp.int32)}
    out = sam_finetune(regression_loss, params, itertools.cycle(batches), steps=40, rho=0.05,
                       adaptive=adaptive, optimizer=optax.sgd(0.1))

    def total(p):
        return float(np.mean([np.mean(regression_loss(p, b)) for b in batches]))

    assert total(out) < 0.1 * total(params)
    assert int(out["step"]) == 2


def test_default_optimizer_is_adamw_with_warmup_and_cosine():
    params = {"w": jnp.ones(3)}
    opt = default_optimizer(1000, learning_rate=1e-3, weight_decay=0.0, warmup_steps=100)
    state = opt.init(params)
    grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    for _ in range(50):                              # half-way through the warmup
        updates, state = opt.update(grads, state, params)
    # Adam's step on a constant gradient is lr * sign(g); lr at step 49 is 49/100 * 1e-3
    np.testing.assert_allclose(updates["w"], -0.49e-3 * np.sign(grads["w"]), rtol=1e-4)
    out = sam_finetune(regression_loss, {"w": jnp.zeros(3), "b": jnp.zeros(())},
                       iter(regression_batches(1, 3)), steps=3)
    assert np.abs(np.asarray(out["w"])).max() < 1e-4        # lr 1e-5: barely moves


def test_bad_inputs():
    params0 = init_params()
    batches = task_batches(0, num=2)
    with pytest.raises(MergeError, match="ran out at step 2"):
        linearized_finetune(apply_fn, params0, xent, batches, steps=5,
                            optimizer=optax.sgd(0.1))
    with pytest.raises(MergeError, match="ran out"):
        sam_finetune(regression_loss, {"w": jnp.zeros(3), "b": jnp.zeros(())},
                     iter(regression_batches(0, 1)), steps=2, optimizer=optax.sgd(0.1))
    for steps in (0, -1, 2.0, True):
        with pytest.raises(MergeError, match="steps"):
            linearized_finetune(apply_fn, params0, xent, batches, steps=steps)
    with pytest.raises(MergeError, match="iterable"):
        linearized_finetune(apply_fn, params0, xent, 3, steps=1)
    with pytest.raises(MergeError, match="GradientTransformation"):
        sam_finetune(regression_loss, {"w": jnp.zeros(3)}, batches, steps=1, optimizer="sgd")
    apply_lin = linearize(apply_fn, params0)
    wrong = jax.tree.map(lambda x: x, params0)
    wrong["net"]["out"]["kernel"] = jnp.zeros((8, 4))
    with pytest.raises(MergeError, match="net/out/kernel"):
        apply_lin(wrong, {"x": batches[0]["x"]})
    missing = {"net": params0["net"]}
    with pytest.raises(MergeError, match="'step'"):
        apply_lin(missing, {"x": batches[0]["x"]})
    for rho in (-0.1, float("nan")):
        with pytest.raises(MergeError, match="rho"):
            sam(optax.sgd(0.1), rho)
    opt = sam(optax.sgd(0.1))
    with pytest.raises(MergeError, match="grad_fn"):
        opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
