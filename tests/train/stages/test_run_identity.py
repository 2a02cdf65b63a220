"""Runs a user can trust, end to end on the tiny pair (``vlsi distill``; the session's shared
run of tests/conftest.py, copied where a test changes it):

* a rerun with another config is refused before anything trains, naming what differs, and
  ``config.yaml`` keeps describing what is on disk; ``--restart-changed`` redoes the first
  changed step and the ones after it, keeping the earlier ones;
* an unfinished step resumed with another config is refused the same way;
* pre-flight: configuration mistakes are one line, before the first step trains;
* skipped samples are counted in the console, ``metrics.jsonl`` and ``step_complete.json``.

Whatever stops before training runs in this process (``vlsi.cli.main``); what trains runs in a
subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import MISSING_IMAGE, STEPS, TINY_CONFIG, one_line


@pytest.fixture
def finished(distilled, tmp_path):
    """A copy of the shared finished run of its own (fingerprints hold no output path)."""
    return distilled.copy(tmp_path / "run")


def _refusal(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    return one_line(result.stderr)


def test_a_rerun_with_another_config_is_refused_then_restarted_from_the_changed_step(finished, cli, run_cli):
    out = finished.out
    config_before = (out / "config.yaml").read_text()
    done_before = {step: (out / step / "step_complete.json").read_text() for step in STEPS}

    changed = [*finished.settings(), "--set", "interaction.strategy=uniform"]
    line = _refusal(cli("distill", TINY_CONFIG, *changed))
    assert "3-interact holds a result of other inputs (interaction.strategy: 'vlsi' -> 'uniform')" in line
    assert "--restart-changed" in line and "keeping 1-teacher-verbalize, 2-student-verbalize" in line
    assert (out / "config.yaml").read_text() == config_before  # still describes what is on disk
    assert {s: (out / s / "step_complete.json").read_text() for s in STEPS} == done_before

    redone = run_cli("distill", str(TINY_CONFIG), *changed, "--restart-changed")
    assert redone.returncode == 0, redone.stderr[-3000:]
    for step in STEPS[:2]:  # kept as they were
        assert (out / step / "step_complete.json").read_text() == done_before[step], step
    interact = json.loads((out / "3-interact" / "step_complete.json").read_text())
    assert interact["strategy"] == "uniform"
    assert (out / "4-sft" / "step_complete.json").read_text() != done_before["4-sft"]
    assert "strategy: uniform" in (out / "config.yaml").read_text()
    again = cli("distill", TINY_CONFIG, *changed)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4, again.stderr[-2000:]


def test_an_unfinished_step_resumed_with_another_config_is_refused(finished, cli):
    copy = finished.out
    for name in ("step_complete.json", "model", "adapter"):  # SFT killed before its end
        path = copy / "4-sft" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    line = _refusal(cli("distill", TINY_CONFIG, *finished.settings(), "--set", "sft.learning_rate=0.5"))
    assert "4-sft holds a result of other inputs (training.learning_rate: 0.001 -> 0.5)" in line
    assert not (copy / "4-sft" / "step_complete.json").exists()


def test_a_changed_data_file_is_a_changed_input(distilled, tmp_path, cli):
    records = json.loads(distilled.data.read_text())
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records[::-1]))  # same samples, another order: another result
    line = _refusal(cli("distill", TINY_CONFIG, *distilled.settings(**{"data.train": [str(data)]})))
    assert "1-teacher-verbalize holds a result of other inputs (data.train" in line


@pytest.mark.parametrize("change, message", [
    ({"student": "/nonexistent/student"}, "model path not found: /nonexistent/student"),
    ("swap", "is larger than the teacher"),
    ({"verbalizer.student_layers": [0, 5]}, "target layer 5 out of range"),
    ({"verbalizer.student_layers": [0, 1, 2], "verbalizer.teacher_layers": [1]},
     "the student has more target layers than the teacher"),
    ({"data.train": ["/nonexistent/train.json"]}, "data.train: /nonexistent/train.json not found"),
    ({"training.optim": "no_such_optimizer"}, "training.optim: invalid choice: 'no_such_optimizer'"),
    ({"training.dataloader_prefetch_factor": 2}, "transformers refuses these training arguments"),
])
def test_preflight_failures_are_one_line_before_any_training(change, message, tmp_path, tiny_overrides,
                                                              set_args, cli):
    out = tmp_path / "run"
    overrides = tiny_overrides(out)
    if change == "swap":
        overrides["teacher"], overrides["student"] = overrides["student"], overrides["teacher"]
    else:
        overrides.update(change)
    line = _refusal(cli("distill", TINY_CONFIG, *set_args(overrides)))
    assert message in line, line
    assert not (out / STEPS[0]).exists() and not (out / "config.yaml").exists()


def test_other_families_and_disagreeing_tokenizers_are_caught_first(tmp_path, tiny_pair, tiny_overrides,
                                                                     set_args, cli):
    out = tmp_path / "run"
    llava = tiny_overrides(out, student=str(tiny_pair("llava_onevision").student))
    line = _refusal(cli("distill", TINY_CONFIG, *set_args(llava)))
    assert "different model families" in line
    other = tmp_path / "student"
    shutil.copytree(tiny_overrides(out)["student"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[20:22]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    line = _refusal(cli("distill", TINY_CONFIG, *set_args(tiny_overrides(out, student=str(other)))))
    assert "tokenizers differ" in line
    assert not (out / STEPS[0]).exists()


def test_output_dir_inside_a_model_directory_is_refused(tmp_path, tiny_overrides, set_args, cli):
    student = tiny_overrides(tmp_path)["student"]
    overrides = tiny_overrides(Path(student) / "run")
    line = _refusal(cli("distill", TINY_CONFIG, *set_args(overrides)))
    assert "is inside the model directory" in line and not (Path(student) / "run").exists()


def test_skipped_samples_are_reported_everywhere(distilled, tmp_path, cli):
    """The shared run's data names one missing image (tests/conftest.py)."""
    records = json.loads(distilled.data.read_text())
    assert records[2]["image"] == MISSING_IMAGE
    expected = f"kept {len(records) - 1} of {len(records)} records; skipped 1 (image_not_found: 1; first: {records[2]['id']})"
    assert distilled.stdout.count(expected) == 4  # once per step
    for step in STEPS:
        summary = json.loads((distilled.out / step / "step_complete.json").read_text())["data"]
        assert summary["data_skipped_by_reason"] == {"image_not_found": 1}, step
        logged = [json.loads(line) for line in (distilled.out / step / "metrics.jsonl").read_text().splitlines()]
        assert [r["data_first_skipped"] for r in logged if "data_skipped" in r] == [[records[2]["id"]]]
    strict = cli("distill", TINY_CONFIG, *distilled.settings(tmp_path / "strict", **{"data.strict": True}))
    assert "image" in _refusal(strict)
