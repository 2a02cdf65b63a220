"""Everything that differs between the supported model families: one entry each.

A :class:`Family` names the image placeholder and the config attribute holding its id, the
vision parts to freeze, the image inputs of ``forward``, and two rule objects: how images are
preprocessed, counted and collated, and the smallest dummy image (:class:`GridImages` for the
Qwen families, :class:`TiledImages` for LLaVA-OneVision), and how an offline tiny checkpoint of the family is
built (``tiny_config``, ``tiny_image_processor``). The rest of the package reaches a family
only through its entry (:data:`FAMILIES`, chosen by the config's ``model_type``); adding a
backbone is adding an entry (``docs/adding-a-backbone.md``).

==================  =====================================  ==========================
``model_type``      Hugging Face class                     image placeholder
==================  =====================================  ==========================
``qwen2_vl``        Qwen2VLForConditionalGeneration        ``<|image_pad|>`` x N
``qwen2_5_vl``      Qwen2_5_VLForConditionalGeneration     ``<|image_pad|>`` x N
``qwen3_vl``        Qwen3VLForConditionalGeneration        ``<|image_pad|>`` x N
``llava_onevision`` LlavaOnevisionForConditionalGeneration ``<image>`` x N
==================  =====================================  ==========================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from vlsi.errors import VlsiError


@dataclass
class ImageBatch:
    """Preprocessed images of one sample and the number of placeholder tokens each needs.

    ``tensors`` holds the family's image inputs: Qwen ``pixel_values`` [sum(t*h*w), C*T*P*P]
    and ``image_grid_thw`` [n, 3]; LLaVA-OneVision ``pixel_values`` [n, tiles, 3, H, W] and
    ``image_sizes`` [n, 2].
    """

    tensors: dict[str, torch.Tensor]
    num_tokens: list[int]


class GridImages:
    """Qwen2-VL / 2.5-VL / 3-VL: patches on a grid merged ``merge_size`` x ``merge_size``.

    The processor enforces the pixel bounds itself (``smart_resize``); an image needs
    ``prod(grid_thw) / merge_size**2`` placeholder tokens.
    """

    def bounds(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        size = dict(processor.size)
        lo = min_pixels or size.get("shortest_edge", 56 * 56)
        hi = max_pixels or size.get("longest_edge", 28 * 28 * 1280)
        processor.size = {"shortest_edge": lo, "longest_edge": hi}
        return lo, hi

    def bound(self, image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
        return image

    def encode(self, processor: Any, config: Any, images: list[Image.Image]) -> ImageBatch:
        out = processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]
        counts = [int(g.prod()) // processor.merge_size**2 for g in grid]
        return ImageBatch({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts)

    def collate(self, items: list[dict[str, Any]], with_images: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([it["pixel_values"] for it in with_images]),
                "image_grid_thw": torch.cat([it["image_grid_thw"] for it in with_images])}

    def dummy(self, config: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """``get_image_features`` inputs of the smallest image: one merged token of zero patches."""
        vcfg = config.vision_config
        m = vcfg.spatial_merge_size
        width = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
        return {"pixel_values": torch.zeros(m * m, width, device=device),
                "image_grid_thw": torch.tensor([[1, m, m]], device=device)}


def anyres_max_tokens(height: int, width: int, pinpoints: list[list[int]], tile: tuple[int, int],
                      side: int, max_tiles: int) -> int:
    """Placeholder tokens of one LLaVA-OneVision image of ``height`` x ``width`` pixels.

    The image is tiled at the grid resolution that fits it best (``pinpoints``, transformers'
    public ``select_best_resolution``), each ``tile`` gives ``side`` x ``side`` features; the
    feature grid is cropped back to the image's aspect ratio, shrunk when it holds more than
    ``max_tiles`` tiles' worth (by more than 10 %), and gets one newline token per row; the base
    (whole-image) tile adds ``side ** 2``.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([height, width], pinpoints)
    rows, cols = side * (best_h // tile[0]), side * (best_w // tile[1])
    if width / height > cols / rows:  # wider than the grid: rows of padding above and below
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    shrink = math.sqrt(rows * cols / (max_tiles * side * side))
    if shrink > 1.1:
        rows, cols = int(rows // shrink), int(cols // shrink)
    return rows * cols + rows + side * side


class TiledImages:
    """LLaVA-OneVision: anyres tiles of a fixed size, resized here to the pixel bounds.

    Placeholder counts are the anyres-max ones (:func:`anyres_max_tokens`); a sample with several
    images uses base features + 1 newline each (the model keeps only the base tile then).
    """

    def bounds(self, processor: Any, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        return min_pixels or 1, max_pixels or max(h * w for h, w in processor.image_grid_pinpoints)

    def bound(self, image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
        """Resize (keeping the aspect ratio) so that height*width lies in [min, max] pixels."""
        w, h = image.size
        area = w * h
        if min_pixels <= area <= max_pixels:
            return image
        shrink = area > max_pixels
        scale = math.sqrt((max_pixels if shrink else min_pixels) / area)
        # floor when shrinking and ceil when growing, so the bound holds after rounding
        size_of = math.floor if shrink else math.ceil
        return image.resize((max(1, size_of(w * scale)), max(1, size_of(h * scale))), Image.BICUBIC)

    def encode(self, processor: Any, config: Any, images: list[Image.Image]) -> ImageBatch:
        out = processor(images=images, return_tensors="pt")
        return ImageBatch({"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]},
                          self._counts(processor, config, out, multi_image=len(images) > 1))

    def _counts(self, processor: Any, cfg: Any, out: dict, multi_image: bool) -> list[int]:
        vcfg = cfg.vision_config
        side = vcfg.image_size // vcfg.patch_size
        tile_h, tile_w = out["pixel_values"][0][0].shape[-2:]
        max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        counts = []
        for orig_h, orig_w in out["image_sizes"].tolist():
            if multi_image:
                n = side * side + 1
            else:
                n = anyres_max_tokens(orig_h, orig_w, processor.image_grid_pinpoints, (tile_h, tile_w),
                                      side, max_tiles)
            if cfg.vision_feature_select_strategy == "default":
                n -= 1
            counts.append(n)
        return counts

    def collate(self, items: list[dict[str, Any]], with_images: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # [n_i, tiles_i, 3, H, W] per sample -> [n, max_tiles, 3, H, W]; the model keeps the first
        # image_size_to_num_patches(...) tiles of each image (1 tile, the base image, when its
        # sample has several images: see batch_num_images).
        max_tiles = max(it["pixel_values"].shape[1] for it in with_images)
        pixel_values = [F.pad(it["pixel_values"], (0, 0, 0, 0, 0, 0, 0, max_tiles - it["pixel_values"].shape[1]))
                        for it in with_images]
        return {"pixel_values": torch.cat(pixel_values),
                "image_sizes": torch.cat([it["image_sizes"] for it in with_images]),
                "batch_num_images": torch.tensor([len(it.get("num_image_tokens", ())) for it in items])}

    def dummy(self, config: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """``get_image_features`` inputs of one black image of one tile's size (anyres tiles included)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        s = config.vision_config.image_size
        tiles = image_size_to_num_patches((s, s), config.image_grid_pinpoints, s)
        return {"pixel_values": torch.zeros(1, tiles, config.vision_config.num_channels, s, s, device=device),
                "image_sizes": torch.tensor([[s, s]], device=device),
                "batch_num_images": torch.tensor([1], device=device)}


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints (offline tests and the demo): the family's config and image processor
# ---------------------------------------------------------------------------------------------

QWEN_MIN_PIXELS = 28 * 28  # Qwen2-VL/2.5-VL: 14-px patches merged 2x2, a 56x56 image is 4 tokens
QWEN_MAX_PIXELS = 112 * 112
LLAVA_TILE = 28


def _llava_pinpoints() -> list[list[int]]:
    return [[h * LLAVA_TILE, w * LLAVA_TILE] for h in (1, 2) for w in (1, 2)]


def _qwen_ids(ids: dict[str, int]) -> dict[str, Any]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                tie_word_embeddings=False)


def _qwen2_vl_config(size: Any, text: dict[str, Any], rope: dict[str, Any], ids: dict[str, int]) -> Any:
    from transformers import Qwen2VLConfig

    vision = dict(depth=size.vision_depth, embed_dim=size.vision_width, hidden_size=size.hidden_size,
                  num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **_qwen_ids(ids))


def _qwen2_5_vl_config(size: Any, text: dict[str, Any], rope: dict[str, Any], ids: dict[str, int]) -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=size.vision_depth, hidden_size=size.vision_width, intermediate_size=2 * size.vision_width,
                  num_heads=2, out_hidden_size=size.hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[size.vision_depth - 1])
    return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **_qwen_ids(ids))


def _qwen3_vl_config(size: Any, text: dict[str, Any], rope: dict[str, Any], ids: dict[str, int]) -> Any:
    from transformers import Qwen3VLConfig

    vision = dict(depth=size.vision_depth, hidden_size=size.vision_width, intermediate_size=2 * size.vision_width,
                  num_heads=2, out_hidden_size=size.hidden_size, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    head_dim = size.hidden_size // size.num_heads
    return Qwen3VLConfig(text_config={**text, "head_dim": head_dim, "rope_parameters": {**rope, "mrope_interleaved": True}},
                         vision_config=vision, **_qwen_ids(ids))


def _llava_onevision_config(size: Any, text: dict[str, Any], rope: dict[str, Any], ids: dict[str, int]) -> Any:
    from transformers import LlavaOnevisionConfig

    vision = dict(model_type="siglip_vision_model", hidden_size=size.vision_width,
                  intermediate_size=2 * size.vision_width, num_hidden_layers=size.vision_depth,
                  num_attention_heads=2, image_size=LLAVA_TILE, patch_size=14)
    return LlavaOnevisionConfig(text_config={**text, "model_type": "qwen2"}, vision_config=vision,
                                image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                image_grid_pinpoints=_llava_pinpoints(), tie_word_embeddings=False)


def _qwen_processor(patch_size: int) -> Callable[[], Any]:
    def make() -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS})
    return make


def _llava_processor() -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    s = LLAVA_TILE
    return LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, crop_size={"height": s, "width": s},
                                           image_grid_pinpoints=_llava_pinpoints())


# ---------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What differs between the supported model families.

    Attributes:
        model_type: the config's ``model_type``.
        image_token: placeholder token the chat template writes once per image; the collator
            repeats it to the number of vision tokens the image needs.
        image_token_attr: the config attribute holding the placeholder's id.
        vision_attrs: attributes of ``model.model`` that form the vision encoder + projector.
        uses_mm_token_type_ids: Qwen models need ``mm_token_type_ids`` (0 text, 1 image).
        image_keys: image tensors the model's forward takes beside ``input_ids``.
        images: preprocessing, placeholder counts and collation of images.
        chat_image_markup: what the tiny checkpoints' chat template writes for an image.
        tiny_config: ``(size, text settings, rope settings, special-token ids) -> config``.
        tiny_image_processor: the tiny checkpoints' PIL image processor.
    """

    model_type: str
    image_token: str
    image_token_attr: str
    vision_attrs: tuple[str, ...]
    uses_mm_token_type_ids: bool
    image_keys: tuple[str, ...]
    images: GridImages | TiledImages
    chat_image_markup: str
    tiny_config: Callable[..., Any]
    tiny_image_processor: Callable[[], Any]

    def image_token_id(self, config: Any) -> int:
        """The placeholder id of a model config; a config without the attribute is an error."""
        if not hasattr(config, self.image_token_attr):
            raise VlsiError(f"{self.model_type} config has no {self.image_token_attr!r} (the family entry's "
                            "image_token_attr)")
        return int(getattr(config, self.image_token_attr))


_QWEN_IMAGE_KEYS = ("pixel_values", "image_grid_thw")
_QWEN_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", "<|image_pad|>", "image_token_id", ("visual",), True, _QWEN_IMAGE_KEYS,
                       GridImages(), _QWEN_MARKUP, _qwen2_vl_config, _qwen_processor(14)),
    "qwen2_5_vl": Family("qwen2_5_vl", "<|image_pad|>", "image_token_id", ("visual",), True, _QWEN_IMAGE_KEYS,
                         GridImages(), _QWEN_MARKUP, _qwen2_5_vl_config, _qwen_processor(14)),
    "qwen3_vl": Family("qwen3_vl", "<|image_pad|>", "image_token_id", ("visual",), True, _QWEN_IMAGE_KEYS,
                       GridImages(), _QWEN_MARKUP, _qwen3_vl_config, _qwen_processor(16)),
    "llava_onevision": Family(
        "llava_onevision", "<image>", "image_token_index",
        ("vision_tower", "multi_modal_projector", "image_newline"), False,
        # batch_num_images: per sample; more than one image switches LLaVA-OneVision from
        # anyres tiling to base features only, which changes the placeholder count.
        ("pixel_values", "image_sizes", "batch_num_images"),
        TiledImages(), "<image>\n", _llava_onevision_config, _llava_processor),
}


def family_for(model_type: str) -> Family:
    """The :class:`Family` of a config ``model_type``; unknown types are a clear error."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise VlsiError(f"unsupported model_type {model_type!r}; supported: {supported}") from None
