r"""The embedded benchmark suite, end to end: the README's main job.

Builds (or loads from its cache) the suite - pretrained backbone, frozen heads, one expert
per task - then merges the experts with every registered method that needs no data beyond
the suite's validation split, evaluates each task with its own head, prints the table and
writes ``results.{csv,json,md,png}``.

    python -m experiments.benchmark --config=experiments/configs/benchmark.py
    python -m experiments.benchmark --config=experiments/configs/benchmark.py:tiny \
        --config.out_dir=/tmp/bench
    python -m experiments.benchmark --config=experiments/configs/benchmark.py --linearized

``--linearized`` fine-tunes the experts in the tangent space at the pretrained backbone
(Ortiz-Jimenez et al. 2023, arXiv 2305.12827) and evaluates every backbone, merges included,
as that linearised model (`mergejax.suite.protocol.ProtocolConfig.linearized`).
"""

from __future__ import annotations

import dataclasses
import resource
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import mergejax
from mergejax.suite import benchmark as benchmark_lib
from mergejax.suite import protocol as protocol_lib
from mergejax.suite import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/benchmark.py", "Benchmark configuration file.",
    lock_config=True)
_LINEARIZED = flags.DEFINE_bool(
    "linearized", False, "Fine-tune the experts in the tangent space at the pretrained "
    "backbone and evaluate every backbone as that linearised model.")


def method_names(requested) -> list[str]:
    """The configured method names ("all": every registered one); unknown names fail."""
    known = mergejax.list_methods()
    names = known if list(requested) == ["all"] else list(requested)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in config.methods; registered: {known}")
    return names


def main(argv):
    del argv
    config = _CONFIG.value
    names = method_names(config.methods)  # fail fast, before any training
    cfg = dataclasses.replace(protocol_lib.ProtocolConfig.from_overrides(
        config.protocol.to_dict()), linearized=_LINEARIZED.value)
    start = time.perf_counter()
    suite = protocol_lib.build_suite(cfg, config.cache_dir)
    built = time.perf_counter() - start
    logging.info("suite ready in %.1f s", built)
    rows = benchmark_lib.reference_rows(suite) + benchmark_lib.run_methods(
        suite, names, config.method_hparams.to_dict(), config.search.to_dict())
    total = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(report.text_table(rows, suite.tasks))
    print(f"suite {built:.1f} s, total {total:.1f} s, peak RSS {peak_gib:.2f} GiB")
    paths = report.write_results(config.out_dir, rows, suite.tasks, {
        "protocol": dataclasses.asdict(cfg), "suite_seconds": built,
        "total_seconds": total, "peak_rss_gib": peak_gib, "jax": jax.__version__})
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
