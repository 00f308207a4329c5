"""Merge configs: mergekit YAML files, or mergejax's own form, as one plan for the binary.

`load_config` reads a YAML file, `parse_config` a mapping already read; both return a
`MergeConfig` whose ``method``, ``base``, ``models`` and ``hparams`` are such that::

    mergejax.merge(cfg.method, base_tree, model_trees, **cfg.hparams)

gives what mergekit gives for the same file (up to float32 rounding, and the limits listed
below). Two forms are recognised by their keys:

**mergekit** (``merge_method:``), for the methods both libraries have (`MERGEKIT_METHODS`):
``merge_method``, ``base_model``, ``models: [{model: PATH, parameters: {...}}]``,
top-level ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base`` or a
model path), ``chat_template`` and ``name`` (both ignored: the binary copies the chat
template with the tokenizer files), and, as mergejax extensions, ``random_seed`` (mergekit
takes it on the command line, ``--random-seed``) and ``options`` (the binary's options).
``slices:``, ``modules:``, a ``tokenizer:`` block, ``tokenizer_source: union``, LoRA inputs
(``model+lora``) and hub revisions (``model@rev``) are refused with a `MergeError`.

Which models are merged is mergekit's: a ``base_model`` missing from ``models`` is added to
the inputs; methods with a base (task arithmetic and its sparse family, ``slerp``,
``nearswap``, ``model_stock``, ``sce``, ``multislerp`` with a base) merge the other inputs
against it, so the base's own entry in ``models`` contributes nothing; ``linear`` and
``karcher`` ignore the base role and average every input, the base included (their
``MergeConfig.base`` is None and the base path is in ``models``).

Parameters are resolved as mergekit does: a model's own ``parameters``, then the top-level
``parameters``, then the method's default (a missing required one, e.g. ``weight``, is an
error). A value is a number; a list of numbers, a gradient over the layer index
(`mergejax.LayerGradient`, which is mergekit's interpolation for a ``models:`` config); or
a list of ``{filter: STR, value: V}`` (`mergejax.PathRules`: the first filter that is a
substring of the tensor name wins, a missing filter or ``*`` matches every tensor, and a
tensor no filter matches falls back to the next level). Tensor names are compared in
mergejax's path form: mergekit's ``model.layers.0.mlp`` is ``model/layers/0/mlp``, so a
filter's dots become slashes. mergekit silently ignores parameters its method does not
take; here they are errors, as are one-per-merge parameters (``t``, ``lambda``,
``normalize``, ...) given in a model's ``parameters`` (mergekit ignores them there).

``dtype`` is mergekit's load and compute dtype; mergejax always computes in float32 (bf16
and f16 inputs are upcast), so ``dtype`` only supplies the default of ``out_dtype``, as in
mergekit. ``int8_mask`` only changes the dtype of mergekit's sign masks (memory), so it is
accepted and dropped.

**native** (``method:``): ``method`` (any registered name), ``base``, ``models`` (paths),
``hparams`` (plain values and lists; ``{rules: [[REGEX, VALUE], ...], default: V}`` for
`mergejax.PathRules`, ``{gradient: [...]}`` for `mergejax.LayerGradient`, nesting),
``out_dtype``, ``seed``, ``tokenizer_source`` and ``options``.

Options (both forms): ``out_shard_size`` (bytes; an int or mergekit's ``"5B"``/``"500M"``/
``"100K"``, powers of 1000) and ``vocab_policy`` (``"error"`` or ``"base"``).

How mergekit methods and parameters map (settings equal to mergejax's defaults are left
out of ``hparams``):

=================  ==================================================================
mergekit           mergejax
=================  ==================================================================
linear             ``linear``, base None, every input averaged; ``weight`` -> ``weights``
slerp, nearswap    ``slerp`` / ``nearswap`` (base, [the other model]); ``t`` -> ``t``
multislerp         ``multislerp``; ``weight`` -> ``weights``, ``normalize_weights``, ``eps``
karcher            ``karcher``, base None, every input; ``max_iter``, ``tol``
model_stock        ``model_stock`` (``filter_wise: true`` refused)
sce                ``sce``; ``select_topk`` -> ``density``
task_arithmetic    ``task_arithmetic``; ``lambda`` -> ``scale``, ``normalize``
ties, dare_*,      the preset of that name with ``scope="tensor"``, ``topk="mergekit"``;
breadcrumbs*,      ``weight`` -> ``weights``, ``lambda`` -> ``scale``, ``density``,
della*             ``gamma``, ``epsilon``; ``rescale: true`` -> ``rescale="l1"`` (mergekit
                   matches the L1 norm), false -> ``"none"``; with sign consensus
                   ``normalize: true/false`` -> ``disjoint="mean"/"sum"``, without it
                   ``normalize``. A setting the preset does not expose (e.g. ``ties`` with
                   ``rescale: true``) runs as `mergejax.sparse_merge` with all stages set.
=================  ==================================================================

Where mergejax cannot reproduce mergekit exactly:

* sparse methods take one ``density`` (``gamma``, ``epsilon``) for all models at a tensor;
  mergekit takes one per model. Per-model values are accepted when every merged model has
  the same one, else refused.
* ``della``/``della_linear`` with a per-tensor ``density`` that reaches 1 somewhere: mergejax
  checks ``density +- epsilon`` in (0, 1) at every tensor (a plain ``density >= 1`` is
  mapped to no pruning, as mergekit does).
* magnitude top-k keeps ``int(density * n)`` entries, and none where that is 0 (mergekit
  keeps at least one); ties at the threshold are all kept. Random masks (DARE, DELLA) come
  from JAX's generator, so a seed does not give mergekit's masks.
* ``tokenizer_source`` copies the tokenizer files; vocabulary rows are not permuted across
  different vocabularies (mergekit's tokenizer merge). With identical vocabularies the
  results agree.
* ``multislerp`` with more than two models whose unit vectors cancel returns the weighted
  sum where mergekit raises.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from mergejax import registry
from mergejax.rules import LayerGradient, PathRules
from mergejax.tree import MergeError

__all__ = ["MERGEKIT_METHODS", "MergeConfig", "load_config", "parse_config"]

#: mergekit ``merge_method`` names accepted, and the mergejax method each maps to. A few
#: settings need the general `mergejax.sparse_merge` instead of the preset (e.g. ``ties``
#: with ``rescale: true``); `MergeConfig.method` then says so.
MERGEKIT_METHODS: dict[str, str] = {
    "linear": "linear",
    "slerp": "slerp",
    "nearswap": "nearswap",
    "multislerp": "multislerp",
    "karcher": "karcher",
    "model_stock": "model_stock",
    "sce": "sce",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
}

# mergekit methods mergejax does not have (named in the error).
_MERGEKIT_ONLY = ("arcee_fusion", "nuslerp", "passthrough", "ram", "ramplus_tl")

_MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "chat_template", "name", "random_seed", "options",
                  "slices", "modules", "tokenizer")
_NATIVE_KEYS = ("method", "base", "models", "hparams", "out_dtype", "seed",
                "tokenizer_source", "options")
_OPTIONS = ("out_shard_size", "vocab_policy")
_OUT_DTYPES = ("bfloat16", "float16", "float32")
_MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")  # dtype_from_name

_REQUIRED = object()
_NO_DEFAULT = PathRules(()).default  # PathRules' "no default" marker


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A merge to run: ``mergejax.merge(method, base, models, **hparams)`` on the
    checkpoints at ``base`` and ``models``.

    Attributes:
      method: the mergejax registry name.
      base: the base model's path (None for methods without one, e.g. mergekit
        ``linear``); paths are resolved against the config file's directory.
      models: the paths of the merged models, in order; the base is not among them
        unless the method averages it like any other input (mergekit ``linear``,
        ``karcher``).
      hparams: mergejax hyperparameters, plain values or `mergejax.rules` forms.
      out_dtype: the output dtype name, or None for each tensor's base dtype.
      seed: the seed of a random method (``key=jax.random.key(seed)``), or None.
      tokenizer_source: the path whose tokenizer and config files are copied, or None.
      options: binary options (``out_shard_size`` in bytes, ``vocab_policy``).
      source: ``"mergekit"`` or ``"native"``, the form the config was written in.

    Example::

        cfg = load_config("ties.yaml")
        merged = mergejax.merge(cfg.method, base, models, **cfg.hparams)
    """

    method: str
    base: str | None
    models: tuple[str, ...]
    hparams: dict[str, Any]
    out_dtype: str | None
    seed: int | None
    tokenizer_source: str | None
    options: dict[str, Any]
    source: str


def load_config(path: str) -> MergeConfig:
    """Reads the YAML merge config at ``path`` (`parse_config`); model paths in it are
    relative to its directory. Errors, YAML syntax errors included, name the file.

    Example::

        cfg = mergejax.io.mergekit.load_config("configs/ties.yaml")
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise MergeError(f"cannot read merge config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise MergeError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise MergeError(f"{path}: a merge config must be a mapping at the top level, got "
                         f"{type(data).__name__}")
    try:
        return parse_config(data, config_dir=os.path.dirname(os.path.abspath(path)))
    except MergeError as e:
        raise MergeError(f"{path}: {e}") from e


def parse_config(data: Mapping[str, Any], *, config_dir: str = ".") -> MergeConfig:
    """Turns a merge config (a mergekit config if it has ``merge_method``, the native form
    if it has ``method``) into a `MergeConfig`; paths are resolved against
    ``config_dir``. Anything unknown or unsupported raises `MergeError`.

    Example::

        cfg = parse_config({"merge_method": "task_arithmetic", "base_model": "base",
                            "models": [{"model": "ft", "parameters": {"weight": 0.5}}]})
        # cfg.method == "task_arithmetic", cfg.hparams == {"weights": [0.5]}
    """
    if not isinstance(data, Mapping):
        raise MergeError(f"a merge config must be a mapping, got {type(data).__name__}")
    if "merge_method" in data and "method" in data:
        raise MergeError("give either merge_method (mergekit form) or method (native form), "
                         "not both")
    if "merge_method" in data:
        return _parse_mergekit(data, config_dir)
    if "method" in data:
        return _parse_native(data, config_dir)
    raise MergeError("a merge config needs merge_method (mergekit form) or method (native "
                     f"form); got keys {sorted(map(str, data))}")


# ---------------------------------------------------------------------------------------
# Shared pieces: paths, dtypes, options.


def _path(value: Any, config_dir: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MergeError(f"{where} must be a path, got {value!r}")
    return os.path.normpath(os.path.join(config_dir, os.path.expanduser(value)))


def _model_path(value: Any, config_dir: str, where: str) -> str:
    """A mergekit model reference: a local path (no LoRA, no hub revision)."""
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"model", "lora", "override_architecture"})
        if extra or value.get("lora") is not None:
            raise MergeError(f"{where}: only a model path is supported, got {dict(value)!r}")
        value = value.get("model")
        if isinstance(value, Mapping):
            if value.get("revision") is not None or set(value) - {"path", "revision"}:
                raise MergeError(f"{where}: hub revisions are not supported; give a local "
                                 f"path, got {dict(value)!r}")
            value = value.get("path")
    if isinstance(value, str) and "+" in value:
        raise MergeError(f"{where}: LoRA inputs ('model+lora', {value!r}) are not "
                         "supported; merge the adapter into its model first")
    if isinstance(value, str) and "@" in value:
        raise MergeError(f"{where}: hub revisions ('model@revision', {value!r}) are not "
                         "supported; give the path of a local checkpoint")
    return _path(value, config_dir, where)


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = value
    if isinstance(value, str) and value.startswith("torch."):
        name = value[len("torch."):]
    if name not in _OUT_DTYPES:
        raise MergeError(f"{where} must be one of {list(_OUT_DTYPES)}, got {value!r}")
    return name


def _seed(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeError(f"{where} must be an integer, got {value!r}")
    return value


def _shard_size(value: Any) -> int:
    """Bytes, from an int or mergekit's ``parse_kmb`` strings (K, M, B: powers of 1000)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip()
        scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
        digits = text[:-1] if scale != 1 else text
        if digits.isdigit() and int(digits) > 0:
            return int(digits) * scale
    raise MergeError(f"options.out_shard_size must be a positive number of bytes, e.g. "
                     f"1000000000 or '5B' / '500M' / '100K'; got {value!r}")


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergeError(f"options must be a mapping, got {value!r}")
    unknown = sorted(set(map(str, value)) - set(_OPTIONS))
    if unknown:
        raise MergeError(f"unknown option(s) {unknown}; valid options are {list(_OPTIONS)}")
    out: dict[str, Any] = {}
    if value.get("out_shard_size") is not None:
        out["out_shard_size"] = _shard_size(value["out_shard_size"])
    if value.get("vocab_policy") is not None:
        if value["vocab_policy"] not in ("error", "base"):
            raise MergeError(f"options.vocab_policy must be 'error' or 'base', got "
                             f"{value['vocab_policy']!r}")
        out["vocab_policy"] = value["vocab_policy"]
    return out


def _tokenizer_source(value: Any, base: str | None, config_dir: str) -> str | None:
    if value is None:
        return None
    if value == "union":
        raise MergeError("tokenizer_source: union is not supported (mergejax does not build "
                         "merged vocabularies); use base or a model path")
    if value == "base":
        if base is None:
            raise MergeError("tokenizer_source: base needs a base model")
        return base
    return _model_path(value, config_dir, "tokenizer_source")


# ---------------------------------------------------------------------------------------
# The native form.


def _native_value(value: Any, where: str) -> Any:
    """A native hyperparameter value: rules and gradient mappings become `PathRules` and
    `LayerGradient`, lists are converted element by element."""
    if isinstance(value, Mapping):
        keys = set(value)
        if "rules" in keys and keys <= {"rules", "default"}:
            rules = value["rules"]
            if not isinstance(rules, Sequence) or isinstance(rules, str) or not all(
                    isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2
                    and isinstance(r[0], str) for r in rules):
                raise MergeError(f"{where}: rules must be a list of [REGEX, VALUE] pairs, "
                                 f"got {rules!r}")
            converted = [(r[0], _native_value(r[1], where)) for r in rules]
            if "default" in keys:
                return PathRules(converted, default=_native_value(value["default"], where))
            return PathRules(converted)
        if "gradient" in keys and keys <= {"gradient", "outside"}:
            anchors = value["gradient"]
            if not isinstance(anchors, Sequence) or isinstance(anchors, str) or not anchors \
                    or not all(_is_number(a) for a in anchors):
                raise MergeError(f"{where}: gradient must be a non-empty list of numbers, "
                                 f"got {anchors!r}")
            if "outside" in keys:
                return LayerGradient(list(anchors), outside=value["outside"])
            return LayerGradient(list(anchors))
        raise MergeError(f"{where}: a mapping value must be {{rules: [[REGEX, VALUE], ...], "
                         f"default: V}} or {{gradient: [...]}}, got keys {sorted(keys)}")
    if isinstance(value, (list, tuple)):
        return [_native_value(v, where) for v in value]
    return value


def _parse_native(data: Mapping[str, Any], config_dir: str) -> MergeConfig:
    unknown = sorted(set(map(str, data)) - set(_NATIVE_KEYS))
    if unknown:
        raise MergeError(f"unknown key(s) {unknown} in a native merge config; valid keys "
                         f"are {list(_NATIVE_KEYS)}")
    name = data["method"]
    if not isinstance(name, str):
        raise MergeError(f"method must be a method name, got {name!r}")
    method = registry.get_method(name)
    base = None if data.get("base") is None else _path(data["base"], config_dir, "base")
    models = data.get("models")
    if not isinstance(models, Sequence) or isinstance(models, str) or not models:
        raise MergeError(f"models must be a non-empty list of paths, got {models!r}")
    paths = tuple(_path(m, config_dir, f"models[{k}]") for k, m in enumerate(models))
    if method.needs_base and base is None:
        raise MergeError(f"{name} needs a base model: give base")
    hparams = data.get("hparams") or {}
    if not isinstance(hparams, Mapping):
        raise MergeError(f"hparams must be a mapping, got {hparams!r}")
    bad = sorted(set(map(str, hparams)) - set(method.hparams))
    if bad:
        raise MergeError(f"{name} got unknown hyperparameter(s) {bad}; valid ones are "
                         f"{sorted(method.hparams)}")
    return MergeConfig(
        method=name, base=base, models=paths,
        hparams={k: _native_value(v, f"hparams.{k}") for k, v in hparams.items()},
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        seed=_seed(data.get("seed"), "seed"),
        tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), base, config_dir),
        options=_options(data.get("options")), source="native")


# ---------------------------------------------------------------------------------------
# mergekit parameter values -> mergejax per-leaf forms.


@dataclasses.dataclass(frozen=True)
class _Param:
    """A mergekit parameter: value kind, default (`_REQUIRED` if none) and scope:
    ``"shared"`` (one per merge), ``"input"`` (per input, the base included) or
    ``"non_base"`` (per input but the base)."""

    kind: str
    default: Any
    scope: str = "shared"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar(value: Any, kind: str, where: str) -> Any:
    """A scalar validated as mergekit's pydantic does (YAML reads ``1e-4`` as a string,
    which mergekit accepts for a float)."""
    if kind == "float":
        if _is_number(value) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no",
                                                         "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    raise MergeError(f"{where} must be a {kind}, got {value!r}")


def _filter_regex(text: str) -> str:
    """mergekit's ``filter in tensor_name`` as a regex over `/`-joined paths."""
    return re.escape(text.replace(".", "/"))


def _value_form(value: Any, kind: str, where: str) -> Any:
    """A scalar, or a list of scalars (a layer gradient)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeError(f"{where}: an empty list is not a value")
        if kind != "float":
            raise MergeError(f"{where}: a gradient (list of values) is supported for "
                             f"numeric parameters only, got {value!r}")
        anchors = [_scalar(v, kind, where) for v in value]
        return anchors[0] if len(anchors) == 1 else LayerGradient(anchors)
    return _scalar(value, kind, where)


def _setting_form(setting: Any, kind: str, where: str, fallback: Any) -> Any:
    """The per-leaf form of a mergekit parameter setting; ``fallback`` is what a tensor
    that no filter matches takes (the next level: top-level parameters, then the
    default), `_NO_DEFAULT` if nothing."""
    conditions: list[Any] | None = None
    if isinstance(setting, Mapping):
        conditions = [setting]
    elif isinstance(setting, (list, tuple)) and setting and all(
            isinstance(c, Mapping) for c in setting):
        conditions = list(setting)
    elif isinstance(setting, (list, tuple)) and any(isinstance(c, Mapping) for c in setting):
        raise MergeError(f"{where}: a list mixes {{filter, value}} entries and plain values")
    if conditions is None:
        return _value_form(setting, kind, where)
    rules: list[tuple[str, Any]] = []
    for i, cond in enumerate(conditions):
        extra = sorted(set(map(str, cond)) - {"filter", "value"})
        if extra or "value" not in cond:
            raise MergeError(f"{where}[{i}] must be {{filter: STR, value: V}} (filter "
                             f"optional), got {dict(cond)!r}")
        value = _value_form(cond["value"], kind, f"{where}[{i}].value")
        pattern = cond.get("filter")
        if pattern is None or pattern == "*":
            return PathRules(rules, default=value) if rules else value
        if not isinstance(pattern, str):
            raise MergeError(f"{where}[{i}].filter must be a string, got {pattern!r}")
        rules.append((_filter_regex(pattern), value))
    if fallback is _NO_DEFAULT:
        return PathRules(rules)
    return PathRules(rules, default=fallback)


def _map_form(form: Any, fn: Callable[[Any], Any]) -> Any:
    """``form`` with ``fn`` applied to every value it can take (bool switches -> mergejax
    settings)."""
    if isinstance(form, PathRules):
        rules = [(p, _map_form(v, fn)) for p, v in form.rules]
        if form.default is _NO_DEFAULT:
            return PathRules(rules)
        return PathRules(rules, default=_map_form(form.default, fn))
    return fn(form)


# ---------------------------------------------------------------------------------------
# mergekit methods: their parameters, inputs, and translation to mergejax.


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A mergekit method: its parameters, base policy (``"required"``, ``"optional"`` or
    ``"ignored"``), input counts, and ``translate(shared, per_model) -> (method,
    hparams)``."""

    params: dict[str, _Param]
    base: str
    translate: Callable[[dict[str, Any], dict[str, list[Any]]], tuple[str, dict[str, Any]]]
    min_inputs: int = 1
    max_inputs: int | None = None


def _default(method: str, name: str) -> Any:
    return registry.get_method(method).hparams[name]


def _put(hparams: dict[str, Any], method: str, name: str, value: Any) -> None:
    """Sets ``name`` unless ``value`` is already the mergejax method's default."""
    default = _default(method, name)
    if not (type(value) is type(default) and value == default) and not (
            _is_number(value) and _is_number(default) and value == default):
        hparams[name] = value


def _describe(form: Any) -> str:
    """A per-leaf form written back in mergekit's terms (for messages)."""
    if isinstance(form, LayerGradient):
        return repr(list(form.values))
    if isinstance(form, PathRules):
        rules = [f"{{filter: {p!r}, value: {_describe(v)}}}" for p, v in form.rules]
        if form.default is not _NO_DEFAULT:
            rules.append(f"otherwise {_describe(form.default)}")
        return "[" + ", ".join(rules) + "]"
    return repr(form)


def _agreed(method: str, name: str, forms: list[Any]) -> Any:
    """The one value of a per-model mergekit parameter that mergejax takes once."""
    if any(f != forms[0] for f in forms[1:]):
        described = ", ".join(_describe(f) for f in forms)
        raise MergeError(
            f"{method}: mergekit gives {name!r} per model, but mergejax's {method} takes one "
            f"{name} for all models at a tensor, and the models disagree ({described}); give "
            f"every model the same {name}")
    return forms[0]


def _linear(shared, per_model):
    hp = {"weights": per_model["weight"]}
    _put(hp, "linear", "normalize", shared["normalize"])
    return "linear", hp


def _slerp(shared, per_model):
    return "slerp", {"t": shared["t"]}


def _nearswap(shared, per_model):
    return "nearswap", {"t": shared["t"]}


def _multislerp(shared, per_model):
    hp = {"weights": per_model["weight"]}
    _put(hp, "multislerp", "normalize_weights", shared["normalize_weights"])
    _put(hp, "multislerp", "eps", shared["eps"])
    return "multislerp", hp


def _karcher(shared, per_model):
    hp: dict[str, Any] = {}
    _put(hp, "karcher", "max_iter", shared["max_iter"])
    _put(hp, "karcher", "tol", shared["tol"])
    return "karcher", hp


def _model_stock(shared, per_model):
    if shared["filter_wise"] is not False:
        raise MergeError("model_stock: filter_wise: true (one interpolation per row) is not "
                         "supported; mergejax's model_stock is mergekit's filter_wise: false")
    return "model_stock", {}


def _sce(shared, per_model):
    hp: dict[str, Any] = {}
    _put(hp, "sce", "density", shared["select_topk"])
    return "sce", hp


# The sparse pipeline's neutral stage settings (`mergejax.sparse_merge` without the
# stages), and the sparsifier each preset fixes: a preset can express a setting it does
# not expose only when the setting has this value.
_NEUTRAL = dict(sparsify="none", scope="tensor", density=1.0, gamma=0.0, epsilon=0.0,
                rescale="none", topk="mergekit", elect="none", disjoint="mean",
                normalize=False, rank_axis=-1)
_SPARSIFIER = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random",
               "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers",
               "della": "magprune", "della_linear": "magprune"}


def _gta(name: str, consensus: bool):
    """mergekit's generalized task arithmetic ``name`` as a mergejax preset, or as
    `mergejax.sparse_merge` when the preset cannot express the setting."""
    sparsify = _SPARSIFIER.get(name, "none")

    def translate(shared, per_model):
        weights, scale = per_model["weight"], shared["lambda"]
        if sparsify == "none":
            hp = {"weights": weights}
            _put(hp, "task_arithmetic", "scale", scale)
            _put(hp, "task_arithmetic", "normalize", shared["normalize"])
            return "task_arithmetic", hp
        density = _agreed(name, "density", per_model["density"])
        stages = dict(
            sparsify=sparsify, scope="tensor", topk="mergekit", density=density,
            rescale=_map_form(shared["rescale"], lambda r: "l1" if r else "none"),
            elect="mass" if consensus else "none",
            disjoint=(_map_form(shared["normalize"], lambda n: "mean" if n else "sum")
                      if consensus else "mean"),
            normalize=False if consensus else shared["normalize"])
        if sparsify == "outliers":
            stages["gamma"] = _agreed(name, "gamma", per_model["gamma"])
        if sparsify == "magprune":
            stages["epsilon"] = _agreed(name, "epsilon", per_model["epsilon"])
            if _is_number(density) and density >= 1:
                stages["sparsify"] = "none"  # mergekit: no pruning at density >= 1
        exposed = registry.get_method(name).hparams
        fixed = {**_NEUTRAL, "sparsify": sparsify}
        expressible = all(k in exposed or fixed[k] == v for k, v in stages.items())
        target = name if expressible else "sparse_merge"
        hp = {"weights": weights}
        _put(hp, target, "scale", scale)
        for key, value in stages.items():
            if key in registry.get_method(target).hparams:
                _put(hp, target, key, value)
        return target, hp

    return translate


def _gta_params(name: str, normalize: bool, rescale: bool) -> dict[str, _Param]:
    params = {
        "int8_mask": _Param("bool", False),
        "normalize": _Param("bool", normalize),
        "rescale": _Param("bool", rescale),
        "lambda": _Param("float", 1.0),
        "weight": _Param("float", _REQUIRED, "non_base"),
        "density": _Param("float", 1.0, "non_base"),
    }
    if _SPARSIFIER.get(name) == "outliers":
        params["gamma"] = _Param("float", 0.01, "non_base")
    if _SPARSIFIER.get(name) == "magprune":
        params["epsilon"] = _Param("float", 0.15, "non_base")
    return params


def _gta_spec(name: str, consensus: bool, normalize: bool, rescale: bool) -> _Spec:
    return _Spec(_gta_params(name, normalize, rescale), "required", _gta(name, consensus))


# mergekit's method specs (merge_methods/registry.py and each method's signature).
_SPECS: dict[str, _Spec] = {
    "linear": _Spec({"weight": _Param("float", _REQUIRED, "input"),
                     "normalize": _Param("bool", True)}, "ignored", _linear),
    "slerp": _Spec({"t": _Param("float", _REQUIRED)}, "required", _slerp,
                   min_inputs=2, max_inputs=2),
    "nearswap": _Spec({"t": _Param("float", _REQUIRED)}, "required", _nearswap,
                      min_inputs=2, max_inputs=2),
    "multislerp": _Spec({"weight": _Param("float", _REQUIRED, "non_base"),
                         "normalize_weights": _Param("bool", True),
                         "eps": _Param("float", 1e-8)}, "optional", _multislerp),
    "karcher": _Spec({"max_iter": _Param("int", 10), "tol": _Param("float", 1e-5)},
                     "ignored", _karcher),
    "model_stock": _Spec({"filter_wise": _Param("bool", False)}, "required", _model_stock,
                         min_inputs=3),
    "sce": _Spec({"int8_mask": _Param("bool", False), "select_topk": _Param("float", 1.0)},
                 "required", _sce),
    "task_arithmetic": _gta_spec("task_arithmetic", False, False, False),
    "ties": _gta_spec("ties", True, True, False),
    "dare_ties": _gta_spec("dare_ties", True, False, True),
    "dare_linear": _gta_spec("dare_linear", False, False, True),
    "breadcrumbs": _gta_spec("breadcrumbs", False, False, False),
    "breadcrumbs_ties": _gta_spec("breadcrumbs_ties", True, False, False),
    "della": _gta_spec("della", True, True, True),
    "della_linear": _gta_spec("della_linear", False, False, True),
}


@dataclasses.dataclass(frozen=True)
class _Input:
    path: str
    label: str
    parameters: Mapping[str, Any]


def _mergekit_inputs(data: Mapping[str, Any], base: str | None,
                     config_dir: str) -> list[_Input]:
    """mergekit's inputs: the listed models, then the base if it is not among them."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeError(f"models must be a non-empty list of {{model: PATH, parameters: "
                         f"{{...}}}}, got {models!r}")
    inputs: list[_Input] = []
    for k, entry in enumerate(models):
        where = f"models[{k}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergeError(f"{where} must be {{model: PATH, parameters: {{...}}}}, got "
                             f"{entry!r}")
        extra = sorted(set(map(str, entry)) - {"model", "parameters"})
        if extra:
            raise MergeError(f"{where}: unknown key(s) {extra}; a models: entry takes model "
                             "and parameters (layer_range belongs to slices:, which is not "
                             "supported)")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise MergeError(f"{where}.parameters must be a mapping, got {parameters!r}")
        path = _model_path(entry["model"], config_dir, f"{where}.model")
        if any(i.path == path for i in inputs):
            raise MergeError(f"{where}: model {entry['model']!r} is listed twice")
        inputs.append(_Input(path, repr(entry["model"]), parameters))
    if base is not None and all(i.path != base for i in inputs):
        inputs.append(_Input(base, "base_model", {}))
    return inputs


def _check_names(method: str, spec: _Spec, top: Mapping[str, Any],
                 inputs: list[_Input]) -> None:
    valid = sorted(spec.params)
    for name in top:
        if name not in spec.params:
            raise MergeError(f"unknown parameter {name!r} for mergekit {method}; valid "
                             f"parameters are {valid}")
    for inp in inputs:
        for name in inp.parameters:
            if name not in spec.params:
                raise MergeError(f"unknown parameter {name!r} (model {inp.label}) for "
                                 f"mergekit {method}; valid parameters are {valid}")
            if spec.params[name].scope == "shared":
                raise MergeError(
                    f"parameter {name!r} of {method} is one value for the whole merge: "
                    f"give it in the top-level parameters, not in model {inp.label}'s "
                    "(mergekit would ignore it there)")


def _parse_mergekit(data: Mapping[str, Any], config_dir: str) -> MergeConfig:
    unknown = sorted(set(map(str, data)) - set(_MERGEKIT_KEYS))
    if unknown:
        raise MergeError(f"unknown key(s) {unknown} in a mergekit config; valid keys are "
                         f"{[k for k in _MERGEKIT_KEYS if k not in ('slices', 'modules')]}")
    if data.get("slices") is not None or data.get("modules") is not None:
        form = "slices" if data.get("slices") is not None else "modules"
        raise MergeError(f"mergekit's {form}: form is not supported; use models: (every "
                         "model's full layer range)")
    if data.get("tokenizer") is not None:
        raise MergeError("a tokenizer: block is not supported (mergejax does not build "
                         "tokenizers); use tokenizer_source: base or a model path")
    method = data["merge_method"]
    if not isinstance(method, str) or method not in _SPECS:
        known = ""
        if method in _MERGEKIT_ONLY:
            known = " (a mergekit method mergejax does not have)"
        raise MergeError(f"merge_method {method!r} is not supported{known}; supported "
                         f"mergekit methods are {sorted(MERGEKIT_METHODS)}")
    target = MERGEKIT_METHODS[method]
    try:  # imports only the families up to the target's, not Flax or Orbax
        registry.get_method(target)
    except MergeError:
        raise MergeError(f"mergejax has no method {target!r} (for mergekit {method})") from None
    spec = _SPECS[method]
    base = None if data.get("base_model") is None else _model_path(
        data["base_model"], config_dir, "base_model")
    inputs = _mergekit_inputs(data, base, config_dir)
    top = data.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise MergeError(f"parameters must be a mapping, got {top!r}")
    _check_names(method, spec, top, inputs)

    if spec.base == "required" and base is None:
        raise MergeError(f"mergekit {method} needs a base_model")
    if len(inputs) < spec.min_inputs or (spec.max_inputs is not None
                                         and len(inputs) > spec.max_inputs):
        count = (f"exactly {spec.min_inputs}" if spec.min_inputs == spec.max_inputs
                 else f"at least {spec.min_inputs}")
        raise MergeError(f"mergekit {method} takes {count} models, base_model included; "
                         f"got {len(inputs)}")
    if spec.base == "ignored":
        merged, mj_base = inputs, None
    else:
        merged, mj_base = [i for i in inputs if i.path != base], base
    if not merged:
        raise MergeError(f"mergekit {method}: no model to merge besides the base_model")

    shared: dict[str, Any] = {}
    per_model: dict[str, list[Any]] = {}
    for name, param in spec.params.items():
        default = _NO_DEFAULT if param.default is _REQUIRED else param.default
        fallback = default
        if name in top:
            fallback = _setting_form(top[name], param.kind, f"parameters.{name}", default)
        if param.scope == "shared":
            if fallback is _NO_DEFAULT:
                raise MergeError(f"mergekit {method} needs parameter {name!r} in the "
                                 "top-level parameters")
            shared[name] = fallback
            continue
        forms = []
        for inp in merged:
            if name in inp.parameters:
                forms.append(_setting_form(inp.parameters[name], param.kind,
                                           f"parameters.{name} of model {inp.label}",
                                           fallback))
            elif fallback is _NO_DEFAULT:
                raise MergeError(f"mergekit {method} needs parameter {name!r} for model "
                                 f"{inp.label} (in its parameters or the top-level ones)")
            else:
                forms.append(fallback)
        per_model[name] = forms
    mj_method, hparams = spec.translate(shared, per_model)

    dtype = data.get("dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") not in _MERGEKIT_DTYPES:
        raise MergeError(f"dtype must be one of {list(_MERGEKIT_DTYPES)}, got {dtype!r}")
    if data.get("out_dtype") is not None:
        out_dtype = _dtype(data["out_dtype"], "out_dtype")
    else:  # mergekit writes in its compute dtype
        out_dtype = _dtype(dtype, "dtype (the default of out_dtype)")
    return MergeConfig(
        method=mj_method, base=mj_base, models=tuple(i.path for i in merged),
        hparams=hparams, out_dtype=out_dtype,
        seed=_seed(data.get("random_seed"), "random_seed"),
        tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), base, config_dir),
        options=_options(data.get("options")), source="mergekit")
