"""Run identity: what each step's result depends on, recorded beside it, checked on every rerun.

Every step directory holds ``fingerprint.json``, written before the step trains: the inputs of
that step (:func:`step_inputs`) and their digest. A rerun or resume computes the inputs again;
if they differ, the step is refused with one line naming what differs (:func:`refusal`, raised
by :func:`vlsi.train.stages.run.check_identity`), unless the caller restarts it. So a directory
never holds a result that its config did not produce, and ``config.yaml`` (written only after
the check) describes what is on disk.

The inputs of a step:

* the settings of that step only: the ``verbalize`` / ``interact`` / ``sft`` training settings,
  the verbalizer architecture and target layers, the interaction and LoRA settings, the data
  settings. Settings that cannot change a result are left out (:data:`NOT_RESULT_SETTINGS`:
  logging, checkpoint frequency and retention, data loader workers and memory);
* model identities (:func:`vlsi.train.identity.model_identity`): the resolved path, the SHA-256 of ``config.json``
  and of each weight file (files over 128 MB by their size, first and last 8 MB, whose header
  already names every tensor, so a 144 GB teacher is not read whole); a teacher without its
  weights takes theirs from the teacher cache's manifest;
* data files by content (SHA-256; images are not hashed, their paths come from the files);
* what the step reads from earlier steps (verbalizers, the interaction adapter): the digest of
  the earlier step's own fingerprint when it has one, else of its weight files;
* the package version.

The data and model identities of a run are computed once per :class:`~vlsi.train.resolved.ResolvedRun`
(:mod:`vlsi.train.identity`); the functions
that take a run accept a :class:`~vlsi.train.config.RunConfig` too and resolve it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vlsi import __version__
from vlsi.errors import VlsiError
from vlsi.files import canonical_digest, read_json, write_json_atomic
from vlsi.train import identity
from vlsi.train.config import RunConfig
from vlsi.train.resolved import ResolvedRun, resolve_run

FINGERPRINT = "fingerprint.json"
NOT_RESULT_SETTINGS = frozenset({"logging_steps", "save_steps", "save_total_limit",
                                 "dataloader_num_workers", "dataloader_pin_memory", "report_to",
                                 "max_consecutive_nonfinite",
                                 "logging_dir", "disable_tqdm", "ddp_timeout"})
def directory_identity(path: str | Path) -> str:
    """What a later step reads from ``path``: its fingerprint digest, else its weights' digest."""
    d = Path(path)
    if (d / FINGERPRINT).is_file():
        return "step:" + read_json(d / FINGERPRINT)["digest"]
    files = sorted(p for p in d.iterdir() if p.suffix in identity.WEIGHT_SUFFIXES) if d.is_dir() else []
    return "files:" + canonical_digest({p.name: identity.file_digest(p) for p in files})


def _settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.stage(stage).settings().items() if k not in NOT_RESULT_SETTINGS}


def step_inputs(run: RunConfig | ResolvedRun, step: str, upstream: dict[str, str | None] | None = None
                ) -> dict[str, Any]:
    """The inputs of ``step`` (``teacher-verbalize``, ``student-verbalize``, ``interact``, ``sft``).

    ``run``: the run (a config is resolved here); ``upstream`` maps what the step reads from
    earlier steps (``teacher_verbalizers``, ``student_verbalizers``, ``adapter``) to their
    identity (:func:`directory_identity`, or the digest an earlier step of the same run will have).
    """
    run = resolve_run(run)
    cfg = run.cfg
    common = {"version": __version__, "data": run.data_identity, **(upstream or {})}
    if step in ("teacher-verbalize", "student-verbalize"):
        role = step.split("-")[0]
        model = run.teacher_identity if role == "teacher" else run.student_identity
        return {**common, "step": step, "model": model,
                "verbalizer": {"architecture": cfg.verbalizer.architecture, "layers": run.configured_layers(role)},
                "training": _settings(cfg, "verbalize")}
    if step == "interact":
        return {**common, "step": step, "teacher": run.teacher_identity,
                "student": run.student_identity, "verbalizer": dataclasses.asdict(cfg.verbalizer),
                "interaction": dataclasses.asdict(cfg.interaction), "lora": dataclasses.asdict(cfg.lora),
                "training": _settings(cfg, "interact")}
    if step == "sft":
        return {**common, "step": step, "student": run.student_identity,
                "lora": dataclasses.asdict(cfg.lora), "training": _settings(cfg, "sft")}
    raise VlsiError(f"unknown step {step!r}")


def digest(inputs: dict[str, Any]) -> str:
    return canonical_digest(inputs)


def differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two input records: ``"interaction.strategy: 'vlsi'
    -> 'uniform'"``; nested mappings are walked, other values compared whole."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in before:
                out.append(f"{name}: added")
            elif key not in after:
                out.append(f"{name}: removed")
            else:
                out += differences(before[key], after[key], name)
        return out
    if before != after:
        def short(v: Any) -> str:
            text = json.dumps(v) if not isinstance(v, str) else repr(v)
            return text if len(text) <= 60 else text[:57] + "..."
        return [f"{prefix}: {short(before)} -> {short(after)}"]
    return []


def recorded(step_dir: Path) -> dict[str, Any] | None:
    path = Path(step_dir) / FINGERPRINT
    return read_json(path) if path.is_file() else None


def changed(step_dir: Path, inputs: dict[str, Any]) -> list[str] | None:
    """``None`` when ``step_dir`` has no fingerprint; else the differences (empty: same inputs)."""
    before = recorded(step_dir)
    if before is None:
        return None
    return differences(before["inputs"], inputs)


UNRECORDED = "no fingerprint.json (made before run identities were recorded)"


def changed_or_unrecorded(step_dir: Path, inputs: dict[str, Any]) -> list[str]:
    """The differences of :func:`changed`; a directory with content but no fingerprint (made by
    an older version) counts as different. Empty: same inputs, or nothing there yet."""
    diffs = changed(step_dir, inputs)
    if diffs is None:
        return [UNRECORDED] if step_dir.is_dir() and any(step_dir.iterdir()) else []
    return diffs


def write(step_dir: Path, inputs: dict[str, Any]) -> str:
    step_dir.mkdir(parents=True, exist_ok=True)
    d = digest(inputs)
    write_json_atomic(step_dir / FINGERPRINT, {"digest": d, "inputs": inputs})
    return d


class ChangedInputsError(VlsiError):
    """A step directory holds a result of other inputs."""


def refusal(step_dir: Path, diffs: list[str], hint: str) -> ChangedInputsError:
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return ChangedInputsError(f"{step_dir} holds a result of other inputs ({shown}); use a new "
                              f"output directory, or {hint}")
