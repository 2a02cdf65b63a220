"""Export of the trained student (vlsi.train.export) as a stock checkpoint, on the tiny student with a
LoRA of known weights: the merge, the copied tokenizer and processor files, the verbalizers, the
atomic replacement of an older export, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlsi.errors import VlsiError
from vlsi.models.backbones import load_backbone
from vlsi.train.config import LoraSettings
from vlsi.train.export import VERBALIZER_DIR, export_student
from vlsi.train.lora import with_lora

torch.set_num_threads(1)
MODULE = "model.language_model.layers.0.self_attn.q_proj"
SAVED = "model.layers.0.self_attn.q_proj.weight"  # its name in Qwen2-VL's saved (legacy) layout


@pytest.fixture
def lora_student(tiny_pair):
    """The tiny student with a LoRA whose B matrices are non-zero (the merge changes weights)."""
    source = tiny_pair("qwen2_vl").student
    model = with_lora(load_backbone(source), LoraSettings(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    return model, source


@pytest.fixture
def verbalizers(tmp_path) -> Path:
    d = tmp_path / "verbalizers_src"
    d.mkdir()
    (d / "verbalizers.safetensors").write_bytes(b"weights of the verbalizers")
    (d / "verbalizers.json").write_text('{"layers": [1]}')
    return d


def test_the_export_is_the_merged_student_with_its_files(lora_student, verbalizers, tmp_path):
    model, source = lora_student
    base = load_file(str(source / "model.safetensors"))
    layer = model.base_model.model.get_submodule(MODULE)
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    out = export_student(model, source, tmp_path / "model", verbalizers_dir=verbalizers)
    assert out == tmp_path / "model"

    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == base.keys()  # the student's own names: no adapter, no base_model prefix
    torch.testing.assert_close(weights[SAVED], base[SAVED] + delta)
    vision = next(k for k in base if k.startswith("visual."))
    assert torch.equal(weights[vision], base[vision])  # only the language model changes
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert "auto_map" not in (out / "config.json").read_text()
    assert (out / VERBALIZER_DIR / "verbalizers.safetensors").read_bytes() == b"weights of the verbalizers"
    assert (out / VERBALIZER_DIR / "verbalizers.json").read_text() == '{"layers": [1]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "verbalizers_src"]  # no .partial or .old left


def test_an_older_export_is_replaced_whole(tiny_pair, tmp_path):
    source = tiny_pair("qwen2_vl").student
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    export_student(load_backbone(source).model, source, out)  # a plain model, no adapter
    assert not (out / "stale.safetensors").exists() and not (out / VERBALIZER_DIR).exists()
    exported, base = load_file(str(out / "model.safetensors")), load_file(str(source / "model.safetensors"))
    assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_tokenizer_processor_or_verbalizers_are_one_line(tiny_pair, tmp_path, verbalizers):
    model = load_backbone(tiny_pair("qwen2_vl").student).model
    source = tmp_path / "source"
    shutil.copytree(tiny_pair("qwen2_vl").student, source)
    (verbalizers / "verbalizers.json").unlink()
    with pytest.raises(VlsiError, match=r"no verbalizers\.json \(student verbalizers not found\)"):
        export_student(model, source, tmp_path / "a", verbalizers_dir=verbalizers)
    (source / "preprocessor_config.json").unlink()
    with pytest.raises(VlsiError, match=r"no preprocessor_config\.json \(image processor\) to export"):
        export_student(model, source, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    with pytest.raises(VlsiError, match="no tokenizer files to export"):
        export_student(model, source, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before anything is written


def test_leftover_adapter_parameters_are_refused(tiny_pair, tmp_path):
    model = load_backbone(tiny_pair("qwen2_vl").student).model
    model.lora_extra = nn.Parameter(torch.zeros(1))  # adapter weights a merge did not remove
    with pytest.raises(VlsiError, match=r"adapter parameters remain after merging \(lora_extra"):
        export_student(model, tiny_pair("qwen2_vl").student, tmp_path / "model")
    assert not (tmp_path / "model").exists()
