"""Hopper attention forward: AttentionInstance -> ``attention.wgmma.cu.jinja`` -> RenderedKernel.

The forward on CuTe's SM90 GMMA atoms (warpgroup MMA, operands in shared memory, 128-byte swizzle
atoms), compiled for ``sm_90a`` (wgmma exists only on the arch-specific target).  Same parameters,
block lists (the pattern's 64x64 lists) and modifier code (:func:`pigeon.codegen.attention.modifier_code`)
as the mma forward (pigeon/codegen/attention_mma.py), so the launcher binds both the same way; the
grid is the mma template's 64-row one (one CTA = one warpgroup per (64 query rows, head, batch)).

Selection (pigeon/runtime/attention_kernel.py, where the tensor-core forward is chosen): the knob
``PIGEON_ATTN_FORWARD=wgmma|mma`` (default ``mma`` until the GPU A/B runs make wgmma the default).
``wgmma`` takes the instances :func:`unsupported` accepts on an sm_90 device (the others run the
mma forward); on any other arch it is an error naming the arch (:func:`forward_template`).

Version 1 (see the template's header): 64 x 64 steps, K/V double-buffered by cp.async, S = Q K^T
and O = P V as SS wgmmas with P written to shared memory in between.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .attention import PARAMS, AttentionCodegenError, AttentionInstance, kernel_name, modifier_code
from .attention_mma import BLOCK_M, BLOCK_N, MmaTemplateConfig
from .attention_mma import unsupported as mma_unsupported
from .cutlass_headers import source_tag
from .expr_c import storage_type
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel

TEMPLATE = "attention.wgmma.cu.jinja"
ARCH = "sm_90a"                       # what the kernel is compiled for (RenderedKernel.meta["arch"])
THREADS = 128                         # one warpgroup
MIN_BLOCKS = 2
FORWARDS = ("mma", "wgmma")
ENV = "PIGEON_ATTN_FORWARD"
# dtype -> (CuTe element type, S atom (64x64x16), O atom prefix, pack intrinsic, packed pair type)
ATOMS = {"bfloat16": ("cute::bfloat16_t", "SM90_64x64x16_F32BF16BF16_SS", "SM90_64x{D}x16_F32BF16BF16_SS",
                      "__floats2bfloat162_rn", "__nv_bfloat162"),
         "float16": ("cute::half_t", "SM90_64x64x16_F32F16F16_SS", "SM90_64x{D}x16_F32F16F16_SS",
                     "__floats2half2_rn", "__half2")}


@dataclass(frozen=True)
class AttentionWgmmaConfig(MmaTemplateConfig):
    cute_type: str = ""
    mma_s: str = ""
    mma_o: str = ""
    min_blocks: int = MIN_BLOCKS


def unsupported(inst: AttentionInstance) -> str | None:
    """Why ``inst`` cannot run on the wgmma forward (the mma one then serves it), or None."""
    why = mma_unsupported(inst)
    if why is not None:
        return why
    if inst.dtype not in ATOMS:               # pragma: no cover - mma_unsupported refuses these first
        return f"dtype {inst.dtype}"
    return None


def shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory: Q [64][D], K and V [64][D] x 2 stages, P [64][64] (2-byte elements), and
    1 KiB to align the base to the swizzle atoms' 1024-byte period."""
    return (BLOCK_M * head_dim + 4 * BLOCK_N * head_dim + BLOCK_M * BLOCK_N) * 2 + 1024


def requested() -> str:
    """The forward form ``PIGEON_ATTN_FORWARD`` asks for: "mma" (default) or "wgmma"."""
    want = os.environ.get(ENV, "mma").strip() or "mma"
    if want not in FORWARDS:
        raise AttentionCodegenError(f"{ENV}={want!r}: expected one of {FORWARDS}")
    return want


def forward_template(inst: AttentionInstance, arch: str | None) -> str:
    """"wgmma" or "mma": which tensor-core forward runs ``inst`` on a device of ``arch`` ("sm_90" ...).
    ``PIGEON_ATTN_FORWARD=wgmma`` on an arch other than sm_90 / sm_90a is an error; an instance the
    wgmma template cannot take (:func:`unsupported`) runs the mma forward."""
    if requested() != "wgmma":
        return "mma"
    if arch not in ("sm_90", "sm_90a"):
        raise AttentionCodegenError(f"{ENV}=wgmma needs an sm_90 (Hopper) device, this one is {arch}")
    return "mma" if unsupported(inst) is not None else "wgmma"


def _grid(sizes) -> tuple[int, int, int]:
    return (max(1, -(-int(sizes["max_q"]) // BLOCK_M)), int(sizes["heads"]), int(sizes["batch"]))


def render_attention_wgmma(inst: AttentionInstance) -> RenderedKernel:
    """The wgmma forward kernel of ``inst`` (cached per instance); ``meta["arch"]`` is sm_90a."""
    why = unsupported(inst)
    if why is not None:
        raise ValueError(f"attention instance {inst.key()} cannot use the wgmma forward: {why}")
    return _render(inst)


@functools.lru_cache(maxsize=512)
def _render(inst: AttentionInstance) -> RenderedKernel:
    mc = modifier_code(inst, backward=False, indent=(4, 16, 24, 20, 24), head_indent=4)
    T = storage_type(inst.dtype)
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in PARAMS)
    cute_t, mma_s, mma_o, pack, vec2 = ATOMS[inst.dtype]
    name = kernel_name(inst) + "_wgmma_m64n64"
    cfg = AttentionWgmmaConfig(name=name, signature=", ".join(p.c for p in params), dtype=T, mma=mma_s, pack=pack,
                               vec2=vec2, head_dim=inst.head_dim, block_m=BLOCK_M, block_n=BLOCK_N, group=inst.group,
                               packed=inst.packed, mods=mc, cutlass_tag=source_tag(), cute_type=cute_t, mma_s=mma_s,
                               mma_o=mma_o.format(D=inst.head_dim))
    return RenderedKernel(name=name, source=render_template(TEMPLATE, cfg), params=params, block=(THREADS, 1, 1),
                          grid=_grid, shared_mem=shared_bytes(inst.head_dim), template=TEMPLATE,
                          meta={"instance_key": inst.key(), "backward": False, "variant": "wgmma", "arch": ARCH,
                                "schedule": "m64n64"})

