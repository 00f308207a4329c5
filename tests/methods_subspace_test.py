"""KnOTS, HO-GSVD and OPCM against small, independent NumPy references.

The references follow the definitions in ``notes/refs_subspace.md`` in float64: KnOTS as the
official code (joint SVD of the concatenated updates, ``s > 1e-5``, TIES on ``diag(s) V_k``),
HO-GSVD through Ponnapalli et al.'s non-symmetric ``S`` (not Kempf's symmetric form that
mergejax uses), OPCM as FusionBench's ``OPCMForCLIP`` loop with its ``lambda_t`` bookkeeping
(not the telescoped form that mergejax uses). DARE masks are drawn with the documented
``stages.bernoulli_mask(mergejax.leaf_key(key, path), density, (r, in), stream=k)``.
Comparisons that depend on a magnitude ranking run with float64 enabled (`x64`).
Each tree has a Dense kernel, a bias, a 3-D convolution kernel (not a matrix), a 3-D attention
kernel (a matrix) and an int32 step counter that must come back unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, walk, x64

import mergejax
from mergejax import MergeError, PathRules
from mergejax import method as method_lib
from mergejax.method import LeafContext
from mergejax.methods import matrices, stages, subspace

SHAPES = {"dense/kernel": (6, 10), "dense/bias": (10,), "conv/kernel": (3, 2, 4),
          "attn/query/kernel": (6, 2, 3)}
PATHS = tuple(SHAPES)
MATRICES = ("dense/kernel", "attn/query/kernel")  # Flax (in, out) after a split at axis 1
KEY = jax.random.key(3)
F32 = {"rtol": 2e-5, "atol": 2e-5}
F64 = {"rtol": 1e-8, "atol": 1e-9}


def setup(seed: int, k: int, dtype=jnp.float32, shapes=SHAPES, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    b = {p: rng.standard_normal(s) for p, s in shapes.items()}
    models = [make_tree({p: b[p] + spread * rng.standard_normal(s) for p, s in shapes.items()},
                        100 + i, dtype) for i in range(k)]
    return make_tree(b, 7, dtype), models


def taus_of(base: dict, models: list[dict]) -> list[dict[str, np.ndarray]]:
    b = floats(base)
    return [{p: v - b[p] for p, v in floats(m).items()} for m in models]


def torch_mat(x: np.ndarray) -> np.ndarray:
    """(out, in) of a Flax kernel split at axis 1."""
    return x.reshape(x.shape[0], -1).T


def from_torch(m: np.ndarray, shape) -> np.ndarray:
    return m.T.reshape(shape)


# ------------------------------------------------------------------ NumPy references

def ref_ties(values: list[np.ndarray], density: float, elect: str, disjoint: str,
             masks: list[np.ndarray] | None = None) -> np.ndarray:
    """TIES as the KnOTS / TIES code: keep |x| >= the (d - int(d * density))-th smallest
    magnitude (everything for density 1), or the given DARE masks (kept / density); elect;
    disjoint mean or sum."""
    kept = []
    for i, v in enumerate(values):
        flat = v.reshape(-1)
        if masks is not None:
            kept.append(np.where(masks[i], v, 0.0) / density)
        elif density >= 1:
            kept.append(v)
        else:
            d = flat.size
            kth = np.sort(np.abs(flat))[d - int(d * density) - 1]
            kept.append(np.where(np.abs(v) >= kth, v, 0.0))
    total = sum(np.sign(x) for x in kept) if elect == "count" else sum(kept)
    sign = np.where(total >= 0, 1.0, -1.0)
    agree = [(np.sign(x) == sign) for x in kept]
    summed = sum(np.where(a, x, 0.0) for a, x in zip(agree, kept))
    if disjoint == "sum":
        return summed
    return summed / np.maximum(sum(a.astype(float) for a in agree), 1.0)


def ref_knots(base: dict, taus: list[dict], *, scale: float, merge: str = "ties",
              density: float = 0.2, elect: str = "mass", disjoint: str = "mean",
              key=None) -> dict:
    out = {}
    for p, b in base.items():
        ts = [t[p] for t in taus]
        if p not in MATRICES:
            masks = None
            if merge == "dare_ties":
                masks = [np.asarray(stages.bernoulli_mask(mergejax.leaf_key(key, p), density,
                                                          b.shape, stream=k))
                         for k in range(len(ts))]
            merged = (sum(ts) if merge == "task_arithmetic"
                      else ref_ties(ts, density, elect, disjoint, masks))
            out[p] = b + scale * merged
            continue
        ds = [torch_mat(t) for t in ts]
        n_out, n_in = ds[0].shape
        u, s, vh = np.linalg.svd(np.concatenate(ds, axis=1), full_matrices=False)
        flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
        u, vh = u * flip, vh * flip[:, None]  # svd_flip: each column's largest |u| > 0
        keep = s > 1e-5
        u, s, vh = u[:, keep], s[keep], vh[keep]
        blocks = [np.diag(s) @ vh[:, k * n_in:(k + 1) * n_in] for k in range(len(ds))]
        if merge == "task_arithmetic":
            merged = sum(blocks)
        else:
            masks = None
            if merge == "dare_ties":
                r = min(n_out, len(ds) * n_in)
                masks = [np.asarray(stages.bernoulli_mask(mergejax.leaf_key(key, p), density,
                                                          (r, n_in), stream=k))[:keep.sum()]
                         for k in range(len(ds))]
            merged = ref_ties(blocks, density, elect, disjoint, masks)
        out[p] = b + scale * from_torch(u @ merged, b.shape)
    return out


def ref_ho_gsvd(base: dict, taus: list[dict], *, merge: str, scale: float = 1.0) -> dict:
    """Ponnapalli et al.: V = eigenvectors of S = 1/(K(K-1)) sum_{i<j} (A_i A_j^-1 +
    A_j A_i^-1), B_k = D_k V^-T, sigma = column norms of B_k."""
    out = {}
    for p, b in base.items():
        ts = [t[p] for t in taus]
        if p not in MATRICES:
            out[p] = b + scale * (sum(ts) if merge == "sum" else sum(ts) / len(ts))
            continue
        ds = [torch_mat(t) for t in ts]
        k = len(ds)
        a = [d.T @ d for d in ds]
        s = sum(a[i] @ np.linalg.inv(a[j]) + a[j] @ np.linalg.inv(a[i])
                for i in range(k) for j in range(i + 1, k)) / (k * (k - 1))
        _, v = np.linalg.eig(s)
        v = np.real(v)
        bs = [d @ np.linalg.inv(v).T for d in ds]
        sigma = np.stack([np.linalg.norm(x, axis=0) for x in bs])
        if merge == "select":
            owner = np.argmax(sigma, axis=0)
            merged = np.stack([bs[owner[j]][:, j] for j in range(len(owner))], axis=1)
        else:
            share = sigma ** 2 / np.sum(sigma ** 2, axis=0)
            merged = sum(bs) * np.sum(share ** 2, axis=0)
        out[p] = b + scale * from_torch(merged @ v.T, b.shape)
    return out


def ref_opcm(base: dict, models: list[dict], *, alpha: float, scope: str,
             matrices=MATRICES) -> dict:
    """FusionBench's OPCMForCLIP loop (no shuffle): lambda bookkeeping, full SVD, diagonal
    and top-left block removed; norms over the whole model or, for scope="tensor", the
    same loop run on each leaf on its own."""
    if scope == "tensor":
        out = {}
        for p, b in base.items():
            out.update(ref_opcm({p: b}, [{p: m[p]} for m in models], alpha=alpha,
                                scope="global", matrices=matrices))
        return out

    def norm(tree):
        return np.sqrt(sum(np.sum(v * v) for v in tree.values()))

    merged = dict(models[0])
    norms = [norm({p: models[0][p] - base[p] for p in base})]
    lam_prev = 1.0
    for m in models[1:]:
        norms.append(norm({p: m[p] - base[p] for p in base}))
        avg = np.mean(norms)
        new = {}
        for p, b in base.items():
            prev, tau = merged[p] - b, m[p] - b
            if p in matrices:
                pm, tm = torch_mat(prev), torch_mat(tau)
                u, s, vh = np.linalg.svd(pm, full_matrices=True)
                v = vh.T
                split = int(np.argmax(np.cumsum(s) / np.sum(s) > alpha))
                proj = u.T @ tm @ v
                np.fill_diagonal(proj, 0.0)
                proj[:split, :split] = 0.0
                cleaned = from_torch(u @ proj @ v.T, b.shape)
                new[p] = b + (lam_prev * prev + cleaned) / 1.0
            else:
                new[p] = b + lam_prev * prev + tau
        n = norm({p: new[p] - base[p] for p in base})
        lam_prev = n / avg
        merged = {p: base[p] + (new[p] - base[p]) * (avg / n) for p in base}
    return merged


# ------------------------------------------------------------------ KnOTS

KNOTS_CASES = [
    {"merge": "ties", "density": 0.2},
    {"merge": "ties", "density": 0.5, "elect": "count", "disjoint": "sum"},
    {"merge": "dare_ties", "density": 0.9},
    {"merge": "task_arithmetic"},
]


@pytest.mark.parametrize("case,k", [(c, 3) for c in KNOTS_CASES] + [(KNOTS_CASES[0], 2)],
                         ids=lambda c: f"{c['merge']}{len(c)}" if isinstance(c, dict) else c)
def test_knots_matches_reference(case, k):
    with x64():
        base, models = setup(k, k, jnp.float64)
        key = KEY if case["merge"] == "dare_ties" else None
        out = mergejax.merge("knots", base, models, scale=0.7, key=key, **case)
        expected = ref_knots(floats(base), taus_of(base, models), scale=0.7, key=key,
                             **{"density": 1.0, **case})
        check_tree(out, expected, base, **F64)


def test_knots_default_density_is_the_official_configs():
    with x64():
        base, models = setup(5, 3, jnp.float64)
        b, taus = floats(base), taus_of(base, models)
        check_tree(mergejax.merge("knots", base, models),
                   ref_knots(b, taus, scale=1.0, density=0.2), base, **F64)
        check_tree(mergejax.merge("knots", base, models, merge="dare_ties", key=KEY),
                   ref_knots(b, taus, scale=1.0, merge="dare_ties", density=0.9, key=KEY),
                   base, **F64)


def test_knots_drops_components_below_rank_tol_and_counts_density_on_the_rest():
    """Rank-2 updates (as LoRA's Delta W = B A): the joint SVD has rank 2K, and the top-k
    count is taken over those components only, as the official code."""
    with x64():
        rng = np.random.default_rng(11)
        shapes = {"dense/kernel": (12, 16)}
        b = {"dense/kernel": rng.standard_normal((12, 16))}
        base = make_tree(b, 7, jnp.float64)
        models = [make_tree({"dense/kernel": b["dense/kernel"]
                             + rng.standard_normal((12, 2)) @ rng.standard_normal((2, 16))},
                            i, jnp.float64) for i in range(3)]
        out = mergejax.merge("knots", base, models, density=0.3)
        taus = taus_of(base, models)
        ds = [torch_mat(t["dense/kernel"]) for t in taus]
        u, s, vh = np.linalg.svd(np.concatenate(ds, axis=1), full_matrices=False)
        assert int(np.sum(s > 1e-5)) == 6 < len(s)
        blocks = [np.diag(s[:6]) @ vh[:6, k * 12:(k + 1) * 12] for k in range(3)]
        merged = ref_ties(blocks, 0.3, "mass", "mean")
        expected = {"dense/kernel": b["dense/kernel"] + from_torch(u[:, :6] @ merged,
                                                                   shapes["dense/kernel"])}
        check_tree(out, expected, base, **F64)
        # rank=3 keeps only the top 3 joint components
        out3 = mergejax.merge("knots", base, models, merge="task_arithmetic", rank=3)
        low = u[:, :3] @ np.diag(s[:3]) @ vh[:3]
        expected3 = b["dense/kernel"] + sum(from_torch(low[:, k * 12:(k + 1) * 12], (12, 16))
                                            for k in range(3))
        check_tree(out3, {"dense/kernel": expected3}, base, **F64)


@pytest.mark.parametrize("hp", [{"merge": "ties", "density": 1.0},
                                {"merge": "task_arithmetic"}], ids=["ties", "ta"])
def test_knots_of_one_task_is_that_task_vector_times_scale(hp):
    base, models = setup(21, 1)
    out = mergejax.merge("knots", base, models, scale=0.6, **hp)
    (tau,) = taus_of(base, models)
    check_tree(out, {p: v + 0.6 * tau[p] for p, v in floats(base).items()}, base, **F32)


def test_knots_task_arithmetic_is_task_arithmetic():
    base, models = setup(22, 3)
    out = mergejax.merge("knots", base, models, merge="task_arithmetic", scale=0.4)
    check_tree(out, floats(mergejax.task_arithmetic(base, models, scale=0.4)), base, **F32)


# ------------------------------------------------------------------ HO-GSVD

@pytest.mark.parametrize("merge", ["participation", "select"])
def test_ho_gsvd_matches_ponnapalli_reference(merge):
    with x64():
        base, models = setup(31, 3, jnp.float64)
        out = mergejax.merge("ho_gsvd", base, models, merge=merge, scale=0.9, pi=1e-12,
                             ridge=1e-15)
        expected = ref_ho_gsvd(floats(base), taus_of(base, models), merge=merge, scale=0.9)
        check_tree(out, expected, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("merge,combine", [("sum", lambda ts: sum(ts)),
                                           ("mean", lambda ts: sum(ts) / len(ts))])
def test_ho_gsvd_linear_rules_reconstruct_exactly(merge, combine):
    """The decomposition is exact at the default pi and ridge, also for rank-deficient
    (LoRA-like) task matrices."""
    rng = np.random.default_rng(32)
    b = {p: rng.standard_normal(s) for p, s in SHAPES.items()}
    low = {p: (rng.standard_normal((s[0], 1)) @ rng.standard_normal((1, int(np.prod(s[1:])))))
           .reshape(s) for p, s in SHAPES.items()}
    base = make_tree(b, 7)
    models = [make_tree({p: b[p] + (k + 1) * low[p] + (0.3 * rng.standard_normal(s)
                                                        if p != "dense/kernel" else 0.0)
                         for p, s in SHAPES.items()}, k) for k in range(3)]
    out = mergejax.merge("ho_gsvd", base, models, merge=merge, scale=0.5)
    taus = taus_of(base, models)
    expected = {p: v + 0.5 * combine([t[p] for t in taus]) for p, v in floats(base).items()}
    check_tree(out, expected, base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merge,k", [("participation", 1), ("participation", 3),
                                     ("select", 3), ("mean", 3)])
def test_ho_gsvd_of_identical_tasks_is_the_task_vector(merge, k):
    base, (model,) = setup(33, 1)
    out = mergejax.merge("ho_gsvd", base, [model] * k, merge=merge)
    check_tree(out, floats(model), base, rtol=1e-4, atol=1e-4)


def test_ho_gsvd_keeps_a_direction_one_task_owns_and_averages_a_shared_one():
    """Two tasks on orthogonal input directions plus one shared direction: the owned
    directions are kept whole, the shared one averaged."""
    e = np.eye(4)
    shared = np.outer([1.0, 2.0, 0.5], e[2])
    d1 = np.outer([1.0, -1.0, 2.0], e[0]) + shared
    d2 = np.outer([2.0, -1.0, 0.0], e[1]) + shared  # both orthogonal to the shared column
    base = make_tree({"w": np.zeros((4, 3))}, 0)
    models = [make_tree({"w": d.T}, i) for i, d in enumerate((d1, d2))]  # Flax (in, out)
    out = mergejax.merge("ho_gsvd", base, models)
    expected = np.outer([1.0, -1.0, 2.0], e[0]) + np.outer([2.0, -1.0, 0.0], e[1]) + shared
    check_tree(out, {"w": expected.T}, base, rtol=1e-4, atol=1e-4)


def test_ho_gsvd_of_updates_with_independent_row_spaces_keeps_every_direction():
    """LoRA-like rank-2 updates whose row spaces are independent: every input direction is
    owned by one task (the isolated eigenvalue is degenerate), so participation and select
    keep each whole: task arithmetic."""
    rng = np.random.default_rng(34)
    base = make_tree({"w": rng.standard_normal((9, 5))}, 0)
    models = [make_tree({"w": floats(base)["w"]
                         + (rng.standard_normal((2, 9)).T @ rng.standard_normal((2, 5)))},
                        k) for k in range(3)]  # Flax (in=9, out=5): rows of D_k in R^9
    expected = floats(mergejax.task_arithmetic(base, models, scale=1.0))
    for merge in ("participation", "select"):
        out = mergejax.merge("ho_gsvd", base, models, merge=merge)
        check_tree(out, expected, base, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ OPCM

@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("alpha,k", [(0.5, 3), (0.3, 4), (0.9, 2)])
def test_opcm_matches_fusionbench_loop(scope, alpha, k):
    with x64():
        base, models = setup(40 + k, k, jnp.float64)
        out = mergejax.merge("opcm", base, models, alpha=alpha, scope=scope)
        expected = ref_opcm(floats(base), [floats(m) for m in models], alpha=alpha,
                            scope=scope)
        check_tree(out, expected, base, **F64)


def test_opcm_matrix_split_rule_projects_only_the_chosen_leaves():
    with x64():
        base, models = setup(45, 3, jnp.float64)
        rules = PathRules([("attn/.*", None), (".*", "auto")])
        out = mergejax.merge("opcm", base, models, matrix_split=rules)
        expected = ref_opcm(floats(base), [floats(m) for m in models], alpha=0.5,
                            scope="global", matrices=("dense/kernel",))
        check_tree(out, expected, base, **F64)


def test_opcm_of_one_model_is_that_model():
    base, models = setup(46, 1)
    check_tree(mergejax.merge("opcm", base, models), floats(models[0]), base, rtol=0, atol=0)
    state = subspace.opcm_init(base)
    state, merged = subspace.opcm_update(state, models[0])
    check_tree(merged, floats(models[0]), base, **F32)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_opcm_streaming_equals_batch(scope):
    base, models = setup(47, 4)
    rules = PathRules([("conv/.*", None), (".*", "auto")])
    state = subspace.opcm_init(base)
    for i, m in enumerate(models):
        state, merged = subspace.opcm_update(state, m, alpha=0.4, scope=scope,
                                             matrix_split=rules)
        if i in (1, 3):
            batch = mergejax.merge("opcm", base, models[:i + 1], alpha=0.4, scope=scope,
                                   matrix_split=rules)
            check_tree(merged, floats(batch), base, **F32)
    assert int(state.count) == 4
    assert jax.tree.structure(state) == jax.tree.structure(subspace.opcm_init(base))


def test_opcm_update_jits_once_for_every_alpha():
    base, models = setup(48, 2)
    state = subspace.opcm_init(base)
    state, _ = subspace.opcm_update(state, models[0], alpha=0.5)
    size = subspace._opcm_step._cache_size()  # pylint: disable=protected-access
    for a in (0.1, 0.7, 1.0):
        _, merged = subspace.opcm_update(state, models[1], alpha=a)
        expected = ref_opcm(floats(base), [floats(m) for m in models], alpha=a, scope="global")
        check_tree(merged, expected, base, **F32)
    assert subspace._opcm_step._cache_size() == size  # pylint: disable=protected-access


# ------------------------------------------------------------------ shared properties

T_SHAPES = {"dense/kernel": (6, 10), "dense/bias": (10,), "conv/kernel": (3, 2, 4)}


def _transposed(tree: dict) -> dict:
    return jax.tree.map(lambda x: x.T, tree)


@pytest.mark.parametrize("name,hp", [
    ("knots", {"density": 0.3}),
    ("knots", {"merge": "dare_ties", "key": KEY}),
    ("ho_gsvd", {}),
    ("opcm", {}),
])
def test_transposing_every_kernel_transposes_the_result(name, hp):
    """Flax (in, out) kernels with kernel_layout="in_out" and PyTorch (out, in) weights
    with "out_in" give the same merge (OPCM has no input side). DARE's masks follow the
    entries' order, so its tree has no 3-D leaf."""
    shapes = ({p: s for p, s in T_SHAPES.items() if len(s) < 3} if "key" in hp
              else T_SHAPES)
    with x64():
        base, models = setup(50, 3, jnp.float64, shapes=shapes)
        layout = {} if name == "opcm" else {"kernel_layout": "out_in"}
        out = mergejax.merge(name, base, models, **hp)
        out_t = mergejax.merge(name, _transposed(base), [_transposed(m) for m in models],
                               **hp, **layout)
        check_tree(out_t, {p: v.T for p, v in floats(out).items()}, _transposed(base), **F64)


CASES = {
    "knots": lambda base, ms, s: mergejax.merge("knots", base, ms, scale=s),
    "ho_gsvd": lambda base, ms, s: mergejax.merge("ho_gsvd", base, ms, scale=s, merge="sum"),
    "opcm": lambda base, ms, s: mergejax.merge("opcm", base, ms, alpha=s),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_coefficient_sweep_compiles_once(name):
    """scale (alpha for OPCM) is traced: a sweep runs the first compiled program."""
    base, models = setup(52, 3)
    b, taus = floats(base), taus_of(base, models)
    references = {
        "knots": lambda s: None,
        "ho_gsvd": lambda s: {p: v + s * sum(t[p] for t in taus) for p, v in b.items()},
        "opcm": lambda s: ref_opcm(b, [floats(m) for m in models], alpha=s, scope="global"),
    }
    first = floats(CASES[name](base, models, 0.8))
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for s in (0.2, 0.45, 1.0):
        out = CASES[name](base, models, s)
        expected = references[name](s)
        if expected is None:  # knots is linear in scale
            expected = {p: b[p] + (first[p] - b[p]) * s / 0.8 for p in b}
        check_tree(out, expected, base, rtol=1e-4, atol=1e-4)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


BF16 = {
    "knots": ({"merge": "task_arithmetic", "scale": 0.5},
              lambda b, taus: {p: v + 0.5 * sum(t[p] for t in taus) for p, v in b.items()}),
    "ho_gsvd": ({"merge": "mean"},
                lambda b, taus: {p: v + sum(t[p] for t in taus) / 3 for p, v in b.items()}),
    "opcm": ({}, None),
}


@pytest.mark.parametrize("name", sorted(BF16))
def test_bf16_in_bf16_out(name):
    base, models = setup(53, 3, jnp.bfloat16)
    hp, reference = BF16[name]
    out = mergejax.merge(name, base, models, **hp)
    for path, leaf in walk(out):
        assert jnp.result_type(leaf) == (jnp.int32 if path == "step" else jnp.bfloat16), path
    b = floats(base)
    expected = (ref_opcm(b, [floats(m) for m in models], alpha=0.5, scope="global")
                if reference is None else reference(b, taus_of(base, models)))
    check_tree(out, expected, base, rtol=2e-2, atol=2e-2)
    default = mergejax.merge(name, base, models, **({"key": KEY} if name == "knots" else {}))
    assert all(jnp.result_type(v) == jnp.bfloat16 for p, v in walk(default) if p != "step")


@pytest.mark.parametrize("name,hp", [("knots", {"merge": "dare_ties"}), ("ho_gsvd", {}),
                                     ("opcm", {"scope": "tensor"})])
def test_kernels_are_vmappable(name, hp):
    """The engine will batch same-shaped leaves with jax.vmap: the batched kernel must
    equal the kernel run on each leaf."""
    method = mergejax.get_method(name)
    rng = np.random.default_rng(54)
    base = jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
    models = tuple(base + jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
                   for _ in range(3))
    coefficient = "alpha" if name == "opcm" else "scale"
    statics = {k: v for k, v in method.hparams.items() if k != coefficient}
    statics.update(hp)
    ctx = LeafContext("dense/kernel", mergejax.leaf_key(KEY, "dense/kernel"), (), 60)

    def run(b, ms, c):
        return method.kernel(ctx, b, ms, **statics, **{coefficient: c})

    batched = jax.jit(jax.vmap(run))(base, models, jnp.asarray([0.5, 0.7]))
    for i, c in enumerate((0.5, 0.7)):
        single = jax.jit(run)(base[i], tuple(m[i] for m in models), jnp.asarray(c))
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------ bad input

BAD = [
    ("knots", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0 at 'attn/query"),
    ("knots", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    ("knots", {"merge": "magmax"}, (r"merge must be one of \('ties', 'dare_ties', "
                                    r"'task_arithmetic'\), got 'magmax'")),
    ("knots", {"elect": "sum"}, r"elect must be one of \('mass', 'count'\)"),
    ("knots", {"disjoint": "max"}, r"disjoint must be one of \('mean', 'sum'\)"),
    ("knots", {"topk": "all"}, r"topk must be one of"),
    ("knots", {"kernel_layout": "oi"}, r"kernel_layout at '.*' must be one of"),
    ("knots", {"rank": 0}, r"rank must be None or a positive int, got 0"),
    ("knots", {"rank": 2.5}, r"rank must be None or a positive int, got 2.5"),
    ("knots", {"rank": 7}, (r"rank 7 is larger than the 6 components of the joint SVD "
                            r"of 3 6x6 task matrices at 'attn/query/kernel'")),
    ("knots", {"rank_tol": -1.0}, r"rank_tol must be a finite number >= 0, got -1.0"),
    ("knots", {"merge": "dare_ties"}, r"merge='dare_ties' is random: pass key="),
    ("knots", {"matrix_split": "rows"}, (r"matrix_split at '.*' must be 'auto', None or a "
                                          r"positive int, got 'rows'")),
    ("ho_gsvd", {"merge": "ties"}, (r"merge must be one of \('participation', 'select', "
                                    r"'mean', 'sum'\), got 'ties'")),
    ("ho_gsvd", {"pi": 0.0}, r"pi must be a finite number > 0, got 0.0"),
    ("ho_gsvd", {"ridge": -1e-3}, r"ridge must be a finite number > 0, got -0.001"),
    ("ho_gsvd", {"kernel_layout": "io"}, r"kernel_layout at '.*' must be one of"),
    ("opcm", {"scope": "layer"}, r"scope must be one of \('global', 'tensor'\), got 'layer'"),
    ("opcm", {"scope": PathRules([("dense/.*", "tensor"), (".*", "global")])},
     r"scope must be the same for every leaf"),
    ("opcm", {"matrix_split": 4}, (r"matrix_split at 'attn/query/kernel' must be 'auto', None "
                                   r"or an int in \[1, 2\] for shape \(6, 2, 3\), got 4")),
]


@pytest.mark.parametrize("name,hp,message", BAD, ids=[f"{n}-{min(h)}" for n, h, _ in BAD])
def test_bad_input_is_rejected(name, hp, message):
    base, models = setup(60, 3)
    with pytest.raises(MergeError, match=message):
        mergejax.merge(name, base, models, **hp)


def test_bad_streaming_input_is_rejected():
    base, models = setup(61, 2)
    state = subspace.opcm_init(base)
    with pytest.raises(MergeError, match=r"scope must be one of \('global', 'tensor'\)"):
        subspace.opcm_update(state, models[0], scope="model")
    other, _ = setup(62, 1, shapes={"dense/kernel": (6, 10)})
    with pytest.raises(MergeError):
        subspace.opcm_update(state, other)
    with pytest.raises(MergeError, match=r"matrix_split at 'attn/query/kernel' must be 'auto', "
                                         r"None or an int in \[1, 2\]"):
        subspace.opcm_update(state, models[0], matrix_split=5)


def test_knots_does_not_depend_on_the_svd_sign_convention(monkeypatch):
    """A count election's zero sum elects +1, so a component whose signs flip (LAPACK's and
    cuSolver's conventions differ: on an H100 this case moved entries by up to 0.96)
    would change the result; knots fixes each component's signs first."""
    case = KNOTS_CASES[1]  # elect="count": ties where two kept entries disagree
    with x64():
        base, models = setup(3, 3, jnp.float64)
        want = mergejax.merge("knots", base, models, scale=0.7, **case)
        svd = matrices.svd

        def flipped(m, **kwargs):
            u, s, v = svd(m, **kwargs)
            signs = jnp.where(jnp.arange(s.shape[-1]) % 2 == 0, -1.0, 1.0).astype(u.dtype)
            return u * signs, s, v * signs

        monkeypatch.setattr(matrices, "svd", flipped)
        jax.clear_caches()  # retrace with the flipping SVD
        got = mergejax.merge("knots", base, models, scale=0.7, **case)
    got = dict(walk(got))
    for path, leaf in walk(want):
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=path)
