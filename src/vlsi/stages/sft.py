"""Step 3 — SFT: next-token loss on the student, then export (SPEC "Step 3 — SFT").

    vlsi sft CONFIG [--adapter DIR] [--student-verbalizers DIR] [--out DIR] [--resume]

The student's language model is trained through LoRA with the ordinary next-token
cross-entropy on response tokens. It starts from the interaction step's adapter (``adapter``,
continued as is: its rank, alpha and target modules are the interaction's) or, without one, from
a fresh LoRA (``cfg.lora``, the language model's linear layers only). The vision encoder and
projector stay frozen either way.

At the end the adapter is saved, merged into a freshly loaded copy of the student on the CPU and
the result exported as a stock Hugging Face checkpoint (:mod:`vlsi.export`). Merging from the
saved adapter, rather than from the model in the Trainer's hands, gives the same weights under
every launch (single device, DDP, DeepSpeed ZeRO-3 and FSDP, whose parameters are sharded).

Output directory::

    checkpoint-N/         atomic Trainer checkpoints (``--resume`` continues from the newest)
    metrics.jsonl         every log record; runs/ the same as TensorBoard event files
    adapter/              the final LoRA adapter (peft)
    model/                the exported student; model/verbalizers/ the student's verbalizers
    step_complete.json    written last: the step is finished

:func:`run_sft` returns the path of ``model/``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, set_seed

from vlsi.backbones import Backbone, load_backbone, load_model
from vlsi.config import RunConfig
from vlsi.errors import VlsiError
from vlsi.export import export_student
from vlsi.stages.common import (
    METRICS,
    STEP_COMPLETE,
    checkpoint_step,
    load_training_data,
    resume_checkpoint,
    stage_callbacks,
    stage_complete,
    training_arguments,
    truncate_jsonl,
    use_loss_progress_bar,
    utc_now,
    VlsiTrainerMixin,
    write_json_atomic,
)

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class SFTTrainer(VlsiTrainerMixin, Trainer):
    """The Trainer of the SFT step: the model's own next-token loss on response tokens.

    The loss is the mixin's default :meth:`stage_loss`: the model's cross-entropy with
    ``labels`` (-100 everywhere but assistant tokens; the model shifts them). The Trainer passes
    ``num_items_in_batch``, the number of supervised next-token labels in the whole accumulated
    batch (over all processes), so each micro-batch contributes ``sum of its token losses /
    num_items_in_batch`` and the accumulated gradient is that of the mean over every response
    token of the optimizer step, not a mean of per-micro-batch means.
    """


def run_sft(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    student_verbalizers: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Train the student with next-token loss, then export it; returns the exported directory.

    Args:
        cfg: the run config (``student``, ``data``, ``lora``, stage ``sft``).
        out_dir: the step directory (see the module docstring for its contents).
        adapter: the interaction step's LoRA adapter directory, continued; ``None``: a fresh
            LoRA from ``cfg.lora``.
        student_verbalizers: the student's verbalization output (``verbalizers.safetensors`` +
            ``verbalizers.json``), copied beside the exported model; ``None``: not exported.
        resume: continue from the newest checkpoint in ``out_dir`` (none: start fresh); a
            finished step (``step_complete.json``) returns at once. Without it, an ``out_dir``
            that holds checkpoints or a finished step is an error.
    """
    out = Path(out_dir)
    if resume and stage_complete(out):
        return out / MODEL_DIR
    if student_verbalizers is not None:  # fail now, not after training
        _require_files(Path(student_verbalizers), ("verbalizers.safetensors", "verbalizers.json"),
                       "student verbalizers")
    if adapter is not None:
        _require_files(Path(adapter), ("adapter_config.json",), "LoRA adapter")
    resume_from = resume_checkpoint(out, resume)
    if resume and resume_from is None:
        print(f"sft: no checkpoint in {out}; starting from the beginning")

    tcfg = cfg.stage("sft")
    args = training_arguments(tcfg, out)  # before the model: under ZeRO-3 it is sharded at load
    if args.should_save:
        truncate_jsonl(out / METRICS, checkpoint_step(resume_from))
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    model = student_with_lora(cfg, adapter, dtype=torch.bfloat16 if args.bf16 else None, seed=tcfg.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=stage_callbacks(out, "sft"),
        max_consecutive_nonfinite=tcfg.max_consecutive_nonfinite,
    )
    use_loss_progress_bar(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(out / ADAPTER_DIR))  # PEFT save_pretrained; gathers under ZeRO-3/FSDP

    accelerator = trainer.accelerator
    summary = {
        "stage": "sft",
        "student": str(cfg.student),
        "started_from": str(adapter) if adapter is not None else "fresh LoRA",
        "student_verbalizers": str(student_verbalizers) if student_verbalizers is not None else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "nonfinite_skipped": trainer.nonfinite_skipped,
        "outputs": [ADAPTER_DIR, MODEL_DIR],
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # the student's own dtype (bf16 for the real checkpoints), on the CPU
        merged = with_adapter(load_model(cfg.student), out / ADAPTER_DIR)
        export_student(merged, cfg.student, out / MODEL_DIR, verbalizers_dir=student_verbalizers)
        write_json_atomic(out / STEP_COMPLETE, {**summary, "completed_at": utc_now()})
    accelerator.wait_for_everyone()
    return out / MODEL_DIR


def student_with_lora(
    cfg: RunConfig,
    adapter: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Any:
    """The student as a ``PeftModel`` whose only trainable parameters are LoRA weights on the
    language model: ``adapter`` continued (trainable) or a fresh LoRA from ``cfg.lora``, its
    A matrices drawn with ``seed``. ``dtype``: the base weights' (``None``: the checkpoint's)."""
    from peft import LoraConfig, get_peft_model

    backbone = load_backbone(cfg.student, dtype=dtype)
    backbone.model.requires_grad_(False)  # vision, projector, norms, head: frozen
    set_seed(seed)
    if adapter is None:
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=backbone.lora_target_modules,
        )
        model = get_peft_model(backbone.model, lora)
    else:
        model = with_adapter(backbone.model, adapter, trainable=True)
    _check_vision_frozen(backbone)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    start = f"adapter {adapter}" if adapter is not None else f"a fresh LoRA (r={cfg.lora.r})"
    print(f"sft: student {cfg.student} from {start}: {trainable:,} trainable of {total:,} parameters")
    return model


def with_adapter(base: torch.nn.Module, adapter: str | Path, *, trainable: bool = False) -> Any:
    """``base`` with the PEFT LoRA ``adapter`` loaded; one-line error if it does not fit."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlsiError(f"{adapter}: cannot load this LoRA adapter onto the student ({first})") from None


def _check_vision_frozen(backbone: Backbone) -> None:
    # backbone.model now holds the injected LoRA layers too, so LoRA on vision would show here
    if any(p.requires_grad for p in backbone.vision_parameters()):
        raise VlsiError("the LoRA adapter trains vision-encoder parameters; VLsI trains the "
                        "language model only (check the adapter's target_modules)")


def _require_files(d: Path, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise VlsiError(f"{what} not found: {d} has no {', '.join(missing)}")
