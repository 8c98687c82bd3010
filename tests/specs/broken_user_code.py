import pigeon as pg


@pg.layer
def broken(g, x):
    h = pg.aggregate(g, g.src(x), "sum")
    return h.no_such_method()   # line 7: AttributeError in user code
