"""Where the attention kernels compute their modifiers' parts, and with which math: parts of (batch,
head) alone once per CTA (the tensor-core forward) / per listed query block (the tensor-core
backward), parts of the query row once per thread row, hardware approximations (tanh.approx,
exp2 of a pre-scaled argument) in bf16/fp16 kernels only; the approximations' error bounds; and
the rendered text of a (batch, head) + row + key modifier on the lockstep CPU model and the SIMT
emulator against the float64 reference.  (That they compile for sm_90 without spills:
tests/test_attention_mma.py's spill tests, which render every variant.)"""
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pigeon.attention as pa
from pigeon.codegen import attention as attn
from pigeon.codegen.attention import render_attention, render_attention_backward
from pigeon.codegen.attention_mma import render_attention_mma
from pigeon.codegen.attention_mma_bwd import render_attention_mma_backward
from pigeon.codegen.expr_c import APPROX_C

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_mma import _inst  # noqa: E402

# a modifier with parts of every scope: (b, h) alone (an ALiBi-like slope and a head-dependent
# soft-cap), the query row alone (a row offset), and the key
MIXED = dict(score_mod=lambda s, b, h, q, kv: 4.0 * pa.tanh((s + pa.exp(q * -0.02) - pa.exp((h + 1) * -0.5) * (q - kv))
                                                          / (4.0 + h)) * (1.0 + 0.25 * pa.sigmoid(b * 0.5 + h * -1.0)),
             mask_mod=lambda b, h, q, kv: (kv <= q + 3 + h) | ((h + b) % 2 == 1))


def _mixed_inst(d=64, dtype=torch.bfloat16, packed=False):
    from pigeon.attention.api import _plan
    smod, mmod = pa.trace_score_mod(MIXED["score_mod"]), pa.trace_mask_mod(MIXED["mask_mod"])
    if packed:
        q = torch.empty(100, 4, d, dtype=dtype)
        k = torch.empty(100, 2, d, dtype=dtype)
        cu = torch.tensor([0, 60, 100], dtype=torch.int32)
    else:
        q, k, cu = torch.empty(1, 4, 64, d, dtype=dtype), torch.empty(1, 2, 64, d, dtype=dtype), None
    return _plan(q, k, k, smod, mmod, None, cu)[0]


def _defs(src: str, needle: str) -> list[int]:
    return [i for i in range(len(src)) if src.startswith(needle, i)]


def test_alibi_slope_once_per_cta_not_per_score():
    """Before: the slope exp((h + 1) * -0.5) sat in the row code, pasted per score element (inside
    the element loop of both softmax copies).  After: once, after kv_shift, before the key loop."""
    src = render_attention_mma(_inst("alibi_causal", d=128)).source
    slope = [ln for ln in src.split("\n") if "exp2f((t" in ln]
    assert len(slope) == 1, slope                            # one definition in the whole kernel
    at = src.index(slope[0])
    assert src.index("const int kv_shift = kv_len - q_len;") < at < src.index("for (bool first = true; have;")
    assert "expf(" not in src.replace("exp2f(", "")          # exp went to exp2 of a pre-scaled argument
    # the row part (i + kv_shift of the causal mask) once per thread row: after the row's i, before the key loop
    row = src.index("const int i = q0 + wrow + mt * 16 + grp + r * 8;")
    t_row = src.index("((int)(i) + kv_shift)")
    assert row < t_row < src.index("const int kv = kv0 + n * 8 + 2 * quad + (e & 1);", row)
    # the backward: once per listed query block (h changes with the GQA walk), before the per-element loops
    bsrc = render_attention_mma_backward(_inst("alibi_causal", d=128)).source
    slope = [ln for ln in bsrc.split("\n") if "exp2f((t" in ln]
    assert len(slope) == 1 and bsrc.index("const int h = hk * GROUP + gi;") < bsrc.index(slope[0]) \
        < bsrc.index("for (int qh = 0; qh < BM; qh += QW)"), slope


def test_every_scope_lands_where_it_belongs():
    inst = _mixed_inst()
    mc = attn.modifier_code(inst, backward=False)
    # (b, h) alone: the slope, the cap's 4 + h and the sigmoid factor; the row: exp(q * -0.02)
    assert mc.head_code.count("exp2f(") == 2 and "(int)(h)" in mc.head_code and "(int)(i)" not in mc.head_code
    assert "(int)(i)" in mc.row_code and "exp2f(" in mc.row_code and "(int)(kv)" not in mc.row_code
    assert "exp2f(" not in mc.score_code and "exp2f(" not in mc.mask_code and "pg_tanh_approx(" in mc.score_code
    src = render_attention_mma(inst).source
    kv_loop = src.index("for (bool first = true; have;")
    for ln in mc.head_code.split("\n"):
        assert src.index(ln.strip()) < kv_loop, ln
    # the SIMT templates keep one per-thread row: head code right before the row code
    for rk in (render_attention(inst), render_attention_backward(inst)):
        assert rk.source.index("(int)(h)") < rk.source.index("(int)(i)") and "pg_tanh_approx(" in rk.source


def test_approximations_in_bf16_fp16_only():
    """Before (approx_math off: fp32 kernels, and what every kernel had) tanhf / expf; after, in bf16 and
    fp16 kernels, the tanh.approx helper and exp2f of the pre-scaled argument."""
    for dtype in (torch.bfloat16, torch.float16):
        inst = _mixed_inst(dtype=dtype)
        assert attn.approx_math(inst)
        for rk in (render_attention_mma(inst), render_attention_mma_backward(inst), render_attention(inst)):
            body = rk.source[rk.source.index('extern "C"'):]
            assert "pg_tanh_approx(" in body and "tanhf(" not in body
            assert rk.source.count("asm(\"tanh.approx.f32 %0, %1;\"") == 1 and "#ifdef __CUDA_ARCH__" in rk.source
            if "mma" in rk.name:             # (the SIMT template's own softmax keeps expf)
                assert "expf(" not in body.replace("exp2f(", "")
        for bwd in (False, True):
            mc = attn.modifier_code(inst, backward=bwd)
            text = "\n".join((mc.head_code, mc.row_code, mc.mask_code, mc.score_code, mc.dscore_value))
            assert "expf(" not in text.replace("exp2f(", "") and "tanhf(" not in text and "pg_tanh_approx(" in text
    f32 = _mixed_inst(dtype=torch.float32)
    assert not attn.approx_math(f32)
    for rk in (render_attention(f32), render_attention_backward(f32)):
        assert "tanhf(" in rk.source and "expf(" in rk.source and "pg_tanh_approx" not in rk.source


def test_traversal_kernels_keep_libm():
    """The RGNN (traversal) kernels never take the approximations: ExprEmitter's default is off."""
    from pigeon.codegen.expr_c import ExprEmitter
    assert ExprEmitter({}, "x").approx_math is False
    import inspect
    from pigeon.codegen import traversal
    assert "approx_math" not in inspect.getsource(traversal)


def test_exp_approximation_error_bound():
    """exp(x) as exp2f(x * 1.44269504f): the product's float32 rounding is the only error on top of
    exp2's own (2 ulp on the GPU): relative |x| 2^-24 plus the constant's rounding, under 2^-16 for
    |x| <= 88 (bf16 rounds to 2^-8)."""
    x = np.linspace(-87.0, 88.0, 200001, dtype=np.float32)
    got = np.exp2((x * np.float32(1.44269504)).astype(np.float32).astype(np.float64))
    rel = np.abs(got / np.exp(x.astype(np.float64)) - 1.0)
    assert rel.max() < 2.0 ** -16, rel.max()
    assert "1.44269504f" in APPROX_C["exp"] and "1.44269504f" in APPROX_C["sigmoid"]
    assert abs(1.44269504 - 1 / math.log(2)) < 1e-8


def test_mixed_modifier_on_the_simt_emulator(monkeypatch):
    """The SIMT forward's bf16 text (the helper's host branch: tanhf) on the CPU emulator against the
    float64 reference, through tests/test_attention_kernel.py's check."""
    import test_attention_kernel as tk
    monkeypatch.setitem(tk.VARIANTS, "mixed", MIXED)
    tk.test_emulated_kernel_equals_the_reference("mixed", monkeypatch)


def _cpu_model_available():
    from pigeon.runtime import emulate
    return emulate.available()


@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
def test_mixed_modifier_tensor_core_forward_on_the_cpu_model(monkeypatch):
    """The tensor-core forward's text (head code per CTA, row code per thread row) on the lockstep
    model, bf16, the D=64 default schedule."""
    import test_attention_kernel as tk
    import test_attention_mma as tm
    monkeypatch.setitem(tk.VARIANTS, "mixed", MIXED)
    tm._check(tm._forward_on_the_cpu_model(monkeypatch, "mixed", D=64, Sq=150, Skv=170,
                                           seed=random.randrange(1 << 20)), "mixed")


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
@pytest.mark.parametrize("case", ["d128_fp16", "packed_d128", "bm128_d64"])
def test_mixed_modifier_tensor_core_forward_more(case, monkeypatch):
    import test_attention_kernel as tk
    import test_attention_mma as tm
    monkeypatch.setitem(tk.VARIANTS, "mixed", MIXED)
    kw = {"d128_fp16": dict(D=128, dtype=torch.float16, Sq=100, Skv=130),
          "packed_d128": dict(D=128, packed=[70, 1, 0, 90], Hq=4, Hk=2),
          "bm128_d64": dict(D=64, knobs="bm128,q_smem", Sq=150, Skv=150)}[case]
    tm._check(tm._forward_on_the_cpu_model(monkeypatch, "mixed", seed=random.randrange(1 << 20), **kw), case)


@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
def test_mixed_modifier_tensor_core_backward_on_the_cpu_model(monkeypatch):
    """The tensor-core backward's text (head code per listed query block, row code per query column)."""
    import test_attention_kernel as tk
    import test_attention_mma_bwd as tb
    monkeypatch.setitem(tk.VARIANTS, "mixed", MIXED)
    errs = tb._run_on_the_cpu_model(monkeypatch, "mixed", Sq=40, Skv=70, Hq=4, Hk=2, seed=random.randrange(1 << 20))
    assert max(errs) < 1e-2, errs


@pytest.mark.slow
@pytest.mark.skipif(not __import__("pigeon.runtime.toolchain", fromlist=["x"]).nvcc_available(), reason="needs nvcc")
def test_mixed_modifier_compiles_for_sm90_without_spills():
    from pigeon.runtime.build import compile_cuda
    for rk in (render_attention_mma(_mixed_inst(d=128)), render_attention_mma(_mixed_inst(d=128, packed=True)),
               render_attention_mma_backward(_mixed_inst(d=128)), render_attention_mma(_mixed_inst(d=64))):
        r = compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (rk.name, r)
