"""Helpers shared by the tests: small nested parameter trees, their comparison, float64
switched on for one block, and the environment of a benchmark subprocess."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tree(leaves: dict[str, np.ndarray], step: int, dtype=jnp.float32) -> dict:
    """A nested params dict with the leaves of ``leaves`` and an int32 step counter."""
    tree: dict = {"step": jnp.asarray(step, jnp.int32)}
    for path, value in leaves.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = jnp.asarray(value, dtype)
    return tree


def walk(tree: dict, prefix: str = ""):
    """``(path, leaf)`` of a nested dict, paths `/`-joined."""
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            yield from walk(v, path)
        else:
            yield path, v


def floats(tree: dict) -> dict[str, np.ndarray]:
    """The floating leaves of ``tree`` as float64 NumPy arrays (what references use)."""
    return {p: np.asarray(v, np.float64) for p, v in walk(tree)
            if jnp.issubdtype(jnp.result_type(v), jnp.floating)}


def check_tree(out, expected: dict[str, np.ndarray], like: dict, *, rtol: float,
               atol: float) -> None:
    """``out`` has ``like``'s structure and dtypes, floats close to ``expected``, and every
    non-floating leaf (the step counter) equal to ``like``'s."""
    got = dict(walk(out))
    ref = dict(walk(like))
    assert set(got) == set(ref)
    for path, leaf in ref.items():
        g = got[path]
        assert jnp.result_type(g) == jnp.result_type(leaf), path
        assert np.shape(g) == np.shape(leaf), path
        if path in expected:
            np.testing.assert_allclose(np.asarray(g, np.float64), expected[path],
                                       rtol=rtol, atol=atol, err_msg=path)
        else:
            assert path == "step"
            np.testing.assert_array_equal(np.asarray(g), np.asarray(leaf))


@contextlib.contextmanager
def x64():
    """float64 switched on inside the block, restored after it."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def benchmark_env() -> dict[str, str]:
    """The environment of a benchmark subprocess: the repository importable, and one CPU
    device (conftest.py simulates 8 for the sharding tests; the benchmarks want one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def spy(monkeypatch, module, name: str) -> list:
    """Counts the calls of ``module.<name>`` (patched for the test)."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls
