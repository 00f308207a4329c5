"""Checkpoints: safetensors (Hugging Face layout) and orbax I/O, mergekit configs, and the
streaming merge of checkpoints larger than memory.

Example::

    from mergejax import io
    params = io.load_safetensors("llama-base")              # nested dict of arrays
    io.save_params("/tmp/ckpt", params)                      # orbax
    io.merge_checkpoints("ties", "llama-base", ["ft-a", "ft-b"], "merged",
                         density=0.2, weights=[1.0, 1.0])
"""

from mergejax._lazy import lazy_exports
from mergejax.io.checkpoint import (
    DEVICE_ALIGNMENT,
    CheckpointError,
    LazyCheckpoint,
    TensorInfo,
    aligned_empty,
    flatten_paths,
    open_checkpoint,
    unflatten_paths,
)
from mergejax.io.mergekit import MERGEKIT_METHODS, MergeConfig, load_config, parse_config
from mergejax.io.safetensors import (
    SafetensorsCheckpoint,
    ShardLayout,
    ShardWriter,
    load_safetensors,
    plan_shards,
    save_safetensors,
    write_index,
)
from mergejax.io.streaming import (
    OutputTensor,
    StreamPlan,
    iter_merged,
    merge_checkpoints,
    plan_stream,
)

# Orbax takes ~0.4 s to import: its readers and writers load on first use.
__getattr__, __dir__ = lazy_exports(__name__, {
    name: "mergejax.io.orbax" for name in ("OrbaxCheckpoint", "restore_params", "save_params")})

__all__ = [
    "DEVICE_ALIGNMENT",
    "CheckpointError",
    "LazyCheckpoint",
    "MERGEKIT_METHODS",
    "MergeConfig",
    "OrbaxCheckpoint",
    "OutputTensor",
    "SafetensorsCheckpoint",
    "ShardLayout",
    "ShardWriter",
    "StreamPlan",
    "TensorInfo",
    "aligned_empty",
    "flatten_paths",
    "iter_merged",
    "load_config",
    "load_safetensors",
    "merge_checkpoints",
    "open_checkpoint",
    "parse_config",
    "plan_shards",
    "plan_stream",
    "restore_params",
    "save_params",
    "save_safetensors",
    "unflatten_paths",
    "write_index",
]
