"""``vlsi verbalize``: train the verbalizers of one backbone (SPEC "Step 1 — verbalization").

Run once for the teacher and once for the student. The backbone is frozen and runs under
``torch.no_grad()`` (no backbone activation is kept for backward); each target layer's
verbalizer is trained with next-token cross-entropy on response tokens against the ground-truth
response, and the loss is the sum over layers (the layers' gradients are independent).

Loss of target layer ``l`` on a batch with ``N`` response tokens::

    loss_l = mean_n CE(lm_head(final_norm(T_l(h_l[n]))), y[n])      h_l[n] in R^d, y[n] a token id

The softmax runs over the backbone's own LM-head rows (all of them, padding rows included), i.e.
the same next-token distribution the backbone's own loss uses: verbalization knows nothing of the
other model, and the cut to the shared vocabulary happens only when teacher and student are
compared (interaction step). Target ids are tokenizer ids, always below the head's row count.

Memory. At V = 151,936 one layer's float32 logits for 8k response tokens are 4.9 GB, and an
ordinary autograd graph would keep one such tensor per target layer until ``backward``. Instead
:func:`chunked_head_ce` runs the frozen head over chunks of :data:`CE_CHUNK_TOKENS` tokens and
computes each chunk's gradient with respect to the verbalizer output ``T_l(h)`` ``[N, d]`` right
away, inside the forward; only that ``[N, d]`` gradient is kept, and ``backward`` carries it into
the verbalizer's parameters. Peak loss memory is one ``[chunk, V]`` block whatever ``N`` and
the number of layers, with no recomputation (the head's backward is done once, in the forward).
The same trick lets ZeRO-3 gather the backbone's head only for the duration of the loss.

Outputs in ``OUT`` (one directory per role):

==============================  ============================================================
``verbalizers.safetensors``     the trained verbalizers (:meth:`VerbalizerSet.save`)
``verbalizers.json``            architecture, target layers, backbone identity
``layer_loss.json`` / ``.md``   per-layer loss around 10/30/50/70/90/100% of training (paper
                                appendix B); rewritten as each milestone's window closes
``layer_loss_steps.jsonl``      per-optimizer-step mean loss of every layer (the table's data)
``metrics.jsonl``, TensorBoard     logged ``loss`` and ``loss_layer_<idx>``
``checkpoint-N/``               Trainer checkpoints (verbalizer weights only)
``step_complete.json``          written last, atomically: the stage finished
==============================  ============================================================

Run: ``run_verbalize(cfg, "teacher", OUT)`` (``vlsi verbalize CONFIG --role teacher``).

The helpers at the end of this module (frozen-model placement under DeepSpeed/FSDP, gathering of
sharded heads, resume checks, metric averaging) are shared with :mod:`vlsi.stages.interact`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, set_seed

from vlsi.backbones import Backbone, checkpoint_dir, load_backbone, read_model_type
from vlsi.config import RunConfig
from vlsi.errors import VlsiError
from vlsi.stages.common import (
    METRICS,
    STEP_COMPLETE,
    checkpoint_step,
    load_training_data,
    MeanMetrics,
    place_frozen_model,
    read_jsonl,
    resume_checkpoint,
    stage_callbacks,
    stage_complete,
    training_arguments,
    truncate_jsonl,
    use_loss_progress_bar,
    utc_now,
    VlsiTrainerMixin,
    whole_parameters,
    write_json_atomic,
)
from vlsi.verbalizer import LayerContext, VerbalizerSet, capture_layer_context, prediction_positions

ROLES = ("teacher", "student")
# Response tokens per block of the chunked head CE: 1024 x 151,936 x 4 bytes = 622 MB of float32
# logits (plus as much for their gradient); large enough that the head matmul stays efficient.
CE_CHUNK_TOKENS = 1024
MILESTONES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
LOSS_WINDOW = 0.1  # each table column averages the steps of a window this wide (fraction of training)
LAYER_LOSS_STEPS = "layer_loss_steps.jsonl"


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


class _ChunkedHeadCE(torch.autograd.Function):
    """Summed CE of ``head(y)``; its gradient w.r.t. ``y`` is computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, y: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor],  # type: ignore[override]
                chunk_size: int) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(y) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=y.device)
        for a in range(0, y.shape[0], chunk_size):
            b = min(a + chunk_size, y.shape[0])
            with torch.enable_grad():  # Function.forward runs without grad; this chunk needs one
                yc = y[a:b].detach().requires_grad_(need_grad)
                ce = F.cross_entropy(head(yc).float(), targets[a:b], reduction="sum")
                if need_grad:
                    grad[a:b] = torch.autograd.grad(ce, yc)[0]
            total += ce.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def chunked_head_ce(
    y: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], chunk_size: int = CE_CHUNK_TOKENS
) -> Tensor:
    """``sum_n CE(head(y[n]), targets[n])`` with only one chunk's ``[chunk, V]`` logits alive.

    Args:
        y: ``[N, d]`` inputs of the head (the verbalizer outputs); may require grad.
        targets: ``[N]`` token ids.
        head: frozen ``[n, d] -> [n, V]`` (final norm + LM head); no gradient reaches its
            parameters.
        chunk_size: tokens per block.

    Returns:
        float32 scalar, differentiable w.r.t. ``y`` (the gradient was computed in the forward).
    """
    if y.shape[0] != targets.shape[0]:
        raise ValueError(f"{y.shape[0]} inputs but {targets.shape[0]} targets")
    return _ChunkedHeadCE.apply(y, targets, head, chunk_size)


def response_targets(labels: Tensor, positions: Tensor) -> Tensor:
    """Next-token targets ``[N]`` of the ``positions`` (bool ``[B, T]``) in row-major order.

    Matches ``hidden[positions]``: position ``p`` predicts ``labels[:, p + 1]``.
    """
    return labels[:, 1:][positions[:, :-1]]


class VerbalizerTrainingModel(nn.Module):
    """What the Trainer trains: the verbalizers of one frozen backbone.

    Only the :class:`VerbalizerSet` is a registered submodule, so the optimizer, checkpoints
    and DDP/ZeRO/FSDP wrapping see the verbalizers alone. The backbone (held unregistered by
    the set) is run by :class:`VerbalizeTrainer` before this module's forward, which takes its
    hidden states: the trained model's forward then never calls into another model.
    """

    def __init__(self, verbalizers: VerbalizerSet, chunk_size: int = CE_CHUNK_TOKENS):
        super().__init__()
        self.verbalizers = verbalizers
        self.chunk_size = chunk_size

    @property
    def backbone(self) -> Backbone:
        return self.verbalizers.backbone

    def forward(
        self,
        hidden_states: tuple[Tensor, ...],
        positions: Tensor,
        targets: Tensor,
        context: LayerContext | None = None,
    ) -> Tensor:
        """Per-layer mean next-token CE over the response positions.

        Args:
            hidden_states: the backbone's ``output_hidden_states``, L + 1 tensors ``[B, T, d]``.
            positions: bool ``[B, T]`` (:func:`prediction_positions`), ``N`` of them true.
            targets: ``[N]`` next-token ids of those positions (:func:`response_targets`).
            context: the backbone's layer context (``decoder`` verbalizers only).

        Returns:
            float32 ``[t]``, one mean loss per target layer (0 when ``N == 0``).
        """
        n = max(int(positions.sum()), 1)
        losses = []
        for k, layer in enumerate(self.verbalizers.layers):
            y = self._verbalized(k, hidden_states[layer + 1], positions, context)
            losses.append(chunked_head_ce(y, targets, self._head, self.chunk_size) / n)
        return torch.stack(losses)

    def _verbalized(self, k: int, hidden: Tensor, positions: Tensor, context: LayerContext | None) -> Tensor:
        """``T_k`` applied to the response positions: ``[B, T, d]`` -> ``[N, d]``.

        The verbalizers may be float32 master weights on a bf16 backbone: cast the input.
        """
        vset = self.verbalizers
        dtype = next(vset.verbalizers[k].parameters()).dtype
        if vset.verbalizers[k].token_wise:
            return vset.transform(k, hidden[positions].to(dtype))
        return vset.transform(k, hidden.to(dtype), context)[positions]

    def _head(self, y: Tensor) -> Tensor:
        """Backbone's final norm + LM head on ``[n, d]`` in the head's dtype -> ``[n, V_rows]``."""
        return self.verbalizers.head(y.to(self.backbone.lm_head.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Per-layer loss record and the appendix-B table
# ---------------------------------------------------------------------------------------------


class LayerLossLog:
    """Per-optimizer-step mean loss of each target layer, kept in memory and in a JSONL file.

    One line per step: ``{"step": 12, "loss": [l_0, ..., l_{t-1}]}``. Written by the main
    process only; on resume the lines after the checkpoint are dropped and the rest reloaded.
    """

    def __init__(self, path: str | Path, layers: list[int], *, keep_until: int = 0):
        self.path = Path(path)
        self.layers = list(layers)
        self.rows: list[tuple[int, list[float]]] = []
        self._pending: list[Tensor] = []
        for record in read_jsonl(self.path):
            if record["step"] <= keep_until:
                self.rows.append((int(record["step"]), [float(x) for x in record["loss"]]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in self.rows))

    def add(self, losses: Tensor) -> None:
        """One micro-batch's per-layer losses ``[t]`` (detached)."""
        self._pending.append(losses.detach().float().cpu())

    def flush(self, step: int) -> None:
        """Close optimizer ``step``: average its finite micro-batch losses into one row."""
        if not self._pending:
            return
        stacked = torch.stack(self._pending)
        self._pending = []
        finite = torch.isfinite(stacked).all(dim=1)
        if not finite.any():
            return
        row = stacked[finite].mean(dim=0).tolist()
        self.rows.append((step, row))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "loss": row}) + "\n")


def milestone_window(fraction: float, total_steps: int, window: float = LOSS_WINDOW) -> tuple[int, int]:
    """First and last step (1-based, inclusive) of the window around ``fraction`` of training.

    The window is ``window * total_steps`` steps wide (at least one), centred on the milestone
    and shifted to end at the last step when it would run past it (the 100% column).
    """
    width = max(1, round(window * total_steps))
    last = min(total_steps, max(1, round(fraction * total_steps + width / 2)))
    return max(1, last - width + 1), last


def layer_loss_table(
    rows: list[tuple[int, list[float]]],
    layers: list[int],
    total_steps: int,
    milestones: tuple[float, ...] = MILESTONES,
    window: float = LOSS_WINDOW,
) -> dict[str, Any]:
    """Mean loss per target layer in the window of each milestone (paper appendix B).

    Args:
        rows: ``(step, [loss per layer])`` per optimizer step.
        layers: decoder-layer index of each target layer.
        total_steps: the run's number of optimizer steps.

    Returns:
        ``{"columns": ["10%", ...], "steps": {"10%": [first, last]}, "layers": [...],
        "loss": {"<layer>": [mean or None per column]}, "total_steps", "window"}``; a column
        whose window holds no recorded step is ``None``.
    """
    columns = [f"{round(100 * m)}%" for m in milestones]
    windows = [milestone_window(m, total_steps, window) for m in milestones]
    loss: dict[str, list[float | None]] = {str(layer): [] for layer in layers}
    for first, last in windows:
        inside = [values for step, values in rows if first <= step <= last]
        for k, layer in enumerate(layers):
            loss[str(layer)].append(sum(v[k] for v in inside) / len(inside) if inside else None)
    return {
        "total_steps": total_steps,
        "window": window,
        "columns": columns,
        "steps": {c: list(w) for c, w in zip(columns, windows)},
        "layers": list(layers),
        "loss": loss,
    }


def format_layer_loss_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown, one row per target layer (decoder-layer index)."""
    head = "| target layer | " + " | ".join(table["columns"]) + " |"
    rule = "|---" * (len(table["columns"]) + 1) + "|"
    lines = [head, rule]
    for layer in table["layers"]:
        cells = ["—" if v is None else f"{v:.4f}" for v in table["loss"][str(layer)]]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    steps = ", ".join(f"{c}: steps {a}-{b}" for c, (a, b) in table["steps"].items())
    return ("Verbalization loss per target layer (% = training progress; each column is the mean "
            "over a window of steps around it).\n\n" + "\n".join(lines) + f"\n\nWindows: {steps}.\n")


def write_layer_loss_table(out_dir: Path, log: LayerLossLog, total_steps: int) -> dict[str, Any]:
    table = layer_loss_table(log.rows, log.layers, total_steps)
    write_json_atomic(out_dir / "layer_loss.json", table)
    (out_dir / "layer_loss.md").write_text(format_layer_loss_markdown(table))
    return table


class _LayerLossCallback(TrainerCallback):
    """Closes each optimizer step's row and rewrites the table when a milestone window ends."""

    def __init__(self, log: LayerLossLog, out_dir: Path):
        self.log = log
        self.out_dir = out_dir

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.log.flush(state.global_step)
        window_ends = {milestone_window(m, state.max_steps)[1] for m in MILESTONES}
        if state.global_step in window_ends:
            write_layer_loss_table(self.out_dir, self.log, state.max_steps)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class VerbalizeTrainer(VlsiTrainerMixin, Trainer):
    """Trains a :class:`VerbalizerTrainingModel`; only the loss differs from ``Trainer``.

    The frozen backbone is held beside the trained model, like a reference model
    (:func:`place_frozen_model`: on the device for one process or DDP, an inference-only
    DeepSpeed engine under ZeRO-3, replicated under FSDP), and run under ``no_grad`` in
    :meth:`stage_loss`; its hidden states go into the trained model's forward. Logs ``loss``
    (sum over layers) and ``loss_layer_<idx>``.

    The verbalizers are small (3 d^2 per layer), so DDP or ZeRO-1/2 suit this stage; FSDP would
    need a size-based wrap policy (the wrapper has no ``_no_split_modules``) and is untested.
    """

    # the loss is a per-micro-batch mean: Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, loss_log: LayerLossLog | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.backbone: Backbone = self.model.backbone
        self.backbone_model = place_frozen_model(self, self.backbone.model)
        self.loss_log = loss_log
        self.metrics = MeanMetrics()
        if loss_log is not None:
            self.add_callback(_LayerLossCallback(loss_log, Path(self.args.output_dir)))

    def stage_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bb = self.backbone
        positions = prediction_positions(inputs["labels"])
        with torch.no_grad(), capture_layer_context(bb) as context:
            # logits_to_keep=1: the backbone's own [B, T, V] logits are not needed
            out = self.backbone_model(**bb.model_inputs(inputs), output_hidden_states=True,
                                      use_cache=False, logits_to_keep=1)
        with whole_parameters(self, [bb.final_norm, bb.lm_head]):
            # through the DDP/DeepSpeed/FSDP wrapper, so that gradients are reduced: [t]
            per_layer = model(hidden_states=out.hidden_states, positions=positions,
                              targets=response_targets(inputs["labels"], positions), context=context)
        detached = per_layer.detach().float().cpu()
        for layer, value in zip(self.model.verbalizers.layers, detached.tolist()):
            self.metrics.add(f"loss_layer_{layer}", value)
        if self.loss_log is not None and model.training and self.is_world_process_zero():
            self.loss_log.add(detached)
        loss = per_layer.sum()
        return (loss, {"layer_losses": per_layer}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.metrics.pop_means(self.accelerator))
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run_verbalize(cfg: RunConfig, role: str, out_dir: str | Path, *, resume: bool = False) -> Path:
    """Train the verbalizers of ``cfg.teacher`` or ``cfg.student`` into ``out_dir``.

    Args:
        cfg: the run configuration (``verbalizer``, ``data``, the ``verbalize`` stage settings).
        role: ``"teacher"`` or ``"student"``.
        out_dir: output directory of this role (see the module docstring for its content).
        resume: continue from the newest checkpoint in ``out_dir``; a finished stage
            (``step_complete.json``) returns at once.

    Returns:
        ``out_dir``.

    Raises:
        VlsiError: unknown role, missing model path, ``out_dir`` holding a run without
            ``resume``, bad target layers, unusable data.
    """
    if role not in ROLES:
        raise VlsiError(f"role must be 'teacher' or 'student', got {role!r}")
    out = Path(out_dir)
    if resume and stage_complete(out):
        return out
    model_dir = checkpoint_dir(cfg.teacher if role == "teacher" else cfg.student)
    read_model_type(model_dir)
    resume_from = resume_checkpoint(out, resume)
    tcfg = cfg.stage("verbalize")
    # TrainingArguments before the model: under ZeRO-3 they make from_pretrained shard it.
    args = training_arguments(tcfg, out, gradient_checkpointing=False)
    keep = checkpoint_step(resume_from)
    if args.should_save:
        truncate_jsonl(out / METRICS, keep)
    dataset, collator, _ = load_training_data(cfg.data, model_dir)

    backbone = load_backbone(model_dir, dtype=torch.bfloat16 if args.bf16 else None)
    backbone.model.requires_grad_(False).eval()
    set_seed(tcfg.seed)
    layers = cfg.verbalizer.teacher_layers if role == "teacher" else cfg.verbalizer.student_layers
    # float32 master weights even on a bf16 backbone (mixed precision runs the matmuls in bf16)
    verbalizers = VerbalizerSet(backbone, layers, cfg.verbalizer.architecture).float()
    loss_log = LayerLossLog(out / LAYER_LOSS_STEPS, verbalizers.layers, keep_until=keep) if args.should_save else None

    trainer = VerbalizeTrainer(
        model=VerbalizerTrainingModel(verbalizers),
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=stage_callbacks(out, "verbalize"),
        max_consecutive_nonfinite=tcfg.max_consecutive_nonfinite,
        loss_log=loss_log,
    )
    use_loss_progress_bar(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)

    save_trained_verbalizers(trainer, verbalizers, out)
    if trainer.is_world_process_zero():
        table = write_layer_loss_table(out, loss_log, trainer.state.max_steps)
        write_json_atomic(out / STEP_COMPLETE, {
            "stage": "verbalize",
            "role": role,
            "model": str(model_dir),
            "architecture": verbalizers.architecture,
            "layers": verbalizers.layers,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "final_layer_loss": {layer: values[-1] for layer, values in table["loss"].items()},
            "outputs": ["verbalizers.safetensors", "verbalizers.json", "layer_loss.json", "layer_loss.md"],
            "completed_at": utc_now(),
        })
    trainer.accelerator.wait_for_everyone()
    return out


def save_trained_verbalizers(trainer: Trainer, verbalizers: VerbalizerSet, out: Path) -> None:
    """Save the trained verbalizers; every process must call this.

    Under ZeRO-3 or FSDP the parameters are sharded: accelerate gathers a full state dict (a
    collective; ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save: true`` in the
    DeepSpeed config), which the main process loads into an unsharded copy and saves. Untested
    under DeepSpeed and FSDP.
    """
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        verbalizers.save(out)
        return
    prefix = "verbalizers."
    full = VerbalizerSet(verbalizers.backbone, verbalizers.layers, verbalizers.architecture)
    full.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    full.save(out)
