"""The command line: every value a user can type gets a one-line answer, never a traceback."""

from __future__ import annotations

import pytest

from vlsi.cli import main

REPO_CONFIG = "configs/tiny-qwen2vl.yaml"


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "m", "--data", "d.json", "--batch-size", "0"],
    ["eval", "--model", "m", "--data", "d.json", "--limit", "-3"],
    ["eval", "--model", "m", "--data", "d.json", "--max-new-tokens", "two"],
    ["generate", "--model", "m", "--prompt", "hi", "--num-beams", "0"],
    ["verbalize-layers", "--model", "m", "--verbalizers", "v", "--prompt", "p", "--out", "o.html",
     "--max-new-tokens", "0"],
    ["bench", "loss", "--tokens", "0"],
    ["bench", "loss", "--vocab-size", "-1"],
    ["bench", "loss", "--timeout", "0"],
    ["data", "check", "f.json", "--max-length", "0"],
    ["demo", "--seeds", "0"],
    ["ablate", "--seeds", "-1"],
    ["tiny", "out", "--family", "gpt2"],
])
def test_bad_values_are_usage_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("vlsi ") or "error:" in err.strip().splitlines()[-1]


def test_config_prints_every_key_with_its_help(capsys):
    assert main(["config", REPO_CONFIG, "--set", "training.optim=adamw_torch_fused"]) == 0
    out = capsys.readouterr().out
    assert 'interaction.strategy = "vlsi"    # layer matching' in out
    assert 'training.optim = "adamw_torch_fused"    # TrainingArguments: ' in out
    assert 'training.min_learning_rate = 1e-05    # learning rate at the end of the cosine schedule' in out
    lines = [line for line in out.splitlines() if " = " in line]
    assert all("    # " in line for line in lines), [line for line in lines if "    # " not in line]


def test_teacher_cache_option_is_validated_with_the_config(tmp_path, capsys):
    """--teacher-cache is a config override: what the cache rules out fails at load, in one line."""
    argv = ["interact", REPO_CONFIG, "--teacher-cache", str(tmp_path / "cache"), "--set",
            "interaction.on_policy=0.5", "--teacher-verbalizers", str(tmp_path / "missing")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interaction.on_policy: a teacher cache") and "\n" not in err


def test_demo_pretrain_is_a_sub_command_and_demo_alone_runs_the_demo():
    from vlsi.cli import _cmd_demo, _cmd_demo_pretrain, build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--quick"]).func is _cmd_demo
    assert parser.parse_args(["demo", "run", "--seeds", "2"]).func is _cmd_demo
    pretrain = parser.parse_args(["demo", "pretrain", "--regime", "lists", "--out", "d", "--teacher-from", "shipped"])
    assert pretrain.func is _cmd_demo_pretrain and (pretrain.out, pretrain.regime) == ("d", "lists")
    with pytest.raises(SystemExit):  # a demo-run option, not a pretraining one
        parser.parse_args(["demo", "pretrain", "--seeds", "2"])


def test_demo_options_before_the_sub_command_stand_or_are_refused(monkeypatch):
    from vlsi.demo import run as demo_run
    from vlsi.cli import build_parser, main

    parser = build_parser()
    before = parser.parse_args(["demo", "--quick", "--out", "d", "pretrain", "--regime", "counts"])
    assert (before.quick, before.out, before.regime) == (True, "d", "counts")
    run = parser.parse_args(["demo", "--seeds", "2", "run", "--quick"])
    assert (run.seeds, run.quick, run.out) == (2, True, "runs/demo")
    monkeypatch.setattr(demo_run, "run_pretrain", lambda *a, **k: pytest.fail("pretraining started"))
    assert main(["demo", "--seeds", "2", "pretrain"]) != 0
    assert main(["demo", "--pair", "p", "pretrain"]) != 0


def test_every_command_of_the_table_is_registered():
    from vlsi.cli import COMMANDS, build_parser

    parser = build_parser()
    for command in COMMANDS:
        assert command.name in parser.format_help()
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([command.name, "--help"])
        assert stop.value.code == 0
