"""The tensor-core attention forward (attention.mma.cu.jinja): which instances take it, the
PIGEON_ATTENTION_KERNEL switch, and a representative render compiled for sm_90 without spills.
(Its numbers are checked on the GPU: tests/gpu/test_attention_gpu.py.)"""
import sys
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa
from pigeon.attention.api import _plan
from pigeon.codegen.attention import AttentionCodegenError
from pigeon.codegen.attention_mma import render_attention_mma, unsupported
from pigeon.runtime.attention_kernel import kernel_variant
from pigeon.runtime.toolchain import nvcc_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_kernel import VARIANTS  # noqa: E402


def _inst(name="alibi_causal", d=128, dtype=torch.bfloat16, dv=None):
    kw = VARIANTS[name]
    smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
    mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
    q = torch.empty(1, 8, 64, d, dtype=dtype)
    k = torch.empty(1, 2, 64, d, dtype=dtype)
    v = torch.empty(1, 2, 64, dv or d, dtype=dtype)
    return _plan(q, k, v, smod, mmod, kw.get("pattern"), None)[0]


def test_which_instances_take_tensor_cores():
    assert unsupported(_inst()) is None
    assert unsupported(_inst(d=64, dtype=torch.float16)) is None
    assert "dtype float32" in unsupported(_inst(dtype=torch.float32))
    assert "head dims 96/96" in unsupported(_inst(d=96))
    assert "head dims 64/128" in unsupported(_inst(d=64, dv=128))
    assert "pattern blocks 16x16" in unsupported(_inst("s2"))         # S2 of the tests uses 16-blocks


def test_kernel_variant_switch(monkeypatch):
    inst, f32 = _inst(), _inst(dtype=torch.float32)
    monkeypatch.delenv("PIGEON_ATTENTION_KERNEL", raising=False)
    assert kernel_variant(inst, emulate=False) == "mma"
    assert kernel_variant(inst, emulate=True) == "simt"          # a CPU emulates the SIMT text only
    assert kernel_variant(f32, emulate=False) == "simt"
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "simt")
    assert kernel_variant(inst, emulate=False) == "simt"
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    with pytest.raises(AttentionCodegenError, match="cannot use tensor cores: dtype float32"):
        kernel_variant(f32, emulate=False)
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "fast")
    with pytest.raises(AttentionCodegenError, match="expected one of"):
        kernel_variant(inst, emulate=False)


def test_render_inlines_the_modifiers_and_refuses_what_it_cannot_take():
    rk = render_attention_mma(_inst("softcap_strided_mask", d=64))
    assert "tanhf(" in rk.source and "SM80_16x8x16_F32BF16BF16F32_TN" in rk.source
    assert rk.grid({"max_q": 300, "heads": 8, "batch": 2}) == (5, 8, 2)
    with pytest.raises(ValueError, match="cannot use the tensor-core forward"):
        render_attention_mma(_inst(dtype=torch.float32))


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_tensor_core_forward_compiles_for_sm90_without_spills():
    from pigeon.runtime.build import compile_cuda
    rk = render_attention_mma(_inst("alibi_causal", d=128))
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
    r = res.resources[rk.name]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
