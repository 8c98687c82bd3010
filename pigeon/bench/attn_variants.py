"""The attention variants of ``pigeon bench attention``: for each, pigeon's arguments, the
FlexAttention score_mod / mask_mod written out for the same semantics, SDPA's way to run it (a
causal flag, a dense mask, or not at all), the kept fraction of (query, key) pairs, and the slice
that the check compares with the float64 reference.

Variants (B batch, H query heads, S sequence length, D head dim):

- ``dense``: no mask.  ``causal``: ``kv <= q``.
- ``window``: causal sliding window, ``0 <= q - kv < window`` (``--window``, 1024).
- ``s2``: S2-Attention's per-head strided shards: blocks of 64 keys, stride 8, 2 local blocks
  (``pigeon.attention.S2(8, 2, block=64)``), causal.
- ``alibi``: causal with the ALiBi bias ``score + slope_h * (kv - q)``, ``slope_h = 2^(-8 (h+1) / H)``.
- ``softcap``: non-causal with soft-capping ``20 tanh(score / 20)``.
- ``document``: documents packed with ``cu_seqlens``: each of the B sequences of S tokens holds
  documents of S/2, S/4, S/8 and S/8 tokens, causal inside each; pigeon takes them packed
  ``[B*S, H, D]``, the peers as one sequence ``[1, H, B*S, D]`` with the equivalent mask.
- ``topk-g2`` / ``topk-g4``: Native Sparse Attention's selection: per (batch, KV head, query block
  of 128) ``min(8, key blocks / 2)`` distinct key blocks of 128 drawn at random (outside the timed
  region), shared by the query heads of a KV group (GQA, group 2 or 4): ``pigeon.attention.TopK``;
  Flex gets the same blocks as a block mask, SDPA as a dense mask with K/V expanded to the query
  heads (outside the timed region).

The scores are ``q k^T / sqrt(D)`` before the modifiers, for every implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import pigeon.attention as pa

VARIANTS = ("dense", "causal", "window", "s2", "alibi", "softcap", "document", "topk-g2", "topk-g4")
DENSE = ("dense", "causal")                        # against SDPA
MASKED = VARIANTS[2:]                              # against FlexAttention
TOPK = ("topk-g2", "topk-g4")
GROUP = {"topk-g2": 2, "topk-g4": 4}
S2_STRIDE, S2_LOCAL, S2_BLOCK = 8, 2, 64
SOFTCAP = 20.0
TOPK_BLOCK, TOPK_BLOCKS = 128, 8
DOC_PARTS = (2, 4, 8, 8)                           # documents of S/2, S/4, S/8, S/8 tokens per sequence
CHECK_ROWS = 256                                   # query rows the check compares (the last ones)
SEQ_MULTIPLE = 128                                 # S must be a multiple (top-k blocks, S2 blocks, documents)


def group_of(variant: str) -> int:
    return GROUP.get(variant, 1)


def describe(variant: str, window: int) -> str:
    return {"dense": "no mask", "causal": "causal",
            "window": f"causal sliding window {window}",
            "s2": f"S2 shards: stride {S2_STRIDE}, {S2_LOCAL} local blocks of {S2_BLOCK}, causal",
            "alibi": "causal + ALiBi bias", "softcap": f"soft-capping {SOFTCAP:g} tanh(s / {SOFTCAP:g})",
            "document": "packed documents S/2, S/4, S/8, S/8 per sequence (cu_seqlens), causal",
            "topk-g2": f"top-k blocks of {TOPK_BLOCK} (<= {TOPK_BLOCKS} per query block), GQA group 2",
            "topk-g4": f"top-k blocks of {TOPK_BLOCK} (<= {TOPK_BLOCKS} per query block), GQA group 4"}[variant]


def doc_lengths(S: int) -> list[int]:
    lens = [S // p for p in DOC_PARTS[:-1]]
    return lens + [S - sum(lens)]


def topk_count(S: int) -> int:
    return min(TOPK_BLOCKS, max(1, (S // TOPK_BLOCK) // 2))


def kept_fraction(variant: str, H: int, S: int, window: int) -> float:
    """The fraction of the B*H*S*S (query, key) pairs the variant attends (every batch alike)."""
    if variant in ("dense", "softcap"):
        return 1.0
    if variant in ("causal", "alibi"):
        return (S + 1) / (2 * S)
    if variant == "window":
        w = min(window, S)
        return (w * (w + 1) / 2 + (S - w) * w) / S**2
    if variant == "document":
        return sum(n * (n + 1) / 2 for n in doc_lengths(S)) / S**2
    if variant in TOPK:
        return topk_count(S) * TOPK_BLOCK / S
    if variant == "s2":        # per head: the kept key blocks left of the diagonal are full, the diagonal causal
        nb, b = S // S2_BLOCK, S2_BLOCK
        i = torch.arange(nb)[:, None]
        j = torch.arange(nb)[None, :]
        total = 0
        for h in range(H):
            off = ((((j + h) % S2_STRIDE) == 0) | (j > i - S2_LOCAL)) & (j < i)
            total += int(off.sum()) * b * b + nb * b * (b + 1) // 2
        return total / (H * S**2)
    raise ValueError(variant)


def flops(variant: str, B: int, H: int, S: int, D: int, mode: str, window: int) -> float:
    """4 B H S^2 D (QK^T and PV, 2 FLOPs per multiply-add) times the kept fraction; the backward
    counts 2.5 times the forward, so forward+backward is 3.5 times it."""
    f = 4.0 * B * H * S * S * D * kept_fraction(variant, H, S, window)
    return f if mode == "forward" else 3.5 * f


# ------------------------------------------------------------------------------ the modifiers

def alibi_slope_log(H: int) -> float:
    return -8.0 * math.log(2.0) / H          # slope_h = exp((h + 1) * this) = 2^(-8 (h+1) / H)


def pigeon_alibi(H: int, q_offset: int = 0):
    c = alibi_slope_log(H)
    return lambda s, b, h, q, kv: s + pa.exp((h + 1) * c) * (kv - (q + q_offset))


def pigeon_softcap(s, b, h, q, kv):
    return SOFTCAP * pa.tanh(s / SOFTCAP)


def flex_alibi(H: int):
    c = alibi_slope_log(H)

    def score_mod(score, b, h, q, kv):
        return score + torch.exp((h + 1) * c) * (kv - q)
    return score_mod


def flex_softcap(score, b, h, q, kv):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def flex_causal(b, h, q, kv):
    return q >= kv


def flex_window(window: int):
    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv < window)
    return mask_mod


def flex_s2(b, h, q, kv):
    kb, qb = kv // S2_BLOCK, q // S2_BLOCK
    return ((((kb + h) % S2_STRIDE) == 0) | (kb > qb - S2_LOCAL)) & (kv <= q)


def flex_document(doc: torch.Tensor):
    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)
    return mask_mod


def flex_topk(sel: torch.Tensor, group: int):
    def mask_mod(b, h, q, kv):
        return sel[b, h // group, q // TOPK_BLOCK, kv // TOPK_BLOCK]
    return mask_mod


# ------------------------------------------------------------------------------ one problem

@dataclass
class Problem:
    """The inputs of one case in pigeon's layout (dense ``[B, H, S, D]`` / ``[B, Hkv, S, D]``, or
    packed ``[B*S, H, D]`` for ``document``) and everything each implementation needs."""
    variant: str
    B: int
    H: int
    S: int
    D: int
    dtype: torch.dtype
    window: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    doc: torch.Tensor | None = None                # packed: the document of each token
    indices: torch.Tensor | None = None            # top-k: [B, Hkv, S / 128, k]
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> int:
        return group_of(self.variant)

    @property
    def Hkv(self) -> int:
        return self.H // self.group

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def device(self):
        return self.q.device

    def pattern(self, rows: int | None = None):
        """pigeon's pattern (for the check's slice of the last ``rows`` query rows of batch 0 and
        its first heads: top-k indices sliced alike)."""
        v = self.variant
        if v in ("causal", "alibi", "document"):
            return pa.Causal()
        if v == "window":
            return pa.SlidingWindow(self.window, causal=True)
        if v == "s2":
            return pa.S2(S2_STRIDE, S2_LOCAL, block=S2_BLOCK)
        if v in TOPK:
            idx = self.indices
            if rows is not None:
                hk = check_heads(self.H, self.group) // self.group
                idx = idx[:1, :hk, -(rows // TOPK_BLOCK):]
            return pa.TopK(idx, TOPK_BLOCK, TOPK_BLOCK)
        return None

    def pigeon_kwargs(self, q_offset: int = 0) -> dict:
        """pigeon.attention.attention's keyword arguments (``q_offset``: the check's slice starts at
        that query row, so the score_mod sees the absolute position)."""
        kw = {"pattern": self.pattern(), "enable_gqa": self.group > 1, "cu_seqlens": self.cu_seqlens}
        if self.variant == "alibi":
            kw["score_mod"] = pigeon_alibi(self.H, q_offset)
        elif self.variant == "softcap":
            kw["score_mod"] = pigeon_softcap
        return kw

    # -- FlexAttention
    def flex_mods(self) -> tuple:
        """(score_mod, mask_mod, B or None, H or None) of the same semantics: the block mask is
        made for the batch/head sizes the mask depends on (None: broadcast)."""
        v = self.variant
        score = flex_alibi(self.H) if v == "alibi" else flex_softcap if v == "softcap" else None
        if v in ("causal", "alibi"):
            return score, flex_causal, None, None
        if v == "window":
            return score, flex_window(self.window), None, None
        if v == "s2":
            return score, flex_s2, None, self.H
        if v == "document":
            return score, flex_document(self.doc), None, None
        if v in TOPK:
            return score, flex_topk(self.selection(), self.group), self.B, self.H
        return score, None, None, None

    def selection(self) -> torch.Tensor:
        """top-k: the selected blocks as a bool tensor [B, Hkv, nq, nk]."""
        nb = self.S // TOPK_BLOCK
        sel = torch.zeros(self.B, self.Hkv, nb, nb, dtype=torch.bool, device=self.device)
        return sel.scatter_(3, self.indices.long(), True)

    # -- SDPA
    def mask_heads(self) -> tuple[int, int]:
        """(B', H') of SDPA's mask: 1 where the mask does not depend on the batch / head."""
        v = self.variant
        return (self.B if v in TOPK else 1), (self.H if v in TOPK + ("s2", "alibi") else 1)

    def head_mask(self, b: int, h: int) -> torch.Tensor:
        """SDPA's mask of batch b, head h: [S, S] bool (packed documents: [B*S, B*S]), or for
        ALiBi the float32 bias with -inf above the diagonal."""
        v, S, dev = self.variant, self.S, self.device
        if v == "document":
            t = torch.arange(self.doc.numel(), device=dev)
            return (self.doc[:, None] == self.doc[None, :]) & (t[None, :] <= t[:, None])
        q = torch.arange(S, device=dev)[:, None]
        kv = torch.arange(S, device=dev)[None, :]
        causal = kv <= q
        if v == "window":
            return causal & (q - kv < self.window)
        if v == "alibi":
            slope = math.exp((h + 1) * alibi_slope_log(self.H))
            return (slope * (kv - q).float()).masked_fill_(~causal, float("-inf"))
        if v == "s2":
            nb = S // S2_BLOCK
            i = torch.arange(nb, device=dev)[:, None]
            j = torch.arange(nb, device=dev)[None, :]
            blk = (((j + h) % S2_STRIDE) == 0) | (j > i - S2_LOCAL)
            return blk.repeat_interleave(S2_BLOCK, 0).repeat_interleave(S2_BLOCK, 1) & causal
        if v in TOPK:
            sel = self.selection()[b, h // self.group]
            return sel.repeat_interleave(TOPK_BLOCK, 0).repeat_interleave(TOPK_BLOCK, 1)
        raise ValueError(f"{v} needs no mask")

    def sdpa_mask(self) -> torch.Tensor | None:
        """The dense mask SDPA needs, [B', H', S, S] (bool; ALiBi: its float32 bias), None for the
        variants without one (``causal`` uses is_causal)."""
        if self.variant in ("dense", "causal", "softcap"):
            return None
        Bm, Hm = self.mask_heads()
        return torch.stack([torch.stack([self.head_mask(b, h) for h in range(Hm)]) for b in range(Bm)])

    def sdpa_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The same as the additive attn_mask SDPA takes in ``dtype`` (0 kept, -inf masked; ALiBi:
        its bias), filled head by head (no [B', H', S, S] bool or float32 temporaries)."""
        if self.variant in ("dense", "causal", "softcap"):
            return None
        Bm, Hm = self.mask_heads()
        T = self.doc.numel() if self.packed else self.S
        out = torch.empty(Bm, Hm, T, T, dtype=dtype, device=self.device)
        for b in range(Bm):
            for h in range(Hm):
                m = self.head_mask(b, h)
                if m.dtype == torch.bool:
                    out[b, h].fill_(float("-inf")).masked_fill_(m, 0.0)
                else:
                    out[b, h].copy_(m)
                del m
        return out


def check_heads(H: int, group: int) -> int:
    """Query heads the check compares: the first KV group(s), at least two heads where there are."""
    return min(H, group * max(1, -(-2 // group)))


def make_problem(variant: str, B: int, H: int, S: int, D: int, dtype: torch.dtype, device, window: int,
                 seed: int = 0) -> Problem:
    """Seeded inputs on ``device`` (the top-k indices and the documents too: all outside the timed
    region)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    g = group_of(variant)
    if H % g:
        raise ValueError(f"{variant}: {H} query heads are not a multiple of the GQA group {g}")

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    extra = {}
    if variant == "document":
        T = B * S
        q, k, v = randn(T, H, D), randn(T, H, D), randn(T, H, D)
        lens = doc_lengths(S) * B
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        return Problem(variant, B, H, S, D, dtype, window, q, k, v, cu.to(device), doc.to(device))
    q, k, v = randn(B, H, S, D), randn(B, H // g, S, D), randn(B, H // g, S, D)
    indices = None
    if variant in TOPK:
        nb, kk = S // TOPK_BLOCK, topk_count(S)
        cpu = torch.Generator().manual_seed(seed + 1)
        indices = torch.rand(B, H // g, nb, nb, generator=cpu).argsort(-1)[..., :kk].sort(-1).values
        indices = indices.to(device=device, dtype=torch.int32)
    return Problem(variant, B, H, S, D, dtype, window, q, k, v, indices=indices, extra=extra)
