"""The dense GEMM backends pigeon chooses between (pigeon/passes/gemm_backend.py), side by side:
cuBLAS (``torch.mm``, the rule's pick), pigeon's GEMM template and TVM's dlight Matmul kernel
(pigeon/codegen/tvm_gemm.py, rows form only), at the row counts of RGCN's root-weight GEMM
``x @ W_self``, its data gradient ``dy @ W_self^T`` and its weight gradient ``x^T dy`` on the
benchmark graphs.

    python benchmarks/bench_tvm_gemm.py --out benchmarks/results/tvm_gemm_h200_<commit>     # GPU only

Each candidate's output is checked against a float64 matmul before it is timed (CUDA events,
median).  TVM's sources come from the kernel cache (``scripts/prebuild_kernels.py --tvm-gemm only
--dims 64,128``: TVM is not on the GPU machine).  Writes cases.json and cases.md (gpu, commit,
date, command)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pigeon import timing  # noqa: E402
from pigeon.bench.common import environment  # noqa: E402
from pigeon.graph.synthetic import PRESETS  # noqa: E402
from pigeon.ir.kernel import GemmInstance  # noqa: E402
from pigeon.runtime import tvm_gemm_kernel as tg  # noqa: E402
from pigeon.runtime.build import build_kernel  # noqa: E402
from pigeon.runtime.family_gemm import build_gemm, run_cublas, run_gemm  # noqa: E402
from pigeon.runtime.launch import load_module  # noqa: E402

TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _err(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def case(graph: str, m: int, d: int, dtype: str, form: str, reps: int) -> dict:
    """``form``: "W" (y = x @ W), "W^T" (y = x @ W^T, a data gradient) or "dW" (dW = x^T dy)."""
    dev = torch.device("cuda")
    tdt = getattr(torch, dtype)
    wg = form == "dW"
    inst = GemmInstance("weight_grad" if wg else "rows", d, d, typed=False, transpose_w=form == "W^T", dtype=dtype)
    x = torch.randn(m, d, device=dev).to(tdt)
    w = torch.randn(d, d, device=dev).to(tdt)          # dW's output when wg
    dy = torch.randn(m, d, device=dev).to(tdt)
    ref = x.double().t() @ dy.double() if wg else x.double() @ (w.double().t() if form == "W^T" else w.double())
    el = x.element_size()
    row = {"graph": graph, "M": m, "k": d, "n": d, "dtype": dtype, "weight": form,
           "flop": 2 * m * d * d, "min_bytes": (m * d * 2 + d * d) * el}
    tmod = build_gemm(inst, "sm_90", dev)
    y = dy if wg else torch.empty(m, d, device=dev, dtype=tdt)
    out = w if wg else y
    seg = torch.tensor([0, m], dtype=torch.int32, device=dev)     # made once, as a program's graph arrays are
    runs = {"template": lambda: run_gemm(inst, tmod, x, w, seg, None, None, y),
            "cublas": lambda: run_cublas(inst, x, w, y)}
    if not wg:
        rk = tg.rendered_for(inst, "sm_90")
        tfn = load_module(build_kernel(rk.source, "sm_90", name=rk.name), dev).function(rk.name)
        runs["tvm"] = lambda: tg.run(rk, tfn, inst, x, w, y)
    for name, fn in runs.items():
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        err = _err(out, ref)
        row[f"{name}_err"] = err
        if not err < TOL[dtype]:       # NaN fails too
            row[f"{name}_ms"] = None
            row[f"{name}_status"] = f"wrong result: rel err {err:.2e}"
            continue
        ms = timing.median_ms(fn, dev, warmup=3, reps=reps)[0]
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = row["flop"] / ms / 1e9
        row[f"{name}_tbps"] = row["min_bytes"] / ms / 1e9
    a, b, c = row.get("template_ms"), row.get("tvm_ms"), row.get("cublas_ms")
    row["tvm_vs_template"] = a / b if a and b else None          # > 1: TVM faster
    row["cublas_vs_template"] = a / c if a and c else None       # > 1: cuBLAS faster
    row["tvm_vs_cublas"] = c / b if b and c else None
    return row


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    out = ["# Dense GEMM backends: pigeon template vs TVM dlight vs cuBLAS", "",
           f"gpu {meta['gpu']}, commit {meta['commit']}, {meta['date']}", "", f"`{meta['command']}`", "",
           "| graph | M | k=n | dtype | GEMM | template ms | TVM ms | cuBLAS ms | TVM speedup over template | "
           "cuBLAS speedup over template | template TB/s | TVM TB/s | cuBLAS TB/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['graph']} | {r['M']:,} | {r['k']} | {r['dtype']} | {r['weight']} | "
                   f"{_fmt(r.get('template_ms'))} | {_fmt(r.get('tvm_ms'))} | {_fmt(r.get('cublas_ms'))} | "
                   f"{_fmt(r.get('tvm_vs_template'), '.2f')} | {_fmt(r.get('cublas_vs_template'), '.2f')} | "
                   f"{_fmt(r.get('template_tbps'), '.2f')} | "
                   f"{_fmt(r.get('tvm_tbps'), '.2f')} | {_fmt(r.get('cublas_tbps'), '.2f')} |")
    bad = [f"{r['graph']} {r['dtype']} {r['weight']}: {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_status")]
    if bad:
        out += ["", "Excluded (wrong results):", *[f"- {b}" for b in bad]]
    out += ["", "TB/s on the minimum bytes (x and y once, W once) against the ~4.2 TB/s copy ceiling: at k = n <= 128 "
            "these GEMMs are memory-bound (FLOP/byte <= 32 in fp32)."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", default="aifb,am,ogbn-mag")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tvm_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = environment(torch.device("cuda"), "python benchmarks/bench_tvm_gemm.py " + " ".join(argv or sys.argv[1:]))
    rows = []
    for graph in args.graphs.split(","):
        m = PRESETS[graph]["num_nodes"]
        for d in (int(v) for v in args.dims.split(",")):
            for dtype in args.dtypes.split(","):
                for form in ("W", "W^T", "dW"):
                    try:
                        r = case(graph, m, d, dtype, form, args.reps)
                    except Exception as e:          # reported, not hidden
                        r = {"graph": graph, "M": m, "k": d, "n": d, "dtype": dtype, "weight": form,
                             "error_status": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    rows.append(r)
                    print(f"[tvm-gemm] {graph} M={m} d={d} {dtype} {r['weight']}: template "
                          f"{_fmt(r.get('template_ms'))} ms, tvm {_fmt(r.get('tvm_ms'))} ms, cublas "
                          f"{_fmt(r.get('cublas_ms'))} ms", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps({**meta, "cases": rows}, indent=1))
    (out / "cases.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
