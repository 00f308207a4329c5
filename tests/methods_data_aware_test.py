"""``fisher``, ``regmean`` and ``regmean_pp`` against NumPy references written here from the
papers' definitions:

* Fisher merging (arXiv 2111.09832, eq. 2) with FusionBench's ``minimal_fisher_weight``
  and ``normalize_fisher_weight`` (``c_i ~ w_i / (||F_i|| + eps)``);
* RegMean (arXiv 2212.09849): with ``alpha = 1`` the merged kernel is the least-squares
  solution of ``sum_i ||X_i W - X_i W_i||^2`` (``np.linalg.lstsq`` on the stacked rows);
  with ``alpha < 1`` the regularised normal equations;
* RegMean++ (arXiv 2508.03121) on a 2-layer MLP: layer 2's Grams come from the hidden
  activations of the model whose first layer is already merged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, x64
from flax import linen as nn

import mergejax
from mergejax import MergeError
from mergejax.methods import data_aware as da
from mergejax.statistics import Gram, task_grams

K = 3
SHAPES = {"enc/kernel": (4, 5), "enc/bias": (5,), "attn/query/kernel": (5, 2, 3)}


def trees(seed: int = 0, k: int = K) -> list[dict]:
    r = np.random.RandomState(seed)
    return [make_tree({p: r.randn(*s) for p, s in SHAPES.items()}, step=i)
            for i in range(k)]


def fisher_trees(seed: int = 1, k: int = K, paths=tuple(SHAPES)) -> list[dict]:
    r = np.random.RandomState(seed)
    return [{p: jnp.asarray(r.rand(*SHAPES[p]) ** 2, jnp.float32) for p in paths}
            for _ in range(k)]


def np_fisher(models, fishers, w, eps, normalize):
    """sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps), FusionBench normalisation."""
    fs = [{p: np.asarray(v, np.float64) for p, v in f.items()} for f in fishers]
    thetas = [floats(m) for m in models]
    c = np.asarray(w, np.float64)
    if normalize:
        norms = np.array([math.sqrt(sum((v ** 2).sum() for v in f.values())) for f in fs])
        inv = 1 / (norms + eps)
        c = c * inv / inv.sum()
    out = {}
    for p in thetas[0]:
        if p in fs[0]:
            num = sum(ci * (f[p] + eps) * t[p] for ci, f, t in zip(c, fs, thetas))
            den = sum(ci * (f[p] + eps) for ci, f in zip(c, fs))
            out[p] = num / den
        else:
            out[p] = sum(wi * t[p] for wi, t in zip(w, thetas)) / sum(w)
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0]])
def test_fisher_matches_numpy(normalize, weights):
    models, fishers = trees(), fisher_trees()
    w = [1.0] * K if weights is None else weights
    out = mergejax.merge("fisher", None, models, fishers=fishers, weights=weights,
                         normalize=normalize, min_fisher=1e-3)
    check_tree(out, np_fisher(models, fishers, w, 1e-3, normalize), models[0], rtol=2e-5,
               atol=1e-6)


def test_fisher_accepts_diagonal_fisher_trees_and_partial_coverage():
    models = trees()
    fishers = fisher_trees(paths=("enc/kernel", "attn/query/kernel"))
    want = np_fisher(models, fishers, [1.0] * K, 1e-6, True)  # enc/bias: plain mean
    nested = [{"enc": {"kernel": f["enc/kernel"], "bias": None},
               "attn": {"query": {"kernel": f["attn/query/kernel"]}}, "step": None}
              for f in fishers]
    for stats in (fishers, nested):
        check_tree(da.fisher(None, models, fishers=stats), want, models[0], rtol=2e-5,
                   atol=1e-6)
    base = trees(seed=9, k=1)[0]
    kept = da.fisher(base, models, fishers=fishers, missing="base")
    np.testing.assert_array_equal(np.asarray(kept["enc"]["bias"]), base["enc"]["bias"])
    np.testing.assert_allclose(np.asarray(kept["enc"]["kernel"]), want["enc/kernel"],
                               rtol=2e-5)


def test_equal_fishers_give_the_weighted_average():
    models = trees()
    f = fisher_trees(k=1)[0]
    w = [0.2, 0.3, 0.5]
    out = da.fisher(None, models, fishers=[f] * K, weights=w)
    lin = mergejax.linear(None, models, weights=w)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(lin)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fisher_compiles_once_across_weights():
    models, fishers = trees(), fisher_trees()
    da.fisher(None, models, fishers=fishers, weights=[1.0, 1.0, 1.0])
    size = da._fisher_merge._cache_size()
    da.fisher(None, models, fishers=fishers, weights=[3.0, 1.0, 0.5], min_fisher=0.1)
    assert da._fisher_merge._cache_size() == size


def bad_fishers(kind):
    f = fisher_trees()
    if kind == "nan":
        f[1]["enc/bias"] = f[1]["enc/bias"].at[0].set(jnp.nan)
    elif kind == "negative":
        f[2]["enc/kernel"] = -f[2]["enc/kernel"]
    elif kind == "shape":
        f[0]["enc/bias"] = jnp.ones((4,))
    elif kind == "path":
        f[0]["dec/kernel"] = jnp.ones((2,))
    elif kind == "coverage":
        del f[1]["enc/bias"]
    return f


@pytest.mark.parametrize("kwargs,match", [
    ({"fishers": fisher_trees(k=2)}, "got 2 fishers for 3 models"),
    ({"fishers": bad_fishers("nan")}, r"fishers\[1\] at 'enc/bias' is not finite"),
    ({"fishers": bad_fishers("negative")}, r"fishers\[2\] at 'enc/kernel' .* negative"),
    ({"fishers": bad_fishers("shape")}, r"fishers\[0\] at 'enc/bias' has shape \(4,\)"),
    ({"fishers": bad_fishers("path")}, "'dec/kernel', which is not a floating leaf"),
    ({"fishers": bad_fishers("coverage")}, r"fishers\[1\] covers other leaves"),
    ({"fishers": fisher_trees(), "weights": [1.0, -1.0, 1.0]}, "weights must be finite"),
    ({"fishers": fisher_trees(), "weights": [1.0, 1.0]}, "got 2 weights for 3 models"),
    ({"fishers": fisher_trees(), "min_fisher": -1.0}, "min_fisher must be"),
    ({"fishers": fisher_trees(), "missing": "base"}, "missing='base' needs a base"),
    ({"fishers": [{"enc/kernel": jnp.zeros((4, 5))}] * K, "min_fisher": 0.0},
     "non-finite result at 'enc/kernel'"),
])
def test_fisher_bad_input(kwargs, match):
    with pytest.raises(MergeError, match=match):
        da.fisher(None, trees(), **kwargs)


def test_fisher_requires_fishers():
    with pytest.raises(MergeError, match=r"needs hyperparameter\(s\) \['fishers'\]"):
        mergejax.merge("fisher", None, trees())


# ---------------------------------------------------------------------------------------
# RegMean.


def task_inputs(seed: int, rows=(7, 7, 7), d: int = 4) -> list[np.ndarray]:
    r = np.random.RandomState(seed)
    return [r.randn(n, d) for n in rows]


def np_regmean(ws, grams, alpha):
    red = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(red), sum(g @ w for g, w in zip(red, ws)))


@pytest.mark.parametrize("rows", [(7, 7, 7), (5, 9, 12)])
def test_regmean_alpha_one_is_least_squares(rows):
    with x64():
        models = trees(seed=3)
        xs = task_inputs(4, rows)
        grams = [{"enc/kernel": Gram(jnp.asarray(x.T @ x), len(x))} for x in xs]
        out = mergejax.merge("regmean", None, models, grams=grams, alpha=1.0)
        ws = [floats(m)["enc/kernel"] for m in models]
        # Grams are means over rows: task i's rows enter with weight 1 / sqrt(n_i).
        scale = [1 / math.sqrt(len(x)) for x in xs]
        a = np.concatenate([s * x for s, x in zip(scale, xs)])
        b = np.concatenate([s * x @ w for s, x, w in zip(scale, xs, ws)])
        want = {p: np.mean([floats(m)[p] for m in models], 0) for p in floats(models[0])}
        want["enc/kernel"] = np.linalg.lstsq(a, b, rcond=None)[0]
        check_tree(out, want, models[0], rtol=2e-5, atol=1e-6)  # float32 models


def test_regmean_attention_kernel_with_reduced_off_diagonals():
    models = trees(seed=5)
    r = np.random.RandomState(6)
    xs = [r.randn(9, 5) for _ in range(K)]
    grams = [{"attn/query/kernel": jnp.asarray(x.T @ x, jnp.float32),
              "enc/kernel": Gram(jnp.asarray(x[:, :4].T @ x[:, :4], jnp.float32), 9)}
             for x in xs]
    out = da.regmean(models[0], models, grams=grams, alpha=0.3)
    f = [floats(m) for m in models]
    want = {p: np.mean([t[p] for t in f], 0) for p in f[0]}
    want["attn/query/kernel"] = np_regmean(
        [t["attn/query/kernel"].reshape(5, 6) for t in f], [x.T @ x for x in xs],
        0.3).reshape(5, 2, 3)
    want["enc/kernel"] = np_regmean([t["enc/kernel"] for t in f],
                                    [x[:, :4].T @ x[:, :4] / 9 for x in xs], 0.3)
    check_tree(out, want, models[0], rtol=2e-4, atol=2e-5)


def test_regmean_ridge_pulls_to_the_mean_and_alpha_sweeps_do_not_recompile():
    models = trees(seed=7)
    xs = task_inputs(8)
    grams = [{"enc/kernel": jnp.asarray(x.T @ x, jnp.float32)} for x in xs]
    far = da.regmean(None, models, grams=grams, ridge=1e7)
    np.testing.assert_allclose(np.asarray(far["enc"]["kernel"]),
                               np.mean([floats(m)["enc/kernel"] for m in models], 0),
                               rtol=1e-4, atol=1e-5)
    size = da._regmean_merge._cache_size()
    for alpha in (0.1, 0.5, 0.9):
        da.regmean(None, models, grams=grams, alpha=alpha)
    assert da._regmean_merge._cache_size() == size


def good_grams(k=K):
    return [{"enc/kernel": jnp.eye(4)} for _ in range(k)]


@pytest.mark.parametrize("grams,alpha,match", [
    (good_grams(2), 0.5, "got 2 grams for 3 models"),
    ([{"enc/kernel": jnp.eye(5)}] * K, 0.5,
     r"grams\[0\] at 'enc/kernel' has shape \(5, 5\); the kernel \(4, 5\)"),
    ([{"enc/kernel": jnp.eye(4)}, {"enc/kernel": jnp.eye(4) * jnp.nan},
      {"enc/kernel": jnp.eye(4)}], 0.5, r"grams\[1\] at 'enc/kernel' is not finite"),
    ([{"enc/kernel": jnp.eye(4)}, {"dec/kernel": jnp.eye(4)}, {"enc/kernel": jnp.eye(4)}],
     0.5, r"grams\[1\] covers other kernels"),
    ([{"enc/bias": jnp.eye(5)}] * K, 0.5, r"grams\[0\] at 'enc/bias' has shape"),
    ([{"enc/kernel": jnp.zeros((4, 4))}] * K, 1.0, "singular"),
    ([{}] * K, 0.5, "holds no kernel"),
    (good_grams(), 1.5, "alpha must be a number in"),
])
def test_regmean_bad_input(grams, alpha, match):
    with pytest.raises(MergeError, match=match):
        da.regmean(None, trees(), grams=grams, alpha=alpha)


# ---------------------------------------------------------------------------------------
# RegMean++.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(5, name="fc1")(x)))


def mlps():
    net = MLP()
    models = [net.init(jax.random.key(i), jnp.ones((1, 4)))["params"] for i in range(2)]
    xs = [np.random.RandomState(10 + i).randn(6, 4).astype(np.float32) for i in range(2)]
    return net, models, xs


def test_regmean_pp_merges_layer_two_on_the_merged_layer_ones_outputs():
    net, models, xs = mlps()
    apply_fn = lambda p, b: net.apply({"params": p}, b)
    alpha = 0.7
    out = mergejax.merge("regmean_pp", None, models, apply_fn=apply_fn,
                         batches=[[x[:3], x[3:]] for x in xs], alpha=alpha)
    f = [jax.tree.map(lambda a: np.asarray(a, np.float64), m) for m in models]
    x64s = [x.astype(np.float64) for x in xs]
    mean = lambda g: g / 6  # Grams are means over the 6 rows
    w1 = np_regmean([m["fc1"]["kernel"] for m in f], [mean(x.T @ x) for x in x64s], alpha)
    b1 = np.mean([m["fc1"]["bias"] for m in f], 0)
    hs = [np.maximum(x @ w1 + b1, 0) for x in x64s]  # through the merged layer 1
    w2 = np_regmean([m["fc2"]["kernel"] for m in f], [mean(h.T @ h) for h in hs], alpha)
    want = {"fc1": {"kernel": w1, "bias": b1},
            "fc2": {"kernel": w2, "bias": np.mean([m["fc2"]["bias"] for m in f], 0)}}
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-5)
    # Not plain RegMean: layer 2's Grams differ from each model's own hidden activations.
    plain = da.regmean(None, models, grams=task_grams(apply_fn, models, [[x] for x in xs]),
                       alpha=alpha)
    assert not np.allclose(np.asarray(plain["fc2"]["kernel"]), w2, rtol=1e-3, atol=1e-4)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return MLP(name="body")(x)


def test_regmean_pp_with_one_group_is_regmean():
    net = Outer()
    models = [net.init(jax.random.key(i), jnp.ones((1, 4)))["params"] for i in range(2)]
    xs = mlps()[2]
    apply_fn = lambda p, b: net.apply({"params": p}, b)
    one = da.regmean_pp(None, models, apply_fn=apply_fn, batches=[[x] for x in xs],
                        layers=r"^body")  # both layers in the group "body"
    plain = da.regmean(None, models, grams=task_grams(apply_fn, models, [[x] for x in xs]))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_regmean_pp_groups_follow_call_order_and_blocks():
    kernels = ["embed/kernel", "resblocks_1/mlp/kernel", "resblocks_1/attn/out/kernel",
               "resblocks_0/mlp/kernel", "h/2/attn/kernel", "proj/kernel"]
    assert da._groups(kernels, da.DEFAULT_LAYERS) == {
        "embed": ["embed/kernel"],
        "resblocks_1": ["resblocks_1/mlp/kernel", "resblocks_1/attn/out/kernel"],
        "resblocks_0": ["resblocks_0/mlp/kernel"], "h/2": ["h/2/attn/kernel"],
        "proj": ["proj/kernel"]}


@pytest.mark.parametrize("kwargs,match", [
    ({"batches": [[np.ones((2, 4), np.float32)]]}, "got 1 batch iterables for 2 models"),
    ({"batches": [[np.ones((2, 4), np.float32)], []]}, r"task\(s\) \[1\] are empty"),
    ({"layers": "("}, "layers must be a regex"),
    ({"layers": "^fc"}, "matched 'fc' in 'fc1/kernel', which does not end at a '/'"),
    ({"alpha": -0.1}, "alpha must be a number"),
    ({"num_batches": 0}, "num_batches must be"),
])
def test_regmean_pp_bad_input(kwargs, match):
    net, models, xs = mlps()
    args = {"apply_fn": lambda p, b: net.apply({"params": p}, b),
            "batches": [[x] for x in xs], **kwargs}
    with pytest.raises(MergeError, match=match):
        da.regmean_pp(None, models, **args)


def test_regmean_and_regmean_pp_on_the_suite_vit():
    from mergejax.suite.model import VisionTransformer, ViTConfig

    vit = VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2,
                                      embed_dim=4))
    r = np.random.RandomState(0)
    images = r.rand(3, 8, 8).astype(np.float32)
    shapes = jax.eval_shape(vit.init, jax.random.key(0), images[:1])["params"]  # no compile
    model = jax.tree.map(lambda s: jnp.asarray(0.3 * r.randn(*s.shape), s.dtype), shapes)
    apply_fn = lambda p, b: vit.apply({"params": p}, b)
    grams = task_grams(apply_fn, [model, model], [[images], [images]])
    assert {"resblocks_0/attn/query/kernel", "resblocks_0/attn/out/kernel",
            "resblocks_0/mlp_proj/kernel", "proj/kernel"} <= set(grams[0])
    assert grams[0]["resblocks_0/attn/out/kernel"].matrix.shape == (8, 8)
    # Merging a model with itself gives it back, whatever the Grams.
    for out in (da.regmean(None, [model, model], grams=grams),
                da.regmean_pp(None, [model, model], apply_fn=apply_fn,
                              batches=[[images], [images]])):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(model)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
