"""Which kernel of a compiled layer disagrees with its own semantics: every launch of the forward and
backward programs runs on the GPU and, on a copy of the same buffers, through its family's plain-torch
semantics (the definition the kernel is generated from); each buffer the launch writes is compared.

    python benchmarks/check_launches.py --model rgcn --graph synthetic:am --dim 64 --dtype bfloat16 --out DIR

Inputs of both programs are fresh random tensors (a backward's saved values and gradients included: the
question is kernel vs semantics, not the model), allocated buffers are NaN-poisoned. Per written buffer:
max |error| / max |semantics|, the largest |column mean of the error| (a systematic offset a loose
elementwise tolerance hides), and elements more than 4 units in the last place of the dtype off.
Writes DIR/launches_<model>_<graph>_d<dim>_<dtype>.{json,md} with GPU, commit, date and the command."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch


def _ulp(dt: torch.dtype) -> float:
    return {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(dt, 0.0)


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    g, w = got.double(), want.double()
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    err = (g - w).abs().nan_to_num(0.0)
    scale = float(w.nan_to_num(0.0).abs().max()) if w.numel() else 0.0
    col = (g - w).nan_to_num(0.0).reshape(g.shape[0], -1).mean(0) if g.dim() and g.shape[0] else err.reshape(1, -1)
    far = err > 4 * _ulp(got.dtype) * w.abs().nan_to_num(0.0) + 1e-30
    return {"shape": list(got.shape), "dtype": str(got.dtype).replace("torch.", ""),
            "max_abs_err": float(err.max()) if err.numel() else 0.0, "max_abs_want": scale,
            "rel_err": float(err.max()) / scale if scale else 0.0,
            "max_col_mean_err": float(col.abs().max()) if col.numel() else 0.0,
            "far_elements": int(far.sum()), "elements": got.numel(),
            "nan_mismatch": int((nan_g != nan_w).sum())}


def _run(program, kg, dev, seed: int, label: str) -> list[dict]:
    from pigeon.runtime.family import run_launch
    from pigeon.runtime.program import CudaBackend, EmulateBackend, TorchBackend, _Plan
    plan = _Plan(program, kg)
    gen = torch.Generator(device=dev).manual_seed(seed)
    bufs: dict[str, torch.Tensor] = {}
    for decl in (plan.inputs, plan.params):
        for _, bname, shape in decl:
            dt = getattr(torch, program.buffer(bname).dtype)
            bufs[bname] = (torch.randn(shape, generator=gen, device=dev) * 0.5).to(dt)
    bufs.update(plan.graph)
    for bname, shape, dt, is_float in plan.allocs:
        bufs[bname] = torch.full(shape, float("nan"), dtype=dt, device=dev) if is_float else \
            torch.zeros(shape, dtype=dt, device=dev)
    cuda, semantics = (CudaBackend() if dev.type == "cuda" else EmulateBackend()), TorchBackend()
    rows = []
    for i, launch in enumerate(program.launches):
        before = {k: v.clone() for k, v in bufs.items()}
        run_launch(cuda, launch, kg, bufs)
        ref = {k: v.clone() for k, v in before.items()}
        run_launch(semantics, launch, kg, ref)
        written = [k for k in bufs if not torch.equal(bufs[k].nan_to_num(1e30), before[k].nan_to_num(1e30))
                   or not torch.equal(ref[k].nan_to_num(1e30), before[k].nan_to_num(1e30))]
        for k in written:
            r = {"program": label, "launch": i, "what": str(launch).splitlines()[0][:160], "buffer": k,
                 **_compare(bufs[k], ref[k])}
            rows.append(r)
            print(f"{label}[{i}] {k}: rel {r['rel_err']:.3g} col-mean {r['max_col_mean_err']:.3g} "
                  f"far {r['far_elements']}/{r['elements']} nan-mismatch {r['nan_mismatch']}  {r['what']}",
                  file=sys.stderr, flush=True)
        # the next launch reads what the semantics wrote: each kernel is judged on identical inputs
        bufs = ref
        del before
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rgcn")
    ap.add_argument("--graph", default="synthetic:am")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/pigeon_out")
    args = ap.parse_args()
    import pigeon as pg
    from pigeon.bench.floors import hparams
    from pigeon.bench.rgnn import load_graph_name
    from pigeon.models import MODELS
    g = load_graph_name(args.graph)
    from pigeon.runtime.ops import get_layer
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # cpu: emulated CUDA text (traversals)
    layer = pg.compile(MODELS[args.model], g, args.dim, dtype=args.dtype, **hparams(args.model, args.dim)).to(dev)
    lp_kg = get_layer(layer.layer_id).kg(dev)
    rows = _run(layer.forward_program, lp_kg, dev, args.seed, "forward")
    if layer.backward_program is not None:
        rows += _run(layer.backward_program, lp_kg, dev, args.seed + 1, "backward")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"launches_{args.model}_{args.graph.replace(':', '_')}_d{args.dim}_{args.dtype}"
    meta = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (emulated traversals)", "commit": os.environ.get("PIGEON_COMMIT", "?"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/check_launches.py " + " ".join(sys.argv[1:])}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "launches": rows}, indent=1))
    lines = [f"# kernel vs semantics per launch: {args.model} {args.graph} d{args.dim} {args.dtype}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + ["", "| program | launch | buffer | rel err | max col-mean err "
              "| elements > 4 ulp | NaN mismatch | launch |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['program']} | {r['launch']} | {r['buffer']} | {r['rel_err']:.3g} | {r['max_col_mean_err']:.3g} "
              f"| {r['far_elements']} / {r['elements']} | {r['nan_mismatch']} | `{r['what']}` |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
