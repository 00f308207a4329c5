"""Representation surgery (`mergejax.learned.representation_surgery`) against NumPy references
written here from the papers' definitions: Surgery (arXiv 2402.02705) z_hat = z - ReLU(z
W_d) W_u with an L1 objective to the experts' features; SurgeryV2 (arXiv 2410.14389) the
same module after every block, the corrected output flowing on, L1 summed over blocks (token
mean) and the output; ProbSurgery (ICML 2025) the Gaussian KL to N(0, I), mean at inference.
The toy model is a two-block Flax Linen MLP.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from flax import linen as nn

import mergejax
from mergejax import MergeError
from mergejax.learned import representation_surgery as S

K = 2
FEATURES = 5


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.width, name="fc")(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(6, name="block_0")(x)
        x = Block(6, name="block_1")(x)
        return nn.Dense(FEATURES, name="out")(x)


NET = Net()


def apply_fn(params, x):
    return NET.apply({"params": params}, x)


def _params():
    base = NET.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    keys = jax.random.split(jax.random.key(1), K)
    experts = []
    for k in keys:
        leaves, treedef = jax.tree.flatten(base)
        noise = [0.6 * jax.random.normal(kk, x.shape) for kk, x in
                 zip(jax.random.split(k, len(leaves)), leaves)]
        experts.append(treedef.unflatten([x + n for x, n in zip(leaves, noise)]))
    return base, experts


BASE, EXPERTS = _params()
RNG = np.random.default_rng(0)
DATA = [RNG.normal(size=(3, 8, 4)).astype(np.float32) + t for t in range(K)]  # 3 batches
TOKENS = [RNG.normal(size=(2, 8, 3, 4)).astype(np.float32) - t for t in range(K)]
HEADS_NP = [RNG.normal(size=(FEATURES, 3)) for _ in range(K)]


def _head(matrix):
    matrix = jnp.asarray(matrix, jnp.float32)
    return lambda z: z @ matrix


HEADS = [_head(h) for h in HEADS_NP]


def batches(data=DATA):
    return [itertools.cycle(list(d)) for d in data]


# ---- NumPy references --------------------------------------------------------------------


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_ta(base, experts, scale=0.3):
    """Task arithmetic, theta_0 + scale * sum_t (theta_t - theta_0)."""
    b = np_tree(base)
    es = [np_tree(e) for e in experts]
    return jax.tree.map(lambda x, *ys: x + scale * sum(y - x for y in ys), b, *es)


def np_module(module, h):
    """h - ReLU(h W_down) W_up, the surgery on the last axis."""
    m = np_tree(module)
    return h - np.maximum(h @ m["down"], 0.0) @ m["up"]


def np_net(p, x, modules=None):
    """Net with surgery after each block and on the output: (output, {block: output})."""
    p = np_tree(p)
    x = np.asarray(x, np.float64)
    hidden = {}
    for name in ("block_0", "block_1"):
        x = np.tanh(x @ p[name]["fc"]["kernel"] + p[name]["fc"]["bias"])
        if modules is not None:
            x = np_module(modules[name], x)
        hidden[name] = x
    out = x @ p["out"]["kernel"] + p["out"]["bias"]
    if modules is not None:
        out = np_module(modules[S.OUTPUT], out)
    return out, hidden


def l1(a, b):
    return np.mean(np.abs(a - b))


# ---- the module --------------------------------------------------------------------------


def test_module_init_and_forward_match_reference():
    module = S.init_module(jax.random.key(3), 32, 4)
    assert module["down"].shape == (32, 4) and module["up"].shape == (4, 32)
    assert np.all(np.abs(module["down"]) <= 1 / np.sqrt(32))
    assert np.abs(module["down"]).max() > 0.8 / np.sqrt(32)  # spans the kaiming bound
    np.testing.assert_array_equal(module["up"], 0.0)
    prob = S.init_module(jax.random.key(3), 32, 4, probabilistic=True)
    np.testing.assert_array_equal(prob["logvar"], 0.0)
    with x64():
        module = {"down": jnp.asarray(RNG.normal(size=(6, 3))),
                  "up": jnp.asarray(RNG.normal(size=(3, 6)))}
        z = RNG.normal(size=(4, 2, 6))
        got = S.correct({k: v.astype(jnp.float32) for k, v in module.items()},
                        jnp.asarray(z, jnp.float32))
        np.testing.assert_allclose(got, np_module(module, z), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(S.bias(module, jnp.asarray(z)), z - np_module(module, z),
                                   rtol=1e-5, atol=1e-5)


def test_kl_divergence_closed_form():
    # KL(N(mu, diag s2) || N(0, I)) = 0.5 * sum(s2 + mu^2 - 1 - log s2)
    # mu = (1, 0), s2 = (1, 4): 0.5 * (1 + 4 + 1 - 2 - log 4) = 2 - log 2
    mu = jnp.array([[1.0, 0.0]])
    logvar = jnp.log(jnp.array([[1.0, 4.0]]))
    assert float(S.kl_divergence(mu, logvar)) == pytest.approx(2 - np.log(2), rel=1e-6)
    assert float(S.kl_divergence(jnp.zeros((3, 5)), jnp.zeros((3, 5)))) == 0.0
    with x64():
        mu = RNG.normal(size=(4, 3))
        var = np.exp(RNG.normal(size=(4, 3)))
        ref = np.mean([0.5 * (np.trace(np.diag(v)) + m @ m - 3 - np.linalg.slogdet(
            np.diag(v))[1]) for m, v in zip(mu, var)])
        got = S.kl_divergence(jnp.asarray(mu), jnp.log(jnp.asarray(var)))
        assert float(got) == pytest.approx(ref, rel=1e-5)


# ---- surgery -----------------------------------------------------------------------------


def test_surgery_reduces_the_feature_gap():
    result = S.surgery(BASE, EXPERTS, apply_fn=apply_fn, batches=batches(), heads=HEADS,
                       rank=4, learning_rate=1e-2, steps=150, key=jax.random.key(0))
    merged = np_ta(BASE, EXPERTS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 np_tree(result.merged), merged)
    # the objective at step 0 (up = 0): sum_t mean |z_merged - z_expert_t|
    gap = [l1(np_net(merged, DATA[t][0])[0], np_net(EXPERTS[t], DATA[t][0])[0])
           for t in range(K)]
    assert result.losses.shape == (150,)
    assert result.losses[0] == pytest.approx(sum(gap), rel=1e-5)
    assert result.losses[-1] < 0.5 * result.losses[0]
    for t in range(K):
        assert set(result.modules[t]) == {S.OUTPUT}
        modules = result.modules[t]
        x = DATA[t][1]
        z_hat = np_module(modules[S.OUTPUT], np_net(merged, x)[0])
        np.testing.assert_allclose(result.features(t, x), z_hat, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.predict(t, x), z_hat @ HEADS_NP[t], rtol=1e-4,
                                   atol=1e-4)
        assert l1(z_hat, np_net(EXPERTS[t], x)[0]) < 0.5 * gap[t]


def test_step_compiles_once():
    def run():
        return S.surgery(BASE, EXPERTS, apply_fn=apply_fn, batches=batches(), rank=4,
                         learning_rate=1e-2, steps=4, key=jax.random.key(7))

    before = S._surgery_step._cache_size()  # pylint: disable=protected-access
    first = run()
    size = S._surgery_step._cache_size()  # pylint: disable=protected-access
    assert size <= before + 1  # 4 steps, at most one compilation
    second = run()
    assert S._surgery_step._cache_size() == size  # pylint: disable=protected-access
    np.testing.assert_array_equal(first.losses, second.losses)
    assert not np.allclose(first.losses[0], first.losses[-1])


def test_merge_choices():
    linear = S.surgery(BASE, EXPERTS, apply_fn=apply_fn, batches=batches(), merge="linear",
                       steps=1, key=jax.random.key(0))
    mean = jax.tree.map(lambda *xs: sum(xs) / K, *np_tree(EXPERTS))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 np_tree(linear.merged), mean)
    given = S.surgery(BASE, EXPERTS, apply_fn=apply_fn, batches=batches(), merged=BASE,
                      steps=1, key=jax.random.key(0))
    assert given.merged is BASE


def test_registered_methods():
    for name in ("surgery", "surgery_v2", "probsurgery"):
        method = mergejax.get_method(name)
        assert method.family == "routing" and method.keeps
        assert method.hparams["apply_fn"] is mergejax.registry.REQUIRED
    result = mergejax.merge("surgery", BASE, EXPERTS, apply_fn=apply_fn, batches=batches(),
                            steps=2, key=jax.random.key(0))
    assert isinstance(result, S.SurgeryResult)
    with pytest.raises(MergeError, match="needs hyperparameter"):
        mergejax.merge("surgery", BASE, EXPERTS, apply_fn=apply_fn, key=jax.random.key(0))


# ---- surgery_v2 --------------------------------------------------------------------------


def _random_modules(seed, width=6, out=FEATURES, rank=3):
    rng = np.random.default_rng(seed)

    def mod(d):
        return {"down": jnp.asarray(rng.normal(size=(d, rank)), jnp.float32),
                "up": jnp.asarray(0.3 * rng.normal(size=(rank, d)), jnp.float32)}
    return {"block_0": mod(width), "block_1": mod(width), S.OUTPUT: mod(out)}


def test_deep_forward_corrects_intermediate_outputs():
    modules = _random_modules(5)
    x = TOKENS[0][0]
    out, hidden = S.forward(apply_fn, BASE, x, modules, S.DEFAULT_LAYERS)
    ref_out, ref_hidden = np_net(BASE, x, modules)
    assert set(hidden) == {"block_0", "block_1"}  # not block_i/fc, not out
    for name in hidden:
        np.testing.assert_allclose(hidden[name], ref_hidden[name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    plain_out, plain = S.forward(apply_fn, BASE, x, None, S.DEFAULT_LAYERS)
    ref_plain, ref_hidden = np_net(BASE, x)
    np.testing.assert_allclose(plain_out, ref_plain, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(plain["block_1"], ref_hidden["block_1"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(ref_out, ref_plain)


def test_surgery_v2_objective_and_training():
    result = S.surgery_v2(BASE, EXPERTS, apply_fn=apply_fn, batches=batches(TOKENS),
                          heads=HEADS, rank=4, learning_rate=1e-2, steps=80,
                          key=jax.random.key(2))
    merged = np_ta(BASE, EXPERTS)
    expected = 0.0
    for t in range(K):
        x = TOKENS[t][0]
        z, hid = np_net(merged, x)
        ze, hide = np_net(EXPERTS[t], x)
        expected += l1(z, ze) + sum(l1(hid[n].mean(axis=1), hide[n].mean(axis=1))
                                    for n in hid)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert result.layers == S.DEFAULT_LAYERS
    for t in range(K):
        modules = result.modules[t]
        assert set(modules) == {"block_0", "block_1", S.OUTPUT}
        assert np.abs(np.asarray(modules["block_0"]["up"])).max() > 0
        x = TOKENS[t][1]
        ref, _ = np_net(merged, x, modules)
        np.testing.assert_allclose(result.features(t, x), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result.predict(t, x), ref @ HEADS_NP[t], rtol=1e-4,
                                   atol=1e-3)


# ---- probsurgery -------------------------------------------------------------------------


def test_probsurgery_trains_and_predicts_with_the_mean():
    kw = {"apply_fn": apply_fn, "heads": HEADS, "rank": 8, "learning_rate": 1e-2, "steps": 120}
    result = S.probsurgery(BASE, EXPERTS, batches=batches(), key=jax.random.key(4), **kw)
    assert result.losses[-20:].mean() < 0.5 * result.losses[:5].mean()
    merged = np_ta(BASE, EXPERTS)
    for t in range(K):
        module = result.modules[t][S.OUTPUT]
        assert set(module) == {"down", "up", "logvar"}
        assert np.asarray(module["logvar"]).std() > 0
        x = DATA[t][2]
        z_hat = np_module(module, np_net(merged, x)[0])
        np.testing.assert_allclose(result.features(t, x), z_hat, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.predict(t, x), z_hat @ HEADS_NP[t], rtol=1e-4,
                                   atol=1e-4)
    again = S.probsurgery(BASE, EXPERTS, batches=batches(), key=jax.random.key(4),
                          **{**kw, "steps": 5})
    np.testing.assert_array_equal(again.losses, result.losses[:5])
    other = S.probsurgery(BASE, EXPERTS, batches=batches(), key=jax.random.key(5),
                          **{**kw, "steps": 5})
    assert not np.array_equal(other.losses, again.losses)


# ---- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("method", [S.surgery, S.probsurgery])
def test_checkpoint_resume_reproduces_the_run(method, tmp_path):
    kw = {"apply_fn": apply_fn, "rank": 4, "learning_rate": 1e-2, "key": jax.random.key(9)}
    full = method(BASE, EXPERTS, batches=batches(), steps=6, **kw)
    ckpt = str(tmp_path / "ckpt")
    method(BASE, EXPERTS, batches=batches(), steps=3, checkpoint_dir=ckpt, **kw)
    # a resumed run discards its first 3 batches: NaN there proves it did not restart
    poisoned = [itertools.chain([np.full_like(d[0], np.nan)] * 3, b)
                for d, b in zip(DATA, batches())]
    resumed = method(BASE, EXPERTS, batches=poisoned, steps=6, checkpoint_dir=ckpt,
                     checkpoint_every=3, **kw)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 resumed.modules, full.modules)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"heads": HEADS[:1]}, "1 heads for 2 models"),
    ({"batches": batches()[:1]}, "1 batch iterables for 2 models"),
    ({"batches": [iter(DATA[0][:2]), itertools.cycle(DATA[1])]}, "task 0's batches ran out"),
    ({"merge": "no_such_method"}, "unknown merge method 'no_such_method'"),
    ({"merge_hparams": {"density": 0.5}}, "unknown hyperparameter"),
    ({"merged": {"out": BASE["out"]}}, "merged"),
    ({"rank": 0}, "rank must be a positive int"),
    ({"learning_rate": -1.0}, "learning_rate must be"),
    ({"key": None}, "pass key="),
    ({"steps": 0}, "steps must be a positive int"),
])
def test_bad_input(kw, match):
    args = {"apply_fn": apply_fn, "batches": batches(), "steps": 3, "key": jax.random.key(0), **kw}
    with pytest.raises(MergeError, match=match):
        S.surgery(BASE, EXPERTS, **args)


def test_bad_input_v2_and_prob():
    args = {"apply_fn": apply_fn, "batches": batches(), "steps": 2, "key": jax.random.key(0)}
    with pytest.raises(MergeError, match="no Linen module matched"):
        S.surgery_v2(BASE, EXPERTS, layers=r"^nothing$", **args)
    with pytest.raises(MergeError, match="layers must be a regex"):
        S.surgery_v2(BASE, EXPERTS, layers="(", **args)
    with pytest.raises(MergeError, match="kl_weight must be"):
        S.probsurgery(BASE, EXPERTS, kl_weight=-1.0, **args)
    with pytest.raises(MergeError, match="2 heads for 1 models"):
        S.probsurgery(BASE, EXPERTS[:1], heads=HEADS, apply_fn=apply_fn,
                      batches=batches()[:1], key=jax.random.key(0))


def test_deep_forward_of_a_jitted_apply_fn_sees_its_layers():
    """A jitted apply_fn runs its Linen layers in the inner jit's trace; deep surgery
    unwraps it to intercept them."""
    modules = _random_modules(5)
    x = TOKENS[0][0]
    want_out, want_hidden = S.forward(apply_fn, BASE, x, modules, S.DEFAULT_LAYERS)
    out, hidden = jax.jit(lambda p, b: S.forward(jax.jit(apply_fn), p, b, modules,
                                                 S.DEFAULT_LAYERS))(BASE, x)
    assert set(hidden) == set(want_hidden) == {"block_0", "block_1"}
    for name in hidden:
        np.testing.assert_allclose(hidden[name], want_hidden[name], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
