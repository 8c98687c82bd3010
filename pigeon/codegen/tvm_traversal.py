"""TVM (TIR) definitions of traversal instances (pigeon/ir/traversal.py), built for the CPU.

``traversal_primfunc(inst)`` turns a ``TraversalInstance`` into a TIR ``PrimFunc`` through TVM's
IR builder (``tvm.script.ir_builder.tirx``): the element expression becomes a TIR expression
evaluated at (row, feature index), ``dot`` / ``sum_to`` become serial inner loops over a local
accumulator emitted just before the statement that uses them, and the loop kinds become:

* ``edge_map`` / ``node_map``: a parallel loop over rows, then over the feature axes.
* ``aggregate``: a parallel loop over nodes ``v``; the output row is initialised, then accumulated
  over ``j in range(ptr[v], ptr[v + 1])`` (CSC for ``side == "dst"``, CSR for ``"src"``) with
  ``e = eid[j]``, then fixed up (``max``: 0 for a node without edges; ``mean``: divided by the
  count clamped at 1).
* ``edge_softmax``: a parallel loop over nodes ``v`` and feature indices; three passes over the
  incoming (CSC) edges of ``v``: max, sum of ``exp(s - max)``, write ``exp(s - max) / sum``.
* ``type_reduce``: the output is zeroed, then one serial loop over the rows accumulates into
  ``out[type(r)]`` (``type = etype[e]``, ``ntype[v]``, or row 0 for ``per == "none"``).

Row counts are symbolic (``num_nodes``, ``num_edges``, ``num_etypes``, ``num_ntypes``: int64 TIR
vars, checked by TVM against the tensors' shapes), so one build serves every graph.  Every buffer
is a contiguous 2-D ``[rows, width]`` fp32 tensor (``width = prod(shape)``; ``global`` buffers and
the ``per == "none"`` output have one row).  The function's parameters are, in order:

    num_nodes, num_edges, num_etypes, num_ntypes, *graph arrays (``graph_arrays(inst)``),
    *input buffers (``inst.inputs()``), out

Builds are cached per ``inst.key()`` (in memory) and called with torch CPU tensors directly: the
TVM FFI takes them zero-copy through DLPack.  Storage must be fp32 (bf16 storage is refused with
``NotImplementedError`` on llvm).
"""
from __future__ import annotations

import math
import threading
from typing import Mapping

import torch

from ..ir.traversal import Buffer, Expr, RowRef, TraversalInstance
from .layout import KernelGraph
from .tir_unary import UNARY_NEEDS_C, UNARY_TIR

__all__ = ["graph_arrays", "traversal_primfunc", "build_traversal_llvm", "run_traversal_llvm",
           "traversal_cuda_source", "traversal_function_name", "TraversalTvmError"]

F32 = "float32"
IDX = "int64"           # loop / row index type (flattened offsets can pass 2^31 on big graphs)
_NEG_INF = float("-inf")
_ALIGN = 4             # assume only element alignment: views at any offset are passed zero-copy

_EDGE_REFS = {RowRef.SELF: "edge", RowRef.SRC: "node", RowRef.DST: "node", RowRef.ETYPE: "etype",
              RowRef.NONE: "global"}
_NODE_REFS = {RowRef.SELF: "node", RowRef.NTYPE: "ntype", RowRef.NONE: "global"}
_GRAPH_REF = {RowRef.SRC: "src", RowRef.DST: "dst", RowRef.ETYPE: "etype", RowRef.NTYPE: "ntype"}


class TraversalTvmError(ValueError):
    """An instance the TVM translation cannot express (malformed shapes, row references)."""


# -- checks ---------------------------------------------------------------------------------------

def _walk(e: Expr):
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(x.args)


def _bc_shape_ok(arg: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(arg) <= len(shape) and all(a in (s, 1) for a, s in zip(arg, shape))


def _check_expr(e: Expr, edge_loop: bool) -> None:
    refs = _EDGE_REFS if edge_loop else _NODE_REFS
    for x in _walk(e):
        where = f"{x.op} {x.fn}".strip()
        if x.op == "load":
            b = x.buffer
            if x.row not in refs:
                raise TraversalTvmError(f"load of {b.name}: row reference {x.row.value} is not allowed in "
                                        f"an {'edge' if edge_loop else 'node'} loop")
            if refs[x.row] != b.rows:
                raise TraversalTvmError(f"load of {b.name}: row reference {x.row.value} reads a buffer with "
                                        f"{refs[x.row]} rows, but {b.name} has {b.rows} rows")
            if tuple(x.shape) != tuple(b.shape):
                raise TraversalTvmError(f"load of {b.name}: shape {x.shape} != buffer shape {b.shape}")
        elif x.op == "const":
            if x.shape != () or x.c is None:
                raise TraversalTvmError(f"const needs shape () and a value, got {x.shape}, {x.c}")
        elif x.op == "unary":
            if x.fn not in UNARY_TIR:
                raise TraversalTvmError(f"unknown unary fn {x.fn!r}")
            if x.fn in UNARY_NEEDS_C and x.c is None:
                raise TraversalTvmError(f"unary {x.fn} needs a constant")
            if tuple(x.args[0].shape) != tuple(x.shape):
                raise TraversalTvmError(f"unary {x.fn}: argument shape {x.args[0].shape} != {x.shape}")
        elif x.op == "binary":
            if x.fn not in _BINARY:
                raise TraversalTvmError(f"unknown binary fn {x.fn!r}")
            for a in x.args:
                if not _bc_shape_ok(tuple(a.shape), tuple(x.shape)):
                    raise TraversalTvmError(f"binary {x.fn}: argument shape {a.shape} does not broadcast "
                                            f"(left-aligned) to {x.shape}")
        elif x.op == "dot":
            a, b = x.args
            if not a.shape or not b.shape or a.shape[-1] != b.shape[-1]:
                raise TraversalTvmError(f"dot: contracted axes differ ({a.shape} . {b.shape})")
            for s in (a.shape[:-1], b.shape[:-1]):
                if not _bc_shape_ok(tuple(s), tuple(x.shape)):
                    raise TraversalTvmError(f"dot: leading shape {s} does not broadcast to {x.shape}")
        elif x.op == "sum_to":
            A, S = tuple(x.args[0].shape), tuple(x.shape)
            if len(A) < len(S) or any(s not in (a, 1) for a, s in zip(A, S)):
                raise TraversalTvmError(f"sum_to: {A} cannot be summed to {S}")
        elif x.op == "reshape":
            if math.prod(x.args[0].shape) != math.prod(x.shape):
                raise TraversalTvmError(f"reshape: {x.args[0].shape} -> {x.shape} changes the size")
        else:
            raise TraversalTvmError(f"unknown expr op {x.op!r} ({where})")
        if x.op in ("unary", "sum_to", "reshape") and len(x.args) != 1 or \
                x.op in ("binary", "dot") and len(x.args) != 2:
            raise TraversalTvmError(f"{where}: wrong number of arguments ({len(x.args)})")


def _check_instance(inst: TraversalInstance) -> None:
    if inst.loop not in ("edge_map", "node_map", "aggregate", "edge_softmax", "type_reduce"):
        raise TraversalTvmError(f"unknown loop {inst.loop!r}")
    if tuple(inst.out.shape) != tuple(inst.expr.shape):
        raise TraversalTvmError(f"output shape {inst.out.shape} != expression shape {inst.expr.shape}")
    if inst.loop == "aggregate":
        if inst.side not in ("dst", "src") or inst.reduce not in ("sum", "mean", "max"):
            raise TraversalTvmError(f"aggregate side={inst.side!r} reduce={inst.reduce!r} is not supported")
    if inst.loop == "type_reduce":
        ok = {("edge", "etype"), ("edge", "none"), ("node", "ntype"), ("node", "none")}
        if (inst.rows, inst.per) not in ok:
            raise TraversalTvmError(f"type_reduce per {inst.per} over {inst.rows} rows is not defined")
    names = [b.name for b in inst.inputs()]
    if inst.out.name in names:
        raise TraversalTvmError(f"output {inst.out.name} is also an input")
    if len(set(names)) != len(names):
        raise TraversalTvmError(f"two buffers share a name: {names}")
    _check_expr(inst.expr, inst.edge_loop)


def _storage_check(inst: TraversalInstance, backend: str) -> None:
    bad = [b for b in (*inst.inputs(), inst.out) if b.dtype != F32]
    if inst.dtype != F32 or bad:
        what = inst.dtype if inst.dtype != F32 else bad[0].dtype
        raise NotImplementedError(
            f"the {backend} traversal backend supports fp32 storage only, got {what} "
            f"(instance {inst.loop} -> {inst.out.name}); use the cuda or torch backend for {what}")


def graph_arrays(inst: TraversalInstance) -> tuple[str, ...]:
    """KernelGraph int32 arrays the instance's function takes, in parameter order."""
    need = {_GRAPH_REF[x.row] for x in _walk(inst.expr) if x.op == "load" and x.row in _GRAPH_REF}
    if inst.loop == "aggregate":
        need |= {"csc_ptr", "csc_eid"} if inst.side == "dst" else {"csr_ptr", "csr_eid"}
    elif inst.loop == "edge_softmax":
        need |= {"csc_ptr", "csc_eid"}
    elif inst.loop == "type_reduce" and inst.per != "none":
        need.add(inst.per)
    order = ("src", "dst", "etype", "ntype", "csc_ptr", "csc_eid", "csr_ptr", "csr_eid")
    return tuple(a for a in order if a in need)


def _out_rows_kind(inst: TraversalInstance) -> str:
    if inst.loop in ("edge_map", "edge_softmax"):
        return "edge"
    if inst.loop in ("node_map", "aggregate"):
        return "node"
    return {"etype": "etype", "ntype": "ntype", "none": "global"}[inst.per]


def traversal_function_name(inst: TraversalInstance) -> str:
    return f"pigeon_traversal_{inst.loop}_{inst.key()}"


# -- element expressions in TIR -------------------------------------------------------------------

def _tir():
    import tvm
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    return tvm, tirx, IRBuilder, T


def _nm(name: str, v):
    """Name a var / buffer in the printed TIR and the generated code."""
    from tvm.script.ir_builder import IRBuilder
    return IRBuilder.name(name, v)


def _f(tirx, v: float):
    return tirx.const(float(v), F32)


_BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a / b}


def _ravel(tirx, I, shape):
    """Flat offset of multi-index I in a contiguous shape (an IDX PrimExpr)."""
    off = tirx.const(0, IDX)
    stride = 1
    for i, s in reversed(list(zip(I, shape))):
        if s != 1:
            off = off + _as_idx(tirx, i) * stride
        stride *= s
    return off


def _as_idx(tirx, i):
    if isinstance(i, int):
        return tirx.const(i, IDX)
    return i if i.ty == IDX else tirx.Cast(IDX, i)


def _unravel(tirx, flat, shape):
    out = []
    stride = math.prod(shape)
    for s in shape:
        stride //= s
        if s == 1:
            out.append(tirx.const(0, IDX))
        else:
            out.append(tirx.floormod(tirx.floordiv(flat, stride), s) if stride > 1 else tirx.floormod(flat, s))
    return tuple(out)


def _bc(tirx, I, A):
    """Left-aligned broadcast: read an argument of shape A at I[:len(A)], 0 on size-1 axes."""
    return tuple(tirx.const(0, IDX) if a == 1 else I[i] for i, a in enumerate(A))


class _Emitter:
    """Emits the element expression at a row; reductions are emitted as statements first."""

    def __init__(self, T, tirx, bufs: Mapping[str, object]):
        self.T, self.tirx, self.bufs = T, tirx, bufs
        self.rows: dict[RowRef, object] = {}

    def set_rows(self, rows: dict[RowRef, object]) -> None:
        self.rows = rows

    def acc(self, init, name: str = "acc"):
        T = self.T
        a = _nm(name, T.decl_buffer((1,), F32, scope="local"))
        T.buffer_store(a, init, [0])
        return a

    def value(self, e: Expr, I: tuple):
        T, tirx = self.T, self.tirx
        if e.op == "load":
            buf = self.bufs[e.buffer.name]
            return buf[self.rows[e.row], _ravel(tirx, I, e.shape)]
        if e.op == "const":
            return _f(tirx, e.c)
        if e.op == "unary":
            fn, multi = UNARY_TIR[e.fn]
            x = self.value(e.args[0], I)
            if multi and not isinstance(x, (tirx.Var, tirx.FloatImm)):
                x = _nm("u", T.Bind(x))
            return fn(tirx, x, e.c)
        if e.op == "binary":
            a, b = (self.value(x, _bc(tirx, I, x.shape)) for x in e.args)
            return _BINARY[e.fn](a, b)
        if e.op == "dot":
            ea, eb = e.args
            acc = self.acc(_f(tirx, 0.0))
            with T.serial(tirx.const(0, IDX), tirx.const(ea.shape[-1], IDX)) as k:
                _nm("k", k)
                a = self.value(ea, _bc(tirx, I, ea.shape[:-1]) + (k,))
                b = self.value(eb, _bc(tirx, I, eb.shape[:-1]) + (k,))
                T.buffer_store(acc, acc[0] + a * b, [0])
            return acc[0]
        if e.op == "sum_to":
            (x,) = e.args
            A, S = tuple(x.shape), tuple(e.shape)
            summed = [i for i in range(len(A)) if (i >= len(S) or S[i] == 1) and A[i] != 1]
            if not summed:
                return self.value(x, tuple(I[i] if i < len(S) else tirx.const(0, IDX) for i in range(len(A))))
            acc = self.acc(_f(tirx, 0.0))
            J = [I[i] if i < len(S) and S[i] != 1 else tirx.const(0, IDX) for i in range(len(A))]
            frames = []
            for i in summed:
                fr = T.serial(tirx.const(0, IDX), tirx.const(A[i], IDX))
                J[i] = _nm(f"s{i}", fr.__enter__())
                frames.append(fr)
            v = self.value(x, tuple(J))
            T.buffer_store(acc, acc[0] + v, [0])
            for fr in reversed(frames):
                fr.__exit__(None, None, None)
            return acc[0]
        if e.op == "reshape":
            (x,) = e.args
            flat = _ravel(tirx, I, e.shape)
            return self.value(x, _unravel(tirx, flat, tuple(x.shape)))
        raise TraversalTvmError(f"unknown expr op {e.op!r}")


class _FeatureLoops:
    """``with _FeatureLoops(T, tirx, shape) as I``: nested serial loops over a feature shape."""

    def __init__(self, T, tirx, shape):
        self.T, self.tirx, self.shape, self.frames = T, tirx, tuple(shape), []

    def __enter__(self):
        I = []
        for s in self.shape:
            if s == 1:
                I.append(self.tirx.const(0, IDX))
                continue
            fr = self.T.serial(self.tirx.const(0, IDX), self.tirx.const(s, IDX))
            I.append(_nm(f"i{len(I)}", fr.__enter__()))
            self.frames.append(fr)
        return tuple(I)

    def __exit__(self, *exc):
        for fr in reversed(self.frames):
            fr.__exit__(*exc)
        self.frames = []
        return False


def _row_loop(T, tirx, extent, parallel: bool, cuda_block: int | None):
    """A loop over rows ``0..extent``; with ``cuda_block`` one thread per row (a guarded frame)."""
    zero = tirx.const(0, IDX)
    if cuda_block is None:
        return (T.parallel if parallel else T.serial)(zero, extent)
    return _CudaRows(T, tirx, extent, cuda_block)


class _CudaRows:
    def __init__(self, T, tirx, extent, block):
        self.T, self.tirx, self.extent, self.block = T, tirx, extent, block

    def __enter__(self):
        T, tirx = self.T, self.tirx
        nb = tirx.floordiv(self.extent + (self.block - 1), self.block)
        self.bx = T.thread_binding(tirx.const(0, IDX), nb, "blockIdx.x")
        bx = self.bx.__enter__()
        self.tx = T.thread_binding(tirx.const(0, IDX), tirx.const(self.block, IDX), "threadIdx.x")
        tx = self.tx.__enter__()
        r = _nm("row", T.Bind(bx * self.block + tx))
        self.cond = T.If(r < self.extent)
        self.cond.__enter__()
        self.then = T.Then()
        self.then.__enter__()
        return r

    def __exit__(self, *exc):
        for fr in (self.then, self.cond, self.tx, self.bx):
            fr.__exit__(*exc)
        return False


def traversal_primfunc(inst: TraversalInstance, *, parallel: bool = True, cuda_block: int | None = None):
    """The TIR PrimFunc of ``inst`` (see the module docstring for its signature).

    ``parallel``: CPU-parallel row loops where rows write disjoint outputs.  ``cuda_block``: bind
    rows to CUDA threads (one thread per row, blocks of that size) instead of CPU loops."""
    _check_instance(inst)
    tvm, tirx, IRBuilder, T = _tir()
    edge_loop = inst.edge_loop
    fshape = tuple(inst.out.shape)
    if cuda_block is not None and inst.loop == "type_reduce":
        raise NotImplementedError("type_reduce with one thread per row needs atomics: not emitted for CUDA")

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(traversal_function_name(inst))
            T.func_attr({"tir.noalias": True, "global_symbol": traversal_function_name(inst)})
            counts = {}
            for nm in ("num_nodes", "num_edges", "num_etypes", "num_ntypes"):
                counts[nm] = T.arg(nm, T.int64())
            nrows = {"node": counts["num_nodes"], "edge": counts["num_edges"], "etype": counts["num_etypes"],
                     "ntype": counts["num_ntypes"], "global": tirx.const(1, IDX)}
            graph = {}
            for nm in graph_arrays(inst):
                n = counts["num_nodes"] + 1 if nm.endswith("_ptr") else (
                    counts["num_nodes"] if nm == "ntype" else counts["num_edges"])
                h = T.arg(nm, T.handle())
                graph[nm] = T.match_buffer(h, (n,), "int32", align=_ALIGN)
                IRBuilder.name(nm, graph[nm])
            bufs = {}
            for b in inst.inputs():
                h = T.arg(b.name, T.handle())
                bufs[b.name] = T.match_buffer(h, (nrows[b.rows], max(b.width, 1)), F32, align=_ALIGN)
                IRBuilder.name(b.name, bufs[b.name])
            out_kind = _out_rows_kind(inst)
            oh = T.arg(inst.out.name, T.handle())
            out = T.match_buffer(oh, (nrows[out_kind], max(inst.out.width, 1)), F32, align=_ALIGN)
            IRBuilder.name(inst.out.name, out)

            em = _Emitter(T, tirx, bufs)
            used = {x.row for x in _walk(inst.expr) if x.op == "load"}

            def bind_rows(r):
                rows = {RowRef.SELF: r, RowRef.NONE: tirx.const(0, IDX)}
                for ref in used:
                    if ref in _GRAPH_REF:
                        rows[ref] = _nm(f"{_GRAPH_REF[ref]}_r", T.Bind(tirx.Cast(IDX, graph[_GRAPH_REF[ref]][r])))
                em.set_rows(rows)

            def store(row, I, value):
                T.buffer_store(out, value, [row, _ravel(tirx, I, fshape)])

            def fetch(row, I):
                return out[row, _ravel(tirx, I, fshape)]

            E, N = counts["num_edges"], counts["num_nodes"]
            if inst.loop in ("edge_map", "node_map"):
                with _row_loop(T, tirx, E if edge_loop else N, parallel, cuda_block) as r:
                    _nm("e" if edge_loop else "v", r)
                    bind_rows(r)
                    with _FeatureLoops(T, tirx, fshape) as I:
                        store(r, I, em.value(inst.expr, I))
            elif inst.loop == "aggregate":
                ptr, eid = (graph["csc_ptr"], graph["csc_eid"]) if inst.side == "dst" else \
                    (graph["csr_ptr"], graph["csr_eid"])
                init = _f(tirx, _NEG_INF) if inst.reduce == "max" else _f(tirx, 0.0)
                with _row_loop(T, tirx, N, parallel, cuda_block) as v:
                    _nm("v", v)
                    lo = _nm("lo", T.Bind(tirx.Cast(IDX, ptr[v])))
                    hi = _nm("hi", T.Bind(tirx.Cast(IDX, ptr[v + 1])))
                    with _FeatureLoops(T, tirx, fshape) as I:
                        store(v, I, init)
                    with T.serial(lo, hi) as j:
                        e = _nm("e", T.Bind(tirx.Cast(IDX, eid[_nm("j", j)])))
                        bind_rows(e)
                        with _FeatureLoops(T, tirx, fshape) as I:
                            val = em.value(inst.expr, I)
                            old = fetch(v, I)
                            store(v, I, tirx.Max(old, val) if inst.reduce == "max" else old + val)
                    if inst.reduce == "max":
                        with T.If(hi == lo):
                            with T.Then():
                                with _FeatureLoops(T, tirx, fshape) as I:
                                    store(v, I, _f(tirx, 0.0))
                    elif inst.reduce == "mean":
                        cnt = tirx.Cast(F32, tirx.Max(hi - lo, tirx.const(1, IDX)))
                        with _FeatureLoops(T, tirx, fshape) as I:
                            store(v, I, fetch(v, I) / cnt)
            elif inst.loop == "edge_softmax":
                ptr, eid = graph["csc_ptr"], graph["csc_eid"]
                with _row_loop(T, tirx, N, parallel, cuda_block) as v:
                    _nm("v", v)
                    lo = _nm("lo", T.Bind(tirx.Cast(IDX, ptr[v])))
                    hi = _nm("hi", T.Bind(tirx.Cast(IDX, ptr[v + 1])))
                    with _FeatureLoops(T, tirx, fshape) as I:
                        m = em.acc(_f(tirx, _NEG_INF), "m")
                        with T.serial(lo, hi) as j:
                            e = _nm("e", T.Bind(tirx.Cast(IDX, eid[_nm("j", j)])))
                            bind_rows(e)
                            T.buffer_store(m, tirx.Max(m[0], em.value(inst.expr, I)), [0])
                        den = em.acc(_f(tirx, 0.0), "den")
                        with T.serial(lo, hi) as j:
                            e = _nm("e", T.Bind(tirx.Cast(IDX, eid[_nm("j", j)])))
                            bind_rows(e)
                            T.buffer_store(den, den[0] + tirx.exp(em.value(inst.expr, I) - m[0]), [0])
                        with T.serial(lo, hi) as j:
                            e = _nm("e", T.Bind(tirx.Cast(IDX, eid[_nm("j", j)])))
                            bind_rows(e)
                            store(e, I, tirx.exp(em.value(inst.expr, I) - m[0]) / den[0])
            else:  # type_reduce: serial accumulation (rows of one type may be anywhere)
                ntypes = nrows[out_kind]
                with T.serial(tirx.const(0, IDX), ntypes) as t:
                    with _FeatureLoops(T, tirx, fshape) as I:
                        store(t, I, _f(tirx, 0.0))
                with T.serial(tirx.const(0, IDX), E if edge_loop else N) as r:
                    _nm("e" if edge_loop else "v", r)
                    bind_rows(r)
                    t = tirx.const(0, IDX) if inst.per == "none" else \
                        _nm("t", T.Bind(tirx.Cast(IDX, graph[inst.per][r])))
                    with _FeatureLoops(T, tirx, fshape) as I:
                        val = em.value(inst.expr, I)
                        store(t, I, fetch(t, I) + val)
    return ib.get()


# -- build and run --------------------------------------------------------------------------------

_LLVM_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


def build_traversal_llvm(inst: TraversalInstance):
    """The compiled CPU function of ``inst`` (cached per ``inst.key()``)."""
    _storage_check(inst, "llvm")
    key = inst.key()
    fn = _LLVM_CACHE.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _LLVM_CACHE.get(key)
        if fn is None:
            tvm = _tir()[0]
            func = traversal_primfunc(inst, parallel=True)
            name = traversal_function_name(inst)
            lib = tvm.compile(tvm.IRModule({name: func}), target="llvm")
            fn = lib[name]
            _LLVM_CACHE[key] = fn
    return fn


def _rows_of(kind: str, kg: KernelGraph) -> int:
    return {"node": kg.num_nodes, "edge": kg.num_edges, "etype": kg.num_etypes, "ntype": kg.num_ntypes,
            "global": 1}[kind]


def _as_2d(name: str, t: torch.Tensor, rows: int, width: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what} {name} is on {t.device}; the llvm backend runs on CPU tensors")
    if t.dtype != torch.float32:
        raise NotImplementedError(f"{what} {name} has dtype {t.dtype}; the llvm backend needs float32 storage")
    if t.numel() != rows * width:
        raise ValueError(f"{what} {name} has shape {tuple(t.shape)} ({t.numel()} elements), expected "
                         f"{rows} rows x {width} = {rows * width} elements")
    if not t.is_contiguous():
        raise ValueError(f"{what} {name} must be contiguous (it is passed zero-copy)")
    return t.detach().view(rows, width)   # detach: DLPack refuses tensors that require grad


def run_traversal_llvm(inst: TraversalInstance, kg: KernelGraph, bufs: Mapping[str, torch.Tensor],
                       out: torch.Tensor) -> torch.Tensor:
    """Run ``inst`` on CPU tensors, writing ``out`` in place (any contiguous fp32 tensor holding
    ``[rows, *inst.out.shape]`` elements); returns ``out``."""
    fn = build_traversal_llvm(inst)
    if kg.device.type != "cpu":
        raise ValueError(f"kernel graph is on {kg.device}; the llvm backend runs on CPU")
    args: list = [kg.num_nodes, kg.num_edges, kg.num_etypes, kg.num_ntypes]
    for nm in graph_arrays(inst):
        a = getattr(kg, nm)
        if a.dtype != torch.int32 or not a.is_contiguous():
            a = a.to(torch.int32).contiguous()
        args.append(a)
    for b in inst.inputs():
        if b.name not in bufs:
            raise KeyError(f"traversal input {b.name} is missing (have {sorted(bufs)})")
        args.append(_as_2d(b.name, bufs[b.name], _rows_of(b.rows, kg), max(b.width, 1), "input"))
    args.append(_as_2d(inst.out.name, out, _rows_of(_out_rows_kind(inst), kg), max(inst.out.width, 1), "output"))
    fn(*args)
    return out


def traversal_cuda_source(inst: TraversalInstance, arch: str = "sm_90", block: int = 128) -> str:
    """CUDA C of ``inst`` with one thread per row (nodes for aggregate / edge_softmax), emitted by
    TVM's CUDA codegen (``tvm.compile`` for ``{"kind": "cuda", "arch": arch}``; no GPU needed, but
    the build runs TVM's CUDA compile callback, nvrtc or nvcc).  The kernel
    ``<traversal_function_name(inst)>_kernel`` takes TVM's device-side signature (the used buffers'
    pointers, then the used int64 row counts); launch ``ceil(rows / block)`` blocks of ``block``
    threads.  Not for ``type_reduce`` (it would need atomics).  Correctness-first: no tiling, and a
    node's features are handled serially by its thread."""
    tvm = _tir()[0]
    func = traversal_primfunc(inst, parallel=False, cuda_block=block)
    name = traversal_function_name(inst)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mod = tvm.IRModule({name: func.with_attr("target", target)})
    lib = tvm.compile(mod, target=target)
    sources = [m.inspect_source() for m in lib.mod.imports if m.kind == "cuda"]
    if len(sources) != 1:
        raise RuntimeError(f"expected one CUDA module, got {[m.kind for m in lib.mod.imports]}")
    return sources[0]
