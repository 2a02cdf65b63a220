"""On-policy interaction end to end on the tiny pair: the student generates, the teacher grades.

In-process runs of :func:`vlsi.train.stages.interact.run_interact` (untrained verbalizers at the
default target layers), a kill-and-resume in a subprocess, and the one-line refusal with a
teacher cache.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.utils import logging

from helpers import REPO, TINY_CONFIG, free_port
from vlsi.method.on_policy import longest_response, on_policy_draw
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone
from vlsi.train.config import ConfigError
from vlsi.train.stages.interact import run_interact
from vlsi.train.stages.training_data import load_training_data

torch.set_num_threads(1)
logging.set_verbosity_error()
logging.disable_progress_bar()

STEPS = {"interact.max_steps": 2, "interact.save_steps": 1, "interact.per_device_train_batch_size": 2,
         "interact.gradient_accumulation_steps": 2, "training.logging_steps": 1}


def verbalizer_dirs(cfg, root: Path) -> dict[str, Path]:
    dirs = {}
    for role in ("teacher", "student"):
        torch.manual_seed(0)
        dirs[role] = VerbalizerSet(load_backbone(getattr(cfg, role))).save(root / f"{role}-verbalizers")
    return dirs


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def verbalizers(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("verbalizers")
    return verbalizer_dirs(tiny_config(root / "run"), root)


def run(tiny_config, out: Path, verbalizers, **more) -> Path:
    cfg = tiny_config(out.parent / "cfg", **STEPS, **more)
    run_interact(cfg, out, teacher_verbalizers=verbalizers["teacher"], student_verbalizers=verbalizers["student"])
    return out


def test_fully_on_policy_trains_on_generated_responses(tiny_config, tmp_path, verbalizers):
    out = run(tiny_config, tmp_path / "on", verbalizers, **{"interaction.on_policy": 1.0})
    # max_new_tokens defaults to the longest response of the data
    cfg = tiny_config(tmp_path / "cfg")
    longest = longest_response([s.labels for s in load_training_data(cfg.data, cfg.student)[0].samples])
    records = [r for r in metrics(out) if "loss" in r]
    assert len(records) == 2 and all(r["on_policy/share"] == 1.0 for r in records)
    assert all(1 <= r["on_policy/generated_tokens"] <= longest and 0 <= r["on_policy/truncated"] <= 1
               for r in records)
    assert all(r["seconds/generation"] > 0 for r in records)
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 1, 2, 2]  # the micro-batch's 2 samples, once per window
    assert all(set(r) == {"step", "sample", "text", "tokens", "ended"} and 1 <= r["tokens"] <= longest
               for r in lines)
    assert json.loads((out / "step_complete.json").read_text())["outputs"][-1] == "generations.jsonl"
    # the same run off-policy trains on other tokens: other weights
    off = run(tiny_config, tmp_path / "off", verbalizers)
    assert not (off / "generations.jsonl").exists()
    assert "on_policy/share" not in metrics(off)[0]
    assert any(not torch.equal(a, b) for a, b in zip(adapter(out).values(), adapter(off).values()))


def test_a_rerun_generates_the_same_tokens_and_weights(tiny_config, tmp_path, verbalizers):
    more = {"interaction.on_policy": 0.5, "interaction.generation.max_new_tokens": 5}
    first = run(tiny_config, tmp_path / "a", verbalizers, **more)
    second = run(tiny_config, tmp_path / "b", verbalizers, **more)
    assert (first / "generations.jsonl").read_text() == (second / "generations.jsonl").read_text()
    for (name, a), b in zip(adapter(first).items(), adapter(second).values()):
        assert torch.equal(a, b), name
    # the logged share of each step is that of the seeded draws of its 2 micro-batches
    cfg = tiny_config(tmp_path / "cfg", **STEPS, **more)
    seed = cfg.stage("interact").seed
    expected = [sum(on_policy_draw(seed, step, draw, 0.5) for draw in range(2)) / 2 for step in range(2)]
    assert [r["on_policy/share"] for r in metrics(first) if "loss" in r] == expected


def test_teacher_cache_with_on_policy_is_a_one_line_refusal(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="on_policy: a teacher cache"):
        tiny_config(tmp_path, **{"interaction.on_policy": 0.5, "interaction.teacher_cache": str(tmp_path / "c")})


@pytest.mark.slow
def test_killed_mid_step_and_resumed_equals_uninterrupted(tmp_path, tiny_overrides, set_args, run_cli, verbalizers):
    """SIGKILL inside interaction step 2 (after checkpoint-1), then ``--resume``: same generated
    tokens, same weights as an uninterrupted run."""
    more = {**STEPS, "interaction.on_policy": 1.0, "interaction.generation.max_new_tokens": 5}
    outs = {}
    for name, kill in (("reference", None), ("killed", "interact:step:2")):
        out = tmp_path / name
        args = ["interact", str(TINY_CONFIG),
                "--teacher-verbalizers", str(verbalizers["teacher"]), "--student-verbalizers",
                str(verbalizers["student"]), "--out", str(out), *set_args(tiny_overrides(tmp_path / "cfg", **more))]
        if kill:
            proc = run_cli(*args, env={"VLSI_KILL_AT": kill})
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            assert (out / "checkpoint-1").is_dir() and not (out / "step_complete.json").exists()
            args.append("--resume")
        done = run_cli(*args, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = out
    assert (outs["killed"] / "generations.jsonl").read_text() == (outs["reference"] / "generations.jsonl").read_text()
    for (name, a), b in zip(adapter(outs["reference"]).items(), adapter(outs["killed"]).values()):
        assert torch.equal(a, b), name


# -- several processes --------------------------------------------------------------------------

LAUNCHERS = {  # engine -> launcher arguments before the module or script
    "ddp": ["--multi_gpu"],
    "zero3": ["--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml")],
    "fsdp2": ["--config_file", str(REPO / "accelerate_configs" / "fsdp.yaml")],
}
ON_POLICY_HALF = {"interact.max_steps": 2, "interact.save_steps": 2, "interact.per_device_train_batch_size": 1,
                  "interaction.on_policy": 0.5, "interaction.generation.max_new_tokens": 5,
                  "training.logging_steps": 1}


def _interact_args(out: Path, verbalizers, settings: list[str]) -> list[str]:
    return ["interact", str(TINY_CONFIG), "--teacher-verbalizers", str(verbalizers["teacher"]),
            "--student-verbalizers", str(verbalizers["student"]), "--out", str(out), *settings]


def _launch_two(engine: str, args: list[str], env: dict[str, str]):
    import subprocess
    import sys

    target = [str(Path(__file__).with_name("fsdp_on_cpu.py"))] if engine == "fsdp2" else ["-m", "vlsi.cli"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[engine], "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *target, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def one_process_half(tmp_path_factory, verbalizers, tiny_overrides, set_args, run_cli):
    """One process accumulating the two micro-batches that two processes take one each."""
    out = tmp_path_factory.mktemp("on_policy_one") / "interact"
    settings = set_args(tiny_overrides(out.parent, **ON_POLICY_HALF, **{"interact.gradient_accumulation_steps": 2}))
    done = run_cli(*_interact_args(out, verbalizers, settings), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _assert_agree(out: Path, reference: Path) -> None:
    ours = [r for r in metrics(out) if "loss" in r]
    theirs = [r for r in metrics(reference) if "loss" in r]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2]
    for a, b in zip(ours, theirs):
        assert a["on_policy/share"] == b["on_policy/share"]  # the same draws, per micro-batch and process
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, a), b in zip(adapter(reference).items(), adapter(out).values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs two processes on the CPU")
@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_two_processes_agree_with_one(engine, tmp_path, one_process_half, verbalizers, tiny_overrides, set_args,
                                      cli_env):
    """Half the micro-batches on-policy, drawn per micro-batch and process: two processes
    generate (ZeRO-3 and FSDP2: together, every decoding step gathering parameters) the tokens
    one process generates, and end with its weights."""
    settings = set_args(tiny_overrides(tmp_path, **ON_POLICY_HALF, **{"interact.gradient_accumulation_steps": 1}))
    out = tmp_path / "interact"
    proc = _launch_two(engine, _interact_args(out, verbalizers, settings), cli_env)
    if proc.returncode != 0 and _aborted_at_exit(proc, out):
        # Known issue (docs/status.md): a rank sometimes aborts after its step is complete. That
        # case alone is retried once, into a fresh directory; a second failure fails the test.
        out = tmp_path / "interact-retry"
        proc = _launch_two(engine, _interact_args(out, verbalizers, settings), cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_agree(out, one_process_half)


def _aborted_at_exit(proc, out: Path) -> bool:
    """The run finished its step, and then one rank aborted ("terminate called without an
    active exception", a C++ thread destroyed at interpreter exit)."""
    return (out / "step_complete.json").is_file() and "terminate called without an active exception" in proc.stderr
