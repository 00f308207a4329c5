"""Analysis of models and merges: linear mode connectivity (`connectivity`) and
task-vector geometry (`geometry`), with matplotlib plots.

Example::

    from mergejax.analysis import connectivity_curve, cosine_similarity_matrix

    curve = connectivity_curve(eval_fn, ft_a, merged)
    cos = cosine_similarity_matrix(mergejax.task_vectors(base, [ft_a, ft_b]))
"""

from mergejax.analysis import connectivity, geometry
from mergejax.analysis.connectivity import (
    ConnectivityCurve,
    barrier,
    connectivity_curve,
    interpolate,
    loss_barrier,
    plot_connectivity,
)
from mergejax.analysis.geometry import (
    OUTSIDE_LAYERS,
    cosine_similarity_matrix,
    disentanglement_grid,
    norms_by_layer,
    plot_disentanglement,
    plot_similarity,
    sign_conflict_rate,
    weight_disentanglement_error,
)

__all__ = [
    "ConnectivityCurve",
    "OUTSIDE_LAYERS",
    "barrier",
    "connectivity",
    "connectivity_curve",
    "cosine_similarity_matrix",
    "disentanglement_grid",
    "geometry",
    "interpolate",
    "loss_barrier",
    "norms_by_layer",
    "plot_connectivity",
    "plot_disentanglement",
    "plot_similarity",
    "sign_conflict_rate",
    "weight_disentanglement_error",
]
