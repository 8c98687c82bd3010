"""``pigeon.attention.attention(q, k, v, ...)``: checks every input, traces the modifiers, and runs
the variant.

What runs today: ``backend="reference"`` (pigeon/attention/reference.py, plain torch, any device,
differentiable through torch autograd).  The flash-style kernels of the attention issue are not
built yet: ``backend="kernels"`` raises ``NotImplementedError`` after the checks, rather than
running the reference in their place.  Every check below fails with one line naming the tensor
and the problem, before anything is computed.
"""
from __future__ import annotations

from typing import Callable

import torch

from .mods import trace_mask_mod, trace_score_mod
from .patterns import PATTERNS, BlockList, TopK, block_lists
from .reference import attention_reference

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
BACKENDS = ("reference", "kernels")


class AttentionInputError(ValueError):
    """A bad attention call: names the tensor and the problem."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AttentionInputError(msg)


def check_inputs(q, k, v, *, enable_gqa: bool, cu_seqlens, pattern, backend: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor), f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.is_floating_point(), f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    layout = "[T, heads, head_dim] (packed, with cu_seqlens)" if packed else "[batch, heads, seq, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.dim() == want, f"attention: {name} must be {layout}, got shape {list(t.shape)}")
    _check(q.dtype == k.dtype == v.dtype, f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    _check(q.device == k.device == v.device, f"attention: q, k, v are on different devices "
                                             f"({q.device}, {k.device}, {v.device})")
    hq, hk, hv = (t.shape[-2] if packed else t.shape[1] for t in (q, k, v))
    _check(k.shape == v.shape[:-1] + (k.shape[-1],) and hk == hv,
           f"attention: k {list(k.shape)} and v {list(v.shape)} must agree but for the last axis")
    _check(q.shape[-1] == k.shape[-1], f"attention: q's head_dim {q.shape[-1]} != k's {k.shape[-1]}")
    if packed:
        _check(q.shape[0] == k.shape[0], f"attention: packed q has {q.shape[0]} tokens, k {k.shape[0]}; "
                                         "cu_seqlens describes both")
    else:
        _check(q.shape[0] == k.shape[0], f"attention: q has batch {q.shape[0]}, k batch {k.shape[0]}")
    if enable_gqa:
        _check(hq % hk == 0, f"attention: {hq} query heads are not a multiple of {hk} key/value heads (GQA)")
    else:
        _check(hq == hk, f"attention: {hq} query heads but {hk} key/value heads; pass enable_gqa=True for GQA/MQA")
    if packed:
        c = cu_seqlens
        _check(isinstance(c, torch.Tensor) and c.dim() == 1 and c.numel() >= 2 and not c.is_floating_point(),
               "attention: cu_seqlens must be a 1-D integer tensor [documents + 1]")
        _check(int(c[0]) == 0, f"attention: cu_seqlens must start at 0, got {int(c[0])}")
        d = c[1:] - c[:-1]
        bad = (d < 0).nonzero()
        _check(bad.numel() == 0, f"attention: cu_seqlens decreases at index {int(bad[0]) + 1 if bad.numel() else 0}")
        _check(int(c[-1]) == q.shape[0], f"attention: cu_seqlens ends at {int(c[-1])} but q has {q.shape[0]} tokens")
    if pattern is not None:
        _check(isinstance(pattern, PATTERNS), f"attention: unknown pattern {pattern!r}; known: "
                                              f"{[p.__name__ for p in PATTERNS]}")
        if isinstance(pattern, (BlockList, TopK)):
            _check(not packed, "attention: block-list and top-k patterns take the dense layout, not cu_seqlens")
    if backend == "kernels":
        _check(q.shape[-1] in KERNEL_HEAD_DIMS, f"attention: head_dim {q.shape[-1]} is not supported by the "
                                                f"kernels (supported: {KERNEL_HEAD_DIMS})")
        _check(q.dtype in KERNEL_DTYPES, f"attention: the kernels take bfloat16 or float16, got {q.dtype}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check(t.stride(-1) == 1, f"attention: {name}'s last axis must be contiguous (stride {t.stride(-1)})")


def attention(q, k, v, *, score_mod: Callable | None = None, mask_mod: Callable | None = None, pattern=None,
              scale: float | None = None, enable_gqa: bool = False, cu_seqlens: torch.Tensor | None = None,
              return_lse: bool = False, backend: str = "kernels"):
    """Attention with traced modifiers and a closed-form pattern; returns ``out`` (the shape of
    ``q`` with v's head_dim), or ``(out, lse)`` with ``return_lse``."""
    if backend not in BACKENDS:
        raise AttentionInputError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, enable_gqa=enable_gqa, cu_seqlens=cu_seqlens, pattern=pattern, backend=backend)
    smod = trace_score_mod(score_mod) if score_mod is not None else None
    mmod = trace_mask_mod(mask_mod) if mask_mod is not None else None
    if backend == "kernels":
        raise NotImplementedError("pigeon.attention: the flash-style attention kernels are not built yet; "
                                  "backend='reference' runs the same variant with torch ops")
    out, lse = attention_reference(q, k, v, score_mod=smod, mask_mod=mmod, pattern=pattern, scale=scale,
                                   cu_seqlens=cu_seqlens)
    return (out, lse) if return_lse else out


__all__ = ["AttentionInputError", "attention", "block_lists", "check_inputs"]
