"""Which checkpoint a stage resumes from, told from transformers' own files.

The ``Trainer`` writes ``trainer_state.json`` last into a ``checkpoint-N`` directory (after the
model, optimizer, scheduler and RNG states), so a checkpoint is complete exactly when that file
parses and records step ``N``. A kill mid-save leaves a directory without it; it is never
resumed from and is removed before training continues. A checkpoint whose step is the run's
last (``global_step >= max_steps``) means training is finished: the stage restores its weights
and goes on to its outputs instead of training again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"


def checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint's ``trainer_state.json`` if the checkpoint is complete, else ``None``."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        step = int(path.name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return state if state.get("global_step") == step else None


def checkpoints(out_dir: Path) -> list[Path]:
    """``checkpoint-N`` directories of ``out_dir``, oldest first."""
    found = [p for p in Path(out_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    return sorted((p for p in found if p.name.rsplit("-", 1)[1].isdigit()),
                  key=lambda p: int(p.name.rsplit("-", 1)[1]))


def latest_checkpoint(out_dir: str | Path) -> str | None:
    """Newest complete checkpoint of ``out_dir`` (``None`` when there is none)."""
    for path in reversed(checkpoints(Path(out_dir))):
        if checkpoint_state(path) is not None:
            return str(path)
    return None


def remove_incomplete(out_dir: Path) -> list[str]:
    """Delete checkpoints a kill left half-written; returns their names."""
    removed = []
    for path in checkpoints(out_dir):
        if checkpoint_state(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def checkpoint_step(checkpoint: str | None) -> int:
    """Optimizer step of ``.../checkpoint-N`` (0 for ``None``)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def training_finished(checkpoint: str | None) -> bool:
    """The checkpoint is the run's last step: nothing is left to train."""
    if checkpoint is None:
        return False
    state = checkpoint_state(Path(checkpoint)) or {}
    return state.get("global_step", 0) >= state.get("max_steps", float("inf"))
