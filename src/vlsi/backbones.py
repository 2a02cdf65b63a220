"""One small interface to the vision-language models VLsI distils between.

Everything else in the package reaches a model through :class:`Backbone`: its decoder layers,
final norm, LM head, sizes, the vision parts to freeze, the LoRA target pattern and the image
preprocessing that decides how many placeholder tokens an image takes. The family is chosen
from the config's ``model_type``:

==================  =====================================  ==========================
``model_type``      Hugging Face class                     image placeholder
==================  =====================================  ==========================
``qwen2_vl``        Qwen2VLForConditionalGeneration        ``<|image_pad|>`` x N
``qwen2_5_vl``      Qwen2_5_VLForConditionalGeneration     ``<|image_pad|>`` x N
``qwen3_vl``        Qwen3VLForConditionalGeneration        ``<|image_pad|>`` x N
``llava_onevision`` LlavaOnevisionForConditionalGeneration ``<image>`` x N
==================  =====================================  ==========================

Models, tokenizers and image processors load from local directories only
(``local_files_only=True``); nothing is fetched from a hub.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlsi.errors import VlsiError

# The language model's linear layers, and only those: Qwen2.5-VL's vision blocks also have
# `mlp.gate_proj/up_proj/down_proj`, so a plain name list would put LoRA on the vision tower.
# PEFT full-matches a string `target_modules` against each module's qualified name.
LORA_TARGET_PATTERN = (
    r"(.*\.)?language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


@dataclass(frozen=True)
class Family:
    """What differs between the supported model families.

    Attributes:
        model_type: the config's ``model_type``.
        image_token: placeholder token the chat template writes once per image; the collator
            repeats it to the number of vision tokens the image needs.
        vision_attrs: attributes of ``model.model`` that form the vision encoder + projector.
        uses_mm_token_type_ids: Qwen models need ``mm_token_type_ids`` (0 text, 1 image).
        image_keys: image tensors the model's forward takes beside ``input_ids``.
    """

    model_type: str
    image_token: str
    vision_attrs: tuple[str, ...]
    uses_mm_token_type_ids: bool
    image_keys: tuple[str, ...]

    @property
    def is_qwen(self) -> bool:
        return self.uses_mm_token_type_ids


_QWEN_IMAGE_KEYS = ("pixel_values", "image_grid_thw")
FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", "<|image_pad|>", ("visual",), True, _QWEN_IMAGE_KEYS),
    "qwen2_5_vl": Family("qwen2_5_vl", "<|image_pad|>", ("visual",), True, _QWEN_IMAGE_KEYS),
    "qwen3_vl": Family("qwen3_vl", "<|image_pad|>", ("visual",), True, _QWEN_IMAGE_KEYS),
    "llava_onevision": Family(
        "llava_onevision",
        "<image>",
        ("vision_tower", "multi_modal_projector", "image_newline"),
        False,
        # batch_num_images: per sample; more than one image switches LLaVA-OneVision from
        # anyres tiling to base features only, which changes the placeholder count.
        ("pixel_values", "image_sizes", "batch_num_images"),
    ),
}


def family_for(model_type: str) -> Family:
    """The :class:`Family` of a config ``model_type``; unknown types are a clear error."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise VlsiError(f"unsupported model_type {model_type!r}; supported: {supported}") from None


def read_model_type(path: str | Path) -> str:
    """``model_type`` from ``path/config.json``, with one-line errors for missing paths."""
    config_file = checkpoint_dir(path) / "config.json"
    if not config_file.is_file():
        raise VlsiError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise VlsiError(f"{config_file}: cannot read model_type ({err})") from None


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a local directory; a missing path is a one-line error (no hub look-up)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise VlsiError(f"model path not found: {p} (models load from local directories only)")
    return p


class Backbone:
    """Uniform access to a loaded Hugging Face VLM (``...ForConditionalGeneration``).

    Shapes: ``hidden_size`` = d, ``vocab_size`` = V (LM-head rows, which may exceed the
    tokenizer's length: Qwen2-VL-7B pads to 152,064), ``num_layers`` = L decoder layers.
    ``output_hidden_states=True`` gives L + 1 tensors [B, T, d]: entry 0 the embeddings,
    entry i the output of layer i - 1 before the final norm, and the last one already normed.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model.config.model_type)

    # -- language model ---------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def vocab_size(self) -> int:
        # DeepSpeed ZeRO-3 partitions the weight to shape [0]; ds_shape keeps the real one.
        weight = self.lm_head.weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])

    @property
    def decoder_layer_class(self) -> type[nn.Module]:
        return type(self.decoder_layers[0])

    def identity(self) -> dict[str, Any]:
        """What a verbalizer must match to be attached to this backbone."""
        return {
            "model_type": self.family.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
        }

    # -- vision -----------------------------------------------------------------------------
    def vision_parameters(self) -> list[nn.Parameter]:
        """Parameters of the vision encoder and projector (frozen in every VLsI step)."""
        params: list[nn.Parameter] = []
        for attr in self.family.vision_attrs:
            part = getattr(self.model.model, attr, None)
            if isinstance(part, nn.Parameter):
                params.append(part)
            elif isinstance(part, nn.Module):
                params.extend(part.parameters())
        return params

    def freeze_vision(self) -> None:
        for p in self.vision_parameters():
            p.requires_grad_(False)

    @property
    def lora_target_modules(self) -> str:
        """Regex for ``peft.LoraConfig(target_modules=...)``: the LM's linear layers only."""
        return LORA_TARGET_PATTERN

    # -- inputs -----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        cfg = self.config
        return int(cfg.image_token_id if self.family.is_qwen else cfg.image_token_index)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subset of a collated batch this model's ``forward`` takes (labels excluded)."""
        keys = ["input_ids", "attention_mask", *self.family.image_keys]
        if self.family.uses_mm_token_type_ids:
            keys.append("mm_token_type_ids")
        return {k: batch[k] for k in keys if k in batch and batch[k] is not None}


def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, **kwargs: Any
) -> nn.Module:
    """Load a supported VLM from a local directory with ``AutoModelForImageTextToText``."""
    from transformers import AutoModelForImageTextToText

    family_for(read_model_type(path))  # clear error before transformers' own
    return AutoModelForImageTextToText.from_pretrained(
        checkpoint_dir(path), dtype=dtype or "auto", local_files_only=True, **kwargs
    )


def load_backbone(path: str | Path, **kwargs: Any) -> Backbone:
    return Backbone(load_model(path, **kwargs))


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (with its chat template), from the local directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_dir(path), local_files_only=True)
    if tok.pad_token_id is None:
        # Qwen tokenizers define <|endoftext|> as pad; fall back to EOS for others.
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# Images: preprocessing and the number of vision tokens per image
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageBatch:
    """Preprocessed images of one sample and the number of placeholder tokens each needs.

    ``tensors`` holds the family's image inputs: Qwen ``pixel_values`` [sum(t*h*w), C*T*P*P]
    and ``image_grid_thw`` [n, 3]; LLaVA-OneVision ``pixel_values`` [n, tiles, 3, H, W] and
    ``image_sizes`` [n, 2].
    """

    tensors: dict[str, torch.Tensor]
    num_tokens: list[int]


class ImageEncoder:
    """A family's image processor (PIL backend: no torchvision) bounded by min/max pixels."""

    def __init__(self, family: Family, processor: Any, config: Any, min_pixels: int, max_pixels: int):
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise VlsiError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.family = family
        self.processor = processor
        self.config = config
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> ImageEncoder:
        """Load the checkpoint's image processor with its PIL backend.

        ``min_pixels``/``max_pixels`` default to the processor's own bounds (Qwen:
        ``size.shortest_edge``/``longest_edge``, which are pixel counts; LLaVA-OneVision: no
        lower bound and the largest grid pinpoint).
        """
        from transformers import AutoConfig, AutoImageProcessor

        d = checkpoint_dir(path)
        config = AutoConfig.from_pretrained(d, local_files_only=True)
        family = family_for(config.model_type)
        processor = AutoImageProcessor.from_pretrained(d, backend="pil", local_files_only=True)
        if family.is_qwen:
            size = dict(processor.size)
            lo = min_pixels or size.get("shortest_edge", 56 * 56)
            hi = max_pixels or size.get("longest_edge", 28 * 28 * 1280)
            processor.size = {"shortest_edge": lo, "longest_edge": hi}
        else:
            lo = min_pixels or 1
            hi = max_pixels or max(h * w for h, w in processor.image_grid_pinpoints)
        return cls(family, processor, config, lo, hi)

    def bound(self, image: Image.Image) -> Image.Image:
        """Resize (keeping the aspect ratio) so that height*width lies in [min, max] pixels.

        Qwen processors enforce the bounds themselves (``smart_resize``); LLaVA-OneVision's
        anyres tiling does not, so its images are resized here.
        """
        image = image.convert("RGB")
        if self.family.is_qwen:
            return image
        w, h = image.size
        area = w * h
        if self.min_pixels <= area <= self.max_pixels:
            return image
        shrink = area > self.max_pixels
        scale = math.sqrt((self.max_pixels if shrink else self.min_pixels) / area)
        # floor when shrinking and ceil when growing, so the bound holds after rounding
        size_of = math.floor if shrink else math.ceil
        return image.resize((max(1, size_of(w * scale)), max(1, size_of(h * scale))), Image.BICUBIC)

    def __call__(self, images: list[Image.Image]) -> ImageBatch:
        images = [self.bound(im) for im in images]
        out = self.processor(images=images, return_tensors="pt")
        if self.family.is_qwen:
            merge = self.processor.merge_size**2
            grid = out["image_grid_thw"]
            counts = [int(g.prod()) // merge for g in grid]
            return ImageBatch({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts)
        return ImageBatch(
            {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]},
            self._llava_counts(out, multi_image=len(images) > 1),
        )

    def _llava_counts(self, out: dict, multi_image: bool) -> list[int]:
        """Vision tokens per image, by the formulas of transformers' LlavaOnevisionProcessor.

        The processor class itself cannot be instantiated without torchvision (it needs a video
        processor), so its two counting methods are called on a stand-in object.
        """
        from transformers.models.llava_onevision import processing_llava_onevision as plo

        cfg = self.config
        vcfg = cfg.vision_config
        base = (vcfg.image_size // vcfg.patch_size) ** 2
        stand_in = SimpleNamespace(
            image_processor=self.processor,
            num_image_tokens=base,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
        )
        stand_in._get_unpadded_features = functools.partial(
            plo.LlavaOnevisionProcessor._get_unpadded_features, stand_in
        )
        height, width = out["pixel_values"][0][0].shape[-2:]
        counts = []
        for orig_h, orig_w in out["image_sizes"].tolist():
            if multi_image:  # several images in one sample: base features + 1 newline each
                n = base + 1
            else:
                n = plo.LlavaOnevisionProcessor._get_number_of_features(
                    stand_in, orig_h, orig_w, height, width
                )
            if cfg.vision_feature_select_strategy == "default":
                n -= 1
            counts.append(n)
        return counts
