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
    def all_etypes_ptr(self) -> torch.Tensor:
        """[0, R]: one segment holding every edge type (linears on per-type rows)."""
        return torch.tensor([0, self.num_etypes], dtype=torch.int32, device=self.device)

    @functools.cached_property
    def all_ntypes_ptr(self) -> torch.Tensor:
        """[0, T]: one segment holding every node type."""
        return torch.tensor([0, self.num_ntypes], dtype=torch.int32, device=self.device)

    # the ends of each edge in CSC / CSR position order: an edge-chunk aggregate walks positions and
    # reads its key and the other end at the position itself, not through the edge id (one dependent
    # load per member fewer; pigeon/codegen/traversal.py POSITION_ARRAYS)
    @functools.cached_property
    def csc_src(self) -> torch.Tensor:
        """[E] source of the edge at each CSC position (int32)."""
        return self.src[self.csc_eid.long()]

    @functools.cached_property
    def csc_dst(self) -> torch.Tensor:
        """[E] destination of the edge at each CSC position (int32, non-decreasing)."""
        return self.dst[self.csc_eid.long()]

    @functools.cached_property
    def csr_src(self) -> torch.Tensor:
        """[E] source of the edge at each CSR position (int32, non-decreasing)."""
        return self.src[self.csr_eid.long()]

    @functools.cached_property
    def csr_dst(self) -> torch.Tensor:
        """[E] destination of the edge at each CSR position (int32)."""
        return self.dst[self.csr_eid.long()]

    def chunk_fixups(self, ptr: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What the fix-up of an edge-chunk aggregate over the member list ``ptr`` (e.g. csc_ptr)
        in chunks of ``chunk`` positions writes: ``(rows, slots, chunks)``, the int32 rows whose
        members span two or more chunks (slot: the chunk where they begin, whose scratch row holds
        their sum) or that have no members (slot -1: written as 0), and the number of chunks.
        Computed once per array and chunk (one host read), outside any CUDA-graph capture: a
        program's first call runs uncaptured (pigeon/runtime/replay.py)."""
        memo = self.__dict__.setdefault("_chunk_fixups", {})
        got = memo.get((ptr, chunk))
        if got is None:
            p = getattr(self, ptr).long()
            begin, end = p[:-1], p[1:]
            first, last = begin // chunk, (end - 1) // chunk
            shared = (end > begin) & (last > first)
            rows = (shared | (end == begin)).nonzero().flatten()
            slots = torch.where(shared, first, torch.full_like(first, -1))[rows]
            members = int(p[-1]) if p.numel() else 0
            got = memo[(ptr, chunk)] = (rows.to(torch.int32), slots.to(torch.int32), -(-members // chunk))
        return got

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

    # -- compact rows: one per unique (src, etype) pair, sorted by (etype, src) -------------------
    @functools.cached_property
    def _compact(self) -> dict:
        N = max(self.num_nodes, 1)
        key = self.etype.long() * N + self.src.long()
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        c_etype, c_src = torch.div(uniq, N, rounding_mode="floor"), uniq % N
        U = int(uniq.numel())
        return {"num_compact": U, "compact_src": c_src.int(), "compact_etype": c_etype.int(),
                "compact_etype_ptr": _ptr(c_etype, self.num_etypes), "edge_to_compact": inverse.int(),
                # a compact row's edges (kernel-order ids), and a node's compact rows
                "cmp_ptr": _ptr(inverse, U), "cmp_eid": torch.argsort(inverse, stable=True).int(),
                "csrc_ptr": _ptr(c_src, self.num_nodes), "csrc_id": torch.argsort(c_src, stable=True).int()}

    # -- destination-side compact rows: one per unique (dst, etype) pair, sorted by (etype, dst) -----
    @functools.cached_property
    def _compact_dst(self) -> dict:
        N = max(self.num_nodes, 1)
        key = self.etype.long() * N + self.dst.long()
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        c_etype, c_dst = torch.div(uniq, N, rounding_mode="floor"), uniq % N
        U = int(uniq.numel())
        return {"num_compact_dst": U, "compact_dst_node": c_dst.int(), "compact_dst_etype": c_etype.int(),
                "compact_dst_etype_ptr": _ptr(c_etype, self.num_etypes), "edge_to_compact_dst": inverse.int(),
                # a pair's edges (kernel-order ids), and a node's pairs
                "dcmp_ptr": _ptr(inverse, U), "dcmp_eid": torch.argsort(inverse, stable=True).int(),
                "cdst_ptr": _ptr(c_dst, self.num_nodes), "cdst_id": torch.argsort(c_dst, stable=True).int()}

    @functools.cached_property
    def compact_dst_stats(self) -> dict:
        """Destination-side compact statistics the schedule choice reads (plain ints)."""
        per_row = self.dcmp_ptr[1:] - self.dcmp_ptr[:-1]
        per_node = self.cdst_ptr[1:] - self.cdst_ptr[:-1]
        return {"num_compact_dst": self.num_compact_dst,
                "max_compact_dst_edges": int(per_row.max()) if per_row.numel() else 0,
                "max_node_compact_dsts": int(per_node.max()) if per_node.numel() else 0}

    @functools.cached_property
    def all_compact_dst_ptr(self) -> torch.Tensor:
        """[0, Ud]: one segment holding every destination-side compact row."""
        return torch.tensor([0, self.num_compact_dst], dtype=torch.int32, device=self.device)

    @functools.cached_property
    def compact_stats(self) -> dict:
        """Compact-row statistics the schedule choice reads (plain ints)."""
        per_row = self.cmp_ptr[1:] - self.cmp_ptr[:-1]
        per_node = self.csrc_ptr[1:] - self.csrc_ptr[:-1]
        return {"num_compact": self.num_compact,
                "max_compact_edges": int(per_row.max()) if per_row.numel() else 0,
                "max_node_compacts": int(per_node.max()) if per_node.numel() else 0}

    @functools.cached_property
    def all_compact_ptr(self) -> torch.Tensor:
        """[0, U]: one segment holding every compact row (untyped GEMMs over compact rows)."""
        return torch.tensor([0, self.num_compact], dtype=torch.int32, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.src.device


# the compact-row arrays, read as attributes (kernels bind graph arrays by these names)
COMPACT_FIELDS = {
    "num_compact": "U, the number of unique (src, etype) pairs (compact rows)",
    "compact_src": "[U] source node of each compact row (int32)",
    "compact_etype": "[U] edge type of each compact row (int32); rows are sorted by it",
    "compact_etype_ptr": "[R+1] the compact rows of each relation",
    "edge_to_compact": "[E] compact row of each kernel-order edge",
    "cmp_ptr": "[U+1] into cmp_eid: the edges of each compact row",
    "cmp_eid": "[E] kernel-order edge ids grouped by compact row",
    "csrc_ptr": "[N+1] into csrc_id: the compact rows of each source node",
    "csrc_id": "[U] compact row ids grouped by source node",
}
for _name, _doc in COMPACT_FIELDS.items():
    setattr(KernelGraph, _name, property(lambda self, _n=_name: self._compact[_n], doc=_doc))

# the destination-side compact arrays (unique (dst, etype) pairs, sorted by (etype, dst))
COMPACT_DST_FIELDS = {
    "num_compact_dst": "Ud, the number of unique (dst, etype) pairs (destination-side compact rows)",
    "compact_dst_node": "[Ud] destination node of each destination-side compact row (int32)",
    "compact_dst_etype": "[Ud] edge type of each destination-side compact row (int32); rows are sorted by it",
    "compact_dst_etype_ptr": "[R+1] the destination-side compact rows of each relation",
    "edge_to_compact_dst": "[E] destination-side compact row of each kernel-order edge",
    "dcmp_ptr": "[Ud+1] into dcmp_eid: the edges of each (dst, etype) pair",
    "dcmp_eid": "[E] kernel-order edge ids grouped by (dst, etype) pair",
    "cdst_ptr": "[N+1] into cdst_id: the (dst, etype) pairs of each node",
    "cdst_id": "[Ud] destination-side compact row ids grouped by node",
}
for _name, _doc in COMPACT_DST_FIELDS.items():
    setattr(KernelGraph, _name, property(lambda self, _n=_name: self._compact_dst[_n], doc=_doc))


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
