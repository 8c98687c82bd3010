"""pigeon::gemm and pigeon::traversal: the kernel families as torch.library ops (opcheck: schema,
fake kernel, autograd registration, and gradients against their plain-torch semantics)."""
import random

import pytest
import torch

from pigeon.graph.kernel_graph import kernel_graph
from pigeon.ir.kernel import GemmInstance
from pigeon.runtime.kernel_ops import graph_args, instance_json

from graphs import random_graph
from traversal_cases import random_inputs, traversal_cases



def _seg(kg):
    return kg.etype_ptr


@pytest.mark.parametrize("inst", [
    GemmInstance("rows", 6, 5, gather=True),
    GemmInstance("rows", 6, 5, heads=2, transpose_w=True),
    GemmInstance("weight_grad", 6, 5, gather=True),
], ids=["rows_gather", "rows_heads_transpose", "weight_grad"])
def test_gemm_op(inst):
    seed = random.randrange(1 << 30)
    g = random_graph(seed)
    kg = kernel_graph(g)
    torch.manual_seed(seed)
    E, N, R, H = kg.num_edges, kg.num_nodes, kg.num_etypes, inst.heads
    if inst.form == "rows":
        a = torch.randn(N if inst.gather else E, *((H,) if H > 1 else ()), inst.k, requires_grad=True)
        wshape = (R,) + ((H,) if H > 1 else ()) + ((inst.n, inst.k) if inst.transpose_w else (inst.k, inst.n))
        b = torch.randn(wshape, requires_grad=True)
    else:
        a = torch.randn(N, inst.k, requires_grad=True)
        b = torch.randn(E, inst.n, requires_grad=True)
    args = (instance_json(inst), a, b, _seg(kg), kg.src if inst.gather else None, None, None, E)
    torch.library.opcheck(torch.ops.pigeon.gemm.default, args)
    out = torch.ops.pigeon.gemm(*args)
    from pigeon.runtime.family_gemm import gemm_reference
    from pigeon.runtime.kernel_ops import _gemm_shape
    y = torch.zeros(_gemm_shape(inst, a, _seg(kg), E))
    x_, w_, y_ = (a, b, y) if inst.form == "rows" else (a, y, b)
    ref = gemm_reference(inst, x_, w_, _seg(kg), kg.src if inst.gather else None, None, y_)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad((out * up).sum(), [a, b])
    g2 = torch.autograd.grad((ref * up).sum(), [a, b])
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


CASES = {name: (inst, shapes) for name, inst, shapes in traversal_cases()}


@pytest.mark.parametrize("name", ["aggregate_sum_dst", "edge_softmax_dot", "edge_map_message", "type_reduce_etype_edge"])
def test_traversal_op(name):
    if name not in CASES:
        pytest.skip(f"no traversal case {name}")
    inst, _ = CASES[name]
    seed = random.randrange(1 << 30)
    kg = kernel_graph(random_graph(seed))
    bufs = random_inputs(inst, kg, seed=seed)
    inputs = [bufs[b.name].clone().requires_grad_() for b in inst.inputs()]
    sizes, graph = graph_args(kg)
    args = (instance_json(inst), sizes, graph, inputs)
    torch.library.opcheck(torch.ops.pigeon.traversal.default, args)
    from pigeon.runtime.family_traversal import run_traversal_reference
    out = torch.ops.pigeon.traversal(*args)
    ref = run_traversal_reference(inst, kg, dict(zip([b.name for b in inst.inputs()], inputs)))
    torch.testing.assert_close(out, ref.reshape(out.shape), rtol=1e-5, atol=1e-5)
    up = torch.randn_like(out)
    got = torch.autograd.grad((out * up).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref.reshape(out.shape) * up).sum(), inputs, allow_unused=True)
    for p, q, t in zip(got, want, inputs):
        q = torch.zeros_like(t) if q is None else q
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} seed {seed}: {m}")
