"""The registry of elementwise functions: one ``FnDef`` per function, the only place a function is
defined.  Every form of a function comes from its entry:

* ``c``: its C expression over ``x`` (and ``y`` for binary fns, ``c`` for the constant), used by
  every CUDA template (traversal bodies, GEMM epilogues) through :mod:`pigeon.codegen.expr_c`;
* ``tir(T, x, c)`` / ``tir(T, x, y)``: its TIR expression (``T`` is ``tvm.tirx``), for the kernels
  TVM generates (:mod:`pigeon.codegen.expr_tir`);
* ``torch(T, x, c)``: its meaning on tensors (``T`` is the ``torch`` module), used by the reference
  interpreter and every kernel family's oracle;
* ``grad(G, x, y, c)``: its local derivative dy/dx as an IR value built with the autodiff builder
  ``G`` (``G.un(v, fn, c)``, ``G.bin(a, b, fn)``), or ``None`` when the fn has no gradient;
  binary fns give ``grad(G, a, b, y, dy) -> (da, db)`` instead.

The modules here never import torch or TVM: the forms receive the module they need.  Adding a
function is one ``register_fn`` call (a test registers one and runs it through every stage).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

_SQRT1_2 = 0.70710678118654752
_INV_SQRT_2PI = 0.3989422804014327

# dtype classes a fn accepts
FLOAT, INT, BOOL = "float", "int", "bool"


@dataclass(frozen=True)
class FnDef:
    name: str
    arity: int                        # 1 (unary) or 2 (binary)
    c: str                            # C expression over x (y), c
    torch: Callable[..., Any]         # (torch, x, c) or (torch, x, y)
    tir: Callable[..., Any] | None = None   # (tirx, x, c) or (tirx, x, y)
    grad: Callable[..., Any] | None = None
    takes_const: bool = False
    operands: tuple[str, ...] = (FLOAT,)   # dtype classes accepted
    result: str | None = None         # a fixed result dtype ("bool", "int32"); None: the operands' dtype
    doc: str = ""


FNS: dict[str, FnDef] = {}


class FnError(ValueError):
    pass


def register_fn(fn: FnDef, *, replace: bool = False) -> FnDef:
    if fn.arity not in (1, 2):
        raise FnError(f"fn {fn.name!r}: arity must be 1 or 2")
    if fn.name in FNS and not replace:
        raise FnError(f"fn {fn.name!r} is already registered")
    if fn.takes_const and fn.arity != 1:
        raise FnError(f"fn {fn.name!r}: only unary fns take a constant")
    FNS[fn.name] = fn
    return fn


def unregister_fn(name: str) -> None:
    FNS.pop(name, None)


def get_fn(name: str, arity: int | None = None) -> FnDef:
    fn = FNS.get(name)
    if fn is None or (arity is not None and fn.arity != arity):
        kind = {1: "unary", 2: "binary", None: ""}[arity]
        known = sorted(n for n, f in FNS.items() if arity is None or f.arity == arity)
        raise FnError(f"unknown {kind} fn {name!r}; known: {known}".replace("  ", " "))
    return fn


def unary_fns() -> dict[str, bool]:
    """name -> takes a constant, for every unary fn."""
    return {n: f.takes_const for n, f in FNS.items() if f.arity == 1}


def binary_fns() -> tuple[str, ...]:
    return tuple(n for n, f in FNS.items() if f.arity == 2)


# -- TIR helpers (T is tvm.tirx) -------------------------------------------------------------------

def tir_dtype(x) -> str:
    """The dtype of a TIR expression (TVM 0.27 keeps it in ``ty``)."""
    d = getattr(x, "dtype", None)
    return str(d) if d is not None else str(x.ty)


def _f(T, v: float, x=None):
    return T.const(float(v), tir_dtype(x) if x is not None else "float32")


def _extern(T, name: str, x):
    # libm / CUDA math functions: TVM's own tanh lowering loses relative accuracy near 0
    return T.call_pure_extern(tir_dtype(x), name, x)


def _unary(name, c, torch, tir=None, grad=None, *, takes_const=False, operands=(FLOAT,), result=None, doc=""):
    register_fn(FnDef(name, 1, c, torch, tir, grad, takes_const, operands, result, doc))


def _binary(name, c, torch, tir=None, grad=None, *, operands=(FLOAT,), result=None, doc=""):
    register_fn(FnDef(name, 2, c, torch, tir, grad, False, operands, result, doc))


# -- unary float fns (forward) ----------------------------------------------------------------------
_unary("neg", "(-x)", lambda T, x, c: -x, lambda T, x, c: -x, lambda G, x, y, c: G.const_like(x, -1.0),
       operands=(FLOAT, INT))
_unary("relu", "fmaxf(x, 0.f)", lambda T, x, c: T.relu(x), lambda T, x, c: T.Max(x, _f(T, 0.0, x)),
       lambda G, x, y, c: G.un(x, "step"))
_unary("sigmoid", "(1.f / (1.f + expf(-x)))", lambda T, x, c: T.sigmoid(x),
       lambda T, x, c: _f(T, 1.0, x) / (_f(T, 1.0, x) + T.exp(-x)),
       lambda G, x, y, c: G.bin(y, G.un(y, "rsub", 1.0), "mul"))
_unary("tanh", "tanhf(x)", lambda T, x, c: T.tanh(x), lambda T, x, c: _extern(T, "tanhf", x),
       lambda G, x, y, c: G.un(G.un(y, "square"), "rsub", 1.0))
_unary("exp", "expf(x)", lambda T, x, c: T.exp(x), lambda T, x, c: T.exp(x), lambda G, x, y, c: y)
_unary("gelu", "(0.5f * x * (1.f + erff(x * 0.70710678118654752f)))", lambda T, x, c: T.nn.functional.gelu(x),
       lambda T, x, c: _f(T, 0.5, x) * x * (_f(T, 1.0, x) + _extern(T, "erff", x * _f(T, _SQRT1_2, x))),
       lambda G, x, y, c: G.un(x, "gelu_grad"))
_unary("elu", "(x > 0.f ? x : expm1f(x))", lambda T, x, c: T.nn.functional.elu(x),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), x, _extern(T, "expm1f", x)),
       lambda G, x, y, c: G.un(x, "elu_grad"))
_unary("leaky_relu", "(x > 0.f ? x : c * x)", lambda T, x, c: T.nn.functional.leaky_relu(x, c),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), x, _f(T, c, x) * x),
       lambda G, x, y, c: G.un(x, "leaky_step", c), takes_const=True)
_unary("scale", "(c * x)", lambda T, x, c: x * c, lambda T, x, c: _f(T, c, x) * x,
       lambda G, x, y, c: G.const_like(x, c), takes_const=True)
_unary("shift", "(x + c)", lambda T, x, c: x + c, lambda T, x, c: x + _f(T, c, x),
       lambda G, x, y, c: G.const_like(x, 1.0), takes_const=True)
_unary("rsub", "(c - x)", lambda T, x, c: c - x, lambda T, x, c: _f(T, c, x) - x,
       lambda G, x, y, c: G.const_like(x, -1.0), takes_const=True)
_unary("rdiv", "(c / x)", lambda T, x, c: c / x, lambda T, x, c: _f(T, c, x) / x,
       lambda G, x, y, c: G.un(G.bin(y, x, "div"), "neg"), takes_const=True)
_unary("square", "(x * x)", lambda T, x, c: x * x, lambda T, x, c: x * x,
       lambda G, x, y, c: G.un(x, "scale", 2.0))
_unary("recip", "(1.f / x)", lambda T, x, c: 1.0 / x, lambda T, x, c: _f(T, 1.0, x) / x,
       lambda G, x, y, c: G.un(G.un(y, "square"), "neg"))
_unary("abs", "fabsf(x)", lambda T, x, c: T.abs(x), lambda T, x, c: T.abs(x),
       lambda G, x, y, c: G.un(x, "sign"))
# -- derivatives (backward graphs use them; no gradient of their own) ------------------------------
_unary("step", "(x > 0.f ? 1.f : 0.f)", lambda T, x, c: (x > 0).to(x.dtype),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), _f(T, 1.0, x), _f(T, 0.0, x)))
_unary("sign", "(x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f))", lambda T, x, c: T.sign(x),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), _f(T, 1.0, x), T.Select(x < _f(T, 0.0, x), _f(T, -1.0, x),
                                                                         _f(T, 0.0, x))))
_unary("leaky_step", "(x > 0.f ? 1.f : c)",
       lambda T, x, c: T.where(x > 0, T.ones_like(x), T.full_like(x, c)),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), _f(T, 1.0, x), _f(T, c, x)), takes_const=True)
_unary("elu_grad", "(x > 0.f ? 1.f : expf(x))", lambda T, x, c: T.where(x > 0, T.ones_like(x), T.exp(x)),
       lambda T, x, c: T.Select(x > _f(T, 0.0, x), _f(T, 1.0, x), T.exp(x)))
_unary("gelu_grad",
       "(0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x))",
       lambda T, x, c: 0.5 * (1 + T.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * T.exp(-0.5 * x * x),
       lambda T, x, c: (_f(T, 0.5, x) * (_f(T, 1.0, x) + _extern(T, "erff", x * _f(T, _SQRT1_2, x)))
                        + x * _f(T, _INV_SQRT_2PI, x) * T.exp(_f(T, -0.5, x) * x * x)))
# -- integer / bitwise unary fns (ShiftAdd primitives) ----------------------------------------------
_unary("bit_not", "(~x)", lambda T, x, c: T.bitwise_not(x), lambda T, x, c: ~x, operands=(INT,))
_unary("popcount", "__popc((unsigned int)(x))",
       lambda T, x, c: _torch_popcount(T, x), lambda T, x, c: T.popcount(x), operands=(INT,), result="int32")
_unary("logical_not", "(!x)", lambda T, x, c: T.logical_not(x), lambda T, x, c: T.Not(x), operands=(BOOL,))


def _torch_popcount(T, x):
    v = x.to(T.int64) & 0xFFFFFFFF
    n = T.zeros_like(v)
    for _ in range(32):
        n = n + (v & 1)
        v = v >> 1
    return n.to(T.int32)


# -- binary fns ----------------------------------------------------------------------------------
def _g_add(G, a, b, y, dy):
    return dy, dy


def _g_sub(G, a, b, y, dy):
    return dy, G.un(dy, "neg")


def _g_mul(G, a, b, y, dy):
    return G.bin(dy, b, "mul"), G.bin(dy, a, "mul")


def _g_div(G, a, b, y, dy):
    return G.bin(dy, b, "div"), G.un(G.bin(G.bin(dy, y, "mul"), b, "div"), "neg")


_binary("add", "(x + y)", lambda T, x, y: x + y, lambda T, x, y: x + y, _g_add, operands=(FLOAT, INT))
_binary("sub", "(x - y)", lambda T, x, y: x - y, lambda T, x, y: x - y, _g_sub, operands=(FLOAT, INT))
_binary("mul", "(x * y)", lambda T, x, y: x * y, lambda T, x, y: x * y, _g_mul, operands=(FLOAT, INT))
_binary("div", "(x / y)", lambda T, x, y: x / y, lambda T, x, y: x / y, _g_div, operands=(FLOAT,))
_binary("min", "fminf(x, y)", lambda T, x, y: T.minimum(x, y), lambda T, x, y: T.Min(x, y), operands=(FLOAT, INT))
_binary("max", "fmaxf(x, y)", lambda T, x, y: T.maximum(x, y), lambda T, x, y: T.Max(x, y), operands=(FLOAT, INT))
_binary("bit_and", "(x & y)", lambda T, x, y: x & y, lambda T, x, y: x & y, operands=(INT, BOOL))
_binary("bit_or", "(x | y)", lambda T, x, y: x | y, lambda T, x, y: x | y, operands=(INT, BOOL))
_binary("bit_xor", "(x ^ y)", lambda T, x, y: x ^ y, lambda T, x, y: x ^ y, operands=(INT, BOOL))
# floor division and modulo (Python's // and %): the sign follows the divisor, unlike C's / and %
_binary("floordiv", "((x) / (y) - ((((x) % (y)) != 0) & (((x) < 0) != ((y) < 0))))",
        lambda T, x, y: T.div(x, y, rounding_mode="floor"), lambda T, x, y: T.floordiv(x, y), operands=(INT,))
_binary("mod", "((((x) % (y)) + (y)) % (y))", lambda T, x, y: T.remainder(x, y),
        lambda T, x, y: T.floormod(x, y), operands=(INT,))
_binary("shl", "(x << y)", lambda T, x, y: x << y, lambda T, x, y: T.shift_left(x, y), operands=(INT,))
_binary("shr", "(x >> y)", lambda T, x, y: x >> y, lambda T, x, y: T.shift_right(x, y), operands=(INT,))
for _name, _op, _py, _tir in (("lt", "<", operator.lt, "LT"), ("le", "<=", operator.le, "LE"),
                              ("gt", ">", operator.gt, "GT"), ("ge", ">=", operator.ge, "GE"),
                              ("eq", "==", operator.eq, "EQ"), ("ne", "!=", operator.ne, "NE")):
    _binary(_name, f"(x {_op} y)", (lambda f: lambda T, x, y: f(x, y))(_py),
            (lambda t: lambda T, x, y: getattr(T, t)(x, y))(_tir),
            operands=(FLOAT, INT), result="bool")
del _name, _op, _py, _tir

# C spellings of min/max for integer operands (fminf/fmaxf are float functions)
INT_C = {"min": "min(x, y)", "max": "max(x, y)", "neg": "(-x)"}
