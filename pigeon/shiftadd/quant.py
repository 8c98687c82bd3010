"""Power-of-two weight quantization: w ~ sign * 2^p, sign in {-1, 0, +1}, p in [p_min, p_max].

Rounding (``quantize_shift``), elementwise on w:

- ``|w| < 2^(p_min - 1)`` (below the linear midpoint between 0 and the smallest power): sign 0,
  p = p_min (the canonical exponent of a zero weight);
- otherwise sign = sign(w), p = clamp(floor(log2|w| + 1/2), p_min, p_max): the exponent is rounded
  in the log domain (as DeepShift does), half up, then saturated to the range.

Packed format (``pack_shift``): each weight is a ``bits``-wide code (bits = 5 or 6),

    code = (neg << (bits - 1)) | f        f = p - p_min + 1  in 1 .. 2^(bits-1) - 1   (nonzero weight)
    code = 0                                                                        (zero weight)

so the low ``bits - 1`` bits hold the exponent field f (0 means a zero weight) and the top bit the
sign (1: negative).  A code width therefore holds at most 2^(bits-1) - 1 exponents: 5 bits hold 15
(e.g. -14..0), 6 bits hold 31 (the default range -15..0 has 16 exponents and needs 6 bits).
Codes are packed along K into int32 words, ``per_word = 32 // bits`` codes per word (6 for 5-bit
codes, 5 for 6-bit codes): weight ``[n, k]`` is bits ``[(k % per_word) * bits, (k % per_word + 1) *
bits)`` of word ``[n, k // per_word]`` (bit 0 the least significant).  The unused top bits of every
word (32 - per_word * bits = 2) and the codes past K in the last word are zero, so bit 31 is never
set and the words are non-negative int32.  ``packed`` has shape ``[N, ceil(K / per_word)]``.

The straight-through estimator (``ShiftSTE``, ``ste_shift``): the forward is
``dequantize_shift(*quantize_shift(w))``; the backward passes the gradient through unchanged where
``|w| <= 2^p_max`` (the representable magnitude) and gives 0 where ``|w| > 2^p_max`` (the forward
saturates there: clipped STE, as for a hardtanh).  Weights that round to zero still get the
gradient, so they can grow back into the range.
"""
from __future__ import annotations

import math

import torch

CODE_BITS = (5, 6)


class ShiftFormatError(ValueError):
    """A bad input to the shift quantization or its packed format."""


def _check_range(p_min: int, p_max: int) -> None:
    if not (isinstance(p_min, int) and isinstance(p_max, int)) or p_min > p_max:
        raise ShiftFormatError(f"shift range p_min={p_min!r}..p_max={p_max!r} is not an integer range with p_min <= p_max")
    if p_min < -127 or p_max > 127:
        raise ShiftFormatError(f"shift range {p_min}..{p_max} does not fit int8 exponents")


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ShiftFormatError(f"{name} must be a floating-point tensor, got "
                               f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


def _check_int8(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
        raise ShiftFormatError(f"{name} must be an int8 tensor, got "
                               f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


def quantize_shift(w: torch.Tensor, p_min: int = -15, p_max: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign int8 in {-1, 0, 1}, p int8 in [p_min, p_max])`` with ``w ~ sign * 2^p`` (module doc)."""
    _check_float("w", w)
    _check_range(p_min, p_max)
    a = w.detach().abs().to(torch.float64)
    zero = a < 2.0 ** (p_min - 1)
    p = torch.floor(torch.log2(torch.where(zero, torch.ones_like(a), a)) + 0.5).clamp(p_min, p_max)
    p = torch.where(zero, torch.full_like(p, p_min), p).to(torch.int8)
    sign = torch.where(zero, torch.zeros_like(a), torch.sign(w.detach().to(torch.float64))).to(torch.int8)
    return sign, p


def dequantize_shift(sign: torch.Tensor, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sign * 2^p`` in ``dtype`` (exact for float32 down to 2^-126)."""
    _check_int8("sign", sign)
    _check_int8("p", p)
    if sign.shape != p.shape:
        raise ShiftFormatError(f"sign has shape {tuple(sign.shape)} but p has shape {tuple(p.shape)}")
    return sign.to(dtype) * torch.pow(torch.tensor(2.0, dtype=torch.float64), p.to(torch.float64)).to(dtype)


def codes_per_word(bits: int) -> int:
    if bits not in CODE_BITS:
        raise ShiftFormatError(f"packed shift codes are {CODE_BITS} bits wide, got bits={bits!r}")
    return 32 // bits


def packed_shape(n: int, k: int, bits: int) -> tuple[int, int]:
    return (n, math.ceil(k / codes_per_word(bits)))


def min_code_bits(p_min: int, p_max: int) -> int:
    """The narrowest code width (5 or 6) holding the range's exponents, or a ShiftFormatError."""
    _check_range(p_min, p_max)
    for bits in CODE_BITS:
        if p_max - p_min + 1 <= (1 << (bits - 1)) - 1:
            return bits
    raise ShiftFormatError(f"shift range {p_min}..{p_max} has {p_max - p_min + 1} exponents; "
                           f"6-bit codes hold at most 31 (plus zero)")


def _check_bits(p_min: int, p_max: int, bits: int) -> None:
    codes_per_word(bits)
    n = p_max - p_min + 1
    cap = (1 << (bits - 1)) - 1
    if n > cap:
        raise ShiftFormatError(f"shift range {p_min}..{p_max} has {n} exponents; {bits}-bit codes hold at most "
                               f"{cap} (plus zero): use bits={min_code_bits(p_min, p_max)} or narrow the range")


def pack_shift(sign: torch.Tensor, p: torch.Tensor, p_min: int = -15, p_max: int = 0,
               bits: int | None = None) -> torch.Tensor:
    """Pack ``sign``, ``p`` (int8 ``[N, K]``) into int32 ``[N, ceil(K / (32 // bits))]`` (module doc).

    ``bits`` defaults to the narrowest width holding ``p_min..p_max``.  The exponent of a zero weight
    is not stored (it unpacks as p_min)."""
    _check_int8("sign", sign)
    _check_int8("p", p)
    if sign.dim() != 2 or sign.shape != p.shape:
        raise ShiftFormatError(f"sign and p must both be [N, K]; got sign {tuple(sign.shape)}, p {tuple(p.shape)}")
    _check_range(p_min, p_max)
    bits = min_code_bits(p_min, p_max) if bits is None else bits
    _check_bits(p_min, p_max, bits)
    if ((sign < -1) | (sign > 1)).any():
        raise ShiftFormatError("sign must hold only -1, 0, 1")
    nz = sign != 0
    if (nz & ((p < p_min) | (p > p_max))).any():
        bad = p[nz & ((p < p_min) | (p > p_max))]
        raise ShiftFormatError(f"p holds exponents {int(bad.min())}..{int(bad.max())} outside the packed range "
                               f"{p_min}..{p_max}")
    n, k = sign.shape
    per = 32 // bits
    f = torch.where(nz, p.to(torch.int64) - p_min + 1, torch.zeros((), dtype=torch.int64))
    code = f | ((sign < 0).to(torch.int64) << (bits - 1))
    words = math.ceil(k / per)
    code = torch.nn.functional.pad(code, (0, words * per - k)).reshape(n, words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=sign.device) * bits
    return (code << shifts).sum(-1).to(torch.int32)


def unpack_shift(packed: torch.Tensor, k: int, p_min: int = -15, p_max: int = 0,
                 bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_shift``: ``(sign, p)`` int8 ``[N, k]``; zero weights get p = p_min."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise ShiftFormatError(f"packed must be an int32 tensor, got "
                               f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}")
    _check_range(p_min, p_max)
    bits = min_code_bits(p_min, p_max) if bits is None else bits
    _check_bits(p_min, p_max, bits)
    per = 32 // bits
    words = math.ceil(k / per)
    if packed.dim() != 2 or packed.shape[1] != words:
        raise ShiftFormatError(f"packed has shape {tuple(packed.shape)}, expected [N, {words}] "
                               f"(K={k}, {per} {bits}-bit codes per int32 word)")
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    code = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :k]
    f = code & ((1 << (bits - 1)) - 1)
    if (f > p_max - p_min + 1).any():
        raise ShiftFormatError(f"packed holds exponent fields up to {int(f.max())}, past the range {p_min}..{p_max}")
    neg = (code >> (bits - 1)) & 1
    nz = f != 0
    sign = torch.where(nz, 1 - 2 * neg, torch.zeros_like(neg)).to(torch.int8)
    p = torch.where(nz, f - 1 + p_min, torch.full_like(f, p_min)).to(torch.int8)
    return sign, p


class ShiftSTE(torch.autograd.Function):
    """Forward: the power-of-two quantization of w; backward: the gradient where |w| <= 2^p_max, else 0."""

    @staticmethod
    def forward(ctx, w, p_min: int = -15, p_max: int = 0):
        sign, p = quantize_shift(w, p_min, p_max)
        ctx.save_for_backward(w)
        ctx.p_max = p_max
        return dequantize_shift(sign, p, w.dtype)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 2.0 ** ctx.p_max, g, torch.zeros_like(g)), None, None


def ste_shift(w: torch.Tensor, p_min: int = -15, p_max: int = 0) -> torch.Tensor:
    return ShiftSTE.apply(w, p_min, p_max)
