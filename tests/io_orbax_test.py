"""Orbax checkpoints of parameter pytrees: save/restore, sharded targets, lazy leaf reads
(8 simulated CPU devices, set by tests/conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.io.checkpoint import (
    DEVICE_ALIGNMENT,
    CheckpointError,
    LazyCheckpoint,
    open_checkpoint,
)
from mergejax.io.orbax import OrbaxCheckpoint, restore_params, save_params


def _values() -> dict[str, np.ndarray]:
    """`/`-paths -> the NumPy values every comparison is made against."""
    rng = np.random.default_rng(0)
    return {
        "enc/kernel": rng.normal(size=(8, 4)).astype(np.float32),
        "enc/bias": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "layers/0/w": rng.normal(size=(4, 4)).astype(np.float16),
        "layers/1/w": rng.normal(size=(4, 4)).astype(np.float16),
        "step": np.array(7, np.int32),
    }


def _tree(values: dict[str, np.ndarray]) -> dict:
    """The pytree saved: jax arrays, a list of layers, and a NumPy int64 leaf."""
    return {"enc": {"kernel": jnp.asarray(values["enc/kernel"]),
                    "bias": jnp.asarray(values["enc/bias"])},
            "layers": [{"w": jnp.asarray(values["layers/0/w"])},
                       {"w": jnp.asarray(values["layers/1/w"])}],
            "step": jnp.asarray(values["step"]),
            "ids": np.arange(5, dtype=np.int64) * 2**40}


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    values = _values()
    path = save_params(str(tmp_path_factory.mktemp("orbax") / "ckpt"), _tree(values))
    return path, values


def test_round_trip_keeps_dtypes_and_values(saved):
    path, values = saved
    restored = restore_params(path)
    assert isinstance(restored["enc"]["bias"], jax.Array)
    assert restored["enc"]["bias"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(restored["enc"]["bias"]).view(np.uint16),
                          values["enc/bias"].view(np.uint16))
    assert _same(restored["enc"]["kernel"], values["enc/kernel"])
    assert isinstance(restored["layers"], list)
    assert _same(restored["layers"][1]["w"], values["layers/1/w"])
    assert _same(restored["step"], values["step"])
    # a NumPy int64 leaf comes back as NumPy, not truncated to a 32-bit jax array
    assert isinstance(restored["ids"], np.ndarray)
    assert _same(restored["ids"], np.arange(5, dtype=np.int64) * 2**40)


def test_restore_into_sharded_targets(saved):
    path, values = saved
    if jax.device_count() < 4:
        pytest.fail("needs 4 devices; tests/conftest.py sets XLA_FLAGS")
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))
    rows, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    target = {"enc": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=rows),
                      "bias": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)},
              "layers": [{"w": jax.ShapeDtypeStruct((4, 4), jnp.float16, sharding=rows)},
                         {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}],
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
              "ids": np.zeros(5, np.int64)}
    got = restore_params(path, target)
    kernel = got["enc"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding == rows
    assert len(kernel.addressable_shards) == 4
    assert kernel.addressable_shards[0].data.shape == (2, 4)
    assert np.array_equal(np.asarray(kernel, np.float32),
                          values["enc/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))
    bias = got["enc"]["bias"]
    assert bias.dtype == jnp.float32 and bias.sharding == replicated
    assert np.array_equal(np.asarray(bias), values["enc/bias"].astype(np.float32))
    assert got["layers"][0]["w"].sharding == rows
    # no sharding given: the default device, whatever the checkpoint was saved from
    w1 = got["layers"][1]["w"]
    assert w1.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert np.array_equal(np.asarray(w1), values["layers/1/w"].astype(np.float32))
    assert isinstance(got["ids"], np.ndarray)


def test_mismatched_targets_name_the_path(saved):
    path, values = saved
    like = restore_params(path)
    wrong_shape = jax.tree.map(lambda x: x, like)
    wrong_shape["layers"][0]["w"] = jax.ShapeDtypeStruct((4, 5), jnp.float16)
    with pytest.raises(CheckpointError, match=r"leaf 'layers/0/w' is saved with shape "
                                              r"\(4, 4\), the target has \(4, 5\)"):
        restore_params(path, wrong_shape)
    missing = {k: v for k, v in like.items() if k != "step"}
    with pytest.raises(CheckpointError, match=r"missing \['step'\], unexpected \[\]"):
        restore_params(path, missing)
    extra = {**like, "enc": {**like["enc"], "scale": jnp.ones(4)}}
    with pytest.raises(CheckpointError, match=r"unexpected \['enc/scale'\]"):
        restore_params(path, extra)


def test_save_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_params("relative", {"w": jnp.zeros(3)})
    assert path == str(tmp_path / "relative")
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_params("relative", {"w": jnp.ones(3)})
    assert np.array_equal(restore_params(path)["w"], np.zeros(3))
    save_params("relative", {"w": jnp.ones(3)}, overwrite=True)
    assert np.array_equal(restore_params("relative")["w"], np.ones(3))
    with pytest.raises(CheckpointError, match="not an orbax checkpoint"):
        restore_params(str(tmp_path))


def test_lazy_reads_of_single_leaves(saved):
    path, values = saved
    with open_checkpoint(path) as ckpt:
        assert isinstance(ckpt, OrbaxCheckpoint) and isinstance(ckpt, LazyCheckpoint)
        assert [i.path for i in ckpt.infos] == ["enc/bias", "enc/kernel", "ids",
                                                "layers/0/w", "layers/1/w", "step"]
        for info in ckpt.infos:
            assert info.name == info.path
            if info.path in values:
                x = values[info.path]
                assert (info.shape, info.dtype, info.nbytes) == (x.shape, x.dtype, x.nbytes)
                got = ckpt.read(info.path)
                assert isinstance(got, np.ndarray) and not got.flags.writeable
                assert _same(got, x), info.path
                loaded = ckpt.load(info.path)
                assert _same(loaded, x) and loaded.flags.writeable, info.path
                assert not loaded.size or loaded.ctypes.data % DEVICE_ALIGNMENT == 0, \
                    info.path
                ckpt.release(info.path)
        assert ckpt.info("ids").dtype == np.int64
        many = ckpt.read_many(["layers/1/w", "enc/bias"])
        assert list(many) == ["layers/1/w", "enc/bias"]
        assert _same(many["layers/1/w"], values["layers/1/w"])
        assert _same(many["enc/bias"], values["enc/bias"])
        with pytest.raises(CheckpointError, match="no tensor at path 'enc/nope'"):
            ckpt.read("enc/nope")


def test_a_leaf_read_reads_only_that_leaf(tmp_path):
    ts = pytest.importorskip("tensorstore")
    rng = np.random.default_rng(0)
    leaves = {f"l{i}": rng.normal(size=(2**18,)).astype(np.float32) for i in range(8)}  # 1 MiB
    path = save_params(str(tmp_path / "c"), leaves)

    def bytes_read() -> int:
        metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
        return sum(v["value"] for m in metrics for v in m["values"])

    with OrbaxCheckpoint(path) as ckpt:
        before = bytes_read()
        assert _same(ckpt.read("l3"), leaves["l3"])
        one = bytes_read() - before
        before = bytes_read()
        everything = ckpt.read_many(list(leaves))
        total = bytes_read() - before
    assert all(_same(everything[k], v) for k, v in leaves.items())
    assert 0.5 * 2**20 < one < 1.5 * 2**20 and total > 6 * 2**20, (one, total)
