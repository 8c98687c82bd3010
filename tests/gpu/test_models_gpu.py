"""End to end on the GPU: every model's forward and gradients through pigeon's generated kernels
(CUDA templates) against the reference interpreter, fp32 and bf16; training loops; torch.compile;
an AOT artifact built on the CPU machine."""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import pigeon as pg
from pigeon.reference import run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphs import random_graph  # noqa: E402
from test_models_reference import IN, MODELS  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def _setup(model, seed, dtype="float32", graph=None):
    spec, hp, _ = MODELS[model]
    g = graph or random_graph(seed, num_nodes=300, num_edges=3000, num_etypes=5, num_ntypes=3)
    layer = pg.compile(spec, g, IN, backend="kernels", dtype=dtype, seed=seed, **hp).to(DEV)
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN, device=DEV)
    return spec, hp, g, layer, x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("compact", ["0", "1"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_fp32_forward_and_gradients_equal_reference(model, compact, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")        # every temporary buffer starts as NaN
    monkeypatch.setenv("PIGEON_COMPACT", compact)   # with and without compact materialization
    seed = random.randrange(1 << 30)
    spec, hp, g, layer, x = _setup(model, seed)
    x.requires_grad_(True)
    out = layer(x)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), [x] + list(layer.weights.values()))
    gd = g.to(DEV)
    x2 = x.detach().clone().requires_grad_(True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.weights.items()}
    ref = run(layer.ir, gd, {"x": x2}, params)["out"]
    ref_grads = torch.autograd.grad((ref * up).sum(), [x2] + list(params.values()))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{model} seed {seed}: {m}")
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        assert _rel(a, b) < 1e-4, f"{model} grad {name}: rel err {_rel(a, b):.2e} (seed {seed})"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bf16_error_within_twice_plain_torch_bf16(model):
    seed = random.randrange(1 << 30)
    spec, hp, g, layer, x = _setup(model, seed, dtype="bfloat16")
    gd = g.to(DEV)
    params = dict(layer.weights.items())
    exact = run(layer.ir, gd, {"x": x.double()}, {k: v.double() for k, v in params.items()})["out"]
    torch_bf16 = run(layer.ir, gd, {"x": x.bfloat16()}, {k: v.bfloat16() for k, v in params.items()})["out"]
    ours = layer(x)
    e_ours, e_torch = _rel(ours, exact), _rel(torch_bf16, exact)
    assert e_ours <= 2 * e_torch + 1e-6, f"{model}: pigeon bf16 err {e_ours:.3e} vs torch bf16 {e_torch:.3e}"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_training_loop_matches_reference(model):
    seed = random.randrange(1 << 30)
    spec, hp, g, layer, x = _setup(model, seed)
    ref_layer = pg.compile(spec, g, IN, backend="reference", seed=seed, **hp).to(DEV)
    ref_layer.load_state_dict(layer.state_dict())
    target = torch.randn_like(layer(x)).detach()
    losses = {}
    for name, m in (("kernels", layer), ("reference", ref_layer)):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        curve = []
        for _ in range(20):
            opt.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[name] = curve
    a, b = torch.tensor(losses["kernels"]), torch.tensor(losses["reference"])
    assert b[-1] < b[0], "the reference did not learn: the test would prove nothing"
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5, msg=lambda m: f"{model} loss curves: {m}")


def test_torch_compile_has_no_graph_breaks():
    seed = random.randrange(1 << 30)
    spec, hp, g, layer, x = _setup("rgat", seed)
    compiled = torch.compile(layer, fullgraph=True)   # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    compiled(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_aot_artifact_built_on_cpu_machine_runs():
    art = os.environ.get("PIGEON_TEST_ARTIFACT")
    if not art:
        pytest.skip("set PIGEON_TEST_ARTIFACT to an artifact directory made by `pigeon compile --out`")
    import pigeon.runtime.artifact as artifact
    from pigeon.models import MODELS as BUILTIN
    layer = artifact.load(art).to(DEV)
    m = layer.manifest
    ref = pg.compile(BUILTIN[m["spec"]], layer.graph, m["in_dims"], **m["hparams"], backend="reference")
    gd = layer.graph.to(DEV)
    x = torch.randn(layer.graph.num_nodes, m["in_dims"]["x"], device=DEV, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.weights.items()}
    want = run(ref.ir, gd, {"x": x}, params)["out"]
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    up = torch.randn_like(got)
    g1 = torch.autograd.grad((got * up).sum(), [x] + list(layer.weights.values()))
    g2 = torch.autograd.grad((want * up).sum(), [x] + list(params.values()))
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-4
