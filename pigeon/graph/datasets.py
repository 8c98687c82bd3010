"""Loaders for the real datasets (FB15k-237, AIFB, MUTAG, HGB ACM/DBLP), graph files, and ``load``.

The data directory comes from ``root=`` or the ``PIGEON_DATA`` environment variable; it holds one
folder per dataset (``fb15k-237/``, ``aifb/``, ``mutag/``, ``acm/``, ``dblp/``) as described in its
README.md. Nothing here knows a default path.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .hetero import HeteroGraph
from ..atomic_io import save_atomic
from .synthetic import PRESETS, preset, tiny_graph

__all__ = ["DatasetError", "data_root", "load_fb15k237", "load_rdf", "load_hgb", "load", "save_graph",
           "load_graph", "DATASETS"]

ENV_VAR = "PIGEON_DATA"
DATASETS = ("tiny", "aifb", "mutag", "fb15k-237", "acm", "dblp")
_FORMAT = "pigeon.graph/1"


class DatasetError(ValueError):
    """A dataset cannot be found or read."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$PIGEON_DATA``; a DatasetError if neither names a directory."""
    if root is None:
        root = os.environ.get(ENV_VAR)
        if not root:
            raise DatasetError(f"no dataset directory: pass root=... or set the {ENV_VAR} environment "
                               f"variable to the folder holding fb15k-237/, aifb/, mutag/, acm/, dblp/")
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"dataset directory {str(path)!r} does not exist (from root= or {ENV_VAR})")
    return path


def _file(root, *parts: str) -> Path:
    path = data_root(root).joinpath(*parts)
    if not path.is_file():
        raise DatasetError(f"missing dataset file {str(path)!r}; check root= or the {ENV_VAR} "
                           f"environment variable")
    return path


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def load_fb15k237(root=None, split: str | Sequence[str] = "all") -> HeteroGraph:
    """FB15k-237 (one node type). ``split`` is "all" (train+valid+test), one of "train", "valid",
    "test", or a list of them.

    Id convention: entities and relations get ids in order of first appearance while reading
    train, valid, then test, line by line (head before tail). Ids are assigned over all three files
    whatever ``split`` is, so they agree across splits and the graph always has 14,541 nodes and
    237 relations (some nodes are isolated in a single split). Edge order follows the files.
    """
    names = ("train", "valid", "test")
    wanted = set(names) if split == "all" else {split} if isinstance(split, str) else set(split)
    if not wanted or not wanted <= set(names):
        raise DatasetError(f"split must be 'all' or among {names}, got {split!r}")
    heads, rels, tails, keep = [], [], [], []
    for part in names:
        path = _file(root, "fb15k-237", f"{part}.txt.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [ln for ln in f.read().replace("\r", "").split("\n") if ln]
        fields = "\t".join(lines).split("\t")
        if len(fields) != 3 * len(lines):
            bad = next(i for i, ln in enumerate(lines) if ln.count("\t") != 2)
            raise DatasetError(f"{path}: line {bad + 1} is not head<TAB>relation<TAB>tail: {lines[bad]!r}")
        heads += fields[0::3]
        rels += fields[1::3]
        tails += fields[2::3]
        keep += [part in wanted] * len(lines)
    # first appearance, line by line, head before tail (dicts keep insertion order)
    both = [x for pair in zip(heads, tails) for x in pair]
    ent = {k: i for i, k in enumerate(dict.fromkeys(both))}
    rel = {k: i for i, k in enumerate(dict.fromkeys(rels))}
    mask = torch.tensor(keep)
    src = torch.tensor([ent[h] for h in heads])[mask]
    dst = torch.tensor([ent[t] for t in tails])[mask]
    ety = torch.tensor([rel[r] for r in rels])[mask]
    label = "fb15k-237" if split == "all" else f"fb15k-237:{'+'.join(p for p in names if p in wanted)}"
    return HeteroGraph(src, dst, ety, num_nodes=len(ent),
                       num_etypes=len(rel), etype_names=list(rel), ntype_names=["entity"], name=label)


def load_rdf(name: str, root=None, *, literal_ntype: bool = False) -> HeteroGraph:
    """AIFB or MUTAG from ``<name>/<name>_stripped.nt.gz`` (N-Triples), R-GCN counting convention.

    Every triple is one edge subject -> object; relations are the raw predicates (no inverses).
    Literals are nodes, one per distinct literal token (lexical form with its datatype/language
    tag). Node and relation ids are in order of first appearance (subject before object). All
    nodes have type 0 ("entity"), unless ``literal_ntype``: then literals have type 1 ("literal").
    """
    key = name.lower()
    if key not in ("aifb", "mutag"):
        raise DatasetError(f"load_rdf knows 'aifb' and 'mutag', got {name!r}")
    path = _file(root, key, f"{key}_stripped.nt.gz")
    ent: dict[str, int] = {}
    rel: dict[str, int] = {}
    subj, pred, obj = [], [], []
    literal: list[int] = []
    for n, line in enumerate(_lines(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) != 3 or not parts[2].endswith("."):
            raise DatasetError(f"{path}:{n}: not an N-Triples line: {line[:200]!r}")
        s, p, o = parts[0], parts[1], parts[2][:-1].rstrip()
        subj.append(ent.setdefault(s, len(ent)))
        pred.append(rel.setdefault(p, len(rel)))
        before = len(ent)
        obj.append(ent.setdefault(o, before))
        if len(ent) > before and o.startswith('"'):
            literal.append(before)
    N = len(ent)
    if literal_ntype:
        ntype = torch.zeros(N, dtype=torch.int64)
        ntype[torch.tensor(literal, dtype=torch.int64)] = 1
        ntype_kw = dict(ntype=ntype, num_ntypes=2, ntype_names=["entity", "literal"])
    else:
        ntype_kw = dict(num_ntypes=1, ntype_names=["entity"])
    return HeteroGraph(torch.tensor(subj), torch.tensor(obj), torch.tensor(pred), num_nodes=N,
                       num_etypes=len(rel), etype_names=[p.strip("<>") for p in rel], name=key, **ntype_kw)


def _hgb_names(root, key):
    """Node- and link-type names from info.dat, or None where it cannot be read."""
    try:
        info = json.loads(_file(root, key, "info.dat").read_text(encoding="utf-8"))
        nt = info["node.dat"]["node type"]
        lt = info["link.dat"]["link type"]
        return ({int(k): str(v) for k, v in nt.items()}, {int(k): str(v["meaning"]) for k, v in lt.items()})
    except (DatasetError, ValueError, KeyError, TypeError):
        return None, None


def load_hgb(name: str, root=None, *, features: bool = False):
    """ACM or DBLP in the HGB format (``node.dat.gz``, ``link.dat.gz``, ``info.dat``).

    Node ids and types come from node.dat; edges and relation ids (link types, reverses included)
    from link.dat, in file order; weights are ignored. Names come from info.dat when it parses.
    With ``features=True`` returns ``(graph, feats)`` where ``feats[t]`` is a float32
    ``[nodes of type t, dim]`` tensor, rows in node-id order, for each type that has features.
    """
    key = name.lower()
    if key not in ("acm", "dblp"):
        raise DatasetError(f"load_hgb knows 'acm' and 'dblp', got {name!r}")
    node_path = _file(root, key, "node.dat.gz")
    link_path = _file(root, key, "link.dat.gz")
    ids, types = [], []
    feat_rows: dict[int, list[tuple[int, str]]] = {}
    for n, line in enumerate(_lines(node_path), 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        f = line.split("\t", 3)
        if len(f) < 3:
            raise DatasetError(f"{node_path}:{n}: expected id<TAB>name<TAB>type[<TAB>features]")
        ids.append(int(f[0]))
        types.append(int(f[2]))
        if features and len(f) == 4:
            feat_rows.setdefault(int(f[2]), []).append((int(f[0]), f[3]))
    ids_t = torch.tensor(ids)
    N = len(ids)
    if not torch.equal(torch.sort(ids_t).values, torch.arange(N)):
        raise DatasetError(f"{node_path}: node ids are not exactly 0..{N - 1}")
    ntype = torch.empty(N, dtype=torch.int64)
    ntype[ids_t] = torch.tensor(types)

    with gzip.open(link_path, "rt", encoding="utf-8") as f:
        text = f.read()
    rows = sum(1 for ln in text.split("\n") if ln.strip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)      # older numpy warns on bad text
        try:
            flat = np.fromstring(text, dtype=np.float64, sep=" ")  # any whitespace separates
        except ValueError:                                         # newer numpy raises
            flat = np.zeros(0)
    if rows == 0 or flat.size != 4 * rows:
        raise DatasetError(f"{link_path}: expected {rows} lines of src<TAB>dst<TAB>type<TAB>weight, "
                           f"parsed {flat.size} numbers")
    links = torch.from_numpy(flat.reshape(-1, 4)[:, :3].astype(np.int64))
    src, dst, et = links.unbind(1)
    T = int(ntype.max()) + 1
    R = int(et.max()) + 1
    nt_names, lt_names = _hgb_names(root, key)
    g = HeteroGraph(src, dst, et, num_nodes=N, ntype=ntype,
                    num_etypes=R, num_ntypes=T,
                    etype_names=[lt_names.get(r, f"r{r}") for r in range(R)] if lt_names else None,
                    ntype_names=[nt_names.get(t, f"n{t}") for t in range(T)] if nt_names else None,
                    name=key)
    if not features:
        return g
    feats = {}
    for t, items in feat_rows.items():
        items.sort(key=lambda x: x[0])
        flat = _parse_floats(",".join(v for _, v in items))
        if flat.size % len(items):
            raise DatasetError(f"{node_path}: feature rows of node type {t} have unequal lengths")
        feats[t] = torch.from_numpy(flat).reshape(len(items), -1)
    return g, feats


def _parse_floats(text: str) -> np.ndarray:
    """Comma-separated numbers as float32; a fast path for all-single-digit text (bag-of-words)."""
    if 2 * text.count(",") + 1 == len(text):
        digits = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8)[::2] - ord("0")
        if digits.max(initial=0) <= 9:
            return digits.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=np.float32, sep=",")
        except ValueError as e:
            raise DatasetError(f"unparsable feature values: {e}") from None


def save_graph(g: HeteroGraph, path) -> None:
    """Write ``g`` (index tensors, counts, names) with torch.save, atomically (temp file + os.replace)."""
    path = Path(path)
    data = {
        "format": _FORMAT,
        "src": g.src.cpu(), "dst": g.dst.cpu(), "etype": g.etype.cpu(), "ntype": g.ntype.cpu(),
        "num_nodes": g.num_nodes, "num_etypes": g.num_etypes, "num_ntypes": g.num_ntypes,
        "etype_names": list(g.etype_names), "ntype_names": list(g.ntype_names), "name": g.name,
    }
    save_atomic(path, lambda tmp: torch.save(data, tmp))


def load_graph(path, device=None) -> HeteroGraph:
    """Read a graph written by :func:`save_graph` (validated again on load)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"graph file {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        raise DatasetError(f"{str(path)!r} is not a readable graph file: {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise DatasetError(f"{str(path)!r} is not a pigeon graph file (expected format {_FORMAT!r})")
    g = HeteroGraph(data["src"], data["dst"], data["etype"], ntype=data["ntype"], num_nodes=data["num_nodes"],
                    num_etypes=data["num_etypes"], num_ntypes=data["num_ntypes"],
                    etype_names=data["etype_names"], ntype_names=data["ntype_names"], name=data["name"])
    return g if device is None else g.to(device)


def load(name_or_path: str | os.PathLike, root=None, *, seed: int = 0, scale: float = 1.0) -> HeteroGraph:
    """A graph by name: one of ``DATASETS`` (real files under ``root``/``$PIGEON_DATA``, except
    "tiny", which is built in code), ``"synthetic:<preset>"`` (``seed`` and ``scale`` go to
    :func:`preset`), or a path to a file written by :func:`save_graph`."""
    text = str(name_or_path)
    key = text.lower()
    if key == "tiny":
        return tiny_graph()
    if key in ("fb15k-237", "fb15k237"):
        return load_fb15k237(root)
    if key in ("aifb", "mutag"):
        return load_rdf(key, root)
    if key in ("acm", "dblp"):
        return load_hgb(key, root)
    if key.startswith("synthetic:"):
        name = key.split(":", 1)[1]
        if name not in PRESETS:
            raise DatasetError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
        return preset(name, seed=seed, scale=scale)
    if text.endswith(".pt") or Path(text).is_file():
        return load_graph(text)
    raise DatasetError(f"unknown graph {text!r}: expected one of {', '.join(DATASETS)}, "
                       f"'synthetic:<{'|'.join(PRESETS)}>', or a path to a .pt file from save_graph")
