"""Intra-operator IR for traversal kernels: per-element expressions over a loop of edges or nodes.

A traversal kernel runs a loop structure (``TraversalInstance.loop``) and, at every point of it,
evaluates one element expression (``Expr``) at a row ``r`` and a feature multi-index ``I``.

Rows and row references
-----------------------
Edge loops (``edge_map``, ``aggregate``, ``edge_softmax``, ``type_reduce`` over edges) visit
edges ``e`` in the kernel layout's edge order.  Node loops (``node_map``, ``type_reduce`` over
nodes) visit nodes ``v``.  A ``load`` names a buffer and how the loop row picks the buffer row:

=========  =======================================  ===============================
RowRef     edge loop (row e)                        node loop (row v)
=========  =======================================  ===============================
SELF       e            (an edge buffer)            v (a node buffer)
SRC        src[e]       (a node buffer)             -- not allowed
DST        dst[e]       (a node buffer)             -- not allowed
ETYPE      etype[e]     (a per-edge-type buffer)    -- not allowed
NTYPE      -- not allowed                           ntype[v] (a per-node-type buffer)
COMPACT    edge_to_compact[e] (a compact buffer)    -- not allowed
COMPACT_DST edge_to_compact_dst[e] (compact_dst)   -- not allowed
NONE       -- (a global buffer: no row)             same
=========  =======================================  ===============================

Compact loops (``compact_map``, ``aggregate`` with side ``compact_src``, ``type_reduce`` over
compact rows) visit compact rows ``c``
(one per unique (source node, edge type) pair, sorted by (etype, src)): SELF is ``c`` (a compact
buffer), SRC ``compact_src[c]`` (a node buffer), ETYPE ``compact_etype[c]``.  Destination-side
compact loops (``aggregate`` with side ``compact_dst``) visit the unique (dst, etype) pairs: SELF a
compact_dst buffer, DST ``compact_dst_node[c]``, ETYPE ``compact_dst_etype[c]``.

Element expressions
-------------------
Every ``Expr`` has a feature ``shape`` (the per-row shape of its value).  Its value at (r, I),
with ``len(I) == len(shape)``:

* ``load``: ``buffer[row(r), ravel(I, shape)]``; the buffer is contiguous ``[rows, *shape]``.
* ``const``: the number ``c`` (shape ``()``).
* ``unary fn [c]``: ``fn(arg(r, I))``; the fn registry (pigeon/ir/fns.py) gives every fn's meaning.
* ``binary fn``: ``fn(a(r, Ia), b(r, Ib))`` with left-aligned broadcasting: an argument of shape
  ``A`` is read at ``I[:len(A)]`` with the index of every axis where ``A[i] == 1`` set to 0.
* ``dot``: arguments ``a`` of shape ``(*La, K)``, ``b`` of shape ``(*Lb, K)``;
  value ``sum_k a(r, bc(I, La) + (k,)) * b(r, bc(I, Lb) + (k,))`` (``bc`` = the broadcast rule).
* ``sum_to``: argument of shape ``A`` with ``len(A) >= len(shape)`` and ``shape[i] in (A[i], 1)``;
  value = sum of ``arg(r, J)`` over all ``J`` with ``J[i] == I[i]`` wherever ``shape[i] == A[i]``
  (axes where ``shape[i] == 1`` and axes past ``len(shape)`` are summed).
* ``reshape``: ``arg(r, unravel(ravel(I, shape), A))`` where ``A`` is the argument's shape.

Loops (one output buffer per instance; ``out_shape == expr.shape``)
---------------------------------------------------------------------
* ``edge_map``:     ``out[e, I] = expr(e, I)`` for every edge.
* ``node_map``:     ``out[v, I] = expr(v, I)`` for every node.
* ``compact_map``:  ``out[c, I] = expr(c, I)`` for every compact row.
* ``type_map``:     ``out[t, I] = expr(t, I)`` for every type ``t`` (``per``: etype or ntype): elementwise
  work on per-type weights (SELF reads a per-type buffer of the same type axis).
* ``aggregate``:    ``out[v, I] = reduce over edges e with side(e) == v of expr(e, I)``; ``side`` is
  ``dst`` or ``src``; ``reduce`` is ``sum``, ``mean`` (sum / count) or ``max``; 0 where no edge.
  Side ``compact``: ``out[c, I] = sum over edges e of pair c``; side ``compact_src``:
  ``out[v, I] = sum over compact rows c with compact_src[c] == v of expr(c, I)`` (sum only).
  The destination side: ``dcompact`` sums each (dst, etype) pair's edges, ``compact_dst`` sums
  those pairs into their destination node.
  ``schedule`` changes only the thread mapping (and the order of float additions).
* ``edge_softmax``: ``out[e, I] = exp(s(e, I) - m) / sum over e' with dst(e') == dst(e) of
  exp(s(e', I) - m)`` where ``s = expr`` and ``m`` the max of ``s`` over those edges.
* ``type_reduce``:  ``out[t, I] = sum over rows r (edges, nodes or compact rows, per ``rows``) with
  type(r) == t of expr(r, I)``; ``per`` is ``etype``, ``ntype`` or ``none`` (``none``: one global
  sum); compact rows sum per ``etype`` by ``compact_etype`` (the gradient of a per-relation weight
  read by compact rows).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Literal

# the element expressions are the one expression IR (pigeon/ir/expr.py)
from .expr import Buffer, Expr, RowRef, load

__all__ = ["Buffer", "Expr", "RowRef", "TraversalInstance", "load"]


@dataclass(frozen=True)
class TraversalInstance:
    loop: Literal["edge_map", "node_map", "compact_map", "type_map", "aggregate", "edge_softmax", "type_reduce"]
    expr: Expr
    out: Buffer
    side: Literal["dst", "src", "compact", "compact_src", "dcompact", "compact_dst"] = "dst"   # aggregate only
    reduce: Literal["sum", "mean", "max"] = "sum"  # aggregate only
    rows: Literal["edge", "node", "compact"] = "edge"   # type_reduce only
    per: Literal["etype", "ntype", "none"] = "none"  # type_reduce; type_map (its rows)
    dtype: str = "float32"                       # storage dtype of float buffers; math is fp32
    # aggregate only: "node" (a lane group walks each node's edge list) or "edge_chunks" (fixed
    # chunks of edges in destination order, a segmented sum per chunk and one atomicAdd per
    # destination run: hub nodes are split across threads); chosen from degree statistics
    schedule: Literal["node", "edge_chunks"] = "node"
    # aggregate on edge_chunks only: consecutive row elements per thread (8: 16-byte row loads, the
    # member and key indices read once per 8 elements); chosen from the mean degree
    vec: int = 1

    def key(self) -> str:
        # vec at its default is left out: the keys (and kernel names) of every other instance stay
        # those they were before the field existed, so cached kernels still hit
        text = repr(tuple((f.name, getattr(self, f.name)) for f in fields(self)
                          if not (f.name == "vec" and self.vec == 1)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def inputs(self) -> tuple[Buffer, ...]:
        return self.expr.buffers()

    @property
    def loop_rows(self) -> str:
        """What the expression's loop row is: "edge", "node" or "compact"."""
        if self.loop == "compact_map" or (self.loop == "aggregate" and self.side == "compact_src") or (
                self.loop == "type_reduce" and self.rows == "compact"):
            return "compact"
        if self.loop == "aggregate" and self.side == "compact_dst":
            return "compact_dst"
        if self.loop == "type_map":
            return self.per
        if self.loop in ("edge_map", "aggregate", "edge_softmax") or (
                self.loop == "type_reduce" and self.rows == "edge"):
            return "edge"
        return "node"

    @property
    def out_rows(self) -> str:
        """What indexes the output buffer."""
        if self.loop in ("type_reduce", "type_map"):
            return {"etype": "etype", "ntype": "ntype", "none": "global"}[self.per]
        if self.loop == "aggregate":
            return {"compact": "compact", "dcompact": "compact_dst"}.get(self.side, "node")
        return {"edge_map": "edge", "node_map": "node", "compact_map": "compact", "edge_softmax": "edge"}[self.loop]

    @property
    def edge_loop(self) -> bool:
        return self.loop_rows == "edge"
