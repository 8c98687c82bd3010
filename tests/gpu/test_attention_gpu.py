"""pigeon's attention kernel on the GPU: every pattern and modifier, bf16 and fp16, head dims 64 and
128, GQA, packed documents, against the float64 reference with dense masks (bf16 tolerance), with
NaN-poisoned outputs; gradients through the kernel path."""
import random
import sys
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_attention_kernel import VARIANTS, _rel_err  # noqa: E402
from test_attention_mma import GPU_KNOBS  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _mma_forward(monkeypatch):
    """This file tests the mma.sync forward (and the SIMT kernels); the wgmma forward, the default on
    sm_90, has its own file (test_attention_wgmma_gpu.py)."""
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "mma")


def _forward_matches_the_reference(name, head_dim, dtype):
    """pa.attention of VARIANTS[name] (GQA 4, lengths off the 64-tiles) against the float64
    reference: out within bf16 tolerance, lse finite exactly where the reference's is."""
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq = 2, 8, 2, 300
    Skv = Sq if name == "s2" else 333                  # S2 is defined for equal lengths
    q = torch.randn(B, Hq, Sq, head_dim, generator=g).to(DEV, dtype)
    k = torch.randn(B, Hkv, Skv, head_dim, generator=g).to(DEV, dtype)
    v = torch.randn(B, Hkv, Skv, head_dim, generator=g).to(DEV, dtype)
    kw = VARIANTS[name]
    out, lse = pa.attention(q, k, v, enable_gqa=True, return_lse=True, **kw)
    ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), enable_gqa=True, return_lse=True,
                                backend="reference", **kw)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel_err(out, ref) < 2e-2, f"{name} seed {seed}: {_rel_err(out, ref):.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kernel_equals_the_reference(name, head_dim, dtype, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")
    _forward_matches_the_reference(name, head_dim, dtype)


MMA_VARIANTS = sorted(n for n in VARIANTS if n != "s2")      # S2 of the tests uses 16-blocks: SIMT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", MMA_VARIANTS)
def test_tensor_core_forward_equals_the_reference(name, head_dim, dtype, monkeypatch):
    """PIGEON_ATTENTION_KERNEL=mma: an instance the tensor-core forward cannot take is an error,
    never a quiet SIMT run."""
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    _forward_matches_the_reference(name, head_dim, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", MMA_VARIANTS)
@pytest.mark.parametrize("knobs", GPU_KNOBS)
def test_tensor_core_forward_schedules(knobs, name, head_dim, monkeypatch):
    """The tensor-core forward under the other schedules (PIGEON_ATTN_MMA_TUNE): 64-row and 128-row
    query tiles (the default at D=128 runs in the tests above), bf16."""
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.setenv("PIGEON_ATTN_MMA_TUNE", knobs)
    _forward_matches_the_reference(name, head_dim, torch.bfloat16)


@pytest.mark.parametrize("knobs", ["default", *GPU_KNOBS])
def test_tensor_core_forward_block_lists_and_documents_per_schedule(knobs, monkeypatch):
    """Top-k (GQA-shared, empty selections), per-head block lists and packed documents, which walk two
    list rows per 128-row tile, under each schedule."""
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.setenv("PIGEON_ATTN_MMA_TUNE", knobs)
    g = torch.Generator().manual_seed(7)
    S, nq = 333, 6
    q = torch.randn(2, 8, S, 128, generator=g).to(DEV, torch.bfloat16)
    k, v = (torch.randn(2, 2, S, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    idx = torch.randint(-1, nq, (2, 2, nq, 3), generator=g)
    idx[0, 0, 1] = -1
    keep = torch.rand(8, nq, nq, generator=g) < 0.4
    keep[0, 2] = False
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(-1).reshape(-1).cumsum(0)])
    crow = torch.stack([crow[h * nq:h * nq + nq + 1] for h in range(8)])
    for pat in (pa.TopK(idx.to(DEV)), pa.BlockList(crow.to(DEV), keep.nonzero()[:, 2].to(DEV))):
        out, lse = pa.attention(q, k, v, pattern=pat, enable_gqa=True, return_lse=True)
        ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), pattern=pat, enable_gqa=True,
                                    return_lse=True, backend="reference")
        assert _rel_err(out, ref) < 2e-2 and torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        assert (out[~torch.isfinite(ref_lse)] == 0).all()
    lens = [100, 1, 257, 64, 0, 130]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(sum(lens), h, 128, generator=g).to(DEV, torch.bfloat16) for h in (8, 2, 2))
    out = pa.attention(q, k, v, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True)
    ref = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True,
                       backend="reference")
    assert _rel_err(out, ref) < 2e-2


def test_tensor_core_forward_packed_documents(monkeypatch):
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.setenv("PIGEON_POISON", "1")
    g = torch.Generator().manual_seed(2)
    lens = [100, 1, 257, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 128, generator=g).to(DEV, torch.bfloat16) for h in (8, 2, 2))
    out = pa.attention(q, k, v, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True)
    ref = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True,
                       backend="reference")
    assert _rel_err(out, ref) < 2e-2


def test_packed_documents_on_the_gpu():
    g = torch.Generator().manual_seed(1)
    lens = [100, 1, 257, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 128, generator=g).to(DEV, torch.bfloat16) for h in (8, 2, 2))
    out = pa.attention(q, k, v, pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True)
    ref = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), cu_seqlens=cu, enable_gqa=True,
                       backend="reference")
    assert _rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_backward_kernel_equals_the_reference_gradients(name):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    S = 200
    q, k, v = (torch.randn(2, h, S, 64, generator=g).to(DEV).requires_grad_(True) for h in (8, 2, 2))
    kw = VARIANTS[name]
    out = pa.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), enable_gqa=True, **kw)
    up = torch.randn(out.shape, generator=g).to(DEV)
    grads = torch.autograd.grad((out.float() * up).sum(), [q, k, v])
    q2, k2, v2 = (t.detach().bfloat16().double().requires_grad_(True) for t in (q, k, v))
    ref = pa.attention(q2, k2, v2, enable_gqa=True, backend="reference", **kw)
    for what, a, b in zip("qkv", grads, torch.autograd.grad((ref * up.double()).sum(), [q2, k2, v2])):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"{name} d{what}: {rel:.2e} (seed {seed})"


def _grads_vs_reference(q, k, v, g, **kw):
    """(kernel grads, float64 reference grads) of sum(out * up) for fp32 leaves q, k, v cast to
    the dtype of the run."""
    dtype = kw.pop("dtype")
    out = pa.attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True, **kw)
    assert out.dtype == dtype
    up = torch.randn(out.shape, generator=g).to(DEV)
    grads = torch.autograd.grad((out.float() * up).sum(), [q, k, v])
    q2, k2, v2 = (t.detach().to(dtype).double().requires_grad_(True) for t in (q, k, v))
    ref = pa.attention(q2, k2, v2, enable_gqa=True, backend="reference", **kw)
    return grads, torch.autograd.grad((ref * up.double()).sum(), [q2, k2, v2])


def _check_grads(grads, ref_grads, what):
    for x, a, b in zip("qkv", grads, ref_grads):
        assert not torch.isnan(a).any(), f"{what} d{x}: an element was not written"
        rel = ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
        assert rel < 2e-2, f"{what} d{x}: rel err {rel:.2e}"


@pytest.mark.parametrize("lengths", [(300, 333), (300, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", MMA_VARIANTS)
def test_tensor_core_backward_equals_the_reference_gradients(name, head_dim, dtype, lengths, monkeypatch):
    """PIGEON_ATTENTION_KERNEL=mma: the tensor-core backward (key-major, dK and dV written once,
    NaN-poisoned first) against the float64 reference's autograd; GQA 8/2, lengths off the 64-tiles."""
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    Sq, Skv = lengths
    q = torch.randn(2, 8, Sq, head_dim, generator=g).to(DEV).requires_grad_(True)
    k, v = (torch.randn(2, 2, Skv, head_dim, generator=g).to(DEV).requires_grad_(True) for _ in range(2))
    grads, ref = _grads_vs_reference(q, k, v, g, dtype=dtype, **VARIANTS[name])
    _check_grads(grads, ref, f"{name} d{head_dim} {dtype} {Sq}/{Skv} seed {seed}")


def test_tensor_core_backward_packed_documents_and_topk(monkeypatch):
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.setenv("PIGEON_POISON", "1")
    g = torch.Generator().manual_seed(5)
    lens = [100, 1, 257, 64, 0, 130]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(sum(lens), h, 128, generator=g).to(DEV).requires_grad_(True) for h in (8, 2, 2))
    grads, ref = _grads_vs_reference(q, k, v, g, dtype=torch.bfloat16, pattern=pa.Causal(), cu_seqlens=cu)
    _check_grads(grads, ref, "packed causal")
    # top-k blocks shared by each KV group (GQA 4), query block 1 of KV group 0 selecting nothing
    S, nq = 320, 5
    q, k, v = (torch.randn(2, h, S, 64, generator=g).to(DEV).requires_grad_(True) for h in (8, 2, 2))
    idx = torch.randint(-1, nq, (2, 2, nq, 3), generator=g)
    idx[0, 0, 1] = -1
    grads, ref = _grads_vs_reference(q, k, v, g, dtype=torch.bfloat16, pattern=pa.TopK(idx.to(DEV)))
    _check_grads(grads, ref, "top-k GQA")
