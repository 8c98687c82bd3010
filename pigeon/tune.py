"""``pigeon compile --tune`` / ``pigeon.compile(..., tune=True)``: measure the configurations the
cost rules choose between and keep the fastest.

1. The decision points (pigeon/passes/choices.py: linear reordering on/off, compaction on/off, the
   schedule of each (aggregation or edge softmax, side, lane group), and on a GPU the code
   generator of each dense GEMM shape: pigeon's template or TVM's dlight Matmul rule) become candidate
   configurations: all combinations when there are at most ``max_full``, else the rule's pick and
   every configuration one decision away from it.
2. Each candidate is built (``build(choices, "kernels")``: the pass pipeline and lowering with those
   choices), given the pick's weights, and run once on seeded inputs; its outputs (and in
   ``training`` mode the gradients of ``sum(out.float()**2).mean()`` for the inputs and every
   weight) are compared with the reference interpreter on the traced IR with reordering and
   compaction off.  A candidate outside the tolerance (float32: rtol 1e-4, atol 1e-4 * max|ref|,
   with the float64 arbiter of pigeon bench; bfloat16: 4e-2) or one that fails is reported and
   excluded, so tuning never changes results beyond what every configuration is allowed.
3. Each remaining candidate is timed: the median of ``reps`` calls after warm-up, CUDA events on a
   GPU, in ``rounds`` rounds (3 on a GPU) that visit the candidates in rotated order, the median of
   the rounds counting. One pass in a fixed order favoured whichever came later: the first
   candidate, the cost model's pick, ran right after the reference check and took up to 1.45x its
   own time on the H200 (`--tune-check`, small graphs, 988c899, where a training step is ~1 ms of
   mostly host time). On a CPU ``time.perf_counter`` around the CPU executor (the kernels' torch semantics or
   their emulated CUDA text), which says nothing about GPU kernels and is labelled so.
   ``inference`` times a forward under ``no_grad``; ``training`` forward + backward.
4. The winner (smallest median) is recorded in the tuning records of the kernel cache
   (pigeon/runtime/tune_records.py) under a key of the spec's traced IR, hyperparameters, dims,
   dtype, the graph's statistics, the device name and the mode; a later compile with the same key
   takes the recorded choices without measuring.

This module does not import the runtime: ``pigeon/module.py`` hands it the builder, the inputs,
the statistics and the record store.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import timing
from .codegen.gemm import tile_buildable
from .ir.graph import IRGraph
from .passes.choices import MAX_FULL, Candidate, candidates, estimate, format_choices, pipeline_points, schedule_points
from .passes.pipeline import run_pipeline

__all__ = ["TuneResult", "TuneRow", "tune", "tune_key", "median_ms", "TOLERANCE", "MODES", "ORACLE_CHOICES",
           "RECORD_FORMAT"]

MODES = ("inference", "training")
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (4e-2, 4e-2)}     # (rtol, atol as a fraction of max|ref|)
ORACLE_CHOICES = {"linear_reorder": False, "compaction": False}     # the reference runs the IR as traced
RECORD_FORMAT = "pigeon-tune-v1"
DEFAULT_REPS = {"cuda": 20, "cpu": 5}


class TuneError(RuntimeError):
    pass


def tune_key(fields: dict) -> str:
    """sha256 over the key fields (spec IR, hparams, dims, dtype, graph statistics, device, mode)."""
    return hashlib.sha256(json.dumps({"format": RECORD_FORMAT, **fields}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def ir_digest(ir: IRGraph) -> str:
    """The traced IR's structure: op keys (kind, attributes, types, inputs) and the outputs."""
    h = hashlib.sha256()
    for op in ir.ops():
        h.update(op.key.encode())
    h.update(json.dumps([list(ir.outputs), list(ir.output_names)]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- timing

def median_ms(fn: Callable[[], object], device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` (pigeon/timing.py: CUDA events on a GPU, perf_counter
    around a synchronized call elsewhere)."""
    return timing.median_ms(fn, device, warmup=warmup, reps=reps)[0]


def timer_label(device) -> str:
    if device.type == "cuda":
        return f"CUDA events on {torch.cuda.get_device_name(device)}"
    backend = os.environ.get("PIGEON_CPU_BACKEND", "torch")
    return (f"CPU perf_counter around the {backend!r} CPU executor (kernel semantics on the host): "
            f"not a measurement of GPU kernels")


# ---------------------------------------------------------------------------------------- checking

def _outputs(out) -> dict:
    return out if isinstance(out, dict) else {"out": out}


def values(layer, inputs: list, mode: str, dtype=None) -> dict:
    """The layer's outputs on ``inputs`` and, in training, the gradients of the loss for the inputs
    and every weight."""
    xs = [x.to(dtype) if dtype is not None and x.is_floating_point() else x for x in inputs]
    if mode == "inference":
        with torch.no_grad():
            return {k: v.detach() for k, v in _outputs(layer(*xs)).items()}
    layer.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]
    with torch.enable_grad():
        out = _outputs(layer(*xs))
        sum(o.float().pow(2).mean() for o in out.values()).backward()
    vals = {k: v.detach() for k, v in out.items()}
    vals.update({f"grad input {i}": x.grad for i, x in enumerate(xs)})
    vals.update({f"grad {k}": p.grad for k, p in layer.weights.items()})
    layer.zero_grad(set_to_none=True)
    return vals


def _close(got, want, dtype: str) -> str | None:
    if got is None or want is None:
        return None if got is None and want is None else "missing"
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != reference {list(want.shape)}"
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all()):
        return "not finite"
    err = (got - want).abs()
    bad = err > atol * scale + rtol * want.abs() + 1e-30
    if bool(bad.any()):
        return f"max abs err {float(err.max()):.3g} (max|ref| {scale:.3g}), {int(bad.sum())} elements off"
    return None


def _arbitrate(got, want32, want64) -> bool:
    """pigeon no farther than 2x the float32 reference from the float64 truth (pigeon bench's arbiter)."""
    got, want32, want64 = (t.detach().double().cpu() for t in (got, want32, want64))
    if not got.numel():
        return True
    e_p = float((got - want64).abs().max())
    e_r = float((want32 - want64).abs().max())
    return bool(torch.isfinite(got).all()) and e_p <= 2.0 * e_r + 1e-7 * float(want64.abs().max())


class Oracle:
    """The reference's values on the tuning inputs (float32, and float64 when an arbiter is needed)."""

    def __init__(self, build: Callable, weights: dict, inputs: list, mode: str, dtype: str, device):
        self.build, self.weights, self.inputs, self.mode, self.dtype, self.device = \
            build, weights, inputs, mode, dtype, device
        self.want = self._values("float32")
        self._want64 = None

    def _values(self, ref_dtype: str) -> dict:
        ref = self.build(ORACLE_CHOICES, "reference", ref_dtype)
        tdt = getattr(torch, self.dtype)
        ref.weights.load_state_dict({k: v.detach().to(tdt).to(getattr(torch, ref_dtype)) for k, v in self.weights.items()})
        ref = ref.to(self.device)
        return values(ref, self.inputs, self.mode, getattr(torch, ref_dtype))

    def check(self, got: dict) -> str | None:
        """None when ``got`` matches, else why not."""
        problems = []
        for name, want in self.want.items():
            why = _close(got.get(name), want, self.dtype)
            if why and self.dtype == "float32" and got.get(name) is not None:
                if self._want64 is None:
                    self._want64 = self._values("float64")
                if name in self._want64 and _arbitrate(got[name], want, self._want64[name]):
                    why = None
            if why:
                problems.append(f"{name}: {why}")
        return "; ".join(problems) if problems else None


# ---------------------------------------------------------------------------------------- the search

@dataclass
class TuneRow:
    label: str
    choices: dict
    is_pick: bool
    status: str = "ok"                 # ok | excluded: why | error: why
    median_ms: float | None = None
    estimate: dict = field(default_factory=dict)
    estimate_text: str = ""

    def as_dict(self) -> dict:
        return {"label": self.label, "choices": self.choices, "is_pick": self.is_pick, "status": self.status,
                "median_ms": self.median_ms, "estimate": self.estimate, "estimate_text": self.estimate_text}


@dataclass
class TuneResult:
    key: str
    choices: dict                      # the winner's
    rows: list[TuneRow]
    mode: str
    device: str
    timer: str
    from_cache: bool = False
    fields: dict = field(default_factory=dict)

    @property
    def winner(self) -> TuneRow | None:
        ok = [r for r in self.rows if r.status == "ok" and r.median_ms is not None]
        return min(ok, key=lambda r: r.median_ms) if ok else None

    @property
    def pick(self) -> TuneRow | None:
        return next((r for r in self.rows if r.is_pick), None)

    def pick_ratio(self) -> float | None:
        """The cost model's pick's time over the best candidate's (1.0: the pick was the best)."""
        p, w = self.pick, self.winner
        if p is None or w is None or p.median_ms is None or p.status != "ok" or not w.median_ms:
            return None
        return p.median_ms / w.median_ms

    def record(self) -> dict:
        return {"format": RECORD_FORMAT, "key": self.key, "fields": self.fields, "choices": self.choices,
                "mode": self.mode, "device": self.device, "timer": self.timer,
                "rows": [r.as_dict() for r in self.rows],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    @classmethod
    def from_record(cls, rec: dict) -> "TuneResult":
        rows = [TuneRow(r["label"], r["choices"], r["is_pick"], r["status"], r["median_ms"], r.get("estimate", {}),
                        r.get("estimate_text", "")) for r in rec.get("rows", [])]
        return cls(rec["key"], rec["choices"], rows, rec["mode"], rec["device"], rec["timer"], True,
                   rec.get("fields", {}))

    def table(self) -> list[str]:
        """One markdown row per candidate: what differs from the pick, the estimates, the time."""
        w = self.winner
        lines = [f"tune ({self.mode}, {self.timer}{'; from the tuning record, not measured now' if self.from_cache else ''}):",
                 "| # | candidate | estimated cost | median ms | status |", "|---|---|---|---|---|"]
        for i, r in enumerate(self.rows):
            mark = " (winner)" if r is w else ""
            ms = "" if r.median_ms is None else f"{r.median_ms:.4f}"
            lines.append(f"| {i} | {r.label}{mark} | {r.estimate_text} | {ms} | {r.status} |")
        ratio = self.pick_ratio()
        if w is not None:
            lines.append(f"winner: {w.label}: {format_choices(self.choices) or '(no decisions)'}"
                         + (f"; cost model's pick / best = {ratio:.3f}" if ratio is not None else ""))
        return lines


def tune(*, ir: IRGraph, graph_stats: dict, kernel_stats: dict, build: Callable, make_inputs: Callable[[], list],
         lower_fn: Callable, key: str, fields: dict, mode: str, device, dtype: str = "float32", store=None,
         progress: Callable[[str], None] | None = None, timer: Callable | None = None, reps: int | None = None,
         warmup: int = 2, max_full: int = MAX_FULL, rounds: int | None = None) -> TuneResult:
    """Measure the candidates of ``ir`` (see the module docstring); ``store`` (get/put of records
    by key, or None: measure and record nothing) is read first.

    ``build(choices, backend, dtype=None)`` returns a CompiledLayer; ``lower_fn(compilation)`` the
    lowered (unscheduled) forward and backward programs; ``kernel_stats`` the kernel graph's degree
    and compact statistics; ``timer(fn, device, reps, warmup)`` milliseconds (default: ``median_ms``)."""
    if mode not in MODES:
        raise TuneError(f"tune mode {mode!r}: expected one of {', '.join(MODES)}")
    progress = progress or (lambda m: None)
    if store is not None:
        rec = store.get(key)
        if rec is not None:
            res = TuneResult.from_record(rec)
            progress(f"[tune] {key[:12]}: recorded winner {format_choices(res.choices) or '(no decisions)'} "
                     f"(not measured again)")
            return res
    timer = timer or median_ms
    reps = reps or DEFAULT_REPS.get(device.type, 5)
    rounds = rounds or (3 if device.type == "cuda" else 1)
    pipe = pipeline_points(ir, graph_stats)

    def sched_of(pipe_choices: dict):
        try:
            comp, _ = run_pipeline(ir, graph_stats=graph_stats, choices=pipe_choices)
            progs = lower_fn(comp)
            # inference runs the forward program only: a backward decision would be a second
            # measurement of the same forward (two such candidates differed by 4% on the H200: noise)
            return schedule_points(progs[:1] if mode == "inference" else progs, kernel_stats,
                                   dense_gemms=device.type == "cuda", tile_ok=tile_buildable)
        except Exception:        # the candidate's build reports it
            return []
    cands: list[Candidate] = candidates(pipe, sched_of, max_full)
    progress(f"[tune] {len(cands)} candidates over {len(pipe)} pipeline decisions and "
             f"{len(sched_of({p.name: p.pick for p in pipe}))} schedule decisions ({mode}, {timer_label(device)})")
    pick_layer = build(cands[0].as_dict(), "kernels")
    weights = {k: v.detach().clone() for k, v in pick_layer.weights.state_dict().items()}
    inputs = [x.to(device) for x in make_inputs()]
    oracle = Oracle(build, weights, inputs, mode, dtype, device)
    rows, steps = [], {}            # steps: row index -> the candidate's step, for the later rounds
    for i, cand in enumerate(cands):
        row = TuneRow(cand.label, cand.as_dict(), cand.is_pick)
        rows.append(row)
        try:
            layer = pick_layer if i == 0 else build(cand.as_dict(), "kernels")
            layer.weights.load_state_dict(weights)
            layer = layer.to(device)
            progs = [layer.forward_program] + ([layer.backward_program] if mode == "training" else [])
            est = estimate(progs, {**kernel_stats, **_type_counts(graph_stats)}, dtype)
            row.estimate, row.estimate_text = est.as_dict(), est.describe()
            why = oracle.check(values(layer, inputs, mode))
            if why:
                row.status = f"excluded: differs from the reference: {why}"[:400]
            else:
                step = _step(layer, inputs, mode)
                row.median_ms = timer(step, device, reps, warmup)
                if rounds > 1:
                    steps[i] = step
        except Exception as e:          # reported and excluded, never the tuner's failure
            row.status = f"excluded: {type(e).__name__}: {_one_line(e)}"[:400]
        progress(f"[tune] {i + 1}/{len(cands)} {row.label}: "
                 + (f"{row.median_ms:.4f} ms" if row.median_ms is not None else row.status)
                 + (f" (est. {row.estimate_text})" if row.estimate_text else ""))
        layer = None
    if steps:
        _more_rounds(rows, steps, rounds, timer, device, reps, warmup, progress)
    res = TuneResult(key, {}, rows, mode, str(device), timer_label(device), False, fields)
    w = res.winner
    if w is None:
        raise TuneError("no candidate passed the check against the reference: " +
                        "; ".join(f"{r.label}: {r.status}" for r in rows)[:600])
    res.choices = dict(w.choices)
    if store is not None:
        store.put(key, res.record())
    return res


def _more_rounds(rows: list, steps: dict, rounds: int, timer: Callable, device, reps: int, warmup: int,
                 progress: Callable[[str], None]) -> None:
    """Rounds 2..``rounds`` of the timing: every checked candidate again, each round starting one
    candidate later (round r visits them from position r on), so no candidate is always first or
    always after another; a row's time becomes the median of its rounds. A candidate that fails in a
    later round is excluded like one that fails in the first."""
    order = list(steps)
    times = {i: [rows[i].median_ms] for i in order}
    for r in range(1, rounds):
        k = r % len(order)
        for i in order[k:] + order[:k]:
            if i not in times:
                continue
            try:
                times[i].append(timer(steps[i], device, reps, warmup))
            except Exception as e:
                rows[i].status, rows[i].median_ms = f"excluded: {type(e).__name__}: {_one_line(e)}"[:400], None
                del times[i]
    for i, ts in times.items():
        rows[i].median_ms = float(statistics.median(ts))
    progress(f"[tune] {rounds} rounds in rotated order: "
             + "; ".join(f"{rows[i].label} {rows[i].median_ms:.4f} ms" for i in times)[:600])


def _type_counts(graph_stats: dict) -> dict:
    return {k: v for k, v in graph_stats.items() if k in ("num_etypes", "num_ntypes")}


def _step(layer, inputs: list, mode: str) -> Callable[[], None]:
    if mode == "inference":
        def fwd():
            with torch.no_grad():
                layer(*inputs)
        return fwd
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]

    def train():
        layer.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None
        with torch.enable_grad():
            sum(o.float().pow(2).mean() for o in _outputs(layer(*xs)).values()).backward()
    return train


def _one_line(e) -> str:
    return "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
