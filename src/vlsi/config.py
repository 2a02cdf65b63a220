"""Run configuration: YAML validated into dataclasses at load time.

One YAML file describes a whole VLsI run (``vlsi distill CONFIG``) or one of its stages.
Unknown keys and out-of-range values are errors that name the key (``interaction.strategy``).
Defaults are the paper's (section 4.1c; docs/method.md#training-defaults): AdamW, cosine
schedule from 1e-4 down to 1e-6 (``cosine_with_min_lr``), gradient accumulation 16, per-device batch 4,
gradient checkpointing, bf16 where the hardware has it, LoRA r=64 alpha=64.

Example::

    teacher: /models/Qwen2-VL-7B-Instruct
    student: /models/Qwen2-VL-2B-Instruct
    output_dir: runs/7b-to-2b
    data:
      train: [data/train.jsonl]
      image_root: data/images
    verbalizer:
      architecture: verb-ffn          # teacher_layers / student_layers: default rule
    interaction:
      strategy: vlsi
    training:                         # shared by the three stages
      per_device_train_batch_size: 4
    sft:                              # per-stage overrides of `training`
      num_train_epochs: 1
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlsi.errors import VlsiError


# Response tokens per chunk of the two-pass interaction loss: 256 tokens x 151,936 vocab x 4 bytes
# = 155 MB per [chunk, V] float32 buffer; the scoring pass holds about t_s + 4 of them (1.7 GB at
# t_s = 7). Large enough that the LM-head matmuls stay efficient, small enough to sit beside a
# 72B teacher, and ~20x below the naive peak at 2k tokens.
DEFAULT_CHUNK_SIZE = 256

# Seconds a process waits in a collective (TrainingArguments.ddp_timeout; transformers' default is
# 1800). In multi-GPU runs the other ranks wait while rank 0 alone reads a whole checkpoint (a 72B
# teacher under FSDP RAM-efficient loading: 146 GB in bf16, 25 min at 100 MB/s from network
# storage) or merges and exports the student after SFT: 3 h leaves room for slow disks, and a
# hung job still fails within hours.
DEFAULT_DDP_TIMEOUT = 3 * 3600


class ConfigError(VlsiError):
    """A configuration problem; the message names the offending key."""


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (``vlsi config CONFIG`` prints it)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Training data; see :mod:`vlsi.data`."""

    train: list[str] = _f(factory=list, help="training files: LLaVA or messages JSON/JSONL")
    image_root: str | None = _f(None, "directory the records' image paths are relative to "
                                      "(default: each file's directory)")
    max_length: int = _f(4096, "samples longer than this many tokens (images expanded) are skipped")
    min_pixels: int | None = _f(None, "image-processor lower bound on pixels per image")
    max_pixels: int | None = _f(None, "image-processor upper bound on pixels per image")
    strict: bool = _f(False, "stop at the first bad sample instead of skipping and counting it")

    def check(self, key: str) -> None:
        _positive(self.max_length, f"{key}.max_length")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"{key}.min_pixels ({self.min_pixels}) > {key}.max_pixels ({self.max_pixels})")


@dataclass
class VerbalizerConfig:
    """Verbalizer architecture and target layers (``None``: the default rule,
    docs/method.md#target-layers)."""

    architecture: str = _f("verb-ffn", "verb-ffn (paper), mlp, ffn, decoder, or one of them "
                                       "stacked twice (-x2); paper Table 4(f)")
    teacher_layers: list[int] | None = _f(None, "teacher target layers, 0-based (default: every "
                                                "4th from 1, the last excluded)")
    student_layers: list[int] | None = _f(None, "student target layers, 0-based (same default)")

    def check(self, key: str) -> None:
        from vlsi.verbalizer import ARCHITECTURES

        _choice(self.architecture, ARCHITECTURES, f"{key}.architecture")


@dataclass
class GenerationSettings:
    """How the student samples its responses on on-policy micro-batches (``interaction.on_policy``)."""

    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling mass (1: the whole distribution)")
    max_new_tokens: int | None = _f(None, "longest generated response; null: the longest response in the "
                                          "training data")

    def check(self, key: str) -> None:
        _positive(self.temperature, f"{key}.temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None:
            _positive(self.max_new_tokens, f"{key}.max_new_tokens")


@dataclass
class InteractionConfig:
    """Matching strategy and losses of the interaction step (paper Table 4d/4e)."""

    strategy: str = _f("vlsi", "layer matching: vlsi (Algorithm 1), random, uniform, bottom-k, "
                               "multinomial, multinomial+range, multinomial+range+order")
    scale: float = _f(2.0, "Algorithm 1's temperature scale")
    eps: float = _f(1e-6, "Algorithm 1's temperature epsilon")
    temperature_rule: str = _f("paper", "adaptive temperature: paper (T = scale / (max - min + "
                                        "eps)) or normalized (T = (max - min + eps) / scale)")
    k: int = _f(3, "pairs per student layer for bottom-k")
    temperature: float = _f(1.0, "fixed temperature of the multinomial* strategies")
    intermediate_op: str = _f("kld", "loss of matched intermediate pairs: kld, ce (the student layer's "
                                     "cross-entropy against the ground-truth tokens), l2 or none")
    last_op: str = _f("kld", "loss of the models' own outputs: kld, ce (the student's next-token loss), l2 or none")
    divergence: str = _f("forward", "divergence of the kld op and of the matching scores: forward "
                                    "KL(teacher || student), reverse, or jsd (GKD's generalised Jensen-Shannon)")
    jsd_beta: float = _f(0.5, "beta of the jsd divergence, in [0, 1] (0: forward KL, 1: reverse KL)")
    chunk_size: int = _f(DEFAULT_CHUNK_SIZE, "response tokens per chunk of the two-pass loss (memory bound)")
    teacher_cache: str | None = _f(None, "a `vlsi cache-teacher` directory: the interaction step reads the "
                                         "teacher's top-K from it and loads no teacher (vlsi distill makes it)")
    teacher_cache_top_k: int = _f(32, "K of the teacher cache: top log-probabilities kept per layer and token")
    on_policy: float = _f(0.0, "share of micro-batches whose responses the student generates, graded by the "
                               "teacher (0: the paper, the dataset's responses; 1: fully on-policy, as GKD)")
    generation: GenerationSettings = _f(factory=GenerationSettings, help="how on-policy responses are sampled")

    def check(self, key: str) -> None:
        from vlsi.losses import DIVERGENCES, OPS, SPARSE_OPS
        from vlsi.matching import STRATEGIES, TEMPERATURE_RULES

        _choice(self.strategy, STRATEGIES, f"{key}.strategy")
        _choice(self.temperature_rule, TEMPERATURE_RULES, f"{key}.temperature_rule")
        _choice(self.intermediate_op, OPS, f"{key}.intermediate_op")
        _choice(self.last_op, OPS, f"{key}.last_op")
        _choice(self.divergence, DIVERGENCES, f"{key}.divergence")
        for name in ("scale", "eps", "temperature", "k", "chunk_size", "teacher_cache_top_k"):
            _positive(getattr(self, name), f"{key}.{name}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ConfigError(f"{key}.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"{key}.on_policy must be in [0, 1], got {self.on_policy}")
        self.generation.check(f"{key}.generation")
        if self.teacher_cache is not None and self.on_policy > 0:
            raise ConfigError(f"{key}.on_policy: a teacher cache holds the teacher's view of the dataset's responses "
                              "only; on-policy interaction needs the teacher to grade the student's own tokens "
                              "(set on_policy: 0 or drop teacher_cache)")
        if self.on_policy > 0 and "ce" in (self.intermediate_op, self.last_op):
            raise ConfigError(f"{key}.on_policy: op 'ce' trains on the ground-truth responses, which on-policy "
                              "micro-batches replace by the student's own samples (set on_policy: 0 or another op)")
        if self.teacher_cache is not None:
            unsupported = [op for op in (self.intermediate_op, self.last_op) if op not in (*SPARSE_OPS, "none")]
            if unsupported or self.divergence != "forward":
                raise ConfigError(f"{key}.teacher_cache: a top-K teacher supports the ops {', '.join(SPARSE_OPS)} with "
                                  f"the forward divergence, not {self.intermediate_op}/{self.last_op}, "
                                  f"{self.divergence}")
        if self.intermediate_op == "none" and self.last_op == "none":
            raise ConfigError(f"{key}: intermediate_op and last_op are both 'none' (nothing to train)")


@dataclass
class LoraSettings:
    """LoRA on the student's language-model linear layers (interaction and SFT)."""

    r: int = _f(64, "LoRA rank (paper: 64)")
    alpha: int = _f(64, "LoRA alpha (paper: 64)")
    dropout: float = _f(0.05, "LoRA dropout")

    def check(self, key: str) -> None:
        _positive(self.r, f"{key}.r")
        _positive(self.alpha, f"{key}.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainingConfig:
    """Optimisation settings of one stage, mapped onto ``transformers.TrainingArguments``.

    The fields below are this project's defaults (the paper's, section 4.1c). Any other
    ``TrainingArguments`` field may be set beside them (``training.report_to: [wandb]``,
    ``training.optim: adamw_torch_fused``, ...): it is kept in :attr:`arguments`, passed
    through last, and validated by transformers itself (:func:`vlsi.stages.arguments.check`).
    """

    learning_rate: float = _f(1e-4, "peak learning rate (AdamW, cosine schedule)")
    min_learning_rate: float = _f(1e-6, "learning rate at the end of the cosine schedule")
    num_train_epochs: float = _f(1.0, "epochs over the training data (when max_steps is -1)")
    max_steps: int = _f(-1, "optimizer steps; -1: num_train_epochs decides")
    per_device_train_batch_size: int = _f(4, "samples per device per micro-batch")
    gradient_accumulation_steps: int = _f(16, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.0, "share of the steps spent warming the learning rate up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward (memory for time)")
    bf16: bool | Literal["auto"] = _f("auto", "bf16 mixed precision; auto: where the GPU has it")
    logging_steps: int = _f(10, "optimizer steps between log records")
    save_steps: int = _f(500, "optimizer steps between checkpoints (one is also saved at the end)")
    save_total_limit: int | None = _f(2, "checkpoints kept (older ones are deleted)")
    seed: int = _f(42, "seed of initialisation, data order and matching draws")
    dataloader_num_workers: int = _f(0, "data-loading worker processes (0: the training process "
                                        "decodes images and reads the teacher cache itself)")
    dataloader_pin_memory: bool = _f(True, "collate into pinned memory; batches then reach the GPU "
                                           "by non-blocking copies")
    report_to: list[str] = _f(factory=lambda: ["tensorboard"], help="logging integrations "
                                                                     "(TrainingArguments.report_to)")
    max_consecutive_nonfinite: int = _f(5, "non-finite losses in a row that stop the run")
    ddp_timeout: int = _f(DEFAULT_DDP_TIMEOUT, "seconds a process waits in a collective (multi-GPU) while "
                                               "another works alone, e.g. rank 0 loading a checkpoint; "
                                               "training section only")
    arguments: dict[str, Any] = _f(factory=dict, help="other TrainingArguments fields, passed through")

    def check(self, key: str) -> None:
        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "max_consecutive_nonfinite", "ddp_timeout"):
            _positive(getattr(self, name), f"{key}.{name}")
        if "ddp_timeout" in self.arguments:
            raise ConfigError(f"{key}.arguments.ddp_timeout: set {key}.ddp_timeout instead")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(f"{key}.min_learning_rate must be in [0, learning_rate], got {self.min_learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{key}.max_steps must be -1 (use epochs) or positive, got {self.max_steps}")
        if self.max_steps == -1:
            _positive(self.num_train_epochs, f"{key}.num_train_epochs")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{key}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.save_total_limit is not None:
            _positive(self.save_total_limit, f"{key}.save_total_limit")


# TrainingArguments fields the stages set themselves: a config may not override them.
RESERVED_ARGUMENTS = frozenset({"output_dir", "remove_unused_columns"})


def trainer_argument_fields() -> dict[str, Any]:
    """``TrainingArguments``' own fields (name -> dataclass field)."""
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


STAGES = ("verbalize", "interact", "sft")


@dataclass
class RunConfig:
    """A whole VLsI run: teacher, student, data and the three stages' settings.

    ``training`` holds the settings shared by all stages; ``verbalize``, ``interact`` and
    ``sft`` hold per-stage overrides (any :class:`TrainingConfig` key); :meth:`stage` merges them.
    """

    teacher: str = _f("", "the large model: a local Hugging Face checkpoint directory")
    student: str = _f("", "the small model: a local Hugging Face checkpoint directory")
    output_dir: str = _f("", "the run's directory (one sub-directory per step)")
    attn_implementation: str = _f("sdpa", "attention kernel of teacher and student in every step: sdpa, eager "
                                          "or flash_attention_2 (needs the flash_attn package and a CUDA GPU)")
    data: DataConfig = field(default_factory=DataConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    verbalize: dict[str, Any] = _f(factory=dict, help="verbalization's overrides of training")
    interact: dict[str, Any] = _f(factory=dict, help="interaction's overrides of training")
    sft: dict[str, Any] = _f(factory=dict, help="SFT's overrides of training")

    def check(self, key: str = "") -> None:
        for name in ("teacher", "student", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if not self.data.train:
            raise ConfigError("data.train: at least one training file is required")
        from vlsi.backbones import ATTN_IMPLEMENTATIONS

        _choice(self.attn_implementation, ATTN_IMPLEMENTATIONS, "attn_implementation")
        for part in ("data", "verbalizer", "interaction", "lora", "training"):
            getattr(self, part).check(part)
        for name in STAGES:
            if "ddp_timeout" in getattr(self, name):
                # the first stage's TrainingArguments set up the process group; later ones reuse it
                raise ConfigError(f"{name}.ddp_timeout: one process group serves every stage; set "
                                  "training.ddp_timeout")
            self.stage(name)  # validates the override keys and values

    def stage(self, name: str) -> TrainingConfig:
        """The :class:`TrainingConfig` of stage ``name``: ``training`` with its overrides."""
        _choice(name, STAGES, "stage")
        merged = {**dataclasses.asdict(self.training), **getattr(self, name)}
        cfg = _build(TrainingConfig, merged, name)
        cfg.check(name)
        return cfg


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, validate and return a :class:`RunConfig`.

    Relative data, model and output paths stay relative to the working directory (as in
    LLaMA-Factory and TRL configs). ``overrides`` maps dotted keys to values
    (``{"training.max_steps": 10}``), applied before validation.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = _build(RunConfig, raw, "")
    cfg.check()
    return cfg


def describe_config(cfg: RunConfig) -> str:
    """Every key of ``cfg`` with its resolved value and help text, one per line (``vlsi config``);
    the stages' merged training settings last."""
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif not (obj is cfg and f.name in STAGES):
                help_text = f.metadata.get("help", "")
                lines.append(f"{key} = {json.dumps(value)}" + (f"    # {help_text}" if help_text else ""))

    walk(cfg, "")
    for name in STAGES:
        merged = cfg.stage(name)
        changed = {k: v for k, v in dataclasses.asdict(merged).items()
                   if v != getattr(cfg.training, k)}
        lines.append(f"{name}: training settings with {json.dumps(changed) if changed else 'no overrides'}")
    return "\n".join(lines)


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (written beside every run for reproducibility)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a mapping")
    node[leaf] = value


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if cls is TrainingConfig:
        raw = _collect_trainer_arguments(raw, key)
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, sub)
        elif name in STAGES and cls is RunConfig:
            values[name] = _stage_overrides(value, sub)
        else:
            values[name] = _coerce(value, hint, sub)
    return cls(**values)


def _collect_trainer_arguments(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """Move ``TrainingArguments`` fields that are not vlsi settings into ``arguments``."""
    own = {f.name for f in dataclasses.fields(TrainingConfig)}
    extra = {k: v for k, v in raw.items() if k not in own}
    if not extra:
        return raw
    fields = trainer_argument_fields()
    for name in extra:
        if name in RESERVED_ARGUMENTS:
            raise ConfigError(f"{key}.{name}: set by vlsi itself, not configurable")
        if name not in fields:
            raise ConfigError(f"{key}.{name}: unknown key (neither a vlsi training setting nor a "
                              "transformers TrainingArguments field)")
    arguments = dict(raw.get("arguments") or {})
    arguments.update(extra)
    return {**{k: v for k, v in raw.items() if k in own}, "arguments": arguments}


def _stage_overrides(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of training settings")
    _build(TrainingConfig, value, key)  # checks keys and types now
    return dict(value)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (ints pass as floats; YAML's 1e-4 strings too)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _positive(value: float, key: str) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
