"""Where a compiled layer call spends its host time: cProfile over many calls of one layer on a
small graph (the kernels take microseconds there, so the Python work shows), inference and
training, with the host-path settings of the environment (PIGEON_CUDA_GRAPHS, ...).

    python benchmarks/profile_host.py --model rgat --graph tiny --calls 200 --out DIR

Writes DIR/profile_host_<model>_<graph>.txt: the top functions by own time and by cumulative time,
after the plain wall time per call (no profiler) and a calibration of the host: what a few torch
primitives the replay path uses cost per call there (an empty-ish CUDA-graph replay, a small
device copy, torch.empty), so that a host-time figure can be read against the machine it ran on."""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host_overhead import wall  # noqa: E402     (wall and enqueue us per call, median of loops)


def calibration(layer, x, infer, calls: int) -> list[str]:
    a = torch.zeros(1024, device="cuda")
    b = torch.ones(1024, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        a.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        a.add_(1)
    probes = {
        "layer(x), no grad (the measured call)": infer,
        "CUDAGraph.replay() of one small kernel": g.replay,
        "a.copy_(b), 4 KB on the device": lambda: a.copy_(b),
        "torch.empty(1024, device='cuda')": lambda: torch.empty(1024, device="cuda"),
        "a.add_(1) (one eager kernel launch)": lambda: a.add_(1),
        "torch.cuda.current_stream()": torch.cuda.current_stream,
        "python: empty function call": lambda: None,
    }
    lines = ["\n## wall and enqueue time per call (no profiler), and the host's calibration",
             "| call | enqueue us | wall us |", "|---|---|---|"]
    for name, fn in probes.items():
        for _ in range(10):
            fn()
        w, e = wall(fn, calls, repeats=5)
        lines.append(f"| {name} | {e:.2f} | {w:.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rgat")
    ap.add_argument("--graph", default="tiny")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    import pigeon as pg
    from pigeon.graph import load
    from pigeon.models import MODELS
    hps = {"rgcn": {"out_dim": args.dim}, "rgat": {"out_dim": args.dim // 4, "heads": 4}, "hgt": {"heads": 4}}
    g = load(args.graph)
    layer = pg.compile(MODELS[args.model], g, args.dim, **hps[args.model]).to("cuda")
    x = torch.randn(g.num_nodes, args.dim, device="cuda", requires_grad=True)

    def infer():
        with torch.no_grad():
            layer(x)

    def train():
        layer(x).sum().backward()
    text = [f"# host profile: {args.model} on {args.graph}, {args.calls} calls each; "
            f"PIGEON_CUDA_GRAPHS={os.environ.get('PIGEON_CUDA_GRAPHS', 'auto')}; command: "
            f"python benchmarks/profile_host.py {' '.join(sys.argv[1:])}"]
    text += calibration(layer, x, infer, args.calls)
    for name, fn in (("inference", infer), ("training", train)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(25)
            text.append(f"\n## {name}, by {key}\n" + s.getvalue())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_host_{args.model}_{args.graph.replace(':', '_')}.txt"
    path.write_text("\n".join(text))
    print("\n".join(text)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
