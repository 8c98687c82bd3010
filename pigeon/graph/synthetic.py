"""Seeded synthetic heterographs with power-law degree skew, and presets with published statistics."""
from __future__ import annotations

from typing import Sequence

import torch

from .hetero import GraphError, HeteroGraph

__all__ = ["synthetic_graph", "preset", "PRESETS", "tiny_graph"]


# Published statistics (the datasets' papers; docs/datasets.md lists the sources). Literals count as nodes for the
# RDF graphs (R-GCN convention). ogbn-mag lists node-type sizes and (src type, dst type, edges)
# per relation.
PRESETS: dict[str, dict] = {
    "tiny": dict(num_nodes=40, num_edges=150, num_etypes=4, num_ntypes=2),
    "aifb": dict(num_nodes=8285, num_edges=29043, num_etypes=45),
    "mutag": dict(num_nodes=23644, num_edges=74227, num_etypes=23),
    "bgs": dict(num_nodes=333845, num_edges=916199, num_etypes=103),
    "am": dict(num_nodes=1666764, num_edges=5988321, num_etypes=133),
    "fb15k-237": dict(num_nodes=14541, num_edges=310116, num_etypes=237),
    "ogbn-mag": dict(
        num_nodes=1939743, num_edges=21111007, num_etypes=4, num_ntypes=4,
        ntype_sizes=[736389, 1134649, 8740, 59965],
        ntype_names=["paper", "author", "institution", "field_of_study"],
        # (src ntype, dst ntype, edges)
        relations=[(1, 0, 7145660), (0, 0, 5416271), (0, 3, 7505078), (1, 2, 1043998)],
        etype_names=["writes", "cites", "has_topic", "affiliated_with"],
    ),
    # OGB's ogbl-biokg: 93,773 entities of 5 types, 5,088,434 triples (train + valid + test) over 51
    # relations; OGB does not list per-relation sizes, so relation sizes and their end types come
    # from the generator's skewed default
    "ogbl-biokg": dict(
        num_nodes=93773, num_edges=5088434, num_etypes=51, num_ntypes=5,
        ntype_sizes=[10687, 10533, 45085, 17499, 9969],
        ntype_names=["disease", "drug", "function", "protein", "sideeffect"],
    ),
}


def _split(total: int, weights: torch.Tensor, minimum: int) -> torch.Tensor:
    """Integers >= ``minimum`` summing to ``total``, proportional to ``weights`` (largest remainder;
    parts raised to ``minimum`` are paid for by the largest part). Exact when weights sum to total."""
    n = weights.numel()
    if total < minimum * n:
        raise GraphError(f"cannot split {total} into {n} parts of at least {minimum}")
    exact = weights.to(torch.float64) / weights.to(torch.float64).sum() * total
    out = exact.floor().to(torch.int64)
    short = total - int(out.sum())
    if short > 0:
        order = torch.sort(exact - out, descending=True, stable=True).indices
        out[order[:short]] += 1
    deficit = int((minimum - out).clamp(min=0).sum())
    out = out.clamp(min=minimum)
    while deficit > 0:   # at most a few rounds: the largest part absorbs what it can
        i = int(torch.argmax(out))
        take = min(deficit, int(out[i]) - minimum)
        out[i] -= take
        deficit -= take
    return out


def _zipf(n: int, alpha: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)


def _node_sampler(ntype: torch.Tensor, offsets: torch.Tensor, alpha: float, gen: torch.Generator):
    """Return f(types) drawing one node of each given type, with P(rank k) ~ k^-alpha.

    Ranks come from the inverse CDF of the continuous power law on [1, n+1) (n = nodes of the
    type), elementwise, so no search and no loop over types; rank k maps to a node through a
    random permutation of the type's (contiguous) id block.
    """
    N = ntype.numel()
    perm = torch.randperm(N, generator=gen)
    order = perm[torch.sort(ntype[perm], stable=True).indices]      # nodes grouped by type, shuffled
    sizes = torch.diff(offsets).to(torch.float64)

    def draw(types: torch.Tensor) -> torch.Tensor:
        u = torch.rand(types.numel(), generator=gen, dtype=torch.float64)
        top = sizes[types] + 1.0
        if abs(alpha - 1.0) < 1e-9:
            x = top.pow(u)
        else:
            b = 1.0 - alpha
            x = (1.0 + u * (top.pow(b) - 1.0)).pow(1.0 / b)
        rank = torch.minimum(x.floor().to(torch.int64) - 1, top.to(torch.int64) - 2).clamp_(min=0)
        return order[offsets[types] + rank]

    return draw


def synthetic_graph(num_nodes: int, num_edges: int, num_etypes: int, *, num_ntypes: int = 1,
                    skew: float = 0.8, rel_skew: float = 1.0, src_skew: float | None = None,
                    seed: int = 0, ntype_sizes: Sequence[int] | None = None,
                    relations: Sequence[tuple[int, int, int]] | None = None,
                    etype_names: Sequence[str] | None = None, ntype_names: Sequence[str] | None = None,
                    name: str | None = None) -> HeteroGraph:
    """A seeded random heterograph with exactly the given node, edge, relation and node-type counts.

    Node types are contiguous id blocks (``ntype_sizes``, else Zipf-sized, each >= 1). Relation
    sizes follow a Zipf law with exponent ``rel_skew`` (each >= 1 when ``num_edges >= num_etypes``),
    and each relation gets a random (src type, dst type) pair, unless ``relations`` gives
    ``(src_type, dst_type, edges)`` per relation. Destinations are drawn within their type with
    probability ~ rank^-skew over a random ranking (sources with ``src_skew``, default
    0.75 * skew), so in- and out-degrees are power-law skewed. Self-loops, duplicate edges and
    isolated nodes may occur. Same arguments, same graph.
    """
    if num_nodes < 1 or num_edges < 1 or num_etypes < 1 or num_ntypes < 1:
        raise GraphError(f"synthetic_graph needs positive counts, got num_nodes={num_nodes}, "
                         f"num_edges={num_edges}, num_etypes={num_etypes}, num_ntypes={num_ntypes}")
    gen = torch.Generator().manual_seed(int(seed))
    if ntype_sizes is None:
        sizes = _split(num_nodes, _zipf(num_ntypes, 1.0), 1)
    else:
        sizes = torch.as_tensor(list(ntype_sizes), dtype=torch.int64)
        if sizes.numel() != num_ntypes or int(sizes.sum()) != num_nodes or bool((sizes < 1).any()):
            raise GraphError(f"ntype_sizes {sizes.tolist()} must be {num_ntypes} positive sizes "
                             f"summing to num_nodes={num_nodes}")
    offsets = torch.zeros(num_ntypes + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    ntype = torch.repeat_interleave(torch.arange(num_ntypes), sizes)

    if relations is None:
        rel_sizes = _split(num_edges, _zipf(num_etypes, rel_skew), 1 if num_edges >= num_etypes else 0)
        rel_sizes = rel_sizes[torch.randperm(num_etypes, generator=gen)]
        rel_src_t = torch.randint(0, num_ntypes, (num_etypes,), generator=gen)
        rel_dst_t = torch.randint(0, num_ntypes, (num_etypes,), generator=gen)
    else:
        rel = torch.as_tensor([list(r) for r in relations], dtype=torch.int64).reshape(-1, 3)
        if rel.shape[0] != num_etypes or int(rel[:, 2].sum()) != num_edges:
            raise GraphError(f"relations must list {num_etypes} (src_type, dst_type, edges) triples "
                             f"whose edges sum to num_edges={num_edges}")
        rel_src_t, rel_dst_t, rel_sizes = rel.unbind(1)

    etype = torch.repeat_interleave(torch.arange(num_etypes), rel_sizes)
    etype = etype[torch.randperm(num_edges, generator=gen)]
    draw_src = _node_sampler(ntype, offsets, 0.75 * skew if src_skew is None else src_skew, gen)
    draw_dst = _node_sampler(ntype, offsets, skew, gen)
    src = draw_src(rel_src_t[etype])
    dst = draw_dst(rel_dst_t[etype])
    return HeteroGraph(src, dst, etype, num_nodes=num_nodes, ntype=ntype, num_etypes=num_etypes,
                       num_ntypes=num_ntypes, etype_names=etype_names, ntype_names=ntype_names,
                       name=name or f"synthetic(N={num_nodes},E={num_edges},R={num_etypes},seed={seed})")


def preset(name: str, seed: int = 0, scale: float = 1.0, skew: float = 0.8) -> HeteroGraph:
    """A synthetic graph with the statistics of ``PRESETS[name]``; ``scale`` < 1 shrinks node and
    edge counts (and every node-type / relation size) proportionally, keeping the relation and
    node-type counts."""
    key = name.lower()
    if key not in PRESETS:
        raise GraphError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    if not scale > 0:
        raise GraphError(f"scale must be > 0, got {scale}")
    p = dict(PRESETS[key])
    R, T = p["num_etypes"], p.get("num_ntypes", 1)
    N = max(round(p["num_nodes"] * scale), T)
    E = max(round(p["num_edges"] * scale), 1)
    kw = {}
    if "ntype_sizes" in p:
        kw["ntype_sizes"] = _split(N, torch.tensor(p["ntype_sizes"]), 1).tolist()
    if "relations" in p:
        per_rel = _split(E, torch.tensor([r[2] for r in p["relations"]]), 1 if E >= R else 0)
        kw["relations"] = [(s, d, int(c)) for (s, d, _), c in zip(p["relations"], per_rel)]
    for k in ("etype_names", "ntype_names"):
        if k in p:
            kw[k] = p[k]
    suffix = "" if scale == 1.0 else f"@{scale:g}"
    return synthetic_graph(N, E, R, num_ntypes=T, skew=skew, seed=seed,
                           name=f"synthetic:{key}{suffix}", **kw)


def tiny_graph() -> HeteroGraph:
    """The bundled 40-node test graph, built by integer arithmetic (no RNG), so it never changes.

    Node types: paper = nodes 0..23, author = 24..39. Relations: cites (paper->paper, 60 edges
    plus the self-loop 5->5), writes (author->paper, 50), unused (EMPTY), written_by
    (paper->author, 40). Node 39 is isolated. 151 edges; destinations are skewed toward low ids.
    """
    def h(i: torch.Tensor, a: int, b: int, m: int) -> torch.Tensor:
        return (i * a + b) * 2654435761 % 4294967296 % m

    def skewed(i, a, b, m):  # quadratic map: low ids are hit far more often
        x = h(i, a, b, m)
        return x * x // m

    papers, authors = 24, 15                      # author ids 24..38; 39 is isolated
    i60, i50, i40 = torch.arange(60), torch.arange(50), torch.arange(40)
    src = torch.cat([h(i60, 7, 3, papers), torch.tensor([5]), papers + h(i50, 11, 5, authors),
                     h(i40, 13, 1, papers)])
    dst = torch.cat([skewed(i60, 17, 9, papers), torch.tensor([5]), skewed(i50, 19, 2, papers),
                     papers + skewed(i40, 23, 7, authors)])
    etype = torch.cat([torch.zeros(61, dtype=torch.int64), torch.ones(50, dtype=torch.int64),
                       torch.full((40,), 3, dtype=torch.int64)])
    ntype = torch.cat([torch.zeros(papers, dtype=torch.int64), torch.ones(16, dtype=torch.int64)])
    return HeteroGraph(src, dst, etype, num_nodes=40, ntype=ntype, num_etypes=4, num_ntypes=2,
                       etype_names=["cites", "writes", "unused", "written_by"],
                       ntype_names=["paper", "author"], name="tiny")
