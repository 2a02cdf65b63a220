"""Training settings are TrainingArguments fields typed by transformers: every shipped config
gives the same TrainingArguments and the same run identity as before the change
(tests/fixtures/training_settings_before.json, recorded from the former TrainingConfig)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlsi.demo.recipe import training_config
from vlsi.demo.recipe import REGIMES
from vlsi.train import fingerprint
from vlsi.train.config import ConfigError, TrainingConfig, load_config
from vlsi.train.stages.arguments import training_arguments

ROOT = Path(__file__).resolve().parents[2]
BEFORE = json.loads((ROOT / "tests/fixtures/training_settings_before.json").read_text())
STAGES = ("verbalize", "interact", "sft")


def _configs(tmp: Path) -> dict[str, Path]:
    """The repo's configs, the demo's (one per regime), and one with pass-through fields in both spellings."""
    out = {f"configs/{p.name}": p for p in sorted((ROOT / "configs").glob("*.yaml"))}
    tiny = yaml.safe_load((ROOT / "configs/tiny-qwen2vl.yaml").read_text())
    for name, make in REGIMES.items():
        recipe = make()
        raw = {**tiny, "training": training_config(recipe.sft, 0), "verbalize": training_config(recipe.verbalize, 0),
               "interact": training_config(recipe.interact, 0), "sft": training_config(recipe.sft, 0)}
        out[f"demo:{name}"] = tmp / f"demo-{name}.yaml"
        out[f"demo:{name}"].write_text(yaml.safe_dump(raw))
    raw = {**tiny, "training": {**tiny["training"], "optim": "adafactor", "warmup_ratio": 0.1, "report_to": ["none"],
                                "arguments": {"lr_scheduler_type": "linear"}},
           "sft": {"num_train_epochs": 2, "learning_rate": "2e-4", "torch_compile": False}}
    out["tiny-qwen2vl+passthrough"] = tmp / "passthrough.yaml"
    out["tiny-qwen2vl+passthrough"].write_text(yaml.safe_dump(raw))
    return out


def test_the_fixture_covers_every_config(tmp_path):
    assert sorted(_configs(tmp_path)) == sorted(BEFORE)


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_same_training_arguments_and_run_identity_as_before(tmp_path, name):
    cfg = load_config(_configs(tmp_path)[name])
    for stage in STAGES:
        before = BEFORE[name][stage]
        args = json.loads(json.dumps(training_arguments(cfg.stage(stage), tmp_path / "out", stage=stage).to_dict(),
                                     default=str))
        assert {k: args[k] for k in before["training_arguments"]} == before["training_arguments"], stage
        settings = fingerprint._settings(cfg, stage)
        assert settings == before["fingerprint_settings"], stage
        assert fingerprint.digest(settings) == before["digest"], stage


def test_flat_settings_are_typed_by_transformers():
    tcfg = TrainingConfig(learning_rate="3e-4", num_train_epochs=2, optim="adafactor", report_to=["none"],
                          gradient_checkpointing=False)
    assert tcfg.learning_rate == 3e-4 and tcfg.num_train_epochs == 2.0 and isinstance(tcfg.num_train_epochs, float)
    assert tcfg.optim == "adafactor" and tcfg.report_to == ["none"] and tcfg.gradient_checkpointing is False
    assert tcfg.per_device_train_batch_size == 4 and tcfg.seed == 42  # the paper's defaults
    assert tcfg.logging_first_step is False  # transformers' default
    assert TrainingConfig(arguments={"optim": "adafactor"}) == TrainingConfig(optim="adafactor")
    assert TrainingConfig(save_total_limit=None).save_total_limit is None
    assert TrainingConfig(lr_scheduler_kwargs={"num_cycles": 2}).lr_scheduler_kwargs == {"num_cycles": 2}


@pytest.mark.parametrize("settings, message", [
    ({"optim": "no_such_optimizer"}, r"^training\.optim: invalid choice"),
    ({"max_steps": 2.5}, r"^training\.max_steps: invalid int value"),
    ({"seed": True}, r"^training\.seed: invalid"),
    ({"gradient_checkpointing": "maybe"}, r"^training\.gradient_checkpointing: "),
    ({"arguments": {"seed": 1}, "seed": 2}, r"^training\.arguments\.seed: also set as training\.seed"),
    ({"arguments": [1]}, r"^training\.arguments: expected a mapping"),
    ({"save_total_limit": [1, 2]}, r"^training\.save_total_limit: expected a single value"),
    ({"learning_rate": None}, r"^training\.learning_rate: invalid value None"),
    ({"max_steps": {"a": 1}}, r"^training\.max_steps: invalid value"),
])
def test_bad_values_are_one_line_errors_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(**settings)
