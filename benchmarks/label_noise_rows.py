"""Rows that separate where label noise enters a demo run (docs/demo.md, "Label noise");
on a clean run, the same rows without noise.

For each seed of a finished ``vlsi demo --label-noise S --out DIR`` run, at the demo's equal
compute (interaction + SFT optimizer steps, batch 32), from the student before:

* ``llkd_only``: last-layer KD alone (interaction with intermediate op ``none``) for all the
  steps; the labels are never trained on (the teacher grades the noisy responses' prefixes);
* ``sft_clean_subset``: SFT-only on the first ``--clean`` distillation records with their clean
  answers (an annotator who labelled less but right).

    python benchmarks/label_noise_rows.py runs/demo-lists-noise --clean 800

Writes ``DIR/noise-rows/seed-S/`` and prints one JSON line per row and seed, then the means.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vlsi.demo.pipeline import distillation_data, evaluate_model, export_merged
from vlsi.demo.recipe import DemoRecipe
from vlsi.files import read_json
from vlsi.tools.evaluate import load_items
from vlsi.train.config import load_config
from vlsi.train.stages.distill import layout
from vlsi.train.stages.interact import run_interact
from vlsi.train.stages.sft import run_sft


ROWS = ("llkd_only", "sft_clean_subset")


def run_seed(demo: Path, seed: int, clean: int, items: list, recipe: DemoRecipe,
             rows: tuple[str, ...] = ROWS) -> dict[str, float]:
    cfg_file = demo / f"seed-{seed}" / "vlsi.yaml"
    base = load_config(cfg_file)
    run = layout(base)
    steps = base.stage("interact").max_steps + base.stage("sft").max_steps
    out = demo / "noise-rows" / f"seed-{seed}"
    models = {}
    if "llkd_only" in rows:
        llkd_cfg = load_config(cfg_file, {"interaction.intermediate_op": "none", "interact.max_steps": steps})
        run_interact(llkd_cfg, out / "llkd-only", teacher_verbalizers=run.teacher_verbalize,
                     student_verbalizers=run.student_verbalize, resume=True)
        models["llkd_only"] = export_merged(Path(base.student), out / "llkd-only" / "adapter",
                                            run.student_verbalize, out / "llkd-only-model")
    if "sft_clean_subset" in rows:
        clean_cfg = load_config(cfg_file, {"sft.max_steps": steps,
                                           "data.train": [str(distillation_data(demo / "data", clean))]})
        models["sft_clean_subset"] = run_sft(clean_cfg, out / "sft-clean", adapter=None,
                                             student_verbalizers=run.student_verbalize, resume=True)
    return {name: evaluate_model(name, model, items, out / "eval", recipe)["accuracy"]
            for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a finished `vlsi demo --label-noise` directory")
    parser.add_argument("--clean", type=int, default=800, help="clean records for the SFT row")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    args = parser.parse_args()
    metrics = read_json(args.demo / "metrics.json")
    recipe = DemoRecipe(max_new_tokens=metrics["setup"]["recipe"]["max_new_tokens"])
    items, _ = load_items(args.demo / "data" / "eval.json")
    rows: dict[str, list[float]] = {}
    for seed in metrics["seeds"]:
        for name, acc in run_seed(args.demo, seed, args.clean, items, recipe, tuple(args.rows)).items():
            print(json.dumps({"seed": seed, "row": name, "accuracy": acc}), flush=True)
            rows.setdefault(name, []).append(acc)
    for name, accs in rows.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name}: {100 * statistics.fmean(accs):.1f} ± {100 * std:.1f} "
              f"(per seed {', '.join(f'{100 * a:.1f}' for a in accs)})")


if __name__ == "__main__":
    main()
