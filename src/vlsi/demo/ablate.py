"""``vlsi ablate``: the paper's Table 4 (b, d, e, f) at tiny scale, on the demo's models, and
(g) on-policy interaction with three divergences (not in the paper).

    vlsi ablate [--out runs/ablate] [--only b d e f g] [--seeds 3] [--quick] [--pair DIR]

Every row is one VLsI run of the demo (:mod:`vlsi.demo.pipeline`: the shipped pretrained pair,
the demo's data and budgets) with one setting changed, evaluated on the held-out split with
greedy generation (beam search where the row says so), for each seed. Rows that are the same
run (the default VLsI appears in all four sub-tables) are trained once; verbalizers are trained
once per architecture and seed and shared by the runs that use them. The paper's own numbers
(Qwen2-VL-72B -> VLsI-7B, Table 4 of arXiv 2412.01822) stand beside ours for reference; they
are benchmark scores of 7B models, ours are accuracies of a tiny student, so compare the
ordering of the rows, not the values.

Outputs: ``ablation.md``, ``ablation.html`` (one matplotlib chart per sub-table, inline SVG),
``ablation.json`` and ``table4<x>.svg``; ``runs/<run>/seed-S/`` (a ``vlsi distill`` layout) and
``results/<row>/seed-S.json`` per evaluated row. A rerun skips finished rows and resumes
unfinished runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from vlsi.demo.charts import bar_chart
from vlsi.demo.recipe import DEFAULT_REGIME, DemoRecipe
from vlsi.errors import VlsiError

PAPER_METRICS = ("MMB", "BLINK", "MM-Vet", "MMMU")
NO_SFT_MODEL = "no-sft-model"  # a run's student with the interaction adapter merged


@dataclass(frozen=True)
class Row:
    """One row of a sub-table.

    Attributes:
        overrides: config keys changed from the demo's VLsI run (``interaction.*``,
            ``verbalizer.architecture``).
        sft: evaluate after the SFT step (else the interaction adapter merged alone).
        beams: beam width of the evaluation.
        paper: the paper's (MMB, BLINK, MM-Vet, MMMU), ``None`` for rows the paper has not.
    """

    key: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    sft: bool = True
    beams: int = 1
    paper: tuple[float, float, float, float] | None = None

    @property
    def run(self) -> str:
        """The run this row evaluates (rows with equal overrides share it)."""
        if not self.overrides:
            return "vlsi"
        text = json.dumps(self.overrides, sort_keys=True)
        name = "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(self.overrides.items()))
        return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _ops(il: str, ll: str) -> dict[str, Any]:
    return {"interaction.intermediate_op": il, "interaction.last_op": ll}


def _strategy(name: str, **extra: Any) -> dict[str, Any]:
    return {"interaction.strategy": name, **{f"interaction.{k}": v for k, v in extra.items()}}


def _verbalizer(name: str) -> dict[str, Any]:
    return {"verbalizer.architecture": name}


def _on_policy(share: float, divergence: str) -> dict[str, Any]:
    """Overrides of a (g) row; the paper's setting (off-policy, forward KL) is the default run."""
    overrides: dict[str, Any] = {}
    if share:
        overrides["interaction.on_policy"] = share
    if divergence != "forward":
        overrides["interaction.divergence"] = divergence
    return overrides


ON_POLICY_SHARES = (0.0, 0.5, 1.0)
DIVERGENCE_LABELS = {"forward": "forward KL", "reverse": "reverse KL", "jsd": "JSD (beta 0.5)"}


def subtables(num_beams: int) -> dict[str, tuple[str, list[Row]]]:
    """The four sub-tables; the paper's numbers are from its Table 4 (VLsI-7B, 72B teacher)."""
    vlsi = (86.3, 59.7, 75.8, 69.3)
    return {
        "b": ("Use of the SFT step (Table 4(b))", [
            Row("b/no-sft", "VLsI without SFT", sft=False, paper=(82.1, 49.6, 60.5, 52.9)),
            Row("b/no-sft-beam", f"VLsI without SFT, beam {num_beams}", sft=False, beams=num_beams,
                paper=(85.2, 56.3, 70.9, 63.5)),
            Row("b/sft", "VLsI (with SFT)", paper=vlsi),
        ]),
        "d": ("Operations for intermediate / last layers (Table 4(d))", [
            Row("d/ce-none", "CE / x", _ops("ce", "none"), paper=(79.2, 51.3, 64.5, 56.5)),
            Row("d/ce-ce", "CE / CE", _ops("ce", "ce"), paper=(77.8, 50.2, 63.2, 55.2)),
            Row("d/ce-kld", "CE / KLD", _ops("ce", "kld"), paper=(81.0, 53.5, 67.2, 59.0)),
            Row("d/l2-kld", "L2 / KLD", _ops("l2", "kld"), paper=(81.5, 53.2, 66.8, 58.0)),
            Row("d/kld-none", "KLD / x", _ops("kld", "none"), paper=(83.0, 55.0, 69.5, 61.0)),
            Row("d/kld-ce", "KLD / CE", _ops("kld", "ce"), paper=(81.5, 54.3, 68.5, 59.8)),
            Row("d/none-kld", "x / KLD (last-layer KD; not in the paper)", _ops("none", "kld")),
            Row("d/kld-kld", "KLD / KLD (VLsI)", paper=vlsi),
        ]),
        "e": ("Components of the matching strategy (Table 4(e))", [
            Row("e/random", "random index", _strategy("random"), paper=(77.0, 50.0, 62.0, 52.0)),
            Row("e/uniform", "uniform index", _strategy("uniform"), paper=(79.5, 51.9, 66.5, 55.3)),
            Row("e/bottom-1", "bottom-1 index", _strategy("bottom-k", k=1), paper=(81.2, 53.8, 67.8, 57.7)),
            Row("e/bottom-3", "bottom-3 index", _strategy("bottom-k", k=3), paper=(81.5, 54.0, 68.0, 58.0)),
            Row("e/multinomial", "multinomial sampling", _strategy("multinomial"),
                paper=(82.0, 54.5, 68.5, 58.5)),
            Row("e/range", "+ search range", _strategy("multinomial+range"), paper=(83.5, 55.5, 69.8, 60.0)),
            Row("e/order", "+ order preservation", _strategy("multinomial+range+order"),
                paper=(86.0, 59.2, 75.2, 68.5)),
            Row("e/vlsi", "+ adaptive temperature (VLsI)", paper=vlsi),
            Row("e/normalized", "+ adaptive temperature, normalized rule (not in the paper)",
                _strategy("vlsi", temperature_rule="normalized")),
        ]),
        "f": ("Verbalizer architecture (Table 4(f))", [
            Row("f/decoder-x2", "decoder x2", _verbalizer("decoder-x2"), paper=(85.5, 59.1, 76.2, 68.6)),
            Row("f/decoder", "decoder", _verbalizer("decoder"), paper=(85.7, 59.0, 76.0, 68.4)),
            Row("f/ffn-x2", "FFN x2", _verbalizer("ffn-x2"), paper=(86.3, 59.2, 75.9, 69.3)),
            Row("f/ffn", "FFN", _verbalizer("ffn"), paper=(86.4, 59.4, 75.7, 69.2)),
            Row("f/verb-ffn-x2", "verb-FFN x2", _verbalizer("verb-ffn-x2"), paper=(85.8, 59.9, 75.8, 69.3)),
            Row("f/verb-ffn", "verb-FFN (VLsI)", paper=vlsi),
            Row("f/mlp-x2", "MLP x2", _verbalizer("mlp-x2"), paper=(84.2, 57.5, 74.1, 67.0)),
            Row("f/mlp", "MLP", _verbalizer("mlp"), paper=(83.8, 57.0, 73.5, 66.7)),
        ]),
        "g": ("On-policy interaction and divergence (not in the paper; on-policy = share of micro-batches "
              "the student generates)", [
            Row(f"g/on{share:g}-{divergence}", f"on-policy {share:g}, {label}" + (" (VLsI)" if not
                _on_policy(share, divergence) else ""), _on_policy(share, divergence),
                paper=vlsi if not _on_policy(share, divergence) else None)
            for share in ON_POLICY_SHARES for divergence, label in DIVERGENCE_LABELS.items()
        ]),
    }


def _say(message: str) -> None:
    print(message, flush=True)


class Ablation:
    """Runs and evaluates rows into ``out``; every step is skipped when its result exists."""

    def __init__(self, out: Path, recipe: DemoRecipe, pair: Any, data_dir: Path, items: list,
                 say: Callable[[str], None] = _say):
        self.out, self.recipe, self.pair, self.data_dir, self.items = out, recipe, pair, data_dir, items
        self.say = say

    def _config(self, row: Row, seed: int):
        from vlsi.demo.pipeline import run_config
        from vlsi.train.config import load_config

        root = self.out / "runs" / row.run / f"seed-{seed}"
        root.mkdir(parents=True, exist_ok=True)
        cfg_file = root / "vlsi.yaml"
        if not cfg_file.is_file():
            raw = run_config(self.recipe, root, self.data_dir, self.pair.teacher, self.pair.student, seed)
            cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_config(cfg_file, {**row.overrides, "output_dir": str(root / "vlsi")})

    def _shared_verbalizers(self, cfg, seed: int) -> None:
        """Link the run's verbalizer steps to the ones shared per (architecture, seed)."""
        from vlsi.train.stages.distill import layout

        run = layout(cfg)
        shared = self.out / "verbalizers" / cfg.verbalizer.architecture / f"seed-{seed}"
        run.root.mkdir(parents=True, exist_ok=True)
        for step in (run.teacher_verbalize, run.student_verbalize):
            target = shared / step.name
            if not target.is_dir():
                raise VlsiError(f"{target}: the shared verbalizers were not trained")
            if not step.exists():
                os.symlink(os.path.relpath(target, step.parent), step)

    def verbalizers(self, architecture: str, seed: int) -> None:
        """Train the shared verbalizers of (``architecture``, ``seed``) for both models, into
        ``verbalizers/<architecture>/seed-S/`` (the runs link their verbalization steps there)."""
        from vlsi.train.config import load_config
        from vlsi.train.stages.distill import layout
        from vlsi.train.stages.verbalize import run_verbalize

        base = self._config(Row("default", ""), seed)  # writes runs/vlsi/seed-S/vlsi.yaml
        root = self.out / "verbalizers" / architecture / f"seed-{seed}"
        cfg = load_config(Path(base.output_dir).parent / "vlsi.yaml",
                          {"verbalizer.architecture": architecture, "output_dir": str(root)})
        run = layout(cfg)
        for role in ("teacher", "student"):
            run_verbalize(cfg, role, run.verbalize_dir(role), resume=True)

    def train(self, row: Row, seed: int, merged_without_sft: bool) -> None:
        """The run of ``row`` for ``seed`` (``vlsi distill``), and its interaction-only export."""
        from vlsi.demo.pipeline import export_merged
        from vlsi.train.stages.distill import layout, run_distill

        cfg = self._config(row, seed)
        run = layout(cfg)
        self.say(f"[{row.run} seed {seed}] training")
        self._shared_verbalizers(cfg, seed)
        run_distill(cfg)
        if merged_without_sft:
            export_merged(Path(cfg.student), run.interact_adapter, run.student_verbalize,
                          run.root / NO_SFT_MODEL)

    def result(self, row: Row, seed: int) -> dict[str, Any]:
        """The held-out accuracy of ``row`` for ``seed`` (its run trained by :meth:`train`)."""
        from vlsi.demo.pipeline import evaluate_model
        from vlsi.files import read_json, write_json_atomic
        from vlsi.train.stages.distill import layout

        done = self.out / "results" / row.key / f"seed-{seed}.json"
        if done.is_file():
            return read_json(done)
        run = layout(self._config(row, seed))
        model = run.model if row.sft else run.root / NO_SFT_MODEL
        start = time.perf_counter()
        metrics = evaluate_model(f"{row.key.replace('/', '_')}-beams{row.beams}", model, self.items,
                                 run.root / "eval", self.recipe, row.beams)
        result = {"row": row.key, "seed": seed, "run": row.run, "accuracy": metrics["accuracy"],
                  "by_category": metrics["by_category"], "count": metrics["count"],
                  "eval_seconds": round(time.perf_counter() - start, 1),
                  "interact_seconds_per_step": interact_seconds_per_step(run.interact)}
        write_json_atomic(done, result)
        return result


def interact_seconds_per_step(step_dir: Path) -> float | None:
    """The interaction step's training time per optimizer step (the Trainer's ``train_runtime``
    over its steps, from ``metrics.jsonl``); ``None`` when the log has no such record."""
    path = Path(step_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ends = [r for r in records if "train_runtime" in r]
    if not ends or not ends[-1].get("step"):
        return None
    return ends[-1]["train_runtime"] / ends[-1]["step"]


def summarize_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    accs = [r["accuracy"] for r in results]
    seconds = [r["interact_seconds_per_step"] for r in results if r.get("interact_seconds_per_step")]
    return {"per_seed": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "interact_seconds_per_step": statistics.fmean(seconds) if seconds else None}


def table_markdown(title: str, rows: list[Row], summary: dict[str, dict[str, Any]]) -> str:
    head = (["row", "accuracy (%) mean ± std", "per seed", "interaction s/step"]
            + [f"paper {m}" for m in PAPER_METRICS])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = summary[row.key]
        paper = [f"{v:.1f}" for v in row.paper] if row.paper else ["—"] * len(PAPER_METRICS)
        step = s.get("interact_seconds_per_step")
        lines.append("| " + " | ".join([row.label, f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}",
                                        ", ".join(f"{100 * v:.1f}" for v in s["per_seed"]),
                                        f"{step:.2f}" if step else "—"] + paper) + " |")
    return "\n".join(lines) + "\n"


def table_chart(title: str, rows: list[Row], summary: dict[str, dict[str, Any]]) -> str:
    return bar_chart([r.label for r in rows], [summary[r.key]["mean"] for r in rows],
                     errors=[summary[r.key]["std"] for r in rows],
                     notes=[f"paper MMB {r.paper[0]:.1f}" if r.paper else "not in the paper" for r in rows],
                     x_title="held-out accuracy (%), mean ± std over seeds", title=title)


def run_ablate(out: str | Path = "runs/ablate", *, only: list[str] | None = None, seeds: int = 3,
               quick: bool = False, pair_dir: str | Path | None = None, command: str | None = None,
               recipe: DemoRecipe | None = None, say: Callable[[str], None] = _say,
               regime: str = DEFAULT_REGIME) -> dict[str, Any]:
    """Run the chosen sub-tables into ``out`` (on ``regime``'s pair) and write the tables and charts."""
    from vlsi.demo.run import prepare_run
    from vlsi.demo.workers import run_all
    from vlsi.tools.pages import render

    start = time.perf_counter()
    out = Path(out)
    recipe, pair, data_dir, items = prepare_run(out, recipe, quick=quick, seeds=seeds, pair_dir=pair_dir,
                                                regime=regime)
    ablation = Ablation(out, recipe, pair, data_dir, items, say)
    tables = subtables(recipe.num_beams)
    chosen = only or list(tables)
    rows = [row for name in chosen for row in tables[name][1]]
    architectures = sorted({row.overrides.get("verbalizer.architecture", "verb-ffn") for row in rows})
    # verbalizers first (shared by the rows of one architecture), then each distinct run once,
    # then every (row, seed)'s evaluation
    run_all(ablation.verbalizers, [(a, s) for a in architectures for s in range(seeds)], recipe.workers)
    runs = {}
    for row in rows:
        first, without_sft = runs.get(row.run, (row, False))
        runs[row.run] = (first, without_sft or not row.sft)
    run_all(ablation.train, [(first, s, without_sft) for first, without_sft in runs.values()
                             for s in range(seeds)], recipe.workers)
    results = run_all(ablation.result, [(row, s) for row in rows for s in range(seeds)], recipe.workers)
    summary: dict[str, dict[str, Any]] = {}
    for k, row in enumerate(rows):
        summary[row.key] = summarize_row(results[k * seeds:(k + 1) * seeds])
    wall = round(time.perf_counter() - start, 1)
    header = (f"Command: `{command or ' '.join(['vlsi', *sys.argv[1:]])}`; {seeds} seed(s); "
              f"{len(items)} held-out questions; this invocation {wall:.0f} s (finished rows are reused). "
              "Paper columns: arXiv 2412.01822 Table 4 (Qwen2-VL-72B -> VLsI-7B).")
    md = ["# VLsI ablations (paper Table 4 at tiny scale)", "", header, ""]
    charts = []
    for name in chosen:
        title, rows = tables[name]
        md.append(table_markdown(title, rows, summary))
        svg = table_chart(title, rows, summary)
        (out / f"table4{name}.svg").write_text(svg)
        charts.append({"title": title, "svg": svg, "markdown": table_markdown(title, rows, summary)})
    (out / "ablation.md").write_text("\n".join(md), encoding="utf-8")
    page = render("ablation.html.j2", package="vlsi.demo", title="VLsI ablations", header=header, tables=charts)
    (out / "ablation.html").write_text(page, encoding="utf-8")
    result = {"seeds": seeds, "quick": quick, "wall_seconds": wall, "command": command,
              "tables": {n: {"title": tables[n][0],
                             "rows": [{**asdict(r), **summary[r.key]} for r in tables[n][1]]}
                         for n in chosen}}
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    say(f"ablation tables: {out / 'ablation.md'} (charts in ablation.html); {wall:.0f} s")
    return result
