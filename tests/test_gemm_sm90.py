"""Epilogue operands (bias, residual) and fp8 GEMMs: CPU semantics against plain torch, gradients,
one-line validation errors, opcheck of the new ops, and the sm90 CUTLASS template: every kind
renders, its source carries no local path (the cache key must match on the GPU machine), one
representative library compiles with nvcc for sm_90a (the others are marked slow)."""
import pytest
import torch
import torch.nn.functional as F

import pigeon as pg
from pigeon.codegen.gemm_sm90 import KINDS, Sm90Gemm, render_sm90
from pigeon.gemm_api import GemmInputError, trace_epilogue
from pigeon.ir.kernel import GemmInstance
from pigeon.codegen import cutlass_headers
from pigeon.runtime.build import nvcc_available
from pigeon.runtime.gemm_fused import to_text
from pigeon.runtime.kernel_ops import instance_json

GEN = torch.Generator().manual_seed(7)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["bias", "residual", "both", "both_default"])
def test_bias_residual_values_and_gradients_equal_torch(which, dtype):
    M, K, N = 37, 24, 40
    a, b = _r(M, K, dtype=dtype), _r(K, N, dtype=dtype)
    bias = _r(N, dtype=dtype) if which != "residual" else None
    res = _r(M, N, dtype=dtype) if which != "bias" else None
    leaves = [t.requires_grad_(True) for t in (a, b, bias, res) if t is not None]
    if which == "both":
        fn = lambda acc, bias, residual: residual * 0.5 + pg.gelu(acc + bias)  # noqa: E731
        ref = lambda y, bi, r: r * 0.5 + F.gelu(y + bi)  # noqa: E731
    elif which == "bias":
        fn, ref = (lambda acc, bias: pg.relu(acc + bias)), (lambda y, bi, r: torch.relu(y + bi))
    elif which == "residual":
        fn, ref = (lambda acc, residual: acc * pg.sigmoid(acc) + residual), (lambda y, bi, r: F.silu(y) + r)
    else:
        fn, ref = None, (lambda y, bi, r: y + bi + r)
    y = pg.gemm(a, b, epilogue=fn, bias=bias, residual=res)
    f32 = [t.detach().float().requires_grad_(True) for t in leaves]
    it = iter(f32[2:])
    bi = next(it) if bias is not None else None
    r = next(it) if res is not None else None
    want = ref(f32[0] @ f32[1], bi, r)
    torch.testing.assert_close(y.float(), want, **_tol(dtype))
    up = _r(M, N)
    got = torch.autograd.grad((y.float() * up).sum(), leaves)
    exp = torch.autograd.grad((want * up).sum(), f32)
    for g, w in zip(got, exp):
        assert g.shape == w.shape
        rel = ((g.float() - w).norm() / w.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1.5e-2), f"{which} {dtype}: rel err {rel:.2e}"


def test_bias_gradcheck_float32():
    a, b = _r(5, 4).double(), _r(4, 6).double()
    bias, res = _r(6), _r(5, 6)

    def f(bias, res):
        return pg.gemm(a.float(), b.float(), bias=bias, residual=res,
                       epilogue=lambda acc, bias, residual: pg.tanh(acc + bias) * residual)
    torch.autograd.gradcheck(f, (bias.requires_grad_(True), res.requires_grad_(True)), eps=1e-2, atol=5e-2,
                             rtol=5e-2)


@pytest.mark.parametrize("call, match", [
    (lambda a, b, n: pg.gemm(a, b, bias=_r(n + 1)), "gemm: bias must have shape"),
    (lambda a, b, n: pg.gemm(a, b, residual=_r(3, n)), "gemm: residual must have shape"),
    (lambda a, b, n: pg.gemm(a, b, bias=_r(n).double()), "gemm: bias is torch.float64 but a is torch.float32"),
    (lambda a, b, n: pg.gemm(a, b, bias=[1.0] * n), "gemm: bias must be a torch.Tensor"),
    (lambda a, b, n: pg.gemm(a, b, bias=_r(n), epilogue=lambda acc: acc), "the epilogue must take \\(acc, bias\\)"),
])
def test_operand_errors_are_one_line(call, match):
    a, b = _r(8, 4), _r(4, 6)
    with pytest.raises(GemmInputError, match=match) as e:
        call(a, b, 6)
    assert "\n" not in str(e.value)


def test_gemm_fused_op_passes_opcheck():
    a, b = _r(16, 8).requires_grad_(True), _r(8, 12).requires_grad_(True)
    bias, res = _r(12).requires_grad_(True), _r(16, 12).requires_grad_(True)
    ep = trace_epilogue(lambda acc, bias, residual: pg.gelu(acc + bias) + residual, ("bias", "residual"))
    text = instance_json(GemmInstance("rows", 8, 12, typed=False, dtype="float32", epilogue=ep))
    seg = torch.tensor([0, 16], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pigeon.gemm_fused.default, (text, a, b, seg, bias, res))
    grouped = instance_json(GemmInstance("rows", 8, 12, typed=True, dtype="float32"))
    torch.library.opcheck(torch.ops.pigeon.gemm_fused.default,
                          (grouped, a, _r(3, 8, 12).requires_grad_(True), torch.tensor([0, 5, 5, 16], dtype=torch.int32),
                           None, None))


def test_operands_under_torch_compile():
    a, b, bias = _r(16, 8), _r(8, 12), _r(12)
    f = torch.compile(lambda x, y, z: pg.gemm(x, y, bias=z, epilogue=lambda acc, bias: pg.relu(acc + bias)),
                      backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(a, b, bias), torch.relu(a @ b + bias))


# ------------------------------------------------------------------------------ fp8

def _fp8(*shape):
    return (_r(*shape) * 2).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("scaling", ["tensor", "row", "block"])
def test_fp8_semantics_equal_dequantized_float32(scaling):
    M, K, N = 48, 320, 200                          # K, N not multiples of 128: partial blocks
    a, b = _fp8(M, K), _fp8(K, N)
    if scaling == "tensor":
        sa, sb = torch.tensor(0.5), torch.tensor([1.5])
        af, bf = a.float() * 0.5, b.float() * 1.5
    elif scaling == "row":
        sa, sb = _r(M, 1).abs() + 0.1, _r(1, N).abs() + 0.1
        af, bf = a.float() * sa, b.float() * sb
    else:
        sa, sb = _r(M, 3).abs() + 0.1, _r(3, 2).abs() + 0.1
        af = a.float() * sa.repeat_interleave(128, 1)[:, :K]
        bf = b.float() * sb.repeat_interleave(128, 0)[:K].repeat_interleave(128, 1)[:, :N]
    y = pg.fp8_gemm(a, b, sa, sb)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    torch.testing.assert_close(y.float(), af @ bf, rtol=1e-2, atol=1e-2)
    y2 = pg.fp8_gemm(a, b, sa, sb, out_dtype=torch.float16, epilogue=lambda acc: pg.relu(acc) * 0.25)
    torch.testing.assert_close(y2.float(), torch.relu(af @ bf) * 0.25, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call, match", [
    (lambda a, b: pg.fp8_gemm(a.float(), b, torch.tensor(1.0), torch.tensor(1.0)), "fp8_gemm: a must be float8_e4m3fn"),
    (lambda a, b: pg.fp8_gemm(a, b, torch.tensor(1.0).double(), torch.tensor(1.0)), "fp8_gemm: scale_a must be float32"),
    (lambda a, b: pg.fp8_gemm(a, b, torch.ones(3, 1), torch.ones(1, 8)), "fp8_gemm: scale_a \\[3, 1\\] and scale_b"),
    (lambda a, b: pg.fp8_gemm(a, b[:4], torch.tensor(1.0), torch.tensor(1.0)), "inner sizes differ"),
    (lambda a, b: pg.fp8_gemm(a, b, torch.tensor(1.0, requires_grad=True), torch.tensor(1.0)), "no backward"),
    (lambda a, b: pg.fp8_gemm(a, b, torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.float32), "out_dtype"),
])
def test_fp8_errors_are_one_line(call, match):
    a, b = _fp8(4, 16), _fp8(16, 8)
    with pytest.raises(GemmInputError, match=match) as e:
        call(a, b)
    assert "\n" not in str(e.value)


def test_fp8_op_passes_opcheck():
    a, b = _fp8(8, 256), _fp8(256, 128)
    text = to_text(Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", trace_epilogue(lambda acc: pg.relu(acc))))
    torch.library.opcheck(torch.ops.pigeon.fp8_gemm.default, (text, a, b, torch.tensor(0.5), torch.tensor(2.0)),
                          test_utils=("test_faketensor",))  # schema mode has no fp8 mul on CPU
    torch.library.opcheck(torch.ops.pigeon.fp8_gemm.default, (text, a, b, torch.ones(8, 2), torch.ones(2, 1)),
                          test_utils=("test_faketensor",))  # schema mode has no fp8 mul on CPU


# ------------------------------------------------------------------------------ the sm90 template

GELU_BR = trace_epilogue(lambda acc, bias, residual: residual + pg.gelu(acc + bias), ("bias", "residual"))
INSTANCES = {
    "dense_gelu_bias_residual": Sm90Gemm("dense", "bfloat16", "bfloat16", GELU_BR),
    "dense_fp16": Sm90Gemm("dense", "float16", "float16"),
    "grouped": Sm90Gemm("grouped", "bfloat16", "bfloat16"),
    "fp8": Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16"),
    "fp8_block": Sm90Gemm("fp8_block", "float8_e4m3fn", "bfloat16"),
}


def test_every_kind_renders_without_local_paths():
    assert {g.kind for g in INSTANCES.values()} == set(KINDS)
    for name, g in INSTANCES.items():
        src = render_sm90(g)
        assert cutlass_headers.source_tag() in src
        assert "/work" not in src and "site-packages" not in src, name
        assert 'extern "C" int pigeon_run' in src
    src = render_sm90(INSTANCES["dense_gelu_bias_residual"])
    assert "erff" in src and "Sm90RowBroadcast" in src and "Sm90SrcFetch" in src
    assert "FP8BlockScaledAccum" in render_sm90(INSTANCES["fp8_block"])
    assert "KernelPtrArrayTmaWarpSpecializedCooperative" in render_sm90(INSTANCES["grouped"])


def test_grouped_refuses_operands_and_kinds_check_dtypes():
    from pigeon.codegen.gemm_sm90 import Sm90CodegenError
    with pytest.raises(Sm90CodegenError):
        Sm90Gemm("grouped", "bfloat16", "bfloat16", GELU_BR)
    with pytest.raises(Sm90CodegenError):
        Sm90Gemm("fp8", "bfloat16", "bfloat16")


def _compile(name, tmp_path):
    from pigeon.runtime.cache import KernelCache
    from pigeon.runtime.hostlib import HostLibrary, build_library
    g = INSTANCES[name]
    entry = build_library(render_sm90(g), "sm_90a", name=g.name, cache=KernelCache(tmp_path))
    assert entry.cubin_path.name == "kernel.so" and entry.cubin_path.stat().st_size > 100_000
    lib = HostLibrary(entry.cubin_path, g.name)         # loads without a GPU: the runtime starts lazily
    assert lib.workspace([256, 256, 256, 1, 132, 0]) >= 0
    return entry


needs_cutlass = pytest.mark.skipif(not nvcc_available() or cutlass_headers.version() == "unknown",
                                   reason="needs nvcc and the CUTLASS headers")


@needs_cutlass
@pytest.mark.slow      # 2 minutes of nvcc on a 2-core CI machine (CPU suite budget ~10 min): -m slow runs it
def test_representative_sm90_library_compiles_for_sm90a(tmp_path):
    entry = _compile("dense_gelu_bias_residual", tmp_path)
    assert "-gencode=arch=compute_90a,code=sm_90a" in entry.meta["command"]


@needs_cutlass
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense_fp16", "grouped", "fp8", "fp8_block"])
def test_sm90_library_compiles(name, tmp_path):
    _compile(name, tmp_path)


# ------------------------------------------------------------------------------ tile overrides (PIGEON_SM90_TILES)

def test_default_keys_are_the_hash_of_the_old_repr():
    import hashlib
    for g in INSTANCES.values():
        old = hashlib.sha256(repr((g.kind, g.dtype, g.out_dtype, g.epilogue)).encode()).hexdigest()[:16]
        assert g.key() == old and g.tile is None and g.schedule is None
    from pigeon.codegen.gemm_sm90 import TILES
    g = INSTANCES["fp8"]
    spelled = Sm90Gemm("fp8", g.dtype, g.out_dtype, None, TILES["fp8"], "cooperative")
    assert spelled == g and spelled.key() == g.key()       # the default, spelled out, is the default
    keys = {g.key(), Sm90Gemm("fp8", g.dtype, g.out_dtype, None, (128, 192, 128, 1, 1)).key(),
            Sm90Gemm("fp8", g.dtype, g.out_dtype, None, None, "pingpong").key(),
            Sm90Gemm("fp8", g.dtype, g.out_dtype, None, (128, 192, 128, 1, 1), "pingpong").key()}
    assert len(keys) == 4


def test_tile_knob_parses():
    from pigeon.codegen.gemm_sm90 import env_tiles, parse_tiles
    got = parse_tiles("fp8=128x192x128x1x1:pingpong, fp8_block=128x128x128x1x1,dense=128x256x64x2x1,grouped=default")
    assert got == {"fp8": ((128, 192, 128, 1, 1), "pingpong"), "fp8_block": ((128, 128, 128, 1, 1), None),
                   "dense": ((128, 256, 64, 2, 1), None), "grouped": (None, None)}
    assert parse_tiles("") == {}
    assert env_tiles("fp8", "dense=128x128x64x1x1") == (None, None)
    assert env_tiles("dense", "dense=128x128x64x1x1") == ((128, 128, 64, 1, 1), None)


def test_tile_knob_reads_the_environment(monkeypatch):
    from pigeon.codegen.gemm_sm90 import env_tiles
    monkeypatch.delenv("PIGEON_SM90_TILES", raising=False)
    assert env_tiles("fp8") == (None, None)
    monkeypatch.setenv("PIGEON_SM90_TILES", "fp8=64x128x128x1x1:pingpong")
    assert env_tiles("fp8") == ((64, 128, 128, 1, 1), "pingpong")


@pytest.mark.parametrize("text, match", [
    ("fp9=128x128x128x1x1", "'fp9=128x128x128x1x1' is not kind="),
    ("fp8", "'fp8' is not kind="),
    ("fp8=128x128x128x1", "'128x128x128x1' is not MxNxKxCMxCN"),
    ("fp8=128x128x128x1x1:zigzag", "unknown schedule 'zigzag'"),
    ("fp8=64x128x128x1x1", "tile m must be one of \\(128, 256\\) for the cooperative"),
    ("fp8=256x128x128x1x1:pingpong", "tile m must be one of \\(64, 128\\) for the pingpong"),
    ("fp8=128x120x128x1x1", "tile n must be a multiple of 16"),
    ("fp8=128x128x64x1x1", "tile k must be one of \\(128,\\) for float8_e4m3fn"),
    ("dense=128x128x256x1x1", "tile k must be one of \\(64, 128\\) for bfloat16"),
    ("fp8=128x128x128x4x1", "cluster m and n must be 1 or 2"),
    ("fp8_block=128x192x128x1x1", "multiple of 128"),
    ("fp8_block=128x128x128x1x1:pingpong", "schedule 'pingpong' is for kind\\(s\\) fp8 only"),
    ("dense=128x128x64x1x1:cooperative_fastaccum", "for kind\\(s\\) fp8 only"),
    ("fp8=default,fp8=128x128x128x1x1", "kind fp8 given twice"),
])
def test_tile_knob_errors_are_one_line_naming_the_knob(text, match):
    from pigeon.codegen.gemm_sm90 import Sm90CodegenError, parse_tiles
    with pytest.raises(Sm90CodegenError, match=match) as e:
        parse_tiles(text)
    assert "\n" not in str(e.value) and str(e.value).startswith("PIGEON_SM90_TILES: ")


def test_bad_tile_on_the_instance_is_one_line():
    from pigeon.codegen.gemm_sm90 import Sm90CodegenError
    for tile, sched in [((128, 128, 128, 1), None), ((64, 128, 128, 1, 1), None), (None, "pingpong_x"),
                        ((128, 128, 128, 1, 1), "pingpong"), ((128, 128, 128, 1, 3), None)]:
        kind = "dense" if sched == "pingpong" else "fp8"
        dtype = "bfloat16" if kind == "dense" else "float8_e4m3fn"
        with pytest.raises(Sm90CodegenError) as e:
            Sm90Gemm(kind, dtype, "bfloat16", None, tile, sched)
        assert "\n" not in str(e.value)


def test_tile_variant_renders_its_schedule_and_shape():
    base = render_sm90(INSTANCES["fp8"])
    assert "KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;" in base
    assert "EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;" in base
    assert "Pingpong" not in base and "FastAccum" not in base and "schedule=" not in base
    pp = render_sm90(Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", None, (64, 192, 128, 1, 2), "pingpong"))
    assert "using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;" in pp
    assert "using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;" in pp
    assert "using TileShape = Shape<_64, _192, _128>;" in pp and "using ClusterShape = Shape<_1, _2, _1>;" in pp
    assert "FastAccum" not in pp and "schedule=pingpong" in pp
    fa = render_sm90(Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", None, None, "cooperative_fastaccum"))
    assert "KernelTmaWarpSpecializedCooperativeFP8FastAccum;" in fa
    blk = render_sm90(Sm90Gemm("fp8_block", "float8_e4m3fn", "bfloat16", None, (128, 256, 128, 2, 1)))
    assert "KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum;" in blk and "Shape<_128, _256, _128>" in blk
    grp = render_sm90(Sm90Gemm("grouped", "bfloat16", "bfloat16", None, (256, 128, 64, 2, 1)))
    assert "KernelPtrArrayTmaWarpSpecializedCooperative;" in grp and "PtrArrayTmaWarpSpecializedCooperative;" in grp


def test_tile_variant_round_trips_through_the_op_text():
    from pigeon.runtime.gemm_fused import parse
    g = Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", None, (128, 192, 128, 1, 1), "pingpong")
    back = parse(to_text(g))
    assert back == g and back.key() == g.key()
    assert parse(to_text(INSTANCES["fp8"])).key() == INSTANCES["fp8"].key()


@needs_cutlass
@pytest.mark.slow
def test_pingpong_fp8_variant_compiles_for_sm90a(tmp_path):
    # minutes of nvcc: the one representative tile variant (benchmarks/probe_gemm_tiles.py builds the rest)
    INSTANCES["fp8_pingpong_64x128"] = Sm90Gemm("fp8", "float8_e4m3fn", "bfloat16", None, (64, 128, 128, 1, 1), "pingpong")
    try:
        _compile("fp8_pingpong_64x128", tmp_path)
    finally:
        INSTANCES.pop("fp8_pingpong_64x128")
