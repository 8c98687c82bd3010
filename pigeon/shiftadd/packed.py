"""The weight-only packed path's format and oracle (the kernel: pigeon/templates/shiftadd.packed.cu.jinja).

``pad_words(packed)``: quant.py's packed codes ``[N, ceil(K / per)]`` with each row padded by zero
words (zero weights) to ``ldw``, a multiple of 4 words, so every row starts 16-byte aligned and the
kernel reads it in 128-bit vectors.

``packed_linear_ref(x, packed, k, ...)`` is the meaning the kernel must match: ``x [M, K]`` (bf16,
fp16 or fp32) times ``(sign * 2^p)^T`` plus an optional float32 bias, computed exactly in float64
(every product of a bf16/fp16/fp32 value and a power of two is exact; the sum is float64).  The
kernel sums the same exact products in float32 in its own order and rounds once to x's dtype, so
it is compared with a tolerance (float32 sums: relative 1e-5 of sum |x w|; bf16/fp16: one rounding
of the output on top)."""
from __future__ import annotations

import torch

from .quant import ShiftFormatError, codes_per_word, dequantize_shift, unpack_shift

VECTOR_WORDS = 4          # 128 bits


def padded_words(k: int, bits: int) -> int:
    words = -(-k // codes_per_word(bits))
    return -(-words // VECTOR_WORDS) * VECTOR_WORDS


def pad_words(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """``packed [N, ceil(K / per)]`` -> int32 ``[N, ldw]``, ldw a multiple of 4, zero words after each row."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise ShiftFormatError(f"packed must be 2-d int32 codes, got "
                               f"{(packed.dtype, tuple(packed.shape)) if isinstance(packed, torch.Tensor) else type(packed).__name__}")
    words = -(-k // codes_per_word(bits))
    if packed.shape[1] != words:
        raise ShiftFormatError(f"packed has shape {tuple(packed.shape)}, expected [N, {words}] (K={k}, {bits}-bit codes)")
    return torch.nn.functional.pad(packed, (0, padded_words(k, bits) - words)).contiguous()


def packed_linear_ref(x: torch.Tensor, packed: torch.Tensor, k: int, p_min: int = -15, p_max: int = 0,
                      bits: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``x @ (sign * 2^p)^T (+ bias)`` from quant.py's (unpadded or padded) packed codes."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dim() != 2:
        raise ShiftFormatError(f"x must be a 2-d bf16/fp16/fp32 tensor, got "
                               f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != k:
        raise ShiftFormatError(f"x has shape {tuple(x.shape)}, expected [M, {k}]")
    bits = bits if bits is not None else (5 if p_max - p_min + 1 <= 15 else 6)
    words = -(-k // codes_per_word(bits))
    sign, p = unpack_shift(packed[:, :words].contiguous(), k, p_min, p_max, bits)
    y = x.to(torch.float64) @ dequantize_shift(sign, p, torch.float64).T
    return y if bias is None else y + bias.to(torch.float64)
