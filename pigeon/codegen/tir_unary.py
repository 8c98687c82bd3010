"""The unary fns of the IR (pigeon.reference.unary_fn gives their meaning) as fp32 TIR expressions:
one table for every TVM definition (traversal expressions, GEMM epilogues)."""
from __future__ import annotations

F32 = "float32"
_SQRT1_2 = 0.70710678118654752
_INV_SQRT_2PI = 0.3989422804014327


def _f(t, v: float):
    return t.const(float(v), F32)


def _extern(t, name, x):
    # libm / CUDA math functions: TVM's own tanh lowering loses relative accuracy near 0
    return t.call_pure_extern(F32, name, x)


def _gelu(t, x, c):
    return _f(t, 0.5) * x * (_f(t, 1.0) + _extern(t, "erff", x * _f(t, _SQRT1_2)))


def _gelu_grad(t, x, c):
    return (_f(t, 0.5) * (_f(t, 1.0) + _extern(t, "erff", x * _f(t, _SQRT1_2)))
            + x * _f(t, _INV_SQRT_2PI) * t.exp(_f(t, -0.5) * x * x))


# fn -> (builder(tirx, x, c) -> PrimExpr, whether x is used more than once)
UNARY_TIR = {
    "neg": (lambda t, x, c: -x, False),
    "relu": (lambda t, x, c: t.Max(x, _f(t, 0.0)), False),
    "sigmoid": (lambda t, x, c: _f(t, 1.0) / (_f(t, 1.0) + t.exp(-x)), False),
    "tanh": (lambda t, x, c: _extern(t, "tanhf", x), False),
    "exp": (lambda t, x, c: t.exp(x), False),
    "gelu": (_gelu, True),
    "elu": (lambda t, x, c: t.Select(x > _f(t, 0.0), x, _extern(t, "expm1f", x)), True),
    "leaky_relu": (lambda t, x, c: t.Select(x > _f(t, 0.0), x, _f(t, c) * x), True),
    "scale": (lambda t, x, c: _f(t, c) * x, False),
    "shift": (lambda t, x, c: x + _f(t, c), False),
    "rsub": (lambda t, x, c: _f(t, c) - x, False),
    "rdiv": (lambda t, x, c: _f(t, c) / x, False),
    "step": (lambda t, x, c: t.Select(x > _f(t, 0.0), _f(t, 1.0), _f(t, 0.0)), False),
    "leaky_step": (lambda t, x, c: t.Select(x > _f(t, 0.0), _f(t, 1.0), _f(t, c)), False),
    "elu_grad": (lambda t, x, c: t.Select(x > _f(t, 0.0), _f(t, 1.0), t.exp(x)), True),
    "gelu_grad": (_gelu_grad, True),
    "square": (lambda t, x, c: x * x, True),
    "recip": (lambda t, x, c: _f(t, 1.0) / x, False),
}
UNARY_NEEDS_C = {"leaky_relu", "scale", "shift", "rsub", "rdiv", "leaky_step"}
