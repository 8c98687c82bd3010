"""Linear reordering (pigeon/passes/reorder.py): dot(x W_r, a_r) -> x (W_r a_r).  The rewrite
before and after, where it declines, and equal values and gradients (the reference interpreter
on the rewritten and the original graph in float64; the kernels on the torch semantics and the
emulated CUDA text)."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.ir.ops import OpKind
from pigeon.passes.reorder import linear_reorder
from pigeon.reference import run

from graphs import random_graph


@pg.layer
def two_scores(g, x, *, heads: int = 2, d: int = 3):
    """RGAT's scores: the source side is also aggregated, the destination side only scored."""
    W = pg.weight("W", (x.dim, heads * d), per=g.etype)
    a_s = pg.weight("a_s", (heads, d), per=g.etype)
    a_d = pg.weight("a_d", (heads, d), per=g.etype)
    zs = pg.typed_linear(g.src(x), W, by=g.etype).heads(heads)
    zd = pg.typed_linear(g.dst(x), W, by=g.etype).heads(heads)
    score = pg.dot(zs, a_s[g.etype]) + pg.dot(a_d[g.etype], zd)
    return pg.aggregate(g, pg.edge_softmax(g, score) * zs, "sum").flatten()


@pg.layer
def one_head(g, x, *, n: int = 5):
    W = pg.weight("W", (x.dim, n), per=g.etype)
    a = pg.weight("a", (n,), per=g.etype)
    s = pg.dot(pg.typed_linear(g.dst(x), W, by=g.etype), a[g.etype])     # [E]
    return pg.aggregate(g, pg.sigmoid(s), "sum")


@pg.layer
def reused_linear(g, x, *, heads: int = 2, d: int = 3):
    W = pg.weight("W", (x.dim, heads * d), per=g.etype)
    a = pg.weight("a", (heads, d), per=g.etype)
    z = pg.typed_linear(g.dst(x), W, by=g.etype).heads(heads)
    return pg.aggregate(g, pg.dot(z, a[g.etype]) * z, "sum").flatten()   # z is read twice


def _rewrite(spec, **hp):
    ir = spec.trace(4, **hp)
    changes = []
    return ir, linear_reorder(ir, changes), changes


def test_destination_score_folds_into_the_weight():
    ir, out, changes = _rewrite(two_scores)
    assert [c.rule for c in changes] == ["fold_vector_into_linear"]
    lins = [op for op in out.ops() if op.kind is OpKind.TYPED_LINEAR]
    assert sorted(op.type.shape for op in lins) == [(2,), (6,)]         # the [E, H] score GEMM, the src z
    folded = next(op for op in lins if op.type.shape == (2,))
    w = out.op(folded.inputs[1])
    assert w.kind is OpKind.DOT and w.type.domain.value == "weight" and w.type.shape == (4, 2)
    assert out.op(folded.inputs[0]).attr("side") == "dst"
    assert len(out) <= len(ir) + 1


def test_one_head_and_declined_reuse():
    _, out, changes = _rewrite(one_head)
    assert [c.rule for c in changes] == ["fold_vector_into_linear"]
    assert not any(op.kind is OpKind.TYPED_LINEAR and op.type.shape == (5,) for op in out.ops())
    ir, out, changes = _rewrite(reused_linear)
    assert changes == [] and out is ir


@pytest.mark.parametrize("spec", [two_scores, one_head], ids=lambda s: s.name)
def test_rewritten_graph_equals_the_original(spec):
    seed = random.randrange(1 << 30)
    g = random_graph(seed)
    ir, out, _ = _rewrite(spec)
    layer = pg.compile(spec, g, 4, backend="reference", seed=seed)
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, 4, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().double().requires_grad_(True) for k, v in layer.weights.items()}
    up = None
    res = []
    for graph in (ir, out):
        o = run(graph, g, {"x": x}, params)["out"]
        up = torch.randn_like(o) if up is None else up
        res.append((o, torch.autograd.grad((o * up).sum(), [x] + list(params.values()))))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("executor", ["torch", "emulate"])
@pytest.mark.parametrize("spec", [two_scores, one_head], ids=lambda s: s.name)
def test_reordered_kernels_equal_the_reference(spec, executor, monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", executor)
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = load("tiny")
    k = pg.compile(spec, g, 4, seed=seed)
    assert any(getattr(l.inst, "loop", None) == "type_map" for l in k.forward_program.launches)
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, 4, requires_grad=True)
    out = k(x)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), [x] + list(k.weights.values()))
    x64 = x.detach().double().requires_grad_(True)
    params = {n: v.detach().double().requires_grad_(True) for n, v in k.weights.items()}
    ref = run(k.ir, g, {"x": x64}, params)["out"]
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [x64] + list(params.values()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} seed {seed}: {m}")
