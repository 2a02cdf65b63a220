"""``vlsi distill CONFIG``: the whole VLsI pipeline into one output directory.

    vlsi distill configs/qwen2vl-72b-to-7b.yaml [--no-resume] [--set training.max_steps=100]

Four steps, one sub-directory each, under the config's ``output_dir``::

    config.yaml                the resolved config of the latest invocation
    1-teacher-verbalize/       verbalizers of the teacher (verbalizers.safetensors + .json)
    2-student-verbalize/       verbalizers of the student
    3-interact/                adapter/ (the student's LoRA), matches.json, heatmaps
    4-sft/                     adapter/, model/ (the exported student, model/verbalizers/)

Every step writes ``step_complete.json`` when it has finished. A finished step is never run
again (delete its directory to rerun it); an unfinished one with checkpoints continues from
the newest (``resume=False``: its directory is removed and the step starts over). One status
line per step is printed, by the main process only.

Launch it like any stage (``accelerate launch -m vlsi.cli distill CONFIG``): every process runs
the same steps, and each step's Trainer shares the work.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlsi.config import RunConfig, dump_config
from vlsi.errors import VlsiError
from vlsi.stages.common import STEP_COMPLETE, latest_checkpoint, stage_complete

CONFIG_FILE = "config.yaml"


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
        """The exported student (see :mod:`vlsi.export`)."""
        return self.sft / "model"

    def verbalize_dir(self, role: str) -> Path:
        if role not in ("teacher", "student"):
            raise VlsiError(f"role must be 'teacher' or 'student', got {role!r}")
        return self.teacher_verbalize if role == "teacher" else self.student_verbalize


def layout(cfg: RunConfig) -> RunLayout:
    return RunLayout(Path(cfg.output_dir))


def run_distill(cfg: RunConfig, *, resume: bool = True) -> Path:
    """Run the unfinished steps of the pipeline in order; returns the exported student's path."""
    from vlsi.stages.interact import run_interact
    from vlsi.stages.sft import run_sft
    from vlsi.stages.verbalize import run_verbalize

    run = layout(cfg)
    main = _is_main_process()
    if main:
        _write_config(cfg, run.root)

    steps: list[tuple[str, Path, Callable[[bool], object]]] = [
        ("teacher verbalization", run.teacher_verbalize,
         lambda r: run_verbalize(cfg, "teacher", run.teacher_verbalize, resume=r)),
        ("student verbalization", run.student_verbalize,
         lambda r: run_verbalize(cfg, "student", run.student_verbalize, resume=r)),
        ("interaction", run.interact,
         lambda r: run_interact(cfg, run.interact, teacher_verbalizers=run.teacher_verbalize,
                                student_verbalizers=run.student_verbalize, resume=r)),
        ("SFT and export", run.sft,
         lambda r: run_sft(cfg, run.sft, adapter=run.interact_adapter,
                           student_verbalizers=run.student_verbalize, resume=r)),
    ]
    # Decide every step's fate before running any, so all processes take the same decisions.
    plans = [_plan(step_dir, resume) for _, step_dir, _ in steps]
    for k, ((name, step_dir, run_step), plan) in enumerate(zip(steps, plans), start=1):
        if main:
            print(f"[{k}/{len(steps)}] {name}: {plan.describe(step_dir)}", flush=True)
        if plan.action == "skip":
            continue
        if plan.action == "restart" and main:
            shutil.rmtree(step_dir)
        run_step(plan.action == "resume")
        if main and not stage_complete(step_dir):
            raise VlsiError(f"{name} returned without writing {step_dir / STEP_COMPLETE}")
    if main:
        print(f"done: the distilled student is {run.model}", flush=True)
    return run.model


@dataclass(frozen=True)
class _Plan:
    action: str  # "skip", "start", "resume" or "restart"
    checkpoint: str | None = None

    def describe(self, step_dir: Path) -> str:
        if self.action == "skip":
            return f"done, skipped ({step_dir})"
        if self.action == "resume":
            return f"resuming from {self.checkpoint}"
        if self.action == "restart":
            return f"restarting: removing the unfinished {step_dir} (--no-resume)"
        return f"starting ({step_dir})"


def _plan(step_dir: Path, resume: bool) -> _Plan:
    if stage_complete(step_dir):
        return _Plan("skip")
    checkpoint = latest_checkpoint(step_dir)
    if checkpoint is not None and resume:
        return _Plan("resume", checkpoint)
    if step_dir.exists() and any(step_dir.iterdir()) and not resume:
        return _Plan("restart")
    return _Plan("start")


def _write_config(cfg: RunConfig, root: Path) -> None:
    """Write the resolved config; say so when it differs from the one already there."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CONFIG_FILE
    text = dump_config(cfg)
    if path.is_file() and path.read_text() != text:
        print(f"note: the config differs from the one in {path} (finished steps keep their "
              "results); overwriting it", flush=True)
    path.write_text(text)


def _is_main_process() -> bool:
    """Global rank 0 (``accelerate launch``/``torchrun`` set ``RANK``), before any Trainer."""
    return int(os.environ.get("RANK", "0")) == 0
