"""The op registry: one ``OpDef`` record per op kind (its type rule, gradient rule, reference
semantics, lowering rule and printing), looked up by the IR, autodiff, the reference interpreter,
the lowering and the printer.  The records live in :mod:`pigeon.opset`, registered when
``pigeon`` is imported; this module only holds them, so the IR does not import torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class GradientError(ValueError):
    """An op kind (or an attribute of it) has no gradient rule."""


@dataclass(frozen=True)
class OpDef:
    kind: Any                                   # OpKind
    type_rule: Callable[..., Any]               # (kind, attrs, input types) -> ValueType
    grad: Callable[..., Any] | None = None      # (builder, y, dy, inputs) -> [(position, op)]
    reference: Callable[..., Any] | None = None  # (op, args, arg types, graph, dtype) -> tensor
    lower: str | None = None                    # leaf | fused | gemm | aggregate | edge_softmax | type_reduce | host_index
    element: Callable[..., Any] | None = None   # fused kinds: (op, arg exprs) -> Expr
    fmt: Callable[..., str] | None = None       # (op, arg names) -> text; None: kind(args, attrs)
    doc: str = ""


OP_DEFS: dict[Any, OpDef] = {}


def register_op(d: OpDef, *, replace: bool = False) -> OpDef:
    if d.kind in OP_DEFS and not replace:
        raise ValueError(f"op kind {d.kind} is already registered")
    OP_DEFS[d.kind] = d
    return d


def op_def(kind) -> OpDef:
    d = OP_DEFS.get(kind)
    if d is None:
        if not OP_DEFS:
            raise LookupError("the op registry is empty: import pigeon (pigeon.opset registers the op kinds)")
        raise LookupError(f"op kind {kind} has no registry entry")
    return d
