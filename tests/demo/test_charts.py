"""The reports' charts (vlsi.demo.charts) and pages (vlsi.tools.pages): what they show, that the same
inputs give the same bytes, and that page text is escaped."""

from __future__ import annotations

import re

from vlsi.demo.charts import bar_chart, line_chart
from vlsi.tools.pages import render

SERIES = {"teacher": [(0, 0.2), (100, 0.8), (200, 0.9)], "student <s>": [(0, 0.1), (200, 0.5)],
          "third": [(50, 0.3)]}


def _texts(svg: str) -> list[str]:
    return re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)


def _drawn(svg: str, group: str) -> int:
    """How many ``group-K`` groups (a series, a bar) hold a drawn path."""
    return len(re.findall(rf'<g id="{group}-\d+">\s*<path d="M ', svg))


def test_line_chart_shows_every_series_with_its_titles():
    svg = line_chart(SERIES, x_title="optimizer step", y_title="held-out accuracy", title="curves",
                     y_range=(0.0, 1.0), y_percent=True)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    texts = _texts(svg)
    assert {"teacher", "student &lt;s&gt;", "third", "optimizer step", "held-out accuracy",
            "curves"} <= set(texts)
    assert "100%" in texts and "0%" in texts  # the y axis in percent over the given range
    assert _drawn(svg, "series") == 3
    assert _drawn(line_chart(dict(list(SERIES.items())[:2]), x_title="x", y_title="y"), "series") == 2


def test_charts_are_the_same_bytes_for_the_same_inputs():
    args = dict(x_title="step", y_title="entropy (nats)", title="t")
    assert line_chart(SERIES, **args) == line_chart(SERIES, **args)
    bars = dict(errors=[0.1, 0.0], notes=["paper MMB 1.0", "not in the paper"], x_title="acc", title="T")
    assert bar_chart(["a", "b"], [0.6, 0.25], **bars) == bar_chart(["a", "b"], [0.6, 0.25], **bars)
    assert "<metadata" not in line_chart(SERIES, **args)  # no date, no version


def test_bar_chart_labels_every_bar_in_percent():
    svg = bar_chart(["first", "second"], [0.6, 0.25], errors=[0.14, 0.0], notes=["n1", "n2"],
                    x_title="held-out accuracy (%)", title="T")
    texts = _texts(svg)
    assert {"first", "second", "n1", "n2", "held-out accuracy (%)", "T", "60"} <= set(texts)
    assert _drawn(svg, "bar") == 2


def test_pages_are_self_contained_and_escaped():
    page = render("ablation.html.j2", package="vlsi.demo", title="A <b>", header="h & <i>",
                  tables=[{"title": "T", "svg": "<svg></svg>", "markdown": "| <row> |"}])
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>A &lt;b&gt;</title>" in page and "<p>h &amp; &lt;i&gt;</p>" in page
    assert "<svg></svg>" in page and "<pre>| &lt;row&gt; |" in page  # the chart is markup, text is not
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:)', page)
