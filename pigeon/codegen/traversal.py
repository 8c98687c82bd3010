"""CUDA traversal kernels: TraversalInstance -> Jinja2 template -> RenderedKernel, and its launcher.

Two templates (pigeon/templates):

* ``traversal.edge.cu.jinja`` -- edge_map / node_map: one thread per (row, flat output element),
  grid-stride over rows * W. type_reduce: one thread per (chunk of ``CHUNK`` rows in type order,
  element); the thread sums its chunk in registers and does one float atomicAdd into
  ``out[type, j]`` per run of equal types it sees. The accumulator is float32: the launcher
  zeroes it first (the output itself for float32 storage, else a float32 workspace that is
  converted into the output afterwards).
* ``traversal.node.cu.jinja`` -- aggregate (sum/mean/max over CSC for side dst, CSR for side src)
  and edge_softmax (over CSC; two passes: online max and sum, then the writes): a group of G lanes
  per node (G = the smallest power of two >= W, at most 32), lanes over flat output elements, a
  loop over the node's edges per element.

The expression code comes from :mod:`pigeon.codegen.expr_c`, hoisted to the outermost loop level
it depends on (a destination-node value is read once per node and element, not per edge).
Every output element is written exactly once (type_reduce: accumulated into a zeroed buffer).
The kernel signature is generated from ``RenderedKernel.params``, the list the launcher binds.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from ..ir.traversal import RowRef, TraversalInstance
from .expr_c import ExprCodegenError, ExprEmitter, RowBinding, Scope, buffer_param, idx_add, storage_type, var_idx
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel, c_ident

BLOCK = 256
MIN_BLOCKS = 4      # __launch_bounds__(BLOCK, MIN_BLOCKS): >= 1024 resident threads per SM, <= 64 registers
CHUNK = 64
MAX_GRID = 1 << 16
# map items per thread and trip: a flat map thread holds one 2- or 4-byte element, so at full
# occupancy an SM has a few KB of loads in flight, far from what hides DRAM latency at 4 TB/s
# (the AM-sized bf16 scaling map ran at 1.3 TB/s); 4 independent items quadruple that
MAP_UNROLL = 4
# edge-chunk aggregates with 8 consecutive elements per thread (16-byte row loads, the member and key
# indices read once per 8 elements): the schedule pass sets TraversalInstance.vec from the mean
# degree (pigeon/passes/schedule.py aggregate_vec); PIGEON_AGG_VEC=1 / 0 forces it on / off.
AGG_VEC_ENV = "PIGEON_AGG_VEC"
AGG_VEC = 8


# edge-chunk aggregates: members per step whose index chains and row loads are issued together (the
# loop over a chunk's members was latency-bound: three dependent loads per member, one member at a
# time; H200: U=4 was 9-23% faster than 1 on the AM- and ogbn-mag-sized graphs and the best of 1, 2,
# 4, 8). PIGEON_AGG_UNROLL=N renders another kernel (name suffix _uN) to measure against the default.
AGG_UNROLL_ENV = "PIGEON_AGG_UNROLL"
AGG_UNROLL = 4


def agg_unroll() -> int:
    """Members per step of an edge-chunk aggregate (AGG_UNROLL unless PIGEON_AGG_UNROLL is set)."""
    raw = os.environ.get(AGG_UNROLL_ENV, "").strip()
    if not raw:
        return AGG_UNROLL
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise TraversalCodegenError(f"{AGG_UNROLL_ENV}={raw!r}: give an integer from 1 to 16")
    return int(raw)


def agg_vec(width: int, chosen: int = 1) -> int:
    """Elements per thread of an edge-chunk aggregate of ``width``: ``chosen`` (the instance's
    vec) unless PIGEON_AGG_VEC forces 8 (1, on) or 1 (0, off); 1 where the width does not split."""
    raw = os.environ.get(AGG_VEC_ENV, "").strip().lower()
    want = AGG_VEC if raw in ("1", "on", "true", "yes") else 1 if raw in ("0", "off", "false", "no") else chosen
    return want if want > 1 and width % want == 0 and width > want else 1


GRAPH_ARRAYS = ("src", "dst", "etype", "ntype", "ntype_perm", "csc_ptr", "csc_eid", "csr_ptr", "csr_eid",
                "edge_to_compact", "compact_src", "compact_etype", "cmp_ptr", "cmp_eid", "csrc_ptr", "csrc_id",
                "edge_to_compact_dst", "compact_dst_node", "compact_dst_etype", "dcmp_ptr", "dcmp_eid", "cdst_ptr",
                "cdst_id", "csc_src", "csc_dst", "csr_src", "csr_dst")
# edge-chunk aggregates over edges (sides dst and src) walk CSC / CSR positions p: the key and the
# edge's other end are read at p from these position-order copies (KernelGraph.csc_src, ...), not as
# key[eid[p]]: the member loop waited on position -> edge -> key / end -> row, now on position -> row
# (the edge id is still loaded where the expression reads edge-wise rows or the edge's type)
POSITION_ARRAYS = {"dst": ("csc_dst", {RowRef.SRC: "csc_src"}), "src": ("csr_src", {RowRef.DST: "csr_dst"})}
_BUFFER_ROWS_OF_REF = {RowRef.SRC: "node", RowRef.DST: "node", RowRef.ETYPE: "etype", RowRef.NTYPE: "ntype",
                       RowRef.COMPACT: "compact", RowRef.COMPACT_DST: "compact_dst", RowRef.NONE: "global"}
# aggregate side -> (member list pointer, member ids, output row count, what the members are)
AGGREGATE_LISTS = {"dst": ("csc_ptr", "csc_eid", "num_nodes", "incoming edges"),
                   "src": ("csr_ptr", "csr_eid", "num_nodes", "outgoing edges"),
                   "compact": ("cmp_ptr", "cmp_eid", "num_compact", "the edges of each (src, etype) pair"),
                   "compact_src": ("csrc_ptr", "csrc_id", "num_nodes", "the (src, etype) pairs of each node"),
                   "dcompact": ("dcmp_ptr", "dcmp_eid", "num_compact_dst", "the edges of each (dst, etype) pair"),
                   "compact_dst": ("cdst_ptr", "cdst_id", "num_nodes", "the (dst, etype) pairs of each node")}
# edge_chunks: the row reference naming a member's output row, and the array giving it
CHUNK_KEYS = {"dst": (RowRef.DST, "dst"), "src": (RowRef.SRC, "src"), "compact": (RowRef.COMPACT, "edge_to_compact"),
              "compact_src": (RowRef.SRC, "compact_src"),
              "dcompact": (RowRef.COMPACT_DST, "edge_to_compact_dst"), "compact_dst": (RowRef.DST, "compact_dst_node")}
# aggregate side -> the rows its members are (edges unless listed), the count of members and the
# row reference naming a member's output row in the node-schedule template
_MEMBER_ROWS = {"compact_src": "compact", "compact_dst": "compact_dst"}
_MEMBER_COUNT = {"compact_src": "num_compact", "compact_dst": "num_compact_dst"}
_OWNER = {"dst": RowRef.DST, "src": RowRef.SRC, "compact": RowRef.COMPACT, "compact_src": RowRef.SRC,
          "dcompact": RowRef.COMPACT_DST, "compact_dst": RowRef.DST}
_COMPACT_SIDES = ("compact", "compact_src", "dcompact", "compact_dst")


class TraversalCodegenError(ExprCodegenError):
    pass


class TraversalLaunchError(ValueError):
    pass


@dataclass(frozen=True)
class TraversalConfig:
    """What a traversal template sees (as ``c``); see the comment at the top of each template."""
    name: str
    loop: str
    signature: str
    block: int
    min_blocks: int
    width: int
    out: str
    num_rows: str = "num_nodes"
    rows: str = "edge"
    per: str = "none"
    chunk: int = CHUNK
    reduce: str = "sum"
    group: int = 32
    ptr: str = ""
    eid: str = ""
    root_code: str = ""
    item_code: str = ""
    row_code: str = ""
    value: str = ""
    node_code: str = ""
    elem_code: str = ""
    pass_code: tuple[str, ...] = ()
    pass_value: tuple[str, ...] = ()
    members: str = ""
    type_array: str = "g_etype"     # type_reduce per etype: the row -> relation array (g_compact_etype for compact rows)
    unroll: int = 1                 # maps: items per thread and trip
    vec: int = 1                    # aggregate (edge_chunks): consecutive elements per thread
    agg_unroll: int = 1             # aggregate (edge_chunks): members per step, loads issued together
    key_at: str = "e"               # aggregate (edge_chunks): the key array's index (e: edge id, p: position)
    rowptr: str = ""                # aggregate (edge_chunks): the member list pointer (where each key's members begin)
    scratch: str = ""               # aggregate (edge_chunks): the float32 scratch rows of shared runs
    fix_name: str = ""              # aggregate (edge_chunks): the fix-up kernel and its parameter list
    fix_signature: str = ""
    all_atomic: bool = False        # aggregate (edge_chunks), float32 output: the pg_all_atomic form is built in
    lane_code: str = ""


@dataclass(frozen=True)
class _Grid:
    """Grid of a traversal kernel from the graph sizes (grid-stride loops cover the rest)."""
    kind: str           # "items" | "chunks" | "groups"
    width: int
    block: int
    rows: str = "num_edges"     # the KernelGraph count the loop covers: num_edges | num_nodes | num_compact
    chunk: int = CHUNK
    group: int = 32
    unroll: int = 1             # items: per thread and trip

    def threads(self, kg: Any) -> int:
        R = int(getattr(kg, self.rows))
        if self.kind == "items":
            return -(-R * self.width // self.unroll)
        if self.kind == "chunks":
            return -(-R // self.chunk) * self.width
        return R * self.group

    def __call__(self, kg: Any) -> tuple[int, int, int]:
        return (max(1, min(MAX_GRID, -(-self.threads(kg) // self.block))), 1, 1)


# ------------------------------------------------------------------------------ templates

def _render_template(name: str, config: TraversalConfig) -> str:
    return render_template(name, config)


# ------------------------------------------------------------------------------ validation

def check_instance(inst: TraversalInstance) -> None:
    if inst.loop not in ("edge_map", "node_map", "compact_map", "type_map", "aggregate", "edge_softmax", "type_reduce"):
        raise TraversalCodegenError(f"unknown traversal loop {inst.loop!r}")
    out = inst.out
    c_ident(out.name, "output buffer name")
    storage_type(out.dtype)
    if tuple(out.shape) != tuple(inst.expr.shape):
        raise TraversalCodegenError(f"{inst.loop}: output {out.name} has shape {list(out.shape)} but the "
                                    f"expression has shape {list(inst.expr.shape)}")
    if inst.loop == "type_reduce":
        allowed = {"edge": ("etype", "none"), "node": ("ntype", "none"), "compact": ("etype", "none")}
        if inst.rows not in allowed or inst.per not in allowed[inst.rows]:
            raise TraversalCodegenError(f"type_reduce over {inst.rows} rows cannot reduce per {inst.per!r}")
    if inst.loop == "type_map" and inst.per not in ("etype", "ntype"):
        raise TraversalCodegenError(f"type_map loops over etype or ntype rows, not {inst.per!r}")
    want = inst.out_rows
    if inst.loop == "aggregate" and (inst.side not in AGGREGATE_LISTS or inst.reduce not in ("sum", "mean", "max")):
        raise TraversalCodegenError(f"aggregate with side {inst.side!r} / reduce {inst.reduce!r}")
    if inst.loop == "aggregate" and inst.side in _COMPACT_SIDES and inst.reduce != "sum":
        raise TraversalCodegenError(f"aggregate side {inst.side!r} sums; got reduce {inst.reduce!r}")
    if inst.schedule not in ("node", "edge_chunks"):
        raise TraversalCodegenError(f"unknown schedule {inst.schedule!r}")
    if inst.schedule == "edge_chunks" and (inst.loop != "aggregate" or inst.reduce not in ("sum", "max")):
        raise TraversalCodegenError(f"the edge_chunks schedule is for sum and max aggregation, not {inst.loop} {inst.reduce}")
    if inst.vec not in (1, AGG_VEC) or (inst.vec > 1 and inst.schedule != "edge_chunks"):
        raise TraversalCodegenError(f"vec={inst.vec}: elements per thread are 1, or {AGG_VEC} on the edge_chunks schedule")
    if out.rows != want:
        raise TraversalCodegenError(f"{inst.loop}: output {out.name} has rows {out.rows!r}, expected {want!r}")
    names = {}
    for b in inst.inputs():
        if b.name == out.name:
            raise TraversalCodegenError(f"{inst.loop}: buffer {b.name} is both read and written")
        if names.setdefault(b.name, b) != b:
            raise TraversalCodegenError(f"two different buffers are named {b.name!r}")
    own = inst.loop_rows
    for e in inst.expr.toposort():
        if e.op != "load":
            continue
        want_rows = own if e.row is RowRef.SELF else _BUFFER_ROWS_OF_REF[e.row]
        if e.buffer.rows != want_rows:
            raise TraversalCodegenError(f"load of {e.buffer.name} (rows {e.buffer.rows!r}) through row reference "
                                        f"{e.row.value!r} in an {own} loop: expected a buffer with rows {want_rows!r}")


# ------------------------------------------------------------------------------ rendering

def kernel_name(inst: TraversalInstance) -> str:
    return f"pigeon_trav_{inst.key()}"


def _edge_rows(row: str) -> dict[RowRef, RowBinding]:
    v = frozenset({row})
    return {RowRef.SELF: RowBinding(row, v), RowRef.SRC: RowBinding(row, v, "src"),
            RowRef.DST: RowBinding(row, v, "dst"), RowRef.ETYPE: RowBinding(row, v, "etype"),
            RowRef.COMPACT: RowBinding(row, v, "edge_to_compact"),
            RowRef.COMPACT_DST: RowBinding(row, v, "edge_to_compact_dst")}


def _type_rows(row: str) -> dict[RowRef, RowBinding]:
    return {RowRef.SELF: RowBinding(row, frozenset({row}))}


def _compact_rows(row: str) -> dict[RowRef, RowBinding]:
    v = frozenset({row})
    return {RowRef.SELF: RowBinding(row, v), RowRef.SRC: RowBinding(row, v, "compact_src"),
            RowRef.ETYPE: RowBinding(row, v, "compact_etype")}


def _compact_dst_rows(row: str) -> dict[RowRef, RowBinding]:
    v = frozenset({row})
    return {RowRef.SELF: RowBinding(row, v), RowRef.DST: RowBinding(row, v, "compact_dst_node"),
            RowRef.ETYPE: RowBinding(row, v, "compact_dst_etype")}


def _member_rows(side: str, row: str) -> dict[RowRef, RowBinding]:
    return {"compact": _compact_rows, "compact_dst": _compact_dst_rows}.get(_MEMBER_ROWS.get(side), _edge_rows)(row)


def _node_rows(row: str) -> dict[RowRef, RowBinding]:
    v = frozenset({row})
    return {RowRef.SELF: RowBinding(row, v), RowRef.NTYPE: RowBinding(row, v, "ntype")}


def accumulates(inst: TraversalInstance) -> bool:
    """Does the kernel add into a zeroed float32 accumulator (atomics) instead of writing?"""
    return inst.loop == "type_reduce"


def shares_runs(inst: TraversalInstance) -> bool:
    """An edge-chunk aggregate: it stores each run wholly inside its chunk, sums the runs chunks
    share in a float32 scratch row per chunk, and its fix-up kernel writes those rows and the rows
    without members (see traversal.edge.cu.jinja)."""
    return inst.loop == "aggregate" and inst.schedule == "edge_chunks"


def fix_kernel_name(name: str) -> str:
    """The fix-up kernel of the edge-chunk aggregate ``name`` (a companion in the same module)."""
    return f"{name}_fix"


@dataclass(frozen=True)
class _FixGrid:
    """Grid of a fix-up kernel from its row count (one thread per (row, element))."""
    width: int
    block: int

    def __call__(self, num_fix: int) -> tuple[int, int, int]:
        return (max(1, min(MAX_GRID, -(-int(num_fix) * self.width // self.block))), 1, 1)


def _fix_kernel(inst: TraversalInstance, name: str, block: int) -> RenderedKernel:
    out = buffer_param(inst.out)
    params = (KernelParam(out, "ptr", f"{storage_type(inst.out.dtype)}* __restrict__", f"out:{inst.out.name}"),
              KernelParam("pg_scratch", "ptr", "const float* __restrict__", f"scratch:{inst.out.name}"),
              KernelParam("pg_fix_rows", "ptr", "const int* __restrict__", "fix:rows"),
              KernelParam("pg_fix_slots", "ptr", "const int* __restrict__", "fix:slots"),
              KernelParam("pg_num_fix", "int32", "int", "fix:count"))
    return RenderedKernel(name=fix_kernel_name(name), source="", params=params, block=(block, 1, 1),
                          grid=_FixGrid(inst.out.width, block), template="traversal.edge.cu.jinja",
                          meta={"loop": "aggregate_fix", "width": inst.out.width})


def _out_param(inst: TraversalInstance) -> KernelParam:
    name = buffer_param(inst.out)
    if accumulates(inst):
        return KernelParam(name, "ptr", "float* __restrict__", f"accum:{inst.out.name}")
    return KernelParam(name, "ptr", f"{storage_type(inst.out.dtype)}* __restrict__", f"out:{inst.out.name}")


def render_traversal(inst: TraversalInstance, block: int = BLOCK, chunk: int = CHUNK) -> RenderedKernel:
    """The CUDA kernel of ``inst`` (cached per instance and PIGEON_AGG_VEC setting)."""
    agg = inst.loop == "aggregate"
    return _render_cached(inst, block, chunk, agg_vec(inst.out.width, inst.vec) if agg else 1,
                          agg_unroll() if agg else 1)


@functools.lru_cache(maxsize=4096)
def _render_cached(inst: TraversalInstance, block: int, chunk: int, vec: int, unroll: int = AGG_UNROLL) -> RenderedKernel:
    check_instance(inst)
    try:
        return _render(inst, block, chunk, vec, unroll)
    except TraversalCodegenError:
        raise
    except ExprCodegenError as e:
        raise TraversalCodegenError(f"{inst.loop} -> {inst.out.name}: {e}") from e


def _render(inst: TraversalInstance, block: int, chunk: int, vec: int = 1, unroll: int = AGG_UNROLL) -> RenderedKernel:
    W = inst.out.width
    name = kernel_name(inst)
    loop = inst.loop
    j = var_idx("j", W)
    root = Scope((), None, "kernel")
    graph = set()
    cfg: dict[str, Any] = {}
    if loop in ("edge_map", "node_map", "compact_map", "type_map"):
        rows_of = {"edge_map": _edge_rows, "node_map": _node_rows, "compact_map": _compact_rows,
                   "type_map": _type_rows}[loop]
        em = ExprEmitter(rows_of("r"), loop, vectorize=True)
        item = root.child({"r", "j"}, "item")
        val = em.eval(inst.expr, j, item)
        size = {"edge_map": "num_edges", "node_map": "num_nodes", "compact_map": "num_compact",
                "type_map": f"num_{inst.per}s"}[loop]
        code = item.code(8)
        # several items per thread where the item code is straight-line (an inner loop, a dot's,
        # has its own loads in flight and would only add registers)
        unroll = MAP_UNROLL if "for (" not in code else 1
        cfg = dict(item_code=code, value=val.code, num_rows=size, unroll=unroll)
        template = "traversal.edge.cu.jinja"
        grid = _Grid("items", W, block, size, unroll=unroll)
    elif loop == "type_reduce":
        rows = {"edge": _edge_rows, "node": _node_rows, "compact": _compact_rows}[inst.rows]("r")
        type_array = "compact_etype" if inst.rows == "compact" else "etype"    # compact rows: sorted by etype
        if inst.per == "etype":
            rows[RowRef.ETYPE] = RowBinding("t", frozenset({"r"}))
            graph.add(type_array)
        elif inst.per == "ntype":
            rows[RowRef.NTYPE] = RowBinding("t", frozenset({"r"}))
            graph |= {"ntype", "ntype_perm"}
        em = ExprEmitter(rows, f"type_reduce over {inst.rows}s", vectorize=True)
        item = root.child({"j"}, "item")
        row = item.child({"r"}, "row")
        val = em.eval(inst.expr, j, row)
        size = {"edge": "num_edges", "node": "num_nodes", "compact": "num_compact"}[inst.rows]
        cfg = dict(item_code=item.code(8), row_code=row.code(12), value=val.code, num_rows=size,
                   rows=inst.rows, per=inst.per, chunk=chunk, type_array=f"g_{type_array}")
        template = "traversal.edge.cu.jinja"
        grid = _Grid("chunks", W, block, size, chunk=chunk)
    elif loop == "aggregate" and inst.schedule == "edge_chunks":
        side = inst.side
        rowptr, ids, _, members = AGGREGATE_LISTS[side]
        rows = _member_rows(side, "e")
        owner, key = CHUNK_KEYS[side]
        rows[owner] = RowBinding("v", frozenset({"e"}))
        key_at = "e"
        if side in POSITION_ARRAYS:      # p is defined wherever e is (the template's member step)
            key, ends = POSITION_ARRAYS[side]
            key_at = "p"
            for ref, arr in ends.items():
                rows[ref] = RowBinding("p", frozenset({"e"}), arr)
        em = ExprEmitter(rows, f"aggregate over chunks of {members}", vectorize=True)
        if inst.schedule != "edge_chunks" or W % vec:
            vec = 1
        if unroll != AGG_UNROLL:
            name += f"_u{unroll}"       # another kernel of the same instance (profiles tell them apart)
        if vec > 1:
            name += f"_v{vec}"
        graph |= {ids, key, rowptr}
        size = _MEMBER_COUNT.get(side, "num_edges")     # the members chunked
        if vec > 1:     # element j = j0 + jl: loads stepping by one along jl read 16 bytes per row (expr_c)
            item = root.child({"j0"}, "item")
            row = item.child({"e"}, "edge")
            lane = row.child({"jl"}, "lane")
            em.chunks["j0"] = "jl"
            val = em.eval(inst.expr, idx_add(var_idx("j0", W - vec + 1), var_idx("jl", vec)), lane)
            extra = dict(lane_code=lane.code(16), vec=vec)
        else:
            item = root.child({"j"}, "item")
            row = item.child({"e"}, "edge")
            val = em.eval(inst.expr, j, row)
            extra = {}
        cfg = dict(item_code=item.code(8), row_code=row.code(12), value=val.code, num_rows=size, chunk=chunk,
                   eid=f"g_{ids}", ptr=f"g_{key}", key_at=key_at, reduce=inst.reduce, agg_unroll=unroll,
                   rowptr=f"g_{rowptr}", scratch="pg_scratch", **extra)
        template = "traversal.edge.cu.jinja"
        grid = _Grid("chunks", W // vec, block, size, chunk=chunk)
    else:
        side = "dst" if loop == "edge_softmax" else inst.side
        ptr, ids, size, members = AGGREGATE_LISTS[side]
        # the member rows (edges, or compact rows for compact_src) and what the group row is to them
        rows = _member_rows(side, "e")
        owner = _OWNER[side]
        rows[owner] = RowBinding("v", frozenset({"v"}))
        em = ExprEmitter(rows, f"{loop} over {members}", vectorize=True)
        node = root.child({"v"}, "node")
        elem = node.child({"j"}, "element")
        passes = [elem.child({"e"}, f"edge pass {i}") for i in range(2 if loop == "edge_softmax" else 1)]
        vals = [em.eval(inst.expr, j, p) for p in passes]
        graph |= {ptr, ids}
        group = 1 << max(0, (min(W, 32) - 1).bit_length())
        if block % group:
            raise TraversalCodegenError(f"block {block} is not a multiple of the lane group {group}")
        cfg = dict(node_code=node.code(8), elem_code=elem.code(12), pass_code=tuple(p.code(16) for p in passes),
                   pass_value=tuple(v.code for v in vals), group=group, ptr=f"g_{ptr}", eid=f"g_{ids}",
                   reduce=inst.reduce, num_rows=size, members=members)
        template = "traversal.node.cu.jinja"
        grid = _Grid("groups", W, block, size, group=group)
    graph |= em.graph_arrays
    inputs = inst.inputs()
    if set(em.buffers) != {b.name for b in inputs}:   # pragma: no cover - every load is emitted
        raise TraversalCodegenError(f"internal: emitted loads {sorted(em.buffers)} != inputs {[b.name for b in inputs]}")
    params = [_out_param(inst)]
    companions = ()
    if shares_runs(inst):
        params.append(KernelParam("pg_scratch", "ptr", "float* __restrict__", f"scratch:{inst.out.name}"))
        fix = _fix_kernel(inst, name, block)
        companions = (fix,)
        cfg["fix_name"], cfg["fix_signature"] = fix.name, fix.signature()
        if inst.out.dtype == "float32":     # the output can take atomics itself (family_traversal.all_atomic)
            cfg["all_atomic"] = True
    params += [KernelParam(buffer_param(b), "ptr", f"const {storage_type(b.dtype)}* __restrict__", f"buffer:{b.name}")
               for b in inputs]
    params += [KernelParam(f"g_{a}", "ptr", "const int* __restrict__", f"graph:{a}") for a in GRAPH_ARRAYS if a in graph]
    params.append(KernelParam(size, "int32", "int", f"size:{size}"))
    if cfg.get("all_atomic"):
        params.append(KernelParam("pg_all_atomic", "int32", "int", "flag:all_atomic"))
    signature = ", ".join(p.c for p in params)
    config = TraversalConfig(name=name, loop=loop, signature=signature, block=block, min_blocks=MIN_BLOCKS, width=W,
                             out=params[0].name, root_code=root.code(4), **cfg)
    source = _render_template(template, config)
    meta = {"loop": loop, "schedule": inst.schedule, "width": W, "template": template, "group": cfg.get("group"),
            "chunk": cfg.get("chunk"), "instance_key": inst.key(),
            "aligned16": tuple(sorted(em.aligned)),   # buffers read with 16-byte loads
            "all_atomic": bool(cfg.get("all_atomic")), "members": size}
    return RenderedKernel(name=name, source=source, params=tuple(params), block=(block, 1, 1), grid=grid,
                          template=template, meta=meta, companions=companions)
