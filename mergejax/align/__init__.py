"""Pre-merging alignment: permutation specs, Git Re-Basin matching, ZipIt! and MuDSC.

Models trained from different initialisations compute the same functions with their
hidden units in different orders; aligning the units first makes them averageable.

Example::

    from mergejax import align

    spec = align.mlp_spec(["Dense_0", "Dense_1", "Dense_2"])
    perms = align.weight_matching(spec, params_a, params_b).perms
    aligned_b = align.apply_permutation(spec, perms, params_b)
"""

from mergejax.align.features import (
    FeatureCorrelation,
    FeaturesFn,
    feature_correlations,
    linen_features,
)
from mergejax.align.matching import (
    SOLVERS,
    MatchResult,
    activation_matching,
    activation_matching_merge,
    solve_assignment,
    ste_matching,
    ste_matching_merge,
    weight_matching,
    weight_matching_merge,
)
from mergejax.align.spec import (
    Permutations,
    PermutationSpec,
    apply_permutation,
    identity_permutations,
    invert_permutations,
    mlp_spec,
    random_permutations,
    resnet_spec,
    transformer_block_spec,
    vit_spec,
)
from mergejax.align.zipping import (
    apply_zip,
    mudsc,
    mudsc_merge,
    weight_similarity,
    zip_features,
    zipit,
    zipit_merge,
)

__all__ = [
    "FeatureCorrelation",
    "FeaturesFn",
    "MatchResult",
    "PermutationSpec",
    "Permutations",
    "SOLVERS",
    "activation_matching",
    "activation_matching_merge",
    "apply_permutation",
    "apply_zip",
    "feature_correlations",
    "identity_permutations",
    "invert_permutations",
    "linen_features",
    "mlp_spec",
    "mudsc",
    "mudsc_merge",
    "random_permutations",
    "resnet_spec",
    "solve_assignment",
    "ste_matching",
    "ste_matching_merge",
    "transformer_block_spec",
    "vit_spec",
    "weight_matching",
    "weight_matching_merge",
    "weight_similarity",
    "zip_features",
    "zipit",
    "zipit_merge",
]
