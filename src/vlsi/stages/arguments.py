"""A stage's :class:`vlsi.config.TrainingConfig` mapped onto ``transformers.TrainingArguments``.

AdamW, ``cosine_with_min_lr`` from ``learning_rate`` to ``min_learning_rate``, bf16 where the
hardware has it, checkpoints every ``save_steps``, ``remove_unused_columns=False`` (the
collator needs ``num_image_tokens``), batches in pinned memory copied to the device without
blocking (``dataloader_pin_memory``), TensorBoard event files under ``OUT/runs/``
(transformers' default; ``report_to`` picks other integrations), ``ddp_timeout`` from the
config (:data:`vlsi.config.DEFAULT_DDP_TIMEOUT`, not transformers' 30 minutes). Any other
``TrainingArguments`` field of the config (``TrainingConfig.arguments``) is passed through
last; :func:`check_arguments` lets transformers validate them before anything is loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from vlsi.config import TrainingConfig
from vlsi.errors import VlsiError


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
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        # as a rate: the `min_lr` form reads optimizer.defaults, which DeepSpeed's optimizer lacks
        lr_scheduler_kwargs={"min_lr_rate": tcfg.min_learning_rate / tcfg.learning_rate},
        optim="adamw_torch",
        num_train_epochs=tcfg.num_train_epochs,
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.per_device_train_batch_size,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        activation_checkpointing=use_gc,
        activation_checkpointing_kwargs={"use_reentrant": False} if use_gc else None,
        bf16=bf16,
        logging_steps=tcfg.logging_steps,
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        dataloader_num_workers=tcfg.dataloader_num_workers,
        dataloader_pin_memory=tcfg.dataloader_pin_memory,
        accelerator_config={"non_blocking": tcfg.dataloader_pin_memory},  # async copies need pinned memory
        remove_unused_columns=False,
        report_to=list(tcfg.report_to),
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=tcfg.ddp_timeout,
        disable_tqdm=False,
    )
    kwargs.update(tcfg.arguments)
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
