"""Merges of sharded arrays keep the inputs' sharding and values (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mergejax

CASES = [
    ("linear", None, 3, {"weights": [0.2, 0.3, 0.5]}),
    ("task_arithmetic", "base", 3, {"scale": 0.4}),
    ("slerp", "base", 1, {"t": 0.3}),
    ("slerp", "base", 2, {"t": 0.7}),
    ("nearswap", "base", 1, {"t": 0.05}),
    ("multislerp", "base", 3, {}),
    ("karcher", None, 3, {}),
    ("model_stock", "base", 3, {}),
    ("metagpt", "base", 3, {}),
    ("ties", "base", 3, {"density": 0.3}),
    ("ties", "base", 3, {"density": 0.3, "scope": "tensor", "topk": "mergekit"}),
    ("dare_ties", "base", 3, {"density": 0.5, "key": jax.random.key(0)}),
    ("della", "base", 3, {"key": jax.random.key(1)}),
    ("breadcrumbs", "base", 3, {"density": 0.5, "gamma": 0.1}),
    ("magmax", "base", 3, {}),
    ("consensus", "base", 3, {"merged": "ties"}),
    ("pcb", "base", 3, {"density": 0.3, "clip": 0.05}),
    ("sce", "base", 3, {"density": 0.5}),
    ("model_tailor", "base", 3, {"density": 0.3, "block_size": 4}),
    ("localize_stitch", "base", 3, {"density": 0.3}),
    ("tsv_m", "base", 3, {}),
    ("iso_c", "base", 3, {}),
    ("iso_cts", "base", 3, {}),
    ("knots", "base", 3, {}),
    ("wudi", "base", 3, {"form": "closed"}),
    ("awd", "base", 3, {}),
    ("doge", "base", 3, {}),
    ("widen", "base", 3, {}),
]

MATRIX_METHODS = ("tsv_m", "iso_c", "iso_cts", "knots", "wudi", "awd", "doge", "widen")


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"attn": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
            "mlp": {"kernel": jnp.asarray(rng.normal(size=(8, 32)), jnp.bfloat16),
                    "bias": jnp.asarray(rng.normal(size=(32,)), jnp.float32)},
            "step": jnp.array(3, jnp.int32)}


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("the sharding tests need 8 devices; tests/conftest.py sets XLA_FLAGS")
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _shard(tree, mesh):
    specs = {"attn": {"kernel": P("data", "model")},
             "mlp": {"kernel": P(None, ("data", "model")), "bias": P("model")},
             "step": P()}
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


@pytest.mark.parametrize("name,base_arg,k,hparams", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sharded_inputs_give_same_sharding_and_values(mesh, name, base_arg, k, hparams):
    base, models = _params(0), [_params(i) for i in range(1, k + 1)]
    expected = mergejax.merge(name, base if base_arg else None, models, **hparams)
    sbase, smodels = _shard(base, mesh), [_shard(m, mesh) for m in models]
    got = mergejax.merge(name, sbase if base_arg else None, smodels, **hparams)
    reference = sbase if base_arg else smodels[0]
    # Sharded matmuls sum in another order; decompositions and solves amplify that.
    tol = (dict(rtol=1e-4, atol=1e-4) if name in MATRIX_METHODS
           else dict(rtol=2e-6, atol=2e-6))
    for path, g, e, r in zip(mergejax.leaf_paths(got), jax.tree.leaves(got),
                             jax.tree.leaves(expected), jax.tree.leaves(reference)):
        assert g.sharding.is_equivalent_to(r.sharding, g.ndim), path
        assert g.dtype == e.dtype, path
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        if name in MATRIX_METHODS and r.dtype == jnp.bfloat16:
            # A float32 result a hair off rounds to either bf16 neighbour: one ulp.
            e = np.where(np.abs(g - e) <= _bf16_ulp(e), g, e)
        np.testing.assert_allclose(g, e, **tol, err_msg=path)


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers (8 significand bits) at ``|x|``."""
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


@pytest.mark.parametrize("name,hparams", [
    ("task_arithmetic", {"scale": 0.4}),
    ("ties", {"density": 0.3}),
    ("dare_ties", {"density": 0.5, "key": jax.random.key(0)}),
    ("tsv_m", {}),
])
def test_per_leaf_merges_keep_the_sharding(mesh, name, hparams):
    base, models = _params(0), [_params(i) for i in range(1, 4)]
    sbase, smodels = _shard(base, mesh), [_shard(m, mesh) for m in models]
    got = mergejax.merge(name, sbase, smodels, per_leaf=True, **hparams)
    expected = mergejax.merge(name, sbase, smodels, per_leaf=False, **hparams)
    for path, g, e, r in zip(mergejax.leaf_paths(got), jax.tree.leaves(got),
                             jax.tree.leaves(expected), jax.tree.leaves(sbase)):
        assert g.sharding.is_equivalent_to(r.sharding, g.ndim), path
        tol = dict(rtol=1e-4, atol=1e-4) if name in MATRIX_METHODS else dict(rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32),
                                   **tol, err_msg=path)


def test_emr_task_models_keep_the_sharding(mesh):
    base, models = _params(0), [_params(i) for i in range(1, 4)]
    sbase, smodels = _shard(base, mesh), [_shard(m, mesh) for m in models]
    expected = mergejax.emr(base, models).task_model(1)
    got = mergejax.emr(sbase, smodels).task_model(1)
    for path, g, e, r in zip(mergejax.leaf_paths(got), jax.tree.leaves(got),
                             jax.tree.leaves(expected), jax.tree.leaves(sbase)):
        assert g.sharding.is_equivalent_to(r.sharding, g.ndim), path
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32),
                                   rtol=2e-6, atol=2e-6, err_msg=path)


def test_adamerging_on_sharded_params(mesh):
    """The learned loop runs unchanged on sharded params; the merge keeps their sharding."""
    base, models = _params(0), [_params(i) for i in range(1, 4)]
    sbase, smodels = _shard(base, mesh), [_shard(m, mesh) for m in models]
    x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 16)), jnp.float32)

    def apply_fn(p, x):
        h = x @ p["attn"]["kernel"]
        return h @ p["mlp"]["kernel"].astype(jnp.float32) + p["mlp"]["bias"]

    run = lambda b, ms: mergejax.adamerging(  # noqa: E731
        b, ms, apply_fn=apply_fn, batches=[iter([x] * 3) for _ in ms], steps=3,
        learning_rate=0.01)
    expected, got = run(base, models), run(sbase, smodels)
    np.testing.assert_allclose(got.coefficients, expected.coefficients, rtol=1e-5, atol=1e-6)
    for path, g, r in zip(mergejax.leaf_paths(got.params), jax.tree.leaves(got.params),
                          jax.tree.leaves(sbase)):
        assert g.sharding.is_equivalent_to(r.sharding, g.ndim), path
