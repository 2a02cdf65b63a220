"""Constants and small helpers shared by the test files (``from helpers import ...``; pytest puts
``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there).

The fixtures built on them (tiny models, synthetic data, the shared ``vlsi distill`` runs) are in
``tests/conftest.py``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-qwen2vl.yaml"
# the step directories of ``vlsi distill``, in order
STEPS = ("1-teacher-verbalize", "2-student-verbalize", "3-interact", "4-sft")
# every file of weights a distill run trains or exports
WEIGHTS = ("1-teacher-verbalize/verbalizers.safetensors", "2-student-verbalize/verbalizers.safetensors",
           "3-interact/adapter/adapter_model.safetensors", "4-sft/adapter/adapter_model.safetensors",
           "4-sft/model/model.safetensors")

# the session's shared ``vlsi distill`` runs (tests/conftest.py: ``distilled``, ``resumed``):
# 4 optimizer steps per stage of 2 micro-batches of 2 samples, a checkpoint every 2 steps
DISTILL_SETTINGS = {"training.max_steps": 4, "training.save_steps": 2, "training.logging_steps": 1,
                    "training.gradient_accumulation_steps": 2, "training.per_device_train_batch_size": 2}
# the training file's third record names an image that does not exist: every step skips it
MISSING_IMAGE = "images/missing.png"
# the kill points of the shared killed-and-resumed run (``make test-all`` runs every kill point):
# mid-step with checkpoint-2 written, right after the last checkpoint (training over, the outputs
# not written), after a middle checkpoint
RESUME_KILL_POINTS = ("verbalize:step:3", "interact:saved:4", "sft:saved:2")


def free_port() -> int:
    """A TCP port nothing listens on now (for a launcher's ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``set_args({"a.b": 1})`` -> ``["--set", "a.b=1"]`` (JSON values are valid YAML)."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def status_lines(stdout: str) -> list[str]:
    """``vlsi distill``'s ``[k/n] step: ...`` lines (not other libraries' ``[date] [WARNING]`` lines)."""
    return [line for line in stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a command that exited with 2 (no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    return one_line(proc.stderr)


def one_line(stderr: str) -> str:
    """``stderr`` is one ``error: ...`` line and nothing else; returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]
