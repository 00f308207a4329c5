"""LoRA adapter merging (`mergejax.lora`) against NumPy references written in PEFT's
orientation from the definitions (LoRA arXiv 2106.09685: ``Delta W = (alpha / r) B A``
with ``A (r, in)``, ``B (out, r)``; PEFT ``add_weighted_adapter`` for ``cat``/``svd``;
LoraHub arXiv 2307.13269 for the element-wise composition). The references never see the
Flax-oriented canonical form, so every comparison also checks the orientation rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import x64

import mergejax
from mergejax import MergeError, lora
from mergejax import method as method_lib
from mergejax.lora import LoraFactors

F32 = {"rtol": 2e-5, "atol": 2e-5}
MODULES = {"enc.q": (10, 6), "enc.v": (8, 8)}  # (in, out)


def peft_state(rng: np.random.Generator, ranks: dict[str, int]) -> dict[str, np.ndarray]:
    """A flat PEFT state dict: lora_A.weight (r, in), lora_B.weight (out, r)."""
    sd = {}
    for name, (n_in, n_out) in MODULES.items():
        r = ranks[name]
        sd[f"{name}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        sd[f"{name}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
    return sd


def setup(seed: int, ranks=({"enc.q": 3, "enc.v": 2}, {"enc.q": 3, "enc.v": 4}),
          alphas=(6.0, 4.0)):
    """PEFT state dicts (float64 copies for references), their scalings and adapters."""
    rng = np.random.default_rng(seed)
    sds = [peft_state(rng, r) for r in ranks]
    scalings = [{m: a / r[m] for m in MODULES} for a, r in zip(alphas, ranks)]
    adapters = [lora.from_peft(sd, alpha=a) for sd, a in zip(sds, alphas)]
    sds64 = [{k: v.astype(np.float64) for k, v in sd.items()} for sd in sds]
    return sds64, scalings, adapters


def factors(sd: dict, m: str) -> tuple[np.ndarray, np.ndarray]:
    return sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]


def ref_delta(sd: dict, s: float, m: str) -> np.ndarray:
    """PEFT get_delta_weight: scaling * B @ A, (out, in)."""
    a, b = factors(sd, m)
    return s * b @ a


def leaf(tree: dict, m: str):
    node = tree
    for part in m.split("."):
        node = node[part]
    return node


def torch_factors(f: LoraFactors) -> tuple[np.ndarray, np.ndarray, float]:
    """(lora_A (r, in), lora_B (out, r), scaling) of a canonical leaf."""
    return (np.asarray(f.a, np.float64).T, np.asarray(f.b, np.float64).T,
            float(np.asarray(f.scaling)))


def out_in_delta(tree: dict, m: str) -> np.ndarray:
    a, b, s = torch_factors(leaf(tree, m))
    return s * b @ a


# ------------------------------------------------------------------- conversion, delta


def test_from_peft_orientation_and_scaling():
    sds, scalings, adapters = setup(0)
    for sd, sc, ad in zip(sds, scalings, adapters):
        for m, (n_in, n_out) in MODULES.items():
            f = leaf(ad, m)
            r = sd[f"{m}.lora_A.weight"].shape[0]
            assert f.a.shape == (n_in, r) and f.b.shape == (r, n_out)
            assert f.scaling == pytest.approx(sc[m])
            delta = lora.lora_delta(ad)
            np.testing.assert_allclose(np.asarray(leaf(delta, m)).T, ref_delta(sd, sc[m], m),
                                       **F32)
            np.testing.assert_allclose(
                np.asarray(leaf(lora.lora_delta(ad, layout="out_in"), m)),
                ref_delta(sd, sc[m], m), **F32)
    rs = lora.from_peft(peft_state(np.random.default_rng(1), {"enc.q": 4, "enc.v": 4}),
                        alpha=8.0, use_rslora=True)
    assert rs["enc"]["q"].scaling == pytest.approx(8.0 / 2.0)
    fixed = lora.from_peft(peft_state(np.random.default_rng(1), {"enc.q": 4, "enc.v": 2}),
                           scaling=0.5)
    assert fixed["enc"]["v"].scaling == 0.5


def test_from_peft_nested_weight_dicts_and_embeddings():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 7)), rng.standard_normal((5, 2))  # (r, num), (dim, r)
    tree = {"emb": {"lora_embedding_A": {"weight": a}, "lora_embedding_B": {"weight": b}}}
    f = lora.from_peft(tree, alpha=4.0)["emb"]
    # PEFT's embedding delta is transpose(B @ A) * scaling: the (num, dim) table
    np.testing.assert_allclose(np.asarray(lora.lora_delta({"e": f})["e"]), 2.0 * (b @ a).T,
                               **F32)


def test_to_peft_roundtrip():
    sds, scalings, adapters = setup(3)
    out = lora.to_peft(adapters[0])
    assert set(out) == set(sds[0])
    for m in MODULES:
        a, b = factors(sds[0], m)
        np.testing.assert_allclose(out[f"{m}.lora_A.weight"], a, **F32)
        np.testing.assert_allclose(out[f"{m}.lora_B.weight"], scalings[0][m] * b, **F32)
    again = lora.from_peft(out, scaling=1.0)
    for m in MODULES:
        np.testing.assert_allclose(out_in_delta(again, m), ref_delta(sds[0], scalings[0][m], m),
                                   **F32)


def test_delta_keeps_bf16_dense_and_integer_leaves():
    rng = np.random.default_rng(4)
    tree = {"w": LoraFactors(jnp.asarray(rng.standard_normal((6, 2)), jnp.bfloat16),
                             jnp.asarray(rng.standard_normal((2, 5)), jnp.bfloat16), 0.5),
            "bias": jnp.ones(5, jnp.bfloat16), "step": jnp.asarray(3, jnp.int32)}
    out = lora.lora_delta(tree)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (6, 5)
    a = np.asarray(tree["w"].a, np.float64)
    b = np.asarray(tree["w"].b, np.float64)
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), 0.5 * a @ b, rtol=2e-2,
                               atol=2e-2)
    assert out["bias"].dtype == jnp.bfloat16 and int(out["step"]) == 3


def test_batched_factors():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 2, 4))  # 3 stacked layers
    ad = {"layers": LoraFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 2.0)}
    np.testing.assert_allclose(np.asarray(lora.lora_delta(ad)["layers"]),
                               2.0 * np.einsum("lir,lro->lio", a, b), **F32)
    svd = lora.lora_svd([ad, ad], weights=[0.5, 0.5], rank=2)
    np.testing.assert_allclose(np.asarray(lora.lora_delta(svd)["layers"]),
                               2.0 * np.einsum("lir,lro->lio", a, b), **F32)


# ------------------------------------------------------------------------ concat, svd


def test_concat_is_peft_cat_and_exact():
    sds, scalings, adapters = setup(6)
    w = [0.7, -0.4]
    out = lora.lora_concat(adapters, weights=w)
    for m in MODULES:
        a_cat = np.concatenate([wi * sc[m] * factors(sd, m)[0]
                                for wi, sc, sd in zip(w, scalings, sds)], 0)
        b_cat = np.concatenate([factors(sd, m)[1] for sd in sds], 1)
        a, b, s = torch_factors(leaf(out, m))
        assert s == 1.0
        np.testing.assert_allclose(a, a_cat, **F32)
        np.testing.assert_allclose(b, b_cat, **F32)
        exact = sum(wi * ref_delta(sd, sc[m], m) for wi, sc, sd in zip(w, scalings, sds))
        np.testing.assert_allclose(out_in_delta(out, m), exact, **F32)


def ref_svd(sds, scalings, w, m, r):
    """PEFT svd combination (each update counted once): B' = U_r S_r, A' = Vh_r."""
    total = sum(wi * ref_delta(sd, sc[m], m) for wi, sc, sd in zip(w, scalings, sds))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return u[:, :r] * s[:r], vh[:r], s[:r]


def align(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``ours`` (rows = singular directions) with each row's sign matched to ``ref``."""
    signs = np.sign(np.sum(ours * ref, axis=1, keepdims=True))
    return ours * signs, signs


@pytest.mark.parametrize("rank", [1, 3, "max"])
def test_svd_matches_numpy(rank):
    sds, scalings, adapters = setup(7)
    w = [0.6, 0.9]
    out = lora.lora_svd(adapters, weights=w, rank=rank)
    for m in MODULES:
        r = {"enc.q": 3, "enc.v": 4}[m] if rank == "max" else rank  # "max": largest rank
        b_ref, a_ref, _ = ref_svd(sds, scalings, w, m, r)
        a, b, s = torch_factors(leaf(out, m))
        assert a.shape == a_ref.shape and s == 1.0
        a_al, signs = align(a, a_ref)
        np.testing.assert_allclose(a_al, a_ref, **F32)
        np.testing.assert_allclose(b * signs.T, b_ref, **F32)
        np.testing.assert_allclose(out_in_delta(out, m), b_ref @ a_ref, **F32)


def test_svd_balanced_split_and_per_leaf_rank():
    sds, scalings, adapters = setup(8)
    out = lora.lora_svd(adapters, rank=[(r"q$", 2), (r"v$", 3)], factors="balanced")
    for m, r in (("enc.q", 2), ("enc.v", 3)):
        b_ref, a_ref, s_ref = ref_svd(sds, scalings, [1.0, 1.0], m, r)
        a, b, _ = torch_factors(leaf(out, m))
        np.testing.assert_allclose(a @ a.T, np.diag(s_ref), **F32)  # sqrt(S) on each side
        np.testing.assert_allclose(b.T @ b, np.diag(s_ref), rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose(b @ a, b_ref @ a_ref, rtol=2e-5, atol=1e-4)


def test_svd_clamp_is_peft_quantile():
    _, _, adapters = setup(9)
    free = lora.lora_svd(adapters, rank=2)
    clamped = lora.lora_svd(adapters, rank=2, clamp=0.9)
    for m in MODULES:
        a, b, _ = torch_factors(leaf(free, m))
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.9)
        a_c, b_c, _ = torch_factors(leaf(clamped, m))
        np.testing.assert_allclose(a_c, np.clip(a, -hi, hi), **F32)
        np.testing.assert_allclose(b_c, np.clip(b, -hi, hi), **F32)
        assert not np.allclose(b_c, b)


def test_one_adapter_at_its_own_rank_is_reproduced():
    sds, scalings, adapters = setup(10)
    for merged in (lora.lora_svd(adapters[:1]),
                   lora.lora_merge(adapters[:1], "task_arithmetic", rank="max"),
                   lora.lora_merge(adapters[:1], "linear", rank=[(r"q$", 3), (r"v$", 2)])):
        for m in MODULES:
            assert leaf(merged, m).a.shape[-1] == (3 if m == "enc.q" else 2)
            np.testing.assert_allclose(out_in_delta(merged, m),
                                       ref_delta(sds[0], scalings[0][m], m), **F32)


# --------------------------------------------------------- merges through the registry


def test_merge_task_arithmetic_and_linear():
    sds, scalings, adapters = setup(11)
    w, lam = [0.5, 2.0], 0.3
    ta = lora.lora_merge(adapters, "task_arithmetic", weights=w, scale=lam, layout="out_in")
    mean = lora.lora_merge(adapters, "linear")
    via_registry = mergejax.merge("lora_linear", None, adapters, weights=w, scale=lam)
    for m in MODULES:
        deltas = [ref_delta(sd, sc[m], m) for sd, sc in zip(sds, scalings)]
        np.testing.assert_allclose(np.asarray(leaf(ta, m)),
                                   lam * (w[0] * deltas[0] + w[1] * deltas[1]), **F32)
        np.testing.assert_allclose(np.asarray(leaf(via_registry, m)).T,
                                   lam * (w[0] * deltas[0] + w[1] * deltas[1]), **F32)
        np.testing.assert_allclose(np.asarray(leaf(mean, m)).T, (deltas[0] + deltas[1]) / 2,
                                   **F32)


def ref_ties_full_density(deltas: list[np.ndarray]) -> np.ndarray:
    """TIES with nothing trimmed: sign of the sum, mean of the agreeing non-zero entries."""
    stack = np.stack(deltas)
    sign = np.sign(stack.sum(0))
    agree = (np.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0)
    return np.where(count > 0, (stack * agree).sum(0) / np.maximum(count, 1), 0.0)


def test_merge_ties_on_deltas_and_refactorise():
    sds, scalings, adapters = setup(12)
    merged = lora.lora_merge(adapters, "ties", density=1.0)
    low = lora.lora_merge(adapters, "ties", density=1.0, rank=2, layout="out_in")
    for m in MODULES:
        ref = ref_ties_full_density([ref_delta(sd, sc[m], m) for sd, sc in zip(sds, scalings)])
        np.testing.assert_allclose(np.asarray(leaf(merged, m)).T, ref, **F32)
        u, s, vh = np.linalg.svd(ref)
        np.testing.assert_allclose(out_in_delta(low, m), (u[:, :2] * s[:2]) @ vh[:2], **F32)


def test_orientation_does_not_change_results():
    """The same adapters built from PEFT dicts and directly in the Flax orientation give
    the same results; transposing every adapted weight (in <-> out) transposes them."""
    sds, scalings, adapters = setup(13)
    flax_built = [{"enc": {m.split(".")[1]: LoraFactors(
        jnp.asarray(factors(sd, m)[0].T, jnp.float32),
        jnp.asarray(factors(sd, m)[1].T, jnp.float32), sc[m]) for m in MODULES}}
        for sd, sc in zip(sds, scalings)]
    swapped = [jax.tree.map(lambda f: LoraFactors(f.b.T, f.a.T, f.scaling), ad,
                            is_leaf=lambda x: isinstance(x, LoraFactors)) for ad in adapters]
    w = [0.4, 1.1]
    for fn in (lambda ads: lora.lora_svd(ads, weights=w, rank=2),
               lambda ads: lora.lora_concat(ads, weights=w),
               lambda ads: lora.lora_merge(ads, weights=w, rank=3),
               lambda ads: lora.lora_merge(ads, weights=w, rank=3, layout="out_in")):
        first, second, third = (lora.lora_delta(fn(a)) for a in (adapters, flax_built, swapped))
        for m in MODULES:
            np.testing.assert_allclose(leaf(first, m), leaf(second, m), **F32)
            np.testing.assert_allclose(np.asarray(leaf(third, m)), np.asarray(leaf(first, m)).T,
                                       **F32)
    dense_in = lora.lora_merge(adapters, weights=w)
    dense_out = lora.lora_merge(adapters, weights=w, layout="out_in")
    for m in MODULES:
        np.testing.assert_allclose(np.asarray(leaf(dense_out, m)),
                                   np.asarray(leaf(dense_in, m)).T, **F32)


def test_dense_and_integer_leaves():
    def adapter(seed):
        r = np.random.default_rng(seed)
        return {"w": LoraFactors(jnp.asarray(r.standard_normal((5, 2)), jnp.float32),
                                 jnp.asarray(r.standard_normal((2, 4)), jnp.float32), 1.0),
                "bias": jnp.asarray(r.standard_normal(4), jnp.float32),
                "step": jnp.asarray(seed, jnp.int32)}

    ads = [adapter(1), adapter(2)]
    w = [0.25, 2.0]
    expected_bias = 0.25 * np.asarray(ads[0]["bias"]) + 2.0 * np.asarray(ads[1]["bias"])
    for out in (lora.lora_concat(ads, w), lora.lora_svd(ads, w, rank=2),
                lora.lora_merge(ads, weights=w, rank=2), lora.lora_combine(ads, w)):
        np.testing.assert_allclose(np.asarray(out["bias"]), expected_bias, **F32)
        assert int(out["step"]) == 1


# -------------------------------------------------------------- combine and LoraHub


def test_combine_is_elementwise_composition():
    sds, scalings, adapters = setup(15, ranks=({"enc.q": 3, "enc.v": 2},) * 2)
    w = np.array([0.8, -0.3])
    out = lora.lora_combine(adapters, w)
    for m in MODULES:
        roots = [np.sqrt(sc[m]) for sc in scalings]
        a = sum(wi * r * factors(sd, m)[0] for wi, r, sd in zip(w, roots, sds))
        b = sum(wi * r * factors(sd, m)[1] for wi, r, sd in zip(w, roots, sds))
        np.testing.assert_allclose(out_in_delta(out, m), b @ a, **F32)
    # PEFT "linear" (sqrt(w_i s_i) on both factors) is combine with weights sqrt(w_i)
    peft_w = np.array([0.5, 0.2])
    peft = lora.lora_combine(adapters, np.sqrt(peft_w))
    for m in MODULES:
        coef = [np.sqrt(wi * sc[m]) for wi, sc in zip(peft_w, scalings)]
        a = sum(c * factors(sd, m)[0] for c, sd in zip(coef, sds))
        b = sum(c * factors(sd, m)[1] for c, sd in zip(coef, sds))
        np.testing.assert_allclose(out_in_delta(peft, m), b @ a, **F32)


def planted(seed: int, k: int = 4):
    """Adapters and a quadratic loss in w whose minimum is at w_star (factor targets)."""
    rng = np.random.default_rng(seed)
    adapters = [{"w": LoraFactors(jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
                                  jnp.asarray(rng.standard_normal((2, 5)), jnp.float32),
                                  float(s))} for s in rng.uniform(0.5, 2.0, k)]
    w_star = np.array([0.9, -0.6, 0.0, 0.4])[:k]
    roots = [np.sqrt(ad["w"].scaling) for ad in adapters]
    a_star = sum(wi * r * np.asarray(ad["w"].a) for wi, r, ad in zip(w_star, roots, adapters))
    b_star = sum(wi * r * np.asarray(ad["w"].b) for wi, r, ad in zip(w_star, roots, adapters))

    def loss(ad):
        return jnp.sum((ad["w"].a - a_star) ** 2) + jnp.sum((ad["w"].b - b_star) ** 2)

    def loss_np(w):
        a = sum(wi * r * np.asarray(ad["w"].a, np.float64)
                for wi, r, ad in zip(w, roots, adapters))
        b = sum(wi * r * np.asarray(ad["w"].b, np.float64)
                for wi, r, ad in zip(w, roots, adapters))
        return float(np.sum((a - a_star) ** 2) + np.sum((b - b_star) ** 2))

    return adapters, w_star, loss, loss_np


def test_lorahub_recovers_planted_weights():
    adapters, w_star, loss, loss_np = planted(16)
    res = lora.lorahub(adapters, loss, key=jax.random.key(0), steps=320, l1=0.0,
                       vectorized=True)
    np.testing.assert_allclose(res.weights, w_star, atol=2e-2)
    assert float(res.loss) < 1e-3 * loss_np(np.zeros(4))
    assert float(res.loss) == pytest.approx(loss_np(np.asarray(res.weights)), rel=1e-3,
                                            abs=1e-6)
    popsize = 4 + int(3 * np.log(4))
    assert res.losses.shape == (-(-320 // popsize) * popsize,)
    assert float(res.loss) == pytest.approx(float(np.min(res.losses)))
    np.testing.assert_allclose(np.asarray(res.adapter["w"].a),
                               np.asarray(lora.lora_combine(adapters, res.weights)["w"].a))


def test_lorahub_default_budget_improves_and_modes_agree():
    adapters, _, loss, loss_np = planted(17)
    res = lora.lorahub(adapters, loss, key=jax.random.key(1))  # the paper's 40 evaluations
    init = loss_np(np.zeros(4))  # w = 0: the l1 term is 0 too
    w = np.asarray(res.weights)
    assert float(res.loss) == pytest.approx(loss_np(w) + 0.05 * np.mean(np.abs(w)), rel=1e-4)
    assert float(res.loss) < 0.7 * init
    assert np.all(np.abs(w) <= 1.5)
    loop = lora.lorahub(adapters, lambda ad: float(loss(ad)), key=jax.random.key(1))
    vec = lora.lorahub(adapters, loss, key=jax.random.key(1), vectorized=True)
    np.testing.assert_allclose(loop.weights, res.weights)
    np.testing.assert_allclose(vec.losses, loop.losses, rtol=1e-5, atol=1e-6)
    via_registry = mergejax.merge("lorahub", None, adapters, loss_fn=loss,
                                  key=jax.random.key(1))
    np.testing.assert_allclose(via_registry.weights, res.weights)


# ----------------------------------------------------- compilation, jit, dtype, registry


def test_weight_sweeps_do_not_recompile():
    _, _, adapters = setup(18)
    lora.lora_svd(adapters, weights=[1.0, 1.0], rank=2)
    lora.lora_concat(adapters, weights=[1.0, 1.0])
    mergejax.merge("lora_linear", None, adapters, weights=[1.0, 1.0], scale=1.0)
    # pylint: disable=protected-access
    compiled = (lora._svd_all, lora._concat_all, method_lib._run_kernels)
    sizes = [f._cache_size() for f in compiled]
    for w in ([0.2, 0.5], [3.0, -1.0]):
        lora.lora_svd(adapters, weights=w, rank=2)
        lora.lora_concat(adapters, weights=w)
        mergejax.merge("lora_linear", None, adapters, weights=w, scale=w[0])
    assert sizes == [f._cache_size() for f in compiled]


def test_jit_and_grad_through_combine_weights():
    _sds, _scalings, adapters = setup(19, ranks=({"enc.q": 3, "enc.v": 2},) * 2)

    @jax.jit
    def energy(w):
        delta = lora.lora_delta(lora.lora_combine(adapters, w))
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(delta))

    w = jnp.array([0.3, 0.7])
    grad = jax.grad(energy)(w)
    eps = 1e-3
    for i in range(2):
        e = np.eye(2)[i] * eps
        fd = (float(energy(w + e)) - float(energy(w - e))) / (2 * eps)
        assert float(grad[i]) == pytest.approx(fd, rel=2e-2)


@pytest.mark.parametrize("fn", [
    lambda ads: lora.lora_svd(ads, rank=2),
    lambda ads: lora.lora_concat(ads),
    lambda ads: lora.lora_combine(ads, [0.5, 0.5]),
    lambda ads: lora.lora_merge(ads, "task_arithmetic", weights=[0.5, 1.0], rank=2),
])
def test_bf16_in_bf16_out(fn):
    _, _, adapters = setup(20, ranks=({"enc.q": 3, "enc.v": 2},) * 2)
    bf = [jax.tree.map(lambda x: x.astype(jnp.bfloat16) if hasattr(x, "dtype") else x, ad)
          for ad in adapters]
    ref = lora.lora_delta(fn(adapters))
    out = fn(bf)
    for m in MODULES:
        f = leaf(out, m)
        assert f.a.dtype == jnp.bfloat16 and f.b.dtype == jnp.bfloat16
        d = leaf(lora.lora_delta(out), m)
        assert d.dtype == jnp.bfloat16
        scale = float(np.max(np.abs(leaf(ref, m))))
        np.testing.assert_allclose(np.asarray(d, np.float32), leaf(ref, m), atol=0.05 * scale)


def test_float64_svd_is_exact():
    with x64():
        sds, scalings, _ = setup(21)
        adapters = [lora.from_peft({k: v for k, v in sd.items()}, alpha=a)
                    for sd, a in zip(sds, (6.0, 4.0))]
        out = lora.lora_svd(adapters, weights=[0.3, 0.6], rank=2)
        for m in MODULES:
            b_ref, a_ref, _ = ref_svd(sds, scalings, [0.3, 0.6], m, 2)
            np.testing.assert_allclose(out_in_delta(out, m), b_ref @ a_ref, rtol=1e-10,
                                       atol=1e-11)


def test_registry_entries():
    names = mergejax.list_methods()
    for name in ("lora_linear", "lora_concat", "lora_svd", "lorahub"):
        assert name in names
        method = mergejax.get_method(name)
        assert method.family == "lora" and not method.needs_base and method.paper
    assert mergejax.get_method("lora_svd").hparams == {
        "weights": None, "rank": "max", "factors": "peft", "clamp": None}
    _, _, adapters = setup(22)
    cat = mergejax.merge("lora_concat", None, adapters, weights=[1.0, 2.0])
    np.testing.assert_allclose(leaf(lora.lora_delta(cat), "enc.q"),
                               leaf(lora.lora_delta(lora.lora_concat(adapters, [1.0, 2.0])),
                                    "enc.q"))


# ------------------------------------------------------------------------- bad input


def bad_pair():
    return {"w": LoraFactors(jnp.zeros((6, 3)), jnp.zeros((2, 5)))}


def good(n_in=6, n_out=5, r=2, lead=()):
    return {"w": LoraFactors(jnp.ones(lead + (n_in, r)), jnp.ones(lead + (r, n_out)))}


@pytest.mark.parametrize("call,match", [
    (lambda: lora.lora_svd([bad_pair()]),
     r"do not fit: a \(6, 3\) has rank 3 \(last axis\) but b \(2, 5\) has 2 rows"),
    (lambda: lora.lora_concat([{"w": LoraFactors(jnp.zeros((2, 6, 3)), jnp.zeros((3, 3, 5)))}]),
     "different leading"),
    (lambda: lora.lora_concat([{"w": LoraFactors(jnp.zeros(6), jnp.zeros(5))}]),
     r"must be a \(..., in, r\)"),
    (lambda: lora.lora_svd([good(), good(n_in=7)]),
     (r"adapters\[1\] at 'w' adapts a \(7, 5\) \(..., in, out\) weight, adapters\[0\] a "
     r"\(6, 5\) one")),
    (lambda: lora.lora_svd([good()], rank=6),
     r"rank 6 at 'w' is larger than min\(in, out\) = 5 of its \(6, 5\) weight"),
    (lambda: lora.lora_merge([good()], rank=9),
     r"lora_merge: rank 9 at 'w' is larger than min\(in, out\) = 5"),
    (lambda: lora.lora_svd([good()], rank=0), "rank at 'w' must be a positive int or 'max'"),
    (lambda: lora.lora_svd([good()], rank=2.5), "rank at 'w' must be a positive int"),
    (lambda: lora.lora_combine([good(r=2), good(r=3)], [1.0, 1.0]),
     r"same rank; at 'w' the ranks are \[2, 3\]"),
    (lambda: lora.lora_combine([{"w": LoraFactors(jnp.ones((6, 2)), jnp.ones((2, 5)), -1.0)}],
                               [1.0]), "scaling of adapters\\[0\\] at 'w' must be positive"),
    (lambda: lora.lora_concat([good(), {"w": jnp.zeros((6, 5))}]),
     r"adapters\[1\] has a dense array at 'w' where adapters\[0\] has LoRA factors"),
    (lambda: lora.lora_concat([good(), {"v": good()["w"]}]),
     (r"adapters\[1\] does not have the structure of adapters\[0\]: missing \['w'\]; "
     r"unexpected \['v'\]")),
    (lambda: lora.lora_concat([{"b": jnp.zeros(3)}, {"b": jnp.zeros(4)}]),
     r"shape mismatch at 'b': adapters\[0\] has \(3,\), adapters\[1\] has \(4,\)"),
    (lambda: lora.lora_concat([good(), good()], weights=[1.0]),
     r"weights of shape \(1,\) for 2 adapters"),
    (lambda: lora.lora_concat([]), "adapters is empty"),
    (lambda: lora.lora_concat(good()), "adapters must be a list"),
    (lambda: lora.lora_svd([{"q": {"lora_A": jnp.zeros((2, 6)), "lora_B": jnp.zeros((5, 2))}}]),
     (r"adapters\[0\] is in PEFT layout \('q/lora_A'\); convert it with "
     r"mergejax.lora.from_peft")),
    (lambda: lora.lora_svd([good()], factors="sqrt"), "factors must be one of"),
    (lambda: lora.lora_svd([good()], clamp=1.5), r"clamp must be None or a quantile"),
    (lambda: lora.lora_delta(good(), layout="io"), "kernel_layout must be one of"),
    (lambda: lora.lora_concat([{"w": LoraFactors(jnp.ones((6, 2)), jnp.ones((2, 5)),
                                                 jnp.ones(2))}]),
     "scaling of adapters\\[0\\] at 'w' must be a scalar"),
    (lambda: lora.lora_concat([{"w": LoraFactors(jnp.ones((6, 2), jnp.int32),
                                                 jnp.ones((2, 5), jnp.int32))}]),
     "LoRA factor a of adapters\\[0\\] at 'w' must be floating"),
    (lambda: lora.lora_merge([good()], "lora_svd"), "takes adapters itself"),
    (lambda: lora.lora_merge([good()], "no_such_method"), "unknown merge method"),
    (lambda: lora.from_peft({"q.lora_A.weight": np.zeros((2, 6))}, alpha=4.0),
     "from_peft: 'q' has no lora_B"),
    (lambda: lora.from_peft({"q.lora_A.weight": np.zeros((2, 6)),
                             "q.lora_B.weight": np.zeros((5, 2))}),
     "needs exactly one of alpha="),
    (lambda: lora.from_peft({"head.weight": np.zeros((3, 3))}, alpha=1.0),
     "'head.weight' is not a LoRA factor"),
    (lambda: lora.from_peft({"c.lora_A.weight": np.zeros((2, 3, 1, 1)),
                             "c.lora_B.weight": np.zeros((4, 2, 1, 1))}, alpha=1.0),
     "only 2-D factors are supported"),
    (lambda: lora.to_peft({"w": jnp.zeros(3)}), "'w' is a dense leaf"),
    (lambda: mergejax.merge("lora_svd", {"w": jnp.zeros((6, 5))}, [good()]),
     "pass base=None and the adapters as models"),
    (lambda: mergejax.merge("lora_svd", None, [good()], density=0.5),
     r"lora_svd got unknown hyperparameter\(s\) \['density'\]"),
    (lambda: mergejax.merge("lorahub", None, [good()]), "lorahub needs loss_fn="),
    (lambda: lora.lorahub([good()], lambda ad: 0.0, key=jax.random.key(0), steps=0),
     "steps must be a positive int"),
    (lambda: lora.lorahub([good()], lambda ad: 0.0, key=jax.random.key(0), init=[2.0]),
     r"x0\[0\] = 2.0 lies outside the bounds \[-1.5, 1.5\]"),
])
def test_bad_input(call, match):
    with pytest.raises(MergeError, match=match):
        call()


def test_lora_from_delta_is_the_truncated_svd_of_each_kernel():
    rng = np.random.default_rng(5)
    delta = {"dense": {"kernel": rng.normal(size=(12, 7)).astype(np.float32),
                       "bias": rng.normal(size=(7,)).astype(np.float32)},
             "attn": {"bias": rng.normal(size=(3, 4)).astype(np.float32)},
             "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
             "steps": np.int32(3)}
    adapter = lora.lora_from_delta(delta, rank=3)
    f = adapter["dense"]["kernel"]
    assert isinstance(f, LoraFactors) and f.a.shape == (12, 3) and f.b.shape == (3, 7)
    u, s, vt = np.linalg.svd(delta["dense"]["kernel"].astype(np.float64), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]  # Eckart-Young: the best rank-3 approximation
    np.testing.assert_allclose(np.asarray(lora.lora_delta(adapter)["dense"]["kernel"]), best,
                               rtol=1e-4, atol=1e-5)
    for path in (("dense", "bias"), ("attn", "bias"), ("conv", "kernel")):  # stay dense
        np.testing.assert_array_equal(adapter[path[0]][path[1]], delta[path[0]][path[1]])
    assert adapter["steps"] == 3
    full = lora.lora_from_delta(delta, rank=100)  # capped at min(in, out): exact
    assert full["dense"]["kernel"].a.shape == (12, 7)
    np.testing.assert_allclose(np.asarray(lora.lora_delta(full)["dense"]["kernel"]),
                               delta["dense"]["kernel"], rtol=1e-4, atol=1e-5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(MergeError, match="rank"):
            lora.lora_from_delta(delta, rank=bad)


def test_one_number_weights_every_adapter():
    _, _, adapters = setup(11)
    for fn in (lora.lora_concat, lora.lora_svd):
        same = fn(adapters, weights=0.3)
        listed = fn(adapters, weights=[0.3, 0.3])
        for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(listed)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(MergeError, match="one per adapter"):
        lora.lora_svd(adapters, weights=[0.3, 0.3, 0.3])
