"""Where the time goes in one compiled layer: torch.profiler over training steps (forward+backward) or no-grad forwards, CUDA
time per kernel (pigeon's kernels by name and kind, torch ops by name), against the wall time.

    python benchmarks/profile_layer.py --model rgat --graph synthetic:am --dim 64 [--mode inference] [--dtype bfloat16] --out DIR

Writes DIR/profile_<model>_<graph>_d<dim>_<mode>[_<dtype>].md (the dtype named when not float32) with GPU, commit, date and the command."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rgat")
    ap.add_argument("--graph", default="synthetic:am")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mode", choices=("training", "inference"), default="training",
                    help="training: forward+backward per step; inference: a no-grad forward per step")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    import pigeon as pg
    from pigeon.graph import load
    from pigeon.models import MODELS
    hps = {"rgcn": {"out_dim": args.dim}, "rgat": {"out_dim": args.dim // 4, "heads": 4}, "hgt": {"heads": 4}}
    g = load(args.graph)
    if args.graph == "fb15k-237":
        g = g.with_reverse_edges()
    layer = pg.compile(MODELS[args.model], g, args.dim, dtype=args.dtype, **hps[args.model]).to("cuda")
    train = args.mode == "training"
    x = torch.randn(g.num_nodes, args.dim, device="cuda").to(getattr(torch, args.dtype)).requires_grad_(train)

    def step():
        if train:
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    # device-side events only (kernels, memcpys, memsets): an op's own device time would count its
    # kernels a second time
    from torch.autograd import DeviceType
    by_name: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA:
            by_name.setdefault(ev.name, []).append(ev.device_time_total)
    rows = [(k, sum(v) / args.steps / 1e3, len(v) // args.steps) for k, v in by_name.items()]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    progs = {p.name: p for p in (layer.forward_program, layer.backward_program) if p is not None}
    kinds = {}
    for p in progs.values():
        for launch in p.launches:
            inst = getattr(launch, "inst", None)
            if inst is None:
                continue
            from pigeon.runtime.families import family_of
            rk = family_of(launch).render(launch)
            if rk is not None:
                kinds[rk.name] = launch.describe()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=os.environ.get("PIGEON_COMMIT", "?"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python benchmarks/profile_layer.py " + " ".join(sys.argv[1:]))
    md = [f"# profile: {args.model} on {args.graph}, d {args.dim} {args.dtype}, "
          f"{'forward+backward' if train else 'no-grad forward'} per step\n"]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += [f"- wall per step: {wall:.3f} ms; GPU time per step (sum of kernels): {total:.3f} ms", "",
           "| kernel | ms / step | calls / step | share | what |", "|---|---|---|---|---|"]
    for key, ms, n in rows[:25]:
        md.append(f"| `{key[:60]}` | {ms:.3f} | {n} | {ms / total:.1%} | {kinds.get(key, '')[:90]} |")
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    (out / f"profile_{args.model}_{args.graph.replace(':', '_')}_d{args.dim}_{args.mode}{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
