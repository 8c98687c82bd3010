"""Hand-written plain-torch layers in the style of DGL's examples: explicit loops over relations,
node types and destination nodes. Slow and obvious on purpose: they check the specs."""
import torch
import torch.nn.functional as F


def _softmax_by_dst(score, dst, num_nodes):
    out = torch.zeros_like(score)
    for v in range(num_nodes):
        m = dst == v
        if m.any():
            out[m] = torch.softmax(score[m], dim=0)
    return out


def rgcn(g, x, p, aggr="mean", bias=True):
    out = x @ p["W_self"]
    if bias:
        out = out + p["b"]
    for r in range(g.num_etypes):
        m = g.etype == r
        src, dst = g.src[m], g.dst[m]
        msg = x[src] @ p["W"][r]
        if aggr == "mean":
            deg = torch.bincount(dst, minlength=g.num_nodes).to(x.dtype)
            msg = msg / deg[dst].unsqueeze(-1)
        out = out.index_add(0, dst, msg)
    return out


def rgat(g, x, p, heads, out_dim, slope=0.2):
    E = g.num_edges
    z_src = x.new_zeros(E, heads, out_dim)
    score = x.new_zeros(E, heads)
    for r in range(g.num_etypes):
        m = g.etype == r
        zs = (x[g.src[m]] @ p["W"][r]).view(-1, heads, out_dim)
        zd = (x[g.dst[m]] @ p["W"][r]).view(-1, heads, out_dim)
        z_src[m] = zs
        score[m] = (zs * p["a_src"][r]).sum(-1) + (zd * p["a_dst"][r]).sum(-1)
    alpha = _softmax_by_dst(F.leaky_relu(score, slope), g.dst, g.num_nodes)
    out = x.new_zeros(g.num_nodes, heads, out_dim).index_add(0, g.dst, alpha.unsqueeze(-1) * z_src)
    return out.reshape(g.num_nodes, heads * out_dim)


def hgt(g, x, p, heads):
    N, n = x.shape
    d = n // heads
    k, q, v = (x.new_zeros(N, n) for _ in range(3))
    for t in range(g.num_ntypes):
        m = g.ntype == t
        k[m], q[m], v[m] = x[m] @ p["W_k"][t], x[m] @ p["W_q"][t], x[m] @ p["W_v"][t]
    k, q, v = (a.view(N, heads, d) for a in (k, q, v))
    E = g.num_edges
    score, msg = x.new_zeros(E, heads), x.new_zeros(E, heads, d)
    for r in range(g.num_etypes):
        m = g.etype == r
        kr = torch.einsum("ehi,hij->ehj", k[g.src[m]], p["W_att"][r])
        score[m] = (q[g.dst[m]] * kr).sum(-1) * p["mu"][r] / d ** 0.5
        msg[m] = torch.einsum("ehi,hij->ehj", v[g.src[m]], p["W_msg"][r])
    alpha = _softmax_by_dst(score, g.dst, N)
    h = x.new_zeros(N, heads, d).index_add(0, g.dst, alpha.unsqueeze(-1) * msg).reshape(N, n)
    h = F.gelu(h)
    out = x.new_zeros(N, n)
    for t in range(g.num_ntypes):
        m = g.ntype == t
        out[m] = h[m] @ p["W_out"][t]
    s = torch.sigmoid(p["skip"][g.ntype])           # [N, 1]
    return s * out + (1 - s) * x


def gated_rgat(g, x, p, heads, out_dim):
    E = g.num_edges
    z_src, score, gate = x.new_zeros(E, heads, out_dim), x.new_zeros(E, heads), x.new_zeros(E, heads)
    for r in range(g.num_etypes):
        m = g.etype == r
        zs = (x[g.src[m]] @ p["W"][r]).view(-1, heads, out_dim)
        z_src[m] = zs
        score[m] = F.leaky_relu((zs * p["a"][r]).sum(-1), 0.2)
        gate[m] = torch.sigmoid(x[g.dst[m]] @ p["gate"][r])
    alpha = _softmax_by_dst(score, g.dst, g.num_nodes)
    h = x.new_zeros(g.num_nodes, heads, out_dim).index_add(0, g.dst, (alpha * gate).unsqueeze(-1) * z_src)
    return h.reshape(g.num_nodes, -1) + x @ p["W_self"]
