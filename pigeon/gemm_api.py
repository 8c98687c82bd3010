"""``pigeon.gemm(a, b, epilogue=...)`` and ``pigeon.grouped_gemm(a, b, offsets, epilogue=...)``.

``gemm``: a matmul whose elementwise epilogue is a plain Python
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

``grouped_gemm``: G problems ``a[offsets[g]:offsets[g+1]] @ b[g]`` in one launch (rows of a
grouped by problem, as MoE dispatch and the RGNN typed linears lay them out): the same GEMM
instance the RGNN typed linears run (``typed=True``, segment pointers = ``offsets``), so both
share one kernel family and its tile schedule (tiles never straddle a segment).  A list of
problems ``[(a_0, b_0), ...]`` with one K and N is packed into that form.
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


def grouped_gemm(a, b=None, offsets: torch.Tensor | None = None, epilogue: Callable | None = None):
    """``a [M, K]`` with ``offsets [G+1]`` (0 = offsets[0] <= ... <= offsets[G] = M) and
    ``b [G, K, N]``: returns ``[M, N]``, rows of problem g multiplied by ``b[g]``.  Or ``a`` a list of
    (a_g [M_g, K], b_g [K, N]) pairs: returns the list of results."""
    if isinstance(a, (list, tuple)):
        _check(b is None and offsets is None, "grouped_gemm: pass either a list of (a, b) problems or a, b, offsets")
        _check(len(a) > 0 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in a),
               "grouped_gemm: the list form takes (a_g, b_g) pairs")
        rows = [p[0].shape[0] if isinstance(p[0], torch.Tensor) and p[0].dim() == 2 else -1 for p in a]
        for g, (ag, bg) in enumerate(a):
            _check(isinstance(ag, torch.Tensor) and ag.dim() == 2 and isinstance(bg, torch.Tensor) and bg.dim() == 2,
                   f"grouped_gemm: problem {g} must be a pair of 2-D tensors")
            _check(ag.shape[1] == a[0][0].shape[1] and bg.shape == a[0][1].shape,
                   f"grouped_gemm: problem {g} has a {list(ag.shape)} @ {list(bg.shape)}, but every problem "
                   f"must share K and N with problem 0 ({list(a[0][0].shape)} @ {list(a[0][1].shape)})")
        dev = a[0][0].device
        offs = torch.zeros(len(a) + 1, dtype=torch.int32, device=dev)
        offs[1:] = torch.tensor(rows, device=dev).cumsum(0)
        out = grouped_gemm(torch.cat([p[0] for p in a]), torch.stack([p[1] for p in a]), offs, epilogue)
        return list(torch.split(out, rows))
    for name, t in (("a", a), ("b", b)):
        _check(isinstance(t, torch.Tensor), f"grouped_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.dtype in DTYPES, f"grouped_gemm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    _check(a.dim() == 2 and b.dim() == 3, f"grouped_gemm: a must be [M, K] and b [G, K, N], got {list(a.shape)} "
                                          f"and {list(b.shape)}")
    _check(a.dtype == b.dtype and a.device == b.device, "grouped_gemm: a and b must share dtype and device")
    _check(a.shape[1] == b.shape[1], f"grouped_gemm: a has K = {a.shape[1]}, b has K = {b.shape[1]}")
    _check(isinstance(offsets, torch.Tensor) and offsets.dim() == 1 and not offsets.is_floating_point(),
           "grouped_gemm: offsets must be a 1-D integer tensor [G + 1]")
    G, M = b.shape[0], a.shape[0]
    _check(offsets.numel() == G + 1, f"grouped_gemm: offsets has {offsets.numel()} entries for {G} problems "
                                     f"(expected {G + 1})")
    o = offsets.to(torch.int64)
    _check(int(o[0]) == 0 and int(o[-1]) == M, f"grouped_gemm: offsets must run from 0 to M = {M}, got "
                                               f"{int(o[0])}..{int(o[-1])}")
    _check(bool((o[1:] >= o[:-1]).all()), "grouped_gemm: offsets must be non-decreasing")
    text = _grouped_text(epilogue, a.shape[1], b.shape[2], DTYPES[a.dtype])
    seg = offsets.to(device=a.device, dtype=torch.int32)
    return torch.ops.pigeon.gemm(text, a.contiguous(), b.contiguous(), seg, None, None, None, M)


@torch.compiler.assume_constant_result
def _grouped_text(epilogue, K: int, N: int, dtype: str) -> str:
    from .runtime.kernel_ops import instance_json
    ep = trace_epilogue(epilogue) if epilogue is not None else None
    return instance_json(GemmInstance("rows", K, N, heads=1, typed=True, dtype=dtype, epilogue=ep))
