"""Fault tolerance end to end: ``vlsi sft`` killed with SIGKILL mid-run and resumed with
``--resume`` ends with the same weights as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-qwen2vl.yaml"


@pytest.mark.slow
def test_sft_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_overrides, set_args, cli_env, run_cli):
    # 6 optimizer steps of 2 micro-batches, a checkpoint every 2 steps; LoRA dropout is 0 in the
    # tiny config, so the run is a deterministic function of the seed.
    settings = set_args(tiny_overrides(tmp_path, **{
        "sft.max_steps": 6, "sft.save_steps": 2, "sft.gradient_accumulation_steps": 2,
        "sft.per_device_train_batch_size": 2, "sft.logging_steps": 1}))
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"

    done = run_cli("sft", str(TINY_CONFIG), *settings, "--out", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training a fresh LoRA" in done.stdout

    proc = subprocess.Popen([sys.executable, "-m", "vlsi.cli", "sft", str(TINY_CONFIG), *settings,
                             "--out", str(interrupted)], cwd=REPO, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (interrupted / "checkpoint-4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-4 within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (interrupted / "step_complete.json").exists()
    assert not (interrupted / "model").exists()

    resumed = run_cli("sft", str(TINY_CONFIG), *settings, "--out", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((interrupted / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6

    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        want, got = load_file(str(reference / name)), load_file(str(interrupted / name))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    # the run did learn something: the merged weights are not the student's own
    base = load_file(str(tiny_overrides(tmp_path)["student"]) + "/model.safetensors")
    merged = load_file(str(reference / "model/model.safetensors"))
    assert any(not torch.equal(base[k], merged[k]) for k in base)


def test_cli_user_errors_are_one_line(tmp_path, tiny_overrides, set_args, capsys):
    from vlsi.cli import main

    settings = set_args(tiny_overrides(tmp_path))
    assert main(["sft", str(TINY_CONFIG), *settings, "--set", "sft.max_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sft.max_steps"), err
    assert main(["sft", str(TINY_CONFIG), "--set", "training.max_steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
