"""Run configuration: YAML validated at load, errors name the key."""

import pytest
import yaml

from vlsi.train.config import ConfigError, RunConfig, dump_config, load_config


def _write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {"teacher": "t", "student": "s", "output_dir": "out", "data": {"train": ["train.json"]}}


def test_paper_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.interaction.strategy == "vlsi" and cfg.interaction.scale == 2.0
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 64)
    t = cfg.stage("interact")
    assert (t.learning_rate, t.min_learning_rate) == (1e-4, 1e-6)
    assert t.gradient_accumulation_steps == 16 and t.per_device_train_batch_size == 4
    assert t.gradient_checkpointing and t.bf16 == "auto"


def test_stage_overrides_merge_over_training(tmp_path):
    data = {**BASE, "training": {"learning_rate": "2e-4", "max_steps": 50}, "sft": {"max_steps": 7}}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.stage("sft").max_steps == 7 and cfg.stage("sft").learning_rate == 2e-4
    assert cfg.stage("verbalize").max_steps == 50


@pytest.mark.parametrize("patch, message", [
    ({"interaction": {"stratgy": "vlsi"}}, r"^interaction\.stratgy: unknown key"),
    ({"colour": 1}, r"^colour: unknown key"),
    ({"interaction": {"strategy": "greedy"}}, r"^interaction\.strategy: 'greedy' is not one of"),
    ({"interaction": {"scale": 0}}, r"^interaction\.scale must be > 0"),
    ({"interaction": {"intermediate_op": "none", "last_op": "none"}}, "nothing to train"),
    ({"lora": {"r": -4}}, r"^lora\.r must be > 0"),
    ({"lora": {"dropout": 1.5}}, r"^lora\.dropout"),
    ({"training": {"learning_rate": "fast"}}, r"^training\.learning_rate: invalid float value: 'fast'"),
    ({"training": {"max_steps": 0}}, r"^training\.max_steps"),
    ({"training": {"min_learning_rate": 1.0}}, r"^training\.min_learning_rate"),
    ({"sft": {"per_device_train_batch_size": 0}}, r"^sft\.per_device_train_batch_size must be > 0"),
    ({"sft": {"lr": 1e-4}}, r"^sft\.lr: unknown key"),
    ({"verbalizer": {"architecture": "lstm"}}, r"^verbalizer\.architecture"),
    ({"verbalizer": {"teacher_layers": [1, "x"]}}, r"^verbalizer\.teacher_layers\[1\]: expected an integer"),
    ({"data": {"train": []}}, r"^data\.train: at least one"),
    ({"data": {"train": ["a"], "min_pixels": 100, "max_pixels": 10}}, r"^data\.min_pixels"),
    ({"teacher": ""}, r"^teacher: required"),
    ({"training": {"bf16": "sometimes"}}, r"^training\.bf16"),
    ({"attn_implementation": "flash"}, r"^attn_implementation: 'flash' is not one of sdpa, eager, flash_attention_2"),
    ({"training": {"ddp_timeout": 0}}, r"^training\.ddp_timeout must be > 0"),
    ({"training": {"arguments": {"ddp_timeout": 60}, "ddp_timeout": 60}}, r"^training\.arguments\.ddp_timeout: also set as"),
    ({"training": {"optim": "sgdd"}}, r"^training\.optim: invalid choice: 'sgdd' \(choose from 'adamw_torch', .*\.\.\.\)$"),
    ({"interact": {"ddp_timeout": 60}}, r"^interact\.ddp_timeout: one process group serves every stage"),
])
def test_invalid_values_name_the_key(tmp_path, patch, message):
    data = {**BASE, **patch}
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "teacher: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_dotted_overrides_and_dump_roundtrip(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), {"interaction.strategy": "uniform", "training.max_steps": 3})
    assert cfg.interaction.strategy == "uniform" and cfg.stage("sft").max_steps == 3
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_any_trainer_argument_passes_through_and_others_are_refused(tmp_path):
    data = {**BASE, "training": {"report_to": ["wandb"], "optim": "adafactor", "torch_compile": True},
            "sft": {"lr_scheduler_type": "linear"}}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.training.report_to == ["wandb"]
    assert cfg.training.optim == "adafactor" and cfg.training.torch_compile is True
    assert cfg.stage("sft").lr_scheduler_type == "linear" and cfg.stage("sft").optim == "adafactor"
    assert cfg.stage("interact").lr_scheduler_type == "linear"  # transformers' default
    assert cfg.stage("sft").settings()["arguments"] == {"optim": "adafactor", "torch_compile": True,
                                                        "lr_scheduler_type": "linear"}
    former = {**data, "training": {"report_to": ["wandb"], "arguments": {"optim": "adafactor", "torch_compile": True}}}
    assert load_config(_write(tmp_path, former)) == cfg  # the former spelling: fields under `arguments`
    with pytest.raises(ConfigError, match="^training.nonsense: unknown key .*TrainingArguments"):
        load_config(_write(tmp_path, {**BASE, "training": {"nonsense": 1}}))
    with pytest.raises(ConfigError, match="^sft.output_dir: set by vlsi itself"):
        load_config(_write(tmp_path, {**BASE, "sft": {"output_dir": "x"}}))
    with pytest.raises(ConfigError, match="^data.eval: unknown key"):
        load_config(_write(tmp_path, {**BASE, "data": {"train": ["t.json"], "eval": ["e.json"]}}))


def test_transformers_validates_passed_through_arguments(tmp_path):
    from vlsi.errors import VlsiError
    from vlsi.train.stages.arguments import check_arguments

    cfg = load_config(_write(tmp_path, {**BASE, "training": {"dataloader_prefetch_factor": 2}}))
    with pytest.raises(VlsiError, match="^interact: transformers refuses these training arguments"):
        check_arguments(cfg.stage("interact"), "interact")


def test_ddp_timeout_reaches_the_training_arguments(tmp_path):
    """Ranks wait in collectives while rank 0 loads or exports alone: 3 h by default, not 30 min."""
    from vlsi.train.stages.arguments import training_arguments

    for training, expected in (({}, 3 * 3600), ({"ddp_timeout": 600}, 600)):
        cfg = load_config(_write(tmp_path, {**BASE, "training": training}))
        for stage in ("verbalize", "interact", "sft"):
            args = training_arguments(cfg.stage(stage), tmp_path / stage, stage=stage)
            assert args.ddp_timeout == expected and args.ddp_timeout_delta.total_seconds() == expected


def test_every_field_has_help_text():
    import dataclasses

    from vlsi.train.config import (DataConfig, GenerationSettings, InteractionConfig, LoraSettings, TrainingConfig,
                                   VerbalizerConfig)

    for cls in (RunConfig, DataConfig, VerbalizerConfig, InteractionConfig, GenerationSettings, LoraSettings,
                TrainingConfig):
        for f in dataclasses.fields(cls):
            assert dataclasses.is_dataclass(f.type) or f.metadata.get("help") or f.name in (
                "data", "verbalizer", "interaction", "lora", "training"), (cls.__name__, f.name)
