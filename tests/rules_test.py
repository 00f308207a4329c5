"""Tests of per-leaf hyperparameters: path rules, callables, layer gradients."""

import jax.numpy as jnp
import numpy as np
import pytest

import mergejax
from mergejax import LayerGradient, MergeError, PathRules
from mergejax.rules import resolve_per_leaf

PATHS = ["embed/embedding", "layers/0/attn/kernel", "layers/0/mlp/kernel",
         "layers/1/attn/kernel", "layers/2/mlp/kernel", "final_norm/scale"]
LEAVES = [np.zeros((2, 2))] * len(PATHS)


def test_first_matching_rule_wins():
    rules = [(r"attn", 0.1), (r"layers/0", 0.2), (r".*", 0.3)]
    assert resolve_per_leaf(rules, PATHS, LEAVES) == [0.3, 0.1, 0.2, 0.1, 0.3, 0.3]


def test_unmatched_leaf_is_an_error_unless_default():
    with pytest.raises(MergeError, match=r"no rule for 'density' matches leaf 'embed/embedding'"):
        resolve_per_leaf([(r"layers", 0.5)], PATHS, LEAVES, name="density")
    got = resolve_per_leaf(PathRules([(r"layers", 0.5)], default=1.0), PATHS, LEAVES)
    assert got == [1.0, 0.5, 0.5, 0.5, 0.5, 1.0]


def test_invalid_regex_is_reported():
    with pytest.raises(MergeError, match="invalid regex"):
        PathRules([("(", 1.0)])


def test_callable_form_sees_path_and_leaf():
    got = resolve_per_leaf(lambda path, leaf: float(leaf.ndim) if "mlp" in path else 0.0,
                           PATHS, LEAVES)
    assert got == [0.0, 0.0, 2.0, 0.0, 2.0, 0.0]


def test_layer_gradient_interpolates_over_depth_like_mergekit():
    # 3 layers -> positions 0, 0.5, 1; anchors [0, 1] -> values 0, 0.5, 1.
    # mergekit: t = i / (n - 1), value = lerp at t * (m - 1); non-layer leaves -> first anchor.
    got = resolve_per_leaf(LayerGradient([0.0, 1.0]), PATHS, LEAVES)
    assert got == [0.0, 0.0, 0.0, 0.5, 1.0, 0.0]
    got = resolve_per_leaf(LayerGradient([0.0, 0.2, 1.0], outside=9.0), PATHS, LEAVES)
    np.testing.assert_allclose(got, [9.0, 0.0, 0.0, 0.2, 1.0, 9.0])


def test_rules_nest_with_gradients():
    rules = [(r"attn", LayerGradient([1.0, 0.0])), (r".*", 0.5)]
    np.testing.assert_allclose(resolve_per_leaf(rules, PATHS, LEAVES),
                               [0.5, 1.0, 0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("path,index", [
    ("layers/3/attn/kernel", 3), ("encoder/layer_11/mlp", 11), ("blocks.2.w", 2),
    ("model.layers.5.self_attn.q_proj.weight", 5),
    ("Transformer/encoderblock_4/MlpBlock_0/Dense_0/kernel", 4), ("h/7/attn", 7),
    ("Dense_0/kernel", None), ("model/layers.5/w", 5)])
def test_layer_index(path, index):
    assert mergejax.layer_index(path) == index


def test_per_leaf_hyperparameters_reach_the_kernel():
    base = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    ft = {"a": jnp.ones(3), "b": jnp.ones(3)}
    out = mergejax.task_arithmetic(base, [ft], scale=[(r"^a$", 0.25), (r"^b$", 2.0)])
    np.testing.assert_allclose(out["a"], 0.25)
    np.testing.assert_allclose(out["b"], 2.0)
    # Per-model weights whose entries are themselves per-leaf forms.
    out = mergejax.task_arithmetic(base, [ft, ft],
                                   weights=[PathRules([("a", 1.0)], default=0.0), 0.5])
    np.testing.assert_allclose(out["a"], 1.5)
    np.testing.assert_allclose(out["b"], 0.5)


def test_list_for_a_scalar_hyperparameter_points_to_layer_gradient():
    base = {"a": jnp.zeros(3)}
    with pytest.raises(MergeError, match="LayerGradient"):
        mergejax.task_arithmetic(base, [base], scale=[0.1, 0.2])
