"""Where an interaction micro-batch's time goes: clock reads that wait for the device, and the
student's backward timed around ``Trainer.training_step``.

The interaction trainer logs ``seconds/student_forward``, ``seconds/teacher_forward``,
``seconds/scoring_pass`` and ``seconds/gradient_pass`` from :meth:`MicroBatchTiming.clock`
reads inside its ``compute_loss``; :class:`MicroBatchTiming` adds ``seconds/student_backward``,
the rest of the micro-batch (mostly the backward). Means over the logging window
(:class:`vlsi.train.stages.callbacks.MeanMetrics`).
"""

from __future__ import annotations

import time
from typing import Any

import torch


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has run the work queued on it.

    CUDA runs kernels asynchronously: without the synchronize a clock read times their launch,
    and their run lands in whichever later part first waits for the device. No-op on a CPU.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class MicroBatchTiming:
    """Trainer mixin, put before :class:`vlsi.train.stages.run.VlsiTrainerMixin` in the bases; the
    trainer holds ``self.metrics`` (a ``MeanMetrics``) and adds the time its ``compute_loss``
    takes to ``self.loss_seconds``."""

    loss_seconds = 0.0  # compute_loss's time within the current training_step

    def clock(self) -> float:
        """:func:`device_clock` of the trainer's device."""
        return device_clock(self.args.device)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """``Trainer.training_step``, timed: ``seconds/student_backward`` is the micro-batch's
        time outside ``compute_loss`` (mostly the student's backward)."""
        start = self.clock()
        self.loss_seconds = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.metrics.add("seconds/student_backward", self.clock() - start - self.loss_seconds)
        return loss
