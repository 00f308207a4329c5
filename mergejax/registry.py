"""One registry of merge methods by canonical name, and the uniform `merge` entry point.

Scripts, configs and the checkpoint binary all reach methods through here::

    mergejax.list_methods()                       # sorted canonical names
    mergejax.merge("task_arithmetic", base, models, scale=0.3)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mergejax.tree import MergeError, PyTree

__all__ = ["FunctionMethod", "Method", "get_method", "list_methods", "merge", "register"]


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

#: Modules that register built-in methods besides the families of `mergejax.methods`.
_OTHER_BUILTINS = ("mergejax.lora", "mergejax.learned.coefficients",
                   "mergejax.learned.representation_surgery", "mergejax.learned.routing",
                   "mergejax.align.matching", "mergejax.align.zipping")


def _load_builtins(until: str | None = None) -> None:
    """Imports the modules that register the built-in methods, cheapest first, until
    ``until`` is registered (all of them for None): a lookup of ``linear`` needs neither
    Flax nor Orbax."""
    from mergejax.methods import FAMILIES  # pylint: disable=import-outside-toplevel
    for module in [f"mergejax.methods.{f}" for f in FAMILIES] + list(_OTHER_BUILTINS):
        if until is not None and until in _REGISTRY:
            return
        importlib.import_module(module)

#: The default of a hyperparameter without one: the caller must give it.
REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionMethod:
    """A registry entry for a merge written as a plain function
    ``fn(base, models, *, <hyperparameters>)`` (the learned loops, which are not leaf
    kernels). ``hparams`` are ``fn``'s keyword-only parameters with their defaults
    (`REQUIRED` for those without); unknown and missing ones raise `MergeError`.
    ``keeps`` says what the result holds besides one set of weights (for the suite's
    table), or None.

    Example::

        def my_merge(base, models, *, scale=1.0): ...
        registry.register(FunctionMethod("my_merge", my_merge, family="learned",
                                         paper="arXiv 0000.00000"))
    """

    name: str
    fn: Callable[..., Any]
    family: str
    paper: str
    needs_base: bool = True
    uses_key: bool | str = False
    keeps: str | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)

    def __post_init__(self):
        sig = inspect.signature(self.fn)
        object.__setattr__(self, "hparams", {
            p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "key"})
        object.__setattr__(self, "__doc__", self.fn.__doc__)
        object.__setattr__(self, "__signature__", sig)

    def __call__(self, base: PyTree | None, models: Sequence[PyTree], **hparams: Any) -> Any:
        accepted = set(self.hparams) | ({"key"} if self.uses_key else set())
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise MergeError(f"{self.name} got unknown hyperparameter(s) {unknown}; valid "
                             f"ones are {sorted(accepted)}")
        missing = sorted(n for n, v in self.hparams.items()
                         if v is REQUIRED and n not in hparams)
        if missing:
            raise MergeError(f"{self.name} needs hyperparameter(s) {missing}")
        if self.uses_key is True and hparams.get("key") is None:
            raise MergeError(f"{self.name} is random: pass key=jax.random.key(seed)")
        if self.needs_base and base is None:
            raise MergeError(f"{self.name} needs a base (pretrained) model; got base=None")
        return self.fn(base, models, **hparams)


def register(method: Method) -> Method:
    """Adds ``method`` under ``method.name``; a name can be registered once."""
    if method.name in _REGISTRY:
        raise MergeError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def list_methods() -> list[str]:
    """The sorted canonical names of every registered method."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        _load_builtins(until=name)
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
