"""Tensor-core attention forward: AttentionInstance -> ``attention.mma.cu.jinja`` -> RenderedKernel.

The flash-attention-2 form on CuTe's sm80 atoms (cp.async, ldmatrix, mma.sync m16n8k16), which
run on sm_80 and later, sm_90 included.  Same parameters, block lists and modifier code
(:func:`pigeon.codegen.attention.modifier_code`) as the SIMT forward, so the launcher binds both the
same way; only the grid differs (one CTA of 4 warps per (query block, head, batch)).

:func:`unsupported` says why an instance cannot take this template (the SIMT one serves it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .cutlass_headers import source_tag
from .attention import PARAMS, AttentionInstance, ModifierCode, kernel_name, modifier_code
from .expr_c import storage_type
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel

THREADS = 128
BLOCK_M = BLOCK_N = 64
HEAD_DIMS = (64, 128)
MMA_ATOMS = {"bfloat16": ("SM80_16x8x16_F32BF16BF16F32_TN", "__floats2bfloat162_rn", "__nv_bfloat162"),
             "float16": ("SM80_16x8x16_F32F16F16F32_TN", "__floats2half2_rn", "__half2")}


@dataclass(frozen=True)
class MmaTemplateConfig:
    """What both tensor-core attention templates (forward and backward) take."""
    name: str
    signature: str
    dtype: str
    mma: str
    pack: str
    vec2: str
    head_dim: int
    block_m: int
    block_n: int
    group: int
    packed: bool
    mods: ModifierCode
    cutlass_tag: str


@dataclass(frozen=True)
class AttentionMmaConfig(MmaTemplateConfig):
    q_in_registers: bool = True     # Q's fragments held across key blocks, or re-read from shared memory
    min_blocks: int = 2             # __launch_bounds__ minimum CTAs per SM (caps registers)
    warp_m_tiles: int = 1           # 16-row m-tiles per warp: 1 (4 warps per CTA) or 2 (2 warps)


def unsupported(inst: AttentionInstance) -> str | None:
    """Why ``inst`` cannot run on the tensor-core forward, or None when it can."""
    if inst.dtype not in MMA_ATOMS:
        return f"dtype {inst.dtype} (tensor cores take bfloat16 and float16)"
    if inst.head_dim != inst.value_dim or inst.head_dim not in HEAD_DIMS:
        return f"head dims {inst.head_dim}/{inst.value_dim} (the template has {HEAD_DIMS}, equal for q and v)"
    if (inst.block_m, inst.block_n) != (BLOCK_M, BLOCK_N):
        return f"pattern blocks {inst.block_m}x{inst.block_n} (the template iterates {BLOCK_M}x{BLOCK_N})"
    return None


def _tuning(head_dim: int) -> dict:
    """Schedule knobs: by head dim from the H200 runs of benchmarks/tune_attention_mma.py
    (benchmarks/results/attention_mma_knobs_h200_b0611d6.md: at D=64 re-reading Q from shared
    memory and 3 CTAs per SM gave +13-17%; at D=128 the knobs moved it by under 3%, and 3 CTAs
    spill), overridden by PIGEON_ATTN_MMA_TUNE="q_smem,minb3" (or "" for the plain form)."""
    import os
    out = {"q_in_registers": False, "min_blocks": 3} if head_dim == 64 else {}
    env = os.environ.get("PIGEON_ATTN_MMA_TUNE")
    if env is None:
        return out
    knobs = set(filter(None, env.split(",")))
    out = {}
    if "q_smem" in knobs:
        out["q_in_registers"] = False
    for k in knobs:
        if k.startswith("minb"):
            out["min_blocks"] = int(k[4:])
        if k == "mt2":
            out["warp_m_tiles"] = 2
    return out


def _grid(sizes) -> tuple[int, int, int]:
    return (max(1, -(-int(sizes["max_q"]) // BLOCK_M)), int(sizes["heads"]), int(sizes["batch"]))


@functools.lru_cache(maxsize=512)
def render_attention_mma(inst: AttentionInstance) -> RenderedKernel:
    """The tensor-core forward kernel of ``inst`` (cached per instance)."""
    why = unsupported(inst)
    if why is not None:
        raise ValueError(f"attention instance {inst.key()} cannot use the tensor-core forward: {why}")
    mc = modifier_code(inst, backward=False, indent=(4, 20, 24, 20, 24))
    T = storage_type(inst.dtype)
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in PARAMS)
    mma, pack, vec2 = MMA_ATOMS[inst.dtype]
    name = kernel_name(inst) + "_mma"
    cfg = AttentionMmaConfig(name=name, signature=", ".join(p.c for p in params), dtype=T, mma=mma, pack=pack,
                             vec2=vec2, head_dim=inst.head_dim, block_m=BLOCK_M, block_n=BLOCK_N, group=inst.group,
                             packed=inst.packed, mods=mc, cutlass_tag=source_tag(), **_tuning(inst.head_dim))
    template = "attention.mma.cu.jinja"
    threads = 32 * BLOCK_M // (16 * cfg.warp_m_tiles)
    return RenderedKernel(name=name, source=render_template(template, cfg), params=params, block=(threads, 1, 1),
                          grid=_grid, template=template, meta={"instance_key": inst.key(), "backward": False,
                                                               "variant": "mma"})
