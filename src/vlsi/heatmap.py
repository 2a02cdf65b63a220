"""Heatmaps of matched layer pairs (the paper's Fig. 5), drawn with PIL only.

The interaction step counts how often each (student layer, teacher layer) pair was selected
(:class:`vlsi.recorder.MatchRecorder`); the paper plots these counts at the start and at the end
of training. :func:`render_heatmap` draws a ``[rows, cols]`` count matrix: one cell per pair,
coloured by its share of the row's selections (each student layer's row sums to 1, so rows with
different totals stay comparable), that share written in the cell as a percentage, each row's
number of selections at its right end, axes labelled with the actual decoder-layer indices. :func:`save_heatmap` writes the PNG and a JSON twin with the numbers.

Example::

    save_heatmap("out/heatmap_end.png", recorder.counts(last_fraction=0.1),
                 row_labels=[1, 5, 9], col_labels=[1, 5, 9, 13, 17],
                 title="last 10% of steps")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import math

import torch
from PIL import Image, ImageDraw, ImageFont

from vlsi.recorder import MatchRecorder

HEATMAP_FRACTION = 0.1  # Fig. 5: the first and the last 10% of the recorded steps

# A short sequential palette (light yellow -> teal -> dark blue); shares are interpolated
# between its stops. Light for "never chosen" keeps the chosen pairs visible at a glance.
_PALETTE = [(255, 255, 217), (199, 233, 180), (65, 182, 196), (34, 94, 168), (8, 29, 88)]
_BACKGROUND = (255, 255, 255)
_NEVER = (240, 240, 240)  # a pair never chosen: light grey, so the grid stays visible
_INK = (20, 20, 20)


def row_shares(counts: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (float ``[rows, cols]``); all-zero rows stay zero."""
    counts = counts.to(torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def colour(share: float) -> tuple[int, int, int]:
    """Palette colour of a share in ``[0, 1]``."""
    x = min(max(share, 0.0), 1.0) * (len(_PALETTE) - 1)
    lo = min(int(x), len(_PALETTE) - 2)
    t = x - lo
    a, b = _PALETTE[lo], _PALETTE[lo + 1]
    return tuple(round(a[c] + t * (b[c] - a[c])) for c in range(3))  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    draw.text(xy, text, font=font, fill=fill, anchor="mm")


def render_heatmap(
    counts: torch.Tensor | Sequence[Sequence[int]],
    row_labels: Sequence[int | str],
    col_labels: Sequence[int | str],
    *,
    title: str = "",
    row_axis: str = "student layer",
    col_axis: str = "teacher layer",
    cell: int = 64,
) -> Image.Image:
    """Draw ``counts`` ``[rows, cols]`` as an RGB heatmap image.

    Args:
        counts: selection counts, rows = student target layers, columns = teacher ones.
        row_labels, col_labels: the layer index shown beside each row / under each column.
        title: drawn above the grid.
        row_axis, col_axis: axis titles.
        cell: side of one cell in pixels.
    """
    counts = torch.as_tensor(counts, dtype=torch.int64)
    if counts.dim() != 2:
        raise ValueError(f"counts must be 2-D [rows, cols], got shape {tuple(counts.shape)}")
    rows, cols = counts.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"need {rows} row labels and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")
    shares = row_shares(counts)
    font, small = _font(max(14, cell // 4)), _font(max(13, cell // 4 - 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, str(x), font)[0] for x in row_labels)
    totals = [f"n={int(t)}" for t in counts.sum(dim=1).tolist()]
    total_w = max(_text_size(probe, t, small)[0] for t in totals) + 12
    line_h = _text_size(probe, "Ag0", font)[1] + 8

    left = line_h + label_w + 12           # rotated row-axis title, then row labels
    top = 2 * line_h if title else line_h // 2
    grid_w, grid_h = cols * cell, rows * cell
    legend_h = 2 * line_h + 12
    width = max(left + grid_w + total_w + 16, left + _text_size(probe, title, font)[0] + 16, 420)
    height = top + grid_h + 2 * line_h + legend_h + 8

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    if title:
        _centered(draw, (width / 2, line_h), title, font, _INK)

    for i in range(rows):
        y0 = top + i * cell
        _centered(draw, (left - 6 - label_w / 2, y0 + cell / 2), str(row_labels[i]), font, _INK)
        for j in range(cols):
            x0 = left + j * cell
            share = float(shares[i, j])
            fill = colour(share) if counts[i, j] > 0 else _NEVER
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=_BACKGROUND)
            if counts[i, j] > 0:  # dark cells get white digits
                ink = _BACKGROUND if share > 0.55 else _INK
                _centered(draw, (x0 + cell / 2, y0 + cell / 2), f"{100 * share:.0f}%", small, ink)
        draw.text((left + grid_w + 8, y0 + cell / 2), totals[i], font=small, fill=_INK, anchor="lm")
    for j in range(cols):
        _centered(draw, (left + j * cell + cell / 2, top + grid_h + line_h / 2 + 2), str(col_labels[j]), font, _INK)
    _centered(draw, (left + grid_w / 2, top + grid_h + 1.5 * line_h + 2), col_axis, font, _INK)

    # Row-axis title, written horizontally then rotated to run up the left edge.
    tw, th = _text_size(probe, row_axis, font)
    label = Image.new("RGB", (tw + 4, th + 8), _BACKGROUND)
    ImageDraw.Draw(label).text((2, 0), row_axis, font=font, fill=_INK)
    label = label.rotate(90, expand=True)
    image.paste(label, (2, max(0, int(top + grid_h / 2 - label.height / 2))))

    # Legend: the palette from 0% to 100% of a row's selections.
    ly = top + grid_h + 2 * line_h + 6
    lw = max(160, min(grid_w, 240))
    for x in range(lw):
        draw.line([(left + x, ly), (left + x, ly + 12)], fill=colour(x / max(lw - 1, 1)))
    draw.text((left, ly + 14), "0%", font=small, fill=_INK)
    draw.text((left + lw, ly + 14), "100%", font=small, fill=_INK, anchor="ra")
    draw.text((left, ly + 14 + line_h - 4), "share of the student layer's selections (n per row)",
              font=small, fill=_INK)
    return image


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
    render_heatmap(counts, row_labels, col_labels, **labels).save(png)
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
