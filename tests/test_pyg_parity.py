"""Where the math coincides, the specs equal PyG's RGCNConv and RGATConv on the same weights."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.models import rgat, rgcn
from pigeon.reference import run

from graphs import random_graph

pyg = pytest.importorskip("torch_geometric.nn")


def test_rgcn_equals_pyg_rgcnconv():
    seed = random.randrange(1 << 30)
    g = random_graph(seed)
    conv = pyg.RGCNConv(8, 5, g.num_etypes, aggr="mean", root_weight=True, bias=True).double()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p))
    layer = pg.compile(rgcn, g, 8, out_dim=5, backend="reference").double()
    params = {"W": conv.weight, "W_self": conv.root, "b": conv.bias}
    x = torch.randn(g.num_nodes, 8, dtype=torch.float64)
    ours = run(layer.ir, g, {"x": x}, params)["out"]
    theirs = conv(x, torch.stack([g.src, g.dst]), g.etype)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")


def test_rgat_equals_pyg_rgatconv_with_shared_attention():
    """PyG's RGATConv shares q/k across relations and mixes heads through full matrices; with the
    same attention vectors for every relation and block-diagonal q/k the two models coincide."""
    seed = random.randrange(1 << 30)
    H, D = 2, 3
    g = random_graph(seed)
    conv = pyg.RGATConv(8, D, g.num_etypes, heads=H, concat=True, bias=True).double()
    torch.manual_seed(seed)
    W = torch.randn(g.num_etypes, 8, H * D, dtype=torch.float64)
    a_src, a_dst = torch.randn(H, D, dtype=torch.float64), torch.randn(H, D, dtype=torch.float64)
    q, k = torch.zeros(H * D, H, dtype=torch.float64), torch.zeros(H * D, H, dtype=torch.float64)
    for h in range(H):
        q[h * D:(h + 1) * D, h] = a_dst[h]    # PyG's q scores the destination (x_i)
        k[h * D:(h + 1) * D, h] = a_src[h]
    with torch.no_grad():
        conv.weight.copy_(W)
        conv.q.copy_(q)
        conv.k.copy_(k)
        conv.bias.zero_()
    layer = pg.compile(rgat, g, 8, out_dim=D, heads=H, backend="reference").double()
    params = {"W": W, "a_src": a_src.expand(g.num_etypes, H, D), "a_dst": a_dst.expand(g.num_etypes, H, D)}
    x = torch.randn(g.num_nodes, 8, dtype=torch.float64)
    ours = run(layer.ir, g, {"x": x}, params)["out"]
    theirs = conv(x, torch.stack([g.src, g.dst]), g.etype)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
