"""Tensor-core attention backward: AttentionInstance -> ``attention_bwd.mma.cu.jinja`` -> RenderedKernel.

The flash-attention-2 backward on the forward's CuTe sm80 atoms (cp.async, ldmatrix, mma.sync
m16n8k16), for the instances the tensor-core forward takes (:func:`attention_mma.unsupported`).

Key-major: one CTA of 4 warps per (key block of 64, key/value head, batch) walks the query blocks
whose lists contain its key block (the pattern's lists transposed, :meth:`BlockLists.transposed`),
and with GQA the group's query heads too, so dK and dV accumulate in registers and are written
once, in the input dtype, with neither zero-fill nor atomics.  dQ takes float32 ``atomicAdd`` into
a zeroed float32 buffer (the launcher casts it), as flash-attention 2's own kernel does: a
separate dQ pass (query-major, the transposed products again) would recompute S and dP, i.e. 7
instead of 5 matrix products per block pair, to save atomics that sm_90 adds two floats at a time.
``Di = rowsum(dO * O)`` comes in from torch (float32, laid out as LSE).

:func:`unsupported` says why an instance cannot take this template (the SIMT backward serves it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .cutlass_headers import source_tag
from . import attention_mma
from .attention import SIZE_PARAMS, STRIDE_PARAMS, AttentionInstance, kernel_name, modifier_code
from .expr_c import storage_type
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel

THREADS = 128
BLOCK_M = BLOCK_N = 64
QUERY_SUB = {128: 32}

# the forward's parameters but for the tensors: dQ a float32 accumulator laid out as Q, dK and dV
# in the input dtype laid out as K and V, dO laid out as O, Di as LSE; the lists transposed
PARAMS = (
    ("dQ", "ptr", "float* __restrict__", "out:dQ"), ("dK", "ptr", "{T}* __restrict__", "out:dK"),
    ("dV", "ptr", "{T}* __restrict__", "out:dV"), ("Q", "ptr", "const {T}* __restrict__", "in:Q"),
    ("K", "ptr", "const {T}* __restrict__", "in:K"), ("V", "ptr", "const {T}* __restrict__", "in:V"),
    ("dO", "ptr", "const {T}* __restrict__", "in:dO"), ("LSE", "ptr", "const float* __restrict__", "in:LSE"),
    ("Di", "ptr", "const float* __restrict__", "in:Di"),
    ("tblk_ptr", "ptr", "const int* __restrict__", "lists:tptr"),
    ("tblk_row", "ptr", "const int* __restrict__", "lists:trow"),
    ("tblk_full", "ptr", "const int* __restrict__", "lists:tfull"),
    ("cu_seqlens", "ptr", "const int* __restrict__", "lists:cu_seqlens"),
    *SIZE_PARAMS,
    ("list_kblocks", "int32", "int", "size:list_kblocks"),
    *STRIDE_PARAMS,
)


@dataclass(frozen=True)
class AttentionMmaBwdConfig(attention_mma.MmaTemplateConfig):
    query_sub: int           # query rows per sub-step: query_sub(head_dim)


def unsupported(inst: AttentionInstance) -> str | None:
    """Why ``inst`` cannot run on the tensor-core backward, or None when it can (exactly where
    the tensor-core forward can)."""
    return attention_mma.unsupported(inst)


def shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory: K, V, Q, dO tiles [64][D] and dS^T [64][64] in the 2-byte dtype,
    LSE and Di of the query block in float32."""
    return (4 * BLOCK_N * head_dim + BLOCK_N * BLOCK_M) * 2 + 2 * BLOCK_M * 4


def query_sub(head_dim: int) -> int:
    """Queries per register sub-block: S^T and dP^T of 16 keys x this many queries per warp, next
    to the dK and dV rows (at D = 128 the whole 64-query block would not fit in 255 registers)."""
    return QUERY_SUB.get(head_dim, BLOCK_M)


def _grid(group: int):
    def grid(sizes) -> tuple[int, int, int]:
        return (max(1, -(-int(sizes["seq_kv"]) // BLOCK_N)), max(1, int(sizes["heads"]) // group), int(sizes["batch"]))
    return grid


@functools.lru_cache(maxsize=512)
def render_attention_mma_backward(inst: AttentionInstance) -> RenderedKernel:
    """The tensor-core backward kernel of ``inst`` (dQ, dK, dV; cached per instance)."""
    why = unsupported(inst)
    if why is not None:
        raise ValueError(f"attention instance {inst.key()} cannot use the tensor-core backward: {why}")
    mc = modifier_code(inst, backward=True, indent=(4, 20, 28, 24, 28), head_indent=8)
    T = storage_type(inst.dtype)
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in PARAMS)
    mma, pack, vec2 = attention_mma.MMA_ATOMS[inst.dtype]
    name = kernel_name(inst) + "_bwd_mma"
    cfg = AttentionMmaBwdConfig(name=name, signature=", ".join(p.c for p in params), dtype=T, mma=mma, pack=pack,
                                vec2=vec2, head_dim=inst.head_dim, block_m=BLOCK_M, block_n=BLOCK_N,
                                group=inst.group, packed=inst.packed,
                                query_sub=query_sub(inst.head_dim), mods=mc, cutlass_tag=source_tag())
    template = "attention_bwd.mma.cu.jinja"
    return RenderedKernel(name=name, source=render_template(template, cfg), params=params, block=(THREADS, 1, 1),
                          grid=_grid(inst.group), shared_mem=shared_bytes(inst.head_dim), template=template,
                          meta={"instance_key": inst.key(), "backward": True, "variant": "mma"})
