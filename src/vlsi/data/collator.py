"""Batch encoded samples: expand image placeholders, pad, stack the image tensors.

Placeholder expansion happens here, and only here: dataset items carry compact ``input_ids``
(one placeholder per image) plus ``num_image_tokens``; the collator repeats the i-th
placeholder ``num_image_tokens[i]`` times, which is exactly what the model's
``get_placeholder_mask`` checks against the number of image features (Qwen: ``prod(grid_thw)
/ merge_size**2``; LLaVA-OneVision: the anyres feature count, or base features + newline when a
sample has several images). Samples were length-checked after expansion when the dataset was
scanned, so nothing is ever truncated here (no cut through image tokens).

Batch (B samples, T = longest expanded sample, n = images in the batch)::

    input_ids          LongTensor [B, T]      padded with pad_token_id
    attention_mask     LongTensor [B, T]      1 on real tokens
    labels             LongTensor [B, T]      -100 on padding, image tokens, non-assistant text
    mm_token_type_ids  LongTensor [B, T]      Qwen families only: 1 at image tokens, else 0
    Qwen, n > 0:
      pixel_values     FloatTensor [sum_i t_i*h_i*w_i, C*temporal_patch*patch*patch]
      image_grid_thw   LongTensor [n, 3]
    LLaVA-OneVision, n > 0:
      pixel_values     FloatTensor [n, max_tiles, 3, H, W]   tiles zero-padded per image
      image_sizes      LongTensor [n, 2]                     original (height, width)
      batch_num_images LongTensor [B]                        images per sample (0 allowed)

Image tensors are concatenated in batch order; a text-only batch has no image keys. Padding
is on the right (training); ``padding_side="left"`` is for batched generation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vlsi.data.encode import IGNORE_INDEX
from vlsi.models.families import Family, family_for


class VisionLanguageCollator:
    """Callable ``list[item] -> batch`` for :class:`~vlsi.data.dataset.VisualInstructionDataset`.

    Args:
        family: the model family (a :class:`~vlsi.models.backbones.Family` or its ``model_type``).
        image_token_id: the placeholder id (``Backbone.image_token_id``).
        pad_token_id: id written on padding positions (masked by ``attention_mask``).
        padding_side: ``"right"`` (default, training) or ``"left"`` (generation).
        pad_to_multiple_of: round T up to a multiple of this (optional).
    """

    def __init__(
        self,
        family: Family | str,
        image_token_id: int,
        pad_token_id: int,
        *,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.family = family_for(family) if isinstance(family, str) else family
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, family: Family | str, tokenizer: Any, **kwargs: Any) -> VisionLanguageCollator:
        """Collator taking the placeholder and pad ids from ``tokenizer``."""
        family = family_for(family) if isinstance(family, str) else family
        image_token_id = tokenizer.convert_tokens_to_ids(family.image_token)
        return cls(family, image_token_id, tokenizer.pad_token_id, **kwargs)

    # -- expansion ---------------------------------------------------------------------------
    def expand(self, input_ids: torch.Tensor, labels: torch.Tensor, num_image_tokens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each placeholder of one sample to its vision-token count.

        Args:
            input_ids, labels: [T_c] compact ids and labels.
            num_image_tokens: [n] tokens per image, in placeholder order.
        Returns:
            ``(input_ids, labels)`` of length T_c - n + sum(num_image_tokens); labels are
            -100 on every image token.
        """
        is_image = input_ids == self.image_token_id
        n = int(is_image.sum())
        if n != len(num_image_tokens):
            raise ValueError(f"sample has {n} image placeholders but {len(num_image_tokens)} token counts")
        repeats = torch.ones_like(input_ids)
        repeats[is_image] = num_image_tokens.to(repeats)
        ids = input_ids.repeat_interleave(repeats)
        lab = labels.repeat_interleave(repeats)
        lab[ids == self.image_token_id] = IGNORE_INDEX
        return ids, lab

    # -- batching ----------------------------------------------------------------------------
    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        expanded = [
            self.expand(it["input_ids"], it["labels"], it.get("num_image_tokens", torch.zeros(0, dtype=torch.long)))
            for it in items
        ]
        length = max(len(ids) for ids, _ in expanded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = {
            "input_ids": self._pad([ids for ids, _ in expanded], length, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(ids) for ids, _ in expanded], length, 0),
            "labels": self._pad([lab for _, lab in expanded], length, IGNORE_INDEX),
        }
        if self.family.uses_mm_token_type_ids:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
            batch["mm_token_type_ids"] *= batch["attention_mask"]  # pad id may equal image id
        with_images = [it for it in items if len(it.get("num_image_tokens", ())) > 0]
        if with_images:
            batch.update(self._images(items, with_images))
        return batch

    def _pad(self, rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out

    def _images(self, items: list[dict[str, Any]], with_images: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.family.images.collate(items, with_images)
