"""Merges that learn from data: masks, coefficients or routers trained with a loss, and
the gradient-free search they share (`cma_es`, used by `mergejax.lorahub` and
`evolutionary`). `loop` holds their shared calling convention and checkpointed optax loop.

AdaMerging (Yang et al. 2024, arXiv 2310.02575)::

    from mergejax.learned import adamerging

    result = adamerging(base, fts, apply_fn=embed, heads=heads, batches=test_batches)

Localize-and-Stitch (He et al. 2024, arXiv 2408.13656) with learned masks::

    from mergejax.learned import learn_masks, localize_and_stitch

    result = learn_masks(base, ft, loss_fn, itertools.cycle(batches), density=0.01)
    merged = localize_and_stitch(base, [ft_a, ft_b], [loss_a, loss_b],
                                 [batches_a, batches_b], steps=200)
"""

from mergejax.learned import (
    coefficients,
    localize,
    loop,
    representation_surgery,
    search,
)
from mergejax.learned.coefficients import (
    AdaMergingResult,
    CoefficientGroups,
    EvolutionaryResult,
    adamerging,
    adamerging_pp,
    adamerging_step,
    coefficient_groups,
    evolutionary,
    merge_with_coefficients,
    ties_processed_models,
)
from mergejax.learned.localize import (
    LocalizationResult,
    init_logits,
    learn_masks,
    localize_and_stitch,
    mask_from_logits,
    masked_params,
    sparsity_penalty,
)
from mergejax.learned.representation_surgery import (
    SurgeryResult,
    kl_divergence,
    probsurgery,
    surgery,
    surgery_v2,
)
from mergejax.learned.routing import (
    DEFAULT_ROUTED,
    ExclusiveKnowledge,
    TwinMergingResult,
    WEMoEResult,
    exclusive_knowledge,
    twin_merging,
    wemoe,
)
from mergejax.learned.search import CMAES, SearchResult, ask_tell_loop, cma_es

__all__ = [
    "AdaMergingResult",
    "CoefficientGroups",
    "EvolutionaryResult",
    "adamerging",
    "adamerging_pp",
    "adamerging_step",
    "coefficient_groups",
    "coefficients",
    "evolutionary",
    "loop",
    "merge_with_coefficients",
    "ties_processed_models",
    "DEFAULT_ROUTED",
    "ExclusiveKnowledge",
    "TwinMergingResult",
    "WEMoEResult",
    "exclusive_knowledge",
    "routing",
    "twin_merging",
    "wemoe",
    "SurgeryResult",
    "kl_divergence",
    "probsurgery",
    "representation_surgery",
    "surgery",
    "surgery_v2",
    "CMAES",
    "SearchResult",
    "ask_tell_loop",
    "cma_es",
    "search",
    "LocalizationResult",
    "init_logits",
    "learn_masks",
    "localize",
    "localize_and_stitch",
    "mask_from_logits",
    "masked_params",
    "sparsity_penalty",
]
