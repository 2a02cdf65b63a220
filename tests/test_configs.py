"""Every shipped run config and accelerate config loads, and the paper's settings are in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO
from vlsi.method.verbalizer import validate_target_layers
from vlsi.models.families import FAMILIES
from vlsi.train.config import load_config

RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))

# Decoder layers of the real backbones (Qwen2-72B, Qwen2-7B, Qwen2-1.5B, Qwen2-0.5B language models).
LAYERS = {
    "Qwen2-VL-72B-Instruct": 80, "Qwen2-VL-7B-Instruct": 28, "Qwen2-VL-2B-Instruct": 28,
    "llava-onevision-qwen2-72b-ov-hf": 80, "llava-onevision-qwen2-7b-ov-hf": 28,
    "llava-onevision-qwen2-0.5b-ov-hf": 24,
}


def test_the_expected_configs_ship():
    names = {p.name for p in RUN_CONFIGS}
    assert {"qwen2vl-72b-to-7b.yaml", "qwen2vl-72b-to-2b.yaml", "qwen2vl-7b-to-2b.yaml",
            "llava-ov-72b-to-7b.yaml", "llava-ov-72b-to-0.5b.yaml", "tiny-qwen2vl.yaml"} <= names
    assert {p.name for p in ACCELERATE_CONFIGS} == {
        "single_gpu.yaml", "multi_gpu_ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads(path):
    cfg = load_config(path)
    for stage in ("verbalize", "interact", "sft"):
        cfg.stage(stage)
    assert Path(cfg.output_dir).parts[0] == "runs"


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if not p.name.startswith("tiny")],
                         ids=lambda p: p.name)
def test_real_configs_follow_the_paper(path):
    """Section 4.1c / appendix D: LoRA 64/64, AdamW cosine 1e-4 -> 1e-6, accumulation 16,
    gradient checkpointing, bf16 where available; batch per device by model size."""
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 64)
    assert cfg.interaction.strategy == "vlsi" and cfg.verbalizer.architecture == "verb-ffn"
    llava = path.name.startswith("llava")
    teacher_72b = "72b" in path.name
    for stage in ("verbalize", "interact", "sft"):
        t = cfg.stage(stage)
        assert (t.learning_rate, t.min_learning_rate) == (1e-4, 1e-6)
        assert t.gradient_accumulation_steps == 16 and t.gradient_checkpointing and t.bf16 == "auto"
        assert t.dataloader_num_workers > 0 and t.dataloader_pin_memory  # input work off the training process
        runs_72b = teacher_72b and stage in ("verbalize", "interact")
        assert t.per_device_train_batch_size == {(False, False): 4, (False, True): 2,
                                                 (True, False): 2, (True, True): 1}[llava, runs_72b]
    teacher, student = LAYERS[Path(cfg.teacher).name], LAYERS[Path(cfg.student).name]
    t_layers = validate_target_layers(cfg.verbalizer.teacher_layers, teacher)
    s_layers = validate_target_layers(cfg.verbalizer.student_layers, student)
    assert len(s_layers) <= len(t_layers)
    if llava:  # appendix D
        assert (s_layers, t_layers) == ([3, 11, 19], [9, 29, 49, 69])
    else:      # the default rule (docs/method.md#target-layers)
        assert s_layers == list(range(1, student - 1, 4)) and t_layers == list(range(1, teacher - 1, 4))


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if p.name.startswith("tiny")], ids=lambda p: p.name)
def test_tiny_configs_point_at_the_documented_commands(path):
    text = path.read_text()
    cfg = load_config(path)
    assert "vlsi data synth runs/synth" in text and cfg.data.train == ["runs/synth/train.json"]
    tiny_dir = str(Path(cfg.student).parent)
    assert f"vlsi tiny {tiny_dir}" in text
    assert cfg.lora.dropout == 0.0 and cfg.stage("sft").max_steps <= 50


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    """accelerate's own loader (it rejects unknown keys)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    expected = {"single_gpu.yaml": DistributedType.NO, "multi_gpu_ddp.yaml": DistributedType.MULTI_GPU,
                "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
                "deepspeed_zero3.yaml": DistributedType.DEEPSPEED, "fsdp.yaml": DistributedType.FSDP}
    assert cfg.distributed_type == expected[path.name]
    assert cfg.mixed_precision == "bf16"
    if path.name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
        # left to the Trainer ("auto"), so the run config's accumulation and clipping apply
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config
        assert "gradient_clipping" not in cfg.deepspeed_config
    if path.name == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        # unset: every model (teacher, student, verbalizers) wraps the blocks it names itself
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fsdp_units_are_each_familys_blocks(family, tiny_pair):
    """FSDP2 wraps what a model lists in ``_no_split_modules`` (fsdp.yaml names no class): for
    every family that is its decoder layers and its vision blocks."""
    from vlsi.models.backbones import load_backbone

    model = load_backbone(tiny_pair(family).teacher).model
    present = {type(m).__name__ for m in model.modules()}
    blocks = [name for name in model._no_split_modules if name in present]
    assert any("DecoderLayer" in name for name in blocks), blocks
    assert any("Vision" in name or "EncoderLayer" in name for name in blocks), blocks
