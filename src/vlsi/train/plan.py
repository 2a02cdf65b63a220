"""Per-GPU memory of each step of a run, predicted from the model configs before anything loads.

``vlsi plan CONFIG --gpus 8 --gpu-memory 80GB --engine zero3`` reads the two models'
``config.json`` (or a published shape, ``--teacher-shape qwen2-vl-72b``), builds them on the
``meta`` device (exact parameter counts, no memory) and adds up, per GPU and per step:

* ``teacher weights`` / ``student weights``: parameters x bytes of the checkpoint dtype, divided
  by the number of GPUs where the engine shards them (``zero3``, ``fsdp``);
* ``lora + optimizer``: the adapters (``r (in + out)`` per adapted linear layer) in float32
  with their gradient and two AdamW moments, 16 bytes a parameter; ``zero2`` shards the
  gradient and moments, ``zero3`` / ``fsdp`` all four;
* ``verbalizers``: ``3 d^2`` per target layer; trained (16 bytes a parameter, sharded as the
  LoRA states) in the verbalize steps, frozen in the interaction step in their backbone's dtype
  (:class:`vlsi.method.verbalizer.VerbalizerSet` casts them to the LM head's): the teacher's sharded
  as the teacher (:func:`vlsi.train.distributed.place_frozen_verbalizers`), the student's replicated;
* ``activations``: what the student's backward keeps, per token and decoder layer
  ``bytes x (6 d + 2 d_kv + 4 I)`` (attention inputs and output, MLP gate, up, their product;
  attention itself through SDPA keeps no ``T x T`` matrix), or one ``d`` per layer with
  gradient checkpointing plus one layer recomputed; a frozen forward keeps its target layers'
  and last hidden states (``(t + 1) x T x d``, :func:`vlsi.method.verbalizer.capture_hidden_states`)
  and one layer's working set; tokens = per-device batch x ``data.max_length``, an
  upper bound, of which ``--response-tokens`` per sample are supervised (default: all); in a
  verbalize step the trained verbalizers' ``5 d`` a token and layer, or with checkpointing
  (``gradient_checkpointing``) their inputs and one layer recomputed;
* ``loss working set``: the interaction loss's ``(t_s + 4) x chunk x V`` float32 buffers and its
  ``[t_s + 1, T, d_s]`` gradient buffer; the verbalization CE's ``1024 x V`` chunk (logits,
  their float32 copy and gradient, 10 bytes a logit); SFT's CE through the LM head the same way,
  plus the ``[N, d]`` response rows of the last hidden state and their gradient;
* ``stacked hidden states``: the interaction's ``[t + 1, N, d]`` stacks of response positions
  (:meth:`vlsi.method.verbalizer.VerbalizerSet.response_inputs`), teacher (none with a teacher
  cache) and student;
* ``autocast copies``: with bf16 mixed precision under ``ddp`` / ``fsdp`` accelerate's autocast
  wrapper returns the trained model's outputs as float32 copies: the student's
  ``(L + 1) x T x d`` hidden states in the interaction and SFT steps. DeepSpeed
  casts the model itself and makes no copies; without mixed precision (every CPU run, hence
  ``benchmarks/plan_check.py``) there are none;
* ``gathered``: under ``zero3`` / ``fsdp`` the largest block gathered whole (decoder layer or LM
  head), twice for prefetch;
* ``gathered heads``: under ``zero3`` / ``fsdp`` the final norms and LM heads the chunked loss
  gathers whole at once (:func:`vlsi.train.distributed.whole_parameters`): the backbone's in a
  verbalize step, the teacher's and the student's together in the interaction step, the
  student's LM head in the SFT step (counted with its final norm). They are
  gathered after the forward's blocks are freed, so this term and ``gathered`` never coexist:
  summing them errs high by the smaller.

With a teacher cache (``interaction.teacher_cache``) the interaction step holds no teacher, its
verbalizers or forward (the cache's top-K entries, ``K / d`` of the teacher's stack, are not
counted).

A step fits when its total is at most 90% of ``--gpu-memory`` (the rest is the CUDA context,
the allocator's fragmentation and NCCL buffers). What is not counted: the vision tower's
transient activations (frozen, no gradient) and framework buffers; ``docs/benchmarks.md``
checks the prediction against measured peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlsi.errors import VlsiError
from vlsi.method.losses import CE_CHUNK_TOKENS
from vlsi.method.verbalizer import validate_target_layers
from vlsi.models.shapes import ModelShape, shape_from_name
from vlsi.train.config import RunConfig
from vlsi.train.resolved import ResolvedRun, resolve_run

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
USABLE_FRACTION = 0.9
ADAM_BYTES = 16  # float32 weight + gradient + two AdamW moments


@dataclass
class StepPlan:
    step: str
    parts: dict[str, int]  # component -> bytes per GPU

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Setup:
    """The run settings the plan depends on (from the config, overridable for what-ifs)."""

    gpus: int
    engine: str
    batch: dict[str, int]  # stage -> per-device batch
    checkpointing: dict[str, bool]  # stage -> gradient checkpointing
    max_length: int
    chunk_size: int
    lora_r: int
    autocast: bool  # bf16 mixed precision: the float32 verbalizers' activations are bf16
    response_tokens: int | None = None  # per sample; None: max_length (every token supervised)
    teacher_cache: bool = False  # the interaction step reads the teacher from a cache

    @property
    def fp32_outputs(self) -> bool:
        """accelerate's autocast wrapper (bf16, not DeepSpeed) returns float32 copies of outputs."""
        return self.autocast and self.engine in ("ddp", "fsdp")

    def tokens(self, stage: str) -> int:
        """Tokens of one micro-batch of ``stage`` (upper bound: every sample max_length long)."""
        return self.batch[stage] * self.max_length

    def responses(self, stage: str) -> int:
        """Supervised (response) tokens of one micro-batch of ``stage``."""
        per_sample = self.max_length if self.response_tokens is None else min(self.response_tokens, self.max_length)
        return self.batch[stage] * per_sample


def setup_from_config(cfg: RunConfig, gpus: int, engine: str, response_tokens: int | None = None) -> Setup:
    if engine not in ENGINES:
        raise VlsiError(f"unknown engine {engine!r}; supported: {', '.join(ENGINES)}")
    if gpus < 1:
        raise VlsiError(f"--gpus must be >= 1, got {gpus}")
    stages = {name: cfg.stage(name) for name in ("verbalize", "interact", "sft")}
    return Setup(gpus, engine, {k: s.per_device_train_batch_size for k, s in stages.items()},
                 {k: s.gradient_checkpointing for k, s in stages.items()}, cfg.data.max_length,
                 cfg.interaction.chunk_size, cfg.lora.r,
                 autocast=all(s.bf16 in ("auto", True) for s in stages.values()), response_tokens=response_tokens,
                 teacher_cache=cfg.interaction.teacher_cache is not None)


def _shards(setup: Setup) -> tuple[int, int, int]:
    """Divisors for (frozen and trainable weights, gradients + optimizer moments, ...)."""
    n = setup.gpus
    if setup.engine in ("zero3", "fsdp"):
        return n, n, n
    if setup.engine == "zero2":
        return 1, n, n
    return 1, 1, 1


def _trainable(params: int, setup: Setup) -> int:
    """float32 weight (4 bytes) + gradient and two moments (12 bytes), as the engine shards them."""
    weights, states, _ = _shards(setup)
    return params * 4 // weights + params * 12 // states


def _student_activations(m: ModelShape, tokens: int, checkpointing: bool) -> int:
    per_layer = m.weight_bytes * (6 * m.hidden_size + 2 * m.kv_size + 4 * m.intermediate_size)
    if checkpointing:
        return tokens * (m.num_layers * m.hidden_size * m.weight_bytes + per_layer)
    return tokens * m.num_layers * per_layer


def _frozen_forward(m: ModelShape, tokens: int) -> int:
    """A no-grad forward: the target layers' and the last hidden states it keeps
    (:func:`vlsi.method.verbalizer.capture_hidden_states`), plus one layer's transient working set."""
    hidden = (len(m.target_layers) + 1) * tokens * m.hidden_size * m.weight_bytes
    return hidden + tokens * m.weight_bytes * (4 * m.hidden_size + 2 * m.intermediate_size)


def _sharded(setup: Setup) -> bool:
    return setup.engine in ("zero3", "fsdp")


def _gathered(m: ModelShape, setup: Setup) -> int:
    return 2 * m.largest_block * m.weight_bytes if _sharded(setup) else 0


def _gathered_heads(models: list[ModelShape], setup: Setup) -> int:
    """Final norms + LM heads the loss gathers at once (sharded engines only)."""
    return sum(m.head * m.weight_bytes for m in models) if _sharded(setup) else 0


def _verbalizer_activations(m: ModelShape, responses: int, setup: Setup) -> int:
    """What the trained verb-FFNs keep for the backward: input, gate, up, their product and output
    (5 d a token) per target layer, or with checkpointing (the verbalize stage's
    ``gradient_checkpointing``) each layer's input and one layer's five recomputed."""
    per_value = 2 if setup.autocast else 4
    kept = len(m.target_layers) + 5 if setup.checkpointing["verbalize"] else 5 * len(m.target_layers)
    return kept * responses * m.hidden_size * per_value


def _verbalize_step(role: str, m: ModelShape, setup: Setup) -> StepPlan:
    frozen, _, _ = _shards(setup)
    tokens, responses = setup.tokens("verbalize"), setup.responses("verbalize")
    verb = 3 * m.hidden_size**2 * len(m.target_layers)
    parts = {
        f"{role} weights": m.parameters * m.weight_bytes // frozen,
        "verbalizers (trained)": _trainable(verb, setup),
        "activations": _frozen_forward(m, tokens) + _verbalizer_activations(m, responses, setup),
        "loss working set": min(CE_CHUNK_TOKENS, responses) * m.vocab_size * 10,
        "gathered": _gathered(m, setup),
        "gathered heads": _gathered_heads([m], setup),
    }
    return StepPlan(f"{role}-verbalize", parts)


def _interact_step(teacher: ModelShape, student: ModelShape, setup: Setup, vocab: int) -> StepPlan:
    frozen, _, _ = _shards(setup)
    tokens, responses = setup.tokens("interact"), setup.responses("interact")
    t_s, t_l = len(student.target_layers), len(teacher.target_layers)
    chunk = min(setup.chunk_size, responses)
    online = not setup.teacher_cache  # 0 or 1: the teacher's parts
    s_bytes = 4 if setup.fp32_outputs else student.weight_bytes  # the student's hidden states
    parts = {
        "teacher weights": online * teacher.parameters * teacher.weight_bytes // frozen,
        "student weights": student.parameters * student.weight_bytes // frozen,
        "lora + optimizer": _trainable(student.lora_parameters(setup.lora_r), setup),
        "verbalizers (frozen)": 3 * (online * teacher.hidden_size**2 * t_l * teacher.weight_bytes // frozen
                                     + student.hidden_size**2 * t_s * student.weight_bytes),
        "activations": _student_activations(student, tokens, setup.checkpointing["interact"])
        + online * _frozen_forward(teacher, tokens),
        "stacked hidden states": online * (t_l + 1) * responses * teacher.hidden_size * teacher.weight_bytes
        + (t_s + 1) * responses * student.hidden_size * s_bytes,
        "autocast copies": setup.fp32_outputs * (student.num_layers + 1) * tokens * student.hidden_size * 4,
        "loss working set": (t_s + 4) * chunk * vocab * 4 + (t_s + 1) * responses * student.hidden_size * 4,
        "gathered": max(online * _gathered(teacher, setup), _gathered(student, setup),
                        # one teacher verbalizer at a time (place_frozen_verbalizers)
                        online * _sharded(setup) * 3 * teacher.hidden_size**2 * teacher.weight_bytes),
        "gathered heads": _gathered_heads([student] + [teacher] * online, setup),
    }
    return StepPlan("interact", parts)


def _sft_step(student: ModelShape, setup: Setup) -> StepPlan:
    frozen, _, _ = _shards(setup)
    tokens, responses = setup.tokens("sft"), setup.responses("sft")
    m = student
    parts = {
        "student weights": m.parameters * m.weight_bytes // frozen,
        "lora + optimizer": _trainable(m.lora_parameters(setup.lora_r), setup),
        "activations": _student_activations(m, tokens, setup.checkpointing["sft"]),
        # one chunk's logits, float32 copy and gradient; the response rows and their gradient
        "loss working set": min(CE_CHUNK_TOKENS, responses) * m.vocab_size * 10
        + 2 * responses * m.hidden_size * m.weight_bytes,
        "autocast copies": setup.fp32_outputs * (m.num_layers + 1) * tokens * m.hidden_size * 4,  # hidden states
        "gathered": _gathered(m, setup),
        "gathered heads": _gathered_heads([m], setup),
    }
    return StepPlan("sft", parts)


STEPS = ("teacher-verbalize", "student-verbalize", "interact", "sft")


def plan_step(step: str, teacher: ModelShape | None, student: ModelShape | None, setup: Setup) -> StepPlan:
    """Per-GPU bytes of one of :data:`STEPS`; a model the step does not run may be ``None``."""
    needs = {"teacher-verbalize": (teacher,), "student-verbalize": (student,), "interact": (teacher, student),
             "sft": (student,)}[step]
    if any(m is None for m in needs):
        raise VlsiError(f"the {step} step's plan needs the shapes of the models it runs")
    if step.endswith("-verbalize"):
        return _verbalize_step(step.split("-")[0], needs[0], setup)
    if step == "sft":
        return _sft_step(student, setup)
    return _interact_step(teacher, student, setup, min(teacher.vocab_size, student.vocab_size))


def plan_steps(teacher: ModelShape, student: ModelShape, setup: Setup) -> list[StepPlan]:
    """Per-GPU bytes of each step: teacher and student verbalization, interaction, SFT."""
    return [plan_step(step, teacher, student, setup) for step in STEPS]


def _fits(steps: list[StepPlan], gpu_bytes: int) -> bool:
    return all(s.total <= USABLE_FRACTION * gpu_bytes for s in steps)


def suggestions(teacher: ModelShape, student: ModelShape, setup: Setup, gpu_bytes: int) -> list[str]:
    """Single changes that make every step fit, cheapest first; empty if none alone does."""
    from dataclasses import replace

    candidates: list[tuple[str, Setup]] = []
    if not all(setup.checkpointing.values()):
        candidates.append(("training.gradient_checkpointing: true",
                           replace(setup, checkpointing={k: True for k in setup.checkpointing})))
    if setup.engine in ("ddp", "zero2"):
        candidates.append(("--engine zero3 (accelerate_configs/deepspeed_zero3.yaml)", replace(setup, engine="zero3")))
    for chunk in (128, 64, 32):
        if chunk < setup.chunk_size:
            candidates.append((f"interaction.chunk_size: {chunk}", replace(setup, chunk_size=chunk)))
    if any(b > 1 for b in setup.batch.values()):
        candidates.append(("per_device_train_batch_size: 1 in every stage (raise gradient_accumulation_steps to keep "
                           "the global batch)", replace(setup, batch={k: 1 for k in setup.batch})))
    for length in (4096, 2048):
        if length < setup.max_length:
            candidates.append((f"data.max_length: {length}", replace(setup, max_length=length)))
    engine = setup.engine if setup.engine in ("zero3", "fsdp") else "zero3"
    for gpus in (2, 4, 8, 16, 32, 64):
        if gpus > setup.gpus:
            candidates.append((f"{gpus} GPUs under {engine}", replace(setup, gpus=gpus, engine=engine)))
    return [text for text, option in candidates if _fits(plan_steps(teacher, student, option), gpu_bytes)]


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def format_plan(teacher: ModelShape, student: ModelShape, setup: Setup, gpu_bytes: int) -> list[str]:
    """The plan as printed by ``vlsi plan``: one block per step, then the verdict."""
    steps = plan_steps(teacher, student, setup)
    lines = [
        f"teacher: {teacher.name}: {teacher.parameters / 1e9:.2f}B parameters, {teacher.num_layers} layers x "
        f"{teacher.hidden_size}, {len(teacher.target_layers)} target layers",
        f"student: {student.name}: {student.parameters / 1e9:.2f}B parameters, {student.num_layers} layers x "
        f"{student.hidden_size}, {len(student.target_layers)} target layers, LoRA r={setup.lora_r} "
        f"({student.lora_parameters(setup.lora_r) / 1e6:.1f}M parameters)",
        f"{setup.gpus} GPU(s) of {gb(gpu_bytes)} under {setup.engine}; tokens per micro-batch = batch x "
        f"max_length {setup.max_length}, response tokens per sample "
        f"{setup.max_length if setup.response_tokens is None else setup.response_tokens}; "
        f"interaction chunk {setup.chunk_size}",
    ]
    usable = USABLE_FRACTION * gpu_bytes
    for step in steps:
        verdict = "fits" if step.total <= usable else "DOES NOT FIT"
        lines.append(f"{step.step}: {gb(step.total)} per GPU ({verdict}; usable {gb(usable)})")
        lines += [f"    {name:<22} {gb(size):>10}" for name, size in step.parts.items() if size]
    if _fits(steps, gpu_bytes):
        lines.append("the run fits")
    else:
        fixes = suggestions(teacher, student, setup, gpu_bytes)
        lines.append("the run does not fit; " + (
            "each of these alone would make it fit: " + "; ".join(fixes) if fixes
            else "no single change of batch, length, chunk, checkpointing, engine or GPU count makes it fit"))
    return lines


def parse_memory(text: str) -> int:
    """``80GB``, ``80GiB``, ``141G`` or bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise VlsiError(f"cannot read a memory size from {text!r} (e.g. 80GB, 141GiB)")
    value, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    power = " KMGT".index(unit) if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def run_plan(run: RunConfig | ResolvedRun, *, gpus: int, gpu_memory: str, engine: str,
             teacher_shape: str | None = None, student_shape: str | None = None,
             response_tokens: int | None = None) -> list[str]:
    """Shapes from the run's checkpoints (or the named shapes), target layers resolved; ``run``:
    a config is resolved here (:func:`vlsi.train.resolved.resolve_run`)."""
    from dataclasses import replace

    run = resolve_run(run)
    setup = setup_from_config(run.cfg, gpus, engine, response_tokens)
    gpu_bytes = parse_memory(gpu_memory)
    shapes = {role: shape_from_name(name) if name else replace(run.checkpoint_shape(role))
              for role, name in (("teacher", teacher_shape), ("student", student_shape))}
    for role, m in shapes.items():
        try:
            m.target_layers = validate_target_layers(run.configured_layers(role), m.num_layers)
        except VlsiError as err:
            raise VlsiError(f"verbalizer.{role}_layers: {err}") from None
    return format_plan(shapes["teacher"], shapes["student"], setup, gpu_bytes)
