"""Parameter pytrees as orbax checkpoints: whole saves and restores, and a lazy reader.

`save_params` and `restore_params` use orbax's `StandardCheckpointer` (atomic: orbax
writes a temporary directory and renames it). `OrbaxCheckpoint` is the `LazyCheckpoint`
view: shapes and dtypes come from the checkpoint's metadata, and a read restores only the
leaves asked for (orbax's placeholder partial restore reads no other array's data).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.metadata import ArrayMetadata

from mergejax.io.checkpoint import CheckpointError, TensorInfo, _ReaderBase
from mergejax.tree import PyTree, flatten_with_paths

__all__ = ["OrbaxCheckpoint", "restore_params", "save_params"]


def save_params(directory: str, tree: PyTree, *, overwrite: bool = False) -> str:
    """Saves a parameter pytree as an orbax checkpoint and waits until it is committed.

    ``directory`` (made absolute) must not exist unless ``overwrite``. Returns its absolute
    path.

    Example::

        save_params("ckpt/merged", merged_params)
    """
    path = os.path.abspath(directory)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    with contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
        checkpointer.save(path, tree, force=overwrite)
        checkpointer.wait_until_finished()
    return path


def restore_params(directory: str, target: PyTree | None = None) -> PyTree:
    """Restores a whole parameter pytree saved by `save_params` (or any orbax pytree).

    ``target``, a pytree like the saved one of `jax.ShapeDtypeStruct` or arrays, gives
    each leaf's dtype (values are cast) and sharding; NumPy leaves restore as NumPy arrays.
    A leaf without a sharding, and every leaf when there is no ``target``, restores as it
    was saved: a NumPy array if it was one, else a `jax.Array` on the default device,
    whatever topology the checkpoint was saved from. A target whose paths or shapes differ
    from the checkpoint's is a `CheckpointError` naming the path.

    Example::

        sharding = NamedSharding(mesh, P("x"))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=sharding), like)
        params = restore_params("ckpt/merged", target)
    """
    path = _checkpoint_dir(directory)
    paths, leaves, treedef = flatten_with_paths(_metadata_tree(path))
    saved = dict(zip(paths, leaves))
    if target is None:
        for p, meta in saved.items():
            if not isinstance(meta, ArrayMetadata):
                raise CheckpointError(f"{path}: leaf '{p}' is not an array ({meta})")
        target = treedef.unflatten([jax.ShapeDtypeStruct(m.shape, m.dtype) for m in leaves])
    target_paths, target_leaves, target_def = flatten_with_paths(target)
    _check_target(path, saved, target_paths, target_leaves)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def spec(p: str, x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return x
        sharding = getattr(x, "sharding", None)
        if sharding is None and saved[p].sharding is not None:
            sharding = device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    target = target_def.unflatten([spec(p, x) for p, x in zip(target_paths, target_leaves)])
    with contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
        return checkpointer.restore(path, target)


def _check_target(path: str, metadata: dict[str, Any], target_paths: list[str],
                  target_leaves: list[Any]) -> None:
    missing = [p for p in metadata if p not in set(target_paths)]
    extra = [p for p in target_paths if p not in metadata]
    if missing or extra:
        raise CheckpointError(
            f"{path}: the target does not have the checkpoint's tree structure: "
            f"missing {missing[:5]}, unexpected {extra[:5]}")
    for p, leaf in zip(target_paths, target_leaves):
        saved = tuple(getattr(metadata[p], "shape", ()))
        if tuple(np.shape(leaf)) != saved:
            raise CheckpointError(f"{path}: leaf '{p}' is saved with shape {saved}, the "
                                  f"target has {tuple(np.shape(leaf))}")


def _checkpoint_dir(directory: str) -> str:
    path = os.path.abspath(directory)
    if not os.path.isfile(os.path.join(path, "_METADATA")):
        raise CheckpointError(f"{path}: not an orbax checkpoint directory (no _METADATA)")
    return path


def _metadata_tree(path: str) -> PyTree:
    """The saved tree with an orbax metadata object (`ArrayMetadata` for arrays) per leaf."""
    with contextlib.closing(ocp.PyTreeCheckpointer()) as checkpointer:
        return checkpointer.metadata(path).item_metadata.tree


class OrbaxCheckpoint(_ReaderBase):
    """A `LazyCheckpoint` over an orbax checkpoint directory.

    ``infos`` (names and paths `/`-joined, in flattening order) come from the metadata
    alone; `read` and `read_many` restore just the leaves asked for, as read-only NumPy
    arrays. Non-array leaves (strings) are not listed. `release` has nothing to drop.

    Example::

        with OrbaxCheckpoint("ckpt/finetuned") as ckpt:
            kernel = ckpt.read("encoder/layer_0/attn/query/kernel")
    """

    def __init__(self, location: str):
        path = _checkpoint_dir(location)
        self._paths, leaves, self._treedef = flatten_with_paths(_metadata_tree(path))
        super().__init__(path, [
            TensorInfo(p, p, tuple(m.shape), np.dtype(m.dtype),
                       math.prod(m.shape) * np.dtype(m.dtype).itemsize)
            for p, m in zip(self._paths, leaves) if isinstance(m, ArrayMetadata)])
        self._checkpointer = ocp.PyTreeCheckpointer()

    def read_many(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """Restores the leaves at ``paths`` in one orbax call, reading no other array.

        Example::

            values = ckpt.read_many(["dense/kernel", "dense/bias"])
        """
        wanted = {self.info(p).path for p in paths}
        item = self._treedef.unflatten(
            [0 if p in wanted else ocp.PLACEHOLDER for p in self._paths])
        restore_args = self._treedef.unflatten(
            [ocp.RestoreArgs(restore_type=np.ndarray) if p in wanted else ocp.PLACEHOLDER
             for p in self._paths])
        restored = self._checkpointer.restore(self.location, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args))
        values = {}
        for p, x in zip(*flatten_with_paths(restored)[:2]):
            if p in wanted:
                values[p] = np.asarray(x)
                values[p].flags.writeable = False
        return {p: values[p] for p in paths}

    def read(self, path: str) -> np.ndarray:
        """The leaf at ``path`` as a read-only NumPy array (a `read_many` of one leaf).

        Example::

            kernel = ckpt.read("dense/kernel")
        """
        return self.read_many([path])[path]

    def release(self, path: str) -> None:
        """Nothing to do: a read keeps nothing resident besides the returned array.

        Example::

            ckpt.release("dense/kernel")
        """
        self.info(path)

    def close(self) -> None:
        """Closes the orbax checkpointer.

        Example::

            ckpt.close()
        """
        self._checkpointer.close()
