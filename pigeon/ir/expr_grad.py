"""Forward-mode derivative of a scalar expression with respect to one ``var`` (the attention
backward needs d score_mod / d score).  The local derivatives are the fn registry's gradient
rules (pigeon/ir/fns.py), the same ones autodiff uses, applied to expressions through a small
builder; comparisons, integer and bitwise fns are piecewise constant (derivative 0), ``where``
takes the derivative of the branch it selects."""
from __future__ import annotations

from . import expr as ex
from .expr import Expr
from .fns import get_fn
from .types import dtype_class


class ExprGradError(ValueError):
    pass


class _Builder:
    """The autodiff builder interface over expressions (G.un, G.bin, G.const_like)."""

    @staticmethod
    def un(x, fn, c=None):
        return ex.unary(fn, x, c)

    @staticmethod
    def bin(a, b, fn):
        return ex.binary(fn, a, b)

    @staticmethod
    def const_like(x, c):
        return ex.const(float(c))


def _mul(a: Expr | None, b: Expr) -> Expr | None:
    return None if a is None else ex.binary("mul", a, b)


def _add(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None:
        return b
    return a if b is None else ex.binary("add", a, b)


def derivative(e: Expr, var: str) -> Expr:
    """d e / d var(``var``) as an expression (the constant 0.0 where ``e`` does not depend on it)."""
    G = _Builder()
    memo: dict[Expr, Expr | None] = {}
    for n in e.toposort():
        if n.op == "var":
            d = ex.const(1.0) if n.fn == var else None
        elif n.op in ("const", "index", "load") or dtype_class(n.dtype) != "float":
            d = None
        elif n.op == "cast":
            d = memo[n.args[0]]
        elif n.op == "where":
            da, db = memo[n.args[1]], memo[n.args[2]]
            d = None if da is None and db is None else ex.where(n.args[0], da or ex.const(0.0), db or ex.const(0.0))
        elif n.op == "unary":
            da = memo[n.args[0]]
            if da is None:
                d = None
            else:
                f = get_fn(n.fn, 1)
                if f.grad is None:
                    raise ExprGradError(f"no derivative rule for {n.fn}")
                d = _mul(da, f.grad(G, n.args[0], n, n.c))
        elif n.op == "binary":
            da, db = memo[n.args[0]], memo[n.args[1]]
            if da is None and db is None:
                d = None
            else:
                f = get_fn(n.fn, 2)
                if f.grad is None:
                    raise ExprGradError(f"no derivative rule for {n.fn}")
                ga, gb = f.grad(G, n.args[0], n.args[1], n, ex.const(1.0))
                d = _add(_mul(da, ga), _mul(db, gb))
        else:
            raise ExprGradError(f"no derivative of a {n.op} node")
        memo[n] = d
    return memo[e] if memo[e] is not None else ex.const(0.0)
