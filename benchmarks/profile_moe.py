"""Where the time goes in the ShiftAdd mixture MLP (the bench's moe case): torch.profiler over
no-grad forwards of MoEMLP (dense bf16 expert + shift expert, top-1) and of the dense bf16 MLP
peer, kernel time by name, and the path each shift linear took; one MoEMLP per layout (``compact``:
the kept rows packed by expert, torch._grouped_mm when every expert linear is a dense GEMM;
``capacity``: the fixed-capacity buffer, each expert over C rows), same weights, so one run compares them.

    python benchmarks/profile_moe.py [--tokens 6272 --dim 320 --hidden 1280] [--k 1] [--capacity-factor F]
        [--layouts compact,capacity] [--shift-path auto|dense|shift|packed|fp8] --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _table(fn, steps: int) -> tuple[float, list]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    by: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA:
            by.setdefault(ev.name, []).append(ev.device_time_total)
    rows = sorted(((k, sum(v) / steps / 1e3, len(v) // steps) for k, v in by.items()), key=lambda r: -r[1])
    return wall, rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32 * 196)
    ap.add_argument("--dim", type=int, default=320)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--layouts", default="compact,capacity")
    ap.add_argument("--shift-path", default="auto")
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    from pigeon.shiftadd.layers import MoEMLP, ShiftLinear
    dev, dt = torch.device("cuda"), torch.bfloat16
    moes = {}
    for lay in args.layouts.split(","):
        torch.manual_seed(0)
        m = MoEMLP(args.dim, args.hidden, k=args.k, latencies=[6.0, 4.0], capacity_factor=args.capacity_factor,
                   layout=lay)
        for mod in m.modules():
            if isinstance(mod, ShiftLinear):
                mod.path = args.shift_path
        moes[lay] = m.to(dev, dt).eval()
    dense = torch.nn.Sequential(torch.nn.Linear(args.dim, args.hidden), torch.nn.GELU(),
                                torch.nn.Linear(args.hidden, args.dim)).to(dev, dt).eval()
    x = torch.randn(args.tokens, args.dim, device=dev, dtype=dt)
    md = [f"# profile: ShiftAdd MoE MLP, T {args.tokens}, dim {args.dim}, hidden {args.hidden}, k {args.k}, "
          f"capacity_factor {args.capacity_factor}, bf16, no-grad forward\n",
          f"- gpu: {torch.cuda.get_device_name()}", f"- torch: {torch.__version__}",
          f"- commit: {os.environ.get('PIGEON_COMMIT', '?')}",
          f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
          f"- command: python benchmarks/profile_moe.py {' '.join(sys.argv[1:])}"]
    with torch.no_grad():
        runs = [(f"moe layout={lay}", (lambda m: lambda: m(x))(m)) for lay, m in moes.items()]
        for name, fn in runs + [("dense bf16 MLP", lambda: dense(x))]:
            wall, rows = _table(fn, args.steps)
            total = sum(r[1] for r in rows)
            md += ["", f"## {name}: wall {wall:.3f} ms per call, GPU {total:.3f} ms", "",
                   "| kernel | ms / call | calls | share |", "|---|---|---|---|"]
            md += [f"| `{k[:70]}` | {ms:.4f} | {n} | {ms / max(total, 1e-9):.1%} |" for k, ms, n in rows[:14]]
        for lay, moe in moes.items():
            paths = [(n, m.last_path) for n, m in moe.named_modules() if isinstance(m, ShiftLinear)]
            how = moe.compact_plan(x, moe.capacity(args.tokens)) if lay == "compact" else "capacity"
            moe.__dict__.pop("_gemms", None)
            md += ["", f"layout={lay}: experts computed by {how}; shift linears' paths: " +
                   ", ".join(f"{n}={p}" for n, p in paths)]
        ys = {lay: m(x)[0].float() for lay, m in moes.items()}
        if len(ys) > 1:
            a, *rest = ys.values()
            md += [f"max |y_{args.layouts.split(',')[0]} - y_{lay}| = {(a - y).abs().max().item():.3g}"
                   for lay, y in list(ys.items())[1:]]
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_moe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
