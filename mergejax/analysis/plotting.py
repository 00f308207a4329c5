"""Figures of the analysis tools: drawn on matplotlib's Agg canvas, never through pyplot,
so no display is needed and no global backend state changes."""

from __future__ import annotations

from typing import Any

__all__ = ["new_axes", "save_figure"]


def new_axes(ax: Any = None) -> tuple[Any, Any]:
    """``(figure, axes)``: ``ax`` and its figure, or a new figure drawn with Agg (no
    pyplot, so no display and no global state; the backend in use is left alone)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(5.5, 4.0))
    return fig, fig.add_subplot()


def save_figure(fig: Any, path: str | None) -> Any:
    """Saves ``fig`` as a png at ``path`` when given; returns ``fig``."""
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120, format="png")
    return fig
