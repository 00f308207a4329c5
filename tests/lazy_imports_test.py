"""`import mergejax` loads modules on first use (`mergejax._lazy`), and the registry still
finds every built-in method."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
from _helpers import REPO_ROOT

import mergejax
from mergejax import io as mergejax_io

#: Imported only by the learned, alignment and analysis modules (and orbax I/O).
HEAVY = ("flax", "optax", "orbax", "scipy")


def _fresh(code: str):
    """The JSON printed by ``code`` run in a new interpreter."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_looking_up_a_checkpoint_method_imports_no_heavy_package():
    loaded = _fresh(
        "import json, sys, mergejax, mergejax.io\n"
        "from mergejax import registry\n"
        "assert registry.get_method('ties').name == 'ties'\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert loaded == []


_WEIGHTED = [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in "bc"]
MERGEKIT_CONFIGS = {
    "linear": {"merge_method": "linear",
               "models": [{"model": m, "parameters": {"weight": 0.5}} for m in "ab"]},
    "ties": {"merge_method": "ties", "base_model": "a", "models": _WEIGHTED},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "a", "models": _WEIGHTED},
    "slerp": {"merge_method": "slerp", "base_model": "a",
              "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.5}}}


@pytest.mark.parametrize("method", sorted(MERGEKIT_CONFIGS))
def test_parsing_a_mergekit_config_imports_no_heavy_package(method):
    """The checkpoint binary parses its config first: checking the method's name must not
    import every family (Flax, Orbax and SciPy took ~1 s of a 4 s merge)."""
    loaded = _fresh(
        "import json, sys\n"
        "from mergejax.io import mergekit\n"
        f"cfg = mergekit.parse_config({MERGEKIT_CONFIGS[method]!r})\n"
        f"assert cfg.method == {method!r}, cfg.method\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert loaded == []


def test_list_methods_registers_what_importing_every_module_registers():
    """Every module that registers a method is one the registry loads."""
    listed = _fresh("import json, mergejax; print(json.dumps(mergejax.list_methods()))")
    everything = _fresh(
        "import importlib, json, pkgutil, mergejax\n"
        "from mergejax import registry\n"
        "for m in pkgutil.walk_packages(mergejax.__path__, 'mergejax.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(registry._REGISTRY)))")  # pylint: disable=protected-access
    assert listed == everything and len(listed) > 50


def test_every_public_name_is_its_modules_object():
    for name in mergejax.__all__:
        module = importlib.import_module(mergejax._EXPORTS[name])  # pylint: disable=protected-access
        expected = module if module.__name__ == f"mergejax.{name}" else getattr(module, name)
        assert getattr(mergejax, name) is expected, name
    for name in ("OrbaxCheckpoint", "restore_params", "save_params"):
        assert getattr(mergejax_io, name) is getattr(
            importlib.import_module("mergejax.io.orbax"), name)
    methods = importlib.import_module("mergejax.methods")
    assert {m.name for m in pkgutil.iter_modules(methods.__path__)} >= set(methods.FAMILIES)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="not_a_method"):
        getattr(mergejax, "not_a_method")
