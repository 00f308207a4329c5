"""Model soups that search over ingredients with a user's evaluation function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax.method import REQUIRED
from mergejax.methods.basic import linear
from mergejax.tree import MergeError, PyTree

__all__ = ["GreedySoupResult", "greedy_soup", "greedy_soup_search"]


class GreedySoupResult(NamedTuple):
    """What `greedy_soup_search` found.

    Attributes:
      soup: the merged params.
      ingredients: indices of the kept models, in the order they were added.
      scores: each model's own held-out score.
    """

    soup: PyTree
    ingredients: list[int]
    scores: list[float]


def greedy_soup_search(models: Sequence[PyTree], evaluate: Callable[[PyTree], Any]
                       ) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, arXiv 2203.05482, Algorithm 1).

    Scores every model with ``evaluate(params) -> float`` (higher is better, e.g.
    held-out accuracy), then walks them from best to worst, adding a model to the uniform
    soup when that strictly raises the soup's score (the official code's ``>``; the
    paper's box writes ``>=``). The soup starts as the best single model; equal scores keep
    the models' order. Every candidate is a `linear` merge of all models with 0/1 weights,
    so the search compiles once; non-floating leaves come from the best model.

    Example::

        result = greedy_soup_search(finetuned, lambda p: accuracy(p, val_batch))
        soup, kept = result.soup, result.ingredients
    """
    models = list(models)
    if not models:
        raise MergeError("greedy_soup: models is empty; give at least one model")
    if not callable(evaluate):
        raise MergeError("greedy_soup needs evaluate: a function params -> score")
    scores = [float(evaluate(m)) for m in models]
    order = sorted(range(len(models)), key=lambda i: scores[i], reverse=True)  # stable
    ranked = [models[i] for i in order]  # the best first: non-float leaves come from it

    def soup_of(indices: list[int]) -> PyTree:
        mask = np.zeros(len(models), np.float32)
        mask[[order.index(i) for i in indices]] = 1.0
        return linear(None, ranked, weights=jnp.asarray(mask))

    kept = [order[0]]
    soup, best = models[order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = soup_of(kept + [i])
        score = float(evaluate(candidate))
        if score > best:
            kept, soup, best = kept + [i], candidate, score
    return GreedySoupResult(soup, kept, scores)


def greedy_soup(base: PyTree | None, models: Sequence[PyTree], *,
                evaluate: Callable[[PyTree], Any]) -> PyTree:
    """The soup of `greedy_soup_search` (``base`` is not used; it may be None).

    Example::

        soup = mergejax.merge("greedy_soup", None, finetuned, evaluate=val_accuracy)
    """
    del base
    return greedy_soup_search(models, evaluate).soup


greedy_soup.name = "greedy_soup"
greedy_soup.family = "basic"
greedy_soup.paper = "Wortsman et al. 2022, Model soups (arXiv 2203.05482)"
greedy_soup.hparams = {"evaluate": REQUIRED}
greedy_soup.needs_base = False
registry.register(greedy_soup)
