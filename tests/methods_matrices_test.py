"""The shared matrix helpers of the spectral and data-free methods (`mergejax.methods.matrices`)
against NumPy: which leaves are matrices, the layouts, and the decompositions (both the
batched path and the one-call-per-matrix path used with jaxlib < 0.11.2)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import MergeError
from mergejax.methods import matrices


def np_polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


@pytest.mark.parametrize("path,shape,expected", [
    ("dense/kernel", (6, 10), 1),
    ("embed/embedding", (100, 8), 1),
    ("dense/bias", (10,), None),
    ("attn/query/bias", (2, 5), None),
    ("norm/scale", (3, 4), None),
    ("attn/query/kernel", (6, 2, 5), 1),
    ("attn/value/kernel", (6, 2, 5), 1),
    ("attn/out/kernel", (2, 5, 6), 2),
    ("conv/kernel", (2, 2, 3, 4), None),
    ("mlp/other3d", (2, 3, 4), None),
])
def test_auto_matrix_split(path, shape, expected):
    assert matrices.matrix_split(path, shape, "auto") == expected


def test_explicit_matrix_split_and_errors():
    assert matrices.matrix_split("conv/kernel", (2, 2, 3, 4), 3) == 3
    assert matrices.matrix_split("dense/kernel", (6, 10), None) is None
    for bad in (0, 2, True, "1"):
        with pytest.raises(MergeError, match="matrix_split at 'dense/kernel'"):
            matrices.matrix_split("dense/kernel", (6, 10), bad)
    with pytest.raises(MergeError, match="kernel_layout must be one of"):
        matrices.torch_view(jnp.ones((2, 3)), "oi")


def test_as_matrix_and_layouts():
    x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    np.testing.assert_array_equal(matrices.as_matrix(jnp.asarray(x), 2), x.reshape(10, 6))
    m = jnp.asarray(x.reshape(10, 6))
    np.testing.assert_array_equal(matrices.torch_view(m, "in_out"), x.reshape(10, 6).T)
    np.testing.assert_array_equal(matrices.torch_view(m, "out_in"), x.reshape(10, 6))
    np.testing.assert_array_equal(
        matrices.from_torch_view(matrices.torch_view(m, "in_out"), "in_out"), m)


@pytest.fixture(params=[False, True], ids=["batched", "serial"])
def serial(request, monkeypatch):
    monkeypatch.setattr(matrices, "SERIAL_LAPACK", request.param)
    return request.param


@pytest.mark.parametrize("any_signs", [False, True])
@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5)])
def test_svd_and_polar(serial, shape, any_signs):
    a = np.random.default_rng(sum(shape)).standard_normal((2, 3, *shape)).astype(np.float32)
    u, s, v = (np.asarray(x) for x in matrices.svd(jnp.asarray(a), any_signs=any_signs))
    r = min(shape)
    assert u.shape == (2, 3, shape[0], r) and v.shape == (2, 3, shape[1], r)
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u @ (s[..., None] * np.swapaxes(v, -1, -2)), a, atol=1e-5)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, np.broadcast_to(np.eye(r), u.shape[:2]
                                                                           + (r, r)), atol=1e-5)
    got = np.asarray(matrices.polar(jnp.asarray(a)))
    expected = np.stack([[np_polar(m) for m in row] for row in a.astype(np.float64)])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(matrices.polar(jnp.array([[2.0, 0.0], [0.0, -3.0]])),
                               [[1, 0], [0, -1]], atol=1e-6)


@pytest.mark.parametrize("solver,any_signs", [("svd", False), ("svd", True), ("gram", False)])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_top_singular_matches_numpy(serial, solver, any_signs, shape):
    """Moderately conditioned matrices (the gram solver's documented regime); with
    ``any_signs`` these long matrices take the QR-first path."""
    rng = np.random.default_rng(3)
    p, q = shape
    k = min(p, q)
    u0, _ = np.linalg.qr(rng.standard_normal((4, p, k)))
    v0, _ = np.linalg.qr(rng.standard_normal((4, q, k)))
    sv = np.linspace(4.0, 1.0, k)
    a = (u0 * sv[None, None]) @ np.swapaxes(v0, -1, -2)
    u, s, v = (np.asarray(x, np.float64)
               for x in matrices.top_singular(jnp.asarray(a, jnp.float32), 3, solver=solver,
                                              any_signs=any_signs))
    np.testing.assert_allclose(s, np.broadcast_to(sv[:3], (4, 3)), rtol=1e-4)
    rank3 = (u0[..., :3] * sv[:3]) @ np.swapaxes(v0[..., :3], -1, -2)
    np.testing.assert_allclose((u * s[..., None, :]) @ np.swapaxes(v, -1, -2), rank3,
                               atol=1e-4)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, np.broadcast_to(np.eye(3), (4, 3, 3)),
                               atol=1e-4)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_top_singular_of_rank_deficient_long_matrices(serial, shape):
    """Below ``s_r = RECOVERY_MIN_RATIO s_1`` the long side's vectors cannot be recovered as
    ``m V / S``: a matrix of rank 2 < r = 3 and a zero matrix still get orthonormal U and V
    and the top-3 truncation."""
    rng = np.random.default_rng(5)
    p, q = shape
    rank2 = rng.standard_normal((p, 2)) @ rng.standard_normal((2, q))
    well = rng.standard_normal((p, q))
    for batch in (np.stack([well, rank2]), np.stack([well, np.zeros((p, q))])):
        u, s, v = (np.asarray(x, np.float64) for x in matrices.top_singular(
            jnp.asarray(batch, jnp.float32), 3, any_signs=True))
        for side in (u, v):
            assert np.isfinite(side).all()
            np.testing.assert_allclose(np.swapaxes(side, -1, -2) @ side,
                                       np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-5)
        nu, ns, nvt = np.linalg.svd(batch, full_matrices=False)
        np.testing.assert_allclose(s, ns[:, :3], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose((u * s[..., None, :]) @ np.swapaxes(v, -1, -2),
                                   (nu[..., :3] * ns[:, None, :3]) @ nvt[:, :3], atol=1e-5)


def test_top_singular_errors():
    with pytest.raises(MergeError, match=r"rank 6 is outside \[1, 5\] for a 5x8 matrix"):
        matrices.top_singular(jnp.ones((5, 8)), 6)
    with pytest.raises(MergeError, match="solver must be 'svd' or 'gram', got 'qr'"):
        matrices.top_singular(jnp.ones((5, 8)), 2, solver="qr")


def test_eigh_cholesky_inv(serial):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6, 6))
    spd = (x @ np.swapaxes(x, -1, -2) + 6 * np.eye(6)).astype(np.float32)
    w, q = (np.asarray(t, np.float64) for t in matrices.eigh(jnp.asarray(spd)))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(spd.astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose((q * w[..., None, :]) @ np.swapaxes(q, -1, -2), spd, atol=1e-4)
    lower = np.asarray(matrices.cholesky(jnp.asarray(spd)), np.float64)
    np.testing.assert_allclose(lower, np.linalg.cholesky(spd.astype(np.float64)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(matrices.inv(jnp.asarray(spd))),
                               np.linalg.inv(spd.astype(np.float64)), rtol=1e-4, atol=1e-6)
