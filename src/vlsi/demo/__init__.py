"""``vlsi demo``: the whole method on an embedded default, offline, on a CPU.

    vlsi demo [--out runs/demo] [--quick] [--seeds N] [--seed S]

1. writes the synthetic visual-instruction dataset (``OUT/data``; :mod:`vlsi.demo.recipe`);
2. per seed, builds a tiny Qwen2-VL teacher ("large backbone": more and wider layers) and student
   sharing one tokenizer and trains both from scratch (:mod:`vlsi.demo.pretrain`);
3. runs VLsI (``vlsi distill``: verbalize both, interaction with adaptive layer matching, SFT) and
   the SFT-only baseline from the same student with as many samples and optimizer steps as
   interaction + SFT together (:mod:`vlsi.demo.pipeline`);
4. evaluates the teacher, the student before, SFT-only, VLsI without its SFT step and VLsI on
   the held-out split with greedy generation (:mod:`vlsi.evaluate`);
5. writes ``report.html`` (self-contained), ``report.md`` and ``metrics.json`` into ``OUT``
   (:mod:`vlsi.demo.report`).

``--seeds N`` repeats steps 2-4 for seeds S..S+N-1 on the same data and reports mean ± std.
``--quick`` runs the same pipeline on a fraction of the budget (a plumbing check, used by the
test suite; its numbers mean little). A rerun into the same ``OUT`` reuses finished seeds and
stages and resumes unfinished ones; a different recipe needs a fresh ``OUT``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlsi.demo.recipe import DemoRecipe
from vlsi.errors import VlsiError

RECIPE_FILE = "recipe.json"


def _say(message: str) -> None:
    print(message, flush=True)


def _check_recipe(out: Path, recipe: DemoRecipe, quick: bool) -> None:
    """Refuse to mix runs: ``OUT`` keeps the recipe it was started with."""
    current = json.loads(json.dumps({"quick": quick, **asdict(recipe)}))
    path = out / RECIPE_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != current:
            raise VlsiError(f"{out} holds a demo run with a different recipe "
                            f"({'--quick' if before.get('quick') else 'full'}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, seeds: int = 1, seed: int = 0,
             recipe: DemoRecipe | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` and return its metrics (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    from vlsi.data.synthetic import generate_dataset
    from vlsi.demo.pipeline import run_seed
    from vlsi.demo.report import verdicts, write_report

    if seeds < 1:
        raise VlsiError(f"--seeds must be at least 1, got {seeds}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    recipe = recipe or DemoRecipe()
    if quick:
        recipe = recipe.quick()
    out = Path(out)
    _check_recipe(out, recipe, quick)
    start = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        _say(f"writing the synthetic dataset to {data_dir}")
        generate_dataset(data_dir, recipe.task, overwrite=True)
    results = [run_seed(recipe, out, data_dir, s, _say) for s in range(seed, seed + seeds)]
    setup = {"teacher": _size(recipe.teacher), "student": _size(recipe.student),
             "num_train": recipe.task.num_train, "num_eval": recipe.task.num_eval,
             "quick": quick, "wall_seconds": round(time.perf_counter() - start, 1)}
    metrics = write_report(out, results, setup)
    _say("")
    for line in _summary(metrics):
        _say(line)
    for line in verdicts(metrics):
        _say(line)
    _say(f"this invocation took {setup['wall_seconds']:.0f} s (finished seeds are reused; per-seed "
         f"times are in the report); report: {out / 'report.html'} (also report.md, metrics.json)")
    return metrics


def _size(size: Any) -> str:
    return (f"{size.num_layers} layers x {size.hidden_size} "
            f"(vision {size.vision_depth} x {size.vision_width})")


def _summary(metrics: dict[str, Any]) -> list[str]:
    n = metrics["num_seeds"]
    lines = [f"{'model':<28} accuracy (%)" + (f" over {n} seeds" if n > 1 else "")]
    for key, row in metrics["rows"].items():
        value = f"{100 * row['mean']:.1f}" + (f" ± {100 * row['std']:.1f}" if n > 1 else "")
        lines.append(f"{row['label']:<28} {value}")
    return lines
