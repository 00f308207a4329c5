"""Shared machinery of the merge benchmarks (`bench_basic`, `bench_sparse`).

A synthetic ViT-shaped parameter pytree with a base and K fine-tuned copies, generated on
device (`make_inputs`); one case measured per process (`run_case`): compile time, best and
median of repeated calls, host-side time, peak RSS against the inputs, compilations on
new coefficients, and a ratio to a partner case timed alternately in the same process
(`paired_times_s`), which is less exposed to drift on a shared machine than best / best
across processes.
"""

from __future__ import annotations

import functools
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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging

import mergejax
from mergejax.io.checkpoint import unflatten_paths

MB = 1 << 20
GB = 1 << 30
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


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


def clip_vit_spec(width: int = 768, depth: int = 12, patch: int = 32, image: int = 224,
                  embed_dim: int = 512) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(path, shape)`` of CLIP's vision tower (ViT-B/32 by default, 87.8M parameters)
    in Flax orientation: the shapes FusionBench's timings in ../shared/baselines.md were
    taken on (its fused ``in_proj`` is one ``(width, 3 * width)`` kernel)."""
    d, mlp = width, 4 * width
    spec = [("conv1/kernel", (patch, patch, 3, d)), ("class_embedding", (d,)),
            ("positional_embedding", ((image // patch) ** 2 + 1, d)),
            ("ln_pre/scale", (d,)), ("ln_pre/bias", (d,))]
    block = [("ln_1/scale", (d,)), ("ln_1/bias", (d,)),
             ("attn/in_proj/kernel", (d, 3 * d)), ("attn/in_proj/bias", (3 * d,)),
             ("attn/out_proj/kernel", (d, d)), ("attn/out_proj/bias", (d,)),
             ("ln_2/scale", (d,)), ("ln_2/bias", (d,)),
             ("mlp/c_fc/kernel", (d, mlp)), ("mlp/c_fc/bias", (mlp,)),
             ("mlp/c_proj/kernel", (mlp, d)), ("mlp/c_proj/bias", (d,))]
    for i in range(depth):
        spec += [(f"blocks/{i}/{p}", s) for p, s in block]
    spec += [("ln_post/scale", (d,)), ("ln_post/bias", (d,)), ("proj", (d, embed_dim))]
    return tuple(spec)


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
    if cfg.get("layout") == "clip":
        spec = clip_vit_spec(cfg["width"], cfg.get("depth", 12))
    else:
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
    base = unflatten_paths(flat_base)
    models = [unflatten_paths(m) for m in flat_models]
    leaves = jax.tree.leaves(base)
    info = dict(params=int(sum(x.size for x in leaves)), leaves=len(leaves),
                depth=sum(g.startswith("blocks/") for g in groups), width=cfg["width"],
                model_bytes=int(sum(x.nbytes for x in leaves)),
                largest_leaf_bytes=int(max(x.nbytes for x in leaves)))
    return base, models, info


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


def run_case(name: str, cfg: dict[str, Any], calls, partner: str | None
             ) -> dict[str, Any]:
    """Builds the inputs and measures one case in this process.

    ``calls(name, base, models, scale) -> (timed call, [(label, call with new
    coefficients)], trees read)`` gives a case's calls; ``partner`` is the case timed
    alternately with it for the paired ratio (None: no pairing).
    """
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

    call, new_coefficient_calls, trees_read = calls(name, base, models, cfg["scale"])
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
    if partner is not None:
        floor_call = calls(partner, base, models, cfg["scale"])[0]
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
        case=name, paired_with=partner, trees_read=trees_read, bytes_moved=moved,
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


def run_in_subprocess(module: str, name: str, flags: list[str],
                      mmap_threshold: int = -1) -> dict[str, Any]:
    """Runs ``python -m module --only=name --result_file=... *flags`` and returns its row."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "row.json")
        argv = [sys.executable, "-m", module, f"--only={name}",
                f"--result_file={result_file}", *flags]
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, env.get("PYTHONPATH")) if p)
        if mmap_threshold >= 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        proc = subprocess.run(argv, env=env, cwd=repo_root, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        import json  # pylint: disable=import-outside-toplevel
        with open(result_file) as f:
            return json.load(f)


@jax.jit
def floor_base(base, models):
    """The memory floor of a merge reading base + K models and writing one:
    ``base + sum_k models[k]`` per leaf, the simplest jitted expression that does it."""
    return jax.tree.map(lambda b, *xs: sum(xs, b), base, *models)


def run_selected(cases: tuple[str, ...], selected: list[str],
                 run: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """``run(name)`` for each case of ``cases`` named in ``selected`` (in ``cases``' order),
    printing each one's best time; an unknown name is a usage error."""
    unknown = sorted(set(selected) - set(cases))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {cases}")
    rows = []
    for name in (c for c in cases if c in selected):
        logging.info("running %s", name)
        t0 = time.perf_counter()
        rows.append(run(name))
        print(f"  {name}: best {rows[-1]['best_s']:.3f}s ({time.perf_counter() - t0:.1f}s "
              "with setup and compile)", flush=True)
    return rows


def format_table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def machine_info(mmap_threshold: int = -1) -> dict[str, Any]:
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
        openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
        malloc_mmap_threshold=(mmap_threshold if mmap_threshold >= 0
                               else os.environ.get("MALLOC_MMAP_THRESHOLD_")))


