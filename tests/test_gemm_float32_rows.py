"""A 16-bit dense GEMM with float32 rows (GemmInstance.y_dtype; pigeon/passes/lower.py gemm_storage,
tests/test_bf16_graph_data.py for why): cuBLAS runs it (on a CPU tensor, float32 math on the bf16
operands), the reference agrees, and everything that cannot run it says so before a launch."""
import pytest
import torch

from pigeon.codegen.gemm import GemmCodegenError, check_instance, render_gemm
from pigeon.ir.kernel import GemmInstance
from pigeon.ir.program import GemmLaunch
from pigeon.passes.gemm_backend import GemmBackendError, choose_gemm_backends, gemm_point, options
from pigeon.runtime.family_gemm import GEMM, GemmLaunchError, gemm_reference, run_cublas

F32 = GemmInstance("rows", 24, 40, typed=False, dtype="bfloat16", y_dtype="float32")


@pytest.mark.parametrize("t", [False, True])
def test_cublas_writes_unrounded_float32_rows_equal_to_the_reference(t):
    inst = GemmInstance("rows", 24, 40, typed=False, transpose_w=t, dtype="bfloat16", y_dtype="float32")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(77, 24, generator=g).bfloat16()
    w = torch.randn(1, 1, *((40, 24) if t else (24, 40)), generator=g).bfloat16()
    got, want = torch.full((77, 40), float("nan")), torch.full((77, 40), float("nan"))
    run_cublas(inst, x, w, got)
    gemm_reference(inst, x, w, None, None, None, want)
    w2 = w.reshape(w.shape[-2:]).double()
    exact = x.double() @ (w2.t() if t else w2)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=1e-5)
    # not rounded to bf16 on the way: most entries are not bf16 numbers
    assert (got.bfloat16().float() != got).float().mean() > 0.9
    with pytest.raises(TypeError, match="Y is torch.bfloat16, the instance has float32"):
        gemm_reference(inst, x, w, None, None, None, got.bfloat16())


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="float32"), "only a float32 Y of 16-bit operands"),
    (dict(typed=True), "dense rows GEMM"),
    (dict(form="weight_grad"), "dense rows GEMM"),
    (dict(epilogue=("relu",)), "dense rows GEMM"),
])
def test_instance_checks_name_what_is_wrong(kw, match):
    import dataclasses
    with pytest.raises(GemmCodegenError, match=match):
        check_instance(dataclasses.replace(F32, **kw))


def test_the_template_and_tvm_refuse_and_the_backend_pass_keeps_cublas(monkeypatch):
    check_instance(F32)
    with pytest.raises(GemmCodegenError, match="runs on cuBLAS"):
        render_gemm(F32)
    launch = GemmLaunch(F32, "x", "w", "y", "node", "all", backend="cublas")
    assert options(launch) == ("cublas",)
    assert gemm_point(launch) == "gemm:node/k24n40/N/f32"
    assert gemm_point(GemmLaunch(GemmInstance("rows", 24, 40, typed=False, dtype="bfloat16"), "x", "w", "y",
                                 "node", "all")) == "gemm:node/k24n40/N"
    from pigeon.ir.program import KernelProgram
    prog = KernelProgram("p", buffers=(), launches=(launch,), inputs=(), params=(), graph_data=(), outputs=())
    with pytest.raises(GemmBackendError, match="backend 'template': expected one of cublas"):
        choose_gemm_backends(prog, {"gemm:node/k24n40/N/f32": "template"})
    monkeypatch.setenv("PIGEON_DENSE_GEMM", "tvm")
    assert choose_gemm_backends(prog).launches[0].backend == "cublas"
    with pytest.raises(GemmLaunchError, match="runs on cuBLAS, not 'template'"):
        GEMM.validate(GemmLaunch(F32, "x", "w", "y", "node", "all", backend="template"))


def test_the_key_of_instances_without_it_is_unchanged():
    """y_dtype at its default stays out of the key (existing kernel names and cache entries)."""
    import hashlib
    from dataclasses import fields
    inst = GemmInstance("rows", 24, 40)
    old = repr(tuple((f.name, getattr(inst, f.name)) for f in fields(inst) if f.name != "y_dtype"))
    assert inst.key() == hashlib.sha256(old.encode()).hexdigest()[:16]
    assert F32.key() != GemmInstance("rows", 24, 40, typed=False, dtype="bfloat16").key()


def test_explain_says_why_the_float32_rows_run_on_cublas():
    import pigeon as pg
    from pigeon.graph import tiny_graph
    from pigeon.models import MODELS
    from pigeon.passes.explain import explain
    from pigeon.module import tune_stats
    g = tiny_graph()
    layer = pg.compile(MODELS["rgcn"], g, 16, out_dim=8, dtype="bfloat16")
    gs, ks = tune_stats(g)
    lines = [ln for ln in explain(layer.ir, [], {"forward": layer.forward_program}, {**gs, **ks, "num_nodes": g.num_nodes},
                                  "bfloat16") if ln.startswith("gemm backend")]
    assert lines == [ln for ln in lines if "/f32 -> " in ln and "float32 rows of bfloat16 operands" in ln] != []
