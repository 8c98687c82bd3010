"""What ``pigeon bench attention`` and ``pigeon bench gemm`` share: flag parsing, the run's
environment record, ``--resume``, the loop over cases, TFLOP/s and ratios.  The timing itself is
:func:`pigeon.bench.timing.measure`, the files :mod:`pigeon.bench.report`'s helpers."""
from __future__ import annotations

import datetime
import gc
from typing import Callable

import torch

import pigeon as pg

from .rgnn import BenchError, _choose, _git_commit, _split
from .timing import free

__all__ = ["BenchError", "FnStep", "split", "choose", "positive_ints", "git_commit", "environment", "resume", "run_cases",
           "tflops", "ratio", "worst", "identity"]

split, choose, git_commit = _split, _choose, _git_commit


class FnStep:
    """One timed step: ``fn(*inputs)`` on its own leaves (attention: q, k, v; GEMM: a, b), under
    no_grad in "forward" mode; in "forward+backward" the leaves require grad and the step calls
    ``out.backward(grad_out)``.  The first call's output is kept for the check (until ``clear``,
    which measure() calls before timing); ``to_pigeon(tensor, which)`` turns this
    implementation's layout ("q", "k", "v", "out") into pigeon's."""

    def __init__(self, fn: Callable, inputs, mode: str, grad_out=None, to_pigeon: Callable | None = None):
        bwd = mode != "forward"
        self.fn, self.mode, self.grad_out = fn, mode, grad_out
        self.inputs = [t.detach().requires_grad_(bwd) for t in inputs]
        self.to_pigeon = to_pigeon or (lambda t, which: t)
        self.first, self.keep = None, True

    def __call__(self) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                out = self.fn(*self.inputs)
        else:
            for t in self.inputs:
                t.grad = None
            out = self.fn(*self.inputs)
            out.backward(self.grad_out)
        if self.keep and self.first is None:
            self.first = out.detach()

    def clear(self) -> None:
        for t in self.inputs:
            t.grad = None
        self.first, self.keep = None, False

    def results(self) -> dict:
        """The first call's output (and gradients) in pigeon's layout."""
        r = {"out": self.to_pigeon(self.first, "out")}
        if self.mode != "forward":
            for name, t, which in zip(("grad q", "grad k", "grad v"), self.inputs, "qkv"):
                r[name] = None if t.grad is None else self.to_pigeon(t.grad, which)
        return r


def identity(x):
    return x


def positive_ints(flag: str, text, default: tuple[int, ...]) -> tuple[int, ...]:
    """Comma-separated positive integers (``default`` for None); BenchError naming the flag."""
    if text is None:
        return tuple(default)
    try:
        vals = tuple(int(v) for v in split(str(text)))
    except ValueError:
        vals = ()
    if not vals or any(v <= 0 for v in vals):
        raise BenchError(f"{flag} {text}: give comma-separated positive integers")
    return tuple(dict.fromkeys(vals))


def environment(device: torch.device, command: str, **extra) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"none (--device {device.type})"
    return {"gpu": gpu, "device": str(device), "torch": torch.__version__, "pigeon": pg.__version__,
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, **extra}


def resume(previous: dict | None, meta: dict, device: torch.device, out: str) -> list[dict]:
    """The cases to keep from an earlier run's cases.json (``--resume``); records the commands that
    made them in ``meta["commands"]``.  BenchError when they were run on another kind of device."""
    if not previous:
        return []
    was = previous.get("meta", {})
    if was.get("device") is not None and torch.device(was["device"]).type != device.type:
        raise BenchError(f"--resume: {out} holds cases run on {was['device']}, this run is on {device}")
    before = was.get("commands") or ([was["command"]] if was.get("command") else [])
    meta["commands"] = list(dict.fromkeys(before + [meta["command"]]))
    return list(previous.get("cases", []))


def run_cases(specs: list, key: Callable, run_one: Callable, line: Callable, result: dict, summarize: Callable,
              progress: Callable[[str], None], on_case: Callable | None, out: str, device) -> dict:
    """Run ``run_one(spec)`` for every spec whose ``key(spec)`` is not among ``result["cases"]``
    (kept by --resume), one progress line each; after each case ``result["summary"] =
    summarize(result)`` and ``on_case(result)`` (to write the files)."""
    cases = result["cases"]
    done = {key(c) for c in cases}
    todo = [s for s in specs if key(s) not in done]
    if done:
        progress(f"# --resume: {len(cases)} cases from {out}/cases.json kept, {len(todo)} to run")
    # what is alive before the cases (modules, torch's and pigeon's tables) leaves the garbage
    # collector's scans, so the collection after each implementation (timing.free) takes
    # microseconds instead of ~0.2 s
    gc.collect()
    gc.freeze()
    try:
        for i, spec in enumerate(todo, 1):
            case = run_one(spec)
            case["commit"], case["date"] = result["meta"]["commit"], result["meta"]["date"]
            cases.append(case)
            progress(f"[{i}/{len(todo)}] {line(case)}")
            free(device)
            if on_case is not None:
                result["summary"] = summarize(result)
                on_case(result)
    finally:
        gc.unfreeze()
    result["summary"] = summarize(result)
    return result


def tflops(flops: float | None, ms: float | None) -> float | None:
    return flops / (ms * 1e-3) / 1e12 if flops and ms else None


def ratio(peer_ms: float | None, pigeon_ms: float | None) -> float | None:
    """peer time / pigeon time = pigeon's TFLOP/s / the peer's (above 1: pigeon faster)."""
    return peer_ms / pigeon_ms if peer_ms and pigeon_ms else None


def worst(cases: list[dict], field: str, label: Callable[[dict], str]) -> tuple[float | None, str | None]:
    """The smallest ``case[field]`` that is a number, and the label of its case."""
    vals = [(c[field], label(c)) for c in cases if isinstance(c.get(field), (int, float))]
    return min(vals, key=lambda t: t[0]) if vals else (None, None)
