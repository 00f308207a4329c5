"""Out-of-core merging: checkpoints on disk merged tensor by tensor into a checkpoint on disk.

The same registered `MergeMethod` that merges pytrees in memory merges checkpoints larger
than memory here. Its hyperparameters are resolved for every tensor before anything is read
(`MergeMethod.plan`), then each tensor is read lazily from every input (a memory-mapped
view), merged by the method's leaf kernel in a compiled function cached by shape, dtype and
static hyperparameters (the 26 ``q_proj`` of a Llama share one; so do ``k_proj``, ``v_proj``
and ``o_proj`` unless the kernel reads ``ctx.path``), written to its output shard
and released, so memory holds a few tensors, not the model. A loader thread reads ahead
and a writer thread writes behind the merge. A method with statistics passes (model-wide
norms, a global top-k threshold) reads every tensor a pass `wants` once more per pass
before merging (`mergejax.method.fold_statistics`, as a per-leaf in-memory merge does).

The result is the in-memory merge's, bit for bit, random methods included: leaf keys
derive from the user's key and the leaf's path (`mergejax.leaf_key`), statistics are folded
in the pytree's leaf order, and each tensor runs the same kernel on the same inputs.

`merge_checkpoints` writes the output atomically (into ``OUT.partial``, renamed to ``OUT``
when complete) and resumes an interrupted run shard by shard.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jax
import numpy as np

from mergejax import registry
from mergejax.io import safetensors as st
from mergejax.io.checkpoint import LazyCheckpoint, open_checkpoint
from mergejax.method import (
    LeafKernels,
    LeafPlan,
    MergeMethod,
    TensorThresholds,
    canonical_view,
    fold_statistics,
    raise_not_finite,
)
from mergejax.methods import stages
from mergejax.tree import MergeError, is_float

__all__ = [
    "COPIED_FILES",
    "OutputTensor",
    "StreamPlan",
    "iter_merged",
    "merge_checkpoints",
    "plan_stream",
]

#: Files copied from the tokenizer source (by default the base model) next to the output.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt")
#: Tensors whose first axis is the vocabulary (a vocabulary-size mismatch is allowed there
#: under ``vocab_policy="base"``).
VOCAB_TENSORS = re.compile(r"(embed|lm_head|wte|word_embeddings|(^|/)output/)")
_PROGRESS_FILE = "mergejax-progress.json"
#: Tensors read ahead of the merge, and merged tensors waiting to be written: memory holds
#: about 2 * _AHEAD + 1 tensors' inputs and outputs.
_AHEAD = 3


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its stored name, `/`-path, shape and output dtype;
    ``leaf`` is its index in the plan's merged leaves, or None when it is copied from the
    reference model (integer and boolean tensors are never merged)."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    leaf: int | None


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """What a streaming merge does, fixed before any tensor is read (`plan_stream`).

    ``leaves`` resolves the method's hyperparameters for the merged tensors in the
    pytree's leaf order (the order statistics are folded in); ``tensors`` lists the output
    in the reference checkpoint's storage order (the order they are merged and written).
    """

    method: MergeMethod
    tensors: tuple[OutputTensor, ...]
    leaves: LeafPlan
    total_size: int
    vocab_rows: dict[str, int]
    fingerprint: str


def _get_method(method: str | MergeMethod) -> MergeMethod:
    found = registry.get_method(method) if isinstance(method, str) else method
    if not isinstance(found, MergeMethod):
        raise MergeError(
            f"{found.name} does not stream: it is not a per-tensor merge (learned and "
            "data-aware methods need the models in memory; use mergejax.merge)")
    return found


def _check_inputs(reference: LazyCheckpoint, others: Sequence[tuple[str, LazyCheckpoint]],
                  vocab_policy: str) -> dict[str, int]:
    """Every input holds the reference's tensors with its shapes and dtypes; returns the
    vocabulary tensors whose rows are fitted to the reference's (``vocab_policy="base"``)."""
    if vocab_policy not in ("error", "base"):
        raise MergeError(f"vocab_policy must be 'error' or 'base', got {vocab_policy!r}")
    vocab_rows: dict[str, int] = {}
    wanted = {i.path: i for i in reference.infos}
    for label, ckpt in others:
        have = {i.path: i for i in ckpt.infos}
        missing = [p for p in wanted if p not in have]
        if missing:
            raise MergeError(f"{label} ({ckpt.location}) has no tensor "
                             f"'{wanted[missing[0]].name}'" + (
                                 f" (and {len(missing) - 1} more missing)"
                                 if len(missing) > 1 else ""))
        extra = [p for p in have if p not in wanted]
        if extra:
            raise MergeError(f"{label} ({ckpt.location}) has tensor '{have[extra[0]].name}' "
                             f"that the reference {reference.location} lacks")
        for path, ref in wanted.items():
            info = have[path]
            if info.shape != ref.shape:
                rows_only = (len(info.shape) == len(ref.shape) and info.shape[1:] == ref.shape[1:]
                             and VOCAB_TENSORS.search(path))
                if rows_only and vocab_policy == "base":
                    vocab_rows[path] = ref.shape[0]
                    continue
                what = "vocabulary-size mismatch" if rows_only else "shape mismatch"
                hint = ("; set vocab_policy='base' (mergekit's tokenizer_source: base) to "
                        "keep the reference's vocabulary") if rows_only else ""
                raise MergeError(f"{what} at '{ref.name}': {reference.location} has "
                                 f"{ref.shape}, {label} ({ckpt.location}) has {info.shape}"
                                 + hint)
            if info.dtype != ref.dtype:
                raise MergeError(f"dtype mismatch at '{ref.name}': {reference.location} has "
                                 f"{ref.dtype}, {label} ({ckpt.location}) has {info.dtype}")
    return vocab_rows


def _leaf_order(paths: Sequence[str]) -> list[int]:
    """Indices of ``paths`` in the order a nested dict of them flattens (sorted keys at
    every level), the order in which the in-memory engine folds statistics."""
    return sorted(range(len(paths)), key=lambda i: paths[i].split("/"))


def plan_stream(method: str | MergeMethod, base: LazyCheckpoint | None,
                models: Sequence[LazyCheckpoint], *, key: jax.Array | None = None,
                out_dtype: Any = None, vocab_policy: str = "error",
                **hparams: Any) -> StreamPlan:
    """Checks the inputs and resolves ``hparams`` for every tensor, reading no values.

    Raises `MergeError` (naming the tensor and the checkpoint) for a tensor missing from
    one input, a shape or dtype mismatch, a vocabulary-size mismatch (unless
    ``vocab_policy="base"``: every model's vocabulary tensors are cut or padded to the
    base's rows, rows the base has and a model lacks taking the base's values, as
    mergekit's ``tokenizer_source: base`` does for vocabularies that extend one another),
    an unknown method or hyperparameter, and everything the method's own checks reject.

    Example::

        with open_checkpoint("base") as b, open_checkpoint("ft") as m:
            plan = plan_stream("ties", b, [m], density=0.2)
    """
    method = _get_method(method)
    models = list(models)
    if method.needs_base and base is None:
        raise MergeError(f"{method.name} needs a base (pretrained) model; got base=None")
    reference = base if base is not None else models[0]
    others = [(f"models[{k}]", m) for k, m in enumerate(models)]
    if base is None:
        others = others[1:]
    vocab_rows = _check_inputs(reference, others, vocab_policy)

    infos = list(reference.infos)
    floats = [i for i in infos if is_float(i)]
    order = _leaf_order([i.path for i in floats])
    merged = [floats[j] for j in order]
    references = [jax.ShapeDtypeStruct(i.shape, i.dtype) for i in merged]
    leaves = method.plan([i.path for i in merged], references, len(models), key=key,
                         out_dtype=out_dtype, **hparams)
    index = {i.path: j for j, i in enumerate(merged)}
    tensors = tuple(OutputTensor(
        i.name, i.path, i.shape,
        np.dtype(leaves.out_dtypes[index[i.path]]) if i.path in index else i.dtype,
        index.get(i.path)) for i in infos)
    fingerprint = _fingerprint(method, base, models, tensors, key, hparams)
    return StreamPlan(method, tensors, leaves, sum(int(np.prod(i.shape)) for i in merged),
                      vocab_rows, fingerprint)


def _fingerprint(method: MergeMethod, base, models, tensors, key, hparams) -> str:
    """What an interrupted run must agree on to be resumed."""
    parts = [method.name, repr(sorted((k, repr(v)) for k, v in hparams.items())),
             repr(None if key is None else np.asarray(jax.random.key_data(key)).tolist()),
             repr([(t.name, t.shape, t.dtype.name) for t in tensors])]
    for ckpt in ([base] if base is not None else []) + list(models):
        parts.append(os.path.abspath(ckpt.location))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fit_rows(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``x`` with the reference's number of rows: cut, or padded with the reference's."""
    n = reference.shape[0]
    if x.shape[0] >= n:
        return x[:n]
    return np.concatenate([x, reference[x.shape[0]:]])


class _Reader:
    """Reads one tensor from every input as device arrays and releases it afterwards."""

    def __init__(self, plan: StreamPlan, base: LazyCheckpoint | None,
                 models: Sequence[LazyCheckpoint], mesh: jax.sharding.Mesh | None):
        self._plan, self._base, self._models, self._mesh = plan, base, list(models), mesh

    def _put(self, x: np.ndarray) -> jax.Array:
        if self._mesh is None:
            return jax.device_put(x, may_alias=True)  # in place on CPU: `load`ed, aligned
        axis = self._mesh.axis_names[0]
        n = self._mesh.shape[axis]
        spec = (jax.sharding.PartitionSpec(axis) if x.ndim and x.shape[0] % n == 0
                else jax.sharding.PartitionSpec())
        return jax.device_put(x, jax.sharding.NamedSharding(self._mesh, spec))

    def _host(self, path: str) -> list[np.ndarray]:
        """The tensor at ``path`` of the base (if any) and of every model, on the host."""
        reference = (self._base or self._models[0]).load(path)
        inputs = [reference] if self._base is not None else []
        for k, ckpt in enumerate(self._models):
            if self._base is None and k == 0:
                x = reference
            else:
                x = ckpt.load(path)
                if path in self._plan.vocab_rows:
                    x = _fit_rows(x, reference)
            inputs.append(x)
        return inputs

    def read(self, path: str, flat: bool = False
             ) -> tuple[jax.Array | None, tuple[jax.Array, ...]]:
        """The tensor at ``path`` of the base (None without one) and of every model;
        ``flat``: as their `canonical_view` (a free view before they go to the device)."""
        arrays = [self._put(x.reshape(canonical_view(x.size)) if flat else x)
                  for x in self._host(path)]
        if self._base is None:
            return None, tuple(arrays)
        return arrays[0], tuple(arrays[1:])

    def load(self, path: str, flat: bool = False, chunked: bool = False) -> Any:
        """`read`, waiting until the arrays are on the device (for a prefetching thread);
        ``chunked``: ``(Chunks, host arrays)`` of the base's and models' flattened tensor
        (`stages.cut_chunks`), unless it is float64 (then as `read`)."""
        if chunked:
            arrays = self._host(path)
            if arrays[0].dtype != np.float64:
                chunks = stages.cut_chunks([x.reshape(-1) for x in arrays])
                return jax.block_until_ready(chunks), arrays
        return jax.block_until_ready(self.read(path, flat))

    def release(self, path: str) -> None:
        for ckpt in ([self._base] if self._base is not None else []) + self._models:
            ckpt.release(path)


def iter_merged(plan: StreamPlan, base: LazyCheckpoint | None,
                models: Sequence[LazyCheckpoint], *, key: jax.Array | None = None,
                mesh: jax.sharding.Mesh | None = None, check_finite: bool = True,
                skip: Callable[[OutputTensor], bool] = lambda t: False,
                ) -> Iterator[tuple[OutputTensor, np.ndarray]]:
    """Yields ``(tensor, merged values)`` for every output tensor in storage order.

    Statistics passes (if the method has them) read every merged tensor first, once per
    pass. A merged tensor with NaN or Inf raises `MergeError` naming it (and the input
    holding non-finite values, if one does). ``skip(tensor)`` leaves tensors out (those of
    output shards an interrupted run already wrote). With ``mesh``, each tensor is sharded
    over the mesh's first axis when its first dimension divides evenly.

    Example::

        for tensor, values in iter_merged(plan, base_ckpt, [ft_ckpt]):
            print(tensor.name, values.dtype)
    """
    reader = _Reader(plan, base, models, mesh)
    method, leaves = plan.method, plan.leaves

    stats: tuple[Any, ...] = ()
    if method.statistics and not all(skip(t) for t in plan.tensors if t.leaf is not None):
        stats = fold_statistics(method, leaves, lambda j: reader.read(leaves.paths[j]),
                                key, plan.total_size,
                                release=lambda j: reader.release(leaves.paths[j]))
    kernels = LeafKernels(method, leaves, stats, plan.total_size, check_finite=check_finite)
    todo = [t for t in plan.tensors if not skip(t)]
    # Kernels that give the same bits on any view of a tensor run on its `canonical_view`:
    # one compile per size, so a Llama's gate_proj, up_proj and down_proj share one.
    flat = {t.path: mesh is None and method.is_reshape_invariant(dict(leaves.static[t.leaf][1]))
            for t in todo if t.leaf is not None}
    # Kernels whose only tensor-wide quantities are ranked values (`TensorThresholds`) run
    # on fixed-size chunks once those are selected over the chunks: one compile for all
    # sizes (a per-size kernel's selection takes 2-4 s to compile).
    chunked = {t.path: _thresholds_spec(method, leaves.static[t.leaf][1], t, base, mesh)
               for t in todo if t.leaf is not None}
    with futures.ThreadPoolExecutor(1) as pool:
        # The next `_AHEAD` merged tensors are read (page faults, copy to the device) while
        # this one merges (or compiles) and the caller writes the previous ones.
        submitted = (pool.submit(reader.load, t.path, flat[t.path],
                                 chunked[t.path] is not None)
                     for t in todo if t.leaf is not None)
        loads = collections.deque(itertools.islice(submitted, _AHEAD))
        for tensor in todo:
            if tensor.leaf is None:
                reference = base if base is not None else models[0]
                yield tensor, reference.read(tensor.path)
                reference.release(tensor.path)
                continue
            j = tensor.leaf
            loaded = loads.popleft().result()
            loads.extend(itertools.islice(submitted, 1))
            if isinstance(loaded[0], stages.Chunks):
                # The host arrays the chunks alias stay referenced until the tensor is done.
                chunks, (b, *xs) = loaded
                values, peak = _merge_chunks(kernels, j, chunked[tensor.path], chunks, key,
                                             tensor)
            else:
                b, xs = loaded
                out, peak, held = kernels.run(j, b, xs, key)
                if not held:
                    out, peak = kernels.run_exact(j, b, xs, key)
                values = np.asarray(out).reshape(tensor.shape)
            if check_finite and not np.isfinite(np.asarray(peak)):
                raise_not_finite(method.name, tensor.name, b, xs)
            reader.release(tensor.path)
            yield tensor, values


def _thresholds_spec(method: MergeMethod, static, tensor: OutputTensor,
                     base: LazyCheckpoint | None, mesh) -> TensorThresholds | None:
    """The `TensorThresholds` of a tensor merged chunk by chunk, or None."""
    if (method.tensor_thresholds is None or base is None or mesh is not None
            or int(np.prod(tensor.shape)) < stages.CHUNKED_MIN_SIZE):
        return None
    return method.tensor_thresholds(dict(static))


def _merge_chunks(kernels: LeafKernels, j: int, spec: TensorThresholds,
                  chunks: stages.Chunks, key, tensor: OutputTensor
                  ) -> tuple[np.ndarray, Any]:
    """Plan leaf ``j`` merged from its `Chunks`: the thresholds selected over them, then
    the kernel on each chunk (all dispatched, then a chunk whose speculation failed run
    again exactly); ``(values, max|values| or None)``."""
    thresholds = stages.chunked_thresholds(chunks, spec.ranks(chunks.size), spec.values)
    outs = [kernels.run(j, inputs[0], inputs[1:], key, thresholds=thresholds)
            for inputs in chunks.chunks]
    values = np.empty(chunks.size, tensor.dtype)
    peaks, offset = [], 0
    for inputs, (out, peak, held), valid in zip(chunks.chunks, outs, chunks.valid):
        if not held:
            out, peak = kernels.run_exact(j, inputs[0], inputs[1:], key, thresholds)
        values[offset:offset + valid] = np.asarray(out)[:valid]
        peaks.append(peak)
        offset += valid
    peak = None if peaks[0] is None else np.max(np.stack([np.asarray(p) for p in peaks]))
    return values.reshape(tensor.shape), peak


class _Progress:
    """One status line: tensors and bytes done, throughput, time left (stderr)."""

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool):
        self._total, self._count, self._enabled = total_bytes, total_tensors, enabled
        self.done = self._tensors = 0
        self._start = self._last = time.perf_counter()
        self._tty = sys.stderr.isatty()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self._tensors += 1
        now = time.perf_counter()
        if not self._enabled or (now - self._last < (0.5 if self._tty else 10.0)
                                 and self._tensors < self._count):
            return
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        left = (self._total - self.done) / rate if rate else 0.0
        line = (f"merged {self._tensors}/{self._count} tensors, "
                f"{self.done / 2**30:.2f}/{self._total / 2**30:.2f} GiB written, "
                f"{rate / 2**20:.0f} MiB/s, {left:.0f} s left")
        print(("\r" + line) if self._tty else line, end="" if self._tty else "\n",
              file=sys.stderr, flush=True)
        if self._tty and self._tensors >= self._count:
            print(file=sys.stderr)


def _load_progress(work: str, fingerprint: str) -> set[str]:
    """The shard files an interrupted run of the same merge finished in ``work``."""
    try:
        with open(os.path.join(work, _PROGRESS_FILE)) as f:
            progress = json.load(f)
    except (OSError, ValueError):
        return set()
    if progress.get("fingerprint") != fingerprint:
        raise MergeError(
            f"{work} holds the partial output of a different merge (other inputs, method "
            "or hyperparameters); remove it, or pass overwrite to start again")
    return set(progress.get("done", []))


def _save_progress(work: str, fingerprint: str, done: set[str]) -> None:
    tmp = os.path.join(work, _PROGRESS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "done": sorted(done)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(work, _PROGRESS_FILE))


def _copy_side_files(source: str, work: str, out_dtype: np.dtype | None) -> list[str]:
    """Copies `COPIED_FILES` found in ``source``; ``config.json``'s ``torch_dtype`` is set
    to the output dtype (as mergekit does)."""
    copied = []
    for name in COPIED_FILES:
        src = os.path.join(source, name)
        if not os.path.isfile(src):
            continue
        if name == "config.json" and out_dtype is not None:
            with open(src) as f:
                config = json.load(f)
            config["torch_dtype"] = np.dtype(out_dtype).name
            with open(os.path.join(work, name), "w") as f:
                json.dump(config, f, indent=2)
        else:
            shutil.copyfile(src, os.path.join(work, name))
        copied.append(name)
    return copied


def merge_checkpoints(method: str | MergeMethod, base: str | None, models: Sequence[str],
                      out: str, *, key: jax.Array | None = None, out_dtype: Any = None,
                      max_shard_bytes: int = 5 * 10**9, vocab_policy: str = "error",
                      copy_files_from: str | None = None, overwrite: bool = False,
                      mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                      **hparams: Any) -> dict[str, Any]:
    """Merges the checkpoints at ``base`` and ``models`` into a safetensors checkpoint
    (Hugging Face's sharded layout) at ``out``, streaming tensor by tensor.

    Inputs are safetensors files or directories, or orbax checkpoints
    (`mergejax.io.open_checkpoint`). The output is written into ``out + ".partial"`` and
    renamed to ``out`` once complete, so a killed run never leaves a complete-looking
    ``out``; rerunning the same merge resumes, keeping the output shards already finished
    (a partial output of a different merge is an error). An existing ``out`` is an error
    unless ``overwrite``, and is replaced only when the new output is complete. Every
    input check runs before anything is written. ``copy_files_from`` (e.g. the base)
    gives the `COPIED_FILES` copied next to the weights. Returns a summary (tensors,
    bytes, seconds, shards written and reused).

    Example::

        merge_checkpoints("ties", "llama-base", ["llama-ft-a", "llama-ft-b"], "merged",
                          density=0.2, weights=[1.0, 1.0], out_dtype="bfloat16")
    """
    start = time.perf_counter()
    out = os.path.abspath(out)
    work = out + ".partial"
    if os.path.exists(out) and not overwrite:
        raise MergeError(f"output {out} already exists; pass overwrite to replace it")
    if copy_files_from is not None and not os.path.isdir(copy_files_from):
        raise MergeError(f"copy_files_from={copy_files_from!r} is not a directory")
    method = _get_method(method)
    opened: list[LazyCheckpoint] = []
    try:
        base_ckpt = open_checkpoint(base) if base is not None else None
        if base_ckpt is not None:
            opened.append(base_ckpt)
        model_ckpts = []
        for location in models:
            model_ckpts.append(open_checkpoint(location))
            opened.append(model_ckpts[-1])
        plan = plan_stream(method, base_ckpt, model_ckpts, key=key, out_dtype=out_dtype,
                           vocab_policy=vocab_policy, **hparams)
        layouts = st.plan_shards([(_stored_name(t), t.shape, t.dtype) for t in plan.tensors],
                                 max_shard_bytes)
        if os.path.exists(work) and overwrite:
            shutil.rmtree(work)
        os.makedirs(work, exist_ok=True)
        done = _load_progress(work, plan.fingerprint)
        done = {f for f in done
                if os.path.isfile(os.path.join(work, f))
                and os.path.getsize(os.path.join(work, f)) == _layout(layouts, f).size}
        summary = _write_shards(plan, base_ckpt, model_ckpts, work, layouts, done, key=key,
                                mesh=mesh, progress=progress)
    finally:
        for ckpt in opened:
            ckpt.close()
    st.write_index(work, layouts)
    copied = _copy_side_files(copy_files_from, work, out_dtype) if copy_files_from else []
    os.remove(os.path.join(work, _PROGRESS_FILE))
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)
    summary.update(out=out, copied=copied, seconds=time.perf_counter() - start,
                   shards=[layout.file for layout in layouts])
    return summary


def _stored_name(tensor: OutputTensor) -> str:
    """The output's dotted tensor name (orbax inputs name tensors by `/`-paths)."""
    return tensor.name.replace("/", ".")


def _layout(layouts: Sequence[st.ShardLayout], file: str) -> st.ShardLayout:
    return next(layout for layout in layouts if layout.file == file)


def _write_shards(plan: StreamPlan, base, models, work: str,
                  layouts: Sequence[st.ShardLayout], done: set[str], *, key, mesh,
                  progress: bool) -> dict[str, Any]:
    """Merges and writes every shard not in ``done``; a writer thread writes merged
    tensors (up to `_AHEAD` queued) while the next ones are read and merged, and a shard
    is recorded done once closed (fsynced)."""
    shard_of = {name: layout.file for layout in layouts for name, *_ in layout.tensors}
    names = {t.path: _stored_name(t) for t in plan.tensors}
    todo = [t for t in plan.tensors if shard_of[names[t.path]] not in done]
    bar = _Progress(sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in todo), len(todo),
                    progress)
    writers: dict[str, st.ShardWriter] = {}
    remaining = {layout.file: len(layout.tensors) for layout in layouts}

    def write(tensor: OutputTensor, values: np.ndarray) -> None:
        name = names[tensor.path]
        file = shard_of[name]
        if file not in writers:
            writers[file] = st.ShardWriter(os.path.join(work, file), _layout(layouts, file))
        writers[file].write(name, np.ascontiguousarray(values))
        bar.update(values.nbytes)
        remaining[file] -= 1
        if remaining[file] == 0:
            writers.pop(file).close()
            done.add(file)
            _save_progress(work, plan.fingerprint, done)

    reused = set(done)
    with futures.ThreadPoolExecutor(1) as pool:
        writes: collections.deque[futures.Future] = collections.deque()
        for tensor, values in iter_merged(
                plan, base, models, key=key, mesh=mesh,
                skip=lambda t: shard_of[names[t.path]] in reused):
            if len(writes) == _AHEAD:
                writes.popleft().result()
            writes.append(pool.submit(write, tensor, values))
        for pending in writes:
            pending.result()
    return {"tensors": len(todo), "bytes": bar.done, "reused_shards": sorted(reused)}
