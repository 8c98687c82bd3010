"""Compact materialization: a typed linear of source rows, ``x[src] @ W[etype]``, depends only on
the edge's (source node, relation) pair, so it is computed once per unique pair (a compact row,
``Domain.COMPACT``) and read by every edge of the pair through ``expand_compact``:

    typed_linear(gather[src](x), W per etype)
        -> expand_compact(typed_linear(gather[compact_src](x), W per etype))

The GEMM then runs on U compact rows instead of E edge rows, and the E x n message buffer is
never written: the traversal kernels read the compact row of each edge (RowRef.COMPACT). The
pass runs before autodiff, so the backward graph follows: the gradient of ``expand_compact``
sums each pair's edges into its compact row (``aggregate side=compact``), weight gradients and
input gradients are GEMMs over compact rows, and the gradient of the compact gather sums
compact rows into their source node (``aggregate side=compact_src``).

Whether it pays is a graph property: it saves (E - U) GEMM rows and message writes, and costs
one index read per edge (plus, in backward, a segmented sum over each pair's edges). The
decision (``decide``) compacts when E / U reaches ``MIN_EDGES_PER_ROW``; FB15k-237 has 3.0
edges per (source, relation) pair, ogbn-mag 6.8, ACM 27, while AM and BGS have 1.2, where the
extra indirection costs about what the saved rows give back. ``PIGEON_COMPACT`` = ``auto``
(default: the rule), ``1`` (always), ``0`` (never).

Sinking edge-wise work into the compact domain (the ``sink_*`` rules, applied with the compaction
rule in one rewrite): an edge-wise ``unary`` / ``binary`` / ``dot`` / ``reshape`` whose edge-wise
operands are all ``expand_compact(c)`` or per-relation weights ``type_index(w, domain=edge)``
(a compact row's relation is known: ``compact_etype``) depends only on the edge's (source,
relation) pair too, so it is computed once per compact row and read per edge:

    op(expand_compact(c), type_index(w, edge), g)  ->  expand_compact(op(c, type_index(w, compact), g))

(``g``: global operands, kept).  At least one operand must be an ``expand_compact``.  Chains sink
one op at a time (the engine rebuilds each op on its rewritten inputs).  What it buys is the
``dot``: RGAT's source score ``dot(reshape(expand_compact(z)), a_src[etype])`` read a gathered
H*D-wide compact row per edge and now reads H floats per edge (the dot runs in a ``compact_map``
over U rows).  Sunk elementwise ops cost nothing per edge: the lowering inlines an
``expand_compact`` of a fused compact expression into the edge kernel that reads it (its loads
through ``edge_to_compact``), so nothing is materialized that was not before; an edge-wise use of
the value (an ``edge_softmax``, an aggregate) reads the expanded value as it read the edge value.
The gradient of the compact ``type_index`` is a per-relation sum over compact rows
(``type_reduce`` over compact rows), of ``expand_compact`` a sum of each pair's edges.

Destination-side compaction (``DST_RULES``, its own decision ``decide_dst``): a typed linear of
destination rows, ``x[dst] @ W[etype]``, depends only on the edge's (destination node, relation)
pair, so it is computed once per unique pair (``Domain.COMPACT_DST``, Ud rows sorted by (etype,
dst)) and read per edge through ``edge_to_compact_dst``:

    typed_linear(gather[dst](x), W per etype)
        -> expand_compact(typed_linear(gather[compact_dst](x), W per etype))

RGAT's destination score (after the linear reordering folded a_dst into W, an E x K GEMM with
n = heads) becomes a GEMM over Ud rows.  Backward mirrors the source side: the gradient of the
expand sums each pair's edges (``aggregate side=dcompact``), of the gather sums pairs into their
destination node (``aggregate side=compact_dst``).  It compacts when E / Ud reaches
``MIN_EDGES_PER_ROW`` (synthetic ogbn-mag: 21.1M edges, 1.46M (dst, relation) pairs, E/Ud = 14.5);
``PIGEON_COMPACT_DST``
= ``auto`` | ``1`` | ``0``.  Nothing is sunk on this side (the sink rules read source-side rows only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..ir.ops import OpKind
from ..ir.types import Domain, TypeAxis
from .rewrite import Pat, Rule, var

MIN_EDGES_PER_ROW = 1.5
ENV = "PIGEON_COMPACT"
ENV_DST = "PIGEON_COMPACT_DST"

TL, GATHER, EXPAND = OpKind.TYPED_LINEAR, OpKind.GATHER, OpKind.EXPAND_COMPACT
TYPE_INDEX = OpKind.TYPE_INDEX
SINK_KINDS = (OpKind.UNARY, OpKind.BINARY, OpKind.DOT, OpKind.RESHAPE)


class CompactionError(ValueError):
    pass


@dataclass(frozen=True)
class Decision:
    compact: bool
    why: str


def decide(stats: dict | None, *, env: str = ENV, rows: str = "compact_rows", side: str = "src") -> Decision:
    """Compact or not, from the graph's ``stats()`` (``num_edges``, ``compact_rows``; the
    destination side: ``decide_dst``)."""
    mode = os.environ.get(env, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise CompactionError(f"{env}={mode!r}: expected 'auto', '1' or '0'")
    if mode == "1":
        return Decision(True, f"{env}=1")
    if mode == "0":
        return Decision(False, f"{env}=0")
    if not stats or not stats.get(rows):
        return Decision(False, "no graph statistics (compiled without a graph)")
    ratio = stats["num_edges"] / stats[rows]
    if ratio >= MIN_EDGES_PER_ROW:
        return Decision(True, f"{ratio:.2f} edges per ({side}, etype) pair >= {MIN_EDGES_PER_ROW}")
    return Decision(False, f"{ratio:.2f} edges per ({side}, etype) pair < {MIN_EDGES_PER_ROW}")


def decide_dst(stats: dict | None) -> Decision:
    """Destination-side compaction or not: E / Ud against the same threshold (``compact_dst_rows``)."""
    return decide(stats, env=ENV_DST, rows="compact_dst_rows", side="dst")


def _per_etype(op) -> bool:
    return op.type.domain is Domain.WEIGHT and op.type.per is TypeAxis.ETYPE


def _compact_on(side: str):
    """The rewrite of ``typed_linear(gather(x), W per etype)`` onto the unique (node, etype) pairs
    of ``side`` (``compact_src`` or ``compact_dst``), read per edge through ``expand_compact``."""
    def rewrite(m):
        x, w = m["x"], m["w"]
        if x.type.domain is not Domain.NODE or not _per_etype(w):
            return None
        rows = m.make(GATHER, [x], side=side)
        z = m.make(TL, [rows, w], **dict(m.op.attrs))
        return m.make(EXPAND, [z])
    return rewrite


_compact = _compact_on("compact_src")


def _sink(m):
    """op(expand_compact(c) | type_index(w, edge) | global, ...) -> expand_compact(op(c | type_index(w,
    compact) | global, ...)), or None where an edge-wise operand depends on more than the pair."""
    ins, expanded = [], False
    for x in m.inputs():
        if x.kind is EXPAND and m.inputs(x)[0].type.domain is Domain.COMPACT:
            ins.append(m.inputs(x)[0])
            expanded = True
        elif x.kind is TYPE_INDEX and x.attr("domain") is Domain.EDGE and _per_etype(m.inputs(x)[0]):
            ins.append(m.make(TYPE_INDEX, m.inputs(x), domain=Domain.COMPACT))
        elif x.type.domain is Domain.GLOBAL:
            ins.append(x)
        else:
            return None
    if not expanded:
        return None
    return m.make(EXPAND, [m.make(m.op.kind, ins, **dict(m.op.attrs))])


_compact_dst = _compact_on("compact_dst")


DST_RULES = [Rule("compact_dst_linear", Pat.of(TL, Pat.of(GATHER, var("x"), side="dst"), var("w")), _compact_dst)]


def _edge_wise(op) -> bool:
    return op.type.domain is Domain.EDGE


RULES = [Rule("compact_src_linear", Pat.of(TL, Pat.of(GATHER, var("x"), side="src"), var("w")), _compact)] + [
    Rule(f"sink_{k.value}_into_compact", Pat.of(k, where=_edge_wise), _sink) for k in SINK_KINDS]
