"""A family is one entry: Qwen2.5-VL rebuilt field by field (docs/adding-a-backbone.md) and
registered in place of the shipped entry runs the whole path: tiny checkpoints, data,
collation, forward and a chunked interaction loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.method.interaction import interaction_loss
from vlsi.method.verbalizer import VerbalizerSet, capture_layer_context, prediction_positions
from vlsi.models import families
from vlsi.models.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.models.tiny import save_tiny_pair


def entry() -> families.Family:
    return families.Family(
        model_type="qwen2_5_vl",
        image_token="<|image_pad|>",
        image_token_attr="image_token_id",
        vision_attrs=("visual",),
        uses_mm_token_type_ids=True,
        image_keys=("pixel_values", "image_grid_thw"),
        images=families.GridImages(),
        chat_image_markup="<|vision_start|><|image_pad|><|vision_end|>",
        tiny_config=families._qwen2_5_vl_config,
        tiny_image_processor=families._qwen_processor(14),
    )


def test_the_entry_alone_runs_the_family(tmp_path, monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "qwen2_5_vl", entry())
    pair = save_tiny_pair(tmp_path / "pair", "qwen2_5_vl")
    for i, colour in enumerate(((220, 20, 20), (20, 20, 220))):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "d.json").write_text(
        '[{"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\\nColour?"},'
        ' {"from": "gpt", "value": "red"}]},'
        ' {"id": "b", "image": "1.png", "conversations": [{"from": "human", "value": "<image>\\nColour?"},'
        ' {"from": "gpt", "value": "blue"}]}]')
    tok, images = load_tokenizer(pair.student), ImageEncoder.from_pretrained(pair.student)
    assert images.family is families.FAMILIES["qwen2_5_vl"]
    ds = VisualInstructionDataset.from_files([tmp_path / "d.json"], tok, images, max_length=128)
    batch = VisionLanguageCollator.for_tokenizer(images.family, tok)([ds[0], ds[1]])
    assert batch["mm_token_type_ids"].sum() == sum(int(ds[i]["num_image_tokens"].sum()) for i in range(2))

    student, teacher = load_backbone(pair.student), load_backbone(pair.teacher)
    for bb in (student, teacher):
        bb.model.requires_grad_(False)  # as in the interaction step: only LoRA would train
    positions = prediction_positions(batch["labels"])
    stacks = []
    for bb in (student, teacher):
        with torch.no_grad(), capture_layer_context(bb) as ctx:
            out = bb.model(**bb.model_inputs(batch), output_hidden_states=True)
        vset = VerbalizerSet(bb, [0, 1]).requires_grad_(False)
        stacks.append(vset.response_inputs(out.hidden_states, positions, ctx))
    (s_stack, s_fn), (t_stack, t_fn) = stacks
    result = interaction_loss(s_stack.requires_grad_(), t_stack, s_fn, t_fn,
                              vocab_size=min(student.vocab_size, teacher.vocab_size),
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.loss) and result.weights.sum() == 2
    assert len(student.vision_parameters()) > 0


def test_an_entry_naming_a_missing_config_attribute_is_an_error(tmp_path, monkeypatch):
    import dataclasses

    from vlsi.errors import VlsiError

    monkeypatch.setitem(families.FAMILIES, "qwen2_5_vl", dataclasses.replace(entry(), image_token_attr="image_token"))
    pair = save_tiny_pair(tmp_path / "pair", "qwen2_5_vl")
    with pytest.raises(VlsiError, match="config has no 'image_token'"):
        load_backbone(pair.student).image_token_id


def _transformers_count(height: int, width: int, pinpoints: list[list[int]], tile: int, side: int,
                        aspect: str) -> int:
    """transformers' own LLaVA-OneVision count, called on a stand-in (its processor needs torchvision)."""
    import functools
    from types import SimpleNamespace

    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as P

    stand_in = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
                               num_image_tokens=side * side, vision_aspect_ratio=aspect)
    stand_in._get_unpadded_features = functools.partial(P._get_unpadded_features, stand_in)
    return P._get_number_of_features(stand_in, height, width, tile, tile)


@pytest.mark.parametrize("tile,side,grid", [(384, 27, 6), (32, 4, 2)])  # LLaVA-OV-0.5B; the tiny pair
def test_anyres_max_tokens_matches_transformers(tile: int, side: int, grid: int) -> None:
    pinpoints = [[h * tile, w * tile] for h in range(1, grid + 1) for w in range(1, grid + 1)]
    sizes = [(h, w) for h in (1, 7, 31, 100, 383, 384, 385, 700, 1000, 2303, 4000)
             for w in (1, 5, 32, 99, 384, 500, 1024, 3000)]
    for height, width in sizes:
        ours = families.anyres_max_tokens(height, width, pinpoints, (tile, tile), side, 9)
        assert ours == _transformers_count(height, width, pinpoints, tile, side, "anyres_max_9"), (height, width)
