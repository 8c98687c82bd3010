"""Closed-form sparse attention patterns and the block iteration lists they stand for.

A pattern says which (query, key) pairs are attended.  Kernels tile queries in blocks of
``block_m`` and keys in blocks of ``block_n``; for every (batch, head, query block) they visit only
the key blocks the pattern touches, and they apply the elementwise mask only in the blocks it cuts
(``partial``): in a ``full`` block every pair is attended.  The lists come from a formula per
pattern (no dense mask is built), except for the patterns whose blocks are given at run time
(``BlockList``, ``TopK``).

* ``Causal()``: ``kv <= q`` (with ``q_len != kv_len``, aligned at the end, as FlashAttention:
  ``kv <= q + kv_len - q_len``).
* ``SlidingWindow(window, causal=True)``: ``q - window < kv <= q`` (causal), or
  ``|q - kv| < window``.
* ``S2(stride, local_blocks, step=1, offset=0)``: S2-Attention's per-head strided shards on
  blocks of ``block`` keys: key block j is kept for query block i and head h if
  ``(j + h * step + offset) % stride == 0`` or ``i - local_blocks < j``, causal on blocks
  (``j <= i``) and elementwise causal inside the diagonal block.  Defined on square blocks
  (``block_m == block_n == block``).
* ``BlockList(crow, col)``: BCSR over blocks, per head (``crow [H, nq + 1]``, ``col [nnz]``) or
  shared (``crow [nq + 1]``); every listed block is full.
* ``TopK(indices)``: ``indices [B, H_sel, nq, k]`` key blocks per query block (-1: none), given at
  run time (Native Sparse Attention's selection).  With GQA, ``H_sel`` may be the KV head count:
  the selection is shared across each KV group (Flash Sparse Attention), so a group reads the
  same key blocks.

``dense_mask(pattern, ...)`` is the [B or 1, H or 1, q_len, kv_len] bool mask a pattern stands
for (the reference and the property tests use it); ``block_lists(...)`` the iteration lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import expr as ex
from ..ir.expr import Expr
from ..semantics import eval_expr


class PatternError(ValueError):
    pass


@dataclass(frozen=True)
class Causal:
    pass


@dataclass(frozen=True)
class SlidingWindow:
    window: int
    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise PatternError(f"SlidingWindow: window must be a positive int, got {self.window!r}")


@dataclass(frozen=True)
class S2:
    stride: int
    local_blocks: int
    block: int = 64
    step: int = 1
    offset: int = 0

    def __post_init__(self):
        for name in ("stride", "local_blocks", "block"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PatternError(f"S2: {name} must be a positive int, got {v!r}")


@dataclass(frozen=True, eq=False)
class BlockList:
    crow: torch.Tensor
    col: torch.Tensor
    block_m: int = 64
    block_n: int = 64


@dataclass(frozen=True, eq=False)
class TopK:
    indices: torch.Tensor
    block_m: int = 64
    block_n: int = 64


PATTERNS = (Causal, SlidingWindow, S2, BlockList, TopK)
KV_SHIFT = "kv_shift"        # kv_len - q_len: the bottom-right alignment of causal masks (an int var)


def mask_expr(p) -> Expr | None:
    """The elementwise mask of a closed-form pattern, an expression of the attention index
    variables and ``var("kv_shift")``: the one definition that the kernels inline (in the blocks
    the pattern cuts) and that ``dense_mask`` evaluates.  None for the patterns defined on blocks
    (``BlockList``, ``TopK``: a listed block is full)."""
    q, kv, h = ex.index("query"), ex.index("key"), ex.index("head")
    qs = ex.binary("add", q, ex.var(KV_SHIFT, "int32"))           # the query's aligned position
    c = ex.const
    if isinstance(p, Causal):
        return ex.binary("le", kv, qs)
    if isinstance(p, SlidingWindow):
        d = ex.binary("sub", qs, kv)
        if p.causal:
            return ex.binary("bit_and", ex.binary("ge", d, c(0)), ex.binary("lt", d, c(p.window)))
        return ex.binary("bit_and", ex.binary("lt", d, c(p.window)), ex.binary("gt", d, c(-p.window)))
    if isinstance(p, S2):
        qb, kb = ex.binary("floordiv", qs, c(p.block)), ex.binary("floordiv", kv, c(p.block))
        shard = ex.binary("eq", ex.binary("mod", ex.binary("add", ex.binary("add", kb, ex.binary("mul", h, c(p.step))),
                                                            c(p.offset)), c(p.stride)), c(0))
        local = ex.binary("gt", kb, ex.binary("sub", qb, c(p.local_blocks)))
        return ex.binary("bit_and", ex.binary("bit_or", shard, local), ex.binary("le", kv, qs))
    return None


def eval_mask(e: Expr, heads: int, q_len: int, kv_len: int, device="cpu") -> torch.Tensor:
    """A mask expression at every (head, query, key): [1, H, q_len, kv_len] bool."""
    n = heads * q_len * kv_len
    hh, qq, kk = torch.meshgrid(torch.arange(heads, device=device), torch.arange(q_len, device=device),
                                torch.arange(kv_len, device=device), indexing="ij")
    vals = {"head": hh, "query": qq, "key": kk, "batch": torch.zeros_like(hh)}

    def leaf(node):
        if node.op == "index" and node.fn in vals:
            return vals[node.fn].reshape(n).to(torch.int32)
        if node.op == "var" and node.fn == KV_SHIFT:
            return torch.full((n,), kv_len - q_len, dtype=torch.int32, device=device)
        raise PatternError(f"{node.op} {node.fn!r} is not bound in a pattern mask")
    return eval_expr(e, n, leaf, device).reshape(1, heads, q_len, kv_len)


def dense_mask(p, batch: int, heads: int, q_len: int, kv_len: int, device="cpu") -> torch.Tensor:
    """The bool mask [B', H', q_len, kv_len] (B', H' are 1 where the pattern does not depend on
    them) of the pairs ``p`` attends."""
    e = mask_expr(p)
    if e is not None:
        m = eval_mask(e, heads if isinstance(p, S2) else 1, q_len, kv_len, device)
        return m
    if isinstance(p, BlockList):
        crow, col = p.crow.to(device).long(), p.col.to(device).long()
        crow2 = crow if crow.dim() == 2 else crow[None]
        nq = -(-q_len // p.block_m)
        nk = -(-kv_len // p.block_n)
        if crow2.shape[-1] != nq + 1:
            raise PatternError(f"BlockList: crow has {crow2.shape[-1]} entries per head, expected {nq + 1} "
                               f"(query blocks of {p.block_m} for {q_len} queries)")
        blocks = torch.zeros(crow2.shape[0], nq, nk, dtype=torch.bool, device=device)
        for hh in range(crow2.shape[0]):
            counts = crow2[hh, 1:] - crow2[hh, :-1]
            rows = torch.repeat_interleave(torch.arange(nq, device=device), counts)
            cols = col[crow2[hh, 0]:crow2[hh, -1]]
            if cols.numel() and (cols.min() < 0 or cols.max() >= nk):
                raise PatternError(f"BlockList: column index out of range [0, {nk}) for head {hh}")
            blocks[hh, rows, cols] = True
        return _expand_blocks(blocks, p.block_m, p.block_n, q_len, kv_len)[None]
    if isinstance(p, TopK):
        idx = p.indices.to(device).long()                   # [B, Hs, nq, k]
        nq = -(-q_len // p.block_m)
        nk = -(-kv_len // p.block_n)
        if idx.dim() != 4 or idx.shape[2] != nq:
            raise PatternError(f"TopK: indices must be [B, H, {nq}, k] (query blocks of {p.block_m}), "
                               f"got {list(idx.shape)}")
        if bool(((idx >= nk) | (idx < -1)).any()):         # one host sync for both bounds
            raise PatternError(f"TopK: block indices must be in [-1, {nk}) (-1: none)")
        blocks = torch.zeros(idx.shape[0], idx.shape[1], nq, nk + 1, dtype=torch.bool, device=device)
        blocks.scatter_(3, torch.where(idx < 0, nk, idx), True)
        m = _expand_blocks(blocks[..., :nk], p.block_m, p.block_n, q_len, kv_len)
        if idx.shape[1] != heads:                   # shared across each KV group of query heads
            if heads % idx.shape[1]:
                raise PatternError(f"TopK: {idx.shape[1]} selection heads do not divide {heads} query heads")
            m = m.repeat_interleave(heads // idx.shape[1], dim=1)
        return m
    raise PatternError(f"unknown pattern {p!r}; known: {[c.__name__ for c in PATTERNS]}")


def _expand_blocks(blocks: torch.Tensor, bm: int, bn: int, q_len: int, kv_len: int) -> torch.Tensor:
    return blocks.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., :q_len, :kv_len]


@dataclass(frozen=True)
class BlockLists:
    """Per (batch, head, query block): the key blocks to visit, in CSR form over the flattened
    [B', H', nq] rows (B', H' = 1 where the pattern does not depend on them); ``full[i]`` says
    block ``col[i]`` needs no elementwise mask."""
    shape: tuple[int, int, int]
    ptr: torch.Tensor          # [B' * H' * nq + 1]
    col: torch.Tensor          # [nnz] key block index
    full: torch.Tensor         # [nnz] bool

    def blocks(self, b: int, h: int, i: int) -> list[tuple[int, bool]]:
        B, H, nq = self.shape
        r = ((min(b, B - 1) * H) + min(h, H - 1)) * nq + i
        s, e = int(self.ptr[r]), int(self.ptr[r + 1])
        return list(zip(self.col[s:e].tolist(), self.full[s:e].tolist()))

    def transposed(self, nk: int) -> "BlockLists":
        """The same blocks listed per (batch, head, key block): CSC over the flattened [B', H', nk]
        rows, ``col`` holding query block indices (ascending) and ``full`` their flags; ``nk``: the
        key block count.  Torch ops on the lists' device (a stable sort by key row, no host sync),
        for the key-major backward kernel."""
        B, H, nq = self.shape
        dev = self.ptr.device
        ptr = self.ptr.long()
        rows = torch.repeat_interleave(torch.arange(B * H * nq, device=dev), ptr[1:] - ptr[:-1],
                                       output_size=self.col.numel())
        key = (rows // nq) * nk + self.col.long()
        key_sorted, order = torch.sort(key, stable=True)
        tptr = torch.searchsorted(key_sorted, torch.arange(B * H * nk + 1, device=dev))
        return BlockLists((B, H, nk), tptr, (rows % nq)[order], self.full[order])


def all_blocks(q_len: int, kv_len: int, block_m: int, block_n: int, device="cpu") -> BlockLists:
    """No pattern: every key block of every query block, each full."""
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    ptr = torch.arange(nq + 1, device=device) * nk
    return BlockLists((1, 1, nq), ptr, torch.arange(nk, device=device).repeat(nq),
                      torch.ones(nq * nk, dtype=torch.bool, device=device))


def block_lists(p, batch: int, heads: int, q_len: int, kv_len: int, block_m: int, block_n: int,
                device="cpu") -> BlockLists:
    """The iteration lists of ``p`` from its formula (``Causal``, ``SlidingWindow``, ``S2``) or
    its given blocks (``BlockList``, ``TopK``); every kept pair lies in a listed block, and a block
    marked full has every pair (inside the sequence bounds) kept."""
    if isinstance(p, TopK) and p.block_m % block_m == 0 and p.block_n % block_n == 0:
        # straight from the selection, before the block-range tensors the formulas need: a selection
        # made per call pays its list building per call
        return _topk_lists(p, heads, q_len, kv_len, device, block_m, block_n)
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    shift = kv_len - q_len
    q0, q1 = i * block_m + shift, torch.clamp((i + 1) * block_m, max=q_len) - 1 + shift   # aligned rows
    k0, k1 = j * block_n, torch.clamp((j + 1) * block_n, max=kv_len) - 1
    if isinstance(p, Causal):
        anyk, allk = k0 <= q1, k1 <= q0
        anyk, allk = anyk[None, None], allk[None, None]
    elif isinstance(p, SlidingWindow):
        # d = q - kv over the block ranges: [q0 - k1, q1 - k0]
        dmin, dmax = q0 - k1, q1 - k0
        if p.causal:
            anyk = (dmax >= 0) & (dmin < p.window)
            allk = (dmin >= 0) & (dmax < p.window)
        else:
            anyk = (dmin < p.window) & (dmax > -p.window)
            allk = (dmax < p.window) & (dmin > -p.window)
        anyk, allk = anyk[None, None], allk[None, None]
    elif isinstance(p, S2):
        if block_m != p.block or block_n != p.block or shift != 0:
            raise PatternError(f"S2 is defined on square blocks of {p.block} and q_len == kv_len; got blocks "
                               f"{block_m}x{block_n}, q_len {q_len}, kv_len {kv_len}")
        h = torch.arange(heads, device=device)[:, None, None]
        kept = (((j + h * p.step + p.offset) % p.stride == 0) | (j > i - p.local_blocks)) & (j <= i)
        anyk = kept[None]
        allk = kept[None] & (k1 <= q0)[None, None]           # the diagonal block is causal inside
    else:
        m = dense_mask(p, batch, heads, q_len, kv_len, device)     # blocks given at run time
        pad = torch.zeros(m.shape[:2] + (nq * block_m, nk * block_n), dtype=torch.bool, device=device)
        valid = torch.zeros_like(pad)
        pad[..., :q_len, :kv_len] = m
        valid[..., :q_len, :kv_len] = True
        tiles = pad.reshape(m.shape[:2] + (nq, block_m, nk, block_n))
        vt = valid.reshape(tiles.shape)
        anyk = tiles.any(dim=(3, 5))
        allk = (tiles | ~vt).all(dim=(3, 5)) & anyk
    anyk, allk = torch.broadcast_tensors(anyk, allk)
    B, H = anyk.shape[0], anyk.shape[1]
    flat, fullf = anyk.reshape(-1, nk), allk.reshape(-1, nk)
    counts = flat.sum(1)
    ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=ptr[1:])
    rows, cols = flat.nonzero(as_tuple=True)
    return BlockLists((B, H, nq), ptr, cols, fullf[rows, cols])


def refine(lists: BlockLists, a: int, b: int, nq: int, nk: int) -> BlockLists:
    """``lists`` of blocks a x b times larger, listed on the finer grid of ``nq`` x ``nk`` blocks: the
    fine query block ``i`` visits every fine key block inside the coarse blocks its coarse row
    listed (ascending when the coarse ones are), with the coarse block's flag (a full coarse block's
    fine blocks are full).  Torch ops on the lists' device, no dense mask and no host sync."""
    B, H, nq_c = lists.shape
    dev = lists.ptr.device
    ptr = lists.ptr.long()
    counts = ptr[1:] - ptr[:-1]                                          # per coarse row
    t = torch.arange(b, device=dev)
    cols = (lists.col.long()[:, None] * b + t).reshape(-1)                # each coarse block's fine columns
    full = lists.full[:, None].expand(-1, b).reshape(-1)
    inside = cols < nk
    crow = torch.repeat_interleave(torch.arange(B * H * nq_c, device=dev), counts, output_size=lists.col.numel())
    crow = crow[:, None].expand(-1, b).reshape(-1)
    cols, full, crow = cols[inside], full[inside], crow[inside]
    bh, qc = crow // nq_c, crow % nq_c
    fine_rows, fine_cols, fine_full = [], [], []
    for s in range(a):                                                    # sub-row s of every coarse row
        qi = qc * a + s
        ok = qi < nq
        fine_rows.append(bh[ok] * nq + qi[ok])
        fine_cols.append(cols[ok])
        fine_full.append(full[ok])
    rows = torch.cat(fine_rows)
    order = torch.sort(rows, stable=True).indices                        # CSR by fine row, coarse order kept
    rows, col, fl = rows[order], torch.cat(fine_cols)[order], torch.cat(fine_full)[order]
    out_ptr = torch.zeros(B * H * nq + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(rows, minlength=B * H * nq), 0, out=out_ptr[1:])
    return BlockLists((B, H, nq), out_ptr, col, fl)


def _topk_lists(p: TopK, heads: int, q_len: int, kv_len: int, device, block_m: int | None = None,
                block_n: int | None = None) -> BlockLists:
    """The lists straight from the selected indices (no dense mask: [B, H, S, S] would not fit at
    long contexts), on the grid of ``block_m x block_n`` blocks that divide the selection's (default:
    its own): each query block's distinct selected key blocks, ascending, every one full -- what
    :func:`refine` of the coarse lists gives, built in one pass with two host syncs (the index
    bounds, the entry count) instead of one per step: a selection made per call pays this per call."""
    bm, bn = block_m or p.block_m, block_n or p.block_n
    a, b = p.block_m // bm, p.block_n // bn
    idx = p.indices.to(device).long()
    nq, nk = -(-q_len // p.block_m), -(-kv_len // p.block_n)
    nqf, nkf = -(-q_len // bm), -(-kv_len // bn)
    if idx.dim() != 4 or idx.shape[2] != nq:
        raise PatternError(f"TopK: indices must be [B, H, {nq}, k] (query blocks of {p.block_m}), got {list(idx.shape)}")
    if bool(((idx >= nk) | (idx < -1)).any()):         # one host sync for both bounds
        raise PatternError(f"TopK: block indices must be in [-1, {nk}) (-1: none)")
    if idx.shape[1] != heads:
        if heads % idx.shape[1]:
            raise PatternError(f"TopK: {idx.shape[1]} selection heads do not divide {heads} query heads")
        idx = idx.repeat_interleave(heads // idx.shape[1], dim=1)
    B, H, k = idx.shape[0], idx.shape[1], idx.shape[3]
    srt = idx.sort(-1).values
    keep = srt >= 0
    keep[..., 1:] &= srt[..., 1:] != srt[..., :-1]                  # drop repeats
    cols = srt[..., None] * b + torch.arange(b, device=device)     # [B, H, nq, k, b]: the fine columns
    ok = keep[..., None] & (cols < nkf)
    # fine row qc * a + s of every coarse row qc (those past the last fine row dropped)
    cols = cols[:, :, :, None].expand(B, H, nq, a, k, b).reshape(B, H, nq * a, k * b)[:, :, :nqf]
    ok = ok[:, :, :, None].expand(B, H, nq, a, k, b).reshape(B, H, nq * a, k * b)[:, :, :nqf]
    flat_ok = ok.reshape(-1, k * b)
    ptr = torch.zeros(flat_ok.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(flat_ok.sum(1), 0, out=ptr[1:])
    col = cols.reshape(-1, k * b)[flat_ok]
    return BlockLists((B, H, nqf), ptr, col, torch.ones_like(col, dtype=torch.bool))
