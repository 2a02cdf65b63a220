"""Which micro-batch of the interaction step is running, and the seeds drawn from it.

Matching is random (``vlsi`` samples pairs) and on-policy micro-batches are drawn at random;
both are seeded from (training seed, optimizer step, micro-batch number across processes), so a
resumed run draws what an uninterrupted one draws, and N processes draw what one process
accumulating N micro-batches draws.
"""

from __future__ import annotations

import hashlib

import torch


def matching_seed(seed: int, step: int, draw: int) -> int:
    """Seed of the matching generator for one micro-batch.

    A hash of (training seed, optimizer step, draw), where ``draw`` numbers the step's
    micro-batches across processes as one process accumulating them would see them:
    ``micro_step * world_size + process_index`` (accelerate gives process ``p`` the batches
    ``p, p + world_size, ...`` of the sampler's order). Independent of how the run got there,
    so a resumed run reproduces the draws of an uninterrupted one, and a run on N processes
    draws the pairs of one process with N times the gradient accumulation.
    """
    # the trailing ":0" keeps one-process seeds as they were when the process index was hashed
    digest = hashlib.sha256(f"vlsi-matching:{seed}:{step}:{draw}:0".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MicroBatchDraws:
    """Trainer mixin: counts training micro-batches (:meth:`advance_draw`, once per training
    ``compute_loss``) and numbers them across processes (:meth:`draw`)."""

    micro = (-1, 0)  # (optimizer step, micro-step within it)

    def advance_draw(self) -> None:
        """Count a training micro-batch: ``micro`` becomes (optimizer step, its micro-step)."""
        step = self.state.global_step
        micro = self.micro[1] + 1 if self.micro[0] == step else 0
        self.micro = (step, micro)

    def draw(self, process: int | None = None) -> int:
        """The current micro-batch's number across processes (see :func:`matching_seed`)."""
        process = self.args.process_index if process is None else process
        return self.micro[1] * self.args.world_size + process

    def matching_generator(self) -> torch.Generator:
        """The current micro-batch's matching generator (:func:`matching_seed`)."""
        return torch.Generator().manual_seed(matching_seed(self.args.seed, self.micro[0], self.draw()))
