"""The GEMM kernel family: segment / gather / scatter matmul with one weight per type
(pigeon/ir/kernel.py GemmInstance).  Its one registry entry (bottom of this file) gives the
executor, the artifacts, the serializer and the torch op everything they need: validation and
rendering (pigeon/codegen/gemm.py, the CUDA templates), the semantics (``gemm_reference``, the
oracle of an instance), the launcher (build, tile schedule, argument checks) and its torch op
(``pigeon::gemm``, pigeon/runtime/kernel_ops.py).
"""
from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Any

import torch

from ..codegen.gemm import (BLOCKS_PER_SM, MIN_ROWS_PER_BLOCK, GemmLaunchError, as_epilogue, check_instance,
                             f32_accumulator, render_gemm)
from ..codegen.kernel_source import RenderedKernel
from ..ir.kernel import GemmInstance, TileConfig
from ..ir.program import GemmLaunch
from ..semantics import eval_expr
from ..torch_dtypes import TORCH_DTYPES
from .family import KernelFamily, register_family

def apply_epilogue(y: torch.Tensor, ep) -> torch.Tensor:
    """The epilogue expression (or fn names) on the accumulator tensor, by the fns' torch forms."""
    e = as_epilogue(ep)
    if e is None:
        return y
    flat = y.reshape(-1)          # the epilogue is scalar: every element is one row

    def leaf(n):
        if n.op != "var" or n.fn != "acc":
            raise ValueError(f"a GEMM epilogue reads only var('acc'), got {n.op} {n.fn!r}")
        return flat
    return eval_expr(e, flat.numel(), leaf, y.device).reshape(y.shape).to(y.dtype)


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
        target, workspace = Y, None
        if f32_accumulator(inst):     # 16-bit atomics would round at every addition: sum in fp32, round once
            target = workspace = Y.float()
        tensors = {"x": x_arg, "w": _aligned_input(W), "y": Y, "y_f32": target}
        sizes = {"M": M}
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
    elif workspace is not None:
        Y.copy_(workspace)
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
    for what, t, want in (("X", X, inst.dtype), ("W", W, inst.dtype), ("Y", Y, inst.out_dtype)):
        if t.dtype != TORCH_DTYPES[want]:
            raise TypeError(f"{what} is {t.dtype}, the instance has {want}")
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
    dt = TORCH_DTYPES[inst.out_dtype]
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
    from .build import build_kernel, device_arch
    from .launch import load_module
    rk = render_gemm(inst)
    arch = arch or device_arch(device)
    if arch is None:
        raise GemmLaunchError("no CUDA device to build the GEMM kernel for")
    entry = build_kernel(rk.source, arch, cache=cache, name=rk.name)
    return load_module(entry, device)


def gemm_operands(launch: GemmLaunch, kg: Any) -> dict[str, Any]:
    """Graph arrays of a GEMM launch: segment pointers, gather/scatter index lists, row count."""
    rows = launch.rows
    M = {"edge": kg.num_edges, "node": kg.num_nodes, "compact": kg.num_compact, "etype": kg.num_etypes,
         "ntype": kg.num_ntypes, "compact_dst": kg.num_compact_dst}[rows]
    if launch.seg == "etype" and rows in ("etype", "ntype"):
        raise GemmLaunchError("a GEMM over per-type rows is untyped (seg 'all')")
    if launch.seg == "etype":
        seg = {"compact": kg.compact_etype_ptr, "compact_dst": kg.compact_dst_etype_ptr}.get(rows, kg.etype_ptr)
    elif launch.seg == "ntype":
        seg = kg.ntype_ptr
    else:
        seg = {"edge": kg.all_edges_ptr, "node": kg.all_nodes_ptr, "compact": kg.all_compact_ptr,
               "compact_dst": kg.all_compact_dst_ptr,
               "etype": kg.all_etypes_ptr, "ntype": kg.all_ntypes_ptr}[rows]
    index = {"src": kg.src, "dst": kg.dst, "ntype_perm": kg.ntype_perm, "compact_src": kg.compact_src,
             "edge_to_compact": kg.edge_to_compact, "compact_dst": kg.compact_dst_node,
             "edge_to_compact_dst": kg.edge_to_compact_dst, None: None}
    return {"M": M, "seg_ptr": seg, "gather": index[launch.gather], "scatter": index[launch.scatter]}


def run_gemm_launch(launch: Any, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kg: Any,
                    backend: Any = None) -> torch.Tensor:
    """Run a GemmLaunch of a kernel program (pigeon/passes/lower.py) on the graph ``kg``.
    ``backend`` (runtime.program.CudaBackend) supplies ``arch`` and a per-backend module dict."""
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


# ------------------------------------------------------------------------------ the registry entry

def _semantics(launch: GemmLaunch, kg: Any, bufs: Any) -> None:
    ops = gemm_operands(launch, kg)
    gemm_reference(launch.inst, bufs[launch.x], bufs[launch.w], ops["seg_ptr"], ops["gather"], ops["scatter"],
                   bufs[launch.y])


def run_cublas(inst: GemmInstance, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    """A dense instance (``inst.not_dense()`` is None) by cuBLAS (torch.mm): rows ``y = x @ w`` (``w^T``);
    weight_grad ``w = x^T y`` (``y^T x`` with ``transpose_w``; ``w`` is the output dW).  Float32
    accumulation and one rounding, as the template."""
    why = inst.not_dense()
    if why:
        raise GemmLaunchError(f"cuBLAS runs dense GEMMs only; this one: {why}")
    _mm_segments(inst, x, w, [0, x.reshape(-1, inst.k).shape[0]], None, y)


# id(seg_ptr tensor) -> (weakref to it, its values as Python ints): segment bounds read on the host
# once per graph array (a read during a CUDA-graph capture would synchronize, which capture forbids;
# the plain first call of a program fills this)
_BOUNDS: dict[int, tuple] = {}


def host_bounds(seg_ptr: torch.Tensor) -> list[int]:
    ent = _BOUNDS.get(id(seg_ptr))
    if ent is not None and ent[0]() is seg_ptr:
        return ent[1]
    vals = [int(v) for v in seg_ptr.tolist()]
    ref = weakref.ref(seg_ptr)
    _BOUNDS[id(seg_ptr)] = (ref, vals)
    weakref.finalize(seg_ptr, _BOUNDS.pop, id(seg_ptr), None)
    return vals


def run_cublas_segments(inst: GemmInstance, x: torch.Tensor, w: torch.Tensor, seg: list[int],
                        gather: torch.Tensor | None, y: torch.Tensor) -> None:
    """A typed instance (``inst.not_segmented()`` is None) by cuBLAS, one ``torch.mm`` per type
    segment ``seg[t]:seg[t+1]`` of the rows: rows ``y[s:e] = x[gather[s:e]] @ w[t]`` (``w[t]^T``);
    weight_grad ``w[t] = x[gather[s:e]]^T y[s:e]`` (``y[s:e]^T x[...]`` with ``transpose_w``; ``w`` is
    the output dW, zero for an empty segment). Float32 accumulation and one rounding, as the template
    and gemm_reference. An experiment beside the template (``PIGEON_TYPED_GEMM=cublas``,
    pigeon/passes/gemm_backend.py): one launch per type, so many small types cost host time."""
    why = inst.not_segmented()
    if why:
        raise GemmLaunchError(f"cuBLAS per segment runs typed single-head GEMMs only; this one: {why}")
    _mm_segments(inst, x, w, seg, gather, y)


def _mm_segments(inst: GemmInstance, x, w, seg: list[int], gather, y) -> None:
    """One ``torch.mm`` per segment ``seg[t]:seg[t+1]`` with weight ``t`` (a dense GEMM: one segment)."""
    K, N = inst.k, inst.n
    T = len(seg) - 1
    wshape = (T, N, K) if inst.transpose_w else (T, K, N)
    x2 = x.reshape(-1, K)

    def rows(s, e):
        return x2.index_select(0, gather[s:e]) if gather is not None else x2[s:e]
    if inst.form == "weight_grad":
        dy, dw = y.reshape(-1, N), w.view(wshape)
        for t in range(T):
            s, e = seg[t], seg[t + 1]
            if e <= s:
                dw[t].zero_()
            elif inst.transpose_w:
                torch.mm(dy[s:e].t(), rows(s, e), out=dw[t])
            else:
                torch.mm(rows(s, e).t(), dy[s:e], out=dw[t])
        return
    w3, y2 = w.reshape(wshape), y.view(-1, N)
    for t in range(T):
        s, e = seg[t], seg[t + 1]
        if e > s:
            _mm_into(rows(s, e), w3[t].t() if inst.transpose_w else w3[t], y2[s:e])


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b``; a float32 ``out`` of 16-bit operands (GemmInstance.y_dtype) by cuBLAS's
    float32-output GEMM on a GPU, by float32 operands elsewhere (aten's mm.dtype_out is CUDA only)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif a.is_cuda:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _cuda(launch: GemmLaunch, kg: Any, bufs: Any, backend: Any) -> None:
    if launch.backend == "cublas":    # library calls (pigeon/passes/gemm_backend.py)
        if launch.inst.typed:         # one per type segment (PIGEON_TYPED_GEMM=cublas)
            ops = gemm_operands(launch, kg)
            run_cublas_segments(launch.inst, bufs[launch.x], bufs[launch.w], host_bounds(ops["seg_ptr"]),
                                ops["gather"], bufs[launch.y])
        else:
            run_cublas(launch.inst, bufs[launch.x], bufs[launch.w], bufs[launch.y])
        return
    if launch.backend == "tvm":       # TVM's dlight kernel, chosen by --tune (pigeon/passes/gemm_backend.py)
        from .tvm_gemm_kernel import run_launch
        run_launch(launch, bufs[launch.x], bufs[launch.w], bufs[launch.y], backend)
        return
    run_gemm_launch(launch, bufs[launch.x], bufs[launch.w], bufs[launch.y], kg, backend)


def _validate(launch: GemmLaunch) -> None:
    check_instance(launch.inst)
    if launch.inst.y_dtype is not None and launch.backend != "cublas":
        raise GemmLaunchError(f"a float32 Y of a {launch.inst.dtype} GEMM runs on cuBLAS, not {launch.backend!r}")


def _render(launch: GemmLaunch) -> RenderedKernel | None:
    if launch.backend == "cublas":    # a library call: no kernel of pigeon's to build or carry
        return None
    if launch.backend == "tvm":
        from .tvm_gemm_kernel import rendered_for
        return rendered_for(launch.inst)
    return render_gemm(launch.inst)


GEMM = register_family(KernelFamily(
    "gemm", GemmLaunch, (GemmInstance, TileConfig), semantics=_semantics,
    validate=_validate, render=_render,
    cuda=_cuda, emulate=None,    # the templates use shared memory and barriers: no CPU emulation
    doc="segment/gather/scatter matmul, one weight per type (CUDA SIMT fp32, mma.sync bf16/fp16)"))
