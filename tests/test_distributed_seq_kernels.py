"""seq_parallel_attention(backend="kernels"): the backward through pigeon's ops (pigeon::attention_fwd /
attention_bwd; on a CPU their reference semantics), the lse term added by two more op calls.

* one chunk pair (no processes, float32: the ops' CPU semantics take it): the kernels pair gradients equal the
  reference backend's (torch autograd through a differentiable lse) for dense, causal, GQA, sliding window
  (on and off the diagonal), S2 and a block list with empty rows, 1e-5;
* 2 gloo processes, bfloat16 / head_dim 64 (what the kernels take): out, lse, dq, dk, dv of the kernels backend
  equal the reference backend run on the same values in float64, within bf16 tolerance (dense, causal zig-zag
  with GQA, sliding window)."""
import pytest
import torch
import torch.distributed as dist

from pigeon.attention import S2, BlockList, Causal, SlidingWindow
from pigeon.distributed.launch import spawn
from pigeon.distributed.seq_attention import Plan, _pair_grads_kernels, _pair_grads_reference, num_chunks, shard

PAIR_CASES = [(None, "contiguous", 2, 2), (Causal(), "zigzag", 4, 2), (SlidingWindow(5), "contiguous", 2, 1),
              (S2(3, 1, block=4), "zigzag", 4, 2),
              (BlockList(torch.tensor([0, 1, 1, 3, 4, 4, 6, 6, 7]), torch.tensor([0, 1, 3, 2, 0, 5, 7]), 4, 4),
               "contiguous", 2, 2)]


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: type(c[0]).__name__)
def test_kernels_pair_gradients_equal_reference(case):
    pattern, layout, hq, hkv = case
    plan = Plan(2, pattern, layout, 32, hq)
    gen = torch.Generator().manual_seed(hq + 7 * hkv)
    L, ran = plan.L, 0
    for (qc, kc), kind in plan.kinds.items():
        if kind is None:
            continue
        q, k, v = (torch.randn(2, h, L, 8, generator=gen) for h in (hq, hkv, hkv))
        do, dl = torch.randn(2, hq, L, 8, generator=gen), torch.randn(2, hq, L, generator=gen)

        def g_fn(ob, lb):
            return 0.7 * do, torch.where(torch.isfinite(lb), 0.3 * dl + (ob * do).sum(-1), 0.0)
        a = _pair_grads_kernels(q, k, v, plan.work(qc, kc), 8 ** -0.5, hq != hkv, g_fn)
        b = _pair_grads_reference(q, k, v, plan.work(qc, kc), 8 ** -0.5, hq != hkv, g_fn)
        for name, x, y in zip(("dq", "dk", "dv"), a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"pair {(qc, kc)} {name}: {m}")
        ran += 1
    assert ran >= 3


SP_CASES = [(None, "contiguous", 2, 2), (Causal(), "zigzag", 4, 2), (SlidingWindow(3), "contiguous", 2, 1)]


def _rank_checks():
    from pigeon.distributed.ddp import init_from_env
    from pigeon.distributed.seq_attention import seq_parallel_attention
    init_from_env("gloo", timeout_s=60)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (p, layout, hq, hkv) in enumerate(SP_CASES):
            gen = torch.Generator().manual_seed(300 + i)
            S = 4 * num_chunks(world, layout)
            full = [torch.randn(1, h, S, 64, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv)]
            g_out = torch.randn(1, hq, S, 64, generator=gen)
            g_lse = torch.randn(1, hq, S, generator=gen)
            res = {}
            for backend, dt in (("kernels", torch.bfloat16), ("reference", torch.float64)):
                q, k, v = (shard(t, rank, world, layout).to(dt).requires_grad_() for t in full)
                o, l = seq_parallel_attention(q, k, v, pattern=p, layout=layout, enable_gqa=hq != hkv, backend=backend)
                loss = (o.double() * shard(g_out, rank, world, layout).double()).sum() + \
                    (l.double() * shard(g_lse, rank, world, layout).double()).sum()
                res[backend] = (o, l) + torch.autograd.grad(loss, (q, k, v))
            assert res["kernels"][1].dtype == torch.float32          # the ops' lse
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["kernels"], res["reference"]):
                assert a.dtype in (torch.bfloat16, torch.float32)
                torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2,
                                           msg=lambda m: f"rank {rank} case {i} {name}: {m}")
    finally:
        dist.destroy_process_group()


def test_kernels_backend_backward_equals_reference_backend():
    spawn(_rank_checks, 2, start_method="fork")
