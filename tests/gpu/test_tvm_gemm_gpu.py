"""The TVM candidate of dense GEMMs on a CUDA GPU (pigeon/runtime/tvm_gemm_kernel.py): its kernel
against a float64 matmul with NaN-poisoned outputs, and a layer compiled with TVM GEMMs forward and
backward against the reference interpreter.  The CUDA sources come from the kernel cache: make them
where TVM is (``scripts/prebuild_kernels.py --tvm-gemm only --dims 16,64,128``) and carry the cache."""
from __future__ import annotations

import random

import pytest
import torch

import pigeon as pg
from pigeon.graph import tiny_graph
from pigeon.ir.kernel import GemmInstance
from pigeon.models import rgcn
from pigeon.module import tune_stats
from pigeon.passes.pipeline import run_pipeline
from pigeon.runtime import tvm_gemm_kernel as tg
from pigeon.runtime.build import build_kernel
from pigeon.runtime.launch import load_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda")


@pytest.mark.parametrize("d,dtype,t", [(64, "float32", False), (64, "float32", True), (128, "bfloat16", False),
                                       (128, "bfloat16", True), (64, "bfloat16", True)])
def test_tvm_gemm_equals_float64_matmul(d, dtype, t):
    inst = GemmInstance("rows", d, d, typed=False, transpose_w=t, dtype=dtype)
    rk = tg.rendered_for(inst, "sm_90")
    fn = load_module(build_kernel(rk.source, "sm_90", name=rk.name), DEV).function(rk.name)
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)
    for m in (1, 33, 1000, 70001):
        x = torch.randn(m, d, generator=g).to(DEV, tdt)
        w = torch.randn(d, d, generator=g).to(DEV, tdt)
        y = torch.full((m, d), float("nan"), device=DEV, dtype=tdt)
        tg.run(rk, fn, inst, x, w, y)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), f"seed {seed} M {m}: an output element was not written"
        ref = x.double() @ (w.double().t() if t else w.double())
        tol = 1e-4 if dtype == "float32" else 2e-2
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < tol, f"seed {seed} M {m}: rel err {err:.2e}"


def test_layer_with_tvm_gemms_equals_the_reference_forward_and_backward():
    g = tiny_graph()
    ir = rgcn.trace(16, out_dim=16)
    gs, _ = tune_stats(g)
    choice = {"gemm:node/k16n16/N": "tvm", "gemm:node/k16n16/T": "tvm"}
    layer = pg.CompiledLayer(rgcn, run_pipeline(ir, graph_stats=gs, choices=choice)[0], g).to(DEV)
    assert "[tvm]" in layer.forward_program.describe() and "[tvm]" in layer.backward_program.describe()
    ref = pg.compile(rgcn, g, 16, out_dim=16, backend="reference").to(DEV)
    ref.weights.load_state_dict(layer.weights.state_dict())
    x = torch.randn(g.num_nodes, 16, device=DEV, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out, want = layer(x), ref(xr)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    for k, p in layer.weights.items():
        torch.testing.assert_close(p.grad, ref.weights[k].grad, rtol=1e-4, atol=1e-4, msg=k)
