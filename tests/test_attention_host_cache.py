"""The attention call's host path keeps what depends only on the call shape and the modifiers:
the instance text (traced modifiers, pigeon/trace_cache.py) and the block lists of no pattern or a
closed-form one.  A changed captured value must trace again; the lists must equal fresh ones."""
import torch

import pigeon.attention as pa
from pigeon import trace_cache
from pigeon.attention import api
from pigeon.attention.patterns import Causal, SlidingWindow, all_blocks, block_lists


def _qkv(s=128, d=64, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(1, 2, s, d, dtype=dtype) for _ in range(3)]


def _alibi(slope):
    return lambda s, b, h, qi, ki: s - slope * (qi - ki)     # one code object, re-created per call


def test_instance_text_reused_for_recreated_modifiers_and_retraced_when_a_captured_value_changes():
    q, k, v = _qkv()
    texts = {api._op_args(q, k, v, _alibi(0.25), None, Causal(), 0.1, None)[0] for _ in range(3)}
    assert len(texts) == 1
    n = trace_cache.cached_count()
    api._op_args(q, k, v, _alibi(0.25), None, Causal(), 0.1, None)
    assert trace_cache.cached_count() == n                    # a hit
    other = api._op_args(q, k, v, _alibi(0.5), None, Causal(), 0.1, None)[0]
    assert other not in texts and trace_cache.cached_count() == n + 1   # the captured value is in the key


def test_results_follow_a_changed_captured_value():
    q, k, v = _qkv(dtype=torch.bfloat16)
    ref = lambda sc, c: pa.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * c, pattern=Causal(),  # noqa: E731
                                     backend="reference")
    for c in (1.0, 0.5, 2.0):
        got = pa.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * c, pattern=Causal())
        torch.testing.assert_close(got.float(), ref(None, c).float(), rtol=2e-2, atol=2e-2)


def test_block_lists_are_reused_per_shape_and_equal_fresh_ones():
    q, k, v = _qkv(s=200)
    for pat in (None, Causal(), SlidingWindow(64)):
        a = api._op_args(q, k, v, None, None, pat, 0.1, None)
        b = api._op_args(q, k, v, None, None, pat, 0.1, None)
        assert all(x is y for x, y in zip(a[4:7], b[4:7]))    # the same tensors: made once
        fresh = all_blocks(200, 200, 64, 64) if pat is None else block_lists(pat, 1, 2, 200, 200, 64, 64)
        for got, want in zip(a[4:7], (fresh.ptr, fresh.col, fresh.full)):
            assert torch.equal(got, want)
        assert tuple(a[7]) == tuple(fresh.shape)
    q2, k2, v2 = _qkv(s=256)                                  # another shape: other lists
    c = api._op_args(q2, k2, v2, None, None, Causal(), 0.1, None)
    assert c[4].numel() == 256 // 64 + 1


def test_backward_key_major_lists_are_kept_per_list_tensors_and_versions():
    import pigeon.runtime.attention_kernel as ak
    from pigeon.attention.patterns import BlockLists
    lists = block_lists(Causal(), 1, 2, 256, 256, 64, 64)
    a = ak._transposed(lists, 4, torch.device("cpu"))
    assert ak._transposed(lists, 4, torch.device("cpu")) is a          # kept
    t = lists.transposed(4)
    for got, want in zip(a, (t.ptr, t.col, t.full)):
        assert got.dtype == torch.int32 and torch.equal(got.long(), want.long())
    lists.full[0] = not bool(lists.full[0])                              # in place: a new version, recomputed
    b = ak._transposed(lists, 4, torch.device("cpu"))
    assert b is not a and torch.equal(b[2].long(), lists.transposed(4).full.long())
    other = BlockLists(lists.shape, lists.ptr.clone(), lists.col.clone(), lists.full.clone())
    assert ak._transposed(other, 4, torch.device("cpu")) is not b       # other tensors: their own entry
