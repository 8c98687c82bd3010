"""Sequence-parallel attention (LightSeq / ring attention) on torch.distributed, with sparse patterns.

Every rank holds a slice of the sequence of ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (the split is over
the sequence, not the heads, so any head count and GQA work).  The sequence is cut into ``C`` equal chunks:

* ``layout="contiguous"``: ``C = W`` chunks, rank r holds chunk r;
* ``layout="zigzag"``: ``C = 2W`` chunks, rank r holds chunks ``r`` and ``2W-1-r``: under a causal pattern
  every rank then has the same amount of unmasked work.

Default layout: zig-zag for ``Causal`` and ``S2`` (causal, triangular work), contiguous otherwise (dense,
``SlidingWindow``: contiguous chunks keep a window's traffic between neighbours, ``BlockList``).

**The plan** (:class:`Plan`, static, from the pattern's formula): for every (query chunk, key chunk) pair its
kind, ``None`` (no pair attended: neither sent nor computed), ``"full"`` (every pair: no mask) or
``"partial"``; and from the kinds, ``needs[(dst, src)]``, the chunks of src that dst attends to.  Per pattern,
with chunk length ``L`` and ``d = q - kv`` over the pair's range ``[qc*L - (kc+1)*L + 1, (qc+1)*L - 1 - kc*L]``:

* dense: all full;
* ``Causal()``: any iff ``d_max >= 0``, full iff ``d_min >= 0``;
* ``SlidingWindow(w)``: any iff the d-range meets ``[0, w)`` (non-causal: ``(-w, w)``), full iff inside it
  (so with ``w <= L`` and contiguous chunks a rank needs only its left neighbour's chunk);
* ``S2(stride, local_blocks, block, step, offset)`` (needs ``L % block == 0``, ``nb = L / block`` blocks a
  chunk): key chunk after the query chunk: none; the diagonal: partial; before it: any iff the local band
  reaches it (``(kc+1)*nb - 1 > qc*nb - local_blocks``) or some key block ``j`` of the chunk and head ``h`` has
  ``(j + h*step + offset) % stride == 0`` (checked over residues, ``min(nb, stride) * min(H, stride)`` cases),
  full iff the band covers it all or ``stride == 1``;
* ``BlockList`` (needs ``L`` a multiple of ``block_m`` and ``block_n``): the pairs holding a listed block, read
  from the lists (O(nnz), no dense mask); each pair runs with its own sub-list.

* ``TopK`` (needs ``L`` a multiple of ``block_m`` and ``block_n``): the selection is given at run time (every rank
  has the same indices), so the plan of a call is derived from them on the host, without a dense mask: per key
  chunk, the count of distinct selected blocks of every (batch, selection head, query block); a pair is attended
  iff one is nonzero, full iff all equal the chunk's block count.  Each pair runs the selection restricted to it
  (:meth:`Plan._sub_topk`: local block numbers, -1 elsewhere), so the kernels iterate only selected blocks.
* packed documents (``cu_seqlens`` of the whole sequence; no pattern, or ``Causal()`` within each document): from
  the documents of each chunk's first and last token.  A document in two chunks holds every token between them, so
  at most one document spans a pair: off the diagonal the pair is attended iff one does (and, causal, the key chunk
  comes first), and its mask is that document's rectangle of local query and key ranges (a ``mask_mod`` of
  constants; full when the document covers both chunks); a diagonal pair runs packed attention over the chunk's
  pieces of documents (local ``cu_seqlens``).

**Running a pair.**  A full pair runs ``pigeon.attention.attention(..., return_lse=True)`` with no mask; a partial
pair on the diagonal runs with the pattern itself (translation invariant; for S2 with its offset moved by the
chunk's first block), an off-diagonal partial pair with the pattern's own mask expression
(``patterns.mask_expr``) evaluated at global positions (``query + qc*L``, ``key + kc*L``) as a ``mask_mod``;
BlockList pairs with their sub-list.  Partial results of a query chunk merge exactly with their log-sum-exps:
``lse = logsumexp_b lse_b``, ``out = sum_b exp(lse_b - lse) out_b`` (accumulated in float32 at least).

**Communication.**  At step ``s = 1..W-1`` rank r sends rank ``(r+s) % W`` exactly the K/V chunks it needs and
receives what it needs from ``(r-s) % W`` (``dist.isend`` / ``dist.irecv``, the next step's transfer posted before
the current step's blocks are computed, so transfers overlap with compute); an empty need is no message.
:class:`SeqParallelStats` (pass ``stats=``) counts what a call sent, skipped, computed and skipped;
``Plan.expected(rank)`` gives the counts the plan implies.

**Backward** (a ``torch.autograd.Function``): only the local q, k, v, the merged out and lse are saved; K/V
circulate again with the same schedule, each attended pair's gradients are computed and the dK/dV partials of a
remote chunk go back to its owner (the reverse shift).  Through the merge, pair b gets
``g_out_b = w_b dO`` and ``g_lse_b = w_b (rowdot(dO, out_b - out) + d lse)``, ``w_b = exp(lse_b - lse)``.

* ``backend="reference"``: the pair is recomputed under torch autograd (the reference's lse is
  differentiable) and back-propagated with ``(g_out_b, g_lse_b)``.
* ``backend="kernels"``: pigeon's ops (``pigeon::attention_fwd`` / ``pigeon::attention_bwd``, the kernels on a
  GPU, their reference semantics on a CPU).  Their lse is not differentiable, so the lse term is added with
  the same ops: its score gradient is ``dS = P_b * g_lse_b`` (per row), so ``dQ += scale * g_lse_b * (P_b K)``
  (``attention_fwd`` with K as the values) and ``dK += scale * P_b^T (g_lse_b * Q)`` (the dV output of
  ``attention_bwd`` with K as the values); ``dQ, dK, dV`` of ``g_out_b`` come from ``attention_bwd`` itself.
  Two forward and two backward op calls per pair: correct on both devices, not the fastest (a backward op that
  takes the merged lse and a ``D - d lse`` row term would need one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Plan", "CommStats", "SeqParallelStats", "SeqParallelError", "chunks_of", "num_chunks", "pair_kind",
           "schedule", "shard", "unshard", "seq_parallel_attention", "default_layout"]

LAYOUTS = ("contiguous", "zigzag")


class SeqParallelError(ValueError):
    """A pattern or layout that sequence-parallel attention cannot run (one line: what and why)."""


def _layout(layout) -> str:
    """``True`` / ``False`` (the causal flag of the first version) -> "zigzag" / "contiguous"."""
    if isinstance(layout, bool):
        return "zigzag" if layout else "contiguous"
    if layout not in LAYOUTS:
        raise SeqParallelError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(world: int, layout) -> int:
    return 2 * world if _layout(layout) == "zigzag" else world


def chunks_of(rank: int, world: int, layout) -> list[int]:
    """The global chunk indices rank holds, in the order of its local slice."""
    return [rank, 2 * world - 1 - rank] if _layout(layout) == "zigzag" else [rank]


def default_layout(pattern) -> str:
    from pigeon.attention import S2, Causal
    return "zigzag" if isinstance(pattern, (Causal, S2)) else "contiguous"


def pair_kind(qc: int, kc: int, causal: bool):
    """(The dense / causal case of :meth:`Plan.kind`, any chunk length.)  ``"full"``, ``"diag"`` (causal within
    equal chunks) or None (never attended)."""
    if not causal or kc < qc:
        return "full"
    return "diag" if kc == qc else None


# ------------------------------------------------------------------------------------------ the plan

@dataclass
class CommStats:
    """Counts of one pass (forward or backward) on one rank."""
    messages_sent: int = 0        # K/V messages (one per peer that needs something)
    chunks_sent: int = 0          # K/V chunks in them
    chunks_not_sent: int = 0      # chunks a dense ring would have sent that the pattern never reads
    pairs_computed: int = 0       # (query chunk, key chunk) pairs run
    pairs_skipped: int = 0        # pairs never attended: not run
    grad_messages_sent: int = 0   # backward: dK/dV partials returned to their owners


@dataclass
class SeqParallelStats:
    """What :func:`seq_parallel_attention` did on this rank, added to over calls (``stats=``)."""
    forward: CommStats = field(default_factory=CommStats)
    backward: CommStats = field(default_factory=CommStats)


def _shift_expr(e, qoff: int, koff: int):
    """The mask expression ``e`` at global positions: query -> query + qoff, key -> key + koff, kv_shift -> 0
    (every chunk has the same length, and so do the full q and kv)."""
    from pigeon.attention.patterns import KV_SHIFT
    from pigeon.ir import expr as ex
    memo = {}
    for n in e.toposort():
        if n.op == "index" and n.fn == "query":
            memo[n] = ex.binary("add", n, ex.const(int(qoff))) if qoff else n
        elif n.op == "index" and n.fn == "key":
            memo[n] = ex.binary("add", n, ex.const(int(koff))) if koff else n
        elif n.op == "var" and n.fn == KV_SHIFT:
            memo[n] = ex.const(0)
        elif n.args:
            memo[n] = n.replace(args=tuple(memo[a] for a in n.args))
        else:
            memo[n] = n
    return memo[e]


class Plan:
    """The static plan of a call: chunk layout, pair kinds, who needs which chunk (module docstring)."""

    def __init__(self, world: int, pattern=None, layout=None, seq_len: int | None = None, heads: int = 1,
                 cu_seqlens=None):
        from pigeon.attention import S2, BlockList, Causal, SlidingWindow, TopK
        if pattern is not None and not isinstance(pattern, (Causal, SlidingWindow, S2, BlockList, TopK)):
            raise SeqParallelError(f"seq_parallel_attention: unknown pattern {pattern!r}")
        if cu_seqlens is not None and pattern is not None and not isinstance(pattern, Causal):
            raise SeqParallelError(f"seq_parallel_attention: packed cu_seqlens take no pattern or Causal(), got "
                                   f"{type(pattern).__name__}")
        self.world, self.pattern, self.heads = world, pattern, heads
        self.layout = default_layout(pattern) if layout is None else _layout(layout)
        self.C = num_chunks(world, self.layout)
        self.L = None
        if seq_len is not None:
            if seq_len % self.C or seq_len == 0:
                raise SeqParallelError(f"seq_parallel_attention: sequence length {seq_len} is not a positive "
                                       f"multiple of {self.C} chunks ({self.layout} layout, {world} ranks)")
            self.L = seq_len // self.C
        if (isinstance(pattern, (SlidingWindow, S2, BlockList, TopK)) or cu_seqlens is not None) and self.L is None:
            raise SeqParallelError(f"Plan: {type(pattern).__name__ if pattern is not None else 'cu_seqlens'} needs "
                                   f"seq_len (its pairs depend on the chunk)")
        L = self.L
        if isinstance(pattern, S2) and L % pattern.block:
            raise SeqParallelError(f"seq_parallel_attention: S2 blocks of {pattern.block} do not tile chunks of "
                                   f"{L} (sequence {seq_len} in {self.C} chunks); choose a chunk length that is a "
                                   f"multiple of the block")
        self.docs = None
        if cu_seqlens is not None:
            self._init_docs(cu_seqlens, seq_len)
        if isinstance(pattern, BlockList):
            self._init_block_list(pattern, seq_len)
        if isinstance(pattern, TopK):
            self._init_topk(pattern, seq_len)
        self.mine = [chunks_of(r, world, self.layout) for r in range(world)]
        self.kinds = {(qc, kc): self._kind(qc, kc) for qc in range(self.C) for kc in range(self.C)}
        self.needs = {(dst, src): [kc for kc in self.mine[src]
                                   if any(self.kinds[(qc, kc)] for qc in self.mine[dst])]
                      for dst in range(world) for src in range(world)}

    # -- pair kinds, per pattern (closed form)
    def _kind(self, qc: int, kc: int):
        from pigeon.attention import S2, BlockList, Causal, SlidingWindow, TopK
        p, L = self.pattern, self.L
        if self.docs is not None:
            return self._doc_kind(qc, kc)
        if p is None:
            return "full"
        if isinstance(p, Causal):
            return "full" if kc < qc else "partial" if kc == qc else None
        dmin, dmax = qc * L - (kc + 1) * L + 1, (qc + 1) * L - 1 - kc * L
        if isinstance(p, SlidingWindow):
            w = p.window
            lo, hi = (0, w - 1) if p.causal else (-w + 1, w - 1)
            if dmax < lo or dmin > hi:
                return None
            return "full" if lo <= dmin and dmax <= hi else "partial"
        if isinstance(p, S2):
            nb = L // p.block
            if kc > qc:
                return None
            if kc == qc:
                return "partial"
            if kc * nb > (qc + 1) * nb - 1 - p.local_blocks or p.stride == 1:
                return "full"
            band = (kc + 1) * nb - 1 > qc * nb - p.local_blocks
            rj = range(p.stride) if nb >= p.stride else {j % p.stride for j in range(kc * nb, (kc + 1) * nb)}
            rh = {h * p.step % p.stride for h in range(min(self.heads, p.stride))}
            shard = any((a + b + p.offset) % p.stride == 0 for a in rj for b in rh)
            return "partial" if band or shard else None
        if isinstance(p, BlockList):
            return "partial" if (qc, kc) in self._listed else None
        if isinstance(p, TopK):
            return self._topk_kinds.get((qc, kc))
        raise AssertionError(p)

    # -- packed documents (cu_seqlens): from the documents of each chunk's first and last position
    def _init_docs(self, cu, seq_len):
        c = cu.long().cpu()
        if c.dim() != 1 or c.numel() < 2 or int(c[0]) != 0 or int(c[-1]) != seq_len or bool((c[1:] < c[:-1]).any()):
            raise SeqParallelError(f"seq_parallel_attention: cu_seqlens must be non-decreasing from 0 to the "
                                   f"{seq_len} tokens of the whole sequence, got {c.tolist()[:8]}")
        L = self.L
        starts = torch.arange(self.C) * L
        # the document of a position: the last boundary <= it (empty documents never contain one)
        doc = lambda pos: torch.searchsorted(c, pos, right=True) - 1        # noqa: E731
        self.docs = (c, doc(starts).tolist(), doc(starts + L - 1).tolist())

    def _doc_kind(self, qc, kc):
        c, first, last = self.docs
        causal = self.pattern is not None
        if qc == kc:
            return "full" if not causal and first[qc] == last[qc] else "partial"
        if causal and kc > qc:
            return None
        lo, hi = min(qc, kc), max(qc, kc)
        if last[lo] != first[hi]:                    # no document spans both (at most one can)
            return None
        return "full" if first[lo] == last[hi] else "partial"

    def _doc_work(self, qc, kc):
        """A diagonal pair: packed attention over the chunk's pieces of documents (causal within each); an
        off-diagonal one: the one document spanning both, a rectangle of (query, key) local ranges."""
        from pigeon.attention import Causal
        c, first, last = self.docs
        L = self.L
        if qc == kc:
            b = sorted({0, L} | {int(x) - qc * L for x in c.tolist() if 0 < int(x) - qc * L < L})
            if len(b) == 2:
                return (Causal() if self.pattern is not None else None), None, None
            return self.pattern, None, torch.tensor(b, dtype=torch.int32)
        d = last[min(qc, kc)]
        s, e = int(c[d]), int(c[d + 1])
        qa, qb = max(s - qc * L, 0), min(e - qc * L, L)
        ka, kb = max(s - kc * L, 0), min(e - kc * L, L)

        def rect(b_, h_, q_idx, kv_idx):
            conds = [x for x in ((q_idx >= qa) if qa else None, (q_idx < qb) if qb < L else None,
                                 (kv_idx >= ka) if ka else None, (kv_idx < kb) if kb < L else None) if x is not None]
            m = conds[0]
            for x in conds[1:]:
                m = m & x
            return m
        return None, rect, None

    # -- TopK: the selected key blocks, given at run time (every rank has them)
    def _init_topk(self, p, seq_len):
        L, bm, bn = self.L, p.block_m, p.block_n
        if L % bm or L % bn:
            raise SeqParallelError(f"seq_parallel_attention: TopK blocks of {bm}x{bn} do not tile chunks of {L} "
                                   f"(sequence {seq_len} in {self.C} chunks)")
        idx = p.indices.long().cpu()
        nq, nk = seq_len // bm, seq_len // bn
        if idx.dim() != 4 or idx.shape[2] != nq:
            raise SeqParallelError(f"seq_parallel_attention: TopK indices must be [B, H, {nq}, k] (query blocks of "
                                   f"{bm} for {seq_len} queries), got {list(idx.shape)}")
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= nk):
            raise SeqParallelError(f"seq_parallel_attention: TopK block indices must be in [-1, {nk}) (-1: none)")
        srt = idx.sort(-1).values
        keep = srt >= 0
        keep[..., 1:] &= srt[..., 1:] != srt[..., :-1]                  # repeats count once
        rq, rk, C = L // bm, L // bn, self.C
        kcs = torch.where(keep, srt // rk, 0)
        counts = torch.zeros(idx.shape[:3] + (C,), dtype=torch.int64)
        counts.scatter_add_(3, kcs, keep.long())                       # [B, Hs, nq, C]: selected blocks per key chunk
        counts = counts.reshape(idx.shape[0], idx.shape[1], C, rq, C)
        anyk = (counts > 0).any(3).any(1).any(0)                       # [qc, kc]
        allk = (counts == rk).all(3).all(1).all(0)
        self._topk = (srt, keep)
        self._topk_kinds = {(qc, kc): "full" if bool(allk[qc, kc]) else "partial"
                            for qc, kc in anyk.nonzero().tolist()}

    def _sub_topk(self, qc, kc):
        """The selection restricted to the pair, in the chunk's local block numbering (-1 elsewhere)."""
        from pigeon.attention import TopK
        p, L = self.pattern, self.L
        rq, rk = L // p.block_m, L // p.block_n
        srt, keep = self._topk
        rows, kr = srt[:, :, qc * rq:(qc + 1) * rq], keep[:, :, qc * rq:(qc + 1) * rq]
        sel = kr & (rows // rk == kc)
        n = max(int(sel.sum(-1).max()), 1)
        sub = torch.where(sel, rows - kc * rk, -1).sort(-1, descending=True).values[..., :n]
        return TopK(sub, p.block_m, p.block_n)

    def _init_block_list(self, p, seq_len):
        L, bm, bn = self.L, p.block_m, p.block_n
        if L % bm or L % bn:
            raise SeqParallelError(f"seq_parallel_attention: BlockList blocks of {bm}x{bn} do not tile chunks of {L} "
                                   f"(sequence {seq_len} in {self.C} chunks)")
        crow = p.crow.long().cpu()
        crow = crow if crow.dim() == 2 else crow[None]
        nq = seq_len // bm
        if crow.shape[-1] != nq + 1:
            raise SeqParallelError(f"seq_parallel_attention: BlockList crow has {crow.shape[-1]} entries per head, "
                                   f"expected {nq + 1} (query blocks of {bm} for {seq_len} queries)")
        col = p.col.long().cpu()
        nk = seq_len // bn
        self._bl = []                       # per head: (row block, col block) of each listed block
        for h in range(crow.shape[0]):
            rows = torch.repeat_interleave(torch.arange(nq), crow[h, 1:] - crow[h, :-1])
            cols = col[int(crow[h, 0]):int(crow[h, -1])]
            if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= nk):
                raise SeqParallelError(f"seq_parallel_attention: BlockList column out of range [0, {nk}) for head {h}")
            self._bl.append((rows, cols))
        rq, rk = L // bm, L // bn
        self._listed = {(int(a), int(b)) for rows, cols in self._bl
                        for a, b in torch.stack([rows // rq, cols // rk], 1).unique(dim=0).tolist()} \
            if any(r.numel() for r, _ in self._bl) else set()

    def _sub_block_list(self, qc, kc):
        from pigeon.attention import BlockList
        p, L = self.pattern, self.L
        rq, rk = L // p.block_m, L // p.block_n
        crows, cols, off = [], [], 0
        for rows, c in self._bl:
            sel = (rows // rq == qc) & (c // rk == kc)
            r = rows[sel] - qc * rq
            counts = torch.bincount(r, minlength=rq)
            crows.append(torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]) + off)
            cols.append(c[sel] - kc * rk)
            off += int(sel.sum())
        crow = torch.stack(crows) if len(crows) > 1 else crows[0]
        return BlockList(crow, torch.cat(cols), p.block_m, p.block_n)

    def kind(self, qc: int, kc: int):
        """None, "full" or "partial"."""
        return self.kinds[(qc, kc)]

    def work(self, qc: int, kc: int, device=None):
        """``(pattern, mask_mod, cu_seqlens)`` for ``pigeon.attention.attention`` on the chunk pair (local
        positions; ``cu_seqlens``: the local document boundaries of a diagonal packed pair, else None)."""
        from dataclasses import replace
        from pigeon.attention import S2, BlockList
        from pigeon.attention.patterns import mask_expr
        from pigeon.ir.expr_trace import Sym
        from pigeon.attention import TopK
        kind, p, L = self.kinds[(qc, kc)], self.pattern, self.L
        if kind == "full":
            return None, None, None
        if self.docs is not None:
            pat, mm, cu = self._doc_work(qc, kc)
            return pat, mm, (cu.to(device) if cu is not None and device is not None else cu)
        if isinstance(p, BlockList):
            sub = self._sub_block_list(qc, kc)
            if device is not None:
                sub = BlockList(sub.crow.to(device), sub.col.to(device), sub.block_m, sub.block_n)
            return sub, None, None
        if isinstance(p, TopK):
            sub = self._sub_topk(qc, kc)
            return (TopK(sub.indices.to(device), sub.block_m, sub.block_n) if device is not None else sub), None, None
        if qc == kc:
            if isinstance(p, S2):
                return replace(p, offset=(p.offset + qc * (L // p.block)) % p.stride), None, None
            return p, None, None
        e = _shift_expr(mask_expr(p), qc * L, kc * L)
        return None, (lambda b, h, q_idx, kv_idx: Sym(e)), None

    def expected(self, rank: int) -> CommStats:
        """The counts one forward pass on ``rank`` implies (the backward circulates K/V the same way and returns
        one dK/dV message per K/V message it received)."""
        W, mine = self.world, self.mine[rank]
        st = CommStats()
        for s in range(1, W):
            dst = (rank + s) % W
            n = len(self.needs[(dst, rank)])
            st.messages_sent += n > 0
            st.chunks_sent += n
            st.chunks_not_sent += len(mine) - n
        for qc in mine:
            for kc in range(self.C):
                if self.kinds[(qc, kc)]:
                    st.pairs_computed += 1
                else:
                    st.pairs_skipped += 1
        return st


def schedule(world: int, causal, layout=None, seq_len=None, heads: int = 1, cu_seqlens=None) -> dict:
    """``needs[(dst, src)]``: the chunks of src that dst attends to (the ones src sends dst).  ``causal``: a bool
    (dense / causal, zig-zag when causal) or a pattern."""
    if isinstance(causal, bool):
        from pigeon.attention import Causal
        return Plan(world, Causal() if causal else None, layout if layout is not None else causal).needs
    return Plan(world, causal, layout, seq_len, heads, cu_seqlens).needs


def shard(x: torch.Tensor, rank: int, world: int, layout, dim: int = 2) -> torch.Tensor:
    """Rank's local slice of a full-sequence tensor (the chunks of :func:`chunks_of`, concatenated); ``layout``:
    "contiguous", "zigzag", or a bool (True: zig-zag)."""
    C = num_chunks(world, layout)
    if x.shape[dim] % C or x.shape[dim] == 0:
        raise SeqParallelError(f"sequence length {x.shape[dim]} is not a positive multiple of {C} chunks")
    parts = x.chunk(C, dim)
    return torch.cat([parts[c] for c in chunks_of(rank, world, layout)], dim)


def unshard(slices: list[torch.Tensor], world: int, layout, dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from every rank's slice (inverse of :func:`shard`)."""
    per = {}
    for r, s in enumerate(slices):
        cs = chunks_of(r, world, layout)
        for c, part in zip(cs, s.chunk(len(cs), dim)):
            per[c] = part
    return torch.cat([per[c] for c in range(num_chunks(world, layout))], dim)


# ------------------------------------------------------------------------------------------ running

def _packed(t):
    """[1, H, T, D] -> the packed [T, H, D] (and back: :func:`_dense`)."""
    return t[0].transpose(0, 1)


def _dense(t):
    return t.transpose(0, 1)[None]


def _block(q, k, v, work, scale, gqa, backend):
    from pigeon.attention import attention
    pattern, mask_mod, cu = work
    if cu is not None:                  # a diagonal pair of packed documents: attention over their pieces
        o, l = attention(_packed(q), _packed(k), _packed(v), pattern=pattern, scale=scale, enable_gqa=gqa,
                         cu_seqlens=cu, return_lse=True, backend=backend)
        return _dense(o), l[None]
    return attention(q, k, v, pattern=pattern, mask_mod=mask_mod, scale=scale, enable_gqa=gqa, return_lse=True,
                     backend=backend)


def _pack(k_parts, v_parts):
    return torch.cat([t.reshape(-1) for t in (*k_parts, *v_parts)])


def _unpack(buf, n, k_shape, v_shape):
    kn, vn = k_shape.numel(), v_shape.numel()
    ks = [buf[i * kn:(i + 1) * kn].view(k_shape) for i in range(n)]
    off = n * kn
    vs = [buf[off + i * vn: off + (i + 1) * vn].view(v_shape) for i in range(n)]
    return ks, vs


class _Ring:
    """The static schedule of one call, from one rank's point of view."""

    def __init__(self, plan: Plan, k, v, group, stats: CommStats | None):
        self.group, self.plan, self.stats = group, plan, stats
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.mine = plan.mine[self.rank]
        self.needs = plan.needs
        n = len(self.mine)
        self.k_shape, self.v_shape = k.chunk(n, 2)[0].shape, v.chunk(n, 2)[0].shape

    def _global(self, r):
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def post(self, s, k_by_chunk, v_by_chunk):
        """Start step s's transfer: send dst what it attends to, receive what we attend to from src."""
        if s >= self.world:
            return None
        dst, src = (self.rank + s) % self.world, (self.rank - s) % self.world
        ops, recv, buf = [], None, None
        send_ch = self.needs[(dst, self.rank)]
        if self.stats is not None:
            self.stats.messages_sent += bool(send_ch)
            self.stats.chunks_sent += len(send_ch)
            self.stats.chunks_not_sent += len(self.mine) - len(send_ch)
        if send_ch:
            buf = _pack([k_by_chunk[c] for c in send_ch], [v_by_chunk[c] for c in send_ch])
            ops.append(dist.P2POp(dist.isend, buf, self._global(dst), self.group, s))
        recv_ch = self.needs[(self.rank, src)]
        if recv_ch:
            n = len(recv_ch)
            recv = k_by_chunk[self.mine[0]].new_empty(n * (self.k_shape.numel() + self.v_shape.numel()))
            ops.append(dist.P2POp(dist.irecv, recv, self._global(src), self.group, s))
        # one batch (NCCL: one group), so that two ranks sending to each other do not wait on each other
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return reqs, recv, recv_ch, buf      # buf: the send buffer, alive until waited

    def wait(self, posted):
        reqs, recv, recv_ch, _keep = posted
        for r in reqs:
            r.wait()
        if recv is None:
            return {}, {}
        ks, vs = _unpack(recv, len(recv_ch), self.k_shape, self.v_shape)
        return dict(zip(recv_ch, ks)), dict(zip(recv_ch, vs))

    def steps(self, k_by_chunk, v_by_chunk):
        """Yield (src, {chunk: k}, {chunk: v}) for s = 0..W-1, the next transfer in flight meanwhile."""
        yield self.rank, k_by_chunk, v_by_chunk
        pending = self.post(1, k_by_chunk, v_by_chunk)
        for s in range(1, self.world):
            cur, pending = pending, self.post(s + 1, k_by_chunk, v_by_chunk)
            kk, vv = self.wait(cur)
            yield (self.rank - s) % self.world, kk, vv

    def count_pairs(self):
        if self.stats is not None:
            for qc in self.mine:
                for kc in range(self.plan.C):
                    if self.plan.kinds[(qc, kc)] is None:
                        self.stats.pairs_skipped += 1


def _split(t, chunks):
    return dict(zip(chunks, t.chunk(len(chunks), 2)))


def _merge(outs, lses, out_dtype):
    acc = torch.promote_types(outs[0].dtype, torch.float32)
    lse_all = torch.stack([l.to(torch.promote_types(l.dtype, torch.float32)) for l in lses])   # [n, B, H, S]
    lse = torch.logsumexp(lse_all, 0)
    fin = torch.isfinite(lse)
    w = torch.where(fin, torch.exp(lse_all - torch.where(fin, lse, torch.zeros_like(lse))),
                    torch.zeros_like(lse_all))
    out = sum(wi[..., None].to(acc) * o.to(acc) for wi, o in zip(w, outs))
    return out.to(out_dtype), lse.to(lses[0].dtype)


def _pair_grads_reference(qb, kb, vb, work, scale, gqa, g_out_fn):
    qb, kb, vb = (t.detach().requires_grad_() for t in (qb, kb, vb))
    with torch.enable_grad():
        ob, lb = _block(qb, kb, vb, work, scale, gqa, "reference")
    g_out, g_lse = g_out_fn(ob.detach(), lb.detach())
    return torch.autograd.grad((ob, lb), (qb, kb, vb), (g_out.to(ob.dtype), g_lse.to(lb.dtype)))


def _pair_grads_kernels(qb, kb, vb, work, scale, gqa, g_out_fn):
    """(dq, dk, dv) of one pair through pigeon's ops (module docstring: the lse term by two more op calls)."""
    from pigeon.attention.api import _op_args
    ops = torch.ops.pigeon
    pattern, mask_mod, cu = work       # (the forward's attention() call checked these shapes and dtypes)
    if cu is not None:                 # packed: the ops take [T, H, D] and give lse [H, T]
        qb, kb, vb = _packed(qb), _packed(kb), _packed(vb)
        to_d, to_p = (lambda o, l: (_dense(o), l[None])), (lambda t: _packed(t).contiguous())     # noqa: E731
    else:
        to_d, to_p = (lambda o, l: (o, l)), (lambda t: t.contiguous())                           # noqa: E731
    args = _op_args(qb, kb, vb, None, mask_mod, pattern, scale, cu)
    text, q_, k_, v_, ptr, col, full, shape = args[:8]
    ob, lb = ops.attention_fwd(text, q_, k_, v_, ptr, col, full, shape, cu, scale)
    g_out, g_lse = g_out_fn(*to_d(ob, lb))
    dq, dk, dv = ops.attention_bwd(text, to_p(g_out.to(qb.dtype)), q_, k_, v_, ob, lb, ptr, col, full, shape,
                                   cu, scale)
    lse_term = bool((g_lse != 0).any())
    if lse_term:
        # the lse term: dS = P * g_lse (rows); P K by the forward with K as the values, P^T (g_lse Q) by the
        # backward's dV with K as the values
        text_k = _op_args(qb, kb, kb, None, mask_mod, pattern, scale, cu)[0]
        pk, lk = ops.attention_fwd(text_k, q_, k_, k_, ptr, col, full, shape, cu, scale)
        pk = to_d(pk, lk)[0]
        gq = (g_lse.float()[..., None] * to_d(q_, lk)[0].float()).to(qb.dtype)
        _, _, pt_gq = ops.attention_bwd(text_k, to_p(gq), q_, k_, k_, to_p(pk), lk, ptr, col, full, shape, cu,
                                        scale)
        pt_gq = to_d(pt_gq, lk)[0]
    dq, dk, dv = (to_d(t, lb)[0] for t in (dq, dk, dv))
    if not lse_term:
        return dq, dk, dv
    acc = torch.promote_types(qb.dtype, torch.float32)
    dq = (dq.to(acc) + scale * g_lse.to(acc)[..., None] * pk.to(acc)).to(qb.dtype)
    dk = (dk.to(acc) + scale * pt_gq.to(acc)).to(kb.dtype)
    return dq, dk, dv


class _SeqParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, gqa, backend, group, stats):
        ring = _Ring(plan, k, v, group, stats.forward if stats is not None else None)
        qs = _split(q, ring.mine)
        parts = {qc: ([], []) for qc in ring.mine}
        for _src, kk, vv in ring.steps(_split(k, ring.mine), _split(v, ring.mine)):
            for qc in ring.mine:
                for kc in kk:
                    if plan.kinds[(qc, kc)] is None:
                        continue
                    o, l = _block(qs[qc], kk[kc], vv[kc], plan.work(qc, kc, q.device), scale, gqa, backend)
                    parts[qc][0].append(o)
                    parts[qc][1].append(l)
                    if ring.stats is not None:
                        ring.stats.pairs_computed += 1
        ring.count_pairs()
        merged = [_merge(*parts[qc], q.dtype) for qc in ring.mine]
        out = torch.cat([m[0] for m in merged], 2)
        lse = torch.cat([m[1] for m in merged], 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, scale, gqa, backend, group, stats)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, gqa, backend, group, stats = ctx.args
        bst = stats.backward if stats is not None else None
        ring = _Ring(plan, k, v, group, bst)
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        qs, outs, lses = _split(q, ring.mine), _split(out, ring.mine), _split(lse, ring.mine)
        dos, dls = _split(d_out, ring.mine), _split(d_lse, ring.mine)
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = {c: torch.zeros_like(t, dtype=acc) for c, t in qs.items()}
        dk = {c: torch.zeros_like(t, dtype=acc) for c, t in _split(k, ring.mine).items()}
        dv = {c: torch.zeros_like(t, dtype=acc) for c, t in _split(v, ring.mine).items()}
        pair_grads = _pair_grads_kernels if backend == "kernels" else _pair_grads_reference
        returns = []          # dK/dV partials on their way back to their owners
        for s, (src, kk, vv) in enumerate(ring.steps(_split(k, ring.mine), _split(v, ring.mine))):
            gk = {c: torch.zeros_like(t, dtype=acc) for c, t in kk.items()}
            gv = {c: torch.zeros_like(t, dtype=acc) for c, t in vv.items()}
            for qc in ring.mine:
                for kc in kk:
                    if plan.kinds[(qc, kc)] is None:
                        continue
                    lse_q = lses[qc].to(torch.promote_types(lses[qc].dtype, torch.float32))
                    do_q, out_q, dl_q = dos[qc].to(acc), outs[qc].to(acc), dls[qc].to(acc)

                    def g_out_fn(ob, lb, lse_q=lse_q, do_q=do_q, out_q=out_q, dl_q=dl_q):
                        fin = torch.isfinite(lse_q) & torch.isfinite(lb)
                        w = torch.where(fin, torch.exp(lb.to(lse_q.dtype) - torch.where(fin, lse_q, 0.0)), 0.0)
                        w = w.to(acc)
                        return w[..., None] * do_q, w * (((ob.to(acc) - out_q) * do_q).sum(-1) + dl_q)
                    a, b, c = pair_grads(qs[qc], kk[kc], vv[kc], plan.work(qc, kc, q.device), scale, gqa, g_out_fn)
                    dq[qc] += a
                    gk[kc] += b
                    gv[kc] += c
                    if bst is not None:
                        bst.pairs_computed += 1
            if src == ring.rank:
                for c in gk:
                    dk[c] += gk[c]
                    dv[c] += gv[c]
                continue
            # send the partials back to src (tag W + s) and receive those of our own chunks from the rank that
            # used them at this step (user = rank + s), in one batch
            ops, recv = [], None
            if gk:
                buf = _pack([gk[c].to(k.dtype) for c in gk], [gv[c].to(v.dtype) for c in gv])
                ops.append(dist.P2POp(dist.isend, buf, ring._global(src), group, ring.world + s))
                returns.append(buf)
                if bst is not None:
                    bst.grad_messages_sent += 1
            user = (ring.rank + s) % ring.world
            ch = ring.needs[(user, ring.rank)]
            if ch:
                recv = q.new_empty(len(ch) * (ring.k_shape.numel() + ring.v_shape.numel()), dtype=k.dtype)
                ops.append(dist.P2POp(dist.irecv, recv, ring._global(user), group, ring.world + s))
            reqs = dist.batch_isend_irecv(ops) if ops else []
            if recv is not None:
                reqs[-1].wait()
                ks, vs = _unpack(recv, len(ch), ring.k_shape, ring.v_shape)
                for c, a, b in zip(ch, ks, vs):
                    dk[c] += a
                    dv[c] += b
            if gk:
                returns.append(reqs[0])
        ring.count_pairs()
        for r in returns[1::2]:
            r.wait()
        cat = lambda d, t: torch.cat([d[c] for c in ring.mine], 2).to(t.dtype)      # noqa: E731
        return cat(dq, q), cat(dk, k), cat(dv, v), None, None, None, None, None, None


def seq_parallel_attention(q, k, v, *, causal: bool = False, pattern=None, layout=None, scale: float | None = None,
                           enable_gqa: bool = False, cu_seqlens: torch.Tensor | None = None, backend: str = "reference",
                           group=None, stats: SeqParallelStats | None = None):
    """``(out, lse)`` of this rank's slice (layout: :func:`shard` with the same ``layout``; default
    :func:`default_layout` of the pattern): equal to ``pigeon.attention.attention(full q, k, v, pattern=pattern,
    cu_seqlens=cu_seqlens, return_lse=True)`` sliced the same way.  ``causal=True`` is ``pattern=Causal()``.
    ``cu_seqlens``: the whole sequence's packed documents (every rank passes the same): q, k, v are then the
    rank's tokens ``[T_local, heads, head_dim]`` (``shard(..., dim=0)``), out ``[T_local, Hq, Dv]`` and lse
    ``[Hq, T_local]``; no pattern (each document attends to itself) or ``Causal()`` (causal within each).
    Differentiable in q, k, v (module docstring: the backward).  ``stats``: counts of what was sent and
    computed are added to it."""
    from pigeon.attention import Causal
    want = 3 if cu_seqlens is not None else 4
    if q.dim() != want or k.dim() != want or v.dim() != want:
        raise SeqParallelError("seq_parallel_attention: q, k, v must be " +
                               ("[local_tokens, heads, head_dim] (packed, with cu_seqlens)" if want == 3 else
                                "[batch, heads, local_seq, head_dim] (or packed [tokens, heads, head_dim] with "
                                "cu_seqlens)"))
    if backend not in ("reference", "kernels"):
        raise SeqParallelError(f"seq_parallel_attention: backend must be 'reference' or 'kernels', got {backend!r}")
    if causal and pattern is not None and not isinstance(pattern, Causal):
        raise SeqParallelError("seq_parallel_attention: give causal=True or a pattern, not both")
    if causal:
        pattern = Causal()
    if cu_seqlens is not None:           # the packed tokens as one batch of one sequence
        q, k, v = _dense(q), _dense(k), _dense(v)
    if q.shape[2] != k.shape[2]:
        raise SeqParallelError(f"seq_parallel_attention: local q has {q.shape[2]} positions, k {k.shape[2]}; "
                               "every rank holds the same positions of q, k and v")
    world = dist.get_world_size(group)
    lay = default_layout(pattern) if layout is None else _layout(layout)
    per_rank = len(chunks_of(0, world, lay))
    if q.shape[2] % per_rank:
        raise SeqParallelError(f"seq_parallel_attention: local length {q.shape[2]} is not {per_rank} equal chunks "
                               f"({lay} layout)")
    plan = Plan(world, pattern, lay, q.shape[2] * world, q.shape[1], cu_seqlens=cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _SeqParallelAttention.apply(q, k, v, plan, scale, enable_gqa, backend, group, stats)
    if cu_seqlens is not None:
        return _packed(out), lse[0]
    return out, lse
