"""pigeon.distributed.partition: every target owned by exactly one rank; each rank's subgraph holds every edge
into its k-hop in-neighbourhood; a model run on a rank's subgraph gives the full graph's outputs at the rank's
targets (reference backend, float64).  Seeded random graphs (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pigeon.distributed import assign_targets, halo_sets, partition
from pigeon.distributed.ddp import build_model
from pigeon.graph import synthetic_graph, tiny_graph


def _graph(seed, n, e):
    return synthetic_graph(n, e, 3, num_ntypes=2, seed=seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30), e=st.integers(1, 60), world=st.integers(1, 5),
       k=st.integers(0, 3), method=st.sampled_from(["contiguous", "hash"]), frac=st.floats(0.1, 1.0))
def test_partition_covers_targets_and_k_hop_edges(seed, n, e, world, k, method, frac):
    g = _graph(seed, n, e)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randperm(n, generator=gen)[:max(1, int(frac * n))]
    parts = partition(g, world, k, targets, method)
    owners = torch.cat([p.targets_global for p in parts])
    assert sorted(owners.tolist()) == sorted(targets.tolist())          # each target exactly once
    if method == "contiguous":
        sizes = [p.num_targets for p in parts]
        assert max(sizes) - min(sizes) <= 1
    full_edges = {(int(s), int(d), int(r)) for s, d, r in zip(g.src, g.dst, g.etype)}
    for p in parts:
        l2g = p.local_to_global
        assert torch.equal(l2g[p.targets_local], p.targets_global)
        assert p.graph.num_etypes == g.num_etypes and p.graph.num_ntypes == g.num_ntypes
        real = l2g >= 0
        assert torch.equal(p.graph.ntype[real], g.ntype[l2g[real]])
        sub = [(int(l2g[s]), int(l2g[d]), int(r)) for s, d, r in zip(p.graph.src, p.graph.dst, p.graph.etype)]
        if p.pad:
            assert sub == [(-1, -1, 0)]
            sub = []
        # every edge of the subgraph is a full-graph edge (as a multiset: the same count)
        need = torch.zeros(g.num_nodes, dtype=torch.bool) if k == 0 else halo_sets(g, p.targets_global, k)[k - 1]
        want = sorted((int(s), int(d), int(r)) for s, d, r in zip(g.src, g.dst, g.etype) if need[d])
        assert sorted(sub) == want
        assert set(sub) <= full_edges


@pytest.mark.parametrize("model", ["rgat", "rgcn"])
@pytest.mark.parametrize("world,method", [(3, "contiguous"), (4, "hash")])
def test_subgraph_model_equals_full_graph_at_targets(model, world, method):
    for seed, g in ((0, tiny_graph()), (1, _graph(7, 25, 70))):
        k = 2
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(g.num_nodes, 4, generator=gen, dtype=torch.float64)
        targets = torch.arange(0, g.num_nodes, 2)
        full = build_model(g, 4, num_layers=k, model=model, seed=seed)(x)
        for p in partition(g, world, k, targets, method):
            sub = build_model(p.graph, 4, num_layers=k, model=model, seed=seed)(p.gather_features(x))
            torch.testing.assert_close(sub[p.targets_local], full[p.targets_global], rtol=0, atol=1e-12)


def test_assign_targets_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world"):
        assign_targets(torch.arange(4), 0)
    with pytest.raises(ValueError, match="method"):
        assign_targets(torch.arange(4), 2, "random")
