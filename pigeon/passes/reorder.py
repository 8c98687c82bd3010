"""Linear reordering: an inner product of a typed linear with a per-type vector is one typed
linear with the vector folded into the weight,

    dot(reshape(x @ W[t], [H, D]), a[t])  ->  x @ (W[t] . a[t])      W [K, H*D], a [H, D] -> [K, H]

computed once per type (``W_r a_r``: a small contraction on the weights) instead of an E x H*D
GEMM followed by a dot per row: RGAT's destination-side score ``<x_dst W_r, a_dst_r>`` becomes a
GEMM with n = H.  The rule fires only where the linear's result has no other use (the
reshape and the dot are its only readers); otherwise the full product is computed anyway and
the fold would add work.  Gradients follow from autodiff: the weight contraction is a dot on
per-type weights, whose gradient is elementwise work on weights (a ``type_map`` kernel).
"""
from __future__ import annotations

from ..ir.graph import IRGraph
from ..ir.ops import OpKind
from ..ir.types import Domain
from .rewrite import Change, Pat, Rule, rewrite, var

TL, DOT, RESHAPE, TYPE_INDEX = OpKind.TYPED_LINEAR, OpKind.DOT, OpKind.RESHAPE, OpKind.TYPE_INDEX


def _rules(ir: IRGraph) -> list[Rule]:
    uses = {op.key: len(ir.users(op.key)) for op in ir.ops()}
    outputs = set(ir.outputs)

    def only_use(op) -> bool:       # a value read by one op and not a graph output
        return uses.get(op.key, 0) == 1 and op.key not in outputs

    def fold(m):
        z, lin, x, w, a = m["z"], m["lin"], m["x"], m["w"], m["vec"]
        if lin.attr("transpose") or w.type.domain is not Domain.WEIGHT or a.type.domain is not Domain.WEIGHT:
            return None
        if w.type.per is not a.type.per or len(w.type.shape) != 2:
            return None
        if not only_use(lin) or (z.key != lin.key and not only_use(z)):
            return None
        k, n = w.type.shape
        zshape, ashape = z.type.shape, a.type.shape
        if zshape != ashape or not zshape:
            return None
        d = zshape[-1]
        lead = zshape[:-1]                      # (H,) or () for one head
        w3 = m.make(RESHAPE, [w], shape=(k,) + lead + (d,))
        a3 = m.make(RESHAPE, [a], shape=(1,) + lead + (d,))
        wa = m.make(DOT, [w3, a3])              # per type [K, *lead]
        if not lead:
            wa = m.make(RESHAPE, [wa], shape=(k, 1))
        out = m.make(TL, [x, wa])               # [rows, H] (or [rows, 1])
        if out.type.shape != m.op.type.shape:
            out = m.make(RESHAPE, [out], shape=m.op.type.shape)
        return out

    lin = Pat.of(TL, var("x"), var("w"), name="lin")
    vec = Pat.of(TYPE_INDEX, var("vec"), name="a")
    rules = []
    def build(m):
        m.binds.setdefault("lin", m["z"])      # z is the linear itself when there is no reshape
        return fold(m)
    for z in (Pat.of(RESHAPE, lin, name="z"), Pat.of(TL, var("x"), var("w"), name="z")):
        rules.append(Rule("fold_vector_into_linear", Pat.of(DOT, z, vec), build))
        rules.append(Rule("fold_vector_into_linear", Pat.of(DOT, vec, z), build))
    return rules


def linear_reorder(ir: IRGraph, changes: list[Change]) -> IRGraph:
    return rewrite(ir, _rules(ir), changes=changes)
