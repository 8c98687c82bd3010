"""One-GPU-call diagnosis of the Hopper wgmma attention forward (pigeon/codegen/attention_wgmma.py):
per knob variant of ``PIGEON_ATTN_WGMMA_TUNE`` (``p_smem``, ``p_regs``, each also with ``strict``,
the stricter-synchronization diagnostic), small cases with known answers, one line each with the max
abs error, bf16:

  uniform   Q = 0: uniform softmax, O = mean of V over the keys (the P V path and V's layout alone)
  onehot    K = V = identity rows (key j = e_j), Q row i = 16 e_pi(i), scale 1: one dominant key per
            row; also the fraction of rows whose output argmax is pi(i) (the S path and K's layout)
  dense     random, B1 H2 S128 and S256 (and S200, off the 64-tiles) against float64 math
  causal    random, B1 H2 S256 and S200, causal

then, for the variants with every case correct (max abs error < 2e-2), B4 H32 S4096 D128 dense and
causal timing (CUDA events, median) next to the mma forward.  The kernels are built in parallel
first; each variant runs in a child process (a CUDA fault ends only its own variant).  Last line:
``BEST: <knobs>`` (the fastest correct variant by dense + causal D128 time) or ``NONE CORRECT``.

    python benchmarks/debug_attention_wgmma.py --out DIR      (DIR/debug_attention_wgmma.json)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

VARIANTS = ("p_smem", "p_regs", "p_smem,strict", "p_regs,strict")
TOL = 2e-2
BIG = (4, 32, 4096, 128)


def _prebuild(variants) -> None:
    import torch
    import pigeon.attention as pa
    from pigeon.attention.api import _plan
    from pigeon.codegen import attention_mma, attention_wgmma
    from pigeon.runtime.build import build_kernels, device_arch
    arch = device_arch()
    jobs = []
    for d in (64, 128):
        q = torch.empty(1, 2, 64, d, dtype=torch.bfloat16)
        for pat in (None, pa.Causal()):
            inst = _plan(q, q, q, None, None, pat, None)[0]
            jobs += [attention_wgmma.render_attention_wgmma(inst, kn) for kn in variants]
            if d == BIG[3]:
                jobs.append(attention_mma.render_attention_mma(inst))

    t0 = time.perf_counter()
    fails = build_kernels(jobs, arch)
    print(f"prebuilt {len(jobs) - len(fails)}/{len(jobs)} kernels in {time.perf_counter() - t0:.0f} s", flush=True)
    for f in fails:
        print("BUILD FAILED", f, flush=True)


def _time(fn, iters=10) -> float:
    """Median ms of ``fn`` over ``iters`` CUDA-event-timed calls after one warm-up (pigeon/timing.py)."""
    import torch
    from pigeon.timing import median_ms
    return median_ms(fn, torch.device("cuda"), warmup=1, reps=iters)[0]


def _ref(q, k, v, causal, scale=None):
    """float64 softmax(Q K^T * scale) V (causal: key <= query, aligned at the end like the kernels)."""
    import torch
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def _child(knobs: str, out_path: str) -> int:
    import torch
    import pigeon.attention as pa
    import pigeon.runtime.attention_kernel as ak
    os.environ["PIGEON_ATTENTION_KERNEL"] = "mma"
    os.environ["PIGEON_ATTN_FORWARD"] = "wgmma"
    os.environ["PIGEON_ATTN_WGMMA_TUNE"] = knobs
    dev = torch.device("cuda")
    bf = torch.bfloat16
    res = {"knobs": knobs, "cases": {}, "ok": True}

    def case(name, fn):
        try:
            err, extra = fn()
            ok = err == err and err < TOL and (extra is None or extra >= 0.999)
        except Exception as e:  # noqa: BLE001
            err, extra, ok = float("nan"), f"{type(e).__name__}: {str(e)[:300]}", False
            traceback.print_exc()
        res["cases"][name] = {"max_abs_err": err, "extra": extra, "ok": ok}
        res["ok"] = res["ok"] and ok
        ex = "" if extra is None else (f"  argmax_ok {extra:.3f}" if isinstance(extra, float) else f"  {extra}")
        print(f"[{knobs:<14}] {name:<22} max_abs_err {err:.3e}  {'OK' if ok else 'WRONG'}{ex}", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g).to(bf)

    def ran_wgmma():
        return any("_wgmma_" in n for n, *_ in ak._MODULES)

    for d in (64, 128):
        def uniform(d=d, s=256):
            q = torch.zeros(1, 2, s, d, device=dev, dtype=bf)
            k, v = rnd(1, 2, s, d), rnd(1, 2, s, d)
            o = pa.attention(q, k, v)
            torch.cuda.synchronize()
            assert ran_wgmma(), "the wgmma kernel did not run"
            want = v.double().mean(-2, keepdim=True).expand_as(o)
            return (o.double() - want).abs().max().item(), None
        case(f"D{d} uniform S256", uniform)

        def onehot(d=d):
            s = d                                          # d keys: key j = e_j, V row j = e_j
            eye = torch.eye(d, device=dev)
            k = eye[None, None].expand(1, 2, s, d).to(bf).contiguous()
            v = k.clone()
            perm = torch.stack([torch.randperm(d, device=dev, generator=g) for _ in range(2)])   # per head
            q = (16.0 * eye[perm])[None].to(bf).contiguous()                                     # (1, 2, s, d)
            o = pa.attention(q, k, v, scale=1.0)
            torch.cuda.synchronize()
            err = (o.double() - _ref(q, k, v, False, 1.0)).abs().max().item()
            hit = (o.float().argmax(-1) == perm[None]).double().mean().item()
            return err, hit
        case(f"D{d} onehot S{d}", onehot)

        for s in (128, 256, 200):
            def dense(d=d, s=s):
                q, k, v = rnd(1, 2, s, d), rnd(1, 2, s, d), rnd(1, 2, s, d)
                o = pa.attention(q, k, v)
                torch.cuda.synchronize()
                return (o.double() - _ref(q, k, v, False)).abs().max().item(), None
            case(f"D{d} dense S{s}", dense)
        for s in (256, 200):
            def causal(d=d, s=s):
                q, k, v = rnd(1, 2, s, d), rnd(1, 2, s, d), rnd(1, 2, s, d)
                o = pa.attention(q, k, v, pattern=pa.Causal())
                torch.cuda.synchronize()
                return (o.double() - _ref(q, k, v, True)).abs().max().item(), None
            case(f"D{d} causal S{s}", causal)

    if res["ok"]:
        import torch.nn.functional as F
        B, H, S, d = BIG
        q, k, v = rnd(B, H, S, d), rnd(B, H, S, d), rnd(B, H, S, d)
        for name, kw, causal in (("dense", {}, False), ("causal", {"pattern": pa.Causal()}, True)):
            try:
                o = pa.attention(q, k, v, **kw)
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                err = (o.float() - ref.float()).abs().max().item()
                ms = _time(lambda: pa.attention(q, k, v, **kw))
                os.environ["PIGEON_ATTN_FORWARD"] = "mma"
                ms_mma = _time(lambda: pa.attention(q, k, v, **kw))
                os.environ["PIGEON_ATTN_FORWARD"] = "wgmma"
                flops = 4 * B * H * S * S * d * ((S + 1) / (2 * S) if causal else 1.0)
                res[f"big_{name}_ms"], res[f"big_{name}_mma_ms"], res[f"big_{name}_err"] = ms, ms_mma, err
                ok = err < TOL
                res["ok"] = res["ok"] and ok
                print(f"[{knobs:<14}] B4 H32 S4096 D128 {name:<7} {ms:.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s "
                      f"(mma {ms_mma:.3f} ms {flops / ms_mma / 1e9:6.1f})  max_abs_err vs SDPA {err:.3e}  "
                      f"{'OK' if ok else 'WRONG'}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["ok"] = False
                print(f"[{knobs:<14}] big {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="directory for debug_attention_wgmma.json")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated knob strings")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return _child(args.child, args.child_out)
    t0 = time.perf_counter()
    variants = [v for v in args.variants.split(";") if v]
    os.makedirs(args.out, exist_ok=True)
    try:
        _prebuild(variants)
    except Exception as e:  # noqa: BLE001
        print(f"prebuild: {type(e).__name__}: {e}", flush=True)
    results = []
    for kn in variants:
        path = os.path.join(args.out, f"child_{kn.replace(',', '_')}.json")
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kn, "--child-out", path],
                                  capture_output=True, text=True, timeout=300)
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0 or not os.path.exists(path):
                print(f"[{kn}] child exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
                results.append({"knobs": kn, "ok": False, "error": proc.stderr[-2000:]})
                continue
            with open(path) as f:
                results.append(json.load(f))
        except Exception as e:  # noqa: BLE001
            print(f"[{kn}] {type(e).__name__}: {e}", flush=True)
            results.append({"knobs": kn, "ok": False, "error": f"{type(e).__name__}: {e}"})
    with open(os.path.join(args.out, "debug_attention_wgmma.json"), "w") as f:
        json.dump(results, f, indent=1)
    good = [r for r in results if r.get("ok") and "big_dense_ms" in r and "big_causal_ms" in r]
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if good:
        best = min(good, key=lambda r: r["big_dense_ms"] + r["big_causal_ms"])
        print(f"BEST: {best['knobs']}", flush=True)
    else:
        print("NONE CORRECT", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
