"""Tests of the embedded benchmark suite: data, protocol, cache, evaluation, the binary."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import benchmark as benchmark_config
from mergejax import lora
from mergejax.suite import benchmark as benchmark_lib
from mergejax.suite import datasets, protocol
from mergejax.suite import model as model_lib
from mergejax.suite import tasks as tasks_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The binary's ``tiny`` suite: the end-to-end test reads the cache the fixture writes.
TINY = protocol.ProtocolConfig.from_overrides(benchmark_config.TINY_PROTOCOL)


def test_protocol_overrides_give_the_dataclass_and_reject_unknown_names():
    assert TINY == protocol.ProtocolConfig(
        tasks=("digits", "animals_coarse"), batch_size=16, pretrain_steps=5, head_steps=5,
        finetune_steps=5, max_train_examples=64,
        vit=model_lib.ViTConfig(width=16, depth=1, heads=2, embed_dim=16))
    listed = protocol.ProtocolConfig.from_overrides(
        {"tasks": ["digits"], "tfds_splits": [["test", "train"]]})
    assert listed.tasks == ("digits",) and listed.tfds_splits == (("test", "train"),)
    with pytest.raises(ValueError, match=r"unknown protocol setting\(s\) \['taks'\]"):
        protocol.ProtocolConfig.from_overrides({"taks": ["digits"]})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.prepare(path, list(TINY.tasks))
    return path


def test_tasks_are_deterministic_and_splits_disjoint():
    for name in tasks_lib.TASKS:
        seen = []
        for split in tasks_lib.SPLITS:
            x, y = tasks_lib.task_arrays(name, split)
            x2, y2 = tasks_lib.task_arrays(name, split)
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
            assert x.dtype == np.uint8 and x.shape[1:] == (28, 28) and len(x) == len(y) > 50
            assert 0 <= y.min() and y.max() < tasks_lib.TASKS[name].num_classes
            seen.append({im.tobytes() for im in x})
        assert not seen[0] & seen[2] and not seen[1] & seen[2], name
    pool = {im.tobytes() for im in tasks_lib.pretraining_pool()}
    for name in ("digits", "animals"):
        x, _ = tasks_lib.task_arrays(name, "test")
        assert not pool & {im.tobytes() for im in x}


def test_tfds_data_source_serves_the_task_arrays(data_dir):
    for name in TINY.tasks:
        d = datasets.load_task(name, "validation", data_dir)
        x, y = tasks_lib.task_arrays(name, "validation")
        assert d.num_classes == tasks_lib.TASKS[name].num_classes
        # TFDS stores examples in its own (deterministic) order: compare as multisets.
        got = sorted(zip(map(bytes, d.images), d.labels.tolist()))
        want = sorted(zip(map(bytes, x), y.tolist()))
        assert got == want


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot read split 'test' of dataset "
                                                r"'merge_suite/digits'.*nothing is downloaded"):
        datasets.load_task("digits", "test", str(tmp_path))


def test_full_size_path_reads_tfds_names_on_mock_data(tmp_path):
    cfg = protocol.ProtocolConfig(
        tasks=("eurosat", "resisc45"), dataset="tfds",
        tfds_names=(("eurosat", "eurosat/rgb"), ("resisc45", "resisc45")),
        tfds_splits=(("validation", "train"), ("test", "train")))
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        data = protocol.load_data(cfg, str(tmp_path))
    assert data["eurosat"]["train"].images.shape == (6, 64, 64, 3)
    assert data["resisc45"]["test"].num_classes == 45
    with pytest.raises(ValueError, match="needs pretrained_checkpoint"):
        protocol.build_suite(cfg, str(tmp_path))


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, data_dir):
    cache = str(tmp_path_factory.mktemp("cache"))
    return protocol.build_suite(TINY, cache, data_dir), cache


def _leaves(suite):
    return jax.tree.leaves({"p": suite.pretrained, "e": suite.experts, "h": suite.heads})


def test_same_seed_same_checkpoints_and_cache_reuse(tiny_suite, data_dir, tmp_path):
    suite, cache = tiny_suite
    again = protocol.build_suite(TINY, str(tmp_path), data_dir)  # trained afresh
    for a, b in zip(_leaves(suite), _leaves(again)):
        np.testing.assert_array_equal(a, b)
    reloaded = protocol.build_suite(TINY, cache, data_dir)  # from the cache
    for a, b in zip(_leaves(suite), _leaves(reloaded)):
        np.testing.assert_array_equal(a, b)
    other = protocol.build_suite(dataclasses.replace(TINY, seed=1), str(tmp_path), data_dir)
    assert not np.array_equal(_leaves(suite)[0], _leaves(other)[0])


def test_corrupt_cache_entry_is_rebuilt_not_trusted(tiny_suite, data_dir, tmp_path):
    suite, _ = tiny_suite
    cache = str(tmp_path)
    protocol.build_suite(TINY, cache, data_dir)
    entry = os.path.join(cache, f"suite-{TINY.key()}")
    meta = os.path.join(entry, "meta.json")
    with open(meta) as f:
        record = json.load(f)
    record["checksum"] = "0" * 64  # what a torn or tampered entry looks like
    with open(meta, "w") as f:
        json.dump(record, f)
    rebuilt = protocol.build_suite(TINY, cache, data_dir)
    for a, b in zip(_leaves(suite), _leaves(rebuilt)):
        np.testing.assert_array_equal(a, b)
    with open(meta) as f:
        assert json.load(f)["checksum"] != "0" * 64


def test_accuracy_matches_an_independent_numpy_computation(tiny_suite):
    suite, _ = tiny_suite
    task = TINY.tasks[1]
    d = suite.data[task]["test"]
    embeddings = np.asarray(suite.model.apply({"params": suite.experts[1]}, d.images),
                            np.float64)
    head = np.asarray(suite.heads[task], np.float64)
    cos = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)) @ (
        head / np.linalg.norm(head, axis=0, keepdims=True))
    expected = float(np.mean(np.argmax(cos, axis=1) == d.labels))
    assert suite.accuracy(suite.experts[1], task) == pytest.approx(expected, abs=1e-9)
    assert suite.accuracies(suite.experts)[task] == pytest.approx(expected, abs=1e-9)


def test_linearized_suite_fine_tunes_and_evaluates_the_tangent_model(data_dir, tmp_path):
    cfg = dataclasses.replace(TINY, linearized=True)
    assert cfg.key() != TINY.key()  # its own cache entry
    suite = protocol.build_suite(cfg, str(tmp_path), data_dir)
    x = suite.data[cfg.tasks[0]]["test"].images[:8]
    f = lambda p: np.asarray(suite.model.apply({"params": p}, x), np.float64)
    tau = jax.tree.map(lambda e, p: np.asarray(e, np.float64) - np.asarray(p, np.float64),
                       suite.experts[0], suite.pretrained)
    assert max(np.abs(t).max() for t in jax.tree.leaves(tau)) > 0  # it was fine-tuned

    def at(scale):
        return jax.tree.map(lambda p, t: (np.asarray(p, np.float64) + scale * t)
                            .astype(np.float32), suite.pretrained, tau)

    # The suite's embedding of theta_0 + tau is f(theta_0) + J tau: compare with a central
    # finite difference of the model itself along tau.
    eps = 1e-2
    jvp = (f(at(eps)) - f(at(-eps))) / (2 * eps)
    got = np.asarray(suite.embed(suite.experts[0], x), np.float64)
    np.testing.assert_allclose(got, f(suite.pretrained) + jvp, rtol=2e-3, atol=2e-3)
    # ... and it is linear in the parameters: doubling tau doubles the change.
    base = np.asarray(suite.embed(suite.pretrained, x), np.float64)
    twice = np.asarray(suite.embed(at(2.0), x), np.float64)
    np.testing.assert_allclose(twice - base, 2 * (got - base), rtol=1e-4, atol=1e-4)
    d = suite.data[cfg.tasks[0]]["test"]
    head = np.asarray(suite.heads[cfg.tasks[0]], np.float64)
    emb = np.asarray(suite.embed(suite.experts[0], d.images), np.float64)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        head / np.linalg.norm(head, axis=0, keepdims=True))
    assert suite.accuracy(suite.experts[0], cfg.tasks[0]) == pytest.approx(
        float(np.mean(np.argmax(cos, axis=1) == d.labels)), abs=1e-9)


def test_run_method_rows(tiny_suite):
    suite, _ = tiny_suite
    row = benchmark_lib.run_method(suite, "task_arithmetic", search={"scale": [0.0, 1.0]})
    assert row.hparams["scale"] in (0.0, 1.0) and 0.0 <= row.average <= 1.0
    skipped = benchmark_lib.run_method(suite, "nearswap")
    assert skipped.note == "skipped: takes at most 1 models"
    pre = benchmark_lib.run_method(suite, "task_arithmetic", {"scale": 0.0})
    assert pre.accuracy == suite.accuracies(suite.pretrained)


def test_lora_methods_merge_low_rank_views_of_the_experts(tiny_suite):
    suite, _ = tiny_suite
    adapters = benchmark_lib.lora_experts(suite, rank=2)
    for adapter in adapters:
        assert any(isinstance(x, lora.LoraFactors) for x in jax.tree.leaves(
            adapter, is_leaf=lambda x: isinstance(x, lora.LoraFactors)))
        assert jax.tree.structure(suite.pretrained) == jax.tree.structure(
            lora.lora_delta(adapter))
    # lora_linear at scale s is task arithmetic on the adapters' updates.
    row = benchmark_lib.run_method(suite, "lora_linear", {"scale": 0.3})
    updates = [lora.lora_delta(a) for a in benchmark_lib.lora_experts(suite)]
    expected = jax.tree.map(lambda b, *d: b + 0.3 * sum(d), suite.pretrained, *updates)
    assert row.accuracy == pytest.approx(suite.accuracies(expected), abs=1e-9)
    assert row.note.startswith("merges rank-")
    hub = benchmark_lib.run_method(suite, "lorahub", {"steps": 2})
    assert 0.0 <= hub.average <= 1.0 and not hub.note.startswith("skipped")


def test_learned_methods_get_suite_data_and_predict_results_are_evaluated(tiny_suite):
    suite, _ = tiny_suite
    row = benchmark_lib.run_method(suite, "adamerging", {"steps": 2, "granularity": "task"})
    assert row.note == "learned; time includes compilation"
    assert set(row.accuracy) == set(suite.tasks)
    assert all(0.0 <= a <= 1.0 for a in row.accuracy.values())
    assert "apply_fn" not in row.hparams and row.hparams["steps"] == 2

    class Pretrained:  # a predict()-style result: the pretrained backbone with the heads
        def predict(self, task, images):
            head = suite.heads[suite.tasks[task]]
            return model_lib.classify(suite.model, suite.pretrained, head, images)

    assert benchmark_lib.task_accuracies(suite, Pretrained()) == suite.accuracies(
        suite.pretrained)
    batches = benchmark_lib.suite_inputs(suite, batch_size=5)["labeled_batches"]()
    assert len(batches) == len(suite.tasks)
    images, labels = next(batches[0])
    assert images.shape[0] == labels.shape[0] == 5


@pytest.mark.parametrize("method, hparams", [("regmean", {}), ("surgery_v2", {"steps": 2}),
                                             ("wemoe", {"steps": 2})])
def test_methods_that_intercept_the_models_layers_run_on_the_suite(tiny_suite, method,
                                                                   hparams):
    """They trace the suite's apply_fn themselves: given the jitted `Suite.embed` they
    failed (regmean: a leaked tracer; surgery_v2, wemoe: no layer matched)."""
    suite, _ = tiny_suite
    row = benchmark_lib.run_method(suite, method, hparams)
    assert not row.note.startswith("failed"), row.note
    assert set(row.accuracy) == set(suite.tasks)
    assert all(0.0 <= a <= 1.0 for a in row.accuracy.values())


def _run_binary(tmp_path, *overrides):
    """The binary with the tiny config, run from ``tmp_path`` so that its default relative
    cache and results directories land there."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "experiments.benchmark",
         f"--config={ROOT}/experiments/configs/benchmark.py:tiny", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def _end_to_end(tmp_path, *overrides, cache: str | None = None) -> dict:
    """Runs the binary and checks its outputs; returns the rows by method. With ``cache``
    (a cache directory holding the suite) the binary must load the suite from there;
    without, it trains it into its default cache directory."""
    if cache:
        overrides += (f"--config.cache_dir={cache}",)
    result = _run_binary(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "task_arithmetic" in result.stdout and "pretrained" in result.stdout
    out = tmp_path / "results" / "benchmark"
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"results.{ext}").stat().st_size > 0
    if cache:
        assert "loaded the suite from" in result.stderr
    else:
        assert any((tmp_path / "cache" / "suite").glob("suite-*/meta.json"))
    with open(out / "results.json") as f:
        rows = {r["method"]: r for r in json.load(f)["rows"]}
    assert 0.0 <= rows["linear"]["average"] <= 1.0
    failed = {m: r["note"] for m, r in rows.items() if r["note"].startswith("failed")}
    assert not failed  # a method that raises still gets a row, marked "failed: ..."
    return rows


def test_benchmark_binary_end_to_end(tmp_path, tiny_suite):
    """One method of each kind: tuning-free, searched, spectral, learned, predict()-style,
    on the suite the fixture trained (the binary's training is the same `build_suite`)."""
    names = ("linear", "task_arithmetic", "ties", "tsv_m", "adamerging", "surgery")
    rows = _end_to_end(tmp_path, f"--config.methods={names!r}", cache=tiny_suite[1])
    assert set(names) <= set(rows)
    assert all(0.0 <= rows[n]["average"] <= 1.0 for n in names)


@pytest.mark.slow
def test_benchmark_binary_linearized_switch(tmp_path):
    rows = _end_to_end(tmp_path, "--linearized",
                       "--config.methods=('linear','task_arithmetic')")
    with open(tmp_path / "results" / "benchmark" / "results.json") as f:
        assert json.load(f)["protocol"]["linearized"] is True
    assert 0.0 <= rows["task_arithmetic"]["average"] <= 1.0


@pytest.mark.slow
def test_benchmark_binary_end_to_end_every_method(tmp_path):
    rows = _end_to_end(tmp_path)
    import mergejax  # pylint: disable=import-outside-toplevel
    assert set(mergejax.list_methods()) <= set(rows)


def test_unknown_method_in_config_fails_before_training(tmp_path):
    result = _run_binary(tmp_path, "--config.methods=('linear','tiez')")
    assert result.returncode != 0
    assert "unknown method(s) ['tiez']" in result.stderr
    assert not (tmp_path / "cache").exists()
