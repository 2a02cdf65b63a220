"""How much the distillation targets say beyond the labels: the demo's ``regime`` numbers.

KD can only add to SFT what its targets hold beyond the ground truth. Measured on the first
``samples`` distillation samples, over their response tokens (the positions the interaction
compares, :func:`vlsi.method.verbalizer.prediction_positions`), with the frozen teacher in ``eval()``
and its trained verbalizers, over the shared vocabulary:

* ``teacher_entropy_nats``: mean entropy of the teacher's last-layer distribution ``P``;
* ``teacher_label_kl_nats``: mean ``KL(onehot(y) || P) = -log P(y)`` against the label ``y``
  (0 when the teacher's target is the label itself); ``teacher_label_probability`` is the mean
  ``P(y)``;
* ``verbalized``: the same three for each teacher target layer's verbalized distribution;
* ``student_target_layers``, ``teacher_target_layers``: ``t_s`` and ``t_l``;
  ``mean_response_tokens``: response tokens per sample.

Means are over all response tokens of the measured samples. ``vlsi demo regime CONFIG
TEACHER_VERBALIZERS [--samples N]`` prints them as JSON for a run config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlsi.method.losses import label_ce_logprobs, log_probs
from vlsi.method.verbalizer import (VerbalizerSet, capture_hidden_states, capture_layer_context, prediction_positions,
                                    response_labels)
from vlsi.method.vocab import shared_vocab_size
from vlsi.models.backbones import load_backbone
from vlsi.train.config import RunConfig, load_config
from vlsi.train.resolved import ResolvedRun, resolve_run
from vlsi.train.stages.training_data import load_training_data

REGIME_FILE = "regime.json"


def distribution_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over tokens of entropy, ``-log P(y)`` and ``P(y)``: logits ``[N, V]``, labels long ``[N]``."""
    log_p = log_probs(logits)
    entropy = -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(dim=-1)
    label_kl = label_ce_logprobs(log_p, labels)
    return {"entropy_nats": float(entropy.double().sum()), "label_kl_nats": float(label_kl.double().sum()),
            "label_probability": float((-label_kl).double().exp().sum())}


@torch.no_grad()
def measure_regime(run: RunConfig | ResolvedRun, teacher_verbalizers: str | Path, samples: int, batch_size: int = 32
                   ) -> dict[str, Any]:
    """The numbers of the module docstring for the run's teacher, student and training data.

    Args:
        run: a run (teacher, student, ``data``, ``verbalizer.student_layers``); a config is
            resolved here (:func:`vlsi.train.resolved.resolve_run`).
        teacher_verbalizers: a ``vlsi verbalize --role teacher`` directory for the run's teacher.
        samples: the first this many training samples are measured (all if fewer).
        batch_size: samples per teacher forward.
    """
    run = resolve_run(run)
    teacher_dir, student, cfg = run.teacher_dir, run.student, run.cfg
    dataset, collator, _ = load_training_data(cfg.data, teacher_dir)
    teacher = load_backbone(teacher_dir)
    teacher.model.requires_grad_(False).eval()
    vset = VerbalizerSet.load(teacher_verbalizers, teacher).eval()
    vocab = shared_vocab_size(teacher.vocab_size, student.vocab_size)
    count = min(samples, len(dataset))
    t = vset.num_targets
    sums = [dict.fromkeys(("entropy_nats", "label_kl_nats", "label_probability"), 0.0) for _ in range(t + 1)]
    tokens = 0
    for a in range(0, count, batch_size):
        batch = collator([dataset[k] for k in range(a, min(a + batch_size, count))])
        positions = prediction_positions(batch["labels"])
        with capture_layer_context(teacher) as ctx, capture_hidden_states(teacher, vset.layers) as states:
            teacher.model(**teacher.model_inputs(batch), use_cache=False, logits_to_keep=1)
            stack, fn = vset.response_inputs(states, positions, ctx, transformed=True)
        labels = response_labels(batch["labels"], positions)
        tokens += labels.numel()
        for k in range(t + 1):  # target layers, then the model's own head (index t)
            for name, value in distribution_stats(fn(k, stack[k])[:, :vocab], labels).items():
                sums[k][name] += value
    means = [{name: value / max(tokens, 1) for name, value in layer.items()} for layer in sums]
    return {
        "samples": count,
        "data": [str(f) for f in cfg.data.train],
        "teacher_verbalizers": str(teacher_verbalizers),
        "student_target_layers": len(student.target_layers),
        "teacher_target_layers": t,
        "mean_response_tokens": tokens / max(count, 1),
        "teacher_entropy_nats": means[t]["entropy_nats"],
        "teacher_label_kl_nats": means[t]["label_kl_nats"],
        "teacher_label_probability": means[t]["label_probability"],
        "verbalized": [{"layer": layer, **means[k]} for k, layer in enumerate(vset.layers)],
    }


def demo_regime(out: Path, config: str | Path, teacher_verbalizers: str | Path, samples: int,
                data: str | Path | None = None) -> dict[str, Any]:
    """:func:`measure_regime` for a demo run, kept in ``out/regime.json`` and reused by a rerun
    of the same config, verbalizers, data and sample count.

    ``data``: a training file to read instead of the config's (the demo passes the first
    ``samples`` records of its distillation data, so that the rest is not scanned).
    """
    path = Path(out) / REGIME_FILE
    key = {"config": str(config), "teacher_verbalizers": str(teacher_verbalizers), "samples_asked": samples,
           "data_asked": None if data is None else str(data)}
    if path.is_file():
        kept = json.loads(path.read_text())
        if all(kept.get(k) == v for k, v in key.items()):
            return kept
    cfg = load_config(config, None if data is None else {"data.train": [str(data)]})
    result = {**measure_regime(cfg, teacher_verbalizers, samples), **key}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def regime_rows(regime: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's table: one row per teacher distribution (verbalized layers, then the last)."""
    head = ["teacher distribution", "entropy (nats)", "KL(label ‖ teacher) (nats)", "mean label probability"]
    rows = [[f"verbalized layer {v['layer']}", f"{v['entropy_nats']:.3f}", f"{v['label_kl_nats']:.3f}",
             f"{v['label_probability']:.3f}"] for v in regime["verbalized"]]
    rows.append(["last layer (the model's output)", f"{regime['teacher_entropy_nats']:.3f}",
                 f"{regime['teacher_label_kl_nats']:.3f}", f"{regime['teacher_label_probability']:.3f}"])
    return head, rows


def regime_line(regime: dict[str, Any]) -> str:
    """One sentence: layer counts, response length, the samples measured."""
    return (f"Measured on {regime['samples']} distillation samples, {regime['mean_response_tokens']:.2f} response "
            f"tokens each; student target layers t_s = {regime['student_target_layers']}, teacher target layers "
            f"t_l = {regime['teacher_target_layers']}. KL(label ‖ teacher) = -log P(label): 0 when the "
            "teacher's target is the label itself.")
