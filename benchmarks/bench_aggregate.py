"""Sum-aggregation of x[src] over incoming edges, the kernel the RGNN models spend most time in:
pigeon's two traversal schedules (node-parallel lane groups, edge chunks with segmented sums)
against torch's index_add_ and cuSPARSE SpMM (torch.sparse.mm on the CSR of the adjacency), and
against the bound of the gathered bytes at the measured device-copy rate.  Then the whole RGCN and
RGAT layers (forward, forward+backward) under each schedule.

    python benchmarks/bench_aggregate.py --graphs fb15k-237,synthetic:am,synthetic:ogbn-mag --dims 64,128 --out DIR

Every pigeon result is checked against index_add_ before it is timed.  Writes DIR/aggregate.json
and DIR/aggregate.md (GPU, commit, date and the command in both)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rgnn import timeit  # noqa: E402

COPY_TBS = 4.2      # measured device copy rate of the H200 (TB/s)


def aggregate_instance(d: int, schedule: str, dtype=torch.float32):
    from pigeon.ir.traversal import Buffer, RowRef, TraversalInstance, load
    storage = str(dtype).removeprefix("torch.")
    x = Buffer("x", "node", (d,), storage)
    return TraversalInstance("aggregate", load(x, RowRef.SRC), Buffer("out", "node", (d,), storage), side="dst",
                             reduce="sum", schedule=schedule)


def variant_env(variant: str) -> tuple[str, dict]:
    """(schedule, the environment that renders it) of a --pigeon variant SCHEDULE[:v8][:uN]."""
    sched, *knobs = variant.split(":")
    return sched, {"PIGEON_AGG_VEC": "1" if "v8" in knobs else "0",
                   "PIGEON_AGG_UNROLL": next((k[1:] for k in knobs if k.startswith("u")), "")}


def build_only(dims, dtypes, variants, arch: str, jobs: int) -> int:
    """Build every variant's kernel into the disk cache (no GPU needed: carry the cache to the GPU)."""
    from concurrent.futures import ThreadPoolExecutor
    from pigeon.codegen.traversal import render_traversal
    from pigeon.runtime.build import build_kernel
    todo = {}
    for v in variants:
        sched, env = variant_env(v)
        os.environ.update(env)
        for d in dims:
            for dt in dtypes:
                rk = render_traversal(aggregate_instance(d, sched, getattr(torch, dt)))
                todo[rk.name] = rk
    for k in ("PIGEON_AGG_VEC", "PIGEON_AGG_UNROLL"):
        os.environ.pop(k, None)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda rk: build_kernel(rk.source, arch, name=rk.name), todo.values()))
    print(f"built or found {len(todo)} kernels for {arch}")
    return 0


def bench_graph(name: str, dims: list[int], dtypes: list[str], rows: list, log, variants) -> None:
    from pigeon.graph import load
    from pigeon.graph.kernel_graph import kernel_graph
    from pigeon.runtime.program import CudaBackend
    t0 = time.perf_counter()
    g = load(name)
    if name == "fb15k-237":
        g = g.with_reverse_edges()
    kg = kernel_graph(g).to("cuda")
    st = kg.degree_stats
    log(f"{name}: {kg.num_nodes} nodes, {kg.num_edges} edges, max in-degree {st['max_in_degree']}, "
        f"mean degree {st['mean_degree']:.1f} (loaded in {time.perf_counter() - t0:.1f} s)")
    N, E = kg.num_nodes, kg.num_edges
    src, dst = kg.src.long(), kg.dst.long()
    crow = kg.csc_ptr.long()
    col = src[kg.csc_eid.long()]
    backend = CudaBackend()
    for d in dims:
        for dtype in dtypes:
            bench_one(name, d, getattr(torch, dtype), N, E, src, dst, crow, col, kg, backend, rows, log, variants)


def bench_one(name, d, dtype, N, E, src, dst, crow, col, kg, backend, rows, log, variants) -> None:
    from pigeon.runtime.family_traversal import run_traversal_launch
    x = torch.randn(N, d, device="cuda").to(dtype)
    xf = x.float()
    want = torch.zeros(N, d, device="cuda").index_add_(0, dst, xf[src])
    # float sums in another order differ by ~eps * sum|terms|: a hub of 1e5 edges needs that scale;
    # a 16-bit output adds one rounding of the float32 sum (2^-8 of it for bf16)
    scale = torch.zeros(N, d, device="cuda").index_add_(0, dst, xf[src].abs())
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    adj = torch.sparse_csr_tensor(crow, col, torch.ones(E, device="cuda", dtype=dtype), size=(N, N),
                                  check_invariants=False)

    def off(got) -> int:
        return int(((got.float() - want).abs() > rel * scale + rel).sum())

    def check(got, what):
        bad = off(got)
        if bad:
            raise AssertionError(f"{name} d={d} {dtype} {what}: {bad} elements off by more than {rel:g} of "
                                 f"the sum of |terms|")
    isz = x.element_size()
    nbytes = E * d * isz + N * d * isz + E * 8
    bound_ms = nbytes / (COPY_TBS * 1e12) * 1e3
    impls, notes = {}, {}
    # variants: SCHEDULE[:v8][:uN] (v8: PIGEON_AGG_VEC=1, 8 elements per thread; uN: PIGEON_AGG_UNROLL=N
    # members per step); both are read when the kernel is rendered (cached per setting)
    for variant in variants:
        sched, env = variant_env(variant)
        if env["PIGEON_AGG_VEC"] == "1" and d % 8:
            continue
        label = "pigeon " + variant.replace(":", " ")
        inst = aggregate_instance(d, sched, dtype)
        out = torch.full((N, d), float("nan"), device="cuda", dtype=dtype)

        def run(inst=inst, out=out, env=env):
            os.environ.update(env)
            return run_traversal_launch(inst, kg, {"x": x}, out, backend)
        run()
        check(out, label)
        impls[label] = run
    for k in ("PIGEON_AGG_VEC", "PIGEON_AGG_UNROLL"):
        os.environ.pop(k, None)
    impls["torch index_add_"] = lambda: torch.zeros(N, d, device="cuda", dtype=dtype).index_add_(0, dst, x[src])
    impls["cuSPARSE SpMM"] = lambda: torch.sparse.mm(adj, x)
    for peer in ("torch index_add_", "cuSPARSE SpMM"):
        bad = off(impls[peer]())
        if bad:      # a 16-bit index_add_ accumulates in 16 bits: timed, its error recorded
            notes[peer] = f"{bad} elements off"
    for impl, fn in impls.items():
        ms = timeit(fn)
        row = dict(graph=name, dim=d, dtype=str(dtype).removeprefix("torch."), impl=impl, ms=round(ms, 4),
                   bound_ms=round(bound_ms, 4), tbs=round(nbytes / (ms * 1e-3) / 1e12, 3),
                   note=notes.get(impl, ""))
        rows.append(row)
        log(f"  d={d:<4} {row['dtype']:<9} {impl:<20} {ms:8.3f} ms  ({row['tbs']:.2f} TB/s of gathered bytes; "
            f"bound {bound_ms:.3f} ms){' ' + row['note'] if row['note'] else ''}")
    os.environ.pop("PIGEON_AGG_VEC", None)


def bench_models(name: str, rows: list, log) -> None:
    import pigeon as pg
    from pigeon.graph import load
    from pigeon.models import MODELS
    from pigeon.passes.schedule import ENV
    g = load(name)
    if name == "fb15k-237":
        g = g.with_reverse_edges()
    x = torch.randn(g.num_nodes, 64, device="cuda")
    for model, hp in (("rgcn", {"out_dim": 64}), ("rgat", {"out_dim": 16, "heads": 4})):
        for sched in ("node", "auto"):
            os.environ[ENV] = sched
            t0 = time.perf_counter()
            layer = pg.compile(MODELS[model], g, 64, **hp).to("cuda")
            layer(x)
            torch.cuda.synchronize()
            build_s = time.perf_counter() - t0
            chosen = sorted({l.inst.schedule for p in (layer.forward_program, layer.backward_program)
                             for l in p.launches if getattr(l, "inst", None) is not None
                             and getattr(l.inst, "loop", "") == "aggregate"})

            def fwd():
                with torch.no_grad():
                    return layer(x)

            def fwd_bwd():
                xx = x.detach().requires_grad_(True)
                layer(xx).sum().backward()
            f, fb = timeit(fwd, reps=10), timeit(fwd_bwd, reps=10)
            rows.append(dict(graph=name, model=model, schedule=sched, chosen=chosen, fwd_ms=round(f, 3),
                             fwd_bwd_ms=round(fb, 3), build_s=round(build_s, 1)))
            log(f"  {model} schedule={sched} (aggregations: {chosen}): fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms "
                f"(build + first call {build_s:.1f} s)")
    os.environ.pop(ENV, None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="fb15k-237,synthetic:am")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    ap.add_argument("--pigeon", default="node,edge_chunks,edge_chunks:v8",
                    help="pigeon's variants, comma-separated SCHEDULE[:v8][:uN] (v8: 8 elements per thread; "
                         "uN: N members per step)")
    ap.add_argument("--models-on", default="synthetic:am", help="graphs to time whole layers on ('' for none)")
    ap.add_argument("--out", default="/tmp/pigeon_out")
    ap.add_argument("--build-only", metavar="ARCH", help="only build the variants' kernels for ARCH (e.g. sm_90) "
                    "into the disk cache, no GPU needed")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if args.build_only:
        return build_only([int(d) for d in args.dims.split(",")], args.dtypes.split(","), args.pigeon.split(","),
                          args.build_only, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)
    dims = [int(d) for d in args.dims.split(",")]
    kernel_rows, model_rows = [], []
    for name in [n for n in args.graphs.split(",") if n]:
        bench_graph(name, dims, args.dtypes.split(","), kernel_rows, log, args.pigeon.split(","))
    for name in [n for n in args.models_on.split(",") if n]:
        log(f"{name}: whole layers")
        bench_models(name, model_rows, log)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=os.environ.get("PIGEON_COMMIT", "?"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python benchmarks/bench_aggregate.py " + " ".join(sys.argv[1:]))
    (out / "aggregate.json").write_text(json.dumps(dict(meta=meta, kernels=kernel_rows, models=model_rows), indent=1))
    md = ["# sum-aggregation of x[src]: pigeon's schedules vs index_add_ and cuSPARSE\n"]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += ["", "| graph | d | dtype | impl | ms | TB/s (gathered bytes) | bound ms | note |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['graph']} | {r['dim']} | {r['dtype']} | {r['impl']} | {r['ms']} | {r['tbs']} | {r['bound_ms']} | "
           f"{r['note']} |" for r in kernel_rows]
    if model_rows:
        md += ["", "| graph | model | schedule | aggregations | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|"]
        md += [f"| {r['graph']} | {r['model']} | {r['schedule']} | {', '.join(r['chosen'])} | {r['fwd_ms']} | "
               f"{r['fwd_bwd_ms']} |" for r in model_rows]
    (out / "aggregate.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
