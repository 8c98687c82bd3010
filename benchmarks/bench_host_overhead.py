"""Host overhead of a compiled layer call: wall time per call against the time of its kernels.

For RGCN and RGAT on the given graphs (default ``tiny`` and ``synthetic:aifb``), inference (no
grad) and a training step (forward and ``out.backward(up)``: no loss ops and no optimizer, which
are not pigeon's), under three host paths:

* ``op``     -- every call through the torch.library op, plain executor
                (PIGEON_EAGER_FASTPATH=0, PIGEON_CUDA_GRAPHS=0: the path before the host work);
* ``eager``  -- the eager autograd.Function fast path, plain executor (PIGEON_CUDA_GRAPHS=0);
* ``graphs`` -- the fast path with CUDA-graph replay (PIGEON_CUDA_GRAPHS=1).

Per case: ``wall_us`` = perf_counter over ``--calls`` calls (default 200) with one synchronize at
the end, divided by the calls; ``enqueue_us`` = the same loop before that synchronize (the host's
own time when the GPU keeps up); both the median of three such loops; ``kernel_us`` = the sum
of GPU activity (kernels, copies, memsets) per call, from torch.profiler over
``--profile-calls`` further calls; ``overhead_us`` = ``wall_us`` minus the case's smallest
``kernel_us`` over the paths (what a call costs beyond its kernels; the target is <= 30 us; the
profiler's times of kernels inside a replayed graph read high, and a replay's copies in and out are
host-path cost, so the plain paths' kernel time is the baseline). The profiler's kernel times can
also read higher than the wall time of a GPU-bound case (seen on the H200: RGAT on synthetic:aifb,
187 us of profiled kernels, 132 us wall with graphs): a negative or small overhead there means the
GPU, not the host, bounds the call. Each ``graphs`` result is checked against the plain executor's
before timing.

    python benchmarks/bench_host_overhead.py --out benchmarks/results/host_overhead_h200.json
"""
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

import pigeon as pg
from pigeon.graph import load
from pigeon.models import MODELS
from pigeon.runtime import ops, replay

PATHS = {"op": {ops.FASTPATH_ENV: "0", replay.ENV: "0"},
         "eager": {ops.FASTPATH_ENV: "1", replay.ENV: "0"},
         "graphs": {ops.FASTPATH_ENV: "1", replay.ENV: "1"}}


def set_path(name: str) -> None:
    os.environ.update(PATHS[name])


def step_fn(layer, x, up, phase):
    weights = list(layer.weights.values())
    if phase == "inference":
        def fn():
            with torch.no_grad():
                return layer(x)
        return fn
    xx = x.detach().requires_grad_(True)

    def fn():
        for w in weights:
            w.grad = None
        xx.grad = None
        layer(xx).backward(up)       # no loss ops: the layer's forward and backward alone
    return fn


def wall(fn, calls: int, repeats: int = 3) -> tuple[float, float]:
    """(wall, enqueue) us per call: the median over ``repeats`` loops of ``calls`` calls."""
    walls, enqueues = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        walls.append((t2 - t0) / calls * 1e6)
        enqueues.append((t1 - t0) / calls * 1e6)
    return sorted(walls)[repeats // 2], sorted(enqueues)[repeats // 2]


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_time(fn, calls: int) -> float:
    """GPU activity per call (us): the profiler's self device time of every event, summed."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(_self_device_us(e) for e in prof.key_averages()) / calls


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="tiny,synthetic:aifb")
    ap.add_argument("--models", default="rgcn,rgat")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile-calls", type=int, default=50)
    ap.add_argument("--paths", default="op,eager,graphs")
    ap.add_argument("--out", default="benchmarks/results/host_overhead.json",
                    help="JSON file (a directory gets host_overhead.json)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    hps = {"rgcn": {"out_dim": args.dim}, "rgat": {"out_dim": args.dim // 4, "heads": 4},
           "hgt": {"heads": 4}}
    unknown = [m for m in args.models.split(",") if m not in hps]
    if unknown:
        ap.error(f"--models: {', '.join(unknown)} not among {', '.join(hps)}")
    saved_env = {k: os.environ.get(k) for p in PATHS.values() for k in p}
    rows = []
    try:
        for gname in args.graphs.split(","):
            g = load(gname)
            print(f"graph {gname}: {g.num_nodes} nodes, {g.num_edges} edges, {g.num_etypes} relations",
                  file=sys.stderr, flush=True)
            for model in args.models.split(","):
                layer = pg.compile(MODELS[model], g, args.dim, backend="kernels", **hps[model]).to(dev)
                torch.manual_seed(0)
                x = torch.randn(g.num_nodes, args.dim, device=dev)
                set_path("eager")
                with torch.no_grad():
                    want = layer(x)
                up = torch.randn_like(want)
                for phase in ("inference", "training"):
                    for path in args.paths.split(","):
                        set_path(path)
                        fn = step_fn(layer, x, up, phase)
                        for _ in range(5):                  # builds, first plain call, capture
                            fn()
                        torch.cuda.synchronize()
                        if path == "graphs" and phase == "inference":
                            with torch.no_grad():
                                got = layer(x)
                            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                        w, enq = wall(fn, args.calls)
                        k = kernel_time(fn, args.profile_calls)
                        row = {"graph": gname, "model": model, "phase": phase, "path": path,
                               "wall_us": w, "enqueue_us": enq, "kernel_us": k,
                               "hparams": hps[model], "dim": args.dim, "nodes": g.num_nodes,
                               "edges": g.num_edges}
                        lp = ops.get_layer(layer.layer_id)
                        fwd = replay.replays_of(lp.backend(dev), lp.forward)
                        row["captured"] = bool(fwd is not None and len(fwd))
                        rows.append(row)
                        print(f"  {gname:16s} {model:5s} {phase:9s} {path:6s} wall {w:8.1f} us  enqueue "
                              f"{enq:8.1f} us  kernels {k:8.1f} us", file=sys.stderr, flush=True)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    base: dict = {}
    for r in rows:
        case = (r["graph"], r["model"], r["phase"])
        base[case] = min(base.get(case, r["kernel_us"]), r["kernel_us"])
    for r in rows:
        r["kernel_baseline_us"] = base[(r["graph"], r["model"], r["phase"])]
        r["overhead_us"] = r["wall_us"] - r["kernel_baseline_us"]
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "commit": os.environ.get("PIGEON_COMMIT") or _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_host_overhead.py " + " ".join(argv or sys.argv[1:]),
            "calls": args.calls, "profile_calls": args.profile_calls, "paths": PATHS}
    out = Path(args.out)
    if out.is_dir() or args.out.endswith("/"):
        out = out / "host_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = ["| graph | model | phase | path | wall us | enqueue us | kernels us (profiler) | overhead us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['model']} | {r['phase']} | {r['path']} | {r['wall_us']:.1f} | "
                     f"{r['enqueue_us']:.1f} | {r['kernel_us']:.1f} | {r['overhead_us']:.1f} |")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
