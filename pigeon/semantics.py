"""Plain-torch meanings of the graph operations the IR uses: per-type matmul, edge softmax,
aggregation, sums to a shape, graph data, elementwise fns (through the fn registry).  The op
registry's reference forms (pigeon/opset.py) and the kernel families' semantics are built from
these, so the oracle has one definition of each operation."""
from __future__ import annotations

import torch

from .ir.fns import get_fn
from .ir.types import Domain, TypeAxis


def rows_of(graph, domain: Domain) -> int:
    if domain is Domain.NODE:
        return graph.num_nodes
    if domain is Domain.EDGE:
        return graph.num_edges
    if domain is Domain.COMPACT:
        return graph.compact().num_rows
    if domain is Domain.COMPACT_DST:
        return graph.compact_dst().num_rows
    raise ValueError(domain)


def type_count(graph, axis: TypeAxis) -> int:
    return graph.num_etypes if axis is TypeAxis.ETYPE else graph.num_ntypes


def types_of_rows(graph, domain: Domain, axis: TypeAxis) -> torch.Tensor:
    if axis is TypeAxis.NTYPE:
        return graph.ntype
    if domain is Domain.EDGE:
        return graph.etype
    if domain is Domain.COMPACT_DST:
        return graph.compact_dst().etype
    return graph.compact().etype


def apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, .., K] @ w [K, N], or per head x [R, H, K] with w [H, K, N]."""
    if w.dim() == 2:
        return x @ w
    return torch.einsum("rhk,hkn->rhn", x, w)


def typed_matmul(x: torch.Tensor, w: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """Row r uses w[types[r]]: rows are sorted by type, each type's block multiplies its
    weight once, and the result is put back in row order."""
    order = torch.argsort(types, stable=True)
    counts = torch.bincount(types, minlength=w.shape[0]).tolist()
    pieces = [apply_weight(xs, w[t]) for t, xs in enumerate(torch.split(x[order], counts)) if xs.shape[0]]
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


def type_sum(x: torch.Tensor, graph, domain: Domain, per) -> torch.Tensor:
    """Sum rows by their type (per a TypeAxis), or all rows (per None)."""
    if per is None:
        return x.sum(0)
    types = types_of_rows(graph, domain, per)
    return x.new_zeros((type_count(graph, per),) + tuple(x.shape[1:])).index_add(0, types, x)


def broadcastable(x: torch.Tensor, t, nfeat: int, keep_last: int) -> torch.Tensor:
    """Reshape x so torch broadcasting equals the IR's left-aligned rule: a global value gets a
    leading row axis of 1, and singleton feature axes are appended (before the reduced axis of a
    dot) up to ``nfeat`` leading feature axes."""
    has_rows = t.is_rows or t.domain is Domain.WEIGHT
    feat = tuple(x.shape[1:]) if has_rows else tuple(x.shape)
    lead, tail = feat[:len(feat) - keep_last], feat[len(feat) - keep_last:]
    rows = x.shape[0] if has_rows else 1
    return x.reshape((rows,) + lead + (1,) * (nfeat - len(lead)) + tail)


def _pad(x: torch.Tensor, nfeat: int, keep_last: int = 0) -> torch.Tensor:
    """[R, *A] -> [R, *A_lead, 1.., *A_tail] with ``nfeat`` leading feature axes (left-aligned)."""
    feat = tuple(x.shape[1:])
    lead, tail = feat[:len(feat) - keep_last], feat[len(feat) - keep_last:]
    return x.reshape((x.shape[0],) + lead + (1,) * (nfeat - len(lead)) + tail)


def eval_expr(e, rows: int, leaf, device, float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """An expression (pigeon/ir/expr.py) at every one of ``rows`` rows: a [rows, *e.shape] tensor.
    ``leaf(node)`` gives the value of the nodes a kernel binds (loads, ``var``s, index variables
    other than row / feat<i>) as [rows, *node.shape]; everything else has its meaning here, fns
    by their torch forms.  Memoized per node: a DAG with reuse costs its size."""
    from .torch_dtypes import TORCH_DTYPES
    memo: dict = {}
    for n in e.toposort():
        if n in memo:
            continue
        a = [memo[x] for x in n.args]
        tdt = TORCH_DTYPES[n.dtype]
        if float_dtype is not None and tdt.is_floating_point:     # an oracle in float64
            tdt = float_dtype
        full = (rows,) + n.shape
        if n.op in ("load", "var") or (n.op == "index" and n.fn != "row" and not n.fn.startswith("feat")):
            v = leaf(n)
        elif n.op == "const":
            v = torch.full((rows,), n.c, dtype=tdt, device=device)
        elif n.op == "index" and n.fn == "row":
            v = torch.arange(rows, dtype=tdt, device=device)
        elif n.op == "index":
            axis = int(n.fn[4:])
            shape = [1] * (len(n.shape) + 1)
            shape[axis + 1] = n.shape[axis]
            v = torch.arange(n.shape[axis], dtype=tdt, device=device).reshape(shape).expand(full)
        elif n.op == "unary":
            v = unary_fn(n.fn, a[0], n.c).to(tdt)
        elif n.op == "cast":
            v = a[0].to(tdt)
        elif n.op == "where":
            xs = [_pad(x, len(n.shape)) for x in a]
            v = torch.where(xs[0], xs[1].to(tdt), xs[2].to(tdt)).expand(full).reshape(full)
        elif n.op == "binary":
            xs = [_pad(x, len(n.shape)) for x in a]
            v = binary_fn(n.fn, xs[0], xs[1]).to(tdt).expand(full).reshape(full)
        elif n.op == "dot":
            x, y = (_pad(t, len(n.shape), keep_last=1) for t in a)
            v = (x * y).sum(-1).reshape(full)
        elif n.op == "sum_to":
            v = sum_to(a[0], n.shape)
        elif n.op == "reshape":
            v = a[0].reshape(full)
        else:
            raise ValueError(f"unknown expr op {n.op!r}")
        memo[n] = v
    return memo[e]
