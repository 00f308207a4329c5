"""One registry of merge methods by canonical name, and the uniform `merge` entry point.

Scripts, configs and the checkpoint binary all reach methods through here::

    mergejax.list_methods()                       # sorted canonical names
    mergejax.merge("task_arithmetic", base, models, scale=0.3)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

from mergejax.tree import MergeError, PyTree

__all__ = ["Method", "get_method", "list_methods", "merge", "register"]


class Method(Protocol):
    """What the registry holds: a callable merge with its documented hyperparameters."""

    name: str
    family: str
    paper: str
    hparams: dict[str, Any]
    needs_base: bool

    def __call__(self, base: PyTree | None, models: Sequence[PyTree], **kwargs: Any) -> Any:
        ...


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` under ``method.name``; a name can be registered once."""
    if method.name in _REGISTRY:
        raise MergeError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def list_methods() -> list[str]:
    """The sorted canonical names of every registered method."""
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method {name!r}; valid methods are {list_methods()}") from None


def merge(name: str, base: PyTree | None, models: Sequence[PyTree], **hparams: Any) -> Any:
    """Merges ``models`` (fine-tunes of ``base``) with the method registered as ``name``.

    ``hparams`` use the shared names of DESIGN.md §3a (``weights``, ``scale``, ``density``,
    ``t``, ...), each a plain value or a per-leaf form of `mergejax.rules`; ``key`` seeds
    random methods. Unknown names or hyperparameters raise `MergeError` listing the
    valid ones.

    Example::

        merged = mergejax.merge("task_arithmetic", base, [ft_a, ft_b], scale=0.3)
    """
    method = get_method(name)
    accepted = [p for p in inspect.signature(method).parameters if p not in ("base", "models")]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise MergeError(f"{name} got unknown hyperparameter(s) {unknown}; "
                         f"valid ones are {sorted(accepted)}")
    return method(base, models, **hparams)
