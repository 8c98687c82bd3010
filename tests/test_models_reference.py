"""Each model spec, run by the reference interpreter, equals a hand-written plain-torch layer,
forward and gradients, on heterographs with empty relations, isolated nodes, self-loops and a
single edge. Computed in float64 so the comparison is tight."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import hgt, rgat, rgcn
from pigeon.reference import run

import torch_layers
from graphs import CASES

import importlib.util, pathlib
_ex = importlib.util.spec_from_file_location(
    "gated_rgat_example", pathlib.Path(__file__).parent.parent / "examples" / "gated_rgat.py")
_mod = importlib.util.module_from_spec(_ex)
_ex.loader.exec_module(_mod)
gated_rgat = _mod.gated_rgat

IN = 8
MODELS = {
    "rgcn_mean": (rgcn, {"out_dim": 5}, lambda g, x, p: torch_layers.rgcn(g, x, p, "mean")),
    "rgcn_sum_nobias": (rgcn, {"out_dim": 5, "aggr": "sum", "bias": False},
                        lambda g, x, p: torch_layers.rgcn(g, x, p, "sum", bias=False)),
    "rgat": (rgat, {"out_dim": 3, "heads": 2}, lambda g, x, p: torch_layers.rgat(g, x, p, 2, 3)),
    "hgt": (hgt, {"heads": 2}, lambda g, x, p: torch_layers.hgt(g, x, p, 2)),
    "gated_rgat": (gated_rgat, {"out_dim": 3, "heads": 2}, lambda g, x, p: torch_layers.gated_rgat(g, x, p, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_spec_equals_plain_torch(model, case):
    seed = random.randrange(1 << 30)          # fresh inputs every run; the seed is in the failure message
    spec, hp, torch_layer = MODELS[model]
    g = CASES[case](seed)
    layer = pg.compile(spec, g, IN, seed=seed, **hp, backend="reference").double()
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN, dtype=torch.float64, requires_grad=True)
    params = {k: (torch.randn_like(v) * 0.5).requires_grad_() for k, v in layer.weights.items()}
    ours = run(layer.ir, g, {"x": x}, params)["out"]
    theirs = torch_layer(g, x, params)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
    up = torch.randn_like(ours)
    leaves = [x] + list(params.values())
    g_ours = torch.autograd.grad((ours * up).sum(), leaves, allow_unused=True)
    g_theirs = torch.autograd.grad((theirs * up).sum(), leaves, allow_unused=True)
    for name, a, b in zip(["x"] + list(params), g_ours, g_theirs):
        a = torch.zeros_like(leaves[0]) if a is None and b is None else a
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}, seed {seed}: {m}")


def test_compiled_module_trains_a_step():
    g = CASES["random"](1)
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, backend="reference")
    x = torch.randn(g.num_nodes, IN)
    loss = layer(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bad_input_tensors_are_named():
    from pigeon.reference import InputError
    g = CASES["random"](2)
    layer = pg.compile(rgcn, g, IN, backend="reference")
    with pytest.raises(InputError, match=r"input 'x' has shape \[30, 7\], expected \[30, 8\]"):
        layer(torch.randn(g.num_nodes, 7))
    with pytest.raises(InputError, match="floating-point"):
        layer(torch.ones(g.num_nodes, IN, dtype=torch.long))


@pg.layer
def reshaped_attention(g, x, *, heads: int = 2, d: int = 3):
    W = pg.weight("W", (x.dim, heads * d), per=g.etype)
    a = pg.weight("a", (heads * d,), per=g.etype)          # one flat vector per relation
    z = pg.typed_linear(g.src(x), W, by=g.etype).heads(heads)
    score = pg.dot(z, a.reshape((heads, d))[g.etype])       # [E, H]
    return pg.aggregate(g, pg.edge_softmax(g, score) * z, "sum").flatten()


def test_reference_reshapes_per_type_weights_keeping_the_type_axis():
    g = load("tiny")
    layer = pg.compile(reshaped_attention, g, 4, backend="reference")
    x = torch.randn(g.num_nodes, 4, requires_grad=True)
    out = layer(x)
    W, a = layer.weights["W"], layer.weights["a"]
    # by hand: relation r's attention vector is a[r] viewed as [heads, d]
    z = torch.einsum("ek,ekn->en", x[g.src], W[g.etype]).reshape(-1, 2, 3)
    score = (z * a.reshape(g.num_etypes, 2, 3)[g.etype]).sum(-1)
    from pigeon.reference import aggregate, edge_softmax
    want = aggregate(edge_softmax(score, g.dst, g.num_nodes)[..., None] * z, g.dst, g.num_nodes, "sum")
    torch.testing.assert_close(out, want.reshape(g.num_nodes, 6))
    out.sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape


@pg.layer
def max_messages(g, x, *, out_dim: int = 3):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    return pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), "max")


@pg.layer
def transformed_global_weight(g, x, *, out_dim: int = 3):
    W = pg.weight("W", (x.dim, out_dim))
    return pg.linear(x, pg.relu(W))      # elementwise work on a global weight, read by a GEMM


def test_per_type_weight_math_runs_on_kernels():
    """Elementwise work on per-type weights (a reshape of each relation's vector) is a type_map
    kernel; the layer equals the reference forward and backward."""
    g = load("tiny")
    torch.manual_seed(0)
    x = torch.randn(g.num_nodes, 4, requires_grad=True)
    k = pg.compile(reshaped_attention, g, 4, backend="kernels")
    r = pg.compile(reshaped_attention, g, 4, backend="reference")
    assert any(getattr(l.inst, "loop", None) == "type_map" for l in k.forward_program.launches if hasattr(l, "inst"))
    out_k, out_r = k(x), r(x)
    torch.testing.assert_close(out_k, out_r, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(out_k)
    gk = torch.autograd.grad((out_k * up).sum(), [x] + list(k.weights.values()))
    gr = torch.autograd.grad((out_r * up).sum(), [x] + list(r.weights.values()))
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [transformed_global_weight, max_messages], ids=lambda s: s.name)
def test_what_kernels_refuse_runs_on_the_reference_backend(spec):
    """The kernels backend's error for what it cannot run says backend='reference' runs it: it does."""
    from pigeon.passes.lower import LoweringError
    g = load("tiny")
    x = torch.randn(g.num_nodes, 4, requires_grad=True)
    refused = None
    try:
        pg.compile(spec, g, 4, backend="kernels")(x).square().sum().backward()
    except (LoweringError, RuntimeError) as e:
        refused = str(e)
    # refused today; when the kernels learn this spec, replace it here by one they still refuse
    assert refused is not None, f"{spec.name} now runs on the kernels backend: pick another unsupported spec"
    assert "backend='reference'" in refused and "\n" not in refused, refused
    x.grad = None
    layer = pg.compile(spec, g, 4, backend="reference")    # the advice works, forward and backward
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
