"""Forward and forward+backward time of pigeon's generated kernels against peers, on one graph.

Peers, measured in the same process on the same inputs: PyG's RGCNConv / FastRGCNConv / RGATConv
(where torch_geometric is installed), and pigeon's reference interpreter (plain torch ops with a
per-relation loop for typed linears, the style of DGL's examples).  Times are medians of CUDA-event
timings after warm-up; peak memory is torch's max allocated during one forward+backward.

    python benchmarks/bench_rgnn.py --graph fb15k-237 --reverse --dim 64 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import MODELS


def timeit(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def peak_mem(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(name, module, x, peer=None):
    def fwd():
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        xx = x.detach().requires_grad_(True)
        out = module(xx)
        out.sum().backward()

    row = {"impl": name}
    try:
        row["forward_ms"] = timeit(fwd)
        row["fwd_bwd_ms"] = timeit(fwd_bwd, warmup=2, reps=10)
        row["peak_mib"] = peak_mem(fwd_bwd)
    except Exception as e:  # a peer that cannot run this configuration is reported, not hidden
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"  {name:28s} " + (f"fwd {row['forward_ms']:9.3f} ms   fwd+bwd {row['fwd_bwd_ms']:9.3f} ms   "
                              f"peak {row['peak_mib']:8.1f} MiB" if "error" not in row else row["error"]), flush=True)
    return row


class PygLayer(torch.nn.Module):
    def __init__(self, conv, g):
        super().__init__()
        self.conv = conv
        self.ei = torch.stack([g.src, g.dst])
        self.et = g.etype

    def forward(self, x):
        return self.conv(x, self.ei, self.et)


def pyg_peers(model, g, dim, hp):
    try:
        import torch_geometric.nn as gnn
    except ImportError:
        return {}
    R = g.num_etypes
    if model == "rgcn":
        return {"pyg RGCNConv": gnn.RGCNConv(dim, hp["out_dim"], R, aggr="mean"),
                "pyg FastRGCNConv": gnn.FastRGCNConv(dim, hp["out_dim"], R, aggr="mean")}
    if model == "rgat":
        return {"pyg RGATConv": gnn.RGATConv(dim, hp["out_dim"], R, heads=hp["heads"])}
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--graph", default="fb15k-237")
    ap.add_argument("--reverse", action="store_true", help="add reverse relations (R-GCN convention)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--models", default="rgcn,rgat,hgt")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="rgnn")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = load(args.graph)
    if args.reverse:
        g = g.with_reverse_edges()
    print(f"graph {g!r}", flush=True)
    gd = g.to(dev)
    hps = {"rgcn": {"out_dim": args.dim}, "rgat": {"out_dim": args.dim // 4, "heads": 4}, "hgt": {"heads": 4}}
    results = []
    for model in args.models.split(","):
        spec, hp = MODELS[model], hps[model]
        print(f"{model} {hp}", flush=True)
        torch.manual_seed(0)
        x = torch.randn(g.num_nodes, args.dim, device=dev)
        rows = []
        t0 = time.perf_counter()
        k32 = pg.compile(spec, g, args.dim, backend="kernels", **hp).to(dev)
        k32(x)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        rows.append(measure("pigeon kernels fp32", k32, x))
        rows[-1]["first_call_s"] = build_s
        kbf = pg.compile(spec, g, args.dim, backend="kernels", dtype="bfloat16", **hp).to(dev)
        rows.append(measure("pigeon kernels bf16", kbf, x))
        ref = pg.compile(spec, g, args.dim, backend="reference", **hp).to(dev)
        rows.append(measure("plain torch (reference)", ref, x))
        for name, conv in pyg_peers(model, g, args.dim, hp).items():
            rows.append(measure(name, PygLayer(conv.to(dev), gd), x))
        for r in rows:
            r.update(model=model, hparams=hp)
        results.extend(rows)
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "commit": os.environ.get("PIGEON_COMMIT") or _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_rgnn.py " + " ".join(argv or sys.argv[1:]),
        "graph": {"name": g.name, "nodes": g.num_nodes, "edges": g.num_edges, "relations": g.num_etypes},
        "dim": args.dim,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# {args.tag}: forward / forward+backward on {g.name}",
             "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| model | impl | forward ms | fwd+bwd ms | peak MiB | forward time / pigeon fp32 |",
             "|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        rs = [r for r in results if r["model"] == model]
        base = next((r.get("forward_ms") for r in rs if r["impl"] == "pigeon kernels fp32"), None)
        for r in rs:
            if "error" in r:
                lines.append(f"| {model} | {r['impl']} | error: {r['error']} | | | |")
                continue
            ratio = f"{r['forward_ms'] / base:.2f}x" if base else ""
            lines.append(f"| {model} | {r['impl']} | {r['forward_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['peak_mib']:.1f} | {ratio} |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
