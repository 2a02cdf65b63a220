"""The smallest end-to-end run (`vlsi demo`) and the command line's error handling."""

import json

import pytest

from vlsi.cli import main


def test_demo_runs_one_interaction_step(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "interaction.json").read_text())
    assert summary["samples"] == 64 and summary["response_positions"] > 0
    t_s, t_l = len(summary["student_target_layers"]), len(summary["teacher_target_layers"])
    assert len(summary["kld"]) == t_s and len(summary["kld"][0]) == t_l
    assert len(summary["matched_layers"]) == t_s
    assert summary["loss"] > 0 and summary["student_grad_norm"] > 0
    assert "interaction loss" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing.json"), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_tiny_command_builds_a_pair(tmp_path, capsys):
    assert main(["tiny", str(tmp_path), "--family", "qwen3_vl"]) == 0
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["transmogrify"])
    assert exc.value.code == 2
