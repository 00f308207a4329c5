"""The safetensors reader and writer, checked against the reference `safetensors` library
(files written by one are read by the other) and against hand-built corrupt files."""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.flax
import safetensors.numpy

from mergejax.io.checkpoint import (
    DEVICE_ALIGNMENT,
    CheckpointError,
    LazyCheckpoint,
    flatten_paths,
    open_checkpoint,
    unflatten_paths,
)
from mergejax.io.safetensors import (
    SafetensorsCheckpoint,
    ShardWriter,
    load_safetensors,
    plan_shards,
    save_safetensors,
    write_index,
)


def _flat() -> dict[str, np.ndarray]:
    """Dotted names -> arrays of every dtype the tests exchange with the library."""
    rng = np.random.default_rng(0)
    return {
        "model.embed.weight": rng.normal(size=(7, 5)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.weight": rng.normal(size=(5, 3)).astype(np.float16),
        "model.layers.0.mlp.bias": rng.normal(size=(3,)).astype(np.float32),
        "model.layers.1.mlp.weight": rng.normal(size=(5, 3)).astype(np.float32),
        "model.positions": rng.integers(-2**40, 2**40, size=(4,)),
        "model.step": np.array(12, np.int64),
        "model.empty": np.zeros((0, 3), np.float32),
        "model.mask": rng.integers(0, 2, size=(6,)).astype(bool),
        "model.tokens": rng.integers(0, 255, size=(9,)).astype(np.uint8),
    }


def _same(a, b) -> bool:
    """Equal dtype, shape and bytes (exact, for every dtype including bf16 and float8)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _header(path) -> dict:
    """The JSON header of a safetensors file, parsed here (not by the code under test)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _raw_file(path, header: dict | bytes, data: bytes = b"") -> None:
    """A safetensors file built by hand (possibly broken): header JSON, then ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def _raises(match: str, fn, *args):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    return str(info.value)


# --- round trips, and interchange with the reference library ---------------------------


def test_round_trip_nested_and_flat(tmp_path):
    flat = _flat()
    tree = unflatten_paths({n.replace(".", "/"): x for n, x in flat.items()})
    written = save_safetensors(tree, str(tmp_path / "a"))
    assert written == [str(tmp_path / "a" / "model.safetensors")]
    nested = load_safetensors(str(tmp_path / "a"))
    assert nested["model"]["layers"]["0"]["mlp"]["weight"].dtype == np.float16
    got = {p.replace("/", "."): x for p, x in flatten_paths(nested).items()}
    assert set(got) == set(flat)
    assert all(_same(got[n], flat[n]) for n in flat)
    # a flat dotted dict saves the same tensors under the same names
    save_safetensors(flat, str(tmp_path / "b"))
    again = load_safetensors(str(tmp_path / "b"), nested=False)
    assert set(again) == set(flat) and all(_same(again[n], flat[n]) for n in flat)
    assert all(x.flags.writeable for x in again.values())  # copies, not views


def test_jax_arrays_keep_bf16(tmp_path):
    x = jnp.linspace(-3, 3, 12, dtype=jnp.bfloat16).reshape(3, 4)
    save_safetensors({"dense": {"kernel": x}}, str(tmp_path))
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="flax") as f:
        got = f.get_tensor("dense.kernel")
    assert got.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(got).view(np.uint16), np.asarray(x).view(np.uint16))


def test_our_files_are_read_by_the_library(tmp_path):
    flat = _flat()
    save_safetensors(flat, str(tmp_path), metadata={"merged_by": "mergejax"})
    path = str(tmp_path / "model.safetensors")
    numpy_side = safetensors.numpy.load_file(path)
    assert set(numpy_side) == set(flat)
    for name, x in flat.items():
        if x.dtype != ml_dtypes.bfloat16:
            assert _same(numpy_side[name], x), name
    with safetensors.safe_open(path, framework="flax") as f:
        assert f.metadata() == {"format": "pt", "merged_by": "mergejax"}
        bf16 = f.get_tensor("model.embed.weight")
    assert bf16.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(bf16).view(np.uint16),
                          flat["model.embed.weight"].view(np.uint16))
    with open(path, "rb") as f:  # the header is padded to a multiple of 8 bytes
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0
    header = _header(path)
    for name, entry in header.items():  # every tensor aligned to its item size
        if name != "__metadata__":
            assert entry["data_offsets"][0] % np.dtype(flat[name].dtype).itemsize == 0


def test_float8_files_match_the_library_header(tmp_path):
    flat = {"a": np.arange(4).astype(ml_dtypes.float8_e4m3fn),
            "b": np.arange(3).astype(ml_dtypes.float8_e5m2)}
    save_safetensors(flat, str(tmp_path / "ours"))
    with safetensors.safe_open(str(tmp_path / "ours" / "model.safetensors"),
                               framework="np") as f:
        assert f.get_slice("a").get_dtype() == "F8_E4M3"
        assert f.get_slice("b").get_dtype() == "F8_E5M2"
    path = str(tmp_path / "theirs.safetensors")
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in flat.items()}, path)
    with SafetensorsCheckpoint(path) as ckpt:
        assert all(_same(ckpt.read(k), v) for k, v in flat.items())


def test_library_files_are_read_by_ours(tmp_path):
    flat = _flat()
    bf16 = {n: x for n, x in flat.items() if x.dtype == ml_dtypes.bfloat16}
    rest = {n: x for n, x in flat.items() if n not in bf16}
    safetensors.numpy.save_file(rest, str(tmp_path / "a.safetensors"),
                                metadata={"format": "np", "k": "v"})
    safetensors.flax.save_file({n: jnp.asarray(x) for n, x in bf16.items()},
                               str(tmp_path / "b.safetensors"))
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert isinstance(ckpt, SafetensorsCheckpoint) and isinstance(ckpt, LazyCheckpoint)
        assert ckpt.metadata == {"format": "np", "k": "v"}
        assert {i.name for i in ckpt.infos} == set(flat)
        for info in ckpt.infos:
            x = flat[info.name]
            assert info.path == info.name.replace(".", "/")
            assert (info.shape, info.dtype, info.nbytes) == (x.shape, x.dtype, x.nbytes)
            assert _same(ckpt.read(info.path), x), info.name
        # storage order: the files in name order, each in data-offset order
        begins = [_header(tmp_path / "a.safetensors")[i.name]["data_offsets"][0]
                  for i in ckpt.infos if i.name in rest]
        assert begins == sorted(begins) and ckpt.infos[-1].name in bf16
    assert _same(load_safetensors(str(tmp_path / "a.safetensors"))["model"]["step"],
                 flat["model.step"])


def test_sharded_layout_and_index(tmp_path):
    # float32 elements; save_safetensors takes the tree's flattening order (sorted keys)
    sizes = {"t0": 10, "t1": 10, "t2": 10, "t3_big": 30, "t4": 2}
    flat = {n: np.arange(k, dtype=np.float32) + i for i, (n, k) in enumerate(sizes.items())}
    files = save_safetensors(flat, str(tmp_path), max_shard_bytes=100)
    # 40 + 40 fit in 100; t2 opens a shard; t3_big (120 bytes) gets its own; t4 follows
    expected = {"t0": 1, "t1": 1, "t2": 2, "t3_big": 3, "t4": 4}
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert files == [str(tmp_path / n) for n in names] + [
        str(tmp_path / "model.safetensors.index.json")]
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(x.nbytes for x in flat.values())}
    assert index["weight_map"] == {n: names[s - 1] for n, s in expected.items()}
    for name, file in index["weight_map"].items():
        with safetensors.safe_open(str(tmp_path / file), framework="np") as f:
            assert name in f.keys()
            assert f.metadata() == {"format": "pt"}
            assert _same(f.get_tensor(name), flat[name])
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert [i.name for i in ckpt.infos] == list(sizes)
        assert all(_same(ckpt.read(n), flat[n]) for n in flat)


def test_a_single_shard_has_no_index(tmp_path):
    layouts = plan_shards([("a", (3,), np.float32)])
    assert [layout.file for layout in layouts] == ["model.safetensors"]
    assert write_index(str(tmp_path), layouts) is None
    assert os.listdir(tmp_path) == []


def test_save_refuses_stale_shards(tmp_path):
    two = {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32)}
    save_safetensors(two, str(tmp_path), max_shard_bytes=40)
    save_safetensors(two, str(tmp_path), max_shard_bytes=40)  # replaces the same files
    message = _raises("would not replace", save_safetensors, two, str(tmp_path))
    assert "model-00001-of-00002.safetensors" in message
    assert "model.safetensors.index.json" in message


# --- lazy reads ---------------------------------------------------------------------


def test_read_is_a_read_only_view_of_the_map(tmp_path):
    save_safetensors(_flat(), str(tmp_path))
    with open_checkpoint(str(tmp_path)) as ckpt:
        a = ckpt.read("model/layers/0/mlp/weight")
        b = ckpt.read("model/layers/0/mlp/weight")
        c = ckpt.read("model/layers/1/mlp/weight")
        assert np.shares_memory(a, b) and not np.shares_memory(a, c)
        assert not a.flags.writeable
        root = a
        while isinstance(root, np.ndarray):
            root = root.base
        assert isinstance(root.obj if isinstance(root, memoryview) else root, mmap.mmap)
        with pytest.raises(ValueError):
            a[0, 0] = 1


def test_release_bounds_the_resident_set_and_reads_stay_right(tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 2**20)).astype(np.float32)  # 16 MiB
    save_safetensors({"small": np.ones(3, np.float16), "x": x}, str(tmp_path))

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")

    def rss_file_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))

    with open_checkpoint(str(tmp_path)) as ckpt:
        view = ckpt.read("x")
        before = rss_file_kib()
        assert view.sum(dtype=np.float64) == pytest.approx(x.sum(dtype=np.float64))
        touched = rss_file_kib()
        ckpt.release("x")
        ckpt.release("x")  # twice is fine
        released = rss_file_kib()
        assert touched - before > 12 * 1024 and touched - released > 12 * 1024
        assert _same(view, x) and _same(ckpt.read("x"), x)
        assert _same(ckpt.read("small"), np.ones(3, np.float16))


def test_load_is_a_private_aligned_copy_that_jax_uses_in_place(tmp_path):
    flat = _flat()
    save_safetensors(flat, str(tmp_path))
    with open_checkpoint(str(tmp_path)) as ckpt:
        for name, want in flat.items():
            path = name.replace(".", "/")
            got = ckpt.load(path)
            assert _same(got, want), name
            assert got.flags.writeable and not np.shares_memory(got, ckpt.read(path))
            assert not got.size or got.ctypes.data % DEVICE_ALIGNMENT == 0, name
        x = ckpt.load("model/layers/1/mlp/weight")
        on_device = jax.device_put(x, jax.devices("cpu")[0], may_alias=True)
        assert on_device.unsafe_buffer_pointer() == x.ctypes.data  # no copy on CPU
        assert _same(on_device, flat["model.layers.1.mlp.weight"])


def test_load_names_a_file_truncated_after_it_was_opened(tmp_path):
    save_safetensors({"a": np.arange(4096, dtype=np.float32)}, str(tmp_path))
    with open_checkpoint(str(tmp_path)) as ckpt:
        os.truncate(tmp_path / "model.safetensors", os.path.getsize(
            tmp_path / "model.safetensors") - 100)
        _raises("ends inside tensor 'a'", ckpt.load, "a")
    ckpt.close()  # closing twice is fine


def test_missing_path_is_named(tmp_path):
    save_safetensors({"a": np.zeros(2, np.float32)}, str(tmp_path))
    with open_checkpoint(str(tmp_path)) as ckpt:
        _raises("no tensor at path 'b/c'", ckpt.read, "b/c")
        _raises("no tensor at path 'b'", ckpt.release, "b")


# --- the streaming writer ------------------------------------------------------------


def test_shard_writer_in_any_order_from_a_thread(tmp_path):
    flat = _flat()
    (layout,) = plan_shards([(n, x.shape, x.dtype) for n, x in flat.items()])
    path = str(tmp_path / layout.file)
    assert [t[0] for t in layout.tensors] == list(flat)
    writer = ShardWriter(path, layout)
    assert os.path.getsize(path) == layout.size
    thread = threading.Thread(
        target=lambda: [writer.write(n, flat[n]) for n in reversed(list(flat))])
    thread.start()
    thread.join()
    writer.close()
    writer.close()  # a second close is a no-op
    with safetensors.safe_open(path, framework="np") as f:
        for name, x in flat.items():
            assert _same(f.get_tensor(name), x), name


def test_shard_writer_checks_what_it_is_given(tmp_path):
    (layout,) = plan_shards([("a", (2, 3), np.float32), ("b", (4,), ml_dtypes.bfloat16)])
    path = str(tmp_path / "x.safetensors")
    writer = ShardWriter(path, layout)
    _raises(r"'a' is planned as float32\[2, 3\], got float32\[3, 2\]",
            writer.write, "a", np.zeros((3, 2), np.float32))
    _raises(r"'b' is planned as bfloat16\[4\], got float32\[4\]",
            writer.write, "b", np.zeros(4, np.float32))
    _raises("'c' is not in this shard", writer.write, "c", np.zeros(1))
    writer.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    _raises(r"x.safetensors: 1 tensors were never written: 'b'", writer.close)
    writer.close()
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    (layout,) = plan_shards([("s", (3, 2), np.float32)])
    with ShardWriter(path, layout) as w:
        w.write("s", strided)
    assert _same(safetensors.numpy.load_file(path)["s"], strided)


def test_plan_shards_rejects_bad_input():
    _raises("cannot store dtype", plan_shards, [("a", (2,), np.complex128)])
    _raises("repeated", plan_shards, [("a", (2,), np.float32), ("a", (2,), np.float32)])
    _raises("reserved", plan_shards, [("__metadata__", (2,), np.float32)])
    _raises("max_shard_bytes", plan_shards, [("a", (2,), np.float32)], 0)
    _raises("strings to strings", plan_shards, [("a", (2,), np.float32)], 10, {"n": 1})


# --- validation of what is read ------------------------------------------------------


def test_too_short_and_header_longer_than_file(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    assert "short.safetensors" in _raises("shorter than the 8-byte", open_checkpoint,
                                          str(short))
    long = tmp_path / "long.safetensors"
    long.write_bytes(struct.pack("<Q", 1000) + b"{}      ")
    assert "long.safetensors" in _raises("header length 1000 exceeds the file size 16",
                                         open_checkpoint, str(long))


def test_garbage_and_non_object_headers(tmp_path):
    _raw_file(tmp_path / "g.safetensors", b"\xff\xfe not json")
    assert "g.safetensors" in _raises("header is not valid JSON", SafetensorsCheckpoint,
                                      str(tmp_path / "g.safetensors"))
    _raw_file(tmp_path / "l.safetensors", b"[1, 2]")
    _raises("l.safetensors: header is not a JSON object", SafetensorsCheckpoint,
            str(tmp_path / "l.safetensors"))
    _raw_file(tmp_path / "m.safetensors", {"__metadata__": {"format": 1}})
    _raises("m.safetensors: __metadata__ must map strings to strings",
            SafetensorsCheckpoint, str(tmp_path / "m.safetensors"))


def test_bad_entries_name_the_tensor(tmp_path):
    cases = {
        "dtype": ({"dtype": "F128", "shape": [1], "data_offsets": [0, 16]},
                  "tensor 'w': unknown dtype 'F128'"),
        "shape": ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
                  r"tensor 'w': shape \[3\] of F32 is 12 bytes but data_offsets \[0, 8\]"),
        "negative": ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
                     "tensor 'w': shape must be"),
        "offsets": ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
                    "tensor 'w': data_offsets must be"),
        "keys": ({"dtype": "F32", "shape": [2]}, "tensor 'w': expected dtype"),
    }
    for case, (entry, match) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        _raw_file(path, {"w": entry}, bytes(8))
        assert f"{case}.safetensors" in _raises(match, SafetensorsCheckpoint, str(path))


def test_offsets_must_tile_the_data_section(tmp_path):
    f32 = {"dtype": "F32", "shape": [2]}
    cases = {
        "overlap": ({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [4, 12]}},
                    12, r"tensor 'b' \(data bytes 4:12\) overlaps"),
        "hole": ({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [12, 20]}},
                 20, "data bytes 8:12 before tensor 'b' belong to no tensor"),
        "tail": ({"a": {**f32, "data_offsets": [0, 8]}}, 12, "4 bytes after the last tensor"),
        "beyond": ({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [8, 16]}},
                   12, "truncated: tensor 'b' ends at data byte 16 but the data section has "
                       "only 12 bytes"),
    }
    for case, (header, size, match) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        _raw_file(path, header, bytes(size))
        assert f"{case}.safetensors" in _raises(match, SafetensorsCheckpoint, str(path))


def test_a_truncated_library_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(4, np.float32), "b": np.ones(8, np.float64)},
                                str(path))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    message = _raises("truncated", open_checkpoint, str(tmp_path))
    assert str(path) in message and "'a'" in message  # a (F32) is stored after b (F64)


def test_index_problems(tmp_path):
    flat = {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}
    save_safetensors(flat, str(tmp_path), max_shard_bytes=16)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    index_path.write_text(json.dumps(
        {**index, "weight_map": {**index["weight_map"], "c": index["weight_map"]["a"]}}))
    message = _raises("maps tensor 'c' to model-00001-of-00002.safetensors, which does not "
                      "contain it", open_checkpoint, str(tmp_path))
    assert "model.safetensors.index.json" in message

    index_path.write_text(json.dumps(index))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    _raises("maps tensor 'b' to shard model-00002-of-00002.safetensors, which does not "
            "exist", open_checkpoint, str(tmp_path))

    index_path.write_text("{not json")
    _raises("model.safetensors.index.json: index is not valid JSON", open_checkpoint,
            str(tmp_path))


def test_the_index_is_authoritative(tmp_path):
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32), "extra": np.ones(1, np.int8)},
                                str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file({"y": np.ones(2, np.float32)},
                                str(tmp_path / "model-00002-of-00002.safetensors"))
    safetensors.numpy.save_file({"z": np.ones(2, np.float32)},
                                str(tmp_path / "unlisted.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert [i.name for i in ckpt.infos] == ["x", "y"]


def test_a_tensor_in_two_shards(tmp_path):
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32), "y": np.zeros(1, np.int8)},
                                str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)},
                                str(tmp_path / "model-00002-of-00002.safetensors"))
    message = _raises("tensor 'x' is stored in both", open_checkpoint, str(tmp_path))
    assert "model-00001-of-00002" in message and "model-00002-of-00002" in message
    # also when the index names only one of them
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00002-of-00002.safetensors", "y": "model-00001-of-00002.safetensors"}}))
    _raises("tensor 'x' is stored in both", open_checkpoint, str(tmp_path))


def test_open_checkpoint_rejects_other_things(tmp_path):
    _raises("no such file or directory", open_checkpoint, str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"1234")
    _raises("expected a .safetensors file", open_checkpoint, str(tmp_path / "weights.bin"))
    _raises("neither \\*.safetensors files nor an orbax checkpoint", open_checkpoint,
            str(tmp_path))


# --- path helpers --------------------------------------------------------------------


def test_flatten_and_unflatten_paths_are_inverse():
    tree = {"enc": {"layers": {"0": {"w": 1, "b": 2}}, "norm": 3}, "head": 4}
    flat = flatten_paths(tree)
    assert flat == {"enc/layers/0/b": 2, "enc/layers/0/w": 1, "enc/norm": 3, "head": 4}
    assert unflatten_paths(flat) == tree
    assert flatten_paths({"l": [5, 6]}) == {"l/0": 5, "l/1": 6}
    _raises("'a/b' is both a leaf and a prefix", unflatten_paths, {"a/b": 1, "a/b/c": 2})
    _raises("'a' is both a leaf and a prefix", flatten_paths, {"a": 1, "a/b": 2})
    _raises("two leaves have the path 'a/b'", flatten_paths, {"a/b": 1, "a": {"b": 2}})
