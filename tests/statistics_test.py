"""`mergejax.statistics` against NumPy references written here from the definitions:

* diagonal Fisher (Matena & Raffel 2022, arXiv 2111.09832, eq. 4) of a softmax regression
  ``logits = x W + b``, whose per-example score is ``d log p_y / dW = x (e_y - p)^T``,
  ``d log p_y / db = e_y - p``; empirical (true labels), exact (``sum_c p_c g_c^2``) and
  sampled (a Monte-Carlo estimate of the exact one);
* dense-layer input Grams ``sum x^T x`` (RegMean, arXiv 2212.09849) of Linen Dense /
  attention DenseGeneral layers and NNX Linear / LinearGeneral layers, with every layer's
  input recomputed in NumPy from the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from flax import linen as nn
from flax import nnx

from mergejax import MergeError
from mergejax import statistics as st

D, C = 3, 4


def softmax_params(seed: int) -> dict:
    r = np.random.RandomState(seed)
    return {"w": jnp.asarray(r.randn(D, C)), "b": jnp.asarray(r.randn(C)),
            "step": jnp.asarray(7, jnp.int32)}


def softmax_logits(params, x):
    return x @ params["w"] + params["b"] + 0 * params["step"]


def np_probs(p, x):
    z = x @ np.asarray(p["w"]) + np.asarray(p["b"])
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_scores(p, x, y):
    """Per-example gradients of log p_y: (N, D, C) for w, (N, C) for b."""
    e = np.eye(C)[y] - np_probs(p, x)
    return np.einsum("nd,nc->ndc", x, e), e


def np_empirical(p, x, y):
    gw, gb = np_scores(p, x, y)
    return {"w": (gw ** 2).mean(0), "b": (gb ** 2).mean(0)}


def np_exact(p, x):
    probs = np_probs(p, x)
    out = {"w": 0.0, "b": 0.0}
    for c in range(C):
        gw, gb = np_scores(p, x, np.full(len(x), c))
        out["w"] = out["w"] + (probs[:, c, None, None] * gw ** 2).mean(0)
        out["b"] = out["b"] + (probs[:, c, None] * gb ** 2).mean(0)
    return out


def data(seed: int, n: int):
    r = np.random.RandomState(seed)
    return r.randn(n, D), r.randint(0, C, n)


def check_fisher(got, want):
    """float32 Fisher values (log p is taken in float32) on the floating leaves only."""
    assert got["step"] is None
    for k in ("w", "b"):
        assert got[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-7)


def test_empirical_fisher_is_mean_squared_score_over_batches():
    with x64():
        p = softmax_params(0)
        x, y = data(1, 10)
        batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
        check_fisher(st.diagonal_fisher(softmax_logits, p, batches), np_empirical(p, x, y))
        # num_batches stops early: the mean over the first two batches only.
        check_fisher(st.diagonal_fisher(softmax_logits, p, iter(batches), num_batches=2),
                     np_empirical(p, x[:8], y[:8]))


def test_exact_fisher_is_the_expectation_over_classes():
    with x64():
        p = softmax_params(2)
        x, y = data(3, 6)
        want = np_exact(p, x)
        check_fisher(st.diagonal_fisher(softmax_logits, p, [x[:3], x[3:]], mode="exact"), want)
        # (inputs, labels) batches are accepted; the labels are ignored.
        check_fisher(st.diagonal_fisher(softmax_logits, p, [(x, (y + 1) % C)], mode="exact"),
                     want)


def test_sampled_fisher_estimates_the_exact_one_and_is_reproducible():
    p = softmax_params(4)
    x, _ = data(5, 4)
    many = np.repeat(x, 500, axis=0).astype(np.float32)
    batches = [many[:1000], many[1000:]]
    key = jax.random.key(0)
    got = st.diagonal_fisher(softmax_logits, p, batches, mode="sampled", key=key)
    want = np_exact(jax.tree.map(np.asarray, p), x)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=0.15, atol=1e-3)
    again = st.diagonal_fisher(softmax_logits, p, batches, mode="sampled", key=key)
    other = st.diagonal_fisher(softmax_logits, p, batches, mode="sampled",
                               key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(again["w"]))
    assert not np.array_equal(np.asarray(got["w"]), np.asarray(other["w"]))


def test_fisher_compiles_once_per_batch_shape():
    p = softmax_params(0)
    x, y = data(1, 12)
    fn = lambda params, inputs: softmax_logits(params, inputs)  # a new jit cache key
    before = st._fisher_batch._cache_size()
    st.diagonal_fisher(fn, p, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])
    assert st._fisher_batch._cache_size() == before + 1


def test_task_fishers_use_each_tasks_head():
    with x64():
        ps = [softmax_params(s) for s in (0, 1)]
        heads = [lambda z: z, lambda z: 2.0 * z]
        x, y = data(6, 5)
        got = st.task_fishers(softmax_logits, ps, [[(x, y)], [(x, y)]], heads=heads)
        check_fisher(got[0], np_empirical(ps[0], x, y))
        doubled = {"w": 2 * ps[1]["w"], "b": 2 * ps[1]["b"]}  # logits 2(xW + b)
        want = np_empirical(doubled, x, y)
        check_fisher(got[1], {"w": 4 * want["w"], "b": 4 * want["b"]})


@pytest.mark.parametrize("kwargs,batches,match", [
    ({"mode": "fisher"}, [np.zeros((2, D))], "mode must be one of"),
    ({"mode": "sampled"}, [np.zeros((2, D))], "pass key"),
    ({}, [np.zeros((2, D))], r"needs batches of \(inputs, labels\)"),
    ({}, [(np.zeros((2, D)), np.zeros(3, int))], "labels of shape"),
    ({}, [], "batches is empty"),
    ({"num_batches": 0}, [np.zeros((2, D))], "num_batches must be"),
])
def test_fisher_bad_input(kwargs, batches, match):
    with pytest.raises(MergeError, match=match):
        st.diagonal_fisher(softmax_logits, softmax_params(0), batches, **kwargs)


def test_task_fishers_needs_one_batch_iterable_and_head_per_model():
    ps = [softmax_params(0), softmax_params(1)]
    with pytest.raises(MergeError, match="got 1 batch iterables for 2 models"):
        st.task_fishers(softmax_logits, ps, [[]])
    with pytest.raises(MergeError, match="got 1 heads for 2 models"):
        st.task_fishers(softmax_logits, ps, [[], []], heads=[lambda z: z])


# ---------------------------------------------------------------------------------------
# Linen Grams.

W, H, HD, T = 6, 2, 3, 5


class Net(nn.Module):
    """Dense -> self-attention (DenseGeneral q/k/v/out) -> a Dense used twice."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(W, name="inp")(x)
        h = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * HD, out_features=W,
                                            name="attn")(h)
        shared = nn.Dense(2, name="shared")
        return shared(h) + shared(jnp.tanh(h))


def np_net_inputs(p, x):
    """Every dense layer's input, flattened to rows, computed in NumPy."""
    p = jax.tree.map(np.asarray, p)
    h = x @ p["inp"]["kernel"] + p["inp"]["bias"]
    a = p["attn"]
    q, k, v = (np.einsum("ntd,dhe->nthe", h, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    s = np.einsum("nqhe,nkhe->nhqk", q, k) / np.sqrt(HD)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("nhqk,nkhe->nqhe", s, v)
    out = np.einsum("nqhe,hed->nqd", o, a["out"]["kernel"]) + a["out"]["bias"]
    rows = lambda z: z.reshape(-1, z.shape[-1])
    return {"inp/kernel": [rows(x)], "attn/query/kernel": [rows(h)],
            "attn/key/kernel": [rows(h)], "attn/value/kernel": [rows(h)],
            "attn/out/kernel": [o.reshape(-1, H * HD)],
            "shared/kernel": [rows(out), rows(np.tanh(out))]}


def test_linen_grams_of_dense_and_attention_layers():
    net = Net()
    x = np.random.RandomState(0).randn(4, T, 3).astype(np.float32)
    params = net.init(jax.random.key(0), x[:1])["params"]
    apply_fn = lambda p, b: net.apply({"params": p}, b)
    before = st._linen_grams._cache_size()
    grams = st.dense_input_grams(apply_fn, params, [x[:2], x[2:]])
    assert st._linen_grams._cache_size() == before + 1  # one compile for both batches
    with x64():
        inputs = np_net_inputs(params, x.astype(np.float64))
    assert list(grams) == list(inputs)  # ordered by first call
    for path, xs in inputs.items():
        want = sum(z.T @ z for z in xs)
        assert grams[path].count == sum(len(z) for z in xs), path
        np.testing.assert_allclose(np.asarray(grams[path].matrix), want, rtol=2e-4,
                                   atol=2e-4, err_msg=path)
        np.testing.assert_allclose(np.asarray(grams[path].mean()),
                                   want / grams[path].count, rtol=2e-4, atol=2e-4)
    # Keys are the kernels' paths in params.
    flat = {"/".join(k.key for k in path) for path, _ in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(grams) <= flat


def test_linen_grams_of_a_jitted_apply_fn_are_those_of_the_plain_one():
    """A jitted apply_fn (the suite's embeddings are one) is traced unwrapped; one that jits
    the model inside gives a clear error, not a leaked tracer."""
    net = Net()
    x = np.random.RandomState(1).randn(2, T, 3).astype(np.float32)
    params = net.init(jax.random.key(0), x[:1])["params"]
    apply_fn = lambda p, b: net.apply({"params": p}, b)
    want = st.dense_input_grams(apply_fn, params, [x])
    got = st.dense_input_grams(jax.jit(jax.jit(apply_fn)), params, [x])
    assert list(got) == list(want)
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path].matrix),
                                      np.asarray(want[path].matrix), err_msg=path)
    inner = jax.jit(apply_fn)
    with pytest.raises(MergeError, match="inner jax.jit"):
        st.dense_input_grams(lambda p, b: inner(p, b), params, [x])


def test_linen_grams_num_batches_and_errors():
    dense = nn.Dense(2)
    params = dense.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    xs = [np.full((2, 3), i, np.float32) for i in range(1, 4)]
    fn = lambda p, b: dense.apply({"params": p}, b)
    got = st.dense_input_grams(fn, params, iter(xs), num_batches=2)
    np.testing.assert_allclose(np.asarray(got["kernel"].matrix),
                               sum(z.T @ z for z in xs[:2]))
    with pytest.raises(MergeError, match="batches is empty"):
        st.dense_input_grams(fn, params, [])
    with pytest.raises(MergeError, match="called no dense layer"):
        st.dense_input_grams(lambda p, b: b * 2.0, params, [xs[0]])


# ---------------------------------------------------------------------------------------
# NNX Grams.


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
        self.split = nnx.LinearGeneral(4, (2, 2), rngs=rngs)  # kernel (4, 2, 2)
        self.merge = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), rngs=rngs)  # (2, 2, 3)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.merge(jnp.sin(self.split(x)))


def test_nnx_grams_match_numpy_and_restore_the_classes():
    model = NNXNet(nnx.Rngs(0))
    x = np.random.RandomState(1).randn(5, 3).astype(np.float32)
    original = (nnx.Linear.__call__, nnx.LinearGeneral.__call__)
    grams = st.nnx_dense_input_grams(model, [x[:3], x[3:]])
    assert (nnx.Linear.__call__, nnx.LinearGeneral.__call__) == original
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    h1 = np.maximum(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"], 0)
    h2 = np.maximum(h1 @ p["layers"][1]["kernel"] + p["layers"][1]["bias"], 0)
    s = np.sin(np.einsum("nd,dab->nab", h2, p["split"]["kernel"]) + p["split"]["bias"])
    inputs = {"layers/0/kernel": x, "layers/1/kernel": h1, "split/kernel": h2,
              "merge/kernel": s.reshape(-1, 4)}
    assert list(grams) == list(inputs)
    paths = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]}
    assert set(grams) <= paths
    for path, z in inputs.items():
        assert grams[path].count == len(z)
        np.testing.assert_allclose(np.asarray(grams[path].matrix), z.T @ z, rtol=1e-4,
                                   atol=1e-4, err_msg=path)


def test_nnx_classes_are_restored_after_an_error():
    model = NNXNet(nnx.Rngs(0))
    original = nnx.Linear.__call__

    def failing(m, batch):
        m.layers[0](batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        st.nnx_dense_input_grams(model, [np.ones((2, 3), np.float32)], call=failing)
    assert nnx.Linear.__call__ is original


def test_task_grams_are_each_models_grams_on_its_own_task():
    dense = nn.Dense(2)
    ps = [dense.init(jax.random.key(i), jnp.ones((1, 3)))["params"] for i in range(2)]
    xs = [np.random.RandomState(i).randn(4, 3).astype(np.float32) for i in range(2)]
    fn = lambda p, b: dense.apply({"params": p}, b)
    got = st.task_grams(fn, ps, [[xs[0]], [xs[1]]])
    for g, z in zip(got, xs):
        np.testing.assert_allclose(np.asarray(g["kernel"].matrix), z.T @ z, rtol=1e-5)
    with pytest.raises(MergeError, match="got 1 batch iterables for 2 models"):
        st.task_grams(fn, ps, [[xs[0]]])
