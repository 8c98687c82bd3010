"""A user-written variant: RGAT whose messages pass through a per-relation sigmoid gate computed
from the destination node, and whose output keeps a self-loop linear (a CompGCN-style residual).
Written with the public DSL only; compile it with `pigeon compile examples/gated_rgat.py`."""
import pigeon as pg


@pg.layer
def gated_rgat(g, x, *, out_dim: int = 16, heads: int = 2):
    W = pg.weight("W", (x.dim, heads * out_dim), per=g.etype)
    a = pg.weight("a", (heads, out_dim), per=g.etype)
    gate_w = pg.weight("gate", (x.dim, heads), per=g.etype)
    z_src = pg.typed_linear(g.src(x), W, by=g.etype).heads(heads)
    score = pg.leaky_relu(pg.dot(z_src, a[g.etype]), 0.2)
    gate = pg.sigmoid(pg.typed_linear(g.dst(x), gate_w, by=g.etype))      # [E, H]
    msg = pg.edge_softmax(g, score) * gate * z_src
    h = pg.aggregate(g, msg, "sum").flatten()
    return h + pg.linear(x, pg.weight("W_self", (x.dim, heads * out_dim)))
