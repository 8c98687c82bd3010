"""The check of each ``pigeon bench attention`` case: an implementation's first call, at the case's
full size, against ``pigeon.attention.attention(..., backend="reference")`` in float64 on a slice.

The slice: batch 0, the first query heads (two, or one KV group of the top-k variants: the heads
of their first KV heads), and the last ``min(S, 256)`` query rows against every key (packed
documents: every token of the first sequence, i.e. its four documents).  The rows of attention
are independent, so the reference of the slice alone is exact: it gets the same keys, the
pattern re-aligned at the end (as pigeon's patterns are, bottom-right), ALiBi's query position
offset, and the top-k indices of those heads and query blocks.  In forward+backward the upstream
gradient is random on the slice and zero elsewhere (in every implementation's timed step too:
no kernel's work depends on values), so the gradients of q on the slice and of k and v of those
KV heads at every key are exactly the reference's gradients of the slice.  Tolerance: bfloat16's
of pigeon.bench.check (|got - want| <= 0.04 max|want| + 0.04 |want|), for float16 too."""
from __future__ import annotations

import torch

import pigeon.attention as pa

from .attn_variants import CHECK_ROWS, Problem, check_heads, doc_lengths
from .check import _close
from .timing import one_line

__all__ = ["Reference"]


class Reference:
    """The float64 reference of a problem's slice (computed on first use, kept for the case)."""

    def __init__(self, p: Problem, mode: str, seed: int = 1):
        self.p, self.mode = p, mode
        hs = check_heads(p.H, p.group)
        hk = hs // p.group
        if p.packed:
            rows, S = p.S, p.S
            self.qsl = (slice(0, S), slice(0, hs))
            self.kvsl = (slice(0, S), slice(0, hk))
            self.q_offset = 0
            self.what = (f"float64 reference of tokens 0..{S - 1} (the first sequence's documents), query "
                         f"heads 0..{hs - 1}")
        else:
            rows = min(p.S, CHECK_ROWS)
            self.qsl = (slice(0, 1), slice(0, hs), slice(p.S - rows, p.S))
            self.kvsl = (slice(0, 1), slice(0, hk))
            self.q_offset = p.S - rows
            self.what = (f"float64 reference of batch 0, query heads 0..{hs - 1}, query rows "
                         f"{p.S - rows}..{p.S - 1} against all {p.S} keys")
        self.rows = rows
        if mode != "forward":
            self.what += "; out, grad q (those rows), grad k and grad v (those KV heads)"
        else:
            self.what += "; out"
        out_shape = p.q[self.qsl].shape[:-1] + (p.v.shape[-1],)
        gen = torch.Generator(device=p.device).manual_seed(seed)
        self.g = None
        self.grad_out = None
        if mode != "forward":
            self.g = torch.randn(out_shape, generator=gen, device=p.device).to(p.dtype)
            self.grad_out = torch.zeros(p.q.shape[:-1] + (p.v.shape[-1],), dtype=p.dtype, device=p.device)
            self.grad_out[self.qsl] = self.g
        self._want = None

    def want(self) -> dict:
        if self._want is None:
            p = self.p
            bwd = self.mode != "forward"
            q, k, v = (t[sl].double().requires_grad_(bwd)
                       for t, sl in ((p.q, self.qsl), (p.k, self.kvsl), (p.v, self.kvsl)))
            kw = p.pigeon_kwargs(self.q_offset)
            kw["pattern"] = p.pattern(None if p.packed else self.rows)
            if p.packed:
                kw["cu_seqlens"] = p.cu_seqlens[:len(doc_lengths(p.S)) + 1]
            out = pa.attention(q, k, v, backend="reference", **kw)
            want = {"out": out.detach()}
            if bwd:
                out.backward(self.g.double())
                want.update({"grad q": q.grad, "grad k": k.grad, "grad v": v.grad})
            self._want = want
        return self._want

    def compare(self, got: dict) -> str:
        """"ok" or "FAILED: why" for an implementation's results (pigeon's layout, full size)."""
        want = self.want()
        problems = []
        for name, w in want.items():
            g = got.get(name)
            sl = self.qsl if name in ("out", "grad q") else self.kvsl
            why = _close(name, None if g is None else g[sl], w, "bfloat16")
            if why:
                problems.append(why)
        return "ok" if not problems else "FAILED: " + one_line(" | ".join(problems), 400)

