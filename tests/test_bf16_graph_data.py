"""Storage choices of 16-bit layers (pigeon/passes/lower.py) that keep systematic rounding out of sums
over many rows (RGCN's bias gradient over all nodes):

* graph constants stay float32: a 1/degree normalizer rounded to bf16 is off by the same relative
  amount for every node of that degree (it did not turn out to be the cause of the AM-sized bf16
  bias-gradient miss on the H200, but it is the same kind of bias);
* a sum aggregation read only by elementwise ops stays float32: rounded to bf16 and added to another
  bf16 value, the result often lies exactly between two bf16 numbers and a tiny third addend (the bias
  after one SGD step) rounds every such tie the same way (benchmarks/debug_bias_grad.py on the H200:
  the output's column means off by 6.7e-4, the bias gradient 36x the bf16 reference's error)."""
import torch

import pigeon as pg
from pigeon.graph import HeteroGraph
from pigeon.models import MODELS

DIM = 8


def _regular_graph(n: int, seed: int = 0) -> HeteroGraph:
    gen = torch.Generator().manual_seed(seed)
    dst = torch.cat([torch.arange(n).repeat_interleave(3), torch.arange(n).repeat_interleave(6)])
    etype = torch.cat([torch.zeros(3 * n, dtype=torch.long), torch.ones(6 * n, dtype=torch.long)])
    src = torch.randint(0, n, (9 * n,), generator=gen)
    return HeteroGraph(src, dst, etype, num_nodes=n, num_etypes=2)


def test_graph_data_buffers_are_float32_in_a_bf16_layer():
    layer = pg.compile(MODELS["rgcn"], _regular_graph(50), DIM, out_dim=DIM, dtype="bfloat16")
    for prog in (layer.forward_program, layer.backward_program):
        assert prog.graph_data
        for _, b in prog.graph_data:
            assert prog.buffer(b).dtype == "float32"


def test_sum_aggregation_read_elementwise_is_float32_in_a_bf16_layer():
    """RGCN's aggregate feeds only the elementwise tail (agg + x W_self + b): float32; the program's
    outputs and the buffers GEMMs read stay bf16; a float32 layer is unchanged."""
    from pigeon.ir.program import TraversalLaunch
    g = _regular_graph(50)
    layer = pg.compile(MODELS["rgcn"], g, DIM, out_dim=DIM, dtype="bfloat16")
    fwd = layer.forward_program
    aggs = [la.inst for la in fwd.launches if isinstance(la, TraversalLaunch) and la.inst.loop == "aggregate"]
    assert aggs and all(a.out.dtype == "float32" for a in aggs)
    assert all(fwd.buffer(b).dtype == "bfloat16" for _, b in fwd.outputs)
    gemm_reads = {name for la in fwd.launches if not isinstance(la, TraversalLaunch) for name in la.reads()}
    assert gemm_reads and all(fwd.buffer(b).dtype in ("bfloat16", "int32", "int64") for b in gemm_reads)
    f32 = pg.compile(MODELS["rgcn"], g, DIM, out_dim=DIM)
    assert all(b.dtype == "float32" for b in f32.forward_program.buffers)
    # the semantics still match the reference within bf16 tolerance, forward and backward
    x = torch.randn(g.num_nodes, DIM, generator=torch.Generator().manual_seed(1))
    ref = pg.compile(MODELS["rgcn"], g, DIM, out_dim=DIM, backend="reference")
    ref.weights.load_state_dict({k: v.detach().bfloat16().float() for k, v in layer.weights.items()})
    xa, xb = x.bfloat16().requires_grad_(True), x.bfloat16().float().requires_grad_(True)
    a, b = layer(xa), ref(xb)
    torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    a.float().pow(2).mean().backward()
    b.pow(2).mean().backward()
    torch.testing.assert_close(xa.grad.float(), xb.grad, rtol=3e-2, atol=3e-2 * float(xb.grad.abs().max()))


def _column_bias(n: int = 20000):
    """Per column: |mean signed error| / mean |error| of a bf16 RGCN layer's output against float64
    math on the same bf16 inputs and weights, on a graph of in-degree 1 (agg is one bf16 message)
    with a tiny positive bias (as after one SGD step from zero)."""
    gen = torch.Generator().manual_seed(3)
    g = HeteroGraph(torch.randint(0, n, (n,), generator=gen), torch.arange(n), torch.zeros(n, dtype=torch.long),
                    num_nodes=n, num_etypes=1)
    layer = pg.compile(MODELS["rgcn"], g, DIM, out_dim=DIM, dtype="bfloat16")
    with torch.no_grad():
        for k, v in layer.weights.items():
            v.copy_(torch.randn(v.shape, generator=gen) * 0.3 if k != "b" else torch.full(v.shape, 1e-6))
    x = torch.randn(n, DIM, generator=gen).bfloat16()
    with torch.no_grad():
        out = layer(x).double()
    w = {k: v.detach().bfloat16().double() for k, v in layer.weights.items()}
    xd = x.double()
    want = xd[g.src] @ w["W"][0] + xd @ w["W_self"] + w["b"]
    err = out - want
    return (err.mean(0).abs() / err.abs().mean(0)).max().item()


def test_dense_gemm_rows_read_elementwise_are_float32_so_a_tiny_bias_breaks_no_ties():
    """x W_self feeds only the elementwise tail: its rows are float32 (cuBLAS writes them,
    GemmInstance.y_dtype), so agg + x W_self + b is rounded once. Rounded to bf16 first, a bf16 message
    plus x W_self lands on a bf16 tie for about a third of the elements and the bias of 1e-6 rounds
    all of them up: the worst column's mean error is 0.36 of its mean |error| (measured before this
    storage choice; 0.022 with it, where unbiased rounding over 20000 rows gives ~0.01-0.02)."""
    from pigeon.ir.program import GemmLaunch
    layer = pg.compile(MODELS["rgcn"], _regular_graph(50), DIM, out_dim=DIM, dtype="bfloat16")
    fwd = layer.forward_program
    dense = [la for la in fwd.launches if isinstance(la, GemmLaunch) and not la.inst.typed]
    assert len(dense) == 1 and dense[0].inst.y_dtype == "float32" and dense[0].backend == "cublas"
    assert fwd.buffer(dense[0].y).dtype == "float32" and dense[0].inst.dtype == "bfloat16"
    typed = [la for la in fwd.launches if isinstance(la, GemmLaunch) and la.inst.typed]
    assert typed and all(la.inst.y_dtype is None for la in typed)
    assert _column_bias() < 0.08
