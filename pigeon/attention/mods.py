"""Score and mask modifiers traced into the expression IR (pigeon/ir/expr.py) by the expression
tracer (pigeon/ir/expr_trace.py).

``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are plain Python
functions, called once on symbolic values: ``score`` is the scalar ``var`` the kernel binds, and
``b``, ``h``, ``q_idx``, ``kv_idx`` are the attention index variables ``batch``, ``head``, ``query``,
``key``.  The kernel templates inline the expression; the reference evaluates it with torch.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..ir import expr as ex
from ..ir.expr import Expr
from ..ir.expr_trace import (Sym, TraceError, _float, _lift, cast, exp, gelu, maximum, minimum, relu, sigmoid,
                             tanh, where)
from ..ir.types import dtype_class

ModError = TraceError       # a modifier that cannot be traced

__all__ = ["ModError", "Sym", "cast", "exp", "gelu", "maximum", "minimum", "relu", "sigmoid", "tanh", "where",
           "index_syms", "trace_mask_mod", "trace_score_mod"]


def _where_is(fn) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


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
