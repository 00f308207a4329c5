"""Merge-friendly fine-tuning: train experts whose task vectors add up well.

* `linearize`, `linearized_finetune`: fine-tuning in the tangent space (Ortiz-Jimenez et
  al. 2023, "Task arithmetic in the tangent space", arXiv 2305.12827). The expert is the
  first-order Taylor expansion ``f_lin(x; theta) = f(x; theta_0) + J_theta f(x; theta_0)
  (theta - theta_0)``, linear in ``theta``; its task vectors are better disentangled
  (`mergejax.analysis.weight_disentanglement_error`), so task arithmetic interferes less.
* `sam`, `sam_finetune`: sharpness-aware minimisation (Foret et al. 2021, arXiv
  2010.01412; adaptive ASAM, Kwon et al. 2021, arXiv 2102.11600), which seeks flat minima.

Both return ordinary parameter pytrees (``theta_0 + tau``) that plug into every merge.
A merge of linearized experts is a linearized model too: evaluate it with
``linearize(apply_fn, params0)(merged, inputs)``.

Conventions: ``apply_fn(params, batch) -> outputs`` is the model and ``loss_fn(outputs,
batch) -> loss`` the objective of `linearized_finetune`; `sam_finetune` takes
``loss_fn(params, batch) -> loss``. A loss may be per-example (it is averaged).
``batches`` is an iterable yielding at least ``steps`` batches of one shape (wrap it in
``itertools.cycle`` for epochs). Only floating leaves are trained; other leaves (step
counters) are kept from the initial params. One training step is one ``jax.jit``; the
loop is `mergejax.learned.loop.optimize` (a non-finite loss stops it with a `MergeError`).

Example::

    from mergejax.finetune import linearize, linearized_finetune

    experts = [linearized_finetune(apply_fn, params0, xent, itertools.cycle(b), steps=2000)
               for b in (batches_a, batches_b)]
    merged = mergejax.task_arithmetic(params0, experts, scale=0.5)
    logits = linearize(apply_fn, params0)(merged, x_test)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mergejax.learned.loop import TaskBatches, optimize
from mergejax.tree import MergeError, PyTree, check_compatible, is_float

__all__ = [
    "default_optimizer",
    "linearize",
    "linearized_finetune",
    "sam",
    "sam_finetune",
]

ApplyFn = Callable[[PyTree, Any], Any]


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MergeError(f"steps must be a positive int, got {steps!r}")


def default_optimizer(steps: int, *, learning_rate: float = 1e-5,
                      weight_decay: float = 0.1,
                      warmup_steps: int = 200) -> optax.GradientTransformation:
    """The fine-tuning recipe of task arithmetic (Ilharco et al. 2023, arXiv 2212.04089),
    which Ortiz-Jimenez et al. follow for linearized fine-tuning: AdamW, learning rate
    1e-5, weight decay 0.1, linear warmup over 200 steps then cosine decay to 0 at
    ``steps`` (the papers train 2000 steps at batch size 128). The warmup is
    ``min(warmup_steps, steps // 10)`` so that short runs keep 90% of their steps.

    Example::

        opt = default_optimizer(2000, learning_rate=3e-5)
    """
    _check_steps(steps)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=min(warmup_steps, steps // 10), decay_steps=steps)
    return optax.adamw(schedule, weight_decay=weight_decay)


def _check_optimizer(name: str, optimizer: Any) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise MergeError(f"{name}: the optimizer must be an optax GradientTransformation, "
                         f"got {type(optimizer).__name__}")


def _trainable(params: PyTree) -> PyTree:
    """``params`` with None in place of every non-floating leaf (what optax trains)."""
    return jax.tree.map(lambda x: x if is_float(x) else None, params)


def _with_frozen(theta: PyTree, params: PyTree) -> PyTree:
    """``theta``'s floating leaves, ``params``' leaves where ``theta`` has None."""
    return jax.tree.map(lambda t, x: x if t is None else t, theta, params,
                        is_leaf=lambda x: x is None)


def _linear_apply(apply_fn: ApplyFn, params0: PyTree, params: PyTree, inputs: Any) -> Any:
    """``f(x; theta_0) + J f(x; theta_0) (theta - theta_0)`` by one ``jax.jvp``."""
    theta0 = _trainable(params0)
    delta = jax.tree.map(lambda p, p0: (p - p0).astype(p0.dtype), _trainable(params), theta0)
    outputs, tangent = jax.jvp(lambda th: apply_fn(_with_frozen(th, params0), inputs),
                               (theta0,), (delta,))
    return jax.tree.map(jnp.add, outputs, tangent)


def linearize(apply_fn: ApplyFn, params0: PyTree) -> Callable[[PyTree, Any], Any]:
    """The first-order Taylor expansion of ``apply_fn`` around ``params0`` (Ortiz-Jimenez
    et al., arXiv 2305.12827): ``apply_lin(params, inputs) = f(inputs; params0) +
    J_theta f(inputs; params0) (params - params0)``, one ``jax.jvp`` (the forward pass and
    its tangent together) under one ``jax.jit``.

    ``params`` must have ``params0``'s structure, shapes and dtypes (`MergeError` naming
    the leaf otherwise). Non-floating leaves are ``params0``'s (the expansion point);
    ``params``' are ignored. ``apply_lin(params0, x) == apply_fn(params0, x)``.

    Example::

        apply_lin = linearize(apply_fn, params0)
        logits = apply_lin(mergejax.task_arithmetic(params0, experts, scale=0.5), x)
    """
    if not callable(apply_fn):
        raise MergeError("linearize needs apply_fn: a function (params, inputs) -> outputs")
    jitted = jax.jit(functools.partial(_linear_apply, apply_fn))

    def apply_lin(params: PyTree, inputs: Any) -> Any:
        check_compatible(params0, [params], reference_name="params0", other_name="params")
        return jitted(params0, params, inputs)

    return apply_lin


def _fit(name: str, objective: Callable[[PyTree, PyTree, Any], Any], params: PyTree,
         batches: Iterable[Any], *, steps: int,
         optimizer: optax.GradientTransformation | None, log_every: int) -> PyTree:
    """Minimises ``objective(theta, params, batch)`` over the floating leaves ``theta``,
    starting at ``params``; the optimizer's ``update`` also gets ``grad_fn`` (for `sam`)."""
    _check_steps(steps)
    optimizer = default_optimizer(steps) if optimizer is None else optimizer
    _check_optimizer(name, optimizer)
    try:
        iter(batches)
    except TypeError:
        raise MergeError(f"{name}: batches must be an iterable of batches, got "
                         f"{type(batches).__name__}") from None
    if not any(is_float(x) for x in jax.tree.leaves(params)):
        raise MergeError(f"{name}: the params have no floating leaves to train")
    optimizer = optax.with_extra_args_support(optimizer)

    def step(state, draws, params):
        theta, opt_state = state
        (batch,) = draws

        def loss(th):
            value = jnp.mean(objective(th, params, batch))
            return value.astype(jnp.promote_types(value.dtype, jnp.float32))

        value, grads = jax.value_and_grad(loss)(theta)
        updates, opt_state = optimizer.update(grads, opt_state, theta, grad_fn=jax.grad(loss))
        return (optax.apply_updates(theta, updates), opt_state), value

    jitted = jax.jit(step)
    theta = _trainable(params)
    result = optimize(lambda state, draws: jitted(state, draws, params),
                      (theta, optimizer.init(theta)), TaskBatches([batches], name, 1),
                      steps=steps, name=name, log_every=log_every)
    return _with_frozen(result.state[0], params)


def linearized_finetune(apply_fn: ApplyFn, params0: PyTree,
                        loss_fn: Callable[[Any, Any], Any], batches: Iterable[Any], *,
                        steps: int, optimizer: optax.GradientTransformation | None = None,
                        log_every: int = 0) -> PyTree:
    """Fine-tunes in the tangent space around ``params0`` (Ortiz-Jimenez et al., arXiv
    2305.12827): minimises ``loss_fn(linearize(apply_fn, params0)(theta, batch), batch)``
    over ``theta``, starting at ``theta = params0``, one optimizer step per batch, and
    returns ``theta = params0 + tau``.

    ``apply_fn(params, batch) -> outputs`` (it takes the whole batch and picks its
    inputs), ``loss_fn(outputs, batch) -> loss``. ``optimizer`` (any optax transformation,
    e.g. ``sam(optax.adamw(1e-5))``) defaults to `default_optimizer` (the paper's AdamW,
    lr 1e-5, weight decay 0.1, cosine). As in the paper, weight decay pulls ``theta``
    toward 0, not toward ``params0``. The result is an ordinary params pytree: merge it
    like any fine-tuned model, and evaluate it (or the merge) with `linearize`.

    Example::

        def xent(logits, batch):
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

        expert = linearized_finetune(lambda p, b: model.apply({"params": p}, b["x"]),
                                     params0, xent, itertools.cycle(batches), steps=2000)
    """
    if not callable(apply_fn) or not callable(loss_fn):
        raise MergeError("linearized_finetune needs apply_fn(params, batch) -> outputs and "
                         "loss_fn(outputs, batch) -> loss")

    def objective(theta, params0, batch):
        params = _with_frozen(theta, params0)
        return loss_fn(_linear_apply(apply_fn, params0, params, batch), batch)

    return _fit("linearized_finetune", objective, params0, batches, steps=steps,
                optimizer=optimizer, log_every=log_every)


def sam(base_optimizer: optax.GradientTransformation, rho: float = 0.05, *,
        adaptive: bool = False, eta: float = 0.01) -> optax.GradientTransformationExtraArgs:
    """Sharpness-aware minimisation (Foret et al. 2021, arXiv 2010.01412) around any optax
    optimizer.

    ``update(grads, state, params, *, grad_fn)`` takes the gradient ``g`` of the loss at
    ``params`` and ``grad_fn(params) -> gradient`` (the same loss on the same batch),
    ascends to ``params + eps`` with ``eps = rho g / ||g||_2`` (global L2 norm over the
    pytree; ``eps = 0`` when ``g = 0``) and hands ``g_sam = grad_fn(params + eps)`` to
    ``base_optimizer``, which updates the unperturbed ``params``. ``adaptive=True`` is
    ASAM (Kwon et al. 2021, arXiv 2102.11600): ``eps = rho T^2 g / ||T g||_2`` with the
    element-wise ``T = |params| + eta`` (their code adds ``eta = 0.01`` to weights and
    uses ``T = 1`` for biases; here every leaf gets ``|params| + eta``). One ``update`` is
    one SAM step: two gradient evaluations. Extra keyword arguments go on to
    ``base_optimizer``.

    ``optax.contrib.sam(optimizer, adv_optimizer, sync_period=2)`` is the same method in
    another form: the ascent is a separate, visible ``update`` call (every other step, by
    ``adv_optimizer``, e.g. normalised SGD with step ``rho``), or an internal loop with
    ``opaque_mode=True`` and ``grad_fn(params, step)``.

    Example::

        opt = sam(optax.sgd(0.1), rho=0.05)
        grad_fn = jax.grad(lambda p: loss(p, batch))
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise MergeError(f"rho must be a finite number >= 0, got {rho!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise MergeError(f"eta must be a finite number >= 0, got {eta!r}")
    _check_optimizer("sam", base_optimizer)
    base = optax.with_extra_args_support(base_optimizer)

    def update(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is None or grad_fn is None:
            raise MergeError("sam's update needs params and grad_fn=(params -> gradient)")
        scale = jax.tree.map(lambda p: jnp.abs(p) + eta, params) if adaptive else None
        direction = jax.tree.map(jnp.multiply, scale, updates) if adaptive else updates
        norm = optax.tree.norm(direction)
        factor = jnp.where(norm > 0, rho / norm, 0.0)
        eps = jax.tree.map(lambda d: factor * d, direction)
        if adaptive:
            eps = jax.tree.map(jnp.multiply, scale, eps)
        perturbed = jax.tree.map(lambda p, e: (p + e).astype(p.dtype), params, eps)
        return base.update(grad_fn(perturbed), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(base.init, update)


def sam_finetune(loss_fn: Callable[[PyTree, Any], Any], params: PyTree,
                 batches: Iterable[Any], *, steps: int, rho: float = 0.05,
                 adaptive: bool = False,
                 optimizer: optax.GradientTransformation | None = None,
                 log_every: int = 0) -> PyTree:
    """Fine-tunes ``params`` with `sam` around ``optimizer`` (default `default_optimizer`:
    AdamW, lr 1e-5, weight decay 0.1, cosine), one SAM step per batch, and returns the
    fine-tuned params. ``loss_fn(params, batch) -> loss``; both gradients of a step use
    the same batch.

    Example::

        ft = sam_finetune(loss_fn, params0, itertools.cycle(batches), steps=2000,
                          rho=0.05, optimizer=optax.adamw(1e-5, weight_decay=0.1))
    """
    if not callable(loss_fn):
        raise MergeError("sam_finetune needs loss_fn(params, batch) -> loss")
    _check_steps(steps)
    base = default_optimizer(steps) if optimizer is None else optimizer

    def objective(theta, params, batch):
        return loss_fn(_with_frozen(theta, params), batch)

    return _fit("sam_finetune", objective, params, batches, steps=steps,
                optimizer=sam(base, rho, adaptive=adaptive), log_every=log_every)
