"""Timing one callable: CUDA events around each call on a GPU, perf_counter around a synchronized
call elsewhere; the median.  One definition for ``pigeon bench`` and ``pigeon compile --tune``."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

__all__ = ["sync", "median_ms"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device, warmup: int = 3, reps: int = 20,
              budget_s: float = math.inf) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` over ``reps`` timed calls after ``warmup`` calls (CUDA events
    on a GPU; perf_counter around a synchronized call elsewhere). Stops early, after at least one
    timed call, once ``budget_s`` seconds have passed. Returns (median, timed calls)."""
    cuda = device.type == "cuda"
    end = time.perf_counter() + budget_s
    for _ in range(warmup):
        fn()
        sync(device)
        if time.perf_counter() > end:
            break
    times = []
    while len(times) < max(reps, 1):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > end:
            break
    return statistics.median(times), len(times)
