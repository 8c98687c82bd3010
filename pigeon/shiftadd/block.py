"""A ShiftAdd ViT block (issue 9): LayerNorm -> AddAttention -> residual -> LayerNorm -> MoEMLP ->
residual, over x [B, N, dim]; ``forward`` returns ``(y, balance_loss)`` so the router's
latency-aware loss can enter the training loss with a coefficient.

It lives here, not in pigeon/models/: that package holds DSL specs (``@pg.layer`` functions that
``pigeon.compile`` turns into modules over a graph; the CLI and ``pigeon bench`` iterate its
``MODELS``), and this block is a torch.nn.Module built from the ShiftAdd layers of layers.py.
Nothing of it is compiled through the DSL/IR yet (no ShiftAdd ops in the IR); the MoE MLP's token
dispatch and combine are generated kernels (pigeon/shiftadd/moe.py, shiftadd.moe.cu.jinja) with
their backward through autograd; see layers.py for what each part runs.
"""
from __future__ import annotations

import torch

from .layers import AddAttention, MoEMLP


class ShiftAddViTBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int = 2, mlp_ratio: float = 2.0, k: int = 1, latencies=None,
                 res_kernel: int = 9, binary: bool = True, attn_linear: str = "dense"):
        super().__init__()
        self.dim = dim
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = AddAttention(dim, heads, res_kernel=res_kernel, binary=binary, linear=attn_linear)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = MoEMLP(dim, int(dim * mlp_ratio), k=k, latencies=latencies)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ShiftAddViTBlock: x has shape {shape}, expected [B, N, {self.dim}]")
        x = x + self.attn(self.norm1(x))
        b, n, c = x.shape
        m, balance = self.mlp(self.norm2(x).reshape(b * n, c))
        return x + m.reshape(b, n, c), balance
