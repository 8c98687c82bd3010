import pigeon as pg


@pg.layer
def mean_by_count(g, x, *, count: int = 0):
    h = pg.aggregate(g, g.src(x), "sum")
    return h / count   # line 7: division by zero (count defaults to 0)
