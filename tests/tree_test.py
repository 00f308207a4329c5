"""Tests of the pytree algebra: paths, structure checks, task vectors, stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mergejax
from mergejax import MergeError


def _tree(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "encoder": {"layers": [{"kernel": jnp.asarray(rng.normal(size=(3, 4)), dtype),
                                "bias": jnp.asarray(rng.normal(size=(4,)), dtype)}
                               for _ in range(2)]},
        "step": jnp.array(7, jnp.int32),
    }


def test_paths_are_slash_joined():
    assert mergejax.leaf_paths(_tree()) == [
        "encoder/layers/0/bias", "encoder/layers/0/kernel",
        "encoder/layers/1/bias", "encoder/layers/1/kernel", "step"]


def test_paths_of_flax_linen_and_nnx_params():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(3)(x)))

    params = Mlp().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    assert mergejax.leaf_paths(params) == [
        "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]

    class NnxMlp(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

    state = nnx.to_pure_dict(nnx.state(NnxMlp(nnx.Rngs(0))))
    assert mergejax.leaf_paths(state) == [
        "layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]


def test_task_vector_round_trip_and_non_float_leaves():
    base, ft = _tree(0), _tree(1)
    ft["step"] = jnp.array(9, jnp.int32)
    tau = mergejax.task_vector(base, ft)
    np.testing.assert_allclose(tau["encoder"]["layers"][0]["kernel"],
                               np.asarray(ft["encoder"]["layers"][0]["kernel"])
                               - np.asarray(base["encoder"]["layers"][0]["kernel"]), rtol=1e-6)
    assert int(tau["step"]) == 9  # copied from the fine-tuned model
    back = mergejax.apply_task_vector(base, tau)
    np.testing.assert_allclose(back["encoder"]["layers"][1]["bias"],
                               ft["encoder"]["layers"][1]["bias"], rtol=1e-6)
    assert int(back["step"]) == 7  # copied from the base
    half = mergejax.apply_task_vector(base, tau, scale=0.5)
    np.testing.assert_allclose(
        half["encoder"]["layers"][0]["kernel"],
        0.5 * (np.asarray(base["encoder"]["layers"][0]["kernel"])
               + np.asarray(ft["encoder"]["layers"][0]["kernel"])), rtol=1e-5)


def test_tree_arithmetic_keeps_dtypes():
    a, b = _tree(0, jnp.bfloat16), _tree(1, jnp.bfloat16)
    for out in (mergejax.tree_add(a, b), mergejax.tree_sub(a, b), mergejax.tree_scale(a, 2.0),
                mergejax.tree_weighted_sum([0.5, 0.5], [a, b])):
        assert out["encoder"]["layers"][0]["kernel"].dtype == jnp.bfloat16
        assert out["step"].dtype == jnp.int32
    ws = mergejax.tree_weighted_sum(jnp.array([0.25, 0.75]), [_tree(0), _tree(1)])
    np.testing.assert_allclose(
        ws["encoder"]["layers"][1]["kernel"],
        0.25 * np.asarray(_tree(0)["encoder"]["layers"][1]["kernel"])
        + 0.75 * np.asarray(_tree(1)["encoder"]["layers"][1]["kernel"]), rtol=1e-6)
    with pytest.raises(MergeError, match="expected 2 weights"):
        mergejax.tree_weighted_sum([1.0], [a, b])


def test_stack_and_unstack_are_inverse():
    trees = [_tree(i) for i in range(3)]
    stacked = mergejax.stack_trees(trees)
    assert stacked["encoder"]["layers"][0]["kernel"].shape == (3, 3, 4)
    back = mergejax.unstack_tree(stacked)
    for t, u in zip(trees, back):
        jax.tree.map(np.testing.assert_array_equal, t, u)


def test_structure_mismatch_names_missing_and_extra_paths():
    a = _tree(0)
    b = _tree(1)
    del b["encoder"]["layers"][1]["bias"]
    b["encoder"]["layers"][1]["scale"] = jnp.ones(4)
    with pytest.raises(MergeError, match=r"models\[0\].*missing 'encoder/layers/1/bias'.*"
                                         r"unexpected 'encoder/layers/1/scale'"):
        mergejax.check_compatible(a, [b])


def test_shape_and_dtype_mismatch_name_the_path():
    a, b = _tree(0), _tree(1)
    b["encoder"]["layers"][0]["kernel"] = jnp.ones((4, 3))
    with pytest.raises(MergeError, match=r"shape mismatch at 'encoder/layers/0/kernel'.*"
                                         r"float32\[3, 4\].*float32\[4, 3\]"):
        mergejax.check_compatible(a, [b])
    c = _tree(1)
    c["encoder"]["layers"][1]["bias"] = c["encoder"]["layers"][1]["bias"].astype(jnp.bfloat16)
    with pytest.raises(MergeError, match=r"dtype mismatch at 'encoder/layers/1/bias'"):
        mergejax.check_compatible(a, [c])
