"""Where the time of one ``pigeon.attention`` call goes: per case (variant, S, head dim) and forward
implementation (PIGEON_ATTN_FORWARD = mma | wgmma | cutlass; ``cutlass:<knobs>`` also sets
PIGEON_ATTN_SM90_TUNE, e.g. ``cutlass:bn128``), the bench's wall time (CUDA events around one call,
as ``pigeon bench attention`` times it), the GPU time of the call's kernels (torch.profiler, by kernel
name), and the host time of one call (perf_counter around an unsynchronized call while the GPU is busy
with earlier work), next to SDPA's kernel time on the same inputs (dense and causal; the other variants of ``pigeon bench
attention``, its inputs, have no SDPA column).  A call whose wall time exceeds its
kernels' time by more than a few microseconds is host-bound or launches extra kernels; both show here.

    python benchmarks/profile_attention.py --variants dense,causal --seq-lens 1024,4096 --head-dims 128 \
        --forwards wgmma,cutlass,cutlass:bn128 --out DIR

Writes DIR/profile_attention.json and .md with GPU, commit, date and the command."""
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
from torch.profiler import ProfilerActivity, profile


def _commit() -> str:
    if os.environ.get("PIGEON_COMMIT"):
        return os.environ["PIGEON_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _kernels(fn, calls: int) -> tuple[float, dict[str, float]]:
    """GPU microseconds per call of ``fn`` (all CUDA kernels), and per kernel name."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time / calls
    return sum(per.values()), per


def _host_us(fn, calls: int) -> float:
    """Host microseconds per call: unsynchronized calls queued behind a long GPU job."""
    big = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(4):
        big @ big                                   # ~6 ms of queued GPU work hides the device
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="dense,causal")
    ap.add_argument("--seq-lens", default="1024,4096")
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--forwards", default="wgmma,cutlass")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--window", type=int, default=1024, help="the sliding window variant's window")
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    import pigeon.attention as pa
    from pigeon.timing import median_ms
    dev = torch.device("cuda")
    rows = []
    from pigeon.bench.attn_variants import VARIANTS, make_problem
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r} (known: {', '.join(VARIANTS)})")
        for s in map(int, args.seq_lens.split(",")):
            for d in map(int, args.head_dims.split(",")):
                # the bench's inputs (top-k selections, documents); SDPA's kernel time for dense / causal
                p = make_problem(variant, args.batch, args.heads, s, d, torch.bfloat16, dev, args.window)
                q, k, v, kw = p.q, p.k, p.v, p.pigeon_kwargs()
                sdpa_us = None
                if variant in ("dense", "causal"):
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(      # noqa: E731
                        q, k, v, is_causal=variant == "causal")
                    sdpa()
                    sdpa_us, _ = _kernels(sdpa, args.calls)
                for fw in args.forwards.split(","):
                    form, _, tune = fw.partition(":")
                    os.environ["PIGEON_ATTN_FORWARD"] = form
                    os.environ["PIGEON_ATTN_SM90_TUNE"] = tune
                    call = lambda: pa.attention(q, k, v, **kw)                       # noqa: E731
                    row = {"variant": variant, "S": s, "D": d, "forward": fw, "sdpa_kernel_us": sdpa_us}
                    try:
                        call()
                        torch.cuda.synchronize()
                        row["wall_us"] = median_ms(call, dev, warmup=3, reps=args.calls)[0] * 1e3
                        row["kernel_us"], per = _kernels(call, args.calls)
                        row["kernels"] = {n[:90]: round(t, 2) for n, t in sorted(per.items(), key=lambda x: -x[1])}
                        row["host_us"] = _host_us(call, args.calls)
                        row["launches"] = len(per)
                    except Exception as e:                  # one case's failure is its row
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rows.append(row)
                    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                                      if k != "kernels"}), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/profile_attention.py " + " ".join(sys.argv[1:]), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# pigeon.attention: wall vs kernel vs host time per call ({meta['gpu']}, {meta['commit']}, {meta['date']})",
             "", f"Command: `{meta['command']}`", "",
             "| variant | S | D | forward | wall us | kernel us | host us | SDPA kernel us | kernel vs SDPA | top kernel |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['S']} | {r['D']} | {r['forward']} | error: {r['error']} |  |  |  |  |  |")
            continue
        top = next(iter(r["kernels"]), "")
        sd = r["sdpa_kernel_us"]
        vs = f"{sd:.1f} | {sd / r['kernel_us']:.2f}x" if sd is not None else "- | -"
        lines.append(f"| {r['variant']} | {r['S']} | {r['D']} | {r['forward']} | {r['wall_us']:.1f} | {r['kernel_us']:.1f} | "
                     f"{r['host_us']:.1f} | {vs} | `{top[:60]}` |")
    (out / "profile_attention.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
