"""Benchmark of the interaction loss: chunked vs naive, peak memory and wall time.

    vlsi bench loss --device cuda --tokens 512 1024 2048 4096 --out bench_loss.json
    vlsi bench loss --vocab-size 2048 --hidden-size 32 --tokens 64 128 --dtype float32

Both losses run on random frozen verbalizers of the project's shape (a verb-FFN residual MLP per
target layer, RMS norm, one LM head ``[V, d]`` shared by a model's layers) and random hidden
states of ``N`` response tokens; one measurement is the loss forward plus its backward to the
student hidden states, with the ``vlsi`` matching. The naive loss runs in the same benchmark for
every token count up to ``--naive-max-tokens`` whose estimated footprint fits in the available
memory; beyond that its memory and time are extrapolated linearly from the measured sizes and
labelled ``extrapolated``.

How memory is measured. Every (method, token count) runs in a fresh subprocess
(``python -m vlsi.tools.bench --one JSON``), so allocator caches and earlier peaks never leak from
one measurement into the next. The worker builds the verbalizers and inputs, runs a warm-up on a
few tokens (kernel and thread-pool start-up), frees what it can, then:

* CPU: reads the resident set size (``/proc/self/statm``) as the baseline, resets the kernel's
  peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and after the loss reads
  that counter back (``VmHWM`` in ``/proc/self/status``: the same high-water mark as
  ``ru_maxrss``, but without the parent's RSS that ``ru_maxrss`` inherits across ``exec``).
  Peak = high-water mark - baseline: the memory the loss itself touched on top of its inputs,
  weights and interpreter. Where the reset is refused ``ru_maxrss`` is used, and the setup
  avoids spikes above the baseline (weights are drawn in their dtype).
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the same point.

Workers run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc's default threshold, but fixed. By
default glibc raises the threshold after freeing a large block (up to 32 MiB), after which
freed buffers stay in its heap and RSS no longer follows the tensors that are alive; with the
threshold fixed every buffer of 128 KiB or more is mapped on allocation and unmapped on free.
At the full size every ``[chunk, V]`` buffer is above 32 MiB, so this changes nothing there;
at small sizes it removes allocator noise (it adds page faults to both methods alike).

Both figures include the gradient of ``student_hidden`` (the loss's output to backward), which
is ``[t_s + 1, N, d]`` and so grows, slowly, with ``N``. Time is the wall time of the same run
(CUDA synchronised); with ``--repeats`` > 1 the fastest run counts.

This module imports torch only inside the functions that need it, so ``vlsi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vlsi.cli_types import positive_float, positive_int
from vlsi.method.interaction import DEFAULT_CHUNK_SIZE

DEFAULT_TOKENS = (512, 1024, 2048, 4096)
# glibc's default mmap threshold, made static (see the module docstring).
_MMAP_THRESHOLD = 128 * 1024
_SRC_DIR = str(Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------------------------
# Worker side: one measurement in this process.


def random_verbalizers(layers: int, width: int, vocab_size: int, *, dtype: Any, device: Any, seed: int):
    """Callable ``fn(index, h[n, d]) -> logits[n, V]`` with random frozen weights.

    ``index < layers``: ``head(rms_norm(h + W_down(SiLU(W_gate h) * W_up h)))``;
    ``index == layers``: ``head(h)`` (the last hidden state is already normed).
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape: int, std: float) -> torch.Tensor:
        # drawn on the device (billions of numbers at d = 8192) in the target dtype: no float32
        # temporary spikes the process peak before the loss
        return torch.randn(*shape, generator=g, dtype=dtype, device=device) * std

    gate = [draw(width, width, std=width**-0.5) for _ in range(layers)]
    up = [draw(width, width, std=width**-0.5) for _ in range(layers)]
    down = [draw(width, width, std=0.5 * width**-0.5) for _ in range(layers)]
    head = draw(vocab_size, width, std=width**-0.5)

    def verbalize(index: int, h: torch.Tensor) -> torch.Tensor:
        if index < layers:
            h = h + (torch.nn.functional.silu(h @ gate[index].T) * (h @ up[index].T)) @ down[index].T
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        return h @ head.T

    return verbalize


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset: bool) -> int:
    """This address space's peak RSS since the reset (``VmHWM``), else ``ru_maxrss``.

    ``ru_maxrss`` also keeps the peak of the image replaced by ``exec``: a worker started by
    ``subprocess`` inherits its parent's RSS there, so after a reset ``VmHWM`` is the right one.
    """
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS so that the baseline is what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def head_op_counts(weights: Any, needed: Any, chunks: list[int]) -> dict[str, int]:
    """How many head matmuls and log-softmaxes the chunked loss cannot avoid, per side.

    Per chunk: the scoring pass runs the LM head and a log-softmax once per scored student row
    and scored teacher column of ``needed`` ``[t_s, t_l]``; the gradient pass, for every student
    layer with a selected pair in ``weights`` and for the last layer, one student head forward,
    log-softmax and backward matmul (``dL/dh = dL/dlogits @ W``), and one teacher head forward
    and log-softmax per selected pair and for the last layer.
    """
    rows = int(needed.any(dim=1).sum())
    cols = int(needed.any(dim=0).sum())
    selected_rows = int((weights > 0).any(dim=1).sum()) + 1
    pairs = int((weights > 0).sum()) + 1
    k = len(chunks)
    return {"student_matmuls": k * (rows + 2 * selected_rows), "teacher_matmuls": k * (cols + pairs),
            "student_log_softmaxes": k * (rows + selected_rows), "teacher_log_softmaxes": k * (cols + pairs)}


def _floor_seconds(spec: dict, result: Any, device: Any, dtype: Any) -> dict:
    """The loss's compute floor, measured here: the head matmuls and log-softmaxes of
    :func:`head_op_counts`, run back to back as the loss would run them.

    One chunk's share of the counts runs as one sequence (each matmul into a fresh output, as a
    verbalizer callable returns one; each log-softmax into a buffer already mapped, as the loss
    writes them), timed as a whole, fastest of ``repeats`` like the loss itself, and scaled by
    the number of chunks (a smaller last chunk makes this an upper bound). The verbalizer FFNs
    (``3 d^2`` per token and layer, against ``d V`` for a head) and the element-wise KL terms are
    left out: the floor is what the loss could not go below. The student's backward head
    matmul ``[c, V] x [V, d]`` runs as its forward (same FLOPs)."""
    import torch

    from vlsi.method.matching import needed_mask

    n, chunk, vocab = spec["tokens"], spec["chunk_size"], spec["vocab_size"]
    chunks = [min(chunk, n - a) for a in range(0, n, chunk)]
    counts = head_op_counts(result.weights.cpu(), needed_mask(spec["strategy"], spec["t_s"], spec["t_l"]), chunks)
    c, k = chunks[0], len(chunks)
    sides = {}
    for side, width in (("student", spec["hidden_size"]), ("teacher", spec["teacher_hidden_size"])):
        h = torch.randn(c, width, dtype=dtype, device=device)
        w = torch.randn(vocab, width, dtype=dtype, device=device)
        sides[side] = (h, w, h @ w.T)
    out = torch.empty(c, vocab, dtype=torch.float32, device=device)

    def sequence() -> dict[str, float]:
        seconds = {}
        for side, (h, w, logits) in sides.items():
            for op, count, fn in (
                ("matmul", f"{side}_matmuls", lambda: h @ w.T),
                ("log_softmax", f"{side}_log_softmaxes",
                 lambda: torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=out)),
            ):
                start = time.perf_counter()
                for _ in range(counts[count] // k):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[f"{side}_{op}"] = time.perf_counter() - start
        return seconds

    runs = [sequence() for _ in range(spec["repeats"])]
    best = min(runs, key=lambda r: sum(r.values()))
    return {"floor_seconds": k * sum(best.values()), "floor_counts": counts,
            "floor_chunk_seconds": best, "floor_repeats": spec["repeats"]}


def _measure(spec: dict) -> dict:
    """Run one (method, token count) measurement; returns peak bytes, seconds and the loss."""
    import torch

    from vlsi.method.interaction import interaction_loss, naive_interaction_loss

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"
    vocab, t_s, t_l, n = spec["vocab_size"], spec["t_s"], spec["t_l"], spec["tokens"]
    student = random_verbalizers(t_s, spec["hidden_size"], vocab, dtype=dtype, device=device, seed=spec["seed"])
    teacher = random_verbalizers(
        t_l, spec["teacher_hidden_size"], vocab, dtype=dtype, device=device, seed=spec["seed"] + 1
    )
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    student_hidden = torch.randn(t_s + 1, n, spec["hidden_size"], generator=g, dtype=dtype).to(device)
    teacher_hidden = torch.randn(t_l + 1, n, spec["teacher_hidden_size"], generator=g, dtype=dtype).to(device)
    loss_fn = interaction_loss if spec["method"] == "chunked" else naive_interaction_loss

    def run(tokens: int):
        hidden = student_hidden[:, :tokens].detach().requires_grad_()
        result = loss_fn(
            hidden, teacher_hidden[:, :tokens], student, teacher, vocab_size=vocab,
            strategy=spec["strategy"], chunk_size=spec["chunk_size"],
            generator=torch.Generator().manual_seed(spec["seed"]),
        )
        result.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return result  # its graph keeps `hidden` and its gradient alive

    run(min(n, 8))  # warm-up on a few tokens
    release_freed_memory()
    if cuda:
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = rss_bytes()
        reset = reset_peak_rss()
    seconds, result = [], None
    for _ in range(spec["repeats"]):
        result = None  # drop the previous run's gradient before the next one
        start = time.perf_counter()
        result = run(n)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(reset)
    floor = _floor_seconds(spec, result, device, dtype) if spec["method"] == "chunked" else {}
    return {
        **floor,
        "method": spec["method"],
        "tokens": n,
        "peak_bytes": int(peak - baseline),
        "seconds": min(seconds),
        "loss": float(result.loss),
        "peak_method": "cuda max_memory_allocated" if cuda else
        ("VmHWM after clear_refs reset" if reset else "ru_maxrss since process start"),
    }


def _probe(device: str) -> dict:
    """Available memory (bytes) and a device description (run in a worker for CUDA)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return {"available_bytes": int(free), "device_name": torch.cuda.get_device_name(torch.device(device))}
    return {"available_bytes": _mem_available_bytes(), "device_name": cpu_name()}


# --------------------------------------------------------------------------------------------
# Driver side.


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _spawn(payload: dict, timeout_s: float | None) -> dict:
    """Run ``python -m vlsi.tools.bench --one PAYLOAD`` and parse its last output line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_DIR, env.get("PYTHONPATH")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(_MMAP_THRESHOLD))
    cmd = [sys.executable, "-m", "vlsi.tools.bench", "--one", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout_s} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return {"status": "measured", **json.loads(lines[-1])}


def naive_bytes_estimate(tokens: int, vocab_size: int, t_s: int, t_l: int) -> int:
    """Rough naive footprint in float32 ``[N, V]`` tensors: log-probs of all ``t_s + t_l + 2``
    layers, one saved teacher distribution per selected pair (``t_s + 1``), ~3 temporaries."""
    return tokens * vocab_size * 4 * ((t_s + t_l + 2) + (t_s + 1) + 3)


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x``; through the origin for one point."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _naive_fit(rows: list[dict]) -> dict | None:
    measured = [r["naive"] for r in rows if r["naive"]["status"] == "measured"]
    if not measured:
        return None
    xs = [float(m["tokens"]) for m in measured]
    b0, b1 = _linear_fit(xs, [float(m["peak_bytes"]) for m in measured])
    s0, s1 = _linear_fit(xs, [m["seconds"] for m in measured])
    return {"points": len(measured), "bytes_intercept": b0, "bytes_per_token": b1,
            "seconds_intercept": s0, "seconds_per_token": s1}


def _fill_extrapolations(rows: list[dict], fit: dict | None) -> None:
    for row in rows:
        naive = row["naive"]
        if naive["status"] == "measured" or fit is None:
            continue
        naive.update(
            status="extrapolated",
            peak_bytes=int(fit["bytes_intercept"] + fit["bytes_per_token"] * row["tokens"]),
            seconds=fit["seconds_intercept"] + fit["seconds_per_token"] * row["tokens"],
        )


def _ratios(rows: list[dict]) -> None:
    for row in rows:
        chunked, naive = row["chunked"], row["naive"]
        row["memory_ratio"] = row["time_ratio"] = None
        if chunked["status"] == "measured" and naive["status"] in ("measured", "extrapolated"):
            row["memory_ratio"] = naive["peak_bytes"] / max(chunked["peak_bytes"], 1)
            row["time_ratio"] = naive["seconds"] / chunked["seconds"]
            row["ratio_kind"] = naive["status"]


def _spread(peaks: list[int]) -> float | None:
    return (max(peaks) / min(peaks) - 1.0) if peaks and min(peaks) > 0 else None


def _summary(rows: list[dict], chunk_size: int) -> dict:
    """Spread of the chunked peak (all sizes, and sizes of at least one full chunk: below one
    chunk the working set is smaller by construction) and the worst measured time ratio."""
    measured = [r for r in rows if r["chunked"]["status"] == "measured"]
    full = [r["chunked"]["peak_bytes"] for r in measured if r["tokens"] >= chunk_size]
    measured_time = [r["time_ratio"] for r in rows if r.get("ratio_kind") == "measured"]
    return {
        "chunked_peak_spread": _spread([r["chunked"]["peak_bytes"] for r in measured]),
        "chunked_peak_spread_full_chunks": _spread(full),
        "full_chunk_tokens": [r["tokens"] for r in measured if r["tokens"] >= chunk_size],
        "worst_measured_time_ratio": min(measured_time) if measured_time else None,
    }


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def format_table(report: dict) -> str:
    """Readable table of a :func:`run_loss_benchmark` report."""
    head = (f"{'tokens':>7} {'chunked MiB':>12} {'chunked s':>10} {'floor s':>8} {'c/floor':>8} {'naive MiB':>12} "
            f"{'naive s':>9} {'naive':>12} {'mem n/c':>8} {'time n/c':>8}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        c, n = row["chunked"], row["naive"]
        mem = "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
        tim = "-" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        floor = c.get("floor_seconds")
        over = "-" if not floor else f"{c['seconds'] / floor:.2f}"
        lines.append(
            f"{row['tokens']:>7} {_mib(c.get('peak_bytes')):>12} {c.get('seconds', float('nan')):>10.3f} "
            f"{(floor or float('nan')):>8.3f} {over:>8} {_mib(n.get('peak_bytes')):>12} {n.get('seconds', float('nan')):>9.3f} {n['status']:>12} "
            f"{mem:>8} {tim:>8}"
        )
    s = report["summary"]
    if s["chunked_peak_spread"] is not None:
        lines.append(f"chunked peak spread over token counts: {100 * s['chunked_peak_spread']:.1f}%")
    if s.get("chunked_peak_spread_full_chunks") is not None:
        lines.append(f"chunked peak spread over token counts >= one chunk {s['full_chunk_tokens']}: "
                     f"{100 * s['chunked_peak_spread_full_chunks']:.2f}%")
    lines.append("n/c = naive / chunked; 'extrapolated' rows use a linear fit of the measured naive runs")
    lines.append("floor = the head matmuls and log-softmaxes the chunked loss must run, run back to back "
                 "in the same worker (fastest of the same repeats); c/floor = chunked / floor")
    return "\n".join(lines)


def run_loss_benchmark(
    vocab_size: int = 151936,
    hidden_size: int = 1536,
    t_s: int = 7,
    t_l: int = 20,
    tokens: tuple[int, ...] | list[int] = DEFAULT_TOKENS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: str = "bfloat16",
    device: str = "cpu",
    naive_max_tokens: int = 2048,
    out_json: str | Path | None = None,
    *,
    teacher_hidden_size: int | None = None,
    strategy: str = "vlsi",
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 1,
    timeout_s: float | None = None,
    verbose: bool = True,
) -> dict:
    """Measure chunked and naive interaction loss (forward + backward) over token counts.

    Args:
        vocab_size, hidden_size, t_s, t_l: problem size (defaults: Qwen2-VL vocabulary, a 2B
            student width, 7 student and 20 teacher target layers).
        tokens: response-token counts ``N`` to measure.
        chunk_size: chunk of the chunked loss.
        dtype: verbalizer and hidden-state dtype (``bfloat16``, ``float32``, ...).
        device: ``cpu`` or ``cuda[:k]``.
        naive_max_tokens: largest ``N`` for which the naive loss is run (if it also fits).
        out_json: where to write the report, if given.
        teacher_hidden_size: teacher width (default ``hidden_size``).
        threads: ``torch.set_num_threads`` in the workers (default: torch's own).
        repeats: timed runs per measurement (fastest kept).
        timeout_s: per-measurement limit.

    Returns:
        The report: ``config``, ``device_name``, ``method`` (how memory is measured),
        ``results`` (one row per token count with ``chunked``, ``naive``, ``memory_ratio`` and
        ``time_ratio`` as naive / chunked, ``ratio_kind``), ``naive_fit`` and ``summary``.
    """
    config = {
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "teacher_hidden_size": teacher_hidden_size or hidden_size, "t_s": t_s, "t_l": t_l,
        "chunk_size": chunk_size, "dtype": dtype, "device": device, "strategy": strategy,
        "seed": seed, "threads": threads, "repeats": repeats,
    }
    probe = _probe(device) if device == "cpu" else _spawn({"probe": device}, timeout_s)
    available = probe.get("available_bytes", 0)
    rows = []
    for n in sorted(tokens):
        row: dict[str, Any] = {"tokens": n, "chunked": _spawn({**config, "method": "chunked", "tokens": n}, timeout_s)}
        estimate = naive_bytes_estimate(n, vocab_size, t_s, t_l)
        if n <= naive_max_tokens and estimate < 0.8 * available:
            row["naive"] = _spawn({**config, "method": "naive", "tokens": n}, timeout_s)
        else:
            row["naive"] = {"status": "skipped", "estimated_bytes": estimate}
        rows.append(row)
        if verbose:
            print(f"tokens={n}: chunked {row['chunked'].get('status')}, naive {row['naive']['status']}", flush=True)
    fit = _naive_fit(rows)
    _fill_extrapolations(rows, fit)
    _ratios(rows)
    report = {
        "config": config,
        "device_name": probe.get("device_name", device),
        "available_bytes": available,
        "method": ("one fresh subprocess per measurement; CPU: peak RSS (VmHWM) after a clear_refs reset "
                   "minus RSS just before the loss; CUDA: max_memory_allocated minus memory_allocated"),
        "results": rows,
        "naive_fit": fit,
        "summary": _summary(rows, config["chunk_size"]),
    }
    if verbose:
        print(format_table(report))
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------------------------
# Command line.


def _add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=positive_int, default=151936, help="shared vocabulary V")
    parser.add_argument("--hidden-size", type=positive_int, default=1536, help="student width")
    parser.add_argument("--teacher-hidden-size", type=positive_int, default=None, help="default: --hidden-size")
    parser.add_argument("--t-s", type=positive_int, default=7, help="student target layers")
    parser.add_argument("--t-l", type=positive_int, default=20, help="teacher target layers")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=list(DEFAULT_TOKENS),
                        help="response-token counts N to measure")
    parser.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float64"],
                        help="verbalizer and hidden-state dtype (losses are float32 regardless)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--naive-max-tokens", type=positive_int, default=2048,
                        help="largest N to run the naive loss at (beyond: extrapolated)")
    parser.add_argument("--strategy", default="vlsi", help="matching strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs per measurement (fastest kept)")
    parser.add_argument("--timeout", type=positive_float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="JSON report path")


def _cmd_loss(args: argparse.Namespace) -> None:
    run_loss_benchmark(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, t_s=args.t_s, t_l=args.t_l,
        tokens=args.tokens, chunk_size=args.chunk_size, dtype=args.dtype, device=args.device,
        naive_max_tokens=args.naive_max_tokens, out_json=args.out,
        teacher_hidden_size=args.teacher_hidden_size, strategy=args.strategy, seed=args.seed,
        threads=args.threads, repeats=args.repeats, timeout_s=args.timeout,
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``loss`` under the ``vlsi bench`` sub-commands (sets ``func``)."""
    parser = subparsers.add_parser("loss", help="chunked vs naive interaction-loss memory and time")
    _add_loss_arguments(parser)
    parser.set_defaults(func=_cmd_loss)


def main(argv: list[str] | None = None) -> int:
    """``python -m vlsi.tools.bench loss [...]``; ``--one JSON`` is the internal worker entry."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        spec = json.loads(argv[1])
        result = _probe(spec["probe"]) if "probe" in spec else _measure(spec)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m vlsi.tools.bench")
    add_cli(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
