r"""Benchmark of the basic merges against the memory-bandwidth floor.

Builds a synthetic ViT-shaped parameter pytree (``--params_millions`` float32 parameters,
nested ``blocks/<i>/attn/query/kernel``-style dicts with kernels, biases and LayerNorm
scales), a base and ``--num_models`` fine-tuned copies (base + small random deltas), all
generated on device with `jax.random`. Then it times, on the same inputs:

* ``floor``: the simplest jitted expression that reads the K models once and writes one
  output per leaf (``sum_k models[k][leaf]``): the memory floor for ``linear``;
* ``floor_base``: the same with the base as one more input (``base + sum_k ...``): the
  memory floor for ``task_arithmetic``, which reads K + 1 trees;
* ``mergejax.linear(None, models)`` and ``mergejax.task_arithmetic(base, models,
  scale=0.3)``, with and without the finiteness check (``*_nocheck``).

For each: the first call (trace + compile + one run) is reported apart, then the best and
the median of ``--repeats`` calls, each ended by `jax.block_until_ready` and followed by
an untimed ``--settle_s`` pause. The methods are then called with new coefficients
(``weights`` / ``scale``) to show that this does not recompile (the number of XLA
compilations of each such call is reported). The ratio to the floor is given twice:
best / best across processes, and the median over rounds in which the method and its
floor are timed alternately in the method's own process (less exposed to drift on a
shared machine). The share of CPU used by other processes during each case is recorded.

Every case runs in its own subprocess (this binary re-invoked with ``--only=<case>``), so
that the process's peak RSS (``getrusage(...).ru_maxrss``, monotonic) belongs to that case.
Peak memory is reported against the inputs (base + K models) in "models' worth" (the size
of one model): ``extra = (peak RSS - RSS before the inputs existed - inputs) / model``,
after the first call (one merge, compilation included) and after all calls. The output
of the merge is itself one model's worth, so the floor shows a little over 1.

Targets (the issue's): time within 1.5x of the floor; peak memory no more than the inputs
plus two models' worth.

Usage::

  python -m experiments.bench_basic --out_dir=results/bench_basic
  python -m experiments.bench_basic --quick --out_dir=/tmp/bench   # seconds, for tests

Writes ``<out_dir>/bench_basic.json`` and prints a table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

import mergejax

CASES = ("floor", "floor_base", "linear", "linear_nocheck", "task_arithmetic",
         "task_arithmetic_nocheck")

_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench_basic",
                               "Where bench_basic.json is written.")
_PARAMS_MILLIONS = flags.DEFINE_float("params_millions", 100.0,
                                      "Parameters per model, in millions (at least).")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "K, the number of fine-tuned models.")
_WIDTH = flags.DEFINE_integer("width", 768,
                              "Transformer width; the depth is chosen to reach the size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case (after the warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the synthetic parameters.")
_SCALE = flags.DEFINE_float("scale", 0.3, "task_arithmetic scale.")
_SETTLE_S = flags.DEFINE_float(
    "settle_s", 0.25,
    "Pause after every measured call (not timed). The runtime frees a dropped output a "
    "few ms after its last reference goes; without a pause, back-to-back calls hold two "
    "outputs at once, which shows in the peak RSS (measured: +1 model's worth).")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Tiny sizes and one repeat (overrides the size flags), for tests.")
_MMAP_THRESHOLD = flags.DEFINE_integer(
    "malloc_mmap_threshold", -1,
    "If >= 0, sets glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the case subprocesses, so "
    "that large buffers are always mmapped and go back to the OS when freed. -1 leaves "
    "the allocator alone (its default raises the threshold as buffers are freed and then "
    "keeps freed outputs in its heap: RSS can grow by about one more output over repeated "
    "calls, the 'extra all' column).")
_CASES = flags.DEFINE_list("cases", ",".join(CASES), f"Cases to run, from {CASES}.")
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False,
    "Run every case in this process (faster; peak RSS is then not per case).")
_ONLY = flags.DEFINE_enum("only", None, CASES,
                          "Internal: run this one case and write its row to --result_file.")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "Internal: see --only.")

MB = 1 << 20
GB = 1 << 30
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


# ---------------------------------------------------------------------------------------
# Sizes and inputs.


def config() -> dict[str, Any]:
    """The run's sizes, from the flags (``--quick`` overrides them)."""
    if _QUICK.value:
        return dict(params_millions=0.08, num_models=3, width=32, repeats=1,
                    seed=_SEED.value, scale=_SCALE.value, settle_s=0.0)
    return dict(params_millions=_PARAMS_MILLIONS.value, num_models=_NUM_MODELS.value,
                width=_WIDTH.value, repeats=_REPEATS.value, seed=_SEED.value,
                scale=_SCALE.value, settle_s=_SETTLE_S.value)


def vit_spec(params_millions: float, width: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(path, shape)`` of every leaf of a ViT (big_vision layout, 224px, 16px patches,
    1000 classes) of the given width, deep enough for ``params_millions`` parameters."""
    d = width
    heads = max(1, d // 64)
    head_dim = d // heads
    mlp = 4 * d
    tokens = (224 // 16) ** 2 + 1
    top = [
        ("embedding/kernel", (16, 16, 3, d)), ("embedding/bias", (d,)),
        ("cls", (1, 1, d)), ("pos_embedding", (1, tokens, d)),
        ("encoder_norm/scale", (d,)), ("encoder_norm/bias", (d,)),
        ("head/kernel", (d, 1000)), ("head/bias", (1000,)),
    ]
    block = [
        ("ln1/scale", (d,)), ("ln1/bias", (d,)),
        ("attn/query/kernel", (d, heads, head_dim)), ("attn/query/bias", (heads, head_dim)),
        ("attn/key/kernel", (d, heads, head_dim)), ("attn/key/bias", (heads, head_dim)),
        ("attn/value/kernel", (d, heads, head_dim)), ("attn/value/bias", (heads, head_dim)),
        ("attn/out/kernel", (heads, head_dim, d)), ("attn/out/bias", (d,)),
        ("ln2/scale", (d,)), ("ln2/bias", (d,)),
        ("mlp/fc1/kernel", (d, mlp)), ("mlp/fc1/bias", (mlp,)),
        ("mlp/fc2/kernel", (mlp, d)), ("mlp/fc2/bias", (d,)),
    ]
    size = lambda leaves: sum(math.prod(s) for _, s in leaves)
    depth = max(1, math.ceil((params_millions * 1e6 - size(top)) / size(block)))
    spec = list(top)
    for i in range(depth):
        spec += [(f"blocks/{i}/{p}", s) for p, s in block]
    return tuple(spec)


def _nest(flat: dict[str, jax.Array]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return tree


#: Model k's delta is the group's noise shifted by (k + 1) * _SHIFT elements (see make_inputs).
_SHIFT = 7919


@functools.partial(jax.jit, static_argnums=1)
def _noise(key: jax.Array, n: int) -> jax.Array:
    return jax.random.normal(key, (n,), jnp.float32)


@functools.partial(jax.jit, static_argnums=4)
def _cut(noise: jax.Array, offset: jax.Array, a: jax.Array, b: jax.Array,
         shape: tuple[int, ...]) -> jax.Array:
    """``a + b * noise[offset:offset + size].reshape(shape)``; ``a`` a scalar or a leaf."""
    window = jax.lax.dynamic_slice_in_dim(noise, offset, math.prod(shape))
    return a + b * window.reshape(shape)


def _leaf_init(path: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(mean, std)`` of a leaf: LayerNorm scales ~1, biases ~0, kernels 1/sqrt(fan_in)."""
    name = path.rsplit("/", 1)[-1]
    if name == "scale":
        return 1.0, 0.02
    if name == "bias":
        return 0.0, 0.02
    return 0.0, 1.0 / math.sqrt(math.prod(shape[:-1]) if len(shape) > 1 else 1)


def make_inputs(cfg: dict[str, Any]) -> tuple[Any, list[Any], dict[str, Any]]:
    """Base, K fine-tuned models (base + deltas ~1% of each leaf's std), and facts.

    Generated on device group by group (the top-level leaves, then each block): one
    `jax.random.normal` draw per group, of the group's size plus K * _SHIFT; the base
    takes the draw from 0, model k its delta from (k + 1) * _SHIFT. So setup costs one
    draw of about one model, two RNG compilations (all blocks have the same size) and two
    tiny ones per leaf shape, and holds at most one group's noise besides the trees, which
    keeps the setup's own peak RSS out of the measurements. (Measured alternatives: one
    jit over all the leaves compiles for tens of seconds and keeps hundreds of MB of
    compiler memory; one jit per shape making a leaf and its K copies compiles slower.)
    """
    spec = vit_spec(cfg["params_millions"], cfg["width"])
    k_models = cfg["num_models"]
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for path, shape in spec:
        group = "/".join(path.split("/")[:2]) if path.startswith("blocks/") else "top"
        groups.setdefault(group, []).append((path, shape))
    key = jax.random.key(cfg["seed"])
    flat_base: dict[str, jax.Array] = {}
    flat_models: list[dict[str, jax.Array]] = [{} for _ in range(k_models)]
    for g, leaves in enumerate(groups.values()):
        size = sum(math.prod(s) for _, s in leaves)
        noise = _noise(jax.random.fold_in(key, g), size + k_models * _SHIFT)
        offset = 0
        for path, shape in leaves:
            mean, std = _leaf_init(path, shape)
            leaf = _cut(noise, offset, np.float32(mean), np.float32(std), shape)
            flat_base[path] = leaf
            for k in range(k_models):
                flat_models[k][path] = _cut(noise, offset + (k + 1) * _SHIFT, leaf,
                                            np.float32(0.01 * std), shape)
            offset += math.prod(shape)
        jax.block_until_ready((flat_base, flat_models))
        del noise
    base = _nest(flat_base)
    models = [_nest(m) for m in flat_models]
    leaves = jax.tree.leaves(base)
    info = dict(params=int(sum(x.size for x in leaves)), leaves=len(leaves),
                depth=sum(g.startswith("blocks/") for g in groups), width=cfg["width"],
                model_bytes=int(sum(x.nbytes for x in leaves)),
                largest_leaf_bytes=int(max(x.nbytes for x in leaves)))
    return base, models, info


# ---------------------------------------------------------------------------------------
# The cases.


@jax.jit
def _floor(models):
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *models)


@jax.jit
def _floor_base(base, models):
    return jax.tree.map(lambda b, *xs: sum(xs, b), base, *models)


def _floor_of(case: str) -> str:
    """The floor a case is compared with: the one that reads the same trees."""
    return "floor_base" if case.startswith(("task_arithmetic", "floor_base")) else "floor"


def case_calls(name: str, base, models, scale: float
               ) -> tuple[Callable[[], Any], list[tuple[str, Callable[[], Any]]], int]:
    """``(timed call, [(label, call with a new coefficient)], trees read)`` of a case."""
    k = len(models)
    if name == "floor":
        return lambda: _floor(models), [], k
    if name == "floor_base":
        return lambda: _floor_base(base, models), [], k + 1
    check = not name.endswith("_nocheck")
    if name.startswith("linear"):
        w1 = [1.0 + i for i in range(k)]
        w2 = [float(k - i) for i in range(k)]
        return (lambda: mergejax.linear(None, models, check_finite=check),
                [(f"weights={w1}", lambda: mergejax.linear(None, models, weights=w1,
                                                           check_finite=check)),
                 (f"weights={w2}", lambda: mergejax.linear(None, models, weights=w2,
                                                           check_finite=check))],
                k)
    if name.startswith("task_arithmetic"):
        return (lambda: mergejax.task_arithmetic(base, models, scale=scale,
                                                 check_finite=check),
                [(f"scale={scale + 0.2:g}",
                  lambda: mergejax.task_arithmetic(base, models, scale=scale + 0.2,
                                                   check_finite=check))],
                k + 1)
    raise ValueError(f"unknown case {name!r}")


class _CompileCounter:
    """Counts XLA compilations (and sums trace + lower + compile time) via jax.monitoring."""

    def __init__(self):
        self.compiles: list[str] = []
        self.seconds = 0.0
        self.by_event = {e.rsplit("/", 1)[-1]: 0.0 for e in _COMPILE_EVENTS}
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            self.by_event[event.rsplit("/", 1)[-1]] += duration
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles.append(str(kwargs.get("fun_name", "?")))

    def mark(self) -> tuple[int, float]:
        return len(self.compiles), self.seconds

    def since(self, mark: tuple[int, float]) -> tuple[list[str], float]:
        return self.compiles[mark[0]:], self.seconds - mark[1]


def _cpu_busy_s() -> float:
    """CPU seconds all CPUs of the machine have been busy (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(fn: Callable[[], Any], settle_s: float) -> tuple[float, float]:
    """``(seconds until the result is ready, seconds until the call returned)``.

    The call returns before the device is done when the work is dispatched
    asynchronously, so the second number is the host-side cost (Python, validation,
    dispatch) of the call, or all of it when the call waits (``check_finite=True``).
    """
    start = time.perf_counter()
    out = fn()
    returned = time.perf_counter() - start
    jax.block_until_ready(out)
    total = time.perf_counter() - start
    del out
    time.sleep(settle_s)
    return total, returned


def run_case(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Builds the inputs and measures one case in this process."""
    counter = _CompileCounter()
    wall0, busy0, own0 = time.perf_counter(), _cpu_busy_s(), _own_cpu_s()
    jax.block_until_ready(jnp.zeros(()))  # backend up before the baseline
    rss_before_inputs = _current_rss()
    t0 = time.perf_counter()
    base, models, info = make_inputs(cfg)
    setup_s = time.perf_counter() - t0
    time.sleep(cfg["settle_s"])
    rss_with_inputs = _current_rss()
    peak_after_setup = _peak_rss()

    call, new_coefficient_calls, trees_read = case_calls(name, base, models, cfg["scale"])
    mark, before = counter.mark(), dict(counter.by_event)
    first_call_s, _ = _timed(call, cfg["settle_s"])
    compiled, compile_s = counter.since(mark)
    compile_breakdown = {e: counter.by_event[e] - before[e] for e in before}
    peak_first_call = _peak_rss()
    timed = [_timed(call, cfg["settle_s"]) for _ in range(cfg["repeats"])]
    times = [t for t, _ in timed]
    new_coef = []
    for label, fn in new_coefficient_calls:
        mark = counter.mark()
        seconds, _ = _timed(fn, cfg["settle_s"])
        fns, _ = counter.since(mark)
        new_coef.append(dict(call=label, seconds=seconds, compiles=len(fns),
                             compiled=fns))
    peak = _peak_rss()

    # The floor timed in this process, alternating with the method (after the peak RSS
    # is taken): a ratio less exposed to drift between processes than best / best.
    paired = []
    if name not in ("floor", "floor_base"):
        floor_call = case_calls(_floor_of(name), base, models, cfg["scale"])[0]
        _timed(floor_call, cfg["settle_s"])
        for i in range(cfg["repeats"]):
            order = (floor_call, call) if i % 2 == 0 else (call, floor_call)
            t = {id(fn): _timed(fn, cfg["settle_s"])[0] for fn in order}
            paired.append((t[id(call)], t[id(floor_call)]))
    wall = time.perf_counter() - wall0
    others = _cpu_busy_s() - busy0 - (_own_cpu_s() - own0)

    model_bytes = info["model_bytes"]
    inputs_bytes = (cfg["num_models"] + 1) * model_bytes  # base + K models exist in all cases
    moved = (trees_read + 1) * model_bytes
    best = min(times)
    return dict(
        case=name, trees_read=trees_read, bytes_moved=moved,
        first_call_s=first_call_s, compile_s=compile_s, compiles_first_call=len(compiled),
        compiled_first_call=compiled, compile_breakdown_s=compile_breakdown,
        best_s=best, median_s=statistics.median(times), times_s=times,
        host_best_s=min(r for _, r in timed), host_s=[r for _, r in timed],
        gbps=moved / best / 1e9, new_coefficient=new_coef,
        setup_s=setup_s, rss_before_inputs=rss_before_inputs,
        rss_with_inputs=rss_with_inputs, peak_rss_after_setup=peak_after_setup,
        peak_rss_first_call=peak_first_call, peak_rss=peak, inputs_bytes=inputs_bytes,
        extra_over_inputs_models=(peak - rss_before_inputs - inputs_bytes) / model_bytes,
        extra_first_call_models=(peak_first_call - rss_before_inputs - inputs_bytes)
        / model_bytes,
        added_by_calls_models=(peak - rss_with_inputs) / model_bytes,
        paired_times_s=paired,
        paired_ratio_median=(statistics.median(m / f for m, f in paired) if paired
                             else 1.0),
        others_cpu_fraction=max(0.0, others) / (wall * os.cpu_count()),
        model=info)


# ---------------------------------------------------------------------------------------
# Driver.


def _run_in_subprocess(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "row.json")
        argv = [sys.executable, "-m", "experiments.bench_basic", f"--only={name}",
                f"--result_file={result_file}",
                f"--params_millions={_PARAMS_MILLIONS.value}",
                f"--num_models={_NUM_MODELS.value}", f"--width={_WIDTH.value}",
                f"--repeats={_REPEATS.value}", f"--seed={_SEED.value}",
                f"--scale={_SCALE.value}", f"--settle_s={_SETTLE_S.value}",
                "--quick" if _QUICK.value else "--noquick"]
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, env.get("PYTHONPATH")) if p)
        if _MMAP_THRESHOLD.value >= 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD.value)
        proc = subprocess.run(argv, env=env, cwd=repo_root, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        with open(result_file) as f:
            return json.load(f)


def machine_info() -> dict[str, Any]:
    return dict(
        jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__")
        else None, mergejax=mergejax.__version__, numpy=np.__version__,
        python=platform.python_version(), platform=platform.platform(),
        processor=platform.processor(), cpu_count=os.cpu_count(),
        affinity_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        memory_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
        device_kinds=sorted({d.device_kind for d in jax.devices()}),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        malloc_mmap_threshold=(_MMAP_THRESHOLD.value if _MMAP_THRESHOLD.value >= 0
                               else os.environ.get("MALLOC_MMAP_THRESHOLD_")))


def summarize(rows: list[dict[str, Any]]) -> None:
    """Adds ratio-to-floor and target checks to the rows, in place."""
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        floor = by_case.get(_floor_of(r["case"]))
        r["floor_case"] = floor["case"] if floor else None
        r["ratio_to_floor"] = r["best_s"] / floor["best_s"] if floor else None
        r["median_ratio_to_floor"] = r["median_s"] / floor["median_s"] if floor else None
        r["meets_time_target"] = (r["ratio_to_floor"] <= 1.5) if floor else None
        r["meets_time_target_paired"] = r["paired_ratio_median"] <= 1.5
        r["meets_memory_target"] = r["extra_first_call_models"] <= 2.0
        r["meets_memory_target_all_calls"] = r["extra_over_inputs_models"] <= 2.0
        r["new_coefficient_recompiles"] = sum(c["compiles"] for c in r["new_coefficient"])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "compile s", "1st call s", "best s", "median s", "host s", "x floor",
              "x floor paired", "GB/s", "peak RSS GB", "extra 1st", "extra all",
              "new coef s (compiles)")
    lines = []
    for r in rows:
        ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] is not None else "-"
        coef = (", ".join(f"{c['seconds']:.3f} ({c['compiles']})" for c in r["new_coefficient"])
                or "-")
        lines.append((r["case"], f"{r['compile_s']:.2f}", f"{r['first_call_s']:.2f}",
                      f"{r['best_s']:.3f}", f"{r['median_s']:.3f}", f"{r['host_best_s']:.3f}",
                      ratio, f"{r['paired_ratio_median']:.2f}", f"{r['gbps']:.1f}",
                      f"{r['peak_rss'] / GB:.2f}", f"{r['extra_first_call_models']:.2f}",
                      f"{r['extra_over_inputs_models']:.2f}", coef))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    return "\n".join(out)


LEGEND = """\
compile s: trace + lower + compile time of the first call (all jits it ran); 1st call s: its
  wall time. best/median s: of the timed calls, each until jax.block_until_ready.
host s: best time until the call returned (host-side work: Python, validation, dispatch;
  the whole call when it waits for the device, as check_finite=True does).
x floor: best / best of the floor reading the same trees (floor: K models; floor_base:
  base + K), each in its own process. x floor paired: median over --repeats rounds of
  method / floor timed alternately in the method's process. GB/s: (trees read + 1
  written) x model bytes / best.
extra 1st / all: (peak RSS - RSS before the inputs existed - inputs) / model bytes, after
  the first call / after all calls (RSS is the process's; the output itself is 1).
new coef s (compiles): wall time and XLA compilations of calls with new coefficients
  (linear: weights=[1..K] then weights=[K..1]; task_arithmetic: scale+0.2). Compiles on
  the first weights=list call are of small eager helpers, not of the merge.
Targets: x floor <= 1.5; extra 1st <= 2 (inputs + two models' worth, for one merge)."""


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config()

    if _ONLY.value is not None:  # child: one case, row to --result_file
        if not _RESULT_FILE.value:
            raise app.UsageError("--only needs --result_file")
        row = run_case(_ONLY.value, cfg)
        with open(_RESULT_FILE.value, "w") as f:
            json.dump(row, f)
        return

    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {CASES}")
    cases = [c for c in CASES if c in _CASES.value]
    rows = []
    for name in cases:
        logging.info("running %s", name)
        t0 = time.perf_counter()
        if _IN_PROCESS.value:
            row = run_case(name, cfg)
        else:
            row = _run_in_subprocess(name)
        rows.append(row)
        print(f"  {name}: best {row['best_s']:.3f}s ({time.perf_counter() - t0:.1f}s with "
              f"setup)", flush=True)
    summarize(rows)

    model = rows[0]["model"]
    k = cfg["num_models"]
    print()
    print(f"{model['params'] / 1e6:.1f}M float32 params per model "
          f"({model['model_bytes'] / GB:.2f} GB, {model['leaves']} leaves, depth "
          f"{model['depth']}, width {model['width']}), K={k} models + base "
          f"(inputs {(k + 1) * model['model_bytes'] / GB:.2f} GB); best/median of "
          f"{cfg['repeats']}; {jax.default_backend()} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs")
    print(format_table(rows))
    print(LEGEND)
    others = max(r["others_cpu_fraction"] for r in rows)
    print(f"Other processes used up to {100 * others:.0f}% of the {os.cpu_count()} CPUs "
          "during a case" + (" (times are noisier then)." if others > 0.05 else "."))

    os.makedirs(_OUT_DIR.value, exist_ok=True)
    path = os.path.join(_OUT_DIR.value, "bench_basic.json")
    with open(path, "w") as f:
        json.dump(dict(config=cfg, machine=machine_info(), model=model, rows=rows,
                       in_process=_IN_PROCESS.value,
                       targets=dict(max_ratio_to_floor=1.5, max_extra_models=2.0)),
                  f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
