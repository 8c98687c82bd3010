"""Running the CUTLASS sm90 attention forward and backward (pigeon/codegen/attention_sm90.py): the
library of an instance built (disk cache) and loaded once per process, called with device pointers on
torch's current stream.

The kernel writes every output row (O [B, H, q_len, D], LSE [B, H, q_len]); a row that keeps no
key gets output 0 and lse +inf from CUTLASS's softmax, which this module turns into pigeon's -inf
(only when a row can keep no key: a mask_mod, or a causal call with q_len > kv_len).
"""
from __future__ import annotations

import functools
import math
import os
import struct
import threading
from collections import OrderedDict

import torch

from ..codegen import attention_sm90
from ..codegen.attention import AttentionInstance

__all__ = ["run_sm90_forward", "run_sm90_backward", "block_n_for", "tiles_for", "prime_tiles", "rows_can_be_empty"]


@functools.lru_cache(maxsize=256)
def _library(spec: attention_sm90.Sm90Attention):
    from .hostlib import load_library
    return load_library(attention_sm90.render_attention_sm90(spec), attention_sm90.ARCH, name=spec.name)


def _raw_stream(dev: int) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(dev)) if raw is not None else torch.cuda.current_stream(dev).cuda_stream


# tile lists of the cached block lists of closed-form patterns (pigeon/attention/api.py keeps those
# per call shape): made once per (lists, tile); the entry holds the lists, so their ids stay theirs
_TILES: "OrderedDict[tuple, tuple]" = OrderedDict()
_tiles_lock = threading.Lock()
MAX_TILES = 64


def _remember(key: tuple, ptr, col, full, t) -> None:
    with _tiles_lock:
        _TILES[key] = (ptr, col, full, t)
        while len(_TILES) > MAX_TILES:
            _TILES.popitem(last=False)


def prime_tiles(ptr, col, full, q_len: int, kv_len: int, block_n: int, tiles) -> None:
    """Record ``tiles`` as the tile lists of the block lists (``ptr``, ``col``, ``full``) on the
    128 x ``block_n`` tile, made by a caller that knows a cheaper way (pigeon/attention/api.py, from a
    top-k selection: pigeon/runtime/attention_tiles.py topk_tile_lists); :func:`tiles_for` then
    returns them for those tensors."""
    _remember((id(ptr), id(col), id(full), q_len, kv_len, block_n), ptr, col, full, tiles)


def tiles_for(inst: AttentionInstance, lists, q_len: int, kv_len: int, block_n: int):
    """The tile lists (pigeon/runtime/attention_tiles.py) of ``lists`` for a listed instance on the
    128 x ``block_n`` tile; reused while the same list tensors come back."""
    from .attention_tiles import tile_lists
    key = (id(lists.ptr), id(lists.col), id(lists.full), q_len, kv_len, block_n)
    got = _TILES.get(key)
    if got is not None and got[0] is lists.ptr and got[1] is lists.col and got[2] is lists.full:
        return got[3]
    t = tile_lists(lists, inst.block_m, inst.block_n, q_len, kv_len, attention_sm90.BLOCK_M, block_n)
    _remember(key, lists.ptr, lists.col, lists.full, t)
    return t


# a listed pattern's tile: 128 keys unless 64-key tiles visit at most this fraction of the area the
# 128-key ones do (S2's strided 64-key blocks: 128-key tiles cover twice their pairs, all of it through
# the mask; a window's or top-k's visit the same area either way)
NARROW_TILE_AREA = 0.75
CLOSED_FORM = ("Causal", "SlidingWindow", "S2")     # lists made once per call shape (api.py caches them)


@functools.lru_cache(maxsize=64)
def _knob_block_n(head_dim: int, knobs: str) -> tuple[int, bool]:
    """(the schedule's block_n under ``knobs``, whether ``knobs`` names one): parsed once per string."""
    return (attention_sm90.tuning(head_dim, knobs).block_n,
            any(w.strip() in ("bn64", "bn128") for w in knobs.split(",")))


@functools.lru_cache(maxsize=512)
def _call_library(inst: AttentionInstance, scale_bits: int | None, knobs: str, block_n: int):
    """(spec, loaded library) of ``inst`` under ``knobs`` on ``block_n``-key tiles; ``scale_bits``
    only for a score_mod (whose library holds the scale): resolved once per combination, not per call."""
    scale = struct.unpack("<f", struct.pack("<I", scale_bits))[0] if scale_bits is not None else 1.0
    spec = attention_sm90.spec_for(inst, scale, ",".join(w for w in (knobs, f"bn{block_n}") if w))
    return spec, _library(spec)


def block_n_for(inst: AttentionInstance, lists, q_len: int, kv_len: int, knobs: str) -> int:
    """The key tile of this call: ``PIGEON_ATTN_SM90_TUNE``'s ``bn`` knob when it has one, else the
    schedule's for a prefix instance or a pattern whose lists are data given per call (top-k, block
    lists: no second regrouping per call), else the narrower tile where it visits at most
    NARROW_TILE_AREA of the wider one's area (both tile lists are cached with the lists)."""
    block_n, explicit = _knob_block_n(inst.head_dim, knobs)
    if explicit or not attention_sm90.listed(inst) or inst.pattern_kind not in CLOSED_FORM or lists is None:
        return block_n
    wide = tiles_for(inst, lists, q_len, kv_len, 128)
    narrow = tiles_for(inst, lists, q_len, kv_len, 64)
    return 64 if narrow.ent.numel() * 64 <= NARROW_TILE_AREA * wide.ent.numel() * 128 else 128


def run_sm90_forward(inst: AttentionInstance, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float, lists=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``inst`` for contiguous, 16-byte aligned ``q [B, Hq, q_len, D]``, ``k, v [B, Hkv,
    kv_len, D]`` (the caller checked :func:`attention_sm90.call_unsupported`); ``lists``: the
    pattern's BlockLists (a listed instance)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = inst.group
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if os.environ.get("PIGEON_POISON", "") == "1":      # every output element must be written
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    knobs = os.environ.get(attention_sm90.TUNE_ENV, "")
    bn = block_n_for(inst, lists, Sq, Skv, knobs)
    bits = attention_sm90.float_bits(scale)
    spec, lib = _call_library(inst, bits if inst.score_mod is not None else None, knobs, bn)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    # GQA: the G query heads of a KV head are consecutive [q_len, D] slabs, i.e. [B, Hkv, G * q_len, D]
    sizes = [B, Hkv, G * Sq, Skv, bits, dev]
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()]
    if attention_sm90.listed(inst):
        if lists is None:
            raise ValueError(f"attention instance {inst.key()}: the CUTLASS forward of pattern {inst.pattern_kind} "
                             "needs its block lists")
        t = tiles_for(inst, lists, Sq, Skv, spec.schedule.block_n)
        sizes += list(t.shape)
        ptrs += [t.ptr.data_ptr(), t.ent.data_ptr() if t.ent.numel() else t.ptr.data_ptr(), t.nfull.data_ptr()]
    lib.run(ptrs, sizes, 0, _raw_stream(dev))
    if rows_can_be_empty(inst, Sq, Skv):
        lse.masked_fill_(lse == math.inf, -math.inf)
    return out, lse


def rows_can_be_empty(inst: AttentionInstance, q_len: int, kv_len: int) -> bool:
    """Whether a query row of this call can keep no key (CUTLASS then writes lse +inf, pigeon's is
    -inf): a mask_mod, or a top-k / block list, may drop every key of a row; causal, a sliding window
    and S2 keep each row's aligned diagonal key (query + kv_len - q_len), which exists unless
    q_len > kv_len; no pattern keeps every key."""
    if inst.mask_mod is not None:
        return True
    if inst.pattern_kind in CLOSED_FORM:
        return q_len > kv_len
    return inst.pattern_kind != ""


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(lib, sizes: tuple) -> int:
    return lib.workspace(sizes)


def run_sm90_backward(inst: AttentionInstance, q, k, v, out, lse, grad_out) -> tuple:
    """(dq, dk, dv) of ``inst`` on CUTLASS's backward for contiguous, 16-byte aligned inputs (the
    caller checked :func:`attention_sm90.backward_call_unsupported`, the scale among it); ``lse`` as
    the forward returned it (-inf for a row with no kept key, passed to CUTLASS as +inf)."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if os.environ.get("PIGEON_POISON", "") == "1":      # every gradient element must be written
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    if rows_can_be_empty(inst, Sq, Skv):
        lse = lse.masked_fill(lse == -math.inf, math.inf)
    lib = _library(attention_sm90.backward_spec_for(inst))
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    sizes = (B, H, Sq, Skv, 0, dev)
    ws_bytes = _workspace_bytes(lib, sizes)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes > 0 else None
    lib.run((q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), grad_out.data_ptr(),
             dq.data_ptr(), dk.data_ptr(), dv.data_ptr()), sizes, 0 if ws is None else ws.data_ptr(), _raw_stream(dev))
    return dq, dk, dv
