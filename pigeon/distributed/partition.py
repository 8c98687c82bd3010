"""Partition an RGNN's target nodes across ranks, and the k-hop in-neighbourhood subgraph each rank needs.

``assign_targets(targets, world, method)`` gives every target node exactly one owner:

* ``"contiguous"``: the sorted target list cut into ``world`` consecutive runs whose sizes differ by at most one
  (rank r owns positions ``[r*T//W, (r+1)*T//W)``);
* ``"hash"``: node v goes to rank ``(v * 2654435761 mod 2**32) mod world`` (Knuth's multiplicative hash: the
  owner of a node does not depend on which other nodes are targets).

``partition(graph, world, k, targets=None, method=...)`` returns one :class:`Partition` per rank: a
:class:`~pigeon.graph.HeteroGraph` over local node ids, ``local_to_global`` (int64 [n_local]), and the rank's
targets as local ids.  For a k-layer model (each layer reads only in-edges: edge_softmax / aggregate over a
node's incoming edges), the nodes whose layer-j outputs are needed are the targets' (k-j)-hop
in-neighbourhoods ``H_0 = targets``, ``H_{i+1} = H_i + in-neighbours(H_i)``; the subgraph keeps every edge whose
destination is in ``H_{k-1}`` (so each node that must be right at some layer has its full in-edge set: softmax
denominators, per-relation in-degrees, sums), and its nodes are ``H_k`` (sources of those edges included).
Nodes of ``H_k - H_{k-1}`` (the outermost halo) only contribute their input features; their own outputs are not
exact and are not used.  Local ids: targets first (in the order of ``targets_global``), then the halo nodes in
increasing global id.  Relation and node-type counts and names are kept, so a model compiled on the subgraph
has the same weight shapes as on the full graph.

HeteroGraph needs at least one edge: a rank whose subgraph has none gets one extra local *pad* node (not a
target, ``local_to_global = -1``) with a self-loop of relation 0 and node type 0; the pad node's edge only
reaches the pad node, so no real node's output changes (``Partition.pad``).  Feed it any feature row (zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import HeteroGraph

__all__ = ["Partition", "assign_targets", "gather_rows", "halo_sets", "partition", "METHODS"]

METHODS = ("contiguous", "hash")


@dataclass(frozen=True)
class Partition:
    rank: int
    world: int
    graph: HeteroGraph               # over local ids 0..n_local-1
    local_to_global: torch.Tensor    # int64 [n_local]; -1 for the pad node
    targets_local: torch.Tensor      # int64 [n_targets]: local ids of this rank's targets (0..n_targets-1)
    targets_global: torch.Tensor     # int64 [n_targets]
    num_hops: int
    pad: bool = False                # an extra pad node (last local id) was added to have an edge

    @property
    def num_targets(self) -> int:
        return int(self.targets_global.numel())

    def gather_features(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the global feature matrix ``x`` for this rank's local nodes (the pad node gets zeros)."""
        return gather_rows(x, self.local_to_global, self.pad)


def gather_rows(x: torch.Tensor, local_to_global: torch.Tensor, pad: bool) -> torch.Tensor:
    """``x[local_to_global]``, with a zero row for the pad node (the last local id) when ``pad``."""
    if not pad:
        return x[local_to_global.to(x.device)]
    real = x[local_to_global[:-1].to(x.device)]
    return torch.cat([real, real.new_zeros((1,) + tuple(x.shape[1:]))], 0)


def assign_targets(targets: torch.Tensor, world: int, method: str = "contiguous") -> list[torch.Tensor]:
    """The targets each rank owns (a list of ``world`` int64 tensors, each sorted; together a partition)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; known: {METHODS}")
    t = torch.unique(torch.as_tensor(targets, dtype=torch.int64))      # sorted, no duplicates
    if method == "contiguous":
        n = t.numel()
        return [t[r * n // world:(r + 1) * n // world] for r in range(world)]
    owner = (t * 2654435761) % 4294967296 % world
    return [t[owner == r] for r in range(world)]


def halo_sets(graph: HeteroGraph, targets: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``[H_0, ..., H_k]`` as bool masks over the graph's nodes (H_0 = targets, H_{i+1} = H_i + in-neighbours)."""
    if k < 0:
        raise ValueError(f"num_hops must be >= 0, got {k}")
    h = torch.zeros(graph.num_nodes, dtype=torch.bool)
    h[targets] = True
    out = [h]
    for _ in range(k):
        nxt = h.clone()
        nxt[graph.src[h[graph.dst]]] = True
        out.append(nxt)
        h = nxt
    return out


def _subgraph(graph: HeteroGraph, rank: int, world: int, targets: torch.Tensor, k: int) -> Partition:
    hs = halo_sets(graph, targets, k)
    inner = hs[k - 1] if k >= 1 else hs[0]
    keep_edge = inner[graph.dst] if k >= 1 else torch.zeros(graph.num_edges, dtype=torch.bool)
    nodes = hs[k].clone()
    nodes[targets] = False
    halo = nodes.nonzero().flatten()
    l2g = torch.cat([targets, halo])
    g2l = torch.full((graph.num_nodes,), -1, dtype=torch.int64)
    g2l[l2g] = torch.arange(l2g.numel())
    sub, l2g, pad = local_graph(graph, g2l[graph.src[keep_edge]], g2l[graph.dst[keep_edge]], graph.etype[keep_edge],
                                l2g, f"{graph.name}[rank {rank}/{world}, {k} hops]")
    return Partition(rank, world, sub, l2g, torch.arange(targets.numel()), targets, k, pad)


def local_graph(graph: HeteroGraph, src, dst, et, l2g: torch.Tensor, name: str):
    """``(subgraph, l2g, padded)``: the edges ``src -> dst`` (local ids) of types ``et`` over the nodes
    ``l2g`` (global ids) of ``graph``.  A subgraph without edges gets one self-loop on an extra node
    (global id -1; ``padded`` True), since a compiled layer needs a graph with an edge."""
    ntype = graph.ntype[l2g]
    pad = src.numel() == 0
    if pad:
        p = l2g.numel()
        src = dst = torch.tensor([p])
        et = torch.tensor([0])
        ntype = torch.cat([ntype, torch.tensor([0])])
        l2g = torch.cat([l2g, torch.tensor([-1])])
    sub = HeteroGraph(src, dst, et, num_nodes=l2g.numel(), ntype=ntype, num_etypes=graph.num_etypes,
                      num_ntypes=graph.num_ntypes, etype_names=graph.etype_names, ntype_names=graph.ntype_names,
                      name=name)
    return sub, l2g, pad


def partition(graph: HeteroGraph, world: int, num_hops: int, targets=None, method: str = "contiguous",
              rank: int | None = None) -> list[Partition] | Partition:
    """Every rank's :class:`Partition` (or only ``rank``'s); ``targets`` default: every node."""
    if targets is None:
        targets = torch.arange(graph.num_nodes)
    owned = assign_targets(targets.cpu() if isinstance(targets, torch.Tensor) else targets, world, method)
    g = graph.to("cpu")
    if rank is not None:
        return _subgraph(g, rank, world, owned[rank], num_hops)
    return [_subgraph(g, r, world, owned[r], num_hops) for r in range(world)]
