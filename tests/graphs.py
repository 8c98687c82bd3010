"""Random heterographs for tests: the corner cases every layer must survive."""
import torch

from pigeon.graph import HeteroGraph


def random_graph(seed, num_nodes=30, num_edges=120, num_etypes=4, num_ntypes=2, empty_etype=True):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    # skew: half the edges go to a few hub destinations
    dst = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst[: num_edges // 2] = torch.randint(0, 3, (num_edges // 2,), generator=gen)
    etype = torch.randint(0, num_etypes - (1 if empty_etype else 0), (num_edges,), generator=gen)
    src[0], dst[0] = 5, 5                       # a self-loop
    keep = (src != num_nodes - 1) & (dst != num_nodes - 1)   # an isolated node
    ntype = torch.randint(0, num_ntypes, (num_nodes,), generator=gen)
    return HeteroGraph(src[keep], dst[keep], etype[keep], num_nodes=num_nodes, ntype=ntype,
                       num_etypes=num_etypes, num_ntypes=num_ntypes)


def single_edge_graph():
    return HeteroGraph(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), num_nodes=3,
                       ntype=torch.tensor([0, 1, 0]), num_etypes=2, num_ntypes=2)


CASES = {
    "random": lambda seed: random_graph(seed),
    "dense_small": lambda seed: random_graph(seed, num_nodes=6, num_edges=40, num_etypes=3, empty_etype=False),
    "single_edge": lambda seed: single_edge_graph(),
}
