"""The tensor-core attention backward (attention_bwd.mma.cu.jinja): the transposed block lists it
walks equal the dense block structure, which instances take it, the PIGEON_ATTENTION_KERNEL
switch, and a representative render compiled for sm_90 without spills.  (Its numbers are checked
on the GPU: tests/gpu/test_attention_gpu.py.)"""
import random
import sys
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa
from pigeon.attention.patterns import all_blocks, block_lists, dense_mask
from pigeon.codegen.attention import AttentionCodegenError
from pigeon.codegen.attention_mma_bwd import render_attention_mma_backward, shared_bytes, unsupported
from pigeon.runtime.attention_kernel import kernel_variant
from pigeon.runtime.toolchain import nvcc_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_mma import _inst  # noqa: E402


def _dense(lists, nk):
    """[B', H', rows, nk] bool (listed) and int (full) of CSR lists over [B', H', rows] rows."""
    B, H, n = lists.shape
    listed = torch.zeros(B * H * n, nk, dtype=torch.bool)
    full = torch.zeros(B * H * n, nk, dtype=torch.long)
    ptr = lists.ptr.long()
    rows = torch.repeat_interleave(torch.arange(B * H * n), ptr[1:] - ptr[:-1])
    listed[rows, lists.col.long()] = True
    full[rows, lists.col.long()] = lists.full.long()
    assert int(listed.sum()) == lists.col.numel(), "a block listed twice"
    return listed.reshape(B, H, n, nk), full.reshape(B, H, n, nk)


def _random_pattern(rng, batch, heads, sq, skv, bm, bn):
    nq, nk = -(-sq // bm), -(-skv // bn)
    kind = rng.choice(["causal", "window", "window_bi", "s2", "blocklist", "blocklist_heads", "topk", "topk_gqa"])
    if kind == "causal":
        return pa.Causal()
    if kind == "window":
        return pa.SlidingWindow(rng.randrange(1, 200))
    if kind == "window_bi":
        return pa.SlidingWindow(rng.randrange(1, 200), causal=False)
    if kind == "s2":
        return pa.S2(stride=rng.randrange(1, 5), local_blocks=rng.randrange(1, 3), block=bm,
                     step=rng.randrange(0, 3), offset=rng.randrange(0, 3))
    if kind.startswith("blocklist"):
        hh = heads if kind == "blocklist_heads" else 1
        keep = torch.rand(hh, nq, nk) < 0.4
        counts = keep.sum(-1).reshape(-1)                        # per (head, query block), heads in order
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        crow = torch.stack([crow[h * nq:h * nq + nq + 1] for h in range(hh)])   # absolute offsets into col
        col = keep.nonzero()[:, 2]
        return pa.BlockList(crow if hh > 1 else crow[0], col, bm, bn)
    hs = heads // 2 if kind == "topk_gqa" else heads
    idx = torch.randint(-1, nk, (batch, hs, nq, rng.randrange(1, 4)))
    return pa.TopK(idx, bm, bn)


@pytest.mark.parametrize("seed", range(40))
def test_transposed_lists_equal_the_dense_block_structure(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch, heads = rng.randrange(1, 3), rng.choice([2, 4])
    square = rng.random() < 0.5
    sq = rng.randrange(1, 300)
    skv = sq if square else rng.randrange(1, 300)
    bm = bn = rng.choice([16, 64])
    p = _random_pattern(rng, batch, heads, sq, skv, bm, bn)
    if isinstance(p, pa.S2) and sq != skv:
        skv = sq
    nq, nk = -(-sq // bm), -(-skv // bn)
    lists = block_lists(p, batch, heads, sq, skv, bm, bn)
    t = lists.transposed(nk)
    B, H, _ = lists.shape
    assert t.shape == (B, H, nk) and t.ptr.numel() == B * H * nk + 1 and t.col.numel() == lists.col.numel()
    listed, full = _dense(lists, nk)
    tl, tf = _dense(t, nq)
    assert torch.equal(tl.transpose(-1, -2), listed) and torch.equal(tf.transpose(-1, -2), full), p
    for r in range(B * H * nk):                  # query blocks ascending per key block
        seg = t.col[int(t.ptr[r]):int(t.ptr[r + 1])]
        assert bool((seg[1:] > seg[:-1]).all())
    # against the dense mask: every kept pair's block is listed (per key block), full blocks are all kept
    m = dense_mask(p, batch, heads, sq, skv)
    m = m.expand(max(m.shape[0], B), max(m.shape[1], H), sq, skv)
    pad = torch.zeros(m.shape[:2] + (nq * bm, nk * bn), dtype=torch.bool)
    pad[..., :sq, :skv] = m
    tiles = pad.reshape(m.shape[:2] + (nq, bm, nk, bn))
    anyk = tiles.any(dim=(3, 5))                                 # [b, h, nq, nk]
    valid = torch.zeros_like(pad)
    valid[..., :sq, :skv] = True
    allk = (tiles | ~valid.reshape(tiles.shape)).all(dim=(3, 5))
    for b in range(m.shape[0]):
        for h in range(m.shape[1]):
            for kb in range(nk):
                got = dict(t.blocks(b, h, kb))
                want = set(anyk[b, h, :, kb].nonzero()[:, 0].tolist())
                assert want <= set(got), (p, b, h, kb)
                assert all(allk[b, h, qb, kb] for qb, f in got.items() if f), (p, b, h, kb)


def test_transposed_lists_of_no_pattern_and_of_empty_lists():
    t = all_blocks(130, 70, 64, 64).transposed(2)
    assert t.shape == (1, 1, 2) and t.blocks(0, 0, 1) == [(0, True), (1, True), (2, True)]
    idx = torch.full((1, 2, 2, 1), -1)
    e = block_lists(pa.TopK(idx), 1, 2, 100, 100, 64, 64).transposed(2)
    assert e.col.numel() == 0 and e.ptr.tolist() == [0, 0, 0, 0, 0]


def test_which_instances_take_the_tensor_core_backward(monkeypatch):
    inst, f32 = _inst(), _inst(dtype=torch.float32)
    assert unsupported(inst) is None and unsupported(_inst(d=64, dtype=torch.float16)) is None
    assert "pattern blocks 16x16" in unsupported(_inst("s2"))
    monkeypatch.delenv("PIGEON_ATTENTION_KERNEL", raising=False)
    assert kernel_variant(inst, emulate=False, backward=True) == "mma"
    assert kernel_variant(inst, emulate=True, backward=True) == "simt"
    assert kernel_variant(f32, emulate=False, backward=True) == "simt"
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "simt")
    assert kernel_variant(inst, emulate=False, backward=True) == "simt"
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    assert kernel_variant(inst, emulate=False, backward=True) == "mma"
    with pytest.raises(AttentionCodegenError, match="attention backward cannot use tensor cores: dtype float32"):
        kernel_variant(f32, emulate=False, backward=True)
    with pytest.raises(AttentionCodegenError, match="backward cannot use tensor cores: pattern blocks 16x16"):
        kernel_variant(_inst("s2"), emulate=False, backward=True)


def test_render_inlines_the_modifier_and_its_derivative():
    rk = render_attention_mma_backward(_inst("softcap_strided_mask", d=64))
    assert "tanhf(" in rk.source and "SM80_16x8x16_F32BF16BF16F32_TN" in rk.source and "dsc = " in rk.source
    assert rk.grid({"seq_kv": 333, "heads": 8, "batch": 2}) == (6, 2, 2)       # GQA 4: one CTA per (key block, KV head)
    assert rk.shared_mem == shared_bytes(64) and shared_bytes(128) == 74240
    with pytest.raises(ValueError, match="cannot use the tensor-core backward"):
        render_attention_mma_backward(_inst(dtype=torch.float32))


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_tensor_core_backward_compiles_for_sm90_without_spills():
    from pigeon.runtime.build import compile_cuda
    rk = render_attention_mma_backward(_inst("alibi_causal", d=128))
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
    r = res.resources[rk.name]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def _run_on_the_cpu_model(monkeypatch, name, *, D=64, dtype=torch.bfloat16, B=1, Hq=4, Hk=2, Sq=70, Skv=90,
                          packed=None, pattern=None, seed=0):
    """The tensor-core forward and backward's CUDA text on tests/mma_emulate.py's lockstep model of
    the sm80 atoms (the forward, measured right on the GPU, vouches for the model): rel errors of
    out, dq, dk, dv against the float64 reference's autograd, with dk and dv NaN-poisoned first."""
    import pigeon.runtime.attention_kernel as ak
    from pigeon.attention.api import _plan
    from test_attention_kernel import VARIANTS
    import mma_emulate

    class Module:
        def __init__(self, rk):
            run = mma_emulate.load(rk)
            self.fn = type("Fn", (), {"launch": lambda _, grid, block, args, types, shared_mem=0: run(grid, args)})()

        def function(self, _name):
            return self.fn

    def module(inst, device, emulate, backward=False):
        rk = ak._render(inst, ak.kernel_variant(inst, False, backward), backward)
        return rk, Module(rk)
    monkeypatch.setattr(ak, "_module", module)
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.setenv("PIGEON_POISON", "1")
    g = torch.Generator().manual_seed(seed)
    kw = dict(VARIANTS[name])
    if pattern is not None:
        kw["pattern"] = pattern
    cu = None
    if packed is not None:
        cu = torch.tensor([0] + list(torch.tensor(packed).cumsum(0)), dtype=torch.int32)
        q, k, v = (torch.randn(sum(packed), h, D, generator=g).to(dtype) for h in (Hq, Hk, Hk))
    else:
        q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
        k, v = (torch.randn(B, Hk, Skv, D, generator=g).to(dtype) for _ in range(2))
    smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
    mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
    inst, lists, _ = _plan(q, k, v, smod, mmod, kw.get("pattern"), cu)
    out, lse = ak.run_attention_kernel(inst, q, k, v, lists, D ** -0.5, cu)
    q2, k2, v2 = (x.double().requires_grad_(True) for x in (q, k, v))
    ref = pa.attention(q2, k2, v2, enable_gqa=True, backend="reference", cu_seqlens=cu, **kw)
    up = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [q2, k2, v2])
    grads = ak.run_attention_backward(inst, q, k, v, out, lse, up.to(dtype), lists, D ** -0.5, cu)
    for x in grads:
        assert x.dtype == dtype and not torch.isnan(x).any(), "a gradient element was not written"

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
    return [rel(out, ref.detach())] + [rel(a, b) for a, b in zip(grads, ref_grads)]


def _cpu_model_available():
    from pigeon.runtime import emulate
    return emulate.available()


@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
def test_tensor_core_backward_on_the_cpu_model(monkeypatch):
    errs = _run_on_the_cpu_model(monkeypatch, "alibi_causal", Sq=40, Skv=70, Hq=4, Hk=1)
    assert max(errs) < 1e-2, errs


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
@pytest.mark.parametrize("case", ["softcap_d128_fp16", "window_q_longer", "packed_causal_d128", "topk_gqa_empty"])
def test_tensor_core_backward_on_the_cpu_model_more(case, monkeypatch):
    kw = {"softcap_d128_fp16": dict(name="softcap_strided_mask", D=128, dtype=torch.float16),
          "window_q_longer": dict(name="window", Sq=90, Skv=70),
          "packed_causal_d128": dict(name="causal", D=128, packed=[40, 1, 0, 70], Hk=1),
          "topk_gqa_empty": dict(name="dense", Sq=130, Skv=130, B=2,
                                 pattern=pa.TopK(torch.tensor([[[[0, -1], [-1, -1], [2, 1]], [[1, 1], [0, 2], [-1, 0]]],
                                                               [[[2, -1], [1, 0], [0, -1]], [[-1, -1], [-1, 0], [2, 2]]]])))}[case]
    errs = _run_on_the_cpu_model(monkeypatch, **kw)
    assert max(errs) < 1e-2, errs
