"""Graph layouts as frozen dataclasses of tensors, and the pure functions that build them.

Every builder takes int64 index tensors (``src``, ``dst``, ``etype`` of length E) plus the
sizes, and is vectorized: no Python loop over edges or relations. Ties are always broken by
the original edge id, so every layout is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CSR", "CSC", "EtypeCOO", "CompactMap", "build_csr", "build_csc", "build_coo_by_etype",
           "build_compact", "in_degree", "out_degree", "in_degree_by_etype", "lexsort"]

_INT64_LIMIT = 1 << 62


@dataclass(frozen=True)
class CSR:
    """Rows are source nodes; within a row, edges sorted by (etype, dst, edge id).

    ``row_ptr [N+1]``; ``col [E]`` the destination of each position; ``etype [E]``;
    ``eid [E]`` the original edge id of each position.
    """
    row_ptr: torch.Tensor
    col: torch.Tensor
    etype: torch.Tensor
    eid: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.row_ptr.numel() - 1


@dataclass(frozen=True)
class CSC(CSR):
    """Rows are destination nodes; within a row, edges sorted by (etype, src, edge id).

    Same fields as :class:`CSR`, with ``col`` holding the source of each position.
    """


@dataclass(frozen=True)
class EtypeCOO:
    """Edges stable-sorted by etype: position i holds edge ``eid[i]`` = (``src[i]``, ``dst[i]``).

    Relation r occupies positions ``seg_ptr[r]:seg_ptr[r+1]`` (equal entries for an empty relation).
    """
    eid: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    seg_ptr: torch.Tensor


@dataclass(frozen=True)
class CompactMap:
    """The unique (src, etype) pairs, sorted by (etype, src).

    ``src [U]``, ``etype [U]``; relation r owns rows ``seg_ptr[r]:seg_ptr[r+1]``;
    ``edge_to_compact [E]`` is the row of each edge's pair; ``num_rows`` is U.
    """
    src: torch.Tensor
    etype: torch.Tensor
    seg_ptr: torch.Tensor
    edge_to_compact: torch.Tensor
    num_rows: int


def lexsort(keys: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Permutation sorting by ``keys[0]``, then ``keys[1]``, ..., then position (stable).

    ``sizes[i]`` bounds ``keys[i]`` (all values in ``[0, sizes[i])``). Keys are packed into one
    int64 when the product of the sizes fits, else sorted with successive stable sorts.
    """
    total = 1
    for s in sizes:
        total *= max(int(s), 1)
    if total < _INT64_LIMIT:
        packed = torch.zeros_like(keys[0])
        for k, s in zip(keys, sizes):
            packed = packed * max(int(s), 1) + k
        return torch.sort(packed, stable=True).indices
    perm = torch.arange(keys[0].numel(), device=keys[0].device)
    for k in reversed(keys):
        perm = perm[torch.sort(k[perm], stable=True).indices]
    return perm


def _ptr(index: torch.Tensor, size: int) -> torch.Tensor:
    """Exclusive prefix sum of ``bincount(index)``: a [size+1] pointer array."""
    counts = torch.bincount(index, minlength=size)
    ptr = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _rows(row: torch.Tensor, col: torch.Tensor, etype: torch.Tensor, num_nodes: int, num_etypes: int):
    perm = lexsort([row, etype, col], [num_nodes, num_etypes, num_nodes])
    return _ptr(row, num_nodes), col[perm], etype[perm], perm


def build_csr(src, dst, etype, num_nodes: int, num_etypes: int) -> CSR:
    """CSR by source node (see :class:`CSR`)."""
    row_ptr, col, et, eid = _rows(src, dst, etype, num_nodes, num_etypes)
    return CSR(row_ptr, col, et, eid)


def build_csc(src, dst, etype, num_nodes: int, num_etypes: int) -> CSC:
    """CSC by destination node (see :class:`CSC`)."""
    row_ptr, col, et, eid = _rows(dst, src, etype, num_nodes, num_etypes)
    return CSC(row_ptr, col, et, eid)


def build_coo_by_etype(src, dst, etype, num_etypes: int) -> EtypeCOO:
    """Edges stable-sorted by relation (see :class:`EtypeCOO`)."""
    perm = torch.sort(etype, stable=True).indices
    return EtypeCOO(perm, src[perm], dst[perm], _ptr(etype, num_etypes))


def build_compact(src, etype, num_nodes: int, num_etypes: int) -> CompactMap:
    """Unique (src, etype) pairs (see :class:`CompactMap`); given the destinations, the unique
    (dst, etype) pairs (``HeteroGraph.compact_dst``)."""
    key = etype * num_nodes + src
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    u_etype = torch.div(uniq, num_nodes, rounding_mode="floor")
    u_src = uniq - u_etype * num_nodes
    return CompactMap(u_src, u_etype, _ptr(u_etype, num_etypes), inverse, int(uniq.numel()))


def in_degree(dst, num_nodes: int) -> torch.Tensor:
    """Float32 [N]: number of edges into each node."""
    return torch.bincount(dst, minlength=num_nodes).to(torch.float32)


def out_degree(src, num_nodes: int) -> torch.Tensor:
    """Float32 [N]: number of edges out of each node."""
    return torch.bincount(src, minlength=num_nodes).to(torch.float32)


def in_degree_by_etype(dst, etype, num_etypes: int) -> torch.Tensor:
    """Float32 [E]: for each edge, the number of edges sharing its (dst, etype)."""
    _, inverse, counts = torch.unique(dst * num_etypes + etype, return_inverse=True, return_counts=True)
    return counts[inverse].to(torch.float32)
