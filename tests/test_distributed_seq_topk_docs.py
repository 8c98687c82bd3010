"""Sequence-parallel attention with run-time patterns: TopK selections (per batch, selection head and query block;
shared per KV group under GQA) and packed documents (cu_seqlens, causal within each document, documents spanning
chunk boundaries).  The plan is derived per call from the indices / the document bounds (no dense mask): its
chunk-pair kinds equal a brute-force scan of the dense mask; each pair's sub-pattern (the TopK restricted to the
pair, the chunk's pieces of documents, the one document spanning two chunks) gives the same pair gradients through
the kernels backend's ops as through the reference (float32, 1e-5); on 2 and 4 gloo processes (one spawn each)
out, lse, dq, dk, dv equal single-process pigeon.attention with the same pattern (reference backend, float64,
1e-10) and the counted sends / computes equal the plan's (a selection of local blocks only sends nothing); on 2
processes the kernels backend (bf16, head_dim 64) equals the reference backend (2e-2) for one TopK and one
packed case."""
import pytest
import torch
import torch.distributed as dist

from pigeon.attention import Causal, TopK, dense_mask
from pigeon.distributed.launch import spawn
from pigeon.distributed.seq_attention import (Plan, SeqParallelError, _pair_grads_kernels, _pair_grads_reference,
                                              chunks_of, num_chunks, shard)


def _topk(B, hs, seq, bm, bn, k, seed, local_to=None):
    """Random selections (-1 and repeats included); ``local_to``: a chunk length, to pick only the key blocks of the
    query block's own chunk."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = seq // bm, seq // bn
    idx = torch.randint(-1, nk, (B, hs, nq, k), generator=gen)
    if local_to is not None:
        rk = local_to // bn
        base = (torch.arange(nq) * bm // local_to * rk)[None, None, :, None]
        idx = torch.where(idx < 0, idx, base + idx % rk)
    return TopK(idx, bm, bn)


def _doc_mask(cu, S, causal):
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    m = doc[:, None] == doc[None, :]
    return m & (torch.arange(S)[None, :] <= torch.arange(S)[:, None]) if causal else m


CU = [0, 3, 5, 17, 18, 18, 30, 32]          # 32 tokens: an empty document, documents across chunk boundaries


@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")])
def test_plan_kinds_equal_a_dense_mask_scan(world, layout):
    S = 32
    L = S // num_chunks(world, layout)
    cases = [(_topk(2, 2, S, 2, 4, 3, world), 4, None), (_topk(1, 4, S, 4, 2, 5, 7 + world), 4, None)]
    cases += [(Causal(), 2, torch.tensor(CU)), (None, 2, torch.tensor(CU))]
    for p, hq, cu in cases:
        plan = Plan(world, p, layout, S, hq, cu_seqlens=cu)
        m = dense_mask(p, 2, hq, S, S) if cu is None else _doc_mask(cu, S, p is not None)[None, None]
        for (qc, kc), kind in plan.kinds.items():
            blk = m[..., qc * L:(qc + 1) * L, kc * L:(kc + 1) * L]
            want = None if not bool(blk.any()) else "full" if bool(blk.all()) else "partial"
            assert kind == want, (type(p).__name__, cu is not None, qc, kc, kind, want)
        if cu is not None and world == 4:
            assert any(k is None for k in plan.kinds.values())


def test_local_selection_sends_nothing_and_errors_are_one_line():
    p = _topk(2, 2, 32, 2, 2, 4, 3, local_to=8)
    plan = Plan(4, p, "contiguous", 32, 2)
    for r in range(4):
        st = plan.expected(r)
        assert st.messages_sent == 0 and st.chunks_sent == 0 and st.pairs_computed == 1, (r, st)
    with pytest.raises(SeqParallelError, match="TopK blocks of 4x3 do not tile chunks of 16"):
        Plan(2, TopK(torch.zeros(1, 1, 8, 1, dtype=torch.int64), 4, 3), None, 32)
    with pytest.raises(SeqParallelError, match=r"TopK indices must be \[B, H, 8, k\]"):
        Plan(2, TopK(torch.zeros(1, 1, 4, 1, dtype=torch.int64), 4, 4), None, 32)
    with pytest.raises(SeqParallelError, match="cu_seqlens must be non-decreasing from 0 to the 32 tokens"):
        Plan(2, Causal(), None, 32, cu_seqlens=torch.tensor([0, 5, 30]))
    with pytest.raises(SeqParallelError, match="packed cu_seqlens take no pattern or Causal"):
        Plan(2, p, None, 32, cu_seqlens=torch.tensor(CU))


def test_kernels_pair_gradients_equal_reference():
    g = torch.Generator().manual_seed(1)
    for plan, hq, hkv, B in ((Plan(2, _topk(2, 2, 32, 4, 4, 3, 11), "contiguous", 32, 4), 4, 2, 2),
                             (Plan(2, Causal(), "zigzag", 32, 2, cu_seqlens=torch.tensor(CU)), 2, 2, 1),
                             (Plan(2, None, "contiguous", 32, 2, cu_seqlens=torch.tensor(CU)), 2, 1, 1)):
        L, ran = plan.L, 0
        for (qc, kc), kind in plan.kinds.items():
            if kind is None:
                continue
            q, k, v = (torch.randn(B, h, L, 8, generator=g) for h in (hq, hkv, hkv))
            do, dl = torch.randn(B, hq, L, 8, generator=g), torch.randn(B, hq, L, generator=g)

            def g_fn(ob, lb):
                return 0.7 * do, torch.where(torch.isfinite(lb), 0.3 * dl + (ob * do).sum(-1), 0.0)
            a = _pair_grads_kernels(q, k, v, plan.work(qc, kc), 8 ** -0.5, hq != hkv, g_fn)
            b = _pair_grads_reference(q, k, v, plan.work(qc, kc), 8 ** -0.5, hq != hkv, g_fn)
            for name, x, y in zip(("dq", "dk", "dv"), a, b):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"pair {(qc, kc)} {name}: {m}")
            ran += 1
        assert ran >= 3


# (name, pattern factory (seq, world), layout, Hq, Hkv, chunk length, cu_seqlens or None)
CASES = [
    ("topk gqa shared", lambda S, W: _topk(2, 2, S, 2, 2, 3, 40 + W), "contiguous", 4, 2, 8, None),
    ("topk per head", lambda S, W: _topk(2, 2, S, 4, 2, 4, 50 + W), "zigzag", 2, 2, 4, None),
    ("topk local", lambda S, W: _topk(2, 2, S, 2, 2, 3, 60 + W, local_to=S // W), "contiguous", 2, 1, 8, None),
    ("docs causal", lambda S, W: Causal(), "zigzag", 2, 1, 32 // (2 * 4), CU),
    ("docs", lambda S, W: None, "contiguous", 2, 2, 32 // 4, CU),
]


def _grads(o, lse, g_out, g_lse, inputs):
    fin = torch.isfinite(lse)
    loss = (o * g_out).sum() + (torch.where(fin, lse, 0.0) * torch.where(fin, g_lse, 0.0)).sum()
    return torch.autograd.grad(loss, inputs)


def _rank_checks():
    from pigeon.attention import attention
    from pigeon.distributed.ddp import init_from_env
    from pigeon.distributed.seq_attention import SeqParallelStats, seq_parallel_attention
    init_from_env("gloo", timeout_s=60)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (name, make, layout, hq, hkv, L, cu) in enumerate(CASES):
            gen = torch.Generator().manual_seed(400 + i)
            S = 32 if cu is not None else L * num_chunks(world, layout)
            cu = torch.tensor(cu) if cu is not None else None
            p = make(S, world)
            shp = (lambda h, d: (S, h, d)) if cu is not None else (lambda h, d: (2, h, S, d))     # noqa: E731
            q, k, v = (torch.randn(*shp(h, d), generator=gen, dtype=torch.float64, requires_grad=True)
                       for h, d in ((hq, 4), (hkv, 4), (hkv, 3)))
            g_out = torch.randn(*shp(hq, 3), generator=gen, dtype=torch.float64)
            g_lse = torch.randn(*((hq, S) if cu is not None else (2, hq, S)), generator=gen, dtype=torch.float64)
            out, lse = attention(q, k, v, pattern=p, enable_gqa=hq != hkv, cu_seqlens=cu, return_lse=True,
                                 backend="reference")
            dq, dk, dv = _grads(out, lse, g_out, g_lse, (q, k, v))
            tdim, ldim = (0, 1) if cu is not None else (2, 2)
            sh = lambda t, d=tdim: shard(t.detach(), rank, world, layout, dim=d)      # noqa: E731
            ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
            stats = SeqParallelStats()
            o, l = seq_parallel_attention(ql, kl, vl, pattern=p, layout=layout, enable_gqa=hq != hkv, cu_seqlens=cu,
                                          backend="reference", stats=stats)
            gq, gk, gv = _grads(o, l, sh(g_out), sh(g_lse, ldim), (ql, kl, vl))
            for what, a, b in (("out", o, sh(out)), ("lse", l, sh(lse, ldim)), ("dq", gq, sh(dq)),
                               ("dk", gk, sh(dk)), ("dv", gv, sh(dv))):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"rank {rank}/{world} {name} {what}: {m}")
            plan = Plan(world, p, layout, S, hq, cu_seqlens=cu)
            want = plan.expected(rank)
            assert stats.forward == want, (name, rank, stats.forward, want)
            bw = stats.backward
            received = sum(bool(plan.needs[(rank, s)]) for s in range(world) if s != rank)
            assert (bw.messages_sent, bw.chunks_sent, bw.pairs_computed, bw.grad_messages_sent) == \
                (want.messages_sent, want.chunks_sent, want.pairs_computed, received), (name, rank, bw)
            if name == "topk local":
                assert stats.forward.messages_sent == 0 and bw.grad_messages_sent == 0
                assert stats.forward.pairs_computed == len(chunks_of(rank, world, layout))
            if name.startswith("docs") and world == 4 and rank == 0:     # chunk 0's documents end before 18
                assert want.pairs_skipped > 0, name
            if name == "docs" and world == 4 and rank == 0:
                assert want.chunks_not_sent == 1, want             # rank 3 (tokens 24..31) never reads chunk 0
        if world == 2:          # the kernels backend (bf16, head_dim 64) against the reference one (float64)
            for i, (p, layout, hq, hkv, cu) in enumerate(((_topk(1, 1, 32, 4, 4, 3, 70), "contiguous", 2, 1, None),
                                                          (Causal(), "zigzag", 2, 2, torch.tensor(CU)))):
                gen = torch.Generator().manual_seed(500 + i)
                shp = (lambda h: (32, h, 64)) if cu is not None else (lambda h: (1, h, 32, 64))    # noqa: E731
                tdim, ldim = (0, 1) if cu is not None else (2, 2)
                full = [torch.randn(*shp(h), generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv)]
                g_out = shard(torch.randn(*shp(hq), generator=gen), rank, world, layout, dim=tdim).double()
                g_lse = torch.randn(*((hq, 32) if cu is not None else (1, hq, 32)), generator=gen)
                g_lse = shard(g_lse, rank, world, layout, dim=ldim).double()
                res = {}
                for backend, dt in (("kernels", torch.bfloat16), ("reference", torch.float64)):
                    xs = [shard(t, rank, world, layout, dim=tdim).to(dt).requires_grad_() for t in full]
                    o, l = seq_parallel_attention(*xs, pattern=p, layout=layout, enable_gqa=hq != hkv, cu_seqlens=cu,
                                                  backend=backend)
                    res[backend] = (o, l) + _grads(o.double(), l.double(), g_out, g_lse, xs)
                for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["kernels"], res["reference"]):
                    assert a.dtype in (torch.bfloat16, torch.float32)
                    torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-2,
                                               msg=lambda m: f"rank {rank} kernels case {i} {what}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_topk_and_packed_seq_parallel_attention_equal_single_process(world):
    spawn(_rank_checks, world, start_method="fork")
