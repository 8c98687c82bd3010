"""Time the tensor-core attention forward under schedule knobs (PIGEON_ATTN_MMA_TUNE), one process
per setting (the kernel is rendered once per process), against SDPA in the same process.

A setting is a knob string of pigeon/codegen/attention_mma.py ``tuning``: ``default`` (the per-head-dim
defaults: D=64 64-row tiles with q_smem,minb3; D=128 128-row tiles, 4 warps x 32 rows, q_smem, two 32-key
softmax steps), ``""`` (the plain 64-row form: 4 warps x 16 rows, Q in registers, 2 CTAs per SM), or
knobs: ``bm64`` / ``bm128`` (query rows per CTA; bm128 alone is 4 warps x 32 rows), ``mt1`` / ``mt2``
(16-row m-tiles per warp), ``q_smem`` / ``q_regs``, ``minb<N>``, ``ks32`` / ``ks64`` (keys per softmax
step), and the code forms of attention_mma.CODE_FORMS, each reverting one part of the template to its
db8bc18 form (``full_inline`` / ``full_always``, ``smem_static``, ``walk_list``, ``addr_row``,
``rows_elem``).  The 64-row against the 128-row forward (the previous defaults first):

    python benchmarks/tune_attention_mma.py --settings \\
        "|q_smem,minb3|bm128,q_smem,ks32|bm128,q_smem|bm128,mt1,q_smem,minb1" --out DIR

Issue 8 (the packed-document forward, 2.09 ms at db8bc18 -> 2.77 at 77791a9): each suspect reverted
alone, then all of them (db8bc18's kernel), on ``document`` (the packed documents of ``pigeon bench
attention --variants document``: per sequence of S tokens documents of S/2, S/4, S/8, S/8, causal,
[B*S, H, D] with cu_seqlens; SDPA there is its causal kernel per document) and ``causal``:

    python benchmarks/tune_attention_mma.py --head-dims 128 --variants document,causal --out DIR --settings \\
        "default|default,full_inline|default,smem_static|default,walk_list|default,full_inline,smem_static,walk_list,addr_row,rows_elem"

Prints one line per (setting, head dim, variant) and writes DIR/attention_mma_knobs.json and .md
(each row names the schedule that ran: ``schedule``, the resolved knob string, and its kernel's
registers and spill bytes from the kernel cache's ptxas report)."""
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
from pigeon.attention.api import _plan
from pigeon.bench import attn_variants as AV
from pigeon.codegen.attention_mma import render_attention_mma, tuning
B, H, S = (int(x) for x in sys.argv[1].split(","))
dims = [int(d) for d in sys.argv[2].split(",")]
variants = sys.argv[3].split(",")
rows = []

def kept_fraction(name):
    if name == "dense":
        return 1.0
    if name == "causal":
        return (S + 1) / (2 * S)
    if name == "document":
        return AV.kept_fraction("document", H, S, 1024)
    w = int(name[len("window"):])                       # causal sliding window of w keys
    return sum(min(i + 1, w) for i in range(S)) / (S * S)

def resources(q, pat, cu):                             # registers and spills of the forward that ran (ptxas report)
    try:
        from pigeon.runtime.build import build_kernel, device_arch
        inst = _plan(q, q, q, None, None, pat, cu)[0]
        rk = render_attention_mma(inst)
        r = build_kernel(rk.source, device_arch(), name=rk.name).resources.get(rk.name, {})
        return {"kernel": rk.name, "registers": r.get("registers"), "spill_bytes":
                (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)}
    except Exception as e:  # noqa: BLE001 - reporting only
        return {"resources_error": repr(e)[:200]}

for d in dims:
    for name in variants:
        cu = None
        if name == "document":                          # pigeon bench attention's packed documents
            p = AV.make_problem("document", B, H, S, d, torch.bfloat16, "cuda", 1024)
            q, k, v, cu, pat = p.q, p.k, p.v, p.cu_seqlens, pa.Causal()
            bounds = [int(x) for x in cu.tolist()]
            def run():
                return pa.attention(q, k, v, pattern=pat, cu_seqlens=cu)
            def sdpa():                                 # SDPA's causal kernel, one call per document
                outs = [F.scaled_dot_product_attention(q[a:e].transpose(0, 1)[None], k[a:e].transpose(0, 1)[None],
                                                       v[a:e].transpose(0, 1)[None], is_causal=True)[0].transpose(0, 1)
                        for a, e in zip(bounds[:-1], bounds[1:])]
                return torch.cat(outs)
        else:
            pat = None if name == "dense" else pa.Causal() if name == "causal" else pa.SlidingWindow(int(name[6:]))
            q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            def run():
                return pa.attention(q, k, v, pattern=pat)
        if name == "dense" or name == "causal":
            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=pat is not None)
        elif name != "document":
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
                     **{f"{i}_{k}": v for i, r in out.items() for k, v in r.items()}, **resources(q, pat, cu)})
print(json.dumps(rows))
"""


def _markdown(rows) -> str:
    head = ("| setting | schedule | D | variant | pigeon ms | pigeon TFLOP/s | SDPA TFLOP/s | pigeon / SDPA | "
            "max abs diff vs SDPA | registers | spill bytes |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['setting'] or 'plain'} | {r['schedule']} | {r['head_dim']} | {r['variant']} | {r['pigeon_ms']:.3f} | "
        f"{r['pigeon_tflops']:.0f} | {r['sdpa_tflops']:.0f} | {r['pigeon_tflops'] / r['sdpa_tflops']:.2f} | "
        f"{r['max_abs_diff_vs_sdpa']:.1e} | {r.get('registers', '')} | {r.get('spill_bytes', '')} |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="|q_smem,minb3|default|bm128,q_smem|bm128,mt1,q_smem,minb1",
                    help="'|'-separated knob strings ('default': the per-head-dim defaults, '': the plain 64-row form)")
    ap.add_argument("--shape", default="4,32,4096", help="B,H,S")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--variants", default="dense,causal",
                    help="dense, causal, window<N> (causal sliding window), document (packed documents, cu_seqlens)")
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
