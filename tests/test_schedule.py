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
