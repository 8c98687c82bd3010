import pigeon as pg


@pg.layer
def scaled(g, x, *, out_dim: int = 8, scale: float = 0.5, use_bias: bool = True, aggr: str = "sum"):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    h = pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), aggr) * scale
    if use_bias:
        h = h + pg.weight("b", (out_dim,), init="zeros")
    return h
