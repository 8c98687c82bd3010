"""Schedule choice for graph-dependent kernels: a cost model over the degree statistics of the
graph a layer is bound to.

Sum aggregations have two schedules (``TraversalInstance.schedule``):

* ``node``: a group of G lanes (G = the smallest power of two >= the row width, at most 32) walks
  each node's edge list.  A node with d edges costs its group d steps, so on a skewed graph the
  hub bounds the kernel: cost ~ max(E * G / T, d_max) steps (T = resident threads);
* ``edge_chunks``: fixed chunks of edges in destination order, a segmented sum per chunk and one
  atomicAdd per destination run: cost ~ E * G / T steps plus (N + E / chunk) atomics per element.

``edge_chunks`` is chosen where the hub term dominates: d_max > SKEW * E * G / T.  T is the
H200's resident thread count (132 SMs x 2048); SKEW = 4 leaves the node schedule (no atomics,
deterministic sums) wherever the graph is not clearly hub-bound.  ``PIGEON_AGGREGATE_SCHEDULE`` =
``node`` | ``edge_chunks`` | ``auto`` (default) overrides the choice.
"""
from __future__ import annotations

import dataclasses
import os

from ..ir.program import KernelProgram, TraversalLaunch

RESIDENT_THREADS = 132 * 2048
SKEW = 4.0
ENV = "PIGEON_AGGREGATE_SCHEDULE"


class ScheduleError(ValueError):
    pass


def aggregate_schedule(width: int, stats: dict, side: str = "dst") -> str:
    """``node`` or ``edge_chunks`` for a sum aggregation of rows of ``width`` elements."""
    forced = os.environ.get(ENV, "auto")
    if forced not in ("auto", "node", "edge_chunks"):
        raise ScheduleError(f"{ENV}={forced!r}: expected auto, node or edge_chunks")
    if forced != "auto":
        return forced
    group = 1 << max(0, (min(max(width, 1), 32) - 1).bit_length())
    d_max = stats["max_in_degree" if side == "dst" else "max_out_degree"]
    balanced = stats["num_edges"] * group / RESIDENT_THREADS
    return "edge_chunks" if d_max > SKEW * max(balanced, 1.0) else "node"


def choose_schedules(program: KernelProgram, stats: dict) -> KernelProgram:
    """The program with every sum aggregation given the schedule the cost model picks."""
    launches = []
    changed = False
    for launch in program.launches:
        inst = getattr(launch, "inst", None)
        if isinstance(launch, TraversalLaunch) and inst.loop == "aggregate" and inst.reduce == "sum":
            sched = aggregate_schedule(inst.out.width, stats, inst.side)
            if sched != inst.schedule:
                launch = TraversalLaunch(dataclasses.replace(inst, schedule=sched))
                changed = True
        launches.append(launch)
    return dataclasses.replace(program, launches=tuple(launches)) if changed else program
