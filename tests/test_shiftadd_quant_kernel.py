"""The fused per-row e4m3 quantization kernel of the fp8 shift path (shiftadd.quant.cu.jinja): its
CUDA text run by the CPU emulator bit-exact against the torch form (fp8.quantize_rows_e4m3_ref,
codes and scales) on NaN-poisoned outputs -- zero rows, K off the vector width, row starts off the
16-byte boundary, large and tiny magnitudes, subnormal codes -- and compiling for sm_90 without
spills."""
import random

import pytest
import torch

from pigeon.codegen.shiftadd_quant import QuantConfig, QuantConfigError, config_for, prebuild_configs, render_quant
from pigeon.runtime import emulate, shiftadd_kernel as sk
from pigeon.runtime.build import compile_cuda, nvcc_available
from pigeon.shiftadd.fp8 import quantize_rows_e4m3, quantize_rows_e4m3_ref

from fake_launch import recorded_launches  # noqa: E402

needs_cxx = pytest.mark.skipif(not emulate.available(), reason="needs a C++ compiler to emulate CUDA kernels")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")


def _rows(g, m, k, dtype):
    mags = torch.tensor([1.0, 0.0, 3e4, 1e-3, 1e-30, 1.0, 60000.0, 1e-5, 2.0 ** -120])[torch.arange(m) % 9]
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * mags.double().unsqueeze(1)
    if k > 3 and m > 5:
        x[0, 1] = 0.0
        x[0, 2] = -0.0
        x[5, :] = torch.randint(-3, 4, (k,), generator=g).double() * 2.0 ** -12   # exact ties, subnormal codes
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


def _same(x, emulate_=True):
    q, s = sk.quantize_rows_e4m3(x, emulate=emulate_)
    qr, sr = quantize_rows_e4m3_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (x.shape[0], 1)
    return torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s.view(torch.int32),
                                                                                 sr.view(torch.int32))


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quant_kernel_emulated_bit_exact(dtype):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    for m, k in [(1, 1), (9, 7), (11, 64), (3, 203), (10, 2100)]:      # 2100: the 128-threads-per-row config
        x = _rows(g, m, k, dtype)
        assert _same(x), (dtype, m, k, seed)
        if k > 2:                                                      # a row stride off the 16-byte grid
            base = _rows(g, m, k + 1, dtype)
            xs = base[:, 1:]
            assert xs.stride() == (k + 1, 1) and _same(xs), (dtype, m, k, "strided", seed)


@needs_cxx
def test_quant_kernel_emulated_nan_inf():
    x = torch.tensor([[1.0, float("inf"), 2.0, -3.0], [1.0, float("nan"), 0.5, 0.25], [500.0, -1e38, 0.0, 7.0]])
    q, s = sk.quantize_rows_e4m3(x, emulate=True)
    qr, sr = quantize_rows_e4m3_ref(x)
    # NaN payload and sign are the platform's; NaN-ness is not
    assert torch.equal(torch.isnan(q.float()), torch.isnan(qr.float()))
    assert torch.equal(q.float().nan_to_num(7.0), qr.float().nan_to_num(7.0))
    assert torch.equal(s.isnan(), sr.isnan()) and torch.equal(s.nan_to_num(7.0), sr.nan_to_num(7.0))


def test_quant_dispatch_and_errors():
    x = torch.randn(3, 8)
    assert all(torch.equal(a, b) for a, b in zip(quantize_rows_e4m3(x), quantize_rows_e4m3_ref(x)))   # CPU: torch form
    with pytest.raises(sk.ShiftAddKernelError, match="runs on CUDA tensors, got cpu"):
        sk.quantize_rows_e4m3(x)
    with pytest.raises(sk.ShiftAddKernelError, match="x must be a 2-d bfloat16/float16/float32 tensor"):
        sk.quantize_rows_e4m3(x.double(), emulate=True)
    with pytest.raises(QuantConfigError, match="tpr is one of"):
        QuantConfig("bfloat16", 64)
    assert [config_for(k, "float16").tpr for k in (1, 2048, 2049)] == [32, 32, 128]
    assert len({c.name for c in prebuild_configs()}) == 6


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
@pytest.mark.parametrize("cfg", prebuild_configs(), ids=lambda c: c.name)
def test_quant_kernel_compiles_sm90(cfg):
    rk = render_quant(cfg)
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res


def test_fp8_path_launches_the_kernel(monkeypatch):
    """With the GPU mocked, fp8.quantize_rows_e4m3 is one launch of the kernel (no torch ops of the
    quantization), its arguments in the kernel's order."""
    with recorded_launches(monkeypatch) as launches:
        x = torch.randn(20, 96, dtype=torch.bfloat16)
        q, s = quantize_rows_e4m3(x)
        (grid, block, args), = launches
        assert grid == (3, 1, 1) and block == (256, 1, 1) and args[0] is q and args[1] is s and args[2] is x
        assert args[3:] == [20, 96, 96, 96] and q.dtype == torch.float8_e4m3fn and s.shape == (20, 1)
