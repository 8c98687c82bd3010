"""Where one training step of ``pigeon bench rgnn`` spends its host time, phase by phase, for pigeon
and for its peers in the same process: zero_grad, the layer's forward, the loss, backward and the
optimizer step (the bench's ``Step``, pigeon/bench/timing.py), each timed on the host with
``time.perf_counter`` (enqueue time: no synchronization inside a step), then the whole step with
CUDA events as the bench times it, and the GPU kernel time per step from torch.profiler.

Why: on the small real graphs a training step is 80-90% host time (``host share`` in
benchmarks/results/rgnn/cases.md), and the peers pay the same loss and optimizer, so what pigeon can
remove is its own forward and backward glue; this says how large each part is.

    python benchmarks/profile_train_step.py --graphs aifb,mutag --models rgcn,rgat,hgt --out DIR

Writes DIR/train_step_phases.json and .md (microseconds per step, medians over ``--steps``) and a
cProfile of pigeon's step per case (DIR/train_step_cprofile_<graph>_<model>.txt).

``--ops`` adds torch.profiler's CPU-side table of pigeon's step (DIR/train_step_ops_<graph>_<model>.txt:
every aten op, autograd node and pigeon record_function with its host microseconds per step), and
``--peers floor`` a one-matmul module of the same output (``x @ W``): the harness's own cost of a
step (zero_grad, loss, backward engine, SGD) on this host, which no layer can go below."""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pigeon.runtime.ops import MASTERS_ENV        # the A/B switch of --ab-masters

PHASES = ("zero_grad", "forward", "loss", "backward", "step")


def phase_times(step, steps: int) -> dict:
    """Median host microseconds per phase of ``step`` (a pigeon.bench.timing.Step in training),
    and the median CUDA-event step time the bench would report."""
    opt, module, x = step.opt, step.module, step.x
    from pigeon.bench.timing import loss_of
    rows = {p: [] for p in PHASES}
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        out = module(x)
        t2 = time.perf_counter()
        loss = loss_of(out)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        del out, loss
        for p, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            rows[p].append((b - a) * 1e6)
    res = {p: statistics.median(v) for p, v in rows.items()}
    res["host_total"] = sum(res[p] for p in PHASES)
    walls = []
    for _ in range(steps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        walls.append(a.elapsed_time(b) * 1e3)
    res["event_wall"] = statistics.median(walls)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total) / 20
    res["gpu_kernels"] = gpu_us
    return res


OUTSIDE = "pigeon (masters cast outside)"


class _OneMatmul(torch.nn.Module):
    """The least a layer can be: one weight, one matmul (the harness floor of ``--peers floor``)."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(k, n) / k ** 0.5)

    def forward(self, x):
        return x @ self.W


def op_table(step, steps: int) -> str:
    """torch.profiler's CPU-side table of ``steps`` training steps, self and total host time per
    step in microseconds, sorted by self time (what each op itself costs on this host)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    lines = [f"{'op':<60} {'calls/step':>10} {'self us/step':>12} {'total us/step':>13}"]
    for e in rows[:60]:
        lines.append(f"{e.key[:60]:<60} {e.count / steps:>10.1f} {e.self_cpu_time_total / steps:>12.1f} "
                     f"{e.cpu_time_total / steps:>13.1f}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="aifb")
    ap.add_argument("--models", default="rgcn,rgat,hgt")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--peers", default="pyg,reference")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--ops", action="store_true", help="also write torch.profiler's CPU op table of pigeon's step")
    ap.add_argument("--ab-masters", action="store_true",
                    help="16-bit layers: also time pigeon with its master weights cast outside the layer "
                         "(PIGEON_MASTER_CASTS_INSIDE=0), in the same process, for an A/B on one host")
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    import pigeon as pg
    from pigeon.bench.peers import peers_for
    from pigeon.bench.floors import hparams
    from pigeon.bench.timing import Step
    from pigeon.graph import load
    from pigeon.models import MODELS
    dev = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("PIGEON_COMMIT", "")      # the GPU machine's copy may have no usable git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "steps": args.steps, "unit": "us per step",
            "dtype": args.dtype}
    tdt = getattr(torch, args.dtype)
    results = []
    for gname in args.graphs.split(","):
        g = load(gname)
        for model in args.models.split(","):
            hp = hparams(model, args.dim)
            x = torch.randn(g.num_nodes, args.dim, device=dev).to(tdt)
            impls = [("pigeon", lambda: pg.compile(MODELS[model], g, args.dim, dtype=args.dtype, **hp).to(dev))]
            if args.ab_masters:
                impls.append((OUTSIDE, impls[0][1]))
            kinds = args.peers.split(",")
            if "floor" in kinds:
                impls.append(("floor (x @ W)", lambda: _OneMatmul(args.dim, hp.get("out_dim", args.dim)).to(dev, tdt)))
            for peer in peers_for(model, g.to(dev), args.dim, hp, dev, args.dtype, [k for k in kinds if k != "floor"]):
                if peer.build is not None:
                    impls.append((peer.name, peer.build))
            for name, build in impls:
                os.environ.pop(MASTERS_ENV, None)
                if name == OUTSIDE:
                    os.environ[MASTERS_ENV] = "0"
                try:
                    step = Step(build(), x, "training")
                    res = phase_times(step, args.steps)
                except Exception as e:         # a peer that cannot run here: say so, go on
                    res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    step = None
                row = {"graph": gname, "model": model, "impl": name, **res}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if name == "pigeon" and step is not None:
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(100):
                        step()
                    torch.cuda.synchronize()
                    pr.disable()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
                    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
                    (out / f"train_step_cprofile_{gname}_{model}.txt").write_text(
                        f"# {meta['command']} ({commit}), 100 steps\n" + s.getvalue())
                    if args.ops:
                        (out / f"train_step_ops_{gname}_{model}.txt").write_text(
                            f"# {meta['command']} ({commit}): torch.profiler CPU time, 50 steps, us per step\n"
                            + op_table(step, 50))
                del step
                torch.cuda.empty_cache()
    os.environ.pop(MASTERS_ENV, None)
    (out / "train_step_phases.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    cols = ("zero_grad", "forward", "loss", "backward", "step", "host_total", "event_wall", "gpu_kernels")
    lines = [f"# Training-step phases (us per step, medians of {args.steps})", "",
             f"{meta['gpu']}, torch {meta['torch']}, commit {commit}, {meta['date']}", "",
             f"`{meta['command']}`", "",
             "| graph | model | impl | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for r in results:
        vals = [r.get("error", "")] if "error" in r else [f"{r[c]:.0f}" for c in cols]
        lines.append(f"| {r['graph']} | {r['model']} | {r['impl']} | " + " | ".join(vals) + " |")
    (out / "train_step_phases.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
