r"""Configuration of `experiments.benchmark`: the embedded suite and the method sweep.

    python -m experiments.benchmark --config=experiments/configs/benchmark.py
    python -m experiments.benchmark --config=experiments/configs/benchmark.py:tiny

``tiny`` is a seconds-long configuration for tests. The full-size CLIP ViT-B/32 benchmark is
the same binary with ``protocol.dataset``/``protocol.tfds_names`` naming locally prepared
TFDS datasets, ``protocol.pretrained_checkpoint`` an orbax checkpoint of the vision tower,
and ``protocol.vit`` its sizes.
"""

import ml_collections

#: Each method's paper defaults where they differ from its function's defaults.
PAPER_HPARAMS = {
    "task_arithmetic": {"scale": 0.3},  # Ilharco et al.; FusionBench's scaling_factor
    "ties": {"density": 0.2, "scale": 1.0},  # Yadav et al.: top-20%, disjoint mean
    "dare_linear": {"density": 0.1, "scale": 0.3},  # drop 90% (Yu et al.), then TA's 0.3
    "dare_ties": {"density": 0.1, "scale": 0.3},
    "darex": {"density": 0.01, "q": 0.02},  # DAREx-q: p = 0.99; q searched (config.search)
    "della": {"density": 0.7, "epsilon": 0.15, "rank_axis": 0},  # Flax kernels: (in, out)
    "della_linear": {"density": 0.7, "epsilon": 0.15, "rank_axis": 0, "scale": 0.3},
    "breadcrumbs": {"density": 0.15, "gamma": 0.006, "scale": 0.2},  # paper's seed point
    "breadcrumbs_ties": {"density": 0.15, "gamma": 0.006, "scale": 0.2},
    "magmax": {"scale": 0.5},  # FusionBench / the official 8-task script
    "consensus": {"min_agree": 2, "mask_lambda": 0.6, "scale": 0.3},
    "tall_masks": {"mask_lambda": 0.6},  # FusionBench's tall_mask_lambda
    "pcb": {"density": 0.05, "clip": 0.01, "scale": 1.2},  # the official vision script
    "model_tailor": {"density": 0.1, "axis": 0, "scale": 0.3},
    "localize_stitch": {"density": 0.1},
    # Spectral / data-free family: the functions' defaults are the papers' (see their
    # docstrings); only what differs is listed.
    "awd": {"scale": 0.3},  # task arithmetic on the disentangled vectors
    "doge": {"scale": 0.07},  # FusionBench doge_ta.yaml: lambda_i = scale / ||tau_i||
    "knots": {"merge": "ties", "density": 0.2, "scale": 0.6},  # official KnOTS-TIES config
    # LoRA adapters of the experts (suite.benchmark.lora_experts): task arithmetic's 0.3.
    "lora_linear": {"scale": 0.3},
    "lora_concat": {"weights": 0.3},
    "lora_svd": {"weights": 0.3},
    "opcm": {"alpha": 0.5},  # FusionBench OPCMForCLIP
    # Learned: the functions' defaults are the papers' (AdaMerging: layer-wise, init 0.3,
    # Adam 1e-3, 500 steps on 16 unlabeled test inputs per task per step).
    "evolutionary": {"granularity": "task", "steps": 20},  # CMA-ES on validation accuracy
    "regmean_pp": {"num_batches": 16},  # 256 inputs per task, as the suite's RegMean Grams
}

#: Tiny-config overrides: a few optimisation steps each, for tests.
TINY_HPARAMS = {
    "adamerging": {"steps": 3},
    "adamerging_pp": {"steps": 3},
    "evolutionary": {"granularity": "task", "steps": 2},
    "surgery": {"steps": 2},
    "surgery_v2": {"steps": 2},
    "probsurgery": {"steps": 2},
    "regmean_pp": {"num_batches": 2},
    "wemoe": {"steps": 2},
    "twin_merging": {"steps": 2},
}


#: The ``tiny`` suite's protocol: two tasks, seconds to train. tests/suite_test.py trains
#: the same suite, whose cache the binary's end-to-end test then reads.
TINY_PROTOCOL = {"tasks": ("digits", "animals_coarse"), "batch_size": 16,
                 "pretrain_steps": 5, "head_steps": 5, "finetune_steps": 5,
                 "max_train_examples": 64,
                 "vit": {"width": 16, "depth": 1, "heads": 2, "embed_dim": 16}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.cache_dir = "cache/suite"
    config.out_dir = "results/benchmark"
    config.methods = ("all",)  # registered names, or "all"
    config.method_hparams = ml_collections.ConfigDict(PAPER_HPARAMS)
    # Optional search on the validation split (never on test): hyperparameter -> values.
    config.search = ml_collections.ConfigDict({"scale": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                                               "q": [0.01, 0.02, 0.05, 0.1]})
    # Overrides of mergejax.suite.protocol.ProtocolConfig (all eight tasks by default).
    config.protocol = ml_collections.ConfigDict({"seed": 0})
    if arg == "tiny":
        config.protocol.update(TINY_PROTOCOL)
        config.search = ml_collections.ConfigDict({"scale": [0.3, 1.0]})
        for name, values in TINY_HPARAMS.items():
            config.method_hparams[name] = {**PAPER_HPARAMS.get(name, {}), **values}
    elif arg:
        raise ValueError(f"unknown benchmark config {arg!r}; use '' or 'tiny'")
    return config
