"""Public names re-exported lazily (PEP 562): a package lists where each name is defined
and the defining module is imported on first use.

`import mergejax` then costs JAX's import, not also Flax's, Orbax's, optax's and SciPy's,
which only the learned, alignment and analysis modules need (measured: 2.5 s -> 1.1 s;
every binary, the checkpoint merger included, starts that much sooner).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public name ``n`` is defined in
    the module ``exports[n]`` (``exports[n] == package + "." + n`` names the submodule
    itself). A value is cached in the package after its first lookup.

    Example (in a package's ``__init__.py``)::

        __getattr__, __dir__ = lazy_exports(__name__, {"ties": "mergejax.methods.sparse"})
    """

    def getattr_(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        loaded = importlib.import_module(module)
        value = loaded if module == f"{package}.{name}" else getattr(loaded, name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return getattr_, dir_
