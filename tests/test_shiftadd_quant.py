"""Power-of-two quantization, its packed format, the STE, Q16.16 and the shift-linear references
(pigeon/shiftadd/quant.py, fixed.py)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pigeon.shiftadd.fixed import from_fixed, shift_linear_float, shift_linear_ref, to_fixed
from pigeon.shiftadd.quant import (ShiftFormatError, dequantize_shift, pack_shift, packed_shape, quantize_shift,
                                   ste_shift, unpack_shift)


def _weights(n, k, seed, p_min=-15, p_max=0, zeros=0.2):
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    sign[torch.rand(n, k, generator=g) < zeros] = 0
    p = torch.randint(p_min, p_max + 1, (n, k), generator=g, dtype=torch.int8)
    return sign, torch.where(sign == 0, torch.full_like(p, p_min), p)


def test_quantize_rounding():
    w = torch.tensor([1.0, -0.5, 0.3, 0.7, 2.0 ** -15, 2.0 ** -16, 2.0 ** -17, 0.0, 8.0, -3.0, 0.75])
    sign, p = quantize_shift(w)
    assert sign.tolist() == [1, -1, 1, 1, 1, 1, 0, 0, 1, -1, 1]
    # 0.3: log2 = -1.74 -> -2; 0.7: -0.51 -> -1; 2^-16 saturates to -15; 8 and -3 saturate to 0;
    # 0.75: -0.42 -> 0 (rounded in the log domain, not to the nearest value 0.5)
    assert p.tolist() == [0, -1, -2, -1, -15, -15, -15, -15, 0, 0, 0]
    assert sign.dtype == p.dtype == torch.int8
    d = dequantize_shift(sign, p)
    assert d[0] == 1.0 and d[1] == -0.5 and d[2] == 0.25 and d[6] == 0.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 40), seed=st.integers(0, 2 ** 16),
       rng=st.sampled_from([(-15, 0, None), (-15, 0, 6), (-14, 0, 5), (-8, -2, 5), (-30, 0, 6)]))
def test_pack_roundtrip(n, k, seed, rng):
    p_min, p_max, bits = rng
    sign, p = _weights(n, k, seed, p_min, p_max)
    packed = pack_shift(sign, p, p_min, p_max, bits)
    b = bits or 6 if p_max - p_min + 1 > 15 else bits or 5
    assert packed.dtype == torch.int32 and tuple(packed.shape) == packed_shape(n, k, b)
    assert (packed >= 0).all()                               # bit 31 never set
    s2, p2 = unpack_shift(packed, k, p_min, p_max, bits)
    assert torch.equal(s2, sign) and torch.equal(p2, p)
    assert torch.equal(pack_shift(s2, p2, p_min, p_max, bits), packed)


def test_pack_bit_layout():
    # 6-bit codes, p_min -15: f = p + 16; code = neg << 5 | f; weight k at bits 6*(k%5)
    sign = torch.tensor([[1, -1, 0, 1, 1, -1]], dtype=torch.int8)
    p = torch.tensor([[0, -15, -15, -1, -2, -3]], dtype=torch.int8)
    w = pack_shift(sign, p)
    codes = [16, 32 | 1, 0, 15, 14]
    assert w[0, 0].item() == sum(c << (6 * i) for i, c in enumerate(codes))
    assert w[0, 1].item() == 32 | 13


def test_pack_errors():
    sign, p = _weights(3, 10, 0)
    with pytest.raises(ShiftFormatError, match="5-bit codes hold at most 15"):
        pack_shift(sign, p, -15, 0, bits=5)
    with pytest.raises(ShiftFormatError, match="bits wide"):
        pack_shift(sign, p, bits=4)
    with pytest.raises(ShiftFormatError, match="sign must be an int8"):
        pack_shift(sign.int(), p)
    with pytest.raises(ShiftFormatError, match="outside the packed range -8..0"):
        pack_shift(torch.ones_like(sign), torch.full_like(p, -9), -8, 0)
    with pytest.raises(ShiftFormatError, match="6-bit codes hold at most 31"):
        pack_shift(sign, p, -40, 0)
    packed = pack_shift(sign, p)
    with pytest.raises(ShiftFormatError, match=r"packed has shape \(3, 2\), expected \[N, 3\]"):
        unpack_shift(packed, 11)
    with pytest.raises(ShiftFormatError, match="packed must be an int32"):
        unpack_shift(packed.long(), 10)
    with pytest.raises(ShiftFormatError, match="floating-point"):
        quantize_shift(torch.ones(3, dtype=torch.int32))


def test_ste_forward_backward():
    w = torch.tensor([0.3, -0.7, 1.5, -2.0, 1e-7, 1.0], requires_grad=True)
    y = ste_shift(w)
    assert torch.equal(y.detach(), dequantize_shift(*quantize_shift(w)))
    y.backward(torch.arange(1.0, 7.0))
    # clipped where |w| > 2^p_max = 1 (the forward saturates); passed through elsewhere, incl. 1e-7 -> 0
    assert w.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]


def test_fixed_point():
    x = torch.tensor([0.0, 1.0, -1.5, 2 ** -16, 3 * 2 ** -17, 1e9, -1e9])
    q = to_fixed(x)
    assert q.dtype == torch.int32
    assert q.tolist() == [0, 65536, -98304, 1, 2, 2 ** 31 - 1, -2 ** 31]   # 1.5 ulp -> 2 (half to even)
    assert torch.equal(from_fixed(q[:4]), x[:4])
    with pytest.raises(ShiftFormatError, match="floating-point"):
        to_fixed(q)
    with pytest.raises(ShiftFormatError, match="int32 Q16.16"):
        from_fixed(x)


def test_shift_linear_ref_by_hand():
    x = torch.tensor([[-3, 5, 65536]], dtype=torch.int32)
    sign = torch.tensor([[1, -1, 1], [-1, 0, 1]], dtype=torch.int8)
    p = torch.tensor([[-1, -1, -16], [-1, -3, 0]], dtype=torch.int8)
    out = shift_linear_ref(x, sign, p)
    # arithmetic shift floors: -3 >> 1 = -2; the sign applies after the shift: -(5 >> 1) = -2
    assert out.tolist() == [[-2 - 2 + 1, 2 + 65536]]


def test_shift_linear_ref_matches_float():
    g = torch.Generator().manual_seed(3)
    sign, p = _weights(9, 37, 1)
    x = torch.randn(5, 37, generator=g, dtype=torch.float64)
    # with 16 fraction bits and shifts <= 15 the floor costs < 2^-16 per term
    got = from_fixed(shift_linear_ref(to_fixed(x), sign, p), torch.float64)
    want = shift_linear_float(x, sign, p)
    assert (got - want).abs().max() <= 37 * 2 ** -15


def test_shift_linear_ref_errors():
    sign, p = _weights(4, 8, 0)
    with pytest.raises(ShiftFormatError, match="x must be an int32 Q16.16"):
        shift_linear_ref(torch.randn(2, 8), sign, p)
    with pytest.raises(ShiftFormatError, match=r"sign has shape \(4, 8\), expected \[N, 9\]"):
        shift_linear_ref(torch.zeros(2, 9, dtype=torch.int32), sign, p)
    with pytest.raises(ShiftFormatError, match="p in -31..0"):
        shift_linear_ref(torch.zeros(2, 8, dtype=torch.int32), sign, torch.ones_like(p))
    big = torch.full((1, 8), 2 ** 30, dtype=torch.int32)
    with pytest.raises(OverflowError, match="int32 accumulation"):
        shift_linear_ref(big, torch.ones_like(sign), torch.zeros_like(p))
    with pytest.raises(ShiftFormatError, match="floating-point"):
        shift_linear_float(torch.zeros(2, 8, dtype=torch.int32), sign, p)
