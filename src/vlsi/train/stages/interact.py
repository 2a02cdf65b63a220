"""``vlsi interact``: the interaction step (docs/method.md#interaction, paper Algorithm 1).

    vlsi interact CONFIG [--teacher-verbalizers DIR] [--student-verbalizers DIR] [--teacher-cache DIR]
                         [--out DIR] [--resume]

The student's language model learns, through LoRA (:mod:`vlsi.train.lora`), to make its verbalized
layers match the teacher's. Per micro-batch:

1. student forward (with grad) and teacher forward (frozen, ``eval()``, ``no_grad``) on the same
   inputs, with all hidden states;
2. both sides' response positions are gathered per target layer
   (:meth:`VerbalizerSet.response_inputs`);
3. :func:`vlsi.method.interaction.interaction_loss` scores ``KLD[i, j]``, selects pairs with the
   configured matching strategy and returns ``sum W[i, j] OP(P_j, Q_i) + LL(last layers)``, in two
   chunked passes whose memory does not grow with the number of response tokens. With a ``ce``
   op the ground-truth next tokens of the response positions (:func:`vlsi.method.verbalizer.response_labels`)
   are passed as its labels.

No next-token loss in this step. Teacher, both verbalizer sets, the student's vision encoder,
projector, final norm and LM head are frozen; only the LoRA weights train. The teacher sits
beside the trained model (:func:`vlsi.train.distributed.place_frozen_model`); the heads and norms
the chunked loss calls after the forwards are gathered for its duration under ZeRO-3/FSDP
(:func:`vlsi.train.distributed.whole_parameters`).

Matching is random (``vlsi`` samples); its generator is seeded from (training seed, optimizer
step, micro-batch number across processes) by
:func:`vlsi.train.stages.interact_draws.matching_seed`, so a resumed run draws the same pairs as an uninterrupted
one, and N processes draw what one process accumulating N micro-batches draws. With a teacher
cache no teacher loads (:mod:`vlsi.train.stages.interact_cache`); on-policy micro-batches:
:mod:`vlsi.train.stages.interact_on_policy`. The main process appends every selection to ``matches.jsonl``
(:class:`vlsi.train.recorder.MatchLog`; on resume the lines after the checkpoint are dropped).

Outputs in ``OUT``: ``adapter/`` (the LoRA adapter), ``matches.json``, ``matches.jsonl``,
``heatmap_start.{png,json}`` and ``heatmap_end.{png,json}`` (paper Fig. 5), ``metrics.jsonl``
and TensorBoard logs (``loss``, ``interaction_loss``, ``last_layer_loss``, ``mean_kld``,
``matched_kld``, ``matching_entropy/<i>``: the entropy in nats of the distribution student
target layer ``i``'s pair was drawn from; ``seconds/student_forward``, ``seconds/teacher_forward``
(with the teacher's verbalizer inputs; from a cache, only moving the collated top-K to the
device), ``seconds/scoring_pass``, ``seconds/gradient_pass`` and ``seconds/student_backward``:
where a micro-batch's time goes, means over the logging window; on a GPU each clock read waits
for the device, :mod:`vlsi.train.stages.interact_timing`), ``checkpoint-N/``, ``fingerprint.json`` and
``step_complete.json`` last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer

from vlsi.method.interaction import interaction_loss
from vlsi.method.on_policy import GenerationLog, longest_response
from vlsi.method.verbalizer import (VerbalizerSet, capture_hidden_states, capture_layer_context, prediction_positions,
                                   response_labels)
from vlsi.models.backbones import Backbone, load_backbone, load_tokenizer
from vlsi.train.config import InteractionConfig, RunConfig
from vlsi.train.distributed import (describe_footprint, load_verbalizers, place_frozen_model, place_frozen_verbalizers,
                                    vision_on_every_process, whole_parameters)
from vlsi.train.fingerprint import directory_identity, step_inputs
from vlsi.train.heatmap import save_match_heatmaps
from vlsi.train.lora import save_adapter, with_lora
from vlsi.train.preflight import Preflight, check_run
from vlsi.train.recorder import MatchLog, MatchRecorder
from vlsi.train.resolved import ResolvedRun, resolve_run
from vlsi.train.stages import interact_cache
from vlsi.train.stages.callbacks import MeanMetrics
from vlsi.train.stages.interact_draws import MicroBatchDraws
from vlsi.train.stages.interact_on_policy import OnPolicyInputs
from vlsi.train.stages.interact_timing import MicroBatchTiming
from vlsi.train.stages.run import Stage, VlsiTrainerMixin, run_stage
from vlsi.train.teacher_cache import TeacherCache

MATCHES_LOG = "matches.jsonl"
GENERATIONS_LOG = "generations.jsonl"  # on-policy micro-batches: the first responses of each logging window
ADAPTER_DIR = "adapter"


class InteractTrainer(MicroBatchTiming, MicroBatchDraws, OnPolicyInputs, VlsiTrainerMixin, Trainer):
    """Trains the student's LoRA weights with the interaction loss; holds the frozen teacher.

    ``model`` is the student ``PeftModel``. The verbalizer sets are frozen, not submodules of
    it (replicated on every device, never in checkpoints); the student's is attached to the
    student backbone, the teacher's to the teacher backbone. The mixins time the micro-batch
    (:mod:`~vlsi.train.stages.interact_timing`), number it for the seeded draws
    (:mod:`~vlsi.train.stages.interact_draws`) and make on-policy batches
    (:mod:`~vlsi.train.stages.interact_on_policy`).

    Args:
        teacher_verbalizers: attached to the teacher :class:`Backbone` (whose model is placed
            by :func:`vlsi.train.distributed.place_frozen_model`).
        student_verbalizers: attached to the student backbone inside ``model``.
        interaction: strategy, matching arguments, ops, divergence, chunk size.
        vocab_size: shared vocabulary ``V`` (:func:`vlsi.method.vocab.shared_vocab_size`).
        match_log: where the main process records the selected pairs (``None`` elsewhere).
    """

    stage = "interact"
    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean

    def __init__(
        self,
        *args: Any,
        teacher_verbalizers: VerbalizerSet | None,
        student_verbalizers: VerbalizerSet,
        interaction: InteractionConfig,
        vocab_size: int,
        match_log: MatchLog | None = None,
        teacher_cache: TeacherCache | None = None,
        tokenizer: Any = None,
        max_new_tokens: int | None = None,
        generation_log: GenerationLog | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.student: Backbone = student_verbalizers.backbone
        self.teacher_cache = teacher_cache
        self.teacher = self.teacher_model = self.teacher_verbalizers = None
        if teacher_cache is None:
            self.teacher = teacher_verbalizers.backbone
            self.teacher_model = place_frozen_model(self, self.teacher.model)
            if self.is_world_process_zero():
                print(describe_footprint("teacher", self.teacher.model, self), flush=True)
            self.teacher_verbalizers = place_frozen_verbalizers(self, teacher_verbalizers)
            if self.is_world_process_zero():
                print(describe_footprint("teacher verbalizers", self.teacher_verbalizers, self), flush=True)
        elif self.is_world_process_zero():
            print(interact_cache.describe(teacher_cache), flush=True)
        self.student_verbalizers = student_verbalizers.requires_grad_(False).eval().to(self.args.device)
        self.interaction = interaction
        self.vocab_size = vocab_size
        self.match_log = match_log
        self.metrics = MeanMetrics()
        self.init_on_policy(tokenizer, max_new_tokens, generation_log)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        entered = self.clock()
        interact_cache.check_batch(inputs)  # the collator could not read the teacher cache
        if model.training:
            self.advance_draw()
            if self.interaction.on_policy > 0:
                inputs = self.on_policy_inputs(model, inputs)
        positions = prediction_positions(inputs["labels"])
        clock = self.clock()
        # logits_to_keep=1: the models' own [B, T, V] logits are not needed (the chunked loss
        # recomputes the last layer's logits at response positions only). The student's
        # forward keeps all its hidden states (autograd keeps them for the backward anyway);
        # the teacher's no-grad forward only its target layers' and the last one
        forward_kwargs = dict(use_cache=False, logits_to_keep=1)
        with capture_layer_context(self.student) as s_ctx, vision_on_every_process(self, self.student, inputs):
            s_out = model(**self.student.model_inputs(inputs), **forward_kwargs, output_hidden_states=True)
        now = self.clock()
        student_forward, clock = now - clock, now
        if self.teacher_cache is not None:  # read by the collator (KeyedCollator), placed with the batch
            t_stack, t_fn = interact_cache.cached_teacher(inputs, positions.device), None
        else:
            with torch.no_grad(), capture_layer_context(self.teacher) as t_ctx, \
                    vision_on_every_process(self, self.teacher, inputs), \
                    capture_hidden_states(self.teacher, self.teacher_verbalizers.layers) as t_states:
                self.teacher_model(**self.teacher.model_inputs(inputs), **forward_kwargs)
                t_stack, t_fn = self.teacher_verbalizers.response_inputs(t_states, positions, t_ctx,
                                                                            transformed=True)
                del t_states
        teacher_forward = self.clock() - clock
        s_stack, s_fn = self.student_verbalizers.response_inputs(s_out.hidden_states, positions, s_ctx)

        cfg = self.interaction
        labels = response_labels(inputs["labels"], positions) if "ce" in (cfg.intermediate_op, cfg.last_op) else None
        heads, roots = [self.student.final_norm, self.student.lm_head], (model,)
        if self.teacher is not None:
            heads, roots = heads + [self.teacher.final_norm, self.teacher.lm_head], (model, self.teacher_model)
        with whole_parameters(self, heads, fsdp_roots=roots):
            clock = self.clock()
            result = interaction_loss(
                s_stack, t_stack, s_fn, t_fn,
                vocab_size=self.vocab_size,
                strategy=cfg.strategy,
                intermediate_op=cfg.intermediate_op,
                last_op=cfg.last_op,
                divergence=cfg.divergence,
                jsd_beta=cfg.jsd_beta,
                chunk_size=cfg.chunk_size,
                generator=self.matching_generator() if model.training else None,
                matching_kwargs=dict(scale=cfg.scale, eps=cfg.eps, k=cfg.k, temperature=cfg.temperature,
                                     temperature_rule=cfg.temperature_rule),
                labels=labels,
            )
            loss_seconds = self.clock() - clock
        if model.training:
            self._record(result)
            self.metrics.add("seconds/student_forward", student_forward)
            self.metrics.add("seconds/teacher_forward", teacher_forward)
            if result.seconds:  # none without response tokens
                # interaction_loss's scoring clock stops after a host copy of the selected weights,
                # which waits for the device; its gradient clock does not: the gradient pass is
                # the rest of the synchronized call
                self.metrics.add("seconds/scoring_pass", result.seconds["scoring"])
                self.metrics.add("seconds/gradient_pass", loss_seconds - result.seconds["scoring"])
        loss = self.finite_or_skipped(model, result.loss)
        self.loss_seconds += self.clock() - entered
        return (loss, s_out) if return_outputs else loss

    def _record(self, result) -> None:
        """Log the loss terms and (main process) the selected pairs of this micro-batch.

        Under several processes every process's selection is gathered, in process order (the
        order of their draws, :func:`vlsi.train.stages.interact_draws.matching_seed`), so
        ``matches.jsonl`` holds what one process accumulating the same micro-batches would record.
        """
        kld, weights = result.kld.detach().float().cpu(), result.weights.detach().float()
        selected, scored = weights.cpu() > 0, torch.isfinite(kld)
        self.metrics.add("interaction_loss", float(result.loss.detach()))
        self.metrics.add("last_layer_loss", result.last_loss)
        # NaN (skipped when averaged) where nothing was scored, e.g. the `random` strategy
        self.metrics.add("mean_kld", float(kld[scored].mean()) if scored.any() else math.nan)
        self.metrics.add("matched_kld", float(kld[selected].mean()) if selected.any() else math.nan)
        for i, entropy in enumerate(result.matching_entropy.tolist()):
            self.metrics.add(f"matching_entropy/{i}", entropy)
        if self.match_log is None and self.accelerator.num_processes == 1:
            return
        every = self.accelerator.gather(weights[None]) if self.accelerator.num_processes > 1 else weights[None]
        if self.match_log is not None and self.is_world_process_zero():
            for process_weights in every.cpu():
                # the optimizer step this micro-batch contributes to (1-based, as checkpoints count)
                self.match_log.add(process_weights, self.state.global_step + 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.metrics.pop_means(self.accelerator))
        super().log(logs, start_time)


def load_adapter_weights(model: Any, checkpoint: Path) -> None:
    """The LoRA weights of a Trainer checkpoint, loaded into the ``PeftModel`` ``model``."""
    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def run_interact(
    run: RunConfig | ResolvedRun,
    out_dir: str | Path,
    *,
    teacher_verbalizers: str | Path,
    student_verbalizers: str | Path,
    resume: bool = False,
    restart: bool = False,
    upstream: dict[str, str] | None = None,
    preflight: Preflight | None = None,
) -> Path:
    """Train the student's LoRA adapter with the interaction loss into ``out_dir``.

    Args:
        run: the run (``interaction``, ``lora``, ``data``, the ``interact`` settings); a
            :class:`~vlsi.train.config.RunConfig` is resolved here (:func:`vlsi.train.resolved.resolve_run`).
        out_dir: the step directory (see the module docstring for its content).
        teacher_verbalizers, student_verbalizers: directories written by ``run_verbalize``.
        resume: continue from the newest checkpoint; a finished step returns at once.
        restart: redo a step whose recorded inputs differ (else that is an error).
        upstream: identities of the verbalizer directories, when the caller knows them
            (``vlsi distill``); by default they are read from the directories.
        preflight: the caller's pre-flight result (``vlsi distill``); by default run here.

    Raises:
        VlsiError: every pre-flight failure (:func:`vlsi.train.preflight.check_run`), a directory of
            other inputs, a directory holding a run without ``resume``.
    """
    run = resolve_run(run)
    cfg = run.cfg
    out = Path(out_dir)
    teacher_dir, student_dir = run.teacher_dir, run.student_dir
    pre = preflight or check_run(run, ("interact",), teacher_verbalizers=Path(teacher_verbalizers),
                                 student_verbalizers=Path(student_verbalizers))
    upstream = upstream or {"teacher_verbalizers": directory_identity(teacher_verbalizers),
                            "student_verbalizers": directory_identity(student_verbalizers)}
    parts: dict[str, Any] = {}

    cache = interact_cache.open_run_cache(run, teacher_verbalizers, pre)  # checked before anything loads

    def build(args, dataset, collator, resumed_step: int) -> Trainer:
        if cache is not None:  # before any model loads
            collator = interact_cache.keyed_collator(cache, dataset, collator)
        dtype = torch.bfloat16 if args.bf16 else None
        student = load_backbone(student_dir, dtype=dtype, attn_implementation=cfg.attn_implementation)
        s_verb = load_verbalizers(student_verbalizers, student)
        t_verb, t_layers = None, pre.teacher.target_layers
        if cache is None:
            teacher = load_backbone(teacher_dir, dtype=dtype, attn_implementation=cfg.attn_implementation)
            t_verb = load_verbalizers(teacher_verbalizers, teacher)
            teacher.model.requires_grad_(False).eval()
            t_layers = t_verb.layers
        model = with_lora(student, cfg.lora, seed=cfg.stage("interact").seed)
        recorder = MatchRecorder(len(s_verb.layers), len(t_layers), student_layers=s_verb.layers,
                                 teacher_layers=t_layers, strategy=cfg.interaction.strategy)
        parts.update(recorder=recorder, layers=(s_verb.layers, t_layers))
        match_log = MatchLog(out / MATCHES_LOG, recorder, keep_until=resumed_step) if args.should_save else None
        on_policy = {}
        if cfg.interaction.on_policy > 0:
            on_policy = dict(tokenizer=load_tokenizer(student_dir),
                             max_new_tokens=cfg.interaction.generation.max_new_tokens
                             or longest_response([s.labels for s in dataset.samples]),
                             generation_log=GenerationLog(out / GENERATIONS_LOG, keep_until=resumed_step)
                             if args.should_save else None)
        return InteractTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               max_consecutive_nonfinite=cfg.stage("interact").max_consecutive_nonfinite,
                               teacher_verbalizers=t_verb, student_verbalizers=s_verb,
                               interaction=cfg.interaction, vocab_size=pre.vocab, match_log=match_log,
                               teacher_cache=cache, **on_policy)

    def outputs(trainer: Trainer) -> dict[str, Any]:
        save_adapter(trainer, out / ADAPTER_DIR)
        recorder = parts["recorder"]
        if trainer.is_world_process_zero():
            recorder.to_json(out / "matches.json")
            save_match_heatmaps(out, recorder)
        return {"teacher": str(teacher_dir), "student": str(student_dir),
                "teacher_cache": cfg.interaction.teacher_cache,
                "teacher_verbalizers": str(teacher_verbalizers), "student_verbalizers": str(student_verbalizers),
                "strategy": cfg.interaction.strategy, "student_layers": parts["layers"][0],
                "teacher_layers": parts["layers"][1], "shared_vocab": pre.vocab,
                "matches_recorded": recorder.num_updates,
                "outputs": [ADAPTER_DIR, "matches.json", "heatmap_start.png", "heatmap_end.png",
                            *([GENERATIONS_LOG] if cfg.interaction.on_policy > 0 else [])]}

    stage = Stage("interact", "interact", out, step_inputs(run, "interact", upstream), student_dir,
                  build, lambda trainer, ckpt: load_adapter_weights(trainer.model, ckpt), outputs)
    return run_stage(stage, run, resume=resume, restart=restart)
