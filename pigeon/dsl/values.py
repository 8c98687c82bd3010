"""Symbolic values a spec computes with, and the graph handle ``g`` a spec receives."""
from __future__ import annotations

import math
from numbers import Number

from ..ir.expr_trace import Sym
from ..ir.ops import Op, OpKind
from ..ir.types import Domain, TypeAxis
from .trace import SpecError, caller_loc, current


class TypeSelector:
    """``g.etype`` or ``g.ntype``: says which type indexes a per-type weight."""

    def __init__(self, axis: TypeAxis):
        self.axis = axis

    def __repr__(self) -> str:
        return f"g.{self.axis.value}"


class Value:
    """A symbolic tensor: node-wise, edge-wise, a per-type weight or a global weight."""

    __slots__ = ("op",)

    def __init__(self, op: Op):
        self.op = op

    # -- facts ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Per-row feature shape (for a per-type weight: the shape of one type's block)."""
        return self.op.type.shape

    @property
    def dim(self) -> int:
        if not self.shape:
            raise SpecError("a per-row scalar has no feature dim", caller_loc())
        return self.shape[-1]

    @property
    def domain(self) -> Domain:
        return self.op.type.domain

    def __repr__(self) -> str:
        return f"<pigeon value {self.op.kind.value}: {self.op.type}>"

    def __bool__(self):
        raise SpecError("a traced value has no truth value: Python control flow cannot depend on "
                        "tensor data inside a spec", caller_loc())

    # -- shape ------------------------------------------------------------------------------------
    def reshape(self, *shape: int) -> "Value":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Value(current().emit(OpKind.RESHAPE, [self.op], shape=tuple(int(s) for s in shape)))

    def heads(self, h: int) -> "Value":
        """Split the last axis into ``h`` heads: [.., h*d] -> [.., h, d]."""
        if not isinstance(h, int) or h <= 0 or self.dim % h:
            raise SpecError(f"heads({h}): last axis {self.dim} is not divisible into {h} heads", caller_loc())
        return self.reshape(*self.shape[:-1], h, self.dim // h)

    def flatten(self) -> "Value":
        return self.reshape(math.prod(self.shape)) if len(self.shape) != 1 else self

    # -- indexing a per-type weight by a type ------------------------------------------------
    def __getitem__(self, sel) -> "Value":
        if not isinstance(sel, TypeSelector):
            raise SpecError(f"a weight can only be indexed by g.etype or g.ntype, got {sel!r}", caller_loc())
        if self.domain is not Domain.WEIGHT:
            raise SpecError(f"only per-type weights can be indexed by {sel}; this value is {self.op.type}",
                            caller_loc())
        if self.op.type.per is not sel.axis:
            raise SpecError(f"this weight is per {self.op.type.per.value}, indexed by {sel}", caller_loc())
        dom = Domain.EDGE if sel.axis is TypeAxis.ETYPE else Domain.NODE
        return Value(current().emit(OpKind.TYPE_INDEX, [self.op], domain=dom))

    # -- arithmetic -------------------------------------------------------------------------------
    def _bin(self, other, fn: str, reverse: bool = False) -> "Value":
        if isinstance(other, Number) and not isinstance(other, bool):
            c = _constant(other, fn, reverse)
            if fn == "add":
                return unary(self, "shift", c)
            if fn == "mul":
                return unary(self, "scale", c)
            if fn == "sub":
                return unary(self, "rsub", c) if reverse else unary(self, "shift", -c)
            if fn == "div":
                if reverse:
                    return unary(self, "rdiv", c)
                return unary(self, "scale", _reciprocal(c, other))
        if not isinstance(other, Value):
            raise SpecError(f"cannot combine a pigeon value with {type(other).__name__}", caller_loc())
        a, b = (other, self) if reverse else (self, other)
        return Value(current().emit(OpKind.BINARY, [a.op, b.op], fn=fn))

    def __add__(self, o): return self._bin(o, "add")
    def __radd__(self, o): return self._bin(o, "add", True)
    def __sub__(self, o): return self._bin(o, "sub")
    def __rsub__(self, o): return self._bin(o, "sub", True)
    def __mul__(self, o): return self._bin(o, "mul")
    def __rmul__(self, o): return self._bin(o, "mul", True)
    def __truediv__(self, o): return self._bin(o, "div")
    def __rtruediv__(self, o): return self._bin(o, "div", True)
    def __neg__(self): return unary(self, "neg")


_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_F32_MAX = 3.4028234663852886e38


def _constant(other: Number, fn: str, reverse: bool) -> float:
    """A Python number combined with a value: a finite real constant, else a SpecError."""
    expr = f"{other!r} {_SYMBOL[fn]} value" if reverse else f"value {_SYMBOL[fn]} {other!r}"
    try:
        c = float(other)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(f"{expr}: constants must be real numbers, got {type(other).__name__}",
                        caller_loc()) from None
    if not math.isfinite(c):
        raise SpecError(f"{expr}: constants must be finite, got {c}", caller_loc())
    return c


def _reciprocal(c: float, other: Number) -> float:
    """``1 / c`` for ``value / c``: a SpecError for 0 and for constants so close to 0 that the
    reciprocal is not a finite float32 (a division by zero once the kernels store float32)."""
    if c == 0:
        raise SpecError(f"division by zero: value / {other!r}", caller_loc())
    r = 1.0 / c
    if not abs(r) <= _F32_MAX:
        raise SpecError(f"division by zero: value / {other!r} (a constant this close to 0 has a reciprocal, "
                        f"{r:g}, beyond float32)", caller_loc())
    return r


def unary(x: Value, fn: str, c: float | None = None) -> Value:
    if isinstance(x, Sym):       # a traced scalar (a GEMM epilogue, an attention modifier)
        return x.apply(fn, None if c is None else float(c))
    if not isinstance(x, Value):
        raise SpecError(f"{fn} expects a pigeon value, got {type(x).__name__}", caller_loc())
    if c is not None:
        try:
            c = float(c)
        except (TypeError, ValueError):
            raise SpecError(f"{fn}: the constant must be a real number, got {type(c).__name__}",
                            caller_loc()) from None
        if not math.isfinite(c):
            raise SpecError(f"{fn}: the constant must be finite, got {c}", caller_loc())
    attrs = {"fn": fn} if c is None else {"fn": fn, "c": c}
    return Value(current().emit(OpKind.UNARY, [x.op], **attrs))


class Graph:
    """The graph handle a spec receives as its first argument."""

    etype = TypeSelector(TypeAxis.ETYPE)
    ntype = TypeSelector(TypeAxis.NTYPE)

    def _node(self, x, what: str) -> Op:
        if not isinstance(x, Value) or x.domain is not Domain.NODE:
            raise SpecError(f"g.{what}(x) needs a node-wise value, got "
                            f"{x.op.type if isinstance(x, Value) else type(x).__name__}", caller_loc())
        return x.op

    def src(self, x: Value) -> Value:
        """The value of each edge's source node (edge-wise)."""
        return Value(current().emit(OpKind.GATHER, [self._node(x, "src")], side="src"))

    def dst(self, x: Value) -> Value:
        """The value of each edge's destination node (edge-wise)."""
        return Value(current().emit(OpKind.GATHER, [self._node(x, "dst")], side="dst"))

    def inv_in_degree_by_etype(self) -> Value:
        """Per edge: 1 / number of edges of the same type into the same destination."""
        return Value(current().emit(OpKind.GRAPH_DATA, [], what="inv_in_degree_by_etype", dtype=current().dtype))

    def inv_in_degree(self) -> Value:
        """Per node: 1 / in-degree (0 for nodes without incoming edges)."""
        return Value(current().emit(OpKind.GRAPH_DATA, [], what="inv_in_degree", dtype=current().dtype))

    def __repr__(self) -> str:
        return "<pigeon graph handle>"
