"""Which checkpoint a stage resumes from (vlsi.train.stages.checkpoints), on fabricated ``checkpoint-N``
directories: complete ones hold a ``trainer_state.json`` of their own step."""

from __future__ import annotations

import json
from pathlib import Path

from vlsi.train.stages.checkpoints import (checkpoint_state, checkpoint_step, checkpoints, latest_checkpoint,
                                           remove_incomplete, training_finished)


def _checkpoint(out: Path, step: int, *, state: dict | str | None = "complete", max_steps: int = 6) -> Path:
    """``out/checkpoint-<step>``; ``state``: "complete" (global_step = step), a dict written as
    the trainer state, raw text, or None (no trainer_state.json: killed mid-save)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state == "complete":
        state = {"global_step": step, "max_steps": max_steps}
    if isinstance(state, dict):
        (path / "trainer_state.json").write_text(json.dumps(state))
    elif isinstance(state, str):
        (path / "trainer_state.json").write_text(state)
    return path


def test_a_checkpoint_is_complete_when_its_state_records_its_step(tmp_path):
    assert checkpoint_state(_checkpoint(tmp_path, 2)) == {"global_step": 2, "max_steps": 6}
    assert checkpoint_state(_checkpoint(tmp_path, 4, state=None)) is None  # killed before the state
    assert checkpoint_state(_checkpoint(tmp_path, 6, state='{"global_st')) is None  # cut mid-write
    assert checkpoint_state(_checkpoint(tmp_path, 8, state={"global_step": 7})) is None  # another step's
    odd = tmp_path / "checkpoint-x"
    odd.mkdir()
    (odd / "trainer_state.json").write_text('{"global_step": 0}')
    assert checkpoint_state(odd) is None
    assert checkpoint_state(tmp_path / "checkpoint-99") is None  # no such directory


def test_checkpoints_are_sorted_by_step_not_by_name(tmp_path):
    for step in (10, 2, 100, 9):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-final").mkdir()  # not a step
    (tmp_path / "checkpoint-3").write_text("a file, not a directory")
    (tmp_path / "runs").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10",
                                                       "checkpoint-100"]
    assert checkpoints(tmp_path / "missing") == []


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, state=None)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_remove_incomplete_deletes_only_the_half_written(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, state=None)
    _checkpoint(tmp_path, 6, state={"global_step": 5})
    assert remove_incomplete(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights"
    assert remove_incomplete(tmp_path) == []


def test_checkpoint_step_and_training_finished(tmp_path):
    assert checkpoint_step(None) == 0
    assert checkpoint_step(str(tmp_path / "checkpoint-12")) == 12
    assert not training_finished(None)
    assert not training_finished(str(_checkpoint(tmp_path, 4, max_steps=6)))
    assert training_finished(str(_checkpoint(tmp_path, 6, max_steps=6)))
    assert not training_finished(str(_checkpoint(tmp_path, 8, state={"global_step": 8})))  # no max_steps recorded
    assert not training_finished(str(_checkpoint(tmp_path, 10, state=None)))  # incomplete: not finished
