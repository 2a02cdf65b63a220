"""Placeholder expansion, padding, labels and image stacking (hand-made items, no model)."""

import pytest
import torch

from vlsi.data.collator import VisionLanguageCollator

IMG, PAD = 9, 0


def item(ids, labels, counts=(), **images):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "num_image_tokens": torch.tensor(counts, dtype=torch.long), "id": "x", **images}


def qwen_images(counts):
    """Qwen tensors for images of 1 x 2 x (2k) patches -> k merged tokens each (merge 2x2)."""
    grid = torch.tensor([[1, 2, 2 * k] for k in counts])
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), 8), "image_grid_thw": grid}


def test_each_placeholder_expands_to_its_token_count():
    collate = VisionLanguageCollator("qwen2_vl", IMG, PAD)
    sample = item([1, IMG, 2, IMG, 3, 4], [-100, -100, -100, -100, 3, 4], (3, 2), **qwen_images((3, 2)))
    b = collate([sample])
    assert b["input_ids"].tolist() == [[1, IMG, IMG, IMG, 2, IMG, IMG, 3, 4]]
    assert b["labels"].tolist() == [[-100] * 7 + [3, 4]]
    assert b["mm_token_type_ids"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 9]


def test_right_and_left_padding_and_text_only_rows():
    images = qwen_images((2,))
    samples = [item([1, IMG, 2, 3], [-100, -100, 2, 3], (2,), **images), item([5, 6], [-100, 6])]
    right = VisionLanguageCollator("qwen2_5_vl", IMG, PAD)(samples)
    assert right["input_ids"].tolist() == [[1, IMG, IMG, 2, 3], [5, 6, PAD, PAD, PAD]]
    assert right["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, -100, 2, 3], [-100, 6, -100, -100, -100]]
    assert right["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0], [0] * 5]
    assert torch.equal(right["pixel_values"], images["pixel_values"])
    assert torch.equal(right["image_grid_thw"], images["image_grid_thw"])

    left = VisionLanguageCollator("qwen2_5_vl", IMG, PAD, padding_side="left")(samples)
    assert left["input_ids"].tolist() == [[1, IMG, IMG, 2, 3], [PAD, PAD, PAD, 5, 6]]
    assert left["attention_mask"].tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    assert left["labels"][1].tolist() == [-100, -100, -100, -100, 6]

    multiple = VisionLanguageCollator("qwen2_vl", IMG, PAD, pad_to_multiple_of=8)(samples)
    assert multiple["input_ids"].shape == (2, 8)


def test_pad_id_equal_to_image_id_is_not_an_image_token():
    collate = VisionLanguageCollator("qwen3_vl", IMG, pad_token_id=IMG)
    b = collate([item([1, 2, 3], [1, 2, 3]), item([4], [4])])
    assert b["mm_token_type_ids"].sum() == 0


def test_text_only_batch_has_no_image_keys():
    for family in ("qwen2_vl", "llava_onevision"):
        b = VisionLanguageCollator(family, IMG, PAD)([item([1, 2], [1, 2]), item([3], [3])])
        assert not {"pixel_values", "image_grid_thw", "image_sizes", "batch_num_images"} & set(b)
    assert "mm_token_type_ids" not in VisionLanguageCollator("llava_onevision", IMG, PAD)([item([1], [1])])


def test_qwen_images_are_concatenated_in_batch_order():
    first, second = qwen_images((1, 2)), qwen_images((3,))
    b = VisionLanguageCollator("qwen2_vl", IMG, PAD)([
        item([IMG, 1, IMG], [-100, 1, -100], (1, 2), **first),
        item([2], [2]),
        item([IMG, 3], [-100, 3], (3,), **second),
    ])
    assert b["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 6]]
    assert torch.equal(b["pixel_values"], torch.cat([first["pixel_values"], second["pixel_values"]]))
    assert (b["input_ids"] == IMG).sum(1).tolist() == [3, 0, 3]


def test_llava_pads_tiles_and_counts_images_per_sample():
    one = {"pixel_values": torch.randn(1, 5, 3, 4, 4), "image_sizes": torch.tensor([[40, 60]])}
    two = {"pixel_values": torch.randn(2, 3, 3, 4, 4), "image_sizes": torch.tensor([[10, 10], [20, 30]])}
    b = VisionLanguageCollator("llava_onevision", IMG, PAD)([
        item([IMG, 1], [-100, 1], (6,), **one),
        item([7], [7]),
        item([IMG, IMG, 2], [-100, -100, 2], (2, 2), **two),
    ])
    assert b["pixel_values"].shape == (3, 5, 3, 4, 4)
    assert torch.equal(b["pixel_values"][0], one["pixel_values"][0])
    assert torch.equal(b["pixel_values"][1:, :3], two["pixel_values"])
    assert b["pixel_values"][1:, 3:].abs().sum() == 0  # zero tiles past each image's own
    assert b["image_sizes"].tolist() == [[40, 60], [10, 10], [20, 30]]
    assert b["batch_num_images"].tolist() == [1, 0, 2]
    assert (b["input_ids"] == IMG).sum(1).tolist() == [6, 0, 4]


def test_mismatched_counts_and_bad_options_raise():
    collate = VisionLanguageCollator("qwen2_vl", IMG, PAD)
    with pytest.raises(ValueError, match="2 image placeholders but 1 token counts"):
        collate([item([IMG, IMG], [-100, -100], (3,))])
    with pytest.raises(ValueError, match="padding_side"):
        VisionLanguageCollator("qwen2_vl", IMG, PAD, padding_side="middle")
