"""Block lists regrouped onto the CUTLASS forward's 128 x BN tile (pigeon/runtime/attention_tiles.py): the
pairs the tile lists mark listed / full are exactly those of the lists they come from, for every
pattern over shapes, windows, strides, heads and tiles; the entries that need no mask come first, are
all full and inside the keys; the rest ascend; empty rows stay empty."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pigeon.attention as pa
from pigeon.attention.patterns import _expand_blocks, block_lists, dense_mask
from pigeon.runtime.attention_tiles import CODE_BITS, expand, grouping, tile_lists


def _list_masks(lists, bm, bn, q_len, kv_len):
    """(listed, full) pairs of the lists themselves (a slow loop)."""
    B, H, nq = lists.shape
    nk = -(-kv_len // bn)
    li = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    fu = torch.zeros_like(li)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                for c, f in lists.blocks(b, h, i):
                    li[b, h, i, c] = True
                    fu[b, h, i, c] = f
    return _expand_blocks(li, bm, bn, q_len, kv_len), _expand_blocks(fu, bm, bn, q_len, kv_len)


def _check(lists, bm, bn, q_len, kv_len, tile_n):
    t = tile_lists(lists, bm, bn, q_len, kv_len, 128, tile_n)
    listed, full = expand(t, bm, bn, q_len, kv_len, 128, tile_n)
    want_listed, want_full = _list_masks(lists, bm, bn, q_len, kv_len)
    assert torch.equal(listed, want_listed) and torch.equal(full, want_full)
    a, b = grouping(bm, bn, 128, tile_n)
    ptr, ent, nfull = t.ptr.tolist(), t.ent.tolist(), t.nfull.tolist()
    rows = t.shape[2]
    assert len(ptr) == t.shape[0] * t.shape[1] * rows + 1 and ptr[0] == 0
    for r in range(len(ptr) - 1):
        row = ent[ptr[r]:ptr[r + 1]]
        cols = [e >> CODE_BITS for e in row]
        assert len(set(cols)) == len(cols) and all(e & ((1 << CODE_BITS) - 1) for e in row)
        nf = nfull[r]
        assert 0 <= nf <= len(row)
        assert cols[nf:] == sorted(cols[nf:])
        for e in row[:nf]:          # unmasked: every sub-block of rows inside q_len full, the tile inside the keys
            tc, code = e >> CODE_BITS, e & ((1 << CODE_BITS) - 1)
            assert (tc + 1) * tile_n <= kv_len
            for s in range(a * b):
                if ((r % rows) * a + s // b) * bm < q_len:
                    assert (code >> (2 * s)) & 3 == 3
        for e in row[nf:]:          # masked: not all of those full, or the tile crosses the key end
            tc, code = e >> CODE_BITS, e & ((1 << CODE_BITS) - 1)
            whole = all((code >> (2 * s)) & 3 == 3 for s in range(a * b) if ((r % rows) * a + s // b) * bm < q_len)
            assert not whole or (tc + 1) * tile_n > kv_len
    return t


@settings(max_examples=30, deadline=None)
@given(q_len=st.integers(1, 400), kv_len=st.integers(1, 400), heads=st.integers(1, 3),
       window=st.integers(1, 300), causal=st.booleans(), tile_n=st.sampled_from([64, 128]))
def test_window_and_causal_tiles_equal_their_lists(q_len, kv_len, heads, window, causal, tile_n):
    for p in (pa.Causal(), pa.SlidingWindow(window, causal)):
        _check(block_lists(p, 1, heads, q_len, kv_len, 64, 64), 64, 64, q_len, kv_len, tile_n)


@settings(max_examples=20, deadline=None)
@given(nb=st.integers(1, 9), heads=st.integers(1, 4), stride=st.integers(1, 6), local=st.integers(1, 3),
       block=st.sampled_from([64, 128]), tile_n=st.sampled_from([64, 128]))
def test_s2_tiles_equal_their_lists(nb, heads, stride, local, block, tile_n):
    if tile_n % block:
        return
    n = nb * block
    p = pa.S2(stride, local, block=block)
    _check(block_lists(p, 1, heads, n, n, block, block), block, block, n, n, tile_n)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), nq=st.integers(1, 5), nk=st.integers(1, 6),
       k=st.integers(1, 4), tail=st.integers(0, 63), seed=st.integers(0, 2 ** 16))
def test_topk_tiles_equal_their_lists(batch, heads, nq, nk, k, tail, seed):
    """Selections with repeats and -1 (none), rows with nothing selected, key tails off the tile."""
    g = torch.Generator().manual_seed(seed)
    q_len, kv_len = nq * 64, max(1, nk * 64 - tail)
    nk = -(-kv_len // 64)
    idx = torch.randint(-1, nk, (batch, heads, nq, k), generator=g)
    lists = block_lists(pa.TopK(idx), batch, heads, q_len, kv_len, 64, 64)
    for tile_n in (64, 128):
        _check(lists, 64, 64, q_len, kv_len, tile_n)


def test_tiles_with_the_pattern_mask_equal_the_dense_mask():
    """What the kernel's fusion keeps: a listed sub-block, and there the pattern's mask unless it is
    full -- equals the pattern's dense mask (the chain from the tile codes to the semantics)."""
    cases = [(pa.SlidingWindow(100), 320, 333), (pa.SlidingWindow(70, causal=False), 256, 200),
             (pa.S2(4, 1, block=64), 512, 512), (pa.Causal(), 320, 200)]
    for p, q_len, kv_len in cases:
        lists = block_lists(p, 1, 4, q_len, kv_len, 64, 64)
        for tile_n in (64, 128):
            listed, full = expand(tile_lists(lists, 64, 64, q_len, kv_len, 128, tile_n), 64, 64, q_len, kv_len,
                                  128, tile_n)
            dense = dense_mask(p, 1, 4, q_len, kv_len)
            kept = listed & (full | dense)
            assert torch.equal(kept, dense.expand_as(kept)), (p, tile_n)


def test_empty_rows_and_the_code_width():
    idx = torch.full((1, 1, 4, 2), -1, dtype=torch.int64)
    idx[0, 0, 1] = torch.tensor([2, 0])                 # only list row 1 selects anything
    t = _check(block_lists(pa.TopK(idx), 1, 1, 256, 256, 64, 64), 64, 64, 256, 256, 128)
    assert t.ptr.tolist() == [0, 2, 2] and t.nfull.tolist() == [0, 0]      # tile row 1 has no entries
    assert grouping(64, 64, 128, 128) == (2, 2) and grouping(32, 32, 128, 128) is None    # 16 sub-blocks
    assert grouping(48, 64, 128, 128) is None and grouping(128, 128, 128, 128) == (1, 1)
    with pytest.raises(ValueError, match="does not group list blocks of 32x32"):
        tile_lists(block_lists(pa.Causal(), 1, 1, 64, 64, 32, 32), 32, 32, 64, 64, 128, 128)


def test_a_block_listed_twice_keeps_its_strongest_state_and_no_lists_give_empty_rows():
    from pigeon.attention.patterns import BlockLists
    twice = BlockLists((1, 1, 2), torch.tensor([0, 3, 3]), torch.tensor([1, 1, 0]),
                       torch.tensor([False, True, False]))          # row 0: block 1 partial and full, block 0
    t = tile_lists(twice, 64, 64, 128, 128, 128, 128)
    assert t.ptr.tolist() == [0, 1] and t.nfull.tolist() == [0]
    assert t.ent.tolist() == [(0 << CODE_BITS) | (3 << 2) | 1]     # sub 1 full, sub 0 listed, row 1 nothing
    none = BlockLists((1, 2, 3), torch.zeros(7, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                      torch.zeros(0, dtype=torch.bool))
    t = tile_lists(none, 64, 64, 192, 100, 128, 64)
    assert t.ptr.tolist() == [0, 0, 0, 0, 0] and t.ent.numel() == 0 and t.nfull.tolist() == [0] * 4


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), sel_heads=st.integers(1, 2), group=st.integers(1, 2), q_len=st.integers(1, 700),
       kv_len=st.integers(1, 700), k=st.integers(1, 5), tile_n=st.sampled_from([64, 128]), seed=st.integers(0, 2 ** 16))
def test_topk_tiles_straight_from_the_selection_equal_the_regrouped_lists(batch, sel_heads, group, q_len, kv_len,
                                                                          k, tile_n, seed):
    """128 x tile_n selections (repeats, -1, tails off the tiles, shared by a KV group): entry for entry."""
    from pigeon.runtime.attention_tiles import topk_tile_lists
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // 128), -(-kv_len // tile_n)
    idx = torch.randint(-1, nk, (batch, sel_heads, nq, k), generator=g)
    heads = sel_heads * group
    want = tile_lists(block_lists(pa.TopK(idx, 128, tile_n), batch, heads, q_len, kv_len, 64, 64), 64, 64, q_len,
                      kv_len, 128, tile_n)
    got = topk_tile_lists(idx, heads, q_len, kv_len, tile_n)
    assert got.shape == want.shape
    for a, b in ((got.ptr, want.ptr), (got.ent, want.ent), (got.nfull, want.nfull)):
        assert torch.equal(a, b)


def test_primed_tile_lists_are_returned_for_their_list_tensors():
    import pigeon.runtime.attention_sm90 as rs9
    from pigeon.attention.api import _plan
    from pigeon.runtime.attention_tiles import topk_tile_lists
    idx = torch.tensor([[[[1, 0], [-1, 1]]]])
    q = torch.empty(1, 1, 256, 128, dtype=torch.bfloat16)
    inst, lists, _ = _plan(q, q, q, None, None, pa.TopK(idx, 128, 128), None)
    primed = topk_tile_lists(idx, 1, 256, 256, 128)
    rs9._TILES.clear()
    rs9.prime_tiles(lists.ptr, lists.col, lists.full, 256, 256, 128, primed)
    assert rs9.tiles_for(inst, lists, 256, 256, 128) is primed
    other = rs9.tiles_for(inst, lists, 256, 256, 64)                # another tile: made from the lists
    assert other is not primed and other.ent.numel() == 6                # 2 + 1 selected blocks, 2 tiles each
