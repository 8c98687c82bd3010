"""HGT (Hu et al. 2020): per-node-type K/Q/V, per-relation attention and message matrices and
priors, multi-head edge softmax, per-node-type output linear, gated skip connection."""
import pigeon as pg


@pg.layer
def hgt(g, x, *, heads: int = 4):
    n, d = x.dim, x.dim // heads
    k = pg.typed_linear(x, pg.weight("W_k", (n, n), per=g.ntype), by=g.ntype).heads(heads)
    q = pg.typed_linear(x, pg.weight("W_q", (n, n), per=g.ntype), by=g.ntype).heads(heads)
    v = pg.typed_linear(x, pg.weight("W_v", (n, n), per=g.ntype), by=g.ntype).heads(heads)
    k_r = pg.typed_linear(g.src(k), pg.weight("W_att", (heads, d, d), per=g.etype), by=g.etype)
    v_r = pg.typed_linear(g.src(v), pg.weight("W_msg", (heads, d, d), per=g.etype), by=g.etype)
    prior = pg.weight("mu", (heads,), per=g.etype, init="ones")
    score = pg.dot(g.dst(q), k_r) * prior[g.etype] * (1.0 / d ** 0.5)        # [E, H]
    h = pg.aggregate(g, pg.edge_softmax(g, score) * v_r, "sum").flatten()     # [N, n]
    out = pg.typed_linear(pg.gelu(h), pg.weight("W_out", (n, n), per=g.ntype), by=g.ntype)
    skip = pg.sigmoid(pg.weight("skip", (1,), per=g.ntype, init="ones")[g.ntype])
    return skip * out + (1 - skip) * x
