"""The suite's tasks as TFDS datasets, read with ``tfds.data_source`` (no TensorFlow).

``MergeSuite`` is a ``GeneratorBasedBuilder`` with one config per task, prepared once into a
local data directory in ArrayRecord format. The full-size benchmark (CLIP ViT-B/32's eight
tasks) uses the same reader with the tasks' TFDS names, from a data directory the user has
prepared; nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from mergejax.suite import tasks as tasks_lib

__all__ = ["MergeSuite", "TaskData", "load_task", "prepare"]


class MergeSuite(tfds.core.GeneratorBasedBuilder):
    """The embedded suite: eight 28x28 grey-level image tasks (see `mergejax.suite.tasks`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Eight tasks from sklearn digits and animal-mnist."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t.name, description=t.description)
                       for t in tasks_lib.TASKS.values()]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = tasks_lib.TASKS[self.builder_config.name]
        size = tasks_lib.IMAGE_SIZE
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=spec.num_classes),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships inside packages
        return {split: self._generate_examples(split) for split in tasks_lib.SPLITS}

    def _generate_examples(self, split):
        images, labels = tasks_lib.task_arrays(self.builder_config.name, split)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's split in memory: images (N x H x W [x C], uint8) and integer labels."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int


def prepare(data_dir: str, names: list[str] | None = None) -> None:
    """Builds the suite's TFDS datasets into ``data_dir`` (skips those already built)."""
    tfds.disable_progress_bar()
    for name in names or list(tasks_lib.TASKS):
        builder = MergeSuite(config=name, data_dir=data_dir)
        builder.download_and_prepare(file_format="array_record")


def load_task(name: str, split: str, data_dir: str, *, dataset: str = "merge_suite",
              image_key: str = "image", label_key: str = "label") -> TaskData:
    """Reads one split of a task with ``tfds.data_source``.

    ``dataset="merge_suite"`` reads the embedded suite (``name`` is a task of
    `mergejax.suite.tasks.TASKS`); any other value is a TFDS name prepared under
    ``data_dir`` (e.g. ``dataset="eurosat/rgb"``, ``name`` only labels the task), which is how
    the full-size eight-task benchmark runs. A dataset that is not there is an error naming
    the directory; nothing is downloaded.
    """
    full_name = f"merge_suite/{name}" if dataset == "merge_suite" else dataset
    try:
        records = tfds.data_source(full_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared" / "no such split"
        raise FileNotFoundError(
            f"cannot read split {split!r} of dataset {full_name!r} (task {name!r}) under "
            f"{os.path.abspath(data_dir)!r}; prepare it there first (nothing is downloaded): "
            f"{e}") from e
    examples = [records[i] for i in range(len(records))]
    images = np.stack([np.asarray(ex[image_key]) for ex in examples])
    labels = np.asarray([int(ex[label_key]) for ex in examples], np.int64)
    num_classes = records.dataset_info.features[label_key].num_classes
    return TaskData(images, labels, num_classes)
