"""Offline tiny backbones: each family builds, saves a complete checkpoint and reloads."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from vlsi.errors import VlsiError
from vlsi.models.tiny import SPECIAL_TOKENS, STUDENT, TEACHER, TinySize, build_tiny_tokenizer, save_tiny_pair

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja", "preprocessor_config.json", "generation_config.json"}


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_saves_and_reloads_with_plain_transformers(family, tmp_path):
    pair = save_tiny_pair(tmp_path, family)
    for d, size in ((pair.teacher, TEACHER), (pair.student, STUDENT)):
        assert CHECKPOINT_FILES <= {p.name for p in d.iterdir()}
        model = AutoModelForImageTextToText.from_pretrained(d)
        assert model.config.model_type == family
        text = model.config.get_text_config()
        assert (text.num_hidden_layers, text.hidden_size) == (size.num_layers, size.hidden_size)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.lm_head.weight.shape[0] == len(tok) + size.extra_vocab
        assert tok.chat_template


def test_pair_shares_one_tokenizer(tmp_path):
    pair = save_tiny_pair(tmp_path, "qwen2_vl")
    t = json.loads((pair.teacher / "tokenizer.json").read_text())
    s = json.loads((pair.student / "tokenizer.json").read_text())
    assert t == s


def test_tokenizer_is_deterministic_and_has_special_tokens():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for token in SPECIAL_TOKENS:
        ids = a(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token  # never split
    assert a.decode(a("A star with a dot.")["input_ids"]) == "A star with a dot."


def test_teacher_is_larger_than_student():
    assert TEACHER.num_layers > STUDENT.num_layers and TEACHER.hidden_size > STUDENT.hidden_size


def test_existing_pair_is_reused(tmp_path):
    pair = save_tiny_pair(tmp_path, "qwen2_vl")
    mtime = (pair.teacher / "model.safetensors").stat().st_mtime_ns
    save_tiny_pair(tmp_path, "qwen2_vl")
    assert (pair.teacher / "model.safetensors").stat().st_mtime_ns == mtime


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="head_dim"):
        TinySize(hidden_size=36, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="divide"):
        TinySize(hidden_size=64, num_heads=5)


def test_random_init_depends_on_seed(tmp_path):
    a = save_tiny_pair(tmp_path / "a", "qwen2_vl", seed=0)
    b = save_tiny_pair(tmp_path / "b", "qwen2_vl", seed=1)
    wa = AutoModelForImageTextToText.from_pretrained(a.teacher).lm_head.weight
    wb = AutoModelForImageTextToText.from_pretrained(b.teacher).lm_head.weight
    assert not torch.equal(wa, wb)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_vision_tower_sees_the_image(family, tiny_pair):
    """With HF's N(0, 0.02) init at these widths the vision features barely depend on the image
    and the tiny VLMs never learned to look; the re-drawn vision weights must make it matter."""
    from PIL import Image

    from vlsi.models.backbones import ImageEncoder, load_backbone
    from vlsi.models.tiny import VISION_INIT_STD

    pair = tiny_pair(family)
    backbone = load_backbone(pair.student)
    matrices = [p for p in backbone.vision_parameters() if p.dim() >= 2]
    assert matrices and all(abs(p.std().item() - VISION_INIT_STD) < 0.02 for p in matrices if p.numel() > 500)
    lm = [p for n, p in backbone.language_model.named_parameters() if p.dim() >= 2]
    assert all(p.std().item() < 0.05 for p in lm)  # the language model keeps HF's init
    encoder = ImageEncoder.from_pretrained(pair.student)
    red = encoder([Image.new("RGB", (56, 56), (220, 20, 20))]).tensors
    blue = encoder([Image.new("RGB", (56, 56), (20, 20, 220))]).tensors
    model = backbone.model.model
    with torch.no_grad():
        def features(t):
            out = model.get_image_features(**t)
            out = getattr(out, "pooler_output", out)
            return torch.cat([x.flatten() for x in out]) if isinstance(out, (list, tuple)) else out.flatten()
        a, b = features(red), features(blue)
    assert ((a - b).norm() / a.norm()).item() > 0.1


def test_a_pair_of_other_settings_is_refused_in_one_line_or_rebuilt_with_force(tmp_path, capsys):
    from vlsi.cli import main
    from vlsi.models.backbones import read_model_type

    save_tiny_pair(tmp_path, "qwen2_vl")
    with pytest.raises(VlsiError, match="already holds a tiny qwen2_vl pair of other settings"):
        save_tiny_pair(tmp_path, "qwen2_vl", seed=3)
    capsys.readouterr()  # the saves' progress bars
    assert main(["tiny", str(tmp_path), "--family", "llava_onevision"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--force" in err
    assert read_model_type(tmp_path / "student") == "qwen2_vl"  # the old pair is kept
    assert main(["tiny", str(tmp_path), "--family", "llava_onevision", "--force"]) == 0
    assert read_model_type(tmp_path / "teacher") == read_model_type(tmp_path / "student") == "llava_onevision"
