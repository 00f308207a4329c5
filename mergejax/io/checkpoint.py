"""The lazy checkpoint interface shared by the safetensors and orbax readers.

A `LazyCheckpoint` lists its tensors (`TensorInfo`: name, `/`-joined path, shape, dtype,
size) without reading any values, and reads one tensor at a time, so that a merge can
stream through models larger than memory. `open_checkpoint` picks the reader for a path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from mergejax.tree import MergeError, PyTree, flatten_with_paths

__all__ = [
    "DEVICE_ALIGNMENT",
    "CheckpointError",
    "LazyCheckpoint",
    "TensorInfo",
    "aligned_empty",
    "flatten_paths",
    "open_checkpoint",
    "unflatten_paths",
]


#: XLA:CPU computes on a host array in place (``jax.device_put(x, may_alias=True)``) only
#: when its data starts at a multiple of this many bytes; otherwise it copies the array.
DEVICE_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised, writable array whose data is `DEVICE_ALIGNMENT`-byte aligned, so
    that ``jax.device_put(x, may_alias=True)`` uses it without a copy on CPU (an empty
    array has no data to align).

    Example::

        x = aligned_empty((4096, 1024), np.float32)
        x[...] = 0
        y = jax.device_put(x, may_alias=True)  # shares x's memory on CPU
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class CheckpointError(MergeError):
    """A checkpoint that cannot be read or written; the message names the file and tensor.

    Example::

        try:
            ckpt = open_checkpoint("models/llama")
        except CheckpointError as e:
            print(e)  # e.g. "models/llama/model-00002-of-00004.safetensors: truncated ..."
    """


class TensorInfo(NamedTuple):
    """What a checkpoint says about one tensor, read without touching its values.

    ``name`` is the name as stored (dotted in safetensors, `/`-joined in orbax), ``path``
    the `/`-joined leaf path, ``dtype`` a NumPy dtype (bf16 as ``ml_dtypes.bfloat16``).

    Example::

        info = ckpt.info("model/embed_tokens/weight")
        print(info.name, info.shape, info.dtype, info.nbytes)
    """

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


@runtime_checkable
class LazyCheckpoint(Protocol):
    """A checkpoint read one tensor at a time (`SafetensorsCheckpoint`, `OrbaxCheckpoint`).

    ``infos`` lists the tensors in the order they are stored. ``read`` returns a read-only
    array (a zero-copy view of a memory map where the format allows); ``load`` a private
    copy aligned for computing on it in place (`aligned_empty`); ``release`` drops what
    reading a tensor kept resident, and may be called any number of times.

    Example::

        with open_checkpoint("models/llama") as ckpt:
            for info in ckpt.infos:
                x = ckpt.read(info.path)
                ...
                ckpt.release(info.path)
    """

    location: str
    infos: list[TensorInfo]

    def info(self, path: str) -> TensorInfo: ...

    def read(self, path: str) -> np.ndarray: ...

    def load(self, path: str) -> np.ndarray: ...

    def release(self, path: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> LazyCheckpoint: ...

    def __exit__(self, *exc: object) -> None: ...


class _ReaderBase:
    """What both readers share: ``infos`` in storage order, lookup by path, ``with``.

    Subclasses define ``read``, ``release`` and ``close``, and may define a faster ``load``.
    """

    def __init__(self, location: str, infos: list[TensorInfo]):
        self.location = location
        self.infos = infos
        self._by_path = {info.path: info for info in infos}

    def info(self, path: str) -> TensorInfo:
        """The `TensorInfo` of the tensor at ``path``; `CheckpointError` if there is none.

        Example::

            rows, cols = ckpt.info("model/embed_tokens/weight").shape
        """
        try:
            return self._by_path[path]
        except KeyError:
            raise CheckpointError(
                f"{self.location}: no tensor at path '{path}' "
                f"({len(self.infos)} tensors, e.g. "
                f"{', '.join(repr(i.path) for i in self.infos[:3])})") from None

    def load(self, path: str) -> np.ndarray:
        """The tensor at ``path`` as a private, writable, `DEVICE_ALIGNMENT`-aligned copy:
        ``jax.device_put(x, may_alias=True)`` then computes on it without copying it again.

        Example::

            w = jax.device_put(ckpt.load("dense/kernel"), may_alias=True)
        """
        view = self.read(path)
        out = aligned_empty(view.shape, view.dtype)
        np.copyto(out, view)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(location: str) -> LazyCheckpoint:
    """Opens a checkpoint lazily, choosing the reader from what ``location`` holds.

    A ``.safetensors`` file, or a directory with ``model.safetensors.index.json`` or
    ``*.safetensors`` files (Hugging Face layout), gives a `SafetensorsCheckpoint`; an orbax
    checkpoint directory (one holding ``_METADATA``) an `OrbaxCheckpoint`.

    Example::

        with open_checkpoint("hf/Qwen2.5-0.5B") as ckpt:
            print(len(ckpt.infos), ckpt.infos[0])
    """
    # The readers import this module, and orbax is slow to import: both are imported here.
    if os.path.isfile(location) and location.endswith(".safetensors"):
        from mergejax.io.safetensors import SafetensorsCheckpoint
        return SafetensorsCheckpoint(location)
    if os.path.isdir(location):
        names = os.listdir(location)
        if any(n.endswith((".safetensors", "model.safetensors.index.json")) for n in names):
            from mergejax.io.safetensors import SafetensorsCheckpoint
            return SafetensorsCheckpoint(location)
        if "_METADATA" in names:
            from mergejax.io.orbax import OrbaxCheckpoint
            return OrbaxCheckpoint(location)
        inner = sorted(n for n in names
                       if os.path.isfile(os.path.join(location, n, "_METADATA")))
        hint = f" (an orbax checkpoint is in {inner})" if inner else ""
        raise CheckpointError(
            f"{location}: a directory with neither *.safetensors files nor an orbax "
            f"checkpoint (_METADATA){hint}")
    if not os.path.exists(location):
        raise CheckpointError(f"{location}: no such file or directory")
    raise CheckpointError(
        f"{location}: expected a .safetensors file, a directory of *.safetensors files "
        "(Hugging Face layout) or an orbax checkpoint directory")


def flatten_paths(tree: PyTree) -> dict[str, Any]:
    """The leaves of ``tree`` keyed by their `/`-joined paths; inverse of `unflatten_paths`.

    Example::

        flatten_paths({"dense": {"kernel": w, "bias": b}})
        # {"dense/bias": b, "dense/kernel": w}
    """
    paths, leaves, _ = flatten_with_paths(tree)
    _check_paths(paths)
    return dict(zip(paths, leaves))


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from `/`-joined paths; inverse of `flatten_paths` (keys are strings).

    Example::

        unflatten_paths({"dense/kernel": w, "dense/bias": b})
        # {"dense": {"kernel": w, "bias": b}}
    """
    _check_paths(list(flat))
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return tree


def _check_paths(paths: list[str]) -> None:
    """Raises `CheckpointError` if a path repeats or is also a prefix of another path."""
    prefixes: set[str] = set()
    for path in paths:
        parts = path.split("/")
        prefixes.update("/".join(parts[:i]) for i in range(1, len(parts)))
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise CheckpointError(f"two leaves have the path '{path}'")
        if path in prefixes:
            raise CheckpointError(
                f"'{path}' is both a leaf and a prefix of another leaf's path")
        seen.add(path)
