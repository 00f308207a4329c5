"""Localize-and-Stitch with learned masks (He et al. 2024, arXiv 2408.13656).

Localize: for one fine-tuned model, learn a sparse binary mask ``gamma`` over the task
vector ``tau = theta_ft - theta_0`` such that ``theta_0 + gamma * tau`` keeps the task's
performance. The mask is relaxed to ``sigmoid(S)`` with trainable logits ``S`` (one per
floating entry) and ``S`` is trained by gradient descent on

    mean(loss_fn(theta_0 + sigmoid(S) * tau, batch)) + l1 * sum(sigmoid(S)) / num_params

then rounded: ``gamma = sigmoid(S) > 0.5``. Stitch: `mergejax.methods.masking.stitch`
averages, per entry, the task vectors of the tasks whose mask selects it.

The dataless variant (masks = top-``density`` ``|tau|``, no training) is
`mergejax.methods.sparse.localize_stitch`; here the same selection only initialises ``S``.

Example::

    from mergejax.learned import learn_masks, localize_and_stitch

    result = learn_masks(base, ft_a, loss_a, batches_a, density=0.01, steps=200)
    merged = localize_and_stitch(base, [ft_a, ft_b], [loss_a, loss_b],
                                 [batches_a, batches_b], steps=200)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mergejax.methods import stages
from mergejax.methods.masking import stitch
from mergejax.tree import MergeError, PyTree, check_compatible, is_float

__all__ = [
    "LocalizationResult",
    "init_logits",
    "learn_masks",
    "localize_and_stitch",
    "mask_from_logits",
    "masked_params",
    "sparsity_penalty",
]

Array = jax.Array
LossFn = Callable[[PyTree, Any], Any]

DEFAULT_LEARNING_RATE = 10.0
DEFAULT_STEPS = 200


class LocalizationResult(NamedTuple):
    """What `learn_masks` found for one fine-tuned model.

    Attributes:
      mask: a boolean pytree like the base: ``sigmoid(S) > 0.5`` on floating leaves,
        all False on the other leaves. Pass it to `mergejax.methods.masking.stitch`.
      logits: the trained ``S``: float32 on floating leaves, None elsewhere.
      losses: the objective (task loss + sparsity penalty) at each step, evaluated
        before that step's update.
    """

    mask: PyTree
    logits: PyTree
    losses: list[float]


# ---------------------------------------------------------------------------------------
# Checks.


def _check_pair(base: PyTree, finetuned: PyTree, name: str) -> None:
    if base is None:
        raise MergeError(f"{name} needs a base (pretrained) model; got base=None")
    if finetuned is None:
        raise MergeError(f"{name} needs a fine-tuned model; got finetuned=None")
    check_compatible(base, [finetuned], other_name="finetuned")
    if not any(is_float(x) for x in jax.tree.leaves(base)):
        raise MergeError(f"{name}: the base has no floating leaves, so there is nothing "
                         "to localise")


def _check_hparams(density: float, sigmoid_bias: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
        raise MergeError(f"density must be in [0, 1], got {density!r}")
    if not (isinstance(sigmoid_bias, (int, float)) and math.isfinite(sigmoid_bias)
            and sigmoid_bias > 0):
        raise MergeError(f"sigmoid_bias must be a finite number > 0, got {sigmoid_bias!r}")


# ---------------------------------------------------------------------------------------
# Pure pieces: initial logits, soft-masked params, penalty, rounding.


def init_logits(base: PyTree, finetuned: PyTree, *, density: float = 0.01,
                sigmoid_bias: float = 5.0) -> PyTree:
    """The initial mask logits ``S`` of Localize-and-Stitch (arXiv 2408.13656):
    ``+sigmoid_bias`` on the ``int(density * N)`` largest ``|tau|`` over the whole model
    (N floating entries; ties at the threshold kept, as `localize_stitch`; the official
    code keeps ``|tau| >`` the k-th largest, k - 1 entries without ties),
    ``-sigmoid_bias`` elsewhere. float32 on floating leaves, None on the others.

    Example::

        S = init_logits(base, ft, density=0.01)   # round(sigmoid(S)) is the dataless mask
    """
    _check_pair(base, finetuned, "init_logits")
    _check_hparams(density, sigmoid_bias)
    leaves, treedef = jax.tree.flatten(base)
    floating = tuple(is_float(x) for x in leaves)
    size = sum(int(np.size(x)) for x, f in zip(leaves, floating) if f)
    rank = stages.topk_rank(float(density), size)
    out = _init_logits(floating, rank, float(sigmoid_bias), leaves,
                       jax.tree.leaves(finetuned))
    return treedef.unflatten(out)


def _float32_taus(floating, base_leaves, ft_leaves) -> list[Array | None]:
    return [ft.astype(jnp.float32) - b.astype(jnp.float32) if f else None
            for f, b, ft in zip(floating, base_leaves, ft_leaves)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_logits(floating, rank, bias, base_leaves, ft_leaves):
    taus = _float32_taus(floating, base_leaves, ft_leaves)
    flat = jnp.concatenate([jnp.abs(t).reshape(-1) for t in taus if t is not None])
    threshold = stages.select_thresholds((flat,), (rank,))[0, 0]
    return [None if t is None else jnp.where(jnp.abs(t) >= threshold, bias, -bias)
            .astype(jnp.float32) for t in taus]


def masked_params(base: PyTree, tau: PyTree, logits: PyTree) -> PyTree:
    """``theta_0 + sigmoid(S) * tau`` on floating leaves, in float32 (the params the loss
    sees while the mask trains); other leaves are the base's. ``tau`` is float32 like the
    base's floating leaves, ``logits`` float32 there and None elsewhere.

    Example::

        params = masked_params(base, mergejax.task_vector(base, ft), S)
    """
    return jax.tree.map(
        lambda s, b, t: b if s is None else b.astype(jnp.float32) + jax.nn.sigmoid(s) * t,
        logits, base, tau, is_leaf=lambda x: x is None)


def sparsity_penalty(logits: PyTree, l1: float = 1.0) -> Array:
    """The paper's L1 penalty on the relaxed mask: ``l1 * sum(sigmoid(S)) / num_params``
    over every floating entry (None leaves are skipped). In [0, l1].

    Example::

        penalty = sparsity_penalty(result.logits, l1=1.0)
    """
    leaves = [s for s in jax.tree.leaves(logits) if s is not None]
    if not leaves:
        raise MergeError("sparsity_penalty: logits has no arrays")
    num = sum(int(np.size(s)) for s in leaves)
    total = sum(jnp.sum(jax.nn.sigmoid(jnp.asarray(s, jnp.float32))) for s in leaves)
    return l1 * total / num


def mask_from_logits(base: PyTree, logits: PyTree) -> PyTree:
    """The binary mask ``sigmoid(S) > 0.5`` (the code's ``round``, which rounds 0.5 to 0):
    booleans like the base, all False on non-floating leaves.

    Example::

        mask = mask_from_logits(base, S)
    """
    return jax.tree.map(
        lambda s, b: (jnp.zeros(np.shape(b), bool) if s is None
                      else jax.nn.sigmoid(jnp.asarray(s, jnp.float32)) > 0.5),
        logits, base, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------------------------
# Training.


def learn_masks(base: PyTree, finetuned: PyTree, loss_fn: LossFn, batches: Iterable[Any],
                *, density: float = 0.01, sigmoid_bias: float = 5.0, l1: float = 1.0,
                steps: int = DEFAULT_STEPS,
                optimizer: optax.GradientTransformation | None = None,
                learning_rate: float = DEFAULT_LEARNING_RATE,
                log_every: int = 0) -> LocalizationResult:
    """Localize-and-Stitch's data-driven localisation (He et al. 2024, arXiv 2408.13656)
    for ONE fine-tuned model.

    Trains mask logits ``S`` (float32, one per floating entry, from `init_logits` with
    ``density`` and ``sigmoid_bias``) on

        mean(loss_fn(theta_0 + sigmoid(S) * tau, batch)) + l1 * sum(sigmoid(S)) / N

    one optax step per batch, ``steps`` steps, one compiled step function. ``loss_fn(params,
    batch)`` returns a scalar (or per-example losses, which are averaged); its params have
    the base's structure, float32 floating leaves and the base's other leaves. Every batch
    should have the same shapes (a new shape recompiles). ``batches`` is any iterable; it
    must yield at least ``steps`` batches (wrap it in ``itertools.cycle`` for epochs).

    The penalty is the paper's L1 on ``sigmoid(S)`` (`sparsity_penalty`): it shrinks the
    mask. The official code (``Localizer.train_graft``) instead adds
    ``l1 * sign(S) * sigmoid'(S)`` to ``S``, which pushes each logit further from 0 on
    its current side: the opposite sign of this term for the entries that are selected.

    Optimiser: ``optimizer`` (any optax transformation) or, when None,
    ``optax.sgd(learning_rate)``. The official code takes plain gradient steps with
    ``lr = 1e7`` on the gradient SUMMED over all batches of an epoch, once per epoch
    (10 epochs, ``sigmoid_bias = 5``, init sparsity 1e-5, ``l1 = 1`` vision / 10
    language); that lr is tuned to task vectors of size ~1e-4 and per-entry gradients of a
    large network. The default ``learning_rate = 10`` suits task vectors and losses of
    order one (toy problems); for real networks raise it by orders of magnitude or pass
    e.g. ``optax.adam(0.1)``. Note that ``d/dS`` carries ``sigmoid'(S)`` (~0.0066 at
    ``|S| = 5``), so plain SGD moves saturated logits slowly.

    Args:
      base: pretrained params ``theta_0``.
      finetuned: fine-tuned params with the base's structure, shapes and dtypes.
      loss_fn: ``(params, batch) -> loss``; differentiable in params.
      batches: an iterable of batches (any pytrees of arrays).
      density: fraction of entries (largest ``|tau|`` over the whole model) whose logits
        start at ``+sigmoid_bias`` (the code's ``sparsity``); the rest start at
        ``-sigmoid_bias``.
      sigmoid_bias: magnitude of the initial logits.
      l1: weight of the sparsity penalty (>= 0).
      steps: number of optimiser steps (>= 0; 0 returns the initial mask).
      optimizer: an optax ``GradientTransformation`` over the logits pytree (None leaves
        on non-floating entries), or None for ``optax.sgd(learning_rate)``.
      learning_rate: the default optimiser's learning rate (ignored with ``optimizer``).
      log_every: log the objective every this many steps with absl (0: never).

    Returns:
      `LocalizationResult` ``(mask, logits, losses)``.

    Example::

        def loss_fn(params, batch):
            x, y = batch
            return jnp.mean((apply(params, x) - y) ** 2)

        result = learn_masks(base, ft, loss_fn, itertools.cycle(train_batches),
                             density=0.01, steps=500, optimizer=optax.adam(0.1))
        merged_one_task = mergejax.methods.masking.stitch(base, [ft], [result.mask])
    """
    _check_pair(base, finetuned, "learn_masks")
    _check_hparams(density, sigmoid_bias)
    if not callable(loss_fn):
        raise MergeError("learn_masks needs loss_fn: a function (params, batch) -> loss")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise MergeError(f"l1 must be a finite number >= 0, got {l1!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise MergeError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) \
            or log_every < 0:
        raise MergeError(f"log_every must be an int >= 0, got {log_every!r}")
    if optimizer is None:
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
            raise MergeError(f"learning_rate must be > 0, got {learning_rate!r}")
        optimizer = optax.sgd(learning_rate)
    elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise MergeError(f"optimizer must be an optax GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    try:
        iterator = iter(batches)
    except TypeError:
        raise MergeError(f"batches must be an iterable of batches, got "
                         f"{type(batches).__name__}") from None

    logits = init_logits(base, finetuned, density=density, sigmoid_bias=sigmoid_bias)
    tau = _task_vector(base, finetuned)
    l1 = float(l1)

    def objective(s, base, tau, batch):
        loss = jnp.mean(loss_fn(masked_params(base, tau, s), batch)).astype(jnp.float32)
        return loss + sparsity_penalty(s, l1)

    def _mask_step(s, opt_state, base, tau, batch):
        value, grads = jax.value_and_grad(objective)(s, base, tau, batch)
        updates, opt_state = optimizer.update(grads, opt_state, s)
        return optax.apply_updates(s, updates), opt_state, value

    step = jax.jit(_mask_step)
    opt_state = optimizer.init(logits)
    values = []
    for i in range(int(steps)):
        try:
            batch = next(iterator)
        except StopIteration:
            raise MergeError(
                f"learn_masks: batches ran out after {i} batch(es) but steps={steps} needs "
                f"one batch per step; give more batches, fewer steps, or "
                f"itertools.cycle(batches)") from None
        logits, opt_state, value = step(logits, opt_state, base, tau, batch)
        values.append(value)
        if log_every and (i + 1) % log_every == 0:
            logging.info("learn_masks: step %d/%d, objective %.6g", i + 1, steps,
                         float(value))
    losses = [float(v) for v in np.asarray(jnp.stack(values))] if values else []
    return LocalizationResult(mask_from_logits(base, logits), logits, losses)


@jax.jit
def _task_vector(base: PyTree, finetuned: PyTree) -> PyTree:
    """float32 ``finetuned - base`` on floating leaves; the base's leaf elsewhere."""
    return jax.tree.map(
        lambda b, f: f.astype(jnp.float32) - b.astype(jnp.float32) if is_float(b) else b,
        base, finetuned)


def localize_and_stitch(base: PyTree, finetuned_list: Sequence[PyTree],
                        loss_fns: Sequence[LossFn] | LossFn,
                        batches_list: Sequence[Iterable[Any]], **kw: Any) -> PyTree:
    """Localize-and-Stitch (He et al. 2024, arXiv 2408.13656): `learn_masks` for each
    task (task t with ``loss_fns[t]`` on ``batches_list[t]``; one ``loss_fn`` may be given
    for all), then `mergejax.methods.masking.stitch`: each entry is ``theta_0`` plus the
    mean of the task vectors of the tasks whose mask selects it. ``kw`` go to every
    `learn_masks` call (``density``, ``l1``, ``steps``, ``optimizer``, ...).

    Example::

        merged = localize_and_stitch(base, [ft_a, ft_b], [loss_a, loss_b],
                                     [itertools.cycle(a_batches), itertools.cycle(b_batches)],
                                     steps=300, optimizer=optax.adam(0.1))
    """
    if isinstance(finetuned_list, dict) or not isinstance(finetuned_list, Sequence):
        raise MergeError("localize_and_stitch: finetuned_list must be a list of models")
    models = list(finetuned_list)
    if not models:
        raise MergeError("localize_and_stitch: finetuned_list is empty; give at least one "
                         "model")
    fns = [loss_fns] * len(models) if callable(loss_fns) else list(loss_fns)
    batches_list = list(batches_list)
    if len(fns) != len(models) or len(batches_list) != len(models):
        raise MergeError(f"localize_and_stitch: got {len(models)} models, {len(fns)} loss "
                         f"functions and {len(batches_list)} batch iterables; give one of "
                         "each per model")
    check_compatible(base, models, other_name="finetuned_list")
    masks = [learn_masks(base, m, f, b, **kw).mask
             for m, f, b in zip(models, fns, batches_list)]
    return stitch(base, models, masks)
