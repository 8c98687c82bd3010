"""Mini-batch mode: the neighbour sampler (pigeon.distributed.sampling) and DDP mini-batch training over sampled
blocks (pigeon.distributed.minibatch).

* fanout None everywhere: the block is exactly partition's k-hop subgraph of the batch (ids, edge order);
* small fanouts: every sampled edge is a graph edge (no edge twice), per-node fan-in <= the fanout of the hop's
  layer, per relation or in total; the same (seed, epoch, rank, step) gives the same block;
* epoch batches: every target exactly once per epoch across ranks;
* single process: full-fanout mini-batch training (union of the ranks' batches) equals full-graph training with
  the same batches, step for step;
* gloo, 2 processes: DDP mini-batch training equals single-process full-neighbour mini-batch training step for
  step, and with small fanouts equals the per-rank single-process oracle (float64, 1e-10)."""
import pytest
import torch
import torch.distributed as dist

from pigeon.distributed.launch import spawn
from pigeon.distributed.partition import _subgraph, assign_targets
from pigeon.distributed.sampling import NeighborSampler, SamplerError, epoch_batches, num_steps
from pigeon.graph import synthetic_graph, tiny_graph


def _graphs():
    return [tiny_graph(), synthetic_graph(120, 700, 3, num_ntypes=2, seed=4)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_full_fanout_block_is_the_exact_k_hop_subgraph(k):
    for i, g in enumerate(_graphs()):
        t = torch.randperm(g.num_nodes, generator=torch.Generator().manual_seed(k + 10 * i))[:9]
        blk = NeighborSampler(g, [None] * k, seed=1).sample(t, epoch=2, rank=1, step=3)
        ref = _subgraph(g, 0, 1, t, k)
        for a in ("src", "dst", "etype", "ntype"):
            assert torch.equal(getattr(blk.graph, a), getattr(ref.graph, a)), (k, g.name, a)
        assert torch.equal(blk.local_to_global, ref.local_to_global) and blk.pad == ref.pad
        assert torch.equal(blk.targets_global, t) and torch.equal(blk.targets_local, torch.arange(9))
        assert (blk.graph.num_etypes, blk.graph.num_ntypes) == (g.num_etypes, g.num_ntypes)


def _fan_in(blk, nodes_mask, per_relation, R):
    d = blk.graph.dst[nodes_mask[blk.graph.dst]]
    if per_relation:
        e = blk.graph.etype[nodes_mask[blk.graph.dst]]
        return torch.bincount(d * R + e, minlength=blk.graph.num_nodes * R)
    return torch.bincount(d, minlength=blk.graph.num_nodes)


@pytest.mark.parametrize("per_relation", [True, False])
def test_small_fanouts_sample_graph_edges_within_the_fanout(per_relation):
    g = synthetic_graph(120, 700, 3, num_ntypes=2, seed=4)
    fanouts = [3, 1, 2]                          # layer 0 (outermost hop) .. layer 2 (the targets)
    s = NeighborSampler(g, fanouts, per_relation=per_relation, seed=7)
    t = torch.arange(0, 120, 11)
    blk = s.sample(t, epoch=0, rank=0, step=0)
    l2g, R = blk.local_to_global, g.num_etypes
    edges = list(zip((l2g[blk.graph.src]).tolist(), (l2g[blk.graph.dst]).tolist(), blk.graph.etype.tolist()))
    count = {}
    for e in zip(g.src.tolist(), g.dst.tolist(), g.etype.tolist()):
        count[e] = count.get(e, 0) + 1
    for e in set(edges):
        assert edges.count(e) <= count.get(e, 0), e           # a graph edge, never more often than it is there
    assert blk.graph.num_edges < NeighborSampler(g, [None] * 3).sample(t).graph.num_edges   # the fanouts cut
    for h in range(4):
        fi = _fan_in(blk, blk.hop == h, per_relation, R)
        lim = fanouts[2 - h] if h < 3 else 0
        assert int(fi.max()) <= lim, (h, int(fi.max()), lim)
    # a node keeps min(fanout, degree) in-edges per relation (per_relation) or in total
    hop0 = blk.hop == 0
    deg = torch.bincount(g.dst * R + g.etype, minlength=g.num_nodes * R).view(g.num_nodes, R) if per_relation \
        else torch.bincount(g.dst, minlength=g.num_nodes)[:, None]
    got = _fan_in(blk, hop0, per_relation, R).view(blk.graph.num_nodes, -1)[:t.numel()]
    assert torch.equal(got, deg[t].clamp(max=fanouts[2]))
    # deterministic per (seed, epoch, rank, step); another rank's draw differs
    again = s.sample(t, epoch=0, rank=0, step=0)
    assert torch.equal(again.graph.src, blk.graph.src) and torch.equal(again.local_to_global, l2g)
    other = [s.sample(t, epoch=0, rank=r, step=0) for r in (1, 2, 3)]
    assert any(o.graph.num_edges != blk.graph.num_edges or not torch.equal(o.graph.src, blk.graph.src)
               for o in other)


def test_per_relation_fanout_list_and_bad_input():
    g = tiny_graph()
    s = NeighborSampler(g, [[2, 1, None, 1]], seed=0)           # one layer, per relation (cites, writes, ...)
    blk = s.sample(torch.arange(24))
    R = g.num_etypes
    fi = torch.bincount(blk.graph.dst * R + blk.graph.etype, minlength=blk.graph.num_nodes * R).view(-1, R)
    assert int(fi[:, 0].max()) <= 2 and int(fi[:, 1].max()) <= 1 and int(fi[:, 3].max()) <= 1
    for fan, msg in (([0], "must be >= 1"), ([-2, 3], "must be >= 1"), ([], "empty"), (3, "one entry per layer"),
                     ([[1, 2]], "lists 2 relations but the graph has 4"), ([1.5], "int >= 1 or None")):
        with pytest.raises(SamplerError, match=msg):
            NeighborSampler(g, fan)
    with pytest.raises(SamplerError, match="twice"):
        s.sample(torch.tensor([1, 1]))
    with pytest.raises(SamplerError, match="out|range"):
        s.sample(torch.tensor([40]))
    with pytest.raises(SamplerError, match="batch_size"):
        epoch_batches(torch.arange(4), 0, seed=0, epoch=0, rank=0)


@pytest.mark.parametrize("world,method", [(2, "contiguous"), (3, "hash")])
def test_every_target_once_per_epoch_across_ranks(world, method):
    targets = torch.arange(5, 77, 2)
    owned = assign_targets(targets, world, method)
    for epoch in range(3):
        per = [epoch_batches(o, 4, seed=9, epoch=epoch, rank=r) for r, o in enumerate(owned)]
        seen = torch.cat([b for bs in per for b in bs])
        assert sorted(seen.tolist()) == targets.tolist()
        assert all(len(b) <= 4 for bs in per for b in bs)
        assert max(len(bs) for bs in per) == num_steps([o.numel() for o in owned], 4)
        again = [epoch_batches(o, 4, seed=9, epoch=epoch, rank=r) for r, o in enumerate(owned)]
        assert all(torch.equal(a, b) for x, y in zip(per, again) for a, b in zip(x, y))
    assert not torch.equal(epoch_batches(owned[0], 99, seed=9, epoch=0, rank=0)[0],
                           epoch_batches(owned[0], 99, seed=9, epoch=1, rank=0)[0])


def test_full_fanout_minibatch_training_equals_full_graph_training():
    """Single process: the union-of-batches block with full fanouts gives full-graph training's steps."""
    from pigeon.distributed.ddp import build_model, demo_problem
    from pigeon.distributed.minibatch import _schedule, reference_minibatch_train
    g, x, labels, targets = demo_problem(0)
    kw = dict(fanouts=[None, None], batch_size=5, lr=0.5, seed=3, epochs=2)
    hist = reference_minibatch_train(g, x, labels, targets, world=2, mode="union", **kw)
    model = build_model(g, x.shape[1], seed=3, num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    owned = assign_targets(targets, 2)
    i = 0
    for epoch in range(2):
        steps, per, _ = _schedule(owned, 5, 3, epoch)
        for step in range(steps):
            batch = torch.cat([b[step] for b in per if step < len(b)])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x)[batch], labels[batch]).backward()
            opt.step()
            for li, layer in enumerate(model.layers):
                for name, p in layer.weights.items():
                    torch.testing.assert_close(hist[i][f"weights.{li}.{name}"], p.detach(), rtol=0, atol=1e-12)
            i += 1
    assert i == len(hist) == 6


def _ddp_rank():
    from pigeon.distributed.ddp import demo_problem, init_from_env
    from pigeon.distributed.minibatch import reference_minibatch_train, train_minibatch
    init_from_env("gloo", timeout_s=60)
    try:
        rank = dist.get_rank()
        g, x, labels, targets = demo_problem(0)
        for fanouts, mode in (([None, None], "union"), ([2, 1], "per_rank")):
            kw = dict(fanouts=fanouts, batch_size=5, lr=0.5, seed=3, epochs=2)
            hist = train_minibatch(g, x, labels, targets, **kw)
            ref = reference_minibatch_train(g, x, labels, targets, world=2, mode=mode, **kw)
            assert len(hist) == len(ref) == 6            # 12 targets per rank, batches of 5: 3 steps an epoch
            for step, (h, r) in enumerate(zip(hist, ref)):
                for key in r:
                    torch.testing.assert_close(h[key], r[key], rtol=0, atol=1e-10,
                                               msg=lambda m: f"rank {rank} {fanouts} step {step} {key}: {m}")
            assert max(float((ref[-1][k] - ref[0][k]).abs().max()) for k in ref[0]) > 1e-3
        # uneven shares: 17 targets -> 8 and 9, batches of 4: rank 0 takes an empty third step
        kw = dict(fanouts=[None, 2], batch_size=4, lr=0.5, seed=5, epochs=1)
        hist = train_minibatch(g, x, labels, targets[:17], **kw)
        ref = reference_minibatch_train(g, x, labels, targets[:17], world=2, mode="per_rank", **kw)
        assert len(hist) == len(ref) == 3
        for h, r in zip(hist, ref):
            for key in r:
                torch.testing.assert_close(h[key], r[key], rtol=0, atol=1e-10)
    finally:
        dist.destroy_process_group()


def test_ddp_minibatch_training_equals_single_process():
    spawn(_ddp_rank, 2, start_method="fork")
