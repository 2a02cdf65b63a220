"""Run configuration: YAML validated into dataclasses at load time.

One YAML file describes a whole VLsI run (``vlsi distill CONFIG``) or one of its stages.
Unknown keys and out-of-range values are errors that name the key (``interaction.strategy``).
Defaults are the paper's (SPEC "Training defaults", section 4.1c): AdamW, cosine schedule from
1e-4 down to 1e-6 (``cosine_with_min_lr``), gradient accumulation 16, per-device batch 4,
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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlsi.errors import VlsiError


class ConfigError(VlsiError):
    """A configuration problem; the message names the offending key."""


@dataclass
class DataConfig:
    """Training (and optional evaluation) data; see :mod:`vlsi.data`."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    image_root: str | None = None
    max_length: int = 4096
    min_pixels: int | None = None
    max_pixels: int | None = None
    strict: bool = False

    def check(self, key: str) -> None:
        _positive(self.max_length, f"{key}.max_length")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"{key}.min_pixels ({self.min_pixels}) > {key}.max_pixels ({self.max_pixels})")


@dataclass
class VerbalizerConfig:
    """Verbalizer architecture and target layers (``None``: the SPEC's default rule)."""

    architecture: str = "verb-ffn"
    teacher_layers: list[int] | None = None
    student_layers: list[int] | None = None

    def check(self, key: str) -> None:
        from vlsi.verbalizer import ARCHITECTURES

        _choice(self.architecture, ARCHITECTURES, f"{key}.architecture")


@dataclass
class InteractionConfig:
    """Matching strategy and losses of the interaction step (paper Table 4d/4e)."""

    strategy: str = "vlsi"
    scale: float = 2.0
    eps: float = 1e-6
    temperature_rule: str = "paper"
    k: int = 3
    temperature: float = 1.0
    intermediate_op: str = "kld"
    last_op: str = "kld"
    divergence: str = "forward"
    chunk_size: int = 256

    def check(self, key: str) -> None:
        from vlsi.losses import OPS
        from vlsi.matching import STRATEGIES, TEMPERATURE_RULES

        _choice(self.strategy, STRATEGIES, f"{key}.strategy")
        _choice(self.temperature_rule, TEMPERATURE_RULES, f"{key}.temperature_rule")
        _choice(self.intermediate_op, OPS, f"{key}.intermediate_op")
        _choice(self.last_op, OPS, f"{key}.last_op")
        _choice(self.divergence, ("forward", "reverse"), f"{key}.divergence")
        for name in ("scale", "eps", "temperature", "k", "chunk_size"):
            _positive(getattr(self, name), f"{key}.{name}")
        if self.intermediate_op == "none" and self.last_op == "none":
            raise ConfigError(f"{key}: intermediate_op and last_op are both 'none' (nothing to train)")


@dataclass
class LoraSettings:
    """LoRA on the student's language-model linear layers (interaction and SFT)."""

    r: int = 64
    alpha: int = 64
    dropout: float = 0.05

    def check(self, key: str) -> None:
        _positive(self.r, f"{key}.r")
        _positive(self.alpha, f"{key}.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainingConfig:
    """Optimisation settings of one stage; mapped onto ``transformers.TrainingArguments``."""

    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-6
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 16
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    bf16: bool | Literal["auto"] = "auto"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    dataloader_num_workers: int = 0
    max_consecutive_nonfinite: int = 5

    def check(self, key: str) -> None:
        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "max_consecutive_nonfinite"):
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


STAGES = ("verbalize", "interact", "sft")


@dataclass
class RunConfig:
    """A whole VLsI run: teacher, student, data and the three stages' settings.

    ``training`` holds the settings shared by all stages; ``verbalize``, ``interact`` and
    ``sft`` hold per-stage overrides (any :class:`TrainingConfig` key); :meth:`stage` merges them.
    """

    teacher: str = ""
    student: str = ""
    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    verbalize: dict[str, Any] = field(default_factory=dict)
    interact: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)

    def check(self, key: str = "") -> None:
        for name in ("teacher", "student", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if not self.data.train:
            raise ConfigError("data.train: at least one training file is required")
        for part in ("data", "verbalizer", "interaction", "lora", "training"):
            getattr(self, part).check(part)
        for name in STAGES:
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
