"""``vlsi distill`` end to end on the tiny pair: four step directories, finished steps skipped,
an unfinished step resumed from its checkpoint (same weights as the uninterrupted run), and
``--no-resume`` restarting it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-qwen2vl.yaml"
STEPS = ("1-teacher-verbalize", "2-student-verbalize", "3-interact", "4-sft")


def _status_lines(stdout: str) -> list[str]:
    """The ``[k/n] step: ...`` lines (not other libraries' ``[date] [WARNING]`` lines)."""
    return [line for line in stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]


@pytest.mark.slow
def test_distill_runs_skips_and_resumes(tmp_path, tiny_overrides, set_args, run_cli):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    settings = set_args(tiny_overrides(out, **{"training.max_steps": 2, "training.save_steps": 1}))

    first = run_cli("distill", str(TINY_CONFIG), *settings, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line.split(":")[1].split()[0] for line in _status_lines(first.stdout)] == ["starting"] * 4
    for step in STEPS:
        assert (out / step / "step_complete.json").is_file(), step
    assert (out / "config.yaml").is_file()
    assert (out / "3-interact" / "adapter" / "adapter_config.json").is_file()
    model_dir = out / "4-sft" / "model"
    assert json.loads((out / "4-sft" / "step_complete.json").read_text())["started_from"] == str(
        out / "3-interact" / "adapter")
    # the student's own verbalizers (step 2) travel with the exported model
    assert (model_dir / "verbalizers" / "verbalizers.safetensors").read_bytes() == (
        out / "2-student-verbalize" / "verbalizers.safetensors").read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    reference = load_file(str(model_dir / "model.safetensors"))

    again = run_cli("distill", str(TINY_CONFIG), *settings, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all("done, skipped" in line for line in _status_lines(again.stdout))
    assert len(_status_lines(again.stdout)) == 4

    # SFT "killed" after its first checkpoint: the newest checkpoint and the outputs are gone.
    sft = out / "4-sft"
    for name in ("step_complete.json", "model", "adapter", "checkpoint-2"):
        path = sft / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_cli("distill", str(TINY_CONFIG), *settings, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = _status_lines(resumed.stdout)
    assert all("done, skipped" in line for line in lines[:3])
    assert lines[3].startswith("[4/4]") and f"resuming from {sft / 'checkpoint-1'}" in lines[3]
    got = load_file(str(sft / "model" / "model.safetensors"))
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6)

    # --no-resume: the unfinished step is started over, from an empty directory.
    (sft / "step_complete.json").unlink()
    restarted = run_cli("distill", str(TINY_CONFIG), *settings, "--no-resume", timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "restarting" in _status_lines(restarted.stdout)[3]
    assert (sft / "step_complete.json").is_file()
    records = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # nothing left of the old run
