"""GPU probe of the Hopper wgmma attention forward (pigeon/codegen/attention_wgmma.py, issue 8):
per case (B4 H32 S4096, D128 and D64, bf16: dense, causal, ALiBi + causal) check the wgmma forward
against SDPA (max abs error; ALiBi against the mma forward), then time the wgmma forward (P through
shared memory: ``wgmma``; P in registers, PIGEON_ATTN_WGMMA_TUNE=p_regs: ``wgmma_rs``), the mma
forward and SDPA (CUDA events, median of ``--iters``) and print a table with TFLOP/s; JSON to
``--out``.  Every compile / launch / check error is caught and printed per case, so one run shows
everything (each case runs in a child process: a sticky CUDA fault, say an illegal address, ends
only its own case; kernels come from the disk cache after the first build):

    python benchmarks/probe_attention_wgmma.py --out /tmp/probe.json [--shape 4,32,4096] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _time(fn, iters: int) -> float:
    """Median ms of ``fn`` over ``iters`` CUDA-event-timed calls after one warm-up (pigeon/timing.py)."""
    import torch
    from pigeon.timing import median_ms
    return median_ms(fn, torch.device("cuda"), warmup=1, reps=iters)[0]


FORMS = {"wgmma": ("wgmma", "p_smem"), "wgmma_rs": ("wgmma", "p_regs"), "mma": ("mma", "")}


def _resources(forward: str, q, kw) -> dict:
    """Registers, spills, shared memory and nvcc seconds of the forward kernel of ``q`` (the ptxas report
    of the disk cache's entry: the kernel that ran, no second build)."""
    try:
        from pigeon.attention.api import _plan
        from pigeon.codegen import attention_mma, attention_wgmma
        from pigeon.runtime.build import build_kernel, device_arch
        smod = kw.get("score_mod")
        import pigeon.attention as pa
        inst = _plan(q, q, q, pa.trace_score_mod(smod) if smod else None, None, kw.get("pattern"), None)[0]
        fwd, knobs = FORMS[forward]
        rk = attention_wgmma.render_attention_wgmma(inst, knobs) if fwd == "wgmma" else attention_mma.render_attention_mma(inst)
        entry = build_kernel(rk.source, rk.meta.get("arch") or device_arch(), name=rk.name)
        r = entry.resources.get(rk.name, {})
        return {"kernel": rk.name, "registers": r.get("registers"),
                "spill_bytes": (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0),
                "smem_dynamic": rk.shared_mem, "nvcc_s": entry.meta.get("build_seconds")}
    except Exception as e:  # noqa: BLE001
        return {"resources_error": f"{type(e).__name__}: {e}"}


CASES = ("dense", "causal", "alibi_causal")


def _prebuild(head_dims) -> None:
    """Build every kernel the children run, in parallel, into the disk cache (a wgmma kernel is ~15 s of
    nvcc); a failure here is reported by the child that needs the kernel."""
    import time
    import torch
    import pigeon.attention as pa
    from pigeon.attention.api import _plan
    from pigeon.codegen import attention_mma, attention_wgmma
    from pigeon.runtime.build import build_kernels, device_arch
    arch = device_arch()
    alibi = pa.trace_score_mod(lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q))
    jobs = []
    for d in head_dims:
        q = torch.empty(1, 2, 64, int(d), dtype=torch.bfloat16)
        for smod, pat in ((None, None), (None, pa.Causal()), (alibi, pa.Causal())):
            inst = _plan(q, q, q, smod, None, pat, None)[0]
            jobs += [attention_wgmma.render_attention_wgmma(inst, "p_smem"),
                     attention_wgmma.render_attention_wgmma(inst, "p_regs"), attention_mma.render_attention_mma(inst)]

    t0 = time.perf_counter()
    fails = build_kernels(jobs, arch)
    print(f"prebuilt {len(jobs) - len(fails)}/{len(jobs)} kernels in {time.perf_counter() - t0:.0f} s", flush=True)
    for f in fails:
        print("BUILD FAILED", f, flush=True)


def _parent(args) -> int:
    import subprocess
    import tempfile
    rows = []
    try:
        _prebuild(args.head_dims.split(","))
    except Exception as e:  # noqa: BLE001
        print(f"prebuild: {type(e).__name__}: {e}", flush=True)
    print(f"B,H,S {args.shape} bf16 (one child process per case)", flush=True)
    for d in args.head_dims.split(","):
        for name in CASES:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                path = tmp.name
            cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{d},{name}", "--out", path,
                   "--shape", args.shape, "--iters", str(args.iters)] + (["--no-resources"] if args.no_resources else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                sys.stdout.write(proc.stdout)
                if proc.returncode != 0:
                    print(f"D{d} {name}: child exit {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
                    if os.path.getsize(path) == 0:
                        rows.append({"head_dim": int(d), "variant": name, "error": f"child exit {proc.returncode}",
                                     "stderr_tail": proc.stderr[-3000:]})
                        continue
                with open(path) as f:
                    rows.extend(json.load(f))
            except Exception as e:  # noqa: BLE001
                print(f"D{d} {name}: {type(e).__name__}: {e}", flush=True)
                rows.append({"head_dim": int(d), "variant": name, "error": f"{type(e).__name__}: {e}"[:3000]})
            finally:
                if os.path.exists(path):
                    os.unlink(path)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_attention_wgmma.json")
    ap.add_argument("--shape", default="4,32,4096", help="B,H,S")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-resources", action="store_true", help="skip the ptxas reports (one extra nvcc each)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)      # child: "D,name"
    args = ap.parse_args(argv)
    if args.case is None:
        return _parent(args)
    import torch
    import torch.nn.functional as F
    import pigeon.attention as pa

    B, H, S = (int(x) for x in args.shape.split(","))
    os.environ["PIGEON_ATTENTION_KERNEL"] = "mma"           # never a quiet SIMT run
    alibi = lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q)    # noqa: E731
    cases = [("dense", dict(), False), ("causal", dict(pattern=pa.Causal()), True),
             ("alibi_causal", dict(pattern=pa.Causal(), score_mod=alibi), True)]
    rows = []
    want_d, want_name = args.case.split(",")
    cases = [c for c in cases if c[0] == want_name]
    for d in (int(want_d),):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        for name, kw, causal in cases:
            row = {"head_dim": d, "variant": name, "shape": [B, H, S]}
            flops = 4 * B * H * S * S * d * ((S + 1) / (2 * S) if causal else 1.0)

            def pigeon_fwd(form, kw=kw):
                os.environ["PIGEON_ATTN_FORWARD"], os.environ["PIGEON_ATTN_WGMMA_TUNE"] = FORMS[form]
                return pa.attention(q, k, v, **kw)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            outs = {}
            for form in FORMS:
                try:
                    outs[form] = pigeon_fwd(form)
                    torch.cuda.synchronize()
                    if torch.isnan(outs[form]).any():
                        row[f"{form}_error"] = "NaN in the output"
                except Exception as e:  # noqa: BLE001
                    row[f"{form}_error"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc()
            try:
                ref = sdpa() if "score_mod" not in kw else outs.get("mma")
                if ref is not None:
                    for form, o in outs.items():
                        row[f"{form}_max_abs_err"] = (o.float() - ref.float()).abs().max().item()
                    row["reference"] = "sdpa" if "score_mod" not in kw else "mma forward"
            except Exception as e:  # noqa: BLE001
                row["check_error"] = f"{type(e).__name__}: {e}"[:2000]
            for impl, fn in [(f, lambda f=f: pigeon_fwd(f)) for f in FORMS] + [("sdpa", sdpa)]:
                if impl in FORMS and impl not in outs:
                    continue
                if impl == "sdpa" and "score_mod" in kw:
                    continue
                try:
                    ms = _time(fn, args.iters)
                    row[f"{impl}_ms"] = ms
                    row[f"{impl}_tflops"] = flops / ms / 1e9
                except Exception as e:  # noqa: BLE001
                    row[f"{impl}_time_error"] = f"{type(e).__name__}: {e}"[:2000]
            if not args.no_resources:
                for form in FORMS:
                    row[f"{form}_resources"] = _resources(form, q, kw)
            rows.append(row)
            fmt = lambda key: f"{row[key]:7.1f}" if key in row else "    -  "       # noqa: E731
            errs = " ".join(f"{f} err {row[f + '_max_abs_err']:.2e}" for f in FORMS if f + "_max_abs_err" in row)
            fails = " ".join(f"{f}: {row[f + '_error'][:300]}" for f in FORMS if f + "_error" in row)
            print(f"D{d:<4} {name:<13} wgmma {fmt('wgmma_tflops')}  wgmma_rs {fmt('wgmma_rs_tflops')}  mma {fmt('mma_tflops')}"
                  f"  sdpa {fmt('sdpa_tflops')} TFLOP/s  {errs}  {fails}", flush=True)
    os.environ.pop("PIGEON_ATTN_FORWARD", None)
    os.environ.pop("PIGEON_ATTN_WGMMA_TUNE", None)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
