"""A model's shape for memory planning, from its config on the ``meta`` device (no weights read).

:class:`ModelShape` holds what the plan (:mod:`vlsi.train.plan`) needs of one model: exact
parameter counts, sizes, the largest block gathered whole, the LoRA-targeted layers' widths.
A shape comes from a local checkpoint (:func:`shape_from_checkpoint`), a config
(:func:`shape_from_config`) or a published Qwen2-VL size (:func:`shape_from_name`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlsi.errors import VlsiError

SHAPES = {"qwen2-vl-2b": "2b", "qwen2-vl-7b": "7b", "qwen2-vl-72b": "72b"}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float": 4, "half": 2}


@dataclass
class ModelShape:
    """What the plan needs of one model, from its config on the ``meta`` device."""

    name: str
    parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    kv_size: int  # num_key_value_heads x head_dim
    vocab_size: int  # LM-head rows
    weight_bytes: int  # bytes per parameter in the checkpoint's dtype
    largest_block: int  # parameters of the largest decoder layer or of the LM head
    head: int  # parameters of the final norm and the LM head
    lora_in_out: int  # sum of in + out features over the LoRA-targeted linear layers
    target_layers: list[int] = field(default_factory=list)

    def lora_parameters(self, r: int) -> int:
        return r * self.lora_in_out


@contextmanager
def _outside_zero3_init() -> Iterator[None]:
    """Build models as plain modules even inside a ZeRO-3 launch.

    Once a ZeRO-3 launch's ``TrainingArguments`` exist, transformers builds every model inside
    ``deepspeed.zero.Init``, which cannot initialise meta tensors; the global DeepSpeed config
    is unset for the duration and set back as it was.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref()  # transformers has no public getter of the object
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(saved)


def _meta_shape(config: Any, name: str, weight_bytes: int) -> ModelShape:
    import torch
    from transformers import AutoModelForImageTextToText

    from vlsi.models.backbones import LORA_TARGET_PATTERN

    with _outside_zero3_init(), torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    pattern = re.compile(LORA_TARGET_PATTERN)
    lora = sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))
    layers = [m for n, m in model.named_modules() if re.fullmatch(r"(.*\.)?language_model\.layers\.\d+", n)]
    head = model.get_output_embeddings().weight
    largest = max([sum(p.numel() for p in layer.parameters()) for layer in layers] + [head.numel()])
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return ModelShape(
        name=name, parameters=sum(p.numel() for p in model.parameters()), num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size), intermediate_size=int(text.intermediate_size),
        kv_size=int(getattr(text, "num_key_value_heads", heads)) * head_dim, vocab_size=int(head.shape[0]),
        weight_bytes=weight_bytes, largest_block=largest, lora_in_out=lora,
        head=head.numel() + int(text.hidden_size),
    )


def shape_from_checkpoint(path: str | Path) -> ModelShape:
    """The shape of a local checkpoint from its ``config.json`` (no weights read)."""
    from transformers import AutoConfig

    from vlsi.models.backbones import checkpoint_dir, read_model_type
    from vlsi.models.families import family_for

    hint = f"pass --teacher-shape / --student-shape to plan a published shape ({', '.join(SHAPES)})"
    try:
        root = checkpoint_dir(path)
    except VlsiError as err:
        raise VlsiError(f"{err}; {hint}") from None
    if not (root / "config.json").is_file():
        raise VlsiError(f"{root}: no config.json; {hint}")
    family_for(read_model_type(root))
    return shape_from_config(AutoConfig.from_pretrained(root, local_files_only=True), str(root))


def shape_from_config(config: Any, name: str) -> ModelShape:
    """The shape of a transformers model config; weights in the config's dtype (float32 if none)."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return _meta_shape(config, name, _DTYPE_BYTES.get(dtype.replace("torch.", ""), 4))


def shape_from_name(name: str) -> ModelShape:
    """A published shape (:data:`SHAPES`) at full depth, in bf16 (:mod:`vlsi.models.real_shapes`)."""
    from vlsi.models.real_shapes import QWEN2_VL_TEXT, real_shape_config

    if name not in SHAPES:
        raise VlsiError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    size = SHAPES[name]

    class _Ids:  # real_shape_config reads special-token ids; their values do not change any shape
        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    config = real_shape_config(size, _Ids(), num_layers=QWEN2_VL_TEXT[size]["num_hidden_layers"])
    config.dtype = "bfloat16"  # the published checkpoints' dtype
    return shape_from_config(config, name)
