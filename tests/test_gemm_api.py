"""pigeon.gemm with epilogues traced from Python: values and gradients equal torch's matmul plus
the same epilogue (fp32, bf16), the op passes opcheck and traces under torch.compile, the fused
CUDA kernel of a traced epilogue compiles for sm_90, and bad calls are one-line errors."""
import pytest
import torch
import torch.nn.functional as F

import pigeon as pg
from pigeon.codegen.gemm import render_gemm
from pigeon.gemm_api import GemmInputError, trace_epilogue
from pigeon.ir import expr_trace as et
from pigeon.ir.expr_trace import TraceError
from pigeon.ir.kernel import GemmInstance
from pigeon.runtime.build import compile_cuda, nvcc_available
from pigeon.runtime.kernel_ops import instance_json

EPILOGUES = {
    "none": (None, lambda y: y),
    "gelu": (lambda acc: pg.gelu(acc), F.gelu),
    "silu": (lambda acc: acc * pg.sigmoid(acc), F.silu),
    "scale_leaky": (lambda acc: pg.leaky_relu(acc, 0.1) * 0.5 + 1.0, lambda y: F.leaky_relu(y, 0.1) * 0.5 + 1.0),
    "clamp": (lambda acc: et.minimum(et.maximum(acc, -0.5), 0.75), lambda y: y.clamp(-0.5, 0.75)),
    "where_tanh": (lambda acc: et.where(acc > 0, pg.tanh(acc), acc * acc), lambda y: torch.where(y > 0, y.tanh(), y * y)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(EPILOGUES))
def test_values_and_gradients_equal_torch(name, dtype):
    fn, ref = EPILOGUES[name]
    g = torch.Generator().manual_seed(hash(name) % (1 << 30))
    a = torch.randn(67, 40, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(40, 23, generator=g).to(dtype).requires_grad_(True)
    y = pg.gemm(a, b, epilogue=fn)
    a2, b2 = (t.detach().float().requires_grad_(True) for t in (a, b))
    want = ref(a2 @ b2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)
    up = torch.randn(y.shape, generator=g)
    ga, gb = torch.autograd.grad((y.float() * up).sum(), [a, b])
    wa, wb = torch.autograd.grad((want * up).sum(), [a2, b2])
    for got, w in ((ga, wa), (gb, wb)):
        rel = ((got.float() - w).norm() / w.norm()).item()     # bf16 gradients are rounded to bf16
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), f"{name} {dtype}: rel err {rel:.2e}"


def test_op_with_a_traced_epilogue_passes_opcheck_and_compiles():
    a, b = torch.randn(16, 8, requires_grad=True), torch.randn(8, 12, requires_grad=True)
    inst = GemmInstance("rows", 8, 12, dtype="float32", epilogue=trace_epilogue(lambda acc: pg.gelu(acc) * 2.0))
    seg = torch.tensor([0, 16], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pigeon.gemm.default, (instance_json(inst), a, b, seg, None, None, None, 16))
    f = torch.compile(lambda x, y: pg.gemm(x, y, epilogue=lambda acc: pg.relu(acc)), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(a, b), torch.relu(a @ b))


@pytest.mark.skipif(not nvcc_available(), reason="nvcc is not installed")
def test_fused_kernel_of_a_traced_epilogue_compiles_for_sm90():
    ep = trace_epilogue(lambda acc: et.where(acc > 0, acc * pg.sigmoid(acc), pg.tanh(acc) * 0.25))
    for dtype in ("float32", "bfloat16"):
        rk = render_gemm(GemmInstance("rows", 64, 128, dtype=dtype, epilogue=ep))
        assert "tanh" in rk.source
        res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
        assert res.resources.get(rk.name) is not None


def test_bad_calls():
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    for args, match in [((a, b.t()), r"a is \[4, 3\] and b \[2, 3\]: inner sizes differ"),
                        ((a, b.double()), "b must be float32, bfloat16 or float16"),
                        ((a[0], b), r"a must be 2-D, got shape \[3\]"),
                        ((a.bfloat16(), b), "a is torch.bfloat16 but b is torch.float32")]:
        with pytest.raises(GemmInputError, match=match):
            pg.gemm(*args)
    with pytest.raises(TraceError, match="must return a float value"):
        pg.gemm(a, b, epilogue=lambda acc: acc > 0)

    def branchy(acc):
        return acc if acc > 0 else -acc
    with pytest.raises(TraceError, match=r"test_gemm_api.py:\d+: a traced function cannot branch"):
        pg.gemm(a, b, epilogue=branchy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_a_loop_of_matmuls(dtype):
    g = torch.Generator().manual_seed(7)
    sizes = [13, 0, 40, 1, 22]                      # an empty problem and a one-row problem
    offs = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)))
    a = torch.randn(sum(sizes), 24, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(len(sizes), 24, 10, generator=g).to(dtype).requires_grad_(True)
    y = pg.grouped_gemm(a, b, offs, epilogue=lambda acc: pg.gelu(acc))
    a2, b2 = (t.detach().float().requires_grad_(True) for t in (a, b))
    want = torch.cat([F.gelu(a2[s:e] @ b2[i]) for i, (s, e) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist()))])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)
    up = torch.randn(y.shape, generator=g)
    for got, w in zip(torch.autograd.grad((y.float() * up).sum(), [a, b]),
                      torch.autograd.grad((want * up).sum(), [a2, b2])):
        rel = ((got.float() - w).norm() / w.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    # the list form packs the same problems
    outs = pg.grouped_gemm([(a[s:e], b[i]) for i, (s, e) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist()))],
                           epilogue=lambda acc: pg.gelu(acc))
    torch.testing.assert_close(torch.cat(outs), y)


def test_grouped_op_passes_opcheck_and_bad_offsets_are_named():
    a, b = torch.randn(9, 4, requires_grad=True), torch.randn(2, 4, 3, requires_grad=True)
    inst = GemmInstance("rows", 4, 3, dtype="float32", typed=True)
    seg = torch.tensor([0, 5, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pigeon.gemm.default, (instance_json(inst), a, b, seg, None, None, None, 9))
    for offs, match in [(torch.tensor([0, 5]), r"offsets has 2 entries for 2 problems \(expected 3\)"),
                        (torch.tensor([0, 5, 8]), "offsets must run from 0 to M = 9"),
                        (torch.tensor([0, 10, 9]), "offsets must be non-decreasing"),
                        (torch.tensor([0.0, 5.0, 9.0]), "1-D integer tensor")]:
        with pytest.raises(GemmInputError, match=match):
            pg.grouped_gemm(a, b, offs)
    with pytest.raises(GemmInputError, match="must share K and N with problem 0"):
        pg.grouped_gemm([(a[:4], b[0]), (a[4:, :3], b[1][:3])])


# ------------------------------------------------------------------ the host path's caches and direct call

def test_epilogue_trace_is_reused_only_while_what_it_reads_is_unchanged():
    from pigeon import gemm_api, trace_cache
    a = torch.randn(8, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 8, dtype=torch.bfloat16)
    scale = 2.0
    f = lambda acc: acc * scale  # noqa: E731
    r2 = pg.gemm(a, b, epilogue=f)
    n = len(trace_cache._TEXTS)
    for _ in range(3):     # re-created lambdas of the same code and values hit the cache
        pg.gemm(a, b, epilogue=lambda acc: acc * scale)
    assert len(trace_cache._TEXTS) <= n + 1
    scale = 3.0            # the captured value changed: a new trace, a new result
    r3 = pg.gemm(a, b, epilogue=f)
    torch.testing.assert_close(r3.float(), r2.float() * 1.5, rtol=2e-2, atol=2e-2)
    assert gemm_api.epilogue_key(lambda acc: acc * -0.0) != gemm_api.epilogue_key(lambda acc: acc * 0.0)


class _Cfg:
    scale = 2.0


def test_epilogue_reading_an_object_is_traced_every_call():
    from pigeon import gemm_api, trace_cache
    cfg = _Cfg()
    f = lambda acc: acc * cfg.scale  # noqa: E731
    assert gemm_api.epilogue_key(f) is None
    a = torch.randn(8, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 8, dtype=torch.bfloat16)
    r2 = pg.gemm(a, b, epilogue=f)
    cfg.scale = 4.0
    torch.testing.assert_close(pg.gemm(a, b, epilogue=f).float(), r2.float() * 2, rtol=2e-2, atol=2e-2)


def _helper_scale(acc):
    return acc * HELPER_SCALE


HELPER_SCALE = 2.0


def test_epilogue_calling_a_helper_keys_on_the_helpers_globals():
    from pigeon import gemm_api, trace_cache
    global HELPER_SCALE
    k2 = gemm_api.epilogue_key(lambda acc: _helper_scale(acc))
    HELPER_SCALE = 3.0
    try:
        assert gemm_api.epilogue_key(lambda acc: _helper_scale(acc)) != k2
    finally:
        HELPER_SCALE = 2.0


def test_direct_call_only_where_it_equals_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from pigeon.runtime.gemm_fused import eager_call_ok
    a = torch.randn(4, 4)
    assert eager_call_ok(a, None)
    w = torch.randn(4, 4, requires_grad=True)
    assert not eager_call_ok(a, w)
    with torch.no_grad():
        assert eager_call_ok(a, w)
    with FakeTensorMode() as mode:
        assert not eager_call_ok(mode.from_tensor(a))
    # autograd still flows through pigeon.gemm (the op path)
    x = torch.randn(8, 16, requires_grad=True)
    y = pg.gemm(x, torch.randn(16, 8), epilogue=lambda acc: acc * 2.0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_grouped_offsets_rechecked_after_an_in_place_write():
    a = torch.randn(6, 8)
    b = torch.randn(2, 8, 4)
    offs = torch.tensor([0, 2, 6], dtype=torch.int32)
    pg.grouped_gemm(a, b, offs)
    pg.grouped_gemm(a, b, offs)            # checked once, not re-read
    offs[1] = 7                            # same storage, new version: read again
    with pytest.raises(GemmInputError, match="non-decreasing"):
        pg.grouped_gemm(a, b, offs)
