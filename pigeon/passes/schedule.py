"""Schedule choice for graph-dependent kernels: a cost model over the degree statistics of the
graph a layer is bound to.

Sum aggregations have two schedules (``TraversalInstance.schedule``):

* ``node``: a group of G lanes (G = the smallest power of two >= the row width, at most 32) walks
  each node's edge list.  A node with d edges costs its group d steps, so on a skewed graph the
  hub bounds the kernel: cost ~ max(E * G / T, d_max) steps (T = resident threads);
* ``edge_chunks``: fixed chunks of edges in destination order, a segmented sum per chunk and one
  atomicAdd per destination run: cost ~ E * G / T steps plus (N + E / chunk) atomics per element.

Edge softmax on such a graph becomes four launches (score per edge, max and sum of exponentials
per destination on edge chunks, normalization) instead of the node schedule's two passes over
each node's edge list.

``edge_chunks`` is chosen where the hub term dominates: d_max > SKEW * E * G / T.  T is the
H200's resident thread count (132 SMs x 2048); SKEW = 4 leaves the node schedule (no atomics,
deterministic sums) wherever the graph is not clearly hub-bound.  ``PIGEON_AGGREGATE_SCHEDULE`` =
``node`` | ``edge_chunks`` | ``auto`` (default) overrides the choice.

Decision points (``schedule_point``): the rule reads only (what is reduced, the side, the lane
group), so every launch with the same triple is one decision, named ``schedule:<loop>/<side>/g<G>``
(``schedule:aggregate/dst/g16``, ``schedule:edge_softmax/dst/g4``).  ``choose_schedules(...,
choices=)`` takes an explicit option per point (what ``pigeon compile --tune`` measured); points
it does not name follow the rule.
"""
from __future__ import annotations

import dataclasses
import os

from ..ir import expr as ex
from ..ir.expr import Buffer, RowRef
from ..ir.program import KernelProgram, TraversalLaunch
from ..ir.traversal import TraversalInstance

RESIDENT_THREADS = 132 * 2048
SKEW = 4.0
ENV = "PIGEON_AGGREGATE_SCHEDULE"


class ScheduleError(ValueError):
    pass


def aggregate_schedule(width: int, stats: dict, side: str = "dst") -> str:
    """``node`` or ``edge_chunks`` for a sum aggregation of rows of ``width`` elements."""
    forced = forced_schedule()
    if forced is not None:
        return forced
    group = lane_group(width)
    # the largest member list of one output row, and how many members there are in all
    d_key, n_key = {"dst": ("max_in_degree", "num_edges"), "src": ("max_out_degree", "num_edges"),
                    "compact": ("max_compact_edges", "num_edges"),
                    "compact_src": ("max_node_compacts", "num_compact"),
                    "dcompact": ("max_compact_dst_edges", "num_edges"),
                    "compact_dst": ("max_node_compact_dsts", "num_compact_dst")}[side]
    if d_key not in stats:
        return "node"
    d_max = stats[d_key]
    balanced = stats[n_key] * group / RESIDENT_THREADS
    return "edge_chunks" if d_max > SKEW * max(balanced, 1.0) else "node"


# edge_chunks aggregates take 8 consecutive elements per thread where a destination has this many
# members on average and the 8x fewer threads still fill the GPU (H200, 2026-12-03,
# benchmarks/results/aggregate_vec_h200_0d2d3cb: 8 per thread was 8-18% faster on ogbn-mag-sized
# (mean degree 10.9, 21M edges) in bf16, within 5% in fp32, and 1.5-1.8x slower on AM-sized (3.6):
# with few members per run a thread flushes 8 atomics per run; rgnn_aggs_h200_9874d3c: on ACM
# (mean degree 50, 548k edges: 68k threads at d64) and DBLP (9.2, 240k) it was 2-3x slower than 1)
VEC_MIN_MEAN_DEGREE = 8.0
VEC = 8
CHUNK_EDGES = 64            # members per chunk (pigeon/codegen/traversal.py CHUNK)


def aggregate_vec(width: int, stats: dict, side: str = "dst") -> int:
    """Elements per thread (1 or VEC) of an edge_chunks sum aggregation of rows of ``width``."""
    if side not in ("dst", "src") or width % VEC or width <= VEC:
        return 1
    threads = stats.get("num_edges", 0) / CHUNK_EDGES * (width // VEC)
    busy = stats.get("mean_degree", 0.0) >= VEC_MIN_MEAN_DEGREE
    return VEC if busy and threads >= RESIDENT_THREADS else 1


def lane_group(width: int) -> int:
    return 1 << max(0, (min(max(width, 1), 32) - 1).bit_length())


SCHEDULES = ("node", "edge_chunks")


def schedule_point(inst: TraversalInstance) -> str | None:
    """The decision point a launch's schedule belongs to (None: the launch has no schedule choice:
    not a sum aggregation nor an edge softmax)."""
    if inst.loop == "aggregate" and inst.reduce == "sum":
        return f"schedule:aggregate/{inst.side}/g{lane_group(inst.out.width)}"
    if inst.loop == "edge_softmax":
        return f"schedule:edge_softmax/dst/g{lane_group(inst.out.width)}"
    return None


def forced_schedule() -> str | None:
    """The schedule ``PIGEON_AGGREGATE_SCHEDULE`` forces, or None (auto)."""
    forced = os.environ.get(ENV, "auto")
    if forced not in ("auto", "node", "edge_chunks"):
        raise ScheduleError(f"{ENV}={forced!r}: expected auto, node or edge_chunks")
    return None if forced == "auto" else forced


def _softmax_on_edge_chunks(inst: TraversalInstance, tag: int) -> tuple[list[Buffer], list[TraversalLaunch]]:
    """Edge softmax as four load-balanced launches: the score once per edge; its max per
    destination (edge chunks, atomic max); the sum of exp(score - max) per destination (edge
    chunks); and the normalized values.  Intermediates are float32."""
    shape = inst.expr.shape
    s = Buffer(f"sm{tag}_s", "edge", shape)
    m = Buffer(f"sm{tag}_m", "node", shape)
    z = Buffer(f"sm{tag}_z", "node", shape)
    shifted = ex.unary("exp", ex.binary("sub", ex.load(s, RowRef.SELF), ex.load(m, RowRef.DST)))
    launches = [
        TraversalLaunch(TraversalInstance("edge_map", inst.expr, s, dtype=s.dtype)),
        TraversalLaunch(TraversalInstance("aggregate", ex.load(s, RowRef.SELF), m, side="dst", reduce="max",
                                          schedule="edge_chunks", dtype=m.dtype)),
        TraversalLaunch(TraversalInstance("aggregate", shifted, z, side="dst", reduce="sum", schedule="edge_chunks",
                                          dtype=z.dtype)),
        TraversalLaunch(TraversalInstance("edge_map", ex.binary("div", shifted, ex.load(z, RowRef.DST)), inst.out,
                                          dtype=inst.out.dtype)),
    ]
    return [s, m, z], launches


def choose_schedules(program: KernelProgram, stats: dict, choices: dict | None = None) -> KernelProgram:
    """The program with every sum aggregation given the schedule the cost model picks, and every
    edge softmax on a hub-bound graph split into load-balanced launches.  ``choices`` maps
    decision points (``schedule_point``) to ``node`` / ``edge_chunks``; a point it names is taken
    as given, the others follow the rule."""
    choices = choices or {}
    launches, buffers = [], list(program.buffers)
    changed = False

    def pick(inst, side):
        given = choices.get(schedule_point(inst))
        if given is not None:
            if given not in SCHEDULES:
                raise ScheduleError(f"{schedule_point(inst)}: schedule {given!r}: expected node or edge_chunks")
            return given
        return aggregate_schedule(inst.out.width, stats, side)

    for launch in program.launches:
        inst = getattr(launch, "inst", None)
        if isinstance(launch, TraversalLaunch) and inst.loop == "aggregate" and inst.reduce == "sum":
            sched = pick(inst, inst.side)
            vec = aggregate_vec(inst.out.width, stats, inst.side) if sched == "edge_chunks" else 1
            if sched != inst.schedule or vec != inst.vec:
                launch = TraversalLaunch(dataclasses.replace(inst, schedule=sched, vec=vec))
                changed = True
        elif isinstance(launch, TraversalLaunch) and inst.loop == "edge_softmax" and \
                pick(inst, "dst") == "edge_chunks":
            new_bufs, new_launches = _softmax_on_edge_chunks(inst, len(buffers))
            buffers += new_bufs
            launches += new_launches
            changed = True
            continue
        launches.append(launch)
    if not changed:
        return program
    return dataclasses.replace(program, buffers=tuple(buffers), launches=tuple(launches))
