"""The stages' Trainer callbacks and per-micro-batch metrics (vlsi.train.stages.callbacks), driven by
hand with fabricated trainer states: what reaches ``metrics.jsonl`` and the progress bar, which
kill points fire, and how means are taken."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl
from transformers.trainer_callback import ProgressCallback

from vlsi.files import append_jsonl
from vlsi.train.stages import callbacks
from vlsi.train.stages.callbacks import (KillPointCallback, LossProgressCallback, MeanMetrics, MetricsJsonlCallback,
                                         stage_callbacks, use_loss_progress_bar)


def _state(step: int = 3, *, main: bool = True, max_steps: int = 4) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, epoch=0.5, is_world_process_zero=main, max_steps=max_steps)


def test_metrics_jsonl_keeps_scalars_and_drops_nan(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    cb = MetricsJsonlCallback(path, "interact")
    cb.on_log(None, _state(3), TrainerControl(), logs={"loss": 1.5, "learning_rate": 1e-3, "grad_norm": float("nan"),
                                                       "tag": "x", "hist": [1, 2], "ok": True})
    cb.on_log(None, _state(4), TrainerControl(), logs={"loss": 0.5})
    cb.on_log(None, _state(4), TrainerControl(), logs={})  # nothing logged: no line
    cb.on_log(None, _state(4), TrainerControl(), logs=None)
    cb.on_log(None, _state(4, main=False), TrainerControl(), logs={"loss": 9.0})  # other processes write nothing
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"stage": "interact", "step": 3, "epoch": 0.5, "loss": 1.5, "learning_rate": 1e-3, "tag": "x", "ok": True},
        {"stage": "interact", "step": 4, "epoch": 0.5, "loss": 0.5},
    ]


def test_append_jsonl_appends_one_line_per_record(tmp_path):
    path = tmp_path / "a" / "b.jsonl"
    append_jsonl(path, {"x": 1})
    append_jsonl(path, {"y": [2]})
    assert path.read_text() == '{"x": 1}\n{"y": [2]}\n'


class _Bar:
    def __init__(self):
        self.postfix = None

    def set_postfix(self, values, refresh=True):
        self.postfix = values


def test_the_progress_bar_shows_the_latest_loss():
    cb = LossProgressCallback()
    cb.training_bar = _Bar()
    cb.on_log(None, _state(), TrainerControl(), logs={"loss": 0.123456, "learning_rate": 2e-4, "epoch": 1.0})
    assert cb.training_bar.postfix == {"loss": "0.1235", "learning_rate": "0.0002"}
    cb.on_log(None, _state(), TrainerControl(), logs={"train_runtime": 3.0})  # nothing to show: kept
    assert cb.training_bar.postfix == {"loss": "0.1235", "learning_rate": "0.0002"}
    cb.on_log(None, _state(main=False), TrainerControl(), logs={"loss": 7.0})
    assert cb.training_bar.postfix["loss"] == "0.1235"
    cb.training_bar = None
    cb.on_log(None, _state(), TrainerControl(), logs={"loss": 1.0})  # no bar (not training): no error


def test_kill_points_are_named_by_stage_step_and_save(monkeypatch):
    asked = []
    monkeypatch.setattr(callbacks, "kill_if_asked", asked.append)
    cb = KillPointCallback("sft")
    cb.on_step_end(None, _state(2), TrainerControl())
    cb.on_save(None, _state(2), TrainerControl())
    assert asked == ["sft:step:2", "sft:saved:2"]


def test_stage_callbacks_and_the_progress_bar_swap(tmp_path):
    made = stage_callbacks(tmp_path, "verbalize")
    assert [type(cb) for cb in made] == [MetricsJsonlCallback, KillPointCallback]
    assert made[0].path == tmp_path / "metrics.jsonl" and made[0].stage == "verbalize" and made[1].stage == "verbalize"

    class Trainer:
        def __init__(self):
            self.callbacks = [ProgressCallback, "other"]

        def remove_callback(self, cb):
            self.callbacks.remove(cb)

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = Trainer()
    use_loss_progress_bar(trainer)
    assert trainer.callbacks[0] == "other" and isinstance(trainer.callbacks[1], LossProgressCallback)


def test_no_callback_of_ours_asks_for_saves():
    """The last step's checkpoint is transformers' DefaultFlowCallback's (save_strategy="steps"):
    our callbacks leave ``should_save`` alone, at the last step too."""
    control = TrainerControl()
    for cb in stage_callbacks("unused", "sft"):
        cb.on_step_end(None, _state(4, max_steps=4), control)
    assert not control.should_save


def test_mean_metrics_average_a_window_ignoring_nan():
    metrics = MeanMetrics()
    one = SimpleNamespace(num_processes=1)
    assert metrics.pop_means(one) == {}
    for value in (1.0, 2.0, float("nan"), 6.0):
        metrics.add("kld", value)
    metrics.add("ce", torch.tensor(0.5))
    metrics.add("empty", float("nan"))  # no finite value in the window: not reported
    assert metrics.pop_means(one) == {"ce": 0.5, "kld": 3.0}
    assert metrics.pop_means(one) == {}  # the window starts again


def test_mean_metrics_average_over_processes():
    class TwoProcesses:
        num_processes = 2
        device = torch.device("cpu")

        def gather(self, means):  # this process's means, then the other's
            return torch.cat([means, torch.tensor([float("nan"), 4.0], dtype=means.dtype)])

    metrics = MeanMetrics()
    metrics.add("a", 1.0)
    metrics.add("b", 2.0)
    metrics.add("b", float("nan"))
    means = metrics.pop_means(TwoProcesses())
    assert means == {"a": 1.0, "b": 3.0}  # a: NaN on the other process is ignored
    assert all(math.isfinite(v) for v in means.values())


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_mean_metrics_drop_infinite_means(value):
    metrics = MeanMetrics()
    metrics.add("x", value)
    assert metrics.pop_means(SimpleNamespace(num_processes=1)) == {}
