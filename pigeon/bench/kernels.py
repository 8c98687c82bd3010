"""Per-kernel numbers of ``pigeon bench rgnn``: each aggregation / edge-softmax kernel's time from
torch.profiler against its minimum bytes (:func:`pigeon.bench.floors.kernel_min_bytes`), and the
plain sum-aggregation of x[src] against ``index_add_`` and cuSPARSE SpMM in the same run.

On a GPU the times are the durations of the CUDA kernel events named ``pigeon_trav_<key>`` (the
kernel of each traversal instance); CUDA-graph replay is off while profiling (same kernels,
launched one by one).  On a CPU the traversal family opens a profiler range of the same name
around each instance's torch semantics, so the same code reads CPU times: those are the host's
and say nothing about GPU bandwidth (``source`` says which)."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

import pigeon as pg
from pigeon.codegen.traversal import fix_kernel_name, render_traversal
from pigeon.ir.program import TraversalLaunch

from .floors import kernel_min_bytes
from .timing import failure, sync

__all__ = ["kernel_launches", "profile_kernels", "aggregate_peers", "sum_of_sources", "SOURCE", "PROFILED_LOOPS"]

PROFILED_LOOPS = ("aggregate", "edge_softmax")
SOURCE = {"cuda": "CUDA kernel events from torch.profiler, by kernel name (pigeon_trav_<key>)",
          "cpu": "CPU: torch.profiler ranges named after each kernel around its torch semantics on the host "
                 "(not GPU bandwidth)"}


@pg.layer
def sum_of_sources(g, x):
    """The aggregation of benchmarks/bench_aggregate.py: the sum of x[src] over each node's incoming edges."""
    return pg.aggregate(g, g.src(x), "sum")


def _counts(kg) -> dict:
    return {"node": kg.num_nodes, "edge": kg.num_edges, "compact": kg.num_compact, "etype": kg.num_etypes,
            "ntype": kg.num_ntypes, "compact_dst": kg.num_compact_dst}


def kernel_launches(layer, mode: str) -> list[dict]:
    """The aggregation and edge-softmax launches one step of ``layer`` runs (forward; training also
    backward), one record per distinct kernel with how many times a step launches it."""
    progs = [("forward", layer.forward_program)]
    if mode == "training" and layer.backward_program is not None:
        progs.append(("backward", layer.backward_program))
    counts = _counts(layer.kgraph)
    out: dict[str, dict] = {}
    for pname, prog in progs:
        for launch in prog.launches:
            if not isinstance(launch, TraversalLaunch) or launch.inst.loop not in PROFILED_LOOPS:
                continue
            inst = launch.inst
            name = render_traversal(inst).name      # kernel_name(inst), or a variant's (PIGEON_AGG_VEC)
            if name in out:
                out[name]["launches_per_step"] += 1
                continue
            part = inst.out.name.startswith("sm") and inst.out.name.endswith(("_m", "_z"))
            out[name] = {"kernel": name, "program": pname, "loop": inst.loop, "reduce": inst.reduce,
                         "side": inst.side, "schedule": inst.schedule, "width": inst.out.width,
                         "dtype": inst.out.dtype, "out": inst.out.name,
                         "role": "edge softmax on edge chunks: " + ("max" if inst.reduce == "max" else "sum of exp")
                         if part else inst.loop, "launches_per_step": 1, "min_bytes": kernel_min_bytes(inst, counts)}
    return list(out.values())


@contextmanager
def _plain_launches():
    """CUDA-graph replay off (read per call by the runtime): the profiler sees each launch."""
    old = os.environ.get("PIGEON_CUDA_GRAPHS")
    os.environ["PIGEON_CUDA_GRAPHS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PIGEON_CUDA_GRAPHS", None)
        else:
            os.environ["PIGEON_CUDA_GRAPHS"] = old


def event_times_us(step, device, reps: int) -> dict[str, list[float]]:
    """{event name: durations in us} of ``reps`` calls of ``step``: CUDA kernel events on a GPU,
    CPU ranges elsewhere."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _plain_launches():
        step()
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(reps):
                step()
            sync(device)
    out: dict[str, list[float]] = {}
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            out.setdefault(e.name, []).append(float(e.device_time_total))
        elif not cuda and e.device_type == DeviceType.CPU:
            out.setdefault(e.name, []).append(float(e.cpu_time_total))
    return out


def profile_kernels(layer, step, mode: str, device, reps: int = 5) -> tuple[list[dict], str, float | None]:
    """Per aggregation / edge-softmax kernel of one ``step`` of ``layer``: its time per launch
    (profiler), minimum bytes and achieved TB/s.  Returns (rows, the source of the times, the GPU
    milliseconds of one whole step: every CUDA kernel, memcpy and memset the step runs, None on a
    CPU), so a case's wall time can be told apart into GPU work and what the host adds."""
    rows = kernel_launches(layer, mode)
    cuda = device.type == "cuda"
    source = SOURCE["cuda" if cuda else "cpu"]
    if not rows and not cuda:
        return rows, source, None
    times = event_times_us(step, device, reps)
    gpu_ms = sum(sum(v) for v in times.values()) / reps / 1e3 if cuda else None
    for r in rows:
        ts = times.get(r["kernel"], [])
        r["events"] = len(ts)
        if not ts:
            r["ms"], r["tbps"] = None, None
            r["note"] = "no profiler event of this name"
            continue
        r["ms"] = sum(ts) / len(ts) / 1e3                       # per launch
        fix = times.get(fix_kernel_name(r["kernel"]), [])      # an edge-chunk aggregate's fix-up kernel
        if fix:
            r["ms"] += sum(fix) / len(ts) / 1e3
            r["note"] = "with its fix-up kernel (the rows chunks share and the rows without members)"
        r["tbps"] = r["min_bytes"] / (r["ms"] * 1e-3) / 1e12
    return rows, source, gpu_ms


def aggregate_peers(g, gd, dim: int, dtype: str, device, reps: int) -> dict:
    """The sum of x[src] over incoming edges at width ``dim``: pigeon's kernel (the schedule the cost
    model picks) against ``index_add_`` and cuSPARSE SpMM (``torch.sparse.mm`` on the CSR of the
    adjacency) on the same x, each checked against ``index_add_`` in float32 first.  Times: the
    summed kernel time per call from the profiler on a GPU (every kernel the call launches), the
    median wall time on a CPU."""
    tdt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(g.num_nodes, dim, generator=gen).to(device=device, dtype=tdt)
    src, dst = gd.src.long(), gd.dst.long()
    N = g.num_nodes
    want = torch.zeros(N, dim, device=device).index_add_(0, dst, x.float()[src])
    scale = torch.zeros(N, dim, device=device).index_add_(0, dst, x.float()[src].abs())
    tol = 1e-5 if dtype == "float32" else 2e-2
    row = {"graph": None, "dim": dim, "dtype": dtype, "edges": g.num_edges, "impls": {}}
    impls = {}
    try:
        layer = pg.compile(sum_of_sources, g, dim, backend="kernels", dtype=dtype).to(device)
        launches = kernel_launches(layer, "inference")
        row["pigeon_schedule"] = launches[0]["schedule"] if launches else None
        row["min_bytes"] = launches[0]["min_bytes"] if launches else None

        def pig():
            with torch.no_grad():
                return layer(x)
        impls["pigeon"] = pig
    except Exception as e:
        row["impls"]["pigeon"] = {"status": failure(e)}
    impls["index_add_"] = lambda: torch.zeros(N, dim, device=device, dtype=tdt).index_add_(0, dst, x[src])
    try:
        idx = torch.stack([dst, src])
        with warnings.catch_warnings():          # "sparse CSR is beta"
            warnings.simplefilter("ignore")
            adj = torch.sparse_coo_tensor(idx, torch.ones(g.num_edges, device=device, dtype=tdt), (N, N),
                                          check_invariants=False).coalesce().to_sparse_csr()
        impls["cuSPARSE SpMM" if device.type == "cuda" else "torch.sparse.mm (CSR)"] = lambda: torch.sparse.mm(adj, x)
    except Exception as e:
        row["impls"]["torch.sparse.mm (CSR)"] = {"status": failure(e)}
    for name, fn in impls.items():
        rec = {"status": "ok"}
        row["impls"][name] = rec
        try:
            got = fn().float()
            bad = (got - want).abs() > tol * scale + tol
            if bool(bad.any()):
                rec["status"] = f"FAILED check vs index_add_: {int(bad.sum())} elements off"
                continue
            rec["ms"] = _time_ms(fn, device, reps)
            if row.get("min_bytes"):
                rec["tbps"] = row["min_bytes"] / (rec["ms"] * 1e-3) / 1e12
        except Exception as e:
            rec["status"] = failure(e)
    p = row["impls"].get("pigeon", {})
    peers = [r["ms"] for k, r in row["impls"].items() if k != "pigeon" and r.get("ms")]
    row["pigeon_slower_than_peer"] = bool(p.get("ms") and peers and p["ms"] > min(peers))
    row["timer"] = ("summed CUDA kernel time per call (torch.profiler)" if device.type == "cuda"
                    else "median wall time per call (CPU)")
    return row


def _time_ms(fn, device, reps: int) -> float:
    if device.type == "cuda":
        times = event_times_us(fn, device, reps)          # CUDA events only
        total = sum(sum(v) for v in times.values())
        return total / reps / 1e3
    import statistics
    import time
    fn()
    ts = []
    for _ in range(max(reps, 3)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)
