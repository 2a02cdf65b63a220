"""Heatmaps of matched layer pairs (the paper's Fig. 5), drawn with matplotlib.

The interaction step counts how often each (student layer, teacher layer) pair was selected
(:class:`vlsi.train.recorder.MatchRecorder`); the paper plots these counts at the start and at the end
of training. :func:`render_heatmap` draws a ``[rows, cols]`` count matrix: one cell per pair,
coloured by its share of the row's selections (each student layer's row sums to 1, so rows with
different totals stay comparable), that share written in the cell as a percentage, each row's
number of selections at its right end, axes labelled with the actual decoder-layer indices.
:func:`save_heatmap` writes the PNG and a JSON twin with the numbers.

Example::

    save_heatmap("out/heatmap_end.png", recorder.counts(last_fraction=0.1),
                 row_labels=[1, 5, 9], col_labels=[1, 5, 9, 13, 17],
                 title="last 10% of steps")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from vlsi.train.recorder import MatchRecorder

HEATMAP_FRACTION = 0.1  # Fig. 5: the first and the last 10% of the recorded steps

# A short sequential palette (light yellow -> teal -> dark blue). Light for "never chosen"
# keeps the chosen pairs visible at a glance.
SHARE_CMAP = LinearSegmentedColormap.from_list(
    "vlsi_share", ["#ffffd9", "#c7e9b4", "#41b6c4", "#225ea8", "#081d58"])
NEVER = (240, 240, 240)  # a pair never chosen: light grey, so the grid stays visible
DPI = 100  # ``cell`` is in pixels at this resolution


def row_shares(counts: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (float ``[rows, cols]``); all-zero rows stay zero."""
    counts = counts.to(torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def colour(share: float) -> tuple[int, int, int]:
    """RGB colour (0-255) of a share in ``[0, 1]``, clamped."""
    r, g, b, _ = SHARE_CMAP(min(max(float(share), 0.0), 1.0), bytes=True)
    return int(r), int(g), int(b)


def render_heatmap(
    counts: torch.Tensor | Sequence[Sequence[int]],
    row_labels: Sequence[int | str],
    col_labels: Sequence[int | str],
    *,
    title: str = "",
    row_axis: str = "student layer",
    col_axis: str = "teacher layer",
    cell: int = 64,
) -> Figure:
    """Draw ``counts`` ``[rows, cols]`` as a heatmap figure (``Figure.savefig`` writes it).

    Args:
        counts: selection counts, rows = student target layers, columns = teacher ones.
        row_labels, col_labels: the layer index shown beside each row / under each column.
        title: drawn above the grid.
        row_axis, col_axis: axis titles.
        cell: about the side of one cell in pixels (the figure grows with it).
    """
    counts = torch.as_tensor(counts, dtype=torch.int64)
    if counts.dim() != 2:
        raise ValueError(f"counts must be 2-D [rows, cols], got shape {tuple(counts.shape)}")
    rows, cols = counts.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"need {rows} row labels and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")
    shares = row_shares(counts).tolist()
    chosen = (counts > 0).tolist()
    rgb = np.array([[colour(shares[i][j]) if chosen[i][j] else NEVER for j in range(cols)]
                    for i in range(rows)], dtype=np.uint8).reshape(rows, cols, 3)

    side = cell / DPI
    fig = Figure(figsize=(max(4.2, cols * side + 2.0), rows * side + 2.2 + (0.3 if title else 0)),
                 dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(rgb, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(cols), [str(c) for c in col_labels])
    ax.set_yticks(range(rows), [str(r) for r in row_labels])
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="both", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel(col_axis)
    ax.set_ylabel(row_axis)
    if title:
        ax.set_title(title)
    size = max(7.0, 0.2 * cell * 72 / DPI)  # points
    for i in range(rows):
        for j in range(cols):
            if chosen[i][j]:  # dark cells get white digits
                ax.text(j, i, f"{100 * shares[i][j]:.0f}%", ha="center", va="center", fontsize=size,
                        color="white" if shares[i][j] > 0.55 else "#141414")
    totals = ax.secondary_yaxis("right")
    totals.set_yticks(range(rows), [f"n={int(t)}" for t in counts.sum(dim=1).tolist()])
    totals.tick_params(length=0)
    totals.spines["right"].set_visible(False)
    scale = ScalarMappable(Normalize(0.0, 1.0), SHARE_CMAP)
    bar = fig.colorbar(scale, ax=ax, orientation="horizontal", shrink=0.8, aspect=30,
                       format=PercentFormatter(xmax=1.0, decimals=0))
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.set_label("share of the student layer's selections (n per row)")
    return fig


def heatmap_json(counts: torch.Tensor | Sequence[Sequence[int]], row_labels: Sequence[int | str],
                 col_labels: Sequence[int | str], *, title: str = "", row_axis: str = "student layer",
                 col_axis: str = "teacher layer", **extra,
) -> dict:
    """The numbers behind a heatmap: counts, row shares, labels, plus any ``extra`` fields."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    return {
        "title": title,
        "row_axis": row_axis,
        "col_axis": col_axis,
        "row_labels": list(row_labels),
        "col_labels": list(col_labels),
        "counts": counts.tolist(),
        "row_shares": [[round(v, 6) for v in row] for row in row_shares(counts).tolist()],
        **extra,
    }


def save_heatmap(png_path: str | Path, counts: torch.Tensor | Sequence[Sequence[int]],
                 row_labels: Sequence[int | str], col_labels: Sequence[int | str], *, title: str = "",
                 row_axis: str = "student layer", col_axis: str = "teacher layer", **extra) -> tuple[Path, Path]:
    """Write ``png_path`` and the same name with ``.json``; returns both paths."""
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    labels = dict(title=title, row_axis=row_axis, col_axis=col_axis)
    render_heatmap(counts, row_labels, col_labels, **labels).savefig(png, format="png")
    js = png.with_suffix(".json")
    js.write_text(json.dumps(heatmap_json(counts, row_labels, col_labels, **labels, **extra), indent=1) + "\n")
    return png, js


def save_match_heatmaps(out: Path, recorder: MatchRecorder, fraction: float = HEATMAP_FRACTION) -> None:
    """``heatmap_start`` and ``heatmap_end`` (PNG + JSON): pairs chosen in the first/last steps."""
    steps = sorted({step for step, _ in recorder.history})
    keep = max(1, math.ceil(fraction * len(steps)))
    percent = f"{round(100 * fraction)}%"
    parts = (("start", "first", {"first_fraction": fraction}, steps[:keep]),
             ("end", "last", {"last_fraction": fraction}, steps[-keep:]))
    for name, word, selection, window in parts:
        counts = recorder.counts(**selection) if steps else torch.zeros(recorder.t_s, recorder.t_l, dtype=torch.int64)
        span = f"steps {window[0]}-{window[-1]}" if window else "no steps"
        save_heatmap(
            out / f"heatmap_{name}.png", counts,
            recorder.student_layers or list(range(recorder.t_s)),
            recorder.teacher_layers or list(range(recorder.t_l)),
            title=f"matched layers, {word} {percent} of steps ({span})",
            steps=[window[0], window[-1]] if window else None,
            strategy=recorder.strategy,
            student_layers=recorder.student_layers,
            teacher_layers=recorder.teacher_layers,
        )
