"""RGCN (Schlichtkrull et al. 2018): per-relation weights, per-relation mean, self-loop weight, bias."""
import pigeon as pg


@pg.layer
def rgcn(g, x, *, out_dim: int = 16, aggr: str = "mean", bias: bool = True):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    W_self = pg.weight("W_self", (x.dim, out_dim))
    msg = pg.typed_linear(g.src(x), W, by=g.etype)
    if aggr == "mean":       # mean over each relation's incoming edges, summed over relations
        msg = msg * g.inv_in_degree_by_etype()
    h = pg.aggregate(g, msg, "sum") + pg.linear(x, W_self)
    if bias:
        h = h + pg.weight("b", (out_dim,), init="zeros")
    return h
