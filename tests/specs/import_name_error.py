import pigeon as pg

SCALE = undefined_constant * 2   # line 3: NameError while the spec is imported


@pg.layer
def spec(g, x):
    return pg.aggregate(g, g.src(x), "sum")
