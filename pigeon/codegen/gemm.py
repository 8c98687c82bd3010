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
non-unique scatter: float atomicAdd; for bf16 / fp16 into an fp32 copy of ``Y`` that the runtime
rounds into ``Y`` once afterwards, as :func:`gemm_reference` does: 16-bit atomics would round at every
addition, and a destination that receives thousands of rows then drifts systematically (small addends
are lost against a large sum). Without ``accumulate`` a non-unique scatter stores ("=" as the
instance says: which duplicate wins is unspecified).

Kernel names are ``pigeon_gemm_<instance key>``; the signature in the source is generated from
``RenderedKernel.params``, the list :func:`run_gemm` binds arguments from.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

from ..ir.expr import Expr, ExprError
from ..ir.kernel import epilogue_expr
from .expr_c import ExprEmitter, RowBinding, Scope, const_idx
from ..ir.kernel import GemmInstance
from .jinja import ctype, render
from .kernel_source import KernelParam, RenderedKernel

__all__ = [
    "f32_accumulator", "tile_buildable", "GemmCodegenError", "GemmLaunchError", "GemmConfig", "GemmGrid",
    "kernel_name", "template_name", "render_gemm", "gemm_config", "epilogue_code", "check_instance",
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

def as_epilogue(ep) -> Expr | None:
    """An epilogue expression (of var("acc")), or unary fn names read into one."""
    if ep is None or isinstance(ep, Expr):
        return ep
    try:
        return epilogue_expr(tuple(ep))
    except ExprError as e:
        raise GemmCodegenError(str(e)) from None


def epilogue_code(ep) -> tuple[str, ...]:
    """C statements computing the epilogue of the accumulator ``v`` into ``v``: the expression
    rendered by the one expression emitter (no user text reaches the code: fns come from the
    fn registry, constants are re-printed from floats)."""
    e = as_epilogue(ep)
    if e is None:
        return ()
    for n in e.toposort():
        if n.op == "load" or n.op == "index" or (n.op == "var" and n.fn != "acc"):
            raise GemmCodegenError(f"a GEMM epilogue reads only var('acc') and constants, got {n.op} {n.fn}".strip())
        if n.op in ("dot", "sum_to") or n.shape != ():
            raise GemmCodegenError(f"a GEMM epilogue is elementwise on the accumulator, got {n.op}")
    em = ExprEmitter({}, "GEMM epilogue", {"acc": RowBinding("v", frozenset())})
    root = Scope(name="epilogue")
    val = em.eval(e, const_idx(0), root)
    return tuple(root.lines) + (f"v = (float)({val.code});",)


def _epilogue_names(ep) -> str:
    e = as_epilogue(ep)
    if e is None:
        return "[]"
    parts = [f"{n.fn}" + (f":{n.c!r}" if n.c is not None else "") for n in e.toposort() if n.op == "unary"]
    others = sum(1 for n in e.toposort() if n.op not in ("unary", "var", "const"))
    return "[" + ", ".join(parts) + (f", +{others} ops" if others else "") + "]"


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
    epilogue: tuple[str, ...]          # C statements (epilogue_code)
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


def check_instance(inst: GemmInstance) -> None:
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
    if inst.y_dtype is not None:
        if inst.y_dtype != "float32" or inst.dtype == "float32":
            raise GemmCodegenError(f"GEMM y_dtype {inst.y_dtype!r} with dtype {inst.dtype!r}: only a float32 Y "
                                   f"of 16-bit operands")
        if inst.form != "rows" or inst.not_dense():
            raise GemmCodegenError(f"a float32 Y of 16-bit operands is for a dense rows GEMM (cuBLAS); this one: "
                                   f"{inst.not_dense() or inst.form}")
    t = inst.tile
    if t.block_m < 1 or t.block_n < 1 or t.block_k < 1 or t.warps < 1 or t.warps > 32:
        raise GemmCodegenError(f"bad tile config {t}")


def gemm_config(inst: GemmInstance, params: Sequence[KernelParam] = ()) -> GemmConfig:
    """The template config of ``inst`` (raises GemmCodegenError for what the templates cannot do)."""
    check_instance(inst)
    if inst.y_dtype is not None:
        raise GemmCodegenError("the template writes Y in the operands' dtype; a float32 Y of a 16-bit GEMM "
                               "runs on cuBLAS (pigeon/passes/gemm_backend.py)")
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
        # 8 columns per thread once a thread holds 64 outputs: 16x4 would load 5 float4s of shared
        # memory per 64 FMAs where 8x8 loads 4 (and keeps half the rows' addresses)
        tn = 8 if bm * bn >= 64 * threads and bn % 32 == 0 else 4
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


def f32_accumulator(inst: GemmInstance) -> bool:
    """Whether the rows form of ``inst`` adds its rows with atomics into an fp32 copy of a 16-bit
    ``Y`` (role ``tensor:y_f32``) that the caller rounds into ``Y`` once (see the module docstring)."""
    return (inst.form == "rows" and inst.dtype != "float32" and inst.accumulate and inst.scatter
            and not inst.scatter_unique)


def tile_buildable(inst: GemmInstance, tile) -> bool:
    """Whether the template renders ``inst`` with ``tile`` (a TileConfig): what the --tune tile
    points may offer (pigeon/passes/gemm_tiles.py)."""
    try:
        gemm_config(replace(inst, tile=tile))
        return True
    except GemmCodegenError:
        return False


def _params(inst: GemmInstance) -> tuple[KernelParam, ...]:
    T = ctype(inst.dtype)
    p = []
    if inst.form == "rows":
        y = (KernelParam("Y", "ptr", "float* __restrict__", "tensor:y_f32") if f32_accumulator(inst)
             else KernelParam("Y", "ptr", f"{T}* __restrict__", "tensor:y"))
        p += [KernelParam("X", "ptr", f"const {T}* __restrict__", "tensor:x"),
              KernelParam("W", "ptr", f"const {T}* __restrict__", "tensor:w"), y]
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
