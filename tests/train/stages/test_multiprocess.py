"""Two processes under ``accelerate launch`` on the CPU (DDP over gloo): the interaction and SFT
steps finish, the main process alone writes the outputs, and every rank's RNG state is
checkpointed. The interaction runs in ``make test``, SFT in ``make test-all``.

``accelerate launch --cpu --num_processes 2`` starts ONE process (its CPU launcher expects MPI);
``--multi_gpu`` starts two through torchrun, and on a machine without CUDA the Trainer runs them
on the CPU with the gloo backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_CONFIG, free_port
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone

def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vlsi.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="runs the two processes on the CPU; with CUDA they would need 2 GPUs")


@pytest.fixture(scope="module")
def verbalizers(tmp_path_factory, tiny_pair) -> tuple[Path, Path]:
    """Untrained verbalizers (the interaction step only needs ones that fit the backbones)."""
    root = tmp_path_factory.mktemp("verbalizers")
    pair = tiny_pair("qwen2_vl")
    return (VerbalizerSet(load_backbone(pair.teacher)).save(root / "teacher"),
            VerbalizerSet(load_backbone(pair.student)).save(root / "student"))


@needs_no_cuda
def test_interaction_in_two_processes(tmp_path, verbalizers, tiny_overrides, set_args, cli_env):
    teacher, student = verbalizers
    out = tmp_path / "interact"
    settings = set_args(tiny_overrides(tmp_path, **{
        "interact.max_steps": 2, "interact.save_steps": 1, "interact.per_device_train_batch_size": 2}))
    proc = _launch(["interact", str(TINY_CONFIG), "--teacher-verbalizers", str(teacher),
                    "--student-verbalizers", str(student), "--out", str(out), *settings], cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads((out / "step_complete.json").read_text())
    assert done["stage"] == "interact" and done["global_step"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "matches.json").is_file()
    # one RNG state per rank: the run really had two processes
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}


@pytest.mark.slow
@needs_no_cuda
def test_sft_in_two_processes_exports_once(tmp_path, tiny_overrides, set_args, cli_env):
    out = tmp_path / "sft"
    settings = set_args(tiny_overrides(tmp_path, **{
        "sft.max_steps": 2, "sft.save_steps": 1, "sft.per_device_train_batch_size": 2}))
    proc = _launch(["sft", str(TINY_CONFIG), "--out", str(out), *settings], cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "step_complete.json").read_text())["global_step"] == 2
    assert (out / "model" / "model.safetensors").is_file()
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}
    assert proc.stdout.count("sft: exported") == 2  # both ranks return the exported path
