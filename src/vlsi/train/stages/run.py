"""The skeleton every stage runs in, and what every stage's Trainer shares.

:func:`run_stage` does, in order, for a :class:`Stage` (the stage file supplies only its
trainer, its loss and its outputs):

1. the run identity (:mod:`vlsi.train.fingerprint`): a finished directory with the same inputs is
   returned as is; a directory holding a result of other inputs is refused (or, with
   ``restart``, removed);
2. the checkpoint to resume from (:mod:`vlsi.train.stages.checkpoints`); half-written ones removed;
3. ``fingerprint.json``, the ``TrainingArguments``, the data (skips reported), the trainer;
4. training, or, when the newest checkpoint is the last step, restoring its weights;
5. the stage's outputs, then ``step_complete.json`` (with the data counts and the fingerprint
   digest), then a barrier so no process leaves before the files exist.

:class:`VlsiTrainerMixin` gives every stage's Trainer the non-finite loss guard: a training
loss that is not finite on any process skips its micro-batch on all of them (a zero gradient
for every trainable parameter, reduced as usual under DDP, ZeRO and FSDP2) and is counted;
``max_consecutive_nonfinite`` in a row stop the run. The skip is decided on the device, so the
host reads the counts once per optimizer step (under FSDP2 once per micro-batch: its zero
gradients are built from the local shards, :func:`vlsi.train.distributed.zero_for_every_parameter`).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from vlsi.errors import VlsiError
from vlsi.files import truncate_jsonl, utc_now, write_json_atomic
from vlsi.train import fingerprint
from vlsi.train.distributed import is_main_process, load_sharded_checkpoint, zero_for_every_parameter
from vlsi.train.resolved import ResolvedRun
from vlsi.train.stages.arguments import training_arguments
from vlsi.train.stages.callbacks import METRICS, stage_callbacks, use_loss_progress_bar
from vlsi.train.stages.checkpoints import (
                                           checkpoint_state,
                                           checkpoint_step,
                                           latest_checkpoint,
                                           remove_incomplete,
                                           training_finished,
                                           )
from vlsi.train.stages.training_data import load_training_data, report_skips
from vlsi.train.testing_hooks import kill_if_asked, nan_if_asked

STEP_COMPLETE = "step_complete.json"  # written last by every stage: the step has finished


class NonFiniteLossError(VlsiError):
    """Too many non-finite losses in a row."""


class VlsiTrainerMixin:
    """Put first in the bases (``class MyTrainer(VlsiTrainerMixin, Trainer)``); the stage's
    ``compute_loss`` returns ``self.finite_or_skipped(model, loss)`` for its training loss."""

    stage = ""  # the stage's name in fault points (vlsi.train.testing_hooks)

    def __init__(self, *args: Any, max_consecutive_nonfinite: int = 5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_skipped = 0
        self._skip_hooks: list[Any] = []
        # on the device, read once per optimizer step: skipped micro-batches in this step, the
        # current run of skipped micro-batches (carried across steps), its longest in this step
        self._nonfinite_counts: torch.Tensor | None = None  # long [3]
        self._nonfinite_unlogged = False
        self.add_callback(_NonFiniteCheck(self))

    def finite_or_skipped(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or a graph-connected zero with zero gradients when it is not finite on any
        process; no host synchronisation (except under FSDP2)."""
        if not model.training:
            return loss
        if self.is_world_process_zero():
            loss = nan_if_asked(f"{self.stage}:step:{self.state.global_step + 1}", loss)
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        finite = finite.reshape(()) == 1.0  # bool, on every process the same
        self._count(finite)
        if self.is_fsdp_enabled:  # the zero is built from the shards: decided on the host
            if bool(finite):
                return loss
            zero, self._skip_hooks = zero_for_every_parameter(self, model, loss)
            return zero
        # the backward runs through the micro-batch's own graph on every engine (ZeRO-3 gathers,
        # accumulates and reduce-scatters as for any micro-batch); each trainable parameter's
        # gradient, NaN where the loss was, is replaced by zeros before it is accumulated
        self._skip_hooks = [p.register_hook(functools.partial(_kept_if, finite))
                            for p in model.parameters() if p.requires_grad]
        return torch.where(finite, loss, torch.zeros_like(loss))

    def _count(self, finite: torch.Tensor) -> None:
        if self._nonfinite_counts is None:
            self._nonfinite_counts = torch.zeros(3, dtype=torch.long, device=finite.device)
        skipped, run, longest = self._nonfinite_counts.unbind()
        bad = (~finite).long()
        run = (run + 1) * bad
        self._nonfinite_counts = torch.stack([skipped + bad, run, torch.maximum(longest, run)])

    def check_nonfinite(self) -> None:
        """At the end of each optimizer step (one host read): count the skipped micro-batches
        (logged with the next record), stop after ``max_consecutive_nonfinite`` in a row."""
        if self._nonfinite_counts is None:
            return
        skipped, run, longest = self._nonfinite_counts.tolist()
        self._nonfinite_counts = torch.tensor([0, run, 0], dtype=torch.long, device=self._nonfinite_counts.device)
        if not skipped:
            return
        self.nonfinite_skipped += skipped
        self._nonfinite_unlogged = True
        if longest >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{longest} non-finite losses in a row by step {self.state.global_step}; stopping (last good "
                f"checkpoint kept in {self.args.output_dir}). Lower the learning rate or check the data.")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log record, with ``nonfinite_skipped`` (the run's total) in the first
        record after a step that skipped micro-batches."""
        if self._nonfinite_unlogged:
            logs["nonfinite_skipped"] = float(self.nonfinite_skipped)
            self._nonfinite_unlogged = False
        super().log(logs, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return super().training_step(*args, **kwargs)
        finally:
            for hook in self._skip_hooks:  # this micro-batch's, its backward done
                hook.remove()
            self._skip_hooks = []


def _kept_if(finite: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``finite`` (a device bool), else zeros (NaN included)."""
    return torch.where(finite, grad, torch.zeros_like(grad))


class _NonFiniteCheck(TrainerCallback):
    """Runs :meth:`VlsiTrainerMixin.check_nonfinite` after each optimizer step, before the
    step's checkpoint is saved."""

    def __init__(self, trainer: VlsiTrainerMixin):
        self.trainer = trainer

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_nonfinite()


@dataclass
class Stage:
    """One step of the pipeline as :func:`run_stage` drives it.

    Attributes:
        name: ``verbalize``, ``interact`` or ``sft`` (its training settings and kill points).
        step: the fingerprint step (``teacher-verbalize``, ``student-verbalize``, ...).
        out: the step directory.
        inputs: :func:`vlsi.train.fingerprint.step_inputs` of this run.
        data_model: the checkpoint whose tokenizer and image processor read the data.
        build: ``(args, dataset, collator, resumed_step) -> Trainer`` (callbacks included).
        restore: loads the final weights of a finished checkpoint into the trainer's model.
        outputs: writes the stage's files; returns fields for ``step_complete.json``.
        gradient_checkpointing: overrides the config's (``None``: keep it).
    """

    name: str
    step: str
    out: Path
    inputs: dict[str, Any]
    data_model: Path
    build: Callable[[TrainingArguments, Any, Any, int], Trainer]
    restore: Callable[[Trainer, Path], None]
    outputs: Callable[[Trainer], dict[str, Any]]
    gradient_checkpointing: bool | None = None


def stage_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / STEP_COMPLETE).is_file()


def check_identity(out: Path, inputs: dict[str, Any], *, restart: bool, hint: str) -> None:
    """Refuse (or with ``restart`` remove) a directory whose recorded inputs differ.

    A directory with content but no fingerprint (made by an older version) counts as different.
    """
    diffs = fingerprint.changed_or_unrecorded(out, inputs)
    if not diffs:
        return
    if not restart:
        raise fingerprint.refusal(out, diffs, hint)
    if is_main_process():
        print(f"restarting {out}: its inputs changed ({'; '.join(diffs[:2])})", flush=True)
        shutil.rmtree(out)


def run_stage(stage: Stage, run: ResolvedRun, *, resume: bool = True, restart: bool = False,
              hint: str = "pass --restart-changed to redo this step") -> Path:
    """Run ``stage`` of ``run`` into ``stage.out`` (see the module docstring); returns ``stage.out``."""
    out = stage.out
    tcfg = run.cfg.stage(stage.name)
    # TrainingArguments before the models: under ZeRO-3 they make from_pretrained shard them
    args = training_arguments(tcfg, out, gradient_checkpointing=stage.gradient_checkpointing,
                              stage=stage.name)
    # the main process decides about the directory and writes its fingerprint first; the others
    # then see the same directory (no half-written fingerprint, no checkpoint it removed)
    with args.main_process_first(local=False, desc=f"{stage.name}: run identity"):
        check_identity(out, stage.inputs, restart=restart, hint=hint)
        checkpoint = latest_checkpoint(out) if out.is_dir() else None
        if not resume and (checkpoint or stage_complete(out)):
            found = Path(checkpoint).name if checkpoint else STEP_COMPLETE
            raise VlsiError(f"{out} already holds a run ({found}); pass --resume to continue it, or "
                            "choose another output directory")
        if stage_complete(out):
            return out
        if args.should_save:
            removed = remove_incomplete(out) if out.is_dir() else []
            if removed:
                print(f"{stage.name}: removed half-written {', '.join(removed)}", flush=True)
            digest = fingerprint.write(out, stage.inputs)
            truncate_jsonl(out / METRICS, checkpoint_step(checkpoint))
        else:
            digest = fingerprint.digest(stage.inputs)
    dataset, collator, _ = load_training_data(run.cfg.data, stage.data_model)
    data = report_skips(dataset, stage.name, out / METRICS if args.should_save else None)
    trainer = stage.build(args, dataset, collator, checkpoint_step(checkpoint))
    for callback in stage_callbacks(out, stage.name):
        trainer.add_callback(callback)
    use_loss_progress_bar(trainer)
    if training_finished(checkpoint):
        print(f"{stage.name}: {Path(checkpoint).name} is the last step; restoring it", flush=True)
        if not load_sharded_checkpoint(trainer, Path(checkpoint)):
            stage.restore(trainer, Path(checkpoint))
        state = checkpoint_state(Path(checkpoint)) or {}
        trainer.state.global_step, trainer.state.max_steps = state["global_step"], state["max_steps"]
        global_step, train_loss = state["global_step"], _last_loss(state)
    else:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        global_step, train_loss = trainer.state.global_step, result.training_loss
    kill_if_asked(f"{stage.name}:outputs")
    summary = stage.outputs(trainer)
    kill_if_asked(f"{stage.name}:complete")
    if trainer.is_world_process_zero():
        write_json_atomic(out / STEP_COMPLETE, {
            "stage": stage.name, "step": stage.step, "global_step": global_step,
            "train_loss": train_loss, "nonfinite_skipped": getattr(trainer, "nonfinite_skipped", 0),
            "data": data, "fingerprint": digest, **summary, "completed_at": utc_now()})
    trainer.accelerator.wait_for_everyone()
    return out


def _last_loss(state: dict[str, Any]) -> float | None:
    losses = [r["train_loss"] for r in state.get("log_history", []) if "train_loss" in r]
    losses = losses or [r["loss"] for r in state.get("log_history", []) if "loss" in r]
    return losses[-1] if losses else None
