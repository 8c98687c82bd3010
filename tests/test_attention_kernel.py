"""pigeon's attention kernels (attention.simt.cu.jinja, attention_bwd.simt.cu.jinja) with traced
modifiers and the patterns' block lists: the CUDA text run emulated on the CPU equals the float64
reference (bf16 tolerance) for every pattern and modifier, with GQA, unequal lengths and packed
documents, outputs poisoned first, forward and backward; rendered kernels compile for sm_90."""
import random

import pytest
import torch

import pigeon.attention as pa
from pigeon.codegen.attention import AttentionInstance, render_attention, render_attention_backward
from pigeon.runtime import emulate
from pigeon.runtime.build import compile_cuda, nvcc_available

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no C++ compiler for the CUDA emulation")

VARIANTS = {
    "dense": dict(),
    "causal": dict(pattern=pa.Causal()),
    "window": dict(pattern=pa.SlidingWindow(11)),
    "window_bidirectional": dict(pattern=pa.SlidingWindow(6, causal=False)),
    "s2": dict(pattern=pa.S2(stride=3, local_blocks=1, block=16, step=1, offset=1)),
    "alibi_causal": dict(score_mod=lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q), pattern=pa.Causal()),
    "softcap_strided_mask": dict(score_mod=lambda s, b, h, q, kv: 2.0 * pa.tanh(s / 2.0),
                                 mask_mod=lambda b, h, q, kv: ((kv // 8 + h) % 2 == 0) | (q == kv)),
}


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_emulated_kernel_equals_the_reference(name, monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "emulate")
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, D = 2, 4, 2, 37, 64
    Skv = Sq if name == "s2" else 45                   # S2 is defined for equal lengths
    q = torch.randn(B, Hq, Sq, D, generator=g).bfloat16()
    k = torch.randn(B, Hkv, Skv, D, generator=g).bfloat16()
    v = torch.randn(B, Hkv, Skv, D, generator=g).bfloat16()
    kw = VARIANTS[name]
    out, lse = pa.attention(q, k, v, enable_gqa=True, return_lse=True, **kw)
    ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), enable_gqa=True, return_lse=True,
                                backend="reference", **kw)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element was not written"
    assert _rel_err(out, ref) < 2e-2, f"{name} seed {seed}: out rel err {_rel_err(out, ref):.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)


def test_packed_documents_and_topk_through_the_kernel(monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "emulate")
    monkeypatch.setenv("PIGEON_POISON", "1")
    g = torch.Generator().manual_seed(3)
    lens = [9, 1, 30, 17]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    out, lse = pa.attention(q, k, v, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True, return_lse=True)
    ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), cu_seqlens=cu,
                                enable_gqa=True, return_lse=True, backend="reference")
    assert _rel_err(out, ref) < 2e-2
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    # top-k blocks shared by each KV group (GQA), one query block selecting nothing
    S, bs = 48, 16
    qd, kd, vd = (torch.randn(1, h, S, 64, generator=g).bfloat16() for h in (4, 2, 2))
    idx = torch.tensor([[[[0, -1], [0, 1], [2, 0]], [[-1, -1], [1, -1], [1, 2]]]])
    topk = pa.TopK(idx, bs, bs)
    out, lse = pa.attention(qd, kd, vd, pattern=topk, enable_gqa=True, return_lse=True)
    ref, ref_lse = pa.attention(qd.double(), kd.double(), vd.double(), pattern=topk, enable_gqa=True,
                                return_lse=True, backend="reference")
    assert _rel_err(out, ref) < 2e-2 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out[0, 2:4, :bs] == 0).all()                  # KV group 1, query block 0 selects nothing


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_emulated_backward_kernel_equals_the_reference_gradients(name, monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "emulate")
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    S = 33
    q, k, v = (torch.randn(2, h, S, 64, generator=g).requires_grad_(True) for h in (4, 2, 2))
    kw = VARIANTS[name]
    out = pa.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), enable_gqa=True, **kw)
    assert out.dtype == torch.bfloat16
    up = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out.float() * up).sum(), [q, k, v])
    q2, k2, v2 = (t.detach().bfloat16().double().requires_grad_(True) for t in (q, k, v))
    ref = pa.attention(q2, k2, v2, enable_gqa=True, backend="reference", **kw)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [q2, k2, v2])
    for what, a, b in zip("qkv", grads, ref_grads):
        assert not torch.isnan(a).any(), f"d{what} not written"
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"{name} d{what}: rel err {rel:.2e} (seed {seed})"


def test_packed_backward_through_the_kernel(monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "emulate")
    g = torch.Generator().manual_seed(11)
    lens = [5, 20, 1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), h, 64, generator=g).requires_grad_(True) for h in (2, 1, 1))
    out = pa.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True)
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    q2, k2, v2 = (t.detach().bfloat16().double().requires_grad_(True) for t in (q, k, v))
    ref = pa.attention(q2, k2, v2, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True, backend="reference")
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), [q2, k2, v2])):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2


def test_cpu_kernels_without_emulation_run_the_instance_semantics(monkeypatch):
    monkeypatch.delenv("PIGEON_CPU_BACKEND", raising=False)
    q = torch.randn(1, 2, 8, 64).bfloat16()
    out = pa.attention(q, q, q, pattern=pa.Causal())
    torch.testing.assert_close(out, pa.attention(q, q, q, pattern=pa.Causal(), backend="reference"))


@pytest.mark.skipif(not nvcc_available(), reason="nvcc is not installed")
def test_rendered_kernels_compile_for_sm90():
    score = pa.trace_score_mod(lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q))
    mask = pa.trace_mask_mod(lambda b, h, q, kv: (kv // 64 + h) % 4 != 1)
    from pigeon.attention.patterns import mask_expr
    for inst in (AttentionInstance(64, 64, "bfloat16"),
                 AttentionInstance(128, 128, "float16", group=4, score_mod=score, pattern_mask=mask_expr(pa.Causal())),
                 AttentionInstance(64, 64, "bfloat16", packed=True, mask_mod=mask,
                                   pattern_mask=mask_expr(pa.S2(8, 2, block=64)))):
        for rk in (render_attention(inst), render_attention_backward(inst)):
            res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
            assert res.resources.get(rk.name) is not None, rk.name
