r"""Configuration of `experiments.benchmark`: the embedded suite and the method sweep.

    python -m experiments.benchmark --config=experiments/configs/benchmark.py
    python -m experiments.benchmark --config=experiments/configs/benchmark.py:tiny

``tiny`` is a seconds-long configuration for tests. The full-size CLIP ViT-B/32 benchmark is
the same binary with ``protocol.dataset``/``protocol.tfds_names`` naming locally prepared
TFDS datasets, ``protocol.pretrained_checkpoint`` an orbax checkpoint of the vision tower,
and ``protocol.vit`` its sizes.
"""

import ml_collections

from mergejax.suite.tasks import TASKS

#: Each method's paper defaults where they differ from its function's defaults.
PAPER_HPARAMS = {
    "task_arithmetic": {"scale": 0.3},  # Ilharco et al.; FusionBench's scaling_factor
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.cache_dir = "cache/suite"
    config.out_dir = "results/benchmark"
    config.methods = ("all",)  # registered names, or "all"
    config.method_hparams = ml_collections.ConfigDict(PAPER_HPARAMS)
    # Optional search on the validation split (never on test): hyperparameter -> values.
    config.search = ml_collections.ConfigDict({"scale": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]})
    # Overrides of mergejax.suite.protocol.ProtocolConfig (all eight tasks by default).
    config.protocol = ml_collections.ConfigDict({"seed": 0})
    if arg == "tiny":
        config.protocol.tasks = tuple(TASKS)[::3]
        config.protocol.update({"pretrain_steps": 20, "head_steps": 20, "finetune_steps": 10,
                                "max_train_examples": 256,
                                "vit": {"width": 16, "depth": 1, "heads": 2, "embed_dim": 16}})
        config.search = ml_collections.ConfigDict({"scale": [0.3, 1.0]})
    elif arg:
        raise ValueError(f"unknown benchmark config {arg!r}; use '' or 'tiny'")
    return config
