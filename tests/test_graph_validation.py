"""HeteroGraph rejects every bad input with a message naming the tensor and the offending position."""
import re

import pytest
import torch

from pigeon.graph import GraphError, HeteroGraph


def T(*xs, dtype=torch.int64):
    return torch.tensor(xs, dtype=dtype)


def make(src=None, dst=None, etype=None, **kw):
    return HeteroGraph(T(0, 1, 2) if src is None else src, T(1, 2, 0) if dst is None else dst,
                       T(0, 1, 0) if etype is None else etype, **kw)


def test_valid_defaults():
    g = make(src=T(0, 1, 2, dtype=torch.int32), dst=T(1, 2, 0, dtype=torch.uint8))
    assert (g.num_nodes, g.num_edges, g.num_etypes, g.num_ntypes) == (3, 3, 2, 1)
    for t in (g.src, g.dst, g.etype, g.ntype):
        assert t.dtype == torch.int64 and t.is_contiguous()
    assert g.ntype.tolist() == [0, 0, 0]
    assert g.etype_names == ("r0", "r1") and g.ntype_names == ("n0",)
    assert g.name == "graph"


def test_counts_can_exceed_used_ids():
    g = make(num_nodes=10, num_etypes=5, ntype=torch.zeros(10, dtype=torch.long), num_ntypes=3)
    assert (g.num_nodes, g.num_etypes, g.num_ntypes) == (10, 5, 3)
    assert g.edges_per_etype().tolist() == [2, 1, 0, 0, 0]


def test_non_contiguous_input_is_copied():
    base = torch.tensor([[0, 9], [1, 9], [2, 9]])
    g = make(src=base[:, 0])
    assert g.src.is_contiguous() and g.src.tolist() == [0, 1, 2]


@pytest.mark.parametrize("which", ["src", "dst", "etype"])
def test_not_a_tensor(which):
    with pytest.raises(GraphError, match=f"^{which} must be a torch.Tensor, got list"):
        make(**{which: [0, 1, 2]})


@pytest.mark.parametrize("which", ["src", "dst", "etype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_wrong_dtype(which, dtype):
    with pytest.raises(GraphError, match=f"^{which} must have an integer dtype, got {re.escape(str(dtype))}"):
        make(**{which: torch.zeros(3, dtype=dtype)})


def test_ntype_wrong_dtype():
    with pytest.raises(GraphError, match=r"^ntype must have an integer dtype, got torch.float64"):
        make(ntype=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("which", ["src", "dst", "etype"])
def test_not_1d(which):
    with pytest.raises(GraphError, match=rf"^{which} must be 1-D, got shape \(3, 1\)"):
        make(**{which: torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(GraphError, match=rf"^{which} must be 1-D, got shape \(\)"):
        make(**{which: torch.tensor(0)})


def test_ntype_not_1d():
    with pytest.raises(GraphError, match=r"^ntype must be 1-D"):
        make(ntype=torch.zeros(3, 1, dtype=torch.long))


def test_mismatched_lengths():
    with pytest.raises(GraphError, match=r"same length, got src=3, dst=2, etype=4"):
        make(dst=T(1, 2), etype=T(0, 0, 0, 0))


def test_mismatched_devices():
    meta = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(GraphError, match="one device"):
        make(dst=meta)


@pytest.mark.parametrize("which", ["src", "dst", "etype"])
def test_negative_ids(which):
    bad = T(0, 1, -4, 2)
    good = T(0, 1, 1, 0)
    kw = {k: (bad if k == which else good) for k in ("src", "dst", "etype")}
    with pytest.raises(GraphError, match=rf"^{which} has a negative value -4 at edge 2"):
        HeteroGraph(**kw)


def test_negative_ntype():
    with pytest.raises(GraphError, match=r"^ntype has a negative value -1 at node 1"):
        make(ntype=T(0, -1, 0))


@pytest.mark.parametrize("which", ["src", "dst"])
def test_node_id_out_of_range(which):
    kw = {which: T(0, 3, 1)}
    with pytest.raises(GraphError, match=rf"^{which}\[1\] = 3 is out of range at edge 1: num_nodes is 3"):
        make(num_nodes=3, **kw)


def test_etype_out_of_range():
    with pytest.raises(GraphError, match=r"^etype\[2\] = 2 is out of range at edge 2: num_etypes is 2"):
        make(etype=T(0, 1, 2), num_etypes=2)


def test_ntype_out_of_range():
    with pytest.raises(GraphError, match=r"^ntype\[2\] = 5 is out of range at node 2: num_ntypes is 2"):
        make(ntype=T(0, 1, 5), num_ntypes=2)


def test_ntype_length_mismatch():
    with pytest.raises(GraphError, match=r"^ntype has length 2 but num_nodes is 3"):
        make(ntype=T(0, 1), num_nodes=3)


def test_ntype_defines_num_nodes():
    g = make(ntype=T(0, 1, 1, 0))
    assert g.num_nodes == 4
    with pytest.raises(GraphError, match=r"^src\[2\] = 2 is out of range at edge 2: num_nodes is 2"):
        make(ntype=T(0, 1))


def test_empty_graph_no_edges():
    e = torch.zeros(0, dtype=torch.long)
    with pytest.raises(GraphError, match=r"^empty graph: src, dst and etype have zero edges"):
        HeteroGraph(e, e, e, num_nodes=5)


def test_empty_graph_no_nodes():
    with pytest.raises(GraphError, match=r"^empty graph: num_nodes is 0"):
        make(num_nodes=0)


def test_etype_names_wrong_length():
    with pytest.raises(GraphError, match=r"^etype_names has 1 names but num_etypes is 2"):
        make(etype_names=["a"])


def test_ntype_names_wrong_length():
    with pytest.raises(GraphError, match=r"^ntype_names has 3 names but num_ntypes is 1"):
        make(ntype_names=["a", "b", "c"])


def test_graph_error_is_value_error():
    assert issubclass(GraphError, ValueError)
