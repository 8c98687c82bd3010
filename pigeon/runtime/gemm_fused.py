"""The torch ops behind ``pigeon.gemm`` / ``pigeon.grouped_gemm`` (with bias / residual epilogue
operands) and ``pigeon.fp8_gemm``, their plain-torch semantics and their sm90 CUTLASS path.

* ``pigeon::gemm_fused(inst, a, b, seg_ptr, bias, residual) -> Tensor``: ``inst`` is a rows-form
  GemmInstance JSON without gather / scatter whose epilogue may read ``var("bias")`` ([N], row
  broadcast) and ``var("residual")`` ([M, N]).  Untyped: ``b [K, N]``; typed: ``b [G, K, N]`` and
  ``seg_ptr`` the G + 1 row offsets.
* ``pigeon::fp8_gemm(spec, a, b, scale_a, scale_b) -> Tensor``: ``spec`` an :class:`Sm90Gemm` JSON
  (kind "fp8" or "fp8_block"); ``a [M, K]``, ``b [K, N]`` float8_e4m3fn, float32 scales:
  per-tensor (``[]``/``[1]``), per-row (``[M, 1]`` and ``[1, N]``), or blocks (``[M, ceil(K/128)]``
  and ``[ceil(K/128), ceil(N/128)]``).  No autograd.

Where they run: on CPU tensors the semantics below (the reference: float32 accumulation, the
epilogue in float32, one rounding to the output dtype).  On CUDA: the sm90 CUTLASS library
(pigeon/codegen/gemm_sm90.py) when :func:`sm90_reason` finds nothing against it; else, for
``gemm_fused`` without operands, the older GEMM templates (pigeon::gemm's kernels); else the
semantics on the GPU (correct, not fast).  ``PIGEON_SM90=0`` turns the sm90 path off;
``PIGEON_SM90_TILES`` overrides a kind's tile / cluster / schedule (pigeon/codegen/gemm_sm90.py).

The backward of gemm_fused (pigeon::gemm_fused_backward): the epilogue differentiated by torch.func at
the float32 accumulator recomputed (cuBLAS tensor cores with a float32 output on a GPU), then d a = d acc @ b^T and d b = a^T @ d acc as torch
matmuls in the input dtype (cuBLAS on a GPU: tensor cores for bf16 / fp16).  It is not a generated
kernel; before, it differentiated the float32 semantics, whose float32 matmuls ran ~15x slower than
bf16 tensor cores on the H200.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ..codegen.gemm_sm90 import TILES_ENV, Sm90Gemm, env_tiles, operands_of, render_sm90
from ..fp8_scales import BLOCK, dequantize
from ..ir.kernel import GemmInstance
from ..ir.serialize import from_json, register_serializable, to_json
from ..semantics import eval_expr
from ..torch_dtypes import TORCH_DTYPES

register_serializable(Sm90Gemm)

OPS = torch.ops.pigeon  # pigeon::gemm_fused, pigeon::fp8_gemm (registered below)


# ------------------------------------------------------------------------------ instances

@functools.lru_cache(maxsize=4096)
def parse(text: str):
    obj = from_json(json.loads(text))
    if not isinstance(obj, (GemmInstance, Sm90Gemm)):
        raise ValueError(f"not a GEMM instance: {type(obj).__name__}")
    return obj


def to_text(obj) -> str:
    return json.dumps(to_json(obj), sort_keys=True)


# ------------------------------------------------------------------------------ semantics

def epilogue_values(ep, acc: torch.Tensor, operands: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ep`` (an expression of var("acc") and the operand vars) at every element of ``acc`` [M, N]
    (float32); operands are broadcast to [M, N] (bias [N] along rows)."""
    if ep is None:
        return acc
    M, N = acc.shape

    def leaf(n):
        if n.op != "var":
            raise ValueError(f"a GEMM epilogue reads acc and its operands only, got {n.op}")
        if n.fn == "acc":
            return acc.reshape(-1)
        t = operands.get(n.fn)
        if t is None:
            raise ValueError(f"the epilogue reads {n.fn!r}, which the call did not pass")
        return t.float().expand(M, N).reshape(-1)
    return eval_expr(ep, M * N, leaf, acc.device).reshape(M, N).float()


def _segments(seg_ptr: torch.Tensor) -> list[int]:
    return [int(v) for v in seg_ptr.tolist()]


def fused_reference(ins: GemmInstance, a, b, seg_ptr, bias=None, residual=None) -> torch.Tensor:
    """The semantics of pigeon::gemm_fused in plain torch (differentiable)."""
    K, N = ins.k, ins.n
    w = b.reshape(-1, K, N)
    if w.shape[0] == 1 and not ins.typed:
        acc = a.float() @ w[0].float()
    else:
        seg = _segments(seg_ptr)
        parts = [a[seg[g]:seg[g + 1]].float() @ w[g].float() for g in range(len(seg) - 1)]
        acc = torch.cat(parts) if parts else a.new_zeros((0, N), dtype=torch.float32)
    ops = {k: v for k, v in (("bias", bias), ("residual", residual)) if v is not None}
    return epilogue_values(ins.epilogue, acc, ops).to(TORCH_DTYPES[ins.dtype])


def scaling_of(scale_a: torch.Tensor, scale_b: torch.Tensor, M: int, K: int, N: int) -> str | None:
    """"tensor", "row" or "block" from the scale shapes (None: not a supported pair)."""
    kb, nb = -(-K // BLOCK), -(-N // BLOCK)
    if scale_a.numel() == 1 and scale_b.numel() == 1 and scale_a.dim() <= 2 and scale_b.dim() <= 2:
        return "tensor"
    if tuple(scale_a.shape) == (M, 1) and tuple(scale_b.shape) == (1, N):
        return "row"
    if tuple(scale_a.shape) == (M, kb) and tuple(scale_b.shape) == (kb, nb):
        return "block"
    return None


def fp8_reference(spec: Sm90Gemm, a, b, scale_a, scale_b) -> torch.Tensor:
    """The semantics of pigeon::fp8_gemm: dequantize in float32, matmul, epilogue, round once."""
    M, K = a.shape
    N = b.shape[1]
    if scaling_of(scale_a, scale_b, M, K, N) == "block":
        af = dequantize(a, scale_a, 1, BLOCK)
        bf = dequantize(b, scale_b, BLOCK, BLOCK)
    else:
        af = dequantize(a, scale_a, 1, 1)
        bf = dequantize(b, scale_b, 1, 1)
    return epilogue_values(spec.epilogue, af @ bf, {}).to(TORCH_DTYPES[spec.out_dtype])


# ------------------------------------------------------------------------------ the sm90 path

def sm90_enabled() -> bool:
    return os.environ.get("PIGEON_SM90", "1") not in ("0", "")


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dev_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _aligned(*ts) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def sm90_reason(ins: GemmInstance, a: torch.Tensor, b: torch.Tensor, bias, residual) -> str | None:
    """Why pigeon::gemm_fused cannot take the sm90 path for these operands (None: it can)."""
    if not sm90_enabled():
        return "PIGEON_SM90=0"
    if not a.is_cuda or _capability(_dev_index(a)) != (9, 0):
        return "not an sm_90 device"
    if ins.dtype not in ("bfloat16", "float16"):
        return f"dtype {ins.dtype}"
    if ins.heads != 1 or ins.gather or ins.scatter or ins.accumulate or ins.transpose_w or ins.form != "rows":
        return "not a plain rows-form instance"
    if ins.k % 8 or ins.n % 8:
        return "K and N must be multiples of 8"
    if ins.typed and (bias is not None or residual is not None):
        return "grouped GEMMs take no bias / residual on the sm90 path"
    if not _aligned(a, b, bias, residual):
        return "an operand is not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=256)
def _library(g: Sm90Gemm):
    """The loaded library of ``g``, once per process: the cache lookup (key hash, entry check)
    costs ~1.5 ms, which measured as the whole gap to cuBLAS at 4096^3 when done per call."""
    from .hostlib import load_library
    return load_library(render_sm90(g), "sm_90a", name=g.name)


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(lib, sizes: tuple) -> int:
    return lib.workspace(sizes)


def _library_for(kind: str, text: str):
    """The library running instance ``text`` (a GemmInstance or Sm90Gemm JSON) as ``kind``, with the
    tile / schedule override of PIGEON_SM90_TILES for ``kind`` (pigeon/codegen/gemm_sm90.py; read
    each call, so a probe may switch variants in one process)."""
    return _library_for_tiles(kind, text, os.environ.get(TILES_ENV, ""))


@functools.lru_cache(maxsize=256)
def _library_for_tiles(kind: str, text: str, tiles: str):
    """Keyed by the text, whose hash Python keeps: making the Sm90Gemm walks its epilogue (~20 us a call)."""
    obj = parse(text)
    out_dtype = obj.out_dtype if isinstance(obj, Sm90Gemm) else obj.dtype
    tile, schedule = env_tiles(kind, tiles)
    return _library(Sm90Gemm(kind, obj.dtype, out_dtype, obj.epilogue, tile, schedule))


def _launch(lib, ptrs, M: int, N: int, K: int, G: int, like: torch.Tensor) -> None:
    dev = _dev_index(like)
    sizes = (M, N, K, G, _sm_count(dev), dev)
    ws_bytes = _workspace_bytes(lib, sizes)
    # the workspace (none for the dense kernels) is allocated per call from torch's caching
    # allocator, so a call on another stream never shares it; the raw stream handle skips building
    # a torch.cuda.Stream object (a few us of the ~50 us host path)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=like.device) if ws_bytes > 0 else None
    lib.run(ptrs, sizes, 0 if ws is None else ws.data_ptr(), _raw_stream(dev))
    if _env("PIGEON_SYNC_LAUNCH"):
        torch.cuda.synchronize(like.device)


def _raw_stream(dev: int) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(dev)) if raw is not None else torch.cuda.current_stream(dev).cuda_stream


def _env(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _poisoned(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _env("PIGEON_POISON"):
        out.fill_(float("nan"))
    return out


def sm90_dense(text: str, ins: GemmInstance, a, b, seg_ptr, bias, residual) -> torch.Tensor:
    M, K, N = a.shape[0], ins.k, ins.n
    out = _poisoned((M, N), a.dtype, a.device)
    if M == 0:
        return out
    lib = _library_for("grouped" if ins.typed else "dense", text)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    G = seg_ptr.numel() - 1
    _launch(lib, [a.data_ptr(), b.data_ptr(), out.data_ptr(), ptr(residual), ptr(bias), 0, 0, seg_ptr.data_ptr()],
            M, N, K, G, a)
    return out


def fp8_sm90_reason(a, b, scale_a, scale_b, scaling: str) -> str | None:
    if not sm90_enabled():
        return "PIGEON_SM90=0"
    if not a.is_cuda or _capability(_dev_index(a)) != (9, 0):
        return "not an sm_90 device"
    M, K = a.shape
    N = b.shape[1]
    if K % 16 or N % 16:
        return "K and N must be multiples of 16"
    if scaling == "block" and (K % BLOCK or N % BLOCK):
        return "block scales need K and N multiples of 128"
    return None


def sm90_fp8(text: str, spec: Sm90Gemm, a, b, scale_a, scale_b, scaling: str) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[1]
    out = _poisoned((M, N), TORCH_DTYPES[spec.out_dtype], a.device)
    if M == 0:
        return out
    a = a.contiguous()
    bt = b.t().contiguous()           # [N, K] row-major = b column-major (K-contiguous, as wgmma reads fp8)
    if scaling == "block":
        lib = _library_for("fp8_block", text)
        sa = scale_a.float().t().contiguous()          # [K/128, M]: the M-major layout CUTLASS reads
        sb = scale_b.float().contiguous()              # [K/128, N/128]: already N-major
    else:
        lib = _library_for("fp8", text)
        sa = scale_a.float().reshape(-1).expand(M).contiguous() if scale_a.numel() == 1 else scale_a.float().reshape(M).contiguous()
        sb = scale_b.float().reshape(-1).expand(N).contiguous() if scale_b.numel() == 1 else scale_b.float().reshape(N).contiguous()
    _launch(lib, [a.data_ptr(), bt.data_ptr(), out.data_ptr(), 0, 0, sa.data_ptr(), sb.data_ptr(), 0], M, N, K, 1, a)
    return out


# ------------------------------------------------------------------------------ ops

def _legacy_cuda(ins: GemmInstance, a, b, seg_ptr) -> torch.Tensor:
    """The older GEMM templates (pigeon::gemm's CUDA path) for an epilogue of acc only."""
    from .family_gemm import build_gemm, run_gemm
    out = torch.zeros((a.shape[0], ins.n), dtype=TORCH_DTYPES[ins.dtype], device=a.device)
    run_gemm(ins, build_gemm(ins, device=a.device), a, b, seg_ptr, None, None, out)
    return out


def gemm_fused_impl(inst: str, a: torch.Tensor, b: torch.Tensor, seg_ptr: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor]) -> torch.Tensor:
    """pigeon::gemm_fused's implementation (the op's body; :func:`eager_call_ok` says when
    pigeon.gemm may call it without the dispatcher)."""
    ins = parse(inst)
    if a.is_cuda:
        if sm90_reason(ins, a, b, bias, residual) is None:
            return sm90_dense(inst, ins, a, b, seg_ptr, bias, residual)
        if bias is None and residual is None and not operands_of(ins.epilogue):
            return _legacy_cuda(ins, a, b, seg_ptr)
    return fused_reference(ins, a, b, seg_ptr, bias, residual)


gemm_fused = torch.library.custom_op("pigeon::gemm_fused", mutates_args=())(gemm_fused_impl)


def eager_call_ok(*tensors) -> bool:
    """Whether calling an op's implementation directly is the same as calling the op: plain
    tensors (no fake or other subclass), no dispatch or function mode (FakeTensorMode, FlopCounter,
    ...), not under torch.compile, and no autograd to record.  The dispatcher, its autograd
    wrapper and the Python custom-op machinery cost ~30-60 us per call, which at 4096^3 was most of
    the gap to cuBLAS (a host-bound call leaves the GPU idle)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


@gemm_fused.register_fake
def _(inst, a, b, seg_ptr, bias, residual):
    ins = parse(inst)
    return a.new_empty((a.shape[0], ins.n), dtype=TORCH_DTYPES[ins.dtype])


@torch.library.custom_op("pigeon::gemm_fused_backward", mutates_args=())
def gemm_fused_backward(inst: str, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg_ptr: torch.Tensor,
                        bias: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of pigeon::gemm_fused for a, b, bias, residual (an empty tensor for an absent one)."""
    ins = parse(inst)
    inputs = {t.untyped_storage().data_ptr() for t in (grad, a, b, seg_ptr, bias, residual) if t is not None}

    def own(g):   # a custom op's outputs may not alias its inputs (the residual's gradient is grad)
        g = g.contiguous()
        return g.clone() if g.untyped_storage().data_ptr() in inputs else g
    d_acc, d_bias, d_res = _epilogue_backward(ins, grad, a, b, seg_ptr, bias, residual)
    d_a, d_b = _matmul_backward(ins, d_acc, a, b, seg_ptr)
    return [own(d_a), own(d_b), own(d_bias) if bias is not None else a.new_empty(0),
            own(d_res) if residual is not None else a.new_empty(0)]


def _mm_float32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` accumulated and returned in float32: on a GPU for bf16 / fp16 through cuBLAS's
    tensor cores with a float32 output (``torch.mm(..., out_dtype=)``, CUDA only), else by float32
    operands."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x, w, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):   # a torch without mm.dtype
            pass
    return x.float() @ w.float()


def _products(ins: GemmInstance, x, w, seg_ptr) -> torch.Tensor:
    """The float32 accumulator: ``x @ w`` (untyped) or the per-segment products (typed)."""
    w = w.reshape(-1, *w.shape[-2:])
    if w.shape[0] == 1 and not ins.typed:
        return _mm_float32(x, w[0])
    seg = _segments(seg_ptr)
    parts = [_mm_float32(x[seg[g]:seg[g + 1]], w[g]) for g in range(len(seg) - 1)]
    return torch.cat(parts) if parts else x.new_zeros((0, w.shape[-1]), dtype=torch.float32)


def _epilogue_backward(ins: GemmInstance, grad, a, b, seg_ptr, bias, residual):
    """(d acc, d bias, d residual): the epilogue differentiated in float32 at the float32
    accumulator (recomputed), rounded to the input dtype.  No epilogue passes ``grad`` through."""
    if ins.epilogue is None:
        return grad, None, None
    acc = _products(ins, a, b, seg_ptr)
    leaves = [acc] + [t.float() for t in (bias, residual) if t is not None]

    def f(acc, *ops):
        it = iter(ops)
        named = {k: next(it) for k, t in (("bias", bias), ("residual", residual)) if t is not None}
        return epilogue_values(ins.epilogue, acc, named)
    _, vjp = torch.func.vjp(f, *leaves)
    grads = iter(vjp(grad.float()))
    d_acc = next(grads).to(a.dtype)
    d_bias = next(grads).to(bias.dtype) if bias is not None else None
    d_res = next(grads).to(residual.dtype) if residual is not None else None
    return d_acc, d_bias, d_res


def _matmul_backward(ins: GemmInstance, d_acc, a, b, seg_ptr):
    """d a = d acc @ b^T, d b = a^T @ d acc (per segment when typed), in the input dtype."""
    K, N = ins.k, ins.n
    w = b.reshape(-1, K, N)
    if w.shape[0] == 1 and not ins.typed:
        return d_acc @ w[0].t(), (a.t() @ d_acc).reshape(b.shape)
    seg = _segments(seg_ptr)
    d_a = torch.empty_like(a)
    d_w = torch.zeros_like(w)
    for g in range(len(seg) - 1):
        lo, hi = seg[g], seg[g + 1]
        if hi > lo:
            d_a[lo:hi] = d_acc[lo:hi] @ w[g].t()
            d_w[g] = a[lo:hi].t() @ d_acc[lo:hi]
    return d_a, d_w.reshape(b.shape)


@gemm_fused_backward.register_fake
def _(inst, grad, a, b, seg_ptr, bias, residual):
    return [torch.empty_like(a), torch.empty_like(b)] + [
        torch.empty_like(t) if t is not None else a.new_empty(0) for t in (bias, residual)]


def _setup(ctx, inputs, output):
    inst, a, b, seg, bias, residual = inputs
    ctx.inst = inst
    ctx.present = (bias is not None, residual is not None)
    ctx.save_for_backward(a, b, seg, *(t for t in (bias, residual) if t is not None))


def _backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    a, b, seg = saved[:3]
    it = iter(saved[3:])
    bias = next(it) if ctx.present[0] else None
    residual = next(it) if ctx.present[1] else None
    ga, gb, gbias, gres = gemm_fused_backward(ctx.inst, grad.contiguous(), a, b, seg, bias, residual)
    return None, ga, gb, None, (gbias if bias is not None else None), (gres if residual is not None else None)


torch.library.register_autograd("pigeon::gemm_fused", _backward, setup_context=_setup)


def fp8_gemm_impl(spec: str, a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """pigeon::fp8_gemm's implementation."""
    sp = parse(spec)
    M, K = a.shape
    N = b.shape[1]
    scaling = scaling_of(scale_a, scale_b, M, K, N)
    if scaling is None:
        raise ValueError(f"pigeon::fp8_gemm: scale shapes {list(scale_a.shape)} and {list(scale_b.shape)}")
    if a.is_cuda and fp8_sm90_reason(a, b, scale_a, scale_b, scaling) is None:
        return sm90_fp8(spec, sp, a, b, scale_a, scale_b, scaling)
    return fp8_reference(sp, a, b, scale_a, scale_b)


fp8_gemm = torch.library.custom_op("pigeon::fp8_gemm", mutates_args=())(fp8_gemm_impl)


@fp8_gemm.register_fake
def _(spec, a, b, scale_a, scale_b):
    sp = parse(spec)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=TORCH_DTYPES[sp.out_dtype])


# ------------------------------------------------------------------------------ prebuilt instances
