"""TVM (llvm) traversal kernels against the plain-torch semantics of traversal instances."""
import math

import pytest
import torch

tvm = pytest.importorskip("tvm")

from pigeon.codegen.traversal_ref import run_traversal_reference  # noqa: E402
from pigeon.codegen.tvm_traversal import (  # noqa: E402
    TraversalTvmError, build_traversal_llvm, graph_arrays, run_traversal_llvm, traversal_cuda_source,
    traversal_primfunc)
from pigeon.ir.traversal import Buffer, Expr, RowRef, TraversalInstance, load  # noqa: E402

from traversal_cases import (  # noqa: E402
    H, D, case_graphs, poisoned_output, random_inputs, traversal_cases)

CASES = traversal_cases()
GRAPHS = case_graphs()


def _check(inst, kg, seed):
    bufs = random_inputs(inst, kg, seed=seed)
    out = poisoned_output(inst, kg)
    ptr = out.data_ptr()
    ret = run_traversal_llvm(inst, kg, bufs, out)
    assert ret is out and out.data_ptr() == ptr
    ref = run_traversal_reference(inst, kg, bufs).reshape(out.shape)
    assert not torch.isnan(out).any(), "output left unwritten (NaN poison survived)"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,inst,shapes", CASES, ids=[c[0] for c in CASES])
def test_case_matches_reference(name, inst, shapes):
    for i, (gname, kg) in enumerate(GRAPHS):
        try:
            _check(inst, kg, seed=100 * i + len(name))
        except AssertionError as e:
            raise AssertionError(f"graph {gname}: {e}") from None


def test_cases_cover_every_loop_and_op():
    loops, ops, refs, unary, binary = set(), set(), set(), set(), set()
    for _, inst, _ in CASES:
        loops.add((inst.loop, inst.side, inst.reduce) if inst.loop == "aggregate" else
                  (inst.loop, inst.rows, inst.per) if inst.loop == "type_reduce" else inst.loop)
        stack = [inst.expr]
        while stack:
            e = stack.pop()
            ops.add(e.op)
            if e.op == "load":
                refs.add((e.row, inst.edge_loop))
            unary.add(e.fn) if e.op == "unary" else binary.add(e.fn) if e.op == "binary" else None
            stack.extend(e.args)
    from pigeon.ir.traversal import BINARY_C, UNARY_C
    assert {("aggregate", s, r) for s in ("dst", "src") for r in ("sum", "mean", "max")} <= loops
    assert {("type_reduce", "edge", "etype"), ("type_reduce", "edge", "none"),
            ("type_reduce", "node", "ntype"), ("type_reduce", "node", "none")} <= loops
    assert {"edge_map", "node_map", "edge_softmax"} <= loops
    assert ops == {"load", "const", "unary", "binary", "dot", "sum_to", "reshape"}
    assert set(UNARY_C) <= unary and set(BINARY_C) <= binary
    assert {(RowRef.SELF, True), (RowRef.SRC, True), (RowRef.DST, True), (RowRef.ETYPE, True),
            (RowRef.NONE, True), (RowRef.SELF, False), (RowRef.NTYPE, False), (RowRef.NONE, False)} <= refs


def test_graphs_have_corner_cases():
    kg = dict(GRAPHS)["random"]
    indeg = torch.bincount(kg.dst.long(), minlength=kg.num_nodes)
    outdeg = torch.bincount(kg.src.long(), minlength=kg.num_nodes)
    assert ((indeg == 0) & (outdeg == 0)).any()                                  # isolated nodes
    assert (kg.src == kg.dst).any()                                              # self-loops
    assert (torch.bincount(kg.etype.long(), minlength=kg.num_etypes) == 0).any()  # empty relation
    assert (torch.bincount(kg.ntype.long(), minlength=kg.num_ntypes) == 0).any()  # empty node type
    assert dict(GRAPHS)["single_edge"].num_edges == 1


def _agg_inst(reduce="sum"):
    x = Buffer("x", "node", (H, D))
    return TraversalInstance("aggregate", load(x, RowRef.SRC), Buffer("o", "node", (H, D)), reduce=reduce)


def test_one_build_serves_every_graph_and_is_cached():
    inst = _agg_inst("mean")
    f = build_traversal_llvm(inst)
    assert build_traversal_llvm(inst) is f
    same = TraversalInstance("aggregate", inst.expr, inst.out, reduce="mean")   # equal key, new object
    assert build_traversal_llvm(same) is f
    for i, (_, kg) in enumerate(GRAPHS):
        _check(inst, kg, seed=i)


def test_primfunc_has_symbolic_rows_and_data_dependent_loops():
    func = traversal_primfunc(_agg_inst())
    names = [p.name for p in func.params]
    assert names[:4] == ["num_nodes", "num_edges", "num_etypes", "num_ntypes"]
    assert names[4:] == list(graph_arrays(_agg_inst())) + ["x", "o"]
    text = func.script()
    assert "csc_ptr[v]" in text and "csc_ptr[v + T.int64(1)]" in text
    assert "T.parallel(num_nodes)" in text


def test_output_of_any_shape_with_right_size():
    """out may be [rows, *shape], [rows, width] or (per none) [*shape]."""
    kg = GRAPHS[0][1]
    x = Buffer("x", "node", (H, D))
    inst = TraversalInstance("type_reduce", load(x, RowRef.SELF), Buffer("o", "global", (H, D)),
                             rows="node", per="none")
    bufs = random_inputs(inst, kg)
    out = torch.full((H, D), float("nan"))
    run_traversal_llvm(inst, kg, bufs, out)
    torch.testing.assert_close(out, bufs["x"].sum(0), rtol=1e-5, atol=1e-5)
    inst2 = _agg_inst()
    out2 = torch.full((kg.num_nodes, H * D), float("nan"))
    run_traversal_llvm(inst2, kg, random_inputs(inst2, kg), out2)
    assert not out2.isnan().any()


def test_bf16_storage_is_refused():
    x = Buffer("x", "node", (H, D), "bfloat16")
    inst = TraversalInstance("node_map", load(x, RowRef.SELF), Buffer("o", "node", (H, D), "bfloat16"),
                             dtype="bfloat16")
    with pytest.raises(NotImplementedError, match="fp32"):
        build_traversal_llvm(inst)
    kg = GRAPHS[0][1]
    inst32 = _agg_inst()
    with pytest.raises(NotImplementedError, match="float32"):
        run_traversal_llvm(inst32, kg, random_inputs(inst32, kg, dtype=torch.bfloat16),
                           torch.zeros(kg.num_nodes, H, D))


def test_bad_inputs_are_reported():
    kg = GRAPHS[0][1]
    inst = _agg_inst()
    out = torch.zeros(kg.num_nodes, H, D)
    with pytest.raises(KeyError, match="x"):
        run_traversal_llvm(inst, kg, {}, out)
    with pytest.raises(ValueError, match="expected"):
        run_traversal_llvm(inst, kg, {"x": torch.zeros(kg.num_nodes + 1, H, D)}, out)
    with pytest.raises(ValueError, match="contiguous"):
        run_traversal_llvm(inst, kg, {"x": torch.zeros(H * D, kg.num_nodes).t()}, out)
    with pytest.raises(ValueError, match="output o"):
        run_traversal_llvm(inst, kg, {"x": torch.zeros(kg.num_nodes, H, D)}, torch.zeros(kg.num_edges, H, D))


def test_malformed_instances_are_refused():
    x = Buffer("x", "node", (H, D))
    with pytest.raises(TraversalTvmError, match="not allowed"):      # src in a node loop
        traversal_primfunc(TraversalInstance("node_map", load(x, RowRef.SRC), Buffer("o", "node", (H, D))))
    with pytest.raises(TraversalTvmError, match="x has node rows"):  # node buffer read as an edge row
        traversal_primfunc(TraversalInstance("edge_map", load(x, RowRef.SELF), Buffer("o", "edge", (H, D))))
    bad = Expr("binary", (H, D), (load(x, RowRef.SELF), load(Buffer("y", "node", (D,)), RowRef.SELF)), fn="add")
    with pytest.raises(TraversalTvmError, match="broadcast"):
        traversal_primfunc(TraversalInstance("node_map", bad, Buffer("o", "node", (H, D))))
    with pytest.raises(TraversalTvmError, match="not defined"):
        traversal_primfunc(TraversalInstance("type_reduce", load(x, RowRef.SELF), Buffer("o", "etype", (H, D)),
                                             rows="node", per="etype"))


def test_large_feature_offsets_use_64_bit_indices():
    func = traversal_primfunc(_agg_inst())
    assert all(p.ty.dtype == "int64" for p in func.params[:4])


def test_cuda_source_one_thread_per_row():
    name, inst, _ = next(c for c in CASES if c[0] == "edge_softmax_dot")
    try:
        src = traversal_cuda_source(inst)
    except Exception as e:  # no CUDA codegen / compiler on this machine
        pytest.skip(f"TVM CUDA build unavailable: {str(e).splitlines()[0][:200]}")
    assert "__global__" in src and "threadIdx.x" in src and "blockIdx.x" in src
    assert "expf" in src
    with pytest.raises(NotImplementedError, match="atomics"):
        traversal_cuda_source(next(c for c in CASES if c[0] == "type_reduce_etype_edge")[1])


def test_cases_helper_is_generic():
    for name, inst, shapes in CASES:
        assert inst.out.name in shapes and all(b.name in shapes for b in inst.inputs())
        for b in inst.inputs():
            assert shapes[b.name] == (b.rows, b.shape)
        assert math.prod(inst.out.shape) >= 1


def test_inputs_that_require_grad_and_unaligned_views_pass_zero_copy():
    kg = GRAPHS[0][1]
    inst = _agg_inst("max")
    x = random_inputs(inst, kg)["x"]
    shifted = torch.cat([torch.zeros(1), x.flatten()])[1:].view(x.shape).requires_grad_()  # 4-byte offset
    out = torch.full((kg.num_nodes * H * D + 1,), float("nan"))[1:]
    run_traversal_llvm(inst, kg, {"x": shifted}, out)
    torch.testing.assert_close(out.view(-1, H, D), run_traversal_reference(inst, kg, {"x": x}), rtol=1e-5, atol=1e-5)
