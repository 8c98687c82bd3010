"""The add primitive's torch references (pigeon/shiftadd/add.py): code layout, Hamming scores by
hand, masked accumulation against a matmul, and the errors."""
import pytest
import torch

from pigeon.shiftadd.add import (binary_codes, code_accumulate, code_accumulate_pm1, hamming_scores, pack_bits,
                                 unpack_bits)
from pigeon.shiftadd.quant import ShiftFormatError


def test_code_layout():
    x = torch.eye(3)
    proj = torch.zeros(3, 40)
    proj[0, 0] = proj[1, 31] = proj[2, 33] = 1.0
    proj[0, 5] = -1.0
    c = binary_codes(x, proj)
    assert c.dtype == torch.int32 and c.shape == (3, 2)
    assert c.tolist() == [[1, 0], [-(1 << 31), 0], [0, 2]]      # bit 31 is the int32 sign bit; 0 -> 0
    bits = torch.rand(7, 70) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), 70), bits)


def test_hamming_by_hand():
    g = torch.Generator().manual_seed(0)
    for nbits in (1, 7, 32, 45, 96):
        bq = torch.rand(5, nbits, generator=g) > 0.5
        bk = torch.rand(6, nbits, generator=g) > 0.5
        want = (bq.unsqueeze(1) == bk.unsqueeze(0)).sum(-1).int()
        got = hamming_scores(pack_bits(bq), pack_bits(bk), nbits)
        assert torch.equal(got, want), nbits
        # +-1 codes: the dot product is 2 * equal - nbits
        pq, pk = bq.double() * 2 - 1, bk.double() * 2 - 1
        assert torch.equal((2 * got - nbits).double(), pq @ pk.T)


def test_code_accumulate():
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(50, 37, generator=g) > 0.5
    codes = pack_bits(bits)
    vi = torch.randint(-1000, 1000, (50, 9), generator=g, dtype=torch.int32)
    assert torch.equal(code_accumulate(codes, vi, 37), (bits.long().T @ vi.long()).int())
    vf = torch.randn(50, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(code_accumulate(codes, vf, 37), bits.double().T @ vf)
    torch.testing.assert_close(code_accumulate_pm1(codes, vf, 37), (bits.double() * 2 - 1).T @ vf)
    assert torch.equal(code_accumulate_pm1(codes, vi, 37), ((bits.long() * 2 - 1).T @ vi.long()).int())


def test_add_errors():
    c = pack_bits(torch.ones(4, 40, dtype=torch.bool))
    with pytest.raises(ShiftFormatError, match=r"codes_k has shape \(4, 2\), expected \[T, 1\]"):
        hamming_scores(pack_bits(torch.ones(4, 20, dtype=torch.bool)), c, 20)
    with pytest.raises(ShiftFormatError, match="bits set past nbits=36"):
        hamming_scores(c, c, 36)
    with pytest.raises(ShiftFormatError, match="int32 packed codes"):
        hamming_scores(c.long(), c, 40)
    with pytest.raises(ShiftFormatError, match=r"expected \[4, n\]"):
        code_accumulate(c, torch.zeros(5, 3), 40)
    with pytest.raises(ShiftFormatError, match=r"proj has shape \(3, 8\), expected \[4, nbits\]"):
        binary_codes(torch.zeros(2, 4), torch.zeros(3, 8))
