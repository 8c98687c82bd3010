"""The add primitive: binary codes of queries/keys, Hamming similarity, masked accumulation.

Code layout (``binary_codes``): bit b of a token's code is 1 iff ``(x @ proj)[t, b] > 0`` (0 for a
score <= 0, so an exact zero gives 0).  Bits are packed little-endian into 32-bit words: bit b is
bit ``b % 32`` of word ``b // 32``; words are stored as int32 (the uint32 bit pattern, so bit 31 is
the sign bit); the bits past ``nbits`` in the last word are zero.  Shape ``[T, ceil(nbits / 32)]``.

``hamming_scores(q, k, nbits) = nbits - popcount(q xor k)`` summed over the words: the number of
equal bits, in 0..nbits (the padding bits are zero on both sides, so they never count as different).

``code_accumulate(codes, V, nbits)[m, n] = sum_t code[t, m] * V[t, n]`` with codes in {0, 1}: the
masked accumulation of ShiftAddViT's linear-angular attention, whose kernel (GATECH-EIC/ShiftAddViT,
OPs_Speedups/Add/latency_test.py, ``matmask``) sums ``if_then_else(MASK[k, m] > 0, INPUT[k, n], 0)``
over tokens: a bit selects the value row or nothing, no multiply.  The paper's hash codes are
+-1 (KSH with a sign quantizer); with c = 2b - 1 the +-1 product is
``2 * code_accumulate(b, V) - V.sum(0)``, one extra column sum (``code_accumulate_pm1``).
"""
from __future__ import annotations

import math

import torch

from .quant import ShiftFormatError

_M32 = (1 << 32) - 1


def code_words(nbits: int) -> int:
    if not isinstance(nbits, int) or nbits < 1:
        raise ShiftFormatError(f"nbits must be a positive int, got {nbits!r}")
    return math.ceil(nbits / 32)


def binary_codes(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Packed sign codes of ``x @ proj``: int32 ``[T, ceil(nbits / 32)]`` (module doc)."""
    for name, t in (("x", x), ("proj", proj)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ShiftFormatError(f"{name} must be a 2-d floating-point tensor, got "
                                   f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.shape[1] != proj.shape[0]:
        raise ShiftFormatError(f"proj has shape {tuple(proj.shape)}, expected [{x.shape[1]}, nbits] (x is {tuple(x.shape)})")
    return pack_bits((x @ proj) > 0)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[..., T, nbits]`` -> int32 ``[..., T, ceil(nbits / 32)]``, bit b at bit b % 32 of word b // 32."""
    *lead, nbits = bits.shape
    words = code_words(nbits)
    b = torch.nn.functional.pad(bits.to(torch.int64), (0, words * 32 - nbits)).reshape(*lead, words, 32)
    w = (b << torch.arange(32, dtype=torch.int64, device=bits.device)).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def unpack_bits(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: bool ``[T, nbits]``."""
    _check_codes("codes", codes, nbits)
    w = codes.to(torch.int64) & _M32
    return ((w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=codes.device)) & 1).reshape(codes.shape[0], -1)[:, :nbits].bool()


def _check_codes(name: str, codes, nbits: int) -> None:
    words = code_words(nbits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int32:
        raise ShiftFormatError(f"{name} must be int32 packed codes (binary_codes), got "
                               f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.dim() != 2 or codes.shape[1] != words:
        raise ShiftFormatError(f"{name} has shape {tuple(codes.shape)}, expected [T, {words}] (nbits={nbits})")
    if nbits % 32 and ((codes[:, -1].to(torch.int64) & _M32) >> (nbits % 32)).any():
        raise ShiftFormatError(f"{name} has bits set past nbits={nbits} in its last word")


def _popcount64(x: torch.Tensor) -> torch.Tensor:
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101 >> 56) & 0xFF          # inputs below 2^32: no sign trouble


def hamming_scores(codes_q: torch.Tensor, codes_k: torch.Tensor, nbits: int) -> torch.Tensor:
    """``nbits - popcount(q xor k)``: int32 ``[Tq, Tk]``, the count of equal code bits."""
    _check_codes("codes_q", codes_q, nbits)
    _check_codes("codes_k", codes_k, nbits)
    x = (codes_q.to(torch.int64).unsqueeze(1) ^ codes_k.to(torch.int64).unsqueeze(0)) & _M32
    return (nbits - _popcount64(x).sum(-1)).to(torch.int32)


def code_accumulate(codes: torch.Tensor, v: torch.Tensor, nbits: int) -> torch.Tensor:
    """``sum_t code[t, m] * V[t, n]`` for codes in {0, 1}: ``[nbits, n]``.

    Integer V (int32): summed in int64, checked to fit int32, returned as int32 (exact).  Float V:
    the masked sum in V's dtype (equal to ``bits.T @ V`` up to summation order)."""
    _check_codes("codes", codes, nbits)
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != codes.shape[0]:
        raise ShiftFormatError(f"V has shape {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
                               f"expected [{codes.shape[0]}, n] (codes has T={codes.shape[0]})")
    bits = unpack_bits(codes, nbits)
    if v.is_floating_point():
        return torch.where(bits.unsqueeze(-1), v.unsqueeze(1), torch.zeros((), dtype=v.dtype)).sum(0)
    if v.dtype != torch.int32:
        raise ShiftFormatError(f"V must be float or int32, got {v.dtype}")
    out = (bits.to(torch.int64).T @ v.to(torch.int64))
    if (out.abs() > (1 << 31) - 1).any():
        raise OverflowError("code_accumulate: an int32 sum overflows")
    return out.to(torch.int32)


def code_accumulate_pm1(codes: torch.Tensor, v: torch.Tensor, nbits: int) -> torch.Tensor:
    """``sum_t c[t, m] * V[t, n]`` for the +-1 codes c = 2 * bit - 1 (the paper's sign hashes)."""
    return 2 * code_accumulate(codes, v, nbits) - v.sum(0, dtype=v.dtype if v.is_floating_point() else torch.int64).to(
        torch.int32 if not v.is_floating_point() else v.dtype)


def code_accumulate_in_order(codes: torch.Tensor, v: torch.Tensor, nbits: int) -> torch.Tensor:
    """The batched masked accumulation ``[G, nbits, Nv]`` of ``codes [G, T, W]`` and float32 ``v [G, T, Nv]``
    summed over t in ascending order from +0 in float32: what every schedule of
    pigeon/shiftadd/tvm_add.py computes, bit for bit (the oracle of the generated kernels)."""
    m = torch.arange(nbits, device=codes.device)
    bits = ((codes[:, :, m // 32] >> (m % 32)) & 1).bool()
    out = torch.zeros(codes.shape[0], nbits, v.shape[2], dtype=torch.float32, device=v.device)
    zero = torch.zeros((), dtype=torch.float32, device=v.device)
    for t in range(codes.shape[1]):
        out += torch.where(bits[:, t, :, None], v[:, t, None, :].float(), zero)
    return out
