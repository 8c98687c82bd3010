"""Running the TVM candidate of a dense GEMM launch (pigeon/codegen/tvm_gemm.py) on a GPU, or its
CUDA text emulated on a CPU (tests).

TVM is not on the GPU machine, so the kernel's CUDA source and launch extents travel in the kernel
cache, as the ShiftAdd family's do: where TVM is installed :func:`record` generates them (dlight's
Matmul rule, ``tvm.compile`` with CSE off so the kernel takes only its buffers and M) and stores
them with ``KernelCache.put_record`` under :func:`source_key` (kernel, arch, pigeon's version,
the definition's digest); elsewhere the record is read back, and without one
:class:`TvmGemmMissing` names the prebuild command that makes it.  Nothing falls back to the
template: a launch that asked for TVM runs TVM's kernel or fails (``--tune`` then reports the
candidate as excluded, with this message).

A launch binds ``x``, ``w``, ``y`` and ``M`` by the parameter names of the generated signature
(checked against :data:`PARAMS`); grid and block are the recorded extents evaluated at M."""
from __future__ import annotations

from typing import Any

import torch

from ..codegen.kernel_source import KernelParam, RenderedKernel
from ..codegen.tvm_gemm import TvmGemm, definition_digest, eval_extent, launch_extents
from ..ir.kernel import GemmInstance
from ..torch_dtypes import TORCH_DTYPES
from .cache import KernelCache, pigeon_version
from .tvm_cuda import recorded, source_key as _source_key, tvm_available

SOURCE_FORMAT = "pigeon-tvm-gemm-source-v1"
PARAMS = (("w", True), ("x", True), ("y", True), ("M", False))     # TVM's order: buffers by name, then M
_CTYPE = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}


class TvmGemmMissing(RuntimeError):
    """The TVM GEMM's source is neither recorded in the kernel cache nor can TVM make it here."""


class TvmGemmError(ValueError):
    """Bad operands for the TVM GEMM, or an instance it does not cover."""


def kernel_of(inst: GemmInstance) -> TvmGemm:
    why = inst.not_dense() or (f"form {inst.form}" if inst.form != "rows" else None)
    if why:
        raise TvmGemmError(f"the TVM GEMM covers untyped rows-form GEMMs without gather, scatter, heads, "
                           f"epilogue or accumulation; this one: {why}")
    return TvmGemm(inst.k, inst.n, inst.transpose_w, inst.dtype)


def source_key(g: TvmGemm, arch: str) -> str:
    return _source_key(SOURCE_FORMAT, g.describe(), arch, definition_digest())


def prebuild_command(cache: KernelCache, arch: str, dims: str = "64,128") -> str:
    return (f"PIGEON_CACHE_DIR={cache.root} python scripts/prebuild_kernels.py --tvm-gemm only --dims {dims} "
            f"--arch {arch}")


def record(g: TvmGemm, arch: str = "sm_90", cache: KernelCache | None = None) -> dict:
    """``{"source", "grid", "block", ...}`` of ``g`` for ``arch``: the cache's record, else made by TVM
    and recorded."""
    cache = cache if cache is not None else KernelCache()

    def make() -> dict:
        import tvm
        from .tvm_cuda import cuda_source, cuda_target
        mod = g.scheduled(cuda_target(arch))
        rec = {"source": cuda_source(mod, arch, cse=False), **launch_extents(mod, g.symbol), "kernel": g.describe(),
               "arch": arch, "tvm": tvm.__version__, "pigeon": pigeon_version(), "format": SOURCE_FORMAT}
        rendered_kernel(g, rec)                   # the signature is what the launcher expects
        return rec

    def missing() -> Exception:
        return TvmGemmMissing(
            f"TVM GEMM {g.symbol} for {arch}: no CUDA source recorded in the kernel cache {cache.root} and TVM is "
            f"not installed to generate it; on a machine with TVM run `{prebuild_command(cache, arch)}` and "
            f"carry the cache")
    return recorded(cache, source_key(g, arch), tvm_available(), make, missing)


def rendered_kernel(g: TvmGemm, rec: dict) -> RenderedKernel:
    """The record as a RenderedKernel: parameters from the generated signature, checked against PARAMS."""
    from .tvm_cuda import SignatureError, kernel_params
    try:
        parsed = kernel_params(rec["source"], g.kernel_name)
    except SignatureError as e:
        raise TvmGemmError(str(e)) from None
    got = tuple((name[:-4] if ptr and name.endswith("_ptr") else name, ptr) for _, ptr, name in parsed)
    if got != PARAMS:
        raise TvmGemmError(f"{g.kernel_name}: generated parameters {got} differ from the launcher's {PARAMS} "
                           f"(a TVM that orders or names them otherwise?)")
    for elem, ptr, name in parsed:
        if ptr and elem != g.dtype or not ptr and elem != "int32":
            raise TvmGemmError(f"{g.kernel_name}: parameter {name} is {elem}")
    params = tuple(KernelParam(name, "ptr", f"{_CTYPE[g.dtype]}* __restrict__", f"buffer:{name[:-4]}:{elem}") if ptr
                   else KernelParam(name, "int32", "int", f"size:{name}") for elem, ptr, name in parsed)
    grid_t, block = rec["grid"], tuple(int(b) for b in rec["block"])
    return RenderedKernel(name=g.kernel_name, source=rec["source"], params=params, block=block,
                          grid=lambda sizes: tuple(max(1, eval_extent(t, sizes)) for t in grid_t),
                          template="tvm:dlight.gpu.Matmul", meta={"kernel": g.describe()})


_RENDERED: dict = {}     # (symbol, arch) -> RenderedKernel: the record is read from disk once per process


def rendered_for(inst: GemmInstance, arch: str = "sm_90", cache: KernelCache | None = None) -> RenderedKernel:
    """The TVM kernel of a dense ``inst`` for ``arch`` (the kernel family's ``render`` of a TVM launch)."""
    g = kernel_of(inst)
    rk = _RENDERED.get((g.symbol, arch)) if cache is None else None
    if rk is None:
        rk = rendered_kernel(g, record(g, arch, cache))
        if cache is None:
            _RENDERED[(g.symbol, arch)] = rk
    return rk


def run(rk: RenderedKernel, fn: Any, inst: GemmInstance, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y[M, n] = x[M, k] @ w`` (``w^T`` with ``transpose_w``) with the TVM kernel ``fn`` (something with
    ``.launch(grid, block, args, types)``: a CUDA function, or an emulated one on CPU tensors)."""
    dt = TORCH_DTYPES[inst.dtype]
    wshape = (inst.n, inst.k) if inst.transpose_w else (inst.k, inst.n)
    for what, t, cols in (("x", x, inst.k), ("y", y, inst.n)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 2 or t.shape[1] != cols:
            raise TvmGemmError(f"{rk.name}: {what} must be a [M, {cols}] {dt} tensor, got "
                               f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if w.dtype != dt or w.numel() != inst.k * inst.n or tuple(w.shape[-2:]) != wshape:
        raise TvmGemmError(f"{rk.name}: w must be {list(wshape)} {dt}, got {w.dtype} {list(w.shape)}")
    M = x.shape[0]
    if y.shape[0] != M:
        raise TvmGemmError(f"{rk.name}: y has {y.shape[0]} rows, x has {M}")
    if not (x.device == w.device == y.device):
        raise TvmGemmError(f"{rk.name}: operands on {x.device}, {w.device}, {y.device}")
    if M * max(inst.k, inst.n) >= 1 << 31:
        raise TvmGemmError(f"{rk.name}: {M} rows: the kernel indexes with int32")
    if not y.is_contiguous():
        raise TvmGemmError(f"{rk.name}: y must be contiguous")
    if M == 0:
        return y
    # in PARAMS order, which rendered_kernel checked the generated signature against
    fn.launch(rk.grid({"M": M}), rk.block, [w.contiguous(), x.contiguous(), y, M], rk.ctypes)
    return y


def run_launch(launch: Any, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, backend: Any = None) -> torch.Tensor:
    """A GemmLaunch with ``backend="tvm"`` of a kernel program, on its CUDA device; ``backend``
    (runtime.program.CudaBackend) supplies ``arch`` and its per-backend module dict (by kernel name,
    as the template's)."""
    from .build import build_kernel, device_arch
    from .launch import load_module
    inst = launch.inst
    arch = getattr(backend, "arch", None) or device_arch(x.device)
    rk = rendered_for(inst, arch)
    modules = getattr(backend, "_modules", None)
    mod = modules.get(rk.name) if modules is not None else None
    if mod is None:
        mod = load_module(build_kernel(rk.source, arch, name=rk.name), x.device)
        if modules is not None:
            modules[rk.name] = mod
    w2 = w.reshape((inst.n, inst.k) if inst.transpose_w else (inst.k, inst.n))
    return run(rk, mod.function(rk.name), inst, x.reshape(-1, inst.k), w2, y.view(-1, inst.n))
