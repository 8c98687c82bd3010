"""Probe of CUTLASS sm90 GEMM tile variants (pigeon/codegen/gemm_sm90.py, PIGEON_SM90_TILES): for one
kind (fp8 | fp8_block | dense | grouped) and variant strings (``MxNxKxCMxCN[:schedule]`` as in the
knob's value for that kind, or ``default``), build every variant's library in parallel into the
disk cache (pigeon/runtime/hostlib.py build_library; PIGEON_CACHE_DIR), then on an sm_90 GPU time
each through the public call (``pigeon.fp8_gemm`` / ``pigeon.gemm`` / ``pigeon.grouped_gemm``, the
variant selected by PIGEON_SM90_TILES=<kind>=<variant>) with pigeon/timing.py median_ms against the
peer: ``torch._scaled_mm`` (use_fast_accum=False, pigeon/bench/gemm.py's scales) for fp8,
``torch.matmul`` bf16 of the dequantized operands for fp8_block, ``torch.matmul`` for dense,
``torch._grouped_mm`` for grouped.  Each output is checked against the float32 product
(pigeon/bench/check.py, bfloat16 tolerance).  One line per variant (ms, TFLOP/s, ratio vs the peer);
``probe_gemm_tiles.json`` and ``.md`` (gpu, commit, date, command) in ``--out``.  A build, launch
or check failure is caught and reported per variant.

    # on the CPU machine: prebuild into the cache that is carried to the GPU machine
    PIGEON_CACHE_DIR=.gpu/cache python benchmarks/probe_gemm_tiles.py --kind fp8 --build-only \\
        --variants default,128x128x128x1x1,128x192x128x1x1:pingpong
    # on the GPU
    PIGEON_CACHE_DIR=.gpu/cache python benchmarks/probe_gemm_tiles.py --kind fp8 \\
        --variants default,128x128x128x1x1,128x192x128x1x1:pingpong --out results/tiles
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import traceback

SHAPES = {"fp8": "8192,8192,8192", "fp8_block": "4096,4096,4096", "dense": "8192,8192,8192",
          "grouped": "64,256,1024,1024"}      # M,N,K (grouped: G,M per group,K,N as pigeon bench gemm)
PEERS = {"fp8": "torch._scaled_mm (use_fast_accum=False)", "fp8_block": "torch.matmul bf16 (dequantized)",
         "dense": "torch.matmul bf16", "grouped": "torch._grouped_mm"}


def instance(kind: str, variant: str):
    """The Sm90Gemm the runtime builds for ``kind`` (no epilogue, bf16 output) under ``variant``."""
    from pigeon.codegen.gemm_sm90 import Sm90Gemm, parse_variant
    tile, schedule = parse_variant(kind, variant, what=f"--variants ({kind})")
    dtype = "float8_e4m3fn" if kind.startswith("fp8") else "bfloat16"
    return Sm90Gemm(kind, dtype, "bfloat16", None, tile, schedule)


def build_all(kind: str, variants: list[str], jobs: int) -> dict[str, dict]:
    """variant -> {"name", "build_s" (None: a cache hit), "error"}: every library built in parallel."""
    from concurrent.futures import ThreadPoolExecutor
    from pigeon.codegen.gemm_sm90 import render_sm90
    from pigeon.runtime.hostlib import build_library
    out: dict[str, dict] = {}

    def one(v):
        t0 = time.perf_counter()
        try:
            g = instance(kind, v)
            entry = build_library(render_sm90(g), "sm_90a", name=g.name)
            took = time.perf_counter() - t0
            hit = entry.meta.get("build_seconds") is None or took < 0.5 * float(entry.meta.get("build_seconds") or 0)
            return v, {"name": g.name, "tile": g.tile, "schedule": g.schedule, "wall_s": round(took, 1),
                       "nvcc_s": entry.meta.get("build_seconds"), "cache_hit": bool(hit)}
        except Exception as e:  # noqa: BLE001 - reported per variant
            return v, {"error": f"{type(e).__name__}: {str(e)[:1500]}", "wall_s": round(time.perf_counter() - t0, 1)}
    with ThreadPoolExecutor(max(1, min(jobs, len(variants)))) as pool:
        for v, r in pool.map(one, variants):
            out[v] = r
            what = r.get("error") or (f"{r['name']} {'cache hit' if r['cache_hit'] else 'built'} "
                                      f"(nvcc {r['nvcc_s']} s, wall {r['wall_s']} s)")
            print(f"  {kind} {v:<28} {what}", flush=True)
    return out


def _problem(kind: str, shape: tuple, device):
    """Inputs, pigeon's call, the peer and the float32 reference (pigeon/bench/gemm.py's data)."""
    import torch
    import pigeon as pg
    from pigeon.fp8_scales import BLOCK, dequantize
    gen = torch.Generator(device=device).manual_seed(0)
    if kind in ("fp8", "fp8_block"):
        M, N, K = shape
        fp8 = torch.float8_e4m3fn
        a = torch.randn(M, K, generator=gen, device=device).to(fp8)
        b = torch.randn(N, K, generator=gen, device=device).to(fp8).t()      # column-major [K, N]
        if kind == "fp8":
            sa, sb = torch.tensor(1.0, device=device), torch.tensor(K ** -0.5, device=device)
            peer = lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=False)  # noqa: E731
            blk = 1
        else:
            sa = torch.ones(M, -(-K // 128), device=device)
            sb = torch.full((-(-K // 128), -(-N // 128)), K ** -0.5, device=device)
            a16 = dequantize(a, sa, 1, BLOCK).to(torch.bfloat16)
            b16 = dequantize(b, sb, BLOCK, BLOCK).to(torch.bfloat16)
            peer = lambda: torch.matmul(a16, b16)  # noqa: E731
            blk = BLOCK
        ours = lambda: pg.fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16)  # noqa: E731
        ref = lambda: dequantize(a, sa, 1, blk) @ dequantize(b, sb, blk, blk)  # noqa: E731
        return ours, peer, ref, 2.0 * M * N * K
    if kind == "dense":
        M, N, K = shape
        a = torch.randn(M, K, generator=gen, device=device).to(torch.bfloat16)
        b = (torch.randn(K, N, generator=gen, device=device) / K ** 0.5).to(torch.bfloat16)
        return (lambda: pg.gemm(a, b)), (lambda: torch.matmul(a, b)), (lambda: a.float() @ b.float()), 2.0 * M * N * K
    G, M, K, N = shape
    a = torch.randn(G * M, K, generator=gen, device=device).to(torch.bfloat16)
    b = (torch.randn(G, K, N, generator=gen, device=device) / K ** 0.5).to(torch.bfloat16)
    offsets = torch.arange(G + 1, dtype=torch.int32, device=device) * M
    ends = offsets[1:].contiguous()
    peer = (lambda: torch._grouped_mm(a, b, offs=ends)) if hasattr(torch, "_grouped_mm") else None
    ref = lambda: torch.bmm(a.float().view(G, M, K), b.float()).view(G * M, N)  # noqa: E731
    return (lambda: pg.grouped_gemm(a, b, offsets)), peer, ref, 2.0 * G * M * N * K


def time_all(kind: str, variants: list[str], shape: tuple, reps: int, builds: dict) -> tuple[list[dict], dict]:
    import torch
    from pigeon.bench.check import _close
    from pigeon.codegen.gemm_sm90 import TILES_ENV
    from pigeon.timing import median_ms
    dev = torch.device("cuda")
    ours, peer, ref, flops = _problem(kind, shape, dev)
    want = ref()
    peer_row = {"impl": PEERS[kind]}
    try:
        if peer is None:
            raise RuntimeError("this torch has no torch._grouped_mm")
        peer_row["check"] = _close("out", peer(), want, "bfloat16") or "ok"
        peer_row["ms"] = median_ms(peer, dev, warmup=3, reps=reps)[0]
        peer_row["tflops"] = flops / peer_row["ms"] / 1e9
        print(f"{'peer':<30} {peer_row['ms']:8.3f} ms {peer_row['tflops']:7.1f} TFLOP/s  {PEERS[kind]}  "
              f"check {peer_row['check']}", flush=True)
    except Exception as e:  # noqa: BLE001
        peer_row["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"peer: {peer_row['error']}", flush=True)
    rows = []
    os.environ.setdefault("PIGEON_SM90", "1")
    for v in variants:
        row = {"variant": v, **{k: builds.get(v, {}).get(k) for k in ("name", "nvcc_s")}}
        if builds.get(v, {}).get("error"):
            row["error"] = "build: " + builds[v]["error"]
        else:
            if v == "default":
                os.environ.pop(TILES_ENV, None)
            else:
                os.environ[TILES_ENV] = f"{kind}={v}"
            try:
                got = ours()
                torch.cuda.synchronize()
                row["check"] = _close("out", got, want, "bfloat16") or "ok"
                if row["check"] != "ok":
                    row["check"] = "FAILED: " + row["check"]
                del got
                row["ms"] = median_ms(ours, dev, warmup=3, reps=reps)[0]
                row["tflops"] = flops / row["ms"] / 1e9
                if peer_row.get("ms"):
                    row["vs_peer"] = peer_row["ms"] / row["ms"]
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            finally:
                os.environ.pop(TILES_ENV, None)
        rows.append(row)
        print(line(row), flush=True)
    return rows, peer_row


def line(r: dict) -> str:
    if "ms" not in r:
        return f"{r['variant']:<30} ERROR {r.get('error', '?')[:400]}"
    vs = f"{r['vs_peer']:.3f}x peer" if "vs_peer" in r else "(no peer)"
    return f"{r['variant']:<30} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s  {vs}  check {r['check'][:200]}"


def markdown(result: dict) -> str:
    m = result["meta"]
    out = [f"# sm90 GEMM tile probe: {m['kind']} {m['shape']}", "",
           f"gpu {m['gpu']}, commit {m['commit']}, {m['date']}", "", f"`{m['command']}`", "",
           f"peer: {m['peer']}: " + (f"{result['peer']['ms']:.3f} ms, {result['peer']['tflops']:.1f} TFLOP/s"
                                     if "ms" in result["peer"] else result["peer"].get("error", "?")), "",
           "| variant | library | ms | TFLOP/s | vs peer | check |", "|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "ms" in r:
            out.append(f"| {r['variant']} | {r.get('name') or ''} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                       f"{r.get('vs_peer', float('nan')):.3f} | {r['check'][:80]} |")
        else:
            out.append(f"| {r['variant']} | {r.get('name') or ''} | - | - | - | {r.get('error', '?')[:160]} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=tuple(SHAPES), default="fp8")
    ap.add_argument("--variants", default="default",
                    help="comma-separated MxNxKxCMxCN[:schedule] (PIGEON_SM90_TILES's value for the kind) or default")
    ap.add_argument("--shape", default=None, help="M,N,K (grouped: G,M,K,N); default: " +
                    ", ".join(f"{k} {v}" for k, v in SHAPES.items()))
    ap.add_argument("--build-only", action="store_true", help="only build the libraries into PIGEON_CACHE_DIR")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc builds (a CUTLASS library: minutes each)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="probe_gemm_tiles", help="directory for probe_gemm_tiles.json / .md")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shape = tuple(int(x) for x in (args.shape or SHAPES[args.kind]).split(","))
    command = " ".join(shlex.quote(x) for x in [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    print(f"building {len(variants)} {args.kind} variants with {args.jobs} jobs "
          f"(cache {os.environ.get('PIGEON_CACHE_DIR', 'default')})", flush=True)
    builds = build_all(args.kind, variants, args.jobs)
    print(f"built in {time.perf_counter() - t0:.0f} s: {sum('error' not in b for b in builds.values())}/{len(variants)} ok",
          flush=True)
    if args.build_only:
        return 0 if all("error" not in b for b in builds.values()) else 1
    import torch
    from pigeon.bench.common import environment
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("timing needs an sm_90 GPU (use --build-only to prebuild)", file=sys.stderr)
        return 2
    print(f"{args.kind} {shape} bf16 out, peer {PEERS[args.kind]}, median of {args.reps}", flush=True)
    rows, peer = time_all(args.kind, variants, shape, args.reps, builds)
    meta = environment(torch.device("cuda"), command, kind=args.kind, shape=list(shape), peer=PEERS[args.kind],
                       reps=args.reps)
    meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    result = {"meta": meta, "peer": peer, "rows": rows, "builds": builds}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gemm_tiles.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "probe_gemm_tiles.md"), "w") as f:
        f.write(markdown(result))
    print(f"wrote {args.out}/probe_gemm_tiles.json and .md", flush=True)
    return 0 if all("ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
