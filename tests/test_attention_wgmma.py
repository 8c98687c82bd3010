"""The Hopper wgmma attention forward (attention.wgmma.cu.jinja): which instances take it, the
PIGEON_ATTN_FORWARD knob and its arch check, renders that nvcc compiles for sm_90a without spills
(a few in the default run, the rest of the pattern x head dim x dtype matrix under -m slow), and the
wgmma accumulator layout the template's softmax relies on, checked on the host with CuTe (-m slow).
Its numbers are checked on the GPU: tests/gpu/test_attention_wgmma_gpu.py."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa
import pigeon.runtime.attention_kernel as ak
from pigeon.attention.api import _plan
from pigeon.codegen.attention import AttentionCodegenError
from pigeon.codegen.attention_wgmma import (ARCH, Schedule, forward_template, render_attention_wgmma,
                                            shared_bytes, tuning, unsupported)
from pigeon.runtime.toolchain import nvcc_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_kernel import VARIANTS  # noqa: E402

NAMES = ("dense", "causal", "window", "alibi_causal", "softcap_strided_mask")


def _inst(name="alibi_causal", d=128, dtype=torch.bfloat16, dv=None, hkv=2):
    kw = VARIANTS[name]
    smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
    mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
    q = torch.empty(1, 8, 64, d, dtype=dtype)
    k = torch.empty(1, hkv, 64, d, dtype=dtype)
    v = torch.empty(1, hkv, 64, dv or d, dtype=dtype)
    return _plan(q, k, v, smod, mmod, kw.get("pattern"), None)[0]


def test_which_instances_take_wgmma():
    assert unsupported(_inst()) is None and unsupported(_inst("dense", d=64, dtype=torch.float16, hkv=8)) is None
    assert "dtype float32" in unsupported(_inst(dtype=torch.float32))
    assert "head dims 96/96" in unsupported(_inst(d=96))
    assert "head dims 64/128" in unsupported(_inst(d=64, dv=128))
    assert "pattern blocks 16x16" in unsupported(_inst("s2"))


def test_forward_knob(monkeypatch):
    inst = _inst()
    monkeypatch.delenv("PIGEON_ATTN_FORWARD", raising=False)      # auto: CUTLASS's (GQA folded) on Hopper only
    assert forward_template(inst, "sm_90") == "cutlass" and forward_template(inst, "sm_80") == "mma"
    assert forward_template(inst, None) == "mma" and forward_template(_inst(d=96), "sm_90") == "mma"
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "mma")
    assert forward_template(inst, "sm_90") == "mma"
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "wgmma")
    assert forward_template(inst, "sm_90") == "wgmma" and forward_template(inst, "sm_90a") == "wgmma"
    assert forward_template(_inst(d=96), "sm_90") == "mma"          # the mma forward serves what wgmma cannot
    with pytest.raises(AttentionCodegenError, match="needs an sm_90 .* this one is sm_80"):
        forward_template(inst, "sm_80")
    with pytest.raises(AttentionCodegenError, match="this one is sm_100"):
        forward_template(inst, "sm_100")
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "fast")
    with pytest.raises(AttentionCodegenError, match="PIGEON_ATTN_FORWARD='fast': expected one of"):
        forward_template(inst, "sm_90")


def test_the_launcher_picks_the_wgmma_forward(monkeypatch):
    inst = _inst("causal")
    monkeypatch.delenv("PIGEON_ATTENTION_KERNEL", raising=False)
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "wgmma")
    rk = ak._render(inst, ak.kernel_variant(inst, False), False, "sm_90")
    assert rk.meta["variant"] == "wgmma" and rk.meta["arch"] == ARCH == "sm_90a"
    assert ak._render(inst, "mma", True, "sm_90").meta.get("variant") != "wgmma"     # the backward is mma's
    with pytest.raises(AttentionCodegenError, match="this one is sm_80"):
        ak._render(inst, "mma", False, "sm_80")
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "mma")
    assert ak._render(inst, "mma", False, "sm_90").meta["variant"] == "mma"
    # the same parameters, bound by role the same way
    assert [p.role for p in rk.params] == [p.role for p in ak._render(inst, "mma", False, "sm_90").params]


def test_render():
    rk = render_attention_wgmma(_inst("softcap_strided_mask", d=64))
    assert "tanhf(" in rk.source and "SM90_64x64x16_F32BF16BF16_SS" in rk.source and "sm_90a" in rk.source
    assert rk.grid({"max_q": 300, "heads": 8, "batch": 2}) == (5, 8, 2) and rk.block == (128, 1, 1)
    assert rk.shared_mem == shared_bytes(64) == (64 * 64 * 5 + 64 * 64) * 2 + 1024
    rk = render_attention_wgmma(_inst("dense", d=128, dtype=torch.float16))
    assert "SM90_64x128x16_F32F16F16_SS" in rk.source and "cute::half_t" in rk.source
    assert rk.shared_mem == (64 * 128 * 5 + 64 * 64) * 2 + 1024
    assert "cu_seqlens[b]" in render_attention_wgmma(dataclasses.replace(_inst("causal"), packed=True)).source
    with pytest.raises(ValueError, match="cannot use the wgmma forward"):
        render_attention_wgmma(_inst(dtype=torch.float32))


def test_schedule_knobs(monkeypatch):
    monkeypatch.delenv("PIGEON_ATTN_WGMMA_TUNE", raising=False)
    assert tuning() == Schedule() == Schedule(False, 2) and tuning("p_regs,minb3") == Schedule(True, 3)
    assert tuning(Schedule(True, 1).tag()) == Schedule(True, 1)
    with pytest.raises(ValueError, match="unknown knob 'p_tmem'"):
        tuning("p_tmem")
    inst = _inst("causal", d=64)
    smem = render_attention_wgmma(inst)
    monkeypatch.setenv("PIGEON_ATTN_WGMMA_TUNE", "p_regs")          # the environment, read per render
    regs = render_attention_wgmma(inst)
    assert regs.meta["schedule"] == "p_regs,minb2" and smem.meta["schedule"] == "p_smem,minb2"
    assert regs.name != smem.name and regs.shared_mem == shared_bytes(64, True) == smem.shared_mem - 64 * 64 * 2
    assert "SM90_64x64x16_F32BF16BF16_RS" in regs.source and "_RS" not in smem.source
    assert "fence_view_async_shared();\n        __syncthreads();\n        wg_gemm(mma_o" in smem.source
    assert "recast<uint32_t>(tOrP)" in regs.source and "recast<uint32_t>(tOrP)" not in smem.source
    assert "__launch_bounds__(THREADS, 3)" in render_attention_wgmma(inst, "minb3").source
    strict = render_attention_wgmma(inst, "p_smem,strict")
    assert tuning("strict") == Schedule(strict=True) and tuning(Schedule(True, 2, True).tag()) == Schedule(True, 2, True)
    assert strict.meta["schedule"] == "p_smem,minb2,strict" and strict.name != smem.name
    assert "cp_async_wait<0>();             // strict" in strict.source and "// strict" not in smem.source
    # the generic-proxy writes use the element-offset (position-independent) swizzle, never the atom's
    # byte-address swizzle applied to element offsets (the first version's bug)
    for src in (smem.source, regs.source, strict.source):
        assert "as_position_independent_swizzle_layout(LayoutV{})" in src
        assert "lq(r, col)" not in src and "lv(col, r" not in src and "lk(r, col" not in src
    assert "p_smem + op_(" in smem.source and "p_smem + lp(" not in smem.source


def _compile(jobs):
    from concurrent.futures import ThreadPoolExecutor
    from pigeon.runtime.build import compile_cuda

    def one(job):
        name, d, dtype, hkv, packed, knobs = job
        inst = _inst(name, d=d, dtype=dtype, hkv=hkv)
        if packed:
            inst = dataclasses.replace(inst, packed=True)
        rk = render_attention_wgmma(inst, knobs)
        return job, compile_cuda(rk.source, arch=rk.meta["arch"], name=rk.name).resources[rk.name]
    with ThreadPoolExecutor(2) as pool:
        for job, r in pool.map(one, jobs):
            assert r["arch"] == "sm_90a" and r["spill_stores"] == 0 and r["spill_loads"] == 0, (job, r)


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_wgmma_forward_compiles_for_sm90a():
    # one representative in the default run (each sm_90a CuTe compile takes 10-30 s on the CPU machine):
    # ALiBi + causal D128 bf16 with GQA (head code, both pattern paths); the rest under -m slow
    _compile([("alibi_causal", 128, torch.bfloat16, 2, False, "")])


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_wgmma_forward_compiles_for_sm90a_more():
    # dense D128 bf16 without GQA; ALiBi + causal D64 fp16; mask_mod + softcap GQA with P in registers (RS)
    _compile([("dense", 128, torch.bfloat16, 8, False, ""), ("alibi_causal", 64, torch.float16, 2, False, ""),
              ("softcap_strided_mask", 128, torch.bfloat16, 2, False, "p_regs")])


DEFAULT_JOBS = {("dense", 128, torch.bfloat16), ("alibi_causal", 64, torch.float16),
                ("softcap_strided_mask", 128, torch.bfloat16), ("alibi_causal", 128, torch.bfloat16)}


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_wgmma_forward_compiles_for_sm90a_everywhere():
    jobs = [(n, d, dt, 2, False, "") for n in NAMES for d in (64, 128) for dt in (torch.bfloat16, torch.float16)
            if (n, d, dt) not in DEFAULT_JOBS]
    jobs += [(n, d, torch.bfloat16, 2, False, "p_regs") for n in ("alibi_causal", "dense") for d in (64, 128)]
    _compile(jobs + [("causal", 128, torch.bfloat16, 2, True, ""), ("window_bidirectional", 64, torch.bfloat16, 1,
                                                                    False, "p_regs,minb3")])


LAYOUT_PROBE = r"""
#include <cstdio>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
using namespace cute;
// the element -> (row, column) map of a 64 x N wgmma accumulator that attention.wgmma.cu.jinja's
// softmax relies on: thread t, element i at row 16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2),
// column 8 (i / 4) + 2 (t % 4) + i % 2 (a row in the 4 lanes of a quad); and with P in registers, that
// element j of the RS A fragment of O = P V is at the (row, column) of element j of S's accumulator
// fragment, in a compact fragment (the template converts S to P elementwise in order)
template <int N, class Mma>
int check(Mma mma) {
  int bad = 0;
  for (int t = 0; t < 128; ++t) {
    auto c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<N>>{}));
    if (size(c) != 64 * N / 128) ++bad;
    for (int i = 0; i < size(c); ++i) {
      bad += get<0>(c(i)) != 16 * (t / 32) + (t % 32) / 4 + 8 * ((i >> 1) & 1);
      bad += get<1>(c(i)) != 8 * (i / 4) + 2 * (t % 4) + (i & 1);
    }
  }
  return bad;
}
template <class MS, class MO>
int check_rs(MS ms, MO mo) {
  int bad = 0;
  for (int t = 0; t < 128; ++t) {
    auto cs = ms.get_slice(t).partition_C(make_identity_tensor(Shape<_64, _64>{}));
    auto ca = mo.get_slice(t).partition_A(make_identity_tensor(Shape<_64, _64>{}));
    auto fa = mo.get_slice(t).partition_fragment_A(make_tensor(make_smem_ptr((cute::bfloat16_t*)nullptr),
                                                               Shape<_64, _64>{}));
    if (size(ca) != size(cs) || size(fa) != size(cs)) ++bad;
    for (int j = 0; j < size(ca); ++j) bad += !(ca(j) == cs(j)) + (fa.layout()(j) != j);
  }
  return bad;
}
int main() {
  int bad = check<64>(make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{}))
          + check<64>(make_tiled_mma(SM90_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::MN>{}))
          + check<128>(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{}))
          + check_rs(make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{}),
                     make_tiled_mma(SM90_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>{}))
          + check_rs(make_tiled_mma(SM90_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>{}),
                     make_tiled_mma(SM90_64x128x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::MN>{}));
  printf("bad %d\n", bad);
  return bad != 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_wgmma_accumulator_layout_on_the_host(tmp_path):
    from pigeon.codegen.cutlass_headers import NVCC_FLAGS, include_dir
    from pigeon.runtime.toolchain import nvcc_path
    src = tmp_path / "probe.cu"
    src.write_text(LAYOUT_PROBE)
    exe = tmp_path / "probe"
    subprocess.run([nvcc_path(), "--std=c++17", "-I", include_dir(), *NVCC_FLAGS, str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=600)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0 and "bad 0" in out.stdout, out.stdout


OFFSETS_PROBE = r"""
#include <cstdio>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
using namespace cute;
// For every element of Q, K (2 stages), V (2 stages) and P: the byte address the wgmma reads it at --
// the descriptors of CuTe's partition of each tile (make_fragment_A/B, per k-block), interpreted by
// make_gmma_desc's canonical B128 forms (uint128 units; K-major ((8,n),2):((8,SBO),1), MN-major
// ((8,n),(8,k)):((1,LBO),(8,SBO)); Swizzle<3,4,3> on the byte address) -- against the byte address
// attention.wgmma.cu.jinja's cp.async / P stores write it at (2 * the element offset of
// as_position_independent_swizzle_layout).  "old" counts the mismatches of the first version's
// offsets (the atom's layout called on (row, col): byte swizzle on element offsets) -- nonzero.
template <class T> struct Probe {
static uint32_t sw128(uint32_t b) { return b ^ ((b & 0x380u) >> 3); }
static uint32_t hw_addr(GmmaDescriptor d, bool mn_major, int mn, int kk) {
  uint32_t start = d.bitfield.start_address_, lbo = d.bitfield.leading_byte_offset_, sbo = d.bitfield.stride_byte_offset_;
  uint32_t chunk, byte;
  if (!mn_major) { chunk = start + 8 * (mn % 8) + sbo * (mn / 8) + kk / 8; byte = chunk * 16 + 2 * (kk % 8); }
  else { chunk = start + (mn % 64) / 8 + lbo * (mn / 64) + 8 * (kk % 8) + sbo * (kk / 8); byte = chunk * 16 + 2 * (mn % 8); }
  return sw128(byte);
}
template <bool MN, class Frag, class Off>
static int check(Frag const& frag, int mns, Off off) {
  int bad = 0;
  for (int kb = 0; kb < size<2>(frag); ++kb) {
    GmmaDescriptor d = frag(0, 0, kb);
    bad += d.bitfield.layout_type_ != 1;            // B128
    for (int mn = 0; mn < mns; ++mn)
      for (int kk = 0; kk < 16; ++kk) bad += hw_addr(d, MN, mn, kk) != 2u * off(mn, 16 * kb + kk);
  }
  return bad;
}
template <int D, class MO>
static void run(MO mo, int& bad_new, int& bad_old) {
  using LayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<_64, Int<D>>{}));
  using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<_64, Int<D>, _2>{}));
  using LayoutV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<D>, _64, _2>{}));
  using LayoutP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<_64, _64>{}));
  LayoutQ lq; LayoutK lk; LayoutV lv; LayoutP lp;
  auto oq = as_position_independent_swizzle_layout(lq);
  auto ok = as_position_independent_swizzle_layout(lk);
  auto ov = as_position_independent_swizzle_layout(lv);
  auto op = as_position_independent_swizzle_layout(lp);
  T* base = reinterpret_cast<T*>(0);          // on the host the descriptors' base address is 0 (1024-aligned)
  auto ms = make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{});
  auto ts = ms.get_slice(0);
  auto to = mo.get_slice(0);
  auto fQ = ts.make_fragment_A(ts.partition_A(make_tensor(make_smem_ptr(base), lq)));
  auto fK = ts.make_fragment_B(ts.partition_B(make_tensor(make_smem_ptr(base), lk)));
  auto fV = to.make_fragment_B(to.partition_B(make_tensor(make_smem_ptr(base), lv)));
  auto fP = to.make_fragment_A(to.partition_A(make_tensor(make_smem_ptr(base), lp)));
  bad_new += check<false>(fQ, 64, [&](int r, int c) { return oq(r, c); });
  bad_old += check<false>(fQ, 64, [&](int r, int c) { return lq(r, c); }) != 0;
  for (int s = 0; s < 2; ++s) {
    bad_new += check<false>(fK(_, _, _, s), 64, [&](int r, int c) { return ok(r, c, s); });
    bad_new += check<true>(fV(_, _, _, s), D, [&](int d, int key) { return ov(d, key, s); });
    bad_old += check<false>(fK(_, _, _, s), 64, [&](int r, int c) { return lk(r, c, s); }) != 0;
    bad_old += check<true>(fV(_, _, _, s), D, [&](int d, int key) { return lv(d, key, s); }) != 0;
  }
  bad_new += check<false>(fP, 64, [&](int r, int c) { return op(r, c); });
  bad_old += check<false>(fP, 64, [&](int r, int c) { return lp(r, c); }) != 0;
}
};
int main() {
  int bad_new = 0, bad_old = 0;
  Probe<cute::bfloat16_t>::run<64>(make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{}), bad_new, bad_old);
  Probe<cute::bfloat16_t>::run<128>(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{}), bad_new, bad_old);
  printf("\nbad %d old_tiles_wrong %d\n", bad_new, bad_old);
  return bad_new != 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_wgmma_smem_offsets_match_the_descriptors_on_the_host(tmp_path):
    """The template's cp.async / P-store element offsets put every element where the partitioned GMMA
    descriptors read it (Q, K, V, P; D 64 and 128; both stages); the first version's offsets (the atom
    layout's byte swizzle applied to element offsets) misplace all 12 tiles checked (16-bit types: fp16 tiles are the same)."""
    from pigeon.codegen.cutlass_headers import NVCC_FLAGS, include_dir
    from pigeon.runtime.toolchain import nvcc_path
    src = tmp_path / "offsets.cu"
    src.write_text(OFFSETS_PROBE)
    exe = tmp_path / "offsets"
    subprocess.run([nvcc_path(), "--std=c++17", "-I", include_dir(), *NVCC_FLAGS, str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=600)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bad 0 old_tiles_wrong 12" in out.stdout, out.stdout[-2000:]
