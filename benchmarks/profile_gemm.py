"""Where a pigeon GEMM call's time goes, beside cuBLAS: per call, the host time (Python + launch,
measured with no GPU wait), the wall time of back-to-back calls (CUDA events around N calls), and
the GPU kernels' time (torch.profiler, by kernel name).  A call whose host time exceeds its kernel
time leaves the GPU idle: that is the gap `pigeon bench gemm` shows at 4096^3.

    python benchmarks/profile_gemm.py --out /tmp/profile_gemm.json      # GPU only

Writes JSON and a markdown table beside it (gpu, commit, date, command in both)."""
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pigeon as pg  # noqa: E402


def _cases(gen):
    dev = "cuda"
    bf = torch.bfloat16
    fp8 = torch.float8_e4m3fn
    out = []
    for n in (4096, 8192):
        a = torch.randn(n, n, device=dev, dtype=bf, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=bf, generator=gen)
        out.append((f"gemm-{n}", lambda a=a, b=b: pg.gemm(a, b), lambda a=a, b=b: torch.matmul(a, b)))
    a = torch.randn(16384, 4096, device=dev, dtype=bf, generator=gen)
    b = torch.randn(4096, 1024, device=dev, dtype=bf, generator=gen)
    c = torch.randn(1024, device=dev, dtype=bf, generator=gen)
    out.append(("gemm-bias-gelu", lambda: pg.gemm(a, b, bias=c, epilogue=lambda acc, bias: pg.gelu(acc + bias)),
                lambda: torch.nn.functional.gelu(torch.matmul(a, b) + c)))
    ag = torch.randn(64 * 256, 1024, device=dev, dtype=bf, generator=gen)
    bg = torch.randn(64, 1024, 1024, device=dev, dtype=bf, generator=gen)
    offs = torch.arange(65, device=dev, dtype=torch.int32) * 256
    out.append(("grouped-64x256", lambda: pg.grouped_gemm(ag, bg, offs),
                lambda: torch.bmm(ag.view(64, 256, 1024), bg)))
    a8 = torch.randn(8192, 8192, device=dev, generator=gen).to(fp8)
    b8 = torch.randn(8192, 8192, device=dev, generator=gen).to(fp8).t()
    one = torch.ones((), device=dev)
    out.append(("fp8-8192", lambda: pg.fp8_gemm(a8, b8, one, one),
                lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)))
    return out


def _measure(fn, reps: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # host: the calls' CPU time while the GPU runs behind (a queue deep enough not to block)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    wall = s.elapsed_time(e) / 1e3 / reps
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key and not ev.key.startswith(("ProfilerStep", "cudaDeviceSynchronize")):
            kernels[ev.key[:90]] = kernels.get(ev.key[:90], 0.0) + t / 1e6 / reps
    return {"host_us": host * 1e6, "wall_us": wall * 1e6, "kernel_us": sum(kernels.values()) * 1e6,
            "kernels_us": {k: v * 1e6 for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, ours, peer in _cases(gen):
        for impl, fn in (("pigeon", ours), ("cublas", peer)):
            print(f"[profile_gemm] {name} {impl}", file=sys.stderr, flush=True)
            rows.append({"case": name, "impl": impl, **_measure(fn, args.reps)})
    commit = os.environ.get("PIGEON_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    meta = {"gpu": torch.cuda.get_device_name(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/profile_gemm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"- {k}: {v}" for k, v in meta.items()] + [
        "", "| case | impl | host us/call | wall us/call | kernels us/call | top kernels (us/call) |", "|---|---|---|---|---|---|"]
    for r in rows:
        top = "; ".join(f"{k} {v:.1f}" for k, v in list(r["kernels_us"].items())[:3])
        lines.append(f"| {r['case']} | {r['impl']} | {r['host_us']:.1f} | {r['wall_us']:.1f} | {r['kernel_us']:.1f} | {top} |")
    out.with_suffix(".md").write_text("# GEMM host / wall / kernel time per call\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
