"""``vlsi demo``: the method's claim, measured on an embedded default, offline, on a CPU.

    vlsi demo [--regime lists|counts] [--out runs/demo] [--seeds 3] [--quick] [--pair DIR]
              [--teacher-map]
    vlsi demo pretrain [--regime lists|counts] --out DIR [--quick]

``--regime`` picks the task and pair (:data:`vlsi.demo.recipe.REGIMES`, docs/demo.md).

1. writes the synthetic visual-instruction dataset (``OUT/data``; :mod:`vlsi.demo.recipe`) and
   checks it is the one the pretrained pair was trained on;
2. takes the pretrained tiny Qwen2-VL pair trained on that data, the student with the
   teacher's frozen vision encoder (:mod:`vlsi.demo.pair`: shipped with the package;
   ``vlsi demo pretrain`` rebuilds it; the report shows both pretraining curves);
3. per seed, distils the student three ways with the same optimizer steps, batch and samples:
   SFT only, last-layer KD + SFT, and VLsI (verbalize both, interaction with adaptive layer
   matching, SFT) (:mod:`vlsi.demo.pipeline`);
4. evaluates every row on the held-out split with greedy generation (beam search for VLsI
   without SFT too; :mod:`vlsi.tools.evaluate`);
5. measures what the distillation targets hold beyond the labels, with the first seed's teacher
   verbalizers (:mod:`vlsi.demo.regime`, ``OUT/regime.json``);
6. writes ``report.html`` (self-contained), ``report.md`` and ``metrics.json`` into ``OUT``
   (:mod:`vlsi.demo.report`), with the paired per-seed differences, the ``regime`` numbers and
   the verdict.

The seeds vary the distillation (LoRA initialisation, data order, matching draws), not the
pretrained pair. ``--teacher-map`` also runs VLsI from the weaker teachers saved during the
teacher's pretraining (``pair.json``'s snapshots) and maps VLsI minus SFT-only against the
teacher-student gap. ``--quick`` runs the same pipeline on a fraction of the budget (a plumbing
check, used by the test suite; its numbers mean little). A rerun into the same ``OUT`` reuses
finished seeds and stages and resumes unfinished ones; a different recipe needs a fresh ``OUT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vlsi.demo.recipe import DEFAULT_REGIME, REGIMES, DemoRecipe
from vlsi.errors import VlsiError

RECIPE_FILE = "recipe.json"


def _say(message: str) -> None:
    print(message, flush=True)


def _check_recipe(out: Path, recipe: DemoRecipe, quick: bool, pair_dir: Path) -> None:
    """Refuse to mix runs: ``OUT`` keeps the recipe (and pair) it was started with."""
    current = json.loads(json.dumps({"quick": quick, "pair": str(pair_dir.resolve()), **asdict(recipe)}))
    path = out / RECIPE_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != current:
            raise VlsiError(f"{out} holds a demo run with a different recipe "
                            f"({'--quick' if before.get('quick') else 'full'}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")


def prepare_data(out: Path, recipe: DemoRecipe, pair: Any) -> Path:
    """``OUT/data``, regenerated; refused if it is not the data the pair was trained on."""
    from vlsi.data.synthetic import generate_dataset
    from vlsi.demo.pair import data_digest, rebuild_command

    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        _say(f"writing the synthetic dataset to {data_dir}")
        generate_dataset(data_dir, recipe.task, overwrite=True)
    if data_digest(data_dir) != pair.meta["data_sha256"]:
        raise VlsiError(f"{data_dir} differs from the data the pretrained pair was trained on; "
                        f"rebuild the pair with `{rebuild_command(recipe)}`")
    return data_dir


def regime_recipe(regime: str) -> DemoRecipe:
    """The recipe of a demo regime (refused in one line when unknown)."""
    if regime not in REGIMES:
        raise VlsiError(f"unknown demo regime {regime!r}; choose from {', '.join(REGIMES)}")
    return REGIMES[regime]()


def prepare_run(out: Path, recipe: DemoRecipe | None, *, quick: bool, seeds: int,
                pair_dir: str | Path | None, regime: str = DEFAULT_REGIME
                ) -> tuple[DemoRecipe, Any, Path, list[Any]]:
    """What ``vlsi demo`` and ``vlsi ablate`` start with: the recipe (``--quick`` applied), the
    pretrained pair, ``OUT/data`` checked against it, and the held-out questions."""
    from transformers.utils import logging as hf_logging

    from vlsi.demo.pair import load_pair, shipped_pair
    from vlsi.demo.pipeline import distillation_data
    from vlsi.tools.evaluate import load_items

    if seeds < 1:
        raise VlsiError(f"--seeds must be at least 1, got {seeds}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    recipe = recipe or regime_recipe(regime)
    pair = load_pair(pair_dir or shipped_pair(regime), recipe)
    if quick:
        recipe = recipe.quick()
    _check_recipe(out, recipe, quick, pair.root)
    data_dir = prepare_data(out, recipe, pair)
    distillation_data(data_dir, recipe.distill_samples, recipe.label_noise)  # before any worker reads it
    items, _ = load_items(data_dir / "eval.json")
    return recipe, pair, data_dir, items[: recipe.eval_samples] if recipe.eval_samples else items


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, seeds: int = 3, seed: int = 0,
             recipe: DemoRecipe | None = None, pair_dir: str | Path | None = None,
             command: str | None = None, teacher_map: bool = False,
             regime: str = DEFAULT_REGIME, label_noise: float = 0.0) -> dict[str, Any]:
    """Run the demo into ``out`` and return its metrics (see the module docstring)."""
    from vlsi.demo.pipeline import FIXED_ROWS, distillation_data, evaluate_model, run_map_point, run_seed
    from vlsi.demo.regime import demo_regime
    from vlsi.demo.report import verdicts, write_report
    from vlsi.demo.workers import run_all, threads_per_worker, torch_threads
    from vlsi.train.config import load_config
    from vlsi.train.stages.distill import layout

    start = time.perf_counter()
    out = Path(out)
    if label_noise:
        recipe = replace(recipe or regime_recipe(regime), label_noise=label_noise)
    recipe, pair, data_dir, items = prepare_run(out, recipe, quick=quick, seeds=seeds, pair_dir=pair_dir,
                                                regime=regime)
    fixed = {}
    for key, label in FIXED_ROWS:
        _say(f"evaluating the {label.lower()} on {len(items)} held-out questions")
        fixed[key] = evaluate_model(key, pair.teacher if key == "teacher" else pair.student, items,
                                    out / "eval", recipe)
    seed_list = list(range(seed, seed + seeds))
    results = run_all(run_seed, [(recipe, out, data_dir, pair, items, s, _say) for s in seed_list],
                      recipe.workers)
    first_config = results[0]["config"]
    # the first records of the distillation data (whose first records are train.json's), in a
    # file of their own, so that the rest of train.json is not scanned here
    measured = min(recipe.regime_samples, recipe.distill_samples or recipe.regime_samples)
    _say(f"measuring the targets' information on {measured} distillation samples")
    targets = demo_regime(out, first_config, layout(load_config(first_config)).teacher_verbalize,
                         measured, distillation_data(data_dir, measured))
    strengths = []
    if teacher_map:
        steps = sorted(int(k) for k in pair.meta["teacher_snapshots"])
        points = run_all(run_map_point, [(recipe, out, data_dir, pair, items, step, s, _say)
                                         for step in steps for s in seed_list], recipe.workers)
        strengths = [points[k * seeds:(k + 1) * seeds] for k in range(len(steps))]
    setup = {"recipe": json.loads(json.dumps(asdict(recipe))), "quick": quick,
             "workers": min(recipe.workers, seeds),
             "threads_per_worker": threads_per_worker(recipe.workers) if seeds > 1 else torch_threads(),
             "regime_name": regime if recipe_matches(recipe, regime) else "custom",
             "pair": {"dir": str(pair.root), "shipped": pair.shipped, "meta": pair.meta},
             "command": command or " ".join(["vlsi", *sys.argv[1:]]),
             "num_eval": len(items), "wall_seconds": round(time.perf_counter() - start, 1)}
    metrics = write_report(out, fixed, results, setup, strengths, targets)
    _say("")
    for line in _summary(metrics):
        _say(line)
    if targets:
        _say(targets_summary(targets))
    for line in verdicts(metrics):
        _say(line)
    _say(f"this invocation took {setup['wall_seconds']:.0f} s (finished seeds are reused; per-seed "
         f"times are in the report); report: {out / 'report.html'} (also report.md, metrics.json)")
    return metrics


def targets_summary(targets: dict[str, Any]) -> str:
    """The ``regime`` numbers in one line: what the teacher's targets hold beyond the labels."""
    layers = ", ".join(f"{v['label_probability']:.2f}" for v in targets["verbalized"])
    return (f"targets ({targets['samples']} distillation samples, {targets['mean_response_tokens']:.1f} response "
            f"tokens each; t_s = {targets['student_target_layers']}, t_l = {targets['teacher_target_layers']}): "
            f"the teacher's output has entropy {targets['teacher_entropy_nats']:.3f} nats and gives the label "
            f"{targets['teacher_label_probability']:.3f} (KL from the label {targets['teacher_label_kl_nats']:.3f}); "
            f"its verbalized layers give the label {layers}")


def recipe_matches(recipe: DemoRecipe, regime: str) -> bool:
    """Whether ``recipe`` is ``regime``'s (its ``--quick`` form included)."""
    base, clean = REGIMES[regime](), replace(recipe, label_noise=0.0)
    return clean in (base, base.quick())


def run_pretrain(out: str | Path, *, quick: bool = False, recipe: DemoRecipe | None = None,
                 teacher_from: str | Path | None = None, regime: str = DEFAULT_REGIME) -> int:
    """``vlsi demo pretrain``: build the pair; compare it with the shipped one when comparable.

    ``teacher_from``: a pair directory (or ``shipped``) whose teacher is reused, so that only
    the student trains.
    """
    from vlsi.demo.pair import build_pair, compare_pairs, load_teacher_source, read_pair, shipped_pair

    recipe = recipe or regime_recipe(regime)
    if quick:
        recipe = recipe.quick_pretraining()
    source = None if teacher_from is None else load_teacher_source(teacher_from, regime)
    pair = build_pair(out, recipe, say=_say, teacher_from=source)
    _say(f"pair written to {pair.root} ({pair.meta['wall_seconds']:.0f} s): teacher {pair.teacher}, "
         f"student {pair.student}")
    shipped = shipped_pair(regime) / "pair.json"
    if not quick and shipped.is_file():
        reference = read_pair(shipped_pair(regime))
        if reference.meta["recipe"] == pair.meta["recipe"]:
            diffs = compare_pairs(pair, reference)
            _say("identical to the shipped pair" if not diffs else
                 f"differs from the shipped pair in {len(diffs)} files: {', '.join(diffs[:6])} "
                 f"(built with {reference.meta['built_with']}, here {pair.meta['built_with']})")
    return 0


def _summary(metrics: dict[str, Any]) -> list[str]:
    n = metrics["num_seeds"]
    lines = [f"{'model':<40} accuracy (%)" + (f" over {n} seeds" if n > 1 else "")]
    for key, row in metrics["rows"].items():
        value = f"{100 * row['mean']:.1f}" + (f" ± {100 * row['std']:.1f}" if n > 1 and not row["fixed"] else "")
        lines.append(f"{row['label']:<40} {value}")
    return lines

