"""The fp8 path's exactness (every quantized weight survives float8_e5m2 bit for bit), its
activation quantization and input errors, and the per-shape choice among the shift linear's
paths (measured table or explicit estimate) with ShiftLinear's path argument."""
import pytest
import torch

from pigeon.shiftadd import paths
from pigeon.shiftadd.fp8 import quantize_rows_e4m3, shift_linear_fp8, weights_e5m2
from pigeon.shiftadd.layers import ShiftLinear
from pigeon.shiftadd.quant import ShiftFormatError, dequantize_shift, quantize_shift


@pytest.mark.parametrize("p_min,p_max", [(-15, 0), (-14, 0), (-16, 14), (-8, -3)])
def test_every_quantized_weight_is_exact_in_e5m2(p_min, p_max):
    p = torch.arange(p_min, p_max + 1, dtype=torch.int8).repeat(3)
    sign = torch.tensor([-1, 0, 1], dtype=torch.int8).repeat_interleave(p_max - p_min + 1)
    w8 = weights_e5m2(sign.reshape(3, -1), p.reshape(3, -1))
    want = dequantize_shift(sign.reshape(3, -1), p.reshape(3, -1))
    assert w8.dtype == torch.float8_e5m2 and torch.equal(w8.float(), want)
    assert torch.equal(w8.to(torch.float32).to(torch.float8_e5m2).view(torch.uint8), w8.view(torch.uint8))
    g = torch.Generator().manual_seed(1)
    s2, p2 = quantize_shift(torch.randn(64, 96, generator=g) * 0.3, p_min, p_max)
    assert torch.equal(weights_e5m2(s2, p2).float(), dequantize_shift(s2, p2))


def test_e5m2_range_and_errors():
    with pytest.raises(ShiftFormatError, match=r"shift range -20..0 is not exact in float8_e5m2"):
        weights_e5m2(torch.ones(1, 2, dtype=torch.int8), torch.tensor([[-20, 0]], dtype=torch.int8))
    w8 = torch.zeros(32, 32).to(torch.float8_e5m2)
    with pytest.raises(ShiftFormatError, match="weights must be 2-d float8_e5m2"):
        shift_linear_fp8(torch.zeros(2, 32), torch.zeros(32, 32))
    with pytest.raises(ShiftFormatError, match=r"x has shape \(2, 31\), expected \[M, 32\]"):
        shift_linear_fp8(torch.zeros(2, 31), w8)
    with pytest.raises(ShiftFormatError, match="K=24 and N=32 must be multiples of 16"):
        shift_linear_fp8(torch.zeros(2, 24), torch.zeros(32, 24).to(torch.float8_e5m2))
    with pytest.raises(ShiftFormatError, match="runs on CUDA"):
        shift_linear_fp8(torch.zeros(2, 32), w8)


def test_row_quantization_e4m3():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1, 30, 0, 1e3]).unsqueeze(1)
    xq, s = quantize_rows_e4m3(x)
    assert xq.dtype == torch.float8_e4m3fn and s.shape == (5, 1) and s[3, 0] == 2.0 ** -126 and (xq[3].float() == 0).all()
    err = (xq.float() * s - x).abs()
    assert (err <= 2 ** -4 * x.abs() + s * 2 ** -9 + 1e-30).all()


def test_estimates_and_choice(tmp_path):
    est = {p: paths.estimate_us(p, 1, 8192, 8192) for p in paths.PATHS}
    assert est["packed"] < min(est["dense"], est["shift"])         # weight bytes dominate one token
    big = paths.choose(100352, 512, 512, "bfloat16", fp8_ok=True, table={})
    assert big.source == "estimate" and big.path in ("fp8", "dense") and "packed" in big.excluded
    entries = [{"path": p, "M": 4, "N": 1024, "K": 1024, "dtype": "bfloat16", "us": us}
               for p, us in (("shift", 50.0), ("packed", 9.0), ("fp8", 3.0), ("dense", 8.0))]
    paths.save_table("H200", entries, tmp_path)
    table = paths.load_table(tmp_path)
    d = paths.choose(4, 1024, 1024, "bfloat16", gpu="H200", table=table)
    assert (d.path, d.source) == ("fp8", "measured")
    assert "path fp8 (measured latencies: shift 50.0 us, packed 9.0 us, fp8 3.0 us, dense 8.0 us)" in d.describe()
    assert paths.choose(4, 1024, 1024, "bfloat16", gpu="A100", table=table).source == "estimate"
    assert paths.choose(8, 1024, 1024, "bfloat16", gpu="H200", table=table).source == "estimate"
    no8 = paths.choose(4, 1024, 1024, "bfloat16", gpu="H200", fp8_ok=False, table=table)
    assert (no8.path, no8.source) == ("dense", "measured") and "fp8" in no8.excluded
    paths.save_table("H200", [dict(entries[0], us=1.0)], tmp_path)          # merged, replaced
    assert len(paths.load_table(tmp_path)["entries"]) == 4


def test_shift_linear_path_argument():
    with pytest.raises(ValueError, match=r"path is one of \('auto', 'shift', 'packed', 'fp8', 'dense'\), got 'int8'"):
        ShiftLinear(16, 16, path="int8")
    lin = ShiftLinear(64, 32, path="packed")
    with pytest.raises(ShiftFormatError, match=r"path='packed'.* cannot run \[17, 64\] x \[64, 32\] bfloat16: 17 tokens > 16"):
        lin.decide(17, torch.bfloat16, "cpu")
    assert lin.decide(3, torch.bfloat16, "cpu").describe().startswith("shift linear M=3 N=32 K=64 bfloat16: path packed (explicit")
    with pytest.raises(ShiftFormatError, match="path=.fp8.. cannot run .*: no fp8 tensor cores"):
        ShiftLinear(64, 32, path="fp8").decide(3, torch.bfloat16, "cpu")
    auto = ShiftLinear(1024, 1024)
    assert "path packed" in auto.describe(1, device="cpu")
    assert "path=auto, backend=kernels" in repr(auto)
