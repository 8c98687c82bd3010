"""Time the tensor-core attention forward under schedule knobs (PIGEON_ATTN_MMA_TUNE), one process
per setting (the kernel is rendered once per process), against SDPA in the same process.

    python benchmarks/tune_attention_mma.py --settings ",minb3,q_smem,q_smem,minb3" --out DIR

Prints one line per (setting, head dim, variant) and writes DIR/attention_mma_knobs.json."""
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
B, H, S = 4, 32, 4096
rows = []
for d in (64, 128):
    for name, pat in (("dense", None), ("causal", pa.Causal())):
        q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        def run():
            return pa.attention(q, k, v, pattern=pat)
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=pat is not None)
        out = {}
        for impl, fn in (("pigeon", run), ("sdpa", sdpa)):
            fn(); torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
            ts.sort()
            ms = ts[len(ts) // 2]
            flops = 4 * B * H * S * S * d * (0.5 if pat is not None else 1.0)
            out[impl] = {"ms": ms, "tflops": flops / ms / 1e9}
        err = (run().float() - sdpa().float()).abs().max().item()
        rows.append({"setting": os.environ.get("PIGEON_ATTN_MMA_TUNE", ""), "head_dim": d, "variant": name,
                     "max_abs_diff_vs_sdpa": err, **{f"{i}_{k}": v for i, r in out.items() for k, v in r.items()}})
print(json.dumps(rows))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="|minb3|q_smem|q_smem,minb3", help="'|'-separated knob sets")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    rows = []
    for setting in args.settings.split("|"):
        env = dict(os.environ, PIGEON_ATTN_MMA_TUNE=setting, PIGEON_ATTENTION_KERNEL="mma")
        proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            print(f"[{setting}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append(r)
            print(f"[{setting or 'default'}] d{r['head_dim']} {r['variant']}: pigeon {r['pigeon_ms']:.3f} ms "
                  f"{r['pigeon_tflops']:.0f} TFLOP/s, sdpa {r['sdpa_tflops']:.0f}, diff {r['max_abs_diff_vs_sdpa']:.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_mma_knobs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
