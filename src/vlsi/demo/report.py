"""The demo's report: ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

Every figure comes from the seeds' ``seed.json`` files of this run; nothing is typed in. With
several seeds an accuracy is reported as mean ± sample standard deviation over seeds, and the
two claims the demo makes are checked against the numbers and stated either way:

* the teacher beats every student variant (its mean is above each student row's mean);
* VLsI beats the SFT-only baseline by more than the spread across seeds (mean difference larger
  than the larger of the two standard deviations; with one seed there is no spread to compare).

The HTML inlines its images (data URIs) and draws the learning curves as inline SVG, so it is
one file with no external asset.
"""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import Any

from vlsi.demo.pipeline import ROWS
from vlsi.layer_view import LayerResponses, html_page, html_panel, markdown_panel


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per row and category over seeds, and the two claims' verdicts."""
    rows = {}
    for key, label in ROWS:
        accs = [s["results"][key]["accuracy"] for s in seeds]
        mean, std = mean_std(accs)
        cats = sorted(seeds[0]["results"][key]["by_category"])
        rows[key] = {
            "label": label, "per_seed": accs, "mean": mean, "std": std,
            "by_category": {c: mean_std([s["results"][key]["by_category"].get(c, 0.0) for s in seeds])[0]
                            for c in cats},
            "by_form": {f: mean_std([s["results"][key]["by_form"].get(f, 0.0) for s in seeds])[0]
                        for f in sorted(seeds[0]["results"][key]["by_form"])},
            "count": seeds[0]["results"][key]["count"],
        }
    students = [k for k, _ in ROWS if k != "teacher"]
    best_student = max(students, key=lambda k: rows[k]["mean"])
    teacher_margin = rows["teacher"]["mean"] - rows[best_student]["mean"]
    diff = rows["vlsi"]["mean"] - rows["sft_only"]["mean"]
    spread = max(rows["vlsi"]["std"], rows["sft_only"]["std"])
    per_seed_diff = [a - b for a, b in zip(rows["vlsi"]["per_seed"], rows["sft_only"]["per_seed"])]
    return {
        "rows": rows,
        "num_seeds": len(seeds),
        "seeds": [s["seed"] for s in seeds],
        "teacher_beats_students": teacher_margin > 0,
        "teacher_margin": teacher_margin,
        "best_student": best_student,
        "vlsi_minus_sft_only": diff,
        "vlsi_minus_sft_only_per_seed": per_seed_diff,
        "spread": spread,
        "vlsi_beats_sft_only_beyond_spread": len(seeds) > 1 and diff > spread,
    }


def verdicts(agg: dict[str, Any]) -> list[str]:
    """The claims, in words, decided by the numbers."""
    rows = agg["rows"]
    out = []
    best = rows[agg["best_student"]]
    if agg["teacher_beats_students"]:
        out.append(f"The teacher beats every student variant: {_pct(rows['teacher']['mean'])} against "
                   f"{_pct(best['mean'])} for the best one ({best['label']}), "
                   f"a margin of {_pts(agg['teacher_margin'])}.")
    else:
        out.append(f"The teacher does NOT beat every student variant: {best['label']} reaches "
                   f"{_pct(best['mean'])} against the teacher's {_pct(rows['teacher']['mean'])}.")
    diff, spread = agg["vlsi_minus_sft_only"], agg["spread"]
    per_seed = ", ".join(_pts(d) for d in agg["vlsi_minus_sft_only_per_seed"])
    if agg["num_seeds"] < 2:
        out.append(f"VLsI minus SFT-only: {_pts(diff)} on one seed; no spread across seeds was "
                   "measured (run with --seeds 3 to test the claim).")
    elif agg["vlsi_beats_sft_only_beyond_spread"]:
        out.append(f"VLsI beats the SFT-only baseline by {_pts(diff)}, more than the spread across "
                   f"seeds ({_pts(spread)}); per seed: {per_seed}.")
    elif diff > 0:
        out.append(f"VLsI beats the SFT-only baseline by {_pts(diff)}, which is NOT more than the "
                   f"spread across seeds ({_pts(spread)}); per seed: {per_seed}.")
    else:
        out.append(f"VLsI does NOT beat the SFT-only baseline: VLsI minus SFT-only is {_pts(diff)} "
                   f"(spread across seeds {_pts(spread)}); per seed: {per_seed}.")
    before = rows["student_before"]["mean"]
    out.append(f"Change from the student before: interaction alone {_pts(rows['vlsi_no_sft']['mean'] - before)}, "
               f"VLsI {_pts(rows['vlsi']['mean'] - before)}, SFT-only {_pts(rows['sft_only']['mean'] - before)}; "
               f"the teacher is {_pts(rows['teacher']['mean'] - before)} above the student before.")
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _acc(row: dict[str, Any], n: int) -> str:
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}" if n > 1 else f"{100 * row['mean']:.1f}"


def results_table(agg: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = agg["rows"]
    cats = list(rows["teacher"]["by_category"])
    forms = list(rows["teacher"]["by_form"])
    head = ["model", "accuracy (%)"] + [f"{c} (%)" for c in cats] + [f"{f} (%)" for f in forms]
    body = []
    for key, _ in ROWS:
        r = rows[key]
        body.append([r["label"], _acc(r, agg["num_seeds"])]
                    + [f"{100 * r['by_category'][c]:.1f}" for c in cats]
                    + [f"{100 * r['by_form'][f]:.1f}" for f in forms])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(
        f'<td{" class=num" if i else ""}>{html.escape(c)}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in body)
    return f"<table><tr>{h}</tr>{rows}</table>"


def layer_loss_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target layer"] + table["columns"]
    body = [[str(layer)] + ["—" if v is None else f"{v:.4f}" for v in table["loss"][str(layer)]]
            for layer in table["layers"]]
    return head, body


def heatmap_rows(hm: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The heatmap's counts as a table: one row per student layer."""
    cols = hm.get("col_labels") or hm.get("teacher_layers") or []
    rows = hm.get("row_labels") or hm.get("student_layers") or []
    counts = hm.get("counts", [])
    head = ["student \\ teacher"] + [str(c) for c in cols]
    return head, [[str(r)] + [str(v) for v in counts[i]] for i, r in enumerate(rows)]


def curve_svg(curves: dict[str, list[dict[str, Any]]], width: int = 520, height: int = 240) -> str:
    """Held-out accuracy against training step, one polyline per model (inline SVG)."""
    pad = 40
    max_step = max((p["step"] for pts in curves.values() for p in pts), default=1) or 1
    colours = {"teacher": "#08519c", "student": "#e6550d"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="pretraining curves">',
             f'<rect x="{pad}" y="10" width="{width - pad - 10}" height="{height - pad - 10}" '
             'fill="none" stroke="#999"/>']
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = 10 + (height - pad - 10) * (1 - frac)
        parts.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{int(frac * 100)}%</text>')
    parts.append(f'<text x="{width - 10}" y="{height - 8}" font-size="10" text-anchor="end">'
                 f'step {max_step}</text>')
    for i, (name, pts) in enumerate(curves.items()):
        xy = " ".join(f"{pad + (width - pad - 10) * p['step'] / max_step:.1f},"
                      f"{10 + (height - pad - 10) * (1 - p['eval_accuracy']):.1f}" for p in pts)
        colour = colours.get(name, "#555")
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{xy}"/>')
        parts.append(f'<text x="{pad + 8}" y="{24 + 14 * i}" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _png_uri(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def _columns(entry: dict[str, Any]) -> list[LayerResponses]:
    return [LayerResponses(**c) for c in entry["columns"]]


def _curve_rows(curves: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "step", "held-out accuracy (teacher-forced, %)", "train loss", "seconds"]
    body = [[name, str(p["step"]), f"{100 * p['eval_accuracy']:.1f}",
             "—" if p.get("train_loss") is None else f"{p['train_loss']:.4f}", f"{p['seconds']:.0f}"]
            for name, pts in curves.items() for p in pts]
    return head, body


def write_report(out: Path, seeds: list[dict[str, Any]], setup: dict[str, Any]) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` into ``out``; return the metrics."""
    import json

    from PIL import Image

    agg = aggregate(seeds)
    first = seeds[0]
    metrics = {**agg, "setup": setup, "per_seed": [
        {k: s[k] for k in ("seed", "results", "params", "steps", "seconds", "curves")} for s in seeds]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    head, body = results_table(agg)
    lines_md = ["# VLsI demo report", "",
                f"Seeds: {', '.join(map(str, agg['seeds']))}. " + setup_line(setup, first), ""]
    lines_md += [f"- {v}" for v in verdicts(agg)] + [""]
    lines_md += ["## Results (held-out split; paper Table 4(b) layout)", "", _md_table(head, body)]
    lines_md += ["## Pretraining curves (seed {})".format(first["seed"]), "",
                 _md_table(*_curve_rows(first["curves"]))]
    lines_md += ["## Matched layers (paper Fig. 5, seed {})".format(first["seed"]), ""]
    for name in ("start", "end"):
        hm = first["heatmaps"][name]
        lines_md += [f"{hm.get('title', name)} — `{first['heatmap_png'][name]}`", "",
                     _md_table(*heatmap_rows(hm))]
    lines_md += ["## Verbalization loss per layer (paper appendix B, seed {})".format(first["seed"]), ""]
    for role in ("teacher", "student"):
        lines_md += [f"### {role}", "", _md_table(*layer_loss_rows(first["layer_loss"][role]))]
    lines_md += ["## Layer-wise verbalized responses (paper Fig. 3, seed {})".format(first["seed"]), ""]
    for entry in first["panel"]:
        lines_md.append(markdown_panel(entry["question"], _columns(entry), entry["image"], entry["reference"]))
    lines_md += ["## Wall time per phase (seconds)", "", _md_table(*_time_rows(seeds))]
    (out / "report.md").write_text("\n".join(lines_md) + "\n", encoding="utf-8")

    parts = [f"<p>Seeds: {', '.join(map(str, agg['seeds']))}. {html.escape(setup_line(setup, first))}</p>",
             "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts(agg)) + "</ul>",
             "<h2>Results (held-out split; paper Table 4(b) layout)</h2>", _html_table(head, body),
             f"<h2>Pretraining curves (seed {first['seed']})</h2>",
             "<p>Held-out accuracy (teacher-forced) while the tiny teacher and student are trained "
             "from scratch.</p>", curve_svg(first["curves"]), _html_table(*_curve_rows(first["curves"])),
             f"<h2>Matched layers (paper Fig. 5, seed {first['seed']})</h2><div>"]
    for name in ("start", "end"):
        uri = _png_uri(first["heatmap_png"][name])
        if uri:
            parts.append(f'<img src="{uri}" alt="heatmap {name}" style="margin-right:1em">')
        else:
            parts.append(_html_table(*heatmap_rows(first["heatmaps"][name])))
    parts.append("</div>")
    parts.append(f"<h2>Verbalization loss per layer (paper appendix B, seed {first['seed']})</h2>")
    for role in ("teacher", "student"):
        parts += [f"<h3>{role}</h3>", _html_table(*layer_loss_rows(first["layer_loss"][role]))]
    parts.append(f"<h2>Layer-wise verbalized responses (paper Fig. 3, seed {first['seed']})</h2>")
    for entry in first["panel"]:
        image = None
        if entry["image"] and Path(entry["image"]).is_file():
            with Image.open(entry["image"]) as im:
                image = im.convert("RGB")
        parts.append(html_panel(entry["question"], image, _columns(entry), entry["reference"]))
    parts += ["<h2>Wall time per phase (seconds)</h2>", _html_table(*_time_rows(seeds))]
    (out / "report.html").write_text(html_page("VLsI demo report", "\n".join(parts)), encoding="utf-8")
    return metrics


def _time_rows(seeds: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    phases = list(seeds[0]["seconds"])
    body = [[str(s["seed"])] + [f"{s['seconds'].get(p, 0):.0f}" for p in phases]
            + [f"{sum(s['seconds'].values()):.0f}"] for s in seeds]
    return ["seed"] + phases + ["total"], body


def setup_line(setup: dict[str, Any], first: dict[str, Any]) -> str:
    steps = first["steps"]
    return (f"Teacher {setup['teacher']} ({first['params']['teacher']:,} parameters), student "
            f"{setup['student']} ({first['params']['student']:,}); {setup['num_train']} training and "
            f"{setup['num_eval']} held-out questions. VLsI: interaction {steps['interact']} + SFT "
            f"{steps['sft']} steps; SFT-only: {steps['sft_only']} steps; batch {steps['batch_size']}.")
