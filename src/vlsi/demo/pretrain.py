"""Train a tiny backbone from its random initialisation: the demo's "large" and "small" VLMs.

VLsI starts from two trained VLMs. The demo has none (nothing is downloaded), so it trains its
tiny Qwen2-VL teacher and student itself: every parameter (vision encoder, projector, language
model) with the model's own next-token loss on the synthetic training split, through the
transformers ``Trainer`` (cosine schedule to ``min_learning_rate``, AdamW).

While training, :class:`CurveCallback` measures held-out accuracy every ``eval_every`` steps on
a fixed subset of the eval split, teacher-forced (a reply counts when every supervised token is
the argmax prediction; one forward pass, no generation), so the report can show the learning
curves behind the chosen sizes and budgets. The final scores of the report come from
generation (:mod:`vlsi.tools.evaluate`), not from this.

Output directory: ``model/`` (a stock HF checkpoint: weights, tokenizer, processor),
``curve.json`` (the curve), ``metrics.jsonl``, Trainer checkpoints while running (a rerun
resumes from the newest) and ``step_complete.json`` last.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, set_seed

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import LIST_CATEGORIES
from vlsi.files import read_json, utc_now, write_json_atomic
from vlsi.models.backbones import Backbone, ImageEncoder, load_backbone
from vlsi.tools.evaluate import EvalItem, evaluate
from vlsi.tools.inference import Generator
from vlsi.train.config import TrainingConfig
from vlsi.train.export import export_student
from vlsi.train.stages.arguments import training_arguments
from vlsi.train.stages.callbacks import stage_callbacks, use_loss_progress_bar
from vlsi.train.stages.checkpoints import latest_checkpoint, remove_incomplete, training_finished
from vlsi.train.stages.run import STEP_COMPLETE, VlsiTrainerMixin, stage_complete

MODEL_DIR = "model"
SNAPSHOTS = "snapshots"
CURVE = "curve.json"
CURVE_PARTIAL = "curve.partial.json"  # the points so far, for a resumed run


class PretrainTrainer(VlsiTrainerMixin, Trainer):
    """Full-parameter next-token training (the model's own loss; all weights trainable)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        loss = self.finite_or_skipped(model, out[0] if return_outputs else out)
        return (loss, out[1]) if return_outputs else loss


@torch.no_grad()
def teacher_forced_accuracy(backbone: Backbone, dataset: VisualInstructionDataset,
                            collate: VisionLanguageCollator, batch_size: int = 64) -> float:
    """Share of samples whose every supervised token is the model's argmax prediction."""
    model = backbone.model
    was_training = model.training
    model.eval()
    hits = 0
    device = backbone.lm_head.weight.device
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {k: v.to(device) for k, v in backbone.model_inputs(batch).items()}
        logits = model(**inputs, logits_to_keep=0).logits
        pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:].to(device)
        hits += int(((pred == gold) | (gold == -100)).all(dim=1).sum())
    model.train(was_training)
    return hits / len(dataset)


GREEDY, TEACHER_FORCED = "greedy generation", "teacher-forced"


def curve_measure(categories: tuple[str, ...] | list[str]) -> str:
    """How the pretraining curve measures held-out accuracy on a task of ``categories``: greedy
    answers when some are free-form lists (any order is right), else teacher-forced argmax."""
    return GREEDY if set(categories) & set(LIST_CATEGORIES) else TEACHER_FORCED


def generated_accuracy(items: list[EvalItem], tokenizer: Any, images: ImageEncoder,
                       max_new_tokens: int) -> Callable[[Backbone], float]:
    """A curve measure: held-out accuracy of greedy generation on ``items``, scored as
    :func:`vlsi.tools.evaluate.score` scores them (order-free for ``unordered`` items)."""
    def measure(backbone: Backbone) -> float:
        was_training = backbone.model.training
        result = evaluate(Generator(backbone, tokenizer, images), items, batch_size=64,
                          max_new_tokens=max_new_tokens, progress=False)
        backbone.model.train(was_training)
        return result.accuracy
    return measure


class CurveCallback(TrainerCallback):
    """Every ``eval_every`` optimizer steps (and at the end): held-out accuracy and train loss.

    ``measure`` gives the accuracy (default: :func:`teacher_forced_accuracy` on ``eval_set``).
    """

    def __init__(self, backbone: Backbone, eval_set: VisualInstructionDataset,
                 collate: VisionLanguageCollator, eval_every: int, points: list[dict[str, Any]],
                 partial: Path | None = None, measure: Callable[[Backbone], float] | None = None):
        self.backbone, self.eval_set, self.collate = backbone, eval_set, collate
        self.measure = measure or (lambda b: teacher_forced_accuracy(b, self.eval_set, self.collate))
        self.eval_every, self.points, self.partial = eval_every, points, partial
        self._last_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.eval_every == 0 or step == state.max_steps:
            if self.points and self.points[-1]["step"] == step:
                return
            acc = self.measure(self.backbone)
            self.points.append({"step": step, "eval_accuracy": acc, "train_loss": self._last_loss,
                                "seconds": time.perf_counter() - self._start})
            if self.partial is not None:
                write_json_atomic(self.partial, {"points": self.points})

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()


class SnapshotCallback(TrainerCallback):
    """Exports the model at the given optimizer steps to ``out/snapshots/step-N`` (weaker
    versions of the same model, e.g. teachers of several strengths from one run)."""

    def __init__(self, backbone: Backbone, source: str | Path, out: Path, steps: tuple[int, ...]):
        self.backbone, self.source, self.out, self.steps = backbone, source, out, set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        target = self.out / f"step-{state.global_step}"
        if state.global_step in self.steps and not (target / "config.json").is_file():
            export_student(self.backbone.model, self.source, target)


@dataclass
class PretrainResult:
    model_dir: Path
    curve: list[dict[str, Any]]
    seconds: float
    params: int


def share_vision_encoder(backbone: Backbone, source: str | Path) -> int:
    """Copy the vision encoder of checkpoint ``source`` into ``backbone`` and freeze it.

    Every vision parameter except the projector (``merger``, which maps to the language
    model's own width) is copied from ``source``, where names and shapes agree, and frozen,
    as Qwen2-VL-2B, -7B and -72B share one vision encoder. Returns the number copied.
    """
    donor = load_backbone(source).model.model.visual.state_dict()
    copied = 0
    for name, param in backbone.model.model.visual.named_parameters():
        if name.startswith("merger.") or name not in donor or donor[name].shape != param.shape:
            continue
        with torch.no_grad():
            param.copy_(donor[name])
        param.requires_grad_(False)
        copied += 1
    return copied


def pretrain(checkpoint: str | Path, out_dir: str | Path, train: VisualInstructionDataset,
             eval_subset: VisualInstructionDataset, collate: VisionLanguageCollator,
             training: TrainingConfig, *, eval_every: int, name: str = "pretrain",
             vision_from: str | Path | None = None,
             snapshot_steps: tuple[int, ...] = (),
             measure: Callable[[Backbone], float] | None = None) -> PretrainResult:
    """Train ``checkpoint`` (all parameters) on ``train``; export to ``out_dir/model``.

    With ``vision_from``, the vision encoder is that checkpoint's, frozen
    (:func:`share_vision_encoder`); the projector and language model train.

    A finished directory (``step_complete.json``) is returned as is; an unfinished one resumes
    from its newest checkpoint (the curve restarts at that point's records).
    """
    out = Path(out_dir)
    if stage_complete(out):
        done = read_json(out / STEP_COMPLETE)
        return PretrainResult(out / MODEL_DIR, read_json(out / CURVE)["points"], done["seconds"],
                              done["params"])
    out.mkdir(parents=True, exist_ok=True)
    remove_incomplete(out)
    resume_from = latest_checkpoint(out)
    set_seed(training.seed)
    backbone = load_backbone(checkpoint)
    backbone.model.requires_grad_(True)
    if vision_from is not None:
        share_vision_encoder(backbone, vision_from)
    args = training_arguments(training, out, gradient_checkpointing=False, report_to=[])
    resumed = int(Path(resume_from).name.rsplit("-", 1)[1]) if resume_from else 0
    earlier = read_json(out / CURVE_PARTIAL)["points"] if (out / CURVE_PARTIAL).is_file() else []
    points: list[dict[str, Any]] = [p for p in earlier if p["step"] <= resumed]
    trainer = PretrainTrainer(
        model=backbone.model, args=args, train_dataset=train, data_collator=collate,
        callbacks=[*stage_callbacks(out, name),
                   CurveCallback(backbone, eval_subset, collate, eval_every, points, out / CURVE_PARTIAL,
                                 measure),
                   SnapshotCallback(backbone, checkpoint, out / SNAPSHOTS, snapshot_steps)],
    )
    use_loss_progress_bar(trainer)
    start = time.perf_counter()
    if training_finished(resume_from):  # killed after the last checkpoint: nothing to train
        from safetensors.torch import load_file

        backbone.model.load_state_dict(load_file(str(Path(resume_from) / "model.safetensors")))
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in backbone.model.parameters())
    export_student(backbone.model, checkpoint, out / MODEL_DIR)
    write_json_atomic(out / CURVE, {"name": name, "eval_samples": len(eval_subset), "points": points})
    write_json_atomic(out / STEP_COMPLETE, {"stage": name, "seconds": seconds, "params": params,
                                            "global_step": trainer.state.global_step or resumed,
                                            "completed_at": utc_now()})
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    (out / CURVE_PARTIAL).unlink(missing_ok=True)
    return PretrainResult(out / MODEL_DIR, points, seconds, params)
