"""The torch ops behind ``pigeon.attention.attention(..., backend="kernels")``:

* ``pigeon::attention_fwd(str instance, Tensor q, Tensor k, Tensor v, Tensor blk_ptr, Tensor blk_col,
  Tensor blk_full, int[] list_shape, Tensor? cu_seqlens, float scale) -> (Tensor out, Tensor lse)``
* ``pigeon::attention_block_lists(str pattern, Tensor like, SymInt batch, SymInt heads, SymInt q_len,
  SymInt kv_len, SymInt block_m, SymInt block_n) -> (Tensor ptr, Tensor col, Tensor full)``: the
  block lists of a closed-form pattern (``pattern``: its JSON; ``like``: any tensor on the lists'
  device), an op so that torch.compile keeps it in the graph with a data-dependent list length
  (the fake gives ``col`` and ``full`` an unbacked size), and dynamic sequence lengths work.
* ``pigeon::attention_bwd(str instance, Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
  Tensor lse, Tensor blk_ptr, Tensor blk_col, Tensor blk_full, int[] list_shape, Tensor? cu_seqlens,
  float scale) -> (Tensor dq, Tensor dk, Tensor dv)``

``instance`` is the JSON of an :class:`AttentionInstance` (pigeon.ir.serialize: the traced
score_mod, mask_mod and the pattern's mask expression included); ``blk_ptr``, ``blk_col``,
``blk_full`` and ``list_shape`` are the pattern's :class:`BlockLists` (``list_shape`` = its
``(B', H', nq)``), computed per call.  Layouts: dense ``q [B, Hq, S, D]``, ``k, v [B, Hkv, Skv, D]``,
``lse`` float32 ``[B, Hq, S]``; packed (``cu_seqlens``) ``q [T, Hq, D]``, ``lse [Hq, T]``.

Where they run: CUDA tensors: the attention kernels (pigeon/runtime/attention_kernel.py: tensor
cores where they apply, else SIMT).  CPU tensors: with ``PIGEON_CPU_BACKEND=emulate`` the SIMT
kernels' CUDA text emulated; otherwise the reference semantics (pigeon/attention/reference.py's
computation, with the mask the block lists and the pattern's mask expression stand for; the
backward by the flash-attention backward's formulas in float32, not torch.func.vjp, which
opcheck's dispatch-mode checks cannot run inside an op: "Cannot access storage of
TensorWrapper").  Fake (meta) implementations give the shapes;
autograd (``register_autograd``) calls ``attention_bwd``; ``lse`` is not differentiable.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ..codegen.attention import AttentionInstance
from ..ir.expr_grad import derivative
from ..ir.serialize import from_json, register_serializable, to_json
from .patterns import S2, BlockLists, Causal, SlidingWindow, _expand_blocks, block_lists, eval_mask
from .reference import _dense as reference_dense
from .reference import _eval_mod

CLOSED_FORM = (Causal, SlidingWindow, S2)       # patterns of a formula (no tensors)
register_serializable(AttentionInstance, *CLOSED_FORM)

OPS = torch.ops.pigeon


def instance_text(inst: AttentionInstance) -> str:
    return json.dumps(to_json(inst), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> AttentionInstance:
    inst = from_json(json.loads(text))
    if not isinstance(inst, AttentionInstance):
        raise ValueError(f"pigeon::attention: not an AttentionInstance: {type(inst).__name__}")
    return inst


def where(device: torch.device) -> str:
    """"cuda", "emulate" (a CPU running the kernels' CUDA text, PIGEON_CPU_BACKEND=emulate) or
    "semantics" (a CPU running the reference)."""
    if device.type == "cuda":
        return "cuda"
    return "emulate" if os.environ.get("PIGEON_CPU_BACKEND", "torch") == "emulate" else "semantics"


def _lists(blk_ptr, blk_col, blk_full, list_shape) -> BlockLists:
    return BlockLists(tuple(int(s) for s in list_shape), blk_ptr, blk_col, blk_full)


# ------------------------------------------------------------------------------ semantics

def _list_masks(inst, blk_ptr, blk_col, blk_full, list_shape, sq: int, skv: int):
    """(listed, full) [B', H', sq, skv] bool: the pairs in a listed block, in a full one."""
    B, H, nq = (int(s) for s in list_shape)
    nk = -(-skv // inst.block_n)
    dev = blk_ptr.device
    ptr = blk_ptr.long()
    rows = torch.repeat_interleave(torch.arange(B * H * nq, device=dev), ptr[1:] - ptr[:-1])
    cols = blk_col.long()
    listed = torch.zeros(B * H * nq, nk, dtype=torch.bool, device=dev)
    full = torch.zeros_like(listed)
    listed[rows, cols] = True
    full[rows, cols] = blk_full.bool()
    grow = lambda m: _expand_blocks(m.reshape(B, H, nq, nk), inst.block_m, inst.block_n, sq, skv)  # noqa: E731
    return grow(listed), grow(full)


def _pattern_keep(inst, listed, full, heads: int, sq: int, skv: int, device):
    """The pairs the pattern keeps: the full blocks, and the pattern's mask in the others."""
    if inst.pattern_mask is None:
        return listed
    return listed & (full | eval_mask(inst.pattern_mask, heads, sq, skv, device))


def _heads(t, group: int):
    """``t.repeat_interleave(group, dim=1)`` (query head h reads KV head h // group) as a view."""
    B, H, S, D = t.shape
    return t[:, :, None].expand(B, H, group, S, D).reshape(B, H * group, S, D)


def _dense(q, k, v, inst, keep_pattern, scale, doc=None):
    """The reference's dense attention (pigeon/attention/reference.py, the oracle) with the pattern
    given as its mask."""
    return reference_dense(q, k, v, inst.score_mod, inst.mask_mod, None, scale, doc, keep_pattern=keep_pattern)


def _dense_backward(q, k, v, g, inst, keep_pattern, scale, doc=None):
    """(dq, dk, dv) of ``_dense``'s out for ``g``, by the flash-attention backward's formulas in
    float32 (float64 for float64 inputs): P recomputed, dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    times d score_mod / d s (pigeon/ir/expr_grad.py), dQ = scale dS K, dK = scale dS^T Q; GQA
    gradients summed over each KV group."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g = (t.to(dt) for t in (q, k, v, g))
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kk, vv = _heads(k, group), _heads(v, group)
    s0 = torch.einsum("bhqd,bhkd->bhqk", q, kk) * scale
    s = _eval_mod(inst.score_mod, s0, B, Hq, Sq, Skv, q.device, doc).to(dt) if inst.score_mod is not None else s0
    keep = torch.ones(1, 1, Sq, Skv, dtype=torch.bool, device=q.device)
    if inst.mask_mod is not None:
        keep = keep & _eval_mod(inst.mask_mod, None, B, Hq, Sq, Skv, q.device, doc)
    keep = (keep & keep_pattern).expand(B, Hq, Sq, Skv)
    has = keep.any(-1)
    s = torch.where(has[..., None], s.masked_fill(~keep, float("-inf")), torch.zeros_like(s))
    p = torch.exp(s - torch.logsumexp(s, dim=-1)[..., None]) * keep
    out = torch.einsum("bhqk,bhkd->bhqd", p, vv)
    dvv = torch.einsum("bhqk,bhqd->bhkd", p, g)
    ds = p * (torch.einsum("bhqd,bhkd->bhqk", g, vv) - (g * out).sum(-1, keepdim=True))
    if inst.score_mod is not None:
        ds = ds * _eval_mod(derivative(inst.score_mod, "score"), s0, B, Hq, Sq, Skv, q.device, doc).to(dt)
    ds = ds * scale
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kk)
    dkk = torch.einsum("bhqk,bhqd->bhkd", ds, q)
    fold = lambda t: t.reshape(B, Hkv, group, Skv, t.shape[-1]).sum(2)     # noqa: E731
    return dq, fold(dkk), fold(dvv)


def _docs(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:])), max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)


def semantics(inst: AttentionInstance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale):
    """(out, lse) of the op in plain torch: the reference semantics (pigeon/attention/reference.py's
    computation, the pattern given by the block lists and its mask expression)."""
    heads = q.shape[-2] if inst.packed else q.shape[1]
    if cu_seqlens is None:
        sq, skv = q.shape[2], k.shape[2]
        listed, full = _list_masks(inst, blk_ptr, blk_col, blk_full, list_shape, sq, skv)
        return _dense(q, k, v, inst, _pattern_keep(inst, listed, full, heads, sq, skv, q.device), scale)
    docs, longest = _docs(cu_seqlens)
    listed, full = _list_masks(inst, blk_ptr, blk_col, blk_full, list_shape, longest, longest)
    outs, lses = [], []
    for i, (s0, s1) in enumerate(docs):
        L = s1 - s0
        qi, ki, vi = (t[s0:s1].transpose(0, 1)[None] for t in (q, k, v))      # [1, H, L, D]
        keep = _pattern_keep(inst, listed[..., :L, :L], full[..., :L, :L], heads, L, L, q.device)
        o, lse = _dense(qi, ki, vi, inst, keep, scale, torch.tensor([i], device=q.device))
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],)), q.new_zeros((heads, 0), dtype=torch.float32)
    return torch.cat(outs, 0), torch.cat(lses, -1)


def semantics_backward(inst: AttentionInstance, grad_out, q, k, v, blk_ptr, blk_col, blk_full, list_shape,
                       cu_seqlens, scale):
    """(dq, dk, dv) of :func:`semantics`'s out, in the inputs' dtypes."""
    heads = q.shape[-2] if inst.packed else q.shape[1]
    if cu_seqlens is None:
        sq, skv = q.shape[2], k.shape[2]
        listed, full = _list_masks(inst, blk_ptr, blk_col, blk_full, list_shape, sq, skv)
        keep = _pattern_keep(inst, listed, full, heads, sq, skv, q.device)
        dq, dk, dv = _dense_backward(q, k, v, grad_out, inst, keep, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    docs, longest = _docs(cu_seqlens)
    listed, full = _list_masks(inst, blk_ptr, blk_col, blk_full, list_shape, longest, longest)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, (s0, s1) in enumerate(docs):
        L = s1 - s0
        if L == 0:
            continue
        qi, ki, vi, gi = (t[s0:s1].transpose(0, 1)[None] for t in (q, k, v, grad_out))
        keep = _pattern_keep(inst, listed[..., :L, :L], full[..., :L, :L], heads, L, L, q.device)
        a, b, c = _dense_backward(qi, ki, vi, gi, inst, keep, scale, torch.tensor([i], device=q.device))
        for dst, src in ((dq, a), (dk, b), (dv, c)):
            dst[s0:s1] = src[0].transpose(0, 1).to(dst.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------------------ the ops

def _list_rows(pattern, heads, q_len, block_m):
    """(B', H', nq) of a closed-form pattern's lists."""
    return 1, heads if isinstance(pattern, S2) else 1, -(-q_len // block_m)


@torch.library.custom_op("pigeon::attention_block_lists", mutates_args=())
def attention_block_lists(pattern: str, like: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int,
                          block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = parse_pattern(pattern)
    lists = block_lists(p, batch, heads, q_len, kv_len, block_m, block_n, like.device)
    assert tuple(lists.shape) == _list_rows(p, heads, q_len, block_m), (lists.shape, p)
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (lists.ptr, lists.col, lists.full))


@attention_block_lists.register_fake
def _(pattern, like, batch, heads, q_len, kv_len, block_m, block_n):
    B, H, nq = _list_rows(parse_pattern(pattern), heads, q_len, block_m)
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (like.new_empty((B * H * nq + 1,), dtype=torch.int64), like.new_empty((nnz,), dtype=torch.int64),
            like.new_empty((nnz,), dtype=torch.bool))


def pattern_text(pattern) -> str:
    if not isinstance(pattern, CLOSED_FORM):
        raise ValueError(f"pigeon::attention_block_lists takes a closed-form pattern, got {pattern!r}")
    return json.dumps(to_json(pattern), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def parse_pattern(text: str):
    p = from_json(json.loads(text))
    if not isinstance(p, CLOSED_FORM):
        raise ValueError(f"pigeon::attention_block_lists: not a closed-form pattern: {type(p).__name__}")
    return p


def _out_shapes(inst, q, v):
    out = q.shape[:-1] + (v.shape[-1],)
    lse = (q.shape[1], q.shape[0]) if inst.packed else (q.shape[0], q.shape[1], q.shape[2])
    return out, lse


def forward_impl(instance: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_ptr: torch.Tensor,
                 blk_col: torch.Tensor, blk_full: torch.Tensor, list_shape: list[int],
                 cu_seqlens: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What pigeon::attention_fwd computes (the op's body, and the eager path's: ``EagerAttention``)."""
    inst = parse(instance)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w = where(q.device)
    if w == "semantics":
        out, lse = semantics(inst, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale)
        return out.contiguous(), lse.float().contiguous()
    from ..runtime.attention_kernel import run_attention_kernel
    return run_attention_kernel(inst, q, k, v, _lists(blk_ptr, blk_col, blk_full, list_shape), scale, cu_seqlens,
                                emulate=w == "emulate")


attention_fwd = torch.library.custom_op("pigeon::attention_fwd", mutates_args=())(forward_impl)


@attention_fwd.register_fake
def _(instance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale):
    inst = parse(instance)
    out, lse = _out_shapes(inst, q, v)
    return q.new_empty(out), q.new_empty(lse, dtype=torch.float32)


def backward_impl(instance: str, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, blk_ptr: torch.Tensor, blk_col: torch.Tensor,
                  blk_full: torch.Tensor, list_shape: list[int], cu_seqlens: Optional[torch.Tensor],
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of pigeon::attention_fwd's ``out`` for ``grad_out`` (pigeon::attention_bwd's body)."""
    inst = parse(instance)
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    w = where(q.device)
    if w == "semantics":
        dq, dk, dv = semantics_backward(inst, grad_out, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens,
                                        scale)
    else:
        from ..runtime.attention_kernel import run_attention_backward
        dq, dk, dv = run_attention_backward(inst, q, k, v, out, lse.contiguous(), grad_out.contiguous(),
                                            _lists(blk_ptr, blk_col, blk_full, list_shape), scale, cu_seqlens,
                                            emulate=w == "emulate")
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


attention_bwd = torch.library.custom_op("pigeon::attention_bwd", mutates_args=())(backward_impl)


@attention_bwd.register_fake
def _(instance, grad_out, q, k, v, out, lse, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    instance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.instance, ctx.list_shape, ctx.scale, ctx.packed = instance, list(list_shape), scale, cu_seqlens is not None
    ctx.save_for_backward(q, k, v, out, lse, blk_ptr, blk_col, blk_full,
                          *((cu_seqlens,) if cu_seqlens is not None else ()))


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, blk_ptr, blk_col, blk_full, *cu = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 10
    dq, dk, dv = OPS.attention_bwd(ctx.instance, grad_out, q, k, v, out, lse, blk_ptr, blk_col, blk_full,
                                   ctx.list_shape, cu[0] if ctx.packed else None, ctx.scale)
    return None, dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("pigeon::attention_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------------------ the eager path

class EagerAttention(torch.autograd.Function):
    """pigeon::attention_fwd and its autograd formula without the op's dispatch (its Python wrappers
    cost ~40 us a call on the CPU machine, more with autograd): the same ``forward_impl``, the same
    saved tensors, ``backward_impl`` for the gradients.  Only in eager mode on plain tensors
    (pigeon/attention/api.py ``_eager``); a backward that must itself be differentiable
    (create_graph) calls the op, as the op path does."""

    @staticmethod
    def forward(ctx, instance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale):
        out, lse = forward_impl(instance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale)
        _setup(ctx, (instance, q, k, v, blk_ptr, blk_col, blk_full, list_shape, cu_seqlens, scale), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():           # create_graph: the op's (non-differentiable) backward, as the op path
            return _backward(ctx, grad_out, grad_lse)
        if grad_out is None:
            return (None,) * 10
        q, k, v, out, lse, blk_ptr, blk_col, blk_full, *cu = ctx.saved_tensors
        dq, dk, dv = backward_impl(ctx.instance, grad_out, q, k, v, out, lse, blk_ptr, blk_col, blk_full,
                                   ctx.list_shape, cu[0] if ctx.packed else None, ctx.scale)
        return None, dq, dk, dv, None, None, None, None, None, None
