"""Time a loaded kernel the way inference uses it: weights streamed from memory, not from cache."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from perfmodel.host import detect
from runtime.loader import Kernel

MAX_COPIES = 64  # weight copies a timing rotates: enough to overflow the L3 for every shape that could stream. A
# count of 2x L3 over the matrix alone made hundreds of thousands of copies of a tiny one where sysfs reports a
# 480 MiB L3 (a VM's host), and qigen bench's test took 7 minutes


def time_call(fn: Callable[[], object], repeats: int = 5, budget_s: float = 2.0) -> list[float]:
    """Seconds per call of `fn`, one figure per repeat; each repeat runs long enough to be measurable."""
    fn()  # warm up: first touch, thread pool start
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    calls = int(min(max(1, 0.01 / once), max(1, budget_s / repeats / once)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return times


def time_kernel(kernel: Kernel, threads: int, repeats: int = 5, seed: int = 0) -> list[float]:
    """Seconds per call on random weights; enough weight copies rotate to overflow the last-level cache."""
    spec = kernel.spec
    rng = np.random.default_rng(seed)
    packed = kernel.quantize(rng.standard_normal((spec.rows, spec.cols)).astype(np.float32))
    copies = [packed] + [replace(packed, arrays={name: a.copy() for name, a in packed.arrays.items()})
                         for _ in range(min(-(-2 * detect().l3 // packed.nbytes), MAX_COPIES) - 1)]
    x = rng.standard_normal((spec.batch, spec.cols) if spec.batch > 1 else spec.cols).astype(np.float32)
    turn = iter(range(1 << 62))

    def call() -> None:
        kernel(x, copies[next(turn) % len(copies)], threads=threads)

    return time_call(call, repeats)
