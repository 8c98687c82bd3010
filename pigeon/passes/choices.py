"""The decisions the graph-dependent cost rules take, as data: what ``pigeon compile --explain``
describes and ``pigeon compile --tune`` measures.

A ``DecisionPoint`` is one choice of one rule: its name (the key ``run_pipeline(choices=)`` and
``choose_schedules(choices=)`` read), its options, the option the rule picks and why.

- ``linear_reorder`` (True / False): the reordering pass on or off; a point only where the pass
  rewrites something.  The rule always applies it.
- ``compaction`` (True / False): compact materialization of source-side typed linears; a point only
  where the compaction rule matches.  The rule: E / U >= 1.5 (pigeon/passes/compact.py).
- ``schedule:<loop>/<side>/g<G>`` (``node`` / ``edge_chunks``): the schedule of every sum
  aggregation (or edge softmax) with that side and lane group; the rule compares the largest
  member list with the balanced share (pigeon/passes/schedule.py).  These come from the lowered
  programs, so they depend on the pipeline's choices (compaction adds the compact sides).
- ``gemm:<rows>/k<K>n<N>/<N|T|dW>`` (``cublas`` / ``template`` / ``tvm``): the library or code
  generator of each dense GEMM shape (pigeon/passes/gemm_backend.py); a point only when tuning on a
  GPU.  The rule picks cuBLAS.

An option forced by the environment (``PIGEON_COMPACT=1|0``, ``PIGEON_AGGREGATE_SCHEDULE``) is
the point's only option.  ``candidates`` turns the points into the candidate configurations: every
combination when there are at most ``max_full``, else the rule's pick and every configuration that
differs from it in one decision (each option of each point is measured at least once).
``estimate`` gives a candidate's estimated costs from its kernel programs: GEMM FLOPs, bytes the
GEMMs write, and the traversal steps of the schedule rule's model.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..ir.graph import IRGraph
from ..ir.program import GemmLaunch, KernelProgram, TraversalLaunch
from .compact import ENV as COMPACT_ENV, decide as decide_compaction
from .gemm_backend import RULE_PICK as GEMM_PICK, gemm_points
from .gemm_tiles import tile_points
from .pipeline import run_pipeline
from .schedule import RESIDENT_THREADS, SCHEDULES, SKEW, aggregate_schedule, forced_schedule, lane_group, schedule_point

__all__ = ["DecisionPoint", "Candidate", "pipeline_points", "schedule_points", "candidates", "estimate",
           "format_choices", "MAX_FULL", "PIPELINE_POINTS"]

MAX_FULL = 16                  # at most this many combinations are all measured
PIPELINE_POINTS = ("linear_reorder", "compaction")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class DecisionPoint:
    name: str
    options: tuple
    pick: object
    why: str


@dataclass(frozen=True)
class Candidate:
    choices: tuple[tuple[str, object], ...]       # every decision point of this configuration, sorted
    label: str                                    # "cost model's pick", or what differs from it
    is_pick: bool = False

    def as_dict(self) -> dict:
        return dict(self.choices)


# ---------------------------------------------------------------------------------------- points

def pipeline_points(ir: IRGraph, graph_stats: dict | None) -> list[DecisionPoint]:
    """The pipeline's decision points for the traced ``ir`` on a graph with ``graph_stats``
    (``graph_stats_for``): the passes are run once with compaction on to see which rules match."""
    _, records = run_pipeline(ir, graph_stats=graph_stats, choices={"compaction": True})
    rec = {r.name: r for r in records}
    points = []
    if rec["linear_reorder"].changes:
        n = len(rec["linear_reorder"].changes)
        points.append(DecisionPoint("linear_reorder", (True, False), True,
                                    f"rule: always fold ({n} rewrite{'s' if n != 1 else ''} where a per-type "
                                    f"vector meets a linear with no other reader)"))
    if rec["compaction"].changes:
        d = decide_compaction(graph_stats)
        forced = os.environ.get(COMPACT_ENV, "auto").strip().lower() in ("0", "1")
        points.append(DecisionPoint("compaction", (d.compact,) if forced else (True, False), d.compact, d.why))
    return points


def schedule_points(programs: Iterable[KernelProgram | None], stats: dict, dense_gemms: bool = False,
                    tile_ok: Callable | None = None) -> list[DecisionPoint]:
    """The schedule decision points of lowered (not yet scheduled) programs on a kernel graph with
    degree statistics ``stats`` (``degree_stats`` plus ``compact_stats``); with ``dense_gemms`` also
    the backend of each dense GEMM shape (pigeon/passes/gemm_backend.py) and the tile of each GEMM the
    template runs (pigeon/passes/gemm_tiles.py): only a GPU tells their options apart, on a CPU all
    run the same semantics. ``tile_ok(inst, tile)``: which tiles the template builds (codegen's
    ``tile_buildable``; passes do not import codegen)."""
    programs = list(programs)
    forced = forced_schedule()
    seen: dict[str, DecisionPoint] = {}
    if dense_gemms:
        for name, opts, why in gemm_points(programs):
            seen[name] = DecisionPoint(name, opts, opts[0] if len(opts) == 1 else GEMM_PICK, why)
        for name, opts, why in tile_points(programs, tile_ok):     # the default tile first: the rule's pick
            seen[name] = DecisionPoint(name, opts, opts[0], why)
    for prog in programs:
        if prog is None:
            continue
        for launch in prog.launches:
            if not isinstance(launch, TraversalLaunch):
                continue
            inst = launch.inst
            name = schedule_point(inst)
            if name is None or name in seen:
                continue
            side = "dst" if inst.loop == "edge_softmax" else inst.side
            pick = aggregate_schedule(inst.out.width, stats, side)
            d_key, n_key = _SIDE_KEYS[side]
            if forced is not None:
                why = f"PIGEON_AGGREGATE_SCHEDULE={forced}"
            elif d_key in stats:
                share = stats[n_key] * lane_group(inst.out.width) / RESIDENT_THREADS
                why = f"largest list {stats[d_key]} vs {SKEW:g} x balanced share {share:.1f}"
            else:
                why = "no statistics for this side: node"
            seen[name] = DecisionPoint(name, (forced,) if forced is not None else SCHEDULES, pick, why)
    return list(seen.values())


_SIDE_KEYS = {"dst": ("max_in_degree", "num_edges"), "src": ("max_out_degree", "num_edges"),
              "compact": ("max_compact_edges", "num_edges"), "compact_src": ("max_node_compacts", "num_compact"),
              "dcompact": ("max_compact_dst_edges", "num_edges"),
              "compact_dst": ("max_node_compact_dsts", "num_compact_dst")}


# ---------------------------------------------------------------------------------------- candidates

def _sorted(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def format_choices(choices: dict, pick: dict | None = None) -> str:
    """``compaction=False, schedule:aggregate/dst/g16=node``: every choice, or those differing from ``pick``."""
    items = [(k, v) for k, v in sorted(choices.items()) if pick is None or pick.get(k) != v]
    return ", ".join(f"{k}={v}" for k, v in items)


def candidates(pipe: list[DecisionPoint], schedule_points_of: Callable[[dict], list[DecisionPoint]],
               max_full: int = MAX_FULL) -> list[Candidate]:
    """The candidate configurations, the rule's pick first.  ``schedule_points_of(pipeline_choices)``
    gives the schedule points of the programs that pipeline configuration lowers to."""
    pick_pipe = {p.name: p.pick for p in pipe}
    combos = [dict(zip([p.name for p in pipe], opts)) for opts in itertools.product(*[p.options for p in pipe])]
    sched = {_sorted(c): schedule_points_of(c) for c in combos}
    pick_sched = sched[_sorted(pick_pipe)]
    pick = {**pick_pipe, **{s.name: s.pick for s in pick_sched}}
    out = [Candidate(_sorted(pick), "cost model's pick", True)]
    total = sum(_count(pts) for pts in sched.values())
    if total <= max_full:
        for c in combos:
            pts = sched[_sorted(c)]
            for opts in itertools.product(*[s.options for s in pts]):
                ch = {**c, **dict(zip([s.name for s in pts], opts))}
                out.append(Candidate(_sorted(ch), format_choices(ch, pick) or "cost model's pick"))
    else:        # one decision away from the pick at a time
        for p in pipe:
            for opt in p.options:
                if opt == p.pick:
                    continue
                c = {**pick_pipe, p.name: opt}
                ch = {**c, **{s.name: s.pick for s in sched[_sorted(c)]}}
                out.append(Candidate(_sorted(ch), f"{p.name}={opt}"))
        for s in pick_sched:
            for opt in s.options:
                if opt != s.pick:
                    out.append(Candidate(_sorted({**pick, s.name: opt}), f"{s.name}={opt}"))
    seen, unique = set(), []
    for c in out:
        if c.choices not in seen:
            seen.add(c.choices)
            unique.append(c)
    return unique


def _count(points: list[DecisionPoint]) -> int:
    n = 1
    for p in points:
        n *= len(p.options)
    return n


# ---------------------------------------------------------------------------------------- estimates

@dataclass
class Estimate:
    gemm_flop: int = 0                 # 2 * M * K * N * heads over the GEMM launches
    gemm_write_bytes: int = 0          # what the rows-form GEMMs write
    traversal_steps: float = 0.0       # per-lane steps of the aggregations (the schedule rule's model)
    launches: int = 0
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"gemm_flop": self.gemm_flop, "gemm_write_bytes": self.gemm_write_bytes,
                "traversal_steps": round(self.traversal_steps, 1), "launches": self.launches}

    def describe(self) -> str:
        return (f"{self.gemm_flop / 1e6:,.1f} MFLOP GEMM, {self.gemm_write_bytes / 2**20:,.2f} MiB GEMM writes, "
                f"{self.traversal_steps:,.0f} aggregation steps, {self.launches} launches")


def estimate(programs: Iterable[KernelProgram | None], stats: dict, dtype: str = "float32") -> Estimate:
    """Estimated costs of scheduled kernel programs on a kernel graph with ``stats`` (degree and
    compact statistics): the quantities the cost rules compare, summed over the launches."""
    el = ELEMENT_BYTES.get(dtype, 4)
    rows = {"edge": stats.get("num_edges", 0), "node": stats.get("num_nodes", 0),
            "compact": stats.get("num_compact", stats.get("num_edges", 0)),
            "compact_dst": stats.get("num_compact_dst", stats.get("num_edges", 0)),
            "etype": stats.get("num_etypes", 1), "ntype": stats.get("num_ntypes", 1)}
    est = Estimate()
    for prog in programs:
        if prog is None:
            continue
        for launch in prog.launches:
            est.launches += 1
            if isinstance(launch, GemmLaunch):
                i = launch.inst
                m = rows.get(launch.rows, 0)
                est.gemm_flop += 2 * m * i.k * i.n * max(i.heads, 1)
                if i.form != "weight_grad":
                    est.gemm_write_bytes += m * i.n * max(i.heads, 1) * el
            elif isinstance(launch, TraversalLaunch) and launch.inst.loop in ("aggregate", "edge_softmax"):
                inst = launch.inst
                side = "dst" if inst.loop == "edge_softmax" else inst.side
                d_key, n_key = _SIDE_KEYS[side]
                n = stats.get(n_key, 0)
                share = n * lane_group(inst.out.width) / RESIDENT_THREADS
                if inst.loop == "edge_softmax":           # node schedule: two passes over each list
                    est.traversal_steps += 2 * max(share, stats.get(d_key, 0))
                elif inst.schedule == "edge_chunks":
                    est.traversal_steps += share
                else:
                    est.traversal_steps += max(share, stats.get(d_key, 0))
    return est
