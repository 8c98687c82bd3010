"""Lowering: the kernel programs of every model, forward and backward, executed instance by
instance (plain-torch semantics of each instance, and the emulated CUDA text), equal the
reference interpreter on fresh random graphs and inputs; every temporary buffer starts as NaN."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.graph.kernel_graph import kernel_graph
from pigeon.passes.lower import lower
from pigeon.ir.program import GemmLaunch, TraversalLaunch
from pigeon.passes.autodiff import autodiff
from pigeon.reference import run
from pigeon.runtime.program import BACKENDS, Executor

from graphs import CASES
from test_models_reference import IN, MODELS


def _programs(model):
    spec, hp, _ = MODELS[model]
    ir = spec.trace(IN, **hp)
    res = autodiff(ir)
    return spec, hp, ir, res, lower(res.forward), lower(res.backward)


@pytest.mark.parametrize("backend", ["torch", "emulate", "emulate_edge_chunks"])
@pytest.mark.parametrize("case", ["random", "single_edge"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_kernel_programs_equal_reference(model, case, backend, monkeypatch):
    chunks = backend == "emulate_edge_chunks"     # every sum aggregation on the edge-chunk schedule
    backend = "emulate" if chunks else backend
    if backend == "emulate":
        from pigeon.runtime import emulate as cuda_emulate
        if not cuda_emulate.available():
            pytest.skip("no C++ compiler for the CUDA emulation")
    seed = random.randrange(1 << 30)
    spec, hp, ir, res, fwd, bwd = _programs(model)
    g = CASES[case](seed)
    kg = kernel_graph(g)
    if chunks:
        from pigeon.passes.schedule import ENV, choose_schedules
        monkeypatch.setenv(ENV, "edge_chunks")
        fwd, bwd = choose_schedules(fwd, kg.degree_stats), choose_schedules(bwd, kg.degree_stats)
        assert "edge_chunks" in fwd.describe() + bwd.describe()
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN)
    layer = pg.compile(spec, g, IN, **hp, backend="reference")
    params = {k: torch.randn_like(v) * 0.5 for k, v in layer.weights.items()}
    want = run(res.forward, g, {"x": x}, params)
    ex = Executor(fwd, BACKENDS[backend](), poison=True)
    got = ex.run(kg, {"x": x}, params)
    for name in res.forward.output_names:
        a, b = got[name], want[name]
        if res.forward.op(res.forward.outputs[res.forward.output_names.index(name)]).type.domain.value == "edge":
            b = b[kg.edge_perm]          # kernels hold edges in kernel order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{model} fwd {name} seed {seed}: {m}")
    up = torch.randn_like(want["out"])
    saved_k = {s: got[s] for s in res.saved}
    saved_r = {s: want[s] for s in res.saved}
    want_b = run(res.backward, g, {"x": x, "grad_out": up} | saved_r, params)
    used = {n for n, _ in bwd.inputs}
    got_b = Executor(bwd, BACKENDS[backend](), poison=True).run(
        kg, {k: v for k, v in ({"x": x, "grad_out": up} | saved_k).items() if k in used}, params)
    for _, out_name in res.grads:
        torch.testing.assert_close(got_b[out_name], want_b[out_name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{model} {out_name} seed {seed}: {m}")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_lowering_uses_only_generated_kernel_families(model):
    *_, fwd, bwd = _programs(model)
    for p in (fwd, bwd):
        kinds = {type(l).__name__ for l in p.launches}
        assert kinds <= {"GemmLaunch", "TraversalLaunch", "HostAdd"}
    # the graph work (typed linears, softmax, aggregation) is in GEMM and traversal kernels
    assert any(isinstance(l, GemmLaunch) for l in fwd.launches)
    assert any(isinstance(l, TraversalLaunch) and l.inst.loop == "aggregate" for l in fwd.launches)


def test_compact_rows_lower_to_a_compact_map_read_by_edges():
    """gather(compact_src) materializes on compact rows; expand_compact is a load through
    edge_to_compact inside the edge loop that reads it; the program equals the reference."""
    from pigeon.ir import IRGraph, Op, OpKind, ValueType, Domain, make_op
    from pigeon.ir.expr import RowRef
    from pigeon.graph import tiny_graph
    from pigeon.runtime.program import TorchBackend
    x = Op(OpKind.INPUT, (), (("name", "x"),), ValueType(Domain.NODE, (4,)))
    c = make_op(OpKind.GATHER, [x], side="compact_src")
    e = make_op(OpKind.EXPAND_COMPACT, [c])
    a = make_op(OpKind.AGGREGATE, [e], reduce="sum")
    ir = IRGraph([x, c, e, a], [a.key])
    prog = lower(ir)
    loops = [(l.inst.loop, l.inst.out.rows) for l in prog.launches]
    assert loops == [("compact_map", "compact"), ("aggregate", "node")]
    agg = prog.launches[1].inst
    assert [n.row for n in agg.expr.toposort() if n.op == "load"] == [RowRef.COMPACT]
    g = tiny_graph()
    xv = torch.randn(g.num_nodes, 4)
    out = Executor(prog, TorchBackend()).run(kernel_graph(g), {"x": xv}, {})
    torch.testing.assert_close(out[prog.outputs[0][0]], run(ir, g, {"x": xv}, {})[ir.output_names[0]])
