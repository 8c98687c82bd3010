"""The peers pigeon's layers are timed against, built on the same graph and inputs.

A :class:`Peer` is a name, a kind (``pyg``, ``reference`` or ``compile``, what ``--peers``
selects) and a ``build()`` that returns a ``torch.nn.Module`` taking the node features ``x`` and
returning one tensor.  A peer that cannot be expressed on a graph carries ``na`` (the reason)
instead of a builder.

- PyG as installed: ``RGCNConv`` and ``FastRGCNConv`` (rgcn), ``RGATConv`` (rgat), ``HGTConv``
  (hgt, on the dict form of the graph: one PyG node type per node type, one PyG edge type per
  (source type, relation, destination type) triple that has edges).
- pigeon's reference interpreter (``backend="reference"``): plain torch ops with a loop over
  relations for the typed linears, the style of DGL's examples.
- ``torch.compile`` of that reference module (``dynamic=False``, after one eager call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import pigeon as pg
from pigeon.models import MODELS

__all__ = ["Peer", "PygRelational", "PygHGT", "pyg_peers", "reference_peer", "compile_peer", "peers_for",
           "PEER_KINDS", "REFERENCE", "COMPILED"]

PEER_KINDS = ("pyg", "reference", "compile")
REFERENCE = "reference (per-relation torch)"
COMPILED = "torch.compile(reference)"


@dataclass
class Peer:
    name: str
    kind: str                                   # one of PEER_KINDS
    build: Callable[[], torch.nn.Module] | None = None
    na: str | None = None                       # why this peer cannot run on this graph
    note: str | None = None


class PygRelational(torch.nn.Module):
    """A PyG relational conv called as ``conv(x, edge_index, edge_type)`` on one graph."""

    def __init__(self, conv: torch.nn.Module, graph):
        super().__init__()
        self.conv = conv
        self.edge_index = torch.stack([graph.src, graph.dst])
        self.edge_type = graph.etype

    def forward(self, x):
        return self.conv(x, self.edge_index, self.edge_type)


def hetero_dicts(graph):
    """The dict form of a HeteroGraph for PyG's hetero convs: node index per node type (global ids
    of that type's nodes, in id order), and edge_index per (src type, relation, dst type) in the
    node types' local ids.  Keys are ``n<t>`` and ``r<r>`` (raw names may hold dots, which PyG's
    module dicts refuse); a relation whose edges join several (src, dst) type pairs is split into
    one PyG edge type per pair (``r<r>_<s>_<d>``).  Returns (node_index, edge_index_dict, note)."""
    T, R = graph.num_ntypes, graph.num_etypes
    ntype = graph.ntype
    counts = torch.bincount(ntype, minlength=T)
    order = torch.sort(ntype, stable=True).indices                 # global ids grouped by type
    local = torch.empty_like(ntype)
    starts = torch.cumsum(counts, 0) - counts
    local[order] = torch.arange(ntype.numel(), device=ntype.device) - torch.repeat_interleave(starts, counts)
    node_index = {f"n{t}": order[int(starts[t]):int(starts[t]) + int(counts[t])] for t in range(T) if counts[t] > 0}
    st, dt = ntype[graph.src], ntype[graph.dst]
    key = (graph.etype * T + st) * T + dt
    keys, inv, per_key = torch.unique(key, return_inverse=True, return_counts=True)
    perm = torch.sort(inv, stable=True).indices
    src_l, dst_l = local[graph.src][perm], local[graph.dst][perm]
    rel_of = (keys // (T * T)).tolist()
    pairs_per_rel = {}
    for r in rel_of:
        pairs_per_rel[r] = pairs_per_rel.get(r, 0) + 1
    edge_index, start = {}, 0
    for k, n in zip(keys.tolist(), per_key.tolist()):
        r, s, d = k // (T * T), (k // T) % T, k % T
        rel = f"r{r}" if pairs_per_rel[r] == 1 else f"r{r}_{s}_{d}"
        edge_index[(f"n{s}", rel, f"n{d}")] = torch.stack([src_l[start:start + n], dst_l[start:start + n]])
        start += n
    split = sum(1 for v in pairs_per_rel.values() if v > 1)
    note = (f"{len(edge_index)} PyG edge types" + (f" ({split} relations split by endpoint types)" if split else "")
            + (f"; {R - len(pairs_per_rel)} empty relations left out" if len(pairs_per_rel) < R else ""))
    return node_index, edge_index, note


class PygHGT(torch.nn.Module):
    """PyG's HGTConv on the dict form of the graph. ``forward(x)`` splits ``x`` by node type and
    returns the outputs of the node types that receive messages, concatenated in type order."""

    def __init__(self, graph, dim: int, heads: int):
        super().__init__()
        from torch_geometric.nn import HGTConv
        self.node_index, self.edge_index, self.note = hetero_dicts(graph)
        self.ntypes = list(self.node_index)
        self.conv = HGTConv(dim, dim, (self.ntypes, list(self.edge_index)), heads=heads)

    def forward(self, x):
        xs = {t: x.index_select(0, idx) for t, idx in self.node_index.items()}
        out = self.conv(xs, self.edge_index)
        return torch.cat([out[t] for t in self.ntypes if out.get(t) is not None])


def _pyg():
    try:
        import torch_geometric.nn as gnn
        return gnn, None
    except Exception as e:  # ImportError, or a broken install (a missing compiled extension)
        return None, f"torch_geometric not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def pyg_peers(model: str, graph, dim: int, hp: dict, device, dtype) -> list[Peer]:
    """PyG's convs for ``model`` on ``graph`` (on ``device``), as modules in ``dtype``."""
    gnn, why = _pyg()
    names = {"rgcn": ["RGCNConv", "FastRGCNConv"], "rgat": ["RGATConv"], "hgt": ["HGTConv"]}[model]
    if gnn is None:
        return [Peer(f"PyG {n}", "pyg", na=why) for n in names]
    R = graph.num_etypes

    def place(m):
        return m.to(device=device, dtype=dtype)

    if model == "rgcn":
        return [Peer(f"PyG {n}", "pyg", build=lambda c=getattr(gnn, n):
                     place(PygRelational(c(dim, hp["out_dim"], R, aggr="mean"), graph))) for n in names]
    if model == "rgat":
        return [Peer("PyG RGATConv", "pyg", build=lambda: place(
            PygRelational(gnn.RGATConv(dim, hp["out_dim"], R, heads=hp["heads"]), graph)))]
    try:
        _, _, note = hetero_dicts(graph)
    except Exception as e:
        return [Peer("PyG HGTConv", "pyg", na=f"no dict form of the graph ({type(e).__name__}: {e})")]
    return [Peer("PyG HGTConv", "pyg", build=lambda: place(PygHGT(graph, dim, hp["heads"])), note=note)]


def reference_peer(model: str, graph, dim: int, hp: dict, device, dtype: str) -> Peer:
    """pigeon's reference interpreter in ``dtype`` (weights seeded like pigeon's layer)."""
    return Peer(REFERENCE, "reference",
                build=lambda: pg.compile(MODELS[model], graph, dim, backend="reference", dtype=dtype, **hp).to(device))


def compile_peer(model: str, graph, dim: int, hp: dict, device, dtype: str) -> Peer:
    """torch.compile of the reference module. One eager call first (it fills the module's per-device
    graph cache, which would otherwise fail a guard and recompile), then ``dynamic=False``."""
    ref = reference_peer(model, graph, dim, hp, device, dtype)

    def build():
        module = ref.build()
        x = torch.zeros(graph.num_nodes, dim, device=device, dtype=getattr(torch, dtype))
        with torch.no_grad():
            module(x)
        torch._dynamo.reset()
        return torch.compile(module, dynamic=False)

    return Peer(COMPILED, "compile", build=build,
                note="compile time is the first call's; the reference interpreter walks its IR in Python, "
                     "so dynamo compiles it in several graphs")


def peers_for(model: str, graph, dim: int, hp: dict, device, dtype: str, kinds) -> list[Peer]:
    """The selected peers (``kinds`` among PEER_KINDS) for one case."""
    tdt = getattr(torch, dtype)
    out = []
    if "pyg" in kinds:
        out += pyg_peers(model, graph, dim, hp, device, tdt)
    if "reference" in kinds:
        out.append(reference_peer(model, graph, dim, hp, device, dtype))
    if "compile" in kinds:
        out.append(compile_peer(model, graph, dim, hp, device, dtype))
    return out
