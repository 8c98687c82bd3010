import pigeon as pg

HIDDEN = 64
HEADS = 0
HEAD_DIM = HIDDEN // HEADS   # line 5: ZeroDivisionError while the spec is imported


@pg.layer
def spec(g, x):
    return pg.aggregate(g, g.src(x), "sum")
