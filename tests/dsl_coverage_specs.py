"""Specs for the DSL coverage that RGNN variants need: per-type input tensors, linears on
per-type rows, and weights shared across types through a type -> group map.  Shared by the CPU
tests and the GPU tests; each comes with a hand-written plain-torch layer."""
import torch

import pigeon as pg
from pigeon.reference import aggregate, edge_softmax


@pg.layer
def rel_scored(g, x, r: pg.EtypeTensor, *, out_dim: int = 4):
    """Relation embeddings r [R, d_r], projected (a linear on per-type rows), score each edge."""
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    P = pg.weight("P", (r.dim, out_dim))
    z = pg.typed_linear(g.src(x), W, by=g.etype)                 # [E, out]
    s = pg.dot(z, pg.linear(r, P)[g.etype])                      # [E]
    return pg.aggregate(g, pg.edge_softmax(g, s) * z, "sum")


def rel_scored_torch(g, x, r, p):
    z = torch.einsum("ek,ekn->en", x[g.src], p["W"][g.etype])
    s = (z * (r @ p["P"])[g.etype]).sum(-1)
    return aggregate(edge_softmax(s, g.dst, g.num_nodes)[:, None] * z, g.dst, g.num_nodes, "sum")


@pg.layer
def ntype_bias(g, x, b: pg.NtypeTensor, *, out_dim: int = 3):
    """A per-node-type input added to each node's row."""
    W = pg.weight("W", (x.dim, out_dim))
    return pg.relu(pg.linear(x, W) + pg.linear(b, pg.weight("Q", (b.dim, out_dim)))[g.ntype])


def ntype_bias_torch(g, x, b, p):
    return torch.relu(x @ p["W"] + (b @ p["Q"])[g.ntype])


@pg.layer
def shared_rgcn(g, x, *, out_dim: int = 4, groups: tuple = (0, 0, 1, 1)):
    """RGCN with relation weights shared by groups of relations."""
    W = pg.weight("W", (x.dim, out_dim), per=g.etype, groups=groups)
    return pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), "sum")


def shared_rgcn_torch(g, x, groups, p):
    w = p["W"][torch.tensor(groups)]                              # [R, d, out]
    return aggregate(torch.einsum("ek,ekn->en", x[g.src], w[g.etype]), g.dst, g.num_nodes, "sum")
