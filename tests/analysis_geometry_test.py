"""`mergejax.analysis.geometry` against NumPy references written here from the
definitions: cosines of flattened task vectors (Ilharco et al., arXiv 2212.04089), the
fraction of entries whose nonzero task-vector values have both signs (TIES-Merging's sign
conflicts, arXiv 2306.01708), per-leaf and per-layer L2 norms, and the weight
disentanglement error of Ortiz-Jimenez et al. (arXiv 2305.12827)
``sum_t mean_{x in D_t} dist(f(x; theta_0 + a_t tau_t), f(x; theta_0 + sum_t' a_t' tau_t'))``
of a small tanh network, recomputed in float64.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import floats, make_tree, x64
from matplotlib.figure import Figure

from mergejax import MergeError
from mergejax.analysis import (
    cosine_similarity_matrix,
    disentanglement_grid,
    norms_by_layer,
    plot_disentanglement,
    plot_similarity,
    sign_conflict_rate,
    weight_disentanglement_error,
)

SHAPES = {"embed": (4, 3), "layers_0/w": (3, 3), "layers_0/b": (3,), "layers_1/w": (3, 2),
          "head": (2,)}
LAYER_OF = {"embed": "other", "layers_0/w": "layer_0", "layers_0/b": "layer_0",
            "layers_1/w": "layer_1", "head": "other"}


def task_vector_trees(num: int, seed: int = 0, *, sparse: bool = True) -> list[dict]:
    """Random task vectors with many exact zeros (as after TIES's trimming)."""
    r = np.random.RandomState(seed)
    trees = []
    for _ in range(num):
        leaves = {p: r.randn(*s) * (r.rand(*s) < 0.5 if sparse else 1.0)
                  for p, s in SHAPES.items()}
        trees.append(make_tree(leaves, step=3))
    return trees


def np_flat(tree: dict) -> np.ndarray:
    return np.concatenate([v.ravel() for v in floats(tree).values()])


def test_cosine_similarity_matches_numpy():
    trees = task_vector_trees(3, sparse=False)
    vectors = np.stack([np_flat(t) for t in trees])
    norms = np.linalg.norm(vectors, axis=1)
    expected = vectors @ vectors.T / np.outer(norms, norms)
    got = cosine_similarity_matrix(trees)
    assert got.shape == (3, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with x64():
        trees64 = [make_tree(floats(t), step=0, dtype=jnp.float64) for t in trees]
        got64 = cosine_similarity_matrix(trees64)
        assert got64.dtype == np.float64
        np.testing.assert_allclose(got64, expected, rtol=1e-12, atol=1e-13)


def test_sign_conflict_rate_matches_numpy_count():
    trees = task_vector_trees(3, seed=1)
    leaves = [floats(t) for t in trees]
    conflicts, sizes = {}, {}
    for path in SHAPES:
        stack = np.stack([leaf[path] for leaf in leaves])
        conflicts[path] = int(((stack > 0).any(0) & (stack < 0).any(0)).sum())
        sizes[path] = stack[0].size
    assert 0 < sum(conflicts.values()) < sum(sizes.values())
    by_leaf = sign_conflict_rate(trees)
    assert set(by_leaf) == set(SHAPES)
    for path in SHAPES:
        assert by_leaf[path] == pytest.approx(conflicts[path] / sizes[path])
    by_layer = sign_conflict_rate(trees, by="layer")
    assert list(by_layer) == ["layer_0", "layer_1", "other"]
    for group in by_layer:
        members = [p for p in SHAPES if LAYER_OF[p] == group]
        assert by_layer[group] == pytest.approx(
            sum(conflicts[p] for p in members) / sum(sizes[p] for p in members))


def test_sign_conflict_by_hand():
    a = make_tree({"w": [1.0, -1.0, 0.0, 2.0, 0.0]}, step=0)
    b = make_tree({"w": [-1.0, -1.0, 3.0, 0.0, 0.0]}, step=0)
    c = make_tree({"w": [0.0, -2.0, 1.0, 0.0, 0.0]}, step=0)
    assert sign_conflict_rate([a, b]) == {"w": pytest.approx(1 / 5)}
    d = make_tree({"w": [0.0, 0.0, -1.0, -1.0, 0.0]}, step=0)
    assert sign_conflict_rate([a, b, c, d]) == {"w": pytest.approx(3 / 5)}


def test_norms_match_numpy():
    trees = task_vector_trees(2, seed=2)
    leaves = [floats(t) for t in trees]
    by_leaf = norms_by_layer(trees)
    assert set(by_leaf) == set(SHAPES)
    for path in SHAPES:
        expected = [np.linalg.norm(leaf[path]) for leaf in leaves]
        np.testing.assert_allclose(by_leaf[path], expected, rtol=1e-6)
    by_layer = norms_by_layer(trees, by="layer")
    for group, value in by_layer.items():
        members = [p for p in SHAPES if LAYER_OF[p] == group]
        expected = [np.sqrt(sum(np.sum(leaf[p] ** 2) for p in members)) for leaf in leaves]
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    single = norms_by_layer(trees[:1], by="layer")
    np.testing.assert_allclose(single["layer_1"], by_layer["layer_1"][:1])


# --- weight disentanglement --------------------------------------------------------------

def block_apply(params, x):
    """Linear in two disjoint blocks acting on disjoint input features."""
    return x[:, :2] @ params["a"] + x[:, 2:] @ params["b"]


def block_case():
    r = np.random.RandomState(3)
    base = make_tree({"a": r.randn(2, 3), "b": r.randn(2, 3)}, step=0)
    tau_1 = make_tree({"a": r.randn(2, 3), "b": np.zeros((2, 3))}, step=0)
    tau_2 = make_tree({"a": np.zeros((2, 3)), "b": r.randn(2, 3)}, step=0)
    x_1 = np.concatenate([r.randn(8, 2), np.zeros((8, 2))], axis=1)
    x_2 = np.concatenate([np.zeros((8, 2)), r.randn(8, 2)], axis=1)
    return base, [tau_1, tau_2], [jnp.asarray(x_1, jnp.float32), jnp.asarray(x_2, jnp.float32)]


def test_disentangled_blocks_have_zero_error():
    base, taus, inputs = block_case()
    squared = lambda u, v: jnp.sum((u - v) ** 2, axis=-1)  # noqa: E731
    for coefficients in (1.0, [0.5, -2.0], [3.0, 0.7]):
        assert weight_disentanglement_error(block_apply, base, taus, inputs,
                                            coefficients=coefficients) == 0.0
        assert weight_disentanglement_error(block_apply, base, taus, inputs,
                                            coefficients=coefficients,
                                            distance=squared) == 0.0
    grid = disentanglement_grid(block_apply, base, *taus, *inputs, np.linspace(-2, 2, 5))
    np.testing.assert_array_equal(grid, np.zeros((5, 5)))
    # the same inputs on the other task's features: no longer disentangled
    crossed = weight_disentanglement_error(block_apply, base, taus, inputs[::-1],
                                           distance=squared)
    assert crossed > 0


def mlp_apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def np_mlp(p, x):
    return np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def mlp_case():
    r = np.random.RandomState(4)
    shapes = {"w1": (3, 6), "b1": (6,), "w2": (6, 4)}
    base = {k: r.randn(*s) for k, s in shapes.items()}
    taus = [{k: 0.8 * r.randn(*s) for k, s in shapes.items()} for _ in range(2)]
    inputs = [r.randn(40, 3), r.randn(40, 3)]
    return base, taus, inputs


def np_xi(base, taus, inputs, alphas, dist):
    merged = {k: base[k] + sum(a * t[k] for a, t in zip(alphas, taus)) for k in base}
    total = 0.0
    for a, tau, x in zip(alphas, taus, inputs):
        single = {k: base[k] + a * tau[k] for k in base}
        total += np.mean(dist(np_mlp(single, x), np_mlp(merged, x)))
    return total


def np_prediction_error(u, v):
    return u.argmax(-1) != v.argmax(-1)


def test_disentanglement_error_matches_numpy_on_a_nonlinear_model():
    base, taus, inputs = mlp_case()
    with x64():
        jbase = make_tree(base, step=0, dtype=jnp.float64)
        jtaus = [make_tree(t, step=0, dtype=jnp.float64) for t in taus]
        jinputs = [jnp.asarray(x) for x in inputs]
        for alphas in ([1.0, 1.0], [0.7, -1.3]):
            expected = np_xi(base, taus, inputs, alphas, np_prediction_error)
            assert expected > 0
            got = weight_disentanglement_error(mlp_apply, jbase, jtaus, jinputs,
                                               coefficients=alphas)
            assert got == pytest.approx(expected, abs=1e-12)
        l2 = lambda u, v: np.linalg.norm(u - v, axis=-1)  # noqa: E731
        got = weight_disentanglement_error(
            mlp_apply, jbase, jtaus, jinputs, coefficients=[0.7, -1.3],
            distance=lambda u, v: jnp.linalg.norm(u - v, axis=-1))
        assert got == pytest.approx(np_xi(base, taus, inputs, [0.7, -1.3], l2), rel=1e-10)
        alphas = np.array([-1.0, 0.0, 0.5, 2.0])
        grid = disentanglement_grid(mlp_apply, jbase, *jtaus, *jinputs, alphas)
        for i, a1 in enumerate(alphas):
            for j, a2 in enumerate(alphas):
                assert grid[i, j] == pytest.approx(
                    np_xi(base, taus, inputs, [a1, a2], np_prediction_error), abs=1e-12)
        assert not np.allclose(grid, grid.T)      # orientation is tested, not symmetric
        assert grid[1, 1] == 0.0                   # alpha = 0: both models are the base


def test_plots_write_pngs(tmp_path):
    cos = cosine_similarity_matrix(task_vector_trees(3, sparse=False))
    fig = plot_similarity(cos, ["a", "b", "c"], path=str(tmp_path / "cos.png"))
    assert isinstance(fig, Figure)
    assert (tmp_path / "cos.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes[0].texts) == 9
    alphas = np.linspace(-1, 1, 3)
    fig = plot_disentanglement(np.arange(9.0).reshape(3, 3), alphas,
                               path=str(tmp_path / "xi.png"))
    assert isinstance(fig, Figure)
    assert (tmp_path / "xi.png").stat().st_size > 0


def test_bad_inputs():
    trees = task_vector_trees(2)
    for fn in (cosine_similarity_matrix, sign_conflict_rate):
        with pytest.raises(MergeError, match="at least 2"):
            fn(trees[:1])
        with pytest.raises(MergeError, match="sequence"):
            fn(trees[0])
    broken = make_tree({p: np.zeros(s) for p, s in SHAPES.items() if p != "head"}, step=3)
    with pytest.raises(MergeError, match="'head'"):
        sign_conflict_rate([trees[0], broken])
    reshaped = make_tree({**{p: np.ones(s) for p, s in SHAPES.items()},
                          "layers_1/w": np.ones((2, 3))}, step=3)
    with pytest.raises(MergeError, match="layers_1/w"):
        norms_by_layer([trees[0], reshaped])
    zero = make_tree({p: np.zeros(s) for p, s in SHAPES.items()}, step=3)
    with pytest.raises(MergeError, match=r"\[1\] are all zeros"):
        cosine_similarity_matrix([trees[0], zero])
    with pytest.raises(MergeError, match="'leaf' or 'layer'"):
        norms_by_layer(trees, by="block")
    with pytest.raises(MergeError, match="no floating leaves"):
        norms_by_layer([{"step": jnp.int32(1)}])
    base, taus, inputs = block_case()
    with pytest.raises(MergeError, match="at least 2"):
        weight_disentanglement_error(block_apply, base, taus[:1], inputs[:1])
    with pytest.raises(MergeError, match="2 input batches"):
        weight_disentanglement_error(block_apply, base, taus, inputs[:1])
    with pytest.raises(MergeError, match="coefficients"):
        weight_disentanglement_error(block_apply, base, taus, inputs, coefficients=[1.0])
    with pytest.raises(MergeError, match="distance"):
        weight_disentanglement_error(block_apply, base, taus, inputs, distance="kl")
    with pytest.raises(MergeError, match="labels"):
        plot_similarity(np.eye(2), ["a"])
    with pytest.raises(MergeError, match="shape"):
        plot_disentanglement(np.zeros((2, 3)), [0.0, 1.0])
