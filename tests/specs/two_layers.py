import pigeon as pg


@pg.layer
def first(g, x):
    return pg.aggregate(g, g.src(x), "sum")


@pg.layer
def second(g, x):
    return pg.aggregate(g, g.src(x), "max")
