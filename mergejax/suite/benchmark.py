"""Runs registered merge methods on a built suite and tabulates them.

Each method merges the experts' backbones (``method(pretrained, experts, **hparams)``) and
every task is evaluated with its own frozen head. A method that returns one backbone per
task (a list, or a result with ``task_models()`` such as EMR's `ModulatedMerge`) is
evaluated task by task, and the table says what it keeps besides the base. Random methods
get ``key=jax.random.key(0)``.
A method that needs data the suite does not supply, or cannot take this many models, is
listed as skipped with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from mergejax import registry
from mergejax.method import REQUIRED
from mergejax.suite.protocol import Suite
from mergejax.suite.report import Row
from mergejax.tree import MergeError

__all__ = ["backbones", "reference_rows", "run_method", "run_methods", "validation_score"]


def backbones(merged: Any) -> Any:
    """What a method returned, as the suite evaluates it: one backbone, or a list with one
    per task."""
    if hasattr(merged, "task_models"):
        return merged.task_models()
    return list(merged) if isinstance(merged, (list, tuple)) else merged


def validation_score(suite: Suite) -> Callable[[Any], float]:
    """Average validation accuracy over tasks of one backbone (or one per task): what
    searches maximise."""
    return lambda params: sum(suite.accuracies(backbones(params),
                                               split="validation").values()) / len(suite.tasks)


def reference_rows(suite: Suite) -> list[Row]:
    """The pretrained backbone with every task's head, and each expert on its own task."""
    experts = suite.expert_accuracies
    return [Row("pretrained", suite.accuracies(suite.pretrained)).finish(experts),
            Row("experts (one per task)", dict(experts),
                note=f"{len(suite.experts)} backbones").finish(experts)]


def _skip_reason(method, k: int, supplied: Mapping[str, Any]) -> str | None:
    if getattr(method, "family", None) == "lora":
        return "merges LoRA adapters; the suite's experts are full fine-tunes"
    max_models = getattr(method, "max_models", None)
    if max_models is not None and k > max_models:
        return f"takes at most {max_models} models"
    if getattr(method, "min_models", 1) > k:
        return f"needs at least {method.min_models} models"
    missing = [n for n, v in method.hparams.items() if v is REQUIRED and n not in supplied]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def _merge(method, suite: Suite, hparams: Mapping[str, Any]):
    if getattr(method, "uses_key", False) is True and "key" not in hparams:
        hparams = {**hparams, "key": jax.random.key(0)}
    merged = method(suite.pretrained, suite.experts, **hparams)
    return jax.block_until_ready(merged)


def _note(method, merged: Any) -> str:
    if hasattr(merged, "task_models"):
        return f"one model per task; keeps {getattr(method, 'keeps', 'per-task state')}"
    if isinstance(merged, (list, tuple)):
        return "one backbone per task"
    return ""


def run_method(suite: Suite, name: str, hparams: Mapping[str, Any] | None = None,
               search: Mapping[str, Sequence[float]] | None = None) -> Row:
    """Merges with method ``name`` and evaluates it on every task's test split.

    ``search`` maps a hyperparameter (e.g. ``scale``) to candidate values; the value with
    the best average *validation* accuracy is used for the test numbers.
    """
    method = registry.get_method(name)
    hparams = dict(hparams or {})
    if "evaluate" in method.hparams and "evaluate" not in hparams:
        hparams["evaluate"] = validation_score(suite)
    reason = _skip_reason(method, len(suite.experts), hparams)
    if reason:
        nan = float("nan")
        return Row(name, {t: nan for t in suite.tasks}, average=nan, normalized=nan,
                   note=f"skipped: {reason}")
    for hparam, grid in (search or {}).items():
        if hparam not in method.hparams:
            continue
        score = validation_score(suite)
        scores = {v: score(_merge(method, suite, {**hparams, hparam: v})) for v in grid}
        hparams[hparam] = max(scores, key=scores.get)
        logging.info("%s: %s=%s on validation (%s)", name, hparam, hparams[hparam],
                     {k: round(v, 4) for k, v in scores.items()})
    _merge(method, suite, hparams)  # compiles; the table reports the compiled call
    start = time.perf_counter()
    merged = _merge(method, suite, hparams)
    seconds = time.perf_counter() - start
    shown = {k: v for k, v in hparams.items() if k != "evaluate"}
    return Row(name, suite.accuracies(backbones(merged)), seconds=seconds, hparams=shown,
               note=_note(method, merged)).finish(suite.expert_accuracies)


def run_methods(suite: Suite, names: Sequence[str],
                hparams: Mapping[str, Mapping[str, Any]] | None = None,
                search: Mapping[str, Sequence[float]] | None = None) -> list[Row]:
    """`run_method` for each name, logging progress."""
    rows = []
    for i, name in enumerate(names):
        logging.info("[%d/%d] %s", i + 1, len(names), name)
        try:
            rows.append(run_method(suite, name, (hparams or {}).get(name), search))
        except MergeError as e:  # a method that cannot merge these models: say why
            logging.warning("%s failed: %s", name, e)
            nan = float("nan")
            rows.append(Row(name, {t: nan for t in suite.tasks}, average=nan,
                            normalized=nan, note=f"failed: {e}"))
    return rows
