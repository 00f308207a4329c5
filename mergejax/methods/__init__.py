"""Merge methods, one module per family; each registers itself on import
(`mergejax.registry` imports them when a method is looked up)."""

from mergejax._lazy import lazy_exports

#: The family modules, cheapest to import first (the registry loads them in this order).
FAMILIES = ("basic", "sparse", "masking", "soups", "spectral", "subspace", "projection",
            "datafree", "decomposition", "data_aware")

__getattr__, __dir__ = lazy_exports(__name__, {f: f"{__name__}.{f}" for f in FAMILIES})

__all__ = list(FAMILIES)
