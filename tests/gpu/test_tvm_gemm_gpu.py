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


@pytest.mark.parametrize("backend", ["tvm", "cublas", "template"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_with_each_dense_gemm_backend_equals_the_reference(backend, dtype):
    """RGCN's x @ W_self, dy @ W_self^T (and dW_self: cuBLAS or the template) on each backend, forward
    and backward, against the reference interpreter."""
    g = tiny_graph()
    ir = rgcn.trace(16, out_dim=16)
    gs, _ = tune_stats(g)
    choice = {"gemm:node/k16n16/N": backend, "gemm:node/k16n16/T": backend,
              "gemm:node/k16n16/dW": "template" if backend == "tvm" else backend}
    layer = pg.CompiledLayer(rgcn, run_pipeline(ir, graph_stats=gs, choices=choice)[0], g, dtype=dtype).to(DEV)
    if backend != "template":
        assert f"[{backend}]" in layer.forward_program.describe() and f"[{backend}]" in layer.backward_program.describe()
    ref = pg.compile(rgcn, g, 16, out_dim=16, backend="reference").to(DEV)
    ref.weights.load_state_dict(layer.weights.state_dict())
    tdt = getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 3e-2
    x = torch.randn(g.num_nodes, 16, device=DEV).to(tdt).requires_grad_(True)
    xr = x.detach().float().clone().requires_grad_(True)
    out, want = layer(x), ref(xr)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    out.float().square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=tol, atol=tol * 10)
    for k, p in layer.weights.items():
        scale = ref.weights[k].grad.abs().max().item() + 1e-6
        torch.testing.assert_close(p.grad.float() / scale, ref.weights[k].grad / scale, rtol=tol, atol=tol, msg=k)
