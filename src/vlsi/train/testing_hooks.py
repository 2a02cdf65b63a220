"""Faults the tests inject: kill points (SIGKILL) and non-finite losses.

``VLSI_KILL_AT`` holds comma-separated points; when the running stage reaches one, the process
sends itself SIGKILL (as the OOM killer or a preempted node would). Points:

* ``<stage>:step:<N>``: after optimizer step N, before any checkpoint of it;
* ``<stage>:saved:<N>``: right after checkpoint N is complete;
* ``<stage>:outputs``: after training, before the stage's outputs are written;
* ``<stage>:complete``: after the outputs, before ``step_complete.json``;
* ``cache-teacher:samples:<N>``: after a process has added N samples of this run to its shards
  (mid-shard when N is not a multiple of the shard size).

Stages are ``verbalize``, ``interact`` and ``sft``. Unset, nothing happens.

``VLSI_NAN_AT`` holds comma-separated ``<stage>:step:<N>``: the training loss of optimizer step N
(every micro-batch of it) is NaN on the main process, as an overflow there would make it.
"""

from __future__ import annotations

import os
import signal

import torch

KILL_ENV = "VLSI_KILL_AT"
NAN_ENV = "VLSI_NAN_AT"


def _asked(env: str, point: str) -> bool:
    wanted = os.environ.get(env, "")
    return bool(wanted) and point in {p.strip() for p in wanted.split(",")}


def kill_if_asked(point: str) -> None:
    """SIGKILL this process if ``point`` is one of ``VLSI_KILL_AT``'s."""
    if _asked(KILL_ENV, point):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_if_asked(point: str, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times NaN (still in its graph) if ``point`` is one of ``VLSI_NAN_AT``'s."""
    return loss * float("nan") if _asked(NAN_ENV, point) else loss
