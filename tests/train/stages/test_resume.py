"""Exact resume from any kill point: ``vlsi distill`` killed (SIGKILL, by the kill points of
:mod:`vlsi.train.testing_hooks`) mid-step, right after a checkpoint, after the last checkpoint, while
writing outputs and before ``step_complete.json``, in every stage, then rerun until it ends,
finishes with exactly ``max_steps`` steps per stage and the weights of an uninterrupted run.

The default tier reads the session's shared run killed at three points (tests/conftest.py,
``RESUME_KILL_POINTS``); ``make test-all`` also kills a run at every point of ``KILL_POINTS``.
Both are compared with the shared uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import RESUME_KILL_POINTS, STEPS, TINY_CONFIG, WEIGHTS

# Each point is reached by the rerun that sets it, after the earlier kills; both verbalization
# steps share the stage name, so the teacher's step is the one killed there.
KILL_POINTS = (
    "verbalize:step:3",     # mid-step: checkpoint-2 exists, step 3 is lost
    "verbalize:saved:4",    # right after the last checkpoint
    "verbalize:complete",   # outputs written, step_complete.json not yet
    "interact:step:1",      # before any checkpoint
    "interact:saved:4",     # after the last checkpoint
    "sft:saved:2",          # after a middle checkpoint
    "sft:outputs",          # training over, the export not written
    "sft:complete",         # exported, step_complete.json not yet
)


def _assert_equals_uninterrupted(killed: Path, reference: Path, student: Path) -> None:
    for step in STEPS:
        assert json.loads((killed / step / "step_complete.json").read_text())["global_step"] == 4, step
        logged = [json.loads(line) for line in (killed / step / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in logged if "loss" in r]
        assert steps == [1, 2, 3, 4], (step, steps)  # no step twice, none past max_steps
    matches = [json.loads(line)["step"] for line in (killed / "3-interact" / "matches.jsonl").read_text().splitlines()]
    assert matches == [1, 1, 2, 2, 3, 3, 4, 4]  # one selection per micro-batch, none doubled
    for name in WEIGHTS:
        want, got = load_file(str(reference / name)), load_file(str(killed / name))
        assert want.keys() == got.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    base = load_file(str(student / "model.safetensors"))
    merged = load_file(str(reference / "4-sft/model/model.safetensors"))
    assert any(not torch.equal(base[k], merged[k]) for k in base)  # the run did learn something


def test_killed_at_three_points_and_rerun_equals_uninterrupted(resumed, distilled):
    assert len(RESUME_KILL_POINTS) == 3 and set(RESUME_KILL_POINTS) <= set(KILL_POINTS)
    _assert_equals_uninterrupted(resumed.out, distilled.out, Path(distilled.overrides["student"]))


@pytest.mark.slow
def test_distill_killed_anywhere_and_rerun_equals_uninterrupted(tmp_path, distilled, run_cli):
    killed = tmp_path / "killed"
    settings = distilled.settings(killed)
    for point in KILL_POINTS:
        proc = run_cli("distill", str(TINY_CONFIG), *settings, env={"VLSI_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.stderr[-2000:]}"
    assert not (killed / "4-sft" / "step_complete.json").exists()
    final = run_cli("distill", str(TINY_CONFIG), *settings)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_equals_uninterrupted(killed, distilled.out, Path(distilled.overrides["student"]))


def test_cli_user_errors_are_one_line(tmp_path, tiny_overrides, set_args, capsys):
    from vlsi.cli import main

    settings = set_args(tiny_overrides(tmp_path))
    assert main(["sft", str(TINY_CONFIG), *settings, "--set", "sft.max_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sft.max_steps"), err
    assert main(["sft", str(TINY_CONFIG), "--set", "training.max_steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
