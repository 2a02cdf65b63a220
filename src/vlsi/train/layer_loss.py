"""The per-layer verbalization loss over training: the paper's appendix B table.

While the verbalizers train, :class:`LayerLossLog` keeps each optimizer step's mean loss per
target layer (``layer_loss_steps.jsonl``) and :class:`LayerLossCallback` rewrites the table
(``layer_loss.json`` / ``.md``) whenever the window of a milestone (10/30/50/70/90/100% of
training) closes. Each column is the mean over a window of steps around its milestone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from vlsi.files import read_jsonl, write_json_atomic

MILESTONES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
LOSS_WINDOW = 0.1  # each table column averages the steps of a window this wide (fraction of training)
LAYER_LOSS_STEPS = "layer_loss_steps.jsonl"


class LayerLossLog:
    """Per-optimizer-step mean loss of each target layer, kept in memory and in a JSONL file.

    One line per step: ``{"step": 12, "loss": [l_0, ..., l_{t-1}]}``. Written by the main
    process only; on resume the lines after the checkpoint are dropped and the rest reloaded.
    """

    def __init__(self, path: str | Path, layers: list[int], *, keep_until: int = 0):
        self.path = Path(path)
        self.layers = list(layers)
        self.rows: list[tuple[int, list[float]]] = []
        self._pending: list[Tensor] = []
        for record in read_jsonl(self.path):
            if record["step"] <= keep_until:
                self.rows.append((int(record["step"]), [float(x) for x in record["loss"]]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in self.rows))

    def add(self, losses: Tensor) -> None:
        """One micro-batch's per-layer losses ``[t]`` (detached)."""
        self._pending.append(losses.detach().float().cpu())

    def flush(self, step: int) -> None:
        """Close optimizer ``step``: average its finite micro-batch losses into one row."""
        if not self._pending:
            return
        stacked = torch.stack(self._pending)
        self._pending = []
        finite = torch.isfinite(stacked).all(dim=1)
        if not finite.any():
            return
        row = stacked[finite].mean(dim=0).tolist()
        self.rows.append((step, row))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "loss": row}) + "\n")


def milestone_window(fraction: float, total_steps: int, window: float = LOSS_WINDOW) -> tuple[int, int]:
    """First and last step (1-based, inclusive) of the window around ``fraction`` of training.

    The window is ``window * total_steps`` steps wide (at least one), centred on the milestone
    and shifted to end at the last step when it would run past it (the 100% column).
    """
    width = max(1, round(window * total_steps))
    last = min(total_steps, max(1, round(fraction * total_steps + width / 2)))
    return max(1, last - width + 1), last


def layer_loss_table(
    rows: list[tuple[int, list[float]]],
    layers: list[int],
    total_steps: int,
    milestones: tuple[float, ...] = MILESTONES,
    window: float = LOSS_WINDOW,
) -> dict[str, Any]:
    """Mean loss per target layer in the window of each milestone (paper appendix B).

    Args:
        rows: ``(step, [loss per layer])`` per optimizer step.
        layers: decoder-layer index of each target layer.
        total_steps: the run's number of optimizer steps.

    Returns:
        ``{"columns": ["10%", ...], "steps": {"10%": [first, last]}, "layers": [...],
        "loss": {"<layer>": [mean or None per column]}, "total_steps", "window"}``; a column
        whose window holds no recorded step is ``None``.
    """
    columns = [f"{round(100 * m)}%" for m in milestones]
    windows = [milestone_window(m, total_steps, window) for m in milestones]
    loss: dict[str, list[float | None]] = {str(layer): [] for layer in layers}
    for first, last in windows:
        inside = [values for step, values in rows if first <= step <= last]
        for k, layer in enumerate(layers):
            loss[str(layer)].append(sum(v[k] for v in inside) / len(inside) if inside else None)
    return {
        "total_steps": total_steps,
        "window": window,
        "columns": columns,
        "steps": {c: list(w) for c, w in zip(columns, windows)},
        "layers": list(layers),
        "loss": loss,
    }


def format_layer_loss_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown, one row per target layer (decoder-layer index)."""
    head = "| target layer | " + " | ".join(table["columns"]) + " |"
    rule = "|---" * (len(table["columns"]) + 1) + "|"
    lines = [head, rule]
    for layer in table["layers"]:
        cells = ["—" if v is None else f"{v:.4f}" for v in table["loss"][str(layer)]]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    steps = ", ".join(f"{c}: steps {a}-{b}" for c, (a, b) in table["steps"].items())
    return ("Verbalization loss per target layer (% = training progress; each column is the mean "
            "over a window of steps around it).\n\n" + "\n".join(lines) + f"\n\nWindows: {steps}.\n")


def write_layer_loss_table(out_dir: Path, log: LayerLossLog, total_steps: int) -> dict[str, Any]:
    table = layer_loss_table(log.rows, log.layers, total_steps)
    write_json_atomic(out_dir / "layer_loss.json", table)
    (out_dir / "layer_loss.md").write_text(format_layer_loss_markdown(table))
    return table


class LayerLossCallback(TrainerCallback):
    """Closes each optimizer step's row and rewrites the table when a milestone window ends."""

    def __init__(self, log: LayerLossLog, out_dir: Path):
        self.log = log
        self.out_dir = out_dir

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.log.flush(state.global_step)
        window_ends = {milestone_window(m, state.max_steps)[1] for m in MILESTONES}
        if state.global_step in window_ends:
            write_layer_loss_table(self.out_dir, self.log, state.max_steps)
