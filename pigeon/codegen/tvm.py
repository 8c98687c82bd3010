"""TVM definitions of GemmInstance (pigeon/ir/kernel.py): PrimFuncs, an ``llvm`` build, CUDA source.

Written against apache-tvm 0.27 (``tvm.tirx``, ``tvm.s_tir``, ``tvm.compile``, JSON-dict targets).

Form "rows" is a TE compute over a per-row type array ``row_type`` [M] (int32, made on the host from
``seg_ptr``) and an optional ``gather`` [M]; M, the X row count and the type count T are symbolic
(int64), so one build serves every graph.  The PrimFunc ``pigeon_gemm_rows_<key>`` takes, in order::

    X [MX, H, K], W [T, H, K, N] ([T, H, N, K] with transpose_w), row_type [M] if typed,
    gather [M] if gather, Z [M, H, N]
    Z[i, h, n] = epilogue(sum_k X[gather[i], h, k] * W[row_type[i], h, k, n])

TE computes outputs by their own index, so it cannot store to ``Y[scatter[i]]`` nor add into Y:
scatter and accumulate are a separate step done in torch by ``run_gemm_llvm`` (``index_copy_`` /
``index_add_``, which is also right for a non-unique scatter).  Z is in the instance dtype, except
with ``accumulate`` where it stays in fp32 so that Y is rounded once.  Without scatter and
accumulate, Z *is* Y (written in place, zero copy).

Form "weight_grad" is a TVMScript PrimFunc ``pigeon_gemm_weight_grad_<key>`` (a TE reduction cannot
have the data-dependent extent ``seg_ptr[t] .. seg_ptr[t+1]``); it reads X, dY and writes dW
directly, accumulate included::

    X [MX, H, K], dY [MY, H, N], seg_ptr [T+1], gx [M] if gather, gy [M] if scatter,
    dW [T, H, K, N]   ([T, H, N, K] with transpose_w: the layout of the transposed weight)

Schedules: llvm -- rows parallel over rows with the reduction at each (row, head); weight_grad
parallel over (t, h, block of <= 16 k's) with an fp32 [block, N] accumulator.  cuda -- rows: one
thread per output element, fp32 register accumulator (dlight's Matmul rule refuses the gathered /
per-row-weight form, its Fallback rule would accumulate in global memory); weight_grad: one thread
per dW element looping over its segment.  These are correctness-first schedules (no tiling, no
tensor cores); the CUDA kernels matched the llvm builds on an H200 (fp32, fp16; checked by hand,
not in CI).

Layout of the code: definitions, schedules and ``cuda_source`` in ``tvm_gemm.py`` (re-exported
here); the llvm build cache and ``run_gemm_llvm`` (host glue, torch tensors by DLPack) here.

Launching ``cuda_source`` without TVM: the kernel is ``<func name>_kernel``; TVM orders its pointer
parameters by buffer name and appends int64 scalars that its host code computes (shape vars and CSE'd
products such as M*H*N), with grid ceil(M*H*N / 128) (rows) or ceil(T*H*K*N / 128) (weight_grad)
and 128 threads.  The host side of ``tvm.compile`` (``split_host_device_mods`` after the default
pipeline) shows the exact ``T.call_ffi_kernel`` arguments.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..torch_dtypes import TORCH_DTYPES

import tvm

from ..ir.kernel import GemmInstance
from .tvm_gemm import (  # noqa: F401  (some are re-exported)
    CUDA_TARGET, EPILOGUE_OPS, INDEX_DTYPES, LLVM_DTYPES, check_instance, cuda_source,
    func_name, gemm_primfunc, rows_out_dtype, schedule_cuda, schedule_llvm, weight_grad_tvmscript)

__all__ = ["CUDA_TARGET", "EPILOGUE_OPS", "INDEX_DTYPES", "LLVM_DTYPES", "gemm_primfunc", "weight_grad_tvmscript",
           "schedule_llvm", "schedule_cuda", "cuda_source", "build_llvm", "run_gemm_llvm", "row_type_from_seg_ptr"]



# ---------------------------------------------------------------------------------------------
# llvm build and run
_BUILT: dict[tuple[str, str], Callable] = {}
_LOCK = threading.Lock()


def build_llvm(inst: GemmInstance, index_dtype: str = "int64") -> Callable:
    """The ``llvm`` build of ``inst`` (cached per ``(inst.key(), index_dtype)`` in this process).
    It takes torch CPU tensors (contiguous, 64-byte aligned) in the PrimFunc's parameter order."""
    key = (inst.key(), index_dtype)
    with _LOCK:
        fn = _BUILT.get(key)
        if fn is None:
            lib = tvm.compile(schedule_llvm(inst, index_dtype), target="llvm")
            fn = _BUILT[key] = lib[func_name(inst)]
    return fn


def row_type_from_seg_ptr(seg_ptr: torch.Tensor, m: int) -> torch.Tensor:
    """row_type[i] = t for seg_ptr[t] <= i < seg_ptr[t+1] (int32, [m])."""
    counts = (seg_ptr[1:] - seg_ptr[:-1]).to(torch.int64)
    types = torch.arange(counts.numel(), dtype=torch.int32, device=seg_ptr.device)
    return torch.repeat_interleave(types, counts, output_size=m)


def _arg(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor the kernel may take by DLPack: contiguous, 64-byte aligned (the generated code
    assumes TVM's default data alignment), of ``dtype``; copied only if ``t`` is not already."""
    if t.device.type != "cpu":
        raise ValueError(f"run_gemm_llvm takes CPU tensors, got {t.device}")
    t = t.to(dtype) if dtype is not None else t
    t = t.contiguous()
    if not _aligned(t):
        t = t.clone()
    return t


def _aligned(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % 64 == 0


def _check_out(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor (it is written in place)")


def _check_range(name: str, idx: torch.Tensor | None, n: int) -> None:
    """The kernels do not bound-check their index reads: check on the host (cheap, O(M))."""
    if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"{name} holds indices outside [0, {n})")


def _index_dtype(*idx: torch.Tensor | None) -> str:
    for t in idx:
        if t is not None and t.dtype in (torch.int32, torch.int64):
            return str(t.dtype).removeprefix("torch.")
    return "int64"


def run_gemm_llvm(inst: GemmInstance, X: torch.Tensor, W: torch.Tensor, seg_ptr: torch.Tensor | None,
                  gather: torch.Tensor | None, scatter: torch.Tensor | None, Y: torch.Tensor) -> torch.Tensor:
    """Run ``inst`` on CPU with the GemmInstance semantics; returns the tensor written.

    rows: reads X [*, H, K] (or [*, K] when H == 1) and W (T*H*K*N elements), writes Y [*, H, N]
    (or [*, N]).  weight_grad: as in GemmLaunch, ``W`` is the output dW and ``Y`` the input dY.
    ``seg_ptr`` [T+1] (None when untyped: [0, M]); ``gather`` / ``scatter`` [M] or None, matching the
    instance.  M is seg_ptr[-1] (else the gather / scatter length, else X's row count).
    """
    index_dtype = _index_dtype(gather, scatter, seg_ptr)
    check_instance(inst, index_dtype)
    H, K, N = inst.heads, inst.k, inst.n
    dt = TORCH_DTYPES[inst.dtype]
    ix = TORCH_DTYPES[index_dtype]
    if (gather is not None) != inst.gather or (scatter is not None) != inst.scatter:
        raise ValueError(f"instance has gather={inst.gather} scatter={inst.scatter}; got "
                         f"gather={gather is not None} scatter={scatter is not None}")
    for name, t in (("X", X), ("W", W), ("Y", Y)):
        if t.dtype != dt:
            raise TypeError(f"{name} is {t.dtype}, the instance is {inst.dtype}")
    rows = gather if gather is not None else scatter
    if seg_ptr is not None:
        seg_ptr = seg_ptr.to("cpu")
        m = int(seg_ptr[-1])
        if int(seg_ptr[0]) != 0:
            raise ValueError("seg_ptr must start at 0")
    else:
        if inst.typed:
            raise ValueError("a typed instance needs seg_ptr")
        m = rows.numel() if rows is not None else X.shape[0]
        seg_ptr = torch.tensor([0, m], dtype=ix)
    if not inst.typed and seg_ptr.numel() != 2:
        raise ValueError("an untyped instance has one segment: seg_ptr is [0, M]")
    for name, t in (("gather", gather), ("scatter", scatter)):
        if t is not None and t.numel() != m:
            raise ValueError(f"{name} has {t.numel()} entries, seg_ptr says M = {m}")
    n_types = seg_ptr.numel() - 1
    x3 = X.reshape(X.shape[0], H, K)
    if gather is None and x3.shape[0] != m:
        raise ValueError(f"X has {x3.shape[0]} rows, expected M = {m}")
    _check_range("gather", gather, x3.shape[0])
    _check_range("scatter", scatter, Y.shape[0])

    if inst.form == "weight_grad":
        dy3 = Y.reshape(Y.shape[0], H, N)
        if scatter is None and dy3.shape[0] != m:
            raise ValueError(f"dY has {dy3.shape[0]} rows, expected M = {m}")
        wshape = (n_types, H, N, K) if inst.transpose_w else (n_types, H, K, N)
        if W.numel() != n_types * H * K * N:
            raise ValueError(f"dW has {W.numel()} elements, expected {wshape}")
        _check_out("dW", W)
        dw = W.view(wshape)
        dw_k = dw if _aligned(dw) else dw.clone()      # clone keeps dW's values for accumulate
        args = [_arg(x3), _arg(dy3), _arg(seg_ptr, ix)]
        args += [_arg(t, ix) for t in (gather, scatter) if t is not None]
        build_llvm(inst, index_dtype)(*args, dw_k)
        if dw_k is not dw:
            dw.copy_(dw_k)
        return W

    wshape = (-1, H, N, K) if inst.transpose_w else (-1, H, K, N)
    w4 = W.reshape(wshape)
    if w4.shape[0] != n_types:
        raise ValueError(f"W holds {w4.shape[0]} types, seg_ptr {n_types}")
    _check_out("Y", Y)
    y3 = Y.view(Y.shape[0], H, N)
    if scatter is None and y3.shape[0] != m:
        raise ValueError(f"Y has {y3.shape[0]} rows, expected M = {m}")
    args = [_arg(x3), _arg(w4)]
    if inst.typed:
        args.append(row_type_from_seg_ptr(seg_ptr, m))
    if gather is not None:
        args.append(_arg(gather, ix))
    out_dt = TORCH_DTYPES[rows_out_dtype(inst)]
    direct = scatter is None and not inst.accumulate and _aligned(y3)
    z = y3 if direct else torch.empty((m, H, N), dtype=out_dt)
    build_llvm(inst, index_dtype)(*args, z)
    if direct:
        return Y
    if not inst.accumulate:
        if scatter is None:
            y3.copy_(z)
        else:
            y3.index_copy_(0, scatter.to(torch.int64), z)
        return Y
    # accumulate: Y (+)= Z with Z in fp32, one rounding to Y's dtype; index_add_ sums duplicate
    # scatter targets (the non-unique "atomic" case) deterministically.
    base = y3 if dt == torch.float32 else y3.float()
    if scatter is None:
        base.add_(z)
    else:
        base.index_add_(0, scatter.to(torch.int64), z)
    if base is not y3:
        y3.copy_(base)
    return Y
