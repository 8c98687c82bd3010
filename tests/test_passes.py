"""The rewrite engine and the pass pipeline: each pass's IR before and after, the reference
interpreter giving the same numbers on both, a bounded fixpoint that raises, autodiff as a pass
whose backward graph runs through the later passes."""
import random
import time

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.ir import OpKind, format_ir
from pigeon.ir.ops import make_op
from pigeon.passes.pipeline import PIPELINE, SIMPLIFY, run_pipeline
from pigeon.passes.rewrite import Pat, RewriteError, Rule, rewrite, var
from pigeon.passes.simplify import RULES
from pigeon.reference import run

from test_autodiff import autograd_case
from test_models_reference import IN, MODELS


@pg.layer
def redundant(g, x, *, out_dim: int = 8):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    h = pg.typed_linear(g.src(x), W, by=g.etype)
    h = (h * 2.0) * 0.5            # scale(scale(h, 2), 0.5) -> h
    h = -(-h)                      # neg(neg(h)) -> h
    m = pg.relu(h) - (-(h * 3.0))  # neg(scale(h, 3)) -> scale(h, -3)
    m = m - (-h)                   # sub(a, neg(b)) -> add(a, b)
    return pg.aggregate(g, m, "sum")


def _kinds(ir):
    return [(op.kind.value, op.attr("fn")) for op in ir.ops() if op.kind in (OpKind.UNARY, OpKind.BINARY)]


def test_simplify_before_after_and_reference_equal():
    g = load("tiny")
    ir = redundant.trace(6)
    before = format_ir(ir, locs=False)
    changes = []
    out = rewrite(ir, RULES, changes=changes)
    after = format_ir(out, locs=False)
    # before: the chains are there
    assert before.count("fn='scale'") == 3 and before.count("fn='neg'") == 4
    # after: relu(h) - scale(h, -3) + h; no neg, no scale chain
    assert _kinds(out) == [("unary", "relu"), ("unary", "scale"), ("binary", "sub"), ("binary", "add")], after
    assert "c=-3.0" in after and "neg" not in after
    assert {c.rule for c in changes} >= {"scale_scale", "neg_neg", "neg_scale", "sub_neg"}
    layer = pg.compile(redundant, g, 6, backend="reference")
    x = torch.randn(g.num_nodes, 6)
    params = dict(layer.weights.items())
    torch.testing.assert_close(run(ir, g, {"x": x}, params)["out"], run(out, g, {"x": x}, params)["out"])
    assert rewrite(out, RULES) is out      # a fixpoint: nothing fires again


def test_rewrite_bound_raises():
    # a rule pair that undoes itself must not loop forever
    flip = [Rule("to_neg_scale", Pat.of(OpKind.UNARY, var("x"), fn="neg"),
                 lambda m: m.make(OpKind.UNARY, [m["x"]], fn="scale", c=-1.0)),
            Rule("to_neg", Pat.of(OpKind.UNARY, var("x"), fn="scale", c=-1.0),
                 lambda m: m.make(OpKind.UNARY, [m["x"]], fn="neg"))]
    ir = redundant.trace(6)
    with pytest.raises(RewriteError, match="keep firing|fixpoint"):
        rewrite(ir, flip, max_fires_per_op=8)


def test_rule_must_keep_type():
    bad = [Rule("bad", Pat.of(OpKind.AGGREGATE, var("m")), lambda m: m["m"])]
    with pytest.raises(RewriteError, match="changed the type"):
        rewrite(redundant.trace(6), bad)


def test_pattern_binds_same_name_to_same_op():
    ir = redundant.trace(6)
    seen = []
    # mul(x, x) does not occur: a pattern that requires both inputs equal never fires
    rule = Rule("square", Pat.of(OpKind.BINARY, var("a"), var("a"), fn="mul"), lambda m: seen.append(1))
    rewrite(ir, [rule])
    assert not seen


@pytest.mark.parametrize("model", sorted(MODELS))
def test_pipeline_autodiff_is_a_pass_and_backward_runs_through_later_passes(model):
    spec, hp, _ = MODELS[model]
    ir = spec.trace(IN, **hp)
    c, records = run_pipeline(ir)
    names = [r.name for r in records]
    assert names == [p.name for p in PIPELINE] and "autodiff" in names
    i = names.index("autodiff")
    assert any("backward" in r.graphs for r in records[i + 1:]), "backward graphs must see the passes after autodiff"
    assert c.backward is not None and c.forward is not None
    # the compiled graphs still equal the reference on random inputs, forward and backward
    seed = random.randrange(1 << 30)
    g = load("tiny")
    x, params, out, up, want = autograd_case(spec, hp, ir, g, seed)
    det = {k: v.detach() for k, v in params.items()}
    fwd = run(c.forward, g, {"x": x.detach()}, det)
    torch.testing.assert_close(fwd["out"], out.detach())
    got = run(c.backward, g, {"x": x.detach(), "grad_out": up} | {s: fwd[s] for s in c.autodiff.saved}, det)
    assert {n for n, _ in c.autodiff.grads} == set(want)
    for name, gname in c.autodiff.grads:
        torch.testing.assert_close(got[gname], want[name], rtol=1e-9, atol=1e-10)


def test_simplify_shrinks_backward_graph():
    @pg.layer
    def scaled(g, x):
        return pg.aggregate(g, 2.0 - (1.0 - g.src(x)), "sum")   # backward: neg(neg(dy))
    c, records = run_pipeline(scaled.trace(4))
    post = [r for r in records if r.name == "simplify" and "backward" in r.graphs]
    assert post and post[0].changes, [r.summary() for r in records]
    assert all(r.summary().startswith(f"pass {r.name}:") for r in records)


def test_long_reused_chain_compiles_in_seconds():
    @pg.layer
    def chain(g, x):
        z = g.src(x)
        for _ in range(24):
            z = z * z * 0.5 + z * 0.25
        return pg.aggregate(g, z, "sum")
    g = load("tiny")
    t = time.perf_counter()
    layer = pg.compile(chain, g, 4, backend="kernels")
    elapsed = time.perf_counter() - t
    assert elapsed < 20, elapsed          # exponential before: N=8 did not finish in 300 s
    x = torch.randn(g.num_nodes, 4) * 0.1
    ref = pg.compile(chain, g, 4, backend="reference")
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-6)


def test_make_op_interns_structurally():
    ir = redundant.trace(6)
    op = next(o for o in ir.ops() if o.kind is OpKind.UNARY)
    src = ir.op(op.inputs[0])
    again = make_op(OpKind.UNARY, [src], **dict(op.attrs))
    assert again.key == op.key
    assert SIMPLIFY.name == "simplify"


def test_remove_dead_ops_before_after_and_reference_equal():
    from pigeon.ir.graph import IRGraph
    from pigeon.passes.pipeline import DEAD_OPS
    g = load("tiny")
    ir = redundant.trace(6)
    # a graph with an extra output, then that output dropped: its ops are dead
    extra = next(op for op in ir.ops() if op.kind is OpKind.UNARY and op.attr("fn") == "relu")
    both = IRGraph(list(ir.ops()), [ir.outputs[0], extra.key], ir.name, ["out", "h"])
    dead = IRGraph(list(both.ops()) + [make_op(OpKind.UNARY, [extra], fn="tanh")], both.outputs[:1], ir.name, ["out"])
    changes = []
    out = DEAD_OPS.run(dead, changes)
    assert len(dead) == len(out) + 1 and [c.before.split(" ")[0] for c in changes] == ["unary"]
    assert "tanh" not in format_ir(out) and "tanh" in format_ir(dead)
    layer = pg.compile(redundant, g, 6, backend="reference")
    x = torch.randn(g.num_nodes, 6)
    params = dict(layer.weights.items())
    torch.testing.assert_close(run(dead, g, {"x": x}, params)["out"], run(out, g, {"x": x}, params)["out"])
