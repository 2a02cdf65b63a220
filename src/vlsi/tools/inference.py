"""Prompts in, responses out: batched greedy or beam-search generation on a VLM checkpoint.

Used by ``vlsi generate``, ``vlsi eval`` and the demo. A prompt is rendered with the
checkpoint's own chat template (``add_generation_prompt=True``), its ``<image>`` tags become
image items (an image without a tag goes before the text, as LLaVA-style data does), and the
same collator as training expands the placeholders, here with left padding so a batch of
prompts ends together::

    runner = Generator.from_pretrained("runs/demo/vlsi/model")
    [answer] = runner.generate([Prompt("What colour is the star?", [Image.open("a.png")])])

Works on any exported checkpoint of the supported families (a stock HF directory); vlsi needs
nothing beside the weights, tokenizer and image processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from PIL import Image

from vlsi.data.collator import VisionLanguageCollator
from vlsi.data.encode import IGNORE_INDEX, image_token_id_for, load_images, render
from vlsi.data.records import Rejected, split_image_tags
from vlsi.errors import DataError, VlsiError
from vlsi.models.backbones import Backbone, ImageEncoder, end_token_ids, load_backbone, load_tokenizer


@dataclass
class Prompt:
    """One user turn: ``text`` (may contain ``<image>`` tags) and its images (PIL or paths)."""

    text: str
    images: list[Image.Image | str | Path] = field(default_factory=list)
    turns: list[dict[str, Any]] | None = None  # earlier turns of a conversation (optional)


def user_turns(prompt: Prompt) -> list[dict[str, Any]]:
    """Chat-template messages for ``prompt``: earlier turns, then the user turn.

    Raises:
        DataError: more ``<image>`` tags than images, or tags and a different number of images.
    """
    content = split_image_tags(prompt.text)
    tags = sum(item["type"] == "image" for item in content)
    if tags == 0 and prompt.images:
        content = [{"type": "image"} for _ in prompt.images] + content
    elif tags != len(prompt.images):
        raise DataError(f"prompt has {tags} <image> tags but {len(prompt.images)} images")
    return list(prompt.turns or []) + [{"role": "user", "content": content}]


def as_images(images: list[Image.Image | str | Path]) -> list[Image.Image]:
    paths = [Path(x) for x in images if not isinstance(x, Image.Image)]
    try:
        opened = iter(load_images(paths))
    except Rejected as err:
        raise DataError(err.reason) from None
    return [x.convert("RGB") if isinstance(x, Image.Image) else next(opened) for x in images]


class PromptEncoder:
    """Prompt -> collator item (compact ``input_ids``, labels all -100, image tensors)."""

    def __init__(self, tokenizer: Any, image_encoder: ImageEncoder):
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.image_token_id = image_token_id_for(image_encoder, tokenizer)

    def __call__(self, prompt: Prompt) -> dict[str, Any]:
        try:
            text = render(self.tokenizer, user_turns(prompt), add_generation_prompt=True)
        except Rejected as err:
            raise DataError(err.reason) from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        item: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long),
        }
        images = as_images(prompt.images)
        if images:
            batch = self.image_encoder(images)
            item["num_image_tokens"] = torch.tensor(batch.num_tokens, dtype=torch.long)
            item.update(batch.tensors)
        else:
            item["num_image_tokens"] = torch.zeros(0, dtype=torch.long)
        if ids.count(self.image_token_id) != len(images):
            raise DataError(
                f"the chat template wrote {ids.count(self.image_token_id)} image placeholders "
                f"for {len(images)} images"
            )
        return item


def resolve_device(device: str | None = None) -> tuple[torch.device, torch.dtype | None]:
    """Device and dtype of ``vlsi generate``, ``eval`` and ``verbalize-layers``.

    ``device`` is ``cpu``, ``cuda`` or ``cuda:N``; ``None`` picks the first GPU when there is one,
    else the CPU. On a GPU with bf16 the model runs in bfloat16; otherwise in the checkpoint's
    own dtype (``None``).

    Raises:
        VlsiError: a name torch does not know, or a GPU this machine does not have.
    """
    if device is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(device)
        except (RuntimeError, ValueError):
            raise VlsiError(f"--device {device!r}: not a device (cpu, cuda or cuda:N)") from None
        if chosen.type not in ("cpu", "cuda"):
            raise VlsiError(f"--device {device!r}: only cpu, cuda or cuda:N are supported")
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise VlsiError(f"--device {device!r}: this machine has no CUDA GPU")
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            raise VlsiError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    bf16 = chosen.type == "cuda" and torch.cuda.is_bf16_supported()
    return chosen, torch.bfloat16 if bf16 else None


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Generator:
    """A loaded checkpoint that answers :class:`Prompt` s (greedy by default)."""

    def __init__(self, backbone: Backbone, tokenizer: Any, image_encoder: ImageEncoder):
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.encode = PromptEncoder(tokenizer, image_encoder)
        self.collate = VisionLanguageCollator.for_tokenizer(
            backbone.family, tokenizer, padding_side="left"
        )
        self.end_ids = end_token_ids(tokenizer, backbone.model)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> Generator:
        """Load ``path`` in ``dtype`` (``None``: the checkpoint's) onto ``device`` (``None``: the
        CPU); the commands pick both with :func:`resolve_device`."""
        backbone = load_backbone(path, dtype=dtype)
        if device is not None:
            backbone.model.to(device)
        return cls(backbone, load_tokenizer(path), ImageEncoder.from_pretrained(path))

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    def inputs(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for ``prompts`` on the model's device."""
        batch = self.collate([self.encode(p) for p in prompts])
        return {k: v.to(self.device) for k, v in self.backbone.model_inputs(batch).items()}

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], max_new_tokens: int = 64, num_beams: int = 1,
                 batch_size: int = 16) -> list[str]:
        """Responses to ``prompts`` (special tokens and surrounding whitespace stripped)."""
        if num_beams < 1:
            raise VlsiError(f"--num-beams must be at least 1, got {num_beams}")
        model = self.backbone.model.eval()
        out: list[str] = []
        for chunk in batched(prompts, batch_size):
            inputs = self.inputs(chunk)
            tokens = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                eos_token_id=self.end_ids, pad_token_id=self.tokenizer.pad_token_id,
            )
            new = tokens[:, inputs["input_ids"].shape[1]:].tolist()  # one device-to-host copy
            out.extend(self.decode(row) for row in new)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Token ids ([n], a list or a tensor) up to the first end token, as text."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for i, token in enumerate(ids):
            if token in self.end_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
