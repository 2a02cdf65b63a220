"""Our collated Qwen2.5-VL batch equals transformers' own processor output, logits included.

The reference path is ``transformers.Qwen2_5_VLProcessor.__call__``: it runs the image
processor, replaces each ``<|image_pad|>`` by ``image_grid_thw.prod() // merge_size**2`` copies
(``replace_image_token``), tokenises the expanded text, pads, and builds ``mm_token_type_ids``
(``create_mm_token_type_ids``). Constructing the processor needs torchvision here:
``ProcessorMixin.__init__`` checks every sub-processor's class against the auto mappings and
the video-processor mapping is unavailable without it. When the plain constructor fails, the
test uses a subclass whose only change is to skip that class check (``video_processor=None``
is never used for images); every step that builds the inputs is the processor's own code.

The texts given to the processor are the checkpoint's chat template rendered on the same
conversations (one placeholder per image, as a user would call the processor), and the
images are the same files; the processor gets our bounded image processor, so both paths see
the same min/max pixels.
"""

import pytest
import torch
from PIL import Image

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset, read_records
from vlsi.models.backbones import ImageEncoder, load_backbone, load_tokenizer


def reference_processor(image_processor, tokenizer):
    from transformers import Qwen2_5_VLProcessor

    try:
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=None, chat_template=tokenizer.chat_template)
    except (AttributeError, ImportError, ValueError, TypeError):
        class WithoutVideoClassCheck(Qwen2_5_VLProcessor):
            def check_argument_for_proper_class(self, argument_name, argument):
                return None

        return WithoutVideoClassCheck(image_processor=image_processor, tokenizer=tokenizer,
                                      video_processor=None, chat_template=tokenizer.chat_template)


@pytest.fixture
def batches(tiny_pair, image_dir, write_jsonl, llava_record):
    """(pair, our batch, the reference processor's batch) for single, multi-image and text rows."""
    path = write_jsonl(image_dir / "d.jsonl", [
        llava_record("single", "<image>\nWhat colour?", "red", image="blue.png"),
        llava_record("multi", "<image> left, <image> right. Same?", "No.", image=["blue.png", "red.png"]),
        llava_record("text", "Say hi.", "hi"),
    ])
    pair = tiny_pair("qwen2_5_vl")
    tok = load_tokenizer(pair.student)
    images = ImageEncoder.from_pretrained(pair.student)
    ds = VisualInstructionDataset.from_files(path, tok, images)
    ours = VisionLanguageCollator.for_tokenizer("qwen2_5_vl", tok)([ds[i] for i in range(len(ds))])

    samples = read_records(path).samples
    texts = [tok.apply_chat_template(s.turns, tokenize=False) for s in samples]
    pil = [images.bound(Image.open(p)) for s in samples for p in s.images]
    processor = reference_processor(images.processor, tok)
    ref = processor(text=texts, images=pil, padding=True, return_tensors="pt")
    return pair, ours, dict(ref)


def test_collated_inputs_equal_the_processor_inputs(batches):
    _, ours, ref = batches
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"])
    assert ours["mm_token_type_ids"].sum(1).tolist()[2] == 0  # text-only row


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_logits_equal_the_reference_and_need_mm_token_type_ids(batches, role):
    pair, ours, ref = batches
    model = load_backbone(getattr(pair, role)).model
    backbone_inputs = {k: ours[k] for k in
                       ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        expected = model(**ref).logits
        got = model(**backbone_inputs).logits
        without = model(**{k: v for k, v in backbone_inputs.items() if k != "mm_token_type_ids"}).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real])

    # Without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions: the rows with
    # images change (wrong M-RoPE positions), the text-only row does not.
    gap = (without - expected).abs().amax(-1).masked_fill(~real, 0).amax(-1)
    assert gap[0] > 1e-4 and gap[1] > 1e-4
    assert gap[2] < 1e-5
