"""Typed GEMMs by cuBLAS one type segment at a time (pigeon/runtime/family_gemm.py
run_cublas_segments, PIGEON_TYPED_GEMM=cublas): against the instance semantics (gemm_reference),
NaN-poisoned outputs, both forms, the weight as is and transposed, with and without a gather,
empty segments included; and the switch in the backend pass and --explain. On a CPU tensor
torch.mm is the same call cuBLAS gets on the GPU."""
import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.ir.kernel import GemmInstance
from pigeon.ir.program import GemmLaunch
from pigeon.models import MODELS
from pigeon.passes.gemm_backend import GemmBackendError, choose_gemm_backends
from pigeon.runtime.family_gemm import GemmLaunchError, gemm_reference, host_bounds, run_cublas_segments


@pytest.mark.parametrize("form,t", [("rows", False), ("rows", True), ("weight_grad", False), ("weight_grad", True)])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segments_equal_the_instance_semantics(form, t, gather, dtype):
    tdt = getattr(torch, dtype)
    k, n, m, src_rows = 24, 40, 90, 55
    seg = torch.tensor([0, 17, 17, 60, 90], dtype=torch.int32)      # type 1 is empty
    T = seg.numel() - 1
    inst = GemmInstance(form, k, n, typed=True, gather=gather, transpose_w=t, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, src_rows, (m,), generator=g, dtype=torch.int32) if gather else None
    x = torch.randn(src_rows if gather else m, k, generator=g).to(tdt)
    wshape = (T, 1, n, k) if t else (T, 1, k, n)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    if form == "rows":
        w = torch.randn(*wshape, generator=g).to(tdt)
        got = torch.full((m, n), float("nan"), dtype=tdt)
        want = torch.full((m, n), float("nan"), dtype=tdt)
        run_cublas_segments(inst, x, w, host_bounds(seg), idx, got)
        gemm_reference(inst, x, w, seg, idx, None, want)
    else:
        dy = torch.randn(m, n, generator=g).to(tdt)
        got, want = torch.full(wshape, float("nan"), dtype=tdt), torch.full(wshape, float("nan"), dtype=tdt)
        run_cublas_segments(inst, x, got, host_bounds(seg), idx, dy)
        gemm_reference(inst, x, want, seg, idx, None, dy)
        assert (got[1] == 0).all()                                    # the empty type's gradient
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_only_typed_single_head_instances():
    x, w, y = torch.zeros(4, 8), torch.zeros(2, 2, 8, 8), torch.zeros(4, 16)
    for inst, why in ((GemmInstance("rows", 8, 8, typed=False), "untyped"),
                      (GemmInstance("rows", 8, 8, heads=2), "2 heads"),
                      (GemmInstance("rows", 8, 8, scatter=True), "scatters"),
                      (GemmInstance("rows", 8, 8, accumulate=True), "accumulates")):
        with pytest.raises(GemmLaunchError, match=why):
            run_cublas_segments(inst, x, w, [0, 2, 4], None, y)


def test_host_bounds_are_read_once_per_array():
    seg = torch.tensor([0, 3, 9], dtype=torch.int32)
    a = host_bounds(seg)
    seg[1] = 4                                    # graph arrays never change: the cached list stands
    assert host_bounds(seg) is a and a == [0, 3, 9]


def test_switch_marks_typed_launches_and_explain_says_so(monkeypatch):
    g = load("tiny")
    layer = pg.compile(MODELS["rgcn"], g, 8, out_dim=8)
    fwd, bwd = layer.lowered
    assert not any(isinstance(l, GemmLaunch) and l.backend == "cublas" and l.inst.typed
                   for p in (layer.forward_program, layer.backward_program) for l in p.launches)
    monkeypatch.setenv("PIGEON_TYPED_GEMM", "cublas")
    progs = [choose_gemm_backends(p) for p in (fwd, bwd)]
    typed = [l for p in progs for l in p.launches if isinstance(l, GemmLaunch) and l.inst.typed]
    assert typed and all(l.backend == "cublas" for l in typed if l.inst.not_segmented() is None)
    layer2 = pg.compile(MODELS["rgcn"], g, 8, out_dim=8)
    from pigeon.passes.explain import explain
    from pigeon.passes.pipeline import graph_stats_for, run_pipeline
    c, records = run_pipeline(MODELS["rgcn"].trace(8, out_dim=8), graph_stats=graph_stats_for(g))
    stats = {**graph_stats_for(g), "num_nodes": g.num_nodes, **layer2.kgraph.degree_stats,
             **layer2.kgraph.compact_stats}
    lines = explain(c.ir, records, {"forward": layer2.forward_program, "backward": layer2.backward_program}, stats)
    assert any("one call per type segment (PIGEON_TYPED_GEMM=cublas)" in ln for ln in lines)
    x = torch.randn(g.num_nodes, 8)
    torch.testing.assert_close(layer2(x), layer(x))   # the CPU executor runs the semantics either way
    monkeypatch.setenv("PIGEON_TYPED_GEMM", "fast")
    with pytest.raises(GemmBackendError, match="PIGEON_TYPED_GEMM='fast'"):
        choose_gemm_backends(fwd)


def test_program_launches_through_the_cuda_dispatch_equal_their_semantics(monkeypatch):
    """Each typed launch of RGCN's programs on a random graph, marked cublas, run through the GEMM
    family's cuda entry (graph operands, host bounds, the per-segment calls) on CPU tensors, against
    the family's semantics on the same buffers."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from graphs import random_graph
    from pigeon.runtime import family_gemm
    from pigeon.runtime.program import TORCH_DTYPES, buffer_rows
    monkeypatch.setenv("PIGEON_TYPED_GEMM", "cublas")
    g = random_graph(3, num_nodes=60, num_edges=400, num_etypes=5)
    layer = pg.compile(MODELS["rgcn"], g, 8, out_dim=8)
    kg = layer.kgraph
    gen = torch.Generator().manual_seed(1)
    seen = 0
    for prog in (layer.forward_program, layer.backward_program):
        for launch in prog.launches:
            if not (isinstance(launch, GemmLaunch) and launch.inst.typed and launch.backend == "cublas"):
                continue
            bufs = {}
            for name in (launch.x, launch.w, launch.y):
                b = prog.buffer(name)
                bufs[name] = torch.randn(buffer_rows(b, kg) + b.shape, generator=gen).to(TORCH_DTYPES[b.dtype])
            out = launch.w if launch.inst.form == "weight_grad" else launch.y
            want = dict(bufs)
            want[out] = torch.full_like(bufs[out], float("nan"))
            family_gemm._semantics(launch, kg, want)
            bufs[out].fill_(float("nan"))
            family_gemm._cuda(launch, kg, bufs, None)
            assert not torch.isnan(bufs[out]).all()
            torch.testing.assert_close(bufs[out], want[out], rtol=1e-5, atol=1e-5, equal_nan=True)
            seen += 1
    assert seen >= 2
