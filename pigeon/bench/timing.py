"""Timing one implementation: build it, run its first step under a time limit, time its steps
(CUDA events on a GPU), measure its peak memory; its failures (OOM, timeout, errors) become its
status instead of exceptions."""
from __future__ import annotations

import gc
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from ..timing import median_ms, sync  # noqa: F401  (one definition, shared with pigeon compile --tune)

__all__ = ["PeerTimeout", "median_ms", "peak_mib", "Step", "loss_of", "is_oom", "failure", "time_limit", "free",
           "measure", "one_line", "sync", "LR", "COMPILE_RECOMPILE_LIMIT"]

LR = 1e-3
# the reference interpreter calls one Python function per IR op, and dynamo guards each call
# separately: with the default limit (8) the later ops would silently run eagerly
COMPILE_RECOMPILE_LIMIT = 1024


class PeerTimeout(BaseException):
    """Raised by SIGALRM in the main thread (a BaseException, so no ``except Exception`` in a peer or
    in torch.compile swallows it)."""


def one_line(text, limit: int = 300) -> str:
    s = "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())
    return s if len(s) <= limit else s[:limit - 3] + "..."




def peak_mib(fn: Callable[[], object], device) -> float | None:
    """MiB allocated at the peak of one ``fn()`` beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def loss_of(out) -> torch.Tensor:
    outs = out.values() if isinstance(out, dict) else [out]
    return sum(o.float().pow(2).mean() for o in outs)


class Step:
    """One inference call or one training step of ``module`` on ``x``: the same for every impl."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, mode: str):
        self.module, self.mode = module, mode
        if mode == "training":
            self.x = x.detach().clone().requires_grad_(True)
            params = [p for p in module.parameters() if p.requires_grad] + [self.x]
            self.opt = torch.optim.SGD(params, lr=LR)
        else:
            self.x, self.opt = x, None

    def clear(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        if self.opt is None:
            with torch.no_grad():
                self.module(self.x)
            return
        self.opt.zero_grad(set_to_none=True)
        loss_of(self.module(self.x)).backward()
        self.opt.step()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def failure(e: BaseException) -> str:
    """The status of an implementation that raised ``e``."""
    if isinstance(e, PeerTimeout):
        return "timeout"
    if is_oom(e):
        return "OOM"
    return f"error: {type(e).__name__}: {one_line(e)}"


@contextmanager
def time_limit(seconds: float | None):
    """Raise PeerTimeout in the block after ``seconds`` (SIGALRM; main thread on POSIX only,
    elsewhere a no-op: the caller also compares the wall time)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise PeerTimeout()

    # the alarm can land anywhere, also between a grad-mode switch and the try that restores it
    # (``with torch.no_grad()`` entered but not yet inside, a replay's set_grad_enabled): the mode is
    # thread state that would then stay off for everything after (CI at 139be11: 172 tests failed
    # after one timed-out peer), so the block's exit puts it back
    grad = torch.is_grad_enabled()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        torch.set_grad_enabled(grad)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def measure(name: str, kind: str, build: Callable[[], torch.nn.Module], x, mode: str, device, *, warmup: int,
            reps: int, timeout: float | None, after_first: Callable | None = None,
            step_of: Callable | None = None, budget_s: float | None = None) -> dict:
    """Build an implementation, run its first step (timed: ``first_call_s``, under ``timeout``), call
    ``after_first(module)`` (pigeon's check), then time it. Never raises for the implementation's
    own failures: they become its status.

    The step is ``Step(module, x, mode)``, or ``step_of(module)`` when given (any callable with a
    ``clear()``: a benchmark whose implementations are not modules of one input). Timing stops
    early after ``budget_s`` seconds (default: ``timeout``; at least one timed call)."""
    row = {"impl": name, "kind": kind, "status": "ok", "median_ms": None, "reps": 0, "peak_mib": None,
           "first_call_s": None}
    module = step = None
    limits = torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT) if kind == "compile" \
        else nullcontext()
    graphs0 = _dynamo_graphs() if kind == "compile" else None
    t0 = time.perf_counter()
    try:
        with limits:
            with time_limit(timeout):
                module = build()
                step = step_of(module) if step_of is not None else Step(module, x, mode)
                step()
                sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            if kind == "compile":
                row["compile_s"] = row["first_call_s"]
                g1 = _dynamo_graphs()
                if graphs0 is not None and g1 is not None:
                    row["dynamo_graphs"] = g1 - graphs0
            if timeout and row["first_call_s"] > timeout:
                raise PeerTimeout()
            if after_first is not None:
                after_first(module)
            step.clear()
            budget = (budget_s if budget_s is not None else timeout) or math.inf
            row["median_ms"], row["reps"] = median_ms(step, device, warmup, reps, budget)
            step.clear()
            row["peak_mib"] = peak_mib(step, device)
    except BaseException as e:       # the implementation's failure is its row; Ctrl-C still stops
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        row["status"] = failure(e)
        row["median_ms"] = None
        if row["first_call_s"] is None:
            row["elapsed_s"] = time.perf_counter() - t0       # until the failure (or the time limit)
        if kind == "compile":
            torch._dynamo.reset()
    finally:
        del module, step
        free(device)
    return row
