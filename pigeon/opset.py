"""The op registry's records: one ``OpDef`` per op kind of the inter-operator IR, with every
form of the kind in one place:

* ``type_rule(kind, attrs, input_types)``: the result type, or SignatureError (the DSL calls it to
  build ops, the verifier again after every pass);
* ``grad(builder, y, dy, inputs)``: contributions to the inputs' gradients as (position, op), built
  with the autodiff builder (``make``, ``un``, ``bin``, ``reshape``, ``reduce_like``, ``scaled``);
  None: no gradient (autodiff says so);
* ``reference(op, args, arg_types, graph, dtype)``: the op's value with plain torch ops (the
  reference interpreter, the oracle);
* ``lower``: how the lowering treats it: ``leaf`` (a program input), ``fused`` (inlined as an
  element expression; ``element(op, args)`` builds it where the kind maps to one expression
  node), ``gemm`` / ``aggregate`` / ``edge_softmax`` / ``type_reduce`` (a kernel launch), or None
  (not lowered to kernels yet: the reference backend runs it);
* ``fmt``: an optional custom printer (the generic ``kind(args, attrs)`` form otherwise).

A new op kind is one ``OpKind`` member and one ``register_op`` call here.
"""
from __future__ import annotations

import math

import torch

from .ir import expr as ex
from .ir.fns import get_fn
from .ir.ops import (AGGREGATE_SIDES, EXPAND_GRAD_SIDE, GATHER_SIDES, GRAPH_DATA, REDUCES, OpKind, SignatureError, _broadcast,
                     _fn, _need, _per_type_result, _rows_domain)
from .ir.registry import GradientError, OpDef, register_op
from .ir.types import Domain, TypeAxis, ValueType, dtype_class
from .semantics import (aggregate, apply_weight, binary_fn, broadcastable, edge_softmax, graph_data, sum_to,
                        type_sum, typed_matmul, types_of_rows, unary_fn)



# -- input -------------------------------------------------------------------------------------

def _type_input(kind, attrs, ins):     # leaves (inputs and params) carry their type
    what = kind.value
    raise SignatureError(f"{what} ops carry their type; nothing to infer")


register_op(OpDef(OpKind.INPUT, _type_input, grad=None, reference=None,
                  lower='leaf', doc='a tensor the caller passes (node or edge features)'))


# -- param -------------------------------------------------------------------------------------

register_op(OpDef(OpKind.PARAM, _type_input, grad=None, reference=None,
                  lower='leaf', doc='a learned weight, per type or global'))


# -- graph_data --------------------------------------------------------------------------------

def _type_graph_data(kind, attrs, ins):
    what = kind.value
    _need(0, ins, what)
    if attrs["what"] not in GRAPH_DATA:
        raise SignatureError(f"unknown graph data {attrs['what']!r}; known: {sorted(GRAPH_DATA)}")
    return ValueType(GRAPH_DATA[attrs["what"]], (), attrs.get("dtype", "float32"))


def _ref_graph_data(op, args, arg_types, graph, dtype):
    return graph_data(op.attr("what"), graph, dtype)


register_op(OpDef(OpKind.GRAPH_DATA, _type_graph_data, grad=None, reference=_ref_graph_data,
                  lower='leaf', doc='a value derived from the graph structure alone (e.g. 1/degree)'))


# -- gather ------------------------------------------------------------------------------------

def _type_gather(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    side = attrs["side"]
    if side not in GATHER_SIDES:
        raise SignatureError(f"gather side must be one of {sorted(GATHER_SIDES)}, got {side!r}")
    src_dom, dst_dom = GATHER_SIDES[side]
    if ins[0].domain is not src_dom:
        raise SignatureError(f"gather {side} needs a {src_dom.value}-wise value, got {ins[0]}")
    return ValueType(dst_dom, ins[0].shape, ins[0].dtype)


def _grad_gather(b, y, dy, ins):
    return [(0, b.make(OpKind.AGGREGATE, [dy], reduce="sum", side=y.attr("side")))]


def _ref_gather(op, args, arg_types, graph, dtype):
    side = op.attr("side")
    index = {"src": graph.src, "dst": graph.dst}.get(side)
    if index is None:
        index = (graph.compact() if side == "compact_src" else graph.compact_dst()).src
    return args[0][index]


register_op(OpDef(OpKind.GATHER, _type_gather, grad=_grad_gather, reference=_ref_gather,
                  lower='fused', doc='node value -> edge (src|dst) or compact rows'))


# -- expand_compact ----------------------------------------------------------------------------

def _type_expand_compact(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    if ins[0].domain not in EXPAND_GRAD_SIDE:
        raise SignatureError(f"expand_compact needs a compact (or compact_dst) value, got {ins[0]}")
    return ValueType(Domain.EDGE, ins[0].shape, ins[0].dtype)


def _ref_expand_compact(op, args, arg_types, graph, dtype):
    cmap = graph.compact() if arg_types[0].domain is Domain.COMPACT else graph.compact_dst()
    return args[0][cmap.edge_to_compact]


def _grad_expand_compact(b, y, dy, ins):
    return [(0, b.make(OpKind.AGGREGATE, [dy], reduce="sum", side=EXPAND_GRAD_SIDE[ins[0].type.domain]))]


register_op(OpDef(OpKind.EXPAND_COMPACT, _type_expand_compact, grad=_grad_expand_compact,
                  reference=_ref_expand_compact, lower='fused', doc='compact rows -> edge rows'))


# -- type_index --------------------------------------------------------------------------------

def _type_type_index(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    w, dom = ins[0], attrs["domain"]
    if w.domain is not Domain.WEIGHT:
        raise SignatureError(f"only per-type weights can be indexed by a type, got {w}")
    ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT, Domain.COMPACT_DST), TypeAxis.NTYPE: (Domain.NODE,)}[w.per]
    if dom not in ok:
        raise SignatureError(f"a weight per {w.per.value} can be indexed on "
                             f"{[d.value for d in ok]} rows, not {dom.value}")
    return ValueType(dom, w.shape, w.dtype)


def _grad_type_index(b, y, dy, ins):
    return [(0, b.make(OpKind.TYPE_REDUCE, [dy], per=ins[0].type.per))]


def _ref_type_index(op, args, arg_types, graph, dtype):
    return args[0][types_of_rows(graph, op.type.domain, arg_types[0].per)]


register_op(OpDef(OpKind.TYPE_INDEX, _type_type_index, grad=_grad_type_index, reference=_ref_type_index,
                  lower='fused', doc='per-type weight W -> rows, W[type of row]'))


# -- typed_linear ------------------------------------------------------------------------------

def _type_typed_linear(kind, attrs, ins):
    what = kind.value
    _need(2, ins, what)
    x, w = ins
    if not x.is_rows and not (x.domain is Domain.WEIGHT and w.domain is Domain.GLOBAL):
        raise SignatureError(f"typed_linear input must be node/edge/compact rows (or per-type rows with an "
                             f"untyped weight), got {x}")
    if w.domain is Domain.WEIGHT:
        ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT, Domain.COMPACT_DST), TypeAxis.NTYPE: (Domain.NODE,)}[w.per]
        if x.domain not in ok:
            raise SignatureError(f"a weight per {w.per.value} applies to {[d.value for d in ok]} "
                                 f"rows; x is {x.domain.value}-wise")
    elif w.domain is not Domain.GLOBAL:
        raise SignatureError(f"typed_linear weight must be a weight, got {w}")
    if x.dtype != w.dtype:
        raise SignatureError(f"typed_linear dtypes differ: x {x.dtype}, W {w.dtype}")
    wshape = w.shape
    if attrs.get("transpose"):       # use each block transposed: [.., K, N] maps N -> K
        wshape = wshape[:-2] + (wshape[-1], wshape[-2])
    if len(wshape) == 2:
        k, n = wshape
        if not x.shape or x.shape[-1] != k:
            raise SignatureError(f"typed_linear: x has feature shape {list(x.shape)} but W maps {k} -> {n}")
        return ValueType(x.domain, x.shape[:-1] + (n,), x.dtype, x.per)
    if len(wshape) == 3:
        h, k, n = wshape
        if x.shape != (h, k):
            raise SignatureError(f"per-head typed_linear: W is [heads={h}, {k}, {n}] so x must be "
                                 f"[{h}, {k}], got {list(x.shape)}")
        return ValueType(x.domain, (h, n), x.dtype, x.per)
    raise SignatureError(f"typed_linear weight must be [K, N] or [heads, K, N] per type, got {list(w.shape)}")


def _grad_typed_linear(b, y, dy, ins):
    x, w = ins
    t = bool(y.attr("transpose"))
    dx = b.make(OpKind.TYPED_LINEAR, [dy, w], **({} if t else {"transpose": True}))
    per = w.type.per if w.type.domain is Domain.WEIGHT else None
    a, c = (dy, x) if t else (x, dy)
    dw = b.make(OpKind.WEIGHT_GRAD, [a, c], per=per, wshape=w.type.shape)
    return [(0, dx), (1, dw)]


def _ref_typed_linear(op, args, arg_types, graph, dtype):
    x, w = args
    wt = arg_types[1]
    if op.attr("transpose"):
        w = w.transpose(-1, -2)
    if wt.domain is Domain.GLOBAL:
        return apply_weight(x, w)
    return typed_matmul(x, w, types_of_rows(graph, op.type.domain, wt.per))


register_op(OpDef(OpKind.TYPED_LINEAR, _type_typed_linear, grad=_grad_typed_linear, reference=_ref_typed_linear,
                  lower='gemm', doc='x @ W[type of row] (or x @ W)'))


# -- unary -------------------------------------------------------------------------------------

def _type_unary(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    fn = _fn(attrs["fn"], 1)
    if fn.takes_const != ("c" in attrs and attrs["c"] is not None):
        raise SignatureError(f"unary {fn.name} {'needs' if fn.takes_const else 'takes no'} constant")
    if dtype_class(ins[0].dtype) not in fn.operands:
        raise SignatureError(f"unary {fn.name}: operand dtype {ins[0].dtype} is not one of {list(fn.operands)}")
    return ins[0] if fn.result is None else ValueType(ins[0].domain, ins[0].shape, fn.result, ins[0].per)


def _grad_unary(b, y, dy, ins):
    fn, c, x = y.attr("fn"), y.attr("c"), ins[0]
    f = get_fn(fn, 1)
    if f.grad is None:
        raise GradientError(f"no gradient rule for unary {fn!r}")
    local = f.grad(b, x, y, c)     # dy/dx, an IR value or a constant
    if b.is_const(local):
        return [(0, b.scaled(dy, local.c))]
    return [(0, b.bin(dy, local, "mul"))]


def _ref_unary(op, args, arg_types, graph, dtype):
    return unary_fn(op.attr("fn"), args[0], op.attr("c"))


register_op(OpDef(OpKind.UNARY, _type_unary, grad=_grad_unary, reference=_ref_unary,
                  lower='fused', element=lambda op, a: ex.unary(op.attr("fn"), a[0], op.attr("c")), doc='elementwise fn(x[, c]) of the fn registry'))


# -- binary ------------------------------------------------------------------------------------

def _type_binary(kind, attrs, ins):
    what = kind.value
    _need(2, ins, what)
    fn = _fn(attrs["fn"], 2)
    a, b = ins
    if a.dtype != b.dtype:
        raise SignatureError(f"{attrs['fn']}: dtypes differ ({a.dtype} vs {b.dtype})")
    if a.domain is Domain.WEIGHT and b.domain is Domain.WEIGHT and a.per is b.per:
        # per-type weights combine type by type (backward sums a weight's gradients)
        return ValueType(Domain.WEIGHT, _broadcast(a.shape, b.shape, attrs["fn"]), a.dtype, a.per)
    if dtype_class(a.dtype) not in fn.operands:
        raise SignatureError(f"{fn.name}: operand dtype {a.dtype} is not one of {list(fn.operands)}")
    dom = _rows_domain([a, b], attrs["fn"])
    return ValueType(dom, _broadcast(a.shape, b.shape, attrs["fn"]), fn.result or a.dtype)


def _grad_binary(b, y, dy, ins):
    fn, (p, q) = y.attr("fn"), ins
    f = get_fn(fn, 2)
    if f.grad is None:
        raise GradientError(f"no gradient rule for binary {fn!r}")
    da, db = f.grad(b, p, q, y, dy)
    return [(0, b.reduce_like(da, p)), (1, b.reduce_like(db, q))]


def _ref_binary(op, args, arg_types, graph, dtype):
    k = op.kind
    drop = 1 if k is OpKind.DOT else 0
    n = max(len(t.shape) for t in arg_types) - drop
    a, b = (broadcastable(x, t, n, drop) for x, t in zip(args, arg_types))
    if k is OpKind.DOT:
        return (a * b).sum(-1)
    return binary_fn(op.attr("fn"), a, b)


register_op(OpDef(OpKind.BINARY, _type_binary, grad=_grad_binary, reference=_ref_binary,
                  lower='fused', element=lambda op, a: ex.binary(op.attr("fn"), a[0], a[1]), doc='elementwise fn(a, b), left-aligned broadcasting'))


# -- dot ---------------------------------------------------------------------------------------

def _type_dot(kind, attrs, ins):
    what = kind.value
    _need(2, ins, what)
    a, b = ins
    if not a.shape or not b.shape or a.shape[-1] != b.shape[-1]:
        raise SignatureError(f"dot: last axes differ: {list(a.shape)} vs {list(b.shape)}")
    if a.domain is Domain.WEIGHT and b.domain is Domain.WEIGHT and a.per is b.per:
        # per-type weights contract type by type (the linear reordering folds a_r into W_r)
        return ValueType(Domain.WEIGHT, _broadcast(a.shape[:-1], b.shape[:-1], "dot"), a.dtype, a.per)
    dom = _rows_domain([a, b], "dot")
    return ValueType(dom, _broadcast(a.shape[:-1], b.shape[:-1], "dot"), a.dtype)


def _grad_dot(b, y, dy, ins):
    lead = y.type.shape
    dy1 = b.reshape(dy, lead + (1,))
    out = []
    for pos, (mine, other) in enumerate(((ins[0], ins[1]), (ins[1], ins[0]))):
        o_lead, kdim = other.type.shape[:-1], other.type.shape[-1]
        o = b.reshape(other, o_lead + (1,) * (len(lead) - len(o_lead)) + (kdim,))
        prod = b.bin(dy1, o, "mul")                       # [*lead, K]
        m_lead = mine.type.shape[:-1]
        aligned = m_lead + (1,) * (len(lead) - len(m_lead)) + (kdim,)
        g = prod if prod.type.shape == aligned else b.make(OpKind.SUM_TO, [prod], shape=aligned)
        g = b.reshape(g, mine.type.shape)
        if mine.type.domain is Domain.GLOBAL and g.type.domain is not Domain.GLOBAL:
            g = b.make(OpKind.TYPE_REDUCE, [g], per=None)
        out.append((pos, g))
    return out


def _ref_dot(op, args, arg_types, graph, dtype):
    k = op.kind
    drop = 1 if k is OpKind.DOT else 0
    n = max(len(t.shape) for t in arg_types) - drop
    a, b = (broadcastable(x, t, n, drop) for x, t in zip(args, arg_types))
    if k is OpKind.DOT:
        return (a * b).sum(-1)
    return binary_fn(op.attr("fn"), a, b)


register_op(OpDef(OpKind.DOT, _type_dot, grad=_grad_dot, reference=_ref_dot,
                  lower='fused', element=lambda op, a: ex.dot(a[0], a[1]), doc='inner product over the last feature axis'))


# -- reshape -----------------------------------------------------------------------------------

def _type_reshape(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    shape = tuple(attrs["shape"])
    if math.prod(shape) != math.prod(ins[0].shape):
        raise SignatureError(f"reshape {list(ins[0].shape)} -> {list(shape)} changes the element count")
    return ins[0].with_shape(shape)


def _grad_reshape(b, y, dy, ins):
    return [(0, b.reshape(dy, ins[0].type.shape))]


def _ref_reshape(op, args, arg_types, graph, dtype):
    has_rows = op.type.is_rows or op.type.domain is Domain.WEIGHT    # per-type weights are [T, *shape]
    return args[0].reshape((args[0].shape[0],) + op.type.shape if has_rows else op.type.shape)


register_op(OpDef(OpKind.RESHAPE, _type_reshape, grad=_grad_reshape, reference=_ref_reshape,
                  lower='fused', element=lambda op, a: ex.reshape(a[0], op.type.shape), doc='change the per-row feature shape'))


# -- concat ------------------------------------------------------------------------------------

def _type_concat(kind, attrs, ins):
    if len(ins) < 2:
        raise SignatureError("concat takes at least 2 inputs")
    dom = _rows_domain(ins, "concat")
    if dom is Domain.GLOBAL or any(t.domain is not dom for t in ins):
        raise SignatureError("concat operands must all be rows of one domain")
    lead = {t.shape[:-1] for t in ins}
    if len(lead) != 1 or any(not t.shape for t in ins):
        raise SignatureError(f"concat: shapes {[list(t.shape) for t in ins]} differ before the last axis")
    return ValueType(dom, ins[0].shape[:-1] + (sum(t.shape[-1] for t in ins),), ins[0].dtype)


def _grad_concat(b, y, dy, ins):
    out, start = [], 0
    for pos, x in enumerate(ins):
        stop = start + x.type.shape[-1]
        out.append((pos, b.make(OpKind.SLICE, [dy], start=start, stop=stop)))
        start = stop
    return out


def _ref_concat(op, args, arg_types, graph, dtype):
    return torch.cat(args, dim=-1)


register_op(OpDef(OpKind.CONCAT, _type_concat, grad=_grad_concat, reference=_ref_concat,
                  lower=None, doc='concatenate along the last feature axis'))


# -- edge_softmax ------------------------------------------------------------------------------

def _type_edge_softmax(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    if ins[0].domain is not Domain.EDGE:
        raise SignatureError(f"edge_softmax needs an edge-wise value, got {ins[0]}")
    return ins[0]


def _grad_edge_softmax(b, y, dy, ins):
    ydy = b.bin(y, dy, "mul")
    s = b.make(OpKind.GATHER, [b.make(OpKind.AGGREGATE, [ydy], reduce="sum", side="dst")], side="dst")
    return [(0, b.bin(y, b.bin(dy, s, "sub"), "mul"))]


def _ref_edge_softmax(op, args, arg_types, graph, dtype):
    return edge_softmax(args[0], graph.dst, graph.num_nodes)


register_op(OpDef(OpKind.EDGE_SOFTMAX, _type_edge_softmax, grad=_grad_edge_softmax, reference=_ref_edge_softmax,
                  lower='edge_softmax', doc="softmax over each destination's incoming edges"))


# -- aggregate ---------------------------------------------------------------------------------

def _type_aggregate(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    if attrs["reduce"] not in REDUCES:
        raise SignatureError(f"aggregate reduce must be one of {REDUCES}, got {attrs['reduce']!r}")
    side = attrs.get("side", "dst")
    if side not in AGGREGATE_SIDES:
        raise SignatureError(f"aggregate side must be one of {sorted(AGGREGATE_SIDES)}, got {side!r}")
    src_dom, dst_dom = AGGREGATE_SIDES[side]
    if ins[0].domain is not src_dom:
        raise SignatureError(f"aggregate ({side}) needs a {src_dom.value}-wise value, got {ins[0]}")
    if {src_dom, dst_dom} & {Domain.COMPACT, Domain.COMPACT_DST}:
        if attrs["reduce"] != "sum":
            raise SignatureError(f"aggregate side {side!r} sums (reduce='sum'), got {attrs['reduce']!r}")
    return ValueType(dst_dom, ins[0].shape, ins[0].dtype)


def _grad_aggregate(b, y, dy, ins):
    side, red = y.attr("side", "dst"), y.attr("reduce")
    if red == "sum" and side in ("compact", "dcompact"):
        return [(0, b.make(OpKind.EXPAND_COMPACT, [dy]))]
    if red == "sum":
        return [(0, b.make(OpKind.GATHER, [dy], side=side))]
    if red == "mean" and side == "dst":
        inv = b.make(OpKind.GRAPH_DATA, [], what="inv_in_degree", dtype=dy.type.dtype)
        return [(0, b.make(OpKind.GATHER, [b.bin(dy, inv, "mul")], side="dst"))]
    raise GradientError(f"no gradient rule for aggregate reduce={red!r} side={side!r} "
                        "(max aggregation is forward-only for now)")


def _ref_aggregate(op, args, arg_types, graph, dtype):
    side = op.attr("side", "dst")
    if side in ("compact", "dcompact"):
        c = graph.compact() if side == "compact" else graph.compact_dst()
        return aggregate(args[0], c.edge_to_compact, c.num_rows, "sum")
    index = {"src": graph.src, "dst": graph.dst}.get(side)
    if side == "compact_src":
        index = graph.compact().src
    if side == "compact_dst":
        index = graph.compact_dst().src
    return aggregate(args[0], index, graph.num_nodes, op.attr("reduce"))


register_op(OpDef(OpKind.AGGREGATE, _type_aggregate, grad=_grad_aggregate, reference=_ref_aggregate,
                  lower='aggregate', doc='edge rows -> node rows (sum | mean | max); edges -> compact rows, compact rows -> nodes (sum)'))


# -- weight_grad -------------------------------------------------------------------------------

def _type_weight_grad(kind, attrs, ins):
    what = kind.value
    _need(2, ins, what)
    x, dy = ins
    per, wshape = attrs["per"], tuple(attrs["wshape"])
    per_type_rows = x.domain is Domain.WEIGHT and per is None    # a linear on per-type rows
    if x.domain is not dy.domain or x.per is not dy.per or not (x.is_rows or per_type_rows):
        raise SignatureError(f"weight_grad needs x and dy on the same rows, got {x} and {dy}")
    if len(wshape) == 2 and (x.shape[-1:] != wshape[:1] or dy.shape[-1:] != wshape[1:] or x.shape[:-1] != dy.shape[:-1]):
        raise SignatureError(f"weight_grad: x {list(x.shape)} and dy {list(dy.shape)} do not give a {list(wshape)} weight")
    if len(wshape) == 3 and (x.shape != (wshape[0], wshape[1]) or dy.shape != (wshape[0], wshape[2])):
        raise SignatureError(f"weight_grad: x {list(x.shape)} and dy {list(dy.shape)} do not give a {list(wshape)} weight")
    if len(wshape) not in (2, 3):
        raise SignatureError(f"weight_grad: weight shape {list(wshape)} must be [K, N] or [H, K, N]")
    return _per_type_result(x, per, wshape, what)


def _ref_weight_grad(op, args, arg_types, graph, dtype):
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
    return type_sum(outer, graph, arg_types[0].domain, per)


register_op(OpDef(OpKind.WEIGHT_GRAD, _type_weight_grad, grad=None, reference=_ref_weight_grad,
                  lower='gemm', doc='per type: sum of outer(x, dy) over its rows'))


# -- type_reduce -------------------------------------------------------------------------------

def _type_type_reduce(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    if not ins[0].is_rows:
        raise SignatureError(f"type_reduce needs rows, got {ins[0]}")
    return _per_type_result(ins[0], attrs["per"], ins[0].shape, what)


def _ref_type_reduce(op, args, arg_types, graph, dtype):
    return type_sum(args[0], graph, arg_types[0].domain, op.attr("per"))


register_op(OpDef(OpKind.TYPE_REDUCE, _type_type_reduce, grad=None, reference=_ref_type_reduce,
                  lower='type_reduce', doc='rows -> per-type sums (or one global sum)'))


# -- sum_to ------------------------------------------------------------------------------------

def _type_sum_to(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    a, s = ins[0].shape, tuple(attrs["shape"])
    if len(s) > len(a) or any(x not in (y, 1) for x, y in zip(s, a)):
        raise SignatureError(f"sum_to: {list(a)} cannot be summed to {list(s)}")
    return ins[0].with_shape(s)


def _ref_sum_to(op, args, arg_types, graph, dtype):
    return sum_to(args[0], tuple(op.attr("shape")))


register_op(OpDef(OpKind.SUM_TO, _type_sum_to, grad=None, reference=_ref_sum_to,
                  lower='fused', element=lambda op, a: ex.sum_to(a[0], op.type.shape), doc='sum broadcast axes back to a smaller shape'))


# -- slice -------------------------------------------------------------------------------------

def _type_slice(kind, attrs, ins):
    what = kind.value
    _need(1, ins, what)
    a, lo, hi = ins[0].shape, attrs["start"], attrs["stop"]
    if not a or not 0 <= lo < hi <= a[-1]:
        raise SignatureError(f"slice [{lo}:{hi}] out of range for last axis of {list(a)}")
    return ins[0].with_shape(a[:-1] + (hi - lo,))


def _ref_slice(op, args, arg_types, graph, dtype):
    return args[0][..., op.attr("start"):op.attr("stop")]


register_op(OpDef(OpKind.SLICE, _type_slice, grad=None, reference=_ref_slice,
                  lower=None, doc='a range of the last feature axis'))


# -- type_gather / type_scatter (weights shared across types through a type -> group map) -------

def _type_type_gather(kind, attrs, ins):
    _need(1, ins, kind.value)
    w, index = ins[0], attrs["index"]
    if w.domain is not Domain.GLOBAL or len(w.shape) < 2:
        raise SignatureError(f"type_gather reads a [groups, ...] weight, got {w}")
    if not index or not all(isinstance(i, int) and 0 <= i < w.shape[0] for i in index):
        raise SignatureError(f"type_gather: the type -> group map must hold group ids in [0, {w.shape[0]}), "
                             f"got {list(index)[:8]}")
    return ValueType(Domain.WEIGHT, w.shape[1:], w.dtype, attrs["per"])


def _grad_type_gather(b, y, dy, ins):
    return [(0, b.make(OpKind.TYPE_SCATTER, [dy], index=y.attr("index"), groups=ins[0].type.shape[0]))]


def _group_index(op, graph, device) -> torch.Tensor:
    index = op.attr("index")
    per = op.attr("per") if op.kind is OpKind.TYPE_GATHER else None
    n = (graph.num_etypes if per is TypeAxis.ETYPE else graph.num_ntypes) if per is not None else None
    if n is not None and len(index) != n:
        raise SignatureError(f"the type -> group map has {len(index)} entries but the graph has {n} "
                             f"{per.value}s")
    return torch.tensor(index, dtype=torch.long, device=device)


def _ref_type_gather(op, args, arg_types, graph, dtype):
    return args[0][_group_index(op, graph, args[0].device)]


register_op(OpDef(OpKind.TYPE_GATHER, _type_type_gather, grad=_grad_type_gather, reference=_ref_type_gather,
                  lower='host_index', doc='shared weights: group rows -> per-type rows through a type -> group map'))


def _type_type_scatter(kind, attrs, ins):
    _need(1, ins, kind.value)
    w = ins[0]
    if w.domain is not Domain.WEIGHT or len(attrs["index"]) == 0:
        raise SignatureError(f"type_scatter sums per-type rows into groups, got {w}")
    return ValueType(Domain.GLOBAL, (attrs["groups"],) + w.shape, w.dtype)


def _grad_type_scatter(b, y, dy, ins):
    return [(0, b.make(OpKind.TYPE_GATHER, [dy], index=y.attr("index"), per=ins[0].type.per))]


def _ref_type_scatter(op, args, arg_types, graph, dtype):
    x = args[0]
    idx = torch.tensor(op.attr("index"), dtype=torch.long, device=x.device)
    return x.new_zeros((op.attr("groups"),) + tuple(x.shape[1:])).index_add(0, idx, x)


register_op(OpDef(OpKind.TYPE_SCATTER, _type_type_scatter, grad=_grad_type_scatter, reference=_ref_type_scatter,
                  lower='host_index', doc='per-type rows summed into their groups (the gradient of type_gather)'))
