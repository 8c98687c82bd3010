"""The graph layout every generated kernel runs on.

Edges are renumbered once, sorted by (edge type, destination, source): each relation is one
contiguous segment (so typed GEMMs need no scatter on edge rows) and a destination's edges of one
relation are adjacent.  CSC/CSR lists point into that order.  All tensors are int32 (kernels index
with 32 bits; graphs past 2^31 edges are refused with a clear error).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

INDEX_LIMIT = 2**31 - 1


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class KernelGraph:
    num_nodes: int
    num_edges: int
    num_etypes: int
    num_ntypes: int
    edge_perm: torch.Tensor      # [E] original edge id of each kernel-order edge (int64)
    src: torch.Tensor            # [E] in kernel order
    dst: torch.Tensor
    etype: torch.Tensor
    etype_ptr: torch.Tensor      # [R+1] segment of each relation
    ntype: torch.Tensor          # [N]
    ntype_perm: torch.Tensor     # [N] nodes sorted by type
    ntype_ptr: torch.Tensor      # [T+1]
    csc_ptr: torch.Tensor        # [N+1] incoming edges of each node ...
    csc_eid: torch.Tensor        # [E]   ... as kernel-order edge ids
    csr_ptr: torch.Tensor        # [N+1] outgoing edges of each node
    csr_eid: torch.Tensor        # [E]
    inv_in_degree_by_etype: torch.Tensor   # [E] float32, kernel order
    inv_in_degree: torch.Tensor            # [N] float32, 0 where no incoming edge
    signature: tuple                       # what a compiled layer checks a graph against

    def to(self, device) -> "KernelGraph":
        kw = {f: (getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor) else getattr(self, f))
              for f in self.__dataclass_fields__}
        return KernelGraph(**kw)

    # derived once per layout (and device): these are read on every call
    @functools.cached_property
    def edge_perm_inverse(self) -> torch.Tensor:
        """[E] kernel-order position of each original edge."""
        inv = torch.empty_like(self.edge_perm)
        inv[self.edge_perm] = torch.arange(self.edge_perm.numel(), device=self.edge_perm.device)
        return inv

    @functools.cached_property
    def all_edges_ptr(self) -> torch.Tensor:
        """[0, E]: one segment holding every edge (untyped GEMMs over edges)."""
        return torch.tensor([0, self.num_edges], dtype=torch.int32, device=self.device)

    @functools.cached_property
    def all_nodes_ptr(self) -> torch.Tensor:
        """[0, N]: one segment holding every node (untyped GEMMs over nodes)."""
        return torch.tensor([0, self.num_nodes], dtype=torch.int32, device=self.device)

    @functools.cached_property
    def in_degree(self) -> torch.Tensor:
        """[N] incoming edges per node (int32)."""
        return self.csc_ptr[1:] - self.csc_ptr[:-1]

    @functools.cached_property
    def out_degree(self) -> torch.Tensor:
        """[N] outgoing edges per node (int32)."""
        return self.csr_ptr[1:] - self.csr_ptr[:-1]

    @functools.cached_property
    def degree_stats(self) -> dict:
        """Degree statistics the schedule choice reads (plain ints and floats)."""
        E, N = self.num_edges, max(self.num_nodes, 1)
        ind, outd = self.in_degree, self.out_degree
        return {"num_nodes": self.num_nodes, "num_edges": E,
                "max_in_degree": int(ind.max()) if ind.numel() else 0,
                "max_out_degree": int(outd.max()) if outd.numel() else 0, "mean_degree": E / N}

    @property
    def device(self) -> torch.device:
        return self.src.device


def _ptr(sorted_keys: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(sorted_keys, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)


def kernel_graph(g) -> KernelGraph:
    """Build the kernel layout of a HeteroGraph (vectorized; no loop over edges or types)."""
    E, N, R, T = g.num_edges, g.num_nodes, g.num_etypes, g.num_ntypes
    if max(E, N) > INDEX_LIMIT:
        raise LayoutError(f"graph has {E} edges / {N} nodes; kernels index with int32 (limit {INDEX_LIMIT})")
    src, dst, et = g.src.long(), g.dst.long(), g.etype.long()
    # lexicographic (etype, dst, src) through stable sorts from the last key to the first
    perm = torch.argsort(src, stable=True)
    perm = perm[torch.argsort(dst[perm], stable=True)]
    perm = perm[torch.argsort(et[perm], stable=True)]
    s, d, t = src[perm], dst[perm], et[perm]
    ids = torch.arange(E, device=perm.device)
    csc = torch.argsort(d, stable=True)          # kernel-order ids grouped by destination
    csr = torch.argsort(s, stable=True)
    deg_rel = torch.bincount(d * R + t, minlength=N * R)[d * R + t].float()
    deg = torch.bincount(d, minlength=N).float()
    nt = g.ntype.long()
    nperm = torch.argsort(nt, stable=True)
    return KernelGraph(
        N, E, R, T, perm, s.int(), d.int(), t.int(), _ptr(t, R), nt.int(), nperm.int(), _ptr(nt, T),
        _ptr(d, N), ids[csc].int(), _ptr(s, N), ids[csr].int(), 1.0 / deg_rel,
        torch.where(deg > 0, 1.0 / deg.clamp(min=1), torch.zeros_like(deg)),
        (N, E, R, T))
