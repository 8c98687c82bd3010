"""The tensor-core attention forward (attention.mma.cu.jinja): which instances take it, the
PIGEON_ATTENTION_KERNEL switch, its schedule knobs (64- and 128-row query tiles), renders compiled
for sm_90 without spills, and its CUDA text on tests/mma_emulate.py's lockstep CPU model of the sm80
atoms against the float64 reference for every pattern and modifier, both tile heights.  (Its
numbers are checked on the GPU too: tests/gpu/test_attention_gpu.py.)"""
import random
import sys
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa
from pigeon.attention.api import _plan
from pigeon.codegen.attention import AttentionCodegenError
from pigeon.codegen.attention_mma import CODE_FORMS, DEFAULTS, Schedule, render_attention_mma, tuning, unsupported
from pigeon.runtime.attention_kernel import kernel_variant
from pigeon.runtime.toolchain import nvcc_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attention_kernel import VARIANTS  # noqa: E402

MMA_NAMES = sorted(n for n in VARIANTS if n != "s2")       # S2 of the tests uses 16-blocks (SIMT)
# forward schedules the GPU tests run besides the default (tests/gpu/test_attention_gpu.py
# test_tensor_core_forward_schedules): the 64-row form (D=128's previous default) and 128-row tiles at
# both head dims, 4 warps x 32 rows and 8 warps x 16 rows
GPU_KNOBS = ("bm64", "bm128,q_smem", "bm128,mt1,q_smem,minb1")
# issue 8's code-form knobs (attention_mma.CODE_FORMS): each non-default form alone on the D=128 default,
# and all of db8bc18's forms together (its kernel)
DB8BC18_FORMS = "full_inline,smem_static,walk_list,addr_row,rows_elem"
FORM_KNOBS = tuple(f"default,{w}" for w in ("full_inline", "full_always", "smem_static", "walk_list", "addr_row",
                                            "rows_elem")) + (f"default,{DB8BC18_FORMS}",)


def _inst(name="alibi_causal", d=128, dtype=torch.bfloat16, dv=None):
    kw = _pattern(name)
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
    assert rk.block == (128, 1, 1) and rk.shared_mem == 3 * 64 * 64 * 2
    rk = render_attention_mma(_inst("softcap_strided_mask", d=128))          # D=128 default: 64-row tiles
    assert rk.grid({"max_q": 300, "heads": 8, "batch": 2}) == (5, 8, 2) and rk.block == (128, 1, 1)
    rk = render_attention_mma(_inst("softcap_strided_mask", d=128), knobs="bm128,q_smem,ks32")   # 128-row tiles
    assert rk.grid({"max_q": 300, "heads": 8, "batch": 2}) == (3, 8, 2) and rk.name.endswith("_mma_m128w4sb2k32")
    assert rk.block == (128, 1, 1) and rk.shared_mem == (128 + 2 * 64) * 128 * 2
    with pytest.raises(ValueError, match="cannot use the tensor-core forward"):
        render_attention_mma(_inst(dtype=torch.float32))


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_tensor_core_forward_compiles_for_sm90_without_spills():
    from pigeon.runtime.build import compile_cuda
    rk = render_attention_mma(_inst("alibi_causal", d=128))
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name)
    r = res.resources[rk.name]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_schedule_knobs(monkeypatch):
    monkeypatch.delenv("PIGEON_ATTN_MMA_TUNE", raising=False)
    assert tuning(64) == DEFAULTS[64] == Schedule(64, 1, False, 3)
    # the 128-row form lost on the H200 (0797018); the one-path pattern check won (c43ced9)
    assert tuning(128) == DEFAULTS[128] == Schedule(full_branch="inline")
    assert tuning(128, "") == Schedule() and Schedule().threads == 128            # the plain 64-row form
    assert tuning(128, "bm128") == Schedule(128, 2) and tuning(64, "bm128,mt1,minb1").threads == 256
    assert tuning(64, "mt2").threads == 64 and tuning(128, "default,bm64") == Schedule(full_branch="inline")
    assert tuning(128, "default,ks64").key_step == 64 and tuning(64, "q_smem,minb3") == DEFAULTS[64]
    assert tuning(128, DEFAULTS[128].tag()) == DEFAULTS[128]
    with pytest.raises(ValueError, match="unknown knob 'bm96'"):
        tuning(64, "bm96")
    monkeypatch.setenv("PIGEON_ATTN_MMA_TUNE", "bm128,q_smem")        # the environment, read per render
    inst = _inst("causal", d=64)
    rk = render_attention_mma(inst)
    assert rk.meta["schedule"] == "bm128,mt2,q_smem,minb2,ks64" and rk.grid({"max_q": 129, "heads": 1, "batch": 1})[0] == 2
    monkeypatch.delenv("PIGEON_ATTN_MMA_TUNE")
    assert render_attention_mma(inst).meta["schedule"] == DEFAULTS[64].tag()
    names = {render_attention_mma(inst, k).name for k in ("", "default", "bm128", "bm128,mt1", "bm128,ks32")}
    assert len(names) == 5                    # one kernel name per schedule (the runtime's modules are keyed by it)


def _doc_inst(d=128):
    """The packed-document forward's instance (causal documents with cu_seqlens, bf16)."""
    q = torch.empty(64, 1, d, dtype=torch.bfloat16)
    return _plan(q, q, q, None, None, pa.Causal(), torch.tensor([0, 32, 64], dtype=torch.int32))[0]


def test_code_form_knobs(monkeypatch):
    """Issue 8's knobs: parsed, named (the defaults add nothing: today's kernel names and sources), the
    forms they select in the rendered text, and the schedules that cannot be refused.  Checked from
    the split-path form (the D=128 default before c43ced9's A/B made it full_inline)."""
    monkeypatch.delenv("PIGEON_ATTN_MMA_TUNE", raising=False)
    import pigeon.codegen.attention_mma as am
    assert am.DEFAULTS[128] == Schedule(full_branch="inline")
    monkeypatch.setitem(am.DEFAULTS, 128, Schedule())
    s = tuning(128, "default," + DB8BC18_FORMS)
    assert (s.full_branch, s.static_smem, s.plain_walk, s.row_addr, s.row_elem) == ("inline", True, True, True, True)
    assert tuning(128, s.tag()) == s and s.tag().endswith("ks64," + DB8BC18_FORMS)
    assert tuning(128, "default,full_split,smem_dyn,walk_merge,addr_step,rows_hoist") == DEFAULTS[128]
    assert DEFAULTS[128].tag() == "bm64,mt1,minb2,ks64" and DEFAULTS[128].code() == "m64w4rb2k64"
    assert tuning(64, "default,full_always").full_branch == "always" and len(CODE_FORMS) == 11
    inst = _doc_inst()
    base = render_attention_mma(inst)
    assert "if (full) {" in base.source and "extern __shared__" in base.source and "KeyBlocks blocks;" in base.source
    names = {base.name}
    for knobs in FORM_KNOBS:
        rk = render_attention_mma(inst, knobs)
        names.add(rk.name)
        assert rk.meta["schedule"] == tuning(128, knobs).tag() and rk.block == (128, 1, 1)
        src = rk.source
        assert ("if (!full) {" in src) == ("full_inline" in knobs)
        assert ("if (full) {" in src) == ("full_inline" not in knobs and "full_always" not in knobs)
        assert ("extern __shared__" not in src and rk.shared_mem == 0) == ("smem_static" in knobs)
        assert ("for (int p = p0; p < p1; ++p)" in src) == ("walk_list" in knobs)
        assert ("q_lm" not in src) == ("addr_row" in knobs)
        assert ("(rows_elem:" in src) == ("rows_elem" in knobs)
    assert len(names) == len(FORM_KNOBS) + 1
    with pytest.raises(ValueError, match="walk_list"):
        tuning(128, "bm128,walk_list")
    with pytest.raises(ValueError, match="smem_static takes at most"):
        tuning(128, "bm128,smem_static")                  # (128 + 128) x 128 x 2 = 64 KiB
    assert tuning(64, "bm128,smem_static").static_smem    # 32 KiB fits
    with pytest.raises(ValueError, match="unknown knob 'full_maybe'"):
        tuning(128, "full_maybe")


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_db8bc18_forms_compile_for_sm90_without_spills():
    """All of issue 8's db8bc18 forms together, on the packed-document instance."""
    from pigeon.runtime.build import compile_cuda
    rk = render_attention_mma(_doc_inst(), f"default,{DB8BC18_FORMS}")
    r = compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_every_code_form_compiles_for_sm90_without_spills():
    """Each of issue 8's knob settings on the packed-document and the causal instance (D=128, bf16),
    and the 64-row forms at D=64 with an ALiBi modifier (row and head code)."""
    from concurrent.futures import ThreadPoolExecutor
    from pigeon.runtime.build import compile_cuda

    def one(job):
        inst, knobs = job
        rk = render_attention_mma(inst, knobs)
        return job, compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
    jobs = [(inst, k) for inst in (_doc_inst(), _inst("causal", d=128)) for k in FORM_KNOBS]
    jobs += [(_inst("alibi_causal", d=64), k) for k in ("default,rows_elem", f"default,{DB8BC18_FORMS}")]
    with ThreadPoolExecutor(2) as pool:
        for (inst, knobs), r in pool.map(one, jobs):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (inst.key(), knobs, r)


def _spill_check(jobs):
    from concurrent.futures import ThreadPoolExecutor
    from pigeon.runtime.build import compile_cuda

    def one(job):
        name, d, dtype, knobs = job
        rk = render_attention_mma(_inst(name, d=d, dtype=dtype), knobs)
        r = compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
        return job, r
    with ThreadPoolExecutor(2) as pool:
        for job, r in pool.map(one, jobs):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (job, r)


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_128_row_forward_compiles_for_sm90_without_spills():
    _spill_check([("window_bidirectional", 128, torch.bfloat16, None)])


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_default_forward_compiles_for_sm90_without_spills(dtype):
    """Every test variant (and S2 on 64-blocks), both head dims, under the defaults (D=128: 128-row tiles)."""
    _spill_check([(n, d, dtype, None) for n in MMA_NAMES + ["s2_64"] for d in (64, 128)])


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_the_gpu_tests_schedules_compile_for_sm90_without_spills():
    """The GPU tests' other schedules, bf16, where they fit: the 64-row form and 8 warps x 16 rows at
    both head dims, 4 warps x 32 rows with 64-key softmax steps at D=64 (at D=128 that form spills
    ~100-180 bytes: the default takes 32-key steps)."""
    _spill_check([(n, d, torch.bfloat16, k) for n in MMA_NAMES + ["s2_64"] for d, k in
                  ((64, "bm64"), (128, "bm64"), (64, "bm128,mt1,q_smem,minb1"), (128, "bm128,mt1,q_smem,minb1"),
                   (64, "bm128,q_smem"))])


# ------------------------------------------------------------------ on the lockstep CPU model

def _cpu_model_available():
    from pigeon.runtime import emulate
    return emulate.available()


def _pattern(name):
    if name == "s2_64":
        return dict(pattern=pa.S2(stride=3, local_blocks=1, block=64, step=1, offset=1))
    return dict(VARIANTS[name])


VARIANTS_64 = {"s2_64": _pattern("s2_64")}     # S2 on 64-blocks: the tensor cores take it


def _forward_on_the_cpu_model(monkeypatch, name="dense", *, knobs=None, D=64, dtype=torch.bfloat16, B=1, Hq=4,
                              Hk=2, Sq=150, Skv=170, packed=None, pattern=None, lists_fn=None, seed=0):
    """The tensor-core forward's CUDA text under ``knobs`` (None: the head dim's default) on the CPU
    model, out and lse NaN-poisoned first, against the float64 reference: (out rel err, lse max err);
    rows the reference keeps nothing of must have lse -inf and a zero output.  ``lists_fn`` rewrites
    the block lists before the launch."""
    import pigeon.runtime.attention_kernel as ak
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
    if knobs is None:
        monkeypatch.delenv("PIGEON_ATTN_MMA_TUNE", raising=False)
    else:
        monkeypatch.setenv("PIGEON_ATTN_MMA_TUNE", knobs)
    g = torch.Generator().manual_seed(seed)
    kw = _pattern(name)
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
    assert ak.kernel_variant(inst, False) == "mma"
    if lists_fn is not None:
        lists = lists_fn(lists)
    out, lse = ak.run_attention_kernel(inst, q, k, v, lists, D ** -0.5, cu)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element was not written"
    ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), enable_gqa=True, backend="reference",
                                cu_seqlens=cu, return_lse=True, **kw)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse finite where the reference's is not (or not where it is)"
    assert bool((lse[~finite] == float("-inf")).all())
    empty = ~finite.t() if packed is not None else ~finite           # rows with no kept key: a zero output
    assert bool((out[empty] == 0).all())
    rel = ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    return rel, lse_err


def _check(errs, what=""):
    rel, lse_err = errs
    assert rel < 1e-2 and lse_err < 1e-3, (what, errs)


@pytest.mark.slow          # the 128-row schedule is the bm128 knob, not a default (0797018's A/B)
@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
def test_128_row_forward_on_the_cpu_model(monkeypatch):
    """The D=128 default (128-row tiles, two 32-key softmax steps): a causal ALiBi instance, GQA 2,
    150 queries (the second tile half past the end) over 170 keys."""
    _check(_forward_on_the_cpu_model(monkeypatch, "alibi_causal", D=128, Sq=150, Skv=170))


def _reversed_rows(lists):
    """The same lists with every row's blocks in descending order (the kernel's merge takes any order)."""
    from pigeon.attention.patterns import BlockLists
    ptr = lists.ptr.long()
    cols, fulls = [], []
    for r in range(ptr.numel() - 1):
        cols.append(lists.col[ptr[r]:ptr[r + 1]].flip(0))
        fulls.append(lists.full[ptr[r]:ptr[r + 1]].flip(0))
    return BlockLists(lists.shape, lists.ptr, torch.cat(cols), torch.cat(fulls))


def _topk(B, H, nq, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, -(-170 // 64), (B, H, nq, k), generator=g)
    idx[0, 0, 0] = -1                  # query block 0 of KV group 0 selects nothing: its rows keep nothing
    return pa.TopK(idx)


def _blocklist(heads, nq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(heads, nq, nk, generator=g) < 0.5
    keep[0, 1] = False                 # query block 1 of head 0 lists nothing
    counts = keep.sum(-1).reshape(-1)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    crow = torch.stack([crow[h * nq:h * nq + nq + 1] for h in range(heads)])
    col = keep.nonzero()[:, 2]
    return pa.BlockList(crow if heads > 1 else crow[0], col)


CPU_MODEL_CASES = {
    # every test variant on 128-row tiles at both head dims (D=64 through the bm128 knob)
    **{f"{n}_d{d}": dict(name=n, D=d, knobs=None if d == 128 else "bm128,q_smem") for n in MMA_NAMES for d in (64, 128)},
    "s2_64_d128": dict(name="s2_64", D=128, Sq=300, Skv=300, Hq=4, Hk=4),
    "window_q_longer": dict(name="window", D=128, Sq=200, Skv=90),
    "window_bi_kv_longer_gqa4": dict(name="window_bidirectional", D=128, Sq=70, Skv=300, Hq=4, Hk=1),
    "causal_fp16_gqa1": dict(name="causal", D=128, dtype=torch.float16, Hq=2, Hk=2, Sq=257, Skv=257),
    "packed_causal": dict(name="causal", D=128, packed=[40, 1, 0, 150, 129], Hq=4, Hk=1),
    "packed_alibi_d64": dict(name="alibi_causal", D=64, knobs="bm128", packed=[70, 200, 3], Hq=4, Hk=2),
    "topk_gqa2": dict(name="dense", D=128, B=2, Hq=4, Hk=2, pattern=_topk(2, 2, 3, 3, 1)),
    "topk_gqa4_shared": dict(name="dense", D=128, B=1, Hq=4, Hk=1, pattern=_topk(1, 1, 3, 2, 2)),
    "blocklist_heads": dict(name="dense", D=128, Hq=4, Hk=2, pattern=_blocklist(4, 3, 3, 3)),
    "blocklist_shared_softcap": dict(name="softcap_strided_mask", D=128, pattern=_blocklist(1, 3, 3, 4)),
    "blocklist_unsorted_lists": dict(name="dense", D=128, pattern=_blocklist(4, 3, 3, 5), lists_fn=_reversed_rows),
    "causal_unsorted_lists": dict(name="causal", D=128, Sq=300, Skv=300, lists_fn=_reversed_rows),
    # the other schedules on the same text: 8 warps x 16 rows, one 64-key softmax step, the 64-row forms
    "bm128_mt1_causal": dict(name="alibi_causal", D=128, knobs="bm128,mt1,q_smem,minb1"),
    "bm128_ks64_qregs_window": dict(name="window", D=64, knobs="bm128,ks64"),
    "bm64_default_d64_softcap": dict(name="softcap_strided_mask", D=64),
    "bm64_plain_d128_causal": dict(name="causal", D=128, knobs=""),
    "bm64_mt2_topk": dict(name="dense", D=64, knobs="mt2,q_smem", Hq=4, Hk=2, pattern=_topk(1, 4, 3, 2, 6)),
    # issue 8's code forms (FORM_KNOBS): packed causal documents (cu_seqlens) and causal over more keys than
    # queries, each form alone and all of db8bc18's together; the per-element row code under ALiBi too
    **{f"forms_{k.split(',', 1)[1].replace(',', '_')}_{v}": dict(
        name="causal", D=128, knobs=k, **(dict(packed=[70, 1, 130, 0, 64], Hq=2, Hk=1) if v == "packed" else
                                          dict(Sq=150, Skv=170, Hq=2, Hk=1)))
       for k in FORM_KNOBS for v in ("packed", "causal")},
    "forms_rows_elem_alibi_d64": dict(name="alibi_causal", D=64, knobs="default,rows_elem", Hq=4, Hk=2),
}


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_model_available(), reason="no C++ compiler for the CPU model")
@pytest.mark.parametrize("case", sorted(CPU_MODEL_CASES))
def test_forward_on_the_cpu_model_every_pattern(case, monkeypatch):
    kw = dict(CPU_MODEL_CASES[case])
    _check(_forward_on_the_cpu_model(monkeypatch, seed=random.randrange(1 << 20), **kw), case)
