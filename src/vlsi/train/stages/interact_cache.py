"""The interaction step's teacher read from a teacher cache (``interaction.teacher_cache``).

With a cache no teacher loads: :func:`open_run_cache` checks the cache against the run before
anything loads, :func:`keyed_collator` checks that every sample is in it and makes the collator
add each batch's cached top-K, and :func:`cached_teacher` turns those batch entries into the
:class:`vlsi.method.interaction.SparseTeacher` the interaction loss takes in place of the teacher's
forward. The cache itself: :mod:`vlsi.train.teacher_cache`; making it: :mod:`vlsi.train.stages.cache_teacher`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlsi.method.interaction import SparseTeacher
from vlsi.train.preflight import Preflight
from vlsi.train.resolved import ResolvedRun
from vlsi.train.stages.cache_teacher import expected_manifest
from vlsi.train.teacher_cache import CacheError, KeyedCollator, TeacherCache, sample_key


def open_run_cache(run: ResolvedRun, teacher_verbalizers: str | Path, pre: Preflight) -> TeacherCache | None:
    """The run's teacher cache, checked against what this run would make (data, preprocessing,
    teacher, its verbalizers and layers, K, shared vocabulary); ``None`` without one."""
    if run.teacher_cache is None:
        return None
    return TeacherCache.open(run.teacher_cache, expected_manifest(
        run, teacher_verbalizers, run.cfg.interaction.teacher_cache_top_k, pre.vocab, pre.teacher.target_layers))


def keyed_collator(cache: TeacherCache, dataset: Any, collator: Any) -> KeyedCollator:
    """``collator`` adding each batch's cached top-K; refuses (one line) a sample of ``dataset``
    the cache lacks."""
    cache.check_samples([sample_key(s.id, s.input_ids, s.labels, s.num_image_tokens) for s in dataset.samples],
                        [s.id for s in dataset.samples])
    return KeyedCollator(collator, cache)


def check_batch(inputs: dict[str, Any]) -> None:
    """Raise the error the collator met reading the cache for this batch, if any."""
    if "teacher_error" in inputs:
        raise CacheError(inputs["teacher_error"])


def cached_teacher(inputs: dict[str, Any], device: torch.device) -> SparseTeacher:
    """The batch's cached teacher on ``device``: ids and log-probabilities ``[N, t_l + 1, K]``,
    tail mass ``[N, t_l + 1]`` over the ``N`` response tokens."""
    return SparseTeacher(*(inputs[f"teacher_{name}"].to(device, non_blocking=True) for name in ("ids", "logp", "tail")))


def describe(cache: TeacherCache) -> str:
    """The line the main process prints in place of the teacher's footprint."""
    return f"teacher: none loaded; top-{cache.k} of {cache.layers} layers read from {cache.root}"
