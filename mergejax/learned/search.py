"""Gradient-free search: CMA-ES in pure JAX, as one call or as an ask/tell loop.

CMA-ES (Hansen & Ostermeier 2001; the update equations and default constants of Hansen,
"The CMA Evolution Strategy: A Tutorial", arXiv 1604.00772, Table 1 and Fig. 6) samples
``popsize`` candidates ``x_k = m + sigma * B D z_k``, ``z_k ~ N(0, I)``, ranks them by
fitness (lower is better) and moves the mean to the weighted average of the best ``mu``;
the covariance ``C = B D^2 B^T`` learns from the evolution path (rank-one update) and the
selected steps (rank-mu update), and ``sigma`` follows cumulative step-size adaptation.
Only positive recombination weights are used (the classic ``(mu/mu_w, lambda)`` form of
the tutorial's Eq. 49; no active negative update), ``c_m = 1``, and ``C`` is
eigendecomposed every generation (the problems here are small).

Bounds: each sample is clipped into the box before it is evaluated, and the distribution
is updated with the clipped points (repair by projection, "Lamarckian"), so the mean (a
convex combination of clipped points) never leaves the box. pycma's default
``BoundTransform`` and nevergrad's bounded parametrisations differ from this.

Two ways to run it:

* `cma_es` runs ``steps`` generations. With ``vectorized=True`` the whole run is one
  compiled ``lax.scan`` with the fitness ``jax.vmap``-ed over the population (the fitness
  must be a pure JAX function; arrays it closes over become constants of the compiled
  program, so for large models use the ask/tell loop). With ``vectorized=False`` the
  fitness is any Python callable returning a float, called once per candidate.
* `CMAES` exposes ``init``/``ask``/``tell`` (each jit-compiled) for custom loops, e.g.
  evaluating a population in batches on a large model.

Both give the same result for the same key.

Example::

    from mergejax.learned.search import cma_es

    result = cma_es(lambda x: jnp.sum((x - 3.0) ** 2), jnp.zeros(5), 1.0, steps=80,
                    key=jax.random.key(0))
    result.x, result.fitness
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax.tree import MergeError

__all__ = ["CMAES", "CMAState", "SearchResult", "ask_tell_loop", "check_steps", "cma_es",
           "default_popsize"]

Array = jax.Array
Bounds = tuple[Any, Any] | None


class CMAState(NamedTuple):
    """The search distribution and the best point seen so far.

    Attributes:
      mean: the distribution mean ``m`` (dim,).
      sigma: the step size.
      cov: the covariance matrix ``C`` (dim, dim).
      p_sigma: the conjugate evolution path (step-size control).
      p_c: the evolution path (rank-one update).
      basis: eigenvectors ``B`` of ``C`` (columns).
      scales: square roots ``D`` of the eigenvalues of ``C``.
      generation: the number of completed ``tell`` calls.
      best_x: the best evaluated (clipped) candidate so far.
      best_fitness: its fitness (inf before the first ``tell``).
    """

    mean: Array
    sigma: Array
    cov: Array
    p_sigma: Array
    p_c: Array
    basis: Array
    scales: Array
    generation: Array
    best_x: Array
    best_fitness: Array


class SearchResult(NamedTuple):
    """What `cma_es` found.

    Attributes:
      x: the best evaluated candidate.
      fitness: its fitness.
      history: the fitness of every candidate, (steps, popsize), in evaluation order.
      state: the final `CMAState` (``state.mean`` is the distribution's own estimate).
    """

    x: Array
    fitness: Array
    history: Array
    state: CMAState


def default_popsize(dim: int) -> int:
    """Hansen's default population size ``4 + floor(3 ln dim)``."""
    return 4 + math.floor(3 * math.log(dim))


def _as_bound(value: Any, dim: int, name: str) -> tuple[float, ...]:
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        arr = np.full(dim, float(arr))
    if arr.shape != (dim,):
        raise MergeError(f"bounds: {name} must be a number or {dim} numbers (one per "
                         f"dimension), got shape {arr.shape}")
    return tuple(float(v) for v in arr)


@dataclasses.dataclass(frozen=True)
class CMAES:
    """A CMA-ES strategy: the problem size, population and learning rates (all static).

    Build it with `CMAES.create`; the constants are those of Hansen's tutorial
    (arXiv 1604.00772, Table 1) for positive weights. Hashable, so it is a static
    argument of the compiled ``ask``/``tell``.

    Example::

        strategy = CMAES.create(dim=4, bounds=(-1.5, 1.5))
        state = strategy.init(jnp.zeros(4), sigma0=0.5)
        for key in jax.random.split(jax.random.key(0), 30):
            population = strategy.ask(state, key)
            state = strategy.tell(state, population, jax.vmap(fitness)(population))
        state.best_x
    """

    dim: int
    popsize: int
    weights: tuple[float, ...]
    mu_eff: float
    c_sigma: float
    d_sigma: float
    c_c: float
    c_1: float
    c_mu: float
    chi_n: float
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None

    @classmethod
    def create(cls, dim: int, popsize: int | None = None, bounds: Bounds = None) -> CMAES:
        """The default strategy for ``dim`` parameters.

        ``popsize`` defaults to ``4 + floor(3 ln dim)`` and ``mu = popsize // 2`` parents
        get weights ``ln((popsize + 1) / 2) - ln(i)``, normalised to sum to 1. ``bounds``
        is None or ``(lower, upper)``, each a number or one number per dimension.
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise MergeError(f"CMA-ES needs at least one parameter, got dim={dim!r}")
        popsize = default_popsize(dim) if popsize is None else popsize
        if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 2:
            raise MergeError(f"popsize must be an int >= 2, got {popsize!r}")
        mu = popsize // 2
        raw = np.log((popsize + 1) / 2) - np.log(np.arange(1, mu + 1))
        w = raw / raw.sum()
        mu_eff = float(1.0 / np.sum(w ** 2))
        n = float(dim)
        c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
        d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
        c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
        c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
        c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
        chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        lower = upper = None
        if bounds is not None:
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise MergeError(f"bounds must be None or (lower, upper), got {bounds!r}")
            lower = _as_bound(bounds[0], dim, "lower")
            upper = _as_bound(bounds[1], dim, "upper")
            bad = [i for i in range(dim) if not lower[i] < upper[i]]
            if bad:
                i = bad[0]
                raise MergeError(f"bounds: lower must be below upper in every dimension; "
                                 f"dimension {i} has [{lower[i]}, {upper[i]}]")
        return cls(dim=dim, popsize=popsize, weights=tuple(float(v) for v in w),
                   mu_eff=mu_eff, c_sigma=c_sigma, d_sigma=d_sigma, c_c=c_c, c_1=c_1,
                   c_mu=c_mu, chi_n=chi_n, lower=lower, upper=upper)

    @property
    def mu(self) -> int:
        """The number of parents (candidates that move the mean)."""
        return len(self.weights)

    def init(self, x0: Any, sigma0: float) -> CMAState:
        """The initial state: mean ``x0``, step size ``sigma0``, ``C = I``."""
        dtype = jnp.result_type(float)
        x = np.asarray(x0, np.float64)
        if x.shape != (self.dim,):
            raise MergeError(f"x0 must be a vector of {self.dim} numbers, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise MergeError("x0 has non-finite entries")
        if not (isinstance(sigma0, (int, float, np.floating)) and math.isfinite(sigma0)
                and sigma0 > 0):
            raise MergeError(f"sigma0 must be a positive number, got {sigma0!r}")
        if self.lower is not None:
            outside = np.flatnonzero((x < np.asarray(self.lower))
                                     | (x > np.asarray(self.upper)))
            if outside.size:
                i = outside[0]
                raise MergeError(f"x0[{i}] = {x[i]} lies outside the bounds "
                                 f"[{self.lower[i]}, {self.upper[i]}]")
        n = self.dim
        mean = jnp.asarray(x, dtype)
        return CMAState(mean=mean, sigma=jnp.asarray(sigma0, dtype),
                        cov=jnp.eye(n, dtype=dtype), p_sigma=jnp.zeros(n, dtype),
                        p_c=jnp.zeros(n, dtype), basis=jnp.eye(n, dtype=dtype),
                        scales=jnp.ones(n, dtype), generation=jnp.asarray(0, jnp.int32),
                        best_x=mean, best_fitness=jnp.asarray(jnp.inf, dtype))

    def ask(self, state: CMAState, key: Array) -> Array:
        """``popsize`` candidates ``clip(m + sigma B D z)``, (popsize, dim)."""
        return _ask(self, state, key)

    def tell(self, state: CMAState, population: Array, fitness: Array) -> CMAState:
        """The state after ranking ``population`` by ``fitness`` (lower is better; NaN
        counts as +inf)."""
        fitness = jnp.asarray(fitness)
        if fitness.shape != (self.popsize,):
            raise MergeError(f"tell needs one fitness value per candidate ({self.popsize}), "
                             f"got shape {fitness.shape}")
        return _tell(self, state, population, fitness)

    def clip(self, x: Array) -> Array:
        """``x`` projected into the bounds (unchanged without bounds)."""
        if self.lower is None:
            return x
        return jnp.clip(x, jnp.asarray(self.lower, x.dtype), jnp.asarray(self.upper, x.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _ask(strategy: CMAES, state: CMAState, key: Array) -> Array:
    z = jax.random.normal(key, (strategy.popsize, strategy.dim), state.mean.dtype)
    y = (z * state.scales) @ state.basis.T
    return strategy.clip(state.mean + state.sigma * y)


@functools.partial(jax.jit, static_argnums=0)
def _tell(strategy: CMAES, state: CMAState, population: Array, fitness: Array) -> CMAState:
    s = strategy
    dtype = state.mean.dtype
    population = population.astype(dtype)
    fitness = jnp.where(jnp.isnan(fitness), jnp.inf, fitness).astype(dtype)
    order = jnp.argsort(fitness)
    w = jnp.asarray(s.weights, dtype)
    selected = population[order[:s.mu]]
    steps = (selected - state.mean) / state.sigma
    y_w = w @ steps
    mean = state.mean + state.sigma * y_w

    inv_sqrt_c_y = state.basis @ ((state.basis.T @ y_w) / state.scales)
    p_sigma = ((1 - s.c_sigma) * state.p_sigma
               + math.sqrt(s.c_sigma * (2 - s.c_sigma) * s.mu_eff) * inv_sqrt_c_y)
    generation = state.generation + 1
    norm_p_sigma = jnp.linalg.norm(p_sigma)
    correction = jnp.sqrt(1 - (1 - s.c_sigma) ** (2 * generation.astype(dtype)))
    h_sigma = (norm_p_sigma / correction < (1.4 + 2 / (s.dim + 1)) * s.chi_n).astype(dtype)
    p_c = ((1 - s.c_c) * state.p_c
           + h_sigma * math.sqrt(s.c_c * (2 - s.c_c) * s.mu_eff) * y_w)
    delta_h = (1 - h_sigma) * s.c_c * (2 - s.c_c)
    rank_mu = (steps * w[:, None]).T @ steps
    cov = ((1 + s.c_1 * delta_h - s.c_1 - s.c_mu) * state.cov
           + s.c_1 * jnp.outer(p_c, p_c) + s.c_mu * rank_mu)
    cov = (cov + cov.T) / 2
    sigma = state.sigma * jnp.exp((s.c_sigma / s.d_sigma) * (norm_p_sigma / s.chi_n - 1))
    eigenvalues, basis = jnp.linalg.eigh(cov)
    scales = jnp.sqrt(jnp.maximum(eigenvalues, jnp.finfo(dtype).tiny))

    best = order[0]
    improved = fitness[best] < state.best_fitness
    return CMAState(mean=mean, sigma=sigma, cov=cov, p_sigma=p_sigma, p_c=p_c,
                    basis=basis, scales=scales, generation=generation,
                    best_x=jnp.where(improved, population[best], state.best_x),
                    best_fitness=jnp.where(improved, fitness[best], state.best_fitness))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(strategy: CMAES, fitness: Callable[[Array], Array], steps: int, state: CMAState,
         key: Array) -> tuple[CMAState, Array]:
    """``steps`` generations in one ``lax.scan``, the fitness vmapped over candidates."""

    def generation(state, key):
        population = _ask(strategy, state, key)
        values = jax.vmap(fitness)(population)
        return _tell(strategy, state, population, values), values

    return lax.scan(generation, state, jax.random.split(key, steps))


def check_steps(steps: Any) -> None:
    """Raises `MergeError` unless ``steps`` (generations) is a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MergeError(f"steps must be a positive int (generations), got {steps!r}")


def cma_es(fitness: Callable[[Array], Any], x0: Any, sigma0: float, steps: int,
           key: Array, popsize: int | None = None, bounds: Bounds = None, *,
           vectorized: bool = True) -> SearchResult:
    """Minimises ``fitness(x)`` over vectors ``x`` with CMA-ES for ``steps`` generations
    (``steps * popsize`` evaluations).

    Args:
      fitness: ``x (dim,) -> scalar``, lower is better. With ``vectorized=True`` a pure
        JAX function (vmapped over the population and compiled; the compiled run is cached
        per fitness function, so calling again with the same function does not recompile);
        otherwise any Python callable returning a number.
      x0: the initial mean, (dim,). sigma0: the initial step size (Hansen: the optimum
        should lie within about ``x0 +- 3 sigma0``).
      steps: generations. key: a ``jax.random`` key (one split per generation).
      popsize: candidates per generation, default ``4 + floor(3 ln dim)``.
      bounds: None or ``(lower, upper)``; samples are clipped into the box (see the
        module docstring).
      vectorized: compile the whole run (True) or call ``fitness`` per candidate (False).

    Returns the best evaluated candidate, its fitness, every evaluation's fitness and the
    final state. Reproducible for a fixed key; both modes give the same result.

    Example::

        rosenbrock = lambda x: jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
        result = cma_es(rosenbrock, jnp.zeros(2), 0.5, steps=150, key=jax.random.key(0))
    """
    x = np.asarray(x0)
    if x.ndim != 1:
        raise MergeError(f"x0 must be a vector (1-D), got shape {x.shape}")
    check_steps(steps)
    strategy = CMAES.create(x.shape[0], popsize, bounds)
    state = strategy.init(x, sigma0)
    if vectorized:
        values = jax.eval_shape(jax.vmap(fitness),
                                jax.ShapeDtypeStruct((strategy.popsize, strategy.dim),
                                                     state.mean.dtype))
        shape = getattr(values, "shape", None)
        if shape != (strategy.popsize,):
            one = shape[1:] if shape else type(values).__name__
            raise MergeError(f"fitness must return a scalar per candidate, got {one}")
        state, history = _run(strategy, fitness, steps, state, key)
    else:
        state, history = ask_tell_loop(
            strategy, state, jax.random.split(key, steps),
            lambda population: [fitness(c) for c in population])
    return SearchResult(x=state.best_x, fitness=state.best_fitness, history=history,
                        state=state)


def ask_tell_loop(strategy: CMAES, state: CMAState, keys: Array,
                  evaluate: Callable[[Array], Sequence[Any] | Array]
                  ) -> tuple[CMAState, Array]:
    """Runs one generation per key in Python: ``evaluate(population)`` returns the
    ``popsize`` fitness values (numbers or an array). Returns the final state and the
    (generations, popsize) fitness history.

    Example::

        state, history = ask_tell_loop(strategy, state, jax.random.split(key, 10),
                                       lambda pop: [float(loss(x)) for x in pop])
    """
    history = []
    for key in keys:
        population = strategy.ask(state, key)
        values = jnp.asarray(np.asarray(evaluate(population), np.float64), state.mean.dtype)
        state = strategy.tell(state, population, values)
        history.append(values)
    return state, jnp.stack(history)
