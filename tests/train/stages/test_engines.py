"""ZeRO-2, ZeRO-3 and FSDP2 on two CPU processes (gloo) agree with one process.

Each engine runs ``vlsi distill`` (both verbalize steps, interaction, SFT and export) on the
tiny pair with the launcher and accelerate config a user would take, one sample per process
and step. Under ZeRO-3 and FSDP2 it is killed (SIGKILL) at the points in ``ENGINES`` (after
the teacher's verbalizers trained, in the interaction step before a checkpoint, after SFT
trained) and resumed each time from its sharded checkpoints; ZeRO-2, which shards only
optimizer states and resumes through the same DeepSpeed checkpoints, runs uninterrupted. The reference is one process with the same global batch: one sample per
micro-batch, two micro-batches accumulated. What must agree: every logged step's loss of every
step directory, the verbalizers, both LoRA adapters, the exported student, and the selected
pairs (``matches.jsonl``).

Tolerances: float32, reductions in another order (bucketed all-reduce, reduce-scatter): losses
within 1e-5 relative, weights within 1e-5 absolute.

Launchers: ``accelerate launch --config_file accelerate_configs/deepspeed_zero{2,3}.yaml`` (on
the CPU accelerate runs DeepSpeed's CPU accelerator through torchrun) and ``accelerate launch
--config_file accelerate_configs/fsdp.yaml`` with :mod:`fsdp_on_cpu` as the script (accelerate
enables FSDP only on accelerator devices; the shim keeps it on for CPU processes).

Under ZeRO-3 and FSDP2 two more runs: a text-only sample on one process beside an image on the
other, and a NaN loss injected on the main process (``VLSI_NAN_AT``), against one process with
the same NaN (docs/engines.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, STEPS, TINY_CONFIG, WEIGHTS, free_port
from vlsi.models.backbones import checkpoint_dir

FSDP_SHIM = Path(__file__).with_name("fsdp_on_cpu.py")
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

# engine -> (accelerate config, script or module, kill points of the launches before the last)
ENGINES = {
    "zero2": ("deepspeed_zero2.yaml", ["-m", "vlsi.cli"], []),
    "zero3": ("deepspeed_zero3.yaml", ["-m", "vlsi.cli"], ["verbalize:outputs", "interact:step:2", "sft:outputs"]),
    "fsdp2": ("fsdp.yaml", [str(FSDP_SHIM)], ["verbalize:outputs", "interact:step:2", "sft:outputs"]),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="runs two processes on the CPU; with CUDA they would need 2 GPUs"),
]


def _settings(tiny_overrides, set_args, out: Path, accumulate: int) -> list[str]:
    return set_args(tiny_overrides(out, **{
        "training.max_steps": 2, "training.save_steps": 1, "training.per_device_train_batch_size": 1,
        "training.gradient_accumulation_steps": accumulate}))


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides, set_args, cli_env) -> Path:
    """One process, one sample per micro-batch, two micro-batches per step."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    proc = subprocess.run([sys.executable, "-m", "vlsi.cli", "distill", str(TINY_CONFIG),
                           *_settings(tiny_overrides, set_args, out, accumulate=2)],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _launch(engine: str, out: Path, settings: list[str], env: dict[str, str], kill: str | None,
            timeout: float = 400) -> subprocess.CompletedProcess:
    """``vlsi distill`` on two processes; past ``timeout`` every process of the launch is killed
    and the test fails (a hung collective never returns)."""
    config, target, _ = ENGINES[engine]
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "accelerate_configs" / config), "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *target, "distill", str(TINY_CONFIG), *settings]
    env = {**env, "VLSI_KILL_AT": kill or ""}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: one session
        stdout, stderr = proc.communicate()
        pytest.fail(f"{engine}: no result after {timeout:.0f} s (hung?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _held_megabytes(outputs: list[str], role: str) -> tuple[float, str]:
    """The first per-process size printed at start-up, ``teacher: 919.7K params, 1.8 MB per
    process under ZeRO-3 x 2``: (megabytes, engine)."""
    for stdout in outputs:
        match = re.search(rf"^{role}: \S+ params, ([\d.]+) (KB|MB) per process under (.+)$", stdout, re.M)
        if match:
            return float(match.group(1)) / (1000 if match.group(2) == "KB" else 1), match.group(3)
    raise AssertionError(f"no '{role}: ... per process' line in the output")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_agree_with_one(engine, tmp_path, reference, tiny_pair, tiny_overrides, set_args, cli_env):
    out = tmp_path / "run"
    settings = _settings(tiny_overrides, set_args, out, accumulate=1)
    kills = ENGINES[engine][2]
    outputs = []
    for kill in [*kills, None]:
        proc = _launch(engine, out, settings, cli_env, kill)
        outputs.append(proc.stdout)
        if kill is None:
            assert proc.returncode == 0, proc.stderr[-4000:]
        else:
            assert proc.returncode != 0, f"the run was not killed at {kill}"
            assert not (out / "4-sft" / "step_complete.json").exists()

    # the interaction step ran sharded: the teacher held per process is about half of it
    teacher_file = checkpoint_dir(tiny_pair("qwen2_vl").teacher) / "model.safetensors"
    whole_mb = sum(t.numel() * t.element_size() for t in load_file(teacher_file).values()) / 1e6
    held, under = _held_megabytes(outputs, "teacher")
    assert under == {"zero2": "ZeRO-2 x 2", "zero3": "ZeRO-3 x 2", "fsdp2": "FSDP2 x 2"}[engine]
    if engine == "zero2":
        assert held == pytest.approx(whole_mb, abs=0.1)
    else:
        assert held < 0.6 * whole_mb, (held, whole_mb)

    # and so are the teacher's frozen verbalizers (whole on every process under ZeRO-2)
    verbalizers_file = out / "1-teacher-verbalize" / "verbalizers.safetensors"
    whole_mb = sum(t.numel() * t.element_size() for t in load_file(verbalizers_file).values()) / 1e6
    held, _ = _held_megabytes(outputs, "teacher verbalizers")
    if engine == "zero2":
        assert held == pytest.approx(whole_mb, abs=0.1)
    else:
        assert held < 0.6 * whole_mb, (held, whole_mb)

    # the checkpoints are sharded: one piece per process
    checkpoint = out / "3-interact" / "checkpoint-2"
    if engine == "fsdp2":
        assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    else:
        assert len(list(checkpoint.glob("global_step2/*optim_states.pt"))) == 2

    for step in STEPS:
        ours, theirs = _losses(out / step / "metrics.jsonl"), _losses(reference / step / "metrics.jsonl")
        assert sorted(ours) == sorted(theirs) == [1, 2], step
        for n in ours:
            assert ours[n] == pytest.approx(theirs[n], rel=LOSS_RTOL), (step, n)
    for name in WEIGHTS:
        ours, theirs = load_file(out / name), load_file(reference / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=WEIGHT_ATOL, rtol=0, msg=lambda m: f"{name} {key}: {m}")
    assert (out / "3-interact" / "matches.jsonl").read_text() == (reference / "3-interact" / "matches.jsonl").read_text()


SHARDED = [engine for engine in ENGINES if engine != "zero2"]


@pytest.mark.parametrize("engine", SHARDED)
def test_text_only_sample_on_one_process(engine, tmp_path, synth_dir, tiny_overrides, set_args, cli_env):
    """One process gets a text-only sample, the other an image: every step runs to the end."""
    records = json.loads((synth_dir / "train.json").read_text())[:1]
    records.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    settings = set_args(tiny_overrides(out, **{
        "data.train": [str(data)], "training.max_steps": 1, "training.per_device_train_batch_size": 1}))
    proc = _launch(engine, out, settings, cli_env, None, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for step in STEPS:
        done = json.loads((out / step / "step_complete.json").read_text())
        assert done["global_step"] == 1 and done["data"]["data_kept"] == 2, (step, done)


NAN_AT = "verbalize:step:2,interact:step:2,sft:step:2"  # VLSI_NAN_AT: every training stage


def _nan_run(tiny_overrides, set_args, out: Path, accumulate: int) -> list[str]:
    return set_args(tiny_overrides(out, **{
        "training.max_steps": 3, "training.per_device_train_batch_size": 1,
        "training.gradient_accumulation_steps": accumulate}))


@pytest.fixture(scope="module")
def nan_reference(tmp_path_factory, tiny_overrides, set_args, cli_env) -> Path:
    """One process, two micro-batches per step, both NaN at step 2 of every stage."""
    out = tmp_path_factory.mktemp("one_process_nan") / "run"
    proc = subprocess.run([sys.executable, "-m", "vlsi.cli", "distill", str(TINY_CONFIG),
                           *_nan_run(tiny_overrides, set_args, out, accumulate=2)],
                          cwd=REPO, env={**cli_env, "VLSI_NAN_AT": NAN_AT}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("engine", SHARDED)
def test_nonfinite_loss_is_skipped(engine, tmp_path, nan_reference, tiny_overrides, set_args, cli_env):
    """NaN on the main process at step 2 of 3: both processes skip it, it is counted, and the
    run ends as the one-process run with the same NaN (a skip is a zero gradient)."""
    out = tmp_path / "run"
    env = {**cli_env, "VLSI_NAN_AT": NAN_AT}
    proc = _launch(engine, out, _nan_run(tiny_overrides, set_args, out, accumulate=1), env, None, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for step in STEPS:
        done = json.loads((out / step / "step_complete.json").read_text())
        assert (done["global_step"], done["nonfinite_skipped"]) == (3, 1), step
        ours, theirs = _losses(out / step / "metrics.jsonl"), _losses(nan_reference / step / "metrics.jsonl")
        assert sorted(ours) == sorted(theirs) == [1, 2, 3] and ours[2] == theirs[2] == 0.0, step
        for n in (1, 3):
            assert ours[n] == pytest.approx(theirs[n], rel=LOSS_RTOL), (step, n)
    for name in WEIGHTS:
        ours, theirs = load_file(out / name), load_file(nan_reference / name)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=WEIGHT_ATOL, rtol=0,
                                       msg=lambda m: f"{name} {key}: {m}")
