"""Property test of the whole compile path: randomly composed specs (gathers, typed linears by edge
and node type, elementwise ops with broadcasting, per-head dots, edge softmax, aggregations),
autodiff and lowering, executed instance by instance with each instance's plain-torch semantics
(the kernel-level oracle), equal the reference interpreter forward and backward."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pigeon as pg
from pigeon.graph.kernel_graph import kernel_graph
from pigeon.passes.lower import lower
from pigeon.passes.autodiff import autodiff
from pigeon.reference import run
from pigeon.runtime.program import Executor, TorchBackend

from graphs import random_graph

D, H = 4, 2


def build_spec(steps):
    """A spec from a list of drawn steps; node and edge values are kept in pools of [D] values."""

    def spec(g, x):
        nodes, edges = [x], []
        for i, (kind, a, b, c) in enumerate(steps):
            if kind == "gather":
                v = nodes[a % len(nodes)]
                edges.append(g.src(v) if b % 2 else g.dst(v))
            elif kind == "edge_linear" and edges:
                w = pg.weight(f"We{i}", (D, D), per=g.etype)
                edges.append(pg.typed_linear(edges[a % len(edges)], w, by=g.etype))
            elif kind == "node_linear":
                w = pg.weight(f"Wn{i}", (D, D), per=g.ntype)
                nodes.append(pg.typed_linear(nodes[a % len(nodes)], w, by=g.ntype))
            elif kind == "unary":
                pool = edges if (b % 2 and edges) else nodes
                fn = [pg.relu, pg.sigmoid, pg.tanh, lambda v: pg.leaky_relu(v, 0.1), pg.gelu][c % 5]
                pool.append(fn(pool[a % len(pool)]))
            elif kind == "binary":
                pool = edges if (b % 2 and edges) else nodes
                p, q = pool[a % len(pool)], pool[c % len(pool)]
                pool.append([p + q, p - q, p * q][(a + c) % 3])
            elif kind == "attention" and edges:
                z = edges[a % len(edges)].heads(H)                              # [E, H, D/H]
                att = pg.weight(f"a{i}", (H, D // H), per=g.etype)
                score = pg.leaky_relu(pg.dot(z, att[g.etype]), 0.2)              # [E, H]
                edges.append((pg.edge_softmax(g, score) * z).flatten())          # [E, D]
            elif kind == "aggregate" and edges:
                nodes.append(pg.aggregate(g, edges[a % len(edges)], ["sum", "mean"][b % 2]))
        if edges:   # make sure the edge work reaches the output
            nodes.append(pg.aggregate(g, edges[-1], "sum"))
        return nodes[-1] + pg.weight("bias", (D,), init="normal")

    return pg.layer(spec)


STEP = st.tuples(st.sampled_from(["gather", "edge_linear", "node_linear", "unary", "binary", "attention",
                                  "aggregate"]),
                 st.integers(0, 7), st.integers(0, 7), st.integers(0, 7))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=8), seed=st.integers(0, 2**20))
def test_random_spec_kernel_program_equals_reference(steps, seed):
    check(steps, seed, TorchBackend())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=2, max_size=6), seed=st.integers(0, 2**20))
def test_random_spec_emulated_cuda_kernels_equal_reference(steps, seed):
    """The same through the CUDA text of every traversal kernel, emulated on the CPU (slower: few examples)."""
    import pytest
    from pigeon.runtime import emulate as cuda_emulate
    if not cuda_emulate.available():
        pytest.skip("no C++ compiler for the CUDA emulation")
    from pigeon.runtime.program import EmulateBackend
    check(steps, seed, EmulateBackend())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=8), seed=st.integers(0, 2**20))
def test_random_spec_compacted_program_equals_reference(steps, seed):
    """Through the pass pipeline with compaction forced on (source linears on compact rows, edge-wise
    work on them sunk into the compact domain, destination linears on (dst, etype) pairs): the
    kernels equal the reference of the compacted graphs, and the compacted reference equals the
    traced one."""
    check(steps, seed, TorchBackend(), compact=True)


def check(steps, seed, backend, compact=False):
    spec = build_spec(steps)
    g = random_graph(seed, num_nodes=12, num_edges=40, num_etypes=3, num_ntypes=2)
    ir = spec.trace(D)
    if compact:
        from pigeon.passes.pipeline import graph_stats_for, run_pipeline
        c, _ = run_pipeline(ir, graph_stats=graph_stats_for(g), choices={"compaction": True, "compaction_dst": True})
        res = c.autodiff
        res = type(res)(c.forward, c.backward, res.saved, res.recomputed, res.grad_inputs, res.grads)
    else:
        res = autodiff(ir)
    fwd, bwd = lower(res.forward), lower(res.backward)
    kg = kernel_graph(g)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g.num_nodes, D, generator=gen, dtype=torch.float64)
    layer = pg.compile(spec, g, D, backend="reference")
    params = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 0.5 for k, v in layer.weights.items()}
    want = run(res.forward, g, {"x": x}, params)
    got = Executor(fwd, backend, poison=True).run(kg, {"x": x.float()}, {k: v.float() for k, v in params.items()})
    torch.testing.assert_close(got["out"].double(), want["out"], rtol=1e-4, atol=1e-4)
    if compact:
        torch.testing.assert_close(want["out"], run(ir, g, {"x": x}, params)["out"], rtol=1e-9, atol=1e-9)
    up = torch.randn(want["out"].shape, generator=gen, dtype=torch.float64)
    saved_r = {s: want[s] for s in res.saved}
    want_b = run(res.backward, g, {"x": x, "grad_out": up} | saved_r, params)
    used = {n for n, _ in bwd.inputs}
    inputs = {k: v.float() for k, v in ({"x": x, "grad_out": up} | {s: got[s].double() for s in res.saved}).items()}
    got_b = Executor(bwd, backend, poison=True).run(
        kg, {k: v for k, v in inputs.items() if k in used}, {k: v.float() for k, v in params.items()})
    for _, name in res.grads:
        torch.testing.assert_close(got_b[name].double(), want_b[name], rtol=1e-3, atol=1e-3,
                                   msg=lambda m: f"{name} for steps {steps}: {m}")
