"""Tracing a spec function into inter-operator IR.

A spec is plain Python run once with symbolic values; each DSL call appends one op to the
active ``Tracer``.  Errors in DSL calls are raised as ``SpecError`` with the file and line of
the offending call in the user's spec.
"""
from __future__ import annotations

import inspect
import os
import threading
from typing import Any

from ..ir.ops import Op, OpKind, SignatureError, SourceLoc, make_op
from ..ir.types import ValueType

_PIGEON_INTERNAL = tuple(os.path.join(os.path.dirname(os.path.dirname(__file__)), d) + os.sep
                         for d in ("dsl", "ir"))
_state = threading.local()


class SpecError(ValueError):
    """An error in a user's spec; ``loc`` is the spec line that made it."""

    def __init__(self, message: str, loc: SourceLoc | None = None):
        self.loc = loc
        self.bare_message = message
        super().__init__(f"{loc}: {message}" if loc else message)


def caller_loc() -> SourceLoc | None:
    """The first stack frame outside pigeon's DSL and IR code: the spec line being traced."""
    frame = inspect.currentframe()
    while frame is not None:
        fname = frame.f_code.co_filename
        if not os.path.abspath(fname).startswith(_PIGEON_INTERNAL):
            return SourceLoc(fname, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return None


class Tracer:
    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype          # the dtype of inputs, weights and graph data of this trace
        self.ops: dict[str, Op] = {}
        self.params: dict[str, Op] = {}
        self.inputs: dict[str, Op] = {}

    def add(self, op: Op) -> Op:
        return self.ops.setdefault(op.key, op)

    def emit(self, kind: OpKind, inputs: list[Op], **attrs) -> Op:
        loc = caller_loc()
        try:
            op = make_op(kind, inputs, loc, **attrs)
        except SignatureError as e:
            raise SpecError(str(e), loc) from None
        return self.add(op)

    def leaf(self, kind: OpKind, name: str, vtype: ValueType, loc: SourceLoc | None = None, **attrs) -> Op:
        loc = loc or caller_loc()
        table = self.params if kind is OpKind.PARAM else self.inputs
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(f"{kind.value} name {name!r} must be a Python identifier", loc)
        op = Op(kind, (), tuple(sorted({"name": name, **attrs}.items())), vtype, loc)
        old = table.get(name)
        if old is not None:
            if old.key != op.key:
                raise SpecError(f"{kind.value} {name!r} declared twice with different types "
                                f"({old.type} at {old.loc}, now {vtype})", loc)
            return old
        table[name] = op
        return self.add(op)


def current() -> Tracer:
    t = getattr(_state, "tracer", None)
    if t is None:
        raise SpecError("pigeon DSL calls only work while a spec is being traced "
                        "(inside a @pigeon.layer function called by pigeon.compile / Layer.trace)",
                        caller_loc())
    return t


class tracing:
    """Context manager that makes a fresh tracer current."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype

    def __enter__(self) -> Tracer:
        if getattr(_state, "tracer", None) is not None:
            raise SpecError("nested tracing is not supported")
        _state.tracer = Tracer(self.dtype)
        return _state.tracer

    def __exit__(self, *exc: Any) -> None:
        _state.tracer = None
