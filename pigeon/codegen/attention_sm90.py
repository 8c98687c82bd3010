"""Hopper attention forward on CUTLASS's FMHA kernel: AttentionInstance -> ``attention.sm90.cu.jinja`` ->
the source of a host shared library (pigeon/runtime/hostlib.py builds, caches and loads it;
pigeon/runtime/attention_sm90.py calls it).

CUTLASS's warp-specialized cooperative FMHA (the example 88_hopper_fmha shipped with the
nvidia-cutlass wheel: TMA producer warpgroup, two consumer warpgroups on wgmma, a K/V pipeline, P in
registers) with pigeon's traced modifiers and pattern mask as its ``Fusion`` (see the template).  It
iterates key tiles by a formula from tile 0 for no pattern and ``Causal`` (``PREFIX``), and by the
pattern's block lists regrouped on its tile (pigeon/runtime/attention_tiles.py) for the others (sliding
window, S2, block lists, top-k: ``listed``).  GQA folds the query heads of a KV head into the rows.

What else it needs (:func:`unsupported` for the instance, :func:`call_unsupported` for a call):
bfloat16 / float16, head_dim == value_dim in (64, 128), the dense layout (no cu_seqlens), list
blocks that tile the kernel's 128 x block_n tile whole (:func:`grouping`),
``q_len`` a multiple of 8 (CUTLASS's can_implement; of 128 with GQA: a tile never spans two heads),
both lengths >= 1, and each (batch) slice under 2^31 elements (CUTLASS's strides are int); listed patterns
also need lists pigeon's tensor-core forward iterates (the 64 x 64 grid): a call CUTLASS's kernel cannot take
runs that one.

Schedule (:class:`Schedule`): the CTA tile is 128 query rows (64 per consumer warpgroup) by
``block_n`` keys; default 128 keys at both head dims (measured: :func:`default_schedule`), with 5
K/V stages; a closed-form listed pattern (sliding window, S2) runs the key tile whose tiles visit less
area (pigeon/runtime/attention_sm90.py ``block_n_for``: S2's strided 64-key blocks on 64-key tiles).
``PIGEON_ATTN_SM90_TUNE`` (comma-separated ``bn64`` / ``bn128``, ``stages<N>``) overrides them for A/B
runs (benchmarks/profile_attention.py).

A score_mod works on the scaled score, and CUTLASS's fusion sees the unscaled one with no access to
the call's scale: the library of an instance with a score_mod is built per scale (the scale a C
literal in it; most models call with one scale); without a score_mod the scale is a run-time value.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass

from .attention import AttentionCodegenError, AttentionInstance, modifier_code
from .cutlass_headers import source_tag
from .jinja import cfloat
from .jinja import render as render_template

__all__ = ["Schedule", "Sm90Attention", "Sm90AttentionConfig", "unsupported", "call_unsupported", "tuning",
           "spec_for", "render_attention_sm90", "TEMPLATE", "ARCH", "TUNE_ENV", "PREFIX", "listed", "BACKWARD_TEMPLATE",
           "backward_unsupported", "backward_call_unsupported", "backward_spec_for", "backward_template",
           "BACKWARD_ENV"]

TEMPLATE = "attention.sm90.cu.jinja"
ARCH = "sm_90a"
TUNE_ENV = "PIGEON_ATTN_SM90_TUNE"
PREFIX = ("", "Causal")                       # pattern kinds iterated by a formula; the others are listed
ELEMENTS = {"bfloat16": "cutlass::bfloat16_t", "float16": "cutlass::half_t"}
BLOCK_M = 128                                 # two consumer warpgroups of 64 rows
INT_MAX = 2 ** 31 - 1
CODE_BITS = 16          # a tile-list entry's low bits (pigeon/runtime/attention_tiles.py): 2 per list block, 8 blocks


def grouping(bm: int, bn: int, tile_m: int, tile_n: int) -> tuple[int, int] | None:
    """(a, b): a pattern's ``bm x bn`` list blocks per ``tile_m x tile_n`` tile along queries and
    keys, or None when the tile does not split into whole list blocks or has more of them than a
    tile-list entry's code holds."""
    if bm < 1 or bn < 1 or tile_m % bm or tile_n % bn:
        return None
    a, b = tile_m // bm, tile_n // bn
    return (a, b) if 2 * a * b <= CODE_BITS else None


@dataclass(frozen=True)
class Schedule:
    block_n: int
    stages: int = 5

    def __post_init__(self):
        if self.block_n not in (64, 128):
            raise ValueError(f"attention sm90 schedule {self}: block_n must be 64 or 128")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"attention sm90 schedule {self}: stages must be in [2, 8]")

    def tag(self) -> str:
        return f"bn{self.block_n},stages{self.stages}"


KNOBS = ("bn64", "bn128", "stages<N>")


def default_schedule(head_dim: int) -> Schedule:
    # 128 keys per tile at both head dims: at D 64 the example's 64-key tile ran 0.66-0.76x cuDNN's
    # kernel time on the H200, 128 keys 0.72-0.91x (benchmarks/results/attention_sm90_h200_9589cf8)
    return Schedule(128)


def tuning(head_dim: int, knobs: str | None = None) -> Schedule:
    """The schedule of ``head_dim`` under ``knobs`` (default: ``PIGEON_ATTN_SM90_TUNE``)."""
    if knobs is None:
        knobs = os.environ.get(TUNE_ENV, "")
    base = default_schedule(head_dim)
    kw = {"block_n": base.block_n, "stages": base.stages}
    for w in (w.strip() for w in knobs.split(",")):
        if not w:
            continue
        if w in ("bn64", "bn128"):
            kw["block_n"] = int(w[2:])
        elif w.startswith("stages") and w[6:].isdigit():
            kw["stages"] = int(w[6:])
        else:
            raise ValueError(f"{TUNE_ENV}: unknown knob {w!r} in {knobs!r} (knobs: {', '.join(KNOBS)})")
    try:
        return Schedule(**kw)
    except ValueError as e:
        raise ValueError(f"{TUNE_ENV}={knobs!r}: {e}") from None


def listed(inst: AttentionInstance) -> bool:
    """Whether ``inst`` iterates its pattern's block lists (else tiles 0 .. n-1 by a formula)."""
    return inst.pattern_kind not in PREFIX


def unsupported(inst: AttentionInstance, block_n: int | None = None) -> str | None:
    """Why the CUTLASS forward cannot run ``inst`` (pigeon's wgmma forward then does), or None;
    ``block_n``: the tile's keys (default: the schedule's)."""
    if inst.dtype not in ELEMENTS:
        return f"dtype {inst.dtype} (bfloat16 / float16 only)"
    if inst.head_dim not in (64, 128) or inst.value_dim != inst.head_dim:
        return f"head dims {inst.head_dim} / {inst.value_dim} (64 or 128, equal)"
    if inst.packed:
        return "cu_seqlens (packed documents)"
    if inst.pattern_kind == "" and inst.pattern_mask is not None:       # pragma: no cover - api.py sets both
        return "a pattern mask without a pattern kind"
    if listed(inst):
        from .attention_mma import unsupported as mma_unsupported
        why = mma_unsupported(inst)
        if why is not None:     # the tensor-core kernel a call CUTLASS's cannot take falls back to
            return f"{why} (pigeon's tensor-core forward, the fallback of listed patterns, cannot take it)"
        bn = block_n if block_n is not None else tuning(inst.head_dim).block_n
        if grouping(inst.block_m, inst.block_n, BLOCK_M, bn) is None:
            return (f"{inst.pattern_kind}'s list blocks {inst.block_m}x{inst.block_n} do not tile the kernel's "
                    f"{BLOCK_M}x{bn} tile whole")
    return None


def call_unsupported(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, group: int = 1) -> str | None:
    """Why a call of these sizes (``heads``: query heads) cannot run on the CUTLASS forward (the wgmma
    one then does), or None."""
    if q_len < 1 or kv_len < 1:
        return "an empty sequence"
    if q_len % 8:
        return f"q_len {q_len} is not a multiple of 8"
    if group > 1 and q_len % BLOCK_M:
        return f"q_len {q_len} with GQA (group {group}) is not a multiple of {BLOCK_M}"
    if heads * max(q_len, kv_len) * head_dim > INT_MAX:
        return "a batch slice over 2^31 elements"
    return None


@dataclass(frozen=True)
class Sm90Attention:
    """One library: the instance, its schedule, and the scale baked in (float32 bits) when a
    score_mod needs it, else None; ``backward``: the backward's library (BACKWARD_TILE)."""
    inst: AttentionInstance
    schedule: Schedule
    scale_bits: int | None = None
    backward: bool = False

    @property
    def name(self) -> str:
        parts = (self.inst.key(), self.schedule.tag(), self.scale_bits) + (("bwd",) if self.backward else ())
        return "pigeon_attn_sm90_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def spec_for(inst: AttentionInstance, scale: float, knobs: str | None = None) -> Sm90Attention:
    schedule = tuning(inst.head_dim, knobs)
    why = unsupported(inst, schedule.block_n)
    if why is not None:
        raise AttentionCodegenError(f"attention instance {inst.key()} cannot use the CUTLASS sm90 forward: {why}")
    return Sm90Attention(inst, schedule, float_bits(scale) if inst.score_mod is not None else None)


BACKWARD_TEMPLATE = "attention_bwd.sm90.cu.jinja"
BACKWARD_TILE = (64, 128)           # (query rows, keys) of the backward's tile: the example's cooperative one


def backward_unsupported(inst: AttentionInstance) -> str | None:
    """Why CUTLASS's backward cannot run ``inst`` (pigeon's mma backward then does), or None."""
    why = unsupported(inst)
    if why is not None:
        return why
    if inst.group != 1:
        return f"GQA (group {inst.group}: the backward's KV head stride is one head per query head)"
    if listed(inst):
        return f"pattern {inst.pattern_kind} (the backward iterates tiles by a formula: no pattern or causal)"
    if inst.dtype != "float16":
        # the example's backward mainloop assigns float results to its element type, which
        # cutlass::bfloat16_t (explicit from float) refuses: nvcc fails on bf16
        return f"dtype {inst.dtype} (CUTLASS's example backward compiles for float16 only)"
    if inst.score_mod is not None:
        return "a score_mod (CUTLASS's backward has no place for its derivative)"
    return None


def backward_call_unsupported(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                              scale: float) -> str | None:
    """Why a backward call cannot run on CUTLASS's backward, or None: the forward's size limits, and
    the scale must be 1/sqrt(head_dim) (the one CUTLASS's backward computes with)."""
    why = call_unsupported(batch, heads, q_len, kv_len, head_dim)
    if why is not None:
        return why
    if float_bits(scale) != float_bits(head_dim ** -0.5):
        return f"scale {scale:g} is not 1/sqrt({head_dim})"
    return None


BACKWARD_ENV = "PIGEON_ATTN_BACKWARD"
BACKWARDS = ("auto", "mma", "cutlass")


def backward_template(inst: AttentionInstance, arch: str | None) -> str:
    """"cutlass" or "mma": which tensor-core backward runs ``inst`` on a device of ``arch``.
    ``PIGEON_ATTN_BACKWARD=auto`` (default) and ``cutlass``: CUTLASS's on sm_90 where
    :func:`backward_unsupported` accepts the instance (a call it cannot take, e.g. another scale,
    runs the mma one: pigeon/runtime/attention_kernel.py); ``mma``: always pigeon's;
    ``cutlass`` on another arch is an error."""
    want = os.environ.get(BACKWARD_ENV, "auto").strip() or "auto"
    if want not in BACKWARDS:
        raise AttentionCodegenError(f"{BACKWARD_ENV}={want!r}: expected one of {BACKWARDS}")
    if want == "mma":
        return "mma"
    if arch not in ("sm_90", "sm_90a"):
        if want == "auto":
            return "mma"
        raise AttentionCodegenError(f"{BACKWARD_ENV}=cutlass needs an sm_90 (Hopper) device, this one is {arch}")
    return "cutlass" if backward_unsupported(inst) is None else "mma"


def backward_spec_for(inst: AttentionInstance) -> Sm90Attention:
    why = backward_unsupported(inst)
    if why is not None:
        raise AttentionCodegenError(f"attention instance {inst.key()} cannot use the CUTLASS sm90 backward: {why}")
    return Sm90Attention(inst, Schedule(BACKWARD_TILE[1]), None, backward=True)


@dataclass(frozen=True)
class Sm90AttentionConfig:
    name: str
    summary: str
    tag: str
    element: str
    head_dim: int
    block_m: int
    block_n: int
    stages: int
    group: int
    causal: bool
    listed: bool
    list_bm: int
    list_bn: int
    code_bits: int
    mask_all: bool
    scale_literal: str
    mods: object


@functools.lru_cache(maxsize=256)
def render_attention_sm90(spec: Sm90Attention) -> str:
    """The library source of ``spec`` (cached)."""
    inst = spec.inst
    mc = modifier_code(inst, backward=False, indent=(4, 8, 10, 8, 10), head_indent=4)
    scale = struct.unpack("<f", struct.pack("<I", spec.scale_bits))[0] if spec.scale_bits is not None else None
    mods = [w for w, e in (("score_mod", inst.score_mod), ("mask_mod", inst.mask_mod)) if e is not None]
    block_m = BACKWARD_TILE[0] if spec.backward else BLOCK_M
    summary = (f"{inst.dtype} D{inst.head_dim} {inst.pattern_kind or 'dense'}"
               f"{f' GQA {inst.group}' if inst.group > 1 else ''}{' (listed)' if listed(inst) else ''}"
               f"{' + ' + ', '.join(mods) if mods else ''}, tile {block_m}x{spec.schedule.block_n}"
               + ("" if spec.backward else f", {spec.schedule.stages} stages"))
    cfg = Sm90AttentionConfig(name=spec.name, summary=summary, tag=source_tag(), element=ELEMENTS[inst.dtype],
                              head_dim=inst.head_dim, block_m=block_m, block_n=spec.schedule.block_n,
                              stages=spec.schedule.stages, group=inst.group, causal=inst.pattern_kind == "Causal",
                              listed=listed(inst), list_bm=inst.block_m, list_bn=inst.block_n, code_bits=CODE_BITS,
                              mask_all=bool(mods), scale_literal=cfloat(scale) if scale is not None else "",
                              mods=mc)
    return render_template(BACKWARD_TEMPLATE if spec.backward else TEMPLATE, cfg)
