"""Hopper attention forward: AttentionInstance -> ``attention.wgmma.cu.jinja`` -> RenderedKernel.

The forward on CuTe's SM90 GMMA atoms (warpgroup MMA, operands in shared memory, 128-byte swizzle
atoms), compiled for ``sm_90a`` (wgmma exists only on the arch-specific target).  Same parameters,
block lists (the pattern's 64x64 lists) and modifier code (:func:`pigeon.codegen.attention.modifier_code`)
as the mma forward (pigeon/codegen/attention_mma.py), so the launcher binds both the same way; the
grid is the mma template's 64-row one (one CTA = one warpgroup per (64 query rows, head, batch)).

Selection (pigeon/runtime/attention_kernel.py, where the tensor-core forward is chosen): the knob
``PIGEON_ATTN_FORWARD=auto|cutlass|wgmma|mma`` (default ``auto``: on sm_90 CUTLASS's FMHA kernel
(pigeon/codegen/attention_sm90.py) for the instances it takes, else this wgmma forward; mma
elsewhere).  ``wgmma`` takes the instances :func:`unsupported` accepts on an sm_90 device (the others
run the mma forward); ``cutlass`` is ``auto`` on sm_90; on any other arch both are an error naming
the arch (:func:`forward_template`).

Version 1 (see the template's header): 64 x 64 steps, K/V double-buffered by cp.async, S = Q K^T
as an SS wgmma, O = P V as an SS wgmma with P written to shared memory in between (default) or as an
RS wgmma with P in registers.  Schedule knobs (:class:`Schedule`, :func:`tuning`), for GPU A/B runs:
``PIGEON_ATTN_WGMMA_TUNE`` (or ``render_attention_wgmma(inst, knobs=...)``), comma-separated
``p_smem`` / ``p_regs`` (how P reaches the second GEMM), ``minb<N>`` (``__launch_bounds__``
minimum CTAs per SM, default 2) and ``strict`` (a diagnostic: every cp.async group waited for before
each step, a barrier before the P stores, an async-proxy fence before the end-of-step barrier; same
results, for telling a race from a layout bug on the GPU: benchmarks/debug_attention_wgmma.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from . import attention_sm90
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
FORWARDS = ("auto", "mma", "wgmma", "cutlass")
ENV = "PIGEON_ATTN_FORWARD"
TUNE_ENV = "PIGEON_ATTN_WGMMA_TUNE"
# dtype -> (CuTe element type, S atom (64x64x16), O atom (64xDx16, SS or RS), pack intrinsic, packed pair type)
ATOMS = {"bfloat16": ("cute::bfloat16_t", "SM90_64x64x16_F32BF16BF16_SS", "SM90_64x{D}x16_F32BF16BF16_{AB}",
                      "__floats2bfloat162_rn", "__nv_bfloat162"),
         "float16": ("cute::half_t", "SM90_64x64x16_F32F16F16_SS", "SM90_64x{D}x16_F32F16F16_{AB}",
                     "__floats2half2_rn", "__half2")}


@dataclass(frozen=True)
class Schedule:
    """The wgmma forward's knobs: P in registers (RS wgmma) or through shared memory (SS), and the
    ``__launch_bounds__`` minimum CTAs per SM."""
    p_in_registers: bool = False
    min_blocks: int = 2
    strict: bool = False

    def __post_init__(self):
        if self.min_blocks < 1:
            raise ValueError(f"attention wgmma schedule {self}: min_blocks >= 1")

    def code(self) -> str:
        """A C-identifier suffix naming the schedule (kernel names differ per schedule)."""
        return f"m64n64{'r' if self.p_in_registers else 's'}b{self.min_blocks}{'x' if self.strict else ''}"

    def tag(self) -> str:
        return f"{'p_regs' if self.p_in_registers else 'p_smem'},minb{self.min_blocks}{',strict' if self.strict else ''}"


KNOBS = ("p_smem", "p_regs", "minb<N>", "strict")


def tuning(knobs: str | None = None) -> Schedule:
    """The schedule for ``knobs`` (default: ``PIGEON_ATTN_WGMMA_TUNE``; unset: :class:`Schedule()`)."""
    if knobs is None:
        knobs = os.environ.get(TUNE_ENV, "")
    kw = {}
    for w in (w.strip() for w in knobs.split(",")):
        if not w:
            continue
        if w in ("p_smem", "p_regs"):
            kw["p_in_registers"] = w == "p_regs"
        elif w == "strict":
            kw["strict"] = True
        elif w.startswith("minb") and w[4:].isdigit():
            kw["min_blocks"] = int(w[4:])
        else:
            raise ValueError(f"{TUNE_ENV}: unknown knob {w!r} in {knobs!r} (knobs: {', '.join(KNOBS)})")
    return Schedule(**kw)


@dataclass(frozen=True)
class AttentionWgmmaConfig(MmaTemplateConfig):
    cute_type: str = ""
    mma_s: str = ""
    mma_o: str = ""
    min_blocks: int = 2
    p_in_registers: bool = False
    strict: bool = False


def unsupported(inst: AttentionInstance) -> str | None:
    """Why ``inst`` cannot run on the wgmma forward (the mma one then serves it), or None."""
    why = mma_unsupported(inst)
    if why is not None:
        return why
    if inst.dtype not in ATOMS:               # pragma: no cover - mma_unsupported refuses these first
        return f"dtype {inst.dtype}"
    return None


def shared_bytes(head_dim: int, p_in_registers: bool = False) -> int:
    """Dynamic shared memory: Q [64][D], K and V [64][D] x 2 stages, P [64][64] unless P stays in
    registers (2-byte elements), and 1 KiB to align the base to the swizzle atoms' 1024-byte period."""
    return (BLOCK_M * head_dim + 4 * BLOCK_N * head_dim + (0 if p_in_registers else BLOCK_M * BLOCK_N)) * 2 + 1024


def requested() -> str:
    """The forward form ``PIGEON_ATTN_FORWARD`` asks for: "auto" (default), "cutlass", "mma" or "wgmma"."""
    want = os.environ.get(ENV, "auto").strip() or "auto"
    if want not in FORWARDS:
        raise AttentionCodegenError(f"{ENV}={want!r}: expected one of {FORWARDS}")
    return want


def forward_template(inst: AttentionInstance, arch: str | None) -> str:
    """"cutlass", "wgmma" or "mma": which tensor-core forward runs ``inst`` on a device of ``arch``
    ("sm_90" ...).  ``auto`` (the default) on sm_90 / sm_90a: CUTLASS's FMHA kernel where
    pigeon/codegen/attention_sm90.py ``unsupported`` accepts the instance (bf16 / fp16, D 64 / 128,
    the dense layout, list blocks that tile its tile), else wgmma -- the wgmma forward's kernels were 1.03-1.22x faster than
    mma.sync's at every dense and causal shape measured (S 1k and 4k, D 64 and 128, bf16;
    benchmarks/results/attention_fwd_ab_h200_4cd66bb); elsewhere mma.  ``PIGEON_ATTN_FORWARD=wgmma``
    skips CUTLASS's kernel; ``wgmma`` or ``cutlass`` on an arch other than sm_90 / sm_90a is an
    error; an instance the wgmma template cannot take (:func:`unsupported`) runs the mma forward.
    "cutlass" is per instance: a call it cannot take (attention_sm90 ``call_unsupported``, e.g.
    q_len not a multiple of 8) runs the wgmma kernel (pigeon/runtime/attention_kernel.py)."""
    want = requested()
    if want == "mma":
        return "mma"
    if arch not in ("sm_90", "sm_90a"):
        if want == "auto":
            return "mma"
        raise AttentionCodegenError(f"{ENV}={want} needs an sm_90 (Hopper) device, this one is {arch}")
    if unsupported(inst) is not None:
        return "mma"
    if want in ("auto", "cutlass") and attention_sm90.unsupported(inst) is None:
        return "cutlass"
    return "wgmma"


def _grid(sizes) -> tuple[int, int, int]:
    return (max(1, -(-int(sizes["max_q"]) // BLOCK_M)), int(sizes["heads"]), int(sizes["batch"]))


def render_attention_wgmma(inst: AttentionInstance, knobs: str | None = None) -> RenderedKernel:
    """The wgmma forward kernel of ``inst`` under :func:`tuning` of ``knobs`` (default:
    ``PIGEON_ATTN_WGMMA_TUNE``), cached per (instance, schedule); ``meta["arch"]`` is sm_90a."""
    why = unsupported(inst)
    if why is not None:
        raise ValueError(f"attention instance {inst.key()} cannot use the wgmma forward: {why}")
    return _render(inst, tuning(knobs))


@functools.lru_cache(maxsize=512)
def _render(inst: AttentionInstance, sched: Schedule) -> RenderedKernel:
    mc = modifier_code(inst, backward=False, indent=(4, 16, 24, 20, 24), head_indent=4)
    T = storage_type(inst.dtype)
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in PARAMS)
    cute_t, mma_s, mma_o, pack, vec2 = ATOMS[inst.dtype]
    name = kernel_name(inst) + "_wgmma_" + sched.code()
    cfg = AttentionWgmmaConfig(name=name, signature=", ".join(p.c for p in params), dtype=T, mma=mma_s, pack=pack,
                               vec2=vec2, head_dim=inst.head_dim, block_m=BLOCK_M, block_n=BLOCK_N, group=inst.group,
                               packed=inst.packed, mods=mc, cutlass_tag=source_tag(), cute_type=cute_t, mma_s=mma_s,
                               mma_o=mma_o.format(D=inst.head_dim, AB="RS" if sched.p_in_registers else "SS"),
                               min_blocks=sched.min_blocks, p_in_registers=sched.p_in_registers,
                               strict=sched.strict)
    return RenderedKernel(name=name, source=render_template(TEMPLATE, cfg), params=params, block=(THREADS, 1, 1),
                          grid=_grid, shared_mem=shared_bytes(inst.head_dim, sched.p_in_registers), template=TEMPLATE,
                          meta={"instance_key": inst.key(), "backward": False, "variant": "wgmma", "arch": ARCH,
                                "schedule": sched.tag()})

