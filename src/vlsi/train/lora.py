"""LoRA on the student's language model: the one place it is set up (interaction and SFT).

The paper's r=64, alpha=64 (docs/method.md#training-defaults), on the language model's linear
layers only
(:data:`vlsi.models.backbones.LORA_TARGET_PATTERN`); the vision encoder, projector, norms and LM
head stay frozen. :func:`with_lora` adds a fresh adapter or continues a saved one;
:func:`with_adapter` loads a saved one onto a model (for merging and export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, set_seed

from vlsi.errors import VlsiError
from vlsi.models.backbones import Backbone
from vlsi.train.config import LoraSettings


def with_adapter(base: nn.Module, adapter: str | Path, *, trainable: bool = False) -> Any:
    """``base`` with the PEFT LoRA ``adapter`` loaded; one-line error if it does not fit."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlsiError(f"{adapter}: cannot load this LoRA adapter onto the student ({first})") from None


def with_lora(backbone: Backbone, settings: LoraSettings, adapter: str | Path | None = None, *,
              seed: int = 0) -> Any:
    """The student as a ``PeftModel`` whose only trainable parameters are LoRA weights.

    Args:
        backbone: the loaded student; all its own parameters are frozen here.
        settings: rank, alpha and dropout of a fresh adapter.
        adapter: a saved adapter to continue (trainable; its own rank and targets), or ``None``.
        seed: seeds the fresh adapter's A matrices.

    Raises:
        VlsiError: an adapter that does not fit, or one that would train the vision encoder.
    """
    from peft import LoraConfig, get_peft_model

    backbone.model.requires_grad_(False)
    set_seed(seed)
    if adapter is None:
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=backbone.lora_target_modules, bias="none")
        model = get_peft_model(backbone.model, config)
    else:
        model = with_adapter(backbone.model, adapter, trainable=True)
    # backbone.model now holds the injected LoRA layers too, so LoRA on vision would show here
    if any(p.requires_grad for p in backbone.vision_parameters()):
        raise VlsiError("the LoRA adapter trains vision-encoder parameters; VLsI trains the "
                        "language model only (check the adapter's target_modules)")
    return model


def trainable_summary(model: nn.Module) -> str:
    """"12,288 trainable of 170,656 parameters"."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters"


def save_adapter(trainer: Trainer, path: str | Path) -> None:
    """Write the trained LoRA adapter of ``trainer.model`` (a ``PeftModel``) as a PEFT directory.

    Every process must call this. ``Trainer.save_model`` gathers the adapter under DDP,
    ZeRO-3 (``zero3_save_16bit_model``) and FSDP with ``FULL_STATE_DICT``. Two cases it does
    not cover: FSDP's ``SHARDED_STATE_DICT`` (it writes only sharded checkpoints) and a
    DeepSpeed run whose weights were restored from a finished checkpoint without training
    (there is no engine to save through). There every trainable (LoRA) parameter is gathered
    whole (:func:`vlsi.train.distributed.full_parameters`) and the main process saves them.
    """
    from vlsi.train.distributed import deepspeed_without_engine, full_parameters

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    fsdp_sharded = trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
    if not (fsdp_sharded or deepspeed_without_engine(trainer)):
        trainer.save_model(str(path))
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = full_parameters(model, trainable_only=True)
    if trainer.args.should_save:
        model.save_pretrained(str(path), state_dict=state)
    trainer.accelerator.wait_for_everyone()
