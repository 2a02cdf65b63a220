"""Trainer callbacks and per-micro-batch metrics shared by the stages.

* :class:`MetricsJsonlCallback`: every log record also goes to ``OUT/metrics.jsonl``;
* :class:`LossProgressCallback`: the progress bar shows the latest loss beside the ETA;
* :class:`KillPointCallback`: the test hooks of :mod:`vlsi.train.testing_hooks`;
* :class:`MeanMetrics`: scalars collected per micro-batch, averaged per logging window.

The last step is always checkpointed, so that a kill while the stage writes its outputs costs
no training (:mod:`vlsi.train.stages.checkpoints`): transformers' own ``DefaultFlowCallback`` saves at
``max_steps`` under ``save_strategy="steps"`` (:mod:`vlsi.train.stages.arguments`), whether or not
``save_steps`` divides it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from vlsi.files import append_jsonl
from vlsi.train.testing_hooks import kill_if_asked

METRICS = "metrics.jsonl"


class MetricsJsonlCallback(TrainerCallback):
    """Append every log record (step, epoch, loss, learning rate, ...) to ``metrics.jsonl``."""

    def __init__(self, path: str | Path, stage: str):
        self.path = Path(path)
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))
                       and not (isinstance(v, float) and math.isnan(v))})
        append_jsonl(self.path, record)


class LossProgressCallback(ProgressCallback):
    """transformers' progress bar (steps, ETA) with the latest loss as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class KillPointCallback(TrainerCallback):
    """``<stage>:step:<N>`` and ``<stage>:saved:<N>`` kill points (:mod:`vlsi.train.testing_hooks`)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_step_end(self, args, state, control, **kwargs):
        kill_if_asked(f"{self.stage}:step:{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        kill_if_asked(f"{self.stage}:saved:{state.global_step}")


def stage_callbacks(output_dir: str | Path, stage: str) -> list[TrainerCallback]:
    return [MetricsJsonlCallback(Path(output_dir) / METRICS, stage), KillPointCallback(stage)]


def use_loss_progress_bar(trainer: Any) -> None:
    """Swap the Trainer's default progress bar for :class:`LossProgressCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressCallback())


class MeanMetrics:
    """Scalars collected per micro-batch, averaged over a logging window and over processes."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, value: float) -> None:
        self.values[name].append(float(value))

    def pop_means(self, accelerator) -> dict[str, float]:
        """Means since the last call, NaN ignored; every process must call it (a collective)."""
        names = sorted(self.values)
        if not names:
            return {}
        means = torch.tensor([torch.tensor(self.values[n], dtype=torch.float64).nanmean().item() for n in names],
                             dtype=torch.float64)
        self.values.clear()
        if accelerator.num_processes > 1:
            means = accelerator.gather(means.to(accelerator.device)).view(-1, len(names)).nanmean(dim=0).cpu()
        return {n: float(m) for n, m in zip(names, means) if math.isfinite(float(m))}
