"""Which layer pairs the matching selected during training (data for the paper's Fig. 5).

:class:`MatchRecorder` counts selected ``(student layer i, teacher layer j)`` pairs over the
interaction step and keeps a per-update history, so that the matching at the start of training
can be compared with the matching at the end. :class:`MatchLog` also appends every update to a
JSONL file, so that a resumed run keeps the history of the steps before its checkpoint.
Plotting is :func:`vlsi.train.heatmap.save_match_heatmaps`.

JSON layout (``to_json``)::

    {"t_s": 7, "t_l": 20, "strategy": "vlsi",
     "student_layers": [1, 5, ...], "teacher_layers": [1, 5, ...],    # or null
     "counts": [[...t_l ints...], ...t_s rows],
     "history": [[step, [i * t_l + j, ...]], ...]}                     # one entry per update
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from vlsi.files import read_jsonl, write_text_atomic


class MatchRecorder:
    """Counts of selected layer pairs, overall and per recorded step.

    Args:
        t_s, t_l: number of student and teacher target layers.
        student_layers, teacher_layers: optional decoder-layer ids of the target layers, kept
            for labelling plots (lengths ``t_s`` and ``t_l``).
        strategy: optional matching strategy name, kept for labelling.
    """

    def __init__(
        self,
        t_s: int,
        t_l: int,
        *,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        strategy: str | None = None,
    ):
        if t_s < 1 or t_l < 1:
            raise ValueError(f"t_s and t_l must be >= 1, got {t_s}, {t_l}")
        for name, ids, size in (("student_layers", student_layers, t_s), ("teacher_layers", teacher_layers, t_l)):
            if ids is not None and len(ids) != size:
                raise ValueError(f"{name} has {len(ids)} ids, expected {size}")
        self.t_s, self.t_l = t_s, t_l
        self.student_layers = None if student_layers is None else [int(x) for x in student_layers]
        self.teacher_layers = None if teacher_layers is None else [int(x) for x in teacher_layers]
        self.strategy = strategy
        # One (step, flat pair indices i * t_l + j) per update; several updates may share a step
        # (one per micro-batch under gradient accumulation).
        self.history: list[tuple[int, list[int]]] = []

    def update(self, weights: Tensor, step: int) -> None:
        """Record the pairs with ``weights > 0`` (``[t_s, t_l]``) selected at optimizer ``step``."""
        if tuple(weights.shape) != (self.t_s, self.t_l):
            raise ValueError(f"weights must be [{self.t_s}, {self.t_l}], got {list(weights.shape)}")
        flat = (weights.detach() > 0).flatten().nonzero().flatten().tolist()
        self.history.append((int(step), flat))

    def _selected_steps(self, first_fraction: float | None, last_fraction: float | None) -> set[int] | None:
        """Distinct steps inside the requested fraction; ``None`` means all."""
        if first_fraction is not None and last_fraction is not None:
            raise ValueError("give first_fraction or last_fraction, not both")
        fraction = first_fraction if first_fraction is not None else last_fraction
        if fraction is None:
            return None
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        steps = sorted({step for step, _ in self.history})
        keep = math.ceil(fraction * len(steps))
        return set(steps[:keep] if first_fraction is not None else steps[len(steps) - keep :])

    def counts(self, first_fraction: float | None = None, last_fraction: float | None = None) -> Tensor:
        """Selection counts ``[t_s, t_l]`` (int64).

        Args:
            first_fraction: only the first ``ceil(fraction * steps)`` distinct recorded steps.
            last_fraction: only the last ``ceil(fraction * steps)`` distinct recorded steps.
        """
        steps = self._selected_steps(first_fraction, last_fraction)
        counts = torch.zeros(self.t_s * self.t_l, dtype=torch.int64)
        for step, flat in self.history:
            if steps is None or step in steps:
                counts[flat] += 1
        return counts.view(self.t_s, self.t_l)

    @property
    def num_updates(self) -> int:
        return len(self.history)

    def to_json(self, path: str | Path) -> None:
        """Write counts and history (layout in the module docstring)."""
        payload = {
            "t_s": self.t_s,
            "t_l": self.t_l,
            "strategy": self.strategy,
            "student_layers": self.student_layers,
            "teacher_layers": self.teacher_layers,
            "counts": self.counts().tolist(),
            "history": [[step, flat] for step, flat in self.history],
        }
        Path(path).write_text(json.dumps(payload, separators=(",", ":")) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "MatchRecorder":
        """Read a file written by :meth:`to_json`; the counts are rebuilt from the history."""
        payload = json.loads(Path(path).read_text())
        recorder = cls(
            payload["t_s"],
            payload["t_l"],
            student_layers=payload.get("student_layers"),
            teacher_layers=payload.get("teacher_layers"),
            strategy=payload.get("strategy"),
        )
        recorder.history = [(int(step), [int(x) for x in flat]) for step, flat in payload["history"]]
        if recorder.counts().tolist() != payload.get("counts", recorder.counts().tolist()):
            raise ValueError(f"{path}: counts do not match the history")
        return recorder


class MatchLog:
    """A :class:`MatchRecorder` whose updates are also appended to ``matches.jsonl``.

    One line per update: ``{"step": 3, "pairs": [i * t_l + j, ...]}``. Opening it keeps the lines
    with ``step <= keep_until`` (the resumed checkpoint's step; 0 for a fresh run) and replays
    them into the recorder.
    """

    def __init__(self, path: str | Path, recorder: MatchRecorder, *, keep_until: int = 0):
        self.path = Path(path)
        self.recorder = recorder
        kept = [r for r in read_jsonl(self.path) if r["step"] <= keep_until]
        recorder.history = [(int(r["step"]), [int(x) for x in r["pairs"]]) for r in kept]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def add(self, weights: Tensor, step: int) -> None:
        """Record the pairs with weight > 0 in ``weights`` ``[t_s, t_l]`` at optimizer ``step``."""
        self.recorder.update(weights, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "pairs": self.recorder.history[-1][1]}) + "\n")
