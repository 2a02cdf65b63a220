"""The validated dataset end to end: files -> samples -> batches -> teacher and student forward."""

import pytest
import torch
from torch.utils.data import DataLoader

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.encode import IGNORE_INDEX
from vlsi.errors import DataError
from vlsi.models.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.models.families import FAMILIES


def mixed_records(llava_record):
    """Single image (LLaVA style), two images over two turns (messages style), text only."""
    return [
        llava_record("single", "<image>\nWhat colour is the shape?", "red", image="red.png"),
        {"id": "multi", "images": ["blue.png", "green.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Which is blue?"}]},
            {"role": "assistant", "content": "The first one."},
            {"role": "user", "content": "And the other?"},
            {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]},
        llava_record("text", "How many sides has a square?", "four"),
    ]


def build(tiny_pair, family, path, **kwargs):
    ckpt = tiny_pair(family).student
    tok = load_tokenizer(ckpt)
    ds = VisualInstructionDataset.from_files(path, tok, ImageEncoder.from_pretrained(ckpt), **kwargs)
    return ds, VisionLanguageCollator.for_tokenizer(ds.encoder.image_encoder.family, tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_and_student_run_on_a_mixed_batch(tiny_pair, image_dir, write_jsonl, llava_record, family):
    path = write_jsonl(image_dir / "train.jsonl", mixed_records(llava_record))
    ds, collate = build(tiny_pair, family, path, max_length=256)
    assert len(ds) == 3 and ds.summary.skipped == []
    items = [ds[i] for i in range(3)]
    assert items[2].keys() == {"id", "input_ids", "labels", "num_image_tokens"}  # text-only
    batch = collate(items)

    # every placeholder became exactly num_image_tokens copies, and rows have the scanned length
    image_tokens = (batch["input_ids"] == ds.encoder.image_token_id).sum(1)
    assert image_tokens.tolist() == [int(it["num_image_tokens"].sum()) for it in items]
    assert batch["attention_mask"].sum(1).tolist() == ds.lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    if ds.encoder.image_encoder.family.uses_mm_token_type_ids:
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == ds.encoder.image_token_id).long())
        assert batch["image_grid_thw"].shape == (3, 3)
    else:  # several images in one sample: LLaVA-OneVision uses base features only
        assert batch["batch_num_images"].tolist() == [1, 2, 0]
        cfg = ds.encoder.image_encoder.config
        base = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1  # + newline
        base -= cfg.vision_feature_select_strategy == "default"  # CLS dropped
        assert items[1]["num_image_tokens"].tolist() == [base, base]
        assert items[0]["num_image_tokens"].item() > base  # one image: anyres tiles

    for role in ("teacher", "student"):
        backbone = load_backbone(getattr(tiny_pair(family), role))
        with torch.no_grad():  # the model raises if image features and tokens disagree
            out = backbone.model(**backbone.model_inputs(batch))
        assert out.logits.shape == (3, batch["input_ids"].shape[1], backbone.vocab_size)
        assert torch.isfinite(out.logits).all()


def test_works_with_a_dataloader(tiny_pair, image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "train.jsonl", mixed_records(llava_record))
    ds, collate = build(tiny_pair, "qwen2_vl", path)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert "pixel_values" not in batches[1]  # the text-only sample alone


def bad_records(image_dir, llava_record):
    """(record or raw line, expected skip id, reason) for every kind of bad input."""
    return [
        (llava_record("missing", "<image>\nQ", "A", image="nope.png"), "missing",
         f"image not found: {image_dir / 'nope.png'}"),
        (llava_record("corrupt", "<image>\nQ", "A", image="corrupt.png"), "corrupt",
         f"image unreadable: {image_dir / 'corrupt.png'}"),
        (llava_record("truncated", "<image>\nQ", "A", image="truncated.png"), "truncated",
         f"image unreadable: {image_dir / 'truncated.png'}"),
        ('{"id": "broken", "conversations": [', "{path}:{line}", "malformed JSON line {line}: "),
        ({"id": "unanswered", "conversations": [{"from": "human", "value": "Q"}]}, "unanswered",
         "no assistant turn"),
        (llava_record("tags", "<image> and <image>", "A", image="red.png"), "tags",
         "2 <image> tags but 1 image"),
        (llava_record("long", "Q", "red " * 300), "long", "too long: "),
    ]


def test_bad_samples_are_skipped_and_listed(tiny_pair, image_dir, write_jsonl, llava_record):
    cases = bad_records(image_dir, llava_record)
    good = llava_record("good", "<image>\nQ", "A", image="red.png")
    path = image_dir / "bad.jsonl"
    write_jsonl(path, [good] + [record for record, _, _ in cases])
    ds, _ = build(tiny_pair, "qwen2_vl", path, max_length=128)
    assert [s.id for s in ds.samples] == ["good"]
    summary = ds.summary
    assert summary.num_records == 1 + len(cases) and summary.kept == 1
    assert len(summary.skipped) == len(cases)
    for line, ((_, sid, reason), skip) in enumerate(zip(cases, summary.skipped), start=2):
        assert skip.id == sid.format(path=path, line=line)
        assert skip.reason.startswith(reason.format(line=line))
        assert "\n" not in skip.reason
    assert summary.skipped[-1].reason.endswith("> max_length 128")
    assert summary.skipped_by_kind == {
        "image_not_found": 1, "image_unreadable": 2, "malformed_json": 1,
        "no_assistant_turn": 1, "image_count_mismatch": 1, "too_long": 1}
    text = summary.format()
    assert text.startswith(f"kept 1 of {1 + len(cases)} records")
    for skip in summary.skipped:
        assert f"  {skip.id}: {skip.reason}" in text


@pytest.mark.parametrize("case", range(7))
def test_strict_mode_stops_at_the_bad_sample_with_one_line(tiny_pair, image_dir, write_jsonl, llava_record, case):
    record, sid, reason = bad_records(image_dir, llava_record)[case]
    path = image_dir / "bad.jsonl"
    write_jsonl(path, [llava_record("good", "Q", "A"), record, llava_record("also-good", "Q", "A")])
    with pytest.raises(DataError) as err:
        build(tiny_pair, "qwen2_vl", path, max_length=128, strict=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{sid.format(path=path, line=2)}: {reason.format(line=2)}")


def test_empty_dataset_is_an_error(tiny_pair, image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "bad.jsonl", [
        llava_record("missing", "<image>\nQ", "A", image="nope.png"),
        {"id": "unanswered", "conversations": [{"from": "human", "value": "Q"}]},
    ])
    with pytest.raises(DataError, match=r"no usable samples in .*bad.jsonl \(2 of 2 records skipped\)"):
        build(tiny_pair, "qwen2_vl", path)


def test_image_changed_after_scan_is_a_clear_error(tiny_pair, image_dir, write_jsonl, llava_record):
    path = write_jsonl(image_dir / "d.jsonl", [llava_record("a", "<image>\nQ", "A", image="red.png")])
    ds, _ = build(tiny_pair, "qwen2_vl", path)
    (image_dir / "red.png").write_bytes(b"gone")
    with pytest.raises(DataError, match="a: image unreadable"):
        ds[0]
