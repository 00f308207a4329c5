"""Spectral merges (TSV-M, TSV-C, Iso-C, Iso-CTS) against small, independent NumPy references.

The references below are written from the papers' definitions (arXiv 2412.00081 and
2502.04959) and the reference code's rank rules restated in ``notes/refs_spectral_a.md``;
none of it calls mergejax. They run in float64 on the exact (already rounded) inputs;
mergejax runs in float32 (rtol ~1e-4) or, inside ``x64()``, in float64 (rtol ~1e-9).

The test tree has three matrix leaves (a Dense kernel, a Flax attention query kernel seen as
(6, 10), an attention out kernel seen as (10, 6)), two non-matrix leaves (a bias, a 4-D conv
kernel) and an int32 step counter, which must come back from the base unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_tree, floats, make_tree, walk, x64

import mergejax
from mergejax import MergeError
from mergejax import method as method_lib
from mergejax.methods import matrices, spectral

SHAPES = {"dense/kernel": (6, 10), "dense/bias": (10,), "attn/query/kernel": (6, 2, 5),
          "attn/out/kernel": (2, 5, 6), "conv/kernel": (2, 2, 3, 4)}
SPLITS = {"dense/kernel": 1, "attn/query/kernel": 1, "attn/out/kernel": 2}
F32 = {"rtol": 2e-4, "atol": 2e-4}
F64 = {"rtol": 1e-9, "atol": 1e-9}


def setup_models(seed: int, k: int, dtype=jnp.float32, shapes=None):
    """A base tree and ``k`` fine-tunes of it (steps differ so pass-through is visible)."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    base = make_tree({p: rng.standard_normal(s) for p, s in shapes.items()}, 7, dtype)
    b = floats(base)
    models = [make_tree({p: b[p] + 0.5 * rng.standard_normal(s) for p, s in shapes.items()},
                        100 + i, dtype) for i in range(k)]
    return base, models


# ------------------------------------------------------------------ NumPy references


def np_polar(a):
    """The orthogonal polar factor of ``a``."""
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def top(m, r):
    """Top ``r`` singular triplets ``(U, s, V)`` of ``m``."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :r], s[:r], vt[:r].T


def ref_tsv_matrix(mats, fraction=None):
    """TSV-M (paper Sec. 4): per task its top r = int(k * fraction) triplets, concatenated;
    U and V replaced by their polar factors; U diag(S) V^T."""
    k = min(mats[0].shape)
    r = int(k * (1 / len(mats) if fraction is None else fraction))
    parts = [top(m, r) for m in mats]
    u = np_polar(np.concatenate([p[0] for p in parts], axis=1))
    v = np_polar(np.concatenate([p[2] for p in parts], axis=1))
    s = np.concatenate([p[1] for p in parts])
    return u @ np.diag(s) @ v.T


def ref_iso_c_matrix(mats):
    """Iso-C: the SVD of sum_t tau_t with every singular value replaced by their mean."""
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    return s.mean() * u @ vt


def ref_iso_cts_torch(mats, fraction):
    """Iso-CTS on (out, in) matrices: the common subspace (top c of the sum), each task's
    top n directions after removing the common output directions, polar factors, flat
    spectrum at the mean of all kept singular values."""
    k, n_tasks = min(mats[0].shape), len(mats)
    c = int(k * fraction)
    specific = round((k - c) / n_tasks) * n_tasks
    c, n = k - specific, specific // n_tasks
    uc, sc, vc = top(sum(mats), c)
    us, ss, vs = [], [], []
    for m in mats:
        if n:
            u, s, v = top(m - uc @ uc.T @ m, n)
            us.append(u)
            ss.append(s)
            vs.append(v)
    u = np_polar(np.concatenate(us + [uc], axis=1))
    v = np_polar(np.concatenate(vs + [vc], axis=1))
    return np.concatenate(ss + [sc]).mean() * u @ v.T


def ref_iso_cts_matrix(mats, fraction=0.8, layout="in_out"):
    if layout == "out_in":
        return ref_iso_cts_torch(mats, fraction)
    return ref_iso_cts_torch([m.T for m in mats], fraction).T


def as_matrix(x, split):
    return x.reshape(int(np.prod(x.shape[:split])), -1)


def ref_merge(b, xs, matrix_fn, scale=1.0, weights=None, splits=SPLITS):
    """theta_0 + scale * (matrix_fn of the task matrices on matrix leaves, the mean of
    the task vectors elsewhere); task vectors weighted first."""
    weights = np.ones(len(xs)) if weights is None else weights
    out = {}
    for p in b:
        taus = [w * (x[p] - b[p]) for w, x in zip(weights, xs)]
        if p in splits:
            merged = matrix_fn([as_matrix(t, splits[p]) for t in taus]).reshape(b[p].shape)
        else:
            merged = sum(taus) / len(taus)
        out[p] = b[p] + scale * merged
    return out


# ------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_tsv_m_matches_reference(solver):
    base, models = setup_models(0, 3)
    b, xs = floats(base), [floats(m) for m in models]
    w = np.array([1.0, 0.5, -0.8])
    out = spectral.tsv_m(base, models, scale=0.7, weights=list(w), solver=solver)
    check_tree(out, ref_merge(b, xs, ref_tsv_matrix, 0.7, w), base, **F32)


def test_tsv_m_float64_and_wide_concatenation():
    """x64: exact to 1e-9; sv_reduction=0.5 keeps 3 per task, K r = 9 > min(p, q) = 6."""
    with x64():
        base, models = setup_models(1, 3, jnp.float64)
        b, xs = floats(base), [floats(m) for m in models]
        check_tree(spectral.tsv_m(base, models, scale=1.3), ref_merge(
            b, xs, ref_tsv_matrix, 1.3), base, **F64)
        check_tree(spectral.tsv_m(base, models, sv_reduction=0.5), ref_merge(
            b, xs, lambda m: ref_tsv_matrix(m, 0.5)), base, **F64)


def test_tsv_m_one_task_full_rank_returns_the_task_vector():
    base, models = setup_models(2, 1)
    check_tree(spectral.tsv_m(base, models), floats(models[0]), base, **F32)


def test_tsv_factors_are_orthonormal_and_keep_the_top_values():
    rng = np.random.default_rng(3)
    taus = rng.standard_normal((3, 6, 10))
    u, s, v = (np.asarray(a, np.float64) for a in spectral.tsv_factors(
        jnp.asarray(taus, jnp.float32), 2))
    assert u.shape == (6, 6) and s.shape == (6,) and v.shape == (10, 6)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(s, np.concatenate([np.linalg.svd(t, compute_uv=False)[:2]
                                                  for t in taus]), rtol=1e-5)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, ref_tsv_matrix(list(taus)), **F32)


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_serial_and_batched_decompositions_agree(monkeypatch, solver):
    """SERIAL_LAPACK (old jaxlib) loops over the matrices; the batched path is one call."""
    taus = jnp.asarray(np.random.default_rng(16).standard_normal((2, 3, 6, 10)), jnp.float32)
    runs = []
    for serial in (True, False):
        monkeypatch.setattr(matrices, "SERIAL_LAPACK", serial)
        runs.append([np.asarray(x) for x in spectral.tsv_factors(taus, 2, solver=solver)])
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, **F32)
    u, s, v = runs[0]
    assert u.shape == (2, 6, 6) and s.shape == (2, 6) and v.shape == (2, 10, 6)
    np.testing.assert_allclose(u[1] @ np.diag(s[1]) @ v[1].T,
                               ref_tsv_matrix(list(np.asarray(taus[1], np.float64))), **F32)


# ------------------------------------------------------------------------- TSV-C


def ref_tsv_c_task(b, x, fraction):
    """TSV-C task model: each matrix replaced by its top int(k * fraction) triplets."""
    out = {}
    for p in b:
        tau = x[p] - b[p]
        if p in SPLITS:
            m = as_matrix(tau, SPLITS[p])
            u, s, v = top(m, int(min(m.shape) * fraction))
            tau = (u @ np.diag(s) @ v.T).reshape(tau.shape)
        out[p] = b[p] + tau
    return out


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_tsv_c_task_models_match_reference_and_store_low_rank_factors(solver):
    base, models = setup_models(4, 3)
    b, xs = floats(base), [floats(m) for m in models]
    result = spectral.tsv_c(base, models, solver=solver)
    assert isinstance(result, spectral.TaskSingularVectors) and result.num_tasks == 3
    u, s, v = (dict(walk(t)) for t in (result.u, result.s, result.v))
    assert u["dense/kernel"].shape == (3, 6, 2) and s["dense/kernel"].shape == (3, 2)
    assert v["dense/kernel"].shape == (3, 10, 2) and v["attn/out/kernel"].shape == (3, 6, 2)
    assert dict(walk(result.vectors))["conv/kernel"].shape == (3, 2, 2, 3, 4)
    models_out = result.task_models()
    for t in range(3):
        check_tree(models_out[t], ref_tsv_c_task(b, xs[t], 1 / 3), base, **F32)


def test_tsv_c_per_leaf_rules_registry_and_bf16():
    base, models = setup_models(5, 2, jnp.bfloat16)
    b, xs = floats(base), [floats(m) for m in models]
    assert mergejax.get_method("tsv_c") is spectral.tsv_c
    result = mergejax.merge("tsv_c", base, models,
                            sv_reduction=[("dense", 1.0), (".*", 0.5)],
                            matrix_split=[("attn/out", None), (".*", "auto")])
    assert dict(walk(result.vectors))["attn/out/kernel"].shape == (2, 2, 5, 6)
    full = ref_tsv_c_task(b, xs[1], 0.5)
    full["dense/kernel"] = xs[1]["dense/kernel"]
    full["attn/out/kernel"] = xs[1]["attn/out/kernel"]
    check_tree(result.task_model(1), full, base, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------- Iso-C / CTS


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_iso_c_matches_reference_and_has_a_flat_spectrum(solver):
    base, models = setup_models(6, 3)
    b, xs = floats(base), [floats(m) for m in models]
    check_tree(spectral.iso_c(base, models, scale=1.5, solver=solver), ref_merge(
        b, xs, ref_iso_c_matrix, 1.5), base, **F32)
    out = floats(spectral.iso_c(base, models, scale=1.0, solver=solver))
    for p, split in SPLITS.items():
        got = np.linalg.svd(as_matrix(out[p] - b[p], split), compute_uv=False)
        summed = as_matrix(sum(x[p] - b[p] for x in xs), split)
        np.testing.assert_allclose(got, np.full(6, np.linalg.svd(summed, compute_uv=False)
                                                .mean()), rtol=1e-4, err_msg=p)
    if solver == "svd":
        with x64():
            base, models = setup_models(6, 3, jnp.float64)
            b, xs = floats(base), [floats(m) for m in models]
            check_tree(spectral.iso_c(base, models, scale=1.5), ref_merge(
                b, xs, ref_iso_c_matrix, 1.5), base, **F64)


@pytest.mark.parametrize("solver,fraction", [("svd", 0.8), ("gram", 0.8), ("svd", 0.5),
                                             ("svd", 0.0)])
def test_iso_cts_matches_reference(solver, fraction):
    """k = 6, K = 3: 0.8 -> c = 3, n = 1; 0.5 -> c = 3, n = 1; 0.0 -> c = 0, n = 2."""
    base, models = setup_models(7, 3)
    b, xs = floats(base), [floats(m) for m in models]
    out = spectral.iso_cts(base, models, scale=1.2, common_space_fraction=fraction,
                           solver=solver)
    check_tree(out, ref_merge(b, xs, lambda m: ref_iso_cts_matrix(m, fraction), 1.2),
               base, **F32)


def test_iso_cts_float64_pytorch_layout_and_full_common_space():
    with x64():
        base, models = setup_models(8, 3, jnp.float64)
        b, xs = floats(base), [floats(m) for m in models]
        check_tree(spectral.iso_cts(base, models, kernel_layout="out_in"), ref_merge(
            b, xs, lambda m: ref_iso_cts_matrix(m, 0.8, "out_in")), base, **F64)
        check_tree(spectral.iso_cts(base, models, common_space_fraction=1.0),
                   floats(spectral.iso_c(base, models)), base, **F64)


def test_transposing_every_matrix_transposes_the_result():
    shapes = {"dense/kernel": (6, 10), "dense/bias": (10,)}
    base, models = setup_models(9, 3, shapes=shapes)

    def flip(t):
        return {**t, "dense": {**t["dense"], "kernel": t["dense"]["kernel"].T}}

    base_t, models_t = flip(base), [flip(m) for m in models]
    cases = [(spectral.tsv_m, {}, {}), (spectral.iso_c, {}, {}),
             (spectral.iso_cts, {}, {"kernel_layout": "out_in"})]
    for method, hp, hp_t in cases:
        out, out_t = method(base, models, **hp), method(base_t, models_t, **hp_t)
        np.testing.assert_allclose(out_t["dense"]["kernel"], out["dense"]["kernel"].T,
                                   **F32, err_msg=method.name)
        np.testing.assert_allclose(out_t["dense"]["bias"], out["dense"]["bias"], **F32)
    same_layout = spectral.iso_cts(base_t, models_t)["dense"]["kernel"]
    assert not np.allclose(same_layout, out["dense"]["kernel"].T, atol=1e-3)


def test_matrix_split_none_gives_the_mean_rule():
    base, models = setup_models(10, 3)
    b, xs = floats(base), [floats(m) for m in models]
    expected = ref_merge(b, xs, None, 0.5, splits={})
    for method in (spectral.tsv_m, spectral.iso_c, spectral.iso_cts):
        check_tree(method(base, models, scale=0.5, matrix_split=None), expected, base, **F32)
    partial = ref_merge(b, xs, ref_iso_c_matrix, 0.5,
                        splits={p: s for p, s in SPLITS.items() if p != "dense/kernel"})
    check_tree(spectral.iso_c(base, models, scale=0.5,
                              matrix_split=[("dense/kernel", None), (".*", "auto")]),
               partial, base, **F32)


# ------------------------------------------------------------- compiles, dtypes, registry

REFERENCES = {"tsv_m": ref_tsv_matrix, "iso_c": ref_iso_c_matrix,
              "iso_cts": ref_iso_cts_matrix}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_scale_sweep_does_not_recompile(name):
    base, models = setup_models(11, 3)
    b, xs = floats(base), [floats(m) for m in models]
    method = mergejax.get_method(name)
    check_tree(method(base, models, scale=0.8), ref_merge(b, xs, REFERENCES[name], 0.8),
               base, **F32)
    size = method_lib._run_kernels._cache_size()  # pylint: disable=protected-access
    for s in (0.2, 1, 3.0):
        check_tree(method(base, models, scale=s), ref_merge(b, xs, REFERENCES[name], s),
                   base, **F32)
    if name == "tsv_m":
        w = np.array([0.3, -1.0, 2.0])
        check_tree(method(base, models, weights=list(w), scale=0.8),
                   ref_merge(b, xs, REFERENCES[name], 0.8, w), base, **F32)
    assert method_lib._run_kernels._cache_size() == size  # pylint: disable=protected-access


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_bfloat16_in_bfloat16_out(name):
    base, models = setup_models(12, 3, jnp.bfloat16)
    b, xs = floats(base), [floats(m) for m in models]
    out = mergejax.merge(name, base, models, scale=1.0)
    check_tree(out, ref_merge(b, xs, REFERENCES[name]), base, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------- bad input

BAD = [
    ("tsv_m", {"sv_reduction": 0}, "sv_reduction must be None"),
    ("tsv_m", {"sv_reduction": 1.5}, "sv_reduction must be None"),
    ("tsv_m", {"sv_reduction": True}, "sv_reduction must be None"),
    ("tsv_m", {"sv_reduction": 0.1}, r"keeps int\(6 \* 0.1\) = 0 singular vectors"),
    ("tsv_m", {"solver": "qr"}, "solver must be one of"),
    ("tsv_m", {"matrix_split": 0}, "matrix_split at .* must be 'auto', None or a positive"),
    ("iso_c", {"matrix_split": 3}, r"matrix_split at 'attn/out/kernel' .*\[1, 2\]"),
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction must be in"),
    ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction must be in"),
    ("iso_cts", {"kernel_layout": "xy"}, "kernel_layout at .* must be one of"),
    ("iso_cts", {"solver": "lanczos"}, "solver must be one of .* at 'attn/out/kernel'"),
    ("iso_c", {"solver": None}, "solver must be one of"),
]


@pytest.mark.parametrize("name,hparams,match", BAD)
def test_bad_hyperparameters(name, hparams, match):
    base, models = setup_models(13, 3)
    with pytest.raises(MergeError, match=match):
        mergejax.merge(name, base, models, **hparams)


def test_bad_inputs():
    base, models = setup_models(14, 4)
    with pytest.raises(MergeError, match=r"rounds to 8 task-specific directions for 4 tasks"):
        spectral.iso_cts(base, models, common_space_fraction=0.0)
    small, small_models = setup_models(15, 4, shapes={"w": (3, 5)})
    with pytest.raises(MergeError, match=r"keeps int\(3 \* 0.25\) = 0 .* at 'w'"):
        spectral.tsv_m(small, small_models)
    with pytest.raises(MergeError, match=r"at 'w' .* matrix_split=None"):
        spectral.tsv_c(small, small_models)
    for name in ("tsv_m", "iso_c", "iso_cts", "tsv_c"):
        with pytest.raises(MergeError, match="needs a base"):
            mergejax.merge(name, None, models)
    with pytest.raises(MergeError, match="models is empty"):
        spectral.tsv_c(base, [])
    with pytest.raises(MergeError, match="sv_reduction must be None .* at 'dense/kernel'"):
        spectral.tsv_c(base, models, sv_reduction=[("dense/kernel", 2.0), (".*", None)])
    with pytest.raises(MergeError, match=r"solver must be one of \('svd', 'gram'\), got 'qr'$"):
        spectral.tsv_c(base, models, solver="qr")
    result = spectral.tsv_c(base, models)
    for t in (4, -1):
        with pytest.raises(MergeError, match=f"task index {t} out of range for 4 tasks"):
            result.task_model(t)
    with pytest.raises(MergeError, match="dtype"):
        spectral.tsv_c(base, [jax.tree.map(lambda x: x.astype(jnp.float16)
                                           if x.dtype == jnp.float32 else x, models[0])])
