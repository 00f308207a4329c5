"""Permutation specs, their builders and activation statistics: a permuted network computes
the same function (float64); permuting back restores the parameters; bad specs and bad
permutations are clear errors; streamed correlations match NumPy's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64
from flax import linen as nn

from mergejax.align import features as features_lib
from mergejax.align import spec as spec_lib
from mergejax.suite import model as model_lib
from mergejax.tree import MergeError, flatten_with_paths

X = np.random.default_rng(0).uniform(size=(3, 16, 16)).astype(np.float32)


@pytest.fixture
def float64():
    """jax_enable_x64 on for the test, restored after it."""
    with x64():
        yield


def _random_variables(module, x, seed=5):
    """Variables of ``module`` with every leaf drawn from N(0, 1) (float64 under x64). Norm
    scales are ones and biases zeros at init, which would hide a missing permutation;
    drawing on the host avoids compiling one random op per leaf shape."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)


def _vit():
    return model_lib.VisionTransformer(model_lib.ViTConfig(
        image_size=16, patch_size=4, width=8, depth=2, heads=2, mlp_ratio=2, embed_dim=4))


#: case -> (module, spec, whether the spec covers the whole variables dict)
CASES = {
    "mlp": lambda: (model_lib.MLP((8, 6)), spec_lib.mlp_spec(["Dense_0", "Dense_1",
                                                              "Dense_2"]), False),
    "vit": lambda: (_vit(), spec_lib.vit_spec(2), False),
    "resnet_layernorm": lambda: (model_lib.ResNet(8, 1, norm="layer"),
                                 spec_lib.resnet_spec(8), False),
    "resnet_batchnorm": lambda: (model_lib.ResNet(8, 1, norm="batch"), spec_lib.resnet_spec(
        8, prefix="params", stats_prefix="batch_stats"), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_permuted_network_computes_the_same_function(case, float64):
    module, spec, whole = CASES[case]()
    x = jnp.asarray(X, jnp.float64)
    variables = _random_variables(module, x)
    variables = variables if whole else variables["params"]
    if whole:  # BatchNorm's running statistics, made non-trivial (var > 0)
        variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    apply = jax.jit(lambda v: module.apply(v if whole else {"params": v}, x))
    perms = spec_lib.random_permutations(spec, variables, jax.random.key(1))
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perms.values()
               if len(p) > 2), case
    permuted = spec_lib.apply_permutation(spec, perms, variables)
    paths = flatten_with_paths(variables)[0]
    changed = {p for p, a, b in zip(paths, jax.tree.leaves(variables),
                                    jax.tree.leaves(permuted)) if not np.array_equal(a, b)}
    assert changed == set(spec.axes_to_perm), case  # the spec acts on exactly its leaves
    np.testing.assert_allclose(apply(permuted), apply(variables), rtol=1e-10, atol=1e-10,
                               err_msg=case)
    restored = spec_lib.apply_permutation(spec, spec_lib.invert_permutations(perms), permuted)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_a_missing_permutation_changes_the_function(float64):
    """The check above has teeth: dropping one leaf from the spec breaks equivalence."""
    module, spec, _ = CASES["vit"]()
    x = jnp.asarray(X, jnp.float64)
    params = _random_variables(module, x)["params"]
    axes = spec.axes_to_perm
    del axes["resblocks_1/mlp_proj/kernel"]
    partial = spec_lib.PermutationSpec(axes)
    perms = spec_lib.random_permutations(partial, params, jax.random.key(1))
    apply = jax.jit(lambda v: module.apply({"params": v}, x))
    out = apply(spec_lib.apply_permutation(partial, perms, params))
    assert not np.allclose(out, apply(params), atol=1e-6)


def test_builders_cover_every_weight_and_declare_roles():
    module, spec, _ = CASES["vit"]()
    params = jax.eval_shape(module.init, jax.random.key(0), X)["params"]
    assert set(flatten_with_paths(params)[0]) == set(spec.axes_to_perm)
    assert spec.is_consumer("resblocks_0/attn/out/kernel", 0)
    assert spec.is_consumer("resblocks_0/attn/out/kernel", 1)
    assert not spec.is_consumer("resblocks_0/attn/out/kernel", 2)
    assert spec.axes_to_perm["resblocks_1/attn/query/kernel"] == ("P_res", "P_heads1", "P_qk1")
    assert spec.perm_to_axes["P_mlp0"] == (("resblocks_0/mlp_fc/bias", 0),
                                           ("resblocks_0/mlp_fc/kernel", 1),
                                           ("resblocks_0/mlp_proj/kernel", 0))
    resnet = model_lib.ResNet(20, 1)
    params = jax.eval_shape(resnet.init, jax.random.key(0), X)["params"]
    spec = spec_lib.resnet_spec(20)
    assert set(flatten_with_paths(params)[0]) - set(spec.axes_to_perm) == {"head/bias"}
    assert spec.sizes(params)["P_res2"] == 64 and spec.sizes(params)["P_s0b2"] == 16


def test_apply_permutation_matches_numpy_take():
    spec = spec_lib.PermutationSpec({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None)})
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(3, 4)), "b1": rng.normal(size=4),
              "w2": rng.normal(size=(4, 2)), "other": rng.normal(size=5)}
    perm = np.array([2, 0, 3, 1])
    out = spec_lib.apply_permutation(spec, {"h": perm}, params)
    np.testing.assert_allclose(out["w1"], params["w1"][:, perm], rtol=1e-6)
    np.testing.assert_allclose(out["b1"], params["b1"][perm], rtol=1e-6)
    np.testing.assert_allclose(out["w2"], params["w2"][perm, :], rtol=1e-6)
    np.testing.assert_allclose(out["other"], params["other"], rtol=1e-6)


@pytest.mark.parametrize("axes,consumers,params,match", [
    ({"w": ("h", "h")}, None, {"w": np.zeros((3, 3))}, "w has permutation\\(s\\) \\['h'\\] on "
     "more than one axis"),
    ({"missing": ("h",)}, None, {"w": np.zeros(3)}, "do not have: \\['missing'\\]"),
    ({"a": ("h",), "b": ("h",)}, None, {"a": np.zeros(3), "b": np.zeros(4)},
     "permutation 'h' has 3 units on axis 0 of a but 4 on axis 0 of b"),
    ({"w": (None, "h")}, None, {"w": np.zeros((3, 2, 3))}, "gives w 2 axes"),
    ({"w": ("h", None)}, {"w": (1,)}, {"w": np.zeros((3, 2))},
     "consumer axes \\[1\\] of w are not permuted"),
    ({"w": ("h", None)}, {"v": (0,)}, {"w": np.zeros((3, 2))},
     "consumers names v, which has no permuted axis"),
], ids=["two_axes", "missing_leaf", "sizes_disagree", "wrong_rank", "unpermuted_consumer",
        "consumer_without_axes"])
def test_bad_specs_are_clear_errors(axes, consumers, params, match):
    with pytest.raises(MergeError, match=match):
        spec = spec_lib.PermutationSpec(axes, consumers)
        spec_lib.apply_permutation(spec, {"h": np.arange(3)}, params)


def test_bad_permutations_and_missing_roles_are_clear_errors():
    spec = spec_lib.PermutationSpec({"w": (None, "h")})
    params = {"w": np.zeros((2, 3))}
    with pytest.raises(MergeError, match="missing \\['h'\\], unknown \\[\\]"):
        spec_lib.apply_permutation(spec, {}, params)
    with pytest.raises(MergeError, match="unknown \\['g'\\]"):
        spec_lib.apply_permutation(spec, {"h": np.arange(3), "g": np.arange(3)}, params)
    with pytest.raises(MergeError, match="permutation 'h' has shape \\(4,\\)"):
        spec_lib.apply_permutation(spec, {"h": np.arange(4)}, params)
    with pytest.raises(MergeError, match="does not say which axes consume"):
        spec.is_consumer("w", 1)
    with pytest.raises(MergeError, match="at least two layers"):
        spec_lib.mlp_spec(["Dense_0"])
    with pytest.raises(MergeError, match="depth 2 \\+ 2\\*3\\*n"):
        spec_lib.resnet_spec(9)


def test_feature_correlations_match_numpy_and_stream_over_batches():
    mlp = model_lib.MLP((12, 6))
    a, b = (_random_variables(mlp, X, seed)["params"] for seed in (0, 1))
    x = np.random.default_rng(1).uniform(size=(96, 16, 16)).astype(np.float32)
    features_fn = features_lib.linen_features(mlp, {"P_0": ("Dense_0", nn.relu),
                                                    "P_1": "Dense_1"})
    stats = features_lib.feature_correlations(features_fn, [a, b],
                                              [x[:32], x[32:64], x[64:]])
    flat = x.reshape(96, -1) * 2 - 1  # the model's input scaling
    h_a = np.maximum(flat @ a["Dense_0"]["kernel"] + a["Dense_0"]["bias"], 0)
    h_b = np.maximum(flat @ b["Dense_0"]["kernel"] + b["Dense_0"]["bias"], 0)
    z_a = h_a @ a["Dense_1"]["kernel"] + a["Dense_1"]["bias"]
    z_b = h_b @ b["Dense_1"]["kernel"] + b["Dense_1"]["bias"]
    for perm, fa, fb in (("P_0", h_a, h_b), ("P_1", z_a, z_b)):
        both = np.concatenate([fa, fb], 1)
        live = np.std(both, 0) > 1e-6  # dead ReLUs: corrcoef is NaN, ours 0
        want = np.corrcoef(both[:, live].T)
        got = np.asarray(stats[perm].correlation())
        np.testing.assert_allclose(got[np.ix_(live, live)], want, atol=2e-4)
        np.testing.assert_array_equal(got[~live][:, ~live], 0)
        n = fa.shape[1]
        np.testing.assert_allclose(stats[perm].block(0, 1), got[:n, n:])
    assert stats["P_0"].count == 96 and stats["P_0"].num_models == 2


def test_linen_features_reads_nested_modules_and_reports_missing_ones():
    vit = _vit()
    params = _random_variables(vit, X)["params"]
    fn = features_lib.linen_features(vit, {"P_res": ["resblocks_0", "resblocks_1"],
                                           "P_mlp1": ("resblocks_1/mlp_fc", nn.gelu)})
    out = jax.jit(fn)(params, X)
    tokens = (16 // 4) ** 2 + 1
    assert out["P_res"].shape == (2 * 3 * tokens, 8)
    assert out["P_mlp1"].shape == (3 * tokens, 16)
    assert float(out["P_mlp1"].min()) >= -0.2  # GELU was applied
    with pytest.raises(MergeError, match="no submodule output at \\['nope'\\]"):
        features_lib.linen_features(vit, {"P": "nope"})(params, X)


def test_feature_correlations_batches_running_dry():
    mlp = model_lib.MLP((4,))
    a = _random_variables(mlp, X)["params"]
    fn = features_lib.linen_features(mlp, {"P_0": "Dense_0"})
    with pytest.raises(MergeError, match="ran dry after 1 of 3"):
        features_lib.feature_correlations(fn, [a, a], [X], num_batches=3)
    with pytest.raises(MergeError, match="ran dry after 0 of at least 1"):
        features_lib.feature_correlations(fn, [a, a], [])
