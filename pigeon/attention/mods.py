"""Score and mask modifiers traced into the expression IR (pigeon/ir/expr.py).

``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are plain Python
functions.  They are called once on symbolic values (``Sym``): ``score`` is the scalar ``var``
the kernel binds, and ``b``, ``h``, ``q_idx``, ``kv_idx`` are the attention index variables
``batch``, ``head``, ``query``, ``key``.  Python arithmetic, comparisons and the helpers below
build an ``Expr`` DAG that the kernel templates inline, and the reference evaluates it with
torch.  Nothing is evaluated in Python at trace time, so a modifier that branches on a traced
value (``if q_idx > kv_idx:``) is refused with a one-line error that names its line: use
``where`` instead.

Arithmetic: ``+ - *`` on ints and floats, ``/`` (float), ``//`` and ``%`` (floor division and
modulo, as in Python), comparisons, ``&``, ``|``, ``~`` on bools (mask composition), unary ``-``,
``abs``.  Helpers: ``where``, ``exp``, ``tanh``, ``sigmoid``, ``minimum``, ``maximum``, ``cast``.
"""
from __future__ import annotations

import inspect
from numbers import Number
from typing import Callable

from ..ir import expr as ex
from ..ir.expr import Expr
from ..ir.types import dtype_class


class ModError(ValueError):
    """A modifier that cannot be traced: names the modifier and its line."""


def _where_is(fn) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _caller_line() -> str:
    for fr in inspect.stack()[2:]:
        if not fr.filename.endswith(("pigeon/attention/mods.py",)):
            return f"{fr.filename}:{fr.lineno}"
    return "?"


def _lift(v) -> Expr:
    if isinstance(v, Sym):
        return v.e
    if isinstance(v, bool):
        return ex.const(v)
    if isinstance(v, Number):
        return ex.const(int(v) if isinstance(v, int) else float(v))
    raise ModError(f"{_caller_line()}: cannot use a {type(v).__name__} in a traced modifier "
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
            raise ModError(f"{_caller_line()}: // and % take integers (indices), got {a.dtype} and {b.dtype}")
        if fn in ("bit_and", "bit_or") and (a.dtype != "bool" or b.dtype != "bool"):
            raise ModError(f"{_caller_line()}: & and | combine masks (bools), got {a.dtype} and {b.dtype}")
        try:
            return Sym(ex.binary(fn, a, b))
        except ex.ExprError as e:
            raise ModError(f"{_caller_line()}: {e}") from None

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
            raise ModError(f"{_caller_line()}: ~ negates a mask (bool), got {self.e.dtype}")
        return Sym(ex.unary("logical_not", self.e))

    def __bool__(self):
        raise ModError(f"{_caller_line()}: a modifier cannot branch on a traced value (if/and/or/not, "
                       f"chained comparisons); use pigeon.attention.where(cond, a, b) and & | ~")

    def __repr__(self) -> str:
        return f"Sym({ex.format_expr(self.e).splitlines()[-1]})"


def where(cond, a, b) -> Sym:
    c, x, y = _lift(cond), _lift(a), _lift(b)
    if c.dtype != "bool":
        raise ModError(f"{_caller_line()}: where's condition must be a comparison or mask, got {c.dtype}")
    if dtype_class(x.dtype) != dtype_class(y.dtype):
        x, y = _float(x), _float(y)
    return Sym(ex.where(c, x, y))


def _unary(fn: str):
    def f(x) -> Sym:
        return Sym(ex.unary(fn, _float(_lift(x))))
    f.__name__ = fn
    f.__doc__ = f"``{fn}(x)`` of a traced value (computed in float32)."
    return f


exp, tanh, sigmoid = _unary("exp"), _unary("tanh"), _unary("sigmoid")


def minimum(a, b) -> Sym:
    return Sym(_lift(a))._bin("min", b)


def maximum(a, b) -> Sym:
    return Sym(_lift(a))._bin("max", b)


def cast(x, dtype: str) -> Sym:
    return Sym(ex.cast(_lift(x), dtype))


# -- tracing -------------------------------------------------------------------------------------

def index_syms() -> tuple[Sym, Sym, Sym, Sym]:
    return tuple(Sym(ex.index(n)) for n in ("batch", "head", "query", "key"))


SCORE = "score"


def trace_score_mod(fn: Callable) -> Expr:
    """The float expression of ``score_mod(score, b, h, q_idx, kv_idx)``."""
    if not callable(fn):
        raise ModError(f"score_mod must be a function (score, b, h, q_idx, kv_idx) -> score, got {fn!r}")
    out = fn(Sym(ex.var(SCORE)), *index_syms())
    e = _lift(out)
    if dtype_class(e.dtype) != "float":
        if e.dtype == "bool":
            raise ModError(f"score_mod {_where_is(fn)} returns a mask (bool): pass it as mask_mod")
        e = _float(e)
    return e


def trace_mask_mod(fn: Callable) -> Expr:
    """The bool expression of ``mask_mod(b, h, q_idx, kv_idx)`` (True: the pair is attended)."""
    if not callable(fn):
        raise ModError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {fn!r}")
    e = _lift(fn(*index_syms()))
    if e.dtype != "bool":
        raise ModError(f"mask_mod {_where_is(fn)} must return a bool (a comparison or a combination of them), "
                       f"got {e.dtype}")
    return e
