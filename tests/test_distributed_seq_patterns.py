"""Sequence-parallel attention with sparse patterns (sliding window, S2, block lists; causal is in
test_distributed_seq_attention.py): the closed-form chunk-pair kinds of the plan equal a brute-force scan of the
pattern's dense mask; on 2 and 4 gloo processes out, lse, dq, dk, dv equal single-process pigeon.attention with
the same pattern (reference backend, float64, 1e-10), and the counted sends / computes equal what the plan implies
(a window smaller than a chunk sends only to the next rank)."""
import pytest
import torch
import torch.distributed as dist

from pigeon.attention import S2, BlockList, Causal, SlidingWindow, TopK, dense_mask
from pigeon.distributed.launch import spawn
from pigeon.distributed.seq_attention import Plan, SeqParallelError, num_chunks, shard


def _block_list(seq, bm, bn, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = seq // bm, seq // bn
    keep = torch.rand(heads, nq, nk, generator=gen) < 0.06          # a few scattered blocks,
    keep |= (torch.arange(nq)[:, None] == torch.arange(nk)) & (torch.arange(nq)[:, None] % 2 == 0)   # half a diagonal
    keep[:, :, 0] |= torch.arange(nq) % 3 == 0          # a column; some rows have no block at all
    crow = torch.zeros(heads, nq + 1, dtype=torch.int64)
    cols = []
    for h in range(heads):
        crow[h, 1:] = crow[h, 0] + torch.cumsum(keep[h].sum(1), 0)
        if h + 1 < heads:
            crow[h + 1, 0] = crow[h, -1]
        cols.append(keep[h].nonzero()[:, 1])
    return BlockList(crow, torch.cat(cols), bm, bn)


# (name, pattern factory (seq, heads) -> pattern, layout, Hq, Hkv, chunk length)
CASES = [
    ("window<chunk", lambda S, H: SlidingWindow(2), "contiguous", 2, 2, 4),
    ("window two-sided", lambda S, H: SlidingWindow(6, causal=False), "contiguous", 2, 1, 4),
    ("window zigzag", lambda S, H: SlidingWindow(3), "zigzag", 2, 2, 3),
    ("s2 gqa", lambda S, H: S2(stride=3, local_blocks=1, block=2, step=1, offset=1), "zigzag", 4, 2, 4),
    ("block list", lambda S, H: _block_list(S, 2, 2, H, 5), "contiguous", 2, 2, 4),
]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", CASES + [("causal", lambda S, H: Causal(), "zigzag", 2, 2, 3),
                                          ("causal contiguous", lambda S, H: Causal(), "contiguous", 2, 2, 3),
                                          ("dense", lambda S, H: None, "zigzag", 2, 2, 2)], ids=lambda c: c[0])
def test_plan_kinds_equal_a_dense_mask_scan(world, case):
    _, make, layout, hq, _, L = case
    S = L * num_chunks(world, layout)
    p = make(S, hq)
    plan = Plan(world, p, layout, S, hq)
    m = torch.ones(1, 1, S, S, dtype=torch.bool) if p is None else dense_mask(p, 1, hq, S, S)
    for (qc, kc), kind in plan.kinds.items():
        blk = m[..., qc * L:(qc + 1) * L, kc * L:(kc + 1) * L]
        want = None if not bool(blk.any()) else "full" if bool(blk.all()) else "partial"
        assert kind == want or (kind == "partial" and want == "full" and isinstance(p, (BlockList, S2))), \
            (qc, kc, kind, want)
    for (dst, src), ch in plan.needs.items():
        assert ch == [kc for kc in plan.mine[src] if any(plan.kinds[(qc, kc)] for qc in plan.mine[dst])]


def test_window_smaller_than_a_chunk_sends_only_to_the_next_rank():
    plan = Plan(4, SlidingWindow(3), "contiguous", 16, 1)            # chunks of 4
    for (dst, src), ch in plan.needs.items():
        assert bool(ch) == (src in (dst, dst - 1)), (dst, src, ch)
    for r in range(4):
        st = plan.expected(r)
        assert st.messages_sent == (r < 3) and st.chunks_not_sent == 3 - (r < 3)
        assert st.pairs_computed == (2 if r else 1) and st.pairs_skipped == 4 - st.pairs_computed


def test_bad_patterns_and_chunkings_fail_with_one_line():
    with pytest.raises(SeqParallelError, match="S2 blocks of 4 do not tile chunks of 6"):
        Plan(2, S2(2, 1, block=4), "zigzag", 24, 2)
    with pytest.raises(SeqParallelError, match="BlockList blocks of 4x4 do not tile chunks of 6"):
        Plan(2, BlockList(torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 4, 4), None, 12)
    with pytest.raises(SeqParallelError, match="crow has 3 entries per head, expected 5"):
        Plan(2, BlockList(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 2, 2), None, 8)
    with pytest.raises(SeqParallelError, match="TopK blocks of 64x64 do not tile chunks of 4"):
        Plan(2, TopK(torch.zeros(1, 1, 1, 1, dtype=torch.int64)), None, 8)
    with pytest.raises(SeqParallelError, match="not a positive multiple of 4 chunks"):
        Plan(2, Causal(), None, 10)
    with pytest.raises(SeqParallelError, match="layout"):
        Plan(2, None, "striped", 8)


def _rank_checks():
    from pigeon.attention import attention
    from pigeon.distributed.ddp import init_from_env
    from pigeon.distributed.seq_attention import SeqParallelStats, seq_parallel_attention
    init_from_env("gloo", timeout_s=60)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (name, make, layout, hq, hkv, L) in enumerate(CASES):
            gen = torch.Generator().manual_seed(200 + i)
            S = L * num_chunks(world, layout)
            p = make(S, hq)
            q = torch.randn(2, hq, S, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            k = torch.randn(2, hkv, S, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            v = torch.randn(2, hkv, S, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            g_out = torch.randn(2, hq, S, 3, generator=gen, dtype=torch.float64)
            g_lse = torch.randn(2, hq, S, generator=gen, dtype=torch.float64)
            out, lse = attention(q, k, v, pattern=p, enable_gqa=hq != hkv, return_lse=True, backend="reference")
            lse_g = torch.where(torch.isfinite(lse), g_lse, 0.0)      # rows with no key: lse -inf
            dq, dk, dv = torch.autograd.grad((out * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0)
                                                                      * lse_g).sum(), (q, k, v))
            sh = lambda t: shard(t.detach(), rank, world, layout)      # noqa: E731
            ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
            stats = SeqParallelStats()
            o, l = seq_parallel_attention(ql, kl, vl, pattern=p, layout=layout, enable_gqa=hq != hkv,
                                          backend="reference", stats=stats)
            fin = torch.isfinite(l)
            loss = (o * sh(g_out)).sum() + (torch.where(fin, l, 0.0) * sh(lse_g)).sum()
            gq, gk, gv = torch.autograd.grad(loss, (ql, kl, vl))
            for what, a, b in (("out", o, out), ("lse", l, lse), ("dq", gq, dq), ("dk", gk, dk), ("dv", gv, dv)):
                torch.testing.assert_close(a, sh(b), rtol=0, atol=1e-10,
                                           msg=lambda m: f"rank {rank}/{world} {name} {what}: {m}")
            plan = Plan(world, p, layout, S, hq)
            want = plan.expected(rank)
            assert stats.forward == want, (name, rank, stats.forward, want)
            received = sum(bool(plan.needs[(rank, s)]) for s in range(world) if s != rank)
            bw = stats.backward
            assert (bw.messages_sent, bw.chunks_sent, bw.chunks_not_sent, bw.pairs_computed, bw.pairs_skipped) == \
                (want.messages_sent, want.chunks_sent, want.chunks_not_sent, want.pairs_computed, want.pairs_skipped)
            assert bw.grad_messages_sent == received, (name, rank, bw, received)
            if name == "window<chunk":
                assert want.messages_sent == (rank < world - 1) and want.chunks_sent == (rank < world - 1)
            if world == 4 and name in ("window<chunk", "s2 gqa", "block list"):
                assert want.pairs_skipped > 0 or want.chunks_not_sent > 0, name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_patterned_seq_parallel_attention_equals_single_process(world):
    spawn(_rank_checks, world, start_method="fork")
