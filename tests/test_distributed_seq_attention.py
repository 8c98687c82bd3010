"""Sequence-parallel attention on 2 and 4 gloo processes (backend="reference" inside, float64): out, lse and
dq/dk/dv of every rank's slice equal single-process pigeon.attention on the full sequence, dense and causal
(zig-zag), with GQA.  The schedule sends and computes only attended chunk pairs."""
import pytest
import torch
import torch.distributed as dist

from pigeon.distributed.launch import spawn
from pigeon.distributed.seq_attention import chunks_of, num_chunks, pair_kind, schedule, shard, unshard

CASES = [  # (causal, Hq, Hkv, seq per chunk)
    (False, 2, 2, 3), (True, 2, 2, 3), (False, 4, 2, 2), (True, 4, 1, 3)]


def _rank_checks():
    from pigeon.attention import Causal, attention
    from pigeon.distributed.ddp import init_from_env
    from pigeon.distributed.seq_attention import seq_parallel_attention
    init_from_env("gloo", timeout_s=60)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (causal, hq, hkv, per) in enumerate(CASES):
            gen = torch.Generator().manual_seed(100 + i)
            S = per * num_chunks(world, causal)
            q = torch.randn(2, hq, S, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            k = torch.randn(2, hkv, S, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            v = torch.randn(2, hkv, S, 5, generator=gen, dtype=torch.float64, requires_grad=True)
            g_out = torch.randn(2, hq, S, 5, generator=gen, dtype=torch.float64)
            g_lse = torch.randn(2, hq, S, generator=gen, dtype=torch.float64)
            out, lse = attention(q, k, v, pattern=Causal() if causal else None, enable_gqa=hq != hkv,
                                 return_lse=True, backend="reference")
            dq, dk, dv = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
            sh = lambda t: shard(t.detach(), rank, world, causal).requires_grad_()
            ql, kl, vl = sh(q), sh(k), sh(v)
            o, l = seq_parallel_attention(ql, kl, vl, causal=causal, enable_gqa=hq != hkv, backend="reference")
            loss = (o * shard(g_out, rank, world, causal)).sum() + (l * shard(g_lse, rank, world, causal)).sum()
            gq, gk, gv = torch.autograd.grad(loss, (ql, kl, vl))
            for name, a, b in (("out", o, out), ("lse", l, lse), ("dq", gq, dq), ("dk", gk, dk), ("dv", gv, dv)):
                torch.testing.assert_close(a, shard(b.detach(), rank, world, causal), rtol=0, atol=1e-10,
                                           msg=lambda m: f"rank {rank}/{world} case {CASES[i]} {name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_seq_parallel_attention_equals_single_process(world):
    spawn(_rank_checks, world, start_method="fork")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_layout_and_schedule(world):
    x = torch.arange(4 * num_chunks(world, True)).view(1, 1, -1, 1)
    assert torch.equal(unshard([shard(x, r, world, True) for r in range(world)], world, True), x)
    held = sorted(c for r in range(world) for c in chunks_of(r, world, True))
    assert held == list(range(2 * world))
    # every rank gets the same number of attended (query chunk, key chunk) pairs: the load balance
    work = [sum(pair_kind(qc, kc, True) is not None for qc in chunks_of(r, world, True) for kc in range(2 * world))
            for r in range(world)]
    assert len(set(work)) == 1
    needs = schedule(world, True)
    for (dst, src), ch in needs.items():
        want = [kc for kc in chunks_of(src, world, True)
                if any(pair_kind(qc, kc, True) for qc in chunks_of(dst, world, True))]
        assert ch == want
        if src < dst:      # a lower rank's late chunk (2W-1-src) is after all of dst's chunks: not sent
            assert ch == [src]
        elif src > dst:    # dst's late chunk attends to both of a higher rank's chunks
            assert ch == chunks_of(src, world, True)
    assert all(len(schedule(world, False)[(d, s)]) == 1 for d in range(world) for s in range(world))
