"""Turn a :class:`~vlsi.data.records.Sample` into token ids, labels and vision-token counts.

Token ids are **compact**: the chat template writes one placeholder token per image (Qwen
``<|image_pad|>``, LLaVA-OneVision ``<image>``) and it stays one token here. The collator
(:mod:`vlsi.data.collator`) later repeats each placeholder to the number of vision tokens its
image needs. That number is known at encoding time (the image processor decides it from the
image size), so the expanded length of a sample, and whether it fits ``max_length``, is known
before collation.

Labels (which tokens are supervised) come from the checkpoint's own chat template, whatever it
looks like. For the assistant turn ``k`` the template is rendered three times::

    head = render(turns[:k], add_generation_prompt=True)   # ... + "<|im_start|>assistant\\n"
    upto = render(turns[:k + 1])                            # ... + "red<|im_end|>\\n"
    full = render(turns)

and the characters ``[len(head), len(upto))`` of ``full`` are that turn's reply: its content
and the end-of-turn token, not the role header. Trailing whitespace after the end-of-turn token
(Qwen's ``"\\n"``) is not supervised: generation stops at ``<|im_end|>``. This works for
templates with a default system prompt (real Qwen2-VL) because the same system prompt is in
every prefix; a template whose prefixes are not prefixes of the full rendering is reported
instead of guessed. ``full`` is tokenised once (``add_special_tokens=False``: the template
writes any special tokens itself) and a token is supervised when it starts inside a reply
span (fast tokenizers' ``offset_mapping``). Image placeholders are never supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlsi.data.records import (
                               BAD_RECORD,
                               IMAGE_COUNT,
                               IMAGE_NOT_FOUND,
                               IMAGE_UNREADABLE,
                               TOO_LONG,
                               Rejected,
                               Sample,
                               )
from vlsi.errors import VlsiError
from vlsi.models.backbones import ImageEncoder
from vlsi.models.families import ImageBatch

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 4096


@dataclass
class EncodedSample:
    """A tokenised sample, before placeholder expansion.

    Attributes:
        id: the sample id.
        input_ids: compact token ids, length T_c, one placeholder token per image.
        labels: length T_c; the token id on supervised (assistant) tokens, -100 elsewhere.
        images: image paths in placeholder order.
        num_image_tokens: vision tokens per image (what each placeholder expands to).
        num_turns: turns in the conversation.
        num_replies: assistant turns (supervised replies).
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[Path] = field(default_factory=list)
    num_image_tokens: list[int] = field(default_factory=list)
    num_turns: int = 0
    num_replies: int = 0

    @property
    def length(self) -> int:
        """Sequence length after expansion: T_c - n_images + sum(num_image_tokens)."""
        return len(self.input_ids) - len(self.images) + sum(self.num_image_tokens)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def image_token_id_for(image_encoder: ImageEncoder, tokenizer: Any) -> int:
    """The placeholder id from the model config, checked against the tokenizer."""
    family = image_encoder.family
    config_id = family.image_token_id(image_encoder.config)
    tokenizer_id = tokenizer.convert_tokens_to_ids(family.image_token)
    if tokenizer_id != config_id:
        raise VlsiError(
            f"tokenizer maps {family.image_token} to {tokenizer_id} but the model config "
            f"expects image token id {config_id}"
        )
    return config_id


def render(tokenizer: Any, turns: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat template applied to ``turns`` (typed content items), as text."""
    try:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja raises TemplateError / TypeError / ValueError on odd input
        raise Rejected(f"chat template error: {err}", BAD_RECORD) from None


def assistant_spans(tokenizer: Any, turns: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies.

    Returns:
        ``(text, spans)``: ``spans[i] = (start, end)`` covers the i-th assistant turn's content
        and end-of-turn token in ``text`` (role header and trailing whitespace excluded).
    """
    full = render(tokenizer, turns)
    spans = []
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        head = render(tokenizer, turns[:k], add_generation_prompt=True)
        upto = render(tokenizer, turns[: k + 1])
        if not (upto.startswith(head) and full.startswith(upto)):
            raise Rejected(
                f"chat template renders turn {k} differently inside the conversation "
                "(cannot locate the assistant reply)",
                BAD_RECORD,
            )
        end = len(upto.rstrip())
        spans.append((len(head), max(end, len(head))))
    return full, spans


def tokenize_with_labels(
    tokenizer: Any, turns: list[dict[str, Any]], image_token_id: int
) -> tuple[list[int], list[int]]:
    """Compact ``input_ids`` and ``labels`` (-100 outside assistant replies and on images).

    Needs a fast tokenizer (``offset_mapping``).
    """
    text, spans = assistant_spans(tokenizer, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is None:
            break
        if span[0] <= start < span[1] and end > start and ids[i] != image_token_id:
            labels[i] = ids[i]
    return ids, labels


def load_images(paths: list[Path]) -> list[Image.Image]:
    """Open and fully decode each image (raises :class:`Rejected` for unreadable files)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise Rejected(f"image not found: {path}", IMAGE_NOT_FOUND) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise Rejected(f"image unreadable: {path} ({err})", IMAGE_UNREADABLE) from None
    return images


class SampleEncoder:
    """Tokenizer + image encoder + length limit: :class:`Sample` -> :class:`EncodedSample`.

    ``max_length`` bounds the expanded length (text tokens + vision tokens); a longer sample
    is rejected (``too long: N tokens > max_length M``), never truncated.
    """

    def __init__(self, tokenizer: Any, image_encoder: ImageEncoder, max_length: int = DEFAULT_MAX_LENGTH):
        if max_length <= 0:
            raise VlsiError(f"max_length must be positive, got {max_length}")
        if not getattr(tokenizer, "is_fast", False):
            raise VlsiError("a fast tokenizer (tokenizer.json) is needed to locate assistant tokens")
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.max_length = max_length
        self.image_token_id = image_token_id_for(image_encoder, tokenizer)

    def encode(self, sample: Sample) -> EncodedSample:
        """Tokenise, check placeholders, decode the images and count vision tokens.

        Raises:
            Rejected: placeholder/image mismatch, unreadable image, or too long.
        """
        ids, labels = tokenize_with_labels(self.tokenizer, sample.turns, self.image_token_id)
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(sample.images):
            raise Rejected(
                f"{placeholders} image placeholder tokens in the tokenized text but "
                f"{len(sample.images)} images",
                IMAGE_COUNT,
            )
        counts = self.image_batch(sample.images).num_tokens if sample.images else []
        replies = sum(t["role"] == "assistant" for t in sample.turns)
        encoded = EncodedSample(
            sample.id, ids, labels, list(sample.images), counts, sample.num_turns, replies
        )
        if encoded.length > self.max_length:
            raise Rejected(f"too long: {encoded.length} tokens > max_length {self.max_length}", TOO_LONG)
        return encoded

    def image_batch(self, paths: list[Path]) -> ImageBatch:
        """Decode and preprocess the images of one sample (all together: LLaVA-OneVision
        counts tokens differently for one and for several images)."""
        images = load_images(paths)
        try:
            return self.image_encoder(images)
        except (ValueError, OSError) as err:
            names = ", ".join(str(p) for p in paths)
            raise Rejected(f"image cannot be preprocessed: {names} ({err})", IMAGE_UNREADABLE) from None
