"""Compact materialization on and off (PIGEON_COMPACT=1 / 0), per model and graph: forward and
forward+backward time of pigeon's kernels, the decision the cost rule takes (auto), and whether
that decision is within 10% of the better measured candidate.  Both candidates are checked
against each other (same weights, same inputs) before timing.

    python benchmarks/bench_compaction.py --graphs fb15k-237+rev,aifb,synthetic:am --out DIR

Writes DIR/compaction.json and DIR/compaction.md (GPU, commit, date, command)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HPS = {"rgcn": {"out_dim": None}, "rgat": {"out_dim": None, "heads": 4}, "hgt": {"heads": 4}}


def hparams(model: str, dim: int) -> dict:
    hp = dict(HPS[model])
    if "out_dim" in hp:
        hp["out_dim"] = dim // 4 if model == "rgat" else dim
    return hp


def load_graph(name: str):
    from pigeon.graph import load
    rev = name.endswith("+rev")
    g = load(name[:-4] if rev else name)
    return g.with_reverse_edges() if rev else g


def cuda_ms(fn, warmup=3, reps=15) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def run_case(model, g, dim, dev):
    import pigeon as pg
    from pigeon.models import MODELS
    from pigeon.passes.compact import decide
    from pigeon.passes.pipeline import graph_stats_for
    os.environ.pop("PIGEON_COMPACT", None)
    auto = decide(graph_stats_for(g))
    x = torch.randn(g.num_nodes, dim, device=dev)
    row = {"model": model, "dim": dim, "auto": auto.compact, "why": auto.why}
    outs = {}
    for mode in ("0", "1"):
        os.environ["PIGEON_COMPACT"] = mode
        layer = pg.compile(MODELS[model], g, dim, seed=0, **hparams(model, dim)).to(dev)
        xx = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return layer(x)

        def step():
            layer(xx).sum().backward()
        outs[mode] = fwd()
        row[f"fwd_ms_{mode}"] = cuda_ms(fwd)
        row[f"step_ms_{mode}"] = cuda_ms(step, 2, 8)
        torch.cuda.synchronize()
        del layer
    os.environ.pop("PIGEON_COMPACT", None)
    err = ((outs["0"].double() - outs["1"].double()).norm() / outs["0"].double().norm().clamp(min=1e-30)).item()
    row["rel_diff"] = err
    for what in ("fwd", "step"):
        best = min(row[f"{what}_ms_0"], row[f"{what}_ms_1"])
        chosen = row[f"{what}_ms_{'1' if auto.compact else '0'}"]
        row[f"{what}_speedup"] = row[f"{what}_ms_0"] / row[f"{what}_ms_1"]
        row[f"{what}_choice_within_10pct"] = chosen <= 1.1 * best
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="fb15k-237+rev,aifb,mutag,acm,dblp,synthetic:am")
    ap.add_argument("--models", default="rgcn,rgat,hgt")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for gname in args.graphs.split(","):
        g = load_graph(gname)
        print(f"graph {gname}: {g.num_nodes} nodes, {g.num_edges} edges, {g.compact().num_rows} (src, etype) pairs",
              file=sys.stderr, flush=True)
        for model in args.models.split(","):
            t0 = time.perf_counter()
            try:
                row = run_case(model, g, args.dim, dev)
            except Exception as e:      # reported, not hidden
                row = {"model": model, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            row.update(graph=gname, edges=g.num_edges, compact_rows=g.compact().num_rows)
            rows.append(row)
            print(f"  {model}: {json.dumps(row)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    try:
        commit = os.environ.get("PIGEON_COMMIT") or subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                                                            text=True).strip()
    except Exception:
        commit = "unknown"
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_compaction.py " + " ".join(argv or sys.argv[1:])}
    ok = [r for r in rows if "error" not in r]
    meta["choice_within_10pct"] = (f"{sum(r['fwd_choice_within_10pct'] for r in ok)}/{len(ok)} forward, "
                                   f"{sum(r['step_choice_within_10pct'] for r in ok)}/{len(ok)} training step")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compaction.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Compact materialization on / off", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| graph | E / U | model | auto | fwd off ms | fwd on ms | fwd speedup | step off ms | step on ms | "
             "step speedup | auto within 10% | rel diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['graph']} | | {r['model']} | error: {r['error']} |||||||||")
            continue
        lines.append(f"| {r['graph']} | {r['edges'] / r['compact_rows']:.2f} | {r['model']} | "
                     f"{'on' if r['auto'] else 'off'} | {r['fwd_ms_0']:.3f} | {r['fwd_ms_1']:.3f} | "
                     f"{r['fwd_speedup']:.2f}x | {r['step_ms_0']:.3f} | {r['step_ms_1']:.3f} | {r['step_speedup']:.2f}x | "
                     f"{'yes' if r['fwd_choice_within_10pct'] and r['step_choice_within_10pct'] else 'NO'} | "
                     f"{r['rel_diff']:.1e} |")
    (out / "compaction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
