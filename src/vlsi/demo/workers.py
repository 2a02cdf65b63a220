"""Independent demo runs (seeds, map points, ablation rows) in parallel worker processes.

The demo's models are tiny, so a run spends most of its time in Python and in small kernels
that one thread handles as fast as two: on a 2-core machine two single-threaded runs side by
side finish in about the time of one two-threaded run. :func:`run_all` runs ``fn(*args)`` for
each argument tuple, in ``workers`` spawned processes of ``threads`` torch threads each (or in
this process when ``workers`` is 1), and returns the results in order. Results depend on the
thread count (float reductions), so a run records its ``workers`` and ``threads``. Workers are
spawned, so a script that calls :func:`vlsi.demo.run.run_demo` or ``run_ablate`` must guard its
entry point with ``if __name__ == "__main__":`` (each worker imports the script again).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Sequence


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _init(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()


def run_all(fn: Callable[..., Any], argsets: Sequence[tuple], workers: int) -> list[Any]:
    """``[fn(*args) for args in argsets]``, with ``workers`` processes when ``workers > 1``."""
    if workers <= 1 or len(argsets) <= 1:
        return [fn(*args) for args in argsets]
    threads = threads_per_worker(workers)
    with ProcessPoolExecutor(max_workers=min(workers, len(argsets)), mp_context=get_context("spawn"),
                             initializer=_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for args in argsets]
        return [f.result() for f in futures]
