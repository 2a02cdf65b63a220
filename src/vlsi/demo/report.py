"""The demo's report: ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

Every figure comes from this run's files (the seeds' ``seed.json``, the evaluations, the pair's
``pair.json``); nothing is typed in. Accuracies over seeds are mean ± sample standard
deviation. The claim is decided on paired differences: per seed, VLsI minus SFT-only and VLsI
minus last-layer KD (same seed, same data order for the SFT step, same held-out questions).
"VLsI beats X" is said only when every seed's difference is positive and their mean exceeds
their standard deviation; with one seed the claim is not tested.

The HTML is the ``report.html.j2`` template (:mod:`vlsi.tools.pages`); it inlines its images (data
URIs) and its matplotlib charts (inline SVG, :mod:`vlsi.demo.charts`), so it is one file with no
external asset.
"""

from __future__ import annotations

import base64
import datetime
import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from vlsi import __version__
from vlsi.demo.charts import line_chart
from vlsi.demo.pipeline import FIXED_ROWS, ON_POLICY_SHARE, ROWS, SEED_ROWS
from vlsi.demo.pretrain import curve_measure
from vlsi.demo.regime import regime_line, regime_rows
from vlsi.tools.layer_view import LayerResponses, markdown_panel, panel
from vlsi.tools.pages import render

COMPARISONS = (("sft_only", "SFT-only"), ("llkd", "last-layer KD"))
PLATEAU_GAIN = 0.01  # a model is at its plateau when its last 20% of steps add less


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(vlsi: list[float], other: list[float]) -> dict[str, Any]:
    """Per-seed differences and the verdict rule of the module docstring."""
    diffs = [a - b for a, b in zip(vlsi, other)]
    mean, std = mean_std(diffs)
    tested = len(diffs) > 1
    return {"per_seed": diffs, "mean": mean, "std": std, "tested": tested,
            "beats": tested and all(d > 0 for d in diffs) and mean > std}


def _row(label: str, results: list[dict[str, Any]], fixed: bool) -> dict[str, Any]:
    accs = [r["accuracy"] for r in results]
    mean, std = mean_std(accs)
    cats = sorted(results[0]["by_category"])
    return {"label": label, "fixed": fixed, "per_seed": accs, "mean": mean, "std": std,
            "by_category": {c: mean_std([r["by_category"].get(c, 0.0) for r in results])[0] for c in cats},
            "count": results[0]["count"], "num_beams": results[0].get("num_beams", 1)}


def aggregate(fixed: dict[str, dict[str, Any]], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per row and category, paired differences and the verdicts' inputs."""
    rows = {key: _row(label, [fixed[key]], True) for key, label in FIXED_ROWS}
    rows.update({key: _row(label, [s["results"][key] for s in seeds], False) for key, label in SEED_ROWS})
    students = [k for k, _ in ROWS if k != "teacher"]
    best = max(students, key=lambda k: rows[k]["mean"])
    return {
        "rows": rows,
        "num_seeds": len(seeds),
        "seeds": [s["seed"] for s in seeds],
        "best_student": best,
        "teacher_margin": rows["teacher"]["mean"] - rows[best]["mean"],
        "teacher_gap_to_student_before": rows["teacher"]["mean"] - rows["student_before"]["mean"],
        "paired": {key: paired(rows["vlsi"]["per_seed"], rows[key]["per_seed"]) for key, _ in COMPARISONS},
        "beam_minus_greedy": paired(rows["vlsi_no_sft_beam"]["per_seed"], rows["vlsi_no_sft"]["per_seed"]),
        "on_policy_minus_vlsi": paired(rows["vlsi_on_policy"]["per_seed"], rows["vlsi"]["per_seed"]),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def verdicts(agg: dict[str, Any]) -> list[str]:
    """The claims, in words, decided by the numbers."""
    rows = agg["rows"]
    best = rows[agg["best_student"]]
    if agg["teacher_margin"] > 0:
        out = [f"The teacher beats every student variant: {_pct(rows['teacher']['mean'])} against "
               f"{_pct(best['mean'])} for the best one ({best['label']}); it is "
               f"{_pts(agg['teacher_gap_to_student_before'])} above the student before."]
    else:
        out = [f"The teacher does NOT beat every student variant: {best['label']} reaches "
               f"{_pct(best['mean'])} against the teacher's {_pct(rows['teacher']['mean'])}."]
    for key, name in COMPARISONS:
        p = agg["paired"][key]
        per_seed = ", ".join(_pts(d) for d in p["per_seed"])
        if not p["tested"]:
            out.append(f"VLsI minus {name}: {_pts(p['mean'])} on one seed; the claim needs several "
                       "seeds (--seeds 3).")
        elif p["beats"]:
            out.append(f"VLsI beats {name}: {_pts(p['mean'])} ± {100 * p['std']:.1f} over "
                       f"{agg['num_seeds']} seeds, positive on every seed ({per_seed}).")
        else:
            why = ("not positive on every seed" if not all(d > 0 for d in p["per_seed"])
                   else "the mean does not exceed the standard deviation")
            out.append(f"VLsI does NOT beat {name}: VLsI minus {name} is {_pts(p['mean'])} ± "
                       f"{100 * p['std']:.1f} ({why}; per seed: {per_seed}).")
    on_policy = agg["on_policy_minus_vlsi"]
    per_seed = ", ".join(_pts(d) for d in on_policy["per_seed"])
    out.append(f"VLsI on-policy (λ = {ON_POLICY_SHARE:g}) minus VLsI: {_pts(on_policy['mean'])}"
               + (f" ± {100 * on_policy['std']:.1f} (per seed: {per_seed})" if on_policy["tested"]
                  else " on one seed") + ".")
    beam = agg["beam_minus_greedy"]
    before = rows["student_before"]["mean"]
    out.append(f"Against the student before: SFT-only {_pts(rows['sft_only']['mean'] - before)}, "
               f"last-layer KD {_pts(rows['llkd']['mean'] - before)}, interaction alone "
               f"{_pts(rows['vlsi_no_sft']['mean'] - before)} (beam search {_pts(beam['mean'])} "
               f"on top), VLsI {_pts(rows['vlsi']['mean'] - before)}, VLsI on-policy "
               f"{_pts(rows['vlsi_on_policy']['mean'] - before)}.")
    return out


# ---------------------------------------------------------------------------------------------
# Provenance


def _git_commit() -> str:
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def provenance(setup: dict[str, Any]) -> list[tuple[str, str]]:
    import torch
    import transformers

    pair = setup["pair"]
    meta = pair["meta"]
    regime = setup.get("regime_name", "counts")
    flag = "" if regime == "custom" else f" --regime {regime}"
    rebuilt = (f"shipped with the package ({Path(pair['dir']).name}/); rebuild it from scratch with "
               f"`vlsi demo pretrain{flag} --out DIR` (then `vlsi demo{flag} --pair DIR`)") if pair["shipped"] \
        else f"built by `vlsi demo pretrain` in {pair['dir']}"
    built = meta["built_with"]
    threads = ", ".join(f"{role} {n}" for role, n in built.get("threads", {}).items())
    built_with = (f"torch {built.get('torch')}, Python {built.get('python')} on {built.get('machine')}, "
                  f"threads {threads}")
    return [
        ("command", setup["command"]),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("vlsi", f"{__version__}, commit {_git_commit()}"),
        ("software", f"torch {torch.__version__}, transformers {transformers.__version__}, "
                     f"Python {platform.python_version()} on {platform.machine()}"),
        ("regime", regime),
        ("pretrained pair", f"{rebuilt}; built with {built_with}; training time teacher "
                            f"{meta['seconds']['teacher']:.0f} s + student {meta['seconds']['student']:.0f} s"),
    ]


def recipe_rows(setup: dict[str, Any], agg: dict[str, Any]) -> list[tuple[str, str]]:
    r = setup["recipe"]
    meta = setup["pair"]["meta"]

    def size(role: str) -> str:
        s = r[role]
        return (f"{s['num_layers']} layers x {s['hidden_size']} (vision {s['vision_depth']} x "
                f"{s['vision_width']}), {meta['params'][role]:,} parameters")

    def budget(name: str) -> str:
        b = r[name]
        return f"{b['steps']} steps of {b['batch_size']}, lr {b['learning_rate']:g} cosine to {b['min_learning_rate']:g}"

    task = r["task"]
    return [
        ("teacher", size("teacher") + "; pretrained " + budget("teacher_pretrain")),
        ("student", size("student") + "; pretrained " + budget("student_pretrain")
         + ", the teacher's vision encoder copied in and frozen"),
        ("data", f"{task['num_train']} training questions ({', '.join(task['categories'])}), "
                 f"distillation on {r['distill_samples'] or task['num_train']} of them"
                 + (f" with {100 * r['label_noise']:g}% of their answers wrong (a missed list item or "
                    f"a count off by one)" if r.get("label_noise") else "")
                 + f"; {setup['num_eval']} held-out questions evaluated (clean), greedy generation"),
        ("processes", f"{setup.get('workers', r['workers'])} seed(s) side by side, "
                      f"{setup.get('threads_per_worker', 'all')} torch thread(s) each"),
        ("verbalization", budget("verbalize") + " per model; verb-FFN on every layer below the last"),
        ("interaction", budget("interact") + f"; matching {r['strategy']}, temperature rule "
                        f"{r['temperature_rule']}; KLD / KLD ops"),
        ("SFT", budget("sft")),
        ("SFT-only baseline", f"{r['interact']['steps'] + r['sft']['steps']} steps, as interaction + SFT"),
        ("LoRA", f"r={r['lora_r']}, alpha={r['lora_alpha']}, the language model's linear layers"),
        ("beam search", f"{r['num_beams']} beams (VLsI without SFT)"),
        ("seeds", ", ".join(map(str, agg["seeds"])) + " (the distillation's seeds; the pair is fixed)"),
    ]


# ---------------------------------------------------------------------------------------------
# Tables


def results_table(agg: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows, n = agg["rows"], agg["num_seeds"]
    cats = list(rows["teacher"]["by_category"])
    head = ["model"] + [f"seed {s}" for s in agg["seeds"]] + ["mean ± std (%)"] + [f"{c} (%)" for c in cats]
    body = []
    for key, _ in ROWS:
        r = rows[key]
        seeds = ["(fixed)"] * n if r["fixed"] else [f"{100 * v:.1f}" for v in r["per_seed"]]
        summary = f"{100 * r['mean']:.1f}" + ("" if r["fixed"] or n < 2 else f" ± {100 * r['std']:.1f}")
        body.append([r["label"]] + seeds + [summary] + [f"{100 * r['by_category'][c]:.1f}" for c in cats])
    return head, body


def paired_table(agg: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["difference"] + [f"seed {s}" for s in agg["seeds"]] + ["mean ± std (pts)", "verdict"]
    body = []
    for key, name in COMPARISONS:
        p = agg["paired"][key]
        verdict = "not tested (one seed)" if not p["tested"] else ("VLsI beats it" if p["beats"] else "no win")
        body.append([f"VLsI minus {name}"] + [f"{100 * d:+.1f}" for d in p["per_seed"]]
                    + [f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f}", verdict])
    on_policy = agg["on_policy_minus_vlsi"]
    body.append([f"VLsI on-policy (λ = {ON_POLICY_SHARE:g}) minus VLsI"]
                + [f"{100 * d:+.1f}" for d in on_policy["per_seed"]]
                + [f"{100 * on_policy['mean']:+.1f} ± {100 * on_policy['std']:.1f}", ""])
    beam = agg["beam_minus_greedy"]
    body.append(["beam minus greedy (VLsI without SFT)"] + [f"{100 * d:+.1f}" for d in beam["per_seed"]]
                + [f"{100 * beam['mean']:+.1f} ± {100 * beam['std']:.1f}", ""])
    return head, body


def time_rows(seeds: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    phases = list(seeds[0]["seconds"])
    body = [[str(s["seed"])] + [f"{s['seconds'].get(p, 0):.0f}" for p in phases]
            + [f"{sum(s['seconds'].values()):.0f}"] for s in seeds]
    return ["seed"] + phases + ["total"], body


def layer_loss_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target layer"] + table["columns"]
    body = [[str(layer)] + ["—" if v is None else f"{v:.4f}" for v in table["loss"][str(layer)]]
            for layer in table["layers"]]
    return head, body


def heatmap_rows(hm: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The heatmap's counts as a table: one row per student layer."""
    cols, rows, counts = hm.get("col_labels", []), hm.get("row_labels", []), hm.get("counts", [])
    head = ["student \\ teacher"] + [str(c) for c in cols]
    return head, [[str(r)] + [str(v) for v in counts[i]] for i, r in enumerate(rows)]


def curve_rows(curves: dict[str, list[dict[str, Any]]], measure: str = "teacher-forced"
               ) -> tuple[list[str], list[list[str]]]:
    head = ["model", "step", f"held-out accuracy ({measure}, %)", "train loss"]
    body = [[name, str(p["step"]), f"{100 * p['eval_accuracy']:.1f}",
             "—" if p.get("train_loss") is None else f"{p['train_loss']:.4f}"]
            for name, pts in curves.items() for p in pts]
    return head, body


def accuracy_at(points: list[dict[str, Any]], step: float) -> float:
    """Held-out accuracy at ``step``, linear between the curve points around it."""
    before = max((p for p in points if p["step"] <= step), key=lambda p: p["step"], default=points[0])
    after = min((p for p in points if p["step"] >= step), key=lambda p: p["step"], default=points[-1])
    if after["step"] == before["step"]:
        return before["eval_accuracy"]
    w = (step - before["step"]) / (after["step"] - before["step"])
    return (1 - w) * before["eval_accuracy"] + w * after["eval_accuracy"]


def plateau_line(curves: dict[str, list[dict[str, Any]]]) -> str:
    """How much the last 20% of each pretraining run added (the plateau criterion).

    The accuracy at 80% of the steps is interpolated between the two curve points around
    that step when none falls on it (a point before it would measure a longer window).
    """
    parts = []
    for name, pts in curves.items():
        if len(pts) < 2:
            continue
        last = pts[-1]
        cut = 0.8 * last["step"]
        gain = last["eval_accuracy"] - accuracy_at(pts, cut)
        on_point = any(p["step"] == cut for p in pts)
        where = f"step {cut:,.0f}" + ("" if on_point else " (interpolated)")
        verdict = "at its plateau" if gain < PLATEAU_GAIN else "not at its plateau"
        parts.append(f"{name}: {_pts(gain)} from {where} to {last['step']:,} ({verdict})")
    return (f"Last 20% of pretraining (a model is at its plateau when it adds less than "
            f"{100 * PLATEAU_GAIN:.0f} point): " + "; ".join(parts) + ".")


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _kv_table(pairs: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    return ["", ""], [[k, v] for k, v in pairs]


def _png_uri(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def _columns(entry: dict[str, Any]) -> list[LayerResponses]:
    return [LayerResponses(**c) for c in entry["columns"]]


def curve_svg(curves: dict[str, list[dict[str, Any]]]) -> str:
    series = {name: [(p["step"], p["eval_accuracy"]) for p in pts] for name, pts in curves.items()}
    return line_chart(series, x_title="optimizer step (batch 32)", y_title="held-out accuracy",
                      title="pretraining curves", y_range=(0.0, 1.0), y_percent=True)


def entropy_svg(entropy: dict[str, list[list[float]]]) -> str:
    series = {f"student layer {k}": [(s, e) for s, e in pts] for k, pts in entropy.items()}
    return line_chart(series, x_title="interaction step", y_title="entropy (nats)",
                      title="entropy of the matching distribution per student target layer")


def generation_rows(generations: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["interaction step", "generated response", "tokens", "ended with EOS"]
    return head, [[str(g["step"]), g["text"], str(g["tokens"]), "yes" if g["ended"] else "no (cut)"]
                  for g in generations]


def entropy_rows(entropy: dict[str, list[list[float]]]) -> tuple[list[str], list[list[str]]]:
    head = ["student target layer", "first logged (nats)", "last logged (nats)"]
    return head, [[k, f"{pts[0][1]:.3f}", f"{pts[-1][1]:.3f}"] for k, pts in entropy.items() if pts]


# ---------------------------------------------------------------------------------------------
# Writing


def teacher_map(agg: dict[str, Any], strengths: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per teacher strength: its accuracy, its gap to the student before, and VLsI minus SFT-only
    paired by seed (the final teacher is the main result's)."""
    rows = agg["rows"]
    before, sft = rows["student_before"]["mean"], rows["sft_only"]["per_seed"]
    points = []
    for runs in strengths:
        teacher = runs[0]["teacher"]["accuracy"]
        points.append({"teacher_step": runs[0]["step"], "teacher": teacher, "gap": teacher - before,
                       **paired([r["vlsi"]["accuracy"] for r in runs], sft[:len(runs)])})
    points.append({"teacher_step": "final", "teacher": rows["teacher"]["mean"],
                   "gap": rows["teacher"]["mean"] - before, **agg["paired"]["sft_only"]})
    return points


def map_rows(points: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["teacher (pretraining step)", "teacher accuracy (%)", "gap to student before (pts)",
            "VLsI minus SFT-only per seed (pts)", "mean ± std (pts)", "verdict"]
    body = [[str(p["teacher_step"]), f"{100 * p['teacher']:.1f}", f"{100 * p['gap']:+.1f}",
             ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"]),
             f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f}",
             "VLsI beats it" if p["beats"] else ("not tested" if not p["tested"] else "no win")] for p in points]
    return head, body


def map_svg(points: list[dict[str, Any]]) -> str:
    series = {"VLsI minus SFT-only (mean)": [(100 * p["gap"], 100 * p["mean"]) for p in points],
              "mean - std": [(100 * p["gap"], 100 * (p["mean"] - p["std"])) for p in points],
              "mean + std": [(100 * p["gap"], 100 * (p["mean"] + p["std"])) for p in points]}
    ys = [y for pts in series.values() for _, y in pts]
    span = (min(0.0, min(ys)), max(0.0, max(ys)))  # zero (no gain) is always on the chart
    return line_chart(series, x_title="teacher minus student before (accuracy points)",
                      y_title="VLsI minus SFT-only (points)", y_range=span,
                      title="VLsI minus SFT-only against teacher strength")


REGIME_TITLE = "## Information in the targets (teacher distributions on distillation response tokens)"


def write_report(out: Path, fixed: dict[str, dict[str, Any]], seeds: list[dict[str, Any]],
                 setup: dict[str, Any], strengths: list[list[dict[str, Any]]] | None = None,
                 regime: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` into ``out``; return the metrics.

    ``regime``: :func:`vlsi.demo.regime.measure_regime`'s numbers (``metrics["regime"]``).
    """
    from PIL import Image

    agg = aggregate(fixed, seeds)
    points = teacher_map(agg, strengths) if strengths else None
    if points:
        agg["teacher_map"] = points
    if regime is not None:
        agg["regime"] = regime
    first = seeds[0]
    curves = setup["pair"]["meta"]["curves"]
    measure = curve_measure(setup["recipe"]["task"]["categories"])
    config_text = Path(first["config"]).read_text() if Path(first["config"]).is_file() else ""
    metrics = {**agg, "setup": setup, "per_seed": [
        {k: s[k] for k in ("seed", "results", "steps", "seconds", "matching_entropy")} for s in seeds]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    prov, recipe = _kv_table(provenance(setup)), _kv_table(recipe_rows(setup, agg))
    times = time_rows(seeds)
    md = ["# VLsI demo report", "", _md_table(*prov), "## Verdict", ""]
    md += [f"- {v}" for v in verdicts(agg)] + [""]
    md += [f"## Wall time per phase (seconds; this invocation {setup['wall_seconds']:.0f} s)", "",
           _md_table(*times)]
    md += ["## Results (held-out split, accuracy %; paper Table 4(b) layout)", "", _md_table(*results_table(agg))]
    md += ["## Paired differences (percentage points)", "", _md_table(*paired_table(agg))]
    if regime is not None:
        md += [REGIME_TITLE, "", regime_line(regime), "", _md_table(*regime_rows(regime))]
    if points:
        md += ["## Teacher strength map (VLsI minus SFT-only against the teacher-student gap)", "",
               _md_table(*map_rows(points))]
    md += ["## Setup", "", _md_table(*recipe)]
    md += ["## Pretraining curves", "", plateau_line(curves), "", _md_table(*curve_rows(curves, measure))]
    md += [f"## Matching entropy (seed {first['seed']})", "", _md_table(*entropy_rows(first["matching_entropy"]))]
    gen_title = (f"On-policy responses (VLsI on-policy, seed {first['seed']}: the first ones the student "
                 "generated, as logged)")
    if first.get("generations"):
        md += [f"## {gen_title}", "", _md_table(*generation_rows(first["generations"]))]
    md += [f"## Matched layers (paper Fig. 5, seed {first['seed']})", ""]
    for name in ("start", "end"):
        hm = first["heatmaps"][name]
        md += [f"{hm.get('title', name)} — `{first['heatmap_png'][name]}` (selection counts)", "",
               _md_table(*heatmap_rows(hm))]
    md += [f"## Verbalization loss per layer (paper appendix B, seed {first['seed']})", ""]
    for role in ("teacher", "student"):
        md += [f"### {role}", "", _md_table(*layer_loss_rows(first["layer_loss"][role]))]
    md += [f"## Layer-wise verbalized responses (paper Fig. 3, seed {first['seed']})", ""]
    for entry in first["panel"]:
        md.append(markdown_panel(entry["question"], _columns(entry), entry["image"], entry["reference"]))
    md += [f"## Resolved config (seed {first['seed']}, `{first['config']}`)", "", "```yaml",
           config_text.rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    panels = []
    for entry in first["panel"]:
        image = None
        if entry["image"] and Path(entry["image"]).is_file():
            with Image.open(entry["image"]) as im:
                image = im.convert("RGB")
        panels.append(panel(entry["question"], image, _columns(entry), entry["reference"]))
    page = render(
        "report.html.j2", package="vlsi.demo", title="VLsI demo report", prov=prov, verdicts=verdicts(agg),
        wall_seconds=setup["wall_seconds"], times=times, results=results_table(agg),
        paired=paired_table(agg),
        regime={"title": REGIME_TITLE[3:], "line": regime_line(regime), "table": regime_rows(regime)}
        if regime is not None else None,
        teacher_map={"svg": map_svg(points), "table": map_rows(points)} if points else None,
        recipe=recipe, plateau=plateau_line(curves), curves_svg=curve_svg(curves),
        curve_points=curve_rows(curves, measure), seed=first["seed"],
        entropy_svg=entropy_svg(first["matching_entropy"]) if first["matching_entropy"] else None,
        entropy=entropy_rows(first["matching_entropy"]),
        generations={"title": gen_title, "table": generation_rows(first["generations"])}
        if first.get("generations") else None,
        heatmaps=[{"name": name, "uri": _png_uri(first["heatmap_png"][name]),
                   "table": heatmap_rows(first["heatmaps"][name])} for name in ("start", "end")],
        layer_loss=[(role, layer_loss_rows(first["layer_loss"][role])) for role in ("teacher", "student")],
        panels=panels, config_name=first["config"], config_text=config_text)
    (out / "report.html").write_text(page, encoding="utf-8")
    return metrics
