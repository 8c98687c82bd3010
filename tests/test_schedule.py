"""The schedule cost model: skewed graphs get the edge-chunk sum aggregation, balanced ones keep
the node schedule; the override is checked; the choice reaches compiled layers."""
import pytest

import pigeon as pg
from pigeon.graph import load
from pigeon.graph.synthetic import synthetic_graph
from pigeon.passes.schedule import ENV, ScheduleError, aggregate_schedule


def test_cost_model_follows_the_hub_term(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    balanced = {"num_nodes": 1_000_000, "num_edges": 10_000_000, "max_in_degree": 40, "max_out_degree": 40,
                "mean_degree": 10.0}
    skewed = dict(balanced, max_in_degree=200_000)
    assert aggregate_schedule(64, balanced) == "node"
    assert aggregate_schedule(64, skewed) == "edge_chunks"
    assert aggregate_schedule(64, skewed, side="src") == "node"     # out-degrees are balanced here
    monkeypatch.setenv(ENV, "node")
    assert aggregate_schedule(64, skewed) == "node"
    monkeypatch.setenv(ENV, "sideways")
    with pytest.raises(ScheduleError, match="expected auto, node or edge_chunks"):
        aggregate_schedule(64, skewed)


def test_compiled_layers_carry_the_choice(monkeypatch):
    monkeypatch.setenv(ENV, "edge_chunks")
    from pigeon.models import rgcn
    layer = pg.compile(rgcn, load("tiny"), 8, out_dim=8)
    assert "sum/dst/edge_chunks" in layer.forward_program.describe()
    monkeypatch.setenv(ENV, "node")
    layer = pg.compile(rgcn, load("tiny"), 8, out_dim=8)
    assert "edge_chunks" not in layer.forward_program.describe() + layer.backward_program.describe()


def test_edge_chunks_take_8_elements_per_thread_where_destinations_have_many_members(monkeypatch):
    """aggregate_vec: 8 per thread from mean degree 8 on (AM-sized, 3.6, stays at 1), only for
    widths that split into more than one 8-element slice, only on the edge_chunks schedule."""
    from pigeon.ir.program import TraversalLaunch
    from pigeon.models import rgcn
    from pigeon.passes.schedule import aggregate_vec, choose_schedules
    busy = {"num_nodes": 1_000_000, "num_edges": 20_000_000, "max_in_degree": 900_000, "max_out_degree": 40,
            "mean_degree": 20.0}
    assert aggregate_vec(64, busy) == 8 and aggregate_vec(64, busy, "src") == 8
    assert aggregate_vec(64, dict(busy, mean_degree=3.6)) == 1
    small = dict(busy, num_nodes=10_942, num_edges=547_872, mean_degree=50.0)      # ACM: 68k threads at 8
    assert aggregate_vec(64, small) == 1
    assert aggregate_vec(8, busy) == 1 and aggregate_vec(60, busy) == 1
    assert aggregate_vec(64, busy, "compact") == 1
    monkeypatch.delenv(ENV, raising=False)
    layer = pg.compile(rgcn, load("tiny"), 16, out_dim=16)
    for stats, want in ((busy, {8}), (dict(busy, mean_degree=3.6), {1})):
        prog = choose_schedules(layer.lowered[0], stats)
        aggs = [l.inst for l in prog.launches if isinstance(l, TraversalLaunch) and l.inst.loop == "aggregate"
                and l.inst.reduce == "sum"]
        assert aggs and {i.vec for i in aggs if i.schedule == "edge_chunks" and i.out.width == 16} == want
        assert all(i.vec == 1 for i in aggs if i.schedule == "node")


def test_instance_keys_leave_out_the_default_vec():
    """Adding the field kept every other instance's key, so the disk cache's kernels still hit."""
    import dataclasses
    from pigeon.codegen.traversal import kernel_name, render_traversal
    from pigeon.ir.expr import Buffer, RowRef, load as ld
    from pigeon.ir.traversal import TraversalInstance
    inst = TraversalInstance("aggregate", ld(Buffer("x", "node", (64,)), RowRef.SRC), Buffer("out", "node", (64,)),
                             side="dst", reduce="sum", schedule="edge_chunks")
    assert kernel_name(inst) == "pigeon_trav_8e1723e8f821019c"      # its name before the field
    v8 = dataclasses.replace(inst, vec=8)
    assert kernel_name(v8) != kernel_name(inst)
    assert "constexpr int V = 8;" in render_traversal(v8).source
    assert "constexpr int V = 1;" in render_traversal(inst).source
