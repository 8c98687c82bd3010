"""The traversal kernel family: edge/node loops over fused element expressions
(pigeon/ir/traversal.py TraversalInstance).  Its one registry entry (bottom of this file) gives
the executor, the artifacts, the serializer and the torch op everything they need: validation
and rendering (pigeon/codegen/traversal.py, the CUDA templates), the semantics
(``run_traversal_reference``, the oracle of an instance), the launcher, the CPU emulation of the
same CUDA text, and its torch op (``pigeon::traversal``, pigeon/runtime/kernel_ops.py).
"""
from __future__ import annotations

import os

from contextlib import nullcontext
from typing import Any, Mapping

import torch

from ..codegen.kernel_source import RenderedKernel
from ..graph.kernel_graph import KernelGraph
from ..codegen.traversal import (AGGREGATE_LISTS, TraversalLaunchError, accumulates, check_instance,
                                 kernel_name, render_traversal, shares_runs)
from ..ir.program import TraversalLaunch
from ..ir.traversal import Buffer, Expr, RowRef, TraversalInstance
from ..semantics import aggregate, edge_softmax
from ..semantics import eval_expr as semantic_eval
from ..torch_dtypes import TORCH_DTYPES
from .family import KernelFamily, register_family


# ------------------------------------------------------------------------------ semantics

def row_index(kg: KernelGraph, row: RowRef, loop_rows: str) -> torch.Tensor | None:
    if row is RowRef.NONE:
        return None
    if loop_rows == "edge":
        table = {RowRef.SELF: None, RowRef.SRC: kg.src, RowRef.DST: kg.dst, RowRef.ETYPE: kg.etype,
                 RowRef.COMPACT: kg.edge_to_compact, RowRef.COMPACT_DST: kg.edge_to_compact_dst}
    elif loop_rows == "compact":
        table = {RowRef.SELF: None, RowRef.SRC: kg.compact_src, RowRef.ETYPE: kg.compact_etype}
    elif loop_rows == "compact_dst":
        table = {RowRef.SELF: None, RowRef.DST: kg.compact_dst_node, RowRef.ETYPE: kg.compact_dst_etype}
    elif loop_rows in ("etype", "ntype"):
        table = {RowRef.SELF: None}
    else:
        table = {RowRef.SELF: None, RowRef.NTYPE: kg.ntype}
    if row not in table:
        raise ValueError(f"row reference {row.value} is not allowed in a loop over {loop_rows} rows")
    return table[row]


def loop_row_count(kg: KernelGraph, loop_rows: str) -> int:
    return {"edge": kg.num_edges, "node": kg.num_nodes, "compact": kg.num_compact,
            "compact_dst": kg.num_compact_dst, "etype": kg.num_etypes,
            "ntype": kg.num_ntypes}[loop_rows]


def eval_expr(e: Expr, kg: KernelGraph, loop_rows: str, bufs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Value of ``e`` at every loop row: a [rows, *e.shape] tensor (float32 for float values);
    loads read their buffers through the loop's row references."""
    R = loop_row_count(kg, loop_rows)

    def leaf(n: Expr) -> torch.Tensor:
        if n.op != "load":
            raise ValueError(f"{n.op} {n.fn!r} is not bound in a traversal loop")
        b = bufs[n.buffer.name].to(TORCH_DTYPES[n.dtype])
        if n.row is RowRef.NONE:
            return b.reshape((1,) + n.shape).expand((R,) + n.shape)
        idx = row_index(kg, n.row, loop_rows)
        b = b.reshape((-1,) + n.shape)
        return b if idx is None else b[idx.long()]
    return semantic_eval(e, R, leaf, kg.device)


def run_traversal_reference(inst: TraversalInstance, kg: KernelGraph,
                            bufs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The output buffer of ``inst`` as a [rows, *out.shape] float32 tensor."""
    v = eval_expr(inst.expr, kg, inst.loop_rows, bufs)
    shape = inst.out.shape
    if inst.loop in ("edge_map", "node_map", "compact_map", "type_map"):
        return v.reshape((-1,) + shape)
    if inst.loop == "aggregate":
        idx, n = {"dst": (kg.dst, kg.num_nodes), "src": (kg.src, kg.num_nodes),
                  "compact": (kg.edge_to_compact, kg.num_compact),
                  "compact_src": (kg.compact_src, kg.num_nodes),
                  "dcompact": (kg.edge_to_compact_dst, kg.num_compact_dst),
                  "compact_dst": (kg.compact_dst_node, kg.num_nodes)}[inst.side]
        return aggregate(v, idx.long(), n, inst.reduce)
    if inst.loop == "edge_softmax":
        return edge_softmax(v, kg.dst.long(), kg.num_nodes)
    if inst.loop == "type_reduce":
        if inst.per == "none":
            return v.sum(0).reshape(shape)
        etype = kg.compact_etype if inst.rows == "compact" else kg.etype
        types = (etype if inst.per == "etype" else kg.ntype).long()
        n = kg.num_etypes if inst.per == "etype" else kg.num_ntypes
        return v.new_zeros((n,) + shape).index_add(0, types, v)
    raise ValueError(f"unknown loop {inst.loop!r}")


# ------------------------------------------------------------------------------ launching

def _rows_of(b: Buffer, kg: KernelGraph) -> tuple[int, ...]:
    return {"node": (kg.num_nodes,), "edge": (kg.num_edges,), "compact": (kg.num_compact,),
            "compact_dst": (kg.num_compact_dst,),
            "etype": (kg.num_etypes,), "ntype": (kg.num_ntypes,), "global": ()}[b.rows]


def _check_tensor(what: str, b: Buffer, t: Any, kg: KernelGraph) -> None:
    if not isinstance(t, torch.Tensor):
        raise TraversalLaunchError(f"{what} {b.name}: expected a torch.Tensor, got {type(t).__name__}")
    want = _rows_of(b, kg) + tuple(b.shape)
    if tuple(t.shape) != want and not (b.rows == "global" and tuple(t.shape) == (1,) + want):
        alt = f" or {[1] + list(want)}" if b.rows == "global" else ""
        raise TraversalLaunchError(f"{what} {b.name}: shape {list(t.shape)}, expected {list(want)}{alt} "
                                   f"(rows {b.rows!r}, feature shape {list(b.shape)})")
    if t.dtype != TORCH_DTYPES[b.dtype]:
        raise TraversalLaunchError(f"{what} {b.name}: dtype {t.dtype}, expected {TORCH_DTYPES[b.dtype]}")
    if t.device != kg.device:
        raise TraversalLaunchError(f"{what} {b.name}: on {t.device}, but the graph is on {kg.device}")


def traversal_args(rk: RenderedKernel, inst: TraversalInstance, kg: KernelGraph,
                   bufs: Mapping[str, torch.Tensor], target: torch.Tensor,
                   scratch: torch.Tensor | None = None, flat: bool = False,
                   fix: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Any]:
    """Kernel arguments in ``rk.params`` order (a kernel or its fix-up companion); ``target`` is what
    the output parameter points to, ``scratch`` the shared-run rows of an edge-chunk aggregate
    (``flat``: its every-run-atomic form, which takes none: the output stands in for it), ``fix``
    the fix-up's (rows, slots)."""
    args: list[Any] = []
    aligned = rk.meta.get("aligned16", ())
    for p in rk.params:
        kind, what = p.role.split(":", 1)
        if kind in ("out", "accum"):
            args.append(target)
        elif kind == "scratch":
            args.append(target if scratch is None else scratch)
        elif kind == "flag":
            args.append(int(flat))
        elif kind == "fix":
            args.append(fix[0].numel() if what == "count" else fix[("rows", "slots").index(what)])
        elif kind == "buffer":
            t = bufs[what]
            t = t if t.is_contiguous() else t.contiguous()
            if what in aligned and t.data_ptr() % 16:      # a view at an odd offset: 16-byte loads need a copy
                t = t.clone()
            args.append(t)
        elif kind == "graph":
            a = getattr(kg, what)
            if a.dtype != torch.int32 or a.device != kg.device:
                raise TraversalLaunchError(f"graph array {what}: expected int32 on {kg.device}, got {a.dtype} on {a.device}")
            args.append(a)
        elif kind == "size":
            args.append(int(getattr(kg, what)))
        else:  # pragma: no cover
            raise TraversalLaunchError(f"{rk.name}: unknown parameter role {p.role!r}")
    return args


# edge-chunk aggregates into a float32 output: every run added into the zeroed output (one memset,
# one launch) instead of whole runs stored once plus the fix-up of shared and empty rows (a second
# launch, and the empty rows zeroed element by element), below this many members x width. H200,
# rgnn_aggs_h200_66040f9 against ec9909d (every run atomic): the stores + fix-up were 4-10% faster at
# 7.7e8 (AM-sized d128) and 1.35e9-2.7e9 (ogbn-mag-sized), even at 3.3e8-3.8e8 (ogbl-biokg- and
# AM-sized d64), 6-17% slower at 0.35e8-0.6e8 (ACM, FB15k-237+reverse, BGS-sized). 16-bit outputs
# always take the stores (the other form needs a float32 accumulator and a cast pass).
ALL_ATOMIC_BELOW = 3e8
ALL_ATOMIC_ENV = "PIGEON_AGG_ALL_ATOMIC"      # 1 / 0 force the form (float32 outputs), auto (default): the size rule


def all_atomic(rk: RenderedKernel, inst: TraversalInstance, kg: KernelGraph) -> bool:
    """Does this launch of an edge-chunk aggregate take its every-run-atomic form?"""
    if not rk.meta.get("all_atomic"):
        return False
    forced = os.environ.get(ALL_ATOMIC_ENV, "auto").strip().lower()
    if forced in ("1", "0"):
        return forced == "1"
    if forced != "auto":
        raise TraversalLaunchError(f"{ALL_ATOMIC_ENV}={forced!r}: expected 1, 0 or auto")
    return int(getattr(kg, rk.meta["members"])) * inst.out.width < ALL_ATOMIC_BELOW


def run_traversal_cuda(inst: TraversalInstance, kg: KernelGraph, bufs: Mapping[str, torch.Tensor],
                       out: torch.Tensor, module: Any) -> torch.Tensor:
    """Run the kernel of ``inst`` from ``module`` (a runtime CudaModule built from
    ``render_traversal(inst).source``, or a :class:`pigeon.runtime.emulate.EmulatedModule`),
    writing ``out`` in place. Tensors must be on the graph's device."""
    rk = render_traversal(inst)
    _check_tensor("output", inst.out, out, kg)
    if not out.is_contiguous():
        raise TraversalLaunchError(f"output {inst.out.name}: must be contiguous (written in place)")
    for b in inst.inputs():
        if b.name not in bufs:
            raise TraversalLaunchError(f"{inst.loop}: input buffer {b.name!r} is missing (have {sorted(bufs)})")
        _check_tensor("input", b, bufs[b.name], kg)
    workspace = None
    is_max = inst.loop == "aggregate" and inst.reduce == "max"
    if accumulates(inst):        # type_reduce: atomics into a zeroed float32 accumulator
        if out.dtype == torch.float32:
            target = out
        else:
            target = workspace = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        target.zero_()
    else:
        target = out
    scratch = fix = None
    flat = all_atomic(rk, inst, kg)
    if flat:                     # every run added into the output: zeros (sums) or -inf (max)
        target.fill_(float("-inf")) if is_max else target.zero_()
    elif shares_runs(inst):
        # a float32 row per chunk for the runs chunks share, at the reduction's identity; the
        # fix-up kernel then writes those rows and the rows without members (KernelGraph.chunk_fixups)
        fix_rows, fix_slots, nchunks = kg.chunk_fixups(AGGREGATE_LISTS[inst.side][0], rk.meta["chunk"])
        scratch = torch.empty((max(nchunks, 1), inst.out.width), dtype=torch.float32, device=out.device)
        scratch.fill_(float("-inf")) if is_max else scratch.zero_()
        fix = (fix_rows, fix_slots)
    grid = rk.grid(kg)
    if rk.grid.threads(kg) > 0:
        args = traversal_args(rk, inst, kg, bufs, target, scratch, flat)
        module.function(rk.name).launch(grid, rk.block, args, rk.ctypes)
    if fix is not None and fix[0].numel() > 0:
        fk = rk.companions[0]
        module.function(fk.name).launch(fk.grid(fix[0].numel()), fk.block,
                                        traversal_args(fk, inst, kg, bufs, out, scratch, fix=fix), fk.ctypes)
    if flat and is_max:          # a node without edges aggregates to 0 (the semantics)
        deg = kg.in_degree if inst.side == "dst" else kg.out_degree
        empty = (deg == 0).view((-1,) + (1,) * (target.dim() - 1))
        target.masked_fill_(empty, 0.0)
    if workspace is not None:
        out.copy_(workspace)
    return out


def run_traversal_launch(inst: TraversalInstance, kg: KernelGraph, bufs: Mapping[str, torch.Tensor],
                         out: torch.Tensor, backend: Any = None) -> torch.Tensor:
    """Build (disk cache) and load the kernel of ``inst`` for ``out``'s device, then run it.
    ``backend`` (runtime.program.CudaBackend) supplies ``arch`` and a per-backend module dict."""
    from .build import build_kernel, device_arch
    from .launch import load_module
    rk = render_traversal(inst)
    modules = getattr(backend, "_modules", None)
    mod = modules.get(rk.name) if modules is not None else None
    if mod is None:
        arch = getattr(backend, "arch", None) or device_arch(out.device)
        if arch is None:
            raise TraversalLaunchError("no CUDA device to build the traversal kernel for")
        entry = build_kernel(rk.source, arch, name=rk.name)
        mod = load_module(entry, out.device)
        if modules is not None:
            modules[rk.name] = mod
    return run_traversal_cuda(inst, kg, bufs, out, mod)


def run_traversal_emulated(inst: TraversalInstance, kg: KernelGraph, bufs: Mapping[str, torch.Tensor],
                           out: torch.Tensor) -> torch.Tensor:
    """``run_traversal_cuda`` on an emulated module: the CUDA text of the kernel, run on the CPU."""
    from .emulate import EmulatedModule
    return run_traversal_cuda(inst, kg, bufs, out, EmulatedModule(render_traversal(inst)))


# ------------------------------------------------------------------------------ the registry entry

def _named(inst: TraversalInstance):
    """A profiler range named as the CUDA kernel would be (``pigeon_trav_<key>``) around a CPU run of
    the instance, so per-kernel profiles read the same names on both devices; nothing when no
    profiler is on."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(kernel_name(inst))
    return nullcontext()


def _semantics(launch: TraversalLaunch, kg: KernelGraph, bufs: Any) -> None:
    out = bufs[launch.inst.out.name]
    with _named(launch.inst):
        out.copy_(run_traversal_reference(launch.inst, kg, bufs).reshape(out.shape))


def _emulate(launch: TraversalLaunch, kg: KernelGraph, bufs: Any) -> None:
    with _named(launch.inst):
        run_traversal_emulated(launch.inst, kg, bufs, bufs[launch.inst.out.name])


TRAVERSAL = register_family(KernelFamily(
    "traversal", TraversalLaunch, (TraversalInstance, Buffer, RowRef), semantics=_semantics,
    validate=lambda launch: check_instance(launch.inst), render=lambda launch: render_traversal(launch.inst),
    cuda=lambda launch, kg, bufs, backend: run_traversal_launch(launch.inst, kg, bufs, bufs[launch.inst.out.name],
                                                                backend),
    emulate=_emulate,
    doc="edge/node loops over fused element expressions (map, aggregate, edge softmax, type reduce)"))
