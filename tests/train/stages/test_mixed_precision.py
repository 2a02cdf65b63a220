"""Each training stage under bf16 mixed precision, on the CPU.

accelerate's bf16 autocast (``Accelerator(mixed_precision="bf16")``) also runs on a CPU, so the
dtype paths a GPU run takes are exercised here: the prepared model's outputs come back float32
(accelerate's ``convert_outputs_to_fp32``) while the bf16 backbone's heads stay bf16. The
machine's bf16 check (:func:`vlsi.train.stages.arguments.bf16_available`) is patched to say yes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.utils import logging

from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone
from vlsi.train.stages import arguments
from vlsi.train.stages.interact import run_interact
from vlsi.train.stages.sft import run_sft
from vlsi.train.stages.verbalize import run_verbalize

torch.set_num_threads(1)
logging.set_verbosity_error()
logging.disable_progress_bar()

ONE_STEP = {"max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "bf16": True}


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Training arguments with ``bf16=True`` on this CPU (accelerate autocasts on CPUs too)."""
    monkeypatch.setattr(arguments, "bf16_available", lambda: True)


def stage_settings(stage: str) -> dict[str, object]:
    return {f"{stage}.{key}": value for key, value in ONE_STEP.items()}


def logged_loss(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if "loss" in r)


@pytest.mark.parametrize("architecture", ["verb-ffn", "decoder"])
def test_interact_step_under_bf16(bf16_cpu, tiny_config, tmp_path, architecture):
    cfg = tiny_config(tmp_path, **stage_settings("interact"), **{"verbalizer.architecture": architecture})
    dirs = {}
    for role in ("teacher", "student"):  # untrained verbalizers at the default target layers
        torch.manual_seed(0)
        backbone = load_backbone(getattr(cfg, role), dtype=torch.bfloat16)
        dirs[role] = VerbalizerSet(backbone, architecture=architecture).save(tmp_path / f"{role}-verbalizers")
    run_interact(cfg, tmp_path / "interact", teacher_verbalizers=dirs["teacher"], student_verbalizers=dirs["student"])
    adapter = tmp_path / "interact" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and torch.isfinite(torch.tensor(logged_loss(tmp_path / "interact")))


def test_verbalize_step_under_bf16(bf16_cpu, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, **stage_settings("verbalize"))
    run_verbalize(cfg, "student", tmp_path / "verbalize")
    assert torch.isfinite(torch.tensor(logged_loss(tmp_path / "verbalize")))


def test_sft_step_under_bf16(bf16_cpu, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, **stage_settings("sft"))
    model_dir = run_sft(cfg, tmp_path / "sft")
    assert (model_dir / "config.json").is_file() and torch.isfinite(torch.tensor(logged_loss(tmp_path / "sft")))
