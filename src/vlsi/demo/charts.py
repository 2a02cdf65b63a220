"""The reports' charts, drawn with matplotlib and returned as inline ``<svg>`` elements.

:func:`line_chart` draws series of ``(x, y)`` points (group ``series-K`` per series);
:func:`bar_chart` draws labelled horizontal bars (group ``bar-K``) with optional error bars and
a note right of each bar. The SVG keeps its text as ``<text>`` (searchable, selectable) and is
byte-for-byte the same for the same inputs.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

# Fixed ids (no random salt), text kept as text, no date: the same chart gives the same bytes.
SVG_RC = {"svg.hashsalt": "vlsi", "svg.fonttype": "none", "font.family": "sans-serif",
          "font.sans-serif": ["DejaVu Sans"], "font.size": 10}
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no <metadata> block
DPI = 100  # figure inches x DPI = the SVG's size in pixels


def svg_element(fig: Figure) -> str:
    """``fig`` as an ``<svg>`` element (no XML prolog), deterministic."""
    buf = io.StringIO()
    with matplotlib.rc_context(SVG_RC):
        fig.savefig(buf, format="svg", metadata=NO_METADATA)
    text = buf.getvalue()
    return text[text.index("<svg"):].strip()


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, x_title: str, y_title: str,
               title: str = "", y_range: tuple[float, float] | None = None, width: int = 640,
               height: int = 320, y_percent: bool = False) -> str:
    """One line with point markers per series, the legend right of the plot; an ``<svg>``.

    ``y_percent``: y values are fractions, labelled as percentages.
    """
    with matplotlib.rc_context(SVG_RC):
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        for k, (name, pts) in enumerate(series.items()):
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3.5,
                    linewidth=1.8, label=name, gid=f"series-{k}")
        if y_range is not None:
            ax.set_ylim(*y_range)
        if all(x >= 0 for pts in series.values() for x, _ in pts):
            ax.set_xlim(left=0)  # steps: the axis starts at step 0
        if y_percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.set_xlabel(x_title)
        ax.set_ylabel(y_title)
        if title:
            ax.set_title(title)
        ax.grid(True, color="#eeeeee")
        if series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return svg_element(fig)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, errors: Sequence[float] | None = None,
              notes: Sequence[str] | None = None, x_title: str, title: str = "",
              x_range: tuple[float, float] | None = None, width: int = 720, percent: bool = True) -> str:
    """Horizontal bars (value ± error), first label on top, a note right of each bar; an ``<svg>``.

    ``percent``: values are fractions, the axis labelled in percent.
    """
    height = 80 + 30 * len(labels) + (20 if title else 0)
    with matplotlib.rc_context(SVG_RC):
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        y = list(range(len(labels)))
        bars = ax.barh(y, list(values), xerr=list(errors) if errors is not None else None, height=0.75,
                       color="#08519c", alpha=0.8, error_kw={"ecolor": "#222222", "elinewidth": 1.5})
        for k, bar in enumerate(bars):
            bar.set_gid(f"bar-{k}")
        ax.set_yticks(y, list(labels))
        ax.invert_yaxis()
        if x_range is not None:
            ax.set_xlim(*x_range)
        if percent:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}"))
        if notes:
            right = ax.secondary_yaxis("right")
            right.set_yticks(y, list(notes))
            right.tick_params(length=0)
        ax.set_xlabel(x_title)
        if title:
            ax.set_title(title)
        ax.grid(True, axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
    return svg_element(fig)
