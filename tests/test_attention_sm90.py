"""The CUTLASS sm90 attention forward (attention.sm90.cu.jinja on CUTLASS's 88_hopper_fmha kernel):
which instances and calls take it, the PIGEON_ATTN_FORWARD / PIGEON_ATTN_SM90_TUNE knobs, the
instances' pattern kind and key stability, the rendered fusion, and (-m slow: minutes of nvcc) that
the library compiles for sm_90a.  Its numbers are checked on the GPU: tests/gpu/test_attention_sm90_gpu.py."""
import hashlib
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import pigeon.attention as pa
import pigeon.runtime.attention_kernel as ak
from pigeon.attention.api import _plan, kernels_used
from pigeon.codegen import attention_sm90 as s9
from pigeon.codegen import cutlass_headers
from pigeon.codegen.attention import AttentionCodegenError, AttentionInstance
from pigeon.codegen.attention_wgmma import forward_template
from pigeon.ir.expr import Expr
from pigeon.runtime.toolchain import nvcc_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_kernel import VARIANTS  # noqa: E402


def _inst(name="causal", d=128, dtype=torch.bfloat16, hkv=8, **extra):
    kw = dict(VARIANTS.get(name, {}), **extra)
    smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
    mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
    q = torch.empty(1, 8, 64, d, dtype=dtype)
    k = torch.empty(1, hkv, 64, d, dtype=dtype)
    return _plan(q, k, k, smod, mmod, kw.get("pattern"), None)[0]


def test_instances_carry_their_pattern_kind():
    assert _inst("dense").pattern_kind == "" and _inst("causal").pattern_kind == "Causal"
    assert _inst("window").pattern_kind == "SlidingWindow" and _inst("s2").pattern_kind == "S2"
    topk = _inst("dense", pattern=pa.TopK(torch.zeros(1, 8, 1, 1, dtype=torch.int64)))
    assert topk.pattern_kind == "TopK" and topk.pattern_mask is None and topk != _inst("dense")


def test_keys_without_a_pattern_kind_did_not_change():
    """The key is the hash of the field repr it had before pattern_kind existed (disk-cache entries stay)."""
    for inst in (_inst("dense"), _inst("softcap_strided_mask", d=64)):
        old = repr(tuple((f.name, getattr(inst, f.name).digest if isinstance(getattr(inst, f.name), Expr)
                          else getattr(inst, f.name)) for f in fields(inst) if f.name != "pattern_kind"))
        assert inst.key() == hashlib.sha256(old.encode()).hexdigest()[:16]
    causal = _inst("causal")
    assert causal.key() != AttentionInstance(**{f.name: getattr(causal, f.name) for f in fields(causal)
                                                if f.name != "pattern_kind"}).key()


def test_which_instances_take_the_cutlass_forward():
    assert s9.unsupported(_inst("dense")) is None and s9.unsupported(_inst("causal", d=64)) is None
    assert s9.unsupported(_inst("alibi_causal", dtype=torch.float16)) is None
    assert s9.unsupported(_inst("softcap_strided_mask")) is None
    # GQA folds the query heads into the rows; the other patterns iterate their lists on its tile
    assert s9.unsupported(_inst(hkv=2)) is None and s9.unsupported(_inst("window", hkv=4)) is None
    assert s9.unsupported(_inst("dense", pattern=pa.S2(8, 2))) is None
    assert "pattern blocks 16x16" in s9.unsupported(_inst("s2"))
    assert s9.unsupported(_inst("dense", pattern=pa.TopK(torch.zeros(1, 8, 1, 1, dtype=torch.int64)))) is None
    assert not s9.listed(_inst("causal")) and not s9.listed(_inst("dense"))
    assert s9.listed(_inst("window")) and s9.listed(_inst("dense", pattern=pa.S2(8, 2)))
    # list blocks that do not tile 128 x 128 whole: pigeon's wgmma kernel
    assert "blocks 48x64" in s9.unsupported(
        _inst("dense", pattern=pa.TopK(torch.zeros(1, 8, 2, 1, dtype=torch.int64), block_m=48)))
    # lists off the 64 x 64 grid: pigeon's tensor-core forward (the fallback of a call CUTLASS's cannot
    # take) cannot iterate them
    assert "pattern blocks 256x256" in s9.unsupported(_inst("dense", pattern=pa.S2(4, 1, block=256)))
    assert "the fallback of listed patterns" in s9.unsupported(_inst("dense", pattern=pa.S2(4, 1, block=128)))
    assert "dtype float32" in s9.unsupported(_inst(dtype=torch.float32))
    assert "head dims 96" in s9.unsupported(_inst(d=96))
    packed = AttentionInstance(128, 128, "bfloat16", packed=True)
    assert "cu_seqlens" in s9.unsupported(packed)


def test_which_calls_take_it():
    assert s9.call_unsupported(4, 32, 4096, 4096, 128) is None
    assert s9.call_unsupported(1, 1, 8, 1, 64) is None
    assert "multiple of 8" in s9.call_unsupported(2, 8, 300, 333, 128)
    assert "empty" in s9.call_unsupported(2, 8, 0, 64, 128) and "empty" in s9.call_unsupported(2, 8, 64, 0, 128)
    assert "2^31" in s9.call_unsupported(1, 64, 1 << 18, 1 << 18, 128)
    # GQA: a 128-row tile never spans two folded heads
    assert s9.call_unsupported(2, 8, 256, 333, 128, group=2) is None
    assert "with GQA (group 2) is not a multiple of 128" in s9.call_unsupported(2, 8, 200, 333, 128, group=2)


def test_forward_knob_routes_dense_and_causal_to_cutlass(monkeypatch):
    monkeypatch.delenv("PIGEON_ATTN_FORWARD", raising=False)
    for name in ("dense", "causal", "alibi_causal", "softcap_strided_mask"):
        assert forward_template(_inst(name), "sm_90") == "cutlass", name
        assert forward_template(_inst(name), "sm_80") == "mma", name
    assert forward_template(_inst("window"), "sm_90") == "cutlass"
    assert forward_template(_inst(hkv=2), "sm_90") == "cutlass"
    s2_256 = _inst("dense", pattern=pa.S2(4, 1, block=256))
    assert forward_template(s2_256, "sm_90") != "cutlass"
    assert forward_template(_inst(d=96), "sm_90") == "mma"
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "cutlass")
    assert forward_template(_inst(), "sm_90a") == "cutlass" and forward_template(s2_256, "sm_90") != "cutlass"
    with pytest.raises(AttentionCodegenError, match="PIGEON_ATTN_FORWARD=cutlass needs an sm_90 .* sm_80"):
        forward_template(_inst(), "sm_80")
    monkeypatch.setenv("PIGEON_ATTN_FORWARD", "wgmma")
    assert forward_template(_inst(), "sm_90") == "wgmma"


def test_a_call_cutlass_cannot_take_runs_the_wgmma_kernel(monkeypatch):
    """q_len 300 is not a multiple of 8: the wgmma kernel serves the call (the launcher's fallback)."""
    monkeypatch.delenv("PIGEON_ATTN_FORWARD", raising=False)
    monkeypatch.delenv("PIGEON_ATTENTION_KERNEL", raising=False)
    inst = _inst("causal")
    assert ak._render(inst, "mma", False, "sm_90").meta["variant"] == "wgmma"
    assert ak._render(inst, "mma", True, "sm_90").meta.get("variant") != "wgmma"      # the backward is mma's
    q = torch.empty(1, 8, 300, 128, dtype=torch.bfloat16)
    assert not ak._runs_cutlass(inst, q, q)                 # a CPU tensor: never


def test_kernels_used_names_the_cutlass_forward_on_a_gpu_only():
    q = torch.empty(1, 8, 64, 128, dtype=torch.bfloat16)
    assert kernels_used(q, q, q, pattern=pa.Causal())["forward"] in ("mma", "simt")       # this CPU machine


def test_tuning_knobs(monkeypatch):
    assert s9.tuning(128, "") == s9.Schedule(128, 5) and s9.tuning(64, "") == s9.Schedule(128, 5)
    assert s9.tuning(128, "bn64,stages3") == s9.Schedule(64, 3)
    with pytest.raises(ValueError, match="PIGEON_ATTN_SM90_TUNE: unknown knob 'bn96'"):
        s9.tuning(128, "bn96")
    with pytest.raises(ValueError, match="stages must be in"):
        s9.tuning(128, "stages1")
    monkeypatch.setenv(s9.TUNE_ENV, "stages4")
    assert s9.tuning(128) == s9.Schedule(128, 4)


def test_the_scale_is_baked_in_only_with_a_score_mod():
    dense, alibi = _inst("dense"), _inst("alibi_causal")
    assert s9.spec_for(dense, 0.1).name == s9.spec_for(dense, 0.2).name
    assert s9.spec_for(alibi, 0.1).name != s9.spec_for(alibi, 0.2).name
    assert s9.spec_for(dense, 0.1, "bn64").name != s9.spec_for(dense, 0.1).name
    src = s9.render_attention_sm90(s9.spec_for(alibi, 0.125))
    assert "constexpr float SCALE = 0.125f;" in src and "acc(e_) * SCALE" in src
    assert "SCALE" not in s9.render_attention_sm90(s9.spec_for(dense, 0.125))
    with pytest.raises(AttentionCodegenError, match="cannot use the CUTLASS sm90 forward: head dims 96"):
        s9.spec_for(_inst(d=96), 0.1)


def test_render_dense_causal_and_modifiers():
    dense = s9.render_attention_sm90(s9.spec_for(_inst("dense"), 0.1))
    causal = s9.render_attention_sm90(s9.spec_for(_inst("causal", d=64, dtype=torch.float16), 0.1))
    mixed = s9.render_attention_sm90(s9.spec_for(_inst("softcap_strided_mask"), 0.1))
    for src in (dense, causal, mixed):
        assert '#include "88_hopper_fmha/kernel/fmha_kernel_builder.hpp"' in src
        assert "KernelTmaWarpSpecializedCooperative" in src and 'extern "C" int pigeon_run' in src
        assert "// built against CUTLASS/CuTe" in src
    assert "cutlass::bfloat16_t" in dense and "BM = 128, BN = 128;" in dense and "Int<BN>, Int<128>>" in dense
    assert "cutlass::half_t" in causal and "BM = 128, BN = 128;" in causal and "Int<BN>, Int<64>>" in causal
    # dense: no pattern code, only the key-length mask; every tile a whole one but the last
    assert "last / BN + 1" not in dense and "int whole = " in dense and "kv_shift);" not in dense
    # causal: the formula's trip count and its mask expression (kv <= i + kv_shift) in before_softmax
    assert "last / BN + 1" in causal and "kv_shift" in causal and "keep = keep && (" in causal
    # a mask_mod / score_mod: every tile through before_softmax (no unmasked tiles)
    assert "return 0;" in mixed and "tanh" in mixed
    for src in (dense, causal, mixed):          # prefix iteration: CUTLASS's own mainloop and loads
        assert "ListedMainloop" not in src and "constexpr int G = 1;" in src
        spec_name = src.split("namespace ", 2)[1].split(" ")[0]
        assert spec_name.startswith("pigeon_attn_sm90_") and f"namespace pg = {spec_name};" in src


def test_render_listed_and_gqa():
    """A sliding window (lists on the 64 x 64 grid) on the 128 x 128 tile: the producer's loads from the
    row's entries, the fusion's sub-block codes and the pattern mask only in partial blocks; GQA folded."""
    window = s9.render_attention_sm90(s9.spec_for(_inst("window", hkv=2), 0.1))
    assert "struct ListedMainloop" in window and "using Mainloop = ListedMainloop<" in window
    assert "constexpr int G = 4;" in window and "constexpr int LBM = 64, LBN = 64;" in window
    assert "if (!(state & 2)) {" in window and "return row(ps).nfull;" in window
    assert "op(params, pg_dyn_smem + ARGS_BYTES);" in window and "(params, list_args);" in window
    bn64 = s9.render_attention_sm90(s9.spec_for(_inst("dense", pattern=pa.S2(8, 2)), 0.1, "bn64"))
    assert "BM = 128, BN = 64;" in bn64 and "constexpr int SUB_N = BN / LBN;" in bn64
    topk = s9.render_attention_sm90(s9.spec_for(_inst("dense", pattern=pa.TopK(torch.zeros(1, 8, 1, 1,
                                                                                  dtype=torch.int64))), 0.1))
    assert "ListedMainloop" in topk and "if (!(state & 2))" not in topk          # no pattern mask: lists only
    gqa = s9.render_attention_sm90(s9.spec_for(_inst("causal", hkv=4), 0.1))
    assert "constexpr int G = 2;" in gqa and "ListedMainloop" not in gqa and "t.row0 + BM - 1" in gqa


def test_example_headers_are_found():
    if cutlass_headers.version() == "unknown":
        pytest.skip("needs the CUTLASS headers")
    d = cutlass_headers.examples_dir()
    assert Path(d, "88_hopper_fmha", "kernel", "fmha_kernel_builder.hpp").is_file()
    src = s9.render_attention_sm90(s9.spec_for(_inst("dense"), 0.1))
    flags = cutlass_headers.build_flags(src)
    assert cutlass_headers.needs_example(src) and d in flags
    assert not cutlass_headers.needs_example("#include <cute/tensor.hpp>\n")


@pytest.mark.skipif(not nvcc_available() or cutlass_headers.version() == "unknown",
                    reason="needs nvcc and the CUTLASS headers")
@pytest.mark.slow      # ~1 minute of nvcc per library on a 2-core machine
@pytest.mark.parametrize("name,d", [("causal", 128), ("softcap_strided_mask", 64)])
def test_library_compiles_for_sm90a(name, d, tmp_path):
    from pigeon.runtime.cache import KernelCache
    from pigeon.runtime.hostlib import HostLibrary, build_library
    spec = s9.spec_for(_inst(name, d=d), d ** -0.5)
    entry = build_library(s9.render_attention_sm90(spec), s9.ARCH, name=spec.name, cache=KernelCache(tmp_path))
    assert "-gencode=arch=compute_90a,code=sm_90a" in entry.meta["command"]
    assert HostLibrary(entry.cubin_path, spec.name).workspace([1, 1, 64, 64, 0, 0]) == 0


def test_which_backwards_take_cutlass(monkeypatch):
    monkeypatch.delenv(s9.BACKWARD_ENV, raising=False)
    for name in ("dense", "causal"):
        assert s9.backward_unsupported(_inst(name, dtype=torch.float16)) is None
    assert "float16 only" in s9.backward_unsupported(_inst("causal"))          # bf16
    assert "score_mod" in s9.backward_unsupported(_inst("alibi_causal", dtype=torch.float16))
    assert "GQA" in s9.backward_unsupported(_inst(dtype=torch.float16, hkv=2))
    fp16 = _inst("causal", dtype=torch.float16)
    assert s9.backward_template(fp16, "sm_90") == "cutlass" and s9.backward_template(fp16, "sm_80") == "mma"
    assert s9.backward_template(_inst("causal"), "sm_90") == "mma"
    assert s9.backward_call_unsupported(2, 4, 256, 333, 128, 128 ** -0.5) is None
    assert "not 1/sqrt(128)" in s9.backward_call_unsupported(2, 4, 256, 333, 128, 0.09)
    assert "multiple of 8" in s9.backward_call_unsupported(2, 4, 300, 333, 128, 128 ** -0.5)
    monkeypatch.setenv(s9.BACKWARD_ENV, "mma")
    assert s9.backward_template(fp16, "sm_90") == "mma"
    monkeypatch.setenv(s9.BACKWARD_ENV, "cutlass")
    with pytest.raises(AttentionCodegenError, match="PIGEON_ATTN_BACKWARD=cutlass needs an sm_90"):
        s9.backward_template(fp16, "sm_80")
    monkeypatch.setenv(s9.BACKWARD_ENV, "fast")
    with pytest.raises(AttentionCodegenError, match="expected one of"):
        s9.backward_template(fp16, "sm_90")


def test_render_backward():
    spec = s9.backward_spec_for(_inst("causal", dtype=torch.float16))
    assert spec.name != s9.spec_for(_inst("causal", dtype=torch.float16), 0.1).name
    src = s9.render_attention_sm90(spec)
    assert '#include "88_hopper_fmha/device/fmha_device_bwd.hpp"' in src
    # the library's own namespace: CUTLASS's per-kernel-type statics must not merge across libraries
    assert f"struct FusionBwdAdapter<{spec.name}::BwdFusion>" in src and f"namespace {spec.name} {{" in src
    assert "namespace pg " not in src and "cutlass::half_t" in src
    assert "Int<64>, Int<128>, Int<128>" in src                 # (query rows, keys, D)
    assert "last_q + (" in src                                  # causal: contributing tiles
    dense = s9.render_attention_sm90(s9.backward_spec_for(_inst("dense", dtype=torch.float16)))
    assert "return true;" in dense and "i < q_len" in dense
    with pytest.raises(AttentionCodegenError, match="cannot use the CUTLASS sm90 backward: a score_mod"):
        s9.backward_spec_for(_inst("alibi_causal", dtype=torch.float16))


def test_a_listed_pattern_picks_its_key_tile(monkeypatch):
    """S2's strided 64-key blocks: 128-key tiles would visit twice their area, so 64-key tiles; a
    window visits the same area either way: 128; data lists (top-k): the schedule's, no second
    regrouping per call; an explicit bn knob wins."""
    import pigeon.runtime.attention_sm90 as rs9
    from pigeon.attention.patterns import block_lists
    monkeypatch.delenv(s9.TUNE_ENV, raising=False)
    q = torch.empty(1, 4, 1024, 128, dtype=torch.bfloat16)

    def pick(pattern, knobs=""):
        inst, lists, _ = _plan(q, q, q, None, None, pattern, None)
        return rs9.block_n_for(inst, lists, 1024, 1024, knobs)
    assert pick(pa.S2(8, 2)) == 64 and pick(pa.SlidingWindow(256)) == 128
    assert pick(pa.S2(8, 2), "bn128") == 128 and pick(pa.SlidingWindow(256), "stages3,bn64") == 64
    assert pick(pa.Causal()) == 128 and pick(None) == 128
    assert pick(pa.TopK(torch.zeros(1, 4, 16, 2, dtype=torch.int64))) == 128
    # the areas behind S2's choice
    lists = block_lists(pa.S2(8, 2), 1, 4, 1024, 1024, 64, 64)
    inst = _plan(q, q, q, None, None, pa.S2(8, 2), None)[0]
    wide, narrow = (rs9.tiles_for(inst, lists, 1024, 1024, bn) for bn in (128, 64))
    assert narrow.ent.numel() * 64 <= rs9.NARROW_TILE_AREA * wide.ent.numel() * 128
    assert kernels_used(q, q, q, pattern=pa.S2(8, 2))["forward"] in ("mma", "simt")       # this CPU machine


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 300), kv_len=st.integers(1, 300), window=st.integers(1, 200), causal=st.booleans(),
       stride=st.integers(1, 5))
def test_rows_said_never_empty_keep_a_key(q_len, kv_len, window, causal, stride):
    """Where the launcher skips turning CUTLASS's +inf lse of empty rows into -inf, no row is empty
    (the dense mask keeps a key in every row)."""
    import pigeon.runtime.attention_sm90 as rs9
    pats = [None, pa.Causal(), pa.SlidingWindow(window, causal)]
    if q_len == kv_len:
        pats.append(pa.S2(stride, 1, block=16))
    for p in pats:
        q = torch.empty(1, 2, q_len, 64, dtype=torch.bfloat16)
        k = torch.empty(1, 2, kv_len, 64, dtype=torch.bfloat16)
        inst = _plan(q, k, k, None, None, p, None)[0]
        if not rs9.rows_can_be_empty(inst, q_len, kv_len):
            mask = pa.dense_mask(p, 1, 2, q_len, kv_len) if p is not None else torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
            assert mask.any(-1).all(), (p, q_len, kv_len)
    topk = _plan(torch.empty(1, 1, 64, 64, dtype=torch.bfloat16), torch.empty(1, 1, 64, 64, dtype=torch.bfloat16),
                 torch.empty(1, 1, 64, 64, dtype=torch.bfloat16), None, None,
                 pa.TopK(torch.full((1, 1, 1, 1), -1)), None)[0]
    assert rs9.rows_can_be_empty(topk, 64, 64)


def test_the_prebuild_sets_hold_what_the_runs_load():
    """scripts/prebuild_kernels.py --attention-sm90 bench: both key tiles of the bench's closed-form
    listed patterns (the launcher picks by area), the listed top-k libraries, and S2's 64-key one is
    what block_n_for picks at the bench's shape."""
    import importlib.util
    import pigeon.runtime.attention_sm90 as rs9
    from pigeon.bench.attn_variants import make_problem
    spec = importlib.util.spec_from_file_location("prebuild_kernels",
                                                  Path(__file__).parents[1] / "scripts" / "prebuild_kernels.py")
    pre = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pre)
    libs = pre.attention_sm90_libraries("bench")
    p = make_problem("s2", 1, 32, 4096, 128, torch.bfloat16, "cpu", 1024)
    inst, lists, _ = _plan(p.q, p.k, p.v, None, None, p.pigeon_kwargs()["pattern"], None)
    bn = rs9.block_n_for(inst, lists, 4096, 4096, "")
    assert bn == 64 and s9.spec_for(inst, 128 ** -0.5, f"bn{bn}").name in libs
    assert s9.spec_for(inst, 128 ** -0.5, "bn128").name in libs
    for variant in ("topk-g2", "topk-g4", "window"):
        p = make_problem(variant, 1, 32, 256, 128, torch.bfloat16, "cpu", 1024)
        kw = p.pigeon_kwargs()
        inst = _plan(p.q, p.k, p.v, None, None, kw["pattern"], None)[0]
        assert s9.listed(inst) and s9.spec_for(inst, 128 ** -0.5, "").name in libs, variant


def test_kernels_used_reports_cutlass_schedules(monkeypatch):
    """On an sm_90 device (forward_template stubbed here) kernels_used names CUTLASS's tile, with
    ",listed" for a pattern iterated by its lists -- not the mma kernel's knobs."""
    import pigeon.codegen.attention_wgmma as aw
    monkeypatch.setattr(aw, "forward_template", lambda inst, arch: "cutlass")
    monkeypatch.delenv(s9.TUNE_ENV, raising=False)
    q = torch.empty(1, 4, 1024, 128, dtype=torch.bfloat16)
    used = kernels_used(q, q, q, pattern=pa.Causal())
    assert used["forward"] == "cutlass" and used["forward_schedule"] == "bn128,stages5"
    used = kernels_used(q, q, q, pattern=pa.S2(8, 2))
    assert used["forward"] == "cutlass" and used["forward_schedule"] == "bn64,stages5,listed"
    odd = torch.empty(1, 4, 300, 128, dtype=torch.bfloat16)
    used = kernels_used(odd, odd, odd, pattern=pa.Causal())
    assert used["forward"] == "wgmma" and "multiple of 8" in used["why_not_cutlass"]
