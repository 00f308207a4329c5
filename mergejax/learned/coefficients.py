"""Merges whose coefficients are learned: AdaMerging (gradient, entropy on unlabeled test
data), AdaMerging++ (the same on TIES-processed task vectors) and an evolutionary search
(CMA-ES on a user's fitness).

**Coefficients.** ``theta = theta_0 + sum_k lambda[g(leaf), k] tau_k`` per floating leaf,
where ``g`` maps a leaf to its coefficient group (`coefficient_groups`):

* ``granularity="task"``: one group, ``lambda`` of shape ``(1, K)`` (task-wise AdaMerging);
* ``granularity="layer"``: with ``groups=None`` every floating leaf is its own group (one
  coefficient per parameter tensor and task, as FusionBench's ``LayerWiseMergedModel`` and
  the official code); ``groups=[regex, ...]`` puts leaves whose path matches a regex
  (``re.search``) in the group named by the matched text, so ``r"resblocks_\\d+"`` gives one
  group per transformer block; leaves no regex matches keep a group each.

Non-floating leaves come from the base. ``method="task_arithmetic"`` (default) is the
formula above, computed directly. Any other registered merge whose per-model coefficient
``coefficient`` (default ``"weights"``) is differentiable can be learned instead: each
group's ``lambda[g]`` becomes that method's per-model coefficient on the group's leaves
(e.g. ``method="ties"`` learns TIES's weights layer by layer).

Example::

    result = mergejax.adamerging(base, finetuned, apply_fn=features, heads=heads,
                                 batches=[itertools.cycle(b) for b in test_batches],
                                 steps=500)
    result.params, result.coefficients
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax import registry
from mergejax.learned import loop
from mergejax.learned.search import CMAES, ask_tell_loop, check_steps
from mergejax.methods import sparse
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    is_float,
)

__all__ = [
    "AdaMergingResult",
    "CoefficientGroups",
    "EvolutionaryResult",
    "adamerging",
    "adamerging_pp",
    "adamerging_step",
    "coefficient_groups",
    "evolutionary",
    "merge_with_coefficients",
    "ties_processed_models",
]

ADAMERGING_PAPER = ("Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task "
                    "Learning (arXiv 2310.02575)")
EVOLUTIONARY_PAPER = ("Akiba et al. 2025, Evolutionary Optimization of Model Merging Recipes "
                      "(arXiv 2403.13187), parameter-space search")
GRANULARITIES = ("task", "layer")


class CoefficientGroups(NamedTuple):
    """Which coefficient group each floating leaf uses.

    Attributes:
      names: one name per group (a leaf path, a regex match, or "all").
      index: one entry per leaf of the tree (in ``jax.tree.leaves`` order): the group of
        a floating leaf, or None for leaves taken from the base.
    """

    names: tuple[str, ...]
    index: tuple[int | None, ...]


def coefficient_groups(base: PyTree, granularity: str = "layer",
                       groups: Sequence[str] | None = None) -> CoefficientGroups:
    """The coefficient groups of ``base``'s floating leaves (module docstring).

    Example::

        coefficient_groups(params, "layer", [r"resblocks_\\d+"]).names
        # ('conv1/kernel', ..., 'resblocks_0', 'resblocks_1', ...)
    """
    if granularity not in GRANULARITIES:
        raise MergeError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if groups is not None and granularity == "task":
        raise MergeError("groups= only applies to granularity='layer'")
    if isinstance(groups, str):
        groups = [groups]
    patterns = []
    for g in groups or ():
        try:
            patterns.append(re.compile(g))
        except (re.error, TypeError) as e:
            raise MergeError(f"groups: {g!r} is not a regular expression ({e})") from None
    paths, leaves, _ = flatten_with_paths(base)
    names: dict[str, int] = {}
    index: list[int | None] = []
    for path, leaf in zip(paths, leaves):
        if not is_float(leaf):
            index.append(None)
            continue
        name = "all" if granularity == "task" else path
        for pattern in patterns:
            found = pattern.search(path)
            if found:
                name = found.group(0)
                break
        index.append(names.setdefault(name, len(names)))
    if not names:
        raise MergeError("the base has no floating leaves, so there is nothing to merge")
    unused = [g for g, p in zip(groups or (), patterns)
              if not any(p.search(path) for path in paths)]
    if unused:
        raise MergeError(f"groups {unused} match no leaf path")
    return CoefficientGroups(tuple(names), tuple(index))


def _check_method(method: str, coefficient: str) -> Any:
    m = registry.get_method(method)
    if method == "task_arithmetic":
        return m
    learnable = set(getattr(m, "coefficients", ())) & set(getattr(m, "per_model", ()))
    if coefficient not in learnable:
        raise MergeError(f"{method!r} has no differentiable per-model coefficient "
                         f"{coefficient!r}; learnable ones: {sorted(learnable)}")
    return m


def merge_with_coefficients(base: PyTree, models: Sequence[PyTree], coefficients: jax.Array,
                            groups: CoefficientGroups, *, method: str = "task_arithmetic",
                            coefficient: str = "weights",
                            method_hparams: Mapping[str, Any] | None = None) -> PyTree:
    """The merged params for coefficients ``(G, K)`` (pure; differentiable in
    ``coefficients``; usable inside ``jax.jit``). Leaves keep the base's dtypes.

    Example::

        groups = coefficient_groups(base, "task")
        merged = merge_with_coefficients(base, fts, jnp.full((1, len(fts)), 0.3), groups)
    """
    coefficients = jnp.asarray(coefficients)
    if coefficients.shape != (len(groups.names), len(models)):
        raise MergeError(f"coefficients must have shape (groups, models) = "
                         f"{(len(groups.names), len(models))}, got {coefficients.shape}")
    if method != "task_arithmetic":
        m = _check_method(method, coefficient)
        paths = flatten_with_paths(base)[0]
        by_path = {p: g for p, g in zip(paths, groups.index) if g is not None}
        per_leaf = lambda path, leaf: coefficients[by_path[path]]  # noqa: E731
        return m(base, models, **{**dict(method_hparams or {}), coefficient: per_leaf})
    leaves, treedef = jax.tree.flatten(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    out = []
    for i, (b, g) in enumerate(zip(leaves, groups.index)):
        out.append(b if g is None else
                   _task_arithmetic_leaf(b, tuple(ml[i] for ml in model_leaves),
                                         coefficients[g]))
    return treedef.unflatten(out)


@jax.checkpoint
def _task_arithmetic_leaf(b: jax.Array, ms: tuple[jax.Array, ...], lam: jax.Array
                          ) -> jax.Array:
    """``b + sum_k lam_k (m_k - b)`` in float32 or wider. Rematerialised
    (`jax.checkpoint`): the backward pass recomputes ``m_k - b`` from the inputs instead of
    keeping K task vectors alive between the forward and backward passes."""
    wide = jnp.promote_types(b.dtype, jnp.float32)  # bf16 -> f32, f64 stays
    bw = b.astype(wide)
    delta = sum(lam[k].astype(wide) * (m.astype(wide) - bw) for k, m in enumerate(ms))
    return (bw + delta).astype(b.dtype)


class AdaMergingResult(NamedTuple):
    """What `adamerging` learned.

    Attributes:
      params: the merged params at the final coefficients.
      coefficients: ``(G, K)`` float32, one row per coefficient group.
      groups: the `CoefficientGroups` (``groups.names[g]`` names row ``g``).
      losses: the summed entropy at every step (before that step's update).
    """

    params: PyTree
    coefficients: jax.Array
    groups: CoefficientGroups
    losses: np.ndarray


def _check_bounds(clip: Any) -> tuple[float, float] | None:
    if clip is None or clip is False:
        return None
    if clip is True:
        return (0.0, 1.0)
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise MergeError(f"clip must be None, True (= (0, 1)) or (low, high), got {clip!r}") \
            from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise MergeError(f"clip must be finite with low < high, got {clip!r}")
    return lo, hi


TASK_MODES = ("sequential", "unrolled", "fused")


def adamerging_step(apply_fn: Callable[[PyTree, Any], Any],
                    heads: Sequence[Callable[[Any], jax.Array]] | None,
                    groups: CoefficientGroups, *, optimizer: optax.GradientTransformation,
                    clip: Any = None, method: str = "task_arithmetic",
                    coefficient: str = "weights",
                    method_hparams: Mapping[str, Any] | None = None,
                    tasks: str = "sequential") -> Callable[..., Any]:
    """AdaMerging's step, for custom loops:
    ``(coefficients, opt_state), loss = step((coefficients, opt_state), task_batches, base,
    models)``: merge, run every task's batch, sum the entropies, differentiate with respect
    to the ``(G, K)`` coefficients, apply the ``optimizer``'s update (and the ``clip``
    projection). ``base`` and ``models`` are arguments, not constants of the programs.

    The summed gradient in the merged params is pulled back through the merge once.
    ``tasks`` says how the tasks' forward and backward passes run (the same numbers):

    * ``"sequential"`` (default): one compiled forward and backward, run once per task
      (`loop.sequential_task_value_and_grad`, as the reference's per-task
      ``loss.backward()``), between a compiled merge and a compiled pull-back and update.
      Peak memory holds one task's activations, whatever the number of tasks.
    * ``"unrolled"``: the whole step is one ``jax.jit`` program with the tasks unrolled
      (`loop.summed_task_value_and_grad`). On XLA:CPU it holds about two models' worth of
      temporaries per task (ViT-B/32, 8 tasks: 5.9 GiB), compiles longer and is not
      faster (measured: 29.3 s and 11.1 GiB peak against 28.6 s and 6.4 GiB).
    * ``"fused"``: one ``jax.jit`` program running the model once on all tasks' batches
      concatenated (`loop.all_task_logits`; the same numbers for a model that treats
      examples independently); it holds every task's activations at once.

    Example::

        groups = coefficient_groups(base, "layer")
        step = adamerging_step(embed, heads, groups, optimizer=optax.adam(1e-3))
        lam = jnp.full((len(groups.names), len(fts)), 0.3)
        (lam, opt_state), loss = step((lam, optax.adam(1e-3).init(lam)), batches, base, fts)
    """
    bounds = _check_bounds(clip)
    if tasks not in TASK_MODES:
        raise MergeError(f"tasks must be one of {TASK_MODES}, got {tasks!r}")

    def merged(lam, base, models):
        return merge_with_coefficients(base, models, lam, groups, method=method,
                                       coefficient=coefficient, method_hparams=method_hparams)

    def task_losses(k):
        if heads is None:
            return [loop.entropy] * k
        return [lambda out, head=head: loop.entropy(head(out)) for head in heads]

    def update(state, float_grads, base, models):
        """Pulls the gradient in the merged params' floating leaves back to the
        coefficients (the other leaves are the base's) and applies the optimiser."""
        lam, opt_state = state
        params, merge_vjp = jax.vjp(lambda lam: merged(lam, base, models), lam)
        _, rebuild = loop.floating_split(params)
        (grad,) = merge_vjp(rebuild(float_grads, lambda x: np.zeros(np.shape(x),
                                                                    jax.dtypes.float0)))
        updates, opt_state = optimizer.update(grad, opt_state, lam)
        lam = optax.apply_updates(lam, updates)
        if bounds is not None:
            lam = jnp.clip(lam, *bounds)
        return lam, opt_state

    if tasks == "sequential":
        merge_fn, update_fn = jax.jit(merged), jax.jit(update)
        value_and_grad = functools.cache(lambda k: loop.sequential_task_value_and_grad(
            apply_fn, task_losses(k)))  # compiled once per number of tasks

        def sequential_step(state, task_batches, base, models):
            loss, grads = value_and_grad(len(task_batches))(
                merge_fn(state[0], base, models), task_batches)
            return update_fn(state, grads, base, models), loss

        return sequential_step

    @jax.jit
    def step(state, task_batches, base, models):
        params = merged(state[0], base, models)
        float_leaves, rebuild = loop.floating_split(params)
        if tasks == "fused":
            loss, grads = jax.value_and_grad(lambda fl: sum(
                loop.entropy(logits) for logits in loop.all_task_logits(
                    apply_fn, heads, rebuild(fl), task_batches, fuse=True)))(float_leaves)
        else:
            loss, grads = loop.summed_task_value_and_grad(
                lambda fl, b: apply_fn(rebuild(fl), b), task_losses(len(task_batches)),
                float_leaves, task_batches)
        return update(state, grads, base, models), loss

    return step


def adamerging(base: PyTree, models: Sequence[PyTree], *,
               apply_fn: Callable[[PyTree, Any], Any] = registry.REQUIRED,
               batches: Sequence[Iterable[Any]] = registry.REQUIRED,
               heads: Sequence[Callable[[Any], jax.Array]] | None = None,
               granularity: str = "layer", groups: Sequence[str] | None = None,
               init: float = 0.3, steps: int = 500, learning_rate: float = 1e-3,
               optimizer: optax.GradientTransformation | None = None,
               clip: Any = None, method: str = "task_arithmetic",
               coefficient: str = "weights", method_hparams: Mapping[str, Any] | None = None,
               tasks: str = "sequential", checkpoint_dir: str | None = None,
               checkpoint_every: int = 100, log_every: int = 0) -> AdaMergingResult:
    """AdaMerging (Yang et al. 2024, arXiv 2310.02575): learns the merge coefficients by
    minimising ``sum_t entropy(softmax(logits_t))`` on unlabeled test batches of every
    task, with optax. Each step merges (compiled), runs the model on every task's batch
    and differentiates (compiled once, run per task by default: ``tasks``), then pulls the
    gradient back to the coefficients and updates them (compiled).

    Args follow `mergejax.learned.loop`'s convention (``apply_fn``, ``heads``,
    ``batches``); coefficient groups and ``method`` are in the module docstring.
    Defaults match the paper's code and FusionBench's ``adamerging`` config: coefficients
    initialised at ``init=0.3``, Adam with ``learning_rate=1e-3`` (``optimizer`` replaces
    it), ``granularity="layer"`` with one coefficient per tensor. FusionBench runs 1000
    steps (``max_steps``), the paper 500. ``clip=(0, 1)`` (or True) projects the
    coefficients into the box after every update (FusionBench's ``clamp_weights`` clamps
    them inside the forward instead; both keep the merge inside the box).
    ``tasks`` is `adamerging_step`'s. ``checkpoint_dir`` saves and resumes
    coefficients and optimiser state with orbax
    (`loop.optimize`); a NaN loss stops with an error naming the last good checkpoint.

    Example::

        result = mergejax.adamerging(base, fts, apply_fn=embed, heads=heads,
                                     batches=[itertools.cycle(b) for b in test_inputs])
    """
    name = "adamerging"
    check_compatible(base, list(models))
    k = len(models)
    loop.check_heads(heads, k, name)
    draw = loop.TaskBatches(batches, name, k)
    if not callable(apply_fn):
        raise MergeError(f"{name}: apply_fn must be a function (params, batch) -> outputs")
    groups_ = coefficient_groups(base, granularity, groups)
    bounds = _check_bounds(clip)
    _check_method(method, coefficient)
    if not (isinstance(init, (int, float)) and np.isfinite(init)):
        raise MergeError(f"{name}: init must be a finite number, got {init!r}")
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    coefficients = jnp.full((len(groups_.names), k), float(init), jnp.float32)
    if bounds is not None:
        coefficients = jnp.clip(coefficients, *bounds)

    step = adamerging_step(apply_fn, heads, groups_, optimizer=opt, clip=bounds,
                           method=method, coefficient=coefficient,
                           method_hparams=method_hparams, tasks=tasks)
    models = list(models)
    result = loop.optimize(lambda state, b: step(state, b, base, models),
                           (coefficients, opt.init(coefficients)), draw, steps=steps,
                           name=name, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every, log_every=log_every)
    lam = result.state[0]
    params = jax.jit(lambda lam, base, models: merge_with_coefficients(
        base, models, lam, groups_, method=method, coefficient=coefficient,
        method_hparams=method_hparams))(lam, base, models)
    return AdaMergingResult(params, lam, groups_, result.losses)


def ties_processed_models(base: PyTree, models: Sequence[PyTree], *, density: float = 0.2,
                          scope: str = "global", topk: str = "fusionbench",
                          elect: str = "mass") -> list[PyTree]:
    """``theta_0 + tau_hat_k`` for every task, where ``tau_hat_k`` is TIES-processed
    (Yadav et al. 2023): trimmed to its top ``density`` magnitudes, then zeroed where its
    sign disagrees with the elected sign (`mergejax.methods.sparse.ties_task_vector`).
    AdaMerging++'s inputs (the official code: top-20% over the whole model per task, sign
    of the sum of the trimmed vectors).

    Example::

        processed = ties_processed_models(base, fts, density=0.2)
    """
    return [sparse.ties_task_vector(base, models, task=t, density=density, scope=scope,
                                    topk=topk, elect=elect) for t in range(len(models))]


def adamerging_pp(base: PyTree, models: Sequence[PyTree], *, density: float = 0.2,
                  **kwargs: Any) -> AdaMergingResult:
    """AdaMerging++ (Yang et al. 2024, arXiv 2310.02575): `adamerging` over TIES-processed
    task vectors (`ties_processed_models` with ``density``, the paper's top-20%). Every
    other argument is `adamerging`'s.

    Example::

        result = mergejax.adamerging_pp(base, fts, apply_fn=embed, heads=heads,
                                        batches=test_batches)
    """
    check_compatible(base, list(models))
    return adamerging(base, ties_processed_models(base, models, density=density), **kwargs)


class EvolutionaryResult(NamedTuple):
    """What `evolutionary` found.

    Attributes:
      params: the merged params at the best coefficients.
      coefficients: ``(G, K)``, the best evaluated candidate.
      fitness: its fitness (higher is better).
      groups: the `CoefficientGroups`.
      history: fitness of every candidate, ``(steps, popsize)``.
    """

    params: PyTree
    coefficients: jax.Array
    fitness: float
    groups: CoefficientGroups
    history: np.ndarray


def evolutionary(base: PyTree, models: Sequence[PyTree], *,
                 fitness: Callable[[PyTree], Any] = registry.REQUIRED,
                 key: jax.Array = registry.REQUIRED, granularity: str = "layer",
                 groups: Sequence[str] | None = None, init: float = 0.3,
                 sigma0: float = 0.1, steps: int = 20, popsize: int | None = None,
                 bounds: tuple[float, float] | None = (0.0, 1.0)) -> EvolutionaryResult:
    """Evolutionary merging in parameter space (Akiba et al. 2025, arXiv 2403.13187, whose
    parameter-space search optimises TIES/DARE weights with CMA-ES): CMA-ES
    (`mergejax.learned.search`) over the ``(G, K)`` task-arithmetic coefficients,
    maximising ``fitness(merged_params) -> float`` (e.g. validation accuracy).

    Each candidate is merged by one compiled function (no recompilation across
    candidates); ``steps`` generations of ``popsize`` candidates (default
    ``4 + 3 ln(G K)``). Samples are clipped into ``bounds``. Groups are as `adamerging`'s;
    keep ``G K`` small (per-block groups) for a sample-efficient search.

    Example::

        result = mergejax.evolutionary(base, fts, fitness=val_accuracy,
                                       groups=[r"resblocks_\\d+"], key=jax.random.key(0))
    """
    check_compatible(base, list(models))
    if not callable(fitness):
        raise MergeError("evolutionary: fitness must be a function params -> float")
    groups_ = coefficient_groups(base, granularity, groups)
    shape = (len(groups_.names), len(models))
    check_steps(steps)
    strategy = CMAES.create(int(np.prod(shape)), popsize, bounds)
    state = strategy.init(np.full(int(np.prod(shape)), float(init), np.float32), sigma0)
    models = list(models)
    merge = jax.jit(lambda x, base, models: merge_with_coefficients(
        base, models, x.reshape(shape), groups_))

    def evaluate(population):
        return [-float(fitness(merge(x, base, models))) for x in population]

    state, history = ask_tell_loop(strategy, state, jax.random.split(key, steps), evaluate)
    best = state.best_x.reshape(shape)
    return EvolutionaryResult(merge(state.best_x, base, models), best,
                              -float(state.best_fitness), groups_, -np.asarray(history))


# adamerging_pp takes every argument of adamerging, plus density (its registry entry and
# `inspect.signature` list them all).
adamerging_pp.__signature__ = inspect.signature(adamerging).replace(parameters=[
    *inspect.signature(adamerging).parameters.values(),
    inspect.Parameter("density", inspect.Parameter.KEYWORD_ONLY, default=0.2)])

for _fn, _paper in ((adamerging, ADAMERGING_PAPER),
                    (adamerging_pp, ADAMERGING_PAPER + ", AdaMerging++")):
    registry.register(registry.FunctionMethod(_fn.__name__, _fn, family="learned",
                                              paper=_paper))
registry.register(registry.FunctionMethod("evolutionary", evolutionary, family="learned",
                                          paper=EVOLUTIONARY_PAPER, uses_key=True))
