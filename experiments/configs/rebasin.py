r"""Configuration of `experiments.rebasin`: two models from different seeds, aligned.

    python -m experiments.rebasin --config=experiments/configs/rebasin.py
    python -m experiments.rebasin --config=experiments/configs/rebasin.py:resnet
    python -m experiments.rebasin --config=experiments/configs/rebasin.py:tiny

The default is Git Re-Basin's MLP (three hidden layers of 512) on the embedded suite's
``animals`` task; ``resnet`` is a ResNet-20 (x2 width, LayerNorm) on the same task;
``tiny`` is a seconds-long configuration for tests.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.out_dir = "results/rebasin"
    config.task = "animals"  # a task of mergejax.suite.tasks.TASKS
    config.model = "mlp"  # "mlp" or "resnet"
    config.mlp_features = (512, 512, 512)
    config.resnet_depth = 20
    config.resnet_width = 2
    config.seeds = (0, 1)
    config.train_steps = 3000
    config.batch_size = 128
    config.learning_rate = 1e-3
    # Alignment methods (registry names of the alignment family) and their settings.
    config.methods = ("weight_matching", "activation_matching", "ste_matching", "zipit",
                      "mudsc")
    config.matching_batches = 16  # batches of train inputs for activation statistics
    config.ste_steps = 300
    config.num_points = 25  # interpolation points of the connectivity curves
    if arg == "resnet":
        config.model = "resnet"
        config.train_steps = 2000
    elif arg == "tiny":
        config.mlp_features = (32, 32)
        config.train_steps = 60
        config.matching_batches = 2
        config.ste_steps = 3
        config.num_points = 5
    elif arg:
        raise ValueError(f"unknown rebasin config {arg!r}; use '', 'resnet' or 'tiny'")
    return config
