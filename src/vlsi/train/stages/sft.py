"""Step 3 — SFT: next-token loss on the student, then export (docs/method.md#sft-and-export).

    vlsi sft CONFIG [--adapter DIR] [--student-verbalizers DIR] [--out DIR] [--resume]

The student's language model is trained through LoRA with the ordinary next-token
cross-entropy on response tokens, computed from the final-normed last hidden state at the
response positions only, through the frozen LM head chunk by chunk (:func:`head_ce`): no
``[B, T, V]`` logits (docs/benchmarks.md, "The SFT loss without [B, T, V] logits"). It starts from the interaction step's adapter (``adapter``,
continued as is: its rank, alpha and target modules are the interaction's) or, without one, from
a fresh LoRA (``cfg.lora``; :mod:`vlsi.train.lora`). The vision encoder and projector stay frozen.

At the end the adapter is saved, merged into a freshly loaded copy of the student on the CPU and
the result exported as a stock Hugging Face checkpoint (:mod:`vlsi.train.export`). Merging from the
saved adapter, rather than from the model in the Trainer's hands, gives the same weights under
every launch (single device, DDP, DeepSpeed ZeRO-3 and FSDP, whose parameters are sharded).

Output directory: ``checkpoint-N/``, ``metrics.jsonl`` (and TensorBoard event files under
``runs/``), ``adapter/`` (the final LoRA adapter), ``model/`` (the exported student;
``model/verbalizers/`` the student's verbalizers), ``fingerprint.json``, and
``step_complete.json`` written last. :func:`run_sft` returns the path of ``model/``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import Trainer

from vlsi.data import IGNORE_INDEX
from vlsi.errors import VlsiError
from vlsi.method.losses import CE_CHUNK_TOKENS, chunked_head_ce, liger_fused_linear_ce
from vlsi.method.verbalizer import gather_positions, position_index, prediction_positions
from vlsi.models.backbones import Backbone, load_backbone, load_model
from vlsi.train.config import RunConfig
from vlsi.train.distributed import unpartitioned_loading, vision_on_every_process, whole_parameters
from vlsi.train.export import export_student
from vlsi.train.fingerprint import directory_identity, step_inputs
from vlsi.train.lora import save_adapter, trainable_summary, with_adapter, with_lora
from vlsi.train.preflight import Preflight, check_run
from vlsi.train.resolved import ResolvedRun, resolve_run
from vlsi.train.stages.interact import ADAPTER_DIR, load_adapter_weights
from vlsi.train.stages.run import Stage, VlsiTrainerMixin, run_stage
from vlsi.train.stages.verbalize import response_targets

MODEL_DIR = "model"


HeadCE = Callable[[Tensor, Tensor, nn.Linear], Tensor]


def head_ce(device: torch.device, chunk_size: int = CE_CHUNK_TOKENS) -> tuple[HeadCE, str]:
    """The summed next-token CE through the LM head, and a line saying which implementation it is.

    The function maps ``(y [N, d], targets [N], lm_head)`` to the float32 scalar
    ``sum_n CE(lm_head(y[n]), targets[n])``, differentiable w.r.t. ``y`` (not the head's weights):
    Liger-Kernel's fused linear cross-entropy on CUDA when ``liger-kernel`` is installed
    (``pip install vlsi[liger]``), otherwise :func:`vlsi.method.losses.chunked_head_ce` with
    ``chunk_size`` rows of logits at a time. Both compute the softmax in float32.
    """
    liger = liger_fused_linear_ce() if device.type == "cuda" else None
    if liger is not None:
        fused = liger(ignore_index=IGNORE_INDEX, reduction="sum")

        def fused_ce(y: Tensor, targets: Tensor, head: nn.Linear) -> Tensor:
            return fused(head.weight, y.to(head.weight.dtype), targets, head.bias).float()

        return fused_ce, "Liger-Kernel fused linear cross-entropy (liger_kernel.transformers)"

    def chunked_ce(y: Tensor, targets: Tensor, head: nn.Linear) -> Tensor:
        return chunked_head_ce(y.to(head.weight.dtype), targets, head, chunk_size)

    why = ("liger-kernel is not installed" if device.type == "cuda"
           else f"Liger-Kernel needs CUDA, the device is {device.type}")
    return chunked_ce, f"chunked head cross-entropy, {chunk_size} tokens a chunk ({why})"


class SFTTrainer(VlsiTrainerMixin, Trainer):
    """The Trainer of the SFT step: next-token cross-entropy on response tokens.

    The model's forward returns no logits (``logits_to_keep=1``) but its hidden states; the
    loss (:meth:`response_loss`, the Trainer's ``compute_loss_func``) takes the last, final-normed
    one at the response positions and runs the frozen LM head through :func:`head_ce`. Its value
    is the model's own loss with ``labels`` (-100 everywhere but assistant tokens):
    ``sum of token CEs / num_items_in_batch``, where the Trainer passes ``num_items_in_batch``,
    the number of supervised next-token labels in the whole accumulated batch (over all
    processes); so the accumulated gradient is that of the mean over every response token of the
    optimizer step, not a mean of per-micro-batch means. Without ``num_items_in_batch`` it is the
    micro-batch's mean. The Trainer's own ``compute_loss`` calls the forward and the loss, and
    scales them across processes and accumulation steps as it does the model's own loss.

    Args:
        chunk_size: response tokens per block of logits of the chunked CE.
    """

    stage = "sft"

    def __init__(self, *args: Any, chunk_size: int = CE_CHUNK_TOKENS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.student = Backbone(self.model.get_base_model())
        self.compute_loss_func = self.response_loss
        self.head_ce, description = head_ce(self.args.device, chunk_size)
        if self.is_world_process_zero():
            print(f"sft: loss: {description}", flush=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # logits_to_keep=1: the model's own [B, T, V] logits are not needed; response_loss reads
        # the last hidden state (autograd keeps the states for the backward anyway)
        forward = {**self.student.model_inputs(inputs), "labels": inputs["labels"], "use_cache": False,
                   "logits_to_keep": 1, "output_hidden_states": True}
        with vision_on_every_process(self, self.student, inputs):
            out = super().compute_loss(model, forward, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        loss = self.finite_or_skipped(model, out[0] if return_outputs else out)
        return (loss, out[1]) if return_outputs else loss

    def response_loss(self, outputs: Any, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """``sum_n CE(lm_head(h[n]), y[n]) / num_items_in_batch`` (or ``/ N``) over the ``N``
        response positions ``n`` of ``labels`` ``[B, T]``; ``h`` = ``outputs.hidden_states[-1]``
        ``[B, T, d]``, final-normed. Float32 scalar."""
        positions = prediction_positions(labels)
        index = position_index(positions)
        y = gather_positions(outputs.hidden_states[-1], index)  # [N, d]
        targets = response_targets(labels, positions)  # [N]
        head = self.student.lm_head
        # autocast off: the head runs in its weights' dtype, the softmax in float32
        with whole_parameters(self, [head], fsdp_roots=(self.model,)), \
                torch.autocast(y.device.type, enabled=False):
            total = self.head_ce(y, targets, head)
        if num_items_in_batch is None:
            return total / index.numel()  # the model's mean: NaN without a response token
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def run_sft(
    run: RunConfig | ResolvedRun,
    out_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    student_verbalizers: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    upstream: dict[str, str | None] | None = None,
    preflight: Preflight | None = None,
) -> Path:
    """Train the student with next-token loss, then export it; returns the exported directory.

    Args:
        run: the run (``student``, ``data``, ``lora``, stage ``sft``); a
            :class:`~vlsi.train.config.RunConfig` is resolved here (:func:`vlsi.train.resolved.resolve_run`).
        out_dir: the step directory (see the module docstring for its contents).
        adapter: the interaction step's LoRA adapter directory, continued; ``None``: a fresh
            LoRA from ``cfg.lora``.
        student_verbalizers: the student's verbalization output, checked against the student
            and copied beside the exported model; ``None``: not exported.
        resume: continue from the newest checkpoint; a finished step returns at once.
        restart: redo a step whose recorded inputs differ (else that is an error).
        upstream: identities of ``adapter`` and ``student_verbalizers`` when the caller knows
            them (``vlsi distill``); by default they are read from the directories.
        preflight: the caller's pre-flight result (``vlsi distill``); by default run here.
    """
    run = resolve_run(run)
    cfg = run.cfg
    out = Path(out_dir)
    student_dir = run.student_dir
    if preflight is None:
        check_run(run, ("sft",), student_verbalizers=Path(student_verbalizers) if student_verbalizers else None)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise VlsiError(f"LoRA adapter not found: {adapter} has no adapter_config.json")
    if upstream is None:
        upstream = {"adapter": directory_identity(adapter) if adapter else None,
                    "student_verbalizers": directory_identity(student_verbalizers) if student_verbalizers else None}

    def build(args, dataset, collator, resumed_step: int) -> Trainer:
        backbone = load_backbone(student_dir, dtype=torch.bfloat16 if args.bf16 else None,
                                 attn_implementation=cfg.attn_implementation)
        model = with_lora(backbone, cfg.lora, adapter, seed=cfg.stage("sft").seed)
        start = f"adapter {adapter}" if adapter is not None else f"a fresh LoRA (r={cfg.lora.r})"
        print(f"sft: student {student_dir} from {start}: {trainable_summary(model)}", flush=True)
        return SFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          max_consecutive_nonfinite=cfg.stage("sft").max_consecutive_nonfinite)

    def outputs(trainer: Trainer) -> dict[str, Any]:
        save_adapter(trainer, out / ADAPTER_DIR)
        accelerator = trainer.accelerator
        trainer.model = trainer.model_wrapped = None  # free the trained copy before merging
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the student's own dtype (bf16 for the real checkpoints), on the CPU, whole
            with unpartitioned_loading(trainer):
                merged = with_adapter(load_model(student_dir), out / ADAPTER_DIR)
                export_student(merged, student_dir, out / MODEL_DIR, verbalizers_dir=student_verbalizers)
        return {"student": str(student_dir),
                "started_from": str(adapter) if adapter is not None else "fresh LoRA",
                "student_verbalizers": str(student_verbalizers) if student_verbalizers is not None else None,
                "outputs": [ADAPTER_DIR, MODEL_DIR]}

    stage = Stage("sft", "sft", out, step_inputs(run, "sft", upstream), student_dir, build,
                  lambda trainer, ckpt: load_adapter_weights(trainer.model, ckpt), outputs)
    run_stage(stage, run, resume=resume, restart=restart)
    return out / MODEL_DIR
