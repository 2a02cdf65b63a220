"""``vlsi interact``: the interaction step (SPEC "Step 2 — interaction", paper Algorithm 1).

The student's language model learns, through LoRA (r=64, alpha=64 on its linear layers), to make
its verbalized layers match the teacher's. Per micro-batch:

1. student forward (with grad) and teacher forward (frozen, ``eval()``, ``no_grad``) on the same
   inputs, with all hidden states;
2. both sides' response positions (:func:`prediction_positions`) are gathered per target layer
   (:meth:`VerbalizerSet.response_inputs`);
3. :func:`vlsi.interaction.interaction_loss` scores ``KLD[i, j]``, selects pairs with the
   configured matching strategy and returns ``sum W[i, j] OP(P_j, Q_i) + LL(last layers)``, in two
   chunked passes whose memory does not grow with the number of response tokens.

No next-token loss in this step. Teacher, both verbalizer sets, the student's vision encoder,
projector, final norm and LM head are frozen; only the LoRA weights train.

The teacher sits beside the trained model, the way TRL's GKD trainer holds its teacher
(:func:`vlsi.stages.common.place_frozen_model`: on the device; an inference-only DeepSpeed
engine under ZeRO-3; ``prepare_model(evaluation_mode=True)`` under FSDP). The LM heads and final
norms that the chunked loss calls after the forwards are gathered for the loss's duration under
ZeRO-3/FSDP (:func:`vlsi.stages.common.whole_parameters`); the loss computes its gradient
w.r.t. the student hidden states inside that window, so nothing is gathered in ``backward``.
The DeepSpeed and FSDP paths are UNTESTED (no DeepSpeed install, no multi-GPU machine here).

Matching is random (``vlsi`` samples); its generator is seeded from (training seed, optimizer
step, micro-step, process) by :func:`matching_seed`, so a resumed run draws the same pairs as
an uninterrupted one (given the same model state). The main process appends every selection to
``matches.jsonl``; on resume the lines after the checkpoint are dropped and the rest replayed
into the :class:`~vlsi.recorder.MatchRecorder`, so no history is lost or doubled.

Outputs in ``OUT``: ``adapter/`` (the LoRA adapter, PEFT ``save_pretrained``), ``matches.json``
(:meth:`MatchRecorder.to_json`), ``matches.jsonl``, ``heatmap_start.{png,json}`` and
``heatmap_end.{png,json}`` (paper Fig. 5: pairs selected in the first and last 10% of steps),
``metrics.jsonl`` and TensorBoard logs (``loss``, ``interaction_loss``, ``last_layer_loss``,
``mean_kld``, ``matched_kld``, ``matching_entropy/<i>``: the entropy in nats of the distribution
student target layer ``i``'s pair was drawn from), ``checkpoint-N/``, and ``step_complete.json`` last.

Run: ``run_interact(cfg, OUT, teacher_verbalizers=T_DIR, student_verbalizers=S_DIR)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, set_seed

from vlsi.backbones import Backbone, checkpoint_dir, load_backbone, load_tokenizer, read_model_type
from vlsi.config import InteractionConfig, RunConfig
from vlsi.errors import VlsiError
from vlsi.heatmap import save_heatmap
from vlsi.interaction import interaction_loss
from vlsi.recorder import MatchRecorder
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
    write_text_atomic,
)
from vlsi.verbalizer import CONFIG_NAME, WEIGHTS_NAME, VerbalizerSet, capture_layer_context, prediction_positions
from vlsi.vocab import check_tokenizers, shared_vocab_size

MATCHES_LOG = "matches.jsonl"
HEATMAP_FRACTION = 0.1  # Fig. 5: the first and the last 10% of the recorded steps


def matching_seed(seed: int, step: int, micro_step: int, process: int = 0) -> int:
    """Seed of the matching generator for one micro-batch.

    A hash of (training seed, optimizer step, micro-step within the step, process index):
    independent of how the run got there, so a resumed run reproduces the draws of an
    uninterrupted one, and different processes draw independently.
    """
    digest = hashlib.sha256(f"vlsi-matching:{seed}:{step}:{micro_step}:{process}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MatchLog:
    """A :class:`MatchRecorder` whose updates are also appended to ``matches.jsonl``.

    One line per update: ``{"step": 3, "pairs": [i * t_l + j, ...]}``. Opening it keeps the lines
    with ``step <= keep_until`` (the resumed checkpoint's step; 0 for a fresh run) and replays
    them into the recorder.
    """

    def __init__(self, path: str | Path, recorder: MatchRecorder, *, keep_until: int = 0):
        self.path = Path(path)
        self.recorder = recorder
        kept = [r for r in read_jsonl(self.path) if r["step"] <= keep_until]
        recorder.history = [(int(r["step"]), [int(x) for x in r["pairs"]]) for r in kept]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def add(self, weights: Tensor, step: int) -> None:
        """Record the pairs with weight > 0 in ``weights`` ``[t_s, t_l]`` at optimizer ``step``."""
        self.recorder.update(weights, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "pairs": self.recorder.history[-1][1]}) + "\n")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class InteractTrainer(VlsiTrainerMixin, Trainer):
    """Trains the student's LoRA weights with the interaction loss; holds the frozen teacher.

    ``model`` is the student ``PeftModel``. The verbalizer sets are frozen, not submodules of
    it (replicated on every device, never in checkpoints); the student's is attached to the
    student backbone, the teacher's to the teacher backbone.

    Args:
        teacher_verbalizers: attached to the teacher :class:`Backbone` (whose model is placed
            by :func:`place_frozen_model`).
        student_verbalizers: attached to the student backbone inside ``model``.
        interaction: strategy, matching arguments, ops, divergence, chunk size.
        vocab_size: shared vocabulary ``V`` (:func:`shared_vocab_size`).
        match_log: where the main process records the selected pairs (``None`` elsewhere).
    """

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean

    def __init__(
        self,
        *args: Any,
        teacher_verbalizers: VerbalizerSet,
        student_verbalizers: VerbalizerSet,
        interaction: InteractionConfig,
        vocab_size: int,
        match_log: MatchLog | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher: Backbone = teacher_verbalizers.backbone
        self.student: Backbone = student_verbalizers.backbone
        self.teacher_model = place_frozen_model(self, self.teacher.model)
        self.teacher_verbalizers = teacher_verbalizers.requires_grad_(False).eval().to(self.args.device)
        self.student_verbalizers = student_verbalizers.requires_grad_(False).eval().to(self.args.device)
        self.interaction = interaction
        self.vocab_size = vocab_size
        self.match_log = match_log
        self.metrics = MeanMetrics()
        self._micro = (-1, 0)  # (optimizer step, micro-step within it)

    def _matching_generator(self) -> torch.Generator:
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        seed = matching_seed(self.args.seed, step, micro, self.args.process_index)
        return torch.Generator().manual_seed(seed)

    def stage_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = prediction_positions(inputs["labels"])
        # logits_to_keep=1: the models' own [B, T, V] logits are not needed (the chunked loss
        # recomputes the last layer's logits at response positions only)
        forward_kwargs = dict(output_hidden_states=True, use_cache=False, logits_to_keep=1)
        with capture_layer_context(self.student) as s_ctx:
            s_out = model(**self.student.model_inputs(inputs), **forward_kwargs)
        with torch.no_grad(), capture_layer_context(self.teacher) as t_ctx:
            t_out = self.teacher_model(**self.teacher.model_inputs(inputs), **forward_kwargs)
            t_stack, t_fn = self.teacher_verbalizers.response_inputs(t_out.hidden_states, positions, t_ctx)
        s_stack, s_fn = self.student_verbalizers.response_inputs(s_out.hidden_states, positions, s_ctx)

        cfg = self.interaction
        heads = [self.student.final_norm, self.student.lm_head, self.teacher.final_norm, self.teacher.lm_head]
        with whole_parameters(self, heads, fsdp_root=model):
            result = interaction_loss(
                s_stack, t_stack, s_fn, t_fn,
                vocab_size=self.vocab_size,
                strategy=cfg.strategy,
                intermediate_op=cfg.intermediate_op,
                last_op=cfg.last_op,
                divergence=cfg.divergence,
                chunk_size=cfg.chunk_size,
                generator=self._matching_generator() if model.training else None,
                matching_kwargs=dict(scale=cfg.scale, eps=cfg.eps, k=cfg.k, temperature=cfg.temperature,
                                     temperature_rule=cfg.temperature_rule),
            )
        if model.training:
            self._record(result)
        return (result.loss, s_out) if return_outputs else result.loss

    def _record(self, result) -> None:
        """Log the loss terms and (main process) the selected pairs of this micro-batch."""
        kld, weights = result.kld.detach().float().cpu(), result.weights.detach().float().cpu()
        selected, scored = weights > 0, torch.isfinite(kld)
        self.metrics.add("interaction_loss", float(result.loss.detach()))
        self.metrics.add("last_layer_loss", result.last_loss)
        # NaN (skipped when averaged) where nothing was scored, e.g. the `random` strategy
        self.metrics.add("mean_kld", float(kld[scored].mean()) if scored.any() else math.nan)
        self.metrics.add("matched_kld", float(kld[selected].mean()) if selected.any() else math.nan)
        for i, entropy in enumerate(result.matching_entropy.tolist()):
            self.metrics.add(f"matching_entropy/{i}", entropy)
        if self.match_log is not None and self.is_world_process_zero():
            # the optimizer step this micro-batch contributes to (1-based, as checkpoints count)
            self.match_log.add(weights, self.state.global_step + 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.metrics.pop_means(self.accelerator))
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------
# Checks before training (each a one-line VlsiError)
# ---------------------------------------------------------------------------------------------


def verbalizer_layers(path: str | Path, role: str) -> list[int]:
    """Target layers saved in ``path/verbalizers.json``; missing files are a one-line error."""
    d = Path(path)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise VlsiError(f"{role} verbalizers not found: {d} has no {CONFIG_NAME} + {WEIGHTS_NAME} "
                        f"(run `vlsi verbalize CONFIG --role {role}` first)")
    try:
        return [int(i) for i in json.loads((d / CONFIG_NAME).read_text())["layers"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise VlsiError(f"{d / CONFIG_NAME}: cannot read the target layers ({err})") from None


def check_layer_counts(student_layers: list[int], teacher_layers: list[int]) -> None:
    """``t_s <= t_l``: every student target layer needs its own teacher layer."""
    if len(student_layers) > len(teacher_layers):
        raise VlsiError(
            f"the student has more target layers than the teacher (t_s={len(student_layers)} "
            f"{student_layers} > t_l={len(teacher_layers)} {teacher_layers}); matching needs t_s <= t_l"
        )


def check_configured_layers(configured: list[int] | None, saved: list[int], role: str) -> None:
    """Explicit ``verbalizer.<role>_layers`` must be the layers the verbalizers were trained on."""
    if configured is not None and sorted(configured) != sorted(saved):
        raise VlsiError(f"verbalizer.{role}_layers {sorted(configured)} differ from the layers of the "
                        f"{role} verbalizers {saved}; retrain them or fix the config")


def head_rows(model_dir: Path) -> int:
    """LM-head rows of a checkpoint, from its config (no weights loaded)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config().vocab_size)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters; under ZeRO-3 a partitioned parameter's full size is ``ds_numel``."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def check_student_not_larger(teacher: Backbone, student: Backbone) -> None:
    """The student must not have more parameters than the teacher (whole model, vision included).

    Parameter counts rather than ``num_layers * hidden_size``: the width enters a layer's size
    squared, and the count is exact for every family.
    """
    t, s = parameter_count(teacher.model), parameter_count(student.model)
    if s > t:
        raise VlsiError(f"the student ({s:,} parameters) is larger than the teacher ({t:,}); "
                        "are teacher and student swapped?")


def check_same_family(teacher_type: str, student_type: str) -> None:
    """Both models receive the same inputs, so their image placeholders and processors must agree."""
    if teacher_type != student_type:
        raise VlsiError(f"teacher ({teacher_type}) and student ({student_type}) are different model "
                        "families; the interaction step feeds both the same inputs")


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def load_verbalizers(path: str | Path, backbone: Backbone) -> VerbalizerSet:
    """:meth:`VerbalizerSet.load` (fit check included), with real weights on every process.

    Under FSDP with RAM-efficient loading, all processes but the first hold the backbone on the
    meta device until FSDP broadcasts it, and a new verbalizer set follows the LM head there; the
    verbalizers are then read again from their file (UNTESTED: no multi-GPU machine here).
    """
    from safetensors.torch import load_file

    vset = VerbalizerSet.load(path, backbone)
    if any(p.is_meta for p in vset.parameters()):
        vset.load_state_dict(load_file(str(Path(path) / WEIGHTS_NAME)), assign=True)
        vset.to(dtype=backbone.lm_head.weight.dtype)
    return vset


def build_student(student: Backbone, cfg: RunConfig) -> nn.Module:
    """The student ``PeftModel``: LoRA on the language model's linear layers, all else frozen."""
    from peft import LoraConfig, get_peft_model

    student.model.requires_grad_(False)  # vision, projector, norms, head: frozen (LoRA adds its own)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=student.lora_target_modules, bias="none")
    return get_peft_model(student.model, lora)


def run_interact(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    teacher_verbalizers: str | Path,
    student_verbalizers: str | Path,
    resume: bool = False,
) -> Path:
    """Train the student's LoRA adapter with the interaction loss into ``out_dir``.

    Args:
        cfg: run configuration (``interaction``, ``lora``, ``data``, the ``interact`` settings).
        out_dir: output directory (see the module docstring for its content).
        teacher_verbalizers, student_verbalizers: directories written by ``run_verbalize``.
        resume: continue from the newest checkpoint in ``out_dir``; a finished stage returns.

    Returns:
        ``out_dir``.

    Raises:
        VlsiError: missing model or verbalizer paths, teacher and student of different
            families, tokenizers that disagree on the shared vocabulary, ``t_s > t_l``,
            configured layers that differ from the verbalizers', a student larger than the
            teacher, verbalizers that do not fit their backbone, ``out_dir`` holding a run
            without ``resume``.
    """
    out = Path(out_dir)
    if resume and stage_complete(out):
        return out
    # Cheap checks first: no model weights are loaded until all of these pass.
    teacher_dir, student_dir = checkpoint_dir(cfg.teacher), checkpoint_dir(cfg.student)
    check_same_family(read_model_type(teacher_dir), read_model_type(student_dir))
    t_layers = verbalizer_layers(teacher_verbalizers, "teacher")
    s_layers = verbalizer_layers(student_verbalizers, "student")
    check_configured_layers(cfg.verbalizer.teacher_layers, t_layers, "teacher")
    check_configured_layers(cfg.verbalizer.student_layers, s_layers, "student")
    check_layer_counts(s_layers, t_layers)
    vocab = shared_vocab_size(head_rows(teacher_dir), head_rows(student_dir))
    check_tokenizers(load_tokenizer(teacher_dir), load_tokenizer(student_dir), vocab)
    resume_from = resume_checkpoint(out, resume)

    tcfg = cfg.stage("interact")
    args = training_arguments(tcfg, out)  # before the models: under ZeRO-3 they are sharded at load
    keep = checkpoint_step(resume_from)
    if args.should_save:
        truncate_jsonl(out / METRICS, keep)
    dataset, collator, _ = load_training_data(cfg.data, student_dir)
    dtype = torch.bfloat16 if args.bf16 else None
    teacher = load_backbone(teacher_dir, dtype=dtype)
    student = load_backbone(student_dir, dtype=dtype)
    check_student_not_larger(teacher, student)
    t_verb = load_verbalizers(teacher_verbalizers, teacher)  # refuses verbalizers that do not fit
    s_verb = load_verbalizers(student_verbalizers, student)

    teacher.model.requires_grad_(False).eval()
    set_seed(tcfg.seed)  # LoRA A matrices are drawn now
    peft_model = build_student(student, cfg)
    recorder = MatchRecorder(len(s_layers), len(t_layers), student_layers=s_verb.layers,
                             teacher_layers=t_verb.layers, strategy=cfg.interaction.strategy)
    match_log = MatchLog(out / MATCHES_LOG, recorder, keep_until=keep) if args.should_save else None

    trainer = InteractTrainer(
        model=peft_model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=stage_callbacks(out, "interact"),
        max_consecutive_nonfinite=tcfg.max_consecutive_nonfinite,
        teacher_verbalizers=t_verb,
        student_verbalizers=s_verb,
        interaction=cfg.interaction,
        vocab_size=vocab,
        match_log=match_log,
    )
    use_loss_progress_bar(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)

    trainer.save_model(str(out / "adapter"))  # PEFT save_pretrained; gathers under ZeRO-3/FSDP
    if trainer.is_world_process_zero():
        recorder.to_json(out / "matches.json")
        write_heatmaps(out, recorder)
        write_json_atomic(out / STEP_COMPLETE, {
            "stage": "interact",
            "teacher": str(teacher_dir),
            "student": str(student_dir),
            "teacher_verbalizers": str(teacher_verbalizers),
            "student_verbalizers": str(student_verbalizers),
            "strategy": cfg.interaction.strategy,
            "student_layers": s_verb.layers,
            "teacher_layers": t_verb.layers,
            "shared_vocab": vocab,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "matches_recorded": recorder.num_updates,
            "outputs": ["adapter", "matches.json", "heatmap_start.png", "heatmap_end.png"],
            "completed_at": utc_now(),
        })
    trainer.accelerator.wait_for_everyone()
    return out


def write_heatmaps(out: Path, recorder: MatchRecorder, fraction: float = HEATMAP_FRACTION) -> None:
    """``heatmap_start`` and ``heatmap_end`` (PNG + JSON): pairs chosen in the first/last steps."""
    steps = sorted({step for step, _ in recorder.history})
    keep = max(1, math.ceil(fraction * len(steps)))
    percent = f"{round(100 * fraction)}%"
    parts = (("start", "first", {"first_fraction": fraction}, steps[:keep]),
             ("end", "last", {"last_fraction": fraction}, steps[-keep:]))
    for name, word, selection, window in parts:
        counts = recorder.counts(**selection) if steps else torch.zeros(recorder.t_s, recorder.t_l, dtype=torch.int64)
        span = f"steps {window[0]}-{window[-1]}" if window else "no steps"
        save_heatmap(
            out / f"heatmap_{name}.png", counts,
            recorder.student_layers or list(range(recorder.t_s)),
            recorder.teacher_layers or list(range(recorder.t_l)),
            title=f"matched layers, {word} {percent} of steps ({span})",
            steps=[window[0], window[-1]] if window else None,
            strategy=recorder.strategy,
            student_layers=recorder.student_layers,
            teacher_layers=recorder.teacher_layers,
        )
