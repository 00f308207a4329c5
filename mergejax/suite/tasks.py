"""The embedded suite's eight tasks, built from real data that ships inside packages.

Two sources, no download at run time:

* scikit-learn's ``load_digits`` (1,797 handwritten digits, 8x8, 17 grey levels), upsampled
  3x (nearest) and padded to 28x28;
* the ``animal-mnist`` wheel's silhouettes (10,000 images, 28x28, 10 animal classes), read
  from its data files directly (its loader imports TensorFlow; we do not).

Each source is shuffled with a fixed seed and split once: a *pretraining pool* the backbone
is pretrained on (never a task's data), then per task train / validation / test. The eight
tasks differ in their inputs (rotation, inversion) or in their label functions (parity,
coarse classes), so their task vectors genuinely conflict - the analogue of CLIP ViT-B/32's
eight image tasks.

The pool is labelled with *concepts*, the analogue of CLIP's captions: the 10 digit classes
(concepts 0-9) and the 10 animal classes (concepts 10-19). Pretraining learns one vector per
concept (`mergejax.suite.protocol`); a task's zero-shot head is built from the concept
vectors of its classes (`task_concepts`: a relabelled class such as "even digit" or an
animal pair is the set of its members' concepts), as CLIP's heads are built from class-name
prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
from collections.abc import Callable

import numpy as np

__all__ = ["IMAGE_SIZE", "NUM_CONCEPTS", "SPLITS", "TASKS", "TaskSpec", "load_source",
           "pretraining_labels", "pretraining_pool", "task_arrays", "task_concepts"]

IMAGE_SIZE = 28
SPLITS = ("train", "validation", "test")
_SEED = 20260101
#: Examples of each source reserved for pretraining (disjoint from every task split).
_PRETRAIN = {"digits": 500, "animals": 4000}
#: Each source's first concept id: its original label ``y`` is concept ``offset + y``.
_CONCEPT_OFFSET = {"digits": 0, "animals": 10}
#: Concepts of the pretraining pool: 10 digit classes, then 10 animal classes.
NUM_CONCEPTS = 20
#: Fractions of the remaining examples for train / validation / test.
_FRACTIONS = (0.6, 0.1, 0.3)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: a source, an input transform and a label function."""

    name: str
    source: str
    num_classes: int
    transform: Callable[[np.ndarray], np.ndarray]
    relabel: Callable[[np.ndarray], np.ndarray]
    description: str


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(-2, -1)).copy()


def _rot180(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 2, axes=(-2, -1)).copy()


def _invert(x: np.ndarray) -> np.ndarray:
    return (255 - x).astype(np.uint8)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("digits", "digits", 10, _identity, _identity, "sklearn digits, 10 classes"),
    TaskSpec("digits_rot90", "digits", 10, _rot90, _identity, "digits rotated 90 degrees"),
    TaskSpec("digits_inverted", "digits", 10, _invert, _identity, "digits, inverted greys"),
    TaskSpec("digits_parity", "digits", 2, _identity, lambda y: y % 2, "digit parity"),
    TaskSpec("animals", "animals", 10, _identity, _identity, "animal silhouettes, 10 classes"),
    TaskSpec("animals_rot180", "animals", 10, _rot180, _identity, "animals rotated 180"),
    TaskSpec("animals_inverted", "animals", 10, _invert, _identity, "animals, inverted"),
    TaskSpec("animals_coarse", "animals", 5, _identity, lambda y: y // 2,
             "animals in 5 pairs of classes"),
]}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = np.rint(digits.images / 16.0 * 255.0).astype(np.uint8)
    images = np.kron(images, np.ones((1, 3, 3), np.uint8))  # 8x8 -> 24x24
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return images, digits.target.astype(np.int64)


def _load_animals() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the animal silhouettes come from the 'animal-mnist' wheel; install it without "
            "its TensorFlow dependency: pip install --no-deps animal-mnist==0.4")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    with gzip.open(os.path.join(folder, "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f), np.uint8)
    with gzip.open(os.path.join(folder, "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f), np.int64)
    if images.shape != (len(labels), IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"unexpected animal-mnist data shape {images.shape}")
    return images, labels


@functools.lru_cache(maxsize=None)
def load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """All distinct images (uint8, N x 28 x 28) and labels of a source, shuffled with a
    fixed seed."""
    loaders = {"digits": _load_digits, "animals": _load_animals}
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; known: {sorted(loaders)}")
    images, labels = loaders[source]()
    # animal-mnist holds 284 exact duplicate images; keep the first of each so that no
    # image is in two splits.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    images, labels = images[keep], labels[keep]
    order = np.random.default_rng(_SEED).permutation(len(labels))
    return images[order], labels[order]


def _split_range(total: int, reserved: int, split: str) -> tuple[int, int]:
    """The [lo, hi) range of ``split`` among the examples after the reserved ones."""
    rest = total - reserved
    sizes = [int(round(f * rest)) for f in _FRACTIONS[:-1]]
    sizes.append(rest - sum(sizes))
    lo = reserved + sum(sizes[:SPLITS.index(split)])
    return lo, lo + sizes[SPLITS.index(split)]


def task_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 28 x 28) and labels of one task's split."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    spec = TASKS[name]
    images, labels = load_source(spec.source)
    lo, hi = _split_range(len(labels), _PRETRAIN[spec.source], split)
    return spec.transform(images[lo:hi]), spec.relabel(labels[lo:hi])


def pretraining_pool() -> np.ndarray:
    """The images the backbone is pretrained on: each source's reserved examples."""
    return np.concatenate([load_source(s)[0][:n] for s, n in _PRETRAIN.items()])


def pretraining_labels() -> np.ndarray:
    """The concept id (0-19) of each `pretraining_pool` image: its source's offset + label."""
    return np.concatenate([load_source(s)[1][:n] + _CONCEPT_OFFSET[s]
                           for s, n in _PRETRAIN.items()]).astype(np.int32)


def task_concepts(name: str) -> list[np.ndarray]:
    """For each class of task ``name``, the concept ids whose labels its relabel maps there."""
    spec = TASKS[name]
    original = np.arange(10)  # both sources have 10 original classes
    task_label = np.asarray(spec.relabel(original))
    return [_CONCEPT_OFFSET[spec.source] + original[task_label == c]
            for c in range(spec.num_classes)]
