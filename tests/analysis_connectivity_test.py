"""`mergejax.analysis.connectivity` against NumPy references written here from the
definitions: the interpolation ``(1 - t) a + t b`` (Frankle et al. 2020, arXiv
1912.05671), the loss barrier ``max_t [L(theta_t) - ((1 - t) L_a + t L_b)]`` (Entezari et
al., arXiv 2110.06296; flipped for accuracy), and a small two-layer model evaluated along
the path in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import make_tree
from matplotlib.figure import Figure

from mergejax import MergeError
from mergejax.analysis import (
    ConnectivityCurve,
    barrier,
    connectivity_curve,
    interpolate,
    loss_barrier,
    plot_connectivity,
)

R = np.random.RandomState(0)
X = R.randn(16, 3)
Y = R.randint(0, 2, size=16)


def model_tree(seed: int) -> dict:
    r = np.random.RandomState(seed)
    return make_tree({"dense/w1": r.randn(3, 5), "dense/w2": r.randn(5, 2)}, step=seed)


def np_eval(w1: np.ndarray, w2: np.ndarray) -> dict[str, float]:
    logits = np.tanh(X @ w1) @ w2
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return {"loss": float(-logp[np.arange(len(Y)), Y].mean()),
            "accuracy": float((logits.argmax(-1) == Y).mean())}


def eval_fn(params):
    logits = jnp.tanh(X @ params["dense"]["w1"]) @ params["dense"]["w2"]
    logp = jax.nn.log_softmax(logits)
    return {"loss": -jnp.mean(logp[jnp.arange(len(Y)), Y]),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == Y)}


def test_loss_barrier_of_a_quadratic_bump():
    ts = np.linspace(0, 1, 11)
    loss = 1.0 + 2.0 * ts + 4.0 * ts * (1 - ts)       # chord 1 + 2t, bump peak 1 at t=0.5
    accuracy = 0.9 - 0.1 * ts - 0.8 * ts * (1 - ts)    # dip 0.2 below the chord at t=0.5
    assert loss_barrier(loss, ts) == pytest.approx(1.0)
    assert loss_barrier(accuracy, ts, higher_is_better=True) == pytest.approx(0.2)
    curve = ConnectivityCurve(ts, {"loss": loss, "accuracy": accuracy})
    assert barrier(curve) == pytest.approx(1.0)
    assert curve.barrier("accuracy") == pytest.approx(0.2)       # sign inferred from key
    assert curve.barrier("accuracy", higher_is_better=False) == pytest.approx(0.0)


def test_barrier_uses_the_chord_not_the_endpoint_mean():
    # chord at t=0.25 is 0.1 + 0.25 * 0.2 = 0.15; Frankle's endpoint mean would give 0.7
    assert loss_barrier([0.1, 0.9, 0.3], [0.0, 0.25, 1.0]) == pytest.approx(0.75)
    assert loss_barrier([0.5, 0.4, 0.5], [0.0, 0.5, 1.0]) == pytest.approx(0.0)


def test_interpolate_matches_numpy_and_keeps_non_float_leaves():
    a, b = model_tree(1), model_tree(2)
    for t in (0.0, 0.3, 1.0, 1.5):
        out = interpolate(a, b, t)
        for name in ("w1", "w2"):
            expected = ((1 - t) * np.asarray(a["dense"][name], np.float64)
                        + t * np.asarray(b["dense"][name], np.float64))
            np.testing.assert_allclose(out["dense"][name], expected, rtol=1e-6, atol=1e-6)
        assert int(out["step"]) == 1
    np.testing.assert_array_equal(interpolate(a, b, 0.0)["dense"]["w1"], a["dense"]["w1"])
    np.testing.assert_array_equal(interpolate(a, b, 1.0)["dense"]["w2"], b["dense"]["w2"])
    traced = jax.vmap(lambda t: interpolate(a, b, t)["dense"]["w1"])(jnp.array([0.0, 0.5]))
    np.testing.assert_allclose(traced[1], (a["dense"]["w1"] + b["dense"]["w1"]) / 2,
                               rtol=1e-6)


def test_bfloat16_leaves_stay_bfloat16():
    a = make_tree({"w": np.ones(4)}, step=0, dtype=jnp.bfloat16)
    b = make_tree({"w": 3 * np.ones(4)}, step=0, dtype=jnp.bfloat16)
    out = interpolate(a, b, 0.5)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 2.0)


def test_curve_vmap_equals_loop_equals_numpy():
    a, b = model_tree(1), model_tree(2)
    vmapped = connectivity_curve(eval_fn, a, b, num_points=7, vmap=True, chunk_size=3)
    looped = connectivity_curve(eval_fn, a, b, num_points=7, vmap=False)
    np.testing.assert_array_equal(vmapped.ts, np.linspace(0, 1, 7))
    assert set(vmapped.values) == set(looped.values) == {"loss", "accuracy"}
    wa = {k: np.asarray(v, np.float64) for k, v in a["dense"].items()}
    wb = {k: np.asarray(v, np.float64) for k, v in b["dense"].items()}
    for i, t in enumerate(vmapped.ts):
        ref = np_eval((1 - t) * wa["w1"] + t * wb["w1"], (1 - t) * wa["w2"] + t * wb["w2"])
        for key in ("loss", "accuracy"):
            assert vmapped.values[key][i] == pytest.approx(ref[key], rel=1e-5, abs=1e-6)
            assert looped.values[key][i] == pytest.approx(ref[key], rel=1e-5, abs=1e-6)
    for curve in (vmapped, looped):
        for key, value in eval_fn(a).items():
            assert curve.values[key][0] == pytest.approx(float(value), rel=1e-6)
        for key, value in eval_fn(b).items():
            assert curve.values[key][-1] == pytest.approx(float(value), rel=1e-6)
    assert vmapped.barrier("loss") == pytest.approx(looped.barrier("loss"), rel=1e-5)


def test_numpy_eval_fn_falls_back_to_a_loop():
    a, b = model_tree(1), model_tree(2)

    def numpy_loss(params):          # not traceable: NumPy on the values
        return np_eval(np.asarray(params["dense"]["w1"], np.float64),
                       np.asarray(params["dense"]["w2"], np.float64))["loss"]

    auto = connectivity_curve(numpy_loss, a, b, num_points=5)
    reference = connectivity_curve(eval_fn, a, b, num_points=5)
    assert list(auto.values) == ["loss"]                 # a bare scalar is named "loss"
    np.testing.assert_allclose(auto.values["loss"], reference.values["loss"], rtol=1e-5)
    with pytest.raises(MergeError, match="vmap=False"):
        connectivity_curve(numpy_loss, a, b, num_points=5, vmap=True)


def test_endpoint_may_be_a_merge():
    a, b = model_tree(1), model_tree(2)
    merged = interpolate(a, b, 0.5)
    curve = connectivity_curve(eval_fn, a, merged, num_points=3)
    full = connectivity_curve(eval_fn, a, b, num_points=5)
    np.testing.assert_allclose(curve.values["loss"], full.values["loss"][:3], rtol=1e-5)


def test_plot_connectivity_writes_a_png(tmp_path):
    a, b = model_tree(1), model_tree(2)
    curves = {"naive": connectivity_curve(eval_fn, a, b, num_points=5),
              "merged": connectivity_curve(eval_fn, a, interpolate(a, b, 0.5), num_points=5)}
    path = tmp_path / "lmc.png"
    fig = plot_connectivity(curves, "accuracy", path=str(path))
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["naive", "merged"]
    own = Figure()
    ax = own.add_subplot()
    assert plot_connectivity(curves, ax=ax) is own
    assert len(ax.get_lines()) == 2


def test_bad_inputs():
    a, b = model_tree(1), model_tree(2)
    for n in (1, 0, 2.5, True):
        with pytest.raises(MergeError, match="num_points"):
            connectivity_curve(eval_fn, a, b, num_points=n)
    with pytest.raises(MergeError, match="chunk_size"):
        connectivity_curve(eval_fn, a, b, chunk_size=0)
    with pytest.raises(MergeError, match="vmap"):
        connectivity_curve(eval_fn, a, b, vmap="yes")
    missing = {"dense": {"w1": b["dense"]["w1"]}, "step": b["step"]}
    with pytest.raises(MergeError, match="dense/w2"):
        connectivity_curve(eval_fn, a, missing)
    wrong = make_tree({"dense/w1": np.ones((3, 4)), "dense/w2": np.ones((5, 2))}, step=0)
    with pytest.raises(MergeError, match="dense/w1"):
        interpolate(a, wrong, 0.5)
    for vmap in (True, False):
        with pytest.raises(MergeError, match="scalar"):
            connectivity_curve(lambda p: p["dense"]["w2"], a, b, num_points=3, vmap=vmap)
    first = float(a["dense"]["w1"][0, 0])

    def changing_keys(params):
        return {"loss" if float(params["dense"]["w1"][0, 0]) == first else "nll": 0.0}

    with pytest.raises(MergeError, match="keys"):
        connectivity_curve(changing_keys, a, b, num_points=3, vmap=False)
    with pytest.raises(MergeError, match="ts from 0 to 1"):
        loss_barrier([1.0, 2.0], [0.0, 0.5])
    with pytest.raises(MergeError, match="same length"):
        loss_barrier([1.0, 2.0, 3.0], [0.0, 1.0])
    curve = connectivity_curve(eval_fn, a, b, num_points=3)
    with pytest.raises(MergeError, match="'acc'"):
        curve.barrier("acc")
    with pytest.raises(MergeError, match="'nll'"):
        plot_connectivity({"x": curve}, "nll")
    with pytest.raises(MergeError, match="non-empty"):
        plot_connectivity({})
