"""Expression IR -> TIR: the TVM form of an element expression, for the kernels TVM generates
(the ShiftAdd family's shift/add/Hamming kernels; schedule-searched candidates).

Each fn's TIR comes from its entry in the fn registry (pigeon/ir/fns.py), so TVM kernels and
CUDA templates evaluate the same definitions.  Translation is memoized per node: linear in the
size of the expression DAG.  Loads are resolved by the caller (``load(expr, index)``), which knows
the buffer layout of its kernel; ``index`` is the flat feature index as a TIR expression.

``elementwise_primfunc`` builds the simplest kernel over this translation, ``out[r, j] =
expr(r, j)`` over rows of width-``prod(shape)`` buffers, used to check every fn's TIR form against
its torch form on the CPU (built for llvm by pigeon/runtime/tvm_llvm.py).
"""
from __future__ import annotations

import math
from typing import Callable

from ..ir.expr import Expr, RowRef
from ..ir.fns import get_fn, tir_dtype

TIR_DTYPES = {"float32": "float32", "float64": "float64", "int32": "int32", "int64": "int64", "bool": "bool"}


class ExprTirError(ValueError):
    pass


def _strides(shape):
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def expr_to_tir(e: Expr, flat, load: Callable, indices: dict | None = None):
    """The TIR value of ``e`` at flat feature index ``flat`` (a TIR int expression)."""
    from tvm import tirx as T
    indices = indices or {}
    memo: dict = {}

    def bcast(idx, shape, arg):
        if tuple(arg) == tuple(shape[:len(arg)]):
            return idx // math.prod(shape[len(arg):]) if len(arg) < len(shape) else idx
        out = 0
        for a, st_a, st_s, n in zip(arg, _strides(arg), _strides(shape), shape):
            if a != 1:
                out = out + ((idx // st_s) % n) * st_a
        return out

    def ev(n: Expr, idx):
        key = (n, str(idx))
        if key in memo:
            return memo[key]
        dt = TIR_DTYPES.get(n.dtype)
        if dt is None:
            raise ExprTirError(f"no TIR dtype for {n.dtype}")
        if n.op == "const":
            v = T.const(n.c, dt)
        elif n.op == "load":
            v = load(n, idx)
        elif n.op == "index":
            if n.fn.startswith("feat"):
                axis = int(n.fn[4:])
                v = T.Cast(dt, (idx // _strides(n.shape)[axis]) % n.shape[axis])
            elif n.fn in indices:
                v = T.Cast(dt, indices[n.fn])
            else:
                raise ExprTirError(f"index variable {n.fn!r} is not bound (bound: {sorted(indices)})")
        elif n.op == "unary":
            v = get_fn(n.fn, 1).tir(T, ev(n.args[0], idx), n.c)
        elif n.op == "binary":
            a, b = n.args
            v = get_fn(n.fn, 2).tir(T, ev(a, bcast(idx, n.shape, a.shape)), ev(b, bcast(idx, n.shape, b.shape)))
        elif n.op == "where":
            c, a, b = (ev(x, bcast(idx, n.shape, x.shape)) for x in n.args)
            v = T.Select(c, T.Cast(dt, a), T.Cast(dt, b))
        elif n.op == "cast":
            v = T.Cast(dt, ev(n.args[0], idx))
        elif n.op == "reshape":
            v = ev(n.args[0], idx)
        else:
            raise ExprTirError(f"{n.op} has no TIR translation here (reductions belong to the kernel's loops)")
        if tir_dtype(v) != dt:
            v = T.Cast(dt, v)
        memo[key] = v
        return v

    return ev(e, flat)


def elementwise_primfunc(e: Expr, name: str = "pigeon_elementwise"):
    """``out[r, j] = e(r, j)`` for r < rows (symbolic), every load a SELF row of its buffer."""
    from tvm import te
    rows = te.var("rows", "int64")
    width = math.prod(e.shape)
    holders = {}
    for b in e.buffers():
        holders[b.name] = te.placeholder((rows, b.width), TIR_DTYPES.get(b.dtype, b.dtype), name=b.name)

    def body(r, j):
        def load(n: Expr, idx):
            if n.row is not RowRef.SELF:
                raise ExprTirError(f"elementwise kernels read rows by SELF only, got {n.row.value}")
            return holders[n.buffer.name][r, idx]
        return expr_to_tir(e, j, load, {"row": r})

    out = te.compute((rows, width), body, name="out")
    return te.create_prim_func(list(holders.values()) + [out]).with_attr("global_symbol", name)
