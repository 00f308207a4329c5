"""Runs registered merge methods on a built suite and tabulates them.

Each method merges the experts' backbones (``method(pretrained, experts, **hparams)``) and
every task is evaluated with its own frozen head. A method that returns one backbone per
task (a list, or a result with ``task_models()`` such as EMR's `ModulatedMerge`) is
evaluated task by task, and the table says what it keeps besides the base. Random methods
get ``key=jax.random.key(0)``. The ``lora`` family merges rank-`LORA_RANK` adapters
extracted from the experts (`lora_experts`) and is evaluated as the backbone plus the
merged adapter's update.
Methods that learn from data get it from the suite by hyperparameter name (`suite_inputs`):
``apply_fn`` (the backbone's embeddings), ``heads`` (each task's frozen head),
``batches`` (unlabeled *test* inputs, 16 per task per step, reshuffled each epoch: the
test-time adaptation setting of AdaMerging, Surgery and WEMoE; validation inputs for the
methods in `VALIDATION_BATCHES`), ``labeled_batches`` (the validation
split with labels), ``evaluate`` / ``fitness`` (average validation accuracy), ``loss_fn``
(LoraHub's: an adapter's mean validation cross-entropy), ``fishers``
and ``grams`` (each expert's diagonal Fisher and dense-layer input Gram matrices from 256
validation examples, computed before the merge is timed). Their
results are evaluated as they come: merged params (``.params``), one backbone per task, or
a result with ``predict(task, inputs) -> logits`` (surgery modules, routers). They run once
(their time includes compilation); tuning-free merges are timed on a second, compiled call.
A method that needs data the suite does not supply, or cannot take this many models, is
listed as skipped with the reason.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mergejax import lora, registry, statistics
from mergejax.method import REQUIRED
from mergejax.suite import model as model_lib
from mergejax.suite.protocol import Suite
from mergejax.suite.report import Row
from mergejax.tree import MergeError, PyTree, task_vector, tree_add

__all__ = ["backbones", "lora_experts", "reference_rows", "run_method", "run_methods",
           "suite_inputs", "task_accuracies", "validation_score"]


def _is_model_list(merged: Any) -> bool:
    """A list or tuple of models (not a NamedTuple result such as `AdaMergingResult`)."""
    return isinstance(merged, (list, tuple)) and not hasattr(merged, "_fields")


def backbones(merged: Any) -> Any:
    """What a method returned, as the suite evaluates it: one backbone, or a list with one
    per task (results with ``.params`` give their params)."""
    if hasattr(merged, "task_models"):
        return merged.task_models()
    if _is_model_list(merged):
        return list(merged)
    return merged.params if hasattr(merged, "params") else merged


def task_accuracies(suite: Suite, merged: Any, split: str = "test",
                    batch_size: int = 1024) -> dict[str, float]:
    """Per-task accuracy of whatever a method returned: through its ``predict(task,
    inputs)`` when it has one, else of its backbone(s) with the frozen heads.

    Example::

        task_accuracies(suite, mergejax.surgery(suite.pretrained, suite.experts, **data))
    """
    if not hasattr(merged, "predict"):
        return suite.accuracies(backbones(merged), split=split)
    out = {}
    for t, task in enumerate(suite.tasks):
        d = suite.data[task][split]
        correct = 0
        for lo in range(0, len(d.labels), batch_size):
            logits = np.asarray(merged.predict(t, d.images[lo:lo + batch_size]))
            correct += int(np.sum(np.argmax(logits, axis=-1) == d.labels[lo:lo + batch_size]))
        out[task] = correct / len(d.labels)
    return out


def validation_score(suite: Suite) -> Callable[[Any], float]:
    """Average validation accuracy over tasks of one backbone (or one per task, or a
    result with ``predict``): what searches maximise."""
    return lambda merged: sum(task_accuracies(suite, merged, "validation").values()) / len(
        suite.tasks)


def _epochs(arrays: tuple[np.ndarray, ...], batch_size: int, seed: int) -> Iterator[Any]:
    """Endless batches of ``arrays`` (shared first axis), reshuffled every epoch; the last
    incomplete batch of an epoch is dropped so that every batch has the same shape."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for lo in range(0, n - size + 1, size):
            idx = order[lo:lo + size]
            picked = tuple(a[idx] for a in arrays)
            yield picked if len(picked) > 1 else picked[0]


#: Batches (of 16) of validation data from which ``fishers`` and ``grams`` are computed
#: (256 examples per task, FusionBench's RegMean / Fisher default).
STATISTICS_BATCHES = 16


#: Methods whose ``batches`` are held-out validation inputs (their papers train on a
#: small held-out set), not the unlabeled test inputs of test-time adaptation.
VALIDATION_BATCHES = ("regmean_pp", "twin_merging")


#: Rank of the LoRA adapters the ``lora`` family merges (`lora_experts`).
LORA_RANK = 16
#: Validation examples per task in LoraHub's loss (its paper uses a few examples).
LORAHUB_EXAMPLES = 64


def lora_experts(suite: Suite, rank: int = LORA_RANK) -> list[PyTree]:
    """Each expert's task vector as a rank-``rank`` LoRA adapter on its 2-D kernels
    (`mergejax.lora.lora_from_delta`; other leaves stay dense): what the ``lora`` family
    merges. The suite's experts are full fine-tunes, so these are low-rank views of them,
    not adapters trained as such."""
    return [lora.lora_from_delta(task_vector(suite.pretrained, e), rank)
            for e in suite.experts]


def _adapted(suite: Suite, adapter: PyTree) -> PyTree:
    """The backbone plus an adapter's dense update."""
    return tree_add(suite.pretrained, lora.lora_delta(adapter))


def _lorahub_loss(suite: Suite) -> Callable[[PyTree], float]:
    """LoraHub's loss: mean cross-entropy, over tasks, of the adapted backbone on the first
    `LORAHUB_EXAMPLES` validation examples of each task."""
    data = [suite.data[t]["validation"] for t in suite.tasks]

    def loss(adapter: PyTree) -> float:
        params = _adapted(suite, adapter)
        total = 0.0
        for t, d in zip(suite.tasks, data):
            images, labels = d.images[:LORAHUB_EXAMPLES], d.labels[:LORAHUB_EXAMPLES]
            logp = jax.nn.log_softmax(model_lib.logits(suite.embed(params, images),
                                                       suite.heads[t]))
            total += float(-jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)))
        return total / len(data)

    return loss


def suite_inputs(suite: Suite, batch_size: int = 16, batch_split: str = "test"
                 ) -> dict[str, Callable[[], Any]]:
    """What the suite can give a method that learns from data, by hyperparameter name (each
    built on demand; see the module docstring). ``batches`` come from ``batch_split``.

    Example::

        make = suite_inputs(suite)
        result = mergejax.adamerging(suite.pretrained, suite.experts,
                                     apply_fn=make["apply_fn"](), heads=make["heads"](),
                                     batches=make["batches"](), steps=100)
    """
    apply_fn = suite.apply_fn

    def heads():
        return [functools.partial(model_lib.logits, head=suite.heads[t]) for t in suite.tasks]

    def batches(split: str, labeled: bool):
        def make():
            out = []
            for i, t in enumerate(suite.tasks):
                d = suite.data[t][split]
                arrays = (d.images, d.labels) if labeled else (d.images,)
                out.append(_epochs(arrays, batch_size, suite.config.seed + i))
            return out
        return make

    score = validation_score(suite)
    labeled = batches("validation", labeled=True)
    return {"apply_fn": lambda: apply_fn, "heads": heads,
            "batches": batches(batch_split, labeled=False), "labeled_batches": labeled,
            "evaluate": lambda: score, "fitness": lambda: score,
            "loss_fn": lambda: _lorahub_loss(suite),
            "fishers": lambda: statistics.task_fishers(
                apply_fn, suite.experts, labeled(), heads=heads(),
                num_batches=STATISTICS_BATCHES),
            "grams": lambda: statistics.task_grams(
                apply_fn, suite.experts, batches("validation", labeled=False)(),
                num_batches=STATISTICS_BATCHES)}


def reference_rows(suite: Suite) -> list[Row]:
    """The pretrained backbone with every task's head, and each expert on its own task."""
    experts = suite.expert_accuracies
    return [Row("pretrained", suite.accuracies(suite.pretrained)).finish(experts),
            Row("experts (one per task)", dict(experts),
                note=f"{len(suite.experts)} backbones").finish(experts)]


def _skip_reason(method, k: int, supplied: Mapping[str, Any]) -> str | None:
    if getattr(method, "family", None) == "alignment":
        return ("aligns models trained from different initialisations; the suite's experts "
                "share one (see experiments.rebasin)")
    max_models = getattr(method, "max_models", None)
    if max_models is not None and k > max_models:
        return f"takes at most {max_models} models"
    if getattr(method, "min_models", 1) > k:
        return f"needs at least {method.min_models} models"
    missing = [n for n, v in method.hparams.items() if v is REQUIRED and n not in supplied]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def _merge(method, suite: Suite, hparams: Mapping[str, Any],
           adapters: Sequence[PyTree] | None):
    """The method's result on the suite's experts, or on their LoRA ``adapters`` (then
    the backbone plus the merged adapter's update)."""
    if adapters is None:
        return jax.block_until_ready(method(suite.pretrained, suite.experts, **hparams))
    merged = method(None, adapters, **hparams)
    return jax.block_until_ready(_adapted(suite, getattr(merged, "adapter", merged)))


def _note(method, merged: Any) -> str:
    if getattr(method, "family", None) == lora.FAMILY:
        return f"merges rank-{LORA_RANK} LoRA views of the experts"
    if hasattr(merged, "task_models") or hasattr(merged, "predict"):
        return f"keeps {getattr(method, 'keeps', None) or 'per-task state'}"
    if _is_model_list(merged):
        return "one backbone per task"
    return "learned; time includes compilation" if isinstance(
        method, registry.FunctionMethod) else ""


def run_method(suite: Suite, name: str, hparams: Mapping[str, Any] | None = None,
               search: Mapping[str, Sequence[float]] | None = None) -> Row:
    """Merges with method ``name`` and evaluates it on every task's test split.

    ``search`` maps a hyperparameter (e.g. ``scale``) to candidate values; the value with
    the best average *validation* accuracy is used for the test numbers.
    """
    method = registry.get_method(name)
    hparams = dict(hparams or {})
    inputs = suite_inputs(suite, batch_split="validation" if name in VALIDATION_BATCHES
                          else "test")
    for hparam, make in inputs.items():
        if hparam in method.hparams and hparam not in hparams:
            hparams[hparam] = make()
    if "key" not in hparams and (getattr(method, "uses_key", False) is True
                                 or method.hparams.get("key", None) is REQUIRED):
        hparams["key"] = jax.random.key(0)
    reason = _skip_reason(method, len(suite.experts), hparams)
    if reason:
        nan = float("nan")
        return Row(name, {t: nan for t in suite.tasks}, average=nan, normalized=nan,
                   note=f"skipped: {reason}")
    adapters = lora_experts(suite) if getattr(method, "family", None) == lora.FAMILY else None
    for hparam, grid in (search or {}).items():
        if hparam not in method.hparams:
            continue
        score = validation_score(suite)
        scores = {v: score(_merge(method, suite, {**hparams, hparam: v}, adapters))
                  for v in grid}
        hparams[hparam] = max(scores, key=scores.get)
        logging.info("%s: %s=%s on validation (%s)", name, hparam, hparams[hparam],
                     {k: round(v, 4) for k, v in scores.items()})
    learned = isinstance(method, registry.FunctionMethod) or "loss_fn" in method.hparams
    if not learned:
        _merge(method, suite, hparams, adapters)  # compiles; the table reports the compiled call
    start = time.perf_counter()
    merged = _merge(method, suite, hparams, adapters)
    seconds = time.perf_counter() - start
    shown = {k: v for k, v in hparams.items() if k not in inputs and k != "key"}
    return Row(name, task_accuracies(suite, merged), seconds=seconds, hparams=shown,
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
