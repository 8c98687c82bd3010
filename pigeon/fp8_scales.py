"""fp8 (e4m3) scale layouts: the block size and dequantization shared by pigeon.fp8_gemm's reference
(pigeon/runtime/gemm_fused.py) and ``pigeon bench gemm``'s peers; plain torch, below everything."""
from __future__ import annotations

import torch

BLOCK = 128            # fp8 block-scale granularity (1x128 for a, 128x128 for b)


def dequantize(x: torch.Tensor, scale: torch.Tensor, rows_per_block: int, cols_per_block: int) -> torch.Tensor:
    """``x`` (float8) times its scales, in float32: ``scale`` per tensor (numel 1), per row / column
    (broadcastable to x), or per ``rows_per_block x cols_per_block`` block."""
    xf = x.float()
    s = scale.float()
    if s.numel() == 1:
        return xf * s.reshape(())
    if s.dim() == 2 and tuple(s.shape) != tuple(x.shape) and (s.shape[0] in (1, x.shape[0]) and s.shape[1] in (1, x.shape[1])):
        return xf * s
    s = s.repeat_interleave(rows_per_block, 0)[:x.shape[0]].repeat_interleave(cols_per_block, 1)[:, :x.shape[1]]
    return xf * s
