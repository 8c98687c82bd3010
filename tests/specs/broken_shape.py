import pigeon as pg


@pg.layer
def broken(g, x, *, out_dim: int = 8):
    W = pg.weight("W", (x.dim + 1, out_dim), per=g.etype)
    return pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), "sum")   # line 7: K mismatch
