"""Dataset loaders (counts from the datasets README), synthetic presets, save/load, and ``load``."""
import functools
import os
from pathlib import Path

import pytest
import torch

from pigeon.graph import (PRESETS, DatasetError, GraphError, load, load_graph, preset, save_graph,
                          synthetic_graph, tiny_graph)
from pigeon.graph.datasets import _parse_floats, load_fb15k237, load_hgb, load_rdf


def _data_root():
    env = os.environ.get("PIGEON_DATA")
    if env:
        return Path(env)
    return None


ROOT = _data_root()
needs_data = pytest.mark.skipif(ROOT is None or not ROOT.is_dir(),
                                reason="real datasets not found: set PIGEON_DATA to the datasets folder "
                                       "(docs/datasets.md)")


@functools.cache
def fb(split="all"):
    return load_fb15k237(ROOT, split=split)


# ---------- real datasets: counts from the datasets' sources (docs/datasets.md) ----------

@needs_data
def test_fb15k237_all():
    g = fb()
    assert (g.num_nodes, g.num_edges, g.num_etypes, g.num_ntypes) == (14541, 310116, 237, 1)
    assert bool((g.edges_per_etype() > 0).all())
    assert g.etype_names[0].startswith("/")


@needs_data
def test_fb15k237_splits_share_ids():
    full, train, valid, test = fb(), fb("train"), fb("valid"), fb("test")
    assert (train.num_edges, valid.num_edges, test.num_edges) == (272115, 17535, 20466)
    for g in (train, valid, test):
        assert (g.num_nodes, g.num_etypes) == (14541, 237)
    assert torch.equal(torch.cat([train.src, valid.src, test.src]), full.src)
    assert torch.equal(torch.cat([train.etype, valid.etype, test.etype]), full.etype)
    assert int((train.in_degree() + train.out_degree() > 0).sum()) == 14505   # entities seen in train
    assert fb(("valid", "test")).num_edges == 17535 + 20466
    with pytest.raises(DatasetError, match="split"):
        load_fb15k237(ROOT, split="dev")


@needs_data
@pytest.mark.parametrize("name,nodes,edges,rels,literals", [
    ("aifb", 8285, 29043, 45, 5450), ("mutag", 23644, 74227, 23, 1104)])
def test_rdf(name, nodes, edges, rels, literals):
    g = load_rdf(name, ROOT)
    assert (g.num_nodes, g.num_edges, g.num_etypes, g.num_ntypes) == (nodes, edges, rels, 1)
    gl = load_rdf(name, ROOT, literal_ntype=True)
    assert gl.nodes_per_ntype().tolist() == [nodes - literals, literals]
    assert torch.equal(gl.src, g.src) and torch.equal(gl.dst, g.dst)
    assert bool((gl.ntype[gl.src] == 0).all())           # literals are never subjects
    assert load(name, root=ROOT).num_edges == edges


@needs_data
@pytest.mark.parametrize("name,nodes,edges,per_ntype,per_etype", [
    ("acm", 10942, 547872, [3025, 5959, 56, 1902], [5343, 5343, 9949, 9949, 3025, 3025, 255619, 255619]),
    ("dblp", 26128, 239566, [4057, 14328, 7723, 20], [19645, 85810, 14328, 19645, 85810, 14328]),
])
def test_hgb(name, nodes, edges, per_ntype, per_etype):
    g = load_hgb(name, ROOT)
    assert (g.num_nodes, g.num_edges, g.num_ntypes, g.num_etypes) == (nodes, edges, 4, len(per_etype))
    assert g.nodes_per_ntype().tolist() == per_ntype
    assert g.edges_per_etype().tolist() == per_etype
    assert int((g.src == g.dst).sum()) == (16 if name == "acm" else 0)
    assert g.ntype_names[0] == ("paper" if name == "acm" else "author")


@needs_data
def test_hgb_features_acm():
    _, feats = load_hgb("acm", ROOT, features=True)
    assert {t: tuple(f.shape) for t, f in feats.items()} == {0: (3025, 1902), 1: (5959, 1902), 2: (56, 1902)}
    assert feats[0].dtype == torch.float32


def test_parse_floats():
    assert _parse_floats("1,0,3").tolist() == [1.0, 0.0, 3.0]           # single-digit fast path
    assert _parse_floats("1.5,2,-3").tolist() == [1.5, 2.0, -3.0]
    with pytest.raises(DatasetError, match="unparsable"):
        _parse_floats("1,-,3,4")


def test_root_unset_names_env_var(monkeypatch):
    monkeypatch.delenv("PIGEON_DATA", raising=False)
    with pytest.raises(DatasetError, match="PIGEON_DATA"):
        load("aifb")


def test_missing_dir_and_file(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="does not exist"):
        load("aifb", root=tmp_path / "nope")
    monkeypatch.setenv("PIGEON_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=r"missing dataset file .*aifb_stripped\.nt\.gz.*PIGEON_DATA"):
        load("aifb")
    with pytest.raises(DatasetError, match=r"missing dataset file .*train\.txt\.gz"):
        load("fb15k-237")
    with pytest.raises(DatasetError, match=r"missing dataset file .*node\.dat\.gz"):
        load("dblp")


def test_load_unknown_names():
    with pytest.raises(DatasetError, match="unknown graph 'cora'"):
        load("cora")
    with pytest.raises(DatasetError, match="unknown synthetic preset 'nope'"):
        load("synthetic:nope")
    with pytest.raises(DatasetError, match="does not exist"):
        load("missing.pt")
    assert issubclass(DatasetError, ValueError)


# ---------- synthetic ----------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_hit_counts(name):
    p = PRESETS[name]
    scale = 1.0 if p["num_edges"] <= 400_000 else 0.002
    g = preset(name, seed=1, scale=scale)
    if scale == 1.0:
        assert (g.num_nodes, g.num_edges) == (p["num_nodes"], p["num_edges"])
    else:
        assert g.num_nodes == round(p["num_nodes"] * scale) and g.num_edges == round(p["num_edges"] * scale)
    assert g.num_etypes == p["num_etypes"] and g.num_ntypes == p.get("num_ntypes", 1)
    assert bool((g.edges_per_etype() > 0).all())
    if "relations" in p:
        for r, (s, d, _) in enumerate(p["relations"]):
            m = g.etype == r
            assert bool((g.ntype[g.src[m]] == s).all()) and bool((g.ntype[g.dst[m]] == d).all())


def test_ogbn_mag_exact_type_sizes_when_unscaled_split():
    # the preset's node-type and relation sizes are kept exactly (checked without building 21M edges)
    from pigeon.graph.synthetic import _split
    p = PRESETS["ogbn-mag"]
    assert _split(p["num_nodes"], torch.tensor(p["ntype_sizes"]), 1).tolist() == p["ntype_sizes"]
    rel = [r[2] for r in p["relations"]]
    assert _split(p["num_edges"], torch.tensor(rel), 1).tolist() == rel


def test_synthetic_deterministic_per_seed():
    a = preset("aifb", seed=3, scale=0.2)
    b = preset("aifb", seed=3, scale=0.2)
    c = preset("aifb", seed=4, scale=0.2)
    for x in ("src", "dst", "etype", "ntype"):
        assert torch.equal(getattr(a, x), getattr(b, x))
    assert not torch.equal(a.dst, c.dst)


def test_synthetic_is_skewed():
    g = synthetic_graph(5000, 50000, 10, seed=0)
    s = g.stats()
    assert s["degree_skew"] > 20                  # hubs exist
    per = g.edges_per_etype()
    assert int(per.max()) > 3 * int(per.min())    # relation sizes are uneven


def test_synthetic_multi_ntype_and_errors():
    g = synthetic_graph(100, 1000, 6, num_ntypes=3, seed=2)
    assert g.num_ntypes == 3 and bool((g.nodes_per_ntype() > 0).all())
    # every relation connects one (src type, dst type) pair
    for r in range(6):
        m = g.etype == r
        assert g.ntype[g.src[m]].unique().numel() == 1 and g.ntype[g.dst[m]].unique().numel() == 1
    with pytest.raises(GraphError, match="positive counts"):
        synthetic_graph(0, 10, 2)
    with pytest.raises(GraphError, match="ntype_sizes"):
        synthetic_graph(10, 10, 2, num_ntypes=2, ntype_sizes=[3, 3])
    with pytest.raises(GraphError, match="unknown synthetic preset"):
        preset("nope")


def test_load_synthetic_and_tiny():
    assert load("synthetic:fb15k-237", scale=0.01).num_etypes == 237
    assert torch.equal(load("tiny").src, tiny_graph().src)


# ---------- save / load ----------

def test_save_load_round_trip(tmp_path):
    g = synthetic_graph(50, 300, 5, num_ntypes=2, seed=7, etype_names=list("abcde"))
    path = tmp_path / "g.pt"
    save_graph(g, path)
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt"]        # no temp file left behind
    h = load_graph(path)
    for x in ("src", "dst", "etype", "ntype"):
        assert torch.equal(getattr(g, x), getattr(h, x))
    for x in ("num_nodes", "num_edges", "num_etypes", "num_ntypes", "etype_names", "ntype_names", "name"):
        assert getattr(g, x) == getattr(h, x)
    assert torch.equal(load(str(path)).dst, g.dst)


def test_load_graph_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"hello": 1}, path)
    with pytest.raises(DatasetError, match="not a pigeon graph file"):
        load_graph(path)
    path.write_text("garbage")
    with pytest.raises(DatasetError, match="not a readable graph file"):
        load_graph(path)
