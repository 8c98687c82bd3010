"""The ShiftAdd kernels on the GPU against their oracles, with NaN/sentinel-poisoned outputs
(PIGEON_POISON=1): the TVM-generated shift (Q16.16: bit-exact with shift_linear_ref; float32),
Hamming (bit-exact) and masked-accumulation kernels, the packed weight-only kernel (bf16/fp16/fp32,
1-16 tokens, dims 1024-8192) and the fp8 path; ShiftLinear and AddAttention forward and backward on
CUDA on every path against the float64 torch forms; the block's 50-step training run on CUDA
following the reference loss curve (the same block in float64 on the CPU, torch forms).

Needs the ShiftAdd cache entries (records of the TVM sources): on the CPU machine with TVM,
``PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --shiftadd only --arch sm_90``."""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from pigeon.runtime import shiftadd_kernel as sk
from pigeon.shiftadd.add import binary_codes, code_accumulate, hamming_scores, pack_bits
from pigeon.shiftadd.block import ShiftAddViTBlock
from pigeon.shiftadd.fixed import shift_linear_ref, to_fixed
from pigeon.shiftadd.fp8 import last_mode, shift_linear_fp8, weights_e5m2
from pigeon.shiftadd.layers import AddAttention, ShiftLinear
from pigeon.shiftadd.packed import pad_words, packed_linear_ref
from pigeon.shiftadd.quant import dequantize_shift, pack_shift, quantize_shift

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")


def _gen():
    seed = random.randrange(1 << 30)
    return seed, torch.Generator().manual_seed(seed)


def _weights(g, n, k, p_min=-15, p_max=0, bits=6):
    w = torch.randn(n, k, generator=g) * 0.2
    w[torch.rand(n, k, generator=g) < 0.1] = 0
    sign, p = quantize_shift(w, p_min, p_max)
    return sign, p, pack_shift(sign, p, p_min, p_max, bits)


@pytest.mark.parametrize("rng", [(-15, 0, 6), (-14, 0, 5)])
def test_tvm_shift_kernels(rng):
    seed, g = _gen()
    for m, n, k in [(1, 1, 1), (7, 130, 37), (64, 512, 512), (300, 96, 1000)]:
        sign, p, packed = _weights(g, n, k, *rng)
        xq = to_fixed(torch.randn(m, k, generator=g, dtype=torch.float64) * 4)
        got = sk.shift_linear(xq.to(DEV), packed.to(DEV), *rng)
        assert torch.equal(got.cpu(), shift_linear_ref(xq, sign, p)), ((m, n, k), seed)
        x = torch.randn(m, k, generator=g)
        got = sk.shift_linear(x.to(DEV), packed.to(DEV), *rng).cpu().double()
        want = x.double() @ dequantize_shift(sign, p, torch.float64).T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * math.sqrt(k)), ((m, n, k), seed)


def test_tvm_hamming_and_accumulate():
    seed, g = _gen()
    for nbits in (1, 32, 33, 256):
        proj = torch.randn(16, nbits, generator=g)
        cq = binary_codes(torch.randn(100, 16, generator=g), proj)
        ck = binary_codes(torch.randn(333, 16, generator=g), proj)
        assert torch.equal(sk.hamming(cq.to(DEV), ck.to(DEV), nbits).cpu(), hamming_scores(cq, ck, nbits)), (nbits, seed)
    for G, T, nbits, nv in [(1, 1, 1, 1), (64, 196, 64, 64), (3, 500, 100, 7)]:
        b = torch.rand(G, T, nbits, generator=g) > 0.5
        v = torch.randn(G, T, nv, generator=g)
        codes = pack_bits(b)
        got = sk.code_accumulate(codes.to(DEV), v.to(DEV), nbits).cpu()
        want = torch.stack([code_accumulate(codes[i], v[i].double(), nbits) for i in range(G)])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4), ((G, T, nbits, nv), seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rng", [(-15, 0, 6), (-14, 0, 5)])
def test_packed_kernel(dtype, rng):
    seed, g = _gen()
    for m, n, k in [(1, 1024, 1024), (3, 2048, 1000), (8, 4096, 4096), (16, 1000, 8192), (5, 8192, 2048)]:
        sign, p, packed = _weights(g, n, k, *rng)
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g) if m % 2 else None
        wpad = pad_words(packed, k, rng[2])
        got = sk.packed_linear(x.to(DEV), wpad.to(DEV), k, *rng, bias=None if bias is None else bias.to(DEV))
        assert got.dtype == dtype and not torch.isnan(got).any(), ((m, n, k), seed)
        want = packed_linear_ref(x, packed, k, *rng, bias=bias)
        scale = x.double().abs() @ dequantize_shift(sign, p, torch.float64).abs().T     # sum_k |x w|
        ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]   # the output rounding
        tol = ulp * want.abs() + 8 * math.sqrt(k) * 2 ** -24 * scale + 1e-30                # + float32 sums
        err = (got.cpu().double() - want).abs()
        assert (err <= tol).all(), ((m, n, k), seed, float((err / tol).max()))


def test_fp8_path():
    seed, g = _gen()
    for m, n, k in [(16, 1024, 1024), (3136, 512, 512), (1, 4096, 4096)]:
        sign, p, _ = _weights(g, n, k)
        x = torch.randn(m, k, generator=g)
        w8 = weights_e5m2(sign, p).to(DEV)
        got = shift_linear_fp8(x.to(DEV, torch.bfloat16), w8).cpu().double()
        want = x.to(torch.bfloat16).double() @ dequantize_shift(sign, p, torch.float64).T
        rel = (got - want).norm() / want.norm()
        assert rel < 3e-2, ((m, n, k), seed, float(rel), last_mode(DEV))   # e4m3 activations: lossy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quant_rows_e4m3_kernel(dtype, monkeypatch):
    """The fused row quantization bit-exact with the torch form run on the CPU (torch on CUDA divides
    by a scalar through its reciprocal: fp8.quantize_rows_e4m3_ref's doc)."""
    from pigeon.shiftadd.fp8 import quantize_rows_e4m3, quantize_rows_e4m3_ref
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed, g = _gen()
    for m, k in [(1, 1), (7, 13), (3136, 512), (100, 203), (16, 4096), (33, 8190)]:
        x = (torch.randn(m, k, generator=g) * torch.logspace(-6, 4, m).unsqueeze(1)).to(dtype)
        x[m // 2] = 0
        for xx in (x, torch.cat([x, x[:, :1]], 1)[:, 1:]):             # contiguous, and rows off 16 bytes
            q, s = quantize_rows_e4m3(xx.to(DEV))
            qr, sr = quantize_rows_e4m3_ref(xx)
            assert torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8)), (m, k, seed)
            assert torch.equal(s.cpu(), sr), (m, k, seed)


@pytest.mark.parametrize("path", ["shift", "packed", "fp8", "dense", "auto"])
def test_shift_linear_forward_backward(path):
    seed, g = _gen()
    torch.manual_seed(seed)
    m = 8 if path in ("packed", "auto") else 64
    lin = ShiftLinear(1024, 512, path=path).to(DEV)
    ref = copy.deepcopy(lin).to("cpu", torch.float64)
    ref.backend = "torch"
    dt = torch.float32 if path == "shift" else torch.bfloat16
    x = torch.randn(m, 1024, generator=g)
    xg = x.to(DEV, dt).requires_grad_()
    xr = x.to(dt).double().requires_grad_()
    y, yr = lin(xg), ref(xr)
    assert lin.last_path == (path if path != "auto" else lin.last_decision.path), lin.last_decision
    tol = {"shift": 1e-5, "packed": 1e-2, "dense": 1e-2, "fp8": 4e-2, "auto": 4e-2}[path]
    rel = (y.detach().cpu().double() - yr.detach()).norm() / yr.norm()
    assert rel < tol, (path, seed, float(rel))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy.to(DEV, dt))
    yr.backward(gy.to(dt).double())
    for a, b, what in ((xg.grad, xr.grad, "dx"), (lin.weight.grad, ref.weight.grad, "dW")):
        rel = (a.cpu().double() - b).norm() / b.norm()
        assert rel < (1e-5 if dt == torch.float32 else 2e-2), (path, what, seed, float(rel))


def test_int_forward_on_cuda():
    seed, g = _gen()
    lin = ShiftLinear(300, 70).to(DEV)
    xq = to_fixed(torch.randn(9, 300, generator=g, dtype=torch.float64))
    sign, p = quantize_shift(lin.weight.detach().cpu())
    assert torch.equal(lin.int_forward(xq.to(DEV)).cpu(), shift_linear_ref(xq, sign, p)), seed


@pytest.mark.parametrize("binary", [True, False])
def test_add_attention_forward_backward(binary):
    seed, g = _gen()
    torch.manual_seed(seed)
    att = AddAttention(64, heads=4, res_kernel=3, binary=binary).to(DEV)
    ref = copy.deepcopy(att).to("cpu", torch.float64)
    ref.backend = "torch"
    x = torch.randn(2, 197, 64, generator=g)
    xg, xr = x.to(DEV).requires_grad_(), x.double().requires_grad_()
    y, yr = att(xg), ref(xr)
    # float32 vs float64: a binarization threshold (q > mean q) may rarely flip a bit
    rel = (y.detach().cpu().double() - yr.detach()).norm() / yr.norm()
    assert rel < 1e-3, (seed, float(rel))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy.to(DEV))
    yr.backward(gy.double())
    rel = (xg.grad.cpu().double() - xr.grad).norm() / xr.grad.norm()
    assert rel < 1e-2, (seed, float(rel))


def test_block_trains_on_cuda_following_the_reference():
    torch.manual_seed(0)
    dim, heads, steps, coef = 32, 2, 50, 0.05
    lat = torch.tensor([6.0, 4.0])
    blk = ShiftAddViTBlock(dim, heads, mlp_ratio=2, k=1, latencies=lat, res_kernel=3)
    ref = copy.deepcopy(blk).double()
    for mod in ref.modules():
        if hasattr(mod, "backend"):
            mod.backend = "torch"
    for mod in blk.modules():
        if isinstance(mod, ShiftLinear):
            mod.path = "shift"                  # the generated float32 shift kernel (fp8 would quantize x)
    blk = blk.to(DEV)
    x = torch.randn(4, 49, dim)
    target = x + torch.tanh(x @ (torch.randn(dim, dim) / math.sqrt(dim)))
    opt = torch.optim.Adam(blk.parameters(), lr=3e-3)
    opt_r = torch.optim.Adam(ref.parameters(), lr=3e-3)
    xd, td = x.to(DEV), target.to(DEV)
    losses, losses_r = [], []
    for _ in range(steps):
        y, bal = blk(xd)
        loss = F.mse_loss(y, td) + coef * bal
        opt.zero_grad()
        loss.backward()
        opt.step()
        yr, balr = ref(x.double())
        loss_r = F.mse_loss(yr, target.double()) + coef * balr
        opt_r.zero_grad()
        loss_r.backward()
        opt_r.step()
        losses.append(loss.item())
        losses_r.append(loss_r.item())
    # float32 kernels vs the float64 torch forms: a threshold (binarization, rounding of a weight to a
    # power of two, top-1 routing) may flip, so the curve is followed within 5%, not step for step
    for i, (a, b) in enumerate(zip(losses, losses_r)):
        assert abs(a - b) <= 0.05 * max(1.0, abs(b)), (i, a, b, losses, losses_r)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
