"""Merge methods, one module per family; each registers itself on import."""

from mergejax.methods import basic, soups

__all__ = ["basic", "soups"]
