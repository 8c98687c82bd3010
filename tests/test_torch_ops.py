"""The torch.library ops of compiled layers: opcheck, torch.compile without graph breaks, and
autograd through the kernel programs (on the CPU: each instance's torch semantics)."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.models import rgat, rgcn
from pigeon.reference import run

from graphs import random_graph



def _layer(spec, seed, **hp):
    g = random_graph(seed)
    layer = pg.compile(spec, g, 8, backend="kernels", seed=seed, **hp)
    return g, layer


def test_opcheck_layer_forward():
    seed = random.randrange(1 << 30)
    g, layer = _layer(rgcn, seed, out_dim=4)
    x = torch.randn(g.num_nodes, 8, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.weights.values()]
    torch.library.opcheck(torch.ops.pigeon.layer_forward.default, (layer.layer_id, [x], params))


def test_torch_compile_fullgraph_matches_eager():
    seed = random.randrange(1 << 30)
    g, layer = _layer(rgat, seed, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, 8)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")   # a graph break is an error
    torch.testing.assert_close(compiled(x), layer(x))
    x.requires_grad_(True)
    compiled(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_kernels_backend_gradients_equal_reference():
    seed = random.randrange(1 << 30)
    g, layer = _layer(rgat, seed, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, 8, requires_grad=True)
    out = layer(x)
    up = torch.randn_like(out)
    got = torch.autograd.grad((out * up).sum(), [x] + list(layer.weights.values()))
    x2 = x.detach().clone().requires_grad_(True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.weights.items()}
    ref = run(layer.ir, g, {"x": x2}, params)["out"]
    want = torch.autograd.grad((ref * up).sum(), [x2] + list(params.values()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_wrong_input_shape_is_a_clear_error():
    g, layer = _layer(rgcn, 1, out_dim=4)
    with pytest.raises(Exception, match=r"input 'x' has shape \[30, 7\], expected \[30, 8\]"):
        layer(torch.randn(g.num_nodes, 7))


def test_forward_only_spec_runs_and_backward_raises_clearly():
    spec = pg.layer(lambda g, x: pg.aggregate(g, g.src(x), "max"))
    g = random_graph(3)
    layer = pg.compile(spec, g, 4)                   # kernels are the default backend
    x = torch.randn(g.num_nodes, 4, requires_grad=True)
    out = layer(x)
    ref = run(layer.ir, g, {"x": x}, {})["out"]
    torch.testing.assert_close(out, ref)
    with pytest.raises(RuntimeError, match="max aggregation is forward-only.*backend='reference'"):
        out.sum().backward()


def test_layer_backward_opcheck():
    seed = random.randrange(1 << 30)
    g, layer = _layer(rgcn, seed, out_dim=4)
    from pigeon.runtime.ops import get_layer
    lp = get_layer(layer.layer_id)
    x = torch.randn(g.num_nodes, 8)
    params = [p.detach().clone() for p in layer.weights.values()]
    outs = torch.ops.pigeon.layer_forward(layer.layer_id, [x], params)
    grads = [torch.randn_like(outs[0])]
    torch.library.opcheck(torch.ops.pigeon.layer_backward.default,
                          (layer.layer_id, grads, [x], params, lp.saved_of(outs)))
