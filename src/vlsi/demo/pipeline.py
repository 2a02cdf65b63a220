"""One seed of the demo: train the tiny pair, run VLsI and the SFT-only baseline, evaluate.

Layout under ``OUT/seed-S/``::

    init/{teacher,student}/   the random-initialised tiny Qwen2-VL pair (one tokenizer)
    teacher/                  the trained teacher (model/, curve.json)       "large backbone"
    student/                  the trained student (model/, curve.json)       "student before"
    vlsi.yaml                 the run config (``vlsi distill vlsi.yaml`` reruns the pipeline)
    vlsi/                     ``vlsi distill`` steps 1-4 (verbalizers, interaction, SFT)
    vlsi-no-sft/              the student with the interaction LoRA merged (Table 4(b) row 4)
    sft-only/                 the baseline: SFT from the same student, fresh LoRA, for as many
                              optimizer steps (and so samples) as interaction + SFT together
    eval/<model>.jsonl        predictions on the held-out split, eval/<model>.json metrics
    panel.json                Fig. 3 panel: per-layer responses to a few eval questions
    seed.json                 this seed's results, written last (a rerun reuses it)

Everything resumes: finished parts are kept, unfinished Trainer stages continue from their
newest checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import yaml
from torch.utils.data import Subset

from vlsi.backbones import ImageEncoder, load_model, load_tokenizer
from vlsi.config import TrainingConfig, load_config
from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.demo.pretrain import pretrain
from vlsi.demo.recipe import DemoRecipe, StageBudget
from vlsi.evaluate import EvalItem, evaluate, load_items
from vlsi.export import export_student
from vlsi.inference import Generator
from vlsi.layer_view import layer_responses
from vlsi.stages.common import read_json, write_json_atomic
from vlsi.stages.distill import layout, run_distill
from vlsi.stages.sft import _with_adapter, run_sft
from vlsi.tiny import save_tiny_pair
from vlsi.verbalizer import VerbalizerSet

# Table 4(b) rows, in order: (key, label)
ROWS = (
    ("teacher", "Teacher (large backbone)"),
    ("student_before", "Student before"),
    ("sft_only", "Student, SFT only"),
    ("vlsi_no_sft", "VLsI without the SFT step"),
    ("vlsi", "VLsI"),
)
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
        "data": {"train": [str(data_dir / "train.json")], "eval": [str(data_dir / "eval.json")],
                 "image_root": str(data_dir), "max_length": MAX_LENGTH},
        # every layer below the last is a target layer: t_s x t_l matching at this size
        "verbalizer": {"architecture": "verb-ffn",
                       "teacher_layers": list(range(recipe.teacher.num_layers - 1)),
                       "student_layers": list(range(recipe.student.num_layers - 1))},
        "interaction": {"strategy": "vlsi", "chunk_size": 128},
        "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": 0.0},
        "training": training_config(recipe.sft, seed),
        "verbalize": training_config(recipe.verbalize, seed),
        "interact": training_config(recipe.interact, seed),
        "sft": training_config(recipe.sft, seed),
    }


class Clock:
    """Wall time per phase, and a one-line announcement of each."""

    def __init__(self, seed: int, say: Callable[[str], None]):
        self.seed, self.say, self.seconds = seed, say, {}

    def phase(self, name: str, what: str):
        clock = self

        class _Phase:
            def __enter__(self):
                clock.say(f"[seed {clock.seed}] {what}")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 2)

        return _Phase()


def _export_no_sft(cfg_student: Path, adapter: Path, verbalizers: Path, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    merged = _with_adapter(load_model(cfg_student), adapter)
    return export_student(merged, cfg_student, out, verbalizers_dir=verbalizers)


def _evaluate(name: str, model_dir: Path, items: list[EvalItem], out: Path,
              recipe: DemoRecipe) -> dict[str, Any]:
    metrics_file = out / f"{name}.json"
    if metrics_file.is_file():
        return read_json(metrics_file)
    generator = Generator.from_pretrained(model_dir)
    result = evaluate(generator, items, max_new_tokens=recipe.max_new_tokens, desc=f"eval {name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.predictions))
    metrics = result.metrics()
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


def run_seed(recipe: DemoRecipe, out: Path, data_dir: Path, seed: int,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything for one seed; returns (and writes to ``seed.json``) its results."""
    root = out / f"seed-{seed}"
    if (root / SEED_RESULT).is_file():
        say(f"[seed {seed}] done earlier, reusing {root / SEED_RESULT}")
        return read_json(root / SEED_RESULT)
    clock = Clock(seed, say)
    pair = save_tiny_pair(root / "init", "qwen2_vl", teacher=recipe.teacher,
                          student=recipe.student, seed=seed)
    tokenizer = load_tokenizer(pair.student)
    images = ImageEncoder.from_pretrained(pair.student)
    train = VisualInstructionDataset.from_files([data_dir / "train.json"], tokenizer, images,
                                                max_length=MAX_LENGTH)
    evalset = VisualInstructionDataset.from_files([data_dir / "eval.json"], tokenizer, images,
                                                  max_length=MAX_LENGTH)
    curve_set = Subset(evalset, range(min(recipe.curve_samples, len(evalset))))
    collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tokenizer)

    pretrained = {}
    for role, init, budget in (("teacher", pair.teacher, recipe.teacher_pretrain),
                               ("student", pair.student, recipe.student_pretrain)):
        with clock.phase(f"{role}_pretrain", f"training the tiny {role} ({budget.steps} steps)"):
            tcfg = TrainingConfig(**training_config(budget, seed))
            pretrained[role] = pretrain(init, root / role, train, curve_set, collate, tcfg,
                                        eval_every=recipe.curve_every, name=f"{role} pretraining")

    cfg_file = root / "vlsi.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(recipe, root, data_dir, pretrained["teacher"].model_dir,
                                                  pretrained["student"].model_dir, seed), sort_keys=False))
    cfg = load_config(cfg_file)
    run = layout(cfg)
    with clock.phase("vlsi", "VLsI: verbalize teacher and student, interact, SFT"):
        run_distill(cfg)
    with clock.phase("vlsi_no_sft_export", "exporting the student after interaction only"):
        no_sft = _export_no_sft(Path(cfg.student), run.interact_adapter, run.student_verbalize,
                                root / "vlsi-no-sft")
    baseline_steps = recipe.interact.steps + recipe.sft.steps
    sft_only_cfg = load_config(cfg_file, {"sft.max_steps": baseline_steps})
    with clock.phase("sft_only", f"SFT-only baseline ({baseline_steps} steps, fresh LoRA)"):
        sft_only = run_sft(sft_only_cfg, root / "sft-only", adapter=None,
                           student_verbalizers=run.student_verbalize, resume=True)

    models = {"teacher": pretrained["teacher"].model_dir,
              "student_before": pretrained["student"].model_dir,
              "sft_only": sft_only, "vlsi_no_sft": no_sft, "vlsi": run.model}
    items, _ = load_items(data_dir / "eval.json")
    results = {}
    with clock.phase("eval", f"evaluating {len(models)} models on {len(items)} held-out questions"):
        for key, _label in ROWS:
            results[key] = _evaluate(key, models[key], items, root / "eval", recipe)

    with clock.phase("panel", "verbalizing each layer for the Fig. 3 panel"):
        panel = _panel([("Student before", models["student_before"], run.student_verbalize),
                        ("VLsI", models["vlsi"], run.student_verbalize),
                        ("Teacher", models["teacher"], run.teacher_verbalize)],
                       panel_items(items, recipe.panel_questions), recipe.max_new_tokens)
    write_json_atomic(root / "panel.json", panel)

    result = {
        "seed": seed,
        "results": results,
        "models": {k: str(v) for k, v in models.items()},
        "params": {"teacher": pretrained["teacher"].params, "student": pretrained["student"].params},
        "curves": {role: p.curve for role, p in pretrained.items()},
        "layer_loss": {"teacher": read_json(run.teacher_verbalize / "layer_loss.json"),
                       "student": read_json(run.student_verbalize / "layer_loss.json")},
        "heatmaps": {name: read_json(run.interact / f"heatmap_{name}.json") for name in ("start", "end")},
        "heatmap_png": {name: str(run.interact / f"heatmap_{name}.png") for name in ("start", "end")},
        "panel": panel,
        "steps": {"interact": recipe.interact.steps, "sft": recipe.sft.steps,
                  "sft_only": baseline_steps, "batch_size": recipe.sft.batch_size},
        "seconds": clock.seconds,
    }
    write_json_atomic(root / SEED_RESULT, result)
    return result
