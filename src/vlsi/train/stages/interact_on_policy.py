"""On-policy micro-batches of the interaction step (``interaction.on_policy``, docs/on_policy.md).

A seeded share of the micro-batches (:func:`vlsi.method.on_policy.on_policy_draw`) replaces its
ground-truth responses by the student's own (:func:`vlsi.method.on_policy.generate_responses`); the
teacher then scores those. :class:`OnPolicyInputs` does it for the interaction trainer and logs
``on_policy/share``, ``seconds/generation``, ``on_policy/generated_tokens`` and
``on_policy/truncated``; the main process logs the first responses of each logging window
(:class:`vlsi.method.on_policy.GenerationLog`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlsi.method.on_policy import GenerationLog, generate_responses, generation_seed, on_policy_draw
from vlsi.models.backbones import end_token_ids, placeholder_token_ids
from vlsi.train.distributed import shards_parameters, vision_on_every_process


class OnPolicyInputs:
    """Trainer mixin beside :class:`vlsi.train.stages.interact_draws.MicroBatchDraws` and
    :class:`vlsi.train.stages.interact_timing.MicroBatchTiming`; the trainer holds ``self.interaction``,
    ``self.student`` and ``self.metrics`` and calls :meth:`init_on_policy` in its ``__init__``."""

    def init_on_policy(self, tokenizer: Any, max_new_tokens: int | None, generation_log: GenerationLog | None) -> None:
        """``tokenizer``: the student's (end and pad ids, logged texts); ``max_new_tokens``: the
        generation budget; both required when ``interaction.on_policy > 0``."""
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.generation_log = generation_log
        if self.interaction.on_policy > 0 and (tokenizer is None or max_new_tokens is None):
            raise ValueError("on-policy interaction needs the student's tokenizer and max_new_tokens")
        self.end_ids = end_token_ids(tokenizer, self.student.model) if self.interaction.on_policy > 0 else []
        self.placeholder_ids = placeholder_token_ids(self.student.model)

    def on_policy_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs``, or (on a drawn micro-batch) the batch of the student's own responses.

        Under ZeRO-3/FSDP on several processes every process generates when any does (each
        decoding step gathers parameters collectively), and one not drawn drops what it made.
        """
        cfg, step = self.interaction, self.micro[0]
        draws = [on_policy_draw(self.args.seed, step, self.draw(p), cfg.on_policy)
                 for p in range(self.args.world_size)]
        drawn, synced = draws[self.args.process_index], shards_parameters(self)
        generated, seconds = None, math.nan
        if drawn or (synced and any(draws)):
            clock = self.clock()
            with vision_on_every_process(self, self.student, inputs):
                generated = generate_responses(
                    self.accelerator.unwrap_model(model), inputs, self.student.model_inputs, end_ids=self.end_ids,
                    pad_token_id=self.tokenizer.pad_token_id, temperature=cfg.generation.temperature,
                    top_p=cfg.generation.top_p, max_new_tokens=self.max_new_tokens,
                    seed=generation_seed(self.args.seed, step, self.draw()), synced_gpus=synced,
                    suppress_ids=self.placeholder_ids)
            seconds = self.clock() - clock
        # every process logs the same names (MeanMetrics gathers them); NaN: nothing generated
        self.metrics.add("on_policy/share", float(drawn))
        self.metrics.add("seconds/generation", seconds if drawn else math.nan)
        lengths = [len(r) for r in generated.responses] if drawn else []
        self.metrics.add("on_policy/generated_tokens", sum(lengths) / len(lengths) if lengths else math.nan)
        self.metrics.add("on_policy/truncated",
                         1.0 - sum(generated.ended) / len(generated.ended) if drawn else math.nan)
        if not drawn:
            return inputs
        if self.generation_log is not None and self.is_world_process_zero():
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in generated.responses]
            self.generation_log.add(step + 1, step // self.args.logging_steps, texts, generated.responses,
                                    generated.ended)
        return generated.batch
