"""The appendix-B table of per-layer verbalization loss (vlsi.train.layer_loss)."""

from __future__ import annotations

import pytest

from vlsi.train.layer_loss import MILESTONES, LayerLossLog, layer_loss_table, milestone_window

COLUMNS = ["10%", "30%", "50%", "70%", "90%", "100%"]


def test_milestone_windows_are_inside_training_and_end_at_the_last_step():
    assert milestone_window(0.1, 100) == (6, 15)
    assert milestone_window(1.0, 100) == (91, 100)
    assert milestone_window(1.0, 3) == (3, 3)
    for total in (1, 4, 20, 1000):
        for m in MILESTONES:
            first, last = milestone_window(m, total)
            assert 1 <= first <= last <= total


def test_layer_loss_table_averages_each_window():
    rows = [(s, [10.0 - s / 10, 5.0]) for s in range(1, 101)]
    table = layer_loss_table(rows, [2, 6], total_steps=100)
    assert table["columns"] == COLUMNS
    assert table["loss"]["6"] == [5.0] * 6
    first, last = table["steps"]["100%"]
    assert table["loss"]["2"][-1] == pytest.approx(10.0 - (first + last) / 20)
    assert table["loss"]["2"] == sorted(table["loss"]["2"], reverse=True)
    partial = layer_loss_table(rows[:20], [2, 6], total_steps=100)  # a run still at step 20
    assert partial["loss"]["2"][0] is not None and partial["loss"]["2"][1:] == [None] * 5


def test_layer_loss_log_keeps_the_steps_before_a_resume(tmp_path):
    import torch

    path = tmp_path / "layer_loss_steps.jsonl"
    log = LayerLossLog(path, [1, 3])
    for step in (1, 2, 3):
        log.add(torch.tensor([float(step), 2.0 * step]))
        log.add(torch.tensor([float("nan"), 0.0]))  # a skipped micro-batch is left out
        log.flush(step)
    assert log.rows == [(1, [1.0, 2.0]), (2, [2.0, 4.0]), (3, [3.0, 6.0])]
    resumed = LayerLossLog(path, [1, 3], keep_until=2)
    assert [step for step, _ in resumed.rows] == [1, 2]
    assert len(path.read_text().splitlines()) == 2
