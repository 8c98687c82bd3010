"""The latency-aware load-balancing loss of the mixture of multiplication primitives.

    loss = CV^2(w * importance) + CV^2(w * load)

- ``importance[e] = sum_t gates[t, e]`` (the gates after top-k: zero outside a token's top k);
- ``load[e]``: by default the number of tokens routed to e, ``(gates > 0).sum(0)``, a count with no
  gradient; ShiftAddViT's NoisyGate (GATECH-EIC/ShiftAddViT, pvt/fmoe_new.py, after Shazeer et al.
  2017) uses instead, when k < E, the differentiable estimate ``sum_t P(e in top k of token t)``
  under the gate noise: ``noisy_top_k_load`` computes it, pass it as ``load=``;
- ``w[e] = latency[e] / mean(latency)``: slower experts weigh more, so balancing ``w * importance``
  sends them fewer tokens.  ShiftAddViT hard-codes w = (6, 4) for (multiply MLP, shift MLP); that
  is latencies in the ratio 6:4.  CV^2 is scale-invariant, so the mean normalization changes nothing
  but the effect of eps;
- ``CV^2(v) = var(v) / (mean(v)^2 + eps)`` with eps = 1e-10 and, as in the reference code, torch's
  unbiased variance (``unbiased=False`` for the population variance); 0 for a single expert.
"""
from __future__ import annotations

import torch


def latency_weights(latencies: torch.Tensor) -> torch.Tensor:
    if not isinstance(latencies, torch.Tensor) or latencies.dim() != 1 or not latencies.is_floating_point():
        raise ValueError("latencies must be a 1-d floating-point tensor [E]")
    if latencies.device.type == "cpu" and (latencies <= 0).any():      # (on CUDA this would be a host sync per call;
        raise ValueError("latencies must be positive")                # MoEMLP checks its latencies when built)
    return latencies / latencies.mean()


def cv_squared(v: torch.Tensor, eps: float = 1e-10, unbiased: bool = True) -> torch.Tensor:
    if v.numel() <= 1:
        return torch.zeros((), dtype=v.dtype)
    return v.var(unbiased=unbiased) / (v.mean() ** 2 + eps)


def moe_balance_loss(gates: torch.Tensor, latencies: torch.Tensor, load: torch.Tensor | None = None,
                     eps: float = 1e-10, unbiased: bool = True) -> torch.Tensor:
    """``CV^2(w * importance) + CV^2(w * load)`` for ``gates [T, E]`` after top-k (module doc)."""
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or not gates.is_floating_point():
        raise ValueError("gates must be a 2-d floating-point tensor [T, E]")
    if latencies.shape != (gates.shape[1],):
        raise ValueError(f"latencies has shape {tuple(latencies.shape)}, expected [{gates.shape[1]}] (gates is "
                         f"{tuple(gates.shape)})")
    w = latency_weights(latencies).to(gates.dtype)
    importance = gates.sum(0)
    if load is None:
        load = (gates > 0).sum(0).to(gates.dtype)
    elif load.shape != (gates.shape[1],):
        raise ValueError(f"load has shape {tuple(load.shape)}, expected [{gates.shape[1]}]")
    return cv_squared(w * importance, eps, unbiased) + cv_squared(w * load.to(gates.dtype), eps, unbiased)


def noisy_top_k_load(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: torch.Tensor,
                     k: int) -> torch.Tensor:
    """``load[e] = sum_t P(e in the top k of token t)``, resampling only e's own noise (Shazeer et
    al. 2017): e stays in (or gets in) if its noisy logit passes the k-th largest of the others,
    which is the (k+1)-th noisy value if e is in the top k now and the k-th otherwise."""
    e = clean_logits.shape[1]
    if not 0 < k < e:
        raise ValueError(f"noisy_top_k_load needs 0 < k < E, got k={k}, E={e}")
    top = noisy_logits.topk(k + 1, dim=1).values
    thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]
    normal = torch.distributions.Normal(torch.zeros((), dtype=clean_logits.dtype), torch.ones((), dtype=clean_logits.dtype))
    prob = torch.where(noisy_logits > thr_in, normal.cdf((clean_logits - thr_in) / noise_std),
                       normal.cdf((clean_logits - thr_out) / noise_std))
    return prob.sum(0)
