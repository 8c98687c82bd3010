"""A pattern's block lists regrouped onto a kernel tile larger than the lists' blocks.

The block lists (:class:`pigeon.attention.patterns.BlockLists`) are on the pattern's grid of
``bm x bn`` blocks (64 x 64 for most).  CUTLASS's Hopper FMHA kernel (attention.sm90.cu.jinja)
works on tiles of ``tile_m = 128`` query rows (two consumer warpgroups that step through the same
key tiles) by ``tile_n`` keys, so it visits, per tile row, the union of the key tiles that any of
its ``a = tile_m / bm`` list rows touches, and needs to know which of the ``a x b`` list blocks
(``b = tile_n / bn``) inside a visited tile are listed, and which of those are full.

:func:`tile_lists` gives that as CSR over the flattened ``[B', H', ceil(nq / a)]`` tile rows:

* ``ent[i] = tile_col << CODE_BITS | code``, where bits ``2 s`` and ``2 s + 1`` of ``code`` say
  that sub-block ``s = sr * b + sc`` (list row ``sr``, list column ``sc`` inside the tile) is listed
  and full;
* per row the entries that need no elementwise work at all come first, ``nfull[row]`` of them:
  every sub-block full (sub-rows past ``q_len`` count as full: those rows are not stored) and the
  tile inside the keys (CUTLASS's unmasked steps check no bounds);
* the rest ascending by key tile.

Every (query, key) pair a list keeps is in a listed sub-block of an entry of its tile row, and
nothing else is; tests/test_attention_tiles.py checks the expansion against the lists' own.
Torch ops on the lists' device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codegen.attention_sm90 import CODE_BITS, grouping

__all__ = ["TileLists", "tile_lists", "expand", "grouping", "CODE_BITS"]

@dataclass(frozen=True)
class TileLists:
    shape: tuple[int, int, int]      # (B', H', tile rows)
    ptr: torch.Tensor                # int32 [B' * H' * rows + 1]
    ent: torch.Tensor                # int32 [nnz]: tile_col << CODE_BITS | code
    nfull: torch.Tensor              # int32 [B' * H' * rows]: leading entries with no masking


def tile_lists(lists, bm: int, bn: int, q_len: int, kv_len: int, tile_m: int,
               tile_n: int) -> TileLists:
    """``lists`` (a :class:`pigeon.attention.patterns.BlockLists` on the ``bm x bn`` grid of a
    ``q_len x kv_len`` problem) on the ``tile_m x tile_n`` grid; see the module docstring."""
    ab = grouping(bm, bn, tile_m, tile_n)
    if ab is None:
        raise ValueError(f"tile {tile_m}x{tile_n} does not group list blocks of {bm}x{bn} "
                         f"(whole blocks, at most {CODE_BITS // 2} per tile)")
    a, b = ab
    B, H, nq = lists.shape
    dev = lists.ptr.device
    rows = -(-nq // a)
    nkt = max(1, -(-kv_len // tile_n))
    nrows = B * H * rows
    ptr = lists.ptr.long()
    lrow = torch.repeat_interleave(torch.arange(B * H * nq, device=dev), ptr[1:] - ptr[:-1],
                                   output_size=lists.col.numel())
    col = lists.col.long()
    bh, qb = lrow // nq, lrow % nq
    trow = bh * rows + qb // a
    tcol = col // b
    sub = (qb % a) * b + col % b
    state = 1 + 2 * lists.full.long()                              # listed, full
    # sort by (tile, sub-block, strongest state first); a block listed twice keeps its first (largest)
    # state.  Sorts, scans and index_add_ on the device: one host sync (the entry count), where
    # torch.unique / bincount would take several (a per-call selection pays this per call)
    cell = (trow * nkt + tcol) * (a * b) + sub
    cell_s, order = torch.sort(cell * 4 + (3 - state))
    cell_s = cell_s // 4
    st = state[order]
    if cell_s.numel() > 1:
        st = torch.where(torch.cat([cell_s.new_ones(1, dtype=torch.bool), cell_s[1:] != cell_s[:-1]]), st, 0)
    tile = cell_s // (a * b)
    first = torch.ones_like(tile, dtype=torch.bool)
    if tile.numel() > 1:
        first[1:] = tile[1:] != tile[:-1]
    seg = torch.cumsum(first.long(), 0) - 1                          # each cell's tile, in order
    code_all = torch.zeros(tile.numel(), dtype=torch.long, device=dev).index_add_(0, seg, st << (2 * (cell_s % (a * b))))
    key = tile[first]                                                # (tile row, tile col), ascending: the sync
    code = code_all[:key.numel()]
    krow, kcol = key // nkt, key % nkt
    # the sub-blocks that must be full for an entry to need no mask: those of rows inside q_len
    sr = torch.arange(a, device=dev)
    rows_in = ((krow % rows)[:, None] * a + sr[None, :]) * bm < q_len          # [n, a]
    row_need = torch.tensor([sum(3 << (2 * (r * b + c)) for c in range(b)) for r in range(a)], device=dev)
    need = (rows_in.long() * row_need[None, :]).sum(1)
    unmasked = ((code & need) == need) & ((kcol + 1) * tile_n <= kv_len)
    order = torch.sort(krow * 2 + (~unmasked).long(), stable=True).indices     # unmasked first per row
    krow, kcol, code, unmasked = krow[order], kcol[order], code[order], unmasked[order]
    per_row = torch.zeros(nrows, dtype=torch.long, device=dev).index_add_(0, krow, torch.ones_like(krow))
    out_ptr = torch.zeros(nrows + 1, dtype=torch.int32, device=dev)
    torch.cumsum(per_row, 0, out=out_ptr[1:])
    nfull = torch.zeros(nrows, dtype=torch.long, device=dev).index_add_(0, krow, unmasked.long()).to(torch.int32)
    ent = ((kcol << CODE_BITS) | code).to(torch.int32)
    return TileLists((B, H, rows), out_ptr, ent, nfull)


def expand(t: TileLists, bm: int, bn: int, q_len: int, kv_len: int, tile_m: int,
           tile_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(listed, full) bool [B', H', q_len, kv_len]: the pairs inside a listed (full) sub-block of
    ``t`` -- what the kernel's fusion reads back from the codes (a slow loop, for the tests)."""
    a, b = grouping(bm, bn, tile_m, tile_n)
    B, H, rows = t.shape
    listed = torch.zeros(B, H, rows * tile_m, -(-kv_len // tile_n) * tile_n, dtype=torch.bool)
    full = torch.zeros_like(listed)
    ptr, ent = t.ptr.tolist(), t.ent.tolist()
    for r in range(B * H * rows):
        bi, hi, row = r // (H * rows), (r // rows) % H, r % rows
        for e in ent[ptr[r]:ptr[r + 1]]:
            tc, code = e >> CODE_BITS, e & ((1 << CODE_BITS) - 1)
            for s in range(a * b):
                st = (code >> (2 * s)) & 3
                if not st & 1:
                    continue
                q0, k0 = row * tile_m + (s // b) * bm, tc * tile_n + (s % b) * bn
                listed[bi, hi, q0:q0 + bm, k0:k0 + bn] = True
                if st & 2:
                    full[bi, hi, q0:q0 + bm, k0:k0 + bn] = True
    return listed[..., :q_len, :kv_len], full[..., :q_len, :kv_len]


def topk_tile_lists(indices: torch.Tensor, heads: int, q_len: int, kv_len: int, tile_n: int) -> TileLists:
    """The tile lists of a top-k selection of 128 x ``tile_n`` blocks (``indices [B, H_sel, nq, k]``,
    -1: none, repeats allowed; bounds checked by the caller) straight from the selection: one tile row
    per query block, its distinct selected blocks ascending.  Entry for entry what :func:`tile_lists`
    gives on the selection's 64 x 64 block lists, with one host sync and 57 top-level torch ops
    instead of 99 (counted on the CPU machine, where it ran 1.8 vs 9.4 ms at B4 H32 S4096; a
    selection made per call pays this per call; not measured on a GPU yet)."""
    if tile_n % 64:
        raise ValueError(f"top-k tile lists: tile_n {tile_n} is not a multiple of 64")
    b = tile_n // 64
    dev = indices.device
    idx = indices.long()
    if idx.shape[1] != heads:
        idx = idx.repeat_interleave(heads // idx.shape[1], dim=1)
    B, H, nq, k = idx.shape
    srt = idx.sort(-1).values
    keep = srt >= 0
    keep[..., 1:] &= srt[..., 1:] != srt[..., :-1]
    nq64, nk64 = -(-q_len // 64), -(-kv_len // 64)
    # sub-block (sr, sc) of tile (qc, c) is listed (and full) when its 64-row and 64-key blocks exist
    sr = torch.arange(2, device=dev)
    sc = torch.arange(b, device=dev)
    rows_in = (torch.arange(nq, device=dev)[:, None] * 2 + sr[None, :]) < nq64                     # [nq, 2]
    cols_in = (srt.clamp(min=0)[..., None] * b + sc) < nk64                                         # [B, H, nq, k, b]
    bits = (3 << (2 * (sr[:, None] * b + sc[None, :]))).to(torch.long)                              # [2, b]
    code = (rows_in[None, None, :, None, :, None] & cols_in[..., None, :]).long() * bits            # [B, H, nq, k, 2, b]
    code = code.sum((-2, -1))
    unmasked = (srt + 1) * tile_n <= kv_len
    ent_all = (srt << CODE_BITS) | code
    flat_keep = keep.reshape(-1, k)
    ptr = torch.zeros(B * H * nq + 1, dtype=torch.int32, device=dev)
    torch.cumsum(flat_keep.sum(1), 0, out=ptr[1:])
    nfull = (keep & unmasked).reshape(-1, k).sum(1).to(torch.int32)
    ent = ent_all.reshape(-1, k)[flat_keep].to(torch.int32)                                       # the sync
    return TileLists((B, H, nq), ptr, ent, nfull)
