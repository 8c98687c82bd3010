"""Merge newer `pigeon bench rgnn` runs into a results folder: each newer case replaces the case of the
same (graph, model, dim, dtype, mode), newer aggregations replace those of the same (graph, dim,
dtype), the newer runs' commands join ``meta.commands``, and the summary is rebuilt with the same
code that writes it at the end of a run (pigeon.bench.rgnn.build_summary, report.write_results).
Host overhead comes from the newest run that measured it, else it stays the old summary's.  Every
case keeps its own commit and date, and the summary lists the commits.

    python benchmarks/merge_rgnn.py benchmarks/results/rgnn NEWER_RUN_DIR [NEWER_RUN_DIR ...]
    python benchmarks/merge_rgnn.py --tune-only benchmarks/results/rgnn TUNE_RUN_DIR [...]

``--tune-only`` takes from the newer runs only each case's ``tune`` (a `--tune-check` run, e.g. with
``--peers none``): it joins the case of the same key, with its own commit and date in it, and leaves
that case's timings and peers as they are; a tuned case the folder lacks is an error.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from pigeon.bench import report, rgnn


def _agg_key(a: dict) -> tuple:
    return (a.get("graph"), a.get("dim"), a.get("dtype"))


def _host(summary: dict) -> dict:
    """A run's per-model host overhead as build_summary takes it, with its batches where recorded."""
    detail = summary.get("host_overhead_detail") or {}
    return {m: {"host_overhead_us": v, **detail.get(m, {})}
            for m, v in (summary.get("host_overhead_us_by_model") or {}).items()}


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 2:
        print("usage: merge_rgnn.py RESULTS_DIR NEWER_RUN_DIR [...]", file=sys.stderr)
        return 2
    tune_only = bool(args) and args[0] == "--tune-only"
    if tune_only:
        args = args[1:]
        if len(args) < 2:
            print("usage: merge_rgnn.py --tune-only RESULTS_DIR TUNE_RUN_DIR [...]", file=sys.stderr)
            return 2
    out, newer = Path(args[0]), [Path(a) for a in args[1:]]
    data = report.read_results(out)
    old = json.loads((out / "summary.json").read_text())
    cases = {rgnn.case_key(c): c for c in data["cases"]}
    aggs = {_agg_key(a): a for a in data.get("aggregations", [])}
    graphs = {g["graph"]: g for g in data["graphs"]}
    commands = list(data["meta"].get("commands") or [data["meta"]["command"]])
    host = _host(old)
    host_note = old.get("host_overhead_us_note")
    replaced = added = 0
    for d in newer:
        run = report.read_results(d)
        s = json.loads((d / "summary.json").read_text())
        if tune_only:
            for c in run["cases"]:
                k = rgnn.case_key(c)
                if c.get("tune") is None:
                    continue
                if k not in cases:
                    print(f"merge_rgnn.py: {d}: tuned case {k} is not in {out}", file=sys.stderr)
                    return 2
                cases[k] = {**cases[k], "tune": {**c["tune"], "commit": c.get("commit", run["meta"].get("commit")),
                                                 "date": c.get("date", run["meta"].get("date"))}}
                replaced += 1
            commands.append(run["meta"]["command"])
            continue
        for c in run["cases"]:
            k = rgnn.case_key(c)
            replaced, added = (replaced + 1, added) if k in cases else (replaced, added + 1)
            cases[k] = c
        for a in run.get("aggregations", []):
            aggs[_agg_key(a)] = a
        for g in run["graphs"]:
            graphs[g["graph"]] = g
        commands.append(run["meta"]["command"])
        if s.get("host_overhead_us_by_model"):
            # per model: the newest run that measured it (a run of fewer models keeps the others')
            got = _host(s)
            kept = sorted(set(host) - set(got))
            host = {**host, **got}
            host_note = (f"{', '.join(sorted(got))} from the run `{run['meta']['command']}` (commit "
                         f"{run['meta']['commit']}): " + (s.get("host_overhead_us_note") or "") +
                         (f"; {', '.join(kept)} from before: {host_note}" if kept and host_note else ""))
        data["meta"] = {**data["meta"], **{k: run["meta"][k] for k in ("commit", "date", "command", "torch")
                                           if k in run["meta"]}}
    data["meta"]["commands"] = commands
    merged = sorted(cases.values(), key=lambda c: [str(x) for x in rgnn.case_key(c)])
    s = rgnn.build_summary(merged, data["meta"], list(graphs.values()), types.SimpleNamespace(skipped_graphs={}, device=types.SimpleNamespace(type="cuda")),
                           host=host, host_note=host_note, aggregations=list(aggs.values()))
    what = (f"{replaced} cases got --tune-check results (timings unchanged)" if tune_only
            else f"{replaced} cases replaced and {added} added")
    s["merged"] = (f"benchmarks/merge_rgnn.py: {what} from "
                   f"{', '.join(str(d) for d in newer)}; every case keeps its own commit and date")
    report.write_results(out, {**data, "cases": merged, "graphs": list(graphs.values()),
                               "aggregations": list(aggs.values()), "summary": s})
    print({k: s.get(k) for k in ("cases_total", "geomean_speedup_inference", "geomean_speedup_training",
                                 "cases_slower_than_a_peer", "cases_within_3x_floor", "host_overhead_us")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
