"""The one prepared GPU check: five parts, each in its own process under its own time cap.

    python benchmarks/gpu_check.py --out runs/gpu_check                # one CUDA GPU (an H200), < 7 min
    python benchmarks/gpu_check.py --smoke --out runs/gpu_check_smoke  # the same code paths, tiny, on the CPU

Parts (``--parts a,b,c,d,e``; ``--cap a=70,...`` seconds per part; ``--budget`` seconds in all):

(a) ``vlsi.method.interaction.interaction_loss`` (chunked) against ``naive_interaction_loss`` on random
    verbalizers (:func:`vlsi.tools.bench.random_verbalizers`) at V = 151,936, d_s = 1536, d_t = 3584,
    t_s = 7, t_l = 20, 1,024 response tokens, bf16: forward and reverse KL, then a top-32
    :class:`~vlsi.method.interaction.SparseTeacher` against a float64 evaluation of the bucketed KL
    written here. Criteria: loss relative error, cosine of the gradients w.r.t.
    ``student_hidden``, the same matching from the same seed, every result tensor on the device,
    peak memory (``max_memory_allocated`` above its start) against the module docstring's
    ``(t_s + 4) * chunk * V`` float32 buffers + the gradient buffer (``student_hidden``'s size),
    and host syncs (``torch.cuda.set_sync_debug_mode("warn")`` warnings, counted) equal at two
    chunk sizes, i.e. none per chunk.
(b) ``vlsi bench loss`` (:func:`vlsi.tools.bench.run_loss_benchmark`, naive skipped) at hidden sizes
    3584 and 8192: chunked seconds, its floor (the head matmuls and log-softmaxes it cannot
    avoid), their ratio and the chunked peak against the same formula.
(c) interaction steps of a Qwen2-VL-7B-shaped teacher and a 2B-shaped student with random bf16
    weights (:mod:`vlsi.models.real_shapes`, full depth unless ``--teacher-layers``/``--student-layers``),
    LoRA r = 64, intermediate op ``kld`` and ``none`` (last-layer KD only): time per part
    (``torch.cuda.synchronize`` around each), tokens/s, model FLOPs utilisation, and the peak
    against ``vlsi plan``'s prediction (:func:`vlsi.train.plan.plan_steps`) for the same shapes.
    The scoring/gradient split comes from the loss's own ``seconds["scoring"]`` (read after the
    matching's copy to the CPU, which waits for the scoring pass); gradient pass = the loss's
    synchronised time minus it. Text-only inputs (the vision tower does not run).
    Model FLOPs utilisation = model FLOPs / (step seconds x peak FLOP/s, ``--peak-tflops``,
    989 = the H200's dense bf16), model FLOPs = 2 P_t T (teacher forward) + 4 P_s T (student
    forward, and backward to its activations only: its base weights are frozen; LoRA's own
    FLOPs are left out) + 2 n d V per LM-head matmul the loss runs
    (:func:`vlsi.tools.bench.head_op_counts`, the student's backward matmul included). P = parameters
    of the decoder layers (embeddings are look-ups, the LM head is in the loss term, the vision
    tower does not run), T = tokens of the batch; attention-score FLOPs and recomputation are
    not counted.
(d) the tiny ``vlsi distill`` (configs/tiny-qwen2vl.yaml) under ``accelerate launch`` with bf16
    and gradient checkpointing on one GPU, then ``vlsi interact`` alone under
    accelerate_configs/fsdp.yaml and deepspeed_zero3.yaml with one process: exit codes, wall
    time, the last lines of stderr. With ``--smoke`` (CPU): no mixed precision, and FSDP runs
    through tests/train/stages/fsdp_on_cpu.py (accelerate enables FSDP only on accelerator devices).
(e) batched greedy generation (:class:`vlsi.tools.inference.Generator`, tiny student, float32)
    against one prompt at a time: token ids and texts must be equal.

Robustness: every part runs in its own process (``--worker``) killed at its cap; every check
inside a part is in its own ``try``; the part writes its results after every check, and this
driver rewrites ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` while a part runs and after
each, so a crash or a timeout loses nothing already measured. Each part's output is in
``OUT/logs/``. Every figure in the report is measured in that run. Exit status 0 when every
part ran and every criterion passed, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PARTS = {
    "a": "chunked vs naive interaction loss (dense forward/reverse, top-K sparse)",
    "b": "vlsi bench loss against its floor",
    "c": "interaction step at the Qwen2-VL 7B -> 2B shapes",
    "d": "tiny vlsi distill / interact under accelerate launch (plain, FSDP, ZeRO-3)",
    "e": "batched greedy generation equals one-by-one",
}
# Seconds per part on the GPU: 410 in all, under the 8 minutes the run is given. Each is about
# twice what the part is expected to need (an estimate: nothing has run on a GPU yet); (b) is
# dominated by drawing the random verbalizers on the CPU in each bench worker.
GPU_CAPS = {"a": 55, "b": 130, "c": 90, "d": 110, "e": 25}
SMOKE_CAPS = {"a": 120, "b": 120, "c": 120, "d": 300, "e": 120}

GPU = {
    "device": "cuda",
    "a": dict(vocab=151936, d_s=1536, d_t=3584, t_s=7, t_l=20, tokens=1024, chunk=256, top_k=32,
              dtype="bfloat16", loss_rtol=1e-3, grad_cosine=0.999, memory_factor=1.25, seed=0),
    # (hidden size, response-token counts): each count is one worker that draws the random
    # verbalizers on the CPU first (t_l = 20 layers of 3 d^2 at d = 8192 is 4B numbers)
    "b": dict(vocab=151936, runs=[[3584, [1024, 2048]], [8192, [2048]]], t_s=7, t_l=20, chunk=256,
              dtype="bfloat16", repeats=2, memory_factor=1.25),
    "c": dict(teacher="7b", student="2b", teacher_layers=28, student_layers=28, width=None, vision_depth=None,
              target_layers=None, batch=4, seq_len=1024, response_len=512, chunk=256, steps=3,
              gradient_checkpointing=False, lora_r=64, dtype="bfloat16", peak_tflops=989.0),
    "d": dict(mixed_precision="bf16", bf16=True, max_steps=2, fsdp_target=["-m", "vlsi.cli"]),
    "e": dict(dtype="float32", max_new_tokens=12),
}
# Smoke: the same checks at tiny sizes in float32 on the CPU. Its memory factor is looser: there
# the verbalizer's logits are float32 (one more [chunk, V] buffer than bf16 logits are on the
# GPU) and a process's RSS, counted in pages, carries allocator slack that CUDA's counter does not.
SMOKE = {
    "device": "cpu",
    "a": dict(vocab=4096, d_s=32, d_t=48, t_s=3, t_l=6, tokens=96, chunk=32, top_k=32,
              dtype="float32", loss_rtol=1e-5, grad_cosine=0.99999, memory_factor=1.5, seed=0),
    "b": dict(vocab=4096, runs=[[32, [64, 128]], [64, [64]]], t_s=3, t_l=6, chunk=32,
              dtype="float32", repeats=1, memory_factor=1.5),
    "c": dict(teacher="7b", student="2b", teacher_layers=4, student_layers=3, width=64, vision_depth=1,
              target_layers=[[0, 1, 2], [0, 1]], batch=2, seq_len=48, response_len=16, chunk=16, steps=1,
              gradient_checkpointing=False, lora_r=8, dtype="float32", peak_tflops=None),
    "d": dict(mixed_precision="no", bf16=False, max_steps=1,
              fsdp_target=[str(REPO / "tests" / "train" / "stages" / "fsdp_on_cpu.py")]),
    "e": dict(dtype="float32", max_new_tokens=6),
}

_START = time.time()


def log(message: str) -> None:
    """One progress line with the wall-clock time and seconds since this process started."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - _START:6.1f}s] {message}", flush=True)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ============================================================================================
# Worker side: one part in this process.


class Check:
    """Figures and pass/fail criteria of one check."""

    def __init__(self, entry: dict):
        self.entry = entry

    def figure(self, **values: Any) -> None:
        self.entry["figures"].update(values)

    def criterion(self, name: str, passed: bool, value: Any = None, limit: Any = None, note: str = "") -> bool:
        self.entry["criteria"][name] = {"passed": bool(passed), "value": value, "limit": limit,
                                        **({"note": note} if note else {})}
        log(f"  {'PASS' if passed else 'FAIL'} {name}: {value} (limit {limit}){' ' + note if note else ''}")
        return bool(passed)


class Recorder:
    """A part's checks, rewritten to ``path`` after each one (a killed part keeps them)."""

    def __init__(self, path: Path, part: str, settings: dict):
        self.path = path
        self.deadline = settings["deadline"]
        self.data: dict[str, Any] = {"part": part, "settings": settings[part], "environment": {},
                                     "checks": {}, "child_pgids": []}
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.data)

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[Check]:
        """Run the ``with`` body as check ``name``; an exception is recorded, not raised."""
        entry: dict[str, Any] = {"status": "running", "seconds": None, "figures": {}, "criteria": {}}
        self.data["checks"][name] = entry
        self.save()
        log(f"{name}: start")
        start = time.perf_counter()
        try:
            yield Check(entry)
            entry["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - every failure is recorded, the next check runs
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            entry.update(status="error", error=f"{type(err).__name__}: {first}",
                         traceback_tail=_tail(traceback.format_exc(), 12))
            log(f"{name}: ERROR {entry['error']}")
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 3)
            self.save()
            log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s")


def _environment(device: Any) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    else:
        from vlsi.tools.bench import cpu_name

        info["cpu"] = cpu_name()
    return info


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes above the start during the ``with`` body: CUDA ``max_memory_allocated`` above
    ``memory_allocated``, or on the CPU the peak RSS (``VmHWM`` after a ``clear_refs`` reset,
    as :mod:`vlsi.tools.bench` measures it) above the RSS."""

    def __init__(self, device: Any):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        import torch

        from vlsi.tools.bench import release_freed_memory, reset_peak_rss, rss_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self.base = rss_bytes()
            self.reset = reset_peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        from vlsi.tools.bench import peak_rss_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = peak_rss_bytes(self.reset) - self.base


@contextlib.contextmanager
def count_host_syncs(device: Any) -> Iterator[list]:
    """Collect the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` raised in the body
    (one per synchronising CUDA call); on the CPU there is nothing to count."""
    import torch

    found: list = []
    if device.type != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(w for w in caught if "synchroniz" in str(w.message).lower())


def _sync_sites(found: list) -> dict[str, int]:
    """``file:line`` of each synchronising call, with how often it synchronised."""
    sites: dict[str, int] = {}
    for w in found:
        key = f"{Path(w.filename).name}:{w.lineno}"
        sites[key] = sites.get(key, 0) + 1
    return sites


def _cosine(a: Any, b: Any) -> float:
    import torch

    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _result_devices(result: Any) -> dict[str, str]:
    """Device of every tensor field of an ``InteractionResult``."""
    import torch

    return {f.name: str(getattr(result, f.name).device) for f in fields(result)
            if isinstance(getattr(result, f.name), torch.Tensor)}


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def loss_formula_bytes(t_s: int, chunk: int, tokens: int, vocab: int, student_hidden_bytes: int) -> int:
    """The chunked loss's peak by its module docstring: ``(t_s + 4)`` float32 ``[chunk, V]``
    buffers plus the gradient buffer, the size of ``student_hidden``."""
    return (t_s + 4) * min(chunk, tokens) * vocab * 4 + student_hidden_bytes


# -- part (a) ---------------------------------------------------------------------------------


def sparse_teacher_from(teacher_fn: Callable, teacher_hidden: Any, vocab: int, k: int) -> Any:
    """Top-``k`` ids, their float32 log-probs and the tail mass of every teacher layer
    ``[t_l + 1, N, k]`` / ``[t_l + 1, N]``; the tail is ``exp(logsumexp)`` over the other ids."""
    import torch

    from vlsi.method.interaction import SparseTeacher

    ids, logp, tail = [], [], []
    with torch.no_grad():
        for j in range(teacher_hidden.shape[0]):
            lp = torch.log_softmax(teacher_fn(j, teacher_hidden[j])[:, :vocab].float(), dim=-1)  # [N, V]
            top = lp.topk(k, dim=-1)
            ids.append(top.indices)
            logp.append(top.values)
            tail.append(lp.scatter(1, top.indices, float("-inf")).logsumexp(dim=-1).exp())
            del lp
    return SparseTeacher(torch.stack(ids), torch.stack(logp), torch.stack(tail))


def bucketed_kl64(ids: Any, t_logp: Any, t_tail: Any, s_logp: Any) -> Any:
    """``KL_K(P || Q)`` per token ``[n]`` in float64 over the K ids and one tail bucket
    (docs/method.md#teacher-cache); the student's tail is the ``logsumexp`` of its log-probs outside the ids.

    Args:
        ids: long ``[n, K]``; t_logp: ``[n, K]``; t_tail: ``[n]``; s_logp: float64 ``[n, V]``.
    """
    import torch

    p_logp, tail = t_logp.double(), t_tail.double()
    s_top = s_logp.gather(1, ids)
    log_q_tail = s_logp.scatter(1, ids, float("-inf")).logsumexp(dim=-1)
    tail_term = torch.where(tail > 0, tail * (tail.clamp_min(1e-300).log() - log_q_tail), torch.zeros_like(tail))
    return (p_logp.exp() * (p_logp - s_top)).sum(dim=-1) + tail_term


def _sparse_reference(sparse: Any, student_fn: Callable, h: Any, vocab: int, seed: int) -> dict:
    """The loss of :func:`interaction_loss` with a top-K teacher, evaluated in float64 over whole
    layers: KLD scores, the matching drawn from them with the same seed, the loss and its
    gradient w.r.t. ``h`` ``[t_s + 1, N, d]`` (accumulated in ``h.grad``)."""
    import torch

    from vlsi.method.matching import match, needed_mask

    t_s, t_l = h.shape[0] - 1, sparse.ids.shape[0] - 1
    needed = needed_mask("vlsi", t_s, t_l)
    kld = torch.full((t_s, t_l), float("nan"), dtype=torch.float64)

    def student_logp(i: int) -> Any:
        return torch.log_softmax(student_fn(i, h[i])[:, :vocab].double(), dim=-1)

    with torch.no_grad():
        for i in range(t_s):
            s_logp = student_logp(i)
            for j in needed[i].nonzero().flatten().tolist():
                kld[i, j] = float(bucketed_kl64(sparse.ids[j], sparse.logp[j], sparse.tail[j], s_logp).mean())
            del s_logp
    weights = match(kld.float(), "vlsi", generator=torch.Generator().manual_seed(seed)).weights
    terms: dict[int, list[tuple[int, float]]] = {}
    for i, j in weights.nonzero().tolist():
        terms.setdefault(i, []).append((j, float(weights[i, j])))
    terms[t_s] = [(t_l, 1.0)]
    total = 0.0
    for i, pairs in terms.items():
        s_logp = student_logp(i)
        loss = sum(w * bucketed_kl64(sparse.ids[j], sparse.logp[j], sparse.tail[j], s_logp).mean() for j, w in pairs)
        loss.backward()
        total += float(loss.detach())
        del s_logp, loss
    return {"kld": kld, "weights": weights, "loss": total}


def _compare_chunked(c: Check, s: dict, device: Any, run_chunked: Callable, reference: dict, h: Any,
                     formula: int) -> None:
    """Run the chunked loss (peak memory, host syncs, forward + backward) and record the criteria
    against ``reference`` (``loss``, ``grad``, ``weights``, ``kld``)."""
    import torch

    h.grad = None
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        with count_host_syncs(device) as syncs:  # the synchronize below is the check's, not the loss's
            result = run_chunked(h, s["chunk"])
            result.loss.backward()
        _sync(device)
        seconds = time.perf_counter() - start
    grad = h.grad.detach().clone()
    h.grad = None
    with count_host_syncs(device) as syncs_half:
        run_chunked(h, max(1, s["chunk"] // 2)).loss.backward()
    _sync(device)
    h.grad = None
    loss, ref_loss = float(result.loss.detach()), float(reference["loss"])
    kld, ref_kld = result.kld.float().cpu(), reference["kld"].float().cpu()
    scored = torch.isfinite(ref_kld)
    c.figure(chunked_loss=loss, reference_loss=ref_loss, chunked_seconds=round(seconds, 4),
             kld_max_abs_diff=float((kld[scored] - ref_kld[scored]).abs().max()),
             chunked_peak_bytes=int(mem.peak), formula_bytes=int(formula),
             host_syncs=len(syncs), host_syncs_at_half_chunk=len(syncs_half), host_sync_sites=_sync_sites(syncs),
             result_devices=_result_devices(result), grad_device=str(grad.device),
             selected_pairs=result.weights.cpu().nonzero().tolist())
    c.criterion("loss relative error", _rel(loss, ref_loss) < s["loss_rtol"], _rel(loss, ref_loss), s["loss_rtol"])
    cosine = _cosine(grad, reference["grad"])
    c.criterion("gradient cosine", cosine > s["grad_cosine"], cosine, s["grad_cosine"])
    same = torch.equal(result.weights.float().cpu(), reference["weights"].float().cpu())
    c.criterion("same matching", same, same, True)
    devices = {**_result_devices(result), "grad": str(grad.device)}
    on_device = all(torch.device(d).type == device.type for d in devices.values())
    c.criterion("result tensors on the device", on_device, devices, device.type)
    c.criterion("peak memory within the formula", mem.peak <= s["memory_factor"] * formula,
                round(mem.peak / formula, 4), f"{s['memory_factor']} x formula",
                note=f"peak {mem.peak / 2**20:.1f} MiB, formula {formula / 2**20:.1f} MiB")
    c.criterion("no host sync per chunk", len(syncs) == len(syncs_half),
                {"chunk": len(syncs), "half chunk": len(syncs_half)}, "equal",
                note="" if device.type == "cuda" else "CPU: no CUDA sync to count")


def part_a(s: dict, rec: Recorder, device: Any) -> None:
    """Chunked against naive (dense, forward and reverse) and against a float64 bucketed
    reference (top-K teacher)."""
    import torch

    from vlsi.method.interaction import interaction_loss, naive_interaction_loss
    from vlsi.tools.bench import random_verbalizers

    dtype = _dtype(s["dtype"])
    vocab, t_s, t_l, n = s["vocab"], s["t_s"], s["t_l"], s["tokens"]
    with rec.check("setup") as c:
        student_fn = random_verbalizers(t_s, s["d_s"], vocab, dtype=dtype, device=device, seed=s["seed"])
        teacher_fn = random_verbalizers(t_l, s["d_t"], vocab, dtype=dtype, device=device, seed=s["seed"] + 1)
        g = torch.Generator().manual_seed(s["seed"] + 2)
        student_hidden = torch.randn(t_s + 1, n, s["d_s"], generator=g, dtype=dtype).to(device).requires_grad_(True)
        teacher_hidden = torch.randn(t_l + 1, n, s["d_t"], generator=g, dtype=dtype).to(device)
        # warm-up on one chunk: kernels, cuBLAS handles and the allocator's first blocks
        warm = student_hidden.detach()[:, : s["chunk"]].clone().requires_grad_(True)
        interaction_loss(warm, teacher_hidden[:, : s["chunk"]], student_fn, teacher_fn, vocab_size=vocab,
                         chunk_size=s["chunk"], generator=torch.Generator().manual_seed(0)).loss.backward()
        _sync(device)
        c.figure(student_hidden_shape=list(student_hidden.shape), teacher_hidden_shape=list(teacher_hidden.shape))
    h = student_hidden
    formula = loss_formula_bytes(t_s, s["chunk"], n, vocab, h.numel() * h.element_size())
    match_seed = s["seed"] + 3

    for divergence in ("forward", "reverse"):
        with rec.check(f"dense {divergence} KL") as c:
            h.grad = None
            naive = naive_interaction_loss(h, teacher_hidden, student_fn, teacher_fn, vocab_size=vocab,
                                           divergence=divergence, generator=torch.Generator().manual_seed(match_seed))
            naive.loss.backward()
            reference = {"loss": float(naive.loss.detach()), "grad": h.grad.detach().clone(), "weights": naive.weights,
                         "kld": naive.kld}
            del naive

            def run_chunked(x: Any, chunk: int, divergence: str = divergence) -> Any:
                return interaction_loss(x, teacher_hidden, student_fn, teacher_fn, vocab_size=vocab, chunk_size=chunk,
                                        divergence=divergence, generator=torch.Generator().manual_seed(match_seed))

            _compare_chunked(c, s, device, run_chunked, reference, h, formula)
            del reference
        rec.save()

    with rec.check(f"sparse top-{s['top_k']} forward KL") as c:
        sparse = sparse_teacher_from(teacher_fn, teacher_hidden, vocab, s["top_k"])
        h.grad = None
        ref = _sparse_reference(sparse, student_fn, h, vocab, match_seed)
        ref["grad"] = h.grad.detach().clone()

        def run_sparse(x: Any, chunk: int) -> Any:
            return interaction_loss(x, sparse, student_fn, None, vocab_size=vocab, chunk_size=chunk,
                                    generator=torch.Generator().manual_seed(match_seed))

        c.figure(reference="float64, whole layers, student tail by logsumexp outside the K ids")
        _compare_chunked(c, s, device, run_sparse, ref, h, formula)


# -- part (b) ---------------------------------------------------------------------------------


def part_b(s: dict, rec: Recorder, device: Any) -> None:
    """``vlsi bench loss`` per hidden size, naive skipped; chunked time against its floor."""
    import torch

    from vlsi.tools.bench import run_loss_benchmark

    bytes_per = torch.finfo(_dtype(s["dtype"])).bits // 8
    for d, tokens in s["runs"]:
        with rec.check(f"hidden size {d}") as c:
            report = run_loss_benchmark(
                vocab_size=s["vocab"], hidden_size=d, t_s=s["t_s"], t_l=s["t_l"], tokens=tokens,
                chunk_size=s["chunk"], dtype=s["dtype"], device=str(device), naive_max_tokens=0,
                repeats=s["repeats"], timeout_s=max(5.0, rec.seconds_left() - 5), verbose=True)
            rows = []
            for row in report["results"]:
                n, chunked = row["tokens"], row["chunked"]
                formula = loss_formula_bytes(s["t_s"], s["chunk"], n, s["vocab"], (s["t_s"] + 1) * n * d * bytes_per)
                measured = chunked["status"] == "measured"
                floor = chunked.get("floor_seconds")
                rows.append({"tokens": n, "status": chunked["status"], "chunked_seconds": chunked.get("seconds"),
                             "floor_seconds": floor,
                             "chunked_over_floor": chunked["seconds"] / floor if measured and floor else None,
                             "peak_bytes": chunked.get("peak_bytes"), "formula_bytes": formula,
                             "floor_chunk_seconds": chunked.get("floor_chunk_seconds"),
                             "error": chunked.get("error")})
                c.criterion(f"{n} tokens measured", measured, chunked["status"], "measured",
                            note=_tail(chunked.get("error") or "", 3))
                if measured:
                    c.criterion(f"{n} tokens peak within the formula",
                                chunked["peak_bytes"] <= s["memory_factor"] * formula,
                                round(chunked["peak_bytes"] / formula, 4), f"{s['memory_factor']} x formula")
            c.figure(device_name=report["device_name"], rows=rows, peak_spread=report["summary"]["chunked_peak_spread"])


# -- part (c) ---------------------------------------------------------------------------------


def _build_model(config: Any, dtype: Any, device: Any, seed: int) -> Any:
    """A random-initialised model of ``config``, created on ``device`` (no CPU copy first)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def _decoder_parameters(backbone: Any) -> int:
    return sum(p.numel() for p in backbone.decoder_layers.parameters())


def _text_batch(tokenizer: Any, batch: int, seq_len: int, response_len: int, device: Any, seed: int) -> dict:
    """Random text-only samples ``[B, T]``: ids outside the special tokens, the last
    ``response_len`` of each supervised."""
    import torch

    from vlsi.models.tiny import SPECIAL_TOKENS

    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (batch, seq_len), generator=g)]
    labels = torch.full_like(ids, -100)
    labels[:, seq_len - response_len:] = ids[:, seq_len - response_len:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": torch.zeros_like(ids).to(device), "labels": labels.to(device)}


class InteractionStep:
    """One interaction step as ``InteractTrainer.compute_loss`` + ``training_step`` run it,
    with ``torch.cuda.synchronize`` between the parts: student forward, teacher forward (with
    its verbalizer inputs), loss (scoring pass + matching, gradient pass), student backward,
    optimizer step. No autocast: the models are in the check's dtype."""

    def __init__(self, model: Any, student: Any, teacher: Any, s_verb: Any, t_verb: Any, vocab: int, chunk: int,
                 device: Any):
        import torch

        self.model, self.student, self.teacher, self.s_verb, self.t_verb = model, student, teacher, s_verb, t_verb
        self.vocab, self.chunk, self.device = vocab, chunk, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self, inputs: dict, intermediate_op: str, seed: int) -> tuple[dict, Any, dict]:
        import torch

        from vlsi.method.interaction import interaction_loss
        from vlsi.method.verbalizer import capture_hidden_states, capture_layer_context, prediction_positions

        kwargs = dict(use_cache=False, logits_to_keep=1)
        model_inputs = self.student.model_inputs(inputs)
        positions = prediction_positions(inputs["labels"])
        seconds: dict[str, float] = {}
        _sync(self.device)
        clock = time.perf_counter()
        with capture_layer_context(self.student) as s_ctx:
            s_out = self.model(**model_inputs, **kwargs, output_hidden_states=True)
        _sync(self.device)
        seconds["student_forward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.no_grad(), capture_layer_context(self.teacher) as t_ctx, \
                capture_hidden_states(self.teacher, self.t_verb.layers) as t_states:
            self.teacher.model(**self.teacher.model_inputs(inputs), **kwargs)
            t_stack, t_fn = self.t_verb.response_inputs(t_states, positions, t_ctx, transformed=True)
        del t_states
        _sync(self.device)
        seconds["teacher_forward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        s_stack, s_fn = self.s_verb.response_inputs(s_out.hidden_states, positions, s_ctx)
        result = interaction_loss(s_stack, t_stack, s_fn, t_fn, vocab_size=self.vocab, intermediate_op=intermediate_op,
                                  chunk_size=self.chunk, generator=torch.Generator().manual_seed(seed))
        _sync(self.device)
        loss_seconds = time.perf_counter() - clock
        seconds["scoring_pass"] = result.seconds["scoring"]
        seconds["gradient_pass"] = loss_seconds - result.seconds["scoring"]
        clock = time.perf_counter()
        result.loss.backward()
        _sync(self.device)
        seconds["student_backward"] = time.perf_counter() - clock
        lora_grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        grad_state = {"finite": all(bool(torch.isfinite(g).all()) for g in lora_grads),
                      "nonzero": any(bool(g.abs().sum() > 0) for g in lora_grads), "tensors": len(lora_grads)}
        clock = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        seconds["optimizer_step"] = time.perf_counter() - clock
        return seconds, result, grad_state


def _loss_head_flops(result: Any, n: int, chunk: int, d_s: int, d_t: int, rows_s: int, rows_t: int,
                     intermediate_op: str) -> int:
    """FLOPs of the LM-head matmuls the chunked loss ran (:func:`vlsi.tools.bench.head_op_counts`)."""
    import torch

    from vlsi.method.matching import needed_mask
    from vlsi.tools.bench import head_op_counts

    t_s, t_l = result.weights.shape
    needed = (needed_mask("vlsi", t_s, t_l) if intermediate_op != "none"
              else torch.zeros(t_s, t_l, dtype=torch.bool))
    chunks = [min(chunk, n - a) for a in range(0, n, chunk)]
    counts = head_op_counts(result.weights.cpu(), needed, chunks)
    k = len(chunks)
    return (counts["student_matmuls"] // k * 2 * n * d_s * rows_s
            + counts["teacher_matmuls"] // k * 2 * n * d_t * rows_t)


def _plan_prediction(t_cfg: Any, s_cfg: Any, t_layers: list[int], s_layers: list[int], s: dict) -> dict:
    """``vlsi plan``'s interaction-step bytes for these shapes on one GPU (no engine sharding)."""
    import copy

    from vlsi.models.shapes import shape_from_config
    from vlsi.train.plan import Setup, plan_steps

    shapes = []
    for name, cfg, layers in (("teacher", t_cfg, t_layers), ("student", s_cfg, s_layers)):
        cfg = copy.deepcopy(cfg)
        cfg.dtype = s["dtype"]
        shape = shape_from_config(cfg, name)
        shape.target_layers = layers
        shapes.append(shape)
    stages = ("verbalize", "interact", "sft")
    setup = Setup(gpus=1, engine="ddp", batch={k: s["batch"] for k in stages},
                  checkpointing={k: s["gradient_checkpointing"] for k in stages}, max_length=s["seq_len"],
                  chunk_size=s["chunk"], lora_r=s["lora_r"], autocast=False, response_tokens=s["response_len"])
    step = next(p for p in plan_steps(shapes[0], shapes[1], setup) if p.step == "interact")
    return {"total_bytes": step.total, "parts_bytes": step.parts}


def part_c(s: dict, rec: Recorder, device: Any) -> None:
    """Interaction steps at the real shapes, ops ``kld`` and ``none``."""
    import torch

    from vlsi.method.verbalizer import VerbalizerSet
    from vlsi.models.backbones import Backbone
    from vlsi.models.real_shapes import real_shape_config
    from vlsi.models.tiny import build_tiny_tokenizer
    from vlsi.train.config import LoraSettings
    from vlsi.train.lora import with_lora

    dtype = _dtype(s["dtype"])
    state: dict[str, Any] = {}
    with rec.check("build models") as c:
        tokenizer = build_tiny_tokenizer(512)
        t_cfg = real_shape_config(s["teacher"], tokenizer, num_layers=s["teacher_layers"], width=s["width"],
                                  vision_depth=s["vision_depth"])
        s_cfg = real_shape_config(s["student"], tokenizer, num_layers=s["student_layers"],
                                  width=None if s["width"] is None else s["width"] // 2,
                                  vision_depth=s["vision_depth"])
        teacher = Backbone(_build_model(t_cfg, dtype, device, seed=0))
        teacher.model.requires_grad_(False)
        student = Backbone(_build_model(s_cfg, dtype, device, seed=1))
        t_layers, s_layers = s["target_layers"] or (None, None)
        t_verb = VerbalizerSet(teacher, t_layers).requires_grad_(False).eval()
        s_verb = VerbalizerSet(student, s_layers).requires_grad_(False).eval()
        p_t, p_s = _decoder_parameters(teacher), _decoder_parameters(student)  # before LoRA joins them
        model = with_lora(student, LoraSettings(r=s["lora_r"], alpha=s["lora_r"], dropout=0.0), seed=0)
        if s["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        vocab = min(teacher.vocab_size, student.vocab_size)
        inputs = _text_batch(tokenizer, s["batch"], s["seq_len"], s["response_len"], device, seed=0)
        state.update(teacher=teacher, student=student, t_verb=t_verb, s_verb=s_verb, model=model, vocab=vocab,
                     inputs=inputs, t_cfg=t_cfg, s_cfg=s_cfg, p_t=p_t, p_s=p_s)
        c.figure(teacher_parameters=sum(p.numel() for p in teacher.model.parameters()),
                 student_parameters=sum(p.numel() for p in student.model.parameters()),
                 teacher_decoder_parameters=p_t, student_decoder_parameters=p_s,
                 lora_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 teacher_layers=teacher.num_layers, student_layers=student.num_layers,
                 teacher_target_layers=t_verb.layers, student_target_layers=s_verb.layers, shared_vocab=vocab,
                 tokens_per_step=s["batch"] * s["seq_len"], response_tokens_per_step=s["batch"] * s["response_len"],
                 precision=f"weights {s['dtype']}, no autocast", gradient_checkpointing=s["gradient_checkpointing"],
                 weights_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
    if "model" not in state:
        return
    step = InteractionStep(state["model"], state["student"], state["teacher"], state["s_verb"], state["t_verb"],
                           state["vocab"], s["chunk"], device)
    tokens, n = s["batch"] * s["seq_len"], s["batch"] * s["response_len"]
    p_t, p_s = state["p_t"], state["p_s"]
    for op in ("kld", "none"):
        with rec.check(f"interaction step, intermediate op {op}") as c:
            with PeakMemory(device) as mem:
                start_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                step(state["inputs"], op, seed=0)  # warm-up
                runs = []
                for k in range(s["steps"]):
                    runs.append(step(state["inputs"], op, seed=k + 1))
            split = {part: sum(r[0][part] for r in runs) / len(runs) for part in runs[0][0]}
            total = sum(split.values())
            result, grads = runs[-1][1], runs[-1][2]
            flops = (2 * p_t * tokens + 4 * p_s * tokens
                     + _loss_head_flops(result, n, s["chunk"], state["student"].hidden_size,
                                        state["teacher"].hidden_size, state["student"].vocab_size,
                                        state["teacher"].vocab_size, op))
            mfu = flops / (total * s["peak_tflops"] * 1e12) if s["peak_tflops"] else None
            c.figure(seconds_per_step=total, split_seconds=split, steps_timed=len(runs),
                     step_seconds=[sum(r[0].values()) for r in runs], tokens_per_second=tokens / total,
                     model_flops_per_step=flops, mfu=mfu, peak_tflops=s["peak_tflops"],
                     loss=float(result.loss.detach()), last_layer_loss=result.last_loss,
                     selected_pairs=result.weights.cpu().nonzero().tolist())
            loss = float(result.loss.detach())
            c.criterion("loss finite", math.isfinite(loss), loss, "finite")
            c.criterion("LoRA gradients finite and not all zero", grads["finite"] and grads["nonzero"], grads,
                        "finite, non-zero")
            if op == "kld":
                plan = _plan_prediction(state["t_cfg"], state["s_cfg"], state["t_verb"].layers,
                                        state["s_verb"].layers, s)
                c.figure(plan=plan)
                if device.type == "cuda":
                    peak = start_allocated + mem.peak  # everything allocated: weights, optimizer, activations, loss
                    c.figure(peak_allocated_bytes=peak)
                    c.criterion("peak within vlsi plan's prediction", peak <= plan["total_bytes"],
                                round(peak / plan["total_bytes"], 4), "<= 1 x predicted",
                                note=f"peak {peak / 1e9:.2f} GB, plan {plan['total_bytes'] / 1e9:.2f} GB")
                else:
                    c.figure(peak_rss_above_start_bytes=mem.peak,
                             plan_compared="on CUDA only: a CPU process's RSS also holds the interpreter and "
                                           "allocator caches that the plan does not model")
            else:
                c.figure(peak_above_start_bytes=mem.peak)


# -- part (d) ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(rec: Recorder, c: Check, command: list[str], log_path: Path, reserve_s: float) -> int:
    """Run ``command`` in its own process group with what is left of the part's time (minus
    ``reserve_s`` for later launches); records exit code, seconds and the stderr tail."""
    timeout = max(5.0, rec.seconds_left() - reserve_s)
    log(f"  $ {' '.join(command[:12])} ... (timeout {timeout:.0f} s)")
    start = time.perf_counter()
    with open(log_path.with_suffix(".out"), "w") as out, open(log_path.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
        rec.data["child_pgids"].append(proc.pid)
        rec.save()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    rec.data["child_pgids"].remove(proc.pid)
    stderr = log_path.with_suffix(".err").read_text(errors="replace")
    if code != 0:  # the whole stderr (progress bars left out) into this part's log under OUT/logs
        print("\n".join(line for line in stderr.splitlines() if "it/s]" not in line and "s/it]" not in line),
              flush=True)
    c.figure(exit_code=code, seconds=round(time.perf_counter() - start, 2), stderr_tail=_tail(stderr, 80),
             stdout_tail=_tail(log_path.with_suffix(".out").read_text(errors="replace"), 5))
    return code


LAUNCH_RESERVE_S = 25  # (d): seconds kept back for each later launch (one interaction step)


def part_d(s: dict, rec: Recorder, device: Any, work: Path) -> None:
    """The tiny distill under a plain one-process launch, then ``interact`` under FSDP and ZeRO-3."""
    from vlsi.data.synthetic import SyntheticConfig, generate_dataset
    from vlsi.models.tiny import save_tiny_pair

    config = REPO / "configs" / "tiny-qwen2vl.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", s["mixed_precision"], "--dynamo_backend", "no"]
    run = work / "d_run"
    with rec.check("setup") as c:
        pair = save_tiny_pair(work / "tiny", "qwen2_vl")
        if not (work / "synth" / "train.json").is_file():
            generate_dataset(work / "synth", SyntheticConfig(seed=0, num_train=16, num_eval=4), overwrite=True)
        overrides = {"teacher": str(pair.teacher), "student": str(pair.student), "output_dir": str(run),
                     "data.train": [str(work / "synth" / "train.json")], "data.image_root": str(work / "synth"),
                     "training.max_steps": s["max_steps"], "training.save_steps": s["max_steps"],
                     "training.logging_steps": 1, "training.bf16": s["bf16"],
                     "training.gradient_checkpointing": True, "training.report_to": []}
        settings = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        c.figure(overrides=overrides)
    if "setup" not in rec.data["checks"] or rec.data["checks"]["setup"]["status"] != "ok":
        return
    with rec.check("distill, plain launch") as c:
        code = _launch(rec, c, [*launch, "--config_file", str(REPO / "accelerate_configs" / "single_gpu.yaml"),
                                "-m", "vlsi.cli", "distill", str(config), *settings], work / "d_distill",
                       2 * LAUNCH_RESERVE_S)
        steps = ("1-teacher-verbalize", "2-student-verbalize", "3-interact", "4-sft")
        done = [step for step in steps if (run / step / "step_complete.json").is_file()]
        c.figure(steps_complete=done)
        c.criterion("exit code 0", code == 0, code, 0)
        c.criterion("every step complete", len(done) == len(steps), done, list(steps))
    engines = [("FSDP2", "fsdp.yaml", s["fsdp_target"]), ("ZeRO-3", "deepspeed_zero3.yaml", ["-m", "vlsi.cli"])]
    for k, (engine, accelerate_config, target) in enumerate(engines):
        with rec.check(f"interact, {engine}") as c:
            out = work / f"d_interact_{accelerate_config.split('.')[0]}"
            code = _launch(rec, c, [*launch, "--config_file", str(REPO / "accelerate_configs" / accelerate_config),
                                    "--main_process_port", str(_free_port()), *target, "interact", str(config),
                                    "--teacher-verbalizers", str(run / "1-teacher-verbalize"),
                                    "--student-verbalizers", str(run / "2-student-verbalize"), "--out", str(out),
                                    *settings], work / f"d_{accelerate_config}",
                           LAUNCH_RESERVE_S * (len(engines) - 1 - k))
            stdout = (work / f"d_{accelerate_config}").with_suffix(".out").read_text(errors="replace")
            held = re.search(r"^teacher: \S+ params, .* per process under (.+)$", stdout, re.M)
            c.criterion("ran under the engine", bool(held) and held.group(1).startswith(engine),
                        held.group(1) if held else None, engine)
            if target != ["-m", "vlsi.cli"]:
                c.figure(launch_target=f"{target[0]} (accelerate enables FSDP only on accelerator devices)")
            c.criterion("exit code 0", code == 0, code, 0)
            c.criterion("step complete", (out / "step_complete.json").is_file(), (out / "step_complete.json").is_file(),
                        True)


# -- part (e) ---------------------------------------------------------------------------------


def part_e(s: dict, rec: Recorder, device: Any, work: Path) -> None:
    """Greedy generation of a left-padded batch against one prompt at a time."""
    import torch
    from PIL import Image

    from vlsi.models.tiny import save_tiny_pair
    from vlsi.tools.inference import Generator, Prompt

    with rec.check("batched greedy equals one-by-one") as c:
        pair = save_tiny_pair(work / "tiny", "qwen2_vl")
        runner = Generator.from_pretrained(pair.student, dtype=_dtype(s["dtype"]), device=device)
        images = [Image.new("RGB", (56, 56), (220, 20, 20)), Image.new("RGB", (84, 56), (20, 20, 220)),
                  Image.new("RGB", (112, 84), (20, 200, 20))]
        prompts = [Prompt("<image>\nWhat colour is it?", [images[0]]), Prompt("Describe", [images[1]]),
                   Prompt("Text only, a longer prompt than the others to force padding"),
                   Prompt("<image>\nHow many shapes are there? Answer with a number.", [images[2]])]
        model = runner.backbone.model.eval()

        def new_ids(batch: list[Any]) -> list[list[int]]:
            inputs = runner.inputs(batch)
            with torch.no_grad():
                tokens = model.generate(**inputs, max_new_tokens=s["max_new_tokens"], do_sample=False, num_beams=1,
                                        eos_token_id=runner.end_ids, pad_token_id=runner.tokenizer.pad_token_id)
            rows = []
            for row in tokens[:, inputs["input_ids"].shape[1]:].tolist():
                ends = [i for i, t in enumerate(row) if t in runner.end_ids]
                rows.append(row[: ends[0] + 1] if ends else row)
            return rows

        batched_ids = new_ids(prompts)
        single_ids = [new_ids([p])[0] for p in prompts]
        batched_text = runner.generate(prompts, max_new_tokens=s["max_new_tokens"])
        single_text = [runner.generate([p], max_new_tokens=s["max_new_tokens"])[0] for p in prompts]
        c.figure(device=str(runner.device), batched_ids=batched_ids, single_ids=single_ids, texts=single_text,
                 new_tokens=[len(r) for r in single_ids])
        c.criterion("token ids equal", batched_ids == single_ids,
                    [i for i, (a, b) in enumerate(zip(batched_ids, single_ids)) if a != b], "no differing prompt")
        c.criterion("texts equal", batched_text == single_text,
                    [i for i, (a, b) in enumerate(zip(batched_text, single_text)) if a != b], "no differing prompt")


def worker(part: str, settings_path: Path, result_path: Path) -> int:
    """Run one part, recording into ``result_path``; exit status 0 when every check ran."""
    settings = json.loads(settings_path.read_text())
    rec = Recorder(result_path, part, settings)

    def stop(signum: int, _frame: Any) -> None:  # the driver's time cap: end the launches too
        for pgid in list(rec.data["child_pgids"]):  # each launch leads its own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, 0)
        rec.data["stopped"] = f"signal {signum} (time cap)"
        rec.save()
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    with rec.check("environment") as c:
        rec.data["environment"] = _environment(device)
        c.figure(**rec.data["environment"])
    work = Path(settings["work"])
    s = settings[part]
    if part == "a":
        part_a(s, rec, device)
    elif part == "b":
        part_b(s, rec, device)
    elif part == "c":
        part_c(s, rec, device)
    elif part == "d":
        part_d(s, rec, device, work)
    elif part == "e":
        part_e(s, rec, device, work)
    rec.save()
    return 0 if all(ch["status"] == "ok" for ch in rec.data["checks"].values()) else 1


# ============================================================================================
# Driver side: the parts one after another, each in a process killed at its cap.


def _part_entry(result_path: Path, status: str, seconds: float, cap: float, exit_code: Any) -> dict:
    data = json.loads(result_path.read_text()) if result_path.is_file() else {"checks": {}}
    if status != "running":  # the worker is gone: a check it was in will not finish
        for check in data["checks"].values():
            if check.get("status") == "running":
                check["status"] = "interrupted"
    entry = {"title": PARTS[data.get("part", "?")] if data.get("part") in PARTS else "", "status": status,
             "seconds": round(seconds, 1), "cap_s": round(cap, 1), "exit_code": exit_code,
             "environment": data.get("environment", {}), "checks": data.get("checks", {})}
    errors = [f"{name}: {ch['error']}" for name, ch in entry["checks"].items() if ch.get("status") == "error"]
    if errors:
        entry["error"] = errors[0]
    if data.get("stopped"):
        entry["stopped"] = data["stopped"]
    return entry


def criteria(report: dict) -> list[tuple[str, str, str, dict]]:
    """Every criterion of the report: (part, check, name, criterion)."""
    return [(p, ch_name, name, crit) for p, part in report["parts"].items()
            for ch_name, ch in part.get("checks", {}).items() for name, crit in ch.get("criteria", {}).items()]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.7g}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


def markdown(report: dict) -> str:
    """The report as Markdown: one table of parts, then each part's checks, criteria and figures."""
    env = next((p["environment"] for p in report["parts"].values() if p.get("environment")), {})
    lines = ["# GPU check", "", f"`{report['command']}`", "",
             f"Started {report['started']}; {report['seconds']:.0f} s so far of a {report['budget_s']} s budget; "
             f"mode: {'smoke (CPU, tiny shapes)' if report['smoke'] else 'GPU'}.",
             f"Environment: {_fmt(env)}", "",
             "| part | what | status | seconds | cap s | criteria passed |", "|---|---|---|---:|---:|---:|"]
    for p, part in report["parts"].items():
        crit = [c for c in criteria(report) if c[0] == p]
        passed = sum(c[3]["passed"] for c in crit)
        lines.append(f"| {p} | {PARTS[p]} | {part['status']} | {part.get('seconds', '')} | {part.get('cap_s', '')} | "
                     f"{passed}/{len(crit)} |")
    failed = [c for c in criteria(report) if not c[3]["passed"]]
    lines += ["", f"**{len(failed)} criteria failed**" + (":" if failed else "."), ""]
    lines += [f"- ({p}) {check} / {name}: {_fmt(c['value'])} (limit {_fmt(c['limit'])})"
              for p, check, name, c in failed]
    for p, part in report["parts"].items():
        lines += ["", f"## ({p}) {PARTS[p]}: {part['status']}", ""]
        if part.get("error"):
            lines += [f"Error: `{part['error']}`", ""]
        for name, ch in part.get("checks", {}).items():
            lines.append(f"### {name}: {ch['status']} ({ch.get('seconds')} s)")
            if ch.get("error"):
                lines += ["", "```", ch["error"], ch.get("traceback_tail", ""), "```"]
            for cname, c in ch.get("criteria", {}).items():
                mark = "x" if c["passed"] else " "
                note = f"; {c['note']}" if c.get("note") else ""
                lines.append(f"- [{mark}] {cname}: {_fmt(c['value'])} (limit {_fmt(c['limit'])}{note})")
            for key, value in ch.get("figures", {}).items():
                if key.endswith("_tail") and value:
                    lines += [f"- {key}:", "", "```", str(value), "```"]
                else:
                    lines.append(f"- {key}: {_fmt(value)}")
            lines.append("")
    return "\n".join(lines) + "\n"


def _write_report(out: Path, report: dict) -> None:
    report["seconds"] = round(time.time() - _START, 1)
    _write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))


def _run_part(part: str, settings_path: Path, result_path: Path, log_path: Path, cap: float,
              refresh: Callable[[], None]) -> tuple[str, Any]:
    """Run the part's worker, streaming its lines here and to ``log_path``; kill it at ``cap``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--settings", str(settings_path),
               "--result", str(result_path)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, errors="replace")

    def pump() -> None:
        with open(log_path, "w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                print(f"  ({part}) {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.time() + cap
    status: str | None = None
    while status is None:
        try:
            code = proc.wait(timeout=min(5.0, max(0.1, deadline - time.time())))
            status = "ok" if code == 0 else "error"
        except subprocess.TimeoutExpired:
            refresh()
            if time.time() >= deadline:
                _stop(proc, result_path)
                code, status = proc.returncode, "timeout"
    reader.join(timeout=5)
    return status, code


def _stop(proc: subprocess.Popen, result_path: Path) -> None:
    """SIGTERM to the worker's group (it ends its launches and saves), SIGKILL after 5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(OSError, ValueError, KeyError):
        for pgid in json.loads(result_path.read_text())["child_pgids"]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def _caps(text: str | None, defaults: dict[str, float]) -> dict[str, float]:
    caps = dict(defaults)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in PARTS:
            raise SystemExit(f"--cap: unknown part {key!r}")
        caps[key] = float(value)
    return caps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu_check", help="directory for gpu_check.json, gpu_check.md, logs/")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (float32), the same code paths")
    ap.add_argument("--parts", default="a,b,c,d,e", help="parts to run, comma-separated")
    ap.add_argument("--cap", default=None, help="seconds per part, e.g. a=60,c=90 (defaults: "
                    f"GPU {GPU_CAPS}, smoke {SMOKE_CAPS})")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts together (default: the "
                    "sum of the caps); a part gets at most what is left")
    ap.add_argument("--teacher-layers", type=int, default=None, help="(c) teacher decoder layers (default: 28)")
    ap.add_argument("--student-layers", type=int, default=None, help="(c) student decoder layers (default: 28)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="(c) with gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="(c) the GPU's dense bf16 peak (default 989)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.settings), Path(args.result))

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    caps = _caps(args.cap, SMOKE_CAPS if args.smoke else GPU_CAPS)
    budget = args.budget or sum(caps[p] for p in parts)
    settings = json.loads(json.dumps(SMOKE if args.smoke else GPU))
    c = settings["c"]
    c["teacher_layers"] = args.teacher_layers or c["teacher_layers"]
    c["student_layers"] = args.student_layers or c["student_layers"]
    c["gradient_checkpointing"] = args.gradient_checkpointing or c["gradient_checkpointing"]
    c["peak_tflops"] = args.peak_tflops or c["peak_tflops"]
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    settings["work"] = str(work)
    # children: this package importable, nothing fetched, glibc's mmap threshold fixed as vlsi.tools.bench does
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="131072")
    if args.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget, "work": str(work),
        "settings": {p: settings[p] for p in parts},
        "parts": {p: {"title": PARTS[p], "status": "pending", "cap_s": caps[p]} for p in parts},
    }
    _write_report(out, report)
    log(f"GPU check{' (smoke)' if args.smoke else ''}: parts {','.join(parts)}, budget {budget:.0f} s, out {out}")
    for p in parts:
        cap = min(caps[p], budget - (time.time() - _START))
        if cap < 1:
            report["parts"][p].update(status="skipped", error="no time left in the budget")
            _write_report(out, report)
            continue
        settings["deadline"] = time.time() + max(cap - 3, 0.9 * cap)  # the part's own launches end first
        settings_path, result_path = work / f"settings_{p}.json", work / f"part_{p}.json"
        settings_path.write_text(json.dumps(settings))
        result_path.unlink(missing_ok=True)
        log(f"part ({p}) {PARTS[p]}: start, cap {cap:.0f} s")
        started = time.time()

        def refresh(p: str = p, started: float = started, cap: float = cap) -> None:
            report["parts"][p] = _part_entry(result_path, "running", time.time() - started, cap, None)
            _write_report(out, report)

        status, code = _run_part(p, settings_path, result_path, out / "logs" / f"part_{p}.log", cap, refresh)
        report["parts"][p] = _part_entry(result_path, status, time.time() - started, cap, code)
        _write_report(out, report)
        failed = [x for x in criteria(report) if x[0] == p and not x[3]["passed"]]
        log(f"part ({p}): {status} in {time.time() - started:.1f} s, {len(failed)} criteria failed")
    failed = [x for x in criteria(report) if not x[3]["passed"]]
    bad = [p for p in parts if report["parts"][p]["status"] != "ok"]
    log(f"done in {time.time() - _START:.0f} s: parts not ok {bad or 'none'}, {len(failed)} criteria failed; "
        f"{out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if not bad and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
