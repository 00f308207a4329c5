"""The streaming (out-of-core) merge against the in-memory `mergejax.merge`, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import spy

import mergejax
from mergejax import method as method_lib
from mergejax import registry
from mergejax.io import safetensors as st
from mergejax.io import streaming
from mergejax.io.checkpoint import flatten_paths, open_checkpoint
from mergejax.method import MergeMethod
from mergejax.methods import stages

HIDDEN, LAYERS, INTER, VOCAB = 8, 2, 16, 24
#: Hyperparameters a method needs (no default) or that keep its test small.
HPARAMS = {"darex": {"q": 0.5}, "nearswap": {"t": 0.5}}
#: Iterative spherical means: XLA compiles their loops differently inside the whole-tree
#: program, measured 1 ulp apart on one leaf; compared to 1 ulp instead of bit for bit.
ULP_METHODS = ("karcher", "multislerp")
STREAMING = [n for n in mergejax.list_methods()
             if isinstance(registry.get_method(n), MergeMethod)]


def llama_spec(vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    spec = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        spec += [(p + "input_layernorm.weight", (HIDDEN,)),
                 (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                 (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                 (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                 (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
    return spec + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]


def write_models(root, count: int, dtype=np.float32, *, vocab: int = VOCAB,
                 max_shard_bytes: int = 2000, extra: dict | None = None) -> list[str]:
    """``count`` checkpoints (the first is the base) with correlated random values, in
    several shards, plus an integer tensor that is copied, never merged."""
    rng = np.random.default_rng(0)
    base = {n: rng.normal(0, 0.1, s) for n, s in llama_spec(vocab)}
    dirs = []
    for k in range(count):
        tensors = {n: (v + (0.03 * rng.normal(size=v.shape) if k else 0)).astype(dtype)
                   for n, v in base.items()}
        tensors["model.position_ids"] = np.arange(6, dtype=np.int64)
        tensors.update(extra or {})
        d = os.path.join(root, f"m{k}")
        st.save_safetensors(tensors, d, max_shard_bytes=max_shard_bytes)
        dirs.append(d)
    return dirs


def streamed(method: str, dirs: list[str], **kwargs) -> dict[str, np.ndarray]:
    base, *models = [open_checkpoint(d) for d in dirs]
    hparams = {k: v for k, v in kwargs.items() if k not in ("key", "mesh")}
    plan = streaming.plan_stream(method, base, models, key=kwargs.get("key"), **hparams)
    out = {t.path: np.array(v) for t, v in streaming.iter_merged(
        plan, base, models, key=kwargs.get("key"), mesh=kwargs.get("mesh"))}
    for c in [base] + models:
        c.close()
    return out


def in_memory(method: str, dirs: list[str], **kwargs) -> dict[str, np.ndarray]:
    base, *models = [st.load_safetensors(d) for d in dirs]
    merged = mergejax.merge(method, base, models, **kwargs)
    return {p: np.asarray(v) for p, v in flatten_paths(merged).items()}


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                         ulp: int = 0) -> None:
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        assert a[path].shape == b[path].shape, path
        if ulp:
            np.testing.assert_array_max_ulp(a[path], b[path], maxulp=ulp)
            continue
        assert a[path].tobytes() == b[path].tobytes(), (
            path, float(np.max(np.abs(a[path].astype(np.float64) - b[path]))))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("ckpt"), 3)


@pytest.mark.parametrize("method", STREAMING)
def test_streaming_equals_in_memory_bit_for_bit(method, checkpoints):
    m = registry.get_method(method)
    dirs = checkpoints[:2] if m.max_models == 1 else checkpoints
    kwargs = dict(HPARAMS.get(method, {}))
    if m.uses_key:
        kwargs["key"] = jax.random.key(7)
    expected = in_memory(method, dirs, **kwargs)
    assert_bitwise_equal(streamed(method, dirs, **kwargs), expected,
                         ulp=1 if method in ULP_METHODS else 0)


#: Methods whose bit-for-bit sweep is repeated at XLA's default optimisation level: one
#: of each kind of kernel (top-k, random, per-row ranks, spherical, SVD, masks).
DEFAULT_LEVEL_SAMPLE = ("ties", "dare_ties", "della", "breadcrumbs", "slerp", "tsv_m",
                        "iso_cts", "consensus")


def test_bit_for_bit_sample_at_the_default_xla_level():
    """conftest compiles the tests at LLVM -O0, where some results move by an ulp; users
    compile at XLA's default. A sample of the sweep above, in a fresh process at the
    default level."""
    env = dict(os.environ, MERGEJAX_TEST_XLA_OPT="default")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if f.split("=")[0] != conftest.OPT_FLAG)
    tests = [f"{__file__}::test_streaming_equals_in_memory_bit_for_bit[{m}]"
             for m in DEFAULT_LEVEL_SAMPLE]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "addopts=", *tests], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{len(tests)} passed" in run.stdout


def test_bf16_stays_bf16_and_matches(tmp_path):
    dirs = write_models(tmp_path, 3, ml_dtypes.bfloat16)
    out = streamed("ties", dirs, density=0.5, scope="tensor")
    assert out["model/layers/0/mlp/up_proj/weight"].dtype == ml_dtypes.bfloat16
    assert_bitwise_equal(out, in_memory("ties", dirs, density=0.5, scope="tensor"))


def test_random_method_depends_on_key(checkpoints):
    a = streamed("dare_ties", checkpoints, key=jax.random.key(1))
    b = streamed("dare_ties", checkpoints, key=jax.random.key(2))
    assert not np.array_equal(a["lm_head/weight"], b["lm_head/weight"])


def test_sharded_over_a_mesh_matches(checkpoints):
    mesh = jax.make_mesh((4,), ("tensors",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    out = streamed("task_arithmetic", checkpoints, mesh=mesh, scale=0.5)
    expected = in_memory("task_arithmetic", checkpoints, scale=0.5)
    for path, value in expected.items():
        np.testing.assert_allclose(out[path], value, rtol=1e-6, atol=1e-7)


def test_kernels_compile_once_per_size_class(checkpoints):
    compiled = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.clear_caches()  # whatever other tests compiled
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        streamed("linear", checkpoints, weights=[0.2, 0.3])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    # linear never reads ctx.path and is reshape-invariant: one kernel per size (embed +
    # lm_head, the norms, q_proj + o_proj, up_proj + down_proj), whatever the number of
    # layers and names.
    assert compiled.count("jit(_merge_leaf)") == 4


def _merged_in_memory(method: MergeMethod, dirs: list[str]) -> dict[str, np.ndarray]:
    base, *models = [st.load_safetensors(d) for d in dirs]
    return {p: np.asarray(v) for p, v in flatten_paths(method(base, models)).items()}


def _scaled_task_arithmetic(scale_of, traced, reshape_invariant=False):
    """A task arithmetic whose kernel counts its traces and scales by ``scale_of(ctx)``."""
    @mergejax.leafwise("_scaled_ta", family="basic", paper="-", register=False,
                       reshape_invariant=reshape_invariant)
    def kernel(ctx, base, models):
        traced.append(1)
        return base + scale_of(ctx) * sum(x - base for x in models)
    return kernel


def test_kernels_that_never_read_the_path_are_traced_once_per_shape(checkpoints):
    traced = []
    method = _scaled_task_arithmetic(lambda ctx: 0.5, traced)
    out = streamed(method, checkpoints)
    assert len(traced) == 5  # the five shapes of `llama_spec`
    assert_bitwise_equal(out, _merged_in_memory(method, checkpoints))


def test_reshape_invariant_kernels_are_traced_once_per_size(checkpoints):
    traced = []
    method = _scaled_task_arithmetic(lambda ctx: 0.5, traced, reshape_invariant=True)
    out = streamed(method, checkpoints)
    assert len(traced) == 4  # up_proj (16, 8) and down_proj (8, 16) share a flat kernel
    assert_bitwise_equal(out, _merged_in_memory(method, checkpoints))


@pytest.mark.parametrize("name,hparams,invariant", [
    ("ties", {}, True), ("ties", {"scope": "tensor"}, True), ("breadcrumbs", {}, True),
    ("dare_ties", {"rescale": "density"}, True), ("dare_ties", {"rescale": "l1"}, True),
    ("della", {}, False), ("linear", {}, True), ("slerp", {}, True),
    ("model_stock", {}, True), ("metagpt", {"scope": "tensor"}, True),
    ("tsv_m", {}, False)])
def test_which_methods_declare_reshape_invariance(name, hparams, invariant):
    assert registry.get_method(name).is_reshape_invariant(hparams) is invariant


def test_kernels_that_read_the_path_are_traced_per_name(checkpoints):
    """q_proj and o_proj share a shape; a kernel that decides from the name must see each
    (sharing the first one's trace would scale o_proj by q_proj's factor)."""
    traced = []
    method = _scaled_task_arithmetic(lambda ctx: 2.0 if "q_proj" in ctx.path else 0.5,
                                     traced)
    out = streamed(method, checkpoints)
    assert len(traced) == 8  # every (shape, name) class: 2 vocab, 2 norm, q, o, up, down
    assert_bitwise_equal(out, _merged_in_memory(method, checkpoints))
    base, *models = [flatten_paths(st.load_safetensors(d)) for d in checkpoints]
    for proj, scale in (("q", 2.0), ("o", 0.5)):
        name = f"model/layers/1/self_attn/{proj}_proj/weight"
        tau = sum(np.asarray(m[name]) - np.asarray(base[name]) for m in models)
        np.testing.assert_allclose(out[name], np.asarray(base[name]) + scale * tau,
                                   rtol=1e-5, atol=1e-7)


def test_statistics_that_read_the_path_are_traced_per_name_not_per_layer(checkpoints):
    """A statistics pass that decides from the name (here: the q_proj norm the kernel
    rescales by) is traced once per (shape, name) class, like kernels: layer numbers never
    matter, so the two layers share their updates (13 traces before, one per tensor)."""
    traced = []

    def q_norm(ctx, base, models):
        traced.append(ctx.path)
        weight = 1.0 if "q_proj" in ctx.path else 0.0
        return weight * sum(jnp.sum((x - base) ** 2) for x in models)

    @mergejax.leafwise("_q_normed_ta", family="basic", paper="-", register=False,
                       statistics=(q_norm,))
    def method(ctx, base, models):
        return base + sum(x - base for x in models) / (1.0 + ctx.stats[0])

    out = streamed(method, checkpoints)
    assert len(traced) == 8  # 2 vocab, 2 norm, q, o, up, down; not 13 tensors
    assert all("/layers/#/" in p for p in traced if "layers" in p)
    assert_bitwise_equal(out, _merged_in_memory(method, checkpoints))


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_statistics_passes_read_only_the_leaves_they_need(checkpoints, monkeypatch, scope):
    """Per-tensor TIES has model-wide threshold passes that do nothing: streaming must not
    read the checkpoints for them (each tensor read once, to merge). Global TIES reads
    every merged tensor once more for the sample and the window passes; the window
    finds every rank here, so the two radix fallback passes are idle and read one
    tensor, the smallest."""
    reads: dict[str, int] = {}
    original = streaming._Reader.read  # pylint: disable=protected-access

    def counting(self, path, flat=False):
        reads[path] = reads.get(path, 0) + 1
        return original(self, path, flat)

    monkeypatch.setattr(streaming._Reader, "read", counting)  # pylint: disable=protected-access
    streamed("ties", checkpoints, scope=scope)
    if scope == "tensor":
        assert reads and set(reads.values()) == {1}
        return
    smallest = min(reads, key=lambda p: (HIDDEN if "norm" in p else 2 * HIDDEN, p))
    assert reads.pop(smallest) == 5
    assert set(reads.values()) == {3}


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path):
    dirs = write_models(tmp_path / "a", 2)
    extra = write_models(tmp_path / "b", 1, extra={"model.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(mergejax.MergeError, match="model.extra.weight"):
        streamed("task_arithmetic", [dirs[0], dirs[1], extra[0]])
    small = write_models(tmp_path / "c", 1, vocab=VOCAB + 2)
    with pytest.raises(mergejax.MergeError,
                       match="vocabulary-size mismatch at .lm_head.weight.*vocab_policy"):
        streamed("task_arithmetic", [dirs[0], small[0]])


def test_vocab_policy_base_keeps_the_base_rows(tmp_path):
    dirs = write_models(tmp_path / "a", 2)
    bigger = write_models(tmp_path / "b", 2, vocab=VOCAB + 3)[1]
    base, model = open_checkpoint(dirs[0]), open_checkpoint(bigger)
    plan = streaming.plan_stream("task_arithmetic", base, [model], vocab_policy="base")
    out = {t.path: v for t, v in streaming.iter_merged(plan, base, [model])}
    want_rows = model.read("model/embed_tokens/weight")[:VOCAB]
    np.testing.assert_allclose(out["model/embed_tokens/weight"], want_rows, atol=1e-6)
    assert out["lm_head/weight"].shape == (VOCAB, HIDDEN)


def test_learned_methods_do_not_stream(checkpoints):
    with pytest.raises(mergejax.MergeError, match="does not stream"):
        streamed("adamerging", checkpoints)



def _clipping_task_arithmetic(traced):
    """Task arithmetic that clips the task vectors to [-1, 1] when one exceeds 1, the
    clipping being `speculate`'s rare branch (which notes its traces in ``traced``)."""
    @mergejax.leafwise("_clipping_ta", family="basic", paper="-", register=False)
    def kernel(ctx, base, models):
        taus = tuple(x - base for x in models)
        small = jnp.all(jnp.stack([jnp.all(jnp.abs(t) <= 1) for t in taus]))

        def clipped():
            traced.append(base.shape)
            return sum(jnp.clip(t, -1, 1) for t in taus)
        return base + mergejax.speculate(small, lambda: sum(taus), clipped)
    return kernel


def test_a_tensor_that_needs_the_rare_branch_is_merged_again_with_it(tmp_path):
    dirs = write_models(tmp_path, 3, max_shard_bytes=10**9)
    outlier = (3, 5)  # a shape no other tensor has
    for k, d in enumerate(dirs):  # a second file: 0 in the base, 5 in the models
        extra = st.save_safetensors(
            {"model.outlier": np.full(outlier, 5.0 * (k > 0), np.float32)},
            str(tmp_path / f"extra{k}"))
        os.rename(extra[0], os.path.join(d, "extra.safetensors"))
    traced = []
    method = _clipping_task_arithmetic(traced)
    out = streamed(method, dirs)
    assert traced == [outlier]  # compiled for the one tensor that needed it
    np.testing.assert_array_equal(out["model/outlier"], np.full(outlier, 2.0, np.float32))
    assert_bitwise_equal(out, _merged_in_memory(method, dirs))


def _f32_magnitudes(stored):
    base, *models = (x.astype(jnp.float32) for x in stored)
    return tuple(jnp.abs(base - x) for x in models)


def _clipped_top_fifth():
    """A per-tensor top-20% trim declaring its thresholds, whose sum of trimmed task
    vectors is clipped to [-1, 1] in `speculate`'s rare branch (the identity where every
    entry is inside: a chunk without outliers may skip it)."""
    @mergejax.leafwise("_clipped_top_fifth", family="sparse", paper="-", register=False,
                       tensor_thresholds=lambda hp: mergejax.TensorThresholds(
                           lambda size: (size // 5,), _f32_magnitudes))
    def kernel(ctx, base, models):
        thresholds = ctx.thresholds
        if thresholds is None:
            thresholds = stages.select_thresholds((base, *models), (base.size // 5,),
                                                  _f32_magnitudes)
        total = sum(jnp.where(jnp.abs(x - base) >= thresholds[0, k], x - base, 0.0)
                    for k, x in enumerate(models))
        return base + mergejax.speculate(jnp.all(jnp.abs(total) <= 1), lambda: total,
                                         lambda: jnp.clip(total, -1, 1))
    return kernel


def test_a_chunk_that_needs_the_rare_branch_is_merged_again_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "CHUNK", 1 << 16)
    rng = np.random.default_rng(4)
    base = rng.standard_normal((700, 1000)).astype(np.float32)
    dirs = []
    for k in range(3):
        tau = np.zeros_like(base) if k == 0 else 0.1 * rng.standard_normal(base.shape)
        if k:
            tau[-1, -1] = 5.0  # in the last chunk only
        d = str(tmp_path / f"m{k}")
        st.save_safetensors({"w": (base + tau).astype(np.float32)}, d)
        dirs.append(d)
    method = _clipped_top_fifth()
    out = streamed(method, dirs)
    assert out["w"][-1, -1] == np.float32(base[-1, -1] + np.float32(1.0))
    assert_bitwise_equal(out, _merged_in_memory(method, dirs))


@pytest.mark.parametrize("adversarial", [False, True])
def test_per_tensor_ties_on_a_window_missing_layout(tmp_path, adversarial, monkeypatch):
    """Per-tensor top-k over > 2**18 entries streams chunk by chunk: the sampled window,
    and, for a layout that misleads the sample, the exact radix passes; never the
    tensor's own selection. Both equal the in-memory merge."""
    monkeypatch.setattr(stages, "CHUNK", 1 << 17)  # 5 chunks, the last one padded
    shape, n = (1024, 520), 1024 * 520
    stride = stages.sample_stride(n)
    rng = np.random.default_rng(3)
    base = rng.standard_normal(shape).astype(np.float32)
    dirs = []
    for k in range(3):
        tau = np.zeros(shape, np.float32) if k == 0 else rng.standard_normal(shape)
        if adversarial and k:
            tau.reshape(-1)[::stride] = 1e-3  # all the strided sample sees: below the rank
        d = str(tmp_path / f"m{k}")
        st.save_safetensors({"w": (base + tau).astype(np.float32)}, d)
        dirs.append(d)
    calls = {name: spy(monkeypatch, stages, name)
             for name in ("select_thresholds", "_chunk_window", "_chunk_low")}
    out = streamed("ties", dirs, density=0.2, scope="tensor", topk="mergekit")
    monkeypatch.undo()
    assert not calls["select_thresholds"]
    assert len(calls["_chunk_window"]) == 5
    assert len(calls["_chunk_low"]) == (5 if adversarial else 0)
    assert_bitwise_equal(out, in_memory("ties", dirs, density=0.2, scope="tensor",
                                        topk="mergekit"))


@pytest.mark.parametrize("method,hparams,dtype", [
    ("ties", {"scope": "tensor", "topk": "mergekit", "density": 0.3}, ml_dtypes.bfloat16),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, np.float32),
])
def test_chunked_kernels_compile_once_for_every_size(tmp_path, monkeypatch, method,
                                                     hparams, dtype):
    """Tensors of two sizes over 2**18 entries (and a small one, merged by its own
    kernel): one compiled window pass and one compiled chunk kernel serve them all, and the
    merge equals the in-memory one bit for bit (bfloat16 through the refined window;
    Breadcrumbs' two ranks)."""
    monkeypatch.setattr(stages, "CHUNK", 1 << 16)
    rng = np.random.default_rng(5)
    shapes = {"a": (640, 503), "b": (1024, 300), "norm": (64,)}
    values = {n: rng.normal(0, 1.0, s) for n, s in shapes.items()}
    # bfloat16 fine-tunes an ulp or two away from the base: few distinct magnitudes, so
    # the sampled window is a wide one in shifted bins, refined by a second pass.
    step = 0.01 if dtype == ml_dtypes.bfloat16 else 0.3
    dirs = []
    for k in range(4):
        d = str(tmp_path / f"m{k}")
        st.save_safetensors({n: (v + (step * rng.normal(size=v.shape) if k else 0)).astype(dtype)
                             for n, v in values.items()}, d)
        dirs.append(d)
    stages._chunk_window.clear_cache()  # pylint: disable=protected-access (counting compiles)
    method_lib._merge_leaf.clear_cache()  # pylint: disable=protected-access
    out = streamed(method, dirs, **hparams)
    windows = 2 if dtype == ml_dtypes.bfloat16 else 1  # the refinement's narrower pass
    assert stages._chunk_window._cache_size() == windows  # pylint: disable=protected-access
    assert method_lib._merge_leaf._cache_size() == 2  # the chunks' kernel and the norm's
    assert_bitwise_equal(out, in_memory(method, dirs, **hparams))
