"""Tests of mergejax.io.mergekit: mergekit YAML configs parse to the merge mergekit runs.

Expected merges come from NumPy re-implementations, in this file, of mergekit's formulas
(generalized_task_arithmetic.py, sparsify.py, linear.py, slerp.py, model_stock.py) and of
its parameter resolution (config.evaluate_setting, plan.py: a layer's t is
``i / (n_layers - 1)``, tensors outside the layers have t = 0), applied to dotted tensor
names as mergekit sees them.
"""

from __future__ import annotations

import re
import textwrap

import jax
import numpy as np
import pytest
import yaml

import mergejax
from mergejax import LayerGradient, MergeError, PathRules
from mergejax.io.mergekit import MERGEKIT_METHODS, MergeConfig, load_config, parse_config

N_LAYERS = 4
ATOL = 1e-5


# ---------------------------------------------------------------------------------------
# Synthetic Llama-shaped checkpoints.


def _layer(rng: np.random.Generator) -> dict:
    w = lambda *shape: {"weight": rng.normal(size=shape).astype(np.float32)}
    return {"self_attn": {"q_proj": w(8, 8), "k_proj": w(8, 8)},
            "mlp": {"gate_proj": w(16, 8), "down_proj": w(8, 16)},
            "input_layernorm": w(8)}


def llama(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"model": {"embed_tokens": {"weight": rng.normal(size=(32, 8)).astype(np.float32)},
                      "layers": {str(i): _layer(rng) for i in range(N_LAYERS)},
                      "norm": {"weight": rng.normal(size=(8,)).astype(np.float32)}},
            "lm_head": {"weight": rng.normal(size=(32, 8)).astype(np.float32)}}


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Leaves by mergekit tensor name (dotted), as float64."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flat(v, name))
        else:
            out[name] = np.asarray(v, np.float64)
    return out


def unflat(values: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, v in values.items():
        *parents, last = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = np.asarray(v, np.float32)
    return tree


def finetune(base: dict, seed: int, scale: float = 0.1) -> dict:
    rng = np.random.default_rng(seed)
    return unflat({n: v + scale * rng.normal(size=v.shape) for n, v in flat(base).items()})


@pytest.fixture(scope="module")
def trees() -> dict[str, dict]:
    base = llama(0)
    return {"base": base, "a": finetune(base, 1), "b": finetune(base, 2),
            "c": finetune(base, 3), "d": finetune(base, 4, scale=0.3)}


def run(cfg: MergeConfig, trees: dict[str, dict]) -> dict[str, np.ndarray]:
    uses_key = mergejax.get_method(cfg.method).uses_key
    extra = {"key": jax.random.key(cfg.seed or 0)} if uses_key else {}
    merged = mergejax.merge(cfg.method, trees[cfg.base] if cfg.base else None,
                            [trees[m] for m in cfg.models], **cfg.hparams, **extra)
    return flat(jax.device_get(merged))


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=ATOL, err_msg=name)


def cfg_of(text: str) -> MergeConfig:
    return parse_config(yaml.safe_load(textwrap.dedent(text)))


# ---------------------------------------------------------------------------------------
# mergekit's parameter resolution and formulas, re-implemented.


def mk_t(name: str) -> float:
    """plan.py: t = i / (n - 1) in layer i, 0 for the embeddings, final norm and head."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) / (N_LAYERS - 1) if match else 0.0


def mk_evaluate(name: str, setting, t: float):
    """config.evaluate_setting: filters are substrings of the tensor name."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return mk_evaluate(name, cond["value"], t)
    return None


def mk_param(pname: str, name: str, *scopes, default=None):
    """parameter_resolver.resolve_parameter: the first scope with a non-None value."""
    for scope in scopes:
        if scope and pname in scope:
            value = mk_evaluate(name, scope[pname], mk_t(name))
            if value is not None:
                return value
    assert default is not None, f"missing {pname} for {name}"
    return default


def mk_rescaled(tensor, mask, rescale: bool):
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = np.abs(tensor).sum(), np.abs(masked).sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def mk_magnitude(tensor, density, rescale):
    if density >= 1:
        return tensor
    k = max(1, int(density * tensor.size))
    mask = np.zeros(tensor.size)
    mask[np.argsort(-np.abs(tensor).ravel(), kind="stable")[:k]] = 1
    return mk_rescaled(tensor, mask.reshape(tensor.shape), rescale)


def mk_outliers(tensor, density, gamma, rescale):
    if density >= 1:
        return tensor
    n = tensor.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = np.zeros(n)
    mask[np.argsort(np.abs(tensor).ravel(), kind="stable")[bottom:bottom + target]] = 1
    return mk_rescaled(tensor, mask.reshape(tensor.shape), rescale)


def mk_gta(data: dict, trees: dict[str, dict], *, sparsify: str | None, consensus: bool,
           normalize: bool, rescale: bool) -> dict[str, np.ndarray]:
    """generalized_task_arithmetic.py for every tensor."""
    top = data.get("parameters") or {}
    normalize = top.get("normalize", normalize)
    rescale = top.get("rescale", rescale)
    lam = top.get("lambda", 1.0)
    base_name = data["base_model"]
    others = [e for e in data["models"] if e["model"] != base_name]
    base_flat = flat(trees[base_name])
    out = {}
    for name, base in base_flat.items():
        deltas, weights = [], []
        for entry in others:
            p = entry.get("parameters") or {}
            delta = flat(trees[entry["model"]])[name] - base
            density = mk_param("density", name, p, top, default=1.0)
            if sparsify == "magnitude":
                delta = mk_magnitude(delta, density, rescale)
            elif sparsify == "outliers":
                gamma = mk_param("gamma", name, p, top, default=0.01)
                delta = mk_outliers(delta, density, gamma, rescale)
            w = mk_param("weight", name, p, top)
            deltas.append(w * delta)
            weights.append(w)
        deltas = np.stack(deltas)
        w = np.asarray(weights).reshape((-1,) + (1,) * base.ndim)
        if consensus:
            majority = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
            mask = np.sign(deltas) == majority
            mixed = (deltas * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(0)
            divisor = w.sum()
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        if normalize:
            mixed = mixed / divisor
        out[name] = base + lam * mixed
    return out


def mk_slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
    a, b = v0.ravel(), v1.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = np.clip(np.sum((a / na) * (b / nb)), -1, 1)
    if abs(dot) > threshold:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def mk_model_stock(w0, ws):
    offsets = [(w - w0).ravel() for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j])
            cos.append(np.clip(offsets[i] @ offsets[j] / max(norm, 1e-6), -1, 1))
    c, n = np.mean(cos), len(ws)
    denominator = 1 + (n - 1) * c
    t = 0.0 if abs(denominator) < 1e-6 else n * c / denominator
    return t * sum(ws) / n + (1 - t) * w0


# ---------------------------------------------------------------------------------------
# Parsing.

LINEAR = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

TIES = """
models:
  - model: base
    # no parameters necessary for base model
  - model: a
    parameters:
      density: 0.5
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: c
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""

SLERP = """
models:
  - model: base
  - model: d
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""


def test_parse_linear_has_no_base_and_averages_every_listed_model():
    cfg = cfg_of(LINEAR)
    assert cfg == MergeConfig(
        method="linear", base=None,
        models=("psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2",
                "garage-bAInd/Platypus2-13B"),
        hparams={"weights": [1.0, 0.3, 0.5]}, out_dtype="float16", seed=None,
        tokenizer_source=None, options={}, source="mergekit")


def test_parse_linear_adds_an_unlisted_base_model_as_one_more_input():
    cfg = cfg_of("""
        models:
          - model: a
          - model: b
            parameters: {weight: 2}
        base_model: base
        merge_method: linear
        parameters: {weight: 0.5, normalize: false}
    """)
    assert (cfg.method, cfg.base, cfg.models) == ("linear", None, ("a", "b", "base"))
    assert cfg.hparams == {"weights": [0.5, 2.0, 0.5], "normalize": False}


def test_parse_task_arithmetic():
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
            parameters: {weight: 0.6}
          - model: b
            parameters: {weight: 0.4}
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 0.8, normalize: true}
        tokenizer_source: base
    """)
    assert (cfg.method, cfg.base, cfg.models) == ("task_arithmetic", "base", ("a", "b"))
    assert cfg.hparams == {"weights": [0.6, 0.4], "scale": 0.8, "normalize": True}
    assert cfg.tokenizer_source == "base"


def test_parse_ties_sets_mergekit_switches_and_leaves_the_base_out():
    cfg = cfg_of(TIES)
    assert (cfg.method, cfg.base, cfg.models) == ("ties", "base", ("a", "b", "c"))
    assert cfg.hparams == {
        "weights": [1.0, LayerGradient([0.0, 0.3, 0.7, 1.0]),
                    PathRules([("mlp", 0.5)], default=0.0)],
        "density": 0.5, "scope": "tensor", "topk": "mergekit"}
    assert cfg.out_dtype == "bfloat16"


def test_parse_dare_ties_rescales_by_l1_and_takes_the_seed():
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
            parameters: {density: 0.53, weight: 0.4}
          - model: b
            parameters: {density: 0.53, weight: 0.6}
        merge_method: dare_ties
        base_model: base
        random_seed: 7
        out_dtype: float32
        dtype: bfloat16
    """)
    assert (cfg.method, cfg.base, cfg.models, cfg.seed) == ("dare_ties", "base", ("a", "b"), 7)
    assert cfg.hparams == {"weights": [0.4, 0.6], "density": 0.53, "rescale": "l1"}
    assert cfg.out_dtype == "float32"


def test_parse_breadcrumbs():
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
            parameters: {weight: 1.0}
          - model: b
            parameters: {weight: 0.5}
        merge_method: breadcrumbs
        base_model: base
        parameters: {density: 0.8, gamma: 0.05}
    """)
    assert (cfg.method, cfg.base, cfg.models) == ("breadcrumbs", "base", ("a", "b"))
    assert cfg.hparams == {"weights": [1.0, 0.5], "density": 0.8, "gamma": 0.05}


def test_parse_slerp_with_filters_and_gradients():
    cfg = cfg_of(SLERP)
    assert (cfg.method, cfg.base, cfg.models) == ("slerp", "base", ("d",))
    assert cfg.hparams == {"t": PathRules(
        [("self_attn", LayerGradient([0.0, 0.5, 0.3, 0.7, 1.0])),
         ("mlp", LayerGradient([1.0, 0.5, 0.7, 0.3, 0.0]))], default=0.5)}


def test_parse_model_stock():
    cfg = cfg_of("""
        models:
          - model: a
          - model: b
          - model: c
        merge_method: model_stock
        base_model: base
        dtype: bfloat16
    """)
    assert (cfg.method, cfg.base, cfg.models, cfg.hparams) == (
        "model_stock", "base", ("a", "b", "c"), {})


def test_parse_falls_back_to_sparse_merge_for_settings_a_preset_lacks():
    cfg = cfg_of("""
        models: [{model: a, parameters: {weight: 1}}]
        base_model: base
        merge_method: ties
        parameters: {rescale: true, density: 0.5}
    """)
    assert cfg.method == "sparse_merge"
    assert cfg.hparams == {"weights": [1.0], "density": 0.5, "rescale": "l1", "elect": "mass"}


def test_load_config_resolves_paths_against_the_file(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "merge.yaml").write_text(textwrap.dedent("""
        models:
          - model: ../models/a
            parameters: {weight: 1.0}
        merge_method: task_arithmetic
        base_model: /abs/base
        tokenizer_source: ../models/a
        options: {out_shard_size: 500M, vocab_policy: base}
    """))
    cfg = load_config(str(sub / "merge.yaml"))
    assert cfg.base == "/abs/base"
    assert cfg.models == (str(tmp_path / "models" / "a"),)
    assert cfg.tokenizer_source == str(tmp_path / "models" / "a")
    assert cfg.options == {"out_shard_size": 500_000_000, "vocab_policy": "base"}


def test_parse_native_form():
    cfg = parse_config({
        "method": "ties", "base": "base", "models": ["a", "b"], "seed": 3,
        "hparams": {"weights": [1.0, {"gradient": [0.0, 1.0]}],
                    "density": {"rules": [["mlp", 0.3]], "default": 0.5}, "scope": "tensor"},
        "out_dtype": "bfloat16", "tokenizer_source": "base",
        "options": {"out_shard_size": "5B"}}, config_dir="/ckpt")
    assert cfg == MergeConfig(
        method="ties", base="/ckpt/base", models=("/ckpt/a", "/ckpt/b"),
        hparams={"weights": [1.0, LayerGradient([0.0, 1.0])],
                 "density": PathRules([("mlp", 0.3)], default=0.5), "scope": "tensor"},
        out_dtype="bfloat16", seed=3, tokenizer_source="/ckpt/base",
        options={"out_shard_size": 5_000_000_000}, source="native")


# ---------------------------------------------------------------------------------------
# Merges against mergekit's formulas.


def test_linear_matches_mergekit(trees):
    data = yaml.safe_load(textwrap.dedent("""
        models:
          - model: a
            parameters:
              weight: [{filter: self_attn, value: 0.2}, {value: 0.8}]
          - model: b
            parameters: {weight: [1.0, 3.0]}
        base_model: base
        merge_method: linear
        parameters: {weight: 0.5}
    """))
    cfg = parse_config(data)
    want = {}
    for name in flat(trees["base"]):
        inputs = [("a", data["models"][0]["parameters"]), ("b", data["models"][1]["parameters"]),
                  ("base", {})]
        ws = [mk_param("weight", name, p, data["parameters"]) for _, p in inputs]
        xs = [flat(trees[m])[name] for m, _ in inputs]
        want[name] = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
    assert_close(run(cfg, trees), want)


def test_task_arithmetic_matches_mergekit(trees):
    data = yaml.safe_load(textwrap.dedent("""
        models:
          - model: base
          - model: a
            parameters: {weight: 0.7}
          - model: b
            parameters: {weight: [0.2, 0.9]}
          - model: c
            parameters: {weight: -0.3}
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 0.6}
    """))
    want = mk_gta(data, trees, sparsify=None, consensus=False, normalize=False, rescale=False)
    assert_close(run(parse_config(data), trees), want)


def test_ties_matches_mergekit(trees):
    data = yaml.safe_load(TIES)
    data["parameters"]["lambda"] = 0.9
    want = mk_gta(data, trees, sparsify="magnitude", consensus=True, normalize=True,
                  rescale=False)
    assert_close(run(parse_config(data), trees), want)


def test_ties_with_rescale_matches_mergekit(trees):
    data = yaml.safe_load(TIES)
    data["parameters"].update(rescale=True, normalize=False)
    want = mk_gta(data, trees, sparsify="magnitude", consensus=True, normalize=False,
                  rescale=True)
    assert_close(run(parse_config(data), trees), want)


def test_breadcrumbs_matches_mergekit(trees):
    data = yaml.safe_load(textwrap.dedent("""
        models:
          - model: base
          - model: a
            parameters: {weight: 1.0, density: 0.8, gamma: 0.1}
          - model: b
            parameters: {weight: 0.5, density: 0.8, gamma: 0.1}
        merge_method: breadcrumbs
        base_model: base
        parameters: {lambda: 1.2}
    """))
    want = mk_gta(data, trees, sparsify="outliers", consensus=False, normalize=False,
                  rescale=False)
    assert_close(run(parse_config(data), trees), want)


def test_slerp_matches_mergekit_with_gradients_filters_and_the_colinear_fallback(trees):
    other = flat(trees["d"])
    base_flat = flat(trees["base"])
    colinear = "model.layers.1.input_layernorm.weight"
    other[colinear] = 2.0 * base_flat[colinear]
    local = {"base": trees["base"], "d": unflat(other)}
    data = yaml.safe_load(SLERP)
    want = {name: mk_slerp(mk_param("t", name, data["parameters"]), v, other[name])
            for name, v in base_flat.items()}
    got = run(parse_config(data), local)
    assert_close(got, want)
    np.testing.assert_allclose(got[colinear], base_flat[colinear] * (1 + 0.5), atol=ATOL)


def test_model_stock_matches_mergekit(trees):
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
          - model: b
          - model: d
        merge_method: model_stock
        base_model: base
    """)
    want = {name: mk_model_stock(w0, [flat(trees[m])[name] for m in ("a", "b", "d")])
            for name, w0 in flat(trees["base"]).items()}
    assert_close(run(cfg, trees), want)


def test_dare_ties_at_density_one_is_mergekit_sign_consensus(trees):
    data = yaml.safe_load(textwrap.dedent("""
        models:
          - model: base
          - model: a
            parameters: {weight: 1.0, density: 1.0}
          - model: b
            parameters: {weight: 0.6, density: 1.0}
          - model: c
            parameters: {weight: 0.3, density: 1.0}
        merge_method: dare_ties
        base_model: base
        parameters: {lambda: 0.8}
        random_seed: 0
    """))
    want = mk_gta(data, trees, sparsify=None, consensus=True, normalize=False, rescale=True)
    assert_close(run(parse_config(data), trees), want)


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_ties_drops_about_half_and_rescales_as_mergekit(rescale):
    base = llama(0)
    rng = np.random.default_rng(5)
    taus = {n: rng.choice([-1.0, 1.0], size=v.shape) * (0.05 + np.abs(rng.normal(size=v.shape)))
            for n, v in flat(base).items()}
    ft = unflat({n: v + taus[n] for n, v in flat(base).items()})
    cfg = cfg_of(f"""
        models:
          - model: ft
            parameters: {{weight: 1.0, density: 0.5}}
        merge_method: dare_ties
        base_model: base
        parameters: {{rescale: {str(rescale).lower()}}}
        random_seed: 11
    """)
    got = run(cfg, {"base": base, "ft": ft})
    kept = total = 0
    for name, b in flat(base).items():
        tau = flat(ft)[name] - b  # the task vector as float32 stores it
        mask = np.abs(got[name] - b) > 1e-3
        kept, total = kept + mask.sum(), total + mask.size
        factor = np.abs(tau).sum() / np.abs(tau * mask).sum() if rescale else 1.0
        np.testing.assert_allclose(got[name], b + tau * mask * factor, atol=ATOL, rtol=ATOL,
                                   err_msg=name)
    assert abs(kept / total - 0.5) < 0.05


def test_filtered_weight_gives_attention_and_other_tensors_their_values(trees):
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
            parameters:
              weight: [{filter: self_attn, value: 0.2}, {value: 0.8}]
        merge_method: task_arithmetic
        base_model: base
    """)
    got, base, ft = run(cfg, trees), flat(trees["base"]), flat(trees["a"])
    for name in base:
        w = 0.2 if ".self_attn." in name else 0.8
        np.testing.assert_allclose(got[name], base[name] + w * (ft[name] - base[name]),
                                   atol=ATOL, err_msg=name)


def test_unmatched_model_filters_fall_back_to_top_level_parameters(trees):
    data = yaml.safe_load(textwrap.dedent("""
        models:
          - model: base
          - model: a
            parameters:
              weight: [{filter: mlp, value: 0.3}]
          - model: b
        merge_method: task_arithmetic
        base_model: base
        parameters:
          weight: [{filter: layers.2., value: 0.6}, {filter: "*", value: 0.9}]
    """))
    cfg = parse_config(data)
    assert cfg.hparams["weights"][1] == PathRules([("layers/2/", 0.6)], default=0.9)
    want = mk_gta(data, trees, sparsify=None, consensus=False, normalize=False, rescale=False)
    got = run(cfg, trees)
    assert_close(got, want)
    # the reference itself: layer 2's attention takes 0.6 for both models
    name = "model.layers.2.self_attn.q_proj.weight"
    base, fa, fb = (flat(trees[m])[name] for m in ("base", "a", "b"))
    np.testing.assert_allclose(got[name], base + 0.6 * (fa - base) + 0.6 * (fb - base),
                               atol=ATOL)


def test_gradient_interpolates_over_layers_as_mergekit(trees):
    cfg = cfg_of("""
        models:
          - model: base
          - model: a
            parameters: {weight: [0, 0.5, 1]}
        merge_method: task_arithmetic
        base_model: base
    """)
    # 4 layers: t = 0, 1/3, 2/3, 1 -> position 2t among the anchors [0, 0.5, 1];
    # the embeddings, final norm and head take t = 0, the first anchor.
    expected = {0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0}
    got, base, ft = run(cfg, trees), flat(trees["base"]), flat(trees["a"])
    for name in base:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        w = expected[int(match.group(1))] if match else 0.0
        np.testing.assert_allclose(got[name], base[name] + w * (ft[name] - base[name]),
                                   atol=ATOL, err_msg=name)


# ---------------------------------------------------------------------------------------
# Errors.


def test_unknown_merge_method_lists_the_supported_ones():
    with pytest.raises(MergeError, match=r"passthrough.*not supported.*'ties'"):
        cfg_of("{merge_method: passthrough, models: [{model: a}]}")
    with pytest.raises(MergeError, match=r"'frankenmerge' is not supported.*'slerp'"):
        cfg_of("{merge_method: frankenmerge, models: [{model: a}]}")


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(MergeError, match=r"'densty'.*valid parameters are.*'density'"):
        cfg_of("""
            models: [{model: a, parameters: {weight: 1, densty: 0.5}}]
            merge_method: ties
            base_model: base
        """)
    with pytest.raises(MergeError, match=r"'weight'.*slerp"):
        cfg_of("""
            models: [{model: a}]
            merge_method: slerp
            base_model: base
            parameters: {t: 0.5, weight: 1}
        """)


def test_one_per_merge_parameter_in_a_model_is_refused():
    with pytest.raises(MergeError, match=r"'lambda'.*top-level"):
        cfg_of("""
            models: [{model: a, parameters: {weight: 1, lambda: 0.5}}]
            merge_method: task_arithmetic
            base_model: base
        """)


def test_missing_required_weight_is_refused():
    with pytest.raises(MergeError, match=r"needs parameter 'weight'"):
        cfg_of("""
            models: [{model: base}, {model: a, parameters: {weight: 1}}, {model: b}]
            merge_method: ties
            base_model: base
        """)


def test_slices_form_is_refused():
    with pytest.raises(MergeError, match=r"slices.*use models:"):
        cfg_of("""
            slices:
              - sources:
                  - {model: a, layer_range: [0, 32]}
                  - {model: b, layer_range: [0, 32]}
            merge_method: slerp
            base_model: a
            parameters: {t: 0.5}
        """)


def test_per_model_density_must_agree_where_mergejax_takes_one():
    with pytest.raises(MergeError, match=r"'density' per model.*disagree.*0.7.*0.5"):
        cfg_of("""
            models:
              - model: a
                parameters: {weight: 1, density: [1, 0.7, 0.1]}
              - model: b
                parameters: {weight: 1, density: 0.5}
            merge_method: ties
            base_model: base
        """)


def test_unsupported_tokenizer_settings_are_refused():
    with pytest.raises(MergeError, match="union"):
        cfg_of("""
            models: [{model: a, parameters: {weight: 1}}]
            merge_method: linear
            tokenizer_source: union
        """)
    with pytest.raises(MergeError, match="tokenizer: block"):
        cfg_of("""
            models: [{model: a, parameters: {weight: 1}}]
            merge_method: linear
            tokenizer: {source: base}
        """)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: ties\nmodels: [\n  - model: a\n")
    with pytest.raises(MergeError, match=re.escape(str(path))):
        load_config(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(MergeError, match=re.escape(str(path)) + ".*mapping"):
        load_config(str(path))


def test_native_unknown_key_method_and_hyperparameter():
    with pytest.raises(MergeError, match=r"unknown key\(s\) \['weights'\].*'hparams'"):
        parse_config({"method": "linear", "models": ["a"], "weights": [1]})
    with pytest.raises(MergeError, match=r"unknown merge method 'tie'"):
        parse_config({"method": "tie", "base": "b", "models": ["a"]})
    with pytest.raises(MergeError, match=r"unknown hyperparameter.*'lambda'.*'scale'"):
        parse_config({"method": "ties", "base": "b", "models": ["a"],
                      "hparams": {"lambda": 0.5}})


SMOKE = {
    "nearswap": "{t: 1e-4}",
    "multislerp": "{weight: 1.0}",
    "karcher": "{max_iter: 5}",
    "sce": "{select_topk: 0.5}",
    "dare_linear": "{weight: 0.5, density: 0.7}",
    "breadcrumbs_ties": "{weight: 0.5, density: 0.9, gamma: 0.02, normalize: true}",
    "della": "{weight: 0.5, density: 0.6, epsilon: 0.1}",
    "della_linear": "{weight: 0.5, density: 0.6, epsilon: 0.1}",
}


@pytest.mark.parametrize("method", sorted(SMOKE))
def test_every_other_supported_method_parses_and_runs(method):
    rng = np.random.default_rng(0)
    small = {"model": {"layers": {"0": {"mlp": {"weight": rng.normal(size=(4, 4))}}},
                       "norm": {"weight": rng.normal(size=4)}}}
    trees = {"base": unflat(flat(small)), "a": finetune(unflat(flat(small)), 1),
             "b": finetune(unflat(flat(small)), 2)}
    models = "[{model: a}]" if method == "nearswap" else "[{model: a}, {model: b}]"
    cfg = cfg_of(f"""
        models: {models}
        merge_method: {method}
        base_model: base
        parameters: {SMOKE[method]}
        random_seed: 1
    """)
    assert cfg.method == MERGEKIT_METHODS[method]
    if method == "karcher":
        assert (cfg.base, cfg.models) == (None, ("a", "b", "base"))
    else:
        assert (cfg.base, cfg.models) == ("base", ("a",) if method == "nearswap" else ("a", "b"))
    got = run(cfg, trees)
    assert all(np.all(np.isfinite(v)) for v in got.values())
