"""The fp8 tensor-core path of the shift linear: power-of-two weights are exact in float8_e5m2.

e5m2 holds 2^-16 .. 2^15 exactly (normals from 2^-14, subnormals 2^-15 and 2^-16), so every weight
sign * 2^p of a range inside -16..15 converts to e5m2 without error (``weights_e5m2`` checks the
range and the round trip).  The activations are not powers of two: ``quantize_rows_e4m3`` scales
each row by amax / 448 into float8_e4m3fn (3 mantissa bits: a relative error up to 2^-4 per
element, so this path is lossy in x, unlike the shift and packed paths).  ``shift_linear_fp8`` runs
``torch._scaled_mm(x_e4m3, w_e5m2^T)`` on tensor cores with the row scales: rowwise scales
(``scale_a [M, 1]``, ``scale_b [1, N]``, bf16 out) where this torch/cuBLAS takes them for an e4m3 x
e5m2 product, else per-tensor scales of 1 and the row scale applied to the output after
(``last_mode()`` says which ran).  cuBLAS needs K and N to be multiples of 16.

Per call: the row quantization is one generated kernel on CUDA (``quantize_rows_e4m3``: two
empty outputs and a launch; it was 7-10 torch ops, ~130 us of host time on the H200), the product
one; ``scale_b`` (ones) is made once per (N,
device); the optional ``bias`` is added in place into the product's output (one op).  The checks
are on shapes and dtypes only (no GPU reads)."""
from __future__ import annotations

import torch

from . import devinfo
from .quant import ShiftFormatError, dequantize_shift

E5M2_P = (-16, 15)
E4M3_MAX = 448.0
_MODE: dict = {}          # device -> "rowwise" | "tensorwise", the first that ran
_ONES: dict = {}          # (N, device) -> float32 ones [1, N] (scale_b of the rowwise product)
_ONE: dict = {}           # device -> float32 scalar one
_TINY = 2.0 ** -126       # the scale of an all-zero row (any positive scale gives zeros)


def check_range_e5m2(p_min: int, p_max: int) -> None:
    if p_min < E5M2_P[0] or p_max > E5M2_P[1]:
        raise ShiftFormatError(f"shift range {p_min}..{p_max} is not exact in float8_e5m2 (powers of two "
                               f"2^{E5M2_P[0]}..2^{E5M2_P[1]}): the fp8 path cannot take it")


def weights_e5m2(sign: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sign * 2^p`` as float8_e5m2 ``[N, K]``, checked exact (ShiftFormatError otherwise)."""
    nz = sign != 0
    if nz.any():
        check_range_e5m2(int(p[nz].min()), int(p[nz].max()))
    w = dequantize_shift(sign, p, torch.float32)
    w8 = w.to(torch.float8_e5m2)
    if not torch.equal(w8.to(torch.float32), w):
        raise ShiftFormatError("a quantized weight does not survive the float8_e5m2 round trip")
    return w8


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ShiftFormatError(f"quantize_rows_e4m3: x must be a 2-d floating tensor, got "
                               f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_e4m3 [M, K], scale float32 [M, 1])`` with ``x ~ x_e4m3 * scale`` (scale = amax / 448;
    2^-126 for an all-zero row, whose codes are then zeros).  On CUDA (bf16/fp16/fp32 x) one launch
    of the generated kernel (pigeon/codegen/shiftadd_quant.py, bit-exact with the torch form), else
    the torch form ``quantize_rows_e4m3_ref``."""
    _check_x(x)
    if x.dtype in _KERNEL_DTYPES and devinfo.on_gpu(x):
        from ..runtime.shiftadd_kernel import quantize_rows_e4m3 as kernel
        return kernel(x)
    return quantize_rows_e4m3_ref(x)


def quantize_rows_e4m3_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch form of :func:`quantize_rows_e4m3` (the oracle of the kernel, and the CPU path):
    abs, amax, float, div by 448 (a true division: torch on CUDA multiplies by the reciprocal of a
    scalar divisor, which can move the scale by an ulp, so the kernel's GPU test takes this on the
    CPU), clamp_min 2^-126, div, clamp to +-448, to float8_e4m3fn."""
    _check_x(x)
    x = x.detach()
    scale = torch.div(x.abs().amax(dim=1, keepdim=True).float(), E4M3_MAX).clamp_min_(_TINY)
    # x / scale is float32 (promotion); |x / scale| <= 448 up to rounding, clamped so no NaN code appears
    return torch.div(x, scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def check_shapes(m: int, n: int, k: int) -> str | None:
    """Why cuBLAS's fp8 GEMM cannot take ``[M, K] x [K, N]`` (None if it can)."""
    if k % 16 or n % 16:
        return f"K={k} and N={n} must be multiples of 16 for cuBLAS fp8"
    return None


def shift_linear_fp8(x: torch.Tensor, w8: torch.Tensor, out_dtype: torch.dtype | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w^T (+ bias [N])`` for the e5m2 weights ``w8 [N, K]`` by ``torch._scaled_mm`` (module doc)."""
    if not isinstance(w8, torch.Tensor) or w8.dtype != torch.float8_e5m2 or w8.dim() != 2:
        raise ShiftFormatError(f"shift_linear_fp8: weights must be 2-d float8_e5m2 (weights_e5m2), got "
                               f"{(w8.dtype, tuple(w8.shape)) if isinstance(w8, torch.Tensor) else type(w8).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 or x.shape[1] != w8.shape[1]:
        raise ShiftFormatError(f"shift_linear_fp8: x has shape {tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}, "
                               f"expected [M, {w8.shape[1]}] floating")
    n, k = w8.shape
    if k % 16 or n % 16:
        raise ShiftFormatError(f"shift_linear_fp8: {check_shapes(x.shape[0], n, k)}")
    dev = x.device
    if not devinfo.on_gpu(x) or dev != w8.device:
        raise ShiftFormatError(f"shift_linear_fp8 runs on CUDA (torch._scaled_mm); x is on {dev}, w on {w8.device}")
    out_dtype = out_dtype or x.dtype
    xq, sx = quantize_rows_e4m3(x)
    mode = _MODE.get(dev)
    y = None
    if mode is None or mode == "rowwise":
        ones = _ONES.get((n, dev))
        if ones is None:
            ones = _ONES[(n, dev)] = torch.ones(1, n, dtype=torch.float32, device=dev)
        try:
            y = torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=ones, out_dtype=torch.bfloat16)
            if mode is None:
                _MODE[dev] = "rowwise"
        except RuntimeError:
            if mode == "rowwise":
                raise
    if y is None:
        one = _ONE.get(dev)
        if one is None:
            one = _ONE[dev] = torch.ones((), dtype=torch.float32, device=dev)
        y = torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        _MODE[dev] = "tensorwise"
        y.mul_(sx)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    if bias is not None:
        y.add_(bias)
    return y


def last_mode(device) -> str | None:
    """"rowwise" or "tensorwise": how shift_linear_fp8 last ran on ``device`` (None: not yet)."""
    return _MODE.get(torch.device(device))
