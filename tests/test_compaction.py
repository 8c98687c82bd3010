"""Compact materialization (pigeon/passes/compact.py): the rewrite before and after, the cost
rule, the pipeline record, and the compacted programs against the reference interpreter,
forward and backward, on the torch semantics and on the emulated CUDA text (node and
edge-chunk schedules), with NaN-poisoned temporaries."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.ir.ops import OpKind
from pigeon.passes.compact import MIN_EDGES_PER_ROW, RULES, CompactionError, decide
from pigeon.passes.pipeline import graph_stats_for, run_pipeline
from pigeon.passes.rewrite import rewrite
from pigeon.reference import run

from graphs import random_graph
from test_models_reference import IN, MODELS


def _kinds(ir):
    return [op.kind for op in ir.ops()]


def test_rule_moves_source_typed_linear_onto_compact_rows():
    spec, hp, _ = MODELS["rgcn_mean"]
    ir = spec.trace(IN, **hp)
    before = [op for op in ir.ops() if op.kind is OpKind.TYPED_LINEAR]
    out = rewrite(ir, RULES)
    tl = [op for op in out.ops() if op.kind is OpKind.TYPED_LINEAR]
    assert len(tl) == len(before)
    typed = [op for op in tl if out.op(op.inputs[1]).type.domain.value == "weight"]
    assert [op.type.domain.value for op in typed] == ["compact"]
    gather = out.op(typed[0].inputs[0])
    assert gather.kind is OpKind.GATHER and gather.attr("side") == "compact_src"
    users = out.users(typed[0].key)
    assert [u.kind for u in users] == [OpKind.EXPAND_COMPACT]
    # the global self-loop linear on node rows is untouched
    assert any(op.type.domain.value == "node" for op in tl)


def test_rule_leaves_destination_and_node_typed_linears():
    spec, hp, _ = MODELS["rgat"]
    out = rewrite(spec.trace(IN, **hp), RULES)
    kinds = {(op.type.domain.value, out.op(op.inputs[0]).attr("side")) for op in out.ops()
             if op.kind is OpKind.TYPED_LINEAR}
    assert kinds == {("compact", "compact_src"), ("edge", "dst")}
    hgt_ir = MODELS["hgt"][0].trace(IN, **MODELS["hgt"][1])
    out = rewrite(hgt_ir, RULES)
    node_typed = [op for op in out.ops() if op.kind is OpKind.TYPED_LINEAR and op.type.domain.value == "node"]
    assert len(node_typed) == 4          # K, Q, V, out: per node type, not gathered
    assert sum(op.kind is OpKind.EXPAND_COMPACT for op in out.ops()) == 2    # k_r and v_r


def test_decision_rule_and_override(monkeypatch):
    monkeypatch.delenv("PIGEON_COMPACT", raising=False)
    assert decide({"num_edges": 300, "compact_rows": 100}).compact
    assert not decide({"num_edges": 120, "compact_rows": 100}).compact
    assert decide({"num_edges": int(MIN_EDGES_PER_ROW * 100), "compact_rows": 100}).compact
    assert not decide(None).compact
    monkeypatch.setenv("PIGEON_COMPACT", "1")
    assert decide({"num_edges": 100, "compact_rows": 100}).compact
    monkeypatch.setenv("PIGEON_COMPACT", "0")
    assert not decide({"num_edges": 1000, "compact_rows": 10}).compact
    monkeypatch.setenv("PIGEON_COMPACT", "yes")
    with pytest.raises(CompactionError, match="PIGEON_COMPACT='yes'"):
        decide({"num_edges": 1, "compact_rows": 1})


def test_pipeline_records_the_decision(monkeypatch):
    monkeypatch.delenv("PIGEON_COMPACT", raising=False)
    spec, hp, _ = MODELS["rgcn_mean"]
    dense = random_graph(1, num_nodes=20, num_edges=400, num_etypes=2)
    sparse = random_graph(1, num_nodes=400, num_edges=100, num_etypes=2)
    c, recs = run_pipeline(spec.trace(IN, **hp), graph_stats=graph_stats_for(dense))
    rec = next(r for r in recs if r.name == "compaction")
    assert rec.note.startswith("applied") and [ch.rule for _, ch in rec.changes] == ["compact_src_linear"]
    assert OpKind.EXPAND_COMPACT in _kinds(c.forward)
    assert any(op.kind is OpKind.AGGREGATE and op.attr("side") == "compact" for op in c.backward.ops())
    assert any(op.kind is OpKind.AGGREGATE and op.attr("side") == "compact_src" for op in c.backward.ops())
    c, recs = run_pipeline(spec.trace(IN, **hp), graph_stats=graph_stats_for(sparse))
    rec = next(r for r in recs if r.name == "compaction")
    assert rec.note.startswith("not applied") and OpKind.EXPAND_COMPACT not in _kinds(c.forward)


def _compacted_cases():
    """(model, executor, schedule): the torch semantics of an aggregate do not depend on its
    schedule, so one schedule there.  The emulated CUDA text (C compiles, 5-15 s a case on the CPU
    machine) runs by default for RGAT (both compactions and the sunk score) and RGCN (mean); the
    other models and the edge-chunk schedule under -m slow (test_lowering.py emulates the edge-chunk
    templates against the reference in the default run)."""
    for model in sorted(MODELS):
        for executor, schedule in (("torch", "node"), ("emulate", "node"), ("emulate", "edge_chunks")):
            slow = executor == "emulate" and (schedule == "edge_chunks" or model not in ("rgat", "rgcn_mean"))
            yield pytest.param(model, executor, schedule, marks=pytest.mark.slow) if slow else (model, executor, schedule)


@pytest.mark.parametrize("model,executor,schedule", list(_compacted_cases()))
def test_compacted_kernels_equal_the_reference(model, executor, schedule, monkeypatch):
    monkeypatch.setenv("PIGEON_COMPACT", "1")
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_CPU_BACKEND", executor)
    monkeypatch.setenv("PIGEON_AGGREGATE_SCHEDULE", schedule)
    seed = random.randrange(1 << 30)
    spec, hp, _ = MODELS[model]
    # a hub source with many edges of one relation: long compact rows, and nodes with many rows
    g = random_graph(seed, num_nodes=40, num_edges=600, num_etypes=3)
    layer = pg.compile(spec, g, IN, seed=seed, **hp)
    assert any(b.rows == "compact" for b in layer.forward_program.buffers), "the pass did not fire"
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    params = {k: v.detach().clone().double().requires_grad_(True) for k, v in layer.weights.items()}
    x64 = x.detach().double().requires_grad_(True)
    out = layer(x)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), [x] + list(layer.weights.values()))
    ref = run(layer.ir, g, {"x": x64}, params)["out"]
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [x64] + list(params.values()))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        assert torch.isfinite(a).all(), f"grad {name} not finite (seed {seed})"
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}, seed {seed}: {m}")


def test_compaction_changes_nothing_the_user_sees(monkeypatch):
    """The same layer compiled with and without compaction: equal outputs and gradients."""
    seed = random.randrange(1 << 30)
    spec, hp, _ = MODELS["rgat"]
    g = random_graph(seed, num_nodes=30, num_edges=300, num_etypes=3)
    torch.manual_seed(seed)
    x0 = torch.randn(g.num_nodes, IN)
    res = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PIGEON_COMPACT", mode)
        layer = pg.compile(spec, g, IN, seed=seed, **hp)
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        (out * out).sum().backward()
        res[mode] = (out.detach(), x.grad, {k: v.grad for k, v in layer.weights.items()},
                     len(layer.forward_program.launches))
    torch.testing.assert_close(res["0"][0], res["1"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["0"][1], res["1"][1], rtol=1e-4, atol=1e-5)
    for k in res["0"][2]:
        torch.testing.assert_close(res["0"][2][k], res["1"][2][k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


# -- sinking edge-wise work into the compact domain (the sink_* rules) ----------------------------

def _sink_rules_only():
    return [r for r in RULES if r.name.startswith("sink_")]


def test_sink_moves_rgat_source_score_onto_compact_rows():
    """Before: dot(reshape(expand_compact(z)), a_src[etype on edges]) : edge[H].  After:
    expand_compact(dot(reshape(z), a_src[etype on compact rows])): the dot runs once per pair."""
    spec, hp, _ = MODELS["rgat"]
    before = rewrite(spec.trace(IN, **hp), [r for r in RULES if r.name == "compact_src_linear"])
    edge_dots = [op for op in before.ops() if op.kind is OpKind.DOT and op.type.domain.value == "edge"]
    assert len(edge_dots) == 2          # a_src (on the gathered compact row) and a_dst (on dst rows)
    changes = []
    after = rewrite(before, _sink_rules_only(), changes=changes)
    assert sorted(ch.rule for ch in changes) == ["sink_dot_into_compact", "sink_reshape_into_compact"]
    dots = [op for op in after.ops() if op.kind is OpKind.DOT and op.type.domain.value != "weight"]
    assert sorted(op.type.domain.value for op in dots) == ["compact", "edge"]
    cdot = next(op for op in dots if op.type.domain.value == "compact")
    ins = [after.op(i) for i in cdot.inputs]
    assert [i.kind for i in ins] == [OpKind.RESHAPE, OpKind.TYPE_INDEX]
    assert ins[1].attr("domain").value == "compact" and after.op(ins[1].inputs[0]).attr("name") == "a_src"
    assert after.op(ins[0].inputs[0]).kind is OpKind.TYPED_LINEAR
    assert [u.kind for u in after.users(cdot.key)] == [OpKind.EXPAND_COMPACT]
    # the destination-side dot (on dst rows) stays edge-wise
    edot = next(op for op in dots if op.type.domain.value == "edge")
    assert {after.op(i).kind for i in edot.inputs} != {OpKind.EXPAND_COMPACT}
    # the full rule set does both in one rewrite, and is a fixpoint
    both = rewrite(spec.trace(IN, **hp), RULES)
    assert both == after
    assert rewrite(after, RULES) is after


def test_sink_keeps_what_depends_on_more_than_the_pair():
    """HGT's score reads the destination's query (not sinkable); RGCN's message is scaled by a
    per-(dst, etype) degree (graph data on edges: not sinkable)."""
    for model in ("hgt", "rgcn_mean"):
        spec, hp, _ = MODELS[model]
        changes = []
        rewrite(spec.trace(IN, **hp), RULES, changes=changes)
        assert not [ch for ch in changes if ch.rule.startswith("sink_")], model


@pg.layer
def _chain(g, x, *, heads: int = 2):
    """A chain on the source side: leaky_relu(z * b[etype] + c) . a[etype], then softmax."""
    W = pg.weight("W", (x.dim, x.dim), per=g.etype)
    a = pg.weight("a", (heads, x.dim // heads), per=g.etype)
    b = pg.weight("b", (x.dim,), per=g.etype)
    c = pg.weight("c", (x.dim,), init="normal")
    z = pg.typed_linear(g.src(x), W, by=g.etype)
    s = pg.dot(pg.leaky_relu(z * b[g.etype] + c, 0.1).heads(heads), a[g.etype])    # [E, H]
    alpha = pg.edge_softmax(g, s)
    return pg.aggregate(g, alpha * z.heads(heads), "sum").flatten()


def test_sink_moves_a_whole_chain():
    ir = _chain.trace(IN)
    changes = []
    out = rewrite(ir, RULES, changes=changes)
    rules = sorted({ch.rule for ch in changes})
    assert rules == ["compact_src_linear", "sink_binary_into_compact", "sink_dot_into_compact",
                     "sink_reshape_into_compact", "sink_unary_into_compact"]
    # every elementwise op and the dot left the edge domain; the edges keep the softmax and the product
    edge_ops = {op.kind for op in out.ops() if op.type.domain.value == "edge"}
    assert edge_ops == {OpKind.EXPAND_COMPACT, OpKind.EDGE_SOFTMAX, OpKind.BINARY}
    assert all(op.attr("domain").value == "compact" for op in out.of_kind(OpKind.TYPE_INDEX))


def _edge_dots_reading_compact_rows(prog):
    """(launch, dot width) for every edge-loop traversal whose expression takes a dot of a
    compact row read through edge_to_compact."""
    from pigeon.ir.expr import RowRef
    from pigeon.ir.program import TraversalLaunch
    hits = []
    for l in prog.launches:
        if not isinstance(l, TraversalLaunch) or l.inst.loop_rows != "edge":
            continue
        for n in l.inst.expr.toposort():
            if n.op == "dot" and any(m.op == "load" and m.row is RowRef.COMPACT for a in n.args for m in a.toposort()):
                hits.append((l.inst.loop, n.args[0].shape))
    return hits


def test_rgat_program_has_no_edge_dot_of_a_gathered_row(monkeypatch):
    """The lowered RGAT programs (forward and backward) on a compacting graph: the source score is a
    compact_map over pairs; no edge loop takes a dot of an H*D-wide compact row any more; the
    gradient of a_src is a per-relation sum over compact rows."""
    monkeypatch.setenv("PIGEON_COMPACT", "1")
    from pigeon.models import rgat
    g = random_graph(3, num_nodes=40, num_edges=600, num_etypes=3)
    layer = pg.compile(rgat, g, 64, heads=4, out_dim=16)
    for prog in (layer.forward_program, layer.backward_program):
        assert _edge_dots_reading_compact_rows(prog) == [], prog.describe()
    cmaps = [l.inst for l in layer.forward_program.launches
             if hasattr(l, "inst") and getattr(l.inst, "loop", None) == "compact_map"]
    assert [(i.out.shape, [n.op for n in i.expr.toposort()].count("dot")) for i in cmaps] == [((4,), 1)]
    red = [l.inst for l in layer.backward_program.launches
           if hasattr(l, "inst") and getattr(l.inst, "loop", None) == "type_reduce"]
    assert [(i.rows, i.per) for i in red] == [("compact", "etype")]
    # without the sink rules (compaction alone) the forward had that edge dot
    from pigeon.passes import compact
    monkeypatch.setattr(compact, "RULES", [r for r in compact.RULES if not r.name.startswith("sink_")])
    import pigeon.passes.pipeline as pipeline
    monkeypatch.setattr(pipeline, "COMPACT_RULES", compact.RULES)
    plain = pg.compile(rgat, g, 64, heads=4, out_dim=16)
    assert _edge_dots_reading_compact_rows(plain.forward_program) == [("edge_map", (4, 16))]


@pytest.mark.parametrize("executor", ["torch", pytest.param("emulate", marks=pytest.mark.slow)])
def test_sunk_chain_equals_the_reference(executor, monkeypatch):
    """The chain spec with compaction forced on (everything sunk) and off: kernels vs reference,
    forward and backward, and the two compilations agree."""
    if executor == "emulate":
        from pigeon.runtime import emulate as cuda_emulate
        if not cuda_emulate.available():
            pytest.skip("no C++ compiler for the CUDA emulation")
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_CPU_BACKEND", executor)
    seed = random.randrange(1 << 30)
    g = random_graph(seed, num_nodes=40, num_edges=600, num_etypes=3)
    torch.manual_seed(seed)
    x0 = torch.randn(g.num_nodes, IN)
    up = torch.randn(g.num_nodes, IN)
    res = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PIGEON_COMPACT", mode)
        layer = pg.compile(_chain, g, IN, seed=seed)
        assert any(b.rows == "compact" for b in layer.forward_program.buffers) == (mode == "1")
        x = x0.clone().requires_grad_(True)
        params = {k: v.detach().clone().double().requires_grad_(True) for k, v in layer.weights.items()}
        x64 = x0.double().requires_grad_(True)
        out = layer(x)
        grads = torch.autograd.grad((out * up).sum(), [x] + list(layer.weights.values()))
        ref = run(layer.ir, g, {"x": x64}, params)["out"]
        ref_grads = torch.autograd.grad((ref * up.double()).sum(), [x64] + list(params.values()))
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
        for name, a, b in zip(["x"] + list(params), grads, ref_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"mode {mode} grad {name}, seed {seed}: {m}")
        res[mode] = (out.detach(), [a.detach() for a in grads])
    torch.testing.assert_close(res["0"][0], res["1"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res["0"][1], res["1"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- destination-side compaction (compact_dst_linear, decide_dst) --------------------------------

from pigeon.passes.compact import DST_RULES, decide_dst
from pigeon.passes.reorder import linear_reorder


def test_dst_rule_moves_destination_typed_linear_onto_dst_pairs():
    """Before: typed_linear(gather[dst](x), W_r a_r) : edge[H] (RGAT's destination score after the
    reordering).  After: expand_compact(typed_linear(gather[compact_dst](x), W_r a_r)) on compact_dst rows."""
    spec, hp, _ = MODELS["rgat"]
    before = linear_reorder(spec.trace(IN, **hp), [])
    tl = [op for op in before.ops() if op.kind is OpKind.TYPED_LINEAR]
    assert [(op.type.domain.value, before.op(op.inputs[0]).attr("side")) for op in tl] == [("edge", "src"), ("edge", "dst")]
    changes = []
    after = rewrite(before, DST_RULES, changes=changes)
    assert [ch.rule for ch in changes] == ["compact_dst_linear"]
    tl = {op.type.domain.value: op for op in after.ops() if op.kind is OpKind.TYPED_LINEAR}
    assert set(tl) == {"edge", "compact_dst"}
    d = tl["compact_dst"]
    assert after.op(d.inputs[0]).attr("side") == "compact_dst" and after.op(d.inputs[1]).kind is OpKind.DOT
    assert [u.kind for u in after.users(d.key)] == [OpKind.EXPAND_COMPACT]
    assert after.users(d.key)[0].type.domain.value == "edge"
    assert rewrite(after, DST_RULES) is after
    # the source-side rules leave it alone, and the sink rules do not sink onto dst pairs
    both = rewrite(after, RULES)
    assert any(op.type.domain.value == "compact_dst" for op in both.ops())
    assert not any(op.kind is not OpKind.TYPED_LINEAR and op.kind is not OpKind.GATHER
                   and op.type.domain.value == "compact_dst" for op in both.ops())
    # HGT gathers node-typed linears (no typed linear of destination rows): nothing to do
    hgt_ir = MODELS["hgt"][0].trace(IN, **MODELS["hgt"][1])
    assert rewrite(hgt_ir, DST_RULES) is hgt_ir


def test_dst_decision_rule_and_override(monkeypatch):
    monkeypatch.delenv("PIGEON_COMPACT_DST", raising=False)
    assert decide_dst({"num_edges": 300, "compact_dst_rows": 100}).compact
    d = decide_dst({"num_edges": 120, "compact_dst_rows": 100})
    assert not d.compact and "(dst, etype)" in d.why
    assert not decide_dst(None).compact
    monkeypatch.setenv("PIGEON_COMPACT_DST", "1")
    assert decide_dst({"num_edges": 100, "compact_dst_rows": 100}).compact
    monkeypatch.setenv("PIGEON_COMPACT_DST", "0")
    assert not decide_dst({"num_edges": 1000, "compact_dst_rows": 10}).compact
    monkeypatch.setenv("PIGEON_COMPACT_DST", "x")
    with pytest.raises(CompactionError, match="PIGEON_COMPACT_DST='x'"):
        decide_dst({"num_edges": 1, "compact_dst_rows": 1})


def test_dst_pipeline_record_and_layout(monkeypatch):
    monkeypatch.delenv("PIGEON_COMPACT_DST", raising=False)
    spec, hp, _ = MODELS["rgat"]
    dense = random_graph(1, num_nodes=20, num_edges=400, num_etypes=2)
    c, recs = run_pipeline(spec.trace(IN, **hp), graph_stats=graph_stats_for(dense))
    rec = next(r for r in recs if r.name == "compaction_dst")
    assert rec.note.startswith("applied") and [ch.rule for _, ch in rec.changes] == ["compact_dst_linear"]
    sides = {op.attr("side") for op in c.backward.ops() if op.kind is OpKind.AGGREGATE}
    assert {"dcompact", "compact_dst"} <= sides
    c, recs = run_pipeline(spec.trace(IN, **hp), graph_stats={"num_edges": 100, "compact_rows": 100,
                                                              "compact_dst_rows": 90})
    rec = next(r for r in recs if r.name == "compaction_dst")
    assert rec.note.startswith("not applied")
    assert not any(op.type.domain.value == "compact_dst" for op in c.forward.ops())
    # the kernel layout: every edge's pair has its destination and relation; pairs sorted by (etype, dst)
    from pigeon.graph.kernel_graph import kernel_graph
    kg = kernel_graph(dense)
    e2p = kg.edge_to_compact_dst.long()
    assert torch.equal(kg.compact_dst_node.long()[e2p], kg.dst.long())
    assert torch.equal(kg.compact_dst_etype.long()[e2p], kg.etype.long())
    key = kg.compact_dst_etype.long() * kg.num_nodes + kg.compact_dst_node.long()
    assert bool((key[1:] > key[:-1]).all()) and kg.num_compact_dst == dense.compact_dst().num_rows
    assert torch.equal(e2p[kg.dcmp_eid.long()], torch.repeat_interleave(
        torch.arange(kg.num_compact_dst), (kg.dcmp_ptr[1:] - kg.dcmp_ptr[:-1]).long()))


def test_rgat_program_has_no_edge_gemm_of_destination_rows(monkeypatch):
    """With both sides compacted, RGAT's forward has no GEMM over E rows: the destination score
    runs on Ud (dst, etype) pairs and the edge softmax reads it through edge_to_compact_dst."""
    from pigeon.ir.expr import RowRef
    from pigeon.ir.program import GemmLaunch, TraversalLaunch
    from pigeon.models import rgat
    monkeypatch.setenv("PIGEON_COMPACT", "1")
    monkeypatch.setenv("PIGEON_COMPACT_DST", "1")
    g = random_graph(3, num_nodes=40, num_edges=600, num_etypes=3)
    layer = pg.compile(rgat, g, 64, heads=4, out_dim=16)
    gemms = [(l.rows, l.gather) for l in layer.forward_program.launches if isinstance(l, GemmLaunch)]
    assert gemms == [("compact", "compact_src"), ("compact_dst", "compact_dst")]
    assert all(l.rows != "edge" for l in layer.backward_program.launches if isinstance(l, GemmLaunch))
    refs = {n.row for l in layer.forward_program.launches if isinstance(l, TraversalLaunch)
            for n in l.inst.expr.toposort() if n.op == "load"}
    assert RowRef.COMPACT_DST in refs
    monkeypatch.setenv("PIGEON_COMPACT_DST", "0")
    plain = pg.compile(rgat, g, 64, heads=4, out_dim=16)
    gemms = [(l.rows, l.gather) for l in plain.forward_program.launches if isinstance(l, GemmLaunch)]
    assert gemms == [("compact", "compact_src"), ("edge", "dst")]


@pytest.mark.parametrize("executor,schedule", [("torch", "node"), ("emulate", "node"), ("emulate", "edge_chunks")])
@pytest.mark.parametrize("model", ["rgat", "gated_rgat", "rgcn_mean"])
def test_dst_compacted_kernels_equal_the_reference(model, executor, schedule, monkeypatch):
    """Both sides compacted (forced), kernels vs the reference in float64, forward and backward."""
    monkeypatch.setenv("PIGEON_COMPACT", "1")
    monkeypatch.setenv("PIGEON_COMPACT_DST", "1")
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_CPU_BACKEND", executor)
    monkeypatch.setenv("PIGEON_AGGREGATE_SCHEDULE", schedule)
    seed = random.randrange(1 << 30)
    spec, hp, _ = MODELS[model]
    g = random_graph(seed, num_nodes=40, num_edges=600, num_etypes=3)
    layer = pg.compile(spec, g, IN, seed=seed, **hp)
    if model != "rgcn_mean":
        assert any(b.rows == "compact_dst" for b in layer.forward_program.buffers), "the pass did not fire"
    torch.manual_seed(seed)
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    params = {k: v.detach().clone().double().requires_grad_(True) for k, v in layer.weights.items()}
    x64 = x.detach().double().requires_grad_(True)
    out = layer(x)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), [x] + list(layer.weights.values()))
    ref = run(layer.ir, g, {"x": x64}, params)["out"]
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [x64] + list(params.values()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}, seed {seed}: {m}")


@pytest.mark.parametrize("model", ["rgat", "gated_rgat"])
def test_dst_compaction_changes_nothing_the_user_sees(model, monkeypatch):
    """The same layer with destination-side compaction forced on and off: equal outputs and gradients."""
    seed = random.randrange(1 << 30)
    spec, hp, _ = MODELS[model]
    g = random_graph(seed, num_nodes=30, num_edges=300, num_etypes=3)
    torch.manual_seed(seed)
    x0 = torch.randn(g.num_nodes, IN)
    res = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PIGEON_COMPACT_DST", mode)
        layer = pg.compile(spec, g, IN, seed=seed, **hp)
        assert any(b.rows == "compact_dst" for b in layer.forward_program.buffers) == (mode == "1")
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        (out * out).sum().backward()
        res[mode] = (out.detach(), x.grad, {k: v.grad for k, v in layer.weights.items()})
    torch.testing.assert_close(res["0"][0], res["1"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["0"][1], res["1"][1], rtol=1e-4, atol=1e-5)
    for k in res["0"][2]:
        torch.testing.assert_close(res["0"][2][k], res["1"][2][k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
