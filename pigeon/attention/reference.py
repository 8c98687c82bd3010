"""The oracle of every attention variant: dense masked softmax attention with plain torch ops.

``attention_reference(q, k, v, ...)`` computes ``softmax(scale * q k^T, modified and masked) v``
in the inputs' dtype (float64 in the tests), for

* the dense layout ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]`` (as SDPA), or the packed
  variable-length layout ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` with ``cu_seqlens [N + 1]``: N
  documents of lengths ``cu_seqlens[i + 1] - cu_seqlens[i]``, each attending only to itself
  (inside a document ``b`` is the document's index and ``q_idx``/``kv_idx`` are positions in it);
* GQA/MQA: query head h reads KV head ``h // (Hq / Hkv)``;
* a traced ``score_mod`` and ``mask_mod`` (pigeon/attention/mods.py), evaluated by the one torch
  evaluator of the expression IR (pigeon/semantics.py ``eval_expr``), and a ``pattern``
  (pigeon/attention/patterns.py) through its dense mask.

A query row that attends to nothing gets output 0 and log-sum-exp -inf.  Returns ``(out, lse)``,
``lse [B, Hq, Sq]`` (packed: ``[Hq, T]``) the natural-log sum of exp of the row's modified scores:
what sequence-parallel attention merges partial results with.
"""
from __future__ import annotations

import torch

from ..ir.expr import Expr
from ..semantics import eval_expr
from .patterns import dense_mask


def _eval_mod(e: Expr, scores: torch.Tensor | None, B: int, H: int, Sq: int, Skv: int,
              device, batch_ids=None) -> torch.Tensor:
    """A traced modifier at every (b, h, q, kv): [B, H, Sq, Skv]."""
    n = B * H * Sq * Skv
    grids = torch.meshgrid(torch.arange(B, device=device), torch.arange(H, device=device),
                           torch.arange(Sq, device=device), torch.arange(Skv, device=device), indexing="ij")
    if batch_ids is not None:
        grids = (batch_ids.view(-1, 1, 1, 1).expand(B, H, Sq, Skv),) + grids[1:]
    flat = {name: g.reshape(n) for name, g in zip(("batch", "head", "query", "key"), grids)}

    def leaf(node):
        if node.op == "var" and node.fn == "score":
            if scores is None:
                raise ValueError("a mask_mod cannot read the score")
            return scores.reshape(n)
        if node.op == "index" and node.fn in flat:
            return flat[node.fn].to(torch.int32)
        raise ValueError(f"{node.op} {node.fn!r} is not bound in an attention modifier")
    dt = scores.dtype if scores is not None else None
    return eval_expr(e, n, leaf, device, dt if dt == torch.float64 else None).reshape(B, H, Sq, Skv)


def _dense(q, k, v, score_mod, mask_mod, pattern, scale, doc=None, keep_pattern=None):
    """(out, lse) of one [B, H, S, D] batch; ``keep_pattern`` a bool mask (broadcastable to
    [B, H, Sq, Skv]) standing for the pattern where the caller has it as a mask already (the ops'
    semantics take the pattern from its block lists)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * scale
    if score_mod is not None:
        s = _eval_mod(score_mod, s, B, Hq, Sq, Skv, q.device, doc).to(s.dtype)
    keep = torch.ones(1, 1, Sq, Skv, dtype=torch.bool, device=q.device)
    if mask_mod is not None:
        keep = keep & _eval_mod(mask_mod, None, B, Hq, Sq, Skv, q.device, doc)
    if pattern is not None:
        keep = keep & dense_mask(pattern, B, Hq, Sq, Skv, q.device)
    if keep_pattern is not None:
        keep = keep & keep_pattern
    keep = keep.expand(B, Hq, Sq, Skv)
    has = keep.any(-1)
    # rows that attend to nothing get zeros before the softmax (finite: no NaN in the gradients)
    # and are zeroed after it
    s = torch.where(has[..., None], s.masked_fill(~keep, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]) * keep
    out = torch.einsum("bhqk,bhkd->bhqd", p, vv)
    return out, torch.where(has, lse, torch.full_like(lse, float("-inf")))


def attention_reference(q, k, v, *, score_mod: Expr | None = None, mask_mod: Expr | None = None,
                        pattern=None, scale: float | None = None, cu_seqlens: torch.Tensor | None = None):
    """(out, lse) of the attention variant; the inputs are assumed checked (pigeon/attention/api.py)."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _dense(q, k, v, score_mod, mask_mod, pattern, scale)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for i, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
        qi, ki, vi = (t[s0:s1].transpose(0, 1)[None] for t in (q, k, v))      # [1, H, L, D]
        doc = torch.tensor([i], device=q.device)
        o, lse = _dense(qi, ki, vi, score_mod, mask_mod, pattern, scale, doc)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)
