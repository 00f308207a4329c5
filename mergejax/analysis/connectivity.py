"""Linear mode connectivity: the loss (and accuracy) along the straight line between two
models, and its barrier.

Two parameter pytrees ``theta_a`` and ``theta_b`` are evaluated at
``theta_t = (1 - t) theta_a + t theta_b`` for ``t`` in ``[0, 1]`` (Frankle et al. 2020,
arXiv 1912.05671; Git Re-Basin, Ainsworth et al. 2023, arXiv 2209.04836, plots these
curves before and after permuting one model). Either endpoint may be any pytree with the
other's structure: a fine-tuned model, a merge of several, a permuted model.

Example::

    from mergejax.analysis import connectivity_curve, plot_connectivity

    naive = connectivity_curve(eval_fn, params_a, params_b)
    rebased = connectivity_curve(eval_fn, params_a, permuted_b)
    print(naive.barrier("loss"), rebased.barrier("loss"))
    plot_connectivity({"naive": naive, "weight matching": rebased}, path="lmc.png")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mergejax.analysis.plotting import new_axes, save_figure
from mergejax.tree import MergeError, PyTree, check_compatible, tree_weighted_sum

__all__ = [
    "ConnectivityCurve",
    "barrier",
    "connectivity_curve",
    "interpolate",
    "loss_barrier",
    "plot_connectivity",
]

EvalFn = Callable[[PyTree], Any]


@jax.jit
def _interpolate(params_a: PyTree, params_b: PyTree, t: Any) -> PyTree:
    t = jnp.asarray(t, jnp.result_type(float))
    return tree_weighted_sum(jnp.stack([1 - t, t]), [params_a, params_b])


def interpolate(params_a: PyTree, params_b: PyTree, t: Any) -> PyTree:
    """``(1 - t) * params_a + t * params_b`` on floating leaves (computed in float32 or
    wider, returned in ``params_a``'s dtypes; exactly ``params_a`` at ``t = 0`` and
    ``params_b`` at ``t = 1``); other leaves are copied from ``params_a``. Jit-compiled;
    ``t`` may be a traced scalar, and values outside ``[0, 1]`` extrapolate.

    Example::

        midpoint = interpolate(params_a, params_b, 0.5)
    """
    check_compatible(params_a, [params_b], reference_name="params_a", other_name="params_b")
    return _interpolate(params_a, params_b, t)


def loss_barrier(values: Any, ts: Any, *, higher_is_better: bool = False) -> float:
    """The barrier of a curve sampled at ``ts`` (which start at 0 and end at 1):

        max_t [ L(theta_t) - ((1 - t) L(theta_a) + t L(theta_b)) ]

    the height of the curve above the chord between its endpoints (Entezari et al. 2022,
    arXiv 2110.06296). Frankle et al. (arXiv 1912.05671) and Git Re-Basin subtract the
    endpoints' mean ``(L_a + L_b) / 2`` instead of the chord; the two agree when the
    endpoints' values are equal. With ``higher_is_better`` (accuracy) the sign flips:
    ``max_t [ ((1 - t) acc_a + t acc_b) - acc(theta_t) ]``. The endpoints contribute 0, so
    the barrier is >= 0; NaN values give NaN.

    Example::

        loss_barrier([0.1, 0.9, 0.3], [0.0, 0.5, 1.0])   # 0.9 - 0.2 = 0.7
    """
    values = np.asarray(values, np.float64)
    ts = np.asarray(ts, np.float64)
    if values.ndim != 1 or ts.shape != values.shape or values.size < 2:
        raise MergeError(f"loss_barrier needs 1-D values and ts of the same length >= 2, got "
                         f"shapes {values.shape} and {ts.shape}")
    if ts[0] != 0.0 or ts[-1] != 1.0:
        raise MergeError(f"loss_barrier needs ts from 0 to 1 (the two endpoints), got "
                         f"ts[0]={ts[0]}, ts[-1]={ts[-1]}")
    gap = values - ((1 - ts) * values[0] + ts * values[-1])
    return float(np.max(-gap if higher_is_better else gap))


class ConnectivityCurve(NamedTuple):
    """An evaluated interpolation path (what `connectivity_curve` returns).

    Attributes:
      ts: the interpolation coefficients, ``linspace(0, 1, num_points)`` (float64).
      values: one float64 array of shape ``ts.shape`` per quantity ``eval_fn`` returns.
    """

    ts: np.ndarray
    values: dict[str, np.ndarray]

    def barrier(self, key: str = "loss", *, higher_is_better: bool | None = None) -> float:
        """`barrier` of this curve.

        Example::

            curve.barrier("accuracy")
        """
        return barrier(self, key, higher_is_better=higher_is_better)


def barrier(curve: ConnectivityCurve, key: str = "loss", *,
            higher_is_better: bool | None = None) -> float:
    """`loss_barrier` of ``curve.values[key]``. ``higher_is_better=None`` means True when
    ``"acc"`` occurs in ``key`` (``"accuracy"``, ``"top1_acc"``), so accuracies get the
    flipped sign; pass it explicitly for other names.

    Example::

        barrier(curve, "loss"), barrier(curve, "accuracy")
    """
    if key not in curve.values:
        raise MergeError(f"the curve has no {key!r}; it has {sorted(curve.values)}")
    if higher_is_better is None:
        higher_is_better = "acc" in key.lower()
    return loss_barrier(curve.values[key], curve.ts, higher_is_better=higher_is_better)


def _as_dict(out: Any) -> dict[str, Any]:
    """``eval_fn``'s output as ``{name: value}``: a bare scalar is named ``"loss"``."""
    out = dict(out) if isinstance(out, Mapping) else {"loss": out}
    for name, value in out.items():
        if not isinstance(name, str) or np.shape(value) != ():
            raise MergeError(f"eval_fn must return a scalar or a dict of scalars keyed by "
                             f"str; got {name!r}: shape {np.shape(value)}")
    return out


def _along_path(eval_fn: EvalFn, chunk_size: int) -> Callable[..., dict[str, Any]]:
    """``(ts, a, b) -> {name: values}``: eval_fn at every t, one jit, vmapped in chunks."""
    def curve(ts, a, b):
        return jax.lax.map(lambda t: _as_dict(eval_fn(_interpolate(a, b, t))), ts,
                           batch_size=chunk_size)
    return jax.jit(curve)


def connectivity_curve(eval_fn: EvalFn, params_a: PyTree, params_b: PyTree, *,
                       num_points: int = 25, vmap: bool | str = "auto",
                       chunk_size: int = 8) -> ConnectivityCurve:
    """Evaluates ``eval_fn`` at ``interpolate(params_a, params_b, t)`` for ``num_points``
    values of ``t`` evenly spaced in ``[0, 1]`` (both endpoints included).

    ``eval_fn(params)`` returns a scalar (stored as ``"loss"``) or a dict of scalars, e.g.
    ``{"loss": ..., "accuracy": ...}``, computed on data it closes over. The endpoints may
    be any two pytrees of the same structure: two fine-tuned models, a model and a merge.

    ``vmap=True``: the whole curve is one jit-compiled program; the points are evaluated
    ``chunk_size`` at a time with ``jax.vmap`` (``jax.lax.map(..., batch_size=chunk_size)``),
    so at most ``chunk_size`` interpolated models are alive at once. ``eval_fn`` must then
    be traceable by JAX. ``vmap=False``: a Python loop, one jitted `interpolate` and one
    plain call of ``eval_fn`` per point, so ``eval_fn`` may use NumPy on concrete values.
    ``"auto"``: traces the vmapped program once (``jax.eval_shape``) and takes the loop
    when that tracing raises a ``jax.errors.JAXTypeError`` (a NumPy call, ``float(x)`` or
    an ``if`` on a traced value), logging that it did; other errors propagate.

    Example::

        def eval_fn(params):
            logits = model.apply({"params": params}, x_test)
            return {"loss": xent(logits, y_test),
                    "accuracy": jnp.mean(logits.argmax(-1) == y_test)}

        curve = connectivity_curve(eval_fn, params_a, merged, num_points=11)
        curve.barrier("loss")
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) \
            or num_points < 2:
        raise MergeError(f"num_points must be an int >= 2 (the two endpoints), got "
                         f"{num_points!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise MergeError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if vmap not in (True, False, "auto"):
        raise MergeError(f"vmap must be True, False or 'auto', got {vmap!r}")
    if not callable(eval_fn):
        raise MergeError("connectivity_curve needs eval_fn: a function params -> scalar or "
                         "dict of scalars")
    check_compatible(params_a, [params_b], reference_name="params_a", other_name="params_b")
    ts = np.linspace(0.0, 1.0, int(num_points))
    ts_device = jnp.asarray(ts, jnp.result_type(float))

    if vmap is not False:
        along = _along_path(eval_fn, int(chunk_size))
        try:
            jax.eval_shape(along, ts_device, params_a, params_b)
        except jax.errors.JAXTypeError as e:
            if vmap is True:
                raise MergeError(f"eval_fn is not traceable by JAX ({type(e).__name__}); "
                                 "use vmap=False for an eval_fn that needs concrete "
                                 "values") from e
            logging.info("connectivity_curve: eval_fn is not traceable (%s); evaluating "
                         "the points one by one", type(e).__name__)
        else:
            out = along(ts_device, params_a, params_b)
            return ConnectivityCurve(ts, {k: np.asarray(v, np.float64)
                                          for k, v in out.items()})

    points = [_as_dict(eval_fn(_interpolate(params_a, params_b, t))) for t in ts_device]
    names = sorted(points[0])
    for t, point in zip(ts, points):
        if sorted(point) != names:
            raise MergeError(f"eval_fn returned keys {sorted(point)} at t={t:g} but "
                             f"{names} at t=0")
    return ConnectivityCurve(ts, {k: np.array([float(p[k]) for p in points])
                                  for k in names})


def plot_connectivity(curves: Mapping[str, ConnectivityCurve], key: str = "loss",
                      path: str | None = None, ax: Any = None) -> Any:
    """Line plot of ``curve.values[key]`` against ``t``, one labelled line per curve
    (e.g. ``{"naive": ..., "weight matching": ...}``, as Git Re-Basin's figures). Draws on
    ``ax`` when given, else on a new Agg figure; saves a png at ``path`` when given;
    returns the matplotlib ``Figure``.

    Example::

        fig = plot_connectivity({"naive": naive, "merged": merged}, key="accuracy",
                                path="lmc.png")
    """
    if not isinstance(curves, Mapping) or not curves:
        raise MergeError("plot_connectivity needs a non-empty mapping label -> "
                         "ConnectivityCurve")
    for label, curve in curves.items():
        if key not in curve.values:
            raise MergeError(f"curve {label!r} has no {key!r}; it has {sorted(curve.values)}")
    fig, ax = new_axes(ax)
    for label, curve in curves.items():
        ax.plot(curve.ts, curve.values[key], marker=".", label=str(label))
    ax.set_xlabel("interpolation t  ((1 - t) A + t B)")
    ax.set_ylabel(key)
    ax.set_xlim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
