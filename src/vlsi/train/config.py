"""Run configuration: YAML validated into dataclasses at load time.

One YAML file describes a whole VLsI run (``vlsi distill CONFIG``) or one of its stages.
Unknown keys and out-of-range values are errors that name the key (``interaction.strategy``).
Defaults are the paper's (section 4.1c; docs/method.md#training-defaults): AdamW, cosine
schedule from 1e-4 down to 1e-6 (``cosine_with_min_lr``), gradient accumulation 16, per-device batch 4,
gradient checkpointing, bf16 where the hardware has it, LoRA r=64 alpha=64. Training settings
are ``transformers.TrainingArguments`` fields (the paper's values in :data:`TRAINING_DEFAULTS`)
beside vlsi's own (:class:`TrainingConfig`; docs/training.md#training-settings).

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

import argparse
import copy
import dataclasses
import enum
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlsi.errors import VlsiError
from vlsi.method.interaction import DEFAULT_CHUNK_SIZE
from vlsi.method.losses import DIVERGENCES, OPS, SPARSE_OPS
from vlsi.method.matching import STRATEGIES, TEMPERATURE_RULES



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
        from vlsi.method.verbalizer import ARCHITECTURES

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


# TrainingArguments values of every stage unless its config sets them, stated once: the paper's
# (section 4.1c) and, where it is silent, this library's. Any other TrainingArguments field keeps
# transformers' default unless set; AdamW and the cosine schedule (paper) are set by
# vlsi.train.stages.arguments unless the config names another `optim` / `lr_scheduler_type`.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,                 # paper
    "num_train_epochs": 1.0,               # library
    "max_steps": -1,                       # transformers' (epochs decide)
    "per_device_train_batch_size": 4,      # paper (2B/7B)
    "gradient_accumulation_steps": 16,     # paper
    "weight_decay": 0.0,                   # library
    "max_grad_norm": 1.0,                  # library
    "gradient_checkpointing": True,        # paper
    "logging_steps": 10,                   # library
    "save_steps": 500,                     # library
    "save_total_limit": 2,                 # library
    "seed": 42,                            # library
    "dataloader_num_workers": 0,           # library
    "dataloader_pin_memory": True,         # library
    "report_to": ["tensorboard"],          # library
    "ddp_timeout": DEFAULT_DDP_TIMEOUT,    # library
}

# TrainingArguments fields the stages set themselves: a config may not set them.
RESERVED_ARGUMENTS = frozenset({"output_dir", "remove_unused_columns"})


@dataclass(init=False, eq=False)
class TrainingConfig:
    """One stage's training settings: ``transformers.TrainingArguments`` fields plus vlsi's own.

    Construct it flat, as a config's ``training`` section reads:
    ``TrainingConfig(learning_rate=2e-4, min_learning_rate=2e-6, optim="adafactor")``. The fields
    below are vlsi's own; any ``TrainingArguments`` field may be given beside them and is kept,
    typed by transformers' own argument parser, in :attr:`arguments`. Reading a
    ``TrainingArguments`` field (``tcfg.learning_rate``) gives the config's value, else the
    paper's (:data:`TRAINING_DEFAULTS`), else transformers' default.
    :func:`vlsi.train.stages.arguments.training_arguments` builds the stage's ``TrainingArguments``.
    """

    min_learning_rate: float = _f(1e-6, "learning rate at the end of the cosine schedule (cosine_with_min_lr "
                                         "from learning_rate)")
    warmup_ratio: float = _f(0.0, "share of the steps spent warming the learning rate up "
                                  "(TrainingArguments.warmup_steps as a ratio)")
    bf16: bool | Literal["auto"] = _f("auto", "bf16 mixed precision; auto: where the GPU has it")
    max_consecutive_nonfinite: int = _f(5, "non-finite losses in a row that stop the run")
    arguments: dict[str, Any] = _f(factory=dict, help="the TrainingArguments fields this config sets")

    def __init__(self, arguments: dict[str, Any] | None = None, **settings: Any):
        self._load({**settings, **({"arguments": arguments} if arguments is not None else {})}, "training")

    @classmethod
    def parse(cls, raw: Any, key: str) -> TrainingConfig:
        """The settings of mapping ``raw`` (a config section); errors name ``key``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a mapping of training settings, got {type(raw).__name__}")
        tcfg = cls.__new__(cls)
        tcfg._load(raw, key)
        return tcfg

    def _load(self, raw: dict[str, Any], key: str) -> None:
        own = {f.name: f for f in dataclasses.fields(TrainingConfig) if f.name != "arguments"}
        for name, f in own.items():
            setattr(self, name, f.default)
        self.arguments = {}
        settings = _flatten_arguments(raw, key)
        hints = typing.get_type_hints(TrainingConfig)
        for name, value in settings.items():
            if name in own:
                setattr(self, name, _coerce(value, hints[name], f"{key}.{name}"))
            else:
                self.arguments[name] = _trainer_value(name, value, key)

    def explicit(self) -> dict[str, Any]:
        """What the config set, flat: vlsi's own settings and the ``TrainingArguments`` fields."""
        return {**{name: getattr(self, name) for name in _OWN_TRAINING}, **copy.deepcopy(self.arguments)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainingConfig) and self.settings() == other.settings()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "arguments" not in self.__dict__:
            raise AttributeError(name)
        if name in self.arguments:
            return self.arguments[name]
        if name in TRAINING_DEFAULTS:
            return copy.deepcopy(_paper_training()[name])
        fields = trainer_argument_fields()
        if name not in fields:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        f = fields[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def settings(self) -> dict[str, Any]:
        """Every setting that differs from transformers' defaults: :data:`TRAINING_DEFAULTS` with the
        config's values, vlsi's own, and the other ``TrainingArguments`` fields set under
        ``arguments``. Fingerprints record this form (it predates the flat spelling)."""
        other = {k: v for k, v in self.arguments.items() if k not in TRAINING_DEFAULTS}
        return {**{k: getattr(self, k) for k in TRAINING_DEFAULTS},
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arguments"},
                "arguments": copy.deepcopy(other)}

    def flat(self) -> dict[str, Any]:
        """:meth:`settings` as a config's ``training`` section spells them (``config.yaml``)."""
        settings = self.settings()
        return {**{k: v for k, v in settings.items() if k != "arguments"}, **settings["arguments"]}

    def check(self, key: str) -> None:
        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "max_consecutive_nonfinite", "ddp_timeout"):
            _positive(getattr(self, name), f"{key}.{name}")
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


_OWN_TRAINING = tuple(f.name for f in dataclasses.fields(TrainingConfig) if f.name != "arguments")


def _flatten_arguments(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """``raw`` with the former ``arguments:`` sub-mapping merged into it (both spellings load)."""
    if "arguments" not in raw:
        return raw
    arguments = raw["arguments"] or {}
    if not isinstance(arguments, dict):
        raise ConfigError(f"{key}.arguments: expected a mapping, got {arguments!r}")
    rest = {k: v for k, v in raw.items() if k != "arguments"}
    both = sorted(set(arguments) & set(rest))
    if both:
        raise ConfigError(f"{key}.arguments.{both[0]}: also set as {key}.{both[0]}; keep one")
    return {**arguments, **rest}


@functools.lru_cache(maxsize=1)
def trainer_argument_fields() -> dict[str, Any]:
    """``TrainingArguments``' own fields (name -> dataclass field)."""
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


@functools.lru_cache(maxsize=1)
def _paper_training() -> dict[str, Any]:
    """:data:`TRAINING_DEFAULTS` typed as a config's values are (``logging_steps`` is a float)."""
    return {name: _trainer_value(name, value, "TRAINING_DEFAULTS") for name, value in TRAINING_DEFAULTS.items()}


@functools.lru_cache(maxsize=1)
def _trainer_hints() -> dict[str, Any]:
    """``TrainingArguments``' annotations (``HfArgumentParser`` rewrites its fields' ``type``)."""
    from transformers import TrainingArguments

    return typing.get_type_hints(TrainingArguments)


class _ParserError(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _trainer_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """transformers' own command-line parser of ``TrainingArguments`` (``--learning_rate 1e-4``)."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)

    def error(message: str) -> typing.NoReturn:
        raise _ParserError(message)

    parser.error = error  # type: ignore[method-assign]
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a field's own option comes before its --no_ complement
        if action.option_strings:
            actions.setdefault(action.dest, action)
    return parser, actions


def _trainer_value(name: str, value: Any, key: str) -> Any:
    """``value`` of ``TrainingArguments`` field ``name`` typed as transformers types it on the
    command line (``1e-4`` strings become numbers, ``2`` epochs ``2.0``, choices checked)."""
    fields = trainer_argument_fields()
    if name in RESERVED_ARGUMENTS:
        raise ConfigError(f"{key}.{name}: set by vlsi itself, not configurable")
    if name not in fields:
        raise ConfigError(f"{key}.{name}: unknown key (neither a vlsi training setting nor a "
                          "transformers TrainingArguments field)")
    hint = _trainer_hints()[name]
    if value is None and type(None) in typing.get_args(hint):
        return value
    if isinstance(value, dict) and "dict" in str(hint):  # lr_scheduler_kwargs, fsdp_config, ...
        return value
    if value is None or isinstance(value, dict):
        raise ConfigError(f"{key}.{name}: invalid value {value!r}")
    parser, actions = _trainer_parser()
    action = actions[name]
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action.nargs not in ("+", "*") and "list" not in str(hint):
        raise ConfigError(f"{key}.{name}: expected a single value, got {value!r}")
    if any(isinstance(v, (list, dict)) for v in items):
        raise ConfigError(f"{key}.{name}: invalid value {value!r}")
    typed = []
    for item in items:
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            parsed = getattr(parser.parse_args([f"{action.option_strings[0]}={text}"]), name)
        except _ParserError as err:
            message = str(err).split(": ", 1)[-1]
            if "(choose from " in message:  # optimizers, schedulers: dozens of choices
                head, choices = message.split("(choose from ", 1)
                message = f"{head}(choose from {', '.join(choices.split(', ')[:4])}, ...)"
            raise ConfigError(f"{key}.{name}: {message}") from None
        if isinstance(item, bool) != isinstance(parsed, bool):
            raise ConfigError(f"{key}.{name}: invalid value {item!r}")
        if isinstance(parsed, list) and len(parsed) == 1:  # options of nargs "+"
            parsed = parsed[0]
        typed.append(parsed.value if isinstance(parsed, enum.Enum) else parsed)
    return typed if isinstance(value, list) else typed[0]


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
        from vlsi.models.backbones import ATTN_IMPLEMENTATIONS

        _choice(self.attn_implementation, ATTN_IMPLEMENTATIONS, "attn_implementation")
        for part in ("data", "verbalizer", "interaction", "lora", "training"):
            getattr(self, part).check(part)
        for name in STAGES:
            if "ddp_timeout" in _flatten_arguments(getattr(self, name), name):
                # the first stage's TrainingArguments set up the process group; later ones reuse it
                raise ConfigError(f"{name}.ddp_timeout: one process group serves every stage; set "
                                  "training.ddp_timeout")
            self.stage(name)  # validates the override keys and values

    def stage(self, name: str) -> TrainingConfig:
        """The :class:`TrainingConfig` of stage ``name``: ``training`` with its overrides."""
        _choice(name, STAGES, "stage")
        merged = {**self.training.explicit(), **_flatten_arguments(getattr(self, name), name)}
        cfg = TrainingConfig.parse(merged, name)
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

    def line(key: str, value: Any, help_text: str) -> None:
        lines.append(f"{key} = {json.dumps(value)}" + (f"    # {help_text}" if help_text else ""))

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if isinstance(value, TrainingConfig):
                for name, setting in value.flat().items():
                    line(f"{key}.{name}", setting, training_help(name))
            elif dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif not (obj is cfg and f.name in STAGES):
                line(key, value, f.metadata.get("help", ""))

    walk(cfg, "")
    shared = cfg.training.flat()
    for name in STAGES:
        changed = {k: v for k, v in cfg.stage(name).flat().items() if k not in shared or shared[k] != v}
        lines.append(f"{name}: training settings with {json.dumps(changed) if changed else 'no overrides'}")
    return "\n".join(lines)


def training_help(name: str) -> str:
    """Help text of training setting ``name``: vlsi's own, else transformers' (first sentence)."""
    own = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    if name in own:
        return own[name].metadata.get("help", "")
    if name == "gradient_checkpointing":  # transformers 5 calls it a deprecated alias; vlsi maps it
        return ("recompute activations in backward (memory for time); passed on as "
                "TrainingArguments.activation_checkpointing")
    text = " ".join(str(trainer_argument_fields()[name].metadata.get("help", "")).split())
    first = text.split(". ")[0].rstrip(".")
    return f"TrainingArguments: {first}" if first else "TrainingArguments field"


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (written beside every run for reproducibility)."""
    raw = dataclasses.asdict(cfg)
    raw["training"] = cfg.training.flat()
    return yaml.safe_dump(raw, sort_keys=False)


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
    if cls is TrainingConfig:
        return TrainingConfig.parse(raw, key or "training")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
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


def _stage_overrides(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of training settings")
    TrainingConfig.parse(value, key)  # checks keys and types now
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
