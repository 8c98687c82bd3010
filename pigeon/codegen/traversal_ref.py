"""Plain-torch semantics of traversal instances (pigeon/ir/traversal.py), used to check every
generated traversal kernel (CUDA template or TVM) and by the CPU fallback executor."""
from __future__ import annotations

from typing import Mapping

import torch

from ..reference import aggregate, binary_fn, edge_softmax, sum_to, unary_fn
from ..torch_dtypes import TORCH_DTYPES
from ..ir.traversal import Expr, RowRef, TraversalInstance
from .layout import KernelGraph


def _pad(x: torch.Tensor, nfeat: int, keep_last: int = 0) -> torch.Tensor:
    """[R, *A] -> [R, *A_lead, 1.., *A_tail] with ``nfeat`` leading feature axes (left-aligned)."""
    feat = tuple(x.shape[1:])
    lead, tail = feat[:len(feat) - keep_last], feat[len(feat) - keep_last:]
    return x.reshape((x.shape[0],) + lead + (1,) * (nfeat - len(lead)) + tail)


def row_index(kg: KernelGraph, row: RowRef, edge_loop: bool) -> torch.Tensor | None:
    if row is RowRef.NONE:
        return None
    if edge_loop:
        table = {RowRef.SELF: None, RowRef.SRC: kg.src, RowRef.DST: kg.dst, RowRef.ETYPE: kg.etype}
    else:
        table = {RowRef.SELF: None, RowRef.NTYPE: kg.ntype}
    if row not in table:
        raise ValueError(f"row reference {row.value} is not allowed in an {'edge' if edge_loop else 'node'} loop")
    return table[row]


def eval_expr(e: Expr, kg: KernelGraph, edge_loop: bool, bufs: Mapping[str, torch.Tensor],
              memo: dict | None = None) -> torch.Tensor:
    """Value of ``e`` at every loop row: a [rows, *e.shape] tensor (float32 for float values).
    Memoized per node, so a DAG with reuse costs its size, not its tree size."""
    memo = {} if memo is None else memo
    for node in e.toposort():
        if node not in memo:
            memo[node] = _eval_node(node, [memo[a] for a in node.args], kg, edge_loop, bufs)
    return memo[e]


def _eval_node(e: Expr, args: list[torch.Tensor], kg: KernelGraph, edge_loop: bool,
               bufs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    R = kg.num_edges if edge_loop else kg.num_nodes
    tdt = TORCH_DTYPES[e.dtype]
    if e.op == "load":
        b = bufs[e.buffer.name].to(tdt)
        idx = row_index(kg, e.row, edge_loop)
        if e.row is RowRef.NONE:
            return b.reshape((1,) + e.shape).expand((R,) + e.shape)
        b = b.reshape((-1,) + e.shape)
        return b if idx is None else b[idx.long()]
    if e.op == "const":
        return torch.full((R,), e.c, dtype=tdt, device=kg.device)
    if e.op == "index":
        if e.fn == "row":
            return torch.arange(R, dtype=tdt, device=kg.device)
        if e.fn.startswith("feat"):
            axis = int(e.fn[4:])
            shape = [1] * (len(e.shape) + 1)
            shape[axis + 1] = e.shape[axis]
            ar = torch.arange(e.shape[axis], dtype=tdt, device=kg.device).reshape(shape)
            return ar.expand((R,) + e.shape)
        raise ValueError(f"index variable {e.fn!r} is not bound in a traversal loop")
    if e.op == "unary":
        return unary_fn(e.fn, args[0], e.c).to(tdt)
    if e.op == "cast":
        return args[0].to(tdt)
    if e.op in ("binary", "where"):
        xs = [_pad(x, len(e.shape)) for x in args]
        if e.op == "where":
            return torch.where(xs[0], xs[1].to(tdt), xs[2].to(tdt)).expand((R,) + e.shape).reshape((R,) + e.shape)
        out = binary_fn(e.fn, xs[0], xs[1])
        return out.to(tdt).expand((R,) + e.shape).reshape((R,) + e.shape)
    if e.op == "dot":
        a, b = (_pad(x, len(e.shape), keep_last=1) for x in args)
        return (a * b).sum(-1).reshape((R,) + e.shape)
    if e.op == "sum_to":
        return sum_to(args[0], e.shape)
    if e.op == "reshape":
        return args[0].reshape((R,) + e.shape)
    raise ValueError(f"unknown expr op {e.op!r}")


def run_traversal_reference(inst: TraversalInstance, kg: KernelGraph,
                            bufs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The output buffer of ``inst`` as a [rows, *out.shape] float32 tensor."""
    v = eval_expr(inst.expr, kg, inst.edge_loop, bufs)
    shape = inst.out.shape
    if inst.loop in ("edge_map", "node_map"):
        return v.reshape((-1,) + shape)
    if inst.loop == "aggregate":
        idx = (kg.dst if inst.side == "dst" else kg.src).long()
        return aggregate(v, idx, kg.num_nodes, inst.reduce)
    if inst.loop == "edge_softmax":
        return edge_softmax(v, kg.dst.long(), kg.num_nodes)
    if inst.loop == "type_reduce":
        if inst.per == "none":
            return v.sum(0).reshape(shape)
        types = (kg.etype if inst.per == "etype" else kg.ntype).long()
        n = kg.num_etypes if inst.per == "etype" else kg.num_ntypes
        return v.new_zeros((n,) + shape).index_add(0, types, v)
    raise ValueError(f"unknown loop {inst.loop!r}")
