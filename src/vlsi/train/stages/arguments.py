"""A stage's ``transformers.TrainingArguments`` from its :class:`vlsi.train.config.TrainingConfig`.

vlsi sets: AdamW, ``cosine_with_min_lr`` from ``learning_rate`` to ``min_learning_rate``,
``warmup_ratio`` as ``warmup_steps``, bf16 where the hardware has it (``bf16: auto``),
checkpoints every ``save_steps``, ``data_seed`` = ``seed``, ``remove_unused_columns=False``
(the collator needs ``num_image_tokens``), non-blocking copies of pinned batches
(``dataloader_pin_memory``). The config's ``TrainingArguments`` fields come after these (the
paper's :data:`vlsi.train.config.TRAINING_DEFAULTS` unless the config sets them; TensorBoard event files
under ``OUT/runs/``; ``ddp_timeout`` :data:`vlsi.train.config.DEFAULT_DDP_TIMEOUT`, not transformers'
30 minutes). :func:`check_arguments` lets transformers validate the whole before anything is loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from vlsi.errors import VlsiError
from vlsi.train.config import TRAINING_DEFAULTS, TrainingConfig


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(
    tcfg: TrainingConfig,
    output_dir: str | Path,
    *,
    gradient_checkpointing: bool | None = None,
    stage: str = "training",
    **overrides: Any,
) -> TrainingArguments:
    """``TrainingArguments`` for one stage from its merged :class:`TrainingConfig`.

    ``gradient_checkpointing`` overrides the config (the verbalization stage never needs it:
    its backbone runs under ``no_grad``). A value transformers refuses is a one-line error
    naming the stage.
    """
    bf16 = bf16_available() if tcfg.bf16 == "auto" else bool(tcfg.bf16)
    if bf16 and not bf16_available():
        raise VlsiError(f"{stage}.bf16 is true but this machine has no bf16-capable GPU (use 'auto')")
    use_gc = tcfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    # how vlsi drives TrainingArguments; the config's fields (TRAINING_DEFAULTS's and any other) come after
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        lr_scheduler_type="cosine_with_min_lr",
        # as a rate: the `min_lr` form reads optimizer.defaults, which DeepSpeed's optimizer lacks
        lr_scheduler_kwargs={"min_lr_rate": tcfg.min_learning_rate / tcfg.learning_rate},
        optim="adamw_torch",
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        activation_checkpointing=use_gc,
        activation_checkpointing_kwargs={"use_reentrant": False} if use_gc else None,
        bf16=bf16,
        save_strategy="steps",
        data_seed=tcfg.seed,
        accelerator_config={"non_blocking": tcfg.dataloader_pin_memory},  # async copies need pinned memory
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    kwargs.update({name: getattr(tcfg, name) for name in TRAINING_DEFAULTS if name != "gradient_checkpointing"})
    kwargs.update({k: v for k, v in tcfg.arguments.items() if k != "gradient_checkpointing"})
    kwargs.update(overrides)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlsiError(f"{stage}: transformers refuses these training arguments ({first})") from None


def check_arguments(tcfg: TrainingConfig, stage: str) -> TrainingArguments:
    """Build the stage's ``TrainingArguments`` once, into a scratch directory (pre-flight)."""
    with tempfile.TemporaryDirectory() as scratch:
        return training_arguments(tcfg, scratch, stage=stage)
