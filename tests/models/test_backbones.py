"""The backbone adapter: one interface over the four supported families."""

import re

import pytest
import torch
from PIL import Image

from vlsi.errors import VlsiError
from vlsi.models.backbones import LORA_TARGET_PATTERN, Backbone, ImageEncoder, load_backbone, load_tokenizer
from vlsi.models.families import FAMILIES, family_for
from vlsi.models.tiny import TEACHER, save_tiny_pair

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_pair(root / f, f) for f in FAMILY_NAMES}


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(VlsiError, match="llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl"):
        family_for("llama")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(VlsiError, match="model path not found"):
        load_backbone(tmp_path / "nope")
    with pytest.raises(VlsiError, match="no config.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_exposes_the_language_model(pairs, family):
    bb = load_backbone(pairs[family].teacher)
    assert bb.family.model_type == family
    assert bb.num_layers == TEACHER.num_layers and bb.hidden_size == TEACHER.hidden_size
    assert bb.vocab_size == bb.model.lm_head.weight.shape[0]
    assert bb.final_norm is bb.model.model.language_model.norm
    ids = torch.randint(20, 300, (1, 7))
    extra = {"mm_token_type_ids": torch.zeros_like(ids)} if bb.family.uses_mm_token_type_ids else {}
    out = bb.model(input_ids=ids, output_hidden_states=True, **extra)
    # docs/method.md#backbones: L + 1 hidden states; the last one is already final-normed.
    assert len(out.hidden_states) == bb.num_layers + 1
    torch.testing.assert_close(bb.lm_head(out.hidden_states[-1]), out.logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_pattern_covers_language_model_linears_only(pairs, family):
    bb = load_backbone(pairs[family].teacher)
    names = [n for n, m in bb.model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in names if re.fullmatch(LORA_TARGET_PATTERN, n)]
    assert len(hit) == 7 * bb.num_layers
    assert all("language_model" in n for n in hit)
    vision = [n for n in names if "visual" in n or "vision_tower" in n]
    assert vision and not any(re.fullmatch(LORA_TARGET_PATTERN, n) for n in vision)


def test_lora_pattern_skips_qwen25_vision_mlp_names(pairs):
    """Qwen2.5-VL's vision blocks have mlp.gate_proj like the LM: PEFT must not touch them."""
    from peft import LoraConfig, get_peft_model

    bb = load_backbone(pairs["qwen2_5_vl"].student)
    assert any(n.endswith("mlp.gate_proj") for n, _ in bb.model.model.visual.named_modules())
    peft_model = get_peft_model(bb.model, LoraConfig(r=4, lora_alpha=4, target_modules=bb.lora_target_modules))
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vision_parameters_are_exactly_the_vision_tower_and_projector(pairs, family):
    bb = load_backbone(pairs[family].student)
    vision = {id(p) for p in bb.vision_parameters()}
    for name, p in bb.model.named_parameters():
        in_vision = any(name.startswith(f"model.{attr}") for attr in bb.family.vision_attrs)
        assert (id(p) in vision) == in_vision, name


def test_a_vision_attribute_missing_from_the_model_is_an_error(pairs):
    import dataclasses

    bb = load_backbone(pairs["qwen2_vl"].student)
    bb.family = dataclasses.replace(bb.family, vision_attrs=("visual", "visaul"))  # a typo
    with pytest.raises(VlsiError, match="has no 'visaul'"):
        bb.vision_parameters()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_image_encoder_counts_match_the_model(pairs, family):
    """Placeholder counts from ImageEncoder are exactly what the model's vision tower emits."""
    d = pairs[family].student
    bb, tok, enc = load_backbone(d), load_tokenizer(d), ImageEncoder.from_pretrained(d)
    image = Image.new("RGB", (70, 40), (200, 30, 30))
    batch = enc([image])
    n = batch.num_tokens[0]
    assert n > 0
    text_ids = tok("colour?", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[bb.image_token_id] * n + text_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **batch.tensors}
    if bb.family.uses_mm_token_type_ids:
        inputs["mm_token_type_ids"] = (ids == bb.image_token_id).long()
    else:
        inputs["batch_num_images"] = torch.tensor([1])
    assert bb.model(**bb.model_inputs(inputs)).logits.shape[1] == ids.shape[1]
    ids_wrong = torch.tensor([[bb.image_token_id] * (n + 1) + text_ids])
    inputs.update(input_ids=ids_wrong, attention_mask=torch.ones_like(ids_wrong))
    if bb.family.uses_mm_token_type_ids:
        inputs["mm_token_type_ids"] = (ids_wrong == bb.image_token_id).long()
    with pytest.raises(Exception):
        bb.model(**bb.model_inputs(inputs))


def test_image_bounds_are_enforced(pairs):
    d = pairs["qwen2_vl"].student
    small = ImageEncoder.from_pretrained(d, min_pixels=28 * 28, max_pixels=56 * 56)
    large = ImageEncoder.from_pretrained(d, min_pixels=28 * 28, max_pixels=112 * 112)
    big_image = Image.new("RGB", (400, 400))
    assert small([big_image]).num_tokens[0] == 4  # 56x56 px / (28x28 px per token)
    assert large([big_image]).num_tokens[0] == 16
    with pytest.raises(VlsiError, match="min_pixels"):
        ImageEncoder.from_pretrained(d, min_pixels=100, max_pixels=10)
    llava = ImageEncoder.from_pretrained(pairs["llava_onevision"].student, max_pixels=56 * 56)
    w, h = llava.bound(Image.new("RGB", (400, 200))).size
    assert w * h <= 56 * 56 and abs(w / h - 2) < 0.1


def test_model_inputs_selects_family_keys(pairs):
    bb = Backbone.__new__(Backbone)
    bb.family = FAMILIES["llava_onevision"]
    batch = {"input_ids": 1, "attention_mask": 2, "labels": 3, "mm_token_type_ids": 4,
             "pixel_values": 5, "image_sizes": 6, "image_grid_thw": 7}
    assert set(bb.model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    bb.family = FAMILIES["qwen2_vl"]
    assert set(bb.model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values",
                                           "image_grid_thw", "mm_token_type_ids"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dummy_image_runs_the_vision_modules_of_a_real_image_in_order(pairs, family):
    """What a text-only batch runs under ZeRO-3/FSDP (vision_on_every_process)."""
    d = pairs[family].student
    bb, enc = load_backbone(d), ImageEncoder.from_pretrained(d)
    called: list[str] = []
    for attr in bb.family.vision_attrs:
        part = getattr(bb.model.model, attr)
        if isinstance(part, torch.nn.Module):
            for name, module in part.named_modules(prefix=attr):
                module.register_forward_pre_hook(lambda m, a, name=name: called.append(name))
    real = enc([Image.new("RGB", (70, 40), (200, 30, 30))]).tensors
    if not bb.family.uses_mm_token_type_ids:
        real["batch_num_images"] = torch.tensor([1])
    with torch.no_grad():
        bb.model.get_image_features(**real)
        from_image, called[:] = list(called), []
        features = bb.dummy_image_features(torch.device("cpu"))
    assert called == from_image and len(called) > 1
    assert all(torch.isfinite(f).all() for f in features.pooler_output)
