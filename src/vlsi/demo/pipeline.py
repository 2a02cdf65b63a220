"""One seed of the demo: distil the pretrained pair three ways at equal compute, evaluate.

Layout under ``OUT/seed-S/``::

    vlsi.yaml           the run config (``vlsi distill vlsi.yaml`` reruns VLsI alone)
    vlsi/               ``vlsi distill`` steps 1-4: verbalizers, interaction, SFT
    vlsi-no-sft/        the student with the interaction LoRA merged (Table 4(b))
    llkd/               last-layer KD: the interaction step with intermediate op ``none``
                        (3-interact/), then the same SFT (4-sft/)
    sft-only/           SFT from the student before, fresh LoRA, for as many optimizer steps
                        (and so samples) as interaction + SFT together
    eval/<row>.jsonl    predictions on the held-out split, eval/<row>.json metrics
    panel.json          Fig. 3 panel: per-layer responses to a few eval questions
    seed.json           this seed's results, written last (a rerun reuses it)

Equal compute: every student row gets the same optimizer steps, batch and samples after the
student before. Verbalization trains the verbalizers only (the backbones are frozen), so it
is not counted as student training. The teacher and the student before do not depend on the
seed; they are evaluated once, in ``OUT/eval/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import yaml

from vlsi.backbones import load_model
from vlsi.config import load_config
from vlsi.demo.pair import Pair
from vlsi.demo.recipe import DemoRecipe, StageBudget
from vlsi.evaluate import EvalItem, evaluate
from vlsi.export import export_student
from vlsi.inference import Generator
from vlsi.layer_view import layer_responses
from vlsi.files import read_json, read_jsonl, write_json_atomic
from vlsi.stages.distill import layout, run_distill
from vlsi.stages.interact import run_interact
from vlsi.lora import with_adapter
from vlsi.stages.sft import run_sft
from vlsi.verbalizer import VerbalizerSet

# Table 4(b) rows, in order: (key, label). The first two are fixed models (one evaluation).
FIXED_ROWS = (
    ("teacher", "Teacher (large backbone)"),
    ("student_before", "Student before"),
)
SEED_ROWS = (
    ("sft_only", "Student, SFT only"),
    ("llkd", "Last-layer KD + SFT"),
    ("vlsi_no_sft", "VLsI without the SFT step (greedy)"),
    ("vlsi_no_sft_beam", "VLsI without the SFT step (beam search)"),
    ("vlsi", "VLsI"),
)
ROWS = FIXED_ROWS + SEED_ROWS
SEED_RESULT = "seed.json"
MAX_LENGTH = 256


def training_config(budget: StageBudget, seed: int) -> dict[str, Any]:
    return dict(learning_rate=budget.learning_rate, min_learning_rate=budget.min_learning_rate,
                max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
                gradient_accumulation_steps=1, warmup_ratio=0.05, gradient_checkpointing=False,
                bf16=False, logging_steps=max(1, min(25, budget.steps // 4)),
                save_steps=max(50, budget.steps // 3), save_total_limit=1, seed=seed)


def run_config(recipe: DemoRecipe, root: Path, data_dir: Path, teacher: Path, student: Path,
               seed: int) -> dict[str, Any]:
    """The ``vlsi distill`` config of this seed (written to ``vlsi.yaml``)."""
    return {
        "teacher": str(teacher), "student": str(student), "output_dir": str(root / "vlsi"),
        "data": {"train": [str(distillation_data(data_dir, recipe.distill_samples))], "image_root": str(data_dir),
                 "max_length": MAX_LENGTH},
        # every layer below the last is a target layer: t_s x t_l matching at this size
        "verbalizer": {"architecture": "verb-ffn",
                       "teacher_layers": list(range(recipe.teacher.num_layers - 1)),
                       "student_layers": list(range(recipe.student.num_layers - 1))},
        "interaction": {"strategy": recipe.strategy, "temperature_rule": recipe.temperature_rule,
                        "chunk_size": 128},
        "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": 0.0},
        "training": training_config(recipe.sft, seed),
        "verbalize": training_config(recipe.verbalize, seed),
        "interact": training_config(recipe.interact, seed),
        "sft": training_config(recipe.sft, seed),
    }


def distillation_data(data_dir: Path, samples: int | None) -> Path:
    """The training file the distillation steps read: ``train.json``, or its first ``samples``
    records (``distill-N.json``, written once)."""
    if samples is None:
        return data_dir / "train.json"
    subset = data_dir / f"distill-{samples}.json"
    if not subset.is_file():
        records = json.loads((data_dir / "train.json").read_text())
        write_json_atomic(subset, records[:samples])
    return subset


class Clock:
    """Wall time per phase, and a one-line announcement of each."""

    def __init__(self, label: str, say: Callable[[str], None]):
        self.label, self.say, self.seconds = label, say, {}

    def phase(self, name: str, what: str):
        clock = self

        class _Phase:
            def __enter__(self):
                clock.say(f"[{clock.label}] {what}")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 2)

        return _Phase()


def export_merged(student: Path, adapter: Path, verbalizers: Path, out: Path) -> Path:
    """The student with ``adapter`` merged, exported to ``out`` (kept if already there)."""
    if (out / "config.json").is_file():
        return out
    merged = with_adapter(load_model(student), adapter)
    return export_student(merged, student, out, verbalizers_dir=verbalizers)


def evaluate_model(name: str, model_dir: Path, items: list[EvalItem], out: Path,
                   recipe: DemoRecipe, num_beams: int = 1) -> dict[str, Any]:
    """Greedy (or beam) accuracy of ``model_dir`` on ``items``; predictions in ``out/name.jsonl``."""
    metrics_file = out / f"{name}.json"
    if metrics_file.is_file():
        return read_json(metrics_file)
    generator = Generator.from_pretrained(model_dir)
    result = evaluate(generator, items, max_new_tokens=recipe.max_new_tokens, num_beams=num_beams,
                      desc=f"eval {name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.predictions))
    metrics = {**result.metrics(), "num_beams": num_beams}
    write_json_atomic(metrics_file, metrics)
    return metrics


def panel_items(items: list[EvalItem], count: int) -> list[EvalItem]:
    """The first short-answer eval question of each category, then more, up to ``count``."""
    chosen, seen = [], set()
    for it in items:
        if not it.options and it.category not in seen:
            chosen.append(it)
            seen.add(it.category)
    chosen += [it for it in items if not it.options and it not in chosen]
    return chosen[:count]


def _panel(models: list[tuple[str, Path, Path]], items: list[EvalItem], max_new_tokens: int
           ) -> list[dict[str, Any]]:
    """Per-layer responses of each (label, model dir, verbalizer dir) to each item."""
    columns = []
    for label, model_dir, verb_dir in models:
        generator = Generator.from_pretrained(model_dir)
        vset = VerbalizerSet.load(verb_dir, generator.backbone)
        columns.append(layer_responses(generator, vset, [it.prompt for it in items],
                                       max_new_tokens, name=label))
    return [{"id": it.id, "category": it.category, "question": it.prompt.text,
             "image": str(it.prompt.images[0]) if it.prompt.images else None,
             "reference": it.reference,
             "columns": [asdict(col[i]) for col in columns]} for i, it in enumerate(items)]


def matching_entropy(interact_dir: Path) -> dict[str, list[list[float]]]:
    """Per student target layer, ``[step, entropy]`` points from ``metrics.jsonl``."""
    curves: dict[str, list[list[float]]] = {}
    for record in read_jsonl(interact_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("matching_entropy/") and "step" in record:
                curves.setdefault(key.split("/", 1)[1], []).append([record["step"], value])
    return curves


def run_map_point(recipe: DemoRecipe, out: Path, data_dir: Path, pair: Pair, items: list[EvalItem],
                  step: int, seed: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """VLsI from the teacher snapshot of pretraining step ``step`` (a weaker teacher), one seed:
    ``OUT/map/teacher-step-N/seed-S/``. Returns the teacher's and VLsI's held-out results."""
    root = out / "map" / f"teacher-step-{step}"
    done = root / f"seed-{seed}" / SEED_RESULT
    if done.is_file():
        return read_json(done)
    teacher = pair.snapshot(step)
    teacher_result = evaluate_model("teacher", teacher, items, root / "eval", recipe)
    seed_root = root / f"seed-{seed}"
    seed_root.mkdir(parents=True, exist_ok=True)
    cfg_file = seed_root / "vlsi.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(recipe, seed_root, data_dir, teacher, pair.student, seed),
                                       sort_keys=False))
    cfg = load_config(cfg_file)
    say(f"[map: teacher of step {step}, seed {seed}] VLsI")
    start = time.perf_counter()
    run_distill(cfg)
    vlsi = evaluate_model("vlsi", layout(cfg).model, items, seed_root / "eval", recipe)
    result = {"step": step, "seed": seed, "teacher": teacher_result, "vlsi": vlsi,
              "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(done, result)
    return result


def run_seed(recipe: DemoRecipe, out: Path, data_dir: Path, pair: Pair, items: list[EvalItem],
             seed: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything for one seed; returns (and writes to ``seed.json``) its results."""
    root = out / f"seed-{seed}"
    if (root / SEED_RESULT).is_file():
        say(f"[seed {seed}] done earlier, reusing {root / SEED_RESULT}")
        return read_json(root / SEED_RESULT)
    root.mkdir(parents=True, exist_ok=True)
    clock = Clock(f"seed {seed}", say)
    cfg_file = root / "vlsi.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(recipe, root, data_dir, pair.teacher, pair.student,
                                                  seed), sort_keys=False))
    cfg = load_config(cfg_file)
    run = layout(cfg)
    student = Path(cfg.student)
    with clock.phase("vlsi", "VLsI: verbalize teacher and student, interact, SFT"):
        run_distill(cfg)
    with clock.phase("vlsi_no_sft_export", "exporting the student after interaction only"):
        no_sft = export_merged(student, run.interact_adapter, run.student_verbalize, root / "vlsi-no-sft")
    llkd_cfg = load_config(cfg_file, {"interaction.intermediate_op": "none"})
    with clock.phase("llkd", "last-layer KD: interaction with intermediate op none, then SFT"):
        run_interact(llkd_cfg, root / "llkd" / "3-interact", teacher_verbalizers=run.teacher_verbalize,
                     student_verbalizers=run.student_verbalize, resume=True)
        llkd = run_sft(llkd_cfg, root / "llkd" / "4-sft", adapter=root / "llkd" / "3-interact" / "adapter",
                       student_verbalizers=run.student_verbalize, resume=True)
    baseline_steps = recipe.interact.steps + recipe.sft.steps
    sft_only_cfg = load_config(cfg_file, {"sft.max_steps": baseline_steps})
    with clock.phase("sft_only", f"SFT-only baseline ({baseline_steps} steps, fresh LoRA)"):
        sft_only = run_sft(sft_only_cfg, root / "sft-only", adapter=None,
                           student_verbalizers=run.student_verbalize, resume=True)

    models = {"sft_only": (sft_only, 1), "llkd": (llkd, 1), "vlsi_no_sft": (no_sft, 1),
              "vlsi_no_sft_beam": (no_sft, recipe.num_beams), "vlsi": (run.model, 1)}
    results = {}
    with clock.phase("eval", f"evaluating {len(models)} rows on {len(items)} held-out questions"):
        for key, _label in SEED_ROWS:
            model_dir, beams = models[key]
            results[key] = evaluate_model(key, model_dir, items, root / "eval", recipe, beams)

    with clock.phase("panel", "verbalizing each layer for the Fig. 3 panel"):
        panel = _panel([("Student before", student, run.student_verbalize),
                        ("VLsI", run.model, run.student_verbalize),
                        ("Teacher", Path(cfg.teacher), run.teacher_verbalize)],
                       panel_items(items, recipe.panel_questions), recipe.max_new_tokens)
    write_json_atomic(root / "panel.json", panel)

    result = {
        "seed": seed,
        "results": results,
        "models": {k: str(v[0]) for k, v in models.items()},
        "layer_loss": {"teacher": read_json(run.teacher_verbalize / "layer_loss.json"),
                       "student": read_json(run.student_verbalize / "layer_loss.json")},
        "heatmaps": {name: read_json(run.interact / f"heatmap_{name}.json") for name in ("start", "end")},
        "heatmap_png": {name: str(run.interact / f"heatmap_{name}.png") for name in ("start", "end")},
        "matching_entropy": matching_entropy(run.interact),
        "panel": panel,
        "config": str(cfg_file),
        "steps": {"interact": recipe.interact.steps, "sft": recipe.sft.steps,
                  "sft_only": baseline_steps, "batch_size": recipe.sft.batch_size},
        "seconds": clock.seconds,
    }
    write_json_atomic(root / SEED_RESULT, result)
    return result
