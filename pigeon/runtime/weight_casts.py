"""A 16-bit layer's weights in its dtype, cast once per weight state instead of on every call.

A bf16 / fp16 layer keeps float32 master weights (the optimizer's) and computes in its dtype; a
call that autograd does not record (inference, evaluation) reads the cached cast of each master,
made again only when the master changes (a new tensor, new memory, or an in-place update: its
version counter).  A call that autograd records casts afresh, inside the graph, so the gradient
reaches the master; in training the masters change every step, so that cast is once per step
anyway.  A refreshed cast is a new tensor (a kernel still queued on another stream may read the
old one).
"""
from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["cast_weight", "MAX_ENTRIES"]

MAX_ENTRIES = 1024                  # (master, dtype) pairs kept; the oldest are dropped past it

_CACHE: dict = {}                   # (id(master), dtype) -> (weakref(master), data_ptr, version, cast)
_lock = threading.Lock()


def is_master(dtype: torch.dtype, layer_dtype: torch.dtype) -> bool:
    """Whether a weight of ``dtype`` is a float32 master copy of a 16-bit layer's weight."""
    return dtype == torch.float32 and layer_dtype in (torch.bfloat16, torch.float16)


def cast_weight(w: torch.Tensor, dtype: torch.dtype, records_grad: bool) -> torch.Tensor:
    """``w.to(dtype)``: the cached cast of the same master state when autograd does not record
    the call (``records_grad`` False), else a fresh, differentiable cast."""
    if records_grad or type(w) not in (torch.Tensor, torch.nn.Parameter):
        return w.to(dtype)
    key = (id(w), dtype)
    ent = _CACHE.get(key)
    ptr, version = w.data_ptr(), w._version
    if ent is not None and ent[0]() is w and ent[1] == ptr and ent[2] == version:
        return ent[3]
    with torch.no_grad():
        low = w.to(dtype)
    with _lock:
        if len(_CACHE) >= MAX_ENTRIES:
            for k in list(_CACHE)[:MAX_ENTRIES // 4]:
                del _CACHE[k]
        _CACHE[key] = (weakref.ref(w, lambda _r, k=key: _CACHE.pop(k, None)), ptr, version, low)
    return low
