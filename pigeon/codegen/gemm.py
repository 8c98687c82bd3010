"""CUDA GEMM kernels: GemmInstance (pigeon/ir/kernel.py) -> Jinja2 template -> RenderedKernel,
their host-side tile schedule and launcher, and the plain-torch reference.

Templates (pigeon/templates):

* ``gemm.simt.cu.jinja`` -- float32. Shared-memory tiles (reduction-major ``[BK][BM+4]`` and
  ``[BK][BN+4]``), global loads staged through registers one tile ahead (float4 when the
  contiguous extent is a multiple of 4), each thread accumulates a ``TM x 4`` register micro-tile.
* ``gemm.mma.cu.jinja`` -- bfloat16 / float16 on tensor cores (sm_80+): ``mma.sync.m16n8k16`` with
  fp32 accumulators, operands read from shared memory with ``ldmatrix`` (``.trans`` for operands whose
  global layout is contiguous along the tile rather than the reduction), a 2-stage ``cp.async``
  pipeline (16-byte copies with zero fill when the contiguous extent is a multiple of 8, plain
  element loads otherwise).

Both forms of the instance, one launch for all types:

* ``rows``: grid ``(row tiles, ceil(N / BN), H)``. Row tiles never straddle a segment: the host
  computes ``tile_row[i]`` (first row) and ``tile_type[i]`` (its type, -1 for padding) with
  :func:`tile_schedule` (vectorized torch, no device sync). A tile reads ``W[t, h]`` once per
  K step; gathered rows are resolved once per tile into shared memory.
* ``weight_grad``: grid ``(row chunks, ceil(K / BM) * ceil(N / BN), H)``: the rows of each segment
  are cut into chunks of ``rows_per_block`` rows (split-K over rows), each block reduces its chunk
  for one ``BM x BN`` tile of ``dW[t, h]`` and adds it with float atomicAdd into an fp32 target:
  ``dW`` itself when it is float32 (zeroed first unless ``accumulate``), else an fp32 workspace
  that is then added to / copied into ``dW`` (so bf16 / fp16 ``dW`` is rounded once).

Stores of the rows form (``GemmConfig.store``): ``"store"`` (``=``), ``"add"`` (``+=`` without
atomics: ``accumulate`` with unique destinations) and ``"atomic"`` (``accumulate`` with a
non-unique scatter: atomicAdd on float / __nv_bfloat16 / __half; bf16 / fp16 atomics round at every
addition). Without ``accumulate`` a non-unique scatter stores ("=" as the instance says: which
duplicate wins is unspecified).

Kernel names are ``pigeon_gemm_<instance key>``; the signature in the source is generated from
``RenderedKernel.params``, the list :func:`run_gemm` binds arguments from.
"""
from __future__ import annotations

import functools
import math
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..ir.fns import unary_fns
from .expr_c import fn_code
from ..ir.kernel import GemmInstance
from ..torch_dtypes import TORCH_DTYPES
from .jinja import cfloat, ctype, render
from .kernel_source import KernelParam, RenderedKernel

__all__ = [
    "GemmCodegenError", "GemmLaunchError", "GemmConfig", "GemmGrid", "kernel_name", "template_name",
    "render_gemm", "gemm_config", "epilogue_code", "apply_epilogue", "tile_schedule",
    "weight_grad_rows_per_block", "run_gemm", "gemm_reference", "build_gemm", "run_gemm_launch",
]

TEMPLATE_DTYPES = ("float32", "bfloat16", "float16")
MMA_TYPES = {"bfloat16": "bf16", "float16": "f16"}
SMEM_LIMIT = 48 * 1024          # static shared memory per block
MIN_ROWS_PER_BLOCK = 128        # weight_grad: fewest rows a block reduces before its atomics
BLOCKS_PER_SM = 4               # weight_grad: blocks to aim for per SM when choosing the row chunk


class GemmCodegenError(ValueError):
    pass


class GemmLaunchError(ValueError):
    pass


# ------------------------------------------------------------------------------ epilogue

def _parse_epilogue_op(op: str) -> tuple[str, float | None]:
    """"name" or "name:const" for a unary fn of the fn registry (pigeon/ir/fns.py)."""
    if not isinstance(op, str):
        raise GemmCodegenError(f"epilogue op {op!r} is not a string")
    name, sep, arg = op.partition(":")
    known = unary_fns()
    if name not in known:
        raise GemmCodegenError(f"unknown epilogue op {op!r}; known: {sorted(known)} (\"name\" or \"name:const\")")
    takes_c = known[name]
    if takes_c and not sep:
        raise GemmCodegenError(f"epilogue op {op!r} needs a constant, e.g. '{name}:0.2'")
    if not takes_c and sep:
        raise GemmCodegenError(f"epilogue op {name!r} takes no constant, got {op!r}")
    c = None
    if takes_c:
        try:
            c = float(arg)
        except ValueError:
            raise GemmCodegenError(f"epilogue op {op!r}: {arg!r} is not a number") from None
    return name, c


def epilogue_code(ops: Sequence[str]) -> tuple[str, ...]:
    """C statements applying ``ops`` in order to the float ``v`` (no user text reaches the code:
    names are checked against the fn registry, constants are re-printed from floats)."""
    out = []
    for op in ops:
        name, c = _parse_epilogue_op(op)
        names = {"x": "x"} if c is None else {"x": "x", "c": "c"}
        decl = "const float x = v;" if c is None else f"const float x = v, c = {cfloat(c)};"
        out.append(f"{{ {decl} v = {fn_code(name, 1, names, 'float32')}; }}  // {name}")
    return tuple(out)


def _epilogue_names(ops: Sequence[str]) -> str:
    parts = []
    for op in ops:
        name, c = _parse_epilogue_op(op)
        parts.append(name if c is None else f"{name}:{c!r}")
    return "[" + ", ".join(parts) + "]"


def apply_epilogue(y: torch.Tensor, ops: Sequence[str]) -> torch.Tensor:
    """The epilogue on a torch tensor, by pigeon.reference.unary_fn (the meaning of the names)."""
    from ..reference import unary_fn
    for op in ops:
        name, c = _parse_epilogue_op(op)
        y = unary_fn(name, y, c)
    return y


# ------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class GemmConfig:
    """What a GEMM template sees (as ``c``); see the comment at the top of each template."""
    name: str
    key: str
    summary: str
    signature: str
    form: str                 # "rows" | "weight_grad"
    variant: str              # "simt" | "mma"
    dtype: str                # C storage type of X, W, Y
    mma_type: str             # PTX type of the mma operands ("bf16" | "f16"; "" for simt)
    k: int
    n: int
    heads: int
    gather: bool
    scatter: bool
    transpose_w: bool
    store: str                # rows: "store" | "add" | "atomic"; weight_grad: "atomic" (fp32 target)
    epilogue: tuple[str, ...]
    block_m: int
    block_n: int
    block_k: int
    threads: int
    a_kcontig: bool           # A is contiguous along the reduction in global memory
    b_kcontig: bool
    vec_a: int                # elements per global load of A (1 = scalar loads)
    vec_b: int
    tm: int = 0               # simt: micro-tile rows per thread
    tn: int = 0               # simt: micro-tile columns per thread
    warps_m: int = 0          # mma: warp grid
    warps_n: int = 0


@dataclass(frozen=True)
class GemmGrid:
    """Launch grid of a GEMM kernel: ``grid(M, T, rows_per_block=None)``.

    The x extent is the tile-table length of :func:`tile_schedule`, ``M // rows_per_block + T``
    (an upper bound on the tiles; padding tiles exit at once). ``rows_per_block`` is ``block_m``
    for the rows form; the weight_grad form needs the chunk chosen by the launcher."""
    form: str
    block_m: int
    block_n: int
    k: int
    n: int
    heads: int

    def yz(self) -> tuple[int, int]:
        nt = -(-self.n // self.block_n)
        if self.form == "rows":
            return nt, self.heads
        return -(-self.k // self.block_m) * nt, self.heads

    def __call__(self, M: int, T: int, rows_per_block: int | None = None) -> tuple[int, int, int]:
        if rows_per_block is None:
            if self.form != "rows":
                raise GemmLaunchError("the weight_grad grid needs rows_per_block (see weight_grad_rows_per_block)")
            rows_per_block = self.block_m
        y, z = self.yz()
        return (max(1, int(M) // int(rows_per_block) + int(T)), y, z)


def kernel_name(inst: GemmInstance) -> str:
    return f"pigeon_gemm_{inst.key()}"


def template_name(inst: GemmInstance) -> str:
    return "gemm.simt.cu.jinja" if inst.dtype == "float32" else "gemm.mma.cu.jinja"


def _vec(width: int, extent: int, tile_extent: int) -> int:
    return width if extent % width == 0 and tile_extent % width == 0 else 1


def _warp_grid(warps: int, bm: int, bn: int) -> tuple[int, int]:
    best = None
    for wm in range(1, warps + 1):
        if warps % wm:
            continue
        wn = warps // wm
        if bm % wm or bn % wn or (bm // wm) % 16 or (bn // wn) % 16:
            continue
        score = abs(math.log2((bm // wm) / (bn // wn)))
        if best is None or score < best[0]:
            best = (score, wm, wn)
    if best is None:
        raise GemmCodegenError(f"tile {bm}x{bn} cannot be split over {warps} warps into warp tiles that are "
                               "multiples of 16x16 (the mma template needs them)")
    return best[1], best[2]


def _check_instance(inst: GemmInstance) -> None:
    if not isinstance(inst, GemmInstance):
        raise GemmCodegenError(f"expected a GemmInstance, got {type(inst).__name__}")
    if inst.form not in ("rows", "weight_grad"):
        raise GemmCodegenError(f"unknown GEMM form {inst.form!r}")
    if inst.dtype not in TEMPLATE_DTYPES:
        raise GemmCodegenError(f"GEMM dtype {inst.dtype!r}: the templates cover {sorted(TEMPLATE_DTYPES)}")
    if inst.acc_dtype != "float32":
        raise GemmCodegenError(f"GEMM acc_dtype {inst.acc_dtype!r}: only float32")
    for what in ("k", "n", "heads"):
        v = getattr(inst, what)
        if not isinstance(v, int) or v < 1:
            raise GemmCodegenError(f"GEMM {what} must be a positive int, got {v!r}")
    if inst.heads * inst.k * inst.n >= 2**31 or inst.heads > 65535:
        raise GemmCodegenError(f"GEMM H*K*N = {inst.heads}*{inst.k}*{inst.n} is too large for one weight block")
    if inst.form == "weight_grad" and inst.epilogue:
        raise GemmCodegenError("a weight_grad GEMM has no epilogue (its rows are reduced by several blocks)")
    t = inst.tile
    if t.block_m < 1 or t.block_n < 1 or t.block_k < 1 or t.warps < 1 or t.warps > 32:
        raise GemmCodegenError(f"bad tile config {t}")


def gemm_config(inst: GemmInstance, params: Sequence[KernelParam] = ()) -> GemmConfig:
    """The template config of ``inst`` (raises GemmCodegenError for what the templates cannot do)."""
    _check_instance(inst)
    t = inst.tile
    bm, bn, bk, threads = t.block_m, t.block_n, t.block_k, 32 * t.warps
    K, N = inst.k, inst.n
    rows = inst.form == "rows"
    # operand A: rows -> X rows (contiguous in k); weight_grad -> X^T (contiguous along dW's rows)
    # operand B: rows -> W (contiguous in n, or in k when transposed); weight_grad -> dY (in n)
    a_kcontig = rows
    b_kcontig = rows and inst.transpose_w
    a_extent = K                                   # the contiguous global extent of each operand
    b_extent = K if b_kcontig else N
    a_tile_c = bk if a_kcontig else bm             # ... and of its tile
    b_tile_c = bk if b_kcontig else bn
    if rows:
        store = "atomic" if inst.accumulate and inst.scatter and not inst.scatter_unique else (
            "add" if inst.accumulate else "store")
    else:
        store = "atomic"
    extra: dict[str, int] = {}
    if inst.dtype == "float32":
        variant, mma_type = "simt", ""
        tn = 4
        if bn % tn or threads % (bn // tn):
            raise GemmCodegenError(f"simt tile: block_n={bn} must be a multiple of 4 with {threads} threads "
                                   f"a multiple of block_n/4")
        ty = threads // (bn // tn)
        if bm % ty:
            raise GemmCodegenError(f"simt tile: block_m={bm} is not a multiple of the {ty} thread rows "
                                   f"({threads} threads, block_n={bn})")
        extra = dict(tm=bm // ty, tn=tn)
        vec_a, vec_b = _vec(4, a_extent, a_tile_c), _vec(4, b_extent, b_tile_c)
        smem = 4 * bk * (bm + 4 + bn + 4) + (16 * bm if rows else 0)
    else:
        variant, mma_type = "mma", MMA_TYPES[inst.dtype]
        if bk % 16:
            raise GemmCodegenError(f"mma tile: block_k={bk} must be a multiple of 16")
        wm, wn = _warp_grid(t.warps, bm, bn)
        extra = dict(warps_m=wm, warps_n=wn)
        vec_a, vec_b = _vec(8, a_extent, a_tile_c), _vec(8, b_extent, b_tile_c)
        a_elems = (bm * (bk + 8)) if a_kcontig else (bk * (bm + 8))
        b_elems = (bn * (bk + 8)) if b_kcontig else (bk * (bn + 8))
        smem = 2 * 2 * (a_elems + b_elems) + (16 * bm if rows else 0)
    grid_y = -(-N // bn) * (1 if rows else -(-K // bm))
    if grid_y > 65535:
        raise GemmCodegenError(f"{grid_y} column tiles exceed the grid's y limit (65535): use a larger tile")
    if smem > SMEM_LIMIT:
        raise GemmCodegenError(f"tile {bm}x{bn}x{bk} needs {smem} bytes of static shared memory (limit {SMEM_LIMIT})")
    flags = [f for f, on in (("gather", inst.gather), ("scatter", inst.scatter), ("transpose_w", inst.transpose_w),
                             ("accumulate", inst.accumulate)) if on]
    summary = (f"{inst.form} {variant} {inst.dtype} K={K} N={N} H={inst.heads} typed={inst.typed} "
               f"[{', '.join(flags) or 'plain'}] store={store} epilogue={_epilogue_names(inst.epilogue)} tile={bm}x{bn}x{bk}/{t.warps}w")
    return GemmConfig(
        name=kernel_name(inst), key=inst.key(), summary=summary, signature=", ".join(p.c for p in params),
        form=inst.form, variant=variant, dtype=ctype(inst.dtype), mma_type=mma_type, k=K, n=N, heads=inst.heads,
        gather=inst.gather, scatter=inst.scatter, transpose_w=inst.transpose_w, store=store,
        epilogue=epilogue_code(inst.epilogue), block_m=bm, block_n=bn, block_k=bk, threads=threads,
        a_kcontig=a_kcontig, b_kcontig=b_kcontig, vec_a=vec_a, vec_b=vec_b, **extra)


def _params(inst: GemmInstance) -> tuple[KernelParam, ...]:
    T = ctype(inst.dtype)
    p = []
    if inst.form == "rows":
        p += [KernelParam("X", "ptr", f"const {T}* __restrict__", "tensor:x"),
              KernelParam("W", "ptr", f"const {T}* __restrict__", "tensor:w"),
              KernelParam("Y", "ptr", f"{T}* __restrict__", "tensor:y")]
    else:
        p += [KernelParam("X", "ptr", f"const {T}* __restrict__", "tensor:x"),
              KernelParam("dY", "ptr", f"const {T}* __restrict__", "tensor:dy"),
              KernelParam("dW", "ptr", "float* __restrict__", "tensor:dw_f32")]
    p.append(KernelParam("seg_ptr", "ptr", "const int* __restrict__", "index:seg_ptr"))
    if inst.gather:
        p.append(KernelParam("gather", "ptr", "const int* __restrict__", "index:gather"))
    if inst.scatter:
        p.append(KernelParam("scatter", "ptr", "const int* __restrict__", "index:scatter"))
    p += [KernelParam("tile_row", "ptr", "const int* __restrict__", "schedule:tile_row"),
          KernelParam("tile_type", "ptr", "const int* __restrict__", "schedule:tile_type"),
          KernelParam("num_rows", "int32", "int", "size:M")]
    if inst.form == "weight_grad":
        p.append(KernelParam("rows_per_block", "int32", "int", "size:rows_per_block"))
    return tuple(p)


@functools.lru_cache(maxsize=4096)
def render_gemm(inst: GemmInstance) -> RenderedKernel:
    """The CUDA kernel of ``inst`` (cached per instance)."""
    params = _params(inst)
    cfg = gemm_config(inst, params)
    template = template_name(inst)
    source = render(template, cfg)
    t = inst.tile
    grid = GemmGrid(inst.form, t.block_m, t.block_n, inst.k, inst.n, inst.heads)
    meta = {"instance_key": inst.key(), "template": template, "variant": cfg.variant, "store": cfg.store,
            "tile": (t.block_m, t.block_n, t.block_k, t.warps), "vec": (cfg.vec_a, cfg.vec_b),
            "micro_tile": (cfg.tm, cfg.tn) if cfg.variant == "simt" else None,
            "warp_grid": (cfg.warps_m, cfg.warps_n) if cfg.variant == "mma" else None}
    return RenderedKernel(name=cfg.name, source=source, params=params, block=(cfg.threads, 1, 1), grid=grid,
                          template=template, meta=meta)


# ------------------------------------------------------------------------------ tile schedule

def tile_schedule(seg_ptr: torch.Tensor, block_m: int, M: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row tiles that never straddle a segment: ``(tile_row, tile_type, num_tiles)``.

    Segment ``t`` (rows ``seg_ptr[t] .. seg_ptr[t+1]``) gets ``ceil(len_t / block_m)`` tiles; tile
    ``i`` starts at row ``tile_row[i]`` and has type ``tile_type[i]``. The table has
    ``num_tiles = M // block_m + T`` entries (an upper bound on ``sum ceil(len_t / block_m)`` when
    ``seg_ptr[-1] <= M``), so it is computed on the device without a sync; entries past the
    real tiles have ``tile_type = -1`` (the kernel returns at once). int32, on seg_ptr's device.
    ``M`` defaults to ``seg_ptr[-1]`` (one device sync).
    """
    if seg_ptr.dim() != 1 or seg_ptr.numel() < 1:
        raise GemmLaunchError(f"seg_ptr must be a 1-D tensor [T+1], got shape {list(seg_ptr.shape)}")
    block_m = int(block_m)
    if block_m < 1:
        raise GemmLaunchError(f"block_m must be positive, got {block_m}")
    dev = seg_ptr.device
    seg = seg_ptr.to(torch.int64)
    T = seg.numel() - 1
    if M is None:
        M = int(seg[-1].item())
    U = max(0, int(M)) // block_m + T
    if U == 0 or T == 0:
        return (torch.zeros(U, dtype=torch.int32, device=dev), torch.full((U,), -1, dtype=torch.int32, device=dev), U)
    lens = (seg[1:] - seg[:-1]).clamp_min(0)
    ntiles = (lens + (block_m - 1)) // block_m
    cum = torch.cumsum(ntiles, 0)                               # inclusive
    ids = torch.arange(U, dtype=torch.int64, device=dev)
    ttype = torch.searchsorted(cum, ids, right=True)            # first type whose tiles end past id
    valid = ttype < T
    tc = ttype.clamp(max=T - 1)
    first = cum[tc] - ntiles[tc]                                # first tile id of that type
    row = seg[tc] + (ids - first) * block_m
    tile_type = torch.where(valid, ttype, torch.full_like(ttype, -1)).to(torch.int32)
    tile_row = torch.where(valid, row, torch.zeros_like(row)).to(torch.int32)
    return tile_row, tile_type, U


class _ScheduleCache:
    """tile_schedule results keyed by the seg_ptr tensor object (identity + version), so a graph's
    segment table is scheduled once per block size; entries die with their tensor."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: dict[tuple, tuple[Any, tuple]] = {}

    def get(self, seg_ptr: torch.Tensor, block: int, M: int):
        key = (id(seg_ptr), seg_ptr._version, seg_ptr.data_ptr(), block, M)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is seg_ptr:
            return hit[1]
        res = tile_schedule(seg_ptr, block, M)
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = (weakref.ref(seg_ptr), res)
        return res


_SCHEDULES = _ScheduleCache()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def weight_grad_rows_per_block(inst: GemmInstance, M: int, sm_count: int = 132) -> int:
    """Rows each weight_grad block reduces: enough chunks for about BLOCKS_PER_SM blocks per SM
    over the (K tile, N tile, head) grid, at least MIN_ROWS_PER_BLOCK, a multiple of block_k."""
    t = inst.tile
    yz = -(-inst.k // t.block_m) * -(-inst.n // t.block_n) * inst.heads
    chunks = max(1, (BLOCKS_PER_SM * sm_count) // yz)
    rows = max(MIN_ROWS_PER_BLOCK, -(-max(int(M), 1) // chunks))
    return -(-rows // t.block_k) * t.block_k


# ------------------------------------------------------------------------------ launching

def _fail(rk: RenderedKernel, inst: GemmInstance, msg: str) -> GemmLaunchError:
    return GemmLaunchError(f"{rk.name} ({inst.form}, {inst.dtype}): {msg}")


def _check_matrix(rk, inst, what: str, t: Any, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[rows, *] tensor whose trailing dims hold ``width`` elements per row; returns the [rows, width] view."""
    if not isinstance(t, torch.Tensor):
        raise _fail(rk, inst, f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise _fail(rk, inst, f"{what} has dtype {t.dtype}, the instance needs {dtype}")
    if t.device != device:
        raise _fail(rk, inst, f"{what} is on {t.device}, expected {device} (all operands on one CUDA device)")
    if t.dim() < 2 or math.prod(t.shape[1:]) != width:
        raise _fail(rk, inst, f"{what} has shape {list(t.shape)}; expected [rows, {width}] or [rows, H, ...] "
                              f"with {width} elements per row")
    if not t.is_contiguous():
        raise _fail(rk, inst, f"{what} must be contiguous (row-major); call .contiguous() first")
    return t.view(t.shape[0], width)


def _check_index(rk, inst, what: str, t: Any, n: int | None, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _fail(rk, inst, f"{what} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != 1:
        raise _fail(rk, inst, f"{what} must be a 1-D int32 tensor, got {t.dtype} of shape {list(t.shape)}")
    if t.device != device:
        raise _fail(rk, inst, f"{what} is on {t.device}, expected {device}")
    if n is not None and t.numel() != n:
        raise _fail(rk, inst, f"{what} has {t.numel()} entries, expected {n}")
    return t.contiguous()


def _aligned_input(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _checks_enabled(check: bool | None) -> bool:
    if check is not None:
        return check
    return os.environ.get("PIGEON_CHECK_INDICES", "") not in ("", "0")


def _check_values(rk, inst, seg_ptr, M, gather, g_rows, scatter, s_rows) -> None:
    s = seg_ptr.to(torch.int64)
    if int(s[0]) != 0 or int(s[-1]) != M or bool((s[1:] < s[:-1]).any()):
        raise _fail(rk, inst, f"seg_ptr must be non-decreasing from 0 to M = {M}, got {s.tolist()[:8]}...")
    for what, idx, n in (("gather", gather, g_rows), ("scatter", scatter, s_rows)):
        if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise _fail(rk, inst, f"{what} values must lie in [0, {n}), got [{int(idx.min())}, {int(idx.max())}]")


def _function(fn: Any, name: str) -> Any:
    if hasattr(fn, "launch"):
        return fn
    if hasattr(fn, "function"):
        return fn.function(name)
    raise TypeError(f"expected a CudaModule or CudaFunction, got {type(fn).__name__}")


def run_gemm(inst: GemmInstance, fn: Any, X: torch.Tensor, W: torch.Tensor, seg_ptr: torch.Tensor | None,
             gather: torch.Tensor | None, scatter: torch.Tensor | None, Y: torch.Tensor, *,
             rows_per_block: int | None = None, check: bool | None = None, stream: Any = None) -> torch.Tensor:
    """Run the kernel of ``inst`` (``fn``: the CudaModule built from ``render_gemm(inst).source`` or
    its function) with the GemmInstance semantics; returns the tensor written.

    rows: reads X [MX, H, K] (or [MX, H*K]) and W ([T, H, K, N], [T, H, N, K] with transpose_w; any
    shape with T*H*K*N elements), writes Y [MY, H, N] in place. weight_grad (as in GemmLaunch):
    ``W`` is the *output* dW [T, H, K, N] and ``Y`` the input dY [MY, H, N].
    ``seg_ptr``: int32 [T+1] (None when untyped: [0, M]); ``gather`` / ``scatter``: int32 [M] or
    None, matching the instance. M is the gather length, else X's row count.
    ``rows_per_block``: weight_grad row chunk (default :func:`weight_grad_rows_per_block`).
    ``check``: verify seg_ptr and index ranges on the host (syncs; default $PIGEON_CHECK_INDICES).
    """
    rk = render_gemm(inst)
    H, K, N = inst.heads, inst.k, inst.n
    dt = TORCH_DTYPES[inst.dtype]
    if (gather is not None) != inst.gather or (scatter is not None) != inst.scatter:
        raise _fail(rk, inst, f"instance has gather={inst.gather} scatter={inst.scatter}; got "
                              f"gather={'a tensor' if gather is not None else None} "
                              f"scatter={'a tensor' if scatter is not None else None}")
    if not isinstance(X, torch.Tensor):
        raise _fail(rk, inst, f"X must be a torch.Tensor, got {type(X).__name__}")
    dev = X.device
    wg = inst.form == "weight_grad"
    x2 = _check_matrix(rk, inst, "X", X, H * K, dt, dev)
    y2 = _check_matrix(rk, inst, "dY" if wg else "Y", Y, H * N, dt, dev)
    M = gather.numel() if gather is not None else x2.shape[0]
    if gather is not None:
        gather = _check_index(rk, inst, "gather", gather, None, dev)
    elif x2.shape[0] != M:  # pragma: no cover - M is X's rows here
        raise _fail(rk, inst, f"X has {x2.shape[0]} rows, expected M = {M}")
    if scatter is not None:
        scatter = _check_index(rk, inst, "scatter", scatter, M, dev)
    elif y2.shape[0] != M:
        raise _fail(rk, inst, f"{'dY' if wg else 'Y'} has {y2.shape[0]} rows, expected M = {M} "
                              f"({'gather length' if gather is not None else 'rows of X'})")
    if seg_ptr is None:
        if inst.typed:
            raise _fail(rk, inst, "a typed instance needs seg_ptr")
        seg_ptr = torch.tensor([0, M], dtype=torch.int32, device=dev)
    seg_ptr = _check_index(rk, inst, "seg_ptr", seg_ptr, None, dev)
    T = seg_ptr.numel() - 1
    if T < 1:
        raise _fail(rk, inst, "seg_ptr needs at least 2 entries ([T+1], T >= 1)")
    if not inst.typed and T != 1:
        raise _fail(rk, inst, f"an untyped instance has one segment: seg_ptr is [0, M], got {T} segments")
    if not isinstance(W, torch.Tensor) or W.dtype != dt or W.device != dev:
        raise _fail(rk, inst, f"{'dW' if wg else 'W'} must be a {dt} tensor on {dev}, got "
                              f"{getattr(W, 'dtype', type(W).__name__)} on {getattr(W, 'device', '?')}")
    wlast = (N, K) if inst.transpose_w else (K, N)
    if W.numel() != T * H * K * N or W.dim() < 2 or tuple(W.shape[-2:]) != wlast:
        raise _fail(rk, inst, f"{'dW' if wg else 'W'} has shape {list(W.shape)}, expected [T={T}, H={H}, "
                              f"{wlast[0]}, {wlast[1]}] ({T * H * K * N} elements)")
    if not W.is_contiguous():
        raise _fail(rk, inst, f"{'dW' if wg else 'W'} must be contiguous")
    if dev.type != "cuda":
        raise _fail(rk, inst, f"the operands are on {dev}; the kernel needs CUDA tensors "
                              "(gemm_reference runs the same semantics on any device)")
    if _checks_enabled(check):
        _check_values(rk, inst, seg_ptr, M, gather, x2.shape[0], scatter, y2.shape[0])
    launcher = _function(fn, rk.name)
    x_arg = _aligned_input(x2)
    if not wg:
        if Y.data_ptr() % 16:
            raise _fail(rk, inst, "Y must be 16-byte aligned (it is written with vector stores); pass a fresh tensor")
        if M == 0:
            return Y
        tile_row, tile_type, U = _SCHEDULES.get(seg_ptr, inst.tile.block_m, M)
        grid = rk.grid(M, T)
        assert grid[0] == U
        tensors = {"x": x_arg, "w": _aligned_input(W), "y": Y}
        sizes = {"M": M}
        target, workspace = Y, None
    else:
        dw = W
        if dw.dtype == torch.float32 and dw.data_ptr() % 16 == 0:
            target, workspace = dw, None
            if not inst.accumulate:
                dw.zero_()
        else:
            target = workspace = torch.zeros(dw.shape, dtype=torch.float32, device=dev)
        if M > 0:
            sm = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
            rpb = int(rows_per_block) if rows_per_block is not None else weight_grad_rows_per_block(inst, M, sm)
            if rpb < 1:
                raise _fail(rk, inst, f"rows_per_block must be positive, got {rpb}")
            tile_row, tile_type, U = _SCHEDULES.get(seg_ptr, rpb, M)
            grid = rk.grid(M, T, rpb)
            assert grid[0] == U
            tensors = {"x": x_arg, "dy": _aligned_input(y2), "dw_f32": target}
            sizes = {"M": M, "rows_per_block": rpb}
    if M > 0:
        index = {"seg_ptr": seg_ptr, "gather": gather, "scatter": scatter}
        sched = {"tile_row": tile_row, "tile_type": tile_type}
        args = []
        for p in rk.params:
            kind, what = p.role.split(":", 1)
            args.append({"tensor": tensors, "index": index, "schedule": sched, "size": sizes}[kind][what])
        launcher.launch(grid, rk.block, args, rk.ctypes, stream=stream)
    if wg and workspace is not None:
        if inst.accumulate:
            W.copy_(W.float() + workspace)
        else:
            W.copy_(workspace)
    return W if wg else Y


# ------------------------------------------------------------------------------ reference

def gemm_reference(inst: GemmInstance, X: torch.Tensor, W: torch.Tensor, seg_ptr: torch.Tensor | None,
                   gather: torch.Tensor | None, scatter: torch.Tensor | None, Y: torch.Tensor,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The GemmInstance semantics in plain torch, one type at a time; same arguments as
    :func:`run_gemm` (weight_grad: ``W`` is the output dW, ``Y`` the input dY). Computes in
    ``compute_dtype`` and rounds each result to the instance dtype once. Returns the tensor written.
    """
    H, K, N = inst.heads, inst.k, inst.n
    cd = compute_dtype
    dt = TORCH_DTYPES[inst.dtype]
    if (gather is not None) != inst.gather or (scatter is not None) != inst.scatter:
        raise ValueError(f"instance has gather={inst.gather} scatter={inst.scatter}")
    for what, t in (("X", X), ("W", W), ("Y", Y)):
        if t.dtype != dt:
            raise TypeError(f"{what} is {t.dtype}, the instance is {inst.dtype}")
    x3 = X.reshape(X.shape[0], H, K)
    M = gather.numel() if gather is not None else x3.shape[0]
    if seg_ptr is None:
        seg = [0, M]
    else:
        seg = [int(v) for v in seg_ptr.tolist()]
    T = len(seg) - 1
    if seg[-1] > M:
        raise ValueError(f"seg_ptr ends at {seg[-1]} past M = {M}")
    dev = X.device
    g = gather.to(dev, torch.int64) if gather is not None else None
    s = scatter.to(dev, torch.int64) if scatter is not None else None
    wshape = (T, H, N, K) if inst.transpose_w else (T, H, K, N)

    if inst.form == "weight_grad":
        dy3 = Y.reshape(Y.shape[0], H, N)
        dw = W.view(wshape)
        for t in range(T):
            r = torch.arange(seg[t], seg[t + 1], device=dev)
            a = x3[g[r] if g is not None else r].to(cd)                 # [m, H, K]
            b = dy3[s[r] if s is not None else r].to(cd)                # [m, H, N]
            grad = torch.einsum("mhk,mhn->hkn", a, b)                   # [H, K, N]
            if inst.transpose_w:
                grad = grad.transpose(-1, -2)
            if inst.accumulate:
                grad = dw[t].to(cd) + grad
            dw[t] = grad.to(dt)
        return W

    w4 = W.reshape(wshape)
    y3 = Y.view(Y.shape[0], H, N)
    atomic = inst.accumulate and s is not None and not inst.scatter_unique
    acc = y3.to(cd) if atomic else None                                 # sums duplicate destinations
    for t in range(T):
        r = torch.arange(seg[t], seg[t + 1], device=dev)
        if r.numel() == 0:
            continue
        a = x3[g[r] if g is not None else r].to(cd)                     # [m, H, K]
        w = w4[t].to(cd)
        if inst.transpose_w:
            w = w.transpose(-1, -2)                                     # [H, K, N]
        y = apply_epilogue(torch.einsum("mhk,hkn->mhn", a, w), inst.epilogue)
        dst = s[r] if s is not None else r
        if atomic:
            acc.index_add_(0, dst, y)
        elif inst.accumulate:
            y3[dst] = (y3[dst].to(cd) + y).to(dt)
        else:
            y3[dst] = y.to(dt)
    if atomic:
        y3.copy_(acc.to(dt))
    return Y


# ------------------------------------------------------------------------------ build and program launch

def build_gemm(inst: GemmInstance, arch: str | None = None, device: Any = None, cache: Any = None) -> Any:
    """Build (disk cache) and load the kernel of ``inst``: a runtime CudaModule on ``device``."""
    from ..runtime.build import build_kernel, device_arch
    from ..runtime.launch import load_module
    rk = render_gemm(inst)
    arch = arch or device_arch(device)
    if arch is None:
        raise GemmLaunchError("no CUDA device to build the GEMM kernel for")
    entry = build_kernel(rk.source, arch, cache=cache, name=rk.name)
    return load_module(entry, device)


def run_gemm_launch(launch: Any, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kg: Any,
                    backend: Any = None) -> torch.Tensor:
    """Run a GemmLaunch of a kernel program (pigeon/codegen/lower.py) on the graph ``kg``.
    ``backend`` (runtime.program.CudaBackend) supplies ``arch`` and a per-backend module dict."""
    from ..runtime.program import gemm_operands
    inst = launch.inst
    rk = render_gemm(inst)
    modules = getattr(backend, "_modules", None)
    mod = modules.get(rk.name) if modules is not None else None
    if mod is None:
        mod = build_gemm(inst, getattr(backend, "arch", None), x.device)
        if modules is not None:
            modules[rk.name] = mod
    ops = gemm_operands(launch, kg)
    return run_gemm(inst, mod, x, w, ops["seg_ptr"], ops["gather"], ops["scatter"], y)
