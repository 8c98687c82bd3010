"""Plain-torch semantics of traversal instances (pigeon/ir/traversal.py), used to check every
generated traversal kernel (CUDA template or TVM) and by the CPU fallback executor."""
from __future__ import annotations

from typing import Mapping

import torch

from ..reference import aggregate, edge_softmax, sum_to
from ..reference import unary_fn as _unary
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


def eval_expr(e: Expr, kg: KernelGraph, edge_loop: bool, bufs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Value of ``e`` at every loop row: a [rows, *e.shape] float32 tensor."""
    R = kg.num_edges if edge_loop else kg.num_nodes
    if e.op == "load":
        b = bufs[e.buffer.name].float()
        idx = row_index(kg, e.row, edge_loop)
        if e.row is RowRef.NONE:
            return b.reshape((1,) + e.shape).expand((R,) + e.shape)
        b = b.reshape((-1,) + e.shape)
        return b if idx is None else b[idx.long()]
    if e.op == "const":
        return torch.full((R,), float(e.c), device=kg.device)
    args = [eval_expr(a, kg, edge_loop, bufs) for a in e.args]
    if e.op == "unary":
        return _unary(e.fn, args[0], e.c)
    if e.op == "binary":
        a, b = (_pad(x, len(e.shape)) for x in args)
        return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[e.fn](a, b).reshape((R,) + e.shape)
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
