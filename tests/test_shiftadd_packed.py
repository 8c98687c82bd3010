"""The weight-only packed shift kernel (shiftadd.packed.cu.jinja): its configs, its rendered source
compiling for sm_90 without spills, the padded format, and the oracle that defines its results
(the kernel itself runs in tests/gpu/test_shiftadd_gpu.py)."""
import pytest
import torch

from pigeon.codegen.jinja import template_source
from pigeon.codegen.shiftadd_packed import (MT_STEPS, PackedConfig, PackedConfigError, config_for, prebuild_configs,
                                            render_packed)
from pigeon.runtime import shiftadd_kernel as sk
from pigeon.runtime.build import compile_cuda, nvcc_available
from pigeon.shiftadd.packed import pad_words, packed_linear_ref, padded_words
from pigeon.shiftadd.quant import ShiftFormatError, dequantize_shift, pack_shift, quantize_shift, unpack_shift

needs_nvcc = pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")


def _compile(cfg):
    rk = render_packed(cfg)
    r = compile_cuda(rk.source, arch="sm_90", name=rk.name)
    res = r.resources[rk.name]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res
    assert res["smem"] == cfg.smem <= 48 * 1024, res
    return res


@needs_nvcc
@pytest.mark.parametrize("cfg", [config_for(1, "bfloat16", -15, 0, 6), config_for(16, "float32", -14, 0, 5)],
                         ids=lambda c: c.name)
def test_packed_kernel_compiles_sm90(cfg):
    _compile(cfg)


@needs_nvcc
@pytest.mark.slow
def test_every_prebuilt_packed_kernel_compiles_sm90():
    for cfg in prebuild_configs():
        _compile(cfg)


def test_configs():
    assert [config_for(t, "float16", -15, 0, 6).mt for t in (1, 2, 4, 5, 8, 9, 16)] == [1, 4, 4, 8, 8, 16, 16]
    assert len({c.name for c in prebuild_configs()}) == len(prebuild_configs()) == 4 * len(MT_STEPS)
    with pytest.raises(PackedConfigError, match=r"takes 1..16 tokens, got 17 .larger batches: the shift or fp8 path"):
        config_for(17, "bfloat16", -15, 0, 6)
    with pytest.raises(PackedConfigError, match="dtype is one of"):
        config_for(1, "float64", -15, 0, 6)
    with pytest.raises(PackedConfigError, match="range -15..0 with 5-bit codes is not a packed format"):
        PackedConfig("bfloat16", 1, 5, -15, 0, 4)
    head = template_source("shiftadd.packed.cu.jinja").split("-#}")[0]
    for field in ("c.dtype", "c.mt", "c.bits", "c.p_min", "c.rows", "c.warps", "signature"):
        assert field in head, field


@pytest.mark.parametrize("bits,p_min", [(6, -15), (5, -14)])
def test_padded_format_and_oracle(bits, p_min):
    g = torch.Generator().manual_seed(0)
    n, k = 7, 1000
    w = torch.randn(n, k, generator=g) * 0.2
    w[:, ::7] = 0
    sign, p = quantize_shift(w, p_min, 0)
    packed = pack_shift(sign, p, p_min, 0, bits)
    wpad = pad_words(packed, k, bits)
    assert wpad.shape == (n, padded_words(k, bits)) and wpad.shape[1] % 4 == 0
    assert torch.equal(wpad[:, :packed.shape[1]], packed) and not wpad[:, packed.shape[1]:].any()
    s2, p2 = unpack_shift(wpad[:, :packed.shape[1]].contiguous(), k, p_min, 0, bits)
    assert torch.equal(s2, sign)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(3, k, generator=g).to(dt)
        bias = torch.randn(n, generator=g)
        want = x.double() @ dequantize_shift(sign, p, torch.float64).T + bias.double()
        assert torch.equal(packed_linear_ref(x, wpad, k, p_min, 0, bits, bias), want)
        assert torch.equal(packed_linear_ref(x, packed, k, p_min, 0, bits, bias), want)
    with pytest.raises(ShiftFormatError, match=r"packed has shape \(7, 2\), expected \[N, 167\]|expected \[N, 200\]"):
        pad_words(packed[:, :2].contiguous(), k, bits)


def test_packed_launch_errors():
    wpad = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(sk.ShiftAddKernelError, match="x must be a 2-d bfloat16/float16/float32 tensor"):
        sk.packed_linear(torch.zeros(2, 20, dtype=torch.float64), wpad, 20, -15, 0, 6)
    with pytest.raises(sk.ShiftAddKernelError, match="do not fit K=30"):
        sk.packed_linear(torch.zeros(2, 30), wpad, 30, -15, 0, 6)
    with pytest.raises(sk.ShiftAddKernelError, match="bias must be float32 .4."):
        sk.packed_linear(torch.zeros(2, 20), wpad, 20, -15, 0, 6, bias=torch.zeros(3))
    with pytest.raises(sk.ShiftAddKernelError, match="runs on CUDA tensors, got cpu"):
        sk.packed_linear(torch.zeros(2, 20), wpad, 20, -15, 0, 6)
