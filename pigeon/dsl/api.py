"""The functions a spec calls. Each builds one IR op; none computes anything."""
from __future__ import annotations

from ..ir.ops import INITS, OpKind
from ..ir.types import Domain, TypeAxis, ValueType
from .trace import SpecError, caller_loc, current
from .values import Graph, TypeSelector, Value, unary


def _val(x, what: str) -> Value:
    if not isinstance(x, Value):
        raise SpecError(f"{what} expects a pigeon value, got {type(x).__name__}", caller_loc())
    return x


def weight(name: str, shape, per: TypeSelector | None = None, init: str = "glorot",
           dtype: str | None = None, groups=None) -> Value:
    """Declare a learned weight: one block of ``shape`` per type of ``per`` (g.etype / g.ntype),
    or a single tensor when ``per`` is None; ``dtype`` defaults to the trace's dtype.

    ``groups`` (with ``per``): a type -> group map (one int per type) for weights shared across
    types: the parameter holds one block per group (``[G, *shape]``, G = max(groups) + 1) and
    type t uses block ``groups[t]``; gradients sum over the types of a group."""
    dtype = dtype or current().dtype
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not all(isinstance(s, int) and s > 0 for s in shape):
        raise SpecError(f"weight {name!r}: shape must be positive ints, got {shape}", caller_loc())
    if init not in INITS:
        raise SpecError(f"weight {name!r}: init must be one of {INITS}, got {init!r}", caller_loc())
    if per is not None and not isinstance(per, TypeSelector):
        raise SpecError(f"weight {name!r}: per= must be g.etype, g.ntype or None, got {per!r}", caller_loc())
    if groups is not None:
        if per is None:
            raise SpecError(f"weight {name!r}: groups= maps types to shared blocks; it needs per=g.etype or g.ntype",
                            caller_loc())
        try:
            index = tuple(int(i) for i in groups)
        except (TypeError, ValueError):
            raise SpecError(f"weight {name!r}: groups= must be a sequence of ints (one group per type), "
                            f"got {groups!r}", caller_loc()) from None
        if not index or min(index) < 0 or any(int(i) != i for i in groups):
            raise SpecError(f"weight {name!r}: groups= must hold non-negative group ids, got {list(groups)[:8]}",
                            caller_loc())
        G = max(index) + 1
        shared = current().leaf(OpKind.PARAM, name, ValueType(Domain.GLOBAL, (G,) + shape, dtype), init=init)
        return Value(current().emit(OpKind.TYPE_GATHER, [shared], index=index, per=per.axis))
    vt = (ValueType(Domain.WEIGHT, shape, dtype, per.axis) if per is not None
          else ValueType(Domain.GLOBAL, shape, dtype))
    return Value(current().leaf(OpKind.PARAM, name, vt, init=init))


def typed_linear(x: Value, W: Value, by: TypeSelector | None = None) -> Value:
    """``x @ W[type of row]`` for a per-type W (``by`` must name W's type), or ``x @ W``."""
    x, W = _val(x, "typed_linear"), _val(W, "typed_linear")
    if W.domain is Domain.WEIGHT:
        if by is not None and by.axis is not W.op.type.per:
            raise SpecError(f"typed_linear: W is per {W.op.type.per.value} but by={by}", caller_loc())
    elif by is not None:
        raise SpecError(f"typed_linear: by={by} needs a per-type weight; W is {W.op.type}", caller_loc())
    return Value(current().emit(OpKind.TYPED_LINEAR, [x.op, W.op]))


def linear(x: Value, W: Value) -> Value:
    """``x @ W`` with one weight for every row."""
    if _val(W, "linear").domain is not Domain.GLOBAL:
        raise SpecError("linear takes an untyped weight; use typed_linear for per-type weights", caller_loc())
    return typed_linear(x, W)


def dot(a: Value, b: Value) -> Value:
    """Inner product over the last axis (per head when values are [heads, d])."""
    return Value(current().emit(OpKind.DOT, [_val(a, "dot").op, _val(b, "dot").op]))


def concat(*xs: Value) -> Value:
    return Value(current().emit(OpKind.CONCAT, [_val(x, "concat").op for x in xs]))


def relu(x): return unary(x, "relu")
def sigmoid(x): return unary(x, "sigmoid")
def tanh(x): return unary(x, "tanh")
def exp(x): return unary(x, "exp")
def gelu(x): return unary(x, "gelu")
def elu(x): return unary(x, "elu")
def leaky_relu(x, negative_slope: float = 0.01): return unary(x, "leaky_relu", negative_slope)


def edge_softmax(g: Graph, score: Value) -> Value:
    """Softmax of an edge-wise score over the incoming edges of each destination node."""
    _graph(g, "edge_softmax")
    return Value(current().emit(OpKind.EDGE_SOFTMAX, [_val(score, "edge_softmax").op]))


def aggregate(g: Graph, msg: Value, reduce: str = "sum") -> Value:
    """Reduce edge-wise messages into their destination nodes (sum, mean or max; 0 where no edge)."""
    _graph(g, "aggregate")
    return Value(current().emit(OpKind.AGGREGATE, [_val(msg, "aggregate").op], reduce=reduce))


def _graph(g, what: str) -> None:
    if not isinstance(g, Graph):
        raise SpecError(f"{what}: the first argument must be the spec's graph handle g", caller_loc())
