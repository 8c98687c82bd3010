"""Sequence-parallel attention (LightSeq / ring attention) on torch.distributed.

Every rank holds a slice of the sequence of ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (the split is over
the sequence, not the heads, so any head count and GQA work).  The sequence is cut into ``C`` equal chunks:

* dense: ``C = W`` chunks, rank r holds chunk r (``layout="contiguous"``);
* causal: ``C = 2W`` chunks, rank r holds chunks ``r`` and ``2W-1-r`` (``layout="zigzag"``): every rank then
  has the same amount of unmasked work.

Which (query chunk, key chunk) pairs are attended is known before anything runs: dense: all; causal: key chunk
< query chunk fully, key chunk == query chunk with ``pigeon.attention.Causal()`` (equal lengths, so the
pattern's end alignment is the diagonal), key chunk > query chunk never.  The schedule follows from it: at step
``s = 1..W-1`` rank r sends to rank ``(r+s) % W`` exactly the K/V chunks that rank attends to (with zig-zag:
both chunks when ``r > dst``, only chunk r when ``r < dst``) and receives from ``(r-s) % W``; a chunk pair that
is never attended is neither sent nor computed.  Communication is point to point (``dist.isend`` /
``dist.irecv``), the next step's transfer posted before the current step's blocks are computed, so transfers
overlap with compute.  (A pass-along ring would forward chunks that the next rank does not need; the direct
shift schedule moves the same number of messages, W-1 per rank per pass, and only what is attended.)

Each attended pair runs ``pigeon.attention.attention(..., return_lse=True)`` and the partial results of a
query chunk merge exactly with their log-sum-exps: ``lse = logsumexp_b lse_b``,
``out = sum_b exp(lse_b - lse) out_b``.

Backward (a ``torch.autograd.Function``): only the local q, k, v, the merged out and lse are saved (O(L) memory
per rank, as the forward); the backward circulates K/V again with the same schedule, recomputes each attended
pair's ``(out_b, lse_b)`` under autograd and back-propagates through the merge
(``d out_b = w_b dO``, ``d lse_b = w_b (rowdot(dO, out_b - out) + d lse)``, ``w_b = exp(lse_b - lse)``); the
dK/dV partials of a remote chunk go back to its owner (the reverse shift) and are summed there.  That needs a
differentiable ``lse_b``: ``backend="reference"`` (pigeon's kernels ops mark lse non-differentiable, so with
``backend="kernels"`` the forward runs and the backward raises).

Not done: the other sparse patterns (sliding window, S2, block lists) and packed ``cu_seqlens`` inputs, NCCL/GPU
runs, throughput, and the comparison with ``torch.distributed.tensor.experimental.context_parallel``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["chunks_of", "num_chunks", "pair_kind", "schedule", "shard", "unshard", "seq_parallel_attention"]


def num_chunks(world: int, causal: bool) -> int:
    return 2 * world if causal else world


def chunks_of(rank: int, world: int, causal: bool) -> list[int]:
    """The global chunk indices rank holds, in the order of its local slice."""
    return [rank, 2 * world - 1 - rank] if causal else [rank]


def pair_kind(qc: int, kc: int, causal: bool):
    """``"full"``, ``"diag"`` (causal within equal chunks) or None (never attended)."""
    if not causal or kc < qc:
        return "full"
    return "diag" if kc == qc else None


def schedule(world: int, causal: bool) -> dict:
    """``needs[(dst, src)]``: the chunks of src that dst attends to (the ones src sends dst)."""
    needs = {}
    for dst in range(world):
        for src in range(world):
            needs[(dst, src)] = [kc for kc in chunks_of(src, world, causal)
                                 if any(pair_kind(qc, kc, causal) for qc in chunks_of(dst, world, causal))]
    return needs


def shard(x: torch.Tensor, rank: int, world: int, causal: bool, dim: int = 2) -> torch.Tensor:
    """Rank's local slice of a full-sequence tensor (the chunks of :func:`chunks_of`, concatenated)."""
    parts = x.chunk(num_chunks(world, causal), dim)
    if len(parts) != num_chunks(world, causal) or x.shape[dim] % num_chunks(world, causal):
        raise ValueError(f"sequence length {x.shape[dim]} is not a multiple of {num_chunks(world, causal)} chunks")
    return torch.cat([parts[c] for c in chunks_of(rank, world, causal)], dim)


def unshard(slices: list[torch.Tensor], world: int, causal: bool, dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from every rank's slice (inverse of :func:`shard`)."""
    per = {}
    for r, s in enumerate(slices):
        cs = chunks_of(r, world, causal)
        for c, part in zip(cs, s.chunk(len(cs), dim)):
            per[c] = part
    return torch.cat([per[c] for c in range(num_chunks(world, causal))], dim)


def _block(q, k, v, kind, scale, gqa, backend):
    from pigeon.attention import Causal, attention
    return attention(q, k, v, pattern=Causal() if kind == "diag" else None, scale=scale, enable_gqa=gqa,
                     return_lse=True, backend=backend)


def _pack(k_parts, v_parts):
    return torch.cat([t.reshape(-1) for t in (*k_parts, *v_parts)])


def _unpack(buf, n, k_shape, v_shape):
    kn, vn = k_shape.numel(), v_shape.numel()
    ks = [buf[i * kn:(i + 1) * kn].view(k_shape) for i in range(n)]
    off = n * kn
    vs = [buf[off + i * vn: off + (i + 1) * vn].view(v_shape) for i in range(n)]
    return ks, vs


class _Ring:
    """The static schedule of one call, from one rank's point of view."""

    def __init__(self, q, k, v, causal, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.causal = causal
        self.mine = chunks_of(self.rank, self.world, causal)
        self.needs = schedule(self.world, causal)
        n = len(self.mine)
        self.k_shape, self.v_shape = k.chunk(n, 2)[0].shape, v.chunk(n, 2)[0].shape

    def _global(self, r):
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def post(self, s, k_by_chunk, v_by_chunk):
        """Start step s's transfer: send dst what it attends to, receive what we attend to from src."""
        if s >= self.world:
            return None
        dst, src = (self.rank + s) % self.world, (self.rank - s) % self.world
        reqs, recv, buf = [], None, None
        send_ch = self.needs[(dst, self.rank)]
        if send_ch:
            buf = _pack([k_by_chunk[c] for c in send_ch], [v_by_chunk[c] for c in send_ch])
            reqs.append(dist.isend(buf, self._global(dst), group=self.group, tag=s))
        recv_ch = self.needs[(self.rank, src)]
        if recv_ch:
            n = len(recv_ch)
            recv = k_by_chunk[self.mine[0]].new_empty(n * (self.k_shape.numel() + self.v_shape.numel()))
            reqs.append(dist.irecv(recv, self._global(src), group=self.group, tag=s))
        return reqs, recv, recv_ch, buf      # buf: the send buffer, alive until waited

    def wait(self, posted):
        reqs, recv, recv_ch, _keep = posted
        for r in reqs:
            r.wait()
        if recv is None:
            return {}, {}
        ks, vs = _unpack(recv, len(recv_ch), self.k_shape, self.v_shape)
        return dict(zip(recv_ch, ks)), dict(zip(recv_ch, vs))

    def steps(self, k_by_chunk, v_by_chunk):
        """Yield (src, {chunk: k}, {chunk: v}) for s = 0..W-1, the next transfer in flight meanwhile."""
        yield self.rank, k_by_chunk, v_by_chunk
        pending = self.post(1, k_by_chunk, v_by_chunk)
        for s in range(1, self.world):
            cur, pending = pending, self.post(s + 1, k_by_chunk, v_by_chunk)
            kk, vv = self.wait(cur)
            yield (self.rank - s) % self.world, kk, vv


def _split(t, chunks):
    return dict(zip(chunks, t.chunk(len(chunks), 2)))


def _merge(outs, lses):
    lse_all = torch.stack(lses)                       # [n, B, H, S]
    lse = torch.logsumexp(lse_all, 0)
    fin = torch.isfinite(lse)
    w = torch.where(fin, torch.exp(lse_all - torch.where(fin, lse, torch.zeros_like(lse))),
                    torch.zeros_like(lse_all))
    out = sum(wi[..., None] * o for wi, o in zip(w, outs))
    return out, lse, w


class _SeqParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, gqa, backend, group):
        ring = _Ring(q, k, v, causal, group)
        qs = _split(q, ring.mine)
        parts = {qc: ([], []) for qc in ring.mine}
        for _src, kk, vv in ring.steps(_split(k, ring.mine), _split(v, ring.mine)):
            for qc in ring.mine:
                for kc in kk:
                    kind = pair_kind(qc, kc, causal)
                    if kind is None:
                        continue
                    o, l = _block(qs[qc], kk[kc], vv[kc], kind, scale, gqa, backend)
                    parts[qc][0].append(o)
                    parts[qc][1].append(l)
        merged = [_merge(*parts[qc])[:2] for qc in ring.mine]
        out = torch.cat([m[0] for m in merged], 2)
        lse = torch.cat([m[1] for m in merged], 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, gqa, backend, group)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, gqa, backend, group = ctx.args
        ring = _Ring(q, k, v, causal, group)
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        qs, outs, lses = _split(q, ring.mine), _split(out, ring.mine), _split(lse, ring.mine)
        dos, dls = _split(d_out, ring.mine), _split(d_lse, ring.mine)
        dq = {c: torch.zeros_like(t) for c, t in qs.items()}
        dk = {c: torch.zeros_like(t) for c, t in _split(k, ring.mine).items()}
        dv = {c: torch.zeros_like(t) for c, t in _split(v, ring.mine).items()}
        returns = []          # dK/dV partials on their way back to their owners
        for s, (src, kk, vv) in enumerate(ring.steps(_split(k, ring.mine), _split(v, ring.mine))):
            gk = {c: torch.zeros_like(t) for c, t in kk.items()}
            gv = {c: torch.zeros_like(t) for c, t in vv.items()}
            for qc in ring.mine:
                for kc in kk:
                    kind = pair_kind(qc, kc, causal)
                    if kind is None:
                        continue
                    qb, kb, vb = (t.detach().requires_grad_() for t in (qs[qc], kk[kc], vv[kc]))
                    with torch.enable_grad():
                        ob, lb = _block(qb, kb, vb, kind, scale, gqa, backend)
                    if not lb.requires_grad:
                        raise NotImplementedError(
                            f"seq_parallel_attention: backward needs a differentiable lse from "
                            f"pigeon.attention (backend={backend!r} does not give one); use backend='reference'")
                    fin = torch.isfinite(lses[qc])
                    w = torch.where(fin & torch.isfinite(lb), torch.exp(lb - torch.where(fin, lses[qc], 0.0)), 0.0)
                    g_out = w[..., None] * dos[qc]
                    g_lse = w * (((ob.detach() - outs[qc]) * dos[qc]).sum(-1) + dls[qc])
                    a, b, c = torch.autograd.grad((ob, lb), (qb, kb, vb), (g_out, g_lse))
                    dq[qc] += a
                    gk[kc] += b
                    gv[kc] += c
            if src == ring.rank:
                for c in gk:
                    dk[c] += gk[c]
                    dv[c] += gv[c]
            else:        # send the partials back to src (tag: W + s); src receives them from (src + s)
                buf = _pack([gk[c] for c in gk], [gv[c] for c in gv])
                returns.append((dist.isend(buf, ring._global(src), group=group, tag=ring.world + s), buf))
            # receive the partials of our own chunks from the rank that used them at this step
            if s > 0:
                user = (ring.rank + s) % ring.world
                ch = ring.needs[(user, ring.rank)]
                if ch:
                    buf = q.new_empty(len(ch) * (ring.k_shape.numel() + ring.v_shape.numel()))
                    dist.recv(buf, ring._global(user), group=group, tag=ring.world + s)
                    ks, vs = _unpack(buf, len(ch), ring.k_shape, ring.v_shape)
                    for c, a, b in zip(ch, ks, vs):
                        dk[c] += a
                        dv[c] += b
        for r, _buf in returns:
            r.wait()
        cat = lambda d: torch.cat([d[c] for c in ring.mine], 2)
        return cat(dq), cat(dk), cat(dv), None, None, None, None, None


def seq_parallel_attention(q, k, v, *, causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                           backend: str = "reference", group=None):
    """``(out, lse)`` of this rank's slice (layout: :func:`shard` with the same ``causal``): equal to
    ``pigeon.attention.attention(full q, k, v, pattern=Causal() if causal else None, return_lse=True)``
    sliced the same way.  Differentiable in q, k, v (module docstring: the backward)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("seq_parallel_attention: q, k, v must be [batch, heads, local_seq, head_dim]")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SeqParallelAttention.apply(q, k, v, causal, scale, enable_gqa, backend, group)
