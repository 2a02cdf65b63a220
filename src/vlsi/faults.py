"""Kill points for the resume tests: a run kills itself (SIGKILL) where a test asks it to.

``VLSI_KILL_AT`` holds comma-separated points; when the running stage reaches one, the process
sends itself SIGKILL (as the OOM killer or a preempted node would). Points:

* ``<stage>:step:<N>``: after optimizer step N, before any checkpoint of it;
* ``<stage>:saved:<N>``: right after checkpoint N is complete;
* ``<stage>:outputs``: after training, before the stage's outputs are written;
* ``<stage>:complete``: after the outputs, before ``step_complete.json``;
* ``cache-teacher:samples:<N>``: after a process has added N samples of this run to its shards
  (mid-shard when N is not a multiple of the shard size).

Stages are ``verbalize``, ``interact`` and ``sft``. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "VLSI_KILL_AT"


def kill_if_asked(point: str) -> None:
    """SIGKILL this process if ``point`` is one of ``VLSI_KILL_AT``'s."""
    wanted = os.environ.get(KILL_ENV, "")
    if wanted and point in {p.strip() for p in wanted.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)
