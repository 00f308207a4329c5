"""Tests of the engine every method runs on: dispatch, errors, precision, tracing, keys."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import make_tree, walk

import mergejax
from mergejax import MergeError, lora
from mergejax import method as method_lib
from mergejax.learned import routing
from mergejax.methods import matrices, subspace

BASIC = ["greedy_soup", "karcher", "linear", "metagpt", "model_stock", "multislerp",
         "nearswap", "slerp", "task_arithmetic"]


def _params(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), dtype),
                      "bias": jnp.asarray(rng.normal(size=(5,)), dtype)},
            "norm": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=(5,)), dtype)},
            "step": jnp.array(seed, jnp.int32),
            "mask": jnp.array([True, False])}


BASE = _params(0)
MODELS = [_params(i) for i in (1, 2, 3)]


def test_list_methods_has_the_basic_methods():
    assert set(BASIC) <= set(mergejax.list_methods())
    assert mergejax.list_methods() == sorted(mergejax.list_methods())


def test_merge_dispatches_to_the_method():
    a = mergejax.merge("task_arithmetic", BASE, MODELS, scale=0.3, weights=[1.0, 0.5, 2.0])
    b = mergejax.task_arithmetic(BASE, MODELS, scale=0.3, weights=[1.0, 0.5, 2.0])
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(MergeError, match=r"unknown merge method 'tie'.*'task_arithmetic'"):
        mergejax.merge("tie", BASE, MODELS)


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(MergeError, match=r"unknown hyperparameter\(s\) \['lambda'\].*"
                                         r"valid ones are .*'scale'.*'weights'"):
        mergejax.merge("task_arithmetic", BASE, MODELS, **{"lambda": 0.3})
    with pytest.raises(MergeError, match=r"unknown hyperparameter\(s\) \['density'\]"):
        mergejax.linear(None, MODELS, density=0.5)
    with pytest.raises(MergeError, match=r"unknown hyperparameter\(s\) \['scale'\]"):
        mergejax.merge("greedy_soup", None, MODELS, evaluate=lambda p: 0.0, scale=1.0)


def test_empty_model_list():
    with pytest.raises(MergeError, match="models is empty"):
        mergejax.task_arithmetic(BASE, [])
    with pytest.raises(MergeError, match="models is empty"):
        mergejax.greedy_soup(None, [], evaluate=lambda p: 0.0)


def test_wrong_number_of_weights():
    with pytest.raises(MergeError, match=r"got 2 weights for 3 models"):
        mergejax.linear(None, MODELS, weights=[1.0, 2.0])
    with pytest.raises(MergeError, match=r"one value per model \(3\), got shape \(2,\)"):
        mergejax.linear(None, MODELS, weights=jnp.ones(2))


def test_structural_errors_reach_the_user_through_merge():
    bad = _params(4)
    bad["dense"]["kernel"] = jnp.ones((5, 4))
    with pytest.raises(MergeError, match=r"shape mismatch at 'dense/kernel'.*models\[1\]"):
        mergejax.merge("linear", BASE, [MODELS[0], bad])
    bad = _params(4, jnp.bfloat16)
    with pytest.raises(MergeError, match=r"dtype mismatch at 'dense/bias'.*bfloat16"):
        mergejax.merge("task_arithmetic", BASE, [bad])
    bad = {k: v for k, v in _params(4).items() if k != "norm"}
    with pytest.raises(MergeError, match=r"missing 'norm/scale'"):
        mergejax.merge("slerp", BASE, [bad])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_model_and_path(bad_value):
    bad = _params(5)
    bad["norm"]["scale"] = bad["norm"]["scale"].at[2].set(bad_value)
    with pytest.raises(MergeError, match=r"non-finite values \(NaN or Inf\) in models\[1\] "
                                         r"at 'norm/scale'"):
        mergejax.task_arithmetic(BASE, [MODELS[0], bad])
    nan_base = _params(0)
    nan_base["dense"]["bias"] = nan_base["dense"]["bias"].at[0].set(bad_value)
    with pytest.raises(MergeError, match=r"in base at 'dense/bias'"):
        mergejax.slerp(nan_base, [MODELS[0]], t=0.5)
    # The check can be switched off; the value then propagates.
    out = mergejax.task_arithmetic(BASE, [bad], check_finite=False)
    assert not np.isfinite(np.asarray(out["norm"]["scale"][2]))


def test_non_finite_output_from_finite_inputs_is_reported():
    with pytest.raises(MergeError, match=r"linear produced non-finite values.*check the "
                                         r"hyperparameters"):
        mergejax.linear(None, MODELS[:2], weights=[1.0, -1.0])


def test_missing_base_and_missing_required_hyperparameter():
    with pytest.raises(MergeError, match="task_arithmetic needs a base"):
        mergejax.task_arithmetic(None, MODELS)
    with pytest.raises(MergeError, match=r"nearswap needs hyperparameter\(s\) \['t'\]"):
        mergejax.nearswap(BASE, MODELS[:1])
    with pytest.raises(MergeError, match="slerp takes at most 2 models"):
        mergejax.slerp(BASE, MODELS, t=0.5)
    with pytest.raises(MergeError, match="model_stock needs at least 2 models"):
        mergejax.model_stock(BASE, MODELS[:1])
    with pytest.raises(MergeError, match="scope must be 'global' or 'tensor'"):
        mergejax.metagpt(BASE, MODELS, scope="layer")
    with pytest.raises(MergeError, match="must be a Python value"):
        mergejax.metagpt(BASE, MODELS, scope=jnp.array(1.0))


def test_bf16_in_bf16_out_computed_in_float32():
    base = {"w": jnp.full((8,), 256.0, jnp.bfloat16)}
    models = [{"w": jnp.full((8,), 256.0 + d, jnp.bfloat16)} for d in (2.0, 2.0, -2.0, 0.0)]
    out = mergejax.task_arithmetic(base, models, scale=1.0)
    assert out["w"].dtype == jnp.bfloat16
    # In float32: 256 + 2 + 2 - 2 + 0 = 258 (exact in bf16). A bf16 running sum would
    # round 256 + 2 to 256 at every step (bf16 spacing at 256 is 2, ties to even).
    assert float(out["w"][0]) == 258.0
    as_f32 = mergejax.task_arithmetic(base, models, out_dtype=jnp.float32)
    assert as_f32["w"].dtype == jnp.float32


def test_non_float_leaves_are_copied_from_the_base():
    key_leaf = jax.random.key(3)
    base = {**BASE, "rng": key_leaf}
    models = [{**m, "rng": jax.random.key(9)} for m in MODELS]
    out = mergejax.task_arithmetic(base, models, scale=0.5)
    assert int(out["step"]) == 0 and out["step"].dtype == jnp.int32
    np.testing.assert_array_equal(out["mask"], BASE["mask"])
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(key_leaf))
    soup = mergejax.linear(None, MODELS)  # no base: from the first model
    assert int(soup["step"]) == 1


def test_coefficient_sweep_compiles_once():
    mergejax.task_arithmetic(BASE, MODELS, scale=0.1)
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for scale in (0.2, 0.5, 1, 3.0):
        mergejax.task_arithmetic(BASE, MODELS, scale=scale)
    mergejax.task_arithmetic(BASE, MODELS, scale=0.3, weights=[0.1, -2.0, 4])
    mergejax.task_arithmetic(BASE, MODELS, scale=0.3, weights=jnp.array([1.0, 2.0, 3.0]))
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access
    mergejax.task_arithmetic(BASE, MODELS, normalize=True)  # static: a new program
    assert method_lib._run_kernels._cache_size() == size + 1  # pylint: disable=protected-access


def test_merge_inside_user_jit_and_vmap():
    eager = mergejax.task_arithmetic(BASE, MODELS, scale=0.4)
    jitted = jax.jit(lambda s: mergejax.task_arithmetic(BASE, MODELS, scale=s))(0.4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
    swept = jax.vmap(lambda s: mergejax.task_arithmetic(BASE, MODELS, scale=s)["dense"]["bias"]
                     )(jnp.array([0.0, 0.4]))
    np.testing.assert_allclose(swept[0], BASE["dense"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(swept[1], eager["dense"]["bias"], rtol=1e-6)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _central_difference(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("name,coefficients", [
    ("task_arithmetic", {"weights": [0.3, -0.2, 0.9], "scale": 0.7}),
    ("linear", {"weights": [0.3, 0.5, 0.9]}),
    ("slerp", {"t": 0.35}),
    ("multislerp", {"weights": [0.2, 0.5, 0.3]}),
])
def test_gradient_wrt_coefficients_matches_finite_differences(x64, name, coefficients):
    del x64
    base = jax.tree.map(lambda x: x.astype(jnp.float64) if mergejax.is_float(x) else x, BASE)
    models = [jax.tree.map(lambda x: x.astype(jnp.float64) if mergejax.is_float(x) else x, m)
              for m in MODELS]
    if name == "slerp":
        models = models[:2]
    target = jax.tree.map(lambda x: jnp.cos(x) if mergejax.is_float(x) else x, models[0])

    def loss(**coeffs):
        merged = mergejax.merge(name, base, models, **coeffs)
        return sum(jnp.sum((merged[k][n] - target[k][n]) ** 2 * (1 + jnp.arange(merged[k][n].size
                                                                                ).reshape(merged[k][n].shape)))
                   for k in ("dense", "norm") for n in merged[k])

    for arg, value in coefficients.items():
        others = {k: v for k, v in coefficients.items() if k != arg}
        grad = jax.grad(lambda v: loss(**others, **{arg: v}))(jnp.asarray(value, jnp.float64))
        numeric = _central_difference(lambda v: float(loss(**others, **{arg: v})), value)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
        assert np.all(np.abs(numeric) > 1e-6)  # the check is not vacuous


def test_leaf_key_depends_on_key_and_path_only():
    k = jax.random.key(0)
    a = jax.random.key_data(mergejax.leaf_key(k, "layers/0/kernel"))
    np.testing.assert_array_equal(a, jax.random.key_data(mergejax.leaf_key(k, "layers/0/kernel")))
    assert not np.array_equal(a, jax.random.key_data(mergejax.leaf_key(k, "layers/1/kernel")))
    assert not np.array_equal(
        a, jax.random.key_data(mergejax.leaf_key(jax.random.key(1), "layers/0/kernel")))


@mergejax.leafwise("test_noise", family="test", paper="-", coefficients=("scale",),
                   uses_key=True, register=False)
def _noise(ctx, base, models, *, scale=1.0):
    return base + scale * jax.random.normal(ctx.key, base.shape, base.dtype) + 0 * models[0]


def test_random_method_keys_per_leaf_so_subtrees_merge_identically():
    with pytest.raises(MergeError, match="test_noise is random: pass key="):
        _noise(BASE, MODELS)
    key = jax.random.key(42)
    whole = _noise(BASE, MODELS, key=key)
    part = _noise({"dense": BASE["dense"]}, [{"dense": m["dense"]} for m in MODELS], key=key)
    np.testing.assert_array_equal(whole["dense"]["kernel"], part["dense"]["kernel"])
    other = _noise(BASE, MODELS, key=jax.random.key(43))
    assert not np.allclose(whole["dense"]["kernel"], other["dense"]["kernel"])
    assert "test_noise" not in mergejax.list_methods()


def _polar_noise(ctx, base, models, *, scale=1.0, shift=0.0):
    """A kernel with per-leaf linear algebra and randomness, for the batching test."""
    _KERNEL_TRACES.append(ctx.path)
    tau = sum(x - base for x in models)
    u, _, vt = jnp.linalg.svd(tau.reshape(tau.shape[0], -1), full_matrices=False)
    noise = jax.random.normal(ctx.key, base.shape, base.dtype)
    return base + scale * (u @ vt).reshape(base.shape) + shift + 1e-3 * noise


_KERNEL_TRACES: list[str] = []
_one_by_one = mergejax.leafwise("test_polar", family="test", paper="-", coefficients=("scale",),
                                uses_key=True, register=False)(_polar_noise)
_batched = mergejax.leafwise("test_polar_batched", family="test", paper="-",
                             coefficients=("scale",), uses_key=True, batched=True,
                             register=False)(_polar_noise)


def test_batched_kernels_equal_leaf_by_leaf_and_trace_once_per_group():
    rng = np.random.default_rng(0)
    shapes = {"blocks/0/w": (4, 3), "blocks/1/w": (4, 3), "blocks/2/w": (4, 3),
              "blocks/2/v": (4, 3), "head/w": (4, 5), "head/b": (4, 1)}
    trees = [make_tree({p: rng.normal(size=s) for p, s in shapes.items()}, 0) for _ in range(3)]
    base, models = trees[0], trees[1:]
    # A per-leaf static hyperparameter splits a group: blocks/2/v gets its own shift.
    shift = [("blocks/2/v", 1.0), (".*", 0.0)]
    key = jax.random.key(3)
    _KERNEL_TRACES.clear()
    want = _one_by_one(base, models, key=key, scale=[("head/.*", 2.0), (".*", 0.5)],
                       shift=shift)
    assert len(_KERNEL_TRACES) == len(shapes)
    _KERNEL_TRACES.clear()
    got = _batched(base, models, key=key, scale=[("head/.*", 2.0), (".*", 0.5)], shift=shift)
    # (4,3) x3 with shift 0 in one group; blocks/2/v, head/w, head/b alone.
    assert len(_KERNEL_TRACES) == 4
    for (path, g), (_, w) in zip(walk(got), walk(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=path)
    # A new scale reuses the compiled program.
    _KERNEL_TRACES.clear()
    _batched(base, models, key=key, scale=0.1, shift=shift)
    assert not _KERNEL_TRACES
    # A batch key splits groups further: blocks/0/w now runs alone.
    by_key = mergejax.leafwise(
        "test_polar_keyed", family="test", paper="-", coefficients=("scale",), uses_key=True,
        batched=lambda path, shape, static: path.startswith("blocks/0"),
        register=False)(_polar_noise)
    _KERNEL_TRACES.clear()
    got = by_key(base, models, key=key, scale=0.5, shift=shift)
    assert len(_KERNEL_TRACES) == 5 and "blocks/0/w" in _KERNEL_TRACES
    np.testing.assert_allclose(np.asarray(got["blocks"]["1"]["w"]),
                               np.asarray(_one_by_one(base, models, key=key, scale=0.5,
                                                      shift=shift)["blocks"]["1"]["w"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (16, 5), (6, 4, 3), (9, 3)])
def test_fused_reduce_matches_numpy(shape):
    """Row counts divisible by 8, 4, 2 and 1 (the groups `fused_reduce` folds), scalars."""
    rng = np.random.default_rng(len(shape) + sum(shape))
    a, b = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    got = jax.jit(lambda a, b: method_lib.fused_reduce((a * b, jnp.abs(a), b), (
        "sum", "max", "sum")))(a, b)
    want = (np.sum(a.astype(np.float64) * b), np.max(np.abs(a)), np.sum(b, dtype=np.float64))
    for g, w in zip(got, want):
        assert g.shape == () and g.dtype == jnp.float32
        np.testing.assert_allclose(float(g), w, rtol=1e-5, atol=1e-5)


def test_fused_reduce_gradients_are_those_of_the_sums_and_maxima():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    grad = jax.grad(lambda x: sum(method_lib.fused_reduce((x * x, x), ("sum", "max"))))(x)
    onehot = np.zeros_like(x)
    onehot[np.unravel_index(np.argmax(x), x.shape)] = 1.0
    np.testing.assert_allclose(np.asarray(grad), 2 * x + onehot, rtol=1e-6)


def test_fused_reduce_rejects_unknown_kinds():
    x = jnp.ones((2, 3))
    with pytest.raises(MergeError, match="one kind per operand"):
        method_lib.fused_reduce((x,), ("mean",))
    with pytest.raises(MergeError, match="one kind per operand"):
        method_lib.fused_reduce((x, x), ("sum",))


# --- speculate / speculation ----------------------------------------------------------


def test_speculate_outside_speculation_is_a_cond():
    f = jax.jit(lambda x: mergejax.speculate(x > 0, lambda v: v + 1, lambda v: v - 1, x))
    assert float(f(2.0)) == 3.0 and float(f(-2.0)) == -3.0


def test_speculation_traces_only_the_common_branch_and_records_the_predicate():
    traced = []

    def rare(v):
        traced.append("rare")
        return v - 1

    @jax.jit
    def fast(x):
        with method_lib.speculation() as assumed:
            y = mergejax.speculate(x > 0, lambda v: v + 1, rare, x)
            y = mergejax.speculate(x < 10, lambda v: v * 2, rare, y)
        assert len(assumed) == 2
        return y, jnp.all(jnp.stack(assumed))

    y, held = fast(2.0)
    assert (float(y), bool(held)) == (6.0, True)
    assert not bool(fast(-2.0)[1]) and not bool(fast(20.0)[1])
    assert traced == []  # the rare branch was never traced
    assert method_lib._ASSUMED.held is None  # noqa: SLF001 (the context restored it)


def test_nested_speculation_restores_the_outer_list():
    with method_lib.speculation() as outer:
        mergejax.speculate(jnp.bool_(True), lambda: 1, lambda: 2)
        with method_lib.speculation() as inner:
            mergejax.speculate(jnp.bool_(False), lambda: 1, lambda: 2)
        mergejax.speculate(jnp.bool_(True), lambda: 1, lambda: 2)
    assert (len(outer), len(inner)) == (2, 1)


def _assert_matmuls_at_highest(text: str) -> None:
    """Every matmul in a jaxpr's or StableHLO's text runs at HIGHEST precision."""
    precisions = re.findall(r"precision ?= ?[\[(]([^\])]*)", text)
    assert precisions and all(p.count("HIGHEST") == 2 for p in precisions), precisions


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "knots", "ho_gsvd"])
def test_merge_matmuls_run_at_full_precision_whatever_the_default(name):
    """XLA:GPU runs float32 matmuls in TF32 unless told otherwise (on an H100 HO-GSVD's
    result came out wrong in every entry); PyTorch, and so mergekit and FusionBench, does
    not. Every kernel traces its matmuls at HIGHEST, whatever the caller's default."""
    with jax.default_matmul_precision("bfloat16"):
        _assert_matmuls_at_highest(jax.jit(lambda b, ms: mergejax.merge(name, b, ms)).lower(
            BASE, MODELS).as_text())


_TALL = [{"w": jnp.asarray(np.random.default_rng(i).normal(size=(12, 4)), jnp.float32)}
         for i in range(3)]
_ADAPTER = {"dense": {"kernel": lora.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 5)), 2.0)}}


@pytest.mark.parametrize("fn", [
    lambda m: matrices.top_singular(m, 2, solver="gram"),
    lambda m: matrices.top_singular(m, 2, any_signs=True),
    matrices.polar,
    lambda m: subspace.opcm_project(m, 2.0 * m, 0.5),
    lambda m: subspace.ho_gsvd_factors(jnp.stack([m, 2.0 * m + 1.0])),
    lambda m: mergejax.tsv_c({"w": m}, [{"w": 2.0 * m}, {"w": m + 1.0}]).task_model(0),
    lambda m: mergejax.opcm_update(mergejax.opcm_init({"w": m}), {"w": 2.0 * m})[0],
    lambda m: lora.lora_svd([_ADAPTER, _ADAPTER], rank=2),
    lambda m: routing.exclusive_knowledge(_TALL[0], _TALL[1:], rank=2).mix(
        _TALL[0], jnp.ones(2)),
    lambda m: routing.exclusive_knowledge(_TALL[0], _TALL[1:], rank=2).dense(_TALL[0], 1),
], ids=["top_singular_gram", "top_singular_tall", "polar", "opcm_project",
        "ho_gsvd_factors", "tsv_c_task_model", "opcm_update", "lora_svd", "twin_mix",
        "twin_dense"])
def test_merge_helpers_run_their_matmuls_at_full_precision(fn):
    m = jnp.asarray(np.random.default_rng(0).normal(size=(12, 4)), jnp.float32)
    with jax.default_matmul_precision("bfloat16"):
        _assert_matmuls_at_highest(str(jax.make_jaxpr(fn)(m)))
