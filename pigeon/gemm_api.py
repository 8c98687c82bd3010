"""``pigeon.gemm(a, b, epilogue=...)`` and ``pigeon.grouped_gemm(a, b, offsets, epilogue=...)``.

``gemm``: a matmul whose elementwise epilogue is a plain Python
function of the accumulator, traced into the expression IR (pigeon/ir/expr_trace.py) and fused
into the GEMM kernel (the GEMM family's templates render it by the one expression emitter).

    y = pigeon.gemm(x, w, epilogue=lambda acc: pigeon.gelu(acc) * 0.5)

(pigeon's activations, given the traced accumulator, return traced values; ``where``,
``minimum``, ``maximum``, ``cast`` are in pigeon.ir.expr_trace.)

Epilogue operands: ``bias`` ([N], added along rows) and ``residual`` ([M, N]), both of a's dtype and
device.  When given, the epilogue receives them by keyword, only those passed::

    y = pigeon.gemm(x, w, bias=b, residual=r, epilogue=lambda acc, bias, residual: residual + pigeon.gelu(acc + bias))
    y = pigeon.gemm(x, w, bias=b)                   # no epilogue: acc + bias (+ residual)

It runs as the ``pigeon::gemm_fused`` torch op (pigeon/runtime/gemm_fused.py; autograd, fake
tensors, torch.compile, opcheck).  On an sm_90 GPU, bf16 / fp16 with K and N multiples of 8: a
CUTLASS sm90 kernel (TMA + wgmma, the epilogue and its operands fused through CUTLASS's epilogue
visitor tree); other CUDA cases without operands: the older templates (fp32 SIMT, bf16/fp16
mma.sync); other CUDA cases with operands: the plain-torch semantics on the GPU; on a CPU the
semantics (float32 accumulation, the epilogue in float32, one rounding).  The backward (for a, b,
bias and residual) differentiates the same semantics with torch.func; it is not a generated kernel.

``fp8_gemm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, epilogue=None)``: float8_e4m3fn
``a [M, K]`` and ``b [K, N]`` with float32 scales, ``(a * scale_a) @ (b * scale_b)`` accumulated in
float32: per-tensor (one-element scales), per-row (``scale_a [M, 1]``, ``scale_b [1, N]``) or block
scales as DeepSeek-V3 / DeepGEMM (``scale_a [M, ceil(K/128)]``: one per row and 128 columns;
``scale_b [ceil(K/128), ceil(N/128)]``: one per 128x128 block).  ``b`` is read K-contiguous (as
``torch._scaled_mm`` wants it: ``w.t()`` of a row-major ``w [N, K]``); a row-major ``b`` is copied
once.  The epilogue is a function of ``acc`` (already scaled).  No backward: an input that requires
grad is an error.  On an sm_90 GPU (K and N multiples of 16; block scales: of 128) a CUTLASS sm90
kernel (block scales: the blockwise-scaling mainloop); elsewhere the float32 semantics.

``grouped_gemm``: G problems ``a[offsets[g]:offsets[g+1]] @ b[g]`` in one launch (rows of a
grouped by problem, as MoE dispatch and the RGNN typed linears lay them out): the same GEMM
instance the RGNN typed linears run (``typed=True``, segment pointers = ``offsets``), so both
share one kernel family and its tile schedule (tiles never straddle a segment).  A list of
problems ``[(a_0, b_0), ...]`` with one K and N is packed into that form.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import trace_cache
from .ir import expr as ex
from .ir.expr_trace import Sym, TraceError, _lift
from .ir.kernel import GemmInstance
from .codegen.gemm_sm90 import Sm90Gemm
from .dsl import api as _act        # pigeon's activations (they accept traced values)
from .ir.types import dtype_class

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class GemmInputError(ValueError):
    """A bad pigeon.gemm call: names the tensor and the problem."""


def trace_epilogue(fn: Callable, operands: tuple[str, ...] = ()) -> ex.Expr:
    """The float expression of ``fn(acc)``, or of ``fn(acc, **{name: value})`` for the operand
    names given (``"bias"``, ``"residual"``: they become ``var(name)``)."""
    if not callable(fn):
        raise GemmInputError(f"gemm: epilogue must be a function acc -> value, got {fn!r}")
    kw = {o: Sym(ex.var(o)) for o in operands}
    try:
        out = fn(Sym(ex.var("acc")), **kw)
    except TypeError as err:
        if operands and "argument" in str(err):
            raise GemmInputError(f"gemm: the epilogue must take (acc, {', '.join(operands)}) since "
                                 f"{' and '.join(operands)} {'is' if len(operands) == 1 else 'are'} passed: {err}") from None
        raise
    e = _lift(out)
    if dtype_class(e.dtype) != "float":
        raise TraceError(f"gemm: the epilogue must return a float value, got {e.dtype}")
    for n in e.toposort():
        if n.op == "index":
            raise TraceError("gemm: the epilogue reads only the accumulator and constants")
    return e


def _check(cond: bool, msg) -> None:
    """``msg``: the text, or a function making it (f-strings cost ~1 us each, every call, when
    built before the check)."""
    if not cond:
        raise GemmInputError(msg() if callable(msg) else msg)


def _check_operands(fn: str, a: torch.Tensor, M: int, N: int, bias, residual) -> tuple[str, ...]:
    """Names of the operands passed, after one-line checks of their shape, dtype and device."""
    names = []
    for name, t, shape in (("bias", bias, (N,)), ("residual", residual, (M, N))):
        if t is None:
            continue
        _check(isinstance(t, torch.Tensor), lambda: f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(tuple(t.shape) == shape, lambda: f"{fn}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        _check(t.dtype == a.dtype, lambda: f"{fn}: {name} is {t.dtype} but a is {a.dtype}")
        _check(t.device == a.device, lambda: f"{fn}: {name} is on {t.device} but a on {a.device}")
        names.append(name)
    return tuple(names)


def _default_epilogue(operands: tuple[str, ...]) -> Callable | None:
    if not operands:
        return None
    return lambda acc, **kw: functools.reduce(lambda x, y: x + y, (kw[o] for o in operands), acc)


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: Callable | None = None, *, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """``epilogue(a @ b[, bias=..., residual=...])`` with ``a [M, K]``, ``b [K, N]`` (float32,
    bfloat16 or float16; fp32 accumulation), ``bias [N]``, ``residual [M, N]``, as one fused kernel."""
    for name, t in (("a", a), ("b", b)):
        _check(isinstance(t, torch.Tensor), lambda: f"gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.dim() == 2, lambda: f"gemm: {name} must be 2-D, got shape {list(t.shape)}")
        _check(t.dtype in DTYPES, lambda: f"gemm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    _check(a.dtype == b.dtype, lambda: f"gemm: a is {a.dtype} but b is {b.dtype}")
    _check(a.device == b.device, lambda: f"gemm: a is on {a.device} but b on {b.device}")
    _check(a.shape[1] == b.shape[0], lambda: f"gemm: a is {list(a.shape)} and b {list(b.shape)}: inner sizes differ")
    M, K = a.shape
    N = b.shape[1]
    ops = _check_operands("gemm", a, M, N, bias, residual)
    text = _instance_text(epilogue, K, N, DTYPES[a.dtype], ops)
    seg = _row_segments(M, a.device)
    from .runtime.gemm_fused import OPS, eager_call_ok, gemm_fused_impl     # registers pigeon::gemm_fused
    args = (text, a.contiguous(), b.contiguous(), seg, None if bias is None else bias.contiguous(),
            None if residual is None else residual.contiguous())
    call = gemm_fused_impl if eager_call_ok(*args[1:]) else OPS.gemm_fused
    return call(*args)


_SEGMENTS: dict = {}


def _row_segments(M: int, device: torch.device) -> torch.Tensor:
    """[0, M] as int32 on ``device`` (the untyped GEMM's one segment), kept per (M, device): made on
    the device once (a host tensor copied over each call would wait for the stream, a new one
    costs two launches).  Read only by the kernels, so sharing it is safe."""
    if torch.compiler.is_compiling():
        return torch.arange(2, dtype=torch.int32, device=device) * M
    key = (M, str(device))
    seg = _SEGMENTS.get(key)
    if seg is None:
        if len(_SEGMENTS) >= 256:
            _SEGMENTS.clear()
        seg = _SEGMENTS[key] = torch.arange(2, dtype=torch.int32, device=device) * M
    return seg


# ---------------------------------------------------------------------------------------- instance texts
# Tracing an epilogue and serializing the instance cost ~100 us per call, as much as a 4096^3 GEMM on
# the H200; the text is therefore kept per (epilogue, sizes): pigeon/trace_cache.py says how an
# epilogue function is identified.

epilogue_key = trace_cache.function_key


def _cached_text(kind: str, epilogue, make, *sizes) -> str:
    return trace_cache.cached_text(kind, (epilogue,), make, *sizes)


@torch.compiler.assume_constant_result
def _instance_text(epilogue, K: int, N: int, dtype: str, operands: tuple = ()) -> str:
    """The op's instance argument.  A constant under torch.compile: dynamo runs it once, eagerly,
    instead of tracing the epilogue's tracer (interned expression nodes, weak tables)."""
    return _cached_text("gemm", epilogue, lambda: _make_instance_text(epilogue, K, N, dtype, operands),
                        K, N, dtype, operands)


def _make_instance_text(epilogue, K: int, N: int, dtype: str, operands: tuple) -> str:
    from .runtime.kernel_ops import instance_json
    fn = epilogue if epilogue is not None else _default_epilogue(operands)
    ep = trace_epilogue(fn, operands) if fn is not None else None
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
                   lambda: f"grouped_gemm: problem {g} must be a pair of 2-D tensors")
            _check(ag.shape[1] == a[0][0].shape[1] and bg.shape == a[0][1].shape,
                   lambda: f"grouped_gemm: problem {g} has a {list(ag.shape)} @ {list(bg.shape)}, but every problem "
                   f"must share K and N with problem 0 ({list(a[0][0].shape)} @ {list(a[0][1].shape)})")
        dev = a[0][0].device
        offs = torch.zeros(len(a) + 1, dtype=torch.int32, device=dev)
        offs[1:] = torch.tensor(rows, device=dev).cumsum(0)
        out = grouped_gemm(torch.cat([p[0] for p in a]), torch.stack([p[1] for p in a]), offs, epilogue)
        return list(torch.split(out, rows))
    for name, t in (("a", a), ("b", b)):
        _check(isinstance(t, torch.Tensor), lambda: f"grouped_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.dtype in DTYPES, lambda: f"grouped_gemm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    _check(a.dim() == 2 and b.dim() == 3, lambda: f"grouped_gemm: a must be [M, K] and b [G, K, N], got {list(a.shape)} "
                                          f"and {list(b.shape)}")
    _check(a.dtype == b.dtype and a.device == b.device, "grouped_gemm: a and b must share dtype and device")
    _check(a.shape[1] == b.shape[1], lambda: f"grouped_gemm: a has K = {a.shape[1]}, b has K = {b.shape[1]}")
    _check(isinstance(offsets, torch.Tensor) and offsets.dim() == 1 and not offsets.is_floating_point(),
           "grouped_gemm: offsets must be a 1-D integer tensor [G + 1]")
    G, M = b.shape[0], a.shape[0]
    _check(offsets.numel() == G + 1, lambda: f"grouped_gemm: offsets has {offsets.numel()} entries for {G} problems "
                                     f"(expected {G + 1})")
    _check_offsets(offsets, M)
    text = _grouped_text(epilogue, a.shape[1], b.shape[2], DTYPES[a.dtype])
    seg = offsets.to(device=a.device, dtype=torch.int32)
    from .runtime.gemm_fused import OPS, eager_call_ok, gemm_fused_impl     # registers pigeon::gemm_fused
    args = (text, a.contiguous(), b.contiguous(), seg, None, None)
    call = gemm_fused_impl if eager_call_ok(*args[1:]) else OPS.gemm_fused
    return call(*args)


_VALID_OFFSETS: dict = {}


def _check_offsets(offsets: torch.Tensor, M: int) -> None:
    """offsets run from 0 to M, non-decreasing.  Reading a GPU tensor waits for its stream (a host
    sync per call, which idles the GPU for the whole host path); a tensor already checked and not
    written since (same storage, same version counter: in-place writes bump it) is not read again."""
    key = None
    if not torch.compiler.is_compiling() and type(offsets) is torch.Tensor:
        key = (offsets.data_ptr(), offsets._version, str(offsets.device), offsets.numel(), offsets.dtype, M)
        if key in _VALID_OFFSETS:
            return
    o = offsets.to(torch.int64)
    # one host read for the three facts
    first, last, decreasing = torch.stack([o[0], o[-1], (o[1:] < o[:-1]).any().to(torch.int64)]).tolist()
    _check(first == 0 and last == M, lambda: f"grouped_gemm: offsets must run from 0 to M = {M}, got {first}..{last}")
    _check(not decreasing, "grouped_gemm: offsets must be non-decreasing")
    if key is not None:
        if len(_VALID_OFFSETS) >= 256:
            _VALID_OFFSETS.clear()
        _VALID_OFFSETS[key] = True


@torch.compiler.assume_constant_result
def _grouped_text(epilogue, K: int, N: int, dtype: str) -> str:
    def make():
        from .runtime.kernel_ops import instance_json
        ep = trace_epilogue(epilogue) if epilogue is not None else None
        return instance_json(GemmInstance("rows", K, N, heads=1, typed=True, dtype=dtype, epilogue=ep))
    return _cached_text("grouped", epilogue, make, K, N, dtype)


FP8 = torch.float8_e4m3fn
OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, epilogue: Callable | None = None) -> torch.Tensor:
    """``epilogue((a * scale_a) @ (b * scale_b))`` for float8_e4m3fn ``a [M, K]``, ``b [K, N]``, float32
    accumulation, rounded once to ``out_dtype`` (bfloat16 or float16); scales as the module
    docstring says (per-tensor, per-row, or 1x128 / 128x128 blocks).  Forward only."""
    from .runtime.gemm_fused import BLOCK, scaling_of
    for name, t in (("a", a), ("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
        _check(isinstance(t, torch.Tensor), lambda: f"fp8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("a", a), ("b", b)):
        _check(t.dim() == 2, lambda: f"fp8_gemm: {name} must be 2-D, got shape {list(t.shape)}")
        _check(t.dtype == FP8, lambda: f"fp8_gemm: {name} must be float8_e4m3fn, got {t.dtype}")
    for name, t in (("scale_a", scale_a), ("scale_b", scale_b)):
        _check(t.dtype == torch.float32, lambda: f"fp8_gemm: {name} must be float32, got {t.dtype}")
    for name, t in (("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
        _check(t.device == a.device, lambda: f"fp8_gemm: {name} is on {t.device} but a on {a.device}")
    _check(a.shape[1] == b.shape[0], lambda: f"fp8_gemm: a is {list(a.shape)} and b {list(b.shape)}: inner sizes differ")
    _check(out_dtype in OUT_DTYPES, lambda: f"fp8_gemm: out_dtype must be bfloat16 or float16, got {out_dtype}")
    M, K = a.shape
    N = b.shape[1]
    kb, nb = -(-K // BLOCK), -(-N // BLOCK)
    _check(scaling_of(scale_a, scale_b, M, K, N) is not None,
           lambda: f"fp8_gemm: scale_a {list(scale_a.shape)} and scale_b {list(scale_b.shape)} are neither per-tensor "
           f"(one element each), per-row ([{M}, 1] and [1, {N}]) nor blocks ([{M}, {kb}] and [{kb}, {nb}])")
    if torch.is_grad_enabled():
        for name, t in (("a", a), ("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
            _check(not t.requires_grad, lambda: f"fp8_gemm: {name} requires grad, but fp8_gemm has no backward "
                                        "(call it under torch.no_grad() or detach the inputs)")
    text = _fp8_text(epilogue, OUT_DTYPES[out_dtype])
    from .runtime.gemm_fused import OPS, eager_call_ok, fp8_gemm_impl     # registers pigeon::fp8_gemm
    args = (text, a.contiguous(), b, scale_a.contiguous(), scale_b.contiguous())
    call = fp8_gemm_impl if eager_call_ok(*args[1:]) else OPS.fp8_gemm
    return call(*args)


@torch.compiler.assume_constant_result
def _fp8_text(epilogue, out_dtype: str) -> str:
    def make():
        from .runtime.gemm_fused import to_text
        ep = trace_epilogue(epilogue) if epilogue is not None else None
        return to_text(Sm90Gemm("fp8", "float8_e4m3fn", out_dtype, ep))
    return _cached_text("fp8", epilogue, make, out_dtype)


# ---------------------------------------------------------------------------------------- prebuilt sm90 set
# The epilogues the GPU tests use and the sm90 libraries scripts/prebuild_kernels.py builds for them
# and for `pigeon bench gemm` (one table for both; here, above the runtime, since it traces epilogues).

def test_epilogues() -> dict:
    """The epilogues tests/gpu/test_gemm_gpu.py and ``pigeon bench gemm`` run on the sm90 path:
    name -> (fn, operands).  Shared so that scripts/prebuild_kernels.py builds exactly their
    libraries (a CUTLASS library takes a minute or more of nvcc; the GPU machine has no CUTLASS)."""
    return {
        "none": (None, ()),
        "gelu": (lambda acc: _act.gelu(acc), ()),
        "bias_gelu": (lambda acc, bias: _act.gelu(acc + bias), ("bias",)),
        "residual": (lambda acc, residual: acc * 2.0 - residual, ("residual",)),
        "bias_gelu_residual": (lambda acc, bias, residual: residual + _act.gelu(acc + bias), ("bias", "residual")),
        "sum": (None, ("bias", "residual")),              # the default epilogue: acc + bias + residual
        "silu": (lambda acc: acc * _act.sigmoid(acc), ()),
        "relu": (lambda acc: _act.relu(acc), ()),
    }


def prebuild_instances() -> list[Sm90Gemm]:
    """Every sm90 library the GPU tests and ``pigeon bench gemm`` use (12)."""
    eps = test_epilogues()

    def ep(name):
        fn, ops = eps[name]
        fn = fn if fn is not None else _default_epilogue(ops)
        return trace_epilogue(fn, ops) if fn is not None else None
    out = [Sm90Gemm("dense", "bfloat16", "bfloat16", ep(n))
           for n in ("none", "gelu", "bias_gelu", "residual", "bias_gelu_residual", "sum")]
    out.append(Sm90Gemm("dense", "float16", "float16"))
    out += [Sm90Gemm("grouped", "bfloat16", "bfloat16", ep(n)) for n in ("none", "silu")]
    out += [Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", ep(n)) for n in ("none", "relu")]
    out.append(Sm90Gemm("fp8_block", "float8_e4m3fn", "bfloat16"))
    return out
