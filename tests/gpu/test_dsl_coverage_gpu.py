"""Per-type inputs, linears on per-type rows and shared weights through pigeon's CUDA kernels,
forward and backward, against the reference interpreter (float64), with NaN-poisoned buffers."""
import random
import sys
from pathlib import Path

import pytest
import torch

import pigeon as pg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsl_coverage_specs import ntype_bias, rel_scored, shared_rgcn  # noqa: E402
from graphs import random_graph  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
DIMS = {rel_scored: {"x": 16, "r": 8}, ntype_bias: {"x": 16, "b": 4}, shared_rgcn: 16}
EXTRA = {rel_scored: ("r", lambda g: g.num_etypes, 8), ntype_bias: ("b", lambda g: g.num_ntypes, 4)}


@pytest.mark.parametrize("spec", [rel_scored, ntype_bias, shared_rgcn], ids=lambda s: s.name)
def test_cuda_kernels_equal_the_reference(spec, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = random_graph(seed, num_nodes=300, num_edges=3000, num_etypes=4, num_ntypes=3)
    k = pg.compile(spec, g, DIMS[spec], seed=seed).to(DEV)
    r = pg.compile(spec, g, DIMS[spec], backend="reference", dtype="float64", seed=seed).to(DEV)
    gen = torch.Generator().manual_seed(seed)
    ins = {"x": torch.randn(g.num_nodes, 16, generator=gen, dtype=torch.float64)}
    if spec in EXTRA:
        name, rows, d = EXTRA[spec]
        ins[name] = torch.randn(rows(g), d, generator=gen, dtype=torch.float64)
    i64 = {n: v.to(DEV).requires_grad_(True) for n, v in ins.items()}
    i32 = {n: v.detach().float().requires_grad_(True) for n, v in i64.items()}
    out_k, out_r = k(**i32), r(**i64)
    torch.testing.assert_close(out_k.double(), out_r, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    up = torch.randn_like(out_r)
    gk = torch.autograd.grad((out_k * up.float()).sum(), list(i32.values()) + list(k.weights.values()))
    gr = torch.autograd.grad((out_r * up).sum(), list(i64.values()) + list(r.weights.values()))
    for name, a, b in zip(list(i32) + list(k.weights), gk, gr):
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
        assert rel < 1e-4, f"{name}: rel err {rel:.2e} (seed {seed})"
