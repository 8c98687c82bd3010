"""Attention variants (pigeon/attention): traced modifiers give the expected expression IR; the
patterns' block iteration lists equal the dense masks they stand for (property tests over shapes,
blocks, windows, strides, heads); the reference equals torch's SDPA in float64 with the same
dense mask or bias, forward and backward, with GQA and packed documents; bad calls are refused
with one line before anything runs."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import pigeon.attention as pa
from pigeon.ir.expr import format_expr

F64 = torch.float64


# ------------------------------------------------------------------------------- traced modifiers

def test_alibi_and_softcap_trace_to_expressions():
    e = pa.trace_score_mod(lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q))
    text = format_expr(e)
    assert e.dtype == "float32" and "var score" in text and "index head" in text and "unary exp" in text
    assert "binary sub(e8, e9)" in text or "sub" in text
    cap = pa.trace_score_mod(lambda s, b, h, q, kv: 30.0 * pa.tanh(s / 30.0))
    ops = [n.op + ":" + n.fn for n in cap.toposort()]
    assert ops.count("unary:tanh") == 1 and "binary:div" in ops


def test_mask_mods_compose_with_and_or_not():
    m = pa.trace_mask_mod(lambda b, h, q, kv: ((q >= kv) & (q - kv < 16)) | ~(h == 0))
    fns = [n.fn for n in m.toposort() if n.op in ("binary", "unary")]
    assert m.dtype == "bool" and {"ge", "lt", "bit_and", "bit_or", "logical_not", "eq"} <= set(fns)
    # Python's floor semantics for // and %
    s2 = pa.trace_mask_mod(lambda b, h, q, kv: (kv // 64 + h) % 4 == 0)
    assert {"floordiv", "mod"} <= {n.fn for n in s2.toposort()}


def test_untraceable_modifiers_are_refused_with_their_line():
    def branches(s, b, h, q, kv):
        if q > kv:
            return s
        return s * 0.5
    with pytest.raises(pa.ModError, match=r"test_attention.py:\d+: a traced function cannot branch on a traced value"):
        pa.trace_score_mod(branches)
    with pytest.raises(pa.ModError, match="returns a mask"):
        pa.trace_score_mod(lambda s, b, h, q, kv: q >= kv)
    with pytest.raises(pa.ModError, match="must return a bool"):
        pa.trace_mask_mod(lambda b, h, q, kv: q - kv)
    with pytest.raises(pa.ModError, match="tensors are not captured"):
        pa.trace_score_mod(lambda s, b, h, q, kv: s + torch.ones(3))
    with pytest.raises(pa.ModError, match="// and % take integers"):
        pa.trace_score_mod(lambda s, b, h, q, kv: s % 2)


# ------------------------------------------------------------------------------- patterns

def _check_lists(p, B, H, Sq, Skv, bm, bn):
    mask = pa.dense_mask(p, B, H, Sq, Skv).expand(B, H, Sq, Skv)
    lists = pa.block_lists(p, B, H, Sq, Skv, bm, bn)
    nq, nk = -(-Sq // bm), -(-Skv // bn)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                listed = dict(lists.blocks(b, h, i))
                for j in range(nk):
                    tile = mask[b, h, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                    anyk, allk = bool(tile.any()), bool(tile.all())
                    assert (j in listed) == anyk, (p, b, h, i, j, "listed" if j in listed else "missing")
                    if anyk:
                        assert listed[j] == allk, (p, b, h, i, j, "full flag")


shapes = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 70), st.sampled_from([8, 16, 32]),
                   st.sampled_from([8, 16, 32]))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 20))
def test_causal_lists_equal_the_mask(shape, extra_kv):
    B, H, Sq, bm, bn = shape
    _check_lists(pa.Causal(), B, H, Sq, Sq + extra_kv, bm, bn)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 40), st.booleans())
def test_sliding_window_lists_equal_the_mask(shape, window, causal):
    B, H, Sq, bm, bn = shape
    _check_lists(pa.SlidingWindow(window, causal=causal), B, H, Sq, Sq, bm, bn)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 90), st.sampled_from([8, 16]), st.integers(1, 6), st.integers(1, 3),
       st.integers(0, 3), st.integers(0, 5))
def test_s2_lists_equal_the_mask(H, S, block, stride, local, step, offset):
    p = pa.S2(stride=stride, local_blocks=local, block=block, step=step, offset=offset)
    _check_lists(p, 1, H, S, S, block, block)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 60), st.sampled_from([8, 16]), st.integers(0, 1 << 30))
def test_block_list_and_topk_lists_equal_the_mask(H, S, block, seed):
    gen = torch.Generator().manual_seed(seed)
    n = -(-S // block)
    keep = torch.rand(H, n, n, generator=gen) < 0.4
    crow = torch.zeros(H, n + 1, dtype=torch.int64)
    crow[:, 1:] = keep.sum(-1).cumsum(-1)
    col = torch.cat([keep[h].nonzero()[:, 1] for h in range(H)])
    crow = crow + torch.tensor([0] + [int(keep[:h].sum()) for h in range(1, H)])[:, None]
    _check_lists(pa.BlockList(crow, col, block, block), 1, H, S, S, block, block)
    k = min(2, n)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(2 * H * n)]).reshape(2, H, n, k)
    idx[..., -1] = torch.where(torch.rand(2, H, n, generator=gen) < 0.3, -1, idx[..., -1])
    _check_lists(pa.TopK(idx, block, block), 2, H, S, S, block, block)
    _check_lists(pa.TopK(idx[:, :1], block, block), 2, 2 * H, S, S, block, block)   # shared by a KV group
    # listed on a finer grid (128-blocks run on the 64 x 64 kernels), no dense mask: built in one pass,
    # entry for entry what patterns.refine of the coarse lists gives
    _check_lists(pa.TopK(idx, block, block), 2, H, S, S, block // 2, block // 4)
    from pigeon.attention.patterns import block_lists, refine
    fine = block_lists(pa.TopK(idx, block, block), 2, H, S, S, block // 2, block // 4)
    coarse = block_lists(pa.TopK(idx, block, block), 2, H, S, S, block, block)
    want = refine(coarse, 2, 4, -(-S // (block // 2)), -(-S // (block // 4)))
    assert fine.shape == want.shape and all(torch.equal(x, y) for x, y in
                                            ((fine.ptr, want.ptr), (fine.col, want.col), (fine.full, want.full)))


def test_closed_form_masks_are_the_textbook_ones():
    """Independent of the expressions: causal is a lower triangle aligned at the bottom right, a
    window a band, S2 with stride 1 is blockwise-causal with a causal diagonal."""
    for Sq, Skv in ((7, 7), (5, 9)):
        want = torch.ones(Sq, Skv, dtype=torch.bool).tril(diagonal=Skv - Sq)
        assert torch.equal(pa.dense_mask(pa.Causal(), 1, 1, Sq, Skv)[0, 0], want)
    d = torch.arange(10)[:, None] - torch.arange(10)[None, :]
    assert torch.equal(pa.dense_mask(pa.SlidingWindow(3), 1, 1, 10, 10)[0, 0], (d >= 0) & (d < 3))
    assert torch.equal(pa.dense_mask(pa.SlidingWindow(3, causal=False), 1, 1, 10, 10)[0, 0], d.abs() < 3)
    assert torch.equal(pa.dense_mask(pa.S2(stride=1, local_blocks=1, block=4), 1, 2, 12, 12)[0, 1],
                       torch.ones(12, 12, dtype=torch.bool).tril())
    # stride 2, no local blocks beyond the diagonal: head 0 keeps even key blocks, head 1 odd ones
    m = pa.dense_mask(pa.S2(stride=2, local_blocks=1, block=4), 1, 2, 16, 16)[0]
    assert m[0, 12, 0].item() and not m[0, 12, 4].item() and m[1, 12, 4].item() and not m[1, 12, 0].item()


def test_pattern_inputs_are_checked():
    with pytest.raises(pa.PatternError, match="window must be a positive int"):
        pa.SlidingWindow(0)
    with pytest.raises(pa.PatternError, match="stride must be a positive int"):
        pa.S2(stride=0, local_blocks=1)
    with pytest.raises(pa.PatternError, match="S2 is defined on square blocks of 64"):
        pa.block_lists(pa.S2(4, 1), 1, 2, 128, 128, 64, 128)
    with pytest.raises(pa.PatternError, match=r"TopK: indices must be \[B, H, 2, k\]"):
        pa.dense_mask(pa.TopK(torch.zeros(1, 1, 3, 1, dtype=torch.long), 64, 64), 1, 1, 128, 128)


# ------------------------------------------------------------------------------- reference vs SDPA

def _qkv(B, Hq, Hkv, Sq, Skv, D, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_(True)   # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Skv, D), mk(B, Hkv, Skv, D)


def _compare(ours, theirs, leaves, seed):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
    up = torch.randn_like(ours)
    ga = torch.autograd.grad((ours * up).sum(), leaves)
    gb = torch.autograd.grad((theirs * up).sum(), leaves)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad, seed {seed}: {m}")


CASES = {
    "causal": dict(pattern=pa.Causal()),
    "window": dict(pattern=pa.SlidingWindow(7)),
    "window_bidirectional": dict(pattern=pa.SlidingWindow(5, causal=False)),
    "s2": dict(pattern=pa.S2(stride=3, local_blocks=1, block=8, step=1)),
    "mask_mod_causal": dict(mask_mod=lambda b, h, q, kv: q >= kv),
    "mask_mod_strided": dict(mask_mod=lambda b, h, q, kv: ((kv // 8 + h) % 2 == 0) | (q == kv)),
}


@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_sdpa_with_the_dense_mask(case, gqa):
    seed = random.randrange(1 << 30)
    B, Hkv, S, D = 2, 2, 40, 16
    q, k, v = _qkv(B, Hkv * gqa, Hkv, S, S, D, seed)
    kw = CASES[case]
    ours = pa.attention(q, k, v, enable_gqa=gqa > 1, backend="reference", **kw)
    if "pattern" in kw:
        mask = pa.dense_mask(kw["pattern"], B, Hkv * gqa, S, S)
    else:
        qi, ki = torch.arange(S)[:, None], torch.arange(S)[None, :]
        hi = torch.arange(Hkv * gqa)[:, None, None]
        fn = kw["mask_mod"]
        mask = torch.stack([torch.as_tensor(fn(0, hh, qi, ki)).expand(S, S) for hh in range(Hkv * gqa)])[None]
        if case == "mask_mod_strided":
            mask = (((ki // 8 + hi) % 2 == 0) | (qi == ki))[None]
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(B, -1, -1, -1), enable_gqa=gqa > 1)
    _compare(ours, theirs, [q, k, v], seed)


def test_score_mods_equal_sdpa_with_a_bias():
    seed = random.randrange(1 << 30)
    B, H, S, D = 1, 4, 24, 8
    q, k, v = _qkv(B, H, H, S, S, D, seed)
    slopes = torch.tensor([math.exp(-(h + 1) * 0.5) for h in range(H)], dtype=F64)
    ours = pa.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + pa.exp((h + 1) * -0.5) * (kv - qi),
                        pattern=pa.Causal(), backend="reference")
    rel = (torch.arange(S)[None, :] - torch.arange(S)[:, None]).to(F64)
    bias = slopes[:, None, None] * rel
    bias = bias.masked_fill(~pa.dense_mask(pa.Causal(), 1, 1, S, S)[0], float("-inf"))[None]
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    _compare(ours, theirs, [q, k, v], seed)
    # soft-capping: 5 tanh(s / 5) of the scaled scores, by hand
    ours = pa.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: 5.0 * pa.tanh(s / 5.0), backend="reference")
    s = 5.0 * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(D) / 5.0)
    _compare(ours, torch.softmax(s, -1) @ v, [q, k, v], seed)


def test_packed_documents_equal_attention_per_document_and_lse_is_returned():
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    lens = [5, 1, 12, 7]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    T, Hq, Hkv, D = sum(lens), 4, 2, 8
    q = torch.randn(T, Hq, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(T, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(T, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    out, lse = pa.attention(q, k, v, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True, return_lse=True,
                            backend="reference")
    pieces, lses = [], []
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi, ki, vi = (t[s0:s1].transpose(0, 1)[None] for t in (q, k, v))
        pieces.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        kk = ki.repeat_interleave(2, dim=1)
        sc = (qi @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(
            ~torch.ones(s1 - s0, s1 - s0, dtype=torch.bool).tril(), float("-inf"))
        lses.append(torch.logsumexp(sc, -1)[0])
    _compare(out, torch.cat(pieces), [q, k, v], seed)
    torch.testing.assert_close(lse, torch.cat(lses, -1), rtol=1e-10, atol=1e-10)


def test_a_row_that_attends_to_nothing_is_zero_with_finite_gradients():
    q, k, v = _qkv(1, 1, 1, 4, 6, 8, 0)
    out, lse = pa.attention(q, k, v, mask_mod=lambda b, h, qi, kv: qi > 0, return_lse=True, backend="reference")
    assert torch.equal(out[0, 0, 0], torch.zeros(8, dtype=F64)) and lse[0, 0, 0] == float("-inf")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ------------------------------------------------------------------------------- bad calls

def _bad(match, *args, **kw):
    kw.setdefault("backend", "reference")
    with pytest.raises(pa.AttentionInputError, match=match) as e:
        pa.attention(*args, **kw)
    assert "\n" not in str(e.value)


def test_bad_calls_are_refused_before_anything_runs():
    q = torch.randn(2, 4, 16, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 16, 64, dtype=torch.bfloat16)
    _bad(r"4 query heads but 2 key/value heads; pass enable_gqa=True", q, k, k)
    _bad(r"3 query heads are not a multiple of 2", q[:, :3], k, k, enable_gqa=True)
    _bad(r"q, k, v dtypes differ", q, k.float(), k)
    _bad(r"q must be \[batch, heads, seq, head_dim\]", q[0], k, k)
    _bad(r"q's head_dim 64 != k's 32", q, k[..., :32], k[..., :32], enable_gqa=True)
    _bad(r"head_dim 32 is not supported by the kernels \(supported: \(64, 128\)\)", q[..., :32], k[..., :32],
         k[..., :32], enable_gqa=True, backend="kernels")
    _bad(r"the kernels take bfloat16 or float16", q.float(), k.float(), k.float(), enable_gqa=True,
         backend="kernels")
    packed = torch.randn(10, 2, 64)
    _bad(r"cu_seqlens ends at 9 but q has 10 tokens", packed, packed, packed, cu_seqlens=torch.tensor([0, 4, 9]))
    _bad(r"cu_seqlens decreases at index 2", packed, packed, packed, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    _bad(r"cu_seqlens must start at 0", packed, packed, packed, cu_seqlens=torch.tensor([1, 10]))
    _bad(r"unknown pattern", q, k, k, enable_gqa=True, pattern="causal")


def test_cu_seqlens_are_read_once_per_tensor_and_version():
    """The host copy of cu_seqlens is kept per tensor and in-place version: a cu_seqlens changed in
    place after a good call is checked again (and refused), and a call's longest document follows it."""
    from pigeon.attention import api
    packed = torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10])
    pa.attention(packed, packed, packed, cu_seqlens=cu, backend="reference")
    assert api.cu_values(cu) == [0, 4, 10]
    assert api._call_shape(packed, packed, None, cu)[7] == 6
    cu[1] = 12                                    # in place: a new version
    _bad(r"cu_seqlens decreases at index 2", packed, packed, packed, cu_seqlens=cu)
    cu[1] = 1
    assert api._call_shape(packed, packed, None, cu)[7] == 9


def test_score_mod_derivatives_equal_torch_autograd():
    from pigeon.attention.reference import _eval_mod
    from pigeon.ir.expr_grad import derivative
    mods = [lambda s, b, h, q, kv: 3.0 * pa.tanh(s / 3.0),
            lambda s, b, h, q, kv: s * pa.sigmoid(s) + pa.exp((h + 1) * -0.5) * (kv - q),
            lambda s, b, h, q, kv: pa.where(q >= kv, s * s, -s) / 2.0]
    for fn in mods:
        e = pa.trace_score_mod(fn)
        d = derivative(e, "score")
        s = torch.randn(1, 2, 5, 6, dtype=F64, requires_grad=True)
        val = _eval_mod(e, s, 1, 2, 5, 6, "cpu")
        (want,) = torch.autograd.grad(val.sum(), [s])
        got = _eval_mod(d, s.detach(), 1, 2, 5, 6, "cpu")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
