"""``vlsi interact``: the interaction step (docs/method.md#interaction, paper Algorithm 1).

    vlsi interact CONFIG [--teacher-verbalizers DIR] [--student-verbalizers DIR] [--out DIR] [--resume]

The student's language model learns, through LoRA (:mod:`vlsi.lora`), to make its verbalized
layers match the teacher's. Per micro-batch:

1. student forward (with grad) and teacher forward (frozen, ``eval()``, ``no_grad``) on the same
   inputs, with all hidden states;
2. both sides' response positions are gathered per target layer
   (:meth:`VerbalizerSet.response_inputs`);
3. :func:`vlsi.interaction.interaction_loss` scores ``KLD[i, j]``, selects pairs with the
   configured matching strategy and returns ``sum W[i, j] OP(P_j, Q_i) + LL(last layers)``, in two
   chunked passes whose memory does not grow with the number of response tokens. With a ``ce``
   op the ground-truth next tokens of the response positions (:func:`vlsi.verbalizer.response_labels`)
   are passed as its labels.

No next-token loss in this step. Teacher, both verbalizer sets, the student's vision encoder,
projector, final norm and LM head are frozen; only the LoRA weights train. The teacher sits
beside the trained model (:func:`vlsi.distributed.place_frozen_model`); the heads and norms
the chunked loss calls after the forwards are gathered for its duration under ZeRO-3/FSDP
(:func:`vlsi.distributed.whole_parameters`).

Matching is random (``vlsi`` samples); its generator is seeded from (training seed, optimizer
step, micro-batch number across processes) by :func:`matching_seed`, so a resumed run draws the
same pairs as an uninterrupted one, and N processes draw what one process accumulating N
micro-batches draws. The main process appends every selection to ``matches.jsonl``
(:class:`vlsi.recorder.MatchLog`; on resume the lines after the checkpoint are dropped).

Outputs in ``OUT``: ``adapter/`` (the LoRA adapter), ``matches.json``, ``matches.jsonl``,
``heatmap_start.{png,json}`` and ``heatmap_end.{png,json}`` (paper Fig. 5), ``metrics.jsonl``
and TensorBoard logs (``loss``, ``interaction_loss``, ``last_layer_loss``, ``mean_kld``,
``matched_kld``, ``matching_entropy/<i>``: the entropy in nats of the distribution student
target layer ``i``'s pair was drawn from; ``seconds/student_forward``, ``seconds/teacher_forward``
(with the teacher's verbalizer inputs; from a cache, only moving the collated top-K to the
device), ``seconds/scoring_pass``, ``seconds/gradient_pass`` and ``seconds/student_backward``:
where a micro-batch's time goes, means over the logging window; on a GPU each clock read waits
for the device, :func:`device_clock`), ``checkpoint-N/``, ``fingerprint.json`` and
``step_complete.json`` last.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer

from vlsi.backbones import Backbone, checkpoint_dir, load_backbone, load_tokenizer
from vlsi.config import InteractionConfig, RunConfig
from vlsi.distributed import (describe_footprint, load_verbalizers, place_frozen_model, place_frozen_verbalizers,
                              shards_parameters, vision_on_every_process, whole_parameters)
from vlsi.fingerprint import directory_identity, step_inputs
from vlsi.heatmap import save_match_heatmaps
from vlsi.interaction import SparseTeacher, interaction_loss
from vlsi.inference import end_token_ids, placeholder_token_ids
from vlsi.lora import save_adapter, with_lora
from vlsi.on_policy import GenerationLog, generate_responses, generation_seed, longest_response, on_policy_draw
from vlsi.preflight import Preflight, check_run
from vlsi.recorder import MatchLog, MatchRecorder
from vlsi.stages.cache_teacher import expected_manifest
from vlsi.stages.callbacks import MeanMetrics
from vlsi.stages.run import Stage, VlsiTrainerMixin, run_stage
from vlsi.teacher_cache import CacheError, KeyedCollator, TeacherCache, sample_key
from vlsi.verbalizer import (VerbalizerSet, capture_hidden_states, capture_layer_context, prediction_positions,
                             response_labels)

MATCHES_LOG = "matches.jsonl"
GENERATIONS_LOG = "generations.jsonl"  # on-policy micro-batches: the first responses of each logging window
ADAPTER_DIR = "adapter"


def matching_seed(seed: int, step: int, draw: int) -> int:
    """Seed of the matching generator for one micro-batch.

    A hash of (training seed, optimizer step, draw), where ``draw`` numbers the step's
    micro-batches across processes as one process accumulating them would see them:
    ``micro_step * world_size + process_index`` (accelerate gives process ``p`` the batches
    ``p, p + world_size, ...`` of the sampler's order). Independent of how the run got there,
    so a resumed run reproduces the draws of an uninterrupted one, and a run on N processes
    draws the pairs of one process with N times the gradient accumulation.
    """
    # the trailing ":0" keeps one-process seeds as they were when the process index was hashed
    digest = hashlib.sha256(f"vlsi-matching:{seed}:{step}:{draw}:0".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has run the work queued on it.

    CUDA runs kernels asynchronously: without the synchronize a clock read times their launch,
    and their run lands in whichever later part first waits for the device. No-op on a CPU.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class InteractTrainer(VlsiTrainerMixin, Trainer):
    """Trains the student's LoRA weights with the interaction loss; holds the frozen teacher.

    ``model`` is the student ``PeftModel``. The verbalizer sets are frozen, not submodules of
    it (replicated on every device, never in checkpoints); the student's is attached to the
    student backbone, the teacher's to the teacher backbone.

    Args:
        teacher_verbalizers: attached to the teacher :class:`Backbone` (whose model is placed
            by :func:`vlsi.distributed.place_frozen_model`).
        student_verbalizers: attached to the student backbone inside ``model``.
        interaction: strategy, matching arguments, ops, divergence, chunk size.
        vocab_size: shared vocabulary ``V`` (:func:`shared_vocab_size`).
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
            print(f"teacher: none loaded; top-{teacher_cache.k} of {teacher_cache.layers} layers read from "
                  f"{teacher_cache.root}", flush=True)
        self.student_verbalizers = student_verbalizers.requires_grad_(False).eval().to(self.args.device)
        self.interaction = interaction
        self.vocab_size = vocab_size
        self.match_log = match_log
        self.metrics = MeanMetrics()
        self.tokenizer = tokenizer  # on-policy micro-batches: end and pad ids, logged texts
        self.max_new_tokens = max_new_tokens
        self.generation_log = generation_log
        if interaction.on_policy > 0 and (tokenizer is None or max_new_tokens is None):
            raise ValueError("on-policy interaction needs the student's tokenizer and max_new_tokens")
        self._end_ids = end_token_ids(tokenizer, self.student.model) if interaction.on_policy > 0 else []
        self._placeholder_ids = placeholder_token_ids(self.student.model)
        self._micro = (-1, 0)  # (optimizer step, micro-step within it)
        self._loss_seconds = 0.0  # compute_loss's time within the current training_step

    def _advance_draw(self) -> None:
        """Count a training micro-batch: ``_micro`` becomes (optimizer step, its micro-step)."""
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)

    def _draw(self, process: int | None = None) -> int:
        """The current micro-batch's number across processes (see :func:`matching_seed`)."""
        process = self.args.process_index if process is None else process
        return self._micro[1] * self.args.world_size + process

    def _matching_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(matching_seed(self.args.seed, self._micro[0], self._draw()))

    def _on_policy_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs``, or (on a drawn micro-batch) the batch of the student's own responses.

        Under ZeRO-3/FSDP on several processes every process generates when any does (each
        decoding step gathers parameters collectively), and one not drawn drops what it made.
        """
        cfg, step = self.interaction, self._micro[0]
        draws = [on_policy_draw(self.args.seed, step, self._draw(p), cfg.on_policy)
                 for p in range(self.args.world_size)]
        drawn, synced = draws[self.args.process_index], shards_parameters(self)
        generated, seconds = None, math.nan
        if drawn or (synced and any(draws)):
            clock = self._clock()
            with vision_on_every_process(self, self.student, inputs):
                generated = generate_responses(
                    self.accelerator.unwrap_model(model), inputs, self.student.model_inputs, end_ids=self._end_ids,
                    pad_token_id=self.tokenizer.pad_token_id, temperature=cfg.generation.temperature,
                    top_p=cfg.generation.top_p, max_new_tokens=self.max_new_tokens,
                    seed=generation_seed(self.args.seed, step, self._draw()), synced_gpus=synced,
                    suppress_ids=self._placeholder_ids)
            seconds = self._clock() - clock
        # every process logs the same names (MeanMetrics gathers them); NaN: nothing generated
        self.metrics.add("on_policy/share", float(drawn))
        self.metrics.add("seconds/generation", seconds if drawn else math.nan)
        lengths = [len(r) for r in generated.responses] if drawn else []
        self.metrics.add("on_policy/generated_tokens", sum(lengths) / len(lengths) if lengths else math.nan)
        self.metrics.add("on_policy/truncated",
                         1.0 - sum(generated.ended) / len(generated.ended) if drawn else math.nan)
        if not drawn:
            return inputs
        if self.generation_log is not None and self.is_world_process_zero():
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in generated.responses]
            self.generation_log.add(step + 1, step // self.args.logging_steps, texts, generated.responses,
                                    generated.ended)
        return generated.batch

    def _clock(self) -> float:
        return device_clock(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        entered = self._clock()
        if "teacher_error" in inputs:  # the collator could not read the teacher cache
            raise CacheError(inputs["teacher_error"])
        if model.training:
            self._advance_draw()
            if self.interaction.on_policy > 0:
                inputs = self._on_policy_inputs(model, inputs)
        positions = prediction_positions(inputs["labels"])
        clock = self._clock()
        # logits_to_keep=1: the models' own [B, T, V] logits are not needed (the chunked loss
        # recomputes the last layer's logits at response positions only). The student's
        # forward keeps all its hidden states (autograd keeps them for the backward anyway);
        # the teacher's no-grad forward only its target layers' and the last one
        forward_kwargs = dict(use_cache=False, logits_to_keep=1)
        with capture_layer_context(self.student) as s_ctx, vision_on_every_process(self, self.student, inputs):
            s_out = model(**self.student.model_inputs(inputs), **forward_kwargs, output_hidden_states=True)
        now = self._clock()
        student_forward, clock = now - clock, now
        if self.teacher_cache is not None:  # read by the collator (KeyedCollator), placed with the batch
            t_stack = SparseTeacher(*(inputs[f"teacher_{name}"].to(positions.device, non_blocking=True)
                                      for name in ("ids", "logp", "tail")))
            t_fn = None
        else:
            with torch.no_grad(), capture_layer_context(self.teacher) as t_ctx, \
                    vision_on_every_process(self, self.teacher, inputs), \
                    capture_hidden_states(self.teacher, self.teacher_verbalizers.layers) as t_states:
                self.teacher_model(**self.teacher.model_inputs(inputs), **forward_kwargs)
                t_stack, t_fn = self.teacher_verbalizers.response_inputs(t_states, positions, t_ctx,
                                                                            transformed=True)
                del t_states
        teacher_forward = self._clock() - clock
        s_stack, s_fn = self.student_verbalizers.response_inputs(s_out.hidden_states, positions, s_ctx)

        cfg = self.interaction
        labels = response_labels(inputs["labels"], positions) if "ce" in (cfg.intermediate_op, cfg.last_op) else None
        heads, roots = [self.student.final_norm, self.student.lm_head], (model,)
        if self.teacher is not None:
            heads, roots = heads + [self.teacher.final_norm, self.teacher.lm_head], (model, self.teacher_model)
        with whole_parameters(self, heads, fsdp_roots=roots):
            clock = self._clock()
            result = interaction_loss(
                s_stack, t_stack, s_fn, t_fn,
                vocab_size=self.vocab_size,
                strategy=cfg.strategy,
                intermediate_op=cfg.intermediate_op,
                last_op=cfg.last_op,
                divergence=cfg.divergence,
                jsd_beta=cfg.jsd_beta,
                chunk_size=cfg.chunk_size,
                generator=self._matching_generator() if model.training else None,
                matching_kwargs=dict(scale=cfg.scale, eps=cfg.eps, k=cfg.k, temperature=cfg.temperature,
                                     temperature_rule=cfg.temperature_rule),
                labels=labels,
            )
            loss_seconds = self._clock() - clock
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
        self._loss_seconds += self._clock() - entered
        return (loss, s_out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``, timed: ``seconds/student_backward`` is the micro-batch's
        time outside :meth:`compute_loss` (mostly the student's backward)."""
        start = self._clock()
        self._loss_seconds = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.metrics.add("seconds/student_backward", self._clock() - start - self._loss_seconds)
        return loss

    def _record(self, result) -> None:
        """Log the loss terms and (main process) the selected pairs of this micro-batch.

        Under several processes every process's selection is gathered, in process order
        (the order of their draws, :func:`matching_seed`), so ``matches.jsonl`` holds what one
        process accumulating the same micro-batches would record.
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
    cfg: RunConfig,
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
        cfg: run configuration (``interaction``, ``lora``, ``data``, the ``interact`` settings).
        out_dir: the step directory (see the module docstring for its content).
        teacher_verbalizers, student_verbalizers: directories written by ``run_verbalize``.
        resume: continue from the newest checkpoint; a finished step returns at once.
        restart: redo a step whose recorded inputs differ (else that is an error).
        upstream: identities of the verbalizer directories, when the caller knows them
            (``vlsi distill``); by default they are read from the directories.
        preflight: the caller's pre-flight result (``vlsi distill``); by default run here.

    Raises:
        VlsiError: every pre-flight failure (:func:`vlsi.preflight.check_run`), a directory of
            other inputs, a directory holding a run without ``resume``.
    """
    out = Path(out_dir)
    teacher_dir, student_dir = checkpoint_dir(cfg.teacher), checkpoint_dir(cfg.student)
    pre = preflight or check_run(cfg, ("interact",), teacher_verbalizers=Path(teacher_verbalizers),
                                 student_verbalizers=Path(student_verbalizers))
    upstream = upstream or {"teacher_verbalizers": directory_identity(teacher_verbalizers),
                            "student_verbalizers": directory_identity(student_verbalizers)}
    parts: dict[str, Any] = {}

    cache = None
    if cfg.interaction.teacher_cache is not None:  # checked before anything loads
        cache = TeacherCache.open(cfg.interaction.teacher_cache, expected_manifest(
            cfg, teacher_verbalizers, cfg.interaction.teacher_cache_top_k, pre.vocab, pre.teacher.target_layers))

    def build(args, dataset, collator, resumed_step: int) -> Trainer:
        if cache is not None:  # before any model loads
            cache.check_samples([sample_key(s.id, s.input_ids, s.labels, s.num_image_tokens) for s in dataset.samples],
                                [s.id for s in dataset.samples])
            collator = KeyedCollator(collator, cache)
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

    stage = Stage("interact", "interact", out, step_inputs(cfg, "interact", upstream), student_dir,
                  build, lambda trainer, ckpt: load_adapter_weights(trainer.model, ckpt), outputs)
    return run_stage(stage, cfg, resume=resume, restart=restart)
