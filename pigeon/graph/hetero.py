"""HeteroGraph: an immutable heterogeneous multigraph held as int64 edge-index tensors."""
from __future__ import annotations

from typing import Sequence

import torch

from . import layouts as L

__all__ = ["HeteroGraph", "GraphError"]


class GraphError(ValueError):
    """An invalid graph: the message names the tensor and the offending position or value."""


def _check_index(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise GraphError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise GraphError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 1:
        raise GraphError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check_range(name: str, t: torch.Tensor, bound: int, bound_name: str, where: str) -> None:
    """Raise on the first negative entry or entry >= bound; ``where`` names a position (edge/node)."""
    if t.numel() == 0:
        return
    neg = t < 0
    if bool(neg.any()):
        i = _first(neg)
        raise GraphError(f"{name} has a negative value {int(t[i])} at {where} {i}")
    big = t >= bound
    if bool(big.any()):
        i = _first(big)
        raise GraphError(f"{name}[{i}] = {int(t[i])} is out of range at {where} {i}: "
                         f"{bound_name} is {bound}")


def _names(kind: str, names, count: int, prefix: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(count))
    names = tuple(str(n) for n in names)
    if len(names) != count:
        raise GraphError(f"{kind} has {len(names)} names but num_{kind[:-6]}s is {count}")
    return names


class HeteroGraph:
    """A heterogeneous directed multigraph with global node ids ``0..num_nodes-1``.

    Edge i goes ``src[i] -> dst[i]`` with relation ``etype[i]``; ``ntype[v]`` is node v's type.
    Relations and node types may be empty. Self-loops and duplicate edges are allowed.
    Immutable: layouts (``csr``, ``csc``, ``coo_by_etype``, ``compact``, degrees) are built on
    first use and cached on the instance.
    """

    __slots__ = ("src", "dst", "etype", "ntype", "num_nodes", "num_edges", "num_etypes", "num_ntypes",
                 "etype_names", "ntype_names", "name", "_cache")

    def __init__(self, src, dst, etype, *, num_nodes: int | None = None, ntype=None,
                 num_etypes: int | None = None, num_ntypes: int | None = None,
                 etype_names: Sequence[str] | None = None, ntype_names: Sequence[str] | None = None,
                 name: str = "graph"):
        for n, t in (("src", src), ("dst", dst), ("etype", etype)):
            _check_index(n, t)
        if not (src.numel() == dst.numel() == etype.numel()):
            raise GraphError(f"src, dst and etype must have the same length, got "
                             f"src={src.numel()}, dst={dst.numel()}, etype={etype.numel()}")
        if not (src.device == dst.device == etype.device):
            raise GraphError(f"src, dst and etype must be on one device, got "
                             f"{src.device}, {dst.device}, {etype.device}")
        if src.numel() == 0:
            raise GraphError("empty graph: src, dst and etype have zero edges")
        device = src.device
        src, dst, etype = (t.to(torch.int64).contiguous() for t in (src, dst, etype))
        if ntype is not None:
            _check_index("ntype", ntype)
            ntype = ntype.to(device=device, dtype=torch.int64).contiguous()
            if num_nodes is not None and ntype.numel() != num_nodes:
                raise GraphError(f"ntype has length {ntype.numel()} but num_nodes is {num_nodes}")

        for n, t in (("src", src), ("dst", dst), ("etype", etype)):
            neg = t < 0
            if bool(neg.any()):
                i = _first(neg)
                raise GraphError(f"{n} has a negative value {int(t[i])} at edge {i}")
        if num_nodes is None:
            num_nodes = ntype.numel() if ntype is not None else int(torch.maximum(src.max(), dst.max())) + 1
        num_nodes = int(num_nodes)
        if num_nodes <= 0:
            raise GraphError(f"empty graph: num_nodes is {num_nodes}")
        num_etypes = int(etype.max()) + 1 if num_etypes is None else int(num_etypes)
        _check_range("src", src, num_nodes, "num_nodes", "edge")
        _check_range("dst", dst, num_nodes, "num_nodes", "edge")
        _check_range("etype", etype, num_etypes, "num_etypes", "edge")

        if ntype is None:
            ntype = torch.zeros(num_nodes, dtype=torch.int64, device=device)
        if num_ntypes is None:
            num_ntypes = int(ntype.max()) + 1 if ntype.numel() else 1
        num_ntypes = int(num_ntypes)
        _check_range("ntype", ntype, num_ntypes, "num_ntypes", "node")

        self._init(src, dst, etype, ntype, num_nodes, num_etypes, num_ntypes,
                   _names("etype_names", etype_names, num_etypes, "r"),
                   _names("ntype_names", ntype_names, num_ntypes, "n"), str(name))

    def _init(self, src, dst, etype, ntype, num_nodes, num_etypes, num_ntypes, etype_names, ntype_names, name):
        s = object.__setattr__
        s(self, "src", src)
        s(self, "dst", dst)
        s(self, "etype", etype)
        s(self, "ntype", ntype)
        s(self, "num_nodes", num_nodes)
        s(self, "num_edges", int(src.numel()))
        s(self, "num_etypes", num_etypes)
        s(self, "num_ntypes", num_ntypes)
        s(self, "etype_names", etype_names)
        s(self, "ntype_names", ntype_names)
        s(self, "name", name)
        s(self, "_cache", {})

    @classmethod
    def _trusted(cls, src, dst, etype, ntype, num_nodes, num_etypes, num_ntypes, etype_names,
                 ntype_names, name) -> "HeteroGraph":
        g = cls.__new__(cls)
        g._init(src, dst, etype, ntype, num_nodes, num_etypes, num_ntypes, etype_names, ntype_names, name)
        return g

    def __setattr__(self, key, value):
        raise AttributeError(f"HeteroGraph is immutable (tried to set {key!r})")

    def __reduce__(self):  # pickle / deepcopy (the default slot-state path would hit __setattr__)
        return (HeteroGraph._trusted, (self.src, self.dst, self.etype, self.ntype, self.num_nodes,
                                       self.num_etypes, self.num_ntypes, self.etype_names,
                                       self.ntype_names, self.name))

    def __delattr__(self, key):
        raise AttributeError(f"HeteroGraph is immutable (tried to delete {key!r})")

    @property
    def device(self) -> torch.device:
        return self.src.device

    def to(self, device) -> "HeteroGraph":
        """This graph with its index tensors on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        t = (x.to(device) for x in (self.src, self.dst, self.etype, self.ntype))
        return HeteroGraph._trusted(*t, self.num_nodes, self.num_etypes, self.num_ntypes,
                                    self.etype_names, self.ntype_names, self.name)

    def with_reverse_edges(self) -> "HeteroGraph":
        """Add edge (d, s, r + R) for every edge (s, d, r); reverse relations are named ``rev_<name>``."""
        R = self.num_etypes
        return HeteroGraph._trusted(
            torch.cat([self.src, self.dst]), torch.cat([self.dst, self.src]),
            torch.cat([self.etype, self.etype + R]), self.ntype, self.num_nodes, 2 * R, self.num_ntypes,
            self.etype_names + tuple("rev_" + n for n in self.etype_names), self.ntype_names,
            self.name + "+rev")

    # ---- layouts (cached) ----
    def relation_pairs(self) -> tuple[int, int]:
        """Unique (source, relation) and (destination, relation) pairs: the rows a typed linear
        needs after compaction on each side (cached)."""
        def build():
            key = self.etype.to(torch.int64) * self.num_nodes
            return (int(torch.unique(key + self.src.to(torch.int64)).numel()),
                    int(torch.unique(key + self.dst.to(torch.int64)).numel()))
        return self._cached("relation_pairs", build)

    def _cached(self, key, build):
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = build()
        return out

    def csr(self) -> L.CSR:
        return self._cached("csr", lambda: L.build_csr(self.src, self.dst, self.etype, self.num_nodes,
                                                       self.num_etypes))

    def csc(self) -> L.CSC:
        return self._cached("csc", lambda: L.build_csc(self.src, self.dst, self.etype, self.num_nodes,
                                                       self.num_etypes))

    def coo_by_etype(self) -> L.EtypeCOO:
        return self._cached("coo", lambda: L.build_coo_by_etype(self.src, self.dst, self.etype,
                                                                self.num_etypes))

    def compact(self) -> L.CompactMap:
        return self._cached("compact", lambda: L.build_compact(self.src, self.etype, self.num_nodes,
                                                               self.num_etypes))

    def compact_dst(self) -> L.CompactMap:
        """The unique (dst, etype) pairs, sorted by (etype, dst) (``CompactMap.src`` holds the
        destination node of each pair)."""
        return self._cached("compact_dst", lambda: L.build_compact(self.dst, self.etype, self.num_nodes,
                                                                   self.num_etypes))

    def in_degree(self) -> torch.Tensor:
        """Float32 [N]: in-degree of each node."""
        return self._cached("in_deg", lambda: L.in_degree(self.dst, self.num_nodes))

    def out_degree(self) -> torch.Tensor:
        """Float32 [N]: out-degree of each node."""
        return self._cached("out_deg", lambda: L.out_degree(self.src, self.num_nodes))

    def in_degree_by_etype(self) -> torch.Tensor:
        """Float32 [E]: per edge, the number of edges with the same (dst, etype)."""
        return self._cached("in_deg_r", lambda: L.in_degree_by_etype(self.dst, self.etype, self.num_etypes))

    def edges_per_etype(self) -> torch.Tensor:
        """Int64 [R]: number of edges of each relation."""
        return torch.diff(self.coo_by_etype().seg_ptr)

    def nodes_per_ntype(self) -> torch.Tensor:
        """Int64 [T]: number of nodes of each node type."""
        return torch.bincount(self.ntype, minlength=self.num_ntypes)

    def stats(self) -> dict:
        """Summary statistics (plain Python numbers)."""
        per_rel = self.edges_per_etype().to(torch.float64)
        indeg = self.in_degree().to(torch.float64)
        touched = (self.in_degree() + self.out_degree()) > 0
        U = self.compact().num_rows
        mean_in = self.num_edges / self.num_nodes
        return {
            "nodes": self.num_nodes,
            "edges": self.num_edges,
            "relations": self.num_etypes,
            "node_types": self.num_ntypes,
            "edges_per_relation_min": int(per_rel.min()),
            "edges_per_relation_median": float(per_rel.quantile(0.5)),
            "edges_per_relation_max": int(per_rel.max()),
            "empty_relations": int((per_rel == 0).sum()),
            "in_degree_mean": mean_in,
            "in_degree_max": int(indeg.max()),
            "compact_rows": U,
            "edges_per_compact_row": self.num_edges / U,
            "isolated_fraction": float((~touched).sum()) / self.num_nodes,
            "degree_skew": float(indeg.max()) / mean_in,
        }

    def __repr__(self) -> str:
        return (f"HeteroGraph(name={self.name!r}, nodes={self.num_nodes}, edges={self.num_edges}, "
                f"relations={self.num_etypes}, node_types={self.num_ntypes}, device={self.device})")
