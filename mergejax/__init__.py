"""mergejax: model merging as jit-compiled pure transforms over parameter pytrees.

Quick start::

    import mergejax
    merged = mergejax.task_arithmetic(base_params, [ft_a, ft_b], scale=0.3)
    merged = mergejax.merge("slerp", base_params, [ft_a], t=0.5)
    mergejax.list_methods()
"""

from mergejax.method import LeafContext, MergeMethod, leaf_key, leafwise
from mergejax.methods.basic import (
    karcher,
    linear,
    metagpt,
    model_stock,
    multislerp,
    nearswap,
    slerp,
    task_arithmetic,
)
from mergejax.methods.sparse import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    darex,
    della,
    della_linear,
    magmax,
    sparse_merge,
    ties,
)
from mergejax.methods.soups import GreedySoupResult, greedy_soup, greedy_soup_search
from mergejax.registry import get_method, list_methods, merge, register
from mergejax.rules import LayerGradient, PathRules, layer_index
from mergejax.tree import (
    MergeError,
    apply_task_vector,
    check_compatible,
    flatten_with_paths,
    is_float,
    leaf_paths,
    path_str,
    stack_trees,
    task_vector,
    task_vectors,
    tree_add,
    tree_scale,
    tree_sub,
    tree_weighted_sum,
    unstack_tree,
)

__version__ = "0.1.0"

__all__ = [
    "GreedySoupResult",
    "LayerGradient",
    "LeafContext",
    "MergeError",
    "MergeMethod",
    "PathRules",
    "apply_task_vector",
    "check_compatible",
    "flatten_with_paths",
    "get_method",
    "greedy_soup",
    "greedy_soup_search",
    "is_float",
    "karcher",
    "layer_index",
    "leaf_key",
    "leaf_paths",
    "leafwise",
    "linear",
    "list_methods",
    "merge",
    "metagpt",
    "model_stock",
    "multislerp",
    "nearswap",
    "path_str",
    "register",
    "slerp",
    "stack_trees",
    "task_arithmetic",
    "task_vector",
    "task_vectors",
    "tree_add",
    "tree_scale",
    "tree_sub",
    "tree_weighted_sum",
    "unstack_tree",
]
