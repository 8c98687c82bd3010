"""``pigeon.attention.attention(q, k, v, ...)``: checks every input, traces the modifiers, and runs
the variant.

Backends: ``"kernels"`` (the default) runs the torch ops of pigeon/attention/ops.py:
``pigeon::attention_fwd`` (out, lse), ``pigeon::attention_bwd`` (its autograd: dq, dk, dv) and
``pigeon::attention_block_lists`` (a closed-form pattern's block lists), with fake
implementations; they pass ``torch.library.opcheck`` and work under ``torch.compile``
(``fullgraph=True`` with a closed-form pattern or none, dynamic sequence lengths included; packed
``cu_seqlens`` and ``BlockList``/``TopK`` patterns read tensor values and break the graph).  The
instance (an AttentionInstance with the traced modifiers and the pattern's mask expression) goes
to the ops as JSON, a constant under torch.compile (``assume_constant_result``).  On a GPU the
ops run pigeon's attention kernels, the traced modifiers and the pattern's mask inlined, over the
pattern's block lists: the tensor-core forward and backward (``attention.mma.cu.jinja``,
``attention_bwd.mma.cu.jinja``) where they apply, else the SIMT ones
(pigeon/runtime/attention_kernel.py ``kernel_variant``).  On a CPU the SIMT kernels' CUDA text
runs emulated with ``PIGEON_CPU_BACKEND=emulate``, else the reference semantics (the backward by
the flash-attention formulas).  ``"reference"`` runs pigeon/attention/reference.py (plain torch,
any device, torch autograd).  Every check below fails with one line naming the tensor and the
problem, before anything runs.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .. import trace_cache
from .mods import trace_mask_mod, trace_score_mod
from .patterns import PATTERNS, S2, BlockList, Causal, SlidingWindow, TopK, all_blocks, block_lists, mask_expr
from .reference import attention_reference

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
BACKENDS = ("reference", "kernels")


class AttentionInputError(ValueError):
    """A bad attention call: names the tensor and the problem."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AttentionInputError(msg)


_CU_VALUES: dict = {}      # id(cu_seqlens) -> (weak reference, _version, its values)
_CU_VALUES_MAX = 64


def cu_values(c: torch.Tensor) -> list[int]:
    """``cu_seqlens`` on the host: one device-to-host copy per tensor and version, instead of a
    device sync for each of the checks and the longest document on every call.  The entry is the
    tensor itself (a weak reference) at its in-place version: a new tensor or an in-place change
    reads the values again."""
    if torch.compiler.is_compiling():
        return c.tolist()
    ent = _CU_VALUES.get(id(c))
    if ent is not None and ent[0]() is c and ent[1] == c._version:
        return ent[2]
    vals = [int(x) for x in c.tolist()]
    if len(_CU_VALUES) >= _CU_VALUES_MAX:
        _CU_VALUES.clear()
    _CU_VALUES[id(c)] = (weakref.ref(c), c._version, vals)
    return vals


def check_inputs(q, k, v, *, enable_gqa: bool, cu_seqlens, pattern, backend: str) -> None:
    # every message is formatted only when its check fails: formatting them all (shapes as lists)
    # cost ~35 us of host time per call
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise AttentionInputError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "[T, heads, head_dim] (packed, with cu_seqlens)" if packed else "[batch, heads, seq, head_dim]"
            raise AttentionInputError(f"attention: {name} must be {layout}, got shape {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    hq, hk, hv = (t.shape[-2] if packed else t.shape[1] for t in (q, k, v))
    if not (k.shape == v.shape[:-1] + (k.shape[-1],) and hk == hv):
        raise AttentionInputError(f"attention: k {list(k.shape)} and v {list(v.shape)} must agree but for the last axis")
    if q.shape[-1] != k.shape[-1]:
        raise AttentionInputError(f"attention: q's head_dim {q.shape[-1]} != k's {k.shape[-1]}")
    if q.shape[0] != k.shape[0]:
        raise AttentionInputError(f"attention: packed q has {q.shape[0]} tokens, k {k.shape[0]}; cu_seqlens describes both"
                                  if packed else f"attention: q has batch {q.shape[0]}, k batch {k.shape[0]}")
    if enable_gqa:
        if hq % hk != 0:
            raise AttentionInputError(f"attention: {hq} query heads are not a multiple of {hk} key/value heads (GQA)")
    elif hq != hk:
        raise AttentionInputError(f"attention: {hq} query heads but {hk} key/value heads; pass enable_gqa=True for GQA/MQA")
    if packed:
        c = cu_seqlens
        _check(isinstance(c, torch.Tensor) and c.dim() == 1 and c.numel() >= 2 and not c.is_floating_point(),
               "attention: cu_seqlens must be a 1-D integer tensor [documents + 1]")
        vals = cu_values(c)
        if vals[0] != 0:
            raise AttentionInputError(f"attention: cu_seqlens must start at 0, got {vals[0]}")
        for i in range(1, len(vals)):
            if vals[i] < vals[i - 1]:
                raise AttentionInputError(f"attention: cu_seqlens decreases at index {i}")
        if vals[-1] != q.shape[0]:
            raise AttentionInputError(f"attention: cu_seqlens ends at {vals[-1]} but q has {q.shape[0]} tokens")
    if pattern is not None:
        if not isinstance(pattern, PATTERNS):       # the message only then: repr() is not traceable by dynamo
            raise AttentionInputError(f"attention: unknown pattern {pattern!r}; known: "
                                      f"{[p.__name__ for p in PATTERNS]}")
        if packed and isinstance(pattern, (BlockList, TopK)):
            raise AttentionInputError("attention: block-list and top-k patterns take the dense layout, not cu_seqlens")
    if backend == "kernels":
        if q.shape[-1] not in KERNEL_HEAD_DIMS:
            raise AttentionInputError(f"attention: head_dim {q.shape[-1]} is not supported by the kernels "
                                      f"(supported: {KERNEL_HEAD_DIMS})")
        if q.dtype not in KERNEL_DTYPES:
            raise AttentionInputError(f"attention: the kernels take bfloat16 or float16, got {q.dtype}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1:
                raise AttentionInputError(f"attention: {name}'s last axis must be contiguous (stride {t.stride(-1)})")


def attention(q, k, v, *, score_mod: Callable | None = None, mask_mod: Callable | None = None, pattern=None,
              scale: float | None = None, enable_gqa: bool = False, cu_seqlens: torch.Tensor | None = None,
              return_lse: bool = False, backend: str = "kernels"):
    """Attention with traced modifiers and a closed-form pattern; returns ``out`` (the shape of
    ``q`` with v's head_dim), or ``(out, lse)`` with ``return_lse``.  ``backend="kernels"`` runs
    the ``pigeon::attention_fwd`` / ``pigeon::attention_bwd`` torch ops (pigeon/attention/ops.py)."""
    if backend not in BACKENDS:
        raise AttentionInputError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, enable_gqa=enable_gqa, cu_seqlens=cu_seqlens, pattern=pattern, backend=backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "kernels":
        out, lse = _run_ops(q, k, v, score_mod, mask_mod, pattern, scale, cu_seqlens)
    else:
        smod = trace_score_mod(score_mod) if score_mod is not None else None
        mmod = trace_mask_mod(mask_mod) if mask_mod is not None else None
        out, lse = attention_reference(q, k, v, score_mod=smod, mask_mod=mmod, pattern=pattern, scale=scale,
                                       cu_seqlens=cu_seqlens)
    return (out, lse) if return_lse else out


def _blocks(pattern) -> tuple[int, int]:
    if isinstance(pattern, S2):
        return pattern.block, pattern.block
    if isinstance(pattern, TopK) and pattern.block_m % 64 == 0 and pattern.block_n % 64 == 0:
        return 64, 64       # listed on the 64 x 64 grid (patterns.refine): the tensor-core kernels iterate it
    if isinstance(pattern, (BlockList, TopK)):
        return pattern.block_m, pattern.block_n
    return 64, 64


CLOSED_FORM = (Causal, SlidingWindow, S2)      # patterns of a formula (no tensors)


@torch.compiler.assume_constant_result
def _instance_text(score_mod, mask_mod, pattern, head_dim: int, value_dim: int, dtype: str, group: int,
                   packed: bool, block_m: int, block_n: int, pattern_kind: str = "") -> str:
    """The ops' instance argument (the AttentionInstance's JSON, traced modifiers included).  A
    constant under torch.compile: dynamo runs it once, eagerly, instead of tracing the tracer;
    ``pattern``: a closed-form pattern or None (a block-list / top-k pattern has no mask
    expression)."""
    def make() -> str:
        from ..codegen.attention import AttentionInstance
        from .ops import instance_text
        smod = trace_score_mod(score_mod) if score_mod is not None else None
        mmod = trace_mask_mod(mask_mod) if mask_mod is not None else None
        pm = mask_expr(pattern) if pattern is not None else None
        return instance_text(AttentionInstance(head_dim, value_dim, dtype, group, packed, block_m, block_n,
                                               smod, mmod, pm, pattern_kind))
    # tracing and serializing cost 0.2-0.8 ms per call on the host: kept per (modifiers, pattern,
    # sizes) as pigeon/trace_cache.py identifies functions (a closed-form pattern is a frozen value)
    return trace_cache.cached_text("attention", (score_mod, mask_mod), make, pattern, head_dim, value_dim, dtype,
                                   group, packed, block_m, block_n, pattern_kind)


@torch.compiler.assume_constant_result
def _pattern_text(pattern) -> str:
    """A closed-form pattern's JSON, pigeon::attention_block_lists's argument (a constant under
    torch.compile)."""
    from .ops import pattern_text
    return pattern_text(pattern)


def _run_ops(q, k, v, score_mod, mask_mod, pattern, scale, cu_seqlens):
    """pigeon::attention_fwd of a checked call (autograd: pigeon::attention_bwd).  In eager mode on
    plain tensors the same implementations run without the op's dispatch (~40 us a call):
    ``EagerAttention`` when autograd records the call, the forward alone when it does not;
    torch.compile, opcheck, fake tensors, dispatch modes, functorch transforms and
    ``PIGEON_EAGER_FASTPATH=0`` take the op."""
    from ..runtime.ops import _eager
    from .ops import OPS, EagerAttention, forward_impl    # registers the pigeon::attention_* ops
    args = _op_args(q, k, v, score_mod, mask_mod, pattern, scale, cu_seqlens)
    tensors = [t for t in args[1:7]] + ([cu_seqlens] if cu_seqlens is not None else [])
    if not _eager(tensors, ()):
        return OPS.attention_fwd(*args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return EagerAttention.apply(*args)
    return forward_impl(*args)


def _call_shape(q, k, pattern, cu_seqlens) -> tuple:
    """(packed, query heads, KV heads, block_m, block_n, dtype name, batch, q_len, kv_len) of a
    checked call (packed: one list batch over the longest document)."""
    packed = cu_seqlens is not None
    hq = q.shape[-2] if packed else q.shape[1]
    hk = k.shape[-2] if packed else k.shape[1]
    bm, bn = _blocks(pattern)
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[q.dtype]
    if packed:
        vals = cu_values(cu_seqlens)
        sq = skv = max((b - a for a, b in zip(vals, vals[1:])), default=0)
        batch = 1
    else:
        batch, sq, skv = q.shape[0], q.shape[2], k.shape[2]
    return packed, hq, hk, bm, bn, dtype, batch, sq, skv


# The block lists of no pattern or a closed-form one depend only on the call shape: an eager call
# reuses them (building them is a dozen small torch ops per call: ~0.3 ms of host time for causal
# on the CPU machine).  The kernels only read them; at most MAX_LISTS shapes are kept, least
# recently used first out (S 32k causal lists are ~2 MB).
MAX_LISTS = 64
_LISTS: "OrderedDict[tuple, tuple]" = OrderedDict()
_lists_lock = threading.Lock()


def _lists_get(key):
    """The cached entry of ``key`` (now the most recently used one), or None."""
    got = _LISTS.get(key)
    if got is not None:
        with _lists_lock:
            if key in _LISTS:
                _LISTS.move_to_end(key)
    return got


def _lists_put(key, got):
    with _lists_lock:
        _LISTS[key] = got
        while len(_LISTS) > MAX_LISTS:
            _LISTS.popitem(last=False)
    return got


def _closed_lists(closed, batch: int, hq: int, sq: int, skv: int, bm: int, bn: int, device) -> tuple:
    """(ptr, col, full, shape) of no pattern (``closed`` None) or a closed-form pattern, cached."""
    key = (closed, batch, hq, sq, skv, bm, bn, device)
    got = _lists_get(key)
    if got is not None:
        return got
    if closed is None:
        lists = all_blocks(sq, skv, bm, bn, device)
        ptr, col, full, shape = lists.ptr, lists.col, lists.full, tuple(lists.shape)
    else:
        from . import ops
        ptr, col, full = ops.attention_block_lists(_pattern_text(closed), torch.empty(0, device=device), batch, hq,
                                                   sq, skv, bm, bn)
        shape = ops._list_rows(closed, hq, sq, bm)
    # int32, as the kernels bind them (pigeon/runtime/attention_kernel.py: its casts are then no-ops)
    return _lists_put(key, tuple(t.to(torch.int32).contiguous() for t in (ptr, col, full)) + (shape,))


def _data_tensors(pattern) -> tuple:
    return (pattern.indices,) if isinstance(pattern, TopK) else (pattern.crow, pattern.col)


def _prime_topk_tiles(pattern, lists, hq: int, sq: int, skv: int) -> None:
    """A top-k selection of 128-row blocks on a GPU: its tile lists for CUTLASS's Hopper forward come
    straight from the selection instead of from regrouping ``lists`` (about half the torch ops;
    pigeon/runtime/attention_tiles.py topk_tile_lists), recorded for those list tensors."""
    if not (isinstance(pattern, TopK) and pattern.block_m == 128 and pattern.block_n in (64, 128)
            and lists.ptr.is_cuda and torch.cuda.get_device_capability(lists.ptr.device)[0] == 9):
        return
    from ..codegen.attention_wgmma import requested
    if requested() not in ("auto", "cutlass"):
        return                  # another forward runs: it reads the block lists only
    from ..runtime.attention_sm90 import prime_tiles
    from ..runtime.attention_tiles import topk_tile_lists
    prime_tiles(lists.ptr, lists.col, lists.full, sq, skv, pattern.block_n,
                topk_tile_lists(pattern.indices.to(lists.ptr.device), hq, sq, skv, pattern.block_n))


def _data_lists(pattern, batch: int, hq: int, sq: int, skv: int, bm: int, bn: int, device) -> tuple:
    """(ptr, col, full, shape) of a block-list / top-k pattern, cached while its tensors are the same
    objects at the same version (an in-place write bumps ``_version``): a model that reuses one
    selection over calls builds its lists once, as FlexAttention's block mask is built once outside
    its calls; new selection tensors each call build them each call (a dozen torch ops, a few host
    syncs).  The entry holds the tensors, so their ids stay theirs."""
    data = _data_tensors(pattern)
    key = ("data", type(pattern).__name__, tuple((id(t), t._version) for t in data), pattern.block_m,
           pattern.block_n, batch, hq, sq, skv, bm, bn, device)
    got = _lists_get(key)
    if got is not None and all(a is b for a, b in zip(got[4], data)):
        return got[:4]
    lists = block_lists(pattern, batch, hq, sq, skv, bm, bn, device)
    _prime_topk_tiles(pattern, lists, hq, sq, skv)
    return _lists_put(key, (lists.ptr, lists.col, lists.full, tuple(lists.shape), data))[:4]


def _op_args(q, k, v, score_mod, mask_mod, pattern, scale, cu_seqlens) -> tuple:
    """pigeon::attention_fwd's arguments for a checked call: the instance text, q, k, v, the
    block lists (computed for this call), list_shape, cu_seqlens, scale."""
    from . import ops       # registers the pigeon::attention_* ops
    packed, hq, hk, bm, bn, dtype, batch, sq, skv = _call_shape(q, k, pattern, cu_seqlens)
    closed = pattern if isinstance(pattern, CLOSED_FORM) else None
    text = _instance_text(score_mod, mask_mod, closed, q.shape[-1], v.shape[-1], dtype, hq // hk, packed, bm, bn,
                          type(pattern).__name__ if pattern is not None else "")
    if pattern is None or closed is not None:
        if not torch.compiler.is_compiling():      # eager: one list per call shape, made once
            ptr, col, full, shape = _closed_lists(closed, batch, hq, sq, skv, bm, bn, q.device)
        elif pattern is None:
            lists = all_blocks(sq, skv, bm, bn, q.device)
            ptr, col, full, shape = lists.ptr, lists.col, lists.full, tuple(lists.shape)
        else:                       # an op: under torch.compile the lists' data-dependent length stays in the graph
            ptr, col, full = torch.ops.pigeon.attention_block_lists(_pattern_text(closed), q.new_empty(0), batch, hq,
                                                                    sq, skv, bm, bn)
            shape = ops._list_rows(closed, hq, sq, bm)
    elif not torch.compiler.is_compiling():     # block-list / top-k patterns: from their given tensors
        ptr, col, full, shape = _data_lists(pattern, batch, hq, sq, skv, bm, bn, q.device)
    else:
        lists = block_lists(pattern, batch, hq, sq, skv, bm, bn, q.device)
        ptr, col, full, shape = lists.ptr, lists.col, lists.full, tuple(lists.shape)
    return text, q.contiguous(), k.contiguous(), v.contiguous(), ptr, col, full, list(shape), cu_seqlens, scale


def _plan(q, k, v, smod, mmod, pattern, cu_seqlens):
    """The kernel instance (of traced modifiers ``smod``, ``mmod``) and block lists of a call, and
    where its kernels run: "cuda", "emulate" (the CUDA text on a CPU, PIGEON_CPU_BACKEND=emulate)
    or "semantics" (a CPU: the reference).  For tools and tests (scripts/prebuild_kernels.py);
    ``attention()`` goes through :func:`_run_ops`."""
    from ..codegen.attention import AttentionInstance
    from .ops import where
    packed, hq, hk, bm, bn, dtype, batch, sq, skv = _call_shape(q, k, pattern, cu_seqlens)
    inst = AttentionInstance(q.shape[-1], v.shape[-1], dtype, hq // hk, packed, bm, bn, smod, mmod,
                             mask_expr(pattern) if pattern is not None else None,
                             type(pattern).__name__ if pattern is not None else "")
    if pattern is None:
        lists = all_blocks(sq, skv, bm, bn, q.device)
    else:
        lists = block_lists(pattern, batch, hq, sq, skv, bm, bn, q.device)
    return inst, lists, where(q.device)


def kernels_used(q, k, v, *, score_mod: Callable | None = None, mask_mod: Callable | None = None, pattern=None,
                 cu_seqlens=None, scale: float | None = None) -> dict:
    """Which CUDA kernels ``attention`` runs for these arguments: {"forward": "mma" | "simt",
    "backward": ..., "why_not_mma": {...}, and with a tensor-core forward "forward_schedule": its
    knob string; "wgmma" where pigeon's Hopper forward runs, "cutlass" where CUTLASS's FMHA kernel does
    (forward or backward; ``scale`` as the call gives it)} (pigeon/runtime/attention_kernel.py's rule,
    PIGEON_ATTENTION_KERNEL honoured).  For tools that report it (``pigeon bench attention``)."""
    from ..codegen import attention_mma, attention_mma_bwd
    from ..runtime.attention_kernel import kernel_variant
    smod = trace_score_mod(score_mod) if score_mod is not None else None
    mmod = trace_mask_mod(mask_mod) if mask_mod is not None else None
    inst, lists, _ = _plan(q, k, v, smod, mmod, pattern, cu_seqlens)
    out = {"why_not_mma": {}}
    for what, bwd, mod in (("forward", False, attention_mma), ("backward", True, attention_mma_bwd)):
        out[what] = kernel_variant(inst, False, bwd)
        if out[what] == "simt":
            out["why_not_mma"][what] = mod.unsupported(inst) or "PIGEON_ATTENTION_KERNEL=simt"
    if out["forward"] == "mma":       # the tensor-core forward's schedule (PIGEON_ATTN_MMA_TUNE honoured)
        from ..codegen import attention_wgmma
        from ..runtime.build import device_arch
        arch = device_arch(q.device) if q.device.type == "cuda" else None
        template = attention_wgmma.forward_template(inst, arch)         # Hopper's default (PIGEON_ATTN_FORWARD)
        if template == "cutlass":
            from ..codegen import attention_sm90
            why = attention_sm90.call_unsupported(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                                  inst.group) if not inst.packed else "cu_seqlens"
            if why is None:
                out["forward"] = "cutlass"
                from ..runtime.attention_sm90 import block_n_for
                knobs = os.environ.get(attention_sm90.TUNE_ENV, "")
                bn = block_n_for(inst, lists, q.shape[2], k.shape[2], knobs)
                out["forward_schedule"] = attention_sm90.tuning(inst.head_dim, f"{knobs},bn{bn}").tag() + (
                    ",listed" if attention_sm90.listed(inst) else "")
            else:
                out["why_not_cutlass"] = why
                template = "wgmma"
        if template == "wgmma":
            out["forward"] = "wgmma"
            out["forward_schedule"] = attention_wgmma.tuning().tag()
        elif template == "mma":         # (CUTLASS's schedule was set above)
            out["forward_schedule"] = attention_mma.tuning(inst.head_dim).tag()
    if out["backward"] == "mma" and q.device.type == "cuda" and not inst.packed:
        from ..codegen import attention_sm90
        from ..runtime.build import device_arch
        if attention_sm90.backward_template(inst, device_arch(q.device)) == "cutlass":
            sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
            why = attention_sm90.backward_call_unsupported(q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                                           q.shape[3], sc)
            if why is None:
                out["backward"] = "cutlass"
            else:
                out["why_not_cutlass_backward"] = why
    return out
