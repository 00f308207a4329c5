"""The checkpoint binary end to end: mergekit YAML on safetensors checkpoints, checked
against NumPy re-implementations of mergekit's formulas (from `io_mergekit_test`), atomic
output, kill and resume, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import io_mergekit_test as mk
import numpy as np
import pytest
import yaml
from _helpers import REPO_ROOT

import mergejax
from experiments import merge_checkpoints as binary
from mergejax.io import safetensors as st


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """mergekit_test's synthetic Llama trees saved as safetensors checkpoints, with a
    config.json in the base."""
    root = tmp_path_factory.mktemp("ckpts")
    trees = mk.trees.__wrapped__()
    for name, tree in trees.items():
        st.save_safetensors(tree, str(root / name), max_shard_bytes=4000)
    (root / "base" / "config.json").write_text('{"model_type": "llama"}')
    return root, trees


def run_yaml(root, data: dict, out: str = "out", **kwargs) -> dict[str, np.ndarray]:
    config = root / f"{out}.yml"
    config.write_text(yaml.safe_dump(data))
    binary.run(str(config), str(root / out), progress=False, **kwargs)
    return {n: np.asarray(v, np.float64)
            for n, v in st.load_safetensors(str(root / out), nested=False).items()}


def test_task_family_yaml_gives_mergekit_formulas(workdir):
    root, trees = workdir
    for method, sparsify, consensus, normalize in [
            ("task_arithmetic", None, False, False), ("ties", "magnitude", True, True),
            ("breadcrumbs", "outliers", False, False)]:
        data = yaml.safe_load(mk.TIES)
        data.update(merge_method=method, dtype="float32")
        data["parameters"] = {"lambda": 0.9} | ({"normalize": True} if normalize else {})
        for entry in data["models"][1:]:
            entry["parameters"]["density"] = 0.8 if method == "breadcrumbs" else 0.5
            if method == "breadcrumbs":
                entry["parameters"]["gamma"] = 0.1
            if method == "task_arithmetic":
                del entry["parameters"]["density"]
        want = mk.mk_gta(data, trees, sparsify=sparsify, consensus=consensus,
                         normalize=normalize, rescale=False)
        got = run_yaml(root, data, out=method)
        mk.assert_close(got, want)
    assert (root / "ties" / "config.json").exists()


def test_linear_slerp_model_stock_yaml_give_mergekit_formulas(workdir):
    root, trees = workdir
    base = mk.flat(trees["base"])
    data = yaml.safe_load(mk.SLERP)
    got = run_yaml(root, data, out="slerp")
    mk.assert_close(got, {n: mk.mk_slerp(mk.mk_param("t", n, data["parameters"]), v,
                                         mk.flat(trees["d"])[n]) for n, v in base.items()})
    data = {"merge_method": "model_stock", "base_model": "base",
            "models": [{"model": m} for m in ("base", "a", "b", "d")]}
    got = run_yaml(root, data, out="stock")
    mk.assert_close(got, {n: mk.mk_model_stock(v, [mk.flat(trees[m])[n] for m in "abd"])
                          for n, v in base.items()})
    data = {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 0.25}},
        {"model": "b", "parameters": {"weight": 0.75}}]}
    got = run_yaml(root, data, out="linear")
    mk.assert_close(got, {n: 0.25 * mk.flat(trees["a"])[n] + 0.75 * mk.flat(trees["b"])[n]
                          for n in base})


def test_dare_ties_at_density_one_is_ties_and_is_reproducible(workdir):
    root, trees = workdir
    data = yaml.safe_load(mk.TIES)
    data.update(merge_method="dare_ties", dtype="float32", random_seed=3)
    for entry in data["models"][1:]:
        entry["parameters"]["density"] = 1.0
    want = mk.mk_gta(data, trees, sparsify=None, consensus=True, normalize=True,
                     rescale=False)
    mk.assert_close(run_yaml(root, data, out="dare1"), want)
    for entry in data["models"][1:]:
        entry["parameters"]["density"] = 0.5
    first = run_yaml(root, data, out="dare_a")
    second = run_yaml(root, data, out="dare_b")
    assert all(np.array_equal(first[n], second[n]) for n in first)
    assert not all(np.array_equal(first[n], want[n]) for n in first)


def _native(root, out: str, **extra) -> str:
    config = root / f"{out}.yml"
    config.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base",
                                      "models": ["a", "b"], "hparams": {"scale": 0.5},
                                      **extra}))
    return str(config)


def _files(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), "rb").read()
            for f in sorted(os.listdir(directory))}


def test_killed_run_leaves_no_complete_output_and_resumes_to_the_same_bytes(
        workdir, monkeypatch):
    root, _ = workdir
    config = _native(root, "kill", options={"out_shard_size": 3000})
    binary.run(config, str(root / "reference"), progress=False)
    reference = _files(root / "reference")
    assert sum(f.endswith(".safetensors") for f in reference) >= 3
    out = root / "killed"
    original, calls = st.ShardWriter.write, []

    def dies_midway(self, name, array):  # the process dies in the middle of shard 2
        calls.append(name)
        if len(calls) == 12:
            raise KeyboardInterrupt
        original(self, name, array)

    monkeypatch.setattr(st.ShardWriter, "write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        binary.run(config, str(out), progress=False)
    monkeypatch.setattr(st.ShardWriter, "write", original)
    assert not out.exists()
    assert (root / "killed.partial" / "mergejax-progress.json").exists()
    summary = binary.run(config, str(out), progress=False)
    assert summary["reused_shards"], "the rerun started again instead of resuming"
    assert _files(out) == reference
    assert not (root / "killed.partial").exists()


def test_existing_output_is_kept_unless_overwrite(workdir):
    root, _ = workdir
    config = _native(root, "exists")
    (root / "exists").mkdir()
    (root / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(mergejax.MergeError, match="already exists"):
        binary.run(config, str(root / "exists"), progress=False)
    assert (root / "exists" / "keep.txt").read_text() == "mine"
    binary.run(config, str(root / "exists"), overwrite=True, progress=False)
    assert not (root / "exists" / "keep.txt").exists()
    assert (root / "exists" / "config.json").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("garbage", "header"), ("missing", "no tensor"),
    ("shape", "shape mismatch")])
def test_bad_inputs_fail_clearly_and_write_nothing(workdir, tmp_path, damage, message):
    root, trees = workdir
    bad = tmp_path / "bad"
    flat = {n: v.astype(np.float32) for n, v in mk.flat(trees["b"]).items()}
    if damage == "missing":
        del flat["model.norm.weight"]
    if damage == "shape":
        flat["model.norm.weight"] = np.zeros(9, np.float32)
    st.save_safetensors(flat, str(bad), max_shard_bytes=10**9)
    path = bad / "model.safetensors"
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 7)
    if damage == "garbage":
        raw = path.read_bytes()
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"method": "task_arithmetic",
                                      "base": str(root / "base"),
                                      "models": [str(root / "a"), str(bad)]}))
    with pytest.raises(mergejax.MergeError, match=message):
        binary.run(str(config), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_method_and_parameter_are_errors(workdir, tmp_path):
    root, _ = workdir
    for data, message in [
            ({"merge_method": "frankenmerge", "models": [{"model": "a"}]}, "frankenmerge"),
            ({"method": "ties", "base": "base", "models": ["a"],
              "hparams": {"densty": 0.2}}, "densty")]:
        config = root / "bad.yml"
        config.write_text(yaml.safe_dump(data))
        with pytest.raises(mergejax.MergeError, match=message):
            binary.run(str(config), str(tmp_path / "out"), progress=False)


def test_binary_reports_errors_without_a_traceback(workdir, tmp_path):
    root, _ = workdir
    config = tmp_path / "c.yml"
    config.write_text(textwrap.dedent(f"""
        method: task_arithmetic
        base: {root / 'base'}
        models: [{tmp_path / 'nowhere'}]
    """))
    proc = subprocess.run([sys.executable, "-m", "experiments.merge_checkpoints",
                           f"--config={config}", f"--out={tmp_path / 'out'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_configures_glibc_malloc():
    """The binary keeps freed memory in one heap (see `binary.reuse_freed_memory`); on a
    glibc Linux every mallopt call is accepted."""
    assert binary.reuse_freed_memory() is True


def test_compilation_cache_is_filled_and_keeps_the_bytes(workdir, tmp_path):
    root, _ = workdir
    config = _native(root, "cached")
    binary.run(config, str(tmp_path / "reference"), progress=False)
    cache = tmp_path / "xla"
    proc = subprocess.run([sys.executable, "-m", "experiments.merge_checkpoints",
                           f"--config={config}", f"--out={tmp_path / 'cached'}",
                           f"--compilation_cache={cache}", "--noprogress"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cache.is_dir() and any(cache.iterdir())
    assert _files(tmp_path / "cached") == _files(tmp_path / "reference")
