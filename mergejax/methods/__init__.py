"""Merge methods, one module per family; each registers itself on import."""

from mergejax.methods import (
    basic,
    datafree,
    decomposition,
    masking,
    projection,
    soups,
    sparse,
    spectral,
    subspace,
)

__all__ = ["basic", "datafree", "decomposition", "masking", "projection", "soups", "sparse",
           "spectral", "subspace"]
