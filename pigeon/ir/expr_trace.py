"""Tracing plain Python functions of scalars into the expression IR (pigeon/ir/expr.py).

A ``Sym`` wraps an ``Expr``; Python arithmetic, comparisons and the helpers here build new
expressions, so a function called once on ``Sym`` arguments returns its expression DAG.  Users:
attention score and mask modifiers (pigeon/attention/mods.py) and GEMM epilogues
(pigeon/gemm.py).  Nothing is evaluated at trace time, so a function that branches on a traced
value is refused with a one-line error naming its line: use ``where`` instead.

Arithmetic: ``+ - *`` on ints and floats, ``/`` (float), ``//`` and ``%`` (floor division and
modulo, as in Python), comparisons, ``&``, ``|``, ``~`` on bools, unary ``-``, ``abs``.
Helpers: ``where``, ``exp``, ``tanh``, ``sigmoid``, ``relu``, ``gelu``, ``minimum``, ``maximum``,
``cast``.
"""
from __future__ import annotations

import inspect
from numbers import Number

from . import expr as ex
from .expr import Expr
from .types import dtype_class


class TraceError(ValueError):
    """A Python function that cannot be traced into an expression: names its line."""


def _caller_line() -> str:
    for fr in inspect.stack()[2:]:
        if not fr.filename.endswith(("pigeon/ir/expr_trace.py", "pigeon/attention/mods.py")):
            return f"{fr.filename}:{fr.lineno}"
    return "?"


def _lift(v) -> Expr:
    if isinstance(v, Sym):
        return v.e
    if isinstance(v, bool):
        return ex.const(v)
    if isinstance(v, Number):
        return ex.const(int(v) if isinstance(v, int) else float(v))
    raise TraceError(f"{_caller_line()}: cannot use a {type(v).__name__} in a traced function "
                     f"(numbers and traced values only; tensors are not captured yet)")


def _float(e: Expr) -> Expr:
    return e if dtype_class(e.dtype) == "float" else ex.cast(e, "float32")


class Sym:
    """A traced scalar: wraps an ``Expr``; Python operators build new expressions."""
    __slots__ = ("e",)

    def __init__(self, e: Expr):
        self.e = e

    def _bin(self, fn: str, other, reverse: bool = False) -> "Sym":
        a, b = self.e, _lift(other)
        if reverse:
            a, b = b, a
        if fn in ("add", "sub", "mul", "min", "max") and dtype_class(a.dtype) != dtype_class(b.dtype):
            a, b = _float(a), _float(b)          # int with float: the float's arithmetic
        if fn == "div":
            a, b = _float(a), _float(b)
        if fn in ("floordiv", "mod") and (dtype_class(a.dtype) != "int" or dtype_class(b.dtype) != "int"):
            raise TraceError(f"{_caller_line()}: // and % take integers (indices), got {a.dtype} and {b.dtype}")
        if fn in ("bit_and", "bit_or") and (a.dtype != "bool" or b.dtype != "bool"):
            raise TraceError(f"{_caller_line()}: & and | combine masks (bools), got {a.dtype} and {b.dtype}")
        try:
            return Sym(ex.binary(fn, a, b))
        except ex.ExprError as e:
            raise TraceError(f"{_caller_line()}: {e}") from None

    __add__ = lambda s, o: s._bin("add", o)              # noqa: E731
    __radd__ = lambda s, o: s._bin("add", o, True)       # noqa: E731
    __sub__ = lambda s, o: s._bin("sub", o)              # noqa: E731
    __rsub__ = lambda s, o: s._bin("sub", o, True)       # noqa: E731
    __mul__ = lambda s, o: s._bin("mul", o)              # noqa: E731
    __rmul__ = lambda s, o: s._bin("mul", o, True)       # noqa: E731
    __truediv__ = lambda s, o: s._bin("div", o)          # noqa: E731
    __rtruediv__ = lambda s, o: s._bin("div", o, True)   # noqa: E731
    __floordiv__ = lambda s, o: s._bin("floordiv", o)    # noqa: E731
    __rfloordiv__ = lambda s, o: s._bin("floordiv", o, True)   # noqa: E731
    __mod__ = lambda s, o: s._bin("mod", o)              # noqa: E731
    __rmod__ = lambda s, o: s._bin("mod", o, True)       # noqa: E731
    __lt__ = lambda s, o: s._bin("lt", o)                # noqa: E731
    __le__ = lambda s, o: s._bin("le", o)                # noqa: E731
    __gt__ = lambda s, o: s._bin("gt", o)                # noqa: E731
    __ge__ = lambda s, o: s._bin("ge", o)                # noqa: E731
    __and__ = lambda s, o: s._bin("bit_and", o)          # noqa: E731
    __rand__ = lambda s, o: s._bin("bit_and", o, True)   # noqa: E731
    __or__ = lambda s, o: s._bin("bit_or", o)            # noqa: E731
    __ror__ = lambda s, o: s._bin("bit_or", o, True)     # noqa: E731

    def __eq__(self, o):            # noqa: D105 - symbolic equality, like torch tensors
        return self._bin("eq", o)

    def __ne__(self, o):
        return self._bin("ne", o)

    __hash__ = None

    def __neg__(self):
        return Sym(ex.unary("neg", self.e))

    def __abs__(self):
        return Sym(ex.unary("abs", self.e))

    def __invert__(self):
        if self.e.dtype != "bool":
            raise TraceError(f"{_caller_line()}: ~ negates a mask (bool), got {self.e.dtype}")
        return Sym(ex.unary("logical_not", self.e))

    def __bool__(self):
        raise TraceError(f"{_caller_line()}: a traced function cannot branch on a traced value (if/and/or/not, "
                         f"chained comparisons); use where(cond, a, b) and & | ~")

    def apply(self, fn: str, c: float | None = None) -> "Sym":
        """A unary fn of the fn registry on this value (in float32): what pigeon's activations
        (``pg.gelu``, ``pg.leaky_relu``, ...) do when given a traced value."""
        try:
            return Sym(ex.unary(fn, _float(self.e), c))
        except ex.ExprError as e:
            raise TraceError(f"{_caller_line()}: {e}") from None

    def __repr__(self) -> str:
        return f"Sym({ex.format_expr(self.e).splitlines()[-1]})"


def where(cond, a, b) -> Sym:
    c, x, y = _lift(cond), _lift(a), _lift(b)
    if c.dtype != "bool":
        raise TraceError(f"{_caller_line()}: where's condition must be a comparison or mask, got {c.dtype}")
    if dtype_class(x.dtype) != dtype_class(y.dtype):
        x, y = _float(x), _float(y)
    return Sym(ex.where(c, x, y))


def _unary(fn: str):
    def f(x) -> Sym:
        return Sym(ex.unary(fn, _float(_lift(x))))
    f.__name__ = fn
    f.__doc__ = f"``{fn}(x)`` of a traced value (computed in float32)."
    return f


exp, tanh, sigmoid, relu, gelu = (_unary(n) for n in ("exp", "tanh", "sigmoid", "relu", "gelu"))


def minimum(a, b) -> Sym:
    return Sym(_lift(a))._bin("min", b)


def maximum(a, b) -> Sym:
    return Sym(_lift(a))._bin("max", b)


def cast(x, dtype: str) -> Sym:
    return Sym(ex.cast(_lift(x), dtype))
