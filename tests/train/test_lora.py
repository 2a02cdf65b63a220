"""LoRA on the student's language model (vlsi.train.lora), on the tiny student: which modules get an
adapter (by name), what trains, continuing and loading saved adapters, and the refusals."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlsi.errors import VlsiError
from vlsi.models.backbones import LORA_TARGET_PATTERN, load_backbone
from vlsi.train.config import LoraSettings
from vlsi.train.lora import save_adapter, trainable_summary, with_adapter, with_lora

torch.set_num_threads(1)
LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def student(tiny_pair):
    return load_backbone(tiny_pair("qwen2_vl").student)


def _wrapped(model: nn.Module) -> set[str]:
    """Names of the modules that received a LoRA adapter (those holding ``lora_A``)."""
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_the_target_pattern_names_language_model_linears_only():
    pattern = re.compile(LORA_TARGET_PATTERN)
    assert pattern.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    assert pattern.fullmatch("model.language_model.layers.11.mlp.down_proj")
    assert pattern.fullmatch("language_model.layers.3.mlp.gate_proj")
    for name in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head",
                 "model.language_model.layers.0.input_layernorm", "model.language_model.embed_tokens",
                 "model.language_model.layers.0.self_attn.q_proj.lora_A"):
        assert not pattern.fullmatch(name), name


def test_fresh_adapter_on_every_language_model_linear_and_nothing_else(student):
    num_layers = student.model.config.text_config.num_hidden_layers
    model = with_lora(student, LoraSettings(r=4, alpha=8, dropout=0.0))
    wrapped = _wrapped(model)
    assert len(wrapped) == num_layers * len(LM_LINEARS)
    assert all(".language_model.layers." in name and name.rsplit(".", 1)[1] in LM_LINEARS for name in wrapped)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert not any(p.requires_grad for p in student.vision_parameters())
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    module = next(m for name, m in model.named_modules() if name in wrapped)
    assert module.lora_A["default"].weight.shape[0] == 4
    assert torch.count_nonzero(module.lora_B["default"].weight) == 0  # a fresh adapter starts as the identity


def test_the_seed_fixes_the_fresh_adapter(tiny_pair):
    path = tiny_pair("qwen2_vl").student
    weights = []
    for seed in (0, 0, 1):
        model = with_lora(load_backbone(path), LoraSettings(r=2, alpha=2, dropout=0.0), seed=seed)
        weights.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_a_saved_adapter_is_continued_trainable_and_loaded_frozen(student, tiny_pair, tmp_path):
    model = with_lora(student, LoraSettings(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    continued = with_lora(load_backbone(tiny_pair("qwen2_vl").student), LoraSettings(r=64, alpha=64),
                          tmp_path / "adapter")
    assert continued.peft_config["default"].r == 2  # its own rank, not the settings'
    got = {n: p for n, p in continued.named_parameters() if "lora_" in n}
    assert got.keys() == saved.keys() and all(p.requires_grad for p in got.values())
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), saved[name])

    frozen = with_adapter(load_backbone(tiny_pair("qwen2_vl").student).model, tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_an_adapter_that_does_not_fit_is_one_line(tiny_pair, tmp_path):
    other = load_backbone(tiny_pair("qwen2_vl").teacher)  # another hidden size
    with_lora(other, LoraSettings(r=2, alpha=2, dropout=0.0)).save_pretrained(tmp_path / "teacher_adapter")
    with pytest.raises(VlsiError, match="cannot load this LoRA adapter onto the student") as err:
        with_adapter(load_backbone(tiny_pair("qwen2_vl").student).model, tmp_path / "teacher_adapter")
    assert "\n" not in str(err.value) and str(tmp_path / "teacher_adapter") in str(err.value)


def test_an_adapter_on_the_vision_encoder_is_refused(student, tmp_path):
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in student.model.named_modules() if isinstance(m, nn.Linear) and ".visual." in n]
    assert names
    vision = get_peft_model(load_backbone(student.model.config._name_or_path).model,
                            LoraConfig(r=2, lora_alpha=2, target_modules=[names[0].rsplit(".", 1)[1]]))
    vision.save_pretrained(tmp_path / "vision_adapter")
    with pytest.raises(VlsiError, match="trains vision-encoder parameters"):
        with_lora(student, LoraSettings(), tmp_path / "vision_adapter")


def test_trainable_summary():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1000))
    model[1].requires_grad_(False)
    assert trainable_summary(model) == "16 trainable of 5,016 parameters"


class _Recorder:
    def __init__(self):
        self.saved = []

    def save_model(self, path):
        self.saved.append(path)


def test_save_adapter_goes_through_the_trainer_when_it_can(tmp_path, monkeypatch):
    trainer = _Recorder()
    trainer.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
    trainer.is_fsdp_enabled = False
    trainer.is_deepspeed_enabled = False
    save_adapter(trainer, tmp_path / "adapter")
    assert trainer.saved == [str(tmp_path / "adapter")]


def test_save_adapter_gathers_lora_weights_under_sharded_fsdp(tmp_path, student):
    model = with_lora(student, LoraSettings(r=2, alpha=2, dropout=0.0))
    waited = []
    trainer = _Recorder()
    trainer.is_fsdp_enabled = True
    trainer.is_deepspeed_enabled = False
    trainer.model = model
    trainer.args = SimpleNamespace(should_save=True)
    trainer.accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")),
        unwrap_model=lambda m: m, wait_for_everyone=lambda: waited.append(True))
    save_adapter(trainer, tmp_path / "adapter")
    assert trainer.saved == [] and waited == [True]  # not through save_model, and every process waits
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    assert len(saved) == sum(1 for n, p in model.named_parameters() if p.requires_grad)
