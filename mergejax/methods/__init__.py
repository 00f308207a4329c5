"""Merge methods, one module per family; each registers itself on import."""

from mergejax.methods import basic, masking, soups, sparse

__all__ = ["basic", "masking", "soups", "sparse"]
