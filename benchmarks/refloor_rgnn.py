"""Recompute the floors of a `pigeon bench rgnn` results folder with the current
pigeon.bench.floors (FLOPs of the cheapest form: rows per unique (node, relation) pair), and rewrite
its summary: the timings are untouched, only floor, floor_ratio and the summary keys that depend on
them change.  Needs the same graphs (PIGEON_DATA for the datasets; synthetic ones are rebuilt).

    PIGEON_DATA=... python benchmarks/refloor_rgnn.py benchmarks/results/rgnn
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from pigeon.bench import report, rgnn
from pigeon.graph import load


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    data = report.read_results(out)
    old = json.loads((out / "summary.json").read_text())
    pairs = {}
    for c in data["cases"]:
        name = c["graph"]
        if name not in pairs:
            base, rev = rgnn._base(name)
            g = load(base)
            if rev:
                g = g.with_reverse_edges()
            pairs[name] = g.relation_pairs()
            print(f"{name}: {g.num_edges} edges, {pairs[name][0]} (src, rel) and {pairs[name][1]} (dst, rel) pairs",
                  flush=True)
        c["floor"] = rgnn.case_floor(c["model"], c["dim"], c["dtype"], c["mode"], c["nodes"], c["edges"],
                                     c["relations"], c["node_types"], *pairs[name])
        t = c.get("pigeon_ms")
        c["floor_ratio"] = t / c["floor"]["floor_ms"] if t and c["floor"]["floor_ms"] else None
    host = {m: {"host_overhead_us": v} for m, v in (old.get("host_overhead_us_by_model") or {}).items()}
    s = rgnn.build_summary(data["cases"], data["meta"], data["graphs"], types.SimpleNamespace(skipped_graphs={}),
                           host=host, host_note=old.get("host_overhead_us_note"))
    s["floor_recomputed"] = "floors recomputed offline by benchmarks/refloor_rgnn.py (timings unchanged)"
    report.write_results(out, {**data, "summary": s})
    print({k: s.get(k) for k in ("cases_within_3x_floor", "floor_ratio_geomean", "cases_total")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
