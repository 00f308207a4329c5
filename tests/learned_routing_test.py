"""Routing merges (`mergejax.learned.routing`): WEMoE (arXiv 2402.00433) and Twin-Merging
(arXiv 2406.15479) against NumPy references written here from the papers' definitions
(FusionBench ``we_moe`` router and token handling; the official Twin-Merging SVD
compression and softmax mixing), not from the code under test.

Models: a tiny Linen MLP-in-a-block model (two ``nn.Dense`` inside ``layers_0``) with a
NumPy forward pass, and the suite's ViT at width 8, depth 1 (run with plain
``model.apply`` on parameters built in NumPy).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import mergejax
from mergejax import MergeError
from mergejax.learned import routing
from mergejax.suite.model import VisionTransformer, ViTConfig

K = 2
FROZEN = optax.sgd(0.0)  # leaves the routers at their initial values


class Block(nn.Module):
    """x + Dense_1(tanh(Dense_0(x))): an MLP in a block (both Dense routed by default)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6)(x))
        return x + nn.Dense(4)(h)


class Tiny(nn.Module):
    """(B, T, 3) -> embed (not routed) -> layers_0 -> mean over tokens (B, 4)."""

    @nn.compact
    def __call__(self, x):
        return Block(name="layers_0")(nn.Dense(4, name="embed")(x)).mean(axis=1)


TINY = Tiny()


def tiny_fn(params, x):
    return TINY.apply({"params": params}, x)


def head_logits(head, outputs):
    return outputs @ head


def head_fns(heads):
    return [functools.partial(head_logits, jnp.asarray(h)) for h in heads]


@functools.cache
def tiny_heads():
    """The tiny setup's heads as callables, made once (runs with them share compilations)."""
    return head_fns(tiny_setup()[2])


def perturb(tree, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rng.normal(size=x.shape), x.dtype),
                        tree)


@functools.cache
def tiny_setup():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 3, 3)), jnp.float32)
    base = jax.jit(TINY.init)(jax.random.key(0), x)["params"]
    models = [perturb(base, 10 + i) for i in range(K)]
    heads = [rng.normal(size=(4, 3 + t)) for t in range(K)]
    return base, models, heads, x


def npd(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_tiny(p, x):
    """NumPy forward of Tiny for params ``p`` (nested dict of float64 arrays)."""
    e = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    b = p["layers_0"]
    h = np.tanh(e @ b["Dense_0"]["kernel"] + b["Dense_0"]["bias"])
    return (e + h @ b["Dense_1"]["kernel"] + b["Dense_1"]["bias"]).mean(axis=-2)


def np_mix(base, models, weights):
    """base + sum_k weights[k] (models[k] - base), leaf by leaf."""
    return jax.tree.map(lambda b, *ms: b + sum(w * (m - b) for w, m in zip(weights, ms)),
                        base, *models)


def np_gate(layers, h):
    """FusionBench Depth_2_Gate: fc2(relu(fc1(h)))."""
    z = np.maximum(h @ layers[0]["kernel"] + layers[0]["bias"], 0.0)
    return z @ layers[1]["kernel"] + layers[1]["bias"]


def random_routers(seed, d, scale=1.0):
    rng = np.random.default_rng(seed)
    layers = [{"kernel": scale * rng.normal(size=(d, d)), "bias": np.zeros(d)},
              {"kernel": scale * rng.normal(size=(d, K)), "bias": 0.3 + 0.1 * rng.normal(size=K)}]
    return ({"layers": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layers)},)


def np_wemoe_tiny(base, models, routers, x, lam, batch_reduce):
    """WEMoE on Tiny from the definition: embed by task arithmetic (scale lam); the block's
    MLP per sample with base + sum_k r_k tau_k, r = token mean of the gate on the MLP
    input (the block input), averaged over the batch with batch_reduce."""
    base, models, x = npd(base), [npd(m) for m in models], np.asarray(x, np.float64)
    ta = np_mix(base, models, [lam] * K)
    e = x @ ta["embed"]["kernel"] + ta["embed"]["bias"]
    r = np_gate(npd(routers[0])["layers"], e).mean(axis=1)
    if batch_reduce:
        r = np.broadcast_to(r.mean(axis=0), r.shape)
    outs = []
    for i in range(x.shape[0]):
        p = dict(ta)
        p["layers_0"] = np_mix(base, models, r[i])["layers_0"]
        outs.append(np_tiny(p, x[i]))
    return np.stack(outs)


def cycle(*batches):
    return itertools.cycle([jnp.asarray(b) for b in batches])


def train_tiny(steps=1, **kw):
    base, models, _, x = tiny_setup()
    kw.setdefault("batches", [cycle(x), cycle(x[::-1])])
    return routing.wemoe(base, models, apply_fn=tiny_fn, heads=tiny_heads(), steps=steps, **kw)


# ---------------------------------------------------------------------------------------
# WEMoE.


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_wemoe_forward_matches_numpy(batch_reduce):
    base, models, heads, x = tiny_setup()
    result = train_tiny(init_lambda=0.4, sample_wise=not batch_reduce, optimizer=FROZEN)
    assert result.layout == (("layers_0/Dense_0", "layers_0/Dense_1"),)
    # FusionBench Depth_2_Gate init: N(0, 0.01^2) kernels, fc1 bias 0, fc2 bias init_lambda
    (layers,) = [r["layers"] for r in result.routers]
    assert [lay["kernel"].shape for lay in layers] == [(4, 4), (4, K)]
    np.testing.assert_array_equal(layers[0]["bias"], np.zeros(4))
    np.testing.assert_array_equal(layers[1]["bias"], np.full(K, 0.4, np.float32))
    assert 0.004 < float(jnp.std(layers[0]["kernel"])) < 0.02
    result = dataclasses.replace(result, routers=random_routers(3, 4))
    want = np_wemoe_tiny(base, models, result.routers, x, 0.4, batch_reduce)
    np.testing.assert_allclose(result.apply(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.predict(1, x), want @ heads[1], rtol=1e-4, atol=1e-5)


VIT = VisionTransformer(ViTConfig(image_size=14, width=8, depth=1, heads=2, mlp_ratio=2,
                                  embed_dim=8))
MLP_LEAVES = ("mlp_fc", "mlp_proj")


def vit_fn(params, x):
    return VIT.apply({"params": params}, x)


VIT_REF = jax.jit(vit_fn)  # the reference runs the plain model on NumPy-built params


@functools.cache
def vit_setup():
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(3, 14, 14)), jnp.float32)
    shapes = jax.eval_shape(VIT.init, jax.random.key(0), x)["params"]  # no compile
    rng = np.random.default_rng(0)
    base = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.normal(size=s.shape),
                                    jnp.float32), shapes)
    return base, [perturb(base, 30 + i, 0.2) for i in range(K)], x


def vit_reference(base, models, lam, mlp_weights):
    """Task arithmetic with scale lam everywhere except the block's MLP, which gets
    base + sum_k mlp_weights[k] tau_k (NumPy, float64 -> float32)."""
    base, models = npd(base), [npd(m) for m in models]
    p = np_mix(base, models, [lam] * K)
    for name in MLP_LEAVES:
        p["resblocks_0"][name] = np_mix(base, models, mlp_weights)["resblocks_0"][name]
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


@functools.cache
def vit_result():
    base, models, x = vit_setup()
    return routing.wemoe(base, models, apply_fn=vit_fn, batches=[cycle(x)] * K, steps=1,
                         init_lambda=0.3)


@pytest.mark.parametrize("constant", ["depth0", "zero_kernels"])
def test_wemoe_constant_router_is_task_arithmetic(constant):
    base, models, x = vit_setup()
    result = vit_result()
    assert result.layout == (("resblocks_0/mlp_fc", "resblocks_0/mlp_proj"),)
    c = np.array([0.8, -0.35])
    if constant == "depth0":
        routers = ({"weight": jnp.asarray(c, jnp.float32)},)
    else:
        routers = ({"layers": [{"kernel": jnp.zeros((8, 8)), "bias": jnp.ones(8)},
                               {"kernel": jnp.zeros((8, K)), "bias": jnp.asarray(c)}]},)
    result = dataclasses.replace(result, routers=routers)
    want = VIT_REF(vit_reference(base, models, 0.3, c), x)
    np.testing.assert_allclose(result.apply(x), want, rtol=2e-4, atol=2e-5)


def test_wemoe_vit_routes_each_sample_on_its_mlp_input():
    base, models, x = vit_setup()
    result = dataclasses.replace(vit_result(), routers=random_routers(5, 8, 2.0))
    # the MLP input of the only block is ln_2's output, which the MLP does not affect
    ta = vit_reference(base, models, 0.3, [0.3] * K)
    _, inter = jax.jit(functools.partial(VIT.apply, capture_intermediates=True,
                                         mutable=["intermediates"]))({"params": ta}, x)
    h = np.asarray(inter["intermediates"]["resblocks_0"]["ln_2"]["__call__"][0], np.float64)
    r = np_gate(npd(result.routers[0])["layers"], h).mean(axis=1)
    assert np.ptp(r, axis=0).min() > 1e-2  # the samples really are routed differently
    want = np.concatenate([VIT_REF(vit_reference(base, models, 0.3, r[i]), x[i:i + 1])
                           for i in range(x.shape[0])])
    np.testing.assert_allclose(result.apply(x), want, rtol=2e-4, atol=2e-5)


def test_wemoe_entropy_decreases_and_step_compiles_once():
    base, models, heads, _ = tiny_setup()
    xs = jnp.asarray(np.random.default_rng(7).normal(size=(4, 6, 3, 3)), jnp.float32)

    def run():
        return routing.wemoe(base, models, apply_fn=tiny_fn, heads=head_fns(heads), steps=40,
                             batches=[cycle(*xs[:2]), cycle(*xs[2:])], learning_rate=3e-2)

    before = routing._wemoe_step._cache_size()  # pylint: disable=protected-access
    result = run()
    assert routing._wemoe_step._cache_size() == before + 1  # pylint: disable=protected-access
    losses = result.losses
    assert losses.shape == (40,) and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[0] - 0.05
    # the recorded loss at step 0 is the sum over tasks of the entropies (NumPy)
    constant = ({"layers": [{"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
                            {"kernel": np.zeros((4, K)), "bias": np.full(K, 0.3)}]},)
    lam_out = [np_wemoe_tiny(base, models, constant, b, 0.3, True) for b in (xs[0], xs[2])]
    ent = 0.0
    for t, out in enumerate(lam_out):
        z = out @ heads[t]
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ent += -np.mean(np.sum(p * np.log(p), -1))
    assert losses[0] == pytest.approx(ent, abs=2e-3)  # router kernels ~N(0, 0.01^2)


def test_wemoe_through_registry():
    base, models, _, x = tiny_setup()
    result = mergejax.merge("wemoe", base, models, apply_fn=tiny_fn, router_hidden_layers=1,
                            batches=[cycle(x)] * K, steps=2, key=jax.random.key(4))
    assert isinstance(result, routing.WEMoEResult) and result.losses.shape == (2,)
    assert [lay["kernel"].shape for lay in result.routers[0]["layers"]] == [(4, K)]
    method = mergejax.get_method("wemoe")
    assert method.family == "routing" and "routers" in method.keeps


# ---------------------------------------------------------------------------------------
# Twin-Merging.


def np_truncated(m, r):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_exclusive_knowledge_is_truncated_svd():
    rng = np.random.default_rng(0)
    shared = {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=5), jnp.float32)},
              "attn": {"query": {"kernel": jnp.asarray(rng.normal(size=(4, 2, 3)),
                                                      jnp.float32)}},
              "step": jnp.asarray(3, jnp.int32)}
    models = [perturb(shared | {"step": None}, 40 + i) | {"step": shared["step"]}
              for i in range(K)]
    for rank, r_dense, r_attn in ((2, 2, 2), (0.5, 2, 2), (0.34, 1, 1)):
        ex = routing.exclusive_knowledge(shared, models, rank=rank)
        for t in range(K):
            got = ex.dense(shared, t)
            diff = npd(models[t]["dense"]["kernel"]) - npd(shared["dense"]["kernel"])
            np.testing.assert_allclose(got["dense"]["kernel"], np_truncated(diff, r_dense),
                                       rtol=1e-4, atol=1e-5)
            assert np.linalg.matrix_rank(np.asarray(got["dense"]["kernel"]), tol=1e-4) \
                == r_dense
            q = (npd(models[t]["attn"]["query"]["kernel"])
                 - npd(shared["attn"]["query"]["kernel"])).reshape(4, 6)
            np.testing.assert_allclose(got["attn"]["query"]["kernel"],
                                       np_truncated(q, r_attn).reshape(4, 2, 3),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["dense"]["bias"], npd(models[t]["dense"]["bias"])
                                       - npd(shared["dense"]["bias"]), rtol=1e-5, atol=1e-6)
            assert int(got["step"]) == 0
    # a fraction that rounds to rank 0 drops the matrix (official int(density * len(S)))
    ex = routing.exclusive_knowledge(shared, models, rank=0.1)
    np.testing.assert_array_equal(ex.dense(shared, 0)["dense"]["kernel"], np.zeros((6, 5)))
    w = np.array([0.7, -0.4])
    mixed = routing.exclusive_knowledge(shared, models, rank=1.0).mix(shared, w)
    want = np_mix(npd(shared | {"step": 0}), [npd(m | {"step": 0}) for m in models], w)
    np.testing.assert_allclose(mixed["dense"]["kernel"], want["dense"]["kernel"], rtol=1e-4,
                               atol=1e-5)
    assert mixed["step"].dtype == jnp.int32 and int(mixed["step"]) == 3


def twin_setup():
    base, models, heads, _ = tiny_setup()
    centres = np.array([[2.0, 0.0, 0.0], [-2.0, 0.0, 1.0]])
    rng = np.random.default_rng(50)
    xs = [centres[t] + 0.3 * rng.normal(size=(4, 8, 3, 3)) for t in range(K)]
    return base, models, heads, [np.asarray(v, np.float32) for v in xs]


def test_twin_router_learns_tasks_and_step_compiles_once():
    base, models, heads, xs = twin_setup()
    before = routing._twin_step._cache_size()  # pylint: disable=protected-access
    result = routing.twin_merging(base, models, apply_fn=tiny_fn, heads=head_fns(heads), steps=60,
                                  batches=[cycle(*v[:3]) for v in xs], learning_rate=1e-2)
    assert routing._twin_step._cache_size() == before + 1  # pylint: disable=protected-access
    assert result.losses[-5:].mean() < 0.2 < result.losses[0]
    for t in range(K):
        probs = np.asarray(result.route(xs[t][3]))  # held-out batch
        assert (probs.argmax(-1) == t).mean() >= 0.9
    assert [lay["kernel"].shape for lay in result.router] == [(4, 8), (8, 8), (8, K)]


def np_add(shared, deltas, weights):
    """shared + sum_k weights[k] deltas[k], leaf by leaf."""
    return jax.tree.map(lambda s, *d: s + sum(w * v for w, v in zip(weights, d)), shared,
                        *deltas)


def np_leaky(z):
    return np.where(z > 0, z, 0.01 * z)


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_twin_forward_matches_numpy(batch_reduce):
    base, models, heads, xs = twin_setup()
    result = routing.twin_merging(base, models, apply_fn=tiny_fn, heads=tiny_heads(), steps=5,
                                  batches=[cycle(v[0]) for v in xs], rank=2,
                                  batch_reduce=batch_reduce, learning_rate=1e-2)
    x = np.concatenate([xs[0][3, :3], xs[1][3, :2]])
    b, ms = npd(base), [npd(m) for m in models]
    shared = np_mix(b, ms, [0.3] * K)
    # exclusive_k: theta_k - shared, matrices truncated to rank 2, biases dense
    ex = [jax.tree.map(lambda m, s: np_truncated(m - s, 2) if m.ndim == 2 else m - s, m,
                       shared) for m in ms]
    feats = np_tiny(shared, x.astype(np.float64))
    z = feats
    router = npd(result.router)
    for i, lay in enumerate(router):
        z = (np_leaky(z) if i else z) @ lay["kernel"] + lay["bias"]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(result.route(x), p, rtol=1e-4, atol=1e-5)
    if batch_reduce:
        p = np.broadcast_to(p.mean(0), p.shape)
    want = np.stack([np_tiny(np_add(shared, ex, p[i]), x[i].astype(np.float64))
                     for i in range(x.shape[0])])
    np.testing.assert_allclose(result.apply(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.predict(0, x), want @ heads[0], rtol=1e-4, atol=1e-4)


def test_twin_through_registry_with_other_shared_method():
    base, models, _, xs = twin_setup()
    result = mergejax.merge("twin_merging", base, models, apply_fn=tiny_fn, steps=2,
                            batches=[cycle(v[0]) for v in xs], shared="linear",
                            rank=1)
    want = np_mix(npd(base), [npd(m) for m in models], [0.5, 0.5])
    np.testing.assert_allclose(result.shared["embed"]["kernel"], want["embed"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    assert mergejax.get_method("twin_merging").family == "routing"


# ---------------------------------------------------------------------------------------
# Bad input.


def _wemoe(**kw):
    base, models, _, x = tiny_setup()
    args = {"apply_fn": tiny_fn, "batches": [cycle(x)] * K, "steps": 2} | kw
    return routing.wemoe(base, models, **args)


def _twin(**kw):
    base, models, _, x = tiny_setup()
    args = {"apply_fn": tiny_fn, "batches": [cycle(x)] * K, "steps": 2} | kw
    return routing.twin_merging(base, models, **args)


@pytest.mark.parametrize("method", [_wemoe, _twin])
@pytest.mark.parametrize("kw,match", [
    ({"heads": [lambda o: o]}, "got 1 heads for 2 models"),
    ({"batches": [cycle(np.zeros((2, 3, 3)))]}, "got 1 batch iterables for 2 models"),
    ({"batches": [[np.zeros((2, 3, 3), np.float32)]] * K}, "ran out at step 1"),
    ({"apply_fn": None}, "apply_fn must be a function"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    ({"steps": 0}, "steps must be a positive int"),
])
def test_bad_common_input(method, kw, match):
    with pytest.raises(MergeError, match=match):
        method(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"routed": "nothing_like_this"}, ("matches no flax.linen.Dense layer that apply_fn "
                                       r"calls \(Dense layers called: 'embed'")),
    ({"routed": "("}, "is not a valid regex"),
    ({"router_hidden_layers": 3}, "router_hidden_layers must be 0, 1 or 2"),
    ({"init_lambda": float("nan")}, "init_lambda must be a finite number"),
])
def test_bad_wemoe_input(kw, match):
    with pytest.raises(MergeError, match=match):
        _wemoe(**kw)


def test_wemoe_params_must_be_the_tree_apply_sees():
    base, models, _, x = tiny_setup()
    wrapped = {"backbone": base}
    with pytest.raises(MergeError, match="routed Dense 'layers_0/Dense_0' has no"):
        routing.wemoe(wrapped, [{"backbone": m} for m in models], batches=[cycle(x)] * K,
                      apply_fn=lambda p, b: tiny_fn(p["backbone"], b), steps=1)


@pytest.mark.parametrize("kw,match", [
    ({"rank": 7}, r"rank 7 is larger than the 3x4 matrix at 'embed/kernel'"),
    ({"rank": 1.5}, r"rank must be an int >= 1 or a float in \(0, 1\]"),
    ({"rank": 0}, r"rank must be an int >= 1"),
    ({"shared": "no_such_method"}, "unknown merge method 'no_such_method'"),
    ({"router_hidden": 0}, "router_hidden must be None or an int >= 1"),
])
def test_bad_twin_input(kw, match):
    with pytest.raises(MergeError, match=match):
        _twin(**kw)


def test_registry_requires_data():
    base, models, _, _ = tiny_setup()
    for name in ("wemoe", "twin_merging"):
        with pytest.raises(MergeError, match=r"needs hyperparameter\(s\) \['apply_fn', "
                                             r"'batches'\]"):
            mergejax.merge(name, base, models)


@pytest.mark.parametrize("path,routed", [
    ("resblocks_3/mlp_fc", True), ("resblocks_3/mlp_proj", True), ("layers_2/Dense_1", True),
    ("layers_0/mlp/Dense_0", True), ("Transformer/encoderblock_1/MlpBlock_0/Dense_1", True),
    ("proj", False), ("embed", False), ("resblocks_0/attn/out", False),
    ("head/Dense_0", False), ("layers_0/attention/Dense_0", False),
])
def test_default_routed_pattern(path, routed):
    assert bool(re.search(routing.DEFAULT_ROUTED, path)) == routed


def test_wemoe_with_a_jitted_apply_fn_routes_the_same_layers():
    """A jitted apply_fn runs its Linen layers in the inner jit's trace, where WEMoE's
    interception cannot see (or leaks) them; WEMoE unwraps it."""
    base, models, x = vit_setup()
    kw = dict(batches=[cycle(x)] * K, steps=1, init_lambda=0.3, optimizer=FROZEN)
    plain = routing.wemoe(base, models, apply_fn=vit_fn, **kw)
    jitted = routing.wemoe(base, models, apply_fn=jax.jit(vit_fn), **kw)
    assert jitted.layout == plain.layout == (("resblocks_0/mlp_fc", "resblocks_0/mlp_proj"),)
    np.testing.assert_allclose(jitted.apply(x), plain.apply(x), rtol=1e-5, atol=1e-6)
