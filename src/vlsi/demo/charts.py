"""Small inline-SVG charts for the reports (no plotting library needed, no external asset).

:func:`line_chart` draws series of ``(x, y)`` points with ticks and axis titles on both axes;
:func:`bar_chart` draws labelled horizontal bars with optional error bars and notes.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

PALETTE = ("#08519c", "#e6550d", "#31a354", "#756bb1", "#636363", "#dd1c77", "#3182bd", "#fd8d3c")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.3g}"


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, x_title: str, y_title: str,
               title: str = "", y_range: tuple[float, float] | None = None, width: int = 640,
               height: int = 320, y_percent: bool = False) -> str:
    """One polyline (with point markers) per series; returns an ``<svg>`` element."""
    left, right, top, bottom = 64, 150, 30 if title else 12, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    x_ticks = nice_ticks(min(0.0, min(xs)), max(xs))
    y_lo, y_hi = y_range if y_range else (min(ys), max(ys))
    y_ticks = nice_ticks(y_lo, y_hi)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + plot_w * (x - x0) / ((x1 - x0) or 1)

    def py(y: float) -> float:
        return top + plot_h * (1 - (y - y0) / ((y1 - y0) or 1))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{html.escape(title or y_title)}" font-family="sans-serif">']
    if title:
        out.append(f'<text x="{left + plot_w / 2}" y="18" font-size="14" text-anchor="middle">'
                   f'{html.escape(title)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for t in y_ticks:
        y = py(t)
        label = f"{100 * t:g}%" if y_percent else _fmt(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="12" text-anchor="end">{label}</text>')
    for t in x_ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 18}" font-size="12" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" font-size="13" text-anchor="middle">'
               f'{html.escape(x_title)}</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2}" font-size="13" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + plot_h / 2})">{html.escape(y_title)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        xy = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{xy}"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        ly = top + 14 + 18 * k
        out.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" '
                   f'y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{left + plot_w + 38}" y="{ly}" font-size="12">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, errors: Sequence[float] | None = None,
              notes: Sequence[str] | None = None, x_title: str, title: str = "",
              x_range: tuple[float, float] | None = None, width: int = 720, percent: bool = True) -> str:
    """Horizontal bars (value +- error), a note right of each bar; returns an ``<svg>``."""
    bar_h, gap = 22, 8
    left, right, top, bottom = 230, 170, 30 if title else 10, 44
    height = top + bottom + len(labels) * (bar_h + gap)
    plot_w = width - left - right
    errors = list(errors) if errors is not None else [0.0] * len(values)
    lo = x_range[0] if x_range else min(0.0, min((v - e for v, e in zip(values, errors)), default=0))
    hi = x_range[1] if x_range else max((v + e for v, e in zip(values, errors)), default=1)
    ticks = nice_ticks(lo, hi)
    t0, t1 = ticks[0], ticks[-1]

    def px(x: float) -> float:
        return left + plot_w * (x - t0) / ((t1 - t0) or 1)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title or x_title)}" font-family="sans-serif">']
    if title:
        out.append(f'<text x="{left + plot_w / 2}" y="18" font-size="14" text-anchor="middle">'
                   f'{html.escape(title)}</text>')
    base = top + len(labels) * (bar_h + gap)
    for t in ticks:
        x = px(t)
        label = f"{100 * t:g}" if percent else _fmt(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{base}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{base + 16}" font-size="12" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" font-size="13" text-anchor="middle">'
               f'{html.escape(x_title)}</text>')
    zero = px(max(t0, 0.0))
    for k, (label, value) in enumerate(zip(labels, values)):
        y = top + k * (bar_h + gap)
        x = px(value)
        out.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" font-size="12" text-anchor="end">'
                   f'{html.escape(label)}</text>')
        out.append(f'<rect x="{min(zero, x):.1f}" y="{y}" width="{abs(x - zero):.1f}" height="{bar_h}" '
                   f'fill="{PALETTE[0]}" opacity="0.8"/>')
        if errors[k]:
            a, b = px(value - errors[k]), px(value + errors[k])
            out.append(f'<line x1="{a:.1f}" x2="{b:.1f}" y1="{y + bar_h / 2}" y2="{y + bar_h / 2}" '
                       f'stroke="#222" stroke-width="1.5"/>')
        if notes:
            out.append(f'<text x="{left + plot_w + 8}" y="{y + bar_h / 2 + 4}" font-size="12">'
                       f'{html.escape(notes[k])}</text>')
    out.append("</svg>")
    return "".join(out)
