"""The engine's per-leaf mode (`LeafKernels`): the whole-program merge's bits, one compiled
kernel per group of same-shaped leaves, speculation settled after the leaves ran."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax
from mergejax import method as method_lib
from mergejax import registry
from mergejax.method import MergeMethod
from mergejax.methods import stages
from mergejax.tree import flatten_with_paths

#: Hyperparameters a method needs (no default).
HPARAMS = {"darex": {"q": 0.5}, "nearswap": {"t": 0.5}}
#: Iterative spherical means: XLA compiles their loops differently inside the whole-tree
#: program, 1 ulp apart on some leaves (as in tests/io_streaming_test.py).
ULP_METHODS = ("karcher", "multislerp")
#: Methods whose per-leaf runs each exercise a different part of the engine: model-wide
#: statistics and speculation (ties, consensus, breadcrumbs), a ``batched`` kernel
#: (free_merging), a decomposing one (iso_c: an SVD per matrix leaf); keys and two
#: models run in the bfloat16 test below (dare_ties, slerp). Every method's kernels run leaf
#: by leaf in tests/io_streaming_test.py (the same `LeafKernels` and `fold_statistics`), so
#: here the others run with ``-m slow`` (CI's time limit).
DEFAULT_RUN = ("task_arithmetic", "ties", "consensus", "breadcrumbs", "free_merging", "iso_c")
PER_LEAF = [pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow)
            for n in mergejax.list_methods() if isinstance(registry.get_method(n), MergeMethod)]
assert set(DEFAULT_RUN) <= {p.values[0] for p in PER_LEAF}
BLOCKS = 2


def _model(seed: int, dtype=jnp.float32) -> dict:
    """A small transformer-like tree: ``BLOCKS`` identical blocks, an embedding, a head,
    and an integer step counter."""
    rng = np.random.default_rng(0)
    base = {"embed": rng.normal(0, 0.1, (12, 8)), "head": rng.normal(0, 0.1, (8, 12)),
            "norm": {"scale": 1 + rng.normal(0, 0.1, (8,))}}
    for i in range(BLOCKS):
        base[f"block_{i}"] = {"attn": {"kernel": rng.normal(0, 0.1, (8, 8))},
                              "mlp": {"kernel": rng.normal(0, 0.1, (8, 16)),
                                      "bias": rng.normal(0, 0.1, (16,))}}
    noise = np.random.default_rng(seed)
    tree = jax.tree.map(lambda v: jnp.asarray(v + (0.03 * noise.normal(size=v.shape)
                                                   if seed else 0), dtype), base)
    tree["step"] = jnp.asarray(seed, jnp.int32)
    return tree


BASE, MODELS = _model(0), [_model(k) for k in (1, 2)]


def _assert_same_bits(a, b, ulp: int = 0) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x, y in zip(mergejax.leaf_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if ulp:
            np.testing.assert_array_max_ulp(x, y, maxulp=ulp)
        else:
            assert x.tobytes() == y.tobytes(), (path, float(np.max(np.abs(
                x.astype(np.float64) - y))))


def _kwargs(name: str) -> dict:
    kwargs = dict(HPARAMS.get(name, {}))
    if registry.get_method(name).uses_key:
        kwargs["key"] = jax.random.key(3)
    return kwargs


@pytest.mark.parametrize("name", PER_LEAF)
def test_per_leaf_equals_the_whole_program_bit_for_bit(name):
    method = registry.get_method(name)
    models = MODELS[:1] if method.max_models == 1 else MODELS
    kwargs = _kwargs(name)
    whole = method(BASE, models, per_leaf=False, **kwargs)
    _assert_same_bits(method(BASE, models, per_leaf=True, **kwargs), whole,
                      ulp=1 if name in ULP_METHODS else 0)


@pytest.mark.parametrize("name,hparams", [("ties", {"scope": "global", "density": 0.3}),
                                          ("dare_ties", {"density": 0.5}),
                                          ("slerp", {"t": 0.3})])
def test_per_leaf_keeps_bfloat16_and_matches(name, hparams):
    base, models = _model(0, jnp.bfloat16), [_model(k, jnp.bfloat16) for k in (1, 2)]
    method = registry.get_method(name)
    models = models[:1] if method.max_models == 1 else models
    kwargs = {**hparams, **({"key": jax.random.key(1)} if method.uses_key else {})}
    got = method(base, models, per_leaf=True, **kwargs)
    assert got["embed"].dtype == jnp.bfloat16
    _assert_same_bits(got, method(base, models, per_leaf=False, **kwargs))


def _backend_compiles(fn) -> list[str]:
    compiled = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    return compiled


def test_kernels_compile_once_per_leaf_group_whatever_the_depth():
    method = mergejax.get_method("task_arithmetic")
    jax.clear_caches()
    compiled = _backend_compiles(lambda: method(BASE, MODELS, scale=0.3, per_leaf=True))
    # embed (12, 8), head (8, 12), norm/scale (8,), and per block attn (8, 8),
    # mlp/kernel (8, 16) and mlp/bias (16,): 6 groups, not 3 + 3 * BLOCKS leaves.
    assert compiled.count("jit(_merge_leaf)") == 6
    again = _backend_compiles(lambda: method(BASE, MODELS, scale=0.7, per_leaf=True))
    assert "jit(_merge_leaf)" not in again  # a coefficient sweep does not recompile


def test_statistics_passes_compile_once_per_leaf_group():
    jax.clear_caches()
    compiled = _backend_compiles(
        lambda: mergejax.ties(BASE, MODELS, density=0.3, scope="global", per_leaf=True))
    # The sample and window passes update each of the 6 leaf groups (the first leaf
    # starts from the pass's `init`, so it shares its group's update); the window found
    # every rank, so the two fallback passes update one leaf each.
    assert compiled.count("jit(_update_leaf)") == 2 * 6 + 2
    assert compiled.count("jit(_finalize_pass)") == 4
    assert compiled.count("jit(_merge_leaf)") == 6


@pytest.mark.parametrize("workers", [1, 4])
def test_leaf_threads_keep_the_bits_and_compile_a_shared_kernel_once(monkeypatch, workers):
    """Leaves dispatched from ``workers`` threads: the whole program's bits, and q, k, v
    (one shape, three names, a kernel that never reads the path) share one compile, as
    leaf after leaf in one thread."""
    monkeypatch.setattr(method_lib, "leaf_workers", lambda: workers)
    rng = np.random.default_rng(5)
    trees = [{name: jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
              for name in ("q", "k", "v")} for _ in range(3)]
    base, models = trees[0], trees[1:]
    jax.clear_caches()
    method_lib._SHARED_PATH.clear()  # pylint: disable=protected-access (count compiles)
    merged = []
    compiled = _backend_compiles(lambda: merged.append(
        mergejax.task_arithmetic(base, models, scale=0.4, per_leaf=True)) or merged[0])
    assert compiled.count("jit(_merge_leaf)") == 1
    _assert_same_bits(merged[0], mergejax.task_arithmetic(base, models, scale=0.4,
                                                          per_leaf=False))
    for name in ("ties", "breadcrumbs", "iso_c"):
        _assert_same_bits(registry.get_method(name)(BASE, MODELS, per_leaf=True),
                          registry.get_method(name)(BASE, MODELS, per_leaf=False))


def test_leaf_workers_follow_the_environment(monkeypatch):
    monkeypatch.setenv("MERGEJAX_LEAF_WORKERS", "3")
    assert method_lib.leaf_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MERGEJAX_LEAF_WORKERS", bad)
        with pytest.raises(mergejax.MergeError, match="MERGEJAX_LEAF_WORKERS must be"):
            method_lib.leaf_workers()
    monkeypatch.delenv("MERGEJAX_LEAF_WORKERS")
    assert 1 <= method_lib.leaf_workers() <= method_lib.MAX_LEAF_WORKERS


def test_leaves_run_under_the_callers_config_context(monkeypatch):
    """Worker threads do not inherit ``jax.enable_x64()``: under it, float64 leaves are
    merged in float64 (in the calling thread), not silently in float32."""
    monkeypatch.setattr(method_lib, "leaf_workers", lambda: 4)
    with jax.enable_x64(True):
        base, models = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
                        for t in (BASE, MODELS))
        got = mergejax.task_arithmetic(base, models, scale=0.3, per_leaf=True)
    expected = (np.asarray(BASE["embed"], np.float64) + 0.3 * sum(
        np.asarray(m["embed"], np.float64) - np.asarray(BASE["embed"], np.float64)
        for m in MODELS))
    assert got["embed"].dtype == np.float64
    np.testing.assert_allclose(np.asarray(got["embed"]), expected, rtol=1e-12)


def test_each_groups_first_leaf_runs_before_the_rest_of_its_group():
    """`_dispatch_leaves`: results in leaf order; a group's other leaves start only after
    its first leaf (which traces and compiles the group's kernel) returned."""
    groups = ["a", "b", "a", "c", "b", "a", "c"]
    sizes = [1, 5, 9, 2, 2, 3, 7]
    spans: dict[int, tuple[float, float]] = {}

    def run(j):
        start = time.perf_counter()
        if groups.index(groups[j]) == j:
            time.sleep(0.05)  # a compile
        spans[j] = (start, time.perf_counter())
        return j * 10

    got = method_lib._dispatch_leaves(run, groups, sizes, workers=4)  # pylint: disable=protected-access
    assert got == [j * 10 for j in range(len(groups))]
    for j, group in enumerate(groups):
        lead = groups.index(group)
        if j != lead:
            assert spans[j][0] >= spans[lead][1], (j, lead)


def test_per_leaf_is_chosen_for_large_concrete_inputs_only(monkeypatch):
    calls = []
    original = method_lib._run_per_leaf  # pylint: disable=protected-access

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(method_lib, "_run_per_leaf", counting)
    mergejax.task_arithmetic(BASE, MODELS)
    assert not calls  # far below PER_LEAF_MIN_SIZE
    monkeypatch.setattr(method_lib, "PER_LEAF_MIN_SIZE", 100)
    expected = mergejax.task_arithmetic(BASE, MODELS, per_leaf=False)
    _assert_same_bits(mergejax.task_arithmetic(BASE, MODELS), expected)
    assert len(calls) == 1
    jax.jit(lambda b, ms: mergejax.task_arithmetic(b, ms))(BASE, MODELS)
    assert len(calls) == 1  # traced: one program
    mergejax.knots(BASE, MODELS)
    assert len(calls) == 1  # declared runs_per_leaf=False: LAPACK-bound, one program
    mergejax.ties(BASE, MODELS)
    assert len(calls) == 2  # neither batched nor declared one program


def test_per_leaf_inside_jit_and_grad_matches_the_whole_program():
    def two_leaves(tree):
        return {"embed": tree["embed"], "norm": tree["norm"]}

    base, models = two_leaves(BASE), [two_leaves(m) for m in MODELS]

    def merged_norm(scale, per_leaf):
        out = mergejax.ties(base, models, density=0.3, scale=scale, per_leaf=per_leaf)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(out) if x.dtype == jnp.float32)

    whole = jax.jit(jax.value_and_grad(lambda s: merged_norm(s, False)))(0.7)
    per_leaf = jax.jit(jax.value_and_grad(lambda s: merged_norm(s, True)))(0.7)
    np.testing.assert_allclose(np.asarray(per_leaf), np.asarray(whole), rtol=1e-6)
    # d/ds of sum((base + s * tau)^2) at the merged tau, by a central difference
    h = 1e-2
    fd = (merged_norm(0.7 + h, True) - merged_norm(0.7 - h, True)) / (2 * h)
    np.testing.assert_allclose(float(per_leaf[1]), float(fd), rtol=1e-3)


def test_a_non_finite_leaf_is_named():
    models = [dict(m) for m in MODELS]
    models[1]["head"] = models[1]["head"].at[0, 0].set(jnp.nan)
    with pytest.raises(mergejax.MergeError, match=r"models\[1\] at 'head'"):
        mergejax.task_arithmetic(BASE, models, per_leaf=True)


def _sample_misleading(seed: int, stride: int, adversarial: bool, v_delta):
    """A (1024, 520) leaf ``w`` and a small leaf ``v``, base and two models; with
    ``adversarial`` every ``stride``-th entry of w's task vectors (all a strided sample
    sees) is 1e-3, below the rank. ``v_delta(rng)`` is v's task vector."""
    rng = np.random.default_rng(seed)
    base = {"w": jnp.asarray(rng.standard_normal(BIG), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)}
    models = []
    for _ in range(2):
        tau = rng.standard_normal(BIG).astype(np.float32)
        if adversarial:
            tau.reshape(-1)[::stride] = 1e-3
        models.append({"w": base["w"] + tau, "v": base["v"] + v_delta(rng)})
    return base, models


BIG = (1024, 520)


@pytest.mark.parametrize("adversarial", [False, True])
def test_speculation_is_settled_after_the_leaves_ran(adversarial):
    """Per-tensor top-k over > 2**18 entries runs speculatively per leaf: a layout that
    misleads the sample needs the exact fallback, which is then compiled (for that leaf's
    group only), and both equal the whole program."""
    shape = BIG
    base, models = _sample_misleading(3, stages.sample_stride(BIG[0] * BIG[1]), adversarial,
                                      lambda rng: rng.standard_normal((64, 8)))
    hparams = dict(density=0.2, scope="tensor", topk="mergekit")
    traced = []
    original = stages.select_thresholds
    method_lib._merge_leaf.clear_cache()  # pylint: disable=protected-access (count traces)
    method_lib._NEEDS_EXACT.clear()  # pylint: disable=protected-access

    def counting(*args, **kwargs):
        traced.append(args[0][0].shape)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "select_thresholds", counting)
        got = mergejax.ties(base, models, per_leaf=True, **hparams)
    big = [s for s in traced if s == shape]
    assert len(big) == (2 if adversarial else 1)  # speculative, then exact if needed
    _assert_same_bits(got, mergejax.ties(base, models, per_leaf=False, **hparams))


def test_a_group_whose_speculation_failed_runs_exact_in_later_merges():
    """Once a leaf group needed its exact kernel, a later merge runs that kernel at once
    (the speculative one would fail again, and the leaf would run twice)."""
    base, models = _sample_misleading(3, stages.sample_stride(BIG[0] * BIG[1]), True,
                                      lambda rng: rng.standard_normal((64, 8)))
    method = registry.get_method("ties")
    paths, bases, _ = flatten_with_paths(base)
    leaves = [jax.tree.leaves(m) for m in models]
    j = next(i for i, b in enumerate(bases) if b.shape == BIG)
    plan = method.plan(paths, bases, len(models), density=0.2, scope="tensor",
                       topk="mergekit")
    total = sum(b.size for b in bases)
    method_lib._NEEDS_EXACT.clear()  # pylint: disable=protected-access
    xs = [m[j] for m in leaves]
    first = method_lib.LeafKernels(method, plan, (), total)
    assert not bool(first.run(j, bases[j], xs)[2])  # the window missed: not exact
    exact, _ = first.run_exact(j, bases[j], xs)
    later = method_lib.LeafKernels(method, plan, (), total)
    out, _, held = later.run(j, bases[j], xs)
    assert bool(held)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(exact))


def test_global_fallback_passes_run_where_the_window_missed(monkeypatch):
    """A layout that misleads the model-wide sample: the window pass misses, so the radix
    fallback passes are not idle and update every leaf; the result is the program's."""
    stride = stages.sample_stride(BIG[0] * BIG[1] + 64 * 8)
    base, models = _sample_misleading(5, stride, True, lambda rng: 1e-3)
    found = []
    original = stages._window_found  # pylint: disable=protected-access

    def recording(window_pass):
        found.append(original(window_pass))
        return found[-1]

    monkeypatch.setattr(stages, "_window_found", recording)
    got = mergejax.ties(base, models, density=0.2, scope="global", per_leaf=True)
    assert found == [False, False]  # the window missed: neither fallback pass is idle
    _assert_same_bits(got, mergejax.ties(base, models, density=0.2, scope="global",
                                         per_leaf=False))


def test_a_tree_without_floating_leaves_is_copied():
    tree = {"step": jnp.asarray(4, jnp.int32), "mask": jnp.asarray([True, False])}
    for name in ("task_arithmetic", "ties"):
        got = mergejax.get_method(name)(tree, [tree, tree], per_leaf=True)
        _assert_same_bits(got, tree)
