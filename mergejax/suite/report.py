"""Result tables of the suite: per-task accuracy, average, normalised accuracy; files.

A row is one method's accuracy on every task. The normalised accuracy of a task is
``merged accuracy / expert accuracy`` (as in the AdaMerging and TSV papers), averaged over
tasks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

__all__ = ["Row", "markdown_table", "text_table", "write_results"]


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    method: str
    accuracy: dict[str, float]
    average: float = 0.0
    normalized: float = 0.0
    seconds: float = 0.0
    hparams: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def finish(self, experts: dict[str, float]) -> "Row":
        """Fills in the average and the normalised accuracy against ``experts``."""
        tasks = list(self.accuracy)
        self.average = sum(self.accuracy.values()) / len(tasks)
        self.normalized = sum(self.accuracy[t] / experts[t] for t in tasks
                              if experts[t] > 0) / len(tasks)
        return self


def _cells(row: Row, tasks: Sequence[str]) -> list[str]:
    return ([row.method] + [f"{100 * row.accuracy[t]:.1f}" for t in tasks]
            + [f"{100 * row.average:.1f}", f"{100 * row.normalized:.1f}",
               f"{row.seconds:.2f}", row.note])


def _header(tasks: Sequence[str]) -> list[str]:
    return ["method"] + list(tasks) + ["avg", "norm", "merge s", "note"]


def text_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """A fixed-width table for the terminal (accuracies in %)."""
    table = [_header(tasks)] + [_cells(r, tasks) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, len(line) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in table)


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """The same table in Markdown."""
    header = _header(tasks)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r, tasks)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, rows: Sequence[Row], tasks: Sequence[str],
                  meta: dict) -> dict[str, str]:
    """Writes ``results.{csv,json,md,png}`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"results.{ext}") for ext in ("csv", "json", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_header(tasks))
        for r in rows:
            writer.writerow([r.method] + [r.accuracy[t] for t in tasks]
                            + [r.average, r.normalized, r.seconds, r.note])
    with open(paths["json"], "w") as f:
        json.dump({"tasks": list(tasks), "rows": [dataclasses.asdict(r) for r in rows],
                   **meta}, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown_table(rows, tasks))
    _plot(paths["png"], rows)
    return paths


def _plot(path: str, rows: Sequence[Row]) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    rows = [r for r in rows if r.average == r.average]  # skipped methods have NaN
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    names = [r.method for r in rows][::-1]
    values = [100 * r.average for r in rows][::-1]
    ax.barh(names, values, color="tab:blue")
    for y, v in enumerate(values):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("average accuracy over tasks (%)")
    ax.set_xlim(0, 105)
    ax.set_title("mergejax embedded suite")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
