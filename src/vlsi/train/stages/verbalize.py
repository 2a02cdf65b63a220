"""``vlsi verbalize``: train the verbalizers of one backbone (docs/method.md#verbalization).

    vlsi verbalize CONFIG --role {teacher,student} [--out DIR] [--resume]

Run once for the teacher and once for the student. The backbone is frozen and runs under
``torch.no_grad()`` (no backbone activation is kept for backward); each target layer's
verbalizer is trained with next-token cross-entropy on response tokens against the ground-truth
response, and the loss is the sum over layers (the layers' gradients are independent)::

    loss_l = mean_n CE(lm_head(final_norm(T_l(h_l[n]))), y[n])      h_l[n] in R^d, y[n] a token id

The softmax runs over the backbone's own LM-head rows (all of them), the next-token
distribution the backbone's own loss uses; the cut to the shared vocabulary happens only when
teacher and student are compared (interaction step). The head runs chunk by chunk
(:func:`vlsi.method.losses.chunked_head_ce`), so the loss holds one ``[chunk, V]`` block of logits.

Outputs in ``OUT`` (one directory per role): ``verbalizers.safetensors`` + ``verbalizers.json``;
``layer_loss.json`` / ``.md`` and ``layer_loss_steps.jsonl`` (:mod:`vlsi.train.layer_loss`, the
paper's appendix B); ``metrics.jsonl`` and TensorBoard logs (``loss``, ``loss_layer_<idx>``);
``checkpoint-N/`` (verbalizer weights only); ``fingerprint.json``; ``step_complete.json``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, set_seed

from vlsi.errors import VlsiError
from vlsi.method.losses import CE_CHUNK_TOKENS, chunked_head_ce
from vlsi.method.verbalizer import (LayerContext, VerbalizerSet, capture_hidden_states, capture_layer_context,
                                    gather_positions, position_index, prediction_positions)
from vlsi.models.backbones import Backbone, load_backbone
from vlsi.train.config import RunConfig
from vlsi.train.distributed import (deepspeed_without_engine, describe_footprint, full_parameters,
                                    place_frozen_model, vision_on_every_process, whole_parameters)
from vlsi.train.fingerprint import step_inputs
from vlsi.train.layer_loss import LAYER_LOSS_STEPS, LayerLossCallback, LayerLossLog, write_layer_loss_table
from vlsi.train.preflight import check_gpu_memory, gpu_memory
from vlsi.train.resolved import ResolvedRun, resolve_run
from vlsi.train.stages.callbacks import MeanMetrics
from vlsi.train.stages.run import Stage, VlsiTrainerMixin, run_stage

ROLES = ("teacher", "student")


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

    def __init__(self, verbalizers: VerbalizerSet, chunk_size: int = CE_CHUNK_TOKENS,
                 checkpoint_transforms: bool = False):
        super().__init__()
        self.verbalizers = verbalizers
        self.chunk_size = chunk_size
        # recompute each transform in the backward: only its input [N, d] is kept per layer,
        # not its inner activations (5 [N, d] for verb-FFN)
        self.checkpoint_transforms = checkpoint_transforms

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
            hidden_states: the backbone's hidden states indexed as ``output_hidden_states`` is
                (``[l + 1]`` = decoder layer ``l``, ``[B, T, d]``): that tuple, or the target
                layers' alone (:func:`vlsi.method.verbalizer.capture_hidden_states`).
            positions: bool ``[B, T]`` (:func:`vlsi.method.verbalizer.prediction_positions`), ``N`` of them true.
            targets: ``[N]`` next-token ids of those positions (:func:`response_targets`).
            context: the backbone's layer context (``decoder`` verbalizers only).

        Returns:
            float32 ``[t]``, one mean loss per target layer (0 when ``N == 0``).
        """
        index = position_index(positions)  # one host sync per micro-batch, not one per layer
        n = max(index.numel(), 1)
        losses = []
        for k, layer in enumerate(self.verbalizers.layers):
            y = self._verbalized(k, hidden_states[layer + 1], index, context)
            losses.append(chunked_head_ce(y, targets, self._head, self.chunk_size) / n)
        return torch.stack(losses)

    def _verbalized(self, k: int, hidden: Tensor, index: Tensor, context: LayerContext | None) -> Tensor:
        """``T_k`` applied to the response positions (``index``, :func:`vlsi.method.verbalizer.position_index`):
        ``[B, T, d]`` -> ``[N, d]``.

        The verbalizers may be float32 master weights on a bf16 backbone: cast the input.
        """
        vset = self.verbalizers
        dtype = next(vset.verbalizers[k].parameters()).dtype
        transform = vset.transform
        if self.checkpoint_transforms and torch.is_grad_enabled():
            transform = partial(checkpoint, vset.transform, use_reentrant=False)
        if vset.verbalizers[k].token_wise:
            return transform(k, gather_positions(hidden, index).to(dtype))
        return gather_positions(transform(k, hidden.to(dtype), context), index)

    def _head(self, y: Tensor) -> Tensor:
        """Backbone's final norm + LM head on ``[n, d]`` in the head's dtype -> ``[n, V_rows]``."""
        return self.verbalizers.head(y.to(self.backbone.lm_head.weight.dtype))


class VerbalizeTrainer(VlsiTrainerMixin, Trainer):
    """Trains a :class:`VerbalizerTrainingModel`; only ``compute_loss`` differs from ``Trainer``.

    The frozen backbone is held beside the trained model, like a reference model
    (:func:`vlsi.train.distributed.place_frozen_model`), and run under ``no_grad`` in
    :meth:`compute_loss`; its hidden states go into the trained model's forward. Logs ``loss``
    (sum over layers) and ``loss_layer_<idx>``. Under DDP or ZeRO-1/2 every process holds the
    whole backbone and the verbalizers' optimizer states (16 bytes a parameter, 3 d^2 per
    layer): fine for a 2B/7B backbone, not for a 72B teacher, which needs ZeRO-3 or FSDP2
    (``vlsi plan`` says which fits; the stage refuses, before loading, what does not).
    """

    stage = "verbalize"
    # the loss is a per-micro-batch mean: Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, loss_log: LayerLossLog | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.backbone: Backbone = self.model.backbone
        if self.is_fsdp_enabled:
            # the trained model holds only verbalizers: one FSDP unit (the root), whatever block
            # classes the plugin names for the backbones
            self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = []
        self.backbone_model = place_frozen_model(self, self.backbone.model)
        if self.is_world_process_zero():
            print(describe_footprint("backbone", self.backbone.model, self), flush=True)
        self.loss_log = loss_log
        self.metrics = MeanMetrics()
        if loss_log is not None:
            self.add_callback(LayerLossCallback(loss_log, Path(self.args.output_dir)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bb = self.backbone
        positions = prediction_positions(inputs["labels"])
        with torch.no_grad(), capture_layer_context(bb) as context, vision_on_every_process(self, bb, inputs), \
                capture_hidden_states(bb, self.model.verbalizers.layers) as states:
            # logits_to_keep=1: the backbone's own [B, T, V] logits are not needed; only the
            # target layers' hidden states are kept
            self.backbone_model(**bb.model_inputs(inputs), use_cache=False, logits_to_keep=1)
        with whole_parameters(self, [bb.final_norm, bb.lm_head], fsdp_roots=(self.backbone_model,)):
            # through the DDP/DeepSpeed/FSDP wrapper, so that gradients are reduced: [t]
            per_layer = model(hidden_states=states, positions=positions,
                              targets=response_targets(inputs["labels"], positions), context=context)
        detached = per_layer.detach().float().cpu()
        for layer, value in zip(self.model.verbalizers.layers, detached.tolist()):
            self.metrics.add(f"loss_layer_{layer}", value)
        if self.loss_log is not None and model.training and self.is_world_process_zero():
            self.loss_log.add(detached)
        loss = self.finite_or_skipped(model, per_layer.sum())
        return (loss, {"layer_losses": per_layer}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.metrics.pop_means(self.accelerator))
        super().log(logs, start_time)


def run_verbalize(run: RunConfig | ResolvedRun, role: str, out_dir: str | Path, *, resume: bool = False,
                  restart: bool = False) -> Path:
    """Train the verbalizers of the run's teacher or student into ``out_dir``.

    Args:
        run: the run (``verbalizer``, ``data``, the ``verbalize`` stage settings); a
            :class:`~vlsi.train.config.RunConfig` is resolved here (:func:`vlsi.train.resolved.resolve_run`).
        role: ``"teacher"`` or ``"student"``.
        out_dir: the step directory (see the module docstring for its content).
        resume: continue from the newest checkpoint; a finished step returns at once.
        restart: redo a step whose recorded inputs differ (else that is an error).

    Raises:
        VlsiError: unknown role, missing model path, a directory of other inputs, a directory
            holding a run without ``resume``, bad target layers, unusable data.
    """
    if role not in ROLES:
        raise VlsiError(f"role must be 'teacher' or 'student', got {role!r}")
    run = resolve_run(run)
    cfg = run.cfg
    out = Path(out_dir)
    model_dir = run.model_dir(role)
    layers = run.configured_layers(role)
    parts: dict[str, Any] = {}

    def build(args, dataset, collator, resumed_step: int) -> Trainer:
        if gpu_memory(args) is not None:  # before the backbone loads: refuse what cannot fit
            shape = run.plan_shape(role)
            check_gpu_memory(cfg, (f"{role}-verbalize",), *((shape, None) if role == "teacher" else (None, shape)), args)
        backbone = load_backbone(model_dir, dtype=torch.bfloat16 if args.bf16 else None,
                                 attn_implementation=cfg.attn_implementation)
        backbone.model.requires_grad_(False).eval()
        set_seed(cfg.stage("verbalize").seed)
        # float32 master weights even on a bf16 backbone (mixed precision runs the matmuls in bf16)
        parts["verbalizers"] = VerbalizerSet(backbone, layers, cfg.verbalizer.architecture).float()
        parts["log"] = (LayerLossLog(out / LAYER_LOSS_STEPS, parts["verbalizers"].layers,
                                     keep_until=resumed_step) if args.should_save else None)
        model = VerbalizerTrainingModel(parts["verbalizers"],
                                        checkpoint_transforms=cfg.stage("verbalize").gradient_checkpointing)
        return VerbalizeTrainer(model=model, args=args,
                                train_dataset=dataset, data_collator=collator,
                                max_consecutive_nonfinite=cfg.stage("verbalize").max_consecutive_nonfinite,
                                loss_log=parts["log"])

    def restore(trainer: Trainer, checkpoint: Path) -> None:
        trainer.model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))

    def outputs(trainer: Trainer) -> dict[str, Any]:
        verbalizers = parts["verbalizers"]
        save_trained_verbalizers(trainer, verbalizers, out)
        summary: dict[str, Any] = {"role": role, "model": str(model_dir),
                                   "architecture": verbalizers.architecture, "layers": verbalizers.layers,
                                   "outputs": ["verbalizers.safetensors", "verbalizers.json",
                                               "layer_loss.json", "layer_loss.md"]}
        if trainer.is_world_process_zero():
            table = write_layer_loss_table(out, parts["log"], trainer.state.max_steps)
            summary["final_layer_loss"] = {layer: values[-1] for layer, values in table["loss"].items()}
        return summary

    stage = Stage("verbalize", f"{role}-verbalize", out, step_inputs(run, f"{role}-verbalize"),
                  model_dir, build, restore, outputs, gradient_checkpointing=False)
    return run_stage(stage, run, resume=resume, restart=restart)


def save_trained_verbalizers(trainer: Trainer, verbalizers: VerbalizerSet, out: Path) -> None:
    """Save the trained verbalizers; every process must call this.

    Under ZeRO-3 or FSDP2 the parameters are sharded and gathered whole first (accelerate's
    ``get_state_dict`` through the DeepSpeed engine, which under ZeRO-3 needs
    ``stage3_gather_16bit_weights_on_model_save: true``; :func:`vlsi.train.distributed.full_parameters`
    under FSDP2 and where weights restored from a finished checkpoint have no engine), a
    collective; the main process loads them into an unsharded copy and saves it.
    """
    if trainer.is_fsdp_enabled or deepspeed_without_engine(trainer):
        state = full_parameters(trainer.accelerator.unwrap_model(trainer.model))
    else:
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
