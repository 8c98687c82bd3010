"""A 16-bit layer's float32 master weights cast once per master state (pigeon/runtime/weight_casts.py)
for calls autograd does not record, afresh (differentiably) for calls it records; and the one-step
replayed call of a bf16 layer (fast_replay) reading those casts, with the stand-in CUDA graphs."""
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import rgat
from pigeon.runtime import replay
from pigeon.runtime.weight_casts import cast_weight

from test_fast_replay import hits  # noqa: F401  (the fixture)
from test_replay import fake_cuda  # noqa: F401  (the fixture)

IN = 8


def test_a_cast_is_kept_per_master_state():
    w = torch.nn.Parameter(torch.randn(4, 5))
    a = cast_weight(w, torch.bfloat16, False)
    assert a.dtype == torch.bfloat16 and cast_weight(w, torch.bfloat16, False) is a
    torch.testing.assert_close(a, w.detach().bfloat16(), rtol=0, atol=0)
    with torch.no_grad():
        w.mul_(2.0)                                    # in place: a new version
    b = cast_weight(w, torch.bfloat16, False)
    assert b is not a and torch.equal(b, w.detach().bfloat16())
    w.data = torch.randn(4, 5)                         # new memory, same Parameter
    c = cast_weight(w, torch.bfloat16, False)
    assert c is not b and torch.equal(c, w.detach().bfloat16())
    assert cast_weight(w, torch.float16, False).dtype == torch.float16
    g = cast_weight(w, torch.bfloat16, True)           # autograd records: a fresh cast in the graph
    assert g is not c and g.grad_fn is not None
    g.float().sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones(4, 5))


def test_bf16_inference_reuses_the_casts_and_training_reaches_the_masters():
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, dtype="bfloat16")
    x = torch.randn(g.num_nodes, IN)
    with torch.no_grad():
        first = layer(x)
        name, w = next(iter(layer.weights.items()))
        low = cast_weight(w, torch.bfloat16, False)
        assert layer(x).equal(first) and cast_weight(w, torch.bfloat16, False) is low
        w.mul_(-1.0)                                   # an optimizer step between evaluations
        changed = layer(x)
    assert not changed.equal(first)
    layer(x).float().pow(2).sum().backward()           # recorded: gradients reach every float32 master
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.weights.values())


def test_bf16_layer_takes_the_fast_path_and_reads_updated_masters(fake_cuda, hits, monkeypatch):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, dtype="bfloat16")
    x = torch.randn(g.num_nodes, IN)
    with torch.no_grad():
        for _ in range(4):
            layer(x)
        assert hits["hit"] >= 1
        name, w = next(iter(layer.weights.items()))
        w.mul_(0.5)
        h0 = hits["hit"]
        got = layer(x)
        assert hits["hit"] == h0 + 1
        monkeypatch.setenv(replay.ENV, "0")
        want = layer(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
