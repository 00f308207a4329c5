"""Reading and writing the safetensors format, lazily and in shards (no ``safetensors``
dependency).

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (padded with
spaces to a multiple of 8) mapping each tensor name to ``{"dtype", "shape",
"data_offsets"}`` (offsets relative to the data section that follows) plus an optional
``"__metadata__"`` of strings, then the data section, which the tensors cover exactly
with no holes. A Hugging Face model directory holds ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json`` whose
``weight_map`` names each tensor's shard.

Reading memory-maps each file once and returns zero-copy views; `release` gives the pages
of a tensor back, so streaming through a model larger than memory keeps the resident set
bounded. Writing is planned up front (`plan_shards`: every header and offset from names,
shapes and dtypes alone), so that a `ShardWriter` can ``pwrite`` each tensor at its place
as soon as it is computed, in any order and from another thread.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from mergejax.io.checkpoint import (
    CheckpointError,
    TensorInfo,
    _ReaderBase,
    aligned_empty,
    flatten_paths,
    unflatten_paths,
)
from mergejax.tree import PyTree

__all__ = [
    "SafetensorsCheckpoint",
    "ShardLayout",
    "ShardWriter",
    "load_safetensors",
    "plan_shards",
    "save_safetensors",
    "write_index",
]

INDEX_FILE = "model.safetensors.index.json"

#: The format's dtype codes (little-endian, as stored).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "C64": np.dtype("<c8"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class _Tensor(NamedTuple):
    """A tensor's place: its file, and its byte range in that file (in the data section
    while the header is parsed)."""

    info: TensorInfo
    file: str
    start: int
    end: int


class _File:
    """One safetensors file, validated and memory-mapped read-only (``mm``), with a
    descriptor for positional reads (``fd``)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes, shorter than the 8-byte header length; "
                    "not a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file size {size} bytes "
                    "(truncated, or not a safetensors file)")
            header = _parse_json(f.read(n), path, "header")
            metadata = header.pop("__metadata__", {})
            if not (isinstance(metadata, dict)
                    and all(isinstance(v, str) for v in metadata.values())):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings, "
                                      f"got {metadata!r}")
            entries = sorted((_entry(path, name, e) for name, e in header.items()),
                             key=lambda t: (t.start, t.end))
            _check_coverage(path, entries, size - 8 - n)
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.fd = os.open(path, os.O_RDONLY)
        self.metadata: dict[str, str] = metadata
        self.tensors = {t.info.name: t._replace(start=8 + n + t.start, end=8 + n + t.end)
                        for t in entries}


def _check_coverage(path: str, entries: list[_Tensor], data_size: int) -> None:
    """Checks that the tensors' data ranges, sorted, tile ``[0, data_size)``."""
    end = 0
    for t in entries:
        if t.start < end:
            raise CheckpointError(f"{path}: tensor '{t.info.name}' (data bytes "
                                  f"{t.start}:{t.end}) overlaps the tensor before it")
        if t.start > end:
            raise CheckpointError(f"{path}: data bytes {end}:{t.start} before tensor "
                                  f"'{t.info.name}' belong to no tensor")
        end = t.end
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor '{entries[-1].info.name}' ends at data byte {end} but "
            f"the data section has only {data_size} bytes")
    if end < data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor "
                              "belong to no tensor")


def _parse_json(raw: bytes, path: str, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def _entry(path: str, name: str, entry: Any) -> _Tensor:
    """Validates one header entry (offsets relative to the data section)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}': {why}")

    if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
        raise bad(f"expected dtype, shape and data_offsets, got {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise bad(f"unknown dtype {code!r} (known: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    nbytes = math.prod(shape) * DTYPES[code].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"shape {shape} of {code} is {nbytes} bytes but data_offsets {offsets} "
                  f"span {offsets[1] - offsets[0]}")
    return _Tensor(TensorInfo(name, name.replace(".", "/"), tuple(shape), DTYPES[code], nbytes),
                   path, offsets[0], offsets[1])


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsCheckpoint(_ReaderBase):
    """A `LazyCheckpoint` over a ``.safetensors`` file or a Hugging Face model directory.

    A directory is read through ``model.safetensors.index.json`` when it has one (the index
    is authoritative: tensors of its shards that it does not list are ignored), else all
    its ``*.safetensors`` files are. Every file is validated when opened and memory-mapped
    once; `read` returns a read-only zero-copy view, `release` drops its pages from the
    resident set (views stay valid: their pages are read again if touched). Tensor paths
    are the dotted names with ``.`` replaced by ``/``. ``metadata`` is the first file's
    ``__metadata__``.

    Example::

        with SafetensorsCheckpoint("hf/Qwen2.5-0.5B") as ckpt:
            for info in ckpt.infos:
                w = ckpt.read(info.path)  # np.ndarray view, bf16 as ml_dtypes.bfloat16
                ...
                ckpt.release(info.path)
    """

    def __init__(self, location: str):
        files, weight_map = _shard_files(location)
        self._files: dict[str, _File] = {}
        try:
            for file in files:
                self._files[file] = _File(file)
            self._tensors = self._index(location, weight_map)
        except BaseException:
            self.close()
            raise
        self.metadata: dict[str, str] = dict(self._files[files[0]].metadata)
        super().__init__(location, [t.info for t in self._tensors.values()])

    def _index(self, location: str, weight_map: dict[str, str] | None) -> dict[str, _Tensor]:
        """The tensors to expose, by path, in storage order; checks them against the index."""
        tensors: dict[str, _Tensor] = {}
        file_of: dict[str, str] = {}
        for shard in self._files.values():
            for name, tensor in shard.tensors.items():
                if name in file_of:
                    raise CheckpointError(f"tensor '{name}' is stored in both "
                                          f"{file_of[name]} and {shard.path}")
                file_of[name] = shard.path
                if weight_map is not None and name not in weight_map:
                    continue
                other = tensors.get(tensor.info.path)
                if other is not None:
                    raise CheckpointError(f"{shard.path}: tensors '{other.info.name}' and "
                                          f"'{name}' have the same path '{tensor.info.path}'")
                tensors[tensor.info.path] = tensor
        for name, file in (weight_map or {}).items():
            if file_of.get(name) != os.path.join(location, file):
                raise CheckpointError(f"{os.path.join(location, INDEX_FILE)} maps tensor "
                                      f"'{name}' to {file}, which does not contain it")
        return tensors

    def _tensor(self, path: str) -> _Tensor:
        self.info(path)  # the error for a missing path
        return self._tensors[path]

    def read(self, path: str) -> np.ndarray:
        """The tensor at ``path``: a read-only view of the memory-mapped file (no copy).

        Example::

            w = ckpt.read("model/layers/0/mlp/down_proj/weight")
        """
        tensor = self._tensor(path)
        info = tensor.info
        return np.frombuffer(self._files[tensor.file].mm, info.dtype,
                             count=math.prod(info.shape), offset=tensor.start
                             ).reshape(info.shape)

    def load(self, path: str) -> np.ndarray:
        """The tensor at ``path`` as a private, writable, `DEVICE_ALIGNMENT`-aligned array,
        read with ``preadv`` straight into it: no page faults on the map and no second copy
        when given to ``jax.device_put(x, may_alias=True)`` (which on CPU computes on it in
        place). Half the CPU time of copying the `read` view into a device array.

        Example::

            w = jax.device_put(ckpt.load("model/layers/0/mlp/down_proj/weight"),
                               may_alias=True)
        """
        if not hasattr(os, "preadv"):
            return super().load(path)
        tensor = self._tensor(path)
        out = aligned_empty(tensor.info.shape, tensor.info.dtype)
        flat = out.reshape(-1).view(np.uint8)
        done, fd = 0, self._files[tensor.file].fd
        while done < flat.size:
            got = os.preadv(fd, [flat[done:]], tensor.start + done)
            if got == 0:
                raise CheckpointError(f"{tensor.file}: ends inside tensor '{tensor.info.name}' "
                                      "(the file was truncated after it was opened)")
            done += got
        return out

    def release(self, path: str) -> None:
        """Drops the pages of the tensor at ``path`` from the resident set (madvise).

        Views returned by `read` stay valid; touching them reads the pages again.

        Example::

            ckpt.release("model/layers/0/mlp/down_proj/weight")
        """
        tensor = self._tensor(path)
        start = tensor.start - tensor.start % mmap.PAGESIZE
        if tensor.end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._files[tensor.file].mm.madvise(mmap.MADV_DONTNEED, start,
                                                tensor.end - start)

    def close(self) -> None:
        """Unmaps the files; a file still viewed by a `read` array stays mapped until the
        last such view is garbage-collected.

        Example::

            ckpt.close()
        """
        for shard in self._files.values():
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1
            try:
                shard.mm.close()
            except BufferError:
                pass  # views exported: the mapping lives until they are collected


def _shard_files(location: str) -> tuple[list[str], dict[str, str] | None]:
    """The files of a safetensors checkpoint, and the index's weight_map if it has one."""
    index = os.path.join(location, INDEX_FILE)
    if os.path.isfile(location):
        return [location], None
    if os.path.isfile(index):
        with open(index, "rb") as f:
            weight_map = _parse_json(f.read(), index, "index").get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index}: weight_map must map tensor names to files")
        for name, file in weight_map.items():
            if not os.path.isfile(os.path.join(location, file)):
                raise CheckpointError(f"{index} maps tensor '{name}' to shard {file}, "
                                      "which does not exist")
        files = sorted(set(weight_map.values()))
        return [os.path.join(location, f) for f in files], weight_map
    if os.path.isdir(location):
        files = sorted(f for f in os.listdir(location) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{location}: no *.safetensors files and no {INDEX_FILE}")
        return [os.path.join(location, f) for f in files], None
    raise CheckpointError(f"{location}: no such file or directory")


class ShardLayout(NamedTuple):
    """One output file, planned before any value is computed (see `plan_shards`).

    ``tensors`` are ``(name, shape, dtype, offset)`` in the order given to `plan_shards`,
    offsets relative to the data section (which starts at ``len(header)``); ``header`` is
    the whole header (length and padded JSON), ``size`` the final file size.

    Example::

        layout = plan_shards([("w", (4, 4), np.float32)])[0]
        print(layout.file, layout.size)  # model.safetensors 160
    """

    file: str
    tensors: tuple[tuple[str, tuple[int, ...], np.dtype, int], ...]
    header: bytes
    size: int


def plan_shards(tensors: Sequence[tuple[str, Sequence[int], Any]],
                max_shard_bytes: int = 5 * 10**9,
                metadata: Mapping[str, str] | None = None) -> list[ShardLayout]:
    """Plans the files that will hold ``(name, shape, dtype)`` tensors.

    Tensors go to shards in the given order, a new shard starting when the next tensor
    would take the current one past ``max_shard_bytes`` of tensor data (a larger tensor gets
    a shard of its own). Files are named ``model-00001-of-00003.safetensors``, or
    ``model.safetensors`` for one shard. Within a file, data is laid out by decreasing item
    size, as the reference implementation does, so that every tensor is aligned to its
    item size. ``metadata`` is added to the header's ``__metadata__``, which has
    ``{"format": "pt"}`` unless it says otherwise (Hugging Face transformers requires it).

    Example::

        layouts = plan_shards([(n, x.shape, x.dtype) for n, x in flat.items()], 2 * 10**9)
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"safetensors metadata must map strings to strings, got {meta}")
    groups: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    names: set[str] = set()
    for name, shape, dtype in tensors:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        if dtype not in _CODES:
            raise CheckpointError(f"tensor '{name}': safetensors cannot store dtype {dtype}")
        if not isinstance(name, str) or name in names or name == "__metadata__":
            raise CheckpointError(f"tensor name {name!r} is repeated, reserved or not a string")
        names.add(name)
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dtype))
        size += nbytes
    return [_layout(_shard_name(i, len(groups)), group, meta)
            for i, group in enumerate(groups)]


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _layout(file: str, group: list[tuple[str, tuple[int, ...], np.dtype]],
            metadata: dict[str, str]) -> ShardLayout:
    offsets: dict[str, int] = {}
    header: dict[str, Any] = {"__metadata__": metadata}
    end = 0
    for name, shape, dtype in sorted(group, key=lambda t: -t[2].itemsize):
        offsets[name] = end
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                        "data_offsets": [end, end + nbytes]}
        end += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return ShardLayout(file, tuple((n, s, d, offsets[n]) for n, s, d in group), head,
                       len(head) + end)


class ShardWriter:
    """Writes one planned shard, tensor by tensor in any order, with ``os.pwrite``.

    Creating it truncates ``path``, writes the header and allocates the whole file;
    `write` puts a tensor's bytes at its planned offset; `close` checks that every tensor
    was written, then fsyncs. A writer touches no state but its own and its file, so it can
    run in a writer thread while the next tensor is computed. As a context manager it
    closes on success and only closes the file after an exception.

    Example::

        for layout in plan_shards(specs, max_shard_bytes):
            with ShardWriter(os.path.join(out, layout.file), layout) as writer:
                for name, *_ in layout.tensors:
                    writer.write(name, compute(name))
    """

    def __init__(self, path: str, layout: ShardLayout):
        self.path = path
        data = len(layout.header)
        self._places = {name: (shape, dtype, data + offset)
                        for name, shape, dtype, offset in layout.tensors}
        self._written: set[str] = set()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, layout.size)
            if hasattr(os, "posix_fallocate"):
                _allocate(self._fd, layout.size, path)
            self._pwrite(np.frombuffer(layout.header, np.uint8), 0)
        except BaseException:
            self._abort()
            raise

    def write(self, name: str, array: Any) -> None:
        """Writes tensor ``name``, which must have exactly its planned shape and dtype.

        Example::

            writer.write("model.norm.weight", np.ones(4096, ml_dtypes.bfloat16))
        """
        if name not in self._places:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in this shard")
        shape, dtype, offset = self._places[name]
        array = np.asarray(array, order="C")
        if array.shape != shape or array.dtype != dtype:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' is planned as {dtype}{list(shape)}, got "
                f"{array.dtype}{list(array.shape)}")
        self._pwrite(array.reshape(-1).view(np.uint8), offset)
        if hasattr(os, "posix_fadvise"):
            # Linux starts writing these pages back now (without waiting for it), so
            # `close`'s fsync finds little left to write.
            os.posix_fadvise(self._fd, offset, array.nbytes, os.POSIX_FADV_DONTNEED)
        self._written.add(name)

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        view = memoryview(data)
        while view:  # one call writes at most about 2 GiB on Linux
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Closes the file after checking that every tensor was written; then fsyncs.

        Example::

            writer.close()
        """
        if self._fd is None:
            return
        missing = [name for name in self._places if name not in self._written]
        if missing:
            self._abort()
            raise CheckpointError(
                f"{self.path}: {len(missing)} tensors were never written: "
                + ", ".join(f"'{m}'" for m in missing[:5]) + (" ..." if len(missing) > 5
                                                               else ""))
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def _allocate(fd: int, size: int, path: str) -> None:
    """Reserves the file's blocks, so a full disk fails now rather than mid-merge."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # the file system cannot reserve: ftruncate has sized the file
        raise CheckpointError(f"{path}: cannot allocate {size} bytes: {e}") from e


def write_index(directory: str, layouts: Sequence[ShardLayout],
                metadata: Mapping[str, Any] | None = None) -> str | None:
    """Writes ``model.safetensors.index.json`` for sharded ``layouts``; its path, or None.

    The index is ``{"metadata": {"total_size": <tensor bytes>, **metadata}, "weight_map":
    {name: file}}``, written atomically (a temporary file renamed over it). One shard needs
    no index, and none is written.

    Example::

        write_index(out, layouts)
    """
    if len(layouts) <= 1:
        return None
    total = sum(math.prod(shape) * dtype.itemsize
                for layout in layouts for _, shape, dtype, _ in layout.tensors)
    index = {"metadata": {"total_size": total, **(metadata or {})},
             "weight_map": {name: layout.file for layout in layouts
                            for name, *_ in layout.tensors}}
    path = os.path.join(directory, INDEX_FILE)
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".index-", suffix=".tmp",
                                     delete=False) as f:
        os.fchmod(f.fileno(), 0o644)  # a temporary file is private (0o600)
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
    return path


def save_safetensors(tree_or_flat: PyTree | Mapping[str, Any], directory: str, *,
                     max_shard_bytes: int = 5 * 10**9,
                     metadata: Mapping[str, str] | None = None) -> list[str]:
    """Saves a parameter pytree, or a flat dict of dotted names, as safetensors shards.

    A tensor's name is its `/`-joined leaf path with ``/`` replaced by ``.`` (a flat dict's
    dotted keys are kept); tensors are planned in the tree's flattening order (sorted
    keys). Leaves may be JAX or NumPy arrays; dtypes are kept (bf16 stays bf16).
    ``directory`` is created if needed; other safetensors files in it that this save would
    not replace are an error (a reader would mix them in). Returns the paths written: the
    shards, then the index if there is more than one shard.

    Example::

        save_safetensors(params, "out/merged", max_shard_bytes=2 * 10**9)
    """
    flat: dict[str, np.ndarray] = {}
    for path, leaf in flatten_paths(tree_or_flat).items():
        name = path.replace("/", ".")
        if name in flat:
            raise CheckpointError(f"two leaves are both saved as tensor '{name}'")
        flat[name] = np.asarray(leaf)
    layouts = plan_shards([(n, x.shape, x.dtype) for n, x in flat.items()],
                          max_shard_bytes, metadata)
    os.makedirs(directory, exist_ok=True)
    ours = {layout.file for layout in layouts} | ({INDEX_FILE} if len(layouts) > 1 else set())
    stale = sorted(f for f in os.listdir(directory) if f not in ours
                   and f.endswith((".safetensors", ".safetensors.index.json")))
    if stale:
        raise CheckpointError(f"{directory} already holds {stale}, which this save would "
                              "not replace; remove them or save to another directory")
    written = []
    for layout in layouts:
        written.append(os.path.join(directory, layout.file))
        with ShardWriter(written[-1], layout) as writer:
            for name, *_ in layout.tensors:
                writer.write(name, flat[name])
    index = write_index(directory, layouts)
    return written + ([index] if index else [])


def load_safetensors(location: str, *, nested: bool = True) -> dict[str, Any]:
    """Loads a safetensors file or directory into memory (copies, not views).

    With ``nested`` the result is nested dicts keyed by the components of the dotted names
    (``model.layers.0.mlp.weight`` -> ``{"model": {"layers": {"0": {"mlp": {"weight":
    ...}}}}}``); otherwise a flat dict keyed by the dotted names.

    Example::

        params = load_safetensors("hf/Qwen2.5-0.5B")
        w = params["model"]["embed_tokens"]["weight"]
    """
    with SafetensorsCheckpoint(location) as ckpt:
        values = [(info, np.array(ckpt.read(info.path))) for info in ckpt.infos]
    if nested:
        return unflatten_paths({info.path: x for info, x in values})
    return {info.name: x for info, x in values}
