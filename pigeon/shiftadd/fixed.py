"""Q16.16 fixed point and the shift linear's references.

Q16.16: an int32 ``q`` stands for ``q / 2^16`` (16 integer bits incl. the sign, 16 fraction bits).
``to_fixed`` rounds ``x * 2^16`` half to even (torch.round) and saturates to the int32 range.

``shift_linear_ref(x, sign, p)`` is the integer meaning every shift-linear kernel must match bit for
bit:

    out[m, n] = sum_k sign[n, k] * (x[m, k] >> -p[n, k])        p in [-31, 0]

``>>`` is the arithmetic right shift of an int32: it floors toward -inf (-1 >> 1 == -1, -3 >> 1 ==
-2), it does not truncate toward zero.  The sign is applied after the shift, so a negative weight
gives -(x >> s), not (-x) >> s.

Accumulation: the reference sums in int64 and checks, per output, that the sum of the absolute
values of the terms fits int32 (< 2^31); otherwise it raises OverflowError.  Under that check no
partial sum in any order can leave int32, so a kernel accumulating in int32 (the TVM kernels do) is
bit-exact with the reference whatever its reduction order.  Inputs past that bound are outside the
format's contract: nothing promises wraparound.
"""
from __future__ import annotations

import torch

from .quant import ShiftFormatError, dequantize_shift

FRAC_BITS = 16
_ONE = 1 << FRAC_BITS
_I32 = (-(1 << 31), (1 << 31) - 1)


def to_fixed(x: torch.Tensor) -> torch.Tensor:
    """float -> Q16.16 int32 (round half to even, saturating)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ShiftFormatError(f"to_fixed takes a floating-point tensor, got "
                               f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    return torch.round(x.to(torch.float64) * _ONE).clamp(*_I32).to(torch.int32)


def from_fixed(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q16.16 int32 -> float (exact in float64; float32 rounds past 24 significant bits)."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int32:
        raise ShiftFormatError(f"from_fixed takes an int32 Q16.16 tensor, got "
                               f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    return (q.to(torch.float64) / _ONE).to(dtype)


def _check_weights(sign, p, k: int | None):
    for name, t in (("sign", sign), ("p", p)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise ShiftFormatError(f"{name} must be an int8 tensor, got "
                                   f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if sign.dim() != 2 or sign.shape != p.shape:
        raise ShiftFormatError(f"sign and p must both be [N, K]; got sign {tuple(sign.shape)}, p {tuple(p.shape)}")
    if k is not None and sign.shape[1] != k:
        raise ShiftFormatError(f"sign has shape {tuple(sign.shape)}, expected [N, {k}] (x has K={k})")


def shift_linear_ref(x: torch.Tensor, sign: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_k sign[n,k] * (x[m,k] >> -p[n,k])``: int32 ``[M, N]`` from Q16.16 int32 ``x [M, K]`` and
    int8 ``sign``, ``p [N, K]`` (module doc: arithmetic shift, int64 sum, checked to fit int32)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
        raise ShiftFormatError(f"x must be an int32 Q16.16 tensor (to_fixed), got "
                               f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 2:
        raise ShiftFormatError(f"x has shape {tuple(x.shape)}, expected [M, K]")
    _check_weights(sign, p, x.shape[1])
    if ((p > 0) | (p < -31)).any():
        raise ShiftFormatError(f"p holds {int(p.min())}..{int(p.max())}; the fixed-point shift takes p in -31..0")
    terms = (x.to(torch.int64).unsqueeze(1) >> (-p.to(torch.int64)).unsqueeze(0)) * sign.to(torch.int64).unsqueeze(0)
    bound = terms.abs().sum(-1)
    if (bound > _I32[1]).any():
        raise OverflowError(f"shift_linear_ref: sum_k |term| reaches {int(bound.max())} >= 2^31 for some output; "
                            "int32 accumulation could overflow")
    return terms.sum(-1).to(torch.int32)


def shift_linear_float(x: torch.Tensor, sign: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x @ (sign * 2^p)^T`` in x's floating dtype."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ShiftFormatError(f"x must be a floating-point tensor, got "
                               f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_weights(sign, p, x.shape[-1])
    return x @ dequantize_shift(sign, p, x.dtype).T
