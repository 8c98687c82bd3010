"""The TVM candidate of dense GEMMs (pigeon/codegen/tvm_gemm.py, pigeon/runtime/tvm_gemm_kernel.py,
pigeon/passes/gemm_backend.py): dlight's schedule read into launch extents, the generated CUDA text
run by emulation against torch with NaN-poisoned outputs, its cache record, nvcc for sm_90, and the
decision point --tune measures."""
import random
import shutil

import pytest
import torch

import pigeon as pg
from pigeon.codegen.tvm_gemm import TvmGemm, eval_extent
from pigeon.graph import tiny_graph
from pigeon.ir.kernel import GemmInstance
from pigeon.ir.serialize import from_json, to_json
from pigeon.models import rgcn
from pigeon.module import tune_stats
from pigeon.passes.choices import candidates, pipeline_points, schedule_points
from pigeon.passes.gemm_backend import GemmBackendError, choose_gemm_backends, gemm_point, gemm_points
from pigeon.passes.lower import lower
from pigeon.passes.pipeline import run_pipeline
from pigeon.runtime import tvm_gemm_kernel as tg
from pigeon.runtime.cache import KernelCache

pytest.importorskip("tvm")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(tmp_path / "cache"))
    tg._RENDERED.clear()


def _inst(k, n, t=False, dtype="float32", **kw):
    return GemmInstance("rows", k, n, typed=False, transpose_w=t, dtype=dtype, **kw)


def test_not_dense_names_what_the_tvm_kernel_does_not_cover():
    assert _inst(8, 8).not_dense() is None
    assert GemmInstance("rows", 8, 8).not_dense() == "typed (one weight per type)"
    why = _inst(8, 8, gather=True, heads=2).not_dense()
    assert "gathers its rows" in why and "2 heads" in why
    with pytest.raises(tg.TvmGemmError, match="accumulates into its output"):
        tg.kernel_of(_inst(8, 8, accumulate=True))


def test_launch_extents_are_dlights_thread_bindings_in_m():
    rec = tg.record(TvmGemm(24, 40))
    block = tuple(rec["block"])
    assert all(isinstance(b, int) for b in block) and block[0] * block[1] * block[2] <= 1024
    rows = [m for m in (1, 31, 32, 33, 1000)]
    grids = [[eval_extent(t, {"M": m}) for t in rec["grid"]] for m in rows]
    # the grid covers M with whole tiles: monotone in M, one block for one row
    assert grids[0] == [1, 1, 1]
    assert all(a <= b for g1, g2 in zip(grids, grids[1:]) for a, b in zip(g1, g2))
    assert grids[-1] != grids[0]


@pytest.mark.parametrize("t", [False, True])
def test_generated_kernel_equals_torch_by_emulation(t):
    """The CUDA text TVM wrote, compiled for the CPU by the emulation shim: every row written (the
    output starts as NaN) and equal to x @ w (w^T) for row counts off the tiles."""
    from pigeon.runtime.emulate import EmulatedModule
    k, n = 24, 40
    inst = _inst(k, n, t)
    rk = tg.rendered_for(inst)
    fn = EmulatedModule(rk).function(rk.name)
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    for m in (1, 37, 70):
        x = torch.randn(m, k, generator=g)
        w = torch.randn(*((n, k) if t else (k, n)), generator=g)
        y = torch.full((m, n), float("nan"))
        tg.run(rk, fn, inst, x, w, y)
        assert not torch.isnan(y).any(), f"seed {seed} M {m}: a row was not written"
        torch.testing.assert_close(y, x @ (w.t() if t else w), rtol=1e-5, atol=1e-5, msg=f"seed {seed} M {m}")


def test_operands_are_checked_before_the_launch():
    inst = _inst(8, 16)
    rk = tg.rendered_for(inst)

    class NoLaunch:
        def launch(self, *a):
            raise AssertionError("launched")
    for x, w, y, msg in ((torch.zeros(4, 9), torch.zeros(8, 16), torch.zeros(4, 16), r"x must be a \[M, 8\]"),
                         (torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, 16), r"w must be \[8, 16\]"),
                         (torch.zeros(4, 8), torch.zeros(8, 16), torch.zeros(5, 16), "y has 5 rows"),
                         (torch.zeros(4, 8), torch.zeros(8, 16, dtype=torch.bfloat16), torch.zeros(4, 16), "w must be")):
        with pytest.raises(tg.TvmGemmError, match=msg):
            tg.run(rk, NoLaunch(), inst, x, w, y)


def test_the_record_serves_a_machine_without_tvm_and_its_absence_names_the_prebuild(monkeypatch, tmp_path):
    g = TvmGemm(16, 16, True, "bfloat16")
    cache = KernelCache(tmp_path / "c1")
    rec = tg.record(g, "sm_90", cache)
    monkeypatch.setattr(tg, "tvm_available", lambda: False)
    assert tg.record(g, "sm_90", cache)["source"] == rec["source"]
    with pytest.raises(tg.TvmGemmMissing, match="prebuild_kernels.py --tvm-gemm only"):
        tg.record(g, "sm_90", KernelCache(tmp_path / "c2"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_bf16_kernel_compiles_for_sm90():
    from pigeon.runtime.build import compile_cuda
    rk = tg.rendered_for(_inst(64, 64, True, "bfloat16"))
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
    assert res.cubin[:4] == b"\x7fELF"


def _programs(choices=None):
    g = tiny_graph()
    layer = pg.compile(rgcn, g, 16, out_dim=8)
    return g, layer


def test_gemm_points_choose_and_describe():
    g, layer = _programs()
    progs = layer.lowered
    pts = gemm_points(progs)
    names = [n for n, _, _ in pts]
    # x @ W_self, dy @ W_self^T, dW_self = x^T dy; TVM's kernel takes the rows forms only
    assert names == ["gemm:node/k16n8/N", "gemm:node/k8n16/T", "gemm:node/k16n8/dW"]
    assert [o for _, o, _ in pts] == [("cublas", "template", "tvm")] * 2 + [("cublas", "template")]
    assert "[cublas]" in layer.forward_program.describe()           # the rule's pick
    assert "[tvm]" not in progs[0].describe() and "[cublas]" not in progs[0].describe()   # lowered: template
    fwd = choose_gemm_backends(progs[0], {n: "tvm" for n in names[:2]})
    assert "[tvm]" in fwd.describe()
    assert sum(getattr(lch, "backend", None) == "tvm" for lch in fwd.launches) == 1
    assert from_json(to_json(fwd)) == fwd                           # artifacts keep the choice
    assert "[cublas]" not in choose_gemm_backends(progs[0], {names[0]: "template"}).describe()
    with pytest.raises(GemmBackendError, match="expected one of cublas, template$"):
        choose_gemm_backends(progs[1], {names[2]: "tvm"})


def test_the_points_are_tune_candidates_on_a_gpu_only():
    g = tiny_graph()
    ir = rgcn.trace(16, out_dim=8)
    gs, ks = tune_stats(g)
    pipe = pipeline_points(ir, gs)

    def sched_of(dense):
        def f(choices):
            comp, _ = run_pipeline(ir, graph_stats=gs, choices=choices)
            return schedule_points([lower(comp.forward), lower(comp.backward)], ks, dense_gemms=dense)
        return f
    assert not [p for p in sched_of(False)({}) if p.name.startswith("gemm:")]
    pts = [p for p in sched_of(True)({}) if p.name.startswith("gemm:")]
    assert [(p.options, p.pick) for p in pts] == [(("cublas", "template", "tvm"), "cublas")] * 2 + \
        [(("cublas", "template"), "cublas")]
    cands = candidates(pipe, sched_of(True), max_full=4)
    assert cands[0].as_dict()["gemm:node/k16n8/N"] == "cublas"
    assert {c.as_dict()["gemm:node/k16n8/N"] for c in cands} == {"cublas", "template", "tvm"}


def test_a_layer_compiled_with_tvm_gemms_matches_the_template_on_cpu():
    """On a CPU both backends run the instance's semantics: the choice changes the program only."""
    g = tiny_graph()
    ir = rgcn.trace(16, out_dim=8)
    gs, _ = tune_stats(g)
    choice = {"gemm:node/k16n8/N": "tvm", "gemm:node/k8n16/T": "tvm"}
    a = pg.CompiledLayer(rgcn, run_pipeline(ir, graph_stats=gs)[0], g)
    b = pg.CompiledLayer(rgcn, run_pipeline(ir, graph_stats=gs, choices=choice)[0], g)
    assert "[tvm]" in b.forward_program.describe() and "[tvm]" in b.backward_program.describe()
    b.weights.load_state_dict(a.weights.state_dict())
    x = torch.randn(g.num_nodes, 16)
    torch.testing.assert_close(a(x), b(x))


def test_the_variable_forces_a_backend_where_it_can_run(monkeypatch):
    g = tiny_graph()
    monkeypatch.setenv("PIGEON_DENSE_GEMM", "tvm")
    layer = pg.compile(rgcn, g, 16, out_dim=8)
    pts = {n: o for n, o, _ in gemm_points(layer.lowered)}
    assert pts == {"gemm:node/k16n8/N": ("tvm",), "gemm:node/k8n16/T": ("tvm",),
                   "gemm:node/k16n8/dW": ("cublas", "template")}          # no TVM weight gradient
    assert "[tvm]" in layer.forward_program.describe() and "[cublas]" in layer.backward_program.describe()
    monkeypatch.setenv("PIGEON_DENSE_GEMM", "template")
    layer = pg.compile(rgcn, g, 16, out_dim=8)
    text = layer.forward_program.describe() + layer.backward_program.describe()
    assert "[cublas]" not in text and "[tvm]" not in text
    monkeypatch.setenv("PIGEON_DENSE_GEMM", "magma")
    with pytest.raises(GemmBackendError, match="PIGEON_DENSE_GEMM='magma'"):
        pg.compile(rgcn, g, 16, out_dim=8)


def test_explain_names_each_dense_gemm_and_what_it_writes():
    from pigeon.passes.explain import explain
    from pigeon.graph import tiny_graph as tg_graph
    g = tg_graph()
    layer = pg.compile(rgcn, g, 16, out_dim=8)
    gs, ks = tune_stats(g)
    stats = {**gs, **ks, "num_nodes": g.num_nodes}
    lines = [ln for ln in explain(layer.ir, [], {"forward": layer.forward_program, "backward": layer.backward_program},
                                  stats, "float32") if ln.startswith("gemm backend")]
    dw = next(lch for lch in layer.backward_program.launches if getattr(lch, "inst", None) is not None
              and getattr(lch.inst, "form", None) == "weight_grad" and gemm_point(lch))
    assert len(lines) == 3 and all(": cublas (rule: cuBLAS" in ln for ln in lines)
    assert any(f"gemm:node/k16n8/dW -> {dw.w}:" in ln for ln in lines)


@pytest.mark.parametrize("form,t", [("rows", False), ("rows", True), ("weight_grad", False), ("weight_grad", True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cublas_path_equals_the_instance_semantics(form, t, dtype):
    """run_cublas (torch.mm; on a CPU tensor the same call) against gemm_reference, NaN-poisoned
    outputs, both forms, the weight as is and transposed."""
    from pigeon.runtime.family_gemm import gemm_reference, run_cublas
    tdt = getattr(torch, dtype)
    k, n, m = 24, 40, 77
    inst = GemmInstance(form, k, n, typed=False, transpose_w=t, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=g).to(tdt)
    wshape = (1, 1, n, k) if t else (1, 1, k, n)
    if form == "rows":
        w = torch.randn(*wshape, generator=g).to(tdt)
        got, want = torch.full((m, n), float("nan"), dtype=tdt), torch.empty(m, n, dtype=tdt)
        run_cublas(inst, x, w, got)
        gemm_reference(inst, x, w, None, None, None, want)
    else:
        dy = torch.randn(m, n, generator=g).to(tdt)
        got, want = torch.full(wshape, float("nan"), dtype=tdt), torch.empty(wshape, dtype=tdt)
        run_cublas(inst, x, got, dy)
        gemm_reference(inst, x, want, None, None, None, dy)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if dtype != "float32" else 1e-5,
                                   atol=2e-2 if dtype != "float32" else 1e-5)
        return
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if dtype != "float32" else 1e-5,
                               atol=2e-2 if dtype != "float32" else 1e-5)
    with pytest.raises(Exception, match="dense GEMMs only"):
        run_cublas(GemmInstance("rows", k, n, dtype=dtype), x, w, got)
