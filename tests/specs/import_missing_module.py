import pigeon as pg
from pigeon.no_such_module import helper   # line 2: ImportError while the spec is imported


@pg.layer
def spec(g, x):
    return helper(pg.aggregate(g, g.src(x), "sum"))
