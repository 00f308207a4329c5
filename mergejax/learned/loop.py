"""What the learned merges share: the calling convention, task batches, the entropy
objective, and a checkpointed optax loop that stops cleanly on a NaN loss.

**Calling convention** (AdaMerging, Surgery, WEMoE, Twin-Merging, ...)::

    method(base, models, *, apply_fn, batches, heads=None, ...)

* ``apply_fn(params, batch) -> outputs``: the user's model, any Flax/JAX function of a
  parameter pytree and one batch (a pytree of arrays). Its outputs are the logits, or the
  features that the per-task ``heads`` turn into logits.
* ``heads``: None, or one callable per task ``head(outputs) -> logits`` (frozen
  classification heads, as CLIP's zero-shot heads). `task_logits` applies them.
* ``batches``: one iterator per task (same order as ``models``) yielding that task's
  batches; each optimisation step draws one batch from every task (`TaskBatches`). Use
  ``itertools.cycle`` (or an infinite ``tf.data``/grain pipeline) for more steps than
  batches.

Sharded params work unchanged: every step is made of ``jax.jit``-compiled pure functions.

**Checkpoints** (`optimize`): with ``checkpoint_dir`` the loop saves its state (the learned
parameters, the optax state, the loss history) with orbax every ``checkpoint_every`` steps
and at the end, and resumes from the latest checkpoint found there. On resume the first
``step`` batches of every iterator are drawn and discarded, so a deterministic iterator
gives exactly the trajectory of an uninterrupted run. A non-finite loss (or non-finite
learned parameters) stops the loop with a `MergeError` naming the step and the last good
checkpoint, which is never overwritten by the bad state.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mergejax.tree import MergeError, PyTree, is_float

__all__ = [
    "LoopResult",
    "all_task_logits",
    "cached_adam",
    "check_task_batches",
    "floating_split",
    "sequential_task_value_and_grad",
    "summed_task_value_and_grad",
    "TaskBatches",
    "check_heads",
    "entropy",
    "optimize",
    "task_logits",
]

ApplyFn = Callable[[PyTree, Any], Any]
Head = Callable[[Any], jax.Array]


@functools.cache
def cached_adam(learning_rate: float) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)`` (betas 0.9, 0.999 as the references), one object per
    rate: jitted steps that take the optimizer as a static argument then reuse their
    compilation across repeated merges.

    Example::

        opt = cached_adam(1e-3)
    """
    return optax.adam(learning_rate)


def check_heads(heads: Sequence[Head] | None, num_tasks: int, name: str) -> None:
    """Raises `MergeError` unless ``heads`` is None or one callable per task.

    Example::

        check_heads([head_a, head_b], num_tasks=2, name="adamerging")
    """
    if heads is None:
        return
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise MergeError(f"{name}: heads must be a sequence of callables (one per task), "
                         f"got {type(heads).__name__}")
    if len(heads) != num_tasks:
        raise MergeError(f"{name}: got {len(heads)} heads for {num_tasks} models; give one "
                         "head per task, in the models' order")
    bad = [i for i, h in enumerate(heads) if not callable(h)]
    if bad:
        raise MergeError(f"{name}: heads {bad} are not callable (head(outputs) -> logits)")


def task_logits(apply_fn: ApplyFn, heads: Sequence[Head] | None, params: PyTree, batch: Any,
                task: int) -> jax.Array:
    """Task ``task``'s logits: ``heads[task](apply_fn(params, batch))``, or
    ``apply_fn(params, batch)`` without heads.

    Example::

        logits = task_logits(model_fn, heads, merged, images, 3)
    """
    outputs = apply_fn(params, batch)
    return outputs if heads is None else heads[task](outputs)


def all_task_logits(apply_fn: ApplyFn, heads: Sequence[Head] | None, params: PyTree,
                    task_batches: Sequence[Any], *, fuse: bool = True) -> list[jax.Array]:
    """Every task's logits for the same ``params``, one batch per task.

    With ``fuse=True`` and batches of the same structure and trailing shapes, the model
    runs once on their concatenation (one larger batch: bigger, faster matmuls) and its
    outputs are split back per task; this equals per-task calls for any ``apply_fn`` that
    treats examples independently (inference-mode models). ``fuse=False`` calls
    ``apply_fn`` once per task.

    Example::

        logits = all_task_logits(embed, heads, merged, (batch_a, batch_b))
    """
    batches = list(task_batches)
    shapes = [jax.tree.map(lambda x: jnp.shape(x)[1:], b) for b in batches]
    structures = [jax.tree.structure(b) for b in batches]
    fusable = fuse and len(batches) > 1 and all(
        st == structures[0] and sh == shapes[0] for st, sh in zip(structures, shapes))
    if not fusable:
        return [task_logits(apply_fn, heads, params, b, t) for t, b in enumerate(batches)]
    sizes = [jax.tree.leaves(b)[0].shape[0] for b in batches]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *batches)
    outputs = apply_fn(params, joined)
    bounds = np.cumsum(sizes)[:-1].tolist()
    parts = jax.tree.map(lambda y: jnp.split(y, bounds, axis=0), outputs)
    per_task = [jax.tree.map(lambda p, t=t: p[t], parts, is_leaf=lambda x: isinstance(x, list))
                for t in range(len(batches))]
    return [out if heads is None else heads[t](out) for t, out in enumerate(per_task)]


def summed_task_value_and_grad(apply_fn: ApplyFn,
                               task_losses: Sequence[Callable[[Any], jax.Array]],
                               params: PyTree, task_batches: Sequence[Any]
                               ) -> tuple[jax.Array, PyTree]:
    """``sum_t task_losses[t](apply_fn(params, batches[t]))`` and its gradient with respect
    to ``params``: one forward and backward per task (each task's batch at its own size,
    as the reference's per-task ``loss.backward()``), summed, inside one jit.

    The tasks are unrolled and chained by `jax.lax.optimization_barrier` (task t+1 starts
    from the gradient sum of tasks <= t). Measured on XLA:CPU (ViT-B/32, 16 images per
    task): unrolled, 2 tasks took 6.0-6.5 s against 10.7 s for a ``lax.scan`` over them
    and 7.1 s for two separate calls; with 8 tasks the compiled step still holds about 17
    models' worth of temporaries (a scan holds fewer, at 1.5-4x the time;
    `sequential_task_value_and_grad` holds one task's at the unrolled speed). Use inside
    ``jax.jit``.

    Example::

        losses = [lambda out, h=h: entropy(h(out)) for h in heads]
        loss, grads = summed_task_value_and_grad(embed, losses, merged, batches)
    """
    batches = list(task_batches)
    if len(task_losses) != len(batches):
        raise MergeError(f"got {len(task_losses)} task losses for {len(batches)} batches")
    total, grads = jnp.zeros(()), jax.tree.map(jnp.zeros_like, params)
    for b, loss_of_outputs in zip(batches, task_losses):
        params, b, total, grads = jax.lax.optimization_barrier((params, b, total, grads))
        loss, g = jax.value_and_grad(lambda q: loss_of_outputs(apply_fn(q, b)))(params)
        total, grads = total + loss, jax.tree.map(jnp.add, grads, g)
    return total, grads


def floating_split(params: PyTree) -> tuple[list[jax.Array], Callable[..., PyTree]]:
    """``(float_leaves, rebuild)``: the floating leaves of ``params`` (what a loss is
    differentiated in) and ``rebuild(leaves, other=None)``, the tree with those leaves
    replaced and the other leaves (step counters, integer buffers) kept, or replaced by
    ``other(leaf)`` (e.g. float0 zeros, to make a cotangent of ``params``).

    Example::

        leaves, rebuild = floating_split(params)
        grads = jax.grad(lambda fl: loss(rebuild(fl)))(leaves)
    """
    leaves, treedef = jax.tree.flatten(params)
    floating = [is_float(x) for x in leaves]

    def rebuild(float_leaves: Sequence[Any],
                other: Callable[[Any], Any] | None = None) -> PyTree:
        it = iter(float_leaves)
        return treedef.unflatten([next(it) if f else (x if other is None else other(x))
                                  for x, f in zip(leaves, floating)])

    return [x for x, f in zip(leaves, floating) if f], rebuild


def sequential_task_value_and_grad(apply_fn: ApplyFn,
                                   task_losses: Sequence[Callable[[Any], jax.Array]]
                                   ) -> Callable[[PyTree, Sequence[Any]], tuple[jax.Array,
                                                                                 list]]:
    """``value_and_grad(params, task_batches) -> (loss, grads)``: ``sum_t
    task_losses[t](apply_fn(params, batches[t]))`` and its gradient with respect to the
    floating leaves of ``params`` (a list, in `floating_split` order), one task at a
    time: a single compiled forward and backward (the task index is traced and picks the
    task's loss with `jax.lax.switch`) runs once per task and adds its gradient into a
    donated accumulator. Peak memory is one task's activations plus the params and the
    gradient sum, whatever the number of tasks; it is compiled once (per batch shape).
    Called outside ``jax.jit``; `summed_task_value_and_grad` is the in-jit version.

    Measured (`experiments.bench_learned`: AdaMerging on ViT-B/32, 8 tasks x 16 images,
    XLA:CPU): a step of 24.3-28.6 s at 6.4-6.9 GiB peak RSS (inputs included) and 20-27 s
    of compile, against 29.3 s, 11.1 GiB and 72 s with the tasks unrolled in one program.

    Example::

        losses = [lambda out, h=h: entropy(h(out)) for h in heads]
        loss, grads = sequential_task_value_and_grad(embed, losses)(merged, batches)
    """
    task_losses = list(task_losses)

    @functools.partial(jax.jit, donate_argnums=2)
    def add_task(params, batch, acc, task):
        float_leaves, rebuild = floating_split(params)
        loss, grads = jax.value_and_grad(lambda fl: jax.lax.switch(
            task, task_losses, apply_fn(rebuild(fl), batch)))(float_leaves)
        total, summed = acc
        return total + loss, [a + g for a, g in zip(summed, grads)]

    @jax.jit
    def zeros(params):
        return jnp.zeros(()), [jnp.zeros_like(x) for x in floating_split(params)[0]]

    def value_and_grad(params: PyTree, task_batches: Sequence[Any]) -> tuple[jax.Array, list]:
        batches = list(task_batches)
        if len(task_losses) != len(batches):
            raise MergeError(f"got {len(task_losses)} task losses for {len(batches)} batches")
        acc = zeros(params)
        for t, batch in enumerate(batches):
            acc = add_task(params, batch, acc, jnp.int32(t))
        return acc

    return value_and_grad


def entropy(logits: jax.Array) -> jax.Array:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the last axis: AdaMerging's
    test-time objective (Yang et al. 2024, arXiv 2310.02575, eq. 5).

    Example::

        entropy(jnp.zeros((4, 10)))   # log(10)
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                              axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def check_task_batches(batches: Any, num_tasks: int, name: str) -> None:
    """Raises `MergeError` unless ``batches`` is a sequence of ``num_tasks`` iterables.

    Example::

        check_task_batches([batches_a, batches_b], num_tasks=2, name="task_grams")
    """
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
        raise MergeError(f"{name}: batches must be a sequence of iterables, one per task, "
                         f"got {type(batches).__name__}")
    if len(batches) != num_tasks:
        raise MergeError(f"{name}: got {len(batches)} batch iterables for {num_tasks} "
                         "models; give one per task, in the models' order")


class TaskBatches:
    """One batch per task per step from K iterators, with a clear error when one runs dry.

    Example::

        draw = TaskBatches([iter(a), iter(b)], "adamerging")
        batch_a, batch_b = draw(step=0)
    """

    def __init__(self, batches: Sequence[Iterable[Any]], name: str, num_tasks: int):
        check_task_batches(batches, num_tasks, name)
        self._iterators: list[Iterator[Any]] = [iter(b) for b in batches]
        self._name = name
        self._peeked: tuple[Any, ...] | None = None

    def peek(self) -> tuple[Any, ...]:
        """The first step's batches, drawn now and returned again by the next call (to
        trace a model on real shapes before the loop starts)."""
        if self._peeked is None:
            self._peeked = self(0)
        return self._peeked

    def __call__(self, step: int) -> tuple[Any, ...]:
        if self._peeked is not None:
            out, self._peeked = self._peeked, None
            return out
        out = []
        for t, it in enumerate(self._iterators):
            try:
                out.append(next(it))
            except StopIteration:
                raise MergeError(
                    f"{self._name}: task {t}'s batches ran out at step {step}; give "
                    "iterators with at least `steps` batches (e.g. itertools.cycle)") from None
        return tuple(out)


class LoopResult(NamedTuple):
    """What `optimize` returns: the final learned state and the loss at every step
    (evaluated before that step's update)."""

    state: PyTree
    losses: np.ndarray


def _finite(tree: PyTree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


def _manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1,
                                             create=True),
        item_handlers=ocp.StandardCheckpointHandler())


def optimize(step_fn: Callable[[PyTree, tuple[Any, ...]], tuple[PyTree, jax.Array]],
             state: PyTree, draw: TaskBatches, *, steps: int, name: str,
             checkpoint_dir: str | None = None, checkpoint_every: int = 100,
             log_every: int = 0) -> LoopResult:
    """Runs ``state, loss = step_fn(state, draw(step))`` for ``steps`` steps.

    ``step_fn`` is a jitted pure function (it compiles once: the batches of every step must
    have the same shapes). ``state`` is a pytree of arrays (learned parameters and optax
    state). Checkpointing, resuming and the NaN guard are described in the module
    docstring; ``log_every > 0`` logs the loss every that many steps.

    Example::

        result = optimize(step, (coefficients, opt.init(coefficients)), draw, steps=500,
                          name="adamerging", checkpoint_dir="/tmp/ada")
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise MergeError(f"{name}: steps must be a positive int, got {steps!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise MergeError(f"{name}: checkpoint_every must be a positive int, got "
                         f"{checkpoint_every!r}")
    losses = np.full((steps,), np.nan, np.float32)
    start = 0
    manager = _manager(checkpoint_dir) if checkpoint_dir else None
    if manager is not None and manager.latest_step() is not None:
        start = int(manager.latest_step())
        if start > steps:
            raise MergeError(f"{name}: the checkpoint in {checkpoint_dir} is at step {start}, "
                             f"past steps={steps}")
        saved = manager.item_metadata(start)["losses"].shape  # an earlier run's `steps`
        target = {"state": jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                  "losses": jax.ShapeDtypeStruct(saved, np.float32)}
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
        state = restored["state"]
        losses[:start] = np.asarray(restored["losses"])[:start]
        logging.info("%s: resumed from step %d in %s", name, start, checkpoint_dir)
        for s in range(start):
            draw(s)
    last_good = start if manager is not None and start else None
    try:
        for step in range(start, steps):
            new_state, loss = step_fn(state, draw(step))
            loss = float(loss)
            if not np.isfinite(loss) or not _finite(new_state):
                where = (f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
                         if last_good is not None else "no checkpoint was written")
                what = f"loss {loss}" if not np.isfinite(loss) else "non-finite parameters"
                raise MergeError(f"{name}: {what} at step {step}; stopped ({where})")
            state, losses[step] = new_state, loss
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                logging.info("%s: step %d/%d, loss %.6f", name, step + 1, steps, loss)
            if manager is not None and ((step + 1) % checkpoint_every == 0
                                        or step + 1 == steps):
                manager.save(step + 1, args=ocp.args.StandardSave(
                    {"state": state, "losses": losses}))
                manager.wait_until_finished()
                last_good = step + 1
    finally:
        if manager is not None:
            manager.close()
    return LoopResult(state, losses)
