"""Runs a user can trust, end to end on the tiny pair (``vlsi distill`` in a subprocess):

* a rerun with another config is refused before anything trains, naming what differs, and
  ``config.yaml`` keeps describing what is on disk; ``--restart-changed`` redoes the first
  changed step and the ones after it, keeping the earlier ones;
* an unfinished step resumed with another config is refused the same way;
* pre-flight: configuration mistakes are one line, before the first step trains;
* skipped samples are counted in the console, ``metrics.jsonl`` and ``step_complete.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-qwen2vl.yaml"
STEPS = ("1-teacher-verbalize", "2-student-verbalize", "3-interact", "4-sft")


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_overrides, set_args, run_cli):
    out = tmp_path_factory.mktemp("identity") / "run"
    settings = set_args(tiny_overrides(out, **{"training.max_steps": 2, "training.save_steps": 1}))
    done = run_cli("distill", str(TINY_CONFIG), *settings, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, settings


@pytest.fixture
def finished(pristine, tmp_path):
    """A copy of the finished run of its own (fingerprints hold no output path) and its --set args."""
    out, settings = pristine
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [a.replace(str(out), str(copy)) for a in settings]


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused_then_restarted_from_the_changed_step(finished, run_cli):
    out, settings = finished
    config_before = (out / "config.yaml").read_text()
    done_before = {step: (out / step / "step_complete.json").read_text() for step in STEPS}

    changed = [*settings, "--set", "interaction.strategy=uniform"]
    refused = run_cli("distill", str(TINY_CONFIG), *changed, timeout=300)
    line = _one_line_error(refused)
    assert "3-interact holds a result of other inputs (interaction.strategy: 'vlsi' -> 'uniform')" in line
    assert "--restart-changed" in line and "keeping 1-teacher-verbalize, 2-student-verbalize" in line
    assert (out / "config.yaml").read_text() == config_before  # still describes what is on disk
    assert {s: (out / s / "step_complete.json").read_text() for s in STEPS} == done_before

    redone = run_cli("distill", str(TINY_CONFIG), *changed, "--restart-changed", timeout=300)
    assert redone.returncode == 0, redone.stderr[-3000:]
    for step in STEPS[:2]:  # kept as they were
        assert (out / step / "step_complete.json").read_text() == done_before[step], step
    interact = json.loads((out / "3-interact" / "step_complete.json").read_text())
    assert interact["strategy"] == "uniform"
    assert (out / "4-sft" / "step_complete.json").read_text() != done_before["4-sft"]
    assert "strategy: uniform" in (out / "config.yaml").read_text()
    again = run_cli("distill", str(TINY_CONFIG), *changed, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4, again.stderr[-2000:]


@pytest.mark.slow
def test_an_unfinished_step_resumed_with_another_config_is_refused(finished, tmp_path, run_cli):
    copy, settings = finished
    for name in ("step_complete.json", "model", "adapter"):  # SFT killed before its end
        path = copy / "4-sft" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    refused = run_cli("distill", str(TINY_CONFIG), *settings, "--set", "sft.learning_rate=0.5", timeout=300)
    line = _one_line_error(refused)
    assert "4-sft holds a result of other inputs (training.learning_rate: 0.001 -> 0.5)" in line
    assert not (copy / "4-sft" / "step_complete.json").exists()


@pytest.mark.slow
def test_a_changed_data_file_is_a_changed_input(finished, tmp_path, run_cli, synth_dir):
    out, settings = finished
    records = json.loads((synth_dir / "train.json").read_text())
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records[::-1]))  # same samples, another order: another result
    moved = [*settings, "--set", f"data.train={json.dumps([str(data)])}"]
    line = _one_line_error(run_cli("distill", str(TINY_CONFIG), *moved, timeout=300))
    assert "1-teacher-verbalize holds a result of other inputs (data.train" in line


@pytest.mark.parametrize("change, message", [
    ({"student": "/nonexistent/student"}, "model path not found: /nonexistent/student"),
    ("swap", "is larger than the teacher"),
    ({"verbalizer.student_layers": [0, 5]}, "target layer 5 out of range"),
    ({"verbalizer.student_layers": [0, 1, 2], "verbalizer.teacher_layers": [1]},
     "the student has more target layers than the teacher"),
    ({"data.train": ["/nonexistent/train.json"]}, "data.train: /nonexistent/train.json not found"),
    ({"training.optim": "no_such_optimizer"}, "transformers refuses these training arguments"),
])
def test_preflight_failures_are_one_line_before_any_training(change, message, tmp_path, tiny_overrides,
                                                              set_args, run_cli):
    out = tmp_path / "run"
    overrides = tiny_overrides(out)
    if change == "swap":
        overrides["teacher"], overrides["student"] = overrides["student"], overrides["teacher"]
    else:
        overrides.update(change)
    line = _one_line_error(run_cli("distill", str(TINY_CONFIG), *set_args(overrides), timeout=120))
    assert message in line, line
    assert not (out / STEPS[0]).exists() and not (out / "config.yaml").exists()


def test_other_families_and_disagreeing_tokenizers_are_caught_first(tmp_path, tiny_pair, tiny_overrides,
                                                                     set_args, run_cli):
    out = tmp_path / "run"
    llava = tiny_overrides(out, student=str(tiny_pair("llava_onevision").student))
    line = _one_line_error(run_cli("distill", str(TINY_CONFIG), *set_args(llava), timeout=120))
    assert "different model families" in line
    other = tmp_path / "student"
    shutil.copytree(tiny_overrides(out)["student"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[20:22]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    line = _one_line_error(run_cli("distill", str(TINY_CONFIG),
                                   *set_args(tiny_overrides(out, student=str(other))), timeout=120))
    assert "tokenizers differ" in line
    assert not (out / STEPS[0]).exists()


def test_output_dir_inside_a_model_directory_is_refused(tmp_path, tiny_overrides, set_args, run_cli):
    student = tiny_overrides(tmp_path)["student"]
    overrides = tiny_overrides(Path(student) / "run")
    line = _one_line_error(run_cli("distill", str(TINY_CONFIG), *set_args(overrides), timeout=120))
    assert "is inside the model directory" in line and not (Path(student) / "run").exists()


@pytest.mark.slow
def test_skipped_samples_are_reported_everywhere(tmp_path, tiny_overrides, set_args, run_cli, synth_dir):
    records = json.loads((synth_dir / "train.json").read_text())
    records[2]["image"] = "images/missing.png"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    settings = set_args(tiny_overrides(out, **{"training.max_steps": 1, "data.train": [str(data)]}))
    done = run_cli("distill", str(TINY_CONFIG), *settings, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = f"kept {len(records) - 1} of {len(records)} records; skipped 1 (image_not_found: 1; first: {records[2]['id']})"
    assert done.stdout.count(expected) == 4  # once per step
    for step in STEPS:
        summary = json.loads((out / step / "step_complete.json").read_text())["data"]
        assert summary["data_skipped_by_reason"] == {"image_not_found": 1}, step
        logged = [json.loads(line) for line in (out / step / "metrics.jsonl").read_text().splitlines()]
        assert [r["data_first_skipped"] for r in logged if "data_skipped" in r] == [[records[2]["id"]]]
    strict = run_cli("distill", str(TINY_CONFIG), *settings, "--set", "data.strict=true",
                     "--set", f"output_dir={tmp_path / 'strict'}", timeout=300)
    assert "image" in _one_line_error(strict)
