"""The autodiff pass: backward graphs, run by the reference interpreter, give torch autograd's
gradients; saved values are exactly the forward outputs named saved_<i>."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.ir import OpKind, format_ir
from pigeon.passes.autodiff import AutodiffError, autodiff
from pigeon.reference import run

from graphs import CASES
from test_models_reference import MODELS, IN


def autograd_case(spec, hp, ir, g, seed):
    """fp64 inputs and weights drawn from ``seed``, the reference's output of ``ir``, an upstream
    gradient, and torch autograd's gradients by name: what a backward graph must reproduce."""
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN, dtype=torch.float64, requires_grad=True)
    layer = pg.compile(spec, g, IN, **hp, backend="reference").double()
    params = {k: (torch.randn_like(v) * 0.5).requires_grad_() for k, v in layer.weights.items()}
    out = run(ir, g, {"x": x}, params)["out"]
    up = torch.randn_like(out)
    want = dict(zip(["x"] + list(params), torch.autograd.grad((out * up).sum(), [x] + list(params.values()))))
    return x, params, out, up, want


@pytest.mark.parametrize("case", ["random", "single_edge"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_backward_graph_equals_torch_autograd(model, case):
    seed = random.randrange(1 << 30)
    spec, hp, _ = MODELS[model]
    g = CASES[case](seed)
    ir = spec.trace(IN, **hp)
    res = autodiff(ir)
    x, params, out, up, want = autograd_case(spec, hp, ir, g, seed)
    names = ["x"] + list(params)

    fwd = run(res.forward, g, {"x": x.detach()}, {k: v.detach() for k, v in params.items()})
    torch.testing.assert_close(fwd["out"], out.detach())
    bwd_inputs = {"x": x.detach(), "grad_out": up} | {s: fwd[s] for s in res.saved}
    got = run(res.backward, g, bwd_inputs, {k: v.detach() for k, v in params.items()})
    assert {n for n, _ in res.grads} == set(names)
    for name, out_name in res.grads:
        torch.testing.assert_close(got[out_name], want[name], rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{model} d_{name} seed {seed}: {m}")


def test_saved_and_recomputed_are_explicit():
    from pigeon.models import rgat
    res = autodiff(rgat.trace(8, heads=2, out_dim=3))
    text = format_ir(res.backward, locs=False)
    for s in res.saved:
        assert f"%{s} = input()" in text
    kinds = {res.forward.op(k).kind for k in res.recomputed}
    assert OpKind.TYPED_LINEAR not in kinds and OpKind.EDGE_SOFTMAX not in kinds
    saved_kinds = {res.forward.op(res.forward.outputs[1 + i]).kind for i in range(len(res.saved))}
    assert saved_kinds <= {OpKind.TYPED_LINEAR, OpKind.EDGE_SOFTMAX, OpKind.AGGREGATE}


def test_max_aggregation_backward_is_refused_clearly():
    spec = pg.layer(lambda g, x: pg.aggregate(g, g.src(x), "max"))
    with pytest.raises(AutodiffError, match="max aggregation is forward-only"):
        autodiff(spec.trace(4))
