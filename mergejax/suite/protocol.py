"""The suite's protocol: pretrain a backbone, fit frozen heads, fine-tune one expert per task.

The field's protocol for CLIP ViT-B/32 on eight tasks, reproduced at laptop scale:

1. **Pretrain** the backbone on a pool of images disjoint from every task split, to classify
   each image's *concept* (its digit or animal class, 20 in all; `tasks_lib.NUM_CONCEPTS`)
   with CLIP-style cosine logits against one learned vector per concept - the analogue of
   CLIP's text embeddings. Pool images are mostly upright and un-inverted: each is turned by
   a random multiple of 90 degrees with probability ``pretrain_rotate_prob`` and inverted
   with probability ``pretrain_invert_prob`` (its concept unchanged), so the backbone has
   seen a little of every task's input shift, as CLIP has seen a little of every domain.
2. **Heads** (``heads="zero_shot"``, the default): each task's head is built from the
   pretrained concept vectors, one unit vector per class (the normalised mean of the unit
   vectors of the concepts the class covers, `tasks_lib.task_concepts`), then frozen - as
   CLIP's heads come from class-name prompts. Zero-shot accuracy is high on upright tasks
   and low on rotated and inverted ones, as CLIP's is high on ImageNet-like tasks and low
   on MNIST or SVHN. ``heads="linear_probe"`` instead fits a linear head on the pretrained
   embeddings of the task's train split; it is what a ``pretrained_checkpoint`` (which has
   no concept vectors) always uses.
3. **Experts**: fine-tune the whole backbone per task with that task's head frozen. With
   ``linearized=True`` they are fine-tuned in the tangent space at the pretrained backbone
   (`mergejax.finetune.linearize`; Ortiz-Jimenez et al. 2023, arXiv 2305.12827), and every
   backbone - experts and merges alike - is evaluated as that linearised model.

With the defaults the embedded suite reproduces the benchmark's shape: the pretrained
backbone with the zero-shot heads averages about 73% of the experts' accuracy, simple
averaging of the experts lands between the two and task arithmetic (scale 0.2-0.3) at or a
little above it; task vectors are about 2.6% of the pretrained weights' norm with pairwise
cosines mostly below 0.05 (the related tasks up to about 0.4).

Everything is saved with orbax under ``cache_dir/<hash of the configuration>`` and reused
when present; an entry whose contents do not match their recorded checksum is rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from mergejax import finetune
from mergejax.suite import datasets
from mergejax.suite import model as model_lib
from mergejax.suite import tasks as tasks_lib

__all__ = ["ProtocolConfig", "Suite", "accuracy", "build_suite", "load_data"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Everything that determines the suite's checkpoints (and so its cache key).

    ``dataset="merge_suite"`` uses the embedded tasks and pretrains the backbone here; any
    other value is the full-size configuration: ``tfds_names`` maps each task to a TFDS
    name prepared locally, ``tfds_splits`` maps the suite's splits to TFDS split strings
    (e.g. ``("validation", "train[90%:]")``; unmapped splits keep their names), and
    ``pretrained_checkpoint`` is an orbax checkpoint of the backbone (e.g. CLIP
    ViT-B/32's vision tower converted to this model's layout).

    ``heads`` is ``"zero_shot"`` (from the pretrained concept vectors; embedded suite only)
    or ``"linear_probe"`` (fit with ``head_steps`` / ``head_lr``); a
    ``pretrained_checkpoint`` always uses linear probes.
    """

    tasks: tuple[str, ...] = tuple(tasks_lib.TASKS)
    seed: int = 0
    vit: model_lib.ViTConfig = model_lib.ViTConfig()
    batch_size: int = 64
    pretrain_steps: int = 1200
    pretrain_lr: float = 1e-3
    pretrain_rotate_prob: float = 0.1
    pretrain_invert_prob: float = 0.1
    heads: str = "zero_shot"
    head_steps: int = 300
    head_lr: float = 0.05
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    dataset: str = "merge_suite"
    tfds_names: tuple[tuple[str, str], ...] = ()
    tfds_splits: tuple[tuple[str, str], ...] = ()
    pretrained_checkpoint: str = ""
    max_train_examples: int = 0
    linearized: bool = False

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> ProtocolConfig:
        """The defaults with ``overrides`` (a config file's plain values: ``vit`` as a
        dict, sequences as lists) applied; an unknown name is a `ValueError`.

        Example::

            cfg = ProtocolConfig.from_overrides({"tasks": ["digits"], "vit": {"width": 16}})
        """
        values = dict(overrides)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown protocol setting(s) {unknown}; valid: {sorted(fields)}")
        if "vit" in values:
            values["vit"] = model_lib.ViTConfig(**values["vit"])
        for name in ("tasks", "tfds_names", "tfds_splits"):
            if name in values:
                values[name] = tuple(tuple(v) if isinstance(v, list) else v
                                     for v in values[name])
        return cls(**values)

    def key(self) -> str:
        """A short hash of the configuration: the cache directory's name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Suite:
    """A built suite: the backbone, its experts, frozen heads and every task's data."""

    config: ProtocolConfig
    model: model_lib.VisionTransformer
    pretrained: PyTree
    experts: list[PyTree]
    heads: dict[str, jax.Array]
    data: dict[str, dict[str, datasets.TaskData]]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.tasks

    @functools.cached_property
    def expert_accuracies(self) -> dict[str, float]:
        """Test accuracy of each expert on its own task (the normalisation of the table)."""
        return self.accuracies(self.experts)

    def embed(self, params: PyTree, images: Any) -> jax.Array:
        """Embeddings of ``images`` by backbone ``params``: the model itself, or its
        linearisation at the pretrained backbone when the suite is ``linearized``."""
        return _jitted_embed(self.model, self.config.linearized)(self.pretrained, params,
                                                                  images)

    def apply_fn(self, params: PyTree, images: Any) -> jax.Array:
        """`embed` without its ``jax.jit``: the ``apply_fn`` of merge methods, which trace
        the model themselves (RegMean's Grams, Surgery v2 and WEMoE intercept its Linen
        layers, which must be called in their trace)."""
        return _embedding(self.model, self.config.linearized, self.pretrained, params, images)

    def accuracy(self, params: PyTree, task: str, split: str = "test") -> float:
        """Accuracy of backbone ``params`` with ``task``'s frozen head on a split."""
        d = self.data[task][split]
        return accuracy(self.embed, params, self.heads[task], d.images, d.labels)

    def accuracies(self, params: PyTree | Sequence[PyTree], split: str = "test"
                   ) -> dict[str, float]:
        """Per-task accuracy of one backbone, or of one backbone per task (in task order)."""
        per_task = params if isinstance(params, (list, tuple)) else [params] * len(self.tasks)
        return {t: self.accuracy(p, t, split) for t, p in zip(self.tasks, per_task)}


@jax.jit
def _count_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def accuracy(embed: Callable[[PyTree, Any], jax.Array], params: PyTree, head: jax.Array,
             images: np.ndarray, labels: np.ndarray, batch_size: int = 1024) -> float:
    """Fraction of ``images`` whose arg-max class under ``head`` (cosine logits of
    ``embed(params, images)``) equals ``labels``."""
    correct = 0
    for lo in range(0, len(labels), batch_size):
        logits = model_lib.logits(embed(params, images[lo:lo + batch_size]), head)
        correct += int(_count_correct(logits, labels[lo:lo + batch_size]))
    return correct / len(labels)


def _embedding(model: model_lib.VisionTransformer, linearized: bool, pretrained: PyTree,
               params: PyTree, images: Any) -> jax.Array:
    """The backbone's embeddings, or (``linearized``) those of its first-order Taylor
    expansion at ``pretrained``."""
    def apply(p, x):
        return model.apply({"params": p}, x)
    if linearized:
        return finetune.linearize(apply, pretrained)(params, images)
    return apply(params, images)


@functools.lru_cache(maxsize=None)
def _jitted_embed(model: model_lib.VisionTransformer, linearized: bool) -> Callable:
    return jax.jit(functools.partial(_embedding, model, linearized))


@functools.lru_cache(maxsize=None)
def _trainer(loss_fn: Callable, vit: model_lib.ViTConfig, steps: int, lr: float,
             weight_decay: float):
    """AdamW with a cosine schedule and a jitted step on ``loss_fn(model, params, batch)``.

    Cached, so the eight fine-tunes (and tasks with equal head shapes) compile once.
    """
    model = model_lib.VisionTransformer(vit)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=weight_decay)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, step


def _train(loss_fn: Callable, cfg: ProtocolConfig, params: PyTree, sample: Callable,
           steps: int, lr: float, what: str, weight_decay: float = 0.0) -> PyTree:
    """Runs ``steps`` steps of `_trainer` on batches ``sample(i)``; logs progress."""
    opt, step = _trainer(loss_fn, cfg.vit, steps, lr, weight_decay)
    state = jax.jit(opt.init)(params)  # one compile, not one per moment's shape
    for i in range(steps):
        params, state, loss = step(params, state, sample(i))
        if (i + 1) % max(steps // 4, 1) == 0 or i + 1 == steps:
            logging.info("%s: step %d/%d, loss %.4f", what, i + 1, steps, float(loss))
    return params


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _concept_loss(model, params, batch):
    backbone, concepts = params
    images, labels = batch
    return _cross_entropy(model_lib.logits(model.apply({"params": backbone}, images), concepts),
                          labels)


def _head_loss(model, head, batch):
    del model
    embeddings, labels = batch
    return _cross_entropy(model_lib.logits(embeddings, head), labels)


def _finetune_loss(model, params, batch):
    images, labels, head = batch
    return _cross_entropy(model_lib.classify(model, params, head, images), labels)


def _linearized_finetune_loss(model, params, batch):
    images, labels, head, pretrained = batch
    embeddings = _embedding(model, True, pretrained, params, images)
    return _cross_entropy(model_lib.logits(embeddings, head), labels)


def _sampler(rng: np.random.Generator, n: int, batch_size: int) -> Callable[[], np.ndarray]:
    return lambda: rng.integers(0, n, size=min(batch_size, n))


def _pretrain(model, cfg: ProtocolConfig, pool: np.ndarray,
              labels: np.ndarray) -> tuple[PyTree, jax.Array]:
    """Concept classification on the pool; returns the backbone and the concept vectors."""
    rng = np.random.default_rng(cfg.seed)
    # Jitted: the same bits as eager init (checked), in one compile instead of one per
    # initialiser op (2.9 s against 6.8 s for the tiny suite).
    params = jax.jit(model.init)(jax.random.key(cfg.seed), pool[:1])["params"]
    concepts = jax.random.normal(jax.random.key(cfg.seed + 1),
                                 (cfg.vit.embed_dim, tasks_lib.NUM_CONCEPTS))
    draw = _sampler(rng, len(pool), cfg.batch_size)

    def shift(image):  # the rare rotated or inverted view; the concept is unchanged
        if rng.random() < cfg.pretrain_rotate_prob:
            image = np.rot90(image, int(rng.integers(1, 4)), axes=(-2, -1))
        if rng.random() < cfg.pretrain_invert_prob:
            image = 255 - image
        return image

    def sample(_):
        idx = draw()
        return np.stack([shift(pool[j]) for j in idx]), labels[idx]

    return _train(_concept_loss, cfg, (params, concepts), sample, cfg.pretrain_steps,
                  cfg.pretrain_lr, "pretrain (concept classification)", weight_decay=0.01)


def _pretrained(model, cfg: ProtocolConfig) -> tuple[PyTree, jax.Array | None]:
    """The backbone and its concept vectors: a converted checkpoint when configured (the
    full-size path, no concept vectors), else pretrained here."""
    if cfg.pretrained_checkpoint:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(cfg.pretrained_checkpoint)), None
    return _pretrain(model, cfg, tasks_lib.pretraining_pool(), tasks_lib.pretraining_labels())


def _zero_shot_head(concepts: jax.Array, task: str) -> jax.Array:
    """(D, classes): per class, the normalised mean of its concepts' unit vectors."""
    unit = concepts / jnp.linalg.norm(concepts, axis=0, keepdims=True)
    columns = [jnp.mean(unit[:, ids], axis=1) for ids in tasks_lib.task_concepts(task)]
    head = jnp.stack(columns, axis=1)
    return head / jnp.linalg.norm(head, axis=0, keepdims=True)


def _fit_head(model, cfg: ProtocolConfig, params: PyTree, train: datasets.TaskData,
              seed: int) -> jax.Array:
    embeddings = _jitted_embed(model, False)(params, params, train.images)
    head = 0.01 * jax.random.normal(jax.random.key(seed), (cfg.vit.embed_dim,
                                                           train.num_classes))
    batch = (embeddings, jnp.asarray(train.labels))
    return _train(_head_loss, cfg, head, lambda _: batch, cfg.head_steps, cfg.head_lr, "head")


def _finetune(cfg: ProtocolConfig, params: PyTree, head: jax.Array,
              train: datasets.TaskData, seed: int, task: str) -> PyTree:
    rng = np.random.default_rng(seed)
    draw = _sampler(rng, len(train.labels), cfg.batch_size)

    def sample(_):
        idx = draw()
        batch = (train.images[idx], train.labels[idx], head)
        return batch + (params,) if cfg.linearized else batch

    loss = _linearized_finetune_loss if cfg.linearized else _finetune_loss
    return _train(loss, cfg, params, sample, cfg.finetune_steps, cfg.finetune_lr,
                  f"fine-tune {task}{' (linearized)' if cfg.linearized else ''}",
                  weight_decay=0.01)


def load_data(cfg: ProtocolConfig, data_dir: str) -> dict[str, dict[str, datasets.TaskData]]:
    """Every task's splits, from the embedded suite (built on first use) or from TFDS."""
    if cfg.dataset == "merge_suite":
        datasets.prepare(data_dir, list(cfg.tasks))
        names = {t: t for t in cfg.tasks}
    else:
        names = dict(cfg.tfds_names)
        missing = [t for t in cfg.tasks if t not in names]
        if missing:
            raise ValueError(f"tfds_names has no TFDS name for tasks {missing}")
    splits = dict(cfg.tfds_splits)
    data = {}
    for task in cfg.tasks:
        data[task] = {}
        for split in tasks_lib.SPLITS:
            d = datasets.load_task(task, splits.get(split, split), data_dir,
                                   dataset=cfg.dataset if cfg.dataset == "merge_suite"
                                   else names[task])
            if split == "train" and cfg.max_train_examples:
                d = datasets.TaskData(d.images[:cfg.max_train_examples],
                                      d.labels[:cfg.max_train_examples], d.num_classes)
            data[task][split] = d
    return data


def _checksum(tree: PyTree) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def _restore(entry: str) -> PyTree | None:
    """The cached checkpoint in ``entry``, or None when absent or corrupt (then removed)."""
    meta_path = os.path.join(entry, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(os.path.join(entry, "state"))
        if _checksum(state) != meta["checksum"]:
            raise ValueError("checksum mismatch")
        return state
    except Exception as e:  # any failure means the entry cannot be trusted
        logging.warning("cache entry %s is corrupt (%s); rebuilding it", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save(entry: str, state: PyTree, cfg: ProtocolConfig) -> None:
    """Writes ``state`` to ``entry`` atomically: a temp directory renamed when complete."""
    tmp = entry + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, "state"), state)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"checksum": _checksum(state), "config": dataclasses.asdict(cfg)}, f,
                  indent=1, default=str)
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)


def build_suite(cfg: ProtocolConfig, cache_dir: str, data_dir: str | None = None) -> Suite:
    """Loads the suite's checkpoints from ``cache_dir``, or trains and caches them.

    ``data_dir`` (default ``cache_dir/data``) holds the TFDS datasets.
    """
    if cfg.dataset == "merge_suite":
        unknown = [t for t in cfg.tasks if t not in tasks_lib.TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the embedded suite has "
                             f"{list(tasks_lib.TASKS)}")
    if cfg.heads not in ("zero_shot", "linear_probe"):
        raise ValueError(f"heads must be 'zero_shot' or 'linear_probe', not {cfg.heads!r}")
    if cfg.dataset != "merge_suite" and not cfg.pretrained_checkpoint:
        raise ValueError("a dataset other than the embedded suite needs "
                         "pretrained_checkpoint (e.g. CLIP ViT-B/32 converted to orbax)")
    cache_dir = os.path.abspath(cache_dir)  # orbax needs absolute paths
    data = load_data(cfg, data_dir or os.path.join(cache_dir, "data"))
    model = model_lib.VisionTransformer(cfg.vit)
    entry = os.path.join(cache_dir, f"suite-{cfg.key()}")
    state = _restore(entry)
    if state is None:
        logging.info("building the suite into %s", entry)
        pretrained, concepts = _pretrained(model, cfg)
        heads, experts = {}, {}
        for i, task in enumerate(cfg.tasks):
            if concepts is not None and cfg.heads == "zero_shot":
                heads[task] = _zero_shot_head(concepts, task)
            else:
                heads[task] = _fit_head(model, cfg, pretrained, data[task]["train"], cfg.seed + i)
            experts[task] = _finetune(cfg, pretrained, heads[task], data[task]["train"],
                                      cfg.seed + 100 + i, task)
        state = {"pretrained": pretrained, "heads": heads, "experts": experts}
        _save(entry, jax.device_get(state), cfg)
    else:
        logging.info("loaded the suite from %s", entry)
    return Suite(cfg, model, state["pretrained"], [state["experts"][t] for t in cfg.tasks],
                 dict(state["heads"]), data)
