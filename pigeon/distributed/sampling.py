"""Neighbour sampling for mini-batch RGNN training: the sampled k-hop block of a batch of target nodes.

``NeighborSampler(graph, fanouts, per_relation=True, seed=0)`` builds, for a batch of target nodes, one
:class:`Block`: a :class:`~pigeon.graph.HeteroGraph` over local ids that a k-layer pigeon model (compiled for
any graph with the same relation / node-type counts) runs on, plus ``local_to_global`` and the targets' local
ids.  Only the host-side graph structure (its CSC, built once) is needed for the whole graph; the model sees
blocks, whose size is bounded by the fanouts, not by the graph.

**Fanouts.**  ``fanouts[i]`` is the fan-in of layer ``i`` (layer 0 reads the input features; DGL's
convention), so the targets' in-edges are sampled with ``fanouts[-1]``.  Each entry is

* ``None``: the full in-neighbourhood;
* an int ``f >= 1``: with ``per_relation=True`` at most ``f`` in-edges per (node, relation), else at most
  ``f`` in-edges per node in total;
* a sequence of ``num_etypes`` entries (int >= 1 or None): per-relation fanouts for that layer.

Sampling is uniform without replacement among a node's in-edges (of the relation); a node with fewer keeps all.

**One graph, one sample per node.**  pigeon layers are bound to one graph, so a block is a single graph, not
DGL's per-layer message-flow graphs: the nodes first reached at hop ``h`` (targets: hop 0) get their in-edges
sampled once, with the fanout of layer ``k-1-h``, and every layer uses that sample; the sources not yet in the
block form hop ``h+1``.  Nodes of hop ``k`` get no in-edges (they only contribute input features).  With every
fanout ``None`` the block is exactly :func:`~pigeon.distributed.partition.partition`'s k-hop subgraph of the
batch (the same local ids and edge order): targets first (in the batch's order), then the other nodes by
increasing global id; edges in increasing global edge id.

**Determinism.**  The random draws of a block come from a generator seeded by ``(seed, epoch, rank, step)``
(mixed by splitmix64), so a block depends only on those and the batch; :func:`epoch_batches` cuts a rank's
targets into batches by a permutation seeded by ``(seed, epoch, rank)``.  Every target node is in exactly one
batch of one rank per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import HeteroGraph
from .partition import local_graph

__all__ = ["Block", "NeighborSampler", "SamplerError", "epoch_batches", "num_steps", "mix_seed"]

_MASK64 = (1 << 64) - 1
_NONE = 1 << 62            # "no limit" as a fanout


class SamplerError(ValueError):
    """A bad sampler argument (fanouts, targets, batch size)."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each part in turn): distinct tuples give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x >> 1


@dataclass(frozen=True)
class Block:
    """A sampled k-hop block: ``graph`` over local ids, ``local_to_global`` (int64 [n_local], -1 for the pad
    node), the targets (local ids ``0..T-1`` and their global ids), and ``hop`` (int64 [n_local]: the hop at
    which each node was reached, 0 for targets, -1 for the pad node)."""
    graph: HeteroGraph
    local_to_global: torch.Tensor
    targets_local: torch.Tensor
    targets_global: torch.Tensor
    hop: torch.Tensor
    num_hops: int
    pad: bool = False                # an extra pad node (last local id) with a self-loop: the graph needs an edge

    @property
    def num_targets(self) -> int:
        return int(self.targets_global.numel())

    def gather_features(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the global feature matrix ``x`` for the block's nodes (the pad node gets zeros)."""
        from .partition import gather_rows
        return gather_rows(x, self.local_to_global, self.pad)


def _check_fanout(f, num_etypes: int, layer: int):
    """A fanout entry -> int64 [num_etypes] limits (``_NONE``: no limit), or an int for a total limit."""
    def one(v, where):
        if v is None:
            return _NONE
        if isinstance(v, bool) or not isinstance(v, int):
            raise SamplerError(f"fanout of layer {layer}{where} must be an int >= 1 or None (all), got {v!r}")
        if v < 1:
            raise SamplerError(f"fanout of layer {layer}{where} must be >= 1 (None: the full neighbourhood), got {v}")
        return v
    if not isinstance(f, (list, tuple)):
        return one(f, "")
    if len(f) != num_etypes:
        raise SamplerError(f"fanout of layer {layer} lists {len(f)} relations but the graph has {num_etypes}")
    return torch.tensor([one(v, f" (relation {r})") for r, v in enumerate(f)], dtype=torch.int64)


class NeighborSampler:
    """Samples the k-hop block of a batch of targets (module docstring); ``k = len(fanouts)``."""

    def __init__(self, graph: HeteroGraph, fanouts, *, per_relation: bool = True, seed: int = 0):
        if not isinstance(graph, HeteroGraph):
            raise SamplerError(f"NeighborSampler takes a HeteroGraph, got {type(graph).__name__}")
        fanouts = list(fanouts) if not isinstance(fanouts, (int, type(None))) else None
        if fanouts is None:
            raise SamplerError("fanouts must be a list with one entry per layer (int >= 1, None, or per relation)")
        if not fanouts:
            raise SamplerError("fanouts is empty: give one entry per layer")
        self.graph = graph.to("cpu")
        self.num_hops = len(fanouts)
        self.per_relation = bool(per_relation)
        self.seed = int(seed)
        R = graph.num_etypes
        self.limits = []                 # per layer: ("rel", int64 [R]) or ("total", int)
        for i, f in enumerate(fanouts):
            lim = _check_fanout(f, R, i)
            if isinstance(lim, torch.Tensor):
                self.limits.append(("rel", lim))
            elif self.per_relation:
                self.limits.append(("rel", torch.full((R,), lim, dtype=torch.int64)))
            else:
                self.limits.append(("total", lim))
        self.fanouts = tuple(fanouts)
        self.csc = self.graph.csc()      # in-edges of each node, sorted by (etype, src, edge id)

    def _full(self, layer: int) -> bool:
        kind, lim = self.limits[layer]
        return bool((lim >= _NONE).all()) if kind == "rel" else lim >= _NONE

    def _in_edges(self, nodes: torch.Tensor):
        """(segment index into ``nodes``, global edge id, etype) of every in-edge of ``nodes``."""
        ptr = self.csc.row_ptr
        start, counts = ptr[nodes], ptr[nodes + 1] - ptr[nodes]
        total = int(counts.sum())
        seg = torch.repeat_interleave(torch.arange(nodes.numel()), counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts
        pos = start[seg] + torch.arange(total) - first[seg]
        return seg, self.csc.eid[pos], self.csc.etype[pos]

    def _sample(self, nodes: torch.Tensor, layer: int, gen: torch.Generator) -> torch.Tensor:
        """Global ids of the sampled in-edges of ``nodes`` with layer ``layer``'s fanout."""
        seg, eid, et = self._in_edges(nodes)
        if eid.numel() == 0 or self._full(layer):
            return eid
        kind, lim = self.limits[layer]
        key = seg * self.graph.num_etypes + et if kind == "rel" else seg
        cap = lim[et] if kind == "rel" else torch.full_like(eid, lim)
        order = torch.argsort(torch.rand(eid.numel(), generator=gen, dtype=torch.float64))
        order = order[torch.sort(key[order], stable=True).indices]       # by segment, random within one
        ks = key[order]
        new = torch.ones_like(ks, dtype=torch.bool)
        new[1:] = ks[1:] != ks[:-1]
        starts = torch.cummax(torch.where(new, torch.arange(ks.numel()), 0), 0).values
        rank_in_seg = torch.arange(ks.numel()) - starts
        return eid[order[rank_in_seg < cap[order]]]

    def sample(self, targets, *, epoch: int = 0, rank: int = 0, step: int = 0) -> Block:
        """The block of ``targets`` (distinct global ids; local ids follow their order)."""
        t = torch.as_tensor(targets, dtype=torch.int64).flatten().cpu()
        g = self.graph
        if t.numel() == 0:
            raise SamplerError("sample: the batch has no target nodes")
        if int(t.min()) < 0 or int(t.max()) >= g.num_nodes:
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise SamplerError(f"sample: target id {bad} is out of range [0, {g.num_nodes})")
        if torch.unique(t).numel() != t.numel():
            raise SamplerError("sample: the batch lists a target node twice")
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, rank, step))
        k = self.num_hops
        visited = torch.sort(t).values
        frontier, hops, edges = t, [t], []
        for h in range(k):
            eids = self._sample(frontier, k - 1 - h, gen)
            edges.append(eids)
            src = torch.unique(g.src[eids])
            frontier = src[~torch.isin(src, visited)]
            hops.append(frontier)
            visited = torch.sort(torch.cat([visited, frontier])).values
        eids = torch.sort(torch.cat(edges)).values
        halo_cat = torch.cat(hops[1:]) if k else t[:0]
        halo_hop = torch.cat([torch.full((h.numel(),), i, dtype=torch.int64) for i, h in enumerate(hops)][1:]
                             + [t[:0]])
        halo, order = torch.sort(halo_cat)
        l2g = torch.cat([t, halo])
        hop = torch.cat([torch.zeros(t.numel(), dtype=torch.int64), halo_hop[order]])
        sorted_ids, perm = torch.sort(l2g)
        to_local = lambda v: perm[torch.searchsorted(sorted_ids, v)]          # noqa: E731
        sub, l2g, pad = local_graph(g, to_local(g.src[eids]), to_local(g.dst[eids]), g.etype[eids], l2g,
                                    f"{g.name}[block of {t.numel()}, {k} hops]")
        if pad:
            hop = torch.cat([hop, torch.tensor([-1])])
        return Block(sub, l2g, torch.arange(t.numel()), t, hop, k, pad)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SamplerError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def epoch_batches(owned: torch.Tensor, batch_size: int, *, seed: int, epoch: int, rank: int) -> list[torch.Tensor]:
    """A rank's batches of one epoch: its targets ``owned`` in an order seeded by ``(seed, epoch, rank)``, cut
    into runs of ``batch_size`` (the last may be shorter); each target in exactly one batch."""
    _check_batch_size(batch_size)
    owned = torch.as_tensor(owned, dtype=torch.int64).flatten()
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch, rank, -1))
    perm = owned[torch.randperm(owned.numel(), generator=gen)]
    return list(perm.split(batch_size)) if perm.numel() else []


def num_steps(sizes: list[int], batch_size: int) -> int:
    """Steps of an epoch when every rank steps together: the most batches any rank has (ranks with fewer take
    empty steps, still joining the gradient all-reduce)."""
    _check_batch_size(batch_size)
    return max((-(-s // batch_size) for s in sizes), default=0)
