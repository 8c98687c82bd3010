"""Per-type input tensors, linears on per-type rows and weights shared across types: the
reference equals hand-written torch, the kernels (torch semantics and emulated CUDA text) equal
the reference forward and backward, and bad inputs or maps are refused with one line."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.reference import InputError

from dsl_coverage_specs import (ntype_bias, ntype_bias_torch, rel_scored, rel_scored_torch, shared_rgcn,
                                shared_rgcn_torch)
from graphs import random_graph


def _graph(seed):
    return random_graph(seed, num_nodes=30, num_edges=200, num_etypes=4)


def _inputs(spec, g, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g.num_nodes, 6, generator=gen, dtype=dtype)
    if spec is rel_scored:
        return {"x": x, "r": torch.randn(g.num_etypes, 3, generator=gen, dtype=dtype)}
    if spec is ntype_bias:
        return {"x": x, "b": torch.randn(g.num_ntypes, 2, generator=gen, dtype=dtype)}
    return {"x": x}


DIMS = {rel_scored: {"x": 6, "r": 3}, ntype_bias: {"x": 6, "b": 2}, shared_rgcn: 6}


def _torch_layer(spec, g, ins, p):
    if spec is rel_scored:
        return rel_scored_torch(g, ins["x"], ins["r"], p)
    if spec is ntype_bias:
        return ntype_bias_torch(g, ins["x"], ins["b"], p)
    return shared_rgcn_torch(g, ins["x"], (0, 0, 1, 1), p)


@pytest.mark.parametrize("spec", [rel_scored, ntype_bias, shared_rgcn], ids=lambda s: s.name)
def test_reference_equals_plain_torch(spec):
    seed = random.randrange(1 << 30)
    g = _graph(seed)
    layer = pg.compile(spec, g, DIMS[spec], backend="reference", dtype="float64", seed=seed)
    ins = {k: v.requires_grad_(True) for k, v in _inputs(spec, g, seed).items()}
    ours = layer(**ins)
    theirs = _torch_layer(spec, g, ins, dict(layer.weights))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
    leaves = list(ins.values()) + list(layer.weights.values())
    up = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * up).sum(), leaves), torch.autograd.grad((theirs * up).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("executor", ["torch", "emulate"])
@pytest.mark.parametrize("spec", [rel_scored, ntype_bias, shared_rgcn], ids=lambda s: s.name)
def test_kernels_equal_the_reference(spec, executor, monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", executor)
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = _graph(seed)
    k = pg.compile(spec, g, DIMS[spec], seed=seed)
    r = pg.compile(spec, g, DIMS[spec], backend="reference", dtype="float64", seed=seed)
    ins64 = {n: v.requires_grad_(True) for n, v in _inputs(spec, g, seed).items()}
    ins32 = {n: v.detach().float().requires_grad_(True) for n, v in ins64.items()}
    out_k, out_r = k(**ins32), r(**ins64)
    torch.testing.assert_close(out_k.double(), out_r, rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    up = torch.randn_like(out_r)
    gk = torch.autograd.grad((out_k * up.float()).sum(), list(ins32.values()) + list(k.weights.values()))
    gr = torch.autograd.grad((out_r * up).sum(), list(ins64.values()) + list(r.weights.values()))
    names = list(ins32) + list(k.weights)
    for name, a, b in zip(names, gk, gr):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}, seed {seed}: {m}")


def test_shared_weight_has_one_block_per_group_and_sums_its_types_gradients():
    g = load("tiny")
    layer = pg.compile(shared_rgcn, g, 6, groups=(1, 0, 1, 2))
    assert tuple(layer.weights["W"].shape) == (3, 6, 4)
    kinds = [type(l).__name__ for l in layer.forward_program.launches + layer.backward_program.launches]
    assert kinds.count("HostIndex") == 2        # the gather forward, the scatter of its gradient


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_a_map_that_does_not_fit_the_graph_is_refused_at_compile(backend):
    g = load("tiny")
    with pytest.raises(ValueError, match=r"weight 'W': groups= has 2 entries but the graph has 4 etypes"):
        pg.compile(shared_rgcn, g, 6, groups=(0, 1), backend=backend)


def test_groups_need_a_type_axis_and_ints():
    @pg.layer
    def no_axis(g, x):
        return pg.linear(x, pg.weight("W", (x.dim, 2), groups=(0, 1)))

    @pg.layer
    def not_ints(g, x):
        return pg.typed_linear(x, pg.weight("W", (x.dim, 2), per=g.ntype, groups=("a", 1)), by=g.ntype)
    with pytest.raises(pg.SpecError, match="needs per=g.etype or g.ntype"):
        no_axis.trace(4)
    with pytest.raises(pg.SpecError, match="sequence of ints"):
        not_ints.trace(4)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_a_per_type_input_of_the_wrong_shape_is_named(backend):
    g = load("tiny")
    layer = pg.compile(rel_scored, g, {"x": 6, "r": 3}, backend=backend)
    x = torch.randn(g.num_nodes, 6)
    with pytest.raises(InputError, match=r"input 'r' has shape \[3, 3\], expected \[4, 3\] \(etype-wise"):
        layer(x, torch.randn(3, 3))
