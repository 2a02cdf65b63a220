"""One small interface to the vision-language models VLsI distils between.

Everything else in the package reaches a model through :class:`Backbone`: its decoder layers,
final norm, LM head, sizes, the vision parts to freeze, the LoRA target pattern; and an image
through :class:`ImageEncoder`, which decides how many placeholder tokens it takes. What differs
between families is in their entry (:mod:`vlsi.models.families`), chosen by the config's
``model_type``.

Models, tokenizers and image processors load from local directories only
(``local_files_only=True``); nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlsi.errors import VlsiError
from vlsi.models.families import Family, ImageBatch, family_for

# The language model's linear layers, and only those: Qwen2.5-VL's vision blocks also have
# `mlp.gate_proj/up_proj/down_proj`, so a plain name list would put LoRA on the vision tower.
# PEFT full-matches a string `target_modules` against each module's qualified name.
LORA_TARGET_PATTERN = (
    r"(.*\.)?language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


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
        """Parameters of the vision encoder and projector (frozen in every VLsI step).

        Every attribute of the family entry's ``vision_attrs`` must exist: a missing one is an
        error, not a silently unfrozen part.
        """
        params: list[nn.Parameter] = []
        for attr in self.family.vision_attrs:
            if not hasattr(self.model.model, attr):
                raise VlsiError(f"{self.family.model_type}: the model has no {attr!r} (the family "
                                "entry's vision_attrs)")
            part = getattr(self.model.model, attr)
            params.extend([part] if isinstance(part, nn.Parameter) else part.parameters())
        return params

    @property
    def lora_target_modules(self) -> str:
        """Regex for ``peft.LoraConfig(target_modules=...)``: the LM's linear layers only."""
        return LORA_TARGET_PATTERN

    def dummy_image_features(self, device: torch.device) -> Any:
        """The vision encoder + projector run on the family's smallest all-zero image
        (``Family.images.dummy``); what ``get_image_features`` returns, for no sequence."""
        return self.model.get_image_features(**self.family.images.dummy(self.config, device))

    # -- inputs -----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.config)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subset of a collated batch this model's ``forward`` takes (labels excluded)."""
        keys = ["input_ids", "attention_mask", *self.family.image_keys]
        if self.family.uses_mm_token_type_ids:
            keys.append("mm_token_type_ids")
        return {k: batch[k] for k in keys if k in batch and batch[k] is not None}


# Attention kernels a config may choose (``attn_implementation``, transformers' names).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str) -> None:
    """One-line error, before any loading, for a kernel this machine cannot run.

    ``flash_attention_2`` needs the ``flash_attn`` package and a CUDA GPU.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise VlsiError(f"attn_implementation {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if importlib.util.find_spec("flash_attn") is None:
        raise VlsiError("attn_implementation flash_attention_2 needs the flash_attn package, which is not "
                        "installed (pip install flash-attn --no-build-isolation), or use sdpa")
    if not torch.cuda.is_available():
        raise VlsiError("attn_implementation flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa")
    if not is_flash_attn_2_available():
        raise VlsiError("attn_implementation flash_attention_2: transformers cannot use the installed flash_attn "
                        "(2.3.3 or newer needed)")


def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa", **kwargs: Any
) -> nn.Module:
    """Load a supported VLM from a local directory with ``AutoModelForImageTextToText``.

    ``attn_implementation``: one of :data:`ATTN_IMPLEMENTATIONS`, checked first
    (:func:`check_attn_implementation`).
    """
    from transformers import AutoModelForImageTextToText

    family_for(read_model_type(path))  # clear error before transformers' own
    check_attn_implementation(attn_implementation)
    return AutoModelForImageTextToText.from_pretrained(
        checkpoint_dir(path), dtype=dtype or "auto", local_files_only=True,
        attn_implementation=attn_implementation, **kwargs
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
        lo, hi = family.images.bounds(processor, min_pixels, max_pixels)
        return cls(family, processor, config, lo, hi)

    def bound(self, image: Image.Image) -> Image.Image:
        """RGB, within [min, max] pixels (the family's rule; Qwen processors bound it themselves)."""
        return self.family.images.bound(image.convert("RGB"), self.min_pixels, self.max_pixels)

    def __call__(self, images: list[Image.Image]) -> ImageBatch:
        return self.family.images.encode(self.processor, self.config, [self.bound(im) for im in images])


PLACEHOLDER_ATTRIBUTES = ("image_token_id", "video_token_id", "vision_start_token_id",
                          "vision_end_token_id", "image_token_index", "video_token_index")


def placeholder_token_ids(model: Any) -> list[int]:
    """Ids of the image and video placeholder tokens in ``model``'s config (a response that
    holds one no longer matches its images: generation that feeds a forward suppresses them)."""
    ids = {int(v) for name in PLACEHOLDER_ATTRIBUTES
           if isinstance(v := getattr(model.config, name, None), int) and v >= 0}
    return sorted(ids)


def end_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a reply: the generation config's EOS and the end-of-turn token."""
    ids: list[int] = []
    eos = model.generation_config.eos_token_id
    for value in ([eos] if isinstance(eos, int) else list(eos or [])):
        ids.append(int(value))
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))
