"""Chat template, assistant-only labels, placeholder checks and vision-token counts."""

import itertools
import pytest
from PIL import Image

from vlsi.data.encode import IGNORE_INDEX, SampleEncoder, assistant_spans
from vlsi.data.records import Rejected, Sample
from vlsi.errors import VlsiError
from vlsi.models.backbones import ImageEncoder, load_tokenizer
from vlsi.models.families import FAMILIES

IMG = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


def supervised_pieces(tokenizer, ids, labels):
    """Decoded runs of consecutive supervised tokens; labels must equal ids where set."""
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    runs = itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE_INDEX)
    return [tokenizer.decode([i for i, _ in run]) for keep, run in runs if keep]


def conversation(images):
    return Sample("s", [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [*[IMG] * len(images), text("What colour is it?")]},
        {"role": "assistant", "content": [text("red")]},
        {"role": "user", "content": [text("And the shape?")]},
        {"role": "assistant", "content": [text("A square with a dot.")]},
    ], list(images))


@pytest.fixture(params=sorted(FAMILIES))
def encoder(request, tiny_pair):
    ckpt = tiny_pair(request.param).student
    return SampleEncoder(load_tokenizer(ckpt), ImageEncoder.from_pretrained(ckpt), max_length=512)


def test_labels_are_the_assistant_replies_and_end_token(encoder, image_dir):
    images = [image_dir / "red.png", image_dir / "blue.png"]
    enc = encoder.encode(conversation(images))
    tok = encoder.tokenizer
    assert supervised_pieces(tok, enc.input_ids, enc.labels) == [
        "red<|im_end|>", "A square with a dot.<|im_end|>"]
    assert enc.num_replies == 2 and enc.num_turns == 5
    # one placeholder per image, never supervised
    assert enc.input_ids.count(encoder.image_token_id) == 2
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels) if i == encoder.image_token_id)
    # vision-token counts are the image encoder's, and the expanded length follows from them
    expected = encoder.image_encoder([Image.open(p) for p in images]).num_tokens
    assert enc.num_image_tokens == expected and all(n > 0 for n in expected)
    assert enc.length == len(enc.input_ids) - 2 + sum(expected)
    assert enc.num_supervised == sum(lab != IGNORE_INDEX for lab in enc.labels)


# A Qwen2-VL-style template (written for this test) that adds a default system prompt when the
# conversation has none: the prompt is in every rendered prefix, so the spans still line up.
SYSTEM_DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def qwen_encoder(tiny_pair, template=None, **kwargs):
    ckpt = tiny_pair("qwen2_vl").student
    tok = load_tokenizer(ckpt)
    if template is not None:
        tok.chat_template = template
    return SampleEncoder(tok, ImageEncoder.from_pretrained(ckpt, **kwargs), max_length=512)


def test_template_with_a_default_system_prompt(tiny_pair, image_dir):
    encoder = qwen_encoder(tiny_pair, SYSTEM_DEFAULT_TEMPLATE)
    sample = conversation([image_dir / "red.png"])
    sample.turns = sample.turns[1:]  # no system turn: the template adds its own
    enc = encoder.encode(sample)
    tok = encoder.tokenizer
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert supervised_pieces(tok, enc.input_ids, enc.labels) == [
        "red<|im_end|>", "A square with a dot.<|im_end|>"]


def test_template_that_rewrites_earlier_turns_is_rejected(tiny_pair):
    # Renders the final assistant turn with a marker it drops once more turns follow.
    template = SYSTEM_DEFAULT_TEMPLATE.replace(
        "{{- '<|im_end|>\n' -}}",
        "{%- if loop.last and message['role'] == 'assistant' -%}{{- ' [end]' -}}{%- endif -%}"
        "{{- '<|im_end|>\n' -}}")
    encoder = qwen_encoder(tiny_pair, template)
    with pytest.raises(Rejected, match="renders turn 2 differently"):
        assistant_spans(encoder.tokenizer, conversation([]).turns)


def test_literal_placeholder_in_text_is_a_count_mismatch(tiny_pair, image_dir):
    encoder = qwen_encoder(tiny_pair)
    sample = Sample("s", [{"role": "user", "content": [IMG, text("what is <|image_pad|>?")]},
                          {"role": "assistant", "content": [text("a token")]}], [image_dir / "red.png"])
    with pytest.raises(Rejected, match="2 image placeholder tokens in the tokenized text but 1 images"):
        encoder.encode(sample)


@pytest.mark.parametrize("name", ["corrupt.png", "truncated.png"])
def test_images_that_do_not_decode_are_rejected(tiny_pair, image_dir, name):
    encoder = qwen_encoder(tiny_pair)
    sample = Sample("s", [{"role": "user", "content": [IMG, text("q")]},
                          {"role": "assistant", "content": [text("a")]}], [image_dir / name])
    with pytest.raises(Rejected, match=f"image unreadable: {image_dir / name}") as err:
        encoder.encode(sample)
    assert err.value.kind == "image_unreadable" and "\n" not in err.value.reason


def test_too_long_is_measured_after_expansion(tiny_pair, image_dir):
    encoder = qwen_encoder(tiny_pair)
    enc = encoder.encode(conversation([image_dir / "blue.png"]))
    assert enc.length > len(enc.input_ids)  # blue.png needs more than one vision token
    encoder.max_length = enc.length
    assert encoder.encode(conversation([image_dir / "blue.png"])).length == enc.length
    encoder.max_length = enc.length - 1
    with pytest.raises(Rejected, match=rf"too long: {enc.length} tokens > max_length {enc.length - 1}"):
        encoder.encode(conversation([image_dir / "blue.png"]))


@pytest.mark.parametrize("family,max_pixels", [("qwen2_vl", 56 * 56), ("llava_onevision", 28 * 28)])
def test_image_size_is_bounded_by_max_pixels(tiny_pair, write_image, tmp_path, family, max_pixels):
    ckpt = tiny_pair(family).student
    im = Image.open(write_image(tmp_path / "big.png", (224, 168)))
    full = ImageEncoder.from_pretrained(ckpt)
    small = ImageEncoder.from_pretrained(ckpt, max_pixels=max_pixels)
    assert small([im]).num_tokens[0] < full([im]).num_tokens[0]
    if family == "qwen2_vl":  # 14-px patches merged 2x2: one token per 28x28 pixels
        assert small([im]).num_tokens[0] <= max_pixels // (28 * 28)
    else:
        bounded = small.bound(im)
        assert bounded.width * bounded.height <= max_pixels * 1.05


def test_max_length_must_be_positive(tiny_pair):
    ckpt = tiny_pair("qwen2_vl").student
    with pytest.raises(VlsiError, match="max_length must be positive"):
        SampleEncoder(load_tokenizer(ckpt), ImageEncoder.from_pretrained(ckpt), max_length=0)
