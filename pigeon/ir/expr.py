"""The expression IR: one interned node type for element expressions.

Every kernel family evaluates element expressions: traversal bodies, GEMM prologues and
epilogues, attention score/mask modifiers, ShiftAdd primitives.  They are all ``Expr`` nodes:

* interned (hash-consed): building a node equal to an existing one returns that object, so
  equality is identity and hashing is O(1); a DAG with heavy reuse stays a DAG everywhere
  (lowering, rendering, printing and serialization are memoized per node);
* typed: every node has a ``dtype`` (the compute dtype: float storage is computed in float32,
  integer and bool values keep their type) and a per-row feature ``shape``;
* structural: ``digest`` is a sha256 of the node's content and its arguments' digests, stable
  across processes (kernel names and cache keys are derived from it).

Node kinds (``op``) and their attributes:

=========  ===================================================================================
load       ``buffer`` read at ``row`` (a :class:`RowRef`) and the feature index
const      the scalar ``c`` (shape ``()``)
var        a scalar value ``fn`` the kernel binds (the GEMM accumulator ``acc`` in an epilogue, the
           attention ``score`` in a score modifier); ``dtype`` given
index      an index variable ``fn``: ``row`` (the loop row), ``feat<i>`` (feature axis i), or the
           attention indices ``batch``, ``head``, ``query``, ``key`` (shape ``()``, int)
unary      ``fn(x[, c])`` for a unary fn of :mod:`pigeon.ir.fns`
binary     ``fn(a, b)`` for a binary fn (arithmetic, min/max, bitwise, shifts, comparisons),
           with left-aligned broadcasting
where      ``cond ? a : b`` (select), broadcasting like binary
cast       ``args[0]`` converted to ``dtype``
dot        inner product over the last axis of two arguments
sum_to     sum of a broadcast value back to a smaller shape
reshape    the same elements under another shape
=========  ===================================================================================

Rows (``RowRef``) say how a loop row picks a buffer row; see :mod:`pigeon.ir.traversal`.
"""
from __future__ import annotations

import enum
import hashlib
import math
import weakref
from dataclasses import dataclass

from .fns import BOOL, FLOAT, FnError, get_fn
from .types import DTYPES, dtype_class

OPS = ("load", "const", "index", "var", "unary", "binary", "where", "cast", "dot", "sum_to", "reshape")
INDEX_VARS = ("row", "batch", "head", "query", "key")   # plus feat0, feat1, ...


class ExprError(ValueError):
    pass


class RowRef(enum.Enum):
    SELF = "self"
    SRC = "src"
    DST = "dst"
    ETYPE = "etype"
    NTYPE = "ntype"
    COMPACT = "compact"    # edge loop: the edge's (src, etype) compact row (see Domain.COMPACT)
    COMPACT_DST = "compact_dst"    # edge loop: the edge's (dst, etype) row (see Domain.COMPACT_DST)
    NONE = "none"


@dataclass(frozen=True)
class Buffer:
    """A kernel argument: ``rows`` says what indexes its leading axis."""
    name: str                       # C identifier chosen by the lowering, never a user string
    rows: str                       # "node" | "edge" | "compact" | "compact_dst" | "etype" | "ntype" | "global"
    shape: tuple[int, ...]
    dtype: str = "float32"          # storage dtype

    @property
    def width(self) -> int:
        return math.prod(self.shape)


def compute_dtype(storage: str) -> str:
    """The dtype a loaded value is computed in: float storage (bf16, fp16, fp8, fp32, fp64) in
    float32 (kernels accumulate in fp32); integers in int32 unless int64; bool as bool."""
    cls = dtype_class(storage)
    if cls == FLOAT:
        return "float32"
    if cls == BOOL:
        return "bool"
    return "int64" if storage == "int64" else "int32"


def promote(a: str, b: str) -> str:
    """The dtype of a binary op's result over operands of dtypes a and b."""
    if a == b:
        return a
    ca, cb = dtype_class(a), dtype_class(b)
    if FLOAT in (ca, cb):
        return "float64" if "float64" in (a, b) else "float32"
    if ca == BOOL:
        return b
    if cb == BOOL:
        return a
    return "int64" if "int64" in (a, b) else "int32"


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a2, b2 = a + (1,) * (n - len(a)), b + (1,) * (n - len(b))
    out = []
    for x, y in zip(a2, b2):
        if x != y and 1 not in (x, y):
            raise ExprError(f"feature shapes {list(a)} and {list(b)} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


def _const_key(c):
    if c is None:
        return None
    if isinstance(c, bool):
        return ("b", c)
    if isinstance(c, int):
        return ("i", c)
    return ("f", float(c).hex())


class Expr:
    """One interned expression node.  Construct with ``Expr(op, shape, args, fn=, c=, buffer=,
    row=, dtype=)`` or the helpers below; equal constructions return the same object."""
    __slots__ = ("op", "shape", "args", "fn", "c", "buffer", "row", "dtype", "digest", "_hash", "__weakref__")
    _table: "weakref.WeakValueDictionary[tuple, Expr]" = weakref.WeakValueDictionary()

    def __new__(cls, op: str, shape=(), args=(), fn: str = "", c=None, buffer: Buffer | None = None,
                row: RowRef = RowRef.SELF, dtype: str | None = None):
        shape, args = tuple(shape), tuple(args)
        if op not in OPS:
            raise ExprError(f"unknown expression op {op!r}; known: {OPS}")
        for a in args:
            if not isinstance(a, Expr):
                raise ExprError(f"{op}: argument {a!r} is not an Expr")
        if op != "load":
            row = RowRef.SELF
        if dtype is None:
            dtype = _infer_dtype(op, args, fn, c, buffer)
        if dtype not in DTYPES:
            raise ExprError(f"{op}: unknown dtype {dtype!r}")
        key = (op, shape, args, fn, _const_key(c), buffer, row, dtype)
        hit = cls._table.get(key)
        if hit is not None:
            return hit
        self = object.__new__(cls)
        for name, v in (("op", op), ("shape", shape), ("args", args), ("fn", fn), ("c", c),
                        ("buffer", buffer), ("row", row), ("dtype", dtype)):
            object.__setattr__(self, name, v)
        text = repr((op, shape, tuple(a.digest for a in args), fn, _const_key(c), buffer, row.value, dtype))
        object.__setattr__(self, "digest", hashlib.sha256(text.encode()).hexdigest())
        object.__setattr__(self, "_hash", hash(key))
        cls._table[key] = self
        return self

    def __setattr__(self, name, value):
        raise AttributeError("Expr nodes are immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    def __reduce__(self):
        return (Expr, (self.op, self.shape, self.args, self.fn, self.c, self.buffer, self.row, self.dtype))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        # structural and O(1): instance keys are built from reprs
        return f"Expr({self.op}{':' + self.fn if self.fn else ''} {self.dtype}{list(self.shape)} #{self.digest[:16]})"

    def replace(self, **changes) -> "Expr":
        """The node with some fields changed (the dtype is re-inferred unless given, or a cast)."""
        fields = dict(op=self.op, shape=self.shape, args=self.args, fn=self.fn, c=self.c, buffer=self.buffer,
                      row=self.row, dtype=self.dtype if self.op == "cast" else None)
        fields.update(changes)
        return Expr(**fields)

    # -- traversal ------------------------------------------------------------------------
    def toposort(self) -> list["Expr"]:
        """Every node of the DAG once, arguments before users."""
        order, seen, stack = [], set(), [(self, False)]
        while stack:
            e, done = stack.pop()
            if done:
                order.append(e)
                continue
            if e in seen:
                continue
            seen.add(e)
            stack.append((e, True))
            stack.extend((a, False) for a in reversed(e.args) if a not in seen)
        return order

    def buffers(self) -> tuple[Buffer, ...]:
        """Every buffer the expression reads, first use first, without repeats."""
        seen: dict[str, Buffer] = {}
        for e in self.toposort():
            if e.op == "load" and e.buffer.name not in seen:
                seen[e.buffer.name] = e.buffer
        return tuple(seen.values())

    def size(self) -> int:
        return len(self.toposort())


def _infer_dtype(op, args, fn, c, buffer) -> str:
    if op == "load":
        if buffer is None:
            raise ExprError("load without a buffer")
        return compute_dtype(buffer.dtype)
    if op == "const":
        if isinstance(c, bool):
            return "bool"
        return "int32" if isinstance(c, int) else "float32"
    if op == "index":
        return "int32"
    if op == "var":
        return "float32"
    if op in ("unary", "binary"):
        try:
            f = get_fn(fn, 1 if op == "unary" else 2)
        except FnError as e:
            raise ExprError(str(e)) from None
        dts = [a.dtype for a in args]
        for d in dts:
            if dtype_class(d) not in f.operands:
                raise ExprError(f"{op} {fn}: operand dtype {d} is not one of {list(f.operands)}")
        if f.result is not None:
            return f.result
        out = dts[0]
        for d in dts[1:]:
            out = promote(out, d)
        return out
    if op == "where":
        if len(args) != 3 or args[0].dtype != "bool":
            raise ExprError("where takes (bool condition, a, b)")
        return promote(args[1].dtype, args[2].dtype)
    if op == "cast":
        raise ExprError("cast needs an explicit dtype")
    if op == "dot":
        return promote(args[0].dtype, args[1].dtype)
    return args[0].dtype


# -- constructors ------------------------------------------------------------------------------

def load(buffer: Buffer, row: RowRef) -> Expr:
    return Expr("load", buffer.shape, buffer=buffer, row=row)


def const(c, dtype: str | None = None) -> Expr:
    if isinstance(c, float) and not math.isfinite(c) and dtype is None:
        dtype = "float32"
    return Expr("const", (), c=c, dtype=dtype)


def index(name: str, shape: tuple[int, ...] = ()) -> Expr:
    """An index variable: ``row``/``batch``/``head``/``query``/``key`` (shape ``()``), or
    ``feat<i>``, the index along axis i of a value of feature ``shape`` (its value at I is I[i])."""
    if name.startswith("feat") and name[4:].isdigit():
        if int(name[4:]) >= len(shape):
            raise ExprError(f"index {name} needs a feature shape with more than {name[4:]} axes, got {list(shape)}")
        return Expr("index", tuple(shape), fn=name)
    if name not in INDEX_VARS:
        raise ExprError(f"unknown index variable {name!r}; known: {list(INDEX_VARS)} and feat<i>")
    if shape:
        raise ExprError(f"index {name} is a scalar")
    return Expr("index", (), fn=name)


def var(name: str, dtype: str = "float32") -> Expr:
    """A scalar the kernel binds by name (``acc``: a GEMM epilogue's accumulator value)."""
    if not name.isidentifier():
        raise ExprError(f"var name {name!r} must be an identifier")
    return Expr("var", (), fn=name, dtype=dtype)


def unary(fn: str, x: Expr, c=None) -> Expr:
    f = get_fn(fn, 1)
    if f.takes_const != (c is not None):
        raise ExprError(f"unary {fn} {'needs' if f.takes_const else 'takes no'} constant")
    return Expr("unary", x.shape, (x,), fn=fn, c=None if c is None else float(c))


def binary(fn: str, a: Expr, b: Expr) -> Expr:
    get_fn(fn, 2)
    return Expr("binary", _broadcast(a.shape, b.shape), (a, b), fn=fn)


def where(cond: Expr, a: Expr, b: Expr) -> Expr:
    return Expr("where", _broadcast(_broadcast(cond.shape, a.shape), b.shape), (cond, a, b))


def cast(x: Expr, dtype: str) -> Expr:
    return x if x.dtype == dtype else Expr("cast", x.shape, (x,), dtype=dtype)


def dot(a: Expr, b: Expr) -> Expr:
    if not a.shape or not b.shape or a.shape[-1] != b.shape[-1]:
        raise ExprError(f"dot: last axes differ: {list(a.shape)} vs {list(b.shape)}")
    return Expr("dot", _broadcast(a.shape[:-1], b.shape[:-1]), (a, b))


def sum_to(x: Expr, shape: tuple[int, ...]) -> Expr:
    return Expr("sum_to", tuple(shape), (x,))


def reshape(x: Expr, shape: tuple[int, ...]) -> Expr:
    shape = tuple(shape)
    if math.prod(shape) != math.prod(x.shape):
        raise ExprError(f"reshape {list(x.shape)} -> {list(shape)} changes the element count")
    return x if shape == x.shape else Expr("reshape", shape, (x,))


def format_expr(e: Expr) -> str:
    """A readable listing of the DAG: one line per node, shared nodes named once."""
    names: dict[Expr, str] = {}
    lines = []
    for i, n in enumerate(e.toposort()):
        names[n] = f"e{i}"
        if n.op == "load":
            body = f"load {n.buffer.name}[{n.row.value}]"
        elif n.op == "const":
            body = f"const {n.c!r}"
        elif n.op in ("index", "var"):
            body = f"{n.op} {n.fn}"
        else:
            attrs = f" {n.fn}" if n.fn else ""
            attrs += f" c={n.c!r}" if n.c is not None else ""
            body = f"{n.op}{attrs}(" + ", ".join(names[a] for a in n.args) + ")"
        lines.append(f"e{i} = {body} : {n.dtype}{list(n.shape)}")
    return "\n".join(lines)
