"""``pigeon.gemm(a, b, epilogue=...)``: a matmul whose elementwise epilogue is a plain Python
function of the accumulator, traced into the expression IR (pigeon/ir/expr_trace.py) and fused
into the GEMM kernel (the GEMM family's templates render it by the one expression emitter).

    y = pigeon.gemm(x, w, epilogue=lambda acc: pigeon.gelu(acc) * 0.5)

(pigeon's activations, given the traced accumulator, return traced values; ``where``,
``minimum``, ``maximum``, ``cast`` are in pigeon.ir.expr_trace.)

It runs as the ``pigeon::gemm`` torch op (autograd, fake tensors, torch.compile, opcheck): CUDA
templates on a GPU (fp32 SIMT, bf16/fp16 mma.sync), the instance's torch semantics on a CPU.  The
backward differentiates the same semantics (the epilogue included) with torch.func; on a GPU it
is not a generated kernel yet.  What the epilogue may read: the accumulator and constants (bias
and residual operands, which need loads in the epilogue, are not supported yet).
"""
from __future__ import annotations

from typing import Callable

import torch

from .ir import expr as ex
from .ir.expr_trace import Sym, TraceError, _lift
from .ir.kernel import GemmInstance
from .ir.types import dtype_class

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class GemmInputError(ValueError):
    """A bad pigeon.gemm call: names the tensor and the problem."""


def trace_epilogue(fn: Callable) -> ex.Expr:
    """The float expression of ``fn(acc)``."""
    if not callable(fn):
        raise GemmInputError(f"gemm: epilogue must be a function acc -> value, got {fn!r}")
    e = _lift(fn(Sym(ex.var("acc"))))
    if dtype_class(e.dtype) != "float":
        raise TraceError(f"gemm: the epilogue must return a float value, got {e.dtype}")
    for n in e.toposort():
        if n.op == "index":
            raise TraceError("gemm: the epilogue reads only the accumulator and constants")
    return e


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise GemmInputError(msg)


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: Callable | None = None) -> torch.Tensor:
    """``epilogue(a @ b)`` with ``a [M, K]``, ``b [K, N]`` (float32, bfloat16 or float16; fp32
    accumulation), as one fused kernel."""
    for name, t in (("a", a), ("b", b)):
        _check(isinstance(t, torch.Tensor), f"gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.dim() == 2, f"gemm: {name} must be 2-D, got shape {list(t.shape)}")
        _check(t.dtype in DTYPES, f"gemm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    _check(a.dtype == b.dtype, f"gemm: a is {a.dtype} but b is {b.dtype}")
    _check(a.device == b.device, f"gemm: a is on {a.device} but b on {b.device}")
    _check(a.shape[1] == b.shape[0], f"gemm: a is {list(a.shape)} and b {list(b.shape)}: inner sizes differ")
    M, K = a.shape
    N = b.shape[1]
    text = _instance_text(epilogue, K, N, DTYPES[a.dtype])
    seg = torch.tensor([0, M], dtype=torch.int32, device=a.device)
    return torch.ops.pigeon.gemm(text, a.contiguous(), b.contiguous(), seg, None, None, None, M)


@torch.compiler.assume_constant_result
def _instance_text(epilogue, K: int, N: int, dtype: str) -> str:
    """The op's instance argument.  A constant under torch.compile: dynamo runs it once, eagerly,
    instead of tracing the epilogue's tracer (interned expression nodes, weak tables)."""
    from .runtime.kernel_ops import instance_json
    ep = trace_epilogue(epilogue) if epilogue is not None else None
    inst = GemmInstance("rows", K, N, heads=1, typed=False, gather=False, scatter=False, dtype=dtype, epilogue=ep)
    return instance_json(inst)
