"""``vlsi distill`` end to end on the tiny pair, read from the session's shared runs
(tests/conftest.py): four step directories and the exported model, finished steps skipped, an
unfinished step resumed from its checkpoint (the weights are checked in test_resume.py), and
``--no-resume`` restarting it."""

from __future__ import annotations

import json

from helpers import STEPS, TINY_CONFIG, status_lines


def test_distill_writes_every_step_and_the_exported_model(distilled):
    from transformers import AutoModelForImageTextToText

    out = distilled.out
    assert [line.split(":")[1].split()[0] for line in status_lines(distilled.stdout)] == ["starting"] * 4
    for step in STEPS:
        done = json.loads((out / step / "step_complete.json").read_text())
        assert done["global_step"] == 4, step
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


def test_a_finished_run_is_skipped_and_left_as_it_is(distilled, cli):
    before = {step: (distilled.out / step / "step_complete.json").read_text() for step in STEPS}
    again = cli("distill", TINY_CONFIG, *distilled.settings())
    assert again.returncode == 0, again.stderr[-3000:]
    lines = status_lines(again.stdout)
    assert len(lines) == 4 and all("done, skipped" in line for line in lines), lines
    assert {step: (distilled.out / step / "step_complete.json").read_text() for step in STEPS} == before


def test_an_unfinished_step_resumes_from_its_newest_checkpoint(resumed):
    """The shared run killed last after SFT's checkpoint-2 (tests/conftest.py): the rerun skips
    the finished steps and resumes SFT there."""
    lines = status_lines(resumed.stdout)
    assert len(lines) == 4 and all("done, skipped" in line for line in lines[:3]), lines
    sft = resumed.out / "4-sft"
    assert lines[3].startswith("[4/4]") and f"resuming from {sft / 'checkpoint-2'}" in lines[3], lines[3]


def test_no_resume_restarts_an_unfinished_step(distilled, tmp_path, run_cli):
    run = distilled.copy(tmp_path / "run")
    sft = run.out / "4-sft"
    (sft / "step_complete.json").unlink()
    restarted = run_cli("distill", str(TINY_CONFIG), *run.settings(), "--no-resume")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "restarting" in status_lines(restarted.stdout)[3]
    assert (sft / "step_complete.json").is_file()
    records = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # nothing left of the old run
