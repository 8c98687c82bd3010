"""RGAT: per-relation weight and attention vectors, LeakyReLU scores, softmax over incoming edges."""
import pigeon as pg


@pg.layer
def rgat(g, x, *, out_dim: int = 16, heads: int = 4, negative_slope: float = 0.2):
    W = pg.weight("W", (x.dim, heads * out_dim), per=g.etype)
    a_src = pg.weight("a_src", (heads, out_dim), per=g.etype)
    a_dst = pg.weight("a_dst", (heads, out_dim), per=g.etype)
    z_src = pg.typed_linear(g.src(x), W, by=g.etype).heads(heads)      # [E, H, D]
    z_dst = pg.typed_linear(g.dst(x), W, by=g.etype).heads(heads)
    score = pg.dot(z_src, a_src[g.etype]) + pg.dot(z_dst, a_dst[g.etype])   # [E, H]
    alpha = pg.edge_softmax(g, pg.leaky_relu(score, negative_slope))
    return pg.aggregate(g, alpha * z_src, "sum").flatten()              # [N, H * D]
