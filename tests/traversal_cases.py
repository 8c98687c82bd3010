"""Hand-built traversal instances, graphs and inputs shared by the traversal-kernel tests
(CUDA templates on a GPU, their CPU emulation, the torch semantics).  Every backend checks its output against
``pigeon.runtime.family_traversal.run_traversal_reference``.

* ``traversal_cases()``: ``[(name, inst, shapes)]`` where ``shapes`` maps every buffer name (inputs
  and output) to ``(rows, feature shape)``, ``rows`` in node/edge/etype/ntype/global.  The list covers
  every loop kind (aggregate sum/mean/max x dst/src, edge_softmax, edge_map, node_map, type_reduce
  per etype/ntype/none over edges/nodes) and every Expr op (load with each RowRef, const, each unary
  fn, each binary fn with left-aligned broadcasting, dot per head, sum_to, reshape).
* ``case_graphs()``: ``[(name, KernelGraph)]`` with empty relations, an empty node type, isolated
  nodes, self-loops, duplicate edges, hubs and a single-edge graph.
* ``random_inputs(inst, kg)``: fresh random input buffers ``{name: [rows, *shape] tensor}``.
* ``poisoned_output(inst, kg)``: a NaN-filled output tensor of the right shape.
"""
from __future__ import annotations

import math

import torch

from pigeon.graph.kernel_graph import KernelGraph, kernel_graph
from pigeon.graph import HeteroGraph
from pigeon.ir import expr as ex
from pigeon.ir.fns import FLOAT, FNS
from pigeon.ir.traversal import Buffer, Expr, RowRef, TraversalInstance, load

H, D = 4, 8          # heads, per-head width

__all__ = ["H", "D", "traversal_cases", "case_graphs", "random_inputs", "poisoned_output", "rows_of",
           "out_rows", "buffer_shapes"]


# -- expression helpers -------------------------------------------------------------------------

# the expression IR's own constructors (shape and dtype rules live there)
un, bin_, const, dot, sum_to = ex.unary, ex.binary, ex.const, ex.dot, ex.sum_to


def reshape(x: Expr, shape: tuple[int, ...]) -> Expr:
    """A reshape node even where the shape is unchanged (ex.reshape would drop it)."""
    return Expr("reshape", shape, (x,))


# -- buffers ------------------------------------------------------------------------------------

def nbuf(name, *shape):
    return Buffer(name, "node", tuple(shape))


def ebuf(name, *shape):
    return Buffer(name, "edge", tuple(shape))


def tbuf(name, *shape):
    return Buffer(name, "etype", tuple(shape))


def ntbuf(name, *shape):
    return Buffer(name, "ntype", tuple(shape))


def gbuf(name, *shape):
    return Buffer(name, "global", tuple(shape))


def _out(inst_loop: str, shape, per: str = "none") -> Buffer:
    rows = {"edge_map": "edge", "edge_softmax": "edge", "node_map": "node", "aggregate": "node"}.get(inst_loop)
    if rows is None:
        rows = {"etype": "etype", "ntype": "ntype", "none": "global"}[per]
    return Buffer("out0", rows, tuple(shape))


def _inst(loop: str, expr: Expr, **kw) -> TraversalInstance:
    return TraversalInstance(loop, expr, _out(loop, expr.shape, kw.get("per", "none")), **kw)


def buffer_shapes(inst: TraversalInstance) -> dict[str, tuple[str, tuple[int, ...]]]:
    d = {b.name: (b.rows, tuple(b.shape)) for b in inst.inputs()}
    d[inst.out.name] = (inst.out.rows, tuple(inst.out.shape))
    return d


# -- the cases ----------------------------------------------------------------------------------

def traversal_cases() -> list[tuple[str, TraversalInstance, dict]]:
    x = nbuf("x", H, D)          # node features
    q = nbuf("q", H, D)
    a_e = ebuf("a_e", H)          # per-edge per-head scalar
    f_e = ebuf("f_e", H, D)       # per-edge features
    w_t = tbuf("w_t", H, D)       # per-relation
    b_nt = ntbuf("b_nt", H, D)    # per-node-type
    g_h = gbuf("g_h", H)          # global
    s_e = ebuf("s_e")             # shape () edge scalar

    xs, xd = load(x, RowRef.SRC), load(x, RowRef.DST)
    qd = load(q, RowRef.DST)
    ae, fe = load(a_e, RowRef.SELF), load(f_e, RowRef.SELF)
    wt = load(w_t, RowRef.ETYPE)
    # a typical RGAT-like message: x[src] * leaky_relu(a_e) (per head) + w[etype]
    msg = bin_("add", bin_("mul", xs, un("leaky_relu", ae, 0.2)), wt)
    # an attention score per head: dot(q[dst], x[src] + f_e) / sqrt(D)
    score = un("scale", dot(qd, bin_("add", xs, fe)), 1.0 / math.sqrt(D))

    cases: list[tuple[str, TraversalInstance]] = []
    add = lambda name, inst: cases.append((name, inst))  # noqa: E731

    # loops
    add("edge_map_u_mul_e", _inst("edge_map", bin_("mul", xs, ae)))
    add("edge_map_message", _inst("edge_map", msg))
    add("node_map_ntype", _inst("node_map", un("relu", bin_("add", load(x, RowRef.SELF), load(b_nt, RowRef.NTYPE)))))
    for side in ("dst", "src"):
        other = xd if side == "src" else xs
        m = bin_("add", bin_("mul", other, un("leaky_relu", ae, 0.2)), wt)
        for red in ("sum", "mean", "max"):
            add(f"aggregate_{red}_{side}", _inst("aggregate", m, side=side, reduce=red))
    add("aggregate_sum_dst_scalar", _inst("aggregate", load(s_e, RowRef.SELF), side="dst", reduce="sum"))
    add("aggregate_max_src_dot", _inst("aggregate", score, side="src", reduce="max"))
    add("edge_softmax_dot", _inst("edge_softmax", un("leaky_relu", score, 0.2)))
    add("edge_softmax_scalar", _inst("edge_softmax", load(s_e, RowRef.SELF)))
    add("edge_softmax_hd", _inst("edge_softmax", bin_("mul", fe, load(g_h, RowRef.NONE))))
    add("type_reduce_etype_edge", _inst("type_reduce", bin_("mul", xs, fe), rows="edge", per="etype"))
    add("type_reduce_none_edge", _inst("type_reduce", bin_("mul", xs, ae), rows="edge", per="none"))
    add("type_reduce_ntype_node", _inst("type_reduce", bin_("mul", load(x, RowRef.SELF), load(q, RowRef.SELF)),
                                        rows="node", per="ntype"))
    add("type_reduce_none_node", _inst("type_reduce", dot(load(x, RowRef.SELF), load(q, RowRef.SELF)),
                                       rows="node", per="none"))

    # loads with every row reference (edge and node loops)
    add("load_self_edge", _inst("edge_map", fe))
    add("load_src", _inst("edge_map", xs))
    add("load_dst", _inst("edge_map", xd))
    add("load_etype", _inst("edge_map", wt))
    add("load_none_edge", _inst("edge_map", bin_("add", ae, load(g_h, RowRef.NONE))))
    add("load_self_node", _inst("node_map", load(x, RowRef.SELF)))
    add("load_ntype", _inst("node_map", load(b_nt, RowRef.NTYPE)))
    add("load_none_node", _inst("node_map", bin_("mul", load(x, RowRef.SELF), load(g_h, RowRef.NONE))))

    # the edge_chunks schedule of sum aggregation (hubs split across threads), both sides, with
    # destination loads, broadcasts and a dot inside the body
    add("aggregate_sum_dst_edge_chunks", _inst("aggregate", bin_("mul", ae, xs), side="dst", reduce="sum",
                                               schedule="edge_chunks"))
    add("aggregate_sum_src_edge_chunks", _inst("aggregate", bin_("add", xd, fe), side="src", reduce="sum",
                                               schedule="edge_chunks"))
    add("aggregate_max_dst_edge_chunks", _inst("aggregate", bin_("mul", ae, xs), side="dst", reduce="max",
                                               schedule="edge_chunks"))
    add("aggregate_max_src_edge_chunks", _inst("aggregate", un("scale", fe, -1.0), side="src", reduce="max",
                                               schedule="edge_chunks"))
    add("aggregate_sum_dot_edge_chunks", _inst("aggregate", bin_("mul", dot(xs, qd), xs), side="dst",
                                               reduce="sum", schedule="edge_chunks"))

    # const and every unary fn (on node rows; the denominators of rdiv / recip are kept >= 0.5)
    xn = load(x, RowRef.SELF)
    add("const_add", _inst("node_map", bin_("add", xn, const(1.5))))
    add("const_only_edge", _inst("edge_map", bin_("mul", load(s_e, RowRef.SELF), const(-2.0))))
    for fn in [n for n, f in FNS.items() if f.arity == 1 and FLOAT in f.operands]:
        arg = un("shift", un("square", xn), 0.5) if fn in ("rdiv", "recip") else un("scale", xn, 3.0)
        c = {"leaky_relu": 0.1, "scale": -1.7, "shift": 0.3, "rsub": 2.0, "rdiv": 1.5, "leaky_step": 0.05}.get(fn)
        add(f"unary_{fn}", _inst("node_map", un(fn, arg, c)))

    # comparisons, select, min/max, casts, index variables and integer ops of the expression IR
    an0 = load(nbuf("a_n0", H), RowRef.SELF)          # [H]
    add("where_cmp", _inst("node_map", ex.where(ex.binary("gt", xn, ex.const(0.25)), xn, un("scale", xn, -0.5))))
    add("min_max", _inst("edge_map", ex.binary("max", ex.binary("min", load(s_e, RowRef.SELF), ex.const(0.5)),
                                               ex.const(-0.5))))
    add("index_row_feat", _inst("node_map", bin_("add", xn, ex.cast(ex.binary(
        "add", ex.binary("mul", ex.index("row"), ex.const(3)), ex.index("feat1", xn.shape)), "float32"))))
    ints = ex.cast(ex.unary("scale", an0, 8.0), "int32")
    bits = ex.binary("bit_xor", ex.binary("shl", ints, ex.const(2)), ex.binary("bit_and", ints, ex.const(5)))
    add("int_bitwise_popcount", _inst("node_map", ex.cast(ex.binary(
        "add", ex.unary("popcount", bits), ex.binary("shr", ex.unary("bit_not", ints), ex.const(1))), "float32")))
    # floor division and modulo of signed ints (Python's // and %, unlike C's): divisors -3 and 5
    add("int_floordiv_mod", _inst("node_map", ex.cast(ex.binary(
        "add", ex.binary("mul", ex.binary("floordiv", ints, ex.const(-3)), ex.const(100)),
        ex.binary("mod", ints, ex.const(5))), "float32")))

    # binary fns with left-aligned broadcasting
    an = load(nbuf("a_n", H), RowRef.SELF)            # [H]
    an1 = load(nbuf("a_n1", H, 1), RowRef.SELF)       # [H, 1]
    r1 = load(nbuf("r_1d", 1, D), RowRef.SELF)        # [1, D]
    den = un("shift", un("square", an), 0.5)
    add("binary_add_h_hd", _inst("node_map", bin_("add", an, xn)))
    add("binary_sub_hd_h", _inst("node_map", bin_("sub", xn, an)))
    add("binary_mul_h1_hd", _inst("node_map", bin_("mul", an1, xn)))
    add("binary_div_hd_h", _inst("node_map", bin_("div", xn, den)))
    add("binary_mul_1d_hd", _inst("node_map", bin_("mul", xn, r1)))
    add("binary_h1_1d", _inst("node_map", bin_("sub", an1, r1)))       # [H,1] - [1,D] -> [H, D]

    # dot, sum_to, reshape
    add("dot_per_head", _inst("edge_map", dot(xs, xd)))
    add("dot_head_vs_shared", _inst("node_map", dot(xn, load(gbuf("v_d", D), RowRef.NONE))))   # [H,D].[D]
    add("dot_scalar", _inst("node_map", dot(load(nbuf("y", D), RowRef.SELF), load(gbuf("v_d", D), RowRef.NONE))))
    add("dot_of_dots", _inst("edge_map", bin_("mul", dot(xs, fe), dot(xd, fe))))
    add("dot_nested_expr", _inst("edge_map", dot(un("tanh", bin_("mul", xs, fe)), bin_("add", xd, wt))))
    add("sum_to_h", _inst("edge_map", sum_to(bin_("mul", xs, fe), (H,))))
    add("sum_to_1d", _inst("edge_map", sum_to(bin_("mul", xs, fe), (1, D))))
    add("sum_to_h1", _inst("node_map", sum_to(xn, (H, 1))))
    add("sum_to_scalar", _inst("node_map", sum_to(xn, ())))
    add("sum_to_identity", _inst("node_map", sum_to(xn, (H, D))))
    add("sum_to_of_dot", _inst("edge_map", sum_to(bin_("mul", dot(xs, fe), ae), ())))
    add("reshape_flat", _inst("node_map", reshape(xn, (H * D,))))
    add("reshape_swap", _inst("node_map", reshape(xn, (D, H))))
    add("reshape_then_broadcast", _inst("edge_map", bin_("mul", reshape(fe, (2, H // 2, D)), reshape(ae, (2, H // 2)))))
    add("reshape_3d", _inst("node_map", un("exp", reshape(xn, (2, H // 2, D)))))
    return [(name, inst, buffer_shapes(inst)) for name, inst in cases]


# -- graphs and inputs --------------------------------------------------------------------------

def _random_hetero(seed: int, num_nodes=37, num_edges=150, num_etypes=4, num_ntypes=3) -> HeteroGraph:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst[: num_edges // 3] = torch.randint(0, 3, (num_edges // 3,), generator=gen)   # hubs
    src[:4] = dst[:4] = torch.arange(4)                                            # self-loops
    src[10], dst[10] = src[11], dst[11]                                             # a duplicate edge
    etype = torch.randint(0, num_etypes - 1, (num_edges,), generator=gen)           # last relation empty
    keep = (src < num_nodes - 2) & (dst < num_nodes - 2)                            # two isolated nodes
    ntype = torch.randint(0, num_ntypes - 1, (num_nodes,), generator=gen)           # last node type empty
    return HeteroGraph(src[keep], dst[keep], etype[keep], num_nodes=num_nodes, ntype=ntype,
                       num_etypes=num_etypes, num_ntypes=num_ntypes)


def case_graphs(device="cpu") -> list[tuple[str, KernelGraph]]:
    gs = [
        ("random", _random_hetero(0)),
        ("random_dense", _random_hetero(1, num_nodes=7, num_edges=60, num_etypes=2, num_ntypes=2)),
        ("single_edge", HeteroGraph(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), num_nodes=3,
                                    ntype=torch.tensor([0, 1, 0]), num_etypes=2, num_ntypes=2)),
        ("self_loop_only", HeteroGraph(torch.tensor([2]), torch.tensor([2]), torch.tensor([0]), num_nodes=4,
                                       num_etypes=1, num_ntypes=1)),
    ]
    return [(name, kernel_graph(g).to(device)) for name, g in gs]


def rows_of(kind: str, kg: KernelGraph) -> int:
    return {"node": kg.num_nodes, "edge": kg.num_edges, "etype": kg.num_etypes, "ntype": kg.num_ntypes,
            "compact": kg.num_compact, "compact_dst": kg.num_compact_dst, "global": 1}[kind]


def out_rows(inst: TraversalInstance, kg: KernelGraph) -> int:
    return rows_of(inst.out.rows, kg)


def random_inputs(inst: TraversalInstance, kg: KernelGraph, *, seed: int = 0, dtype=torch.float32,
                  device=None) -> dict[str, torch.Tensor]:
    """Fresh standard-normal inputs ``{name: [rows, *shape]}`` for every buffer ``inst`` reads."""
    gen = torch.Generator().manual_seed(seed)
    device = kg.device if device is None else device
    return {b.name: torch.randn((rows_of(b.rows, kg),) + tuple(b.shape), generator=gen)
            .to(device=device, dtype=dtype) for b in inst.inputs()}


def poisoned_output(inst: TraversalInstance, kg: KernelGraph, *, dtype=torch.float32, device=None) -> torch.Tensor:
    device = kg.device if device is None else device
    return torch.full((out_rows(inst, kg),) + tuple(inst.out.shape), float("nan"), dtype=dtype, device=device)
