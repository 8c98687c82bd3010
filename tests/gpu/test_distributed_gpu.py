"""The distributed equalities of tests/test_distributed_*.py on GPUs with NCCL (one process per GPU, 2 GPUs):
DDP RGAT training (reference float64 and kernels float32) equals single-process training step for step;
mini-batch DDP training over sampled blocks equals the single-process oracle; sequence-parallel attention with
patterns (reference float64; kernels bf16, head_dim 64, forward and backward) equals single-process attention /
the reference backend.  NVLink multicast stays off (NCCL_NVLS_ENABLE=0, the device notes require it).

Run on a machine with >= 2 GPUs: ``python -m pytest tests/gpu/test_distributed_gpu.py -m gpu``.  Not run yet:
only single-GPU machines were lent so far."""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

from pigeon.distributed.launch import spawn  # noqa: E402

WORLD = 2
_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpus < WORLD, reason=f"needs >= {WORLD} CUDA GPUs for NCCL (found {_gpus})"),
    pytest.mark.skipif(not dist.is_nccl_available(), reason="torch.distributed was built without NCCL"),
]


def _init():
    from pigeon.distributed.ddp import init_from_env
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    init_from_env("nccl", timeout_s=120)
    dist.barrier()          # a first collective over every rank (batch_isend_irecv's NCCL requirement)
    return rank, torch.device("cuda", rank)


def _close(a, b, tol, what):
    for step, (h, r) in enumerate(zip(a, b)):
        for k in r:
            torch.testing.assert_close(h[k], r[k], rtol=tol, atol=tol, msg=lambda m: f"{what} step {step} {k}: {m}")


def _ddp_rank():
    from pigeon.distributed.ddp import demo_problem, reference_train, train
    from pigeon.distributed.minibatch import reference_minibatch_train, train_minibatch
    rank, dev = _init()
    try:
        g, x, labels, targets = demo_problem(0)
        kw = dict(steps=4, batch_size=10, lr=0.5, seed=3, device=dev)
        _close(train(g, x, labels, targets, **kw), reference_train(g, x, labels, targets, **kw), 1e-8,
               f"rank {rank} DDP reference float64")
        xf = x.float()
        kf = dict(kw, backend="kernels", dtype="float32")
        _close(train(g, xf, labels, targets, **kf), reference_train(g, xf, labels, targets, **kf), 1e-4,
               f"rank {rank} DDP kernels float32")
        for fanouts, mode in (([None, None], "union"), ([2, 1], "per_rank")):
            mk = dict(fanouts=fanouts, batch_size=5, lr=0.5, seed=3, epochs=2, device=dev)
            _close(train_minibatch(g, x, labels, targets, **mk),
                   reference_minibatch_train(g, x, labels, targets, world=WORLD, mode=mode, **mk), 1e-8,
                   f"rank {rank} mini-batch {fanouts}")
    finally:
        dist.destroy_process_group()


def _attention_rank():
    from pigeon.attention import S2, Causal, SlidingWindow, attention
    from pigeon.distributed.seq_attention import SeqParallelStats, num_chunks, seq_parallel_attention, shard
    rank, dev = _init()
    try:
        cases = [(Causal(), "zigzag", 4, 2, 64), (SlidingWindow(48), "contiguous", 2, 2, 64),
                 (S2(stride=2, local_blocks=1, block=64), "zigzag", 4, 2, 64), (None, "contiguous", 2, 1, 64)]
        for i, (p, layout, hq, hkv, L) in enumerate(cases):
            gen = torch.Generator().manual_seed(400 + i)
            S = L * num_chunks(WORLD, layout)
            full = [torch.randn(1, h, S, 64, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv)]
            g_out = torch.randn(1, hq, S, 64, generator=gen, dtype=torch.float64).to(dev)
            g_lse = torch.randn(1, hq, S, generator=gen, dtype=torch.float64).to(dev)
            sh = lambda t: shard(t, rank, WORLD, layout)                # noqa: E731
            # single-process reference (float64) on the full sequence
            q, k, v = (t.to(dev, torch.float64).requires_grad_() for t in full)
            out, lse = attention(q, k, v, pattern=p, enable_gqa=hq != hkv, return_lse=True, backend="reference")
            want = (out, lse) + torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
            for backend, dt, tol in (("reference", torch.float64, 1e-9), ("kernels", torch.bfloat16, 3e-2)):
                ql, kl, vl = (sh(t).to(dev, dt).requires_grad_() for t in full)
                stats = SeqParallelStats()
                o, l = seq_parallel_attention(ql, kl, vl, pattern=p, layout=layout, enable_gqa=hq != hkv,
                                              backend=backend, stats=stats)
                got = (o, l) + torch.autograd.grad((o.double() * sh(g_out)).sum() + (l.double() * sh(g_lse)).sum(),
                                                   (ql, kl, vl))
                for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                    torch.testing.assert_close(a.double(), sh(b.detach()), rtol=tol, atol=tol,
                                               msg=lambda m: f"rank {rank} case {i} {backend} {name}: {m}")
    finally:
        dist.destroy_process_group()


def test_ddp_and_minibatch_training_on_two_gpus():
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    spawn(_ddp_rank, WORLD)            # start method spawn: no CUDA state is forked


def test_seq_parallel_attention_on_two_gpus():
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    spawn(_attention_rank, WORLD)
