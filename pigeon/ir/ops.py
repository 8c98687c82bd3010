"""Op kinds of the inter-operator IR, the frozen ``Op`` node, and the type rule of every kind.

``infer_type`` is the single source of truth for op signatures: the DSL calls it to build ops,
the verifier calls it again after every pass and compares.
"""
from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from .fns import FnError, get_fn
from .registry import op_def
from .types import Domain, TypeAxis, ValueType


class OpKind(enum.Enum):
    INPUT = "input"                 # a tensor the caller passes (node or edge features)
    PARAM = "param"                 # a learned weight, per type or global
    GRAPH_DATA = "graph_data"       # a value derived from the graph structure alone (e.g. 1/degree)
    GATHER = "gather"               # node value -> edge (src|dst) or compact (compact_src) rows
    EXPAND_COMPACT = "expand_compact"   # compact rows -> edge rows (edge -> its (src|dst, etype) row)
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
    TYPE_GATHER = "type_gather"     # shared weights: groups [G, *s] -> per-type [*s], type t reads group index[t]
    TYPE_SCATTER = "type_scatter"   # its gradient: per-type [*s] -> groups [G, *s], summed by index


REDUCES = ("sum", "mean", "max")
GRAPH_DATA = {
    "inv_in_degree_by_etype": Domain.EDGE,   # 1 / #(edges with this edge's (dst, etype)), per edge
    "inv_in_degree": Domain.NODE,            # 1 / in-degree (0 where the degree is 0), per node
}
# side -> (input rows, output rows): dst/src sum edges into their destination/source node;
# compact sums edges into their (src, etype) compact row; compact_src sums compact rows into
# their source node (the gradients of expand_compact and of the compact_src gather)
# (compact_dst rows: the same on the destination side: dcompact sums edges into their (dst, etype)
# pair, compact_dst sums pairs into their destination node)
AGGREGATE_SIDES = {"dst": (Domain.EDGE, Domain.NODE), "src": (Domain.EDGE, Domain.NODE),
                   "compact": (Domain.EDGE, Domain.COMPACT), "compact_src": (Domain.COMPACT, Domain.NODE),
                   "dcompact": (Domain.EDGE, Domain.COMPACT_DST), "compact_dst": (Domain.COMPACT_DST, Domain.NODE)}
GATHER_SIDES = {"src": (Domain.NODE, Domain.EDGE), "dst": (Domain.NODE, Domain.EDGE),
                "compact_src": (Domain.NODE, Domain.COMPACT), "compact_dst": (Domain.NODE, Domain.COMPACT_DST)}
# the compact domains: what expand_compact reads, and the aggregate side of its gradient
EXPAND_GRAD_SIDE = {Domain.COMPACT: "compact", Domain.COMPACT_DST: "dcompact"}
INITS = ("glorot", "zeros", "ones", "normal")


@dataclass(frozen=True)
class SourceLoc:
    file: str
    line: int
    func: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"     # the path as the spec was imported (as the user gave it)


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
    """Result type of an op, or SignatureError naming what is wrong: the kind's type rule in the
    op registry (pigeon/opset.py)."""
    try:
        d = op_def(kind)
    except LookupError as e:
        raise SignatureError(str(e)) from None
    return d.type_rule(kind, attrs, ins)


def _per_type_result(x: ValueType, per, shape, what: str) -> ValueType:
    if per is None:
        return ValueType(Domain.GLOBAL, tuple(shape), x.dtype)
    ok = {TypeAxis.ETYPE: (Domain.EDGE, Domain.COMPACT, Domain.COMPACT_DST), TypeAxis.NTYPE: (Domain.NODE,)}[per]
    if x.domain not in ok:
        raise SignatureError(f"{what}: rows of {x.domain.value} have no {per.value}")
    return ValueType(Domain.WEIGHT, tuple(shape), x.dtype, per)


def make_op(kind: OpKind, inputs: list[Op], loc: SourceLoc | None = None, **attrs) -> Op:
    """Build an op from input ops, inferring its type."""
    t = infer_type(kind, attrs, [i.type for i in inputs])
    return Op(kind, tuple(i.key for i in inputs), tuple(sorted(attrs.items())), t, loc)
