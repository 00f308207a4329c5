"""Merge methods, one module per family; each registers itself on import."""

from mergejax.methods import (
    basic,
    data_aware,
    datafree,
    decomposition,
    masking,
    projection,
    soups,
    sparse,
    spectral,
    subspace,
)

__all__ = ["basic", "data_aware", "datafree", "decomposition", "masking", "projection", "soups",
           "sparse", "spectral", "subspace"]
