"""CUDA traversal kernels (pigeon/codegen/traversal.py) on a GPU against the plain-torch semantics.

Run on a GPU machine: ``python -m pytest tests/gpu/test_traversal_gpu.py -m gpu``. Every case of
tests/test_traversal_codegen.py (the shared hand-built cases, the extra ones and every lowered
model instance), float32 and bfloat16 storage, on the corner-case graphs and fresh random ones;
outputs NaN-poisoned first. Plus a large graph (grid-stride loops past the grid cap, many atomics)
and a bandwidth report.
"""
from __future__ import annotations

import pathlib
import random
import sys
import time

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

from pigeon.graph.kernel_graph import kernel_graph  # noqa: E402
from pigeon.codegen.traversal import render_traversal  # noqa: E402
from pigeon.runtime.family_traversal import run_traversal_launch  # noqa: E402
from pigeon.runtime.family_traversal import run_traversal_reference  # noqa: E402
from pigeon.graph import HeteroGraph  # noqa: E402
from pigeon.runtime.program import CudaBackend  # noqa: E402

from graphs import random_graph  # noqa: E402
from traversal_cases import case_graphs, poisoned_output, random_inputs  # noqa: E402
import test_traversal_codegen as T  # noqa: E402

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKEND = CudaBackend()


def _all_instances():
    insts = [i for _, i in T.CASES] + [i for _, i in T._lowered_instances()]
    return insts + [T.with_dtype(i, "bfloat16") for i in insts]


@pytest.fixture(scope="module", autouse=True)
def prebuilt():
    """Build every kernel up front, nvcc processes in parallel (the disk cache keeps them)."""
    from concurrent.futures import ThreadPoolExecutor

    from pigeon.runtime.build import build_kernel, device_arch
    from pigeon.runtime.launch import load_module
    arch = device_arch()
    rks = {render_traversal(i).name: render_traversal(i) for i in _all_instances()}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        entries = dict(zip(rks, pool.map(lambda rk: build_kernel(rk.source, arch, name=rk.name), rks.values())))
    for name, entry in entries.items():
        BACKEND._modules[name] = load_module(entry)
    print(f"\nbuilt {len(rks)} traversal kernels for {arch} in {time.perf_counter() - t0:.1f} s")


def _graphs(seed):
    return case_graphs("cuda") + [("fresh", kernel_graph(random_graph(seed)).to("cuda"))]


def _check(name, inst, kg, seed, dtype, gname):
    tdt = TORCH[dtype]
    bufs = random_inputs(inst, kg, seed=seed, dtype=tdt)
    out = poisoned_output(inst, kg, dtype=tdt)
    run_traversal_launch(inst, kg, bufs, out, BACKEND)
    torch.cuda.synchronize()
    ref = run_traversal_reference(inst, kg, bufs).reshape(out.shape)
    where = f"{name} on {gname} ({dtype}), seed {seed}"
    assert not torch.isnan(out).any(), f"{where}: output left unwritten (NaN poison survived)"
    if dtype == "float32":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
    else:
        torch.testing.assert_close(out.float(), ref.to(tdt).float(), rtol=2.0 ** -7, atol=1e-5,
                                   msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", T.CASE_IDS)
def test_case_on_gpu(name, dtype):
    seed = random.randrange(1 << 30)
    inst = T.INSTS[name] if dtype == "float32" else T.with_dtype(T.INSTS[name], dtype)
    for gi, (gname, kg) in enumerate(_graphs(seed)):
        _check(name, inst, kg, seed + gi, dtype, gname)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lowered_model_instances_on_gpu(dtype):
    seed = random.randrange(1 << 30)
    for name, inst in T._lowered_instances():
        inst = inst if dtype == "float32" else T.with_dtype(inst, dtype)
        for gi, (gname, kg) in enumerate(_graphs(seed)):
            _check(name, inst, kg, seed + gi, dtype, gname)


def _big_graph(seed, N=200_000, E=2_000_000, R=8, T_=3):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, N, (E,), generator=gen)
    dst = torch.randint(0, N, (E,), generator=gen)
    dst[: E // 10] = torch.randint(0, 50, (E // 10,), generator=gen)        # hubs with ~4000 edges
    et = torch.randint(0, R, (E,), generator=gen)
    nt = torch.randint(0, T_, (N,), generator=gen)
    return kernel_graph(HeteroGraph(src, dst, et, num_nodes=N, ntype=nt, num_etypes=R, num_ntypes=T_)).to("cuda")


BIG = ["aggregate_sum_dst", "aggregate_mean_src", "aggregate_max_dst", "edge_softmax_gat", "edge_softmax_dot",
       "edge_map_message", "type_reduce_etype_edge", "type_reduce_none_edge", "type_reduce_ntype_node",
       "wide_aggregate_sum_dst", "wide_edge_softmax"]


@pytest.mark.parametrize("name", BIG)
def test_big_graph(name):
    seed = random.randrange(1 << 30)
    kg = _big_graph(seed)
    inst = T.INSTS[name]
    bufs = random_inputs(inst, kg, seed=seed)
    out = poisoned_output(inst, kg)
    run_traversal_launch(inst, kg, bufs, out, BACKEND)
    ref = run_traversal_reference(inst, kg, bufs).reshape(out.shape)
    assert not torch.isnan(out).any()
    # sums over hub nodes (~4000 edges) and type reductions (~10^6 rows) add in another order than
    # torch's index_add: the tolerance grows with the number of terms
    deg = int(max(torch.bincount(kg.dst.long()).max(), torch.bincount(kg.src.long()).max()))
    tol = {"aggregate": 1e-5 + 2e-6 * deg, "type_reduce": 2e-5 * kg.num_edges ** 0.5}.get(inst.loop, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=tol, msg=lambda m: f"{name} seed {seed}: {m}")


def test_bandwidth_report():
    """Not a pass/fail bound: prints time and effective bandwidth of the main kernel shapes."""
    kg = _big_graph(0)
    lines = []
    for name in ("aggregate_sum_dst", "edge_softmax_gat", "edge_map_message", "type_reduce_etype_edge",
                 "wide_aggregate_sum_dst"):
        for dtype in ("float32", "bfloat16"):
            inst = T.INSTS[name] if dtype == "float32" else T.with_dtype(T.INSTS[name], dtype)
            bufs = random_inputs(inst, kg, seed=0, dtype=TORCH[dtype])
            out = poisoned_output(inst, kg, dtype=TORCH[dtype])
            run_traversal_launch(inst, kg, bufs, out, BACKEND)
            torch.cuda.synchronize()
            reps = 20
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run_traversal_launch(inst, kg, bufs, out, BACKEND)
            stop.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(stop) / 1e3 / reps
            nbytes = sum(t.numel() * t.element_size() for t in bufs.values()) + out.numel() * out.element_size()
            nbytes += kg.num_edges * 4 * 3
            rk = render_traversal(inst)
            lines.append(f"{name:26s} {dtype:9s} {dt * 1e6:9.1f} us  {nbytes / dt / 1e9:7.1f} GB/s (unique bytes)"
                         f"  grid {rk.grid(kg)[0]}x{rk.block[0]}")
    print("\n" + "\n".join(lines))
