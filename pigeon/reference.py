"""The reference interpreter: runs any inter-operator IR with plain torch ops.

It is the oracle every kernel, pass and model is compared to, so it favours the obvious way over
the fast way.  It runs on any device and in any float dtype, and backward comes from torch
autograd.  Per-type matmuls loop over types (never materialising one weight copy per edge).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .ir.fns import get_fn
from .ir.graph import IRGraph
from .ir.ops import Op, OpKind
from .ir.types import Domain, TypeAxis


class InputError(ValueError):
    """A tensor passed to a compiled layer does not fit what the IR expects."""


def rows_of(graph, domain: Domain) -> int:
    if domain is Domain.NODE:
        return graph.num_nodes
    if domain is Domain.EDGE:
        return graph.num_edges
    if domain is Domain.COMPACT:
        return graph.compact().num_rows
    raise ValueError(domain)


def type_count(graph, axis: TypeAxis) -> int:
    return graph.num_etypes if axis is TypeAxis.ETYPE else graph.num_ntypes


def expected_shape(op: Op, graph) -> tuple[int, ...]:
    """Concrete shape of an input or param on ``graph``."""
    t = op.type
    if t.domain is Domain.WEIGHT:
        return (type_count(graph, t.per),) + t.shape
    if t.domain is Domain.GLOBAL:
        return t.shape
    return (rows_of(graph, t.domain),) + t.shape


def check_tensors(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor],
                  params: Mapping[str, torch.Tensor]) -> None:
    """Raise InputError naming the tensor when a bound tensor's shape, dtype or device is off."""
    for kind, table, ops in (("input", inputs, ir.inputs()), ("param", params, ir.params())):
        for op in ops:
            name = op.attr("name")
            if name not in table:
                raise InputError(f"{kind} {name!r} is missing; expected a tensor of shape "
                                 f"{list(expected_shape(op, graph))}")
            x = table[name]
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{kind} {name!r} must be a torch.Tensor, got {type(x).__name__}")
            want = expected_shape(op, graph)
            if tuple(x.shape) != want:
                raise InputError(f"{kind} {name!r} has shape {list(x.shape)}, expected {list(want)} "
                                 f"({op.type} on a graph of {graph.num_nodes} nodes, {graph.num_edges} edges)")
            if not x.is_floating_point():
                raise InputError(f"{kind} {name!r} must be a floating-point tensor, got {x.dtype}")
            if x.device != graph.src.device:
                raise InputError(f"{kind} {name!r} is on {x.device} but the graph is on {graph.src.device}")


def _types_of_rows(graph, domain: Domain, axis: TypeAxis) -> torch.Tensor:
    if axis is TypeAxis.NTYPE:
        return graph.ntype
    if domain is Domain.EDGE:
        return graph.etype
    return graph.compact().etype


def _apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, .., K] @ w [K, N], or per head x [R, H, K] with w [H, K, N]."""
    if w.dim() == 2:
        return x @ w
    return torch.einsum("rhk,hkn->rhn", x, w)


def typed_matmul(x: torch.Tensor, w: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """Row r uses w[types[r]]: rows are sorted by type, each type's block multiplies its
    weight once, and the result is put back in row order."""
    order = torch.argsort(types, stable=True)
    counts = torch.bincount(types, minlength=w.shape[0]).tolist()
    pieces = [_apply_weight(xs, w[t]) for t, xs in enumerate(torch.split(x[order], counts)) if xs.shape[0]]
    if not pieces:
        return x.new_zeros((0,) + tuple(x.shape[1:-1]) + (w.shape[-1],))
    out = torch.empty_like(order)
    out[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(pieces)[out]


def unary_fn(fn: str, x: torch.Tensor, c=None) -> torch.Tensor:
    """The meaning of a unary fn: its torch form in the fn registry (pigeon/ir/fns.py)."""
    return get_fn(fn, 1).torch(torch, x, c)


def binary_fn(fn: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return get_fn(fn, 2).torch(torch, a, b)


def edge_softmax(score: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """softmax of score over the edges that share a destination (per feature column)."""
    shape = (num_nodes,) + tuple(score.shape[1:])
    idx = dst.view(-1, *([1] * (score.dim() - 1))).expand_as(score)
    # the max only keeps exp() in range; softmax does not depend on it, so no gradient flows
    m = torch.full(shape, float("-inf"), dtype=score.dtype, device=score.device)
    m = m.scatter_reduce(0, idx, score.detach(), "amax", include_self=True)
    ex = torch.exp(score - m[dst])
    den = torch.zeros(shape, dtype=score.dtype, device=score.device).index_add(0, dst, ex)
    return ex / den[dst]


def aggregate(msg: torch.Tensor, dst: torch.Tensor, num_nodes: int, reduce: str) -> torch.Tensor:
    shape = (num_nodes,) + tuple(msg.shape[1:])
    out = torch.zeros(shape, dtype=msg.dtype, device=msg.device)
    if reduce == "max":
        idx = dst.view(-1, *([1] * (msg.dim() - 1))).expand_as(msg)
        return out.scatter_reduce(0, idx, msg, "amax", include_self=False)
    out = out.index_add(0, dst, msg)
    if reduce == "mean":
        deg = torch.bincount(dst, minlength=num_nodes).clamp(min=1).to(msg.dtype)
        out = out / deg.view(-1, *([1] * (msg.dim() - 1)))
    return out


def sum_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows x [R, *A] summed to [R, *shape]: axes past len(shape), and axes where shape has 1."""
    A = tuple(x.shape[1:])
    if len(A) > len(shape):
        x = x.sum(dim=tuple(range(1 + len(shape), 1 + len(A))))
    axes = tuple(1 + i for i, s in enumerate(shape) if s == 1 and A[i] != 1)
    if axes:
        x = x.sum(dim=axes, keepdim=True)
    return x.reshape((x.shape[0],) + tuple(shape))


def graph_data(what: str, graph, dtype: torch.dtype) -> torch.Tensor:
    if what == "inv_in_degree_by_etype":
        return 1.0 / graph.in_degree_by_etype().to(dtype)
    if what == "inv_in_degree":
        deg = graph.in_degree().to(dtype)
        return torch.where(deg > 0, 1.0 / deg.clamp(min=1), torch.zeros_like(deg))
    raise ValueError(f"unknown graph data {what}")


def evaluate_op(op: Op, args: list[torch.Tensor], arg_types: list, graph,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value of one op given its input values and their IR types."""
    k = op.kind
    if k is OpKind.GRAPH_DATA:
        return graph_data(op.attr("what"), graph, dtype)
    if k is OpKind.GATHER:
        side = op.attr("side")
        index = graph.src if side == "src" else graph.dst if side == "dst" else graph.compact().src
        return args[0][index]
    if k is OpKind.EXPAND_COMPACT:
        return args[0][graph.compact().edge_to_compact]
    if k is OpKind.TYPE_INDEX:
        return args[0][_types_of_rows(graph, op.type.domain, arg_types[0].per)]
    if k is OpKind.TYPED_LINEAR:
        x, w = args
        wt = arg_types[1]
        if op.attr("transpose"):
            w = w.transpose(-1, -2)
        if wt.domain is Domain.GLOBAL:
            return _apply_weight(x, w)
        return typed_matmul(x, w, _types_of_rows(graph, op.type.domain, wt.per))
    if k is OpKind.UNARY:
        return unary_fn(op.attr("fn"), args[0], op.attr("c"))
    if k in (OpKind.BINARY, OpKind.DOT):
        drop = 1 if k is OpKind.DOT else 0
        n = max(len(t.shape) for t in arg_types) - drop
        a, b = (_broadcastable(x, t, n, drop) for x, t in zip(args, arg_types))
        if k is OpKind.DOT:
            return (a * b).sum(-1)
        return binary_fn(op.attr("fn"), a, b)
    if k is OpKind.RESHAPE:
        has_rows = op.type.is_rows or op.type.domain is Domain.WEIGHT    # per-type weights are [T, *shape]
        return args[0].reshape((args[0].shape[0],) + op.type.shape if has_rows else op.type.shape)
    if k is OpKind.CONCAT:
        return torch.cat(args, dim=-1)
    if k is OpKind.EDGE_SOFTMAX:
        return edge_softmax(args[0], graph.dst, graph.num_nodes)
    if k is OpKind.AGGREGATE:
        index = graph.src if op.attr("side", "dst") == "src" else graph.dst
        return aggregate(args[0], index, graph.num_nodes, op.attr("reduce"))
    if k is OpKind.WEIGHT_GRAD:
        x, dy = args
        per = op.attr("per")
        wshape = tuple(op.attr("wshape"))
        if len(wshape) == 2:   # fold every leading axis into rows
            x, dy = x.reshape(x.shape[0], -1, wshape[0]), dy.reshape(dy.shape[0], -1, wshape[1])
        outer = torch.einsum("rhk,rhn->rhkn", x.reshape(x.shape[0], -1, wshape[-2]),
                             dy.reshape(dy.shape[0], -1, wshape[-1]))
        if len(wshape) == 2:
            outer = outer.sum(1)
        else:
            outer = outer.reshape((x.shape[0],) + wshape)
        return _type_sum(outer, graph, arg_types[0].domain, per)
    if k is OpKind.TYPE_REDUCE:
        return _type_sum(args[0], graph, arg_types[0].domain, op.attr("per"))
    if k is OpKind.SUM_TO:
        return sum_to(args[0], tuple(op.attr("shape")))
    if k is OpKind.SLICE:
        return args[0][..., op.attr("start"):op.attr("stop")]
    raise ValueError(f"reference interpreter has no rule for {k}")


def _type_sum(x: torch.Tensor, graph, domain: Domain, per) -> torch.Tensor:
    """Sum rows by their type (per a TypeAxis), or all rows (per None)."""
    if per is None:
        return x.sum(0)
    types = _types_of_rows(graph, domain, per)
    return x.new_zeros((type_count(graph, per),) + tuple(x.shape[1:])).index_add(0, types, x)


def _broadcastable(x: torch.Tensor, t, nfeat: int, keep_last: int) -> torch.Tensor:
    """Reshape x so torch broadcasting equals the IR's left-aligned rule: a global value gets a
    leading row axis of 1, and singleton feature axes are appended (before the reduced axis of a
    dot) up to ``nfeat`` leading feature axes."""
    has_rows = t.is_rows or t.domain is Domain.WEIGHT
    feat = tuple(x.shape[1:]) if has_rows else tuple(x.shape)
    lead, tail = feat[:len(feat) - keep_last], feat[len(feat) - keep_last:]
    rows = x.shape[0] if has_rows else 1
    return x.reshape((rows,) + lead + (1,) * (nfeat - len(lead)) + tail)


def evaluate(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
             *, check: bool = True) -> dict[str, torch.Tensor]:
    """Values of every op, by op key."""
    if check:
        check_tensors(ir, graph, inputs, params)
    env: dict[str, torch.Tensor] = {}
    dtype = next((v.dtype for v in list(inputs.values()) + list(params.values())), torch.float32)
    for op in ir.ops():
        if op.kind is OpKind.INPUT:
            env[op.key] = inputs[op.attr("name")]
        elif op.kind is OpKind.PARAM:
            env[op.key] = params[op.attr("name")]
        else:
            args = [env[i] for i in op.inputs]
            env[op.key] = evaluate_op(op, args, [ir.op(i).type for i in op.inputs], graph, dtype)
    return env


def run(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
        *, check: bool = True) -> dict[str, torch.Tensor]:
    """Run the IR on ``graph``; returns the outputs by name."""
    env = evaluate(ir, graph, inputs, params, check=check)
    return {name: env[key] for name, key in zip(ir.output_names, ir.outputs)}
