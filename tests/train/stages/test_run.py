"""What every stage's Trainer shares (vlsi.train.stages.run, .checkpoints, .callbacks): complete
checkpoints told from trainer_state.json, the non-finite loss guard, metrics.jsonl, the final
checkpoint, TensorBoard logs and the loss progress bar, on a 5-parameter model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState

from vlsi.train.config import TrainingConfig
from vlsi.train.stages.arguments import training_arguments
from vlsi.train.stages.callbacks import LossProgressCallback, stage_callbacks, use_loss_progress_bar
from vlsi.train.stages.checkpoints import latest_checkpoint, remove_incomplete, training_finished
from vlsi.train.stages.run import NonFiniteLossError, VlsiTrainerMixin

torch.set_num_threads(1)


class Linear(nn.Module):
    """y = w.x + b with a mean-squared loss, the smallest model the Trainer accepts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


class ToyTrainer(VlsiTrainerMixin, Trainer):
    """Returns a NaN loss on the micro-batches numbered in ``nan_calls`` (1-based)."""

    def __init__(self, *args, nan_calls=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs)
        self.calls += 1
        return self.finite_or_skipped(model, loss * float("nan") if self.calls in self.nan_calls else loss)


class WeightsAtStep(TrainerCallback):
    def __init__(self):
        self.weights: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = model.lin.weight.detach().clone()


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def _trainer(out: Path, *, nan_calls=(), max_consecutive=5, **settings) -> ToyTrainer:
    tcfg = TrainingConfig(**{"learning_rate": 0.05, "min_learning_rate": 0.0, "max_steps": 4,
                             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                             "gradient_checkpointing": False, "bf16": False, "logging_steps": 1,
                             "save_steps": 1, "save_total_limit": None, "seed": 0,
                             "max_consecutive_nonfinite": max_consecutive, **settings})
    return ToyTrainer(model=Linear(), args=training_arguments(tcfg, out), train_dataset=_data(),
                      callbacks=stage_callbacks(out, "toy"), nan_calls=nan_calls,
                      max_consecutive_nonfinite=tcfg.max_consecutive_nonfinite)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_killed_while_written_is_never_picked(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=3)
    save_state = TrainerState.save_to_json

    def crash_at_step_3(state, path):
        if state.global_step == 3:  # model, optimizer and RNG written, trainer state not yet
            raise RuntimeError("simulated crash while saving")
        save_state(state, path)

    monkeypatch.setattr(TrainerState, "save_to_json", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    monkeypatch.setattr(TrainerState, "save_to_json", save_state)
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()  # half-written
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert remove_incomplete(tmp_path) == ["checkpoint-3"] and not (tmp_path / "checkpoint-3").exists()
    assert not training_finished(latest_checkpoint(tmp_path))

    resumed = _trainer(tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=latest_checkpoint(tmp_path))
    assert resumed.state.global_step == 3
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert training_finished(latest_checkpoint(tmp_path))


def test_nonfinite_losses_are_skipped_counted_and_logged(tmp_path):
    trainer = _trainer(tmp_path, nan_calls={1, 2}, max_steps=3)
    initial = trainer.model.lin.weight.detach().clone()
    seen = WeightsAtStep()
    trainer.add_callback(seen)
    trainer.train()
    assert trainer.nonfinite_skipped == 2
    # The skipped micro-batches contributed no gradient: with no earlier step, AdamW's moments
    # are zero and the weights stay exactly where they were; the first finite step moves them.
    assert torch.equal(seen.weights[1], initial) and torch.equal(seen.weights[2], initial)
    assert not torch.equal(seen.weights[3], initial)
    records = _records(tmp_path)
    assert max(r.get("nonfinite_skipped", 0) for r in records) == 2
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_too_many_nonfinite_losses_stop_with_one_line_and_keep_checkpoints(tmp_path):
    trainer = _trainer(tmp_path, nan_calls=set(range(3, 100)), max_consecutive=3, max_steps=10)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message and "3 non-finite losses in a row" in message
    assert str(tmp_path) in message
    # steps 1-2 trained, 3-4 skipped (and saved), the third NaN in a row (step 5) stopped the run
    assert trainer.nonfinite_skipped == 3
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-5").exists()


def test_metrics_jsonl_tensorboard_and_progress_bar(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, save_steps=2)
    use_loss_progress_bar(trainer)
    assert any(isinstance(cb, LossProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    records = _records(tmp_path)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["stage"] == "toy" and "epoch" in r for r in records)
    assert all({"learning_rate", "grad_norm"} <= r.keys() for r in records if "loss" in r)
    assert records[-1].get("train_runtime") is not None  # the end-of-training summary line
    assert list(tmp_path.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_the_last_step_is_always_checkpointed(tmp_path):
    trainer = _trainer(tmp_path, max_steps=5, save_steps=2)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                      "checkpoint-5"]
    assert training_finished(latest_checkpoint(tmp_path))
