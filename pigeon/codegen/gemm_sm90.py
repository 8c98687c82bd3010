"""CUTLASS 3.x sm90 GEMMs (TMA + wgmma, warp-specialized) for ``pigeon.gemm``, ``pigeon.grouped_gemm``
and ``pigeon.fp8_gemm``: :class:`Sm90Gemm` -> ``gemm.sm90.cu.jinja`` -> the source of a small host
shared library (pigeon/runtime/hostlib.py builds, caches and calls it).

The epilogue is the traced expression of ``acc`` (and of ``bias`` / ``residual`` when the call has
them), rendered to C by the one expression emitter (pigeon/codegen/expr_c.py) into the body of an
EVT compute functor (``cutlass::epilogue::fusion::Sm90Compute``); its inputs are EVT children in a
fixed order: the accumulator, then fp8 ``scale_a`` (column broadcast, [M]) and ``scale_b`` (row
broadcast, [N]), ``bias`` (row broadcast, [N]) and ``residual`` (the epilogue source C, [M, N]).

Tile shapes, by one rule (few distinct instances: a CUTLASS sm90 kernel takes minutes of nvcc):

* dense bf16 / fp16: 128x256x64, cluster 2x1, cooperative (two consumer warp groups);
* grouped (ptr-array): 128x128x64, cluster 1x1, cooperative (segments of a few hundred rows);
* fp8 per-tensor / per-row scales: 128x256x128, cluster 2x1, cooperative; per-tensor scales are
  expanded to per-row vectors on the device, so both scalings share one kernel;
* fp8 block scales (1x128 of A, 128x128 of B): 128x128x128, cluster 1x1, the blockwise-scaling
  cooperative mainloop (``KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum``).

What the kernels need (:func:`sm90_supports` and the callers check it; anything else runs the
older templates or the reference): a (9, 0) device, A [M, K] and D [M, N] row-major, B [K, N]
row-major (bf16 / fp16) or column-major (fp8), K and N multiples of 16 bytes' worth of elements
(8 for 16-bit types, 16 for fp8), 16-byte aligned pointers; fp8 block scales also K and N
multiples of 128.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from ..ir.expr import Expr
from .expr_c import ExprEmitter, RowBinding, Scope, const_idx
from .jinja import render

__all__ = ["Sm90Gemm", "Sm90Config", "render_sm90", "sm90_config", "OPERANDS", "KINDS", "TEMPLATE",
           "Sm90CodegenError", "operands_of"]

TEMPLATE = "gemm.sm90.cu.jinja"
KINDS = ("dense", "grouped", "fp8", "fp8_block")
OPERANDS = ("bias", "residual")               # epilogue inputs besides the accumulator
CUTLASS_TYPES = {"bfloat16": "cutlass::bfloat16_t", "float16": "cutlass::half_t",
                 "float8_e4m3fn": "cutlass::float_e4m3_t"}
TILES = {  # kind -> (tile m, n, k, cluster m, n)
    "dense": (128, 256, 64, 2, 1),
    "grouped": (128, 128, 64, 1, 1),
    # fp8 without fast accumulation promotes the wgmma accumulators into a second float32 set every
    # few k-blocks: at 128x256 each consumer thread holds 2 x 128 accumulators, past the register
    # file (measured on the H200 at 8192^3: 403 TFLOP/s, torch._scaled_mm 1470); 128x128 holds 2 x 64
    "fp8": (128, 128, 128, 2, 1),
    "fp8_block": (128, 128, 128, 1, 1),
}


class Sm90CodegenError(ValueError):
    pass


def operands_of(ep: Expr | None) -> tuple[str, ...]:
    """The epilogue inputs (of OPERANDS) that ``ep`` reads, in OPERANDS order."""
    if ep is None:
        return ()
    names = {n.fn for n in ep.toposort() if n.op == "var"}
    bad = names - {"acc", *OPERANDS}
    if bad:
        raise Sm90CodegenError(f"a GEMM epilogue reads acc, bias and residual only, got {sorted(bad)}")
    return tuple(o for o in OPERANDS if o in names)


@dataclass(frozen=True)
class Sm90Gemm:
    """One sm90 GEMM library: ``kind`` (KINDS), operand dtype, output dtype, the epilogue expression
    (of var("acc") and the OPERANDS it names; None = identity)."""
    kind: str
    dtype: str
    out_dtype: str
    epilogue: Expr | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise Sm90CodegenError(f"unknown sm90 GEMM kind {self.kind!r} (known: {KINDS})")
        fp8 = self.kind.startswith("fp8")
        if fp8 != (self.dtype == "float8_e4m3fn") or self.dtype not in CUTLASS_TYPES:
            raise Sm90CodegenError(f"sm90 GEMM kind {self.kind} with operand dtype {self.dtype!r}")
        if self.out_dtype not in ("bfloat16", "float16") or (not fp8 and self.out_dtype != self.dtype):
            raise Sm90CodegenError(f"sm90 GEMM {self.kind}: output dtype {self.out_dtype!r}")
        ops = operands_of(self.epilogue)
        if self.kind == "grouped" and ops:
            raise Sm90CodegenError("a grouped sm90 GEMM has no bias / residual operands")

    @property
    def operands(self) -> tuple[str, ...]:
        return operands_of(self.epilogue)

    def key(self) -> str:
        text = repr((self.kind, self.dtype, self.out_dtype, self.epilogue))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"pigeon_sm90_{self.key()}"


@dataclass(frozen=True)
class Sm90Config:
    """What gemm.sm90.cu.jinja sees (as ``c``); see the comment at its top."""
    name: str
    summary: str
    tag: str
    kind: str
    element: str
    out_element: str
    b_kmajor: bool
    bias: bool
    residual: bool
    args: tuple[str, ...]
    epilogue: tuple[str, ...]
    tile_m: int
    tile_n: int
    tile_k: int
    cluster_m: int
    cluster_n: int


def epilogue_lines(ep: Expr | None) -> tuple[str, ...]:
    """C statements computing ``v`` from ``v`` (the accumulator) and the float locals ``bias`` /
    ``residual``: the expression emitter's code."""
    if ep is None:
        return ()
    operands_of(ep)
    for n in ep.toposort():
        if n.op in ("load", "index", "dot", "sum_to") or n.shape != ():
            raise Sm90CodegenError(f"a GEMM epilogue is elementwise on acc / bias / residual, got {n.op}")
    bind = {"acc": RowBinding("v", frozenset())}
    bind.update({o: RowBinding(o, frozenset()) for o in OPERANDS})
    em = ExprEmitter({}, "GEMM epilogue", bind)
    root = Scope(name="epilogue")
    val = em.eval(ep, const_idx(0), root)
    return tuple(root.lines) + (f"v = (float)({val.code});",)


def sm90_config(g: Sm90Gemm) -> Sm90Config:
    from . import cutlass_headers
    tm, tn, tk, cm, cn = TILES[g.kind]
    ops = g.operands
    args = (("scale_a", "scale_b") if g.kind == "fp8" else ()) + ops
    summary = (f"{g.kind} {g.dtype} -> {g.out_dtype} operands={list(ops)} tile={tm}x{tn}x{tk} "
               f"cluster={cm}x{cn}")
    return Sm90Config(
        name=g.name, summary=summary, tag=cutlass_headers.source_tag(), kind=g.kind,
        element=CUTLASS_TYPES[g.dtype], out_element=CUTLASS_TYPES[g.out_dtype],
        b_kmajor=g.kind.startswith("fp8"), bias="bias" in ops, residual="residual" in ops, args=args,
        epilogue=epilogue_lines(g.epilogue), tile_m=tm, tile_n=tn, tile_k=tk, cluster_m=cm, cluster_n=cn)


@functools.lru_cache(maxsize=1024)
def render_sm90(g: Sm90Gemm) -> str:
    """The library source of ``g`` (cached per instance)."""
    return render(TEMPLATE, sm90_config(g))
