"""Op kinds of the inter-operator IR, the frozen ``Op`` node, and the type rule of every kind.

``infer_type`` is the single source of truth for op signatures: the DSL calls it to build ops,
the verifier calls it again after every pass and compares.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from .fns import FnError, get_fn
from .types import Domain, TypeAxis, ValueType, dtype_class


class OpKind(enum.Enum):
    INPUT = "input"                 # a tensor the caller passes (node or edge features)
    PARAM = "param"                 # a learned weight, per type or global
    GRAPH_DATA = "graph_data"       # a value derived from the graph structure alone (e.g. 1/degree)
    GATHER = "gather"               # node value -> edge (src|dst) or compact (compact_src) rows
    EXPAND_COMPACT = "expand_compact"   # compact rows -> edge rows (edge -> its (src, etype) row)
    TYPE_INDEX = "type_index"       # per-type weight W -> rows, W[type of row]
    TYPED_LINEAR = "typed_linear"   # x @ W[type of row] (or x @ W for a global W)
    UNARY = "unary"                 # elementwise fn(x[, c])
    BINARY = "binary"               # elementwise fn(a, b) with left-aligned broadcasting
    DOT = "dot"                     # inner product over the last feature axis
    RESHAPE = "reshape"             # change the per-row feature shape
    CONCAT = "concat"               # concatenate along the last feature axis
    EDGE_SOFTMAX = "edge_softmax"   # softmax over the incoming edges of each destination
    AGGREGATE = "aggregate"         # edge rows -> node rows by destination (or source) (sum | mean | max)
    # kinds that backward graphs use (the DSL exposes them only through autodiff)
    WEIGHT_GRAD = "weight_grad"     # per type: sum over its rows of outer(x, dy) -> per-type weight
    TYPE_REDUCE = "type_reduce"     # rows -> per-type sums (or one global sum)
    SUM_TO = "sum_to"               # sum broadcast feature axes back to a smaller shape
    SLICE = "slice"                 # a range of the last feature axis


REDUCES = ("sum", "mean", "max")
GRAPH_DATA = {
    "inv_in_degree_by_etype": Domain.EDGE,   # 1 / #(edges with this edge's (dst, etype)), per edge
    "inv_in_degree": Domain.NODE,            # 1 / in-degree (0 where the degree is 0), per node
}
AGGREGATE_SIDES = ("dst", "src")
GATHER_SIDES = {"src": (Domain.NODE, Domain.EDGE), "dst": (Domain.NODE, Domain.EDGE),
                "compact_src": (Domain.NODE, Domain.COMPACT)}
INITS = ("glorot", "zeros", "ones", "normal")


@dataclass(frozen=True)
class SourceLoc:
    file: str
    line: int
    func: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Op:
    """One IR node. ``inputs`` are the keys of the input ops; ``attrs`` a sorted tuple of pairs."""
    kind: OpKind
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]
    type: ValueType
    loc: SourceLoc | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if list(self.attrs) != sorted(self.attrs, key=lambda kv: kv[0]):
            object.__setattr__(self, "attrs", tuple(sorted(self.attrs, key=lambda kv: kv[0])))
        for _, v in self.attrs:
            hash(v)  # attributes must be hashable so that keys are structural

    def attr(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def key(self) -> str:
        """sha256 of kind, attributes, type and input keys: equal keys mean the same computation."""
        cached = self.__dict__.get("_key")
        if cached is None:
            text = repr((self.kind.value, self.attrs, str(self.type), self.type.per, self.inputs))
            cached = hashlib.sha256(text.encode()).hexdigest()
            object.__setattr__(self, "_key", cached)
        return cached


class SignatureError(ValueError):
    """An op's inputs or attributes do not fit its kind."""


def _broadcast(a: tuple[int, ...], b: tuple[int, ...], what: str) -> tuple[int, ...]:
    """Left-aligned broadcasting: the shorter shape gets trailing 1s (a per-head scalar [H]
    times a per-head vector [H, D] multiplies each head's vector)."""
    n = max(len(a), len(b))
    a2, b2 = a + (1,) * (n - len(a)), b + (1,) * (n - len(b))
    out = []
    for i, (x, y) in enumerate(zip(a2, b2)):
        if x != y and 1 not in (x, y):
            raise SignatureError(f"{what}: feature shapes {list(a)} and {list(b)} do not broadcast (axis {i})")
        out.append(max(x, y))
    # trailing 1s that only came from padding are dropped again so [H] * [] stays [H]
    while len(out) > max(len(a), len(b)):
        out.pop()
    return tuple(out)


def _rows_domain(types: list[ValueType], what: str) -> Domain:
    doms = {t.domain for t in types if t.domain is not Domain.GLOBAL}
    if not doms:
        return Domain.GLOBAL
    if len(doms) > 1 or Domain.WEIGHT in doms:
        names = sorted(d.value for d in doms)
        raise SignatureError(f"{what}: operands live on different domains {names}; "
                             "gather node values to edges with g.src(x)/g.dst(x) first")
    return doms.pop()


def _fn(name: str, arity: int):
    try:
        return get_fn(name, arity)
    except FnError as e:
        raise SignatureError(str(e)) from None


def _need(n: int, ins: list[ValueType], what: str) -> None:
    if len(ins) != n:
        raise SignatureError(f"{what} takes {n} input(s), got {len(ins)}")


def infer_type(kind: OpKind, attrs: dict[str, Any], ins: list[ValueType]) -> ValueType:
    """Result type of an op, or SignatureError naming what is wrong."""
    what = kind.value
    if kind in (OpKind.INPUT, OpKind.PARAM):
        raise SignatureError(f"{what} ops carry their type; nothing to infer")
    if kind is OpKind.GRAPH_DATA:
        _need(0, ins, what)
        if attrs["what"] not in GRAPH_DATA:
            raise SignatureError(f"unknown graph data {attrs['what']!r}; known: {sorted(GRAPH_DATA)}")
        return ValueType(GRAPH_DATA[attrs["what"]], (), attrs.get("dtype", "float32"))
    if kind is OpKind.GATHER:
        _need(1, ins, what)
        side = attrs["side"]
        if side not in GATHER_SIDES:
            raise SignatureError(f"gather side must be one of {sorted(GATHER_SIDES)}, got {side!r}")
        src_dom, dst_dom = GATHER_SIDES[side]
        if ins[0].domain is not src_dom:
            raise SignatureError(f"gather {side} needs a {src_dom.value}-wise value, got {ins[0]}")
        return ValueType(dst_dom, ins[0].shape, ins[0].dtype)
    if kind is OpKind.EXPAND_COMPACT:
        _need(1, ins, what)
        if ins[0].domain is not Domain.COMPACT:
            raise SignatureError(f"expand_compact needs a compact value, got {ins[0]}")
        return ValueType(Domain.EDGE, ins[0].shape, ins[0].dtype)
    if kind is OpKind.TYPE_INDEX:
        _need(1, ins, what)
        w, dom = ins[0], attrs["domain"]
        if w.domain is not Domain.WEIGHT:
            raise SignatureError(f"only per-type weights can be indexed by a type, got {w}")
        ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT), TypeAxis.NTYPE: (Domain.NODE,)}[w.per]
        if dom not in ok:
            raise SignatureError(f"a weight per {w.per.value} can be indexed on "
                                 f"{[d.value for d in ok]} rows, not {dom.value}")
        return ValueType(dom, w.shape, w.dtype)
    if kind is OpKind.TYPED_LINEAR:
        _need(2, ins, what)
        x, w = ins
        if not x.is_rows:
            raise SignatureError(f"typed_linear input must be node/edge/compact rows, got {x}")
        if w.domain is Domain.WEIGHT:
            ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT), TypeAxis.NTYPE: (Domain.NODE,)}[w.per]
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
            return ValueType(x.domain, x.shape[:-1] + (n,), x.dtype)
        if len(wshape) == 3:
            h, k, n = wshape
            if x.shape != (h, k):
                raise SignatureError(f"per-head typed_linear: W is [heads={h}, {k}, {n}] so x must be "
                                     f"[{h}, {k}], got {list(x.shape)}")
            return ValueType(x.domain, (h, n), x.dtype)
        raise SignatureError(f"typed_linear weight must be [K, N] or [heads, K, N] per type, got {list(w.shape)}")
    if kind is OpKind.UNARY:
        _need(1, ins, what)
        fn = _fn(attrs["fn"], 1)
        if fn.takes_const != ("c" in attrs and attrs["c"] is not None):
            raise SignatureError(f"unary {fn.name} {'needs' if fn.takes_const else 'takes no'} constant")
        if dtype_class(ins[0].dtype) not in fn.operands:
            raise SignatureError(f"unary {fn.name}: operand dtype {ins[0].dtype} is not one of {list(fn.operands)}")
        return ins[0] if fn.result is None else ValueType(ins[0].domain, ins[0].shape, fn.result, ins[0].per)
    if kind is OpKind.BINARY:
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
    if kind is OpKind.DOT:
        _need(2, ins, what)
        a, b = ins
        if not a.shape or not b.shape or a.shape[-1] != b.shape[-1]:
            raise SignatureError(f"dot: last axes differ: {list(a.shape)} vs {list(b.shape)}")
        dom = _rows_domain([a, b], "dot")
        return ValueType(dom, _broadcast(a.shape[:-1], b.shape[:-1], "dot"), a.dtype)
    if kind is OpKind.RESHAPE:
        _need(1, ins, what)
        shape = tuple(attrs["shape"])
        if math.prod(shape) != math.prod(ins[0].shape):
            raise SignatureError(f"reshape {list(ins[0].shape)} -> {list(shape)} changes the element count")
        return ins[0].with_shape(shape)
    if kind is OpKind.CONCAT:
        if len(ins) < 2:
            raise SignatureError("concat takes at least 2 inputs")
        dom = _rows_domain(ins, "concat")
        if dom is Domain.GLOBAL or any(t.domain is not dom for t in ins):
            raise SignatureError("concat operands must all be rows of one domain")
        lead = {t.shape[:-1] for t in ins}
        if len(lead) != 1 or any(not t.shape for t in ins):
            raise SignatureError(f"concat: shapes {[list(t.shape) for t in ins]} differ before the last axis")
        return ValueType(dom, ins[0].shape[:-1] + (sum(t.shape[-1] for t in ins),), ins[0].dtype)
    if kind is OpKind.EDGE_SOFTMAX:
        _need(1, ins, what)
        if ins[0].domain is not Domain.EDGE:
            raise SignatureError(f"edge_softmax needs an edge-wise value, got {ins[0]}")
        return ins[0]
    if kind is OpKind.AGGREGATE:
        _need(1, ins, what)
        if attrs["reduce"] not in REDUCES:
            raise SignatureError(f"aggregate reduce must be one of {REDUCES}, got {attrs['reduce']!r}")
        if attrs.get("side", "dst") not in AGGREGATE_SIDES:
            raise SignatureError(f"aggregate side must be one of {AGGREGATE_SIDES}, got {attrs.get('side')!r}")
        if ins[0].domain is not Domain.EDGE:
            raise SignatureError(f"aggregate needs an edge-wise value, got {ins[0]}")
        return ValueType(Domain.NODE, ins[0].shape, ins[0].dtype)
    if kind is OpKind.WEIGHT_GRAD:
        _need(2, ins, what)
        x, dy = ins
        per, wshape = attrs["per"], tuple(attrs["wshape"])
        if x.domain is not dy.domain or not x.is_rows:
            raise SignatureError(f"weight_grad needs x and dy on the same rows, got {x} and {dy}")
        if len(wshape) == 2 and (x.shape[-1:] != wshape[:1] or dy.shape[-1:] != wshape[1:] or x.shape[:-1] != dy.shape[:-1]):
            raise SignatureError(f"weight_grad: x {list(x.shape)} and dy {list(dy.shape)} do not give a {list(wshape)} weight")
        if len(wshape) == 3 and (x.shape != (wshape[0], wshape[1]) or dy.shape != (wshape[0], wshape[2])):
            raise SignatureError(f"weight_grad: x {list(x.shape)} and dy {list(dy.shape)} do not give a {list(wshape)} weight")
        if len(wshape) not in (2, 3):
            raise SignatureError(f"weight_grad: weight shape {list(wshape)} must be [K, N] or [H, K, N]")
        return _per_type_result(x, per, wshape, what)
    if kind is OpKind.TYPE_REDUCE:
        _need(1, ins, what)
        if not ins[0].is_rows:
            raise SignatureError(f"type_reduce needs rows, got {ins[0]}")
        return _per_type_result(ins[0], attrs["per"], ins[0].shape, what)
    if kind is OpKind.SUM_TO:
        _need(1, ins, what)
        a, s = ins[0].shape, tuple(attrs["shape"])
        if len(s) > len(a) or any(x not in (y, 1) for x, y in zip(s, a)):
            raise SignatureError(f"sum_to: {list(a)} cannot be summed to {list(s)}")
        return ins[0].with_shape(s)
    if kind is OpKind.SLICE:
        _need(1, ins, what)
        a, lo, hi = ins[0].shape, attrs["start"], attrs["stop"]
        if not a or not 0 <= lo < hi <= a[-1]:
            raise SignatureError(f"slice [{lo}:{hi}] out of range for last axis of {list(a)}")
        return ins[0].with_shape(a[:-1] + (hi - lo,))
    raise SignatureError(f"no type rule for {kind}")  # pragma: no cover


def _per_type_result(x: ValueType, per, shape, what: str) -> ValueType:
    if per is None:
        return ValueType(Domain.GLOBAL, tuple(shape), x.dtype)
    ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT), TypeAxis.NTYPE: (Domain.NODE,)}[per]
    if x.domain not in ok:
        raise SignatureError(f"{what}: rows of {x.domain.value} have no {per.value}")
    return ValueType(Domain.WEIGHT, tuple(shape), x.dtype, per)


def make_op(kind: OpKind, inputs: list[Op], loc: SourceLoc | None = None, **attrs) -> Op:
    """Build an op from input ops, inferring its type."""
    t = infer_type(kind, attrs, [i.type for i in inputs])
    return Op(kind, tuple(i.key for i in inputs), tuple(sorted(attrs.items())), t, loc)
