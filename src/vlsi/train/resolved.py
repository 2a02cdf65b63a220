"""A run resolved once: where its steps write, what its two models are, what its data is.

:func:`resolve_run` turns a :class:`~vlsi.train.config.RunConfig` into a :class:`ResolvedRun`, which
pre-flight, the run identities, the plan, every stage and the teacher cache read instead of
deriving the same facts from the config again:

* paths: the step directories (:class:`RunLayout`) and each model's checkpoint directory;
* model facts (:class:`ModelFacts`, read from ``config.json`` and the safetensors headers, no
  weights loaded): ``model_type``, layers, hidden size, LM-head rows, parameters, target layers;
  the shared vocabulary; the plan's shape of each model (:class:`vlsi.models.shapes.ModelShape`);
* identities (:mod:`vlsi.train.identity`, read by :mod:`vlsi.train.fingerprint`): the data
  files' hashes with the data settings, the teacher's and the student's, the student's
  preprocessing files.

Each fact is computed on first use and kept (a step that needs no teacher never reads it); a
failure is the same one-line error as before and is raised again on the next use. The settings
(training, interaction, LoRA) stay in ``run.cfg``. One object serves one command: built after
the config is final, it does not see later changes to the config or the files.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import validate_target_layers
from vlsi.method.vocab import shared_vocab_size
from vlsi.models.backbones import checkpoint_dir, read_model_type
from vlsi.models.families import Family, family_for
from vlsi.models.shapes import ModelShape, shape_from_checkpoint
from vlsi.train.config import RunConfig
from vlsi.train.identity import identity_of_data, identity_of_teacher, model_identity, preprocessing_digest
from vlsi.train.teacher_cache import cache_complete, read_manifest

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class RunLayout:
    """Where each step of a run reads and writes, under ``root`` (the config's ``output_dir``)."""

    root: Path

    @property
    def teacher_verbalize(self) -> Path:
        return self.root / "1-teacher-verbalize"

    @property
    def student_verbalize(self) -> Path:
        return self.root / "2-student-verbalize"

    @property
    def teacher_cache(self) -> Path:
        """The default teacher cache (``vlsi cache-teacher``)."""
        return self.root / "teacher-cache"

    @property
    def interact(self) -> Path:
        return self.root / "3-interact"

    @property
    def interact_adapter(self) -> Path:
        return self.interact / "adapter"

    @property
    def sft(self) -> Path:
        return self.root / "4-sft"

    @property
    def model(self) -> Path:
        """The exported student (see :mod:`vlsi.train.export`)."""
        return self.sft / "model"

    def verbalize_dir(self, role: str) -> Path:
        _check_role(role)
        return self.teacher_verbalize if role == "teacher" else self.student_verbalize


@dataclass(frozen=True)
class ModelFacts:
    """What is known of a checkpoint without loading its weights."""

    path: Path
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int  # LM-head rows
    parameters: int
    target_layers: list[int] = field(default_factory=list)

    @property
    def family(self) -> Family:
        """The family entry of ``model_type`` (:mod:`vlsi.models.families`)."""
        return family_for(self.model_type)


def text_config(path: Path) -> dict[str, Any]:
    """The text model's part of ``path/config.json`` (the nested ``text_config`` if any)."""
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config") or config


def safetensors_parameters(path: Path) -> int:
    """Parameters of a checkpoint, summed from its safetensors headers (8-byte length + JSON)."""
    total = 0
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise VlsiError(f"{path}: no *.safetensors weights (VLsI loads safetensors checkpoints)")
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    return total


def model_facts(path: str | Path, role: str, layers: list[int] | None, parameters: int | None = None) -> ModelFacts:
    """The :class:`ModelFacts` of the checkpoint at ``path``; ``layers``: the configured target
    layers (``None``: the default rule); ``parameters``: the count to use instead of the
    safetensors headers' (a cached teacher)."""
    root = checkpoint_dir(path)
    model_type = read_model_type(root)
    family_for(model_type)  # the supported list
    text = text_config(root)
    try:
        facts = ModelFacts(root, model_type, int(text["num_hidden_layers"]), int(text["hidden_size"]),
                           int(text["vocab_size"]), parameters or safetensors_parameters(root))
    except (KeyError, TypeError, ValueError) as err:
        raise VlsiError(f"{root / 'config.json'}: cannot read the text model's shape ({err})") from None
    try:
        return replace(facts, target_layers=validate_target_layers(layers, facts.num_layers))
    except VlsiError as err:
        raise VlsiError(f"verbalizer.{role}_layers: {err}") from None


def cached_teacher_parameters(cfg: RunConfig) -> int | None:
    """With no ``*.safetensors`` in the teacher's directory, the teacher's size as recorded by the
    complete teacher cache the run reads (``interaction.teacher_cache``), which stands in for the
    weights; ``None`` where the weights are there (or no cache could stand in)."""
    root, cache = checkpoint_dir(cfg.teacher), cfg.interaction.teacher_cache
    if cache is None or any(root.glob("*.safetensors")):
        return None
    if not cache_complete(Path(cache)):
        raise VlsiError(f"{root}: no *.safetensors weights, and the teacher cache {cache} is not complete "
                        "(make it where the teacher's weights are: `vlsi cache-teacher CONFIG`)")
    parameters = read_manifest(Path(cache)).get("teacher_parameters")
    if parameters is None:
        raise VlsiError(f"{root}: no *.safetensors weights, and the teacher cache {cache} does not record the "
                        "teacher's size (made by an older version); remake it where the weights are")
    return int(parameters)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise VlsiError(f"role must be 'teacher' or 'student', got {role!r}")


@dataclass(frozen=True, eq=False)
class ResolvedRun:
    """One run's paths, model facts and identities, each computed once (see the module docstring).

    Build it with :func:`resolve_run`. ``cfg`` is the config it was resolved from; its settings
    are read from there.
    """

    cfg: RunConfig
    layout: RunLayout
    _shapes: dict[str, Any] = field(default_factory=dict, init=False, repr=False)  # role -> ModelShape

    # -- paths --------------------------------------------------------------------------------
    @cached_property
    def teacher_dir(self) -> Path:
        """The teacher's checkpoint directory (a missing one is a one-line error)."""
        return checkpoint_dir(self.cfg.teacher)

    @cached_property
    def student_dir(self) -> Path:
        return checkpoint_dir(self.cfg.student)

    def model_dir(self, role: str) -> Path:
        _check_role(role)
        return self.teacher_dir if role == "teacher" else self.student_dir

    @property
    def teacher_cache(self) -> Path | None:
        """The teacher cache the interaction reads (``interaction.teacher_cache``), if any."""
        cache = self.cfg.interaction.teacher_cache
        return None if cache is None else Path(cache)

    # -- model facts --------------------------------------------------------------------------
    def configured_layers(self, role: str) -> list[int] | None:
        """``verbalizer.{role}_layers`` as configured (``None``: the default rule)."""
        _check_role(role)
        v = self.cfg.verbalizer
        return v.teacher_layers if role == "teacher" else v.student_layers

    @cached_property
    def cached_teacher_parameters(self) -> int | None:
        """The teacher's size from the teacher cache where its weights are absent
        (:func:`cached_teacher_parameters`)."""
        return cached_teacher_parameters(self.cfg)

    @cached_property
    def teacher(self) -> ModelFacts:
        """The teacher's facts; a complete teacher cache stands in for absent weights."""
        parameters = self.cached_teacher_parameters
        return model_facts(self.teacher_dir, "teacher", self.configured_layers("teacher"), parameters)

    @cached_property
    def student(self) -> ModelFacts:
        return model_facts(self.student_dir, "student", self.configured_layers("student"))

    def facts(self, role: str) -> ModelFacts:
        _check_role(role)
        return self.teacher if role == "teacher" else self.student

    @cached_property
    def shared_vocab(self) -> int:
        """``V``: the LM-head rows teacher and student share (:func:`vlsi.method.vocab.shared_vocab_size`)."""
        return shared_vocab_size(self.teacher.vocab_size, self.student.vocab_size)

    def checkpoint_shape(self, role: str) -> ModelShape:
        """The plan's shape of ``role``'s checkpoint (:func:`vlsi.models.shapes.shape_from_checkpoint`,
        built once on the meta device), without target layers; do not change it."""
        _check_role(role)
        if role not in self._shapes:
            self._shapes[role] = shape_from_checkpoint(self.cfg.teacher if role == "teacher" else self.cfg.student)
        return self._shapes[role]

    def plan_shape(self, role: str, layers: list[int] | None = None) -> ModelShape:
        """:meth:`checkpoint_shape` with ``layers`` as its target layers (default: the configured
        ones, or the default rule), validated against its depth."""
        base = self.checkpoint_shape(role)
        if layers is not None:
            return replace(base, target_layers=validate_target_layers(list(layers), base.num_layers))
        try:
            return replace(base, target_layers=validate_target_layers(self.configured_layers(role), base.num_layers))
        except VlsiError as err:
            raise VlsiError(f"verbalizer.{role}_layers: {err}") from None

    # -- identities (vlsi.train.identity) --------------------------------------------------------
    @cached_property
    def data_identity(self) -> dict[str, Any]:
        """The data settings and every training file's hash (:func:`vlsi.train.identity.identity_of_data`)."""
        return identity_of_data(self.cfg.data)

    @cached_property
    def teacher_identity(self) -> dict[str, Any]:
        """The teacher's identity; without weights, those its complete cache recorded."""
        return identity_of_teacher(self.cfg.teacher, self.teacher_cache)

    @cached_property
    def student_identity(self) -> dict[str, Any]:
        return model_identity(self.cfg.student)

    @cached_property
    def preprocessing(self) -> str:
        """Digest of the student's tokenizer, chat template and image-processor files (they
        encode the data of every step)."""
        return preprocessing_digest(self.student_dir)


def resolve_run(cfg: RunConfig | ResolvedRun) -> ResolvedRun:
    """The :class:`ResolvedRun` of ``cfg``; a run already resolved is returned as is."""
    if isinstance(cfg, ResolvedRun):
        return cfg
    return ResolvedRun(cfg, RunLayout(Path(cfg.output_dir)))
