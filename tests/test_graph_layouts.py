"""Every HeteroGraph layout equals an obvious pure-Python construction, on hypothesis-drawn graphs."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.graph import HeteroGraph, synthetic_graph, tiny_graph
from pigeon.graph.layouts import lexsort


@st.composite
def heterographs(draw):
    n = draw(st.integers(1, 12))
    r = draw(st.integers(1, 5))
    t = draw(st.integers(1, 3))
    e = draw(st.integers(1, 40))
    # heavy skew: sometimes draw endpoints from a tiny hub set
    hubs = draw(st.sampled_from([n, 1, 2]))
    nodes = st.integers(0, min(hubs, n) - 1)
    src = draw(st.lists(st.integers(0, n - 1), min_size=e, max_size=e))
    dst = draw(st.lists(nodes, min_size=e, max_size=e))
    # leave some relations empty by drawing etypes from a prefix
    used = draw(st.integers(1, r))
    etype = draw(st.lists(st.integers(0, used - 1), min_size=e, max_size=e))
    ntype = draw(st.lists(st.integers(0, t - 1), min_size=n, max_size=n))
    return HeteroGraph(torch.tensor(src), torch.tensor(dst), torch.tensor(etype), num_nodes=n,
                       ntype=torch.tensor(ntype), num_etypes=r, num_ntypes=t)


def edges(g):
    return list(zip(g.src.tolist(), g.dst.tolist(), g.etype.tolist()))


def slow_rows(g, by):
    """(row_ptr, col, etype, eid) of the CSR (by='src') or CSC (by='dst') the slow way."""
    items = []
    for i, (s, d, r) in enumerate(edges(g)):
        row, col = (s, d) if by == "src" else (d, s)
        items.append((row, r, col, i))
    items.sort()
    counts = Counter(row for row, *_ in items)
    row_ptr = [0]
    for v in range(g.num_nodes):
        row_ptr.append(row_ptr[-1] + counts[v])
    return row_ptr, [c for _, _, c, _ in items], [r for _, r, _, _ in items], [i for *_, i in items]


def check_rows(layout, g, by):
    row_ptr, col, et, eid = slow_rows(g, by)
    assert layout.row_ptr.tolist() == row_ptr
    assert layout.col.tolist() == col
    assert layout.etype.tolist() == et
    assert layout.eid.tolist() == eid
    assert layout.num_rows == g.num_nodes
    for t in (layout.row_ptr, layout.col, layout.etype, layout.eid):
        assert t.dtype == torch.int64


def check_all(g):
    E = edges(g)
    check_rows(g.csr(), g, "src")
    check_rows(g.csc(), g, "dst")

    coo = g.coo_by_etype()
    order = sorted(range(len(E)), key=lambda i: (E[i][2], i))
    assert coo.eid.tolist() == order
    assert coo.src.tolist() == [E[i][0] for i in order]
    assert coo.dst.tolist() == [E[i][1] for i in order]
    seg = [0]
    for r in range(g.num_etypes):
        seg.append(seg[-1] + sum(1 for e in E if e[2] == r))
    assert coo.seg_ptr.tolist() == seg

    cm = g.compact()
    pairs = sorted({(r, s) for s, _, r in E})
    assert cm.num_rows == len(pairs)
    assert cm.src.tolist() == [s for _, s in pairs]
    assert cm.etype.tolist() == [r for r, _ in pairs]
    seg = [0]
    for r in range(g.num_etypes):
        seg.append(seg[-1] + sum(1 for p in pairs if p[0] == r))
    assert cm.seg_ptr.tolist() == seg
    assert cm.edge_to_compact.tolist() == [pairs.index((r, s)) for s, _, r in E]

    indeg = Counter(d for _, d, _ in E)
    assert g.in_degree().tolist() == [float(indeg[v]) for v in range(g.num_nodes)]
    assert g.in_degree().dtype == torch.float32
    outdeg = Counter(s for s, _, _ in E)
    assert g.out_degree().tolist() == [float(outdeg[v]) for v in range(g.num_nodes)]
    per = Counter((d, r) for _, d, r in E)
    assert g.in_degree_by_etype().tolist() == [float(per[(d, r)]) for _, d, r in E]
    assert g.in_degree_by_etype().dtype == torch.float32


@settings(max_examples=150, deadline=None)
@given(heterographs())
def test_layouts_match_slow_reference(g):
    check_all(g)


@settings(max_examples=40, deadline=None)
@given(heterographs())
def test_reverse_edges(g):
    rg = g.with_reverse_edges()
    R = g.num_etypes
    assert rg.num_etypes == 2 * R and rg.num_edges == 2 * g.num_edges
    assert edges(rg) == edges(g) + [(d, s, r + R) for s, d, r in edges(g)]
    assert rg.etype_names == g.etype_names + tuple("rev_" + n for n in g.etype_names)
    assert torch.equal(rg.ntype, g.ntype)
    check_all(rg)


@pytest.mark.parametrize("g", [
    tiny_graph(),
    HeteroGraph(torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),           # single self-loop
    HeteroGraph(torch.tensor([2]), torch.tensor([0]), torch.tensor([3]), num_nodes=5, num_etypes=6),
    synthetic_graph(30, 200, 5, num_ntypes=3, seed=3),
], ids=["tiny", "self_loop", "single_edge_sparse", "synthetic"])
def test_layouts_fixed_graphs(g):
    check_all(g)


def test_lexsort_multipass_matches_packed():
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randint(0, 7, (500,), generator=gen), torch.randint(0, 3, (500,), generator=gen)]
    packed = lexsort(keys, [7, 3])
    huge = lexsort(keys, [1 << 40, 1 << 40])        # product overflows int64: multi-pass path
    assert torch.equal(packed, huge)
    assert sorted(range(500), key=lambda i: (keys[0][i].item(), keys[1][i].item(), i)) == packed.tolist()


def test_layouts_cached_and_graph_immutable():
    g = tiny_graph()
    assert g.csr() is g.csr() and g.compact() is g.compact() and g.in_degree() is g.in_degree()
    with pytest.raises(AttributeError, match="immutable"):
        g.num_nodes = 3
    with pytest.raises(Exception):
        g.csr().col = None          # frozen dataclass


def test_pickle_and_deepcopy():
    import copy
    import pickle
    g = tiny_graph()
    for h in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        assert torch.equal(h.src, g.src) and h.etype_names == g.etype_names and h.num_nodes == g.num_nodes
        check_all(h)


def test_to_device_keeps_everything():
    g = tiny_graph()
    assert g.to("cpu") is g
    assert g.device == torch.device("cpu")


def test_tiny_graph_shape():
    g = tiny_graph()
    assert (g.num_nodes, g.num_ntypes, g.num_etypes) == (40, 2, 4)
    assert 140 <= g.num_edges <= 160
    per = g.edges_per_etype().tolist()
    assert per.count(0) == 1                               # one empty relation
    assert bool(((g.src == g.dst)).any())                  # a self-loop
    touched = torch.zeros(40, dtype=torch.bool)
    touched[g.src] = True
    touched[g.dst] = True
    assert int((~touched).sum()) >= 1                      # an isolated node
    # relations respect node types
    assert g.etype_names == ("cites", "writes", "unused", "written_by")
    assert torch.equal(tiny_graph().src, g.src)            # deterministic


def test_stats_tiny():
    g = tiny_graph()
    s = g.stats()
    assert s["nodes"] == 40 and s["edges"] == g.num_edges and s["relations"] == 4 and s["node_types"] == 2
    assert s["edges_per_relation_min"] == 0 and s["empty_relations"] == 1
    assert s["compact_rows"] == g.compact().num_rows
    assert s["edges_per_compact_row"] == pytest.approx(g.num_edges / g.compact().num_rows)
    assert s["isolated_fraction"] == pytest.approx(1 / 40)
    assert s["in_degree_max"] == int(g.in_degree().max())
    assert s["degree_skew"] == pytest.approx(s["in_degree_max"] / (g.num_edges / 40))
    assert "tiny" in repr(g) and "nodes=40" in repr(g)


def test_position_order_ends_of_the_kernel_graph():
    """csc_src / csc_dst and csr_src / csr_dst: the ends of the edge at each CSC / CSR position (what
    edge-chunk aggregates read instead of src[eid[p]]); the key side is non-decreasing."""
    from pigeon.graph.kernel_graph import kernel_graph
    kg = kernel_graph(synthetic_graph(200, 3000, 5, num_ntypes=3, seed=4))
    for order, key in (("csc", "dst"), ("csr", "src")):
        eid = getattr(kg, f"{order}_eid").long()
        for end in ("src", "dst"):
            got = getattr(kg, f"{order}_{end}")
            assert got.dtype == torch.int32 and torch.equal(got, getattr(kg, end)[eid])
        k = getattr(kg, f"{order}_{key}")
        assert bool((k[1:] >= k[:-1]).all())


def test_edge_chunk_aggregates_read_the_ends_at_the_position():
    import pigeon as pg
    from pigeon.codegen.traversal import render_traversal
    from pigeon.ir.program import TraversalLaunch
    from pigeon.models import rgcn
    from pigeon.passes import schedule
    import os
    os.environ[schedule.ENV] = "edge_chunks"
    try:
        layer = pg.compile(rgcn, tiny_graph(), 16, out_dim=16)
    finally:
        os.environ.pop(schedule.ENV)
    srcs = [render_traversal(l.inst).source for p in (layer.forward_program, layer.backward_program)
            for l in p.launches if isinstance(l, TraversalLaunch) and l.inst.loop == "aggregate"
            and l.inst.schedule == "edge_chunks" and l.inst.side in ("dst", "src")]
    assert srcs
    for s in srcs:
        body = s[s.index('extern "C"'):]
        assert "g_csc_dst[p]" in body or "g_csr_src[p]" in body
        assert "g_dst[e]" not in body and "g_src[e]" not in body
