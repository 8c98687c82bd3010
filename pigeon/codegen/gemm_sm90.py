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

Tile overrides (for measuring variants; the rule above is the default).  ``Sm90Gemm(..., tile=(m, n,
k, cluster_m, cluster_n), schedule=...)`` replaces the kind's tile / cluster / kernel schedule; both
enter :meth:`Sm90Gemm.key` only when set, so default keys (and the disk-cache entries built from
them) do not change.  A tile or schedule equal to the kind's default is normalized to None.
Schedules (:data:`SCHEDULES`): ``cooperative`` (the default of every kind: two consumer warp
groups share one tile, tile m 128 or 256), and for ``fp8`` only ``pingpong``
(``KernelTmaWarpSpecializedPingpong`` with the ``TmaWarpSpecialized`` epilogue: two consumer warp
groups on alternate tiles, tile m 64 or 128), ``cooperative_fastaccum`` and ``pingpong_fastaccum``
(the ``...FP8FastAccum`` schedules: no promotion of the wgmma accumulators into float32 every few
k-blocks, which CHANGES NUMERICS: torch._scaled_mm's use_fast_accum=True, not the default peer).
Limits checked (:class:`Sm90CodegenError`, one line): tile m 64 / 128 / 256 (as the schedule
allows), tile n a multiple of 16 in [16, 256] (fp8_block: of 128, the block scales' granularity),
tile k 64 or 128 for 16-bit operands, 128 for fp8 (128 bytes: the 128B swizzle of K-major fp8
tiles; block scales need 128), cluster m, n in {1, 2}.

``PIGEON_SM90_TILES`` (read by pigeon/runtime/gemm_fused.py when it builds a kind's library, parsed
by :func:`parse_tiles`) sets overrides per kind: ``kind=MxNxKxCMxCN[:schedule]``, comma separated,
e.g. ``fp8=128x192x128x1x1:pingpong,fp8_block=128x128x128x1x1,dense=128x256x64x2x1``; a bad string
raises one line naming the knob and the bad part.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from ..ir.expr import Expr
from .expr_c import ExprEmitter, RowBinding, Scope, const_idx
from .jinja import render

__all__ = ["Sm90Gemm", "Sm90Config", "render_sm90", "sm90_config", "OPERANDS", "KINDS", "TEMPLATE",
           "Sm90CodegenError", "operands_of", "SCHEDULES", "TILES_ENV", "parse_tiles", "parse_variant",
           "env_tiles"]

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


# schedule -> (kernel schedule, epilogue schedule) of the non-grouped, non-block kinds; the kinds
# allowed each (the default "cooperative" everywhere: grouped and fp8_block keep their own types)
SCHEDULES = {
    "cooperative": ("cutlass::gemm::KernelTmaWarpSpecializedCooperative",
                    "cutlass::epilogue::TmaWarpSpecializedCooperative"),
    "pingpong": ("cutlass::gemm::KernelTmaWarpSpecializedPingpong", "cutlass::epilogue::TmaWarpSpecialized"),
    "cooperative_fastaccum": ("cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum",
                              "cutlass::epilogue::TmaWarpSpecializedCooperative"),
    "pingpong_fastaccum": ("cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum",
                           "cutlass::epilogue::TmaWarpSpecialized"),
}
SCHEDULE_KINDS = {"cooperative": KINDS, "pingpong": ("fp8",), "cooperative_fastaccum": ("fp8",),
                  "pingpong_fastaccum": ("fp8",)}
TILES_ENV = "PIGEON_SM90_TILES"


class Sm90CodegenError(ValueError):
    pass


def check_tile(kind: str, dtype: str, tile: tuple, schedule: str | None) -> None:
    """One-line Sm90CodegenError unless CUTLASS's sm90 builders take ``tile`` with ``schedule``."""
    if not (isinstance(tile, tuple) and len(tile) == 5 and all(type(v) is int for v in tile)):
        raise Sm90CodegenError(f"sm90 GEMM {kind}: tile must be 5 ints (m, n, k, cluster_m, cluster_n), got {tile!r}")
    tm, tn, tk, cm, cn = tile
    sched = schedule or "cooperative"
    where = f"sm90 GEMM {kind} tile {tm}x{tn}x{tk} cluster {cm}x{cn} ({sched})"
    ms = (64, 128) if sched.startswith("pingpong") else (128, 256)
    if tm not in ms:
        raise Sm90CodegenError(f"{where}: tile m must be one of {ms} for the {sched} schedule "
                               f"({'one consumer warp group per tile' if sched.startswith('pingpong') else 'two consumer warp groups split m'})")
    if tn % 16 or not 16 <= tn <= 256:
        raise Sm90CodegenError(f"{where}: tile n must be a multiple of 16 in [16, 256]")
    if kind == "fp8_block" and tn % 128:
        raise Sm90CodegenError(f"{where}: tile n must be a multiple of 128 (the block scales' granularity)")
    ks = (128,) if dtype == "float8_e4m3fn" else (64, 128)
    if tk not in ks:
        raise Sm90CodegenError(f"{where}: tile k must be one of {ks} for {dtype}")
    if cm not in (1, 2) or cn not in (1, 2):
        raise Sm90CodegenError(f"{where}: cluster m and n must be 1 or 2")


def parse_variant(kind: str, text: str, *, what: str = "tile variant") -> tuple[tuple | None, str | None]:
    """``"MxNxKxCMxCN[:schedule]"`` (or ``"default"``) -> (tile, schedule), checked for ``kind``."""
    text = text.strip()
    if text == "default":
        return None, None
    shape, _, sched = text.partition(":")
    parts = shape.split("x")
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        raise Sm90CodegenError(f"{what}: {text!r} is not MxNxKxCMxCN[:schedule] (e.g. 128x128x128x1x1:pingpong)")
    sched = sched.strip() or None
    if sched is not None and sched not in SCHEDULES:
        raise Sm90CodegenError(f"{what}: {text!r}: unknown schedule {sched!r} (known: {', '.join(SCHEDULES)})")
    tile = tuple(int(p) for p in parts)
    dtype = "float8_e4m3fn" if kind.startswith("fp8") else "bfloat16"
    try:
        _check_schedule(kind, sched)
        check_tile(kind, dtype, tile, sched)
    except Sm90CodegenError as e:
        raise Sm90CodegenError(f"{what}: {text!r}: {e}") from None
    return tile, sched


def parse_tiles(text: str) -> dict[str, tuple[tuple | None, str | None]]:
    """The PIGEON_SM90_TILES value -> {kind: (tile, schedule)}; one-line errors naming the knob."""
    out = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        kind, eq, variant = part.partition("=")
        kind = kind.strip()
        if not eq or kind not in KINDS:
            raise Sm90CodegenError(f"{TILES_ENV}: {part!r} is not kind=MxNxKxCMxCN[:schedule] with kind one of {KINDS}")
        if kind in out:
            raise Sm90CodegenError(f"{TILES_ENV}: kind {kind} given twice ({part!r})")
        out[kind] = parse_variant(kind, variant, what=TILES_ENV)
    return out


@functools.lru_cache(maxsize=16)
def _parsed_env(text: str) -> dict:
    return parse_tiles(text)


def env_tiles(kind: str, text: str | None = None) -> tuple[tuple | None, str | None]:
    """(tile, schedule) of ``kind`` under PIGEON_SM90_TILES (or ``text``); (None, None) when unset."""
    import os
    text = os.environ.get(TILES_ENV, "") if text is None else text
    if not text:
        return None, None
    return _parsed_env(text).get(kind, (None, None))


def _check_schedule(kind: str, schedule: str | None) -> None:
    if schedule is None:
        return
    if schedule not in SCHEDULES:
        raise Sm90CodegenError(f"sm90 GEMM {kind}: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if kind not in SCHEDULE_KINDS[schedule]:
        raise Sm90CodegenError(f"sm90 GEMM {kind}: schedule {schedule!r} is for kind(s) {', '.join(SCHEDULE_KINDS[schedule])} only")


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
    (of var("acc") and the OPERANDS it names; None = identity); optionally a tile override
    ``(m, n, k, cluster_m, cluster_n)`` and a schedule (SCHEDULES), None = the kind's default."""
    kind: str
    dtype: str
    out_dtype: str
    epilogue: Expr | None = None
    tile: tuple | None = None
    schedule: str | None = None

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
        if isinstance(self.tile, list):
            object.__setattr__(self, "tile", tuple(self.tile))
        _check_schedule(self.kind, self.schedule)
        if self.tile is not None or self.schedule is not None:
            check_tile(self.kind, self.dtype, self.tile if self.tile is not None else TILES[self.kind], self.schedule)
        # the defaults, spelled out, are the default instance (one key, one cache entry)
        if self.schedule == "cooperative":
            object.__setattr__(self, "schedule", None)
        if self.tile == TILES[self.kind]:
            object.__setattr__(self, "tile", None)

    @property
    def operands(self) -> tuple[str, ...]:
        return operands_of(self.epilogue)

    def key(self) -> str:
        base = (self.kind, self.dtype, self.out_dtype, self.epilogue)
        extra = ((("tile", self.tile),) if self.tile is not None else ()) + \
            ((("schedule", self.schedule),) if self.schedule is not None else ())
        text = repr(base + extra if extra else base)     # unchanged for the defaults: cache entries stay
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
    kernel_schedule: str
    epilogue_schedule: str


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
    tm, tn, tk, cm, cn = g.tile if g.tile is not None else TILES[g.kind]
    ops = g.operands
    args = (("scale_a", "scale_b") if g.kind == "fp8" else ()) + ops
    if g.kind == "grouped":
        ks, es = ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative",
                  "cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative")
    elif g.kind == "fp8_block":
        ks, es = ("cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum",
                  "cutlass::epilogue::TmaWarpSpecializedCooperative")
    else:
        ks, es = SCHEDULES[g.schedule or "cooperative"]
    summary = (f"{g.kind} {g.dtype} -> {g.out_dtype} operands={list(ops)} tile={tm}x{tn}x{tk} "
               f"cluster={cm}x{cn}")
    if g.schedule is not None:
        summary += f" schedule={g.schedule}"     # only when set: a default source (and its cache key) stays
    return Sm90Config(
        name=g.name, summary=summary, tag=cutlass_headers.source_tag(), kind=g.kind,
        element=CUTLASS_TYPES[g.dtype], out_element=CUTLASS_TYPES[g.out_dtype],
        b_kmajor=g.kind.startswith("fp8"), bias="bias" in ops, residual="residual" in ops, args=args,
        epilogue=epilogue_lines(g.epilogue), tile_m=tm, tile_n=tn, tile_k=tk, cluster_m=cm, cluster_n=cn,
        kernel_schedule=ks, epilogue_schedule=es)


@functools.lru_cache(maxsize=1024)
def render_sm90(g: Sm90Gemm) -> str:
    """The library source of ``g`` (cached per instance)."""
    return render(TEMPLATE, sm90_config(g))
