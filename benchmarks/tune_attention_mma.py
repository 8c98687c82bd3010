"""Time the tensor-core attention forward under schedule knobs (PIGEON_ATTN_MMA_TUNE), one process
per setting (the kernel is rendered once per process), against SDPA in the same process.

A setting is a knob string of pigeon/codegen/attention_mma.py ``tuning``: ``default`` (the per-head-dim
defaults: D=64 64-row tiles with q_smem,minb3; D=128 128-row tiles, 4 warps x 32 rows, q_smem, two 32-key
softmax steps), ``""`` (the plain 64-row form: 4 warps x 16 rows, Q in registers, 2 CTAs per SM), or
knobs: ``bm64`` / ``bm128`` (query rows per CTA; bm128 alone is 4 warps x 32 rows), ``mt1`` / ``mt2``
(16-row m-tiles per warp), ``q_smem`` / ``q_regs``, ``minb<N>``, ``ks32`` / ``ks64`` (keys per softmax
step).  The 64-row against the 128-row forward (the previous defaults first):

    python benchmarks/tune_attention_mma.py --settings \\
        "|q_smem,minb3|bm128,q_smem,ks32|bm128,q_smem|bm128,mt1,q_smem,minb1" --out DIR

Prints one line per (setting, head dim, variant) and writes DIR/attention_mma_knobs.json and .md
(each row names the schedule that ran: ``schedule``, the resolved knob string)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, torch
import pigeon.attention as pa
import torch.nn.functional as F
from pigeon.codegen.attention_mma import tuning
B, H, S = (int(x) for x in sys.argv[1].split(","))
dims = [int(d) for d in sys.argv[2].split(",")]
variants = sys.argv[3].split(",")
rows = []

def kept_fraction(name):
    if name == "dense":
        return 1.0
    if name == "causal":
        return (S + 1) / (2 * S)
    w = int(name[len("window"):])                       # causal sliding window of w keys
    return sum(min(i + 1, w) for i in range(S)) / (S * S)

for d in dims:
    for name in variants:
        pat = None if name == "dense" else pa.Causal() if name == "causal" else pa.SlidingWindow(int(name[6:]))
        q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        def run():
            return pa.attention(q, k, v, pattern=pat)
        if name == "dense" or name == "causal":
            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=pat is not None)
        else:
            i = torch.arange(S, device="cuda")
            keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < pat.window)
            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = {}
        for impl, fn in (("pigeon", run), ("sdpa", sdpa)):
            fn(); torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
            ts.sort()
            ms = ts[len(ts) // 2]
            flops = 4 * B * H * S * S * d * kept_fraction(name)
            out[impl] = {"ms": ms, "tflops": flops / ms / 1e9}
        err = (run().float() - sdpa().float()).abs().max().item()
        rows.append({"setting": os.environ.get("PIGEON_ATTN_MMA_TUNE", ""), "schedule": tuning(d).tag(),
                     "head_dim": d, "variant": name, "shape": [B, H, S], "max_abs_diff_vs_sdpa": err,
                     **{f"{i}_{k}": v for i, r in out.items() for k, v in r.items()}})
print(json.dumps(rows))
"""


def _markdown(rows) -> str:
    head = ("| setting | schedule | D | variant | pigeon ms | pigeon TFLOP/s | SDPA TFLOP/s | pigeon / SDPA | "
            "max abs diff vs SDPA |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['setting'] or 'plain'} | {r['schedule']} | {r['head_dim']} | {r['variant']} | {r['pigeon_ms']:.3f} | "
        f"{r['pigeon_tflops']:.0f} | {r['sdpa_tflops']:.0f} | {r['pigeon_tflops'] / r['sdpa_tflops']:.2f} | "
        f"{r['max_abs_diff_vs_sdpa']:.1e} |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="|q_smem,minb3|default|bm128,q_smem|bm128,mt1,q_smem,minb1",
                    help="'|'-separated knob strings ('default': the per-head-dim defaults, '': the plain 64-row form)")
    ap.add_argument("--shape", default="4,32,4096", help="B,H,S")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--variants", default="dense,causal", help="dense, causal, window<N> (causal sliding window)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    rows = []
    for setting in args.settings.split("|"):
        env = dict(os.environ, PIGEON_ATTN_MMA_TUNE=setting, PIGEON_ATTENTION_KERNEL="mma")
        proc = subprocess.run([sys.executable, "-c", CHILD, args.shape, args.head_dims, args.variants], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"[{setting}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append(r)
            print(f"[{setting or 'plain'}: {r['schedule']}] d{r['head_dim']} {r['variant']}: pigeon {r['pigeon_ms']:.3f} ms "
                  f"{r['pigeon_tflops']:.0f} TFLOP/s, sdpa {r['sdpa_tflops']:.0f}, diff {r['max_abs_diff_vs_sdpa']:.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_mma_knobs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "attention_mma_knobs.md"), "w") as f:
        f.write(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
