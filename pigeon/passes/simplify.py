"""Algebraic simplification: constant scales and shifts fold, double negations and chained
reshapes collapse, negations move into subtractions.  Backward graphs profit most: gradient
rules compose ``neg``/``scale`` freely and leave the folding to this pass."""
from __future__ import annotations

from ..ir.ops import OpKind
from .rewrite import Pat, Rule, var

U, B, R = OpKind.UNARY, OpKind.BINARY, OpKind.RESHAPE


def _scale(m, x, c):
    if c == 1.0:
        return x
    if c == -1.0:
        return m.make(U, [x], fn="neg")
    return m.make(U, [x], fn="scale", c=float(c))


RULES = [
    Rule("scale_one", Pat.of(U, var("x"), fn="scale", c=1.0), lambda m: m["x"]),
    Rule("shift_zero", Pat.of(U, var("x"), fn="shift", c=0.0), lambda m: m["x"]),
    Rule("neg_neg", Pat.of(U, Pat.of(U, var("x"), fn="neg"), fn="neg"), lambda m: m["x"]),
    Rule("scale_scale", Pat.of(U, Pat.of(U, var("x"), fn="scale", name="inner"), fn="scale"),
         lambda m: _scale(m, m["x"], m["inner"].attr("c") * m.op.attr("c"))),
    Rule("neg_scale", Pat.of(U, Pat.of(U, var("x"), fn="scale", name="inner"), fn="neg"),
         lambda m: _scale(m, m["x"], -m["inner"].attr("c"))),
    Rule("scale_neg", Pat.of(U, Pat.of(U, var("x"), fn="neg"), fn="scale"),
         lambda m: _scale(m, m["x"], -m.op.attr("c"))),
    Rule("shift_shift", Pat.of(U, Pat.of(U, var("x"), fn="shift", name="inner"), fn="shift"),
         lambda m: m.make(U, [m["x"]], fn="shift", c=m["inner"].attr("c") + m.op.attr("c"))),
    Rule("sub_neg", Pat.of(B, var("a"), Pat.of(U, var("b"), fn="neg"), fn="sub",
                           where=lambda op: True),
         lambda m: _same(m, m.make(B, [m["a"], m["b"]], fn="add"))),
    Rule("add_neg", Pat.of(B, var("a"), Pat.of(U, var("b"), fn="neg"), fn="add"),
         lambda m: _same(m, m.make(B, [m["a"], m["b"]], fn="sub"))),
    Rule("reshape_same", Pat.of(R, var("x")),
         lambda m: m["x"] if m["x"].type == m.op.type else None),
    Rule("reshape_reshape", Pat.of(R, Pat.of(R, var("x"))),
         lambda m: m.make(R, [m["x"]], shape=tuple(m.op.attr("shape")))),
]


def _same(m, op):
    """A replacement only where it keeps the type (broadcasts may differ in corner cases)."""
    return op if op.type == m.op.type else None
