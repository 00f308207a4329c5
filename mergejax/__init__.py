"""mergejax: model merging as jit-compiled pure transforms over parameter pytrees.

Quick start::

    import mergejax
    merged = mergejax.task_arithmetic(base_params, [ft_a, ft_b], scale=0.3)
    merged = mergejax.merge("slerp", base_params, [ft_a], t=0.5)
    mergejax.list_methods()
"""

from mergejax.learned.localize import (
    LocalizationResult,
    learn_masks,
    localize_and_stitch,
)
from mergejax.method import LeafContext, MergeMethod, StatisticsPass, leaf_key, leafwise
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
from mergejax.methods.masking import ModulatedMerge, emr, model_tailor, pcb, sce, stitch
from mergejax.methods.soups import GreedySoupResult, greedy_soup, greedy_soup_search
from mergejax.methods.sparse import (
    breadcrumbs,
    breadcrumbs_ties,
    consensus,
    dare_linear,
    dare_ties,
    darex,
    della,
    della_linear,
    localize_stitch,
    magmax,
    sparse_merge,
    tall_masks,
    ties,
)
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
    "apply_task_vector",
    "breadcrumbs",
    "breadcrumbs_ties",
    "check_compatible",
    "consensus",
    "dare_linear",
    "dare_ties",
    "darex",
    "della",
    "della_linear",
    "emr",
    "flatten_with_paths",
    "get_method",
    "greedy_soup",
    "greedy_soup_search",
    "GreedySoupResult",
    "is_float",
    "karcher",
    "layer_index",
    "LayerGradient",
    "leaf_key",
    "leaf_paths",
    "LeafContext",
    "leafwise",
    "learn_masks",
    "linear",
    "list_methods",
    "LocalizationResult",
    "localize_and_stitch",
    "localize_stitch",
    "magmax",
    "merge",
    "MergeError",
    "MergeMethod",
    "metagpt",
    "model_stock",
    "model_tailor",
    "ModulatedMerge",
    "multislerp",
    "nearswap",
    "path_str",
    "PathRules",
    "pcb",
    "register",
    "sce",
    "slerp",
    "sparse_merge",
    "stack_trees",
    "StatisticsPass",
    "stitch",
    "tall_masks",
    "task_arithmetic",
    "task_vector",
    "task_vectors",
    "ties",
    "tree_add",
    "tree_scale",
    "tree_sub",
    "tree_weighted_sum",
    "unstack_tree",
]
