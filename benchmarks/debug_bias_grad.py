"""Where a 16-bit layer's weight gradient drifts from the float64 truth (the AM-sized RGCN bf16 bias
gradient of `pigeon bench rgnn`): pigeon, the reference interpreter in the layer's dtype and in float64,
with the same weights and input, fresh and after one SGD step (the bench checks after its first step).

    python benchmarks/debug_bias_grad.py --model rgcn --graph synthetic:am --dim 64 --dtype bfloat16

Prints, per stage: each value's max error against float64 for pigeon and the 16-bit reference, the largest
column-mean error of the output (a systematic offset), and the bias gradient recomputed from each
output (sum over rows of the loss gradient rounded to the dtype): whether a wrong gradient comes from a
wrong output or from the backward."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rgcn")
    ap.add_argument("--graph", default="synthetic:am")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    import pigeon as pg
    from pigeon.bench.check import _reference, _values
    from pigeon.bench.floors import hparams
    from pigeon.bench.timing import Step
    from pigeon.bench.rgnn import load_graph_name
    from pigeon.models import MODELS
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = load_graph_name(args.graph)
    gd = g.to(dev)
    tdt = getattr(torch, args.dtype)
    x = torch.randn(g.num_nodes, args.dim, generator=torch.Generator().manual_seed(0)).to(dev, tdt)
    layer = pg.compile(MODELS[args.model], g, args.dim, dtype=args.dtype, **hparams(args.model, args.dim)).to(dev)
    env = {k: v for k, v in os.environ.items() if k.startswith("PIGEON_") and k not in ("PIGEON_DATA", "PIGEON_CACHE_DIR")}
    print(f"# {args.model} {args.graph} d{args.dim} {args.dtype} on {dev}; env {env}", flush=True)

    def bias_from(out: torch.Tensor, dt) -> torch.Tensor:
        o = out.detach().double()
        return (2 * o / o.numel()).to(dt).double().sum(0)        # loss = mean(out^2), its gradient in dt

    for stage in range(args.steps + 1):
        got = _values(layer, x, "training", tdt)
        r16 = _values(_reference(args.model, gd, args.dim, layer, args.dtype, args.dtype, dev), x, "training", tdt)
        r64 = _values(_reference(args.model, gd, args.dim, layer, args.dtype, "float64", dev), x, "training",
                      torch.float64)
        print(f"## after {stage} SGD steps", flush=True)
        for k in r64:
            if got.get(k) is None:
                continue
            e_p = float((got[k].double() - r64[k]).abs().max())
            e_r = float((r16[k].double() - r64[k]).abs().max())
            print(f"{k:12s} max|truth| {float(r64[k].abs().max()):.3g}  err pigeon {e_p:.3g}  err ref16 {e_r:.3g}"
                  f"  ratio {e_p / max(e_r, 1e-30):.3g}", flush=True)
        out_k = next(k for k in r64 if not k.startswith("grad"))
        cm_p = (got[out_k].double() - r64[out_k]).mean(0).abs().max()
        cm_r = (r16[out_k].double() - r64[out_k]).mean(0).abs().max()
        print(f"output column-mean err: pigeon {float(cm_p):.3g}, ref16 {float(cm_r):.3g}")
        gb = [k for k in r64 if k.startswith("grad b")]
        for k in gb:
            for name, vals in (("pigeon", got), ("ref16", r16)):
                rec = bias_from(vals[out_k], tdt)
                print(f"{k} recomputed from {name}'s output vs its own gradient: "
                      f"{float((rec - vals[k].double()).abs().max()):.3g}; vs truth {float((rec - r64[k]).abs().max()):.3g}")
        if stage < args.steps:
            Step(layer, x, "training")()
    return 0


if __name__ == "__main__":
    sys.exit(main())
