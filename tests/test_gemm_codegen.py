"""GEMM codegen on the CPU: templates render and compile (nvcc, sm_90; sm_80 under -m slow; no spills), the
Jinja environment is strict, the tile schedule is right, ``gemm_reference`` equals an independent
vectorized einsum formulation, and ``run_gemm`` validates its arguments.

The kernels themselves run in tests/gpu/test_gemm_gpu.py.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import random
import re
import types

import jinja2
import pytest
import torch

from pigeon.codegen import jinja as pj
from pigeon.codegen.gemm import (GemmCodegenError, GemmConfig, GemmLaunchError, epilogue_code, f32_accumulator,
                                 gemm_config, kernel_name, render_gemm)
from pigeon.runtime.family_gemm import (apply_epilogue, gemm_reference, run_gemm, tile_schedule,
                                        weight_grad_rows_per_block)
from pigeon.ir.kernel import GemmInstance as G
from pigeon.ir.kernel import TileConfig
from pigeon.runtime.build import compile_cuda, nvcc_available

TEMPLATES = ("gemm.simt.cu.jinja", "gemm.mma.cu.jinja")
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# representative instances: both forms x dtypes x gather / scatter / transpose / accumulate / epilogue / heads,
# aligned sizes (vector loads) and odd sizes (scalar loads, partial tiles)
GRID = [
    G("rows", 64, 64),
    G("rows", 30, 17, gather=True, scatter=True, epilogue=("leaky_relu:0.2",)),
    G("rows", 64, 64, heads=4, transpose_w=True, accumulate=True),
    G("rows", 32, 48, accumulate=True, scatter=True, scatter_unique=False),
    G("rows", 64, 64, dtype="bfloat16"),
    G("rows", 64, 64, dtype="bfloat16", gather=True, scatter=True, epilogue=("relu", "scale:0.5")),
    G("rows", 64, 64, dtype="bfloat16", heads=2, transpose_w=True, accumulate=True, typed=False),
    G("rows", 30, 17, dtype="float16", accumulate=True, scatter=True, scatter_unique=False, epilogue=("sigmoid",)),
    G("weight_grad", 64, 64, gather=True, scatter=True),
    G("weight_grad", 30, 17, heads=2, transpose_w=True),
    G("weight_grad", 64, 64, dtype="bfloat16", gather=True),
    G("weight_grad", 30, 17, dtype="float16", transpose_w=True, scatter=True, accumulate=True),
]


# ------------------------------------------------------------------------------ Jinja environment

def test_environment_is_strict_and_loads_from_the_package():
    env = pj.environment()
    assert env.undefined is jinja2.StrictUndefined
    assert env.trim_blocks and env.lstrip_blocks
    assert set(TEMPLATES) <= set(pj.list_templates())
    with pytest.raises(jinja2.TemplateNotFound):
        pj.render("no_such.cu.jinja", None)
    with pytest.raises(jinja2.TemplateNotFound):
        pj.render("../gemm.py", None)


def test_filters():
    assert pj.ctype("bfloat16") == "__nv_bfloat16"
    assert pj.ctype("float16") == "__half"
    assert pj.ctype("float32") == "float"
    assert pj.ctype(torch.bfloat16) == "__nv_bfloat16"
    with pytest.raises(ValueError):
        pj.ctype("complex64")
    assert pj.cfloat(0.2) == "0.200000003f"
    assert pj.cfloat(2) == "2.f"
    assert pj.cfloat(-1.5) == "(-1.5f)"
    assert pj.cfloat(float("inf")).startswith("__int_as_float")
    assert pj.cbool(1) == "true" and pj.cbool(0) == "false"
    with pytest.raises(ValueError):
        pj.cident("a b")
    env = pj.environment()
    assert env.from_string("{{ 'bfloat16' | ctype }} {{ 0.5 | cfloat }}").render() == "__nv_bfloat16 0.5f"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_header_lists_every_parameter(name):
    src = pj.template_source(name)
    assert src.startswith("{#-"), f"{name} must open with a comment listing its parameters"
    header = pj.template_header(name)
    assert "Parameters" in header
    body = src[src.index("-#}"):]
    used = set(re.findall(r"\bc\.([a-z_]+)", body))
    fields = {f.name for f in dataclasses.fields(GemmConfig)}
    assert used <= fields, f"{name} uses {sorted(used - fields)} which GemmConfig lacks"
    for f in fields:
        assert f"c.{f}" in header, f"{name}: parameter c.{f} missing from the header comment"


@pytest.mark.parametrize("name", TEMPLATES)
def test_missing_variable_raises(name):
    inst = G("rows", 64, 64, dtype="float32" if "simt" in name else "bfloat16")
    cfg = gemm_config(inst)
    values = dataclasses.asdict(cfg)
    assert pj.render(name, types.SimpleNamespace(**values))       # complete: renders
    del values["epilogue"]
    with pytest.raises(jinja2.UndefinedError):
        pj.render(name, types.SimpleNamespace(**values))
    with pytest.raises(jinja2.UndefinedError):
        pj.render(name, object())


# ------------------------------------------------------------------------------ rendering

def test_rendered_kernel_names_params_and_grid():
    for inst in GRID:
        rk = render_gemm(inst)
        assert rk.name == kernel_name(inst) == f"pigeon_gemm_{inst.key()}"
        assert f'extern "C" __global__ void __launch_bounds__({rk.block[0]}) {rk.name}({rk.signature()})' in rk.source
        names = [p.name for p in rk.params]
        assert names[:3] == (["X", "W", "Y"] if inst.form == "rows" else ["X", "dY", "dW"])
        assert ("gather" in names) == inst.gather and ("scatter" in names) == inst.scatter
        assert rk.ctypes == ["ptr"] * (len(names) - (1 if inst.form == "rows" else 2)) + \
            ["int32"] * (1 if inst.form == "rows" else 2)
        assert rk.block == (32 * inst.tile.warps, 1, 1)
        want_y = -(-inst.n // 64) * (1 if inst.form == "rows" else -(-inst.k // 64))
        rpb = None if inst.form == "rows" else 128
        assert rk.grid(1000, 5, rpb) == (1000 // (rpb or 64) + 5, want_y, inst.heads)
    assert render_gemm(GRID[0]) is render_gemm(G("rows", 64, 64))        # cached per instance


def test_16bit_atomic_scatter_adds_into_an_fp32_accumulator():
    """A non-unique accumulating scatter of a 16-bit instance declares Y float* (role y_f32: the runtime
    passes an fp32 copy and rounds it into Y once); every other rows form stores into the typed Y."""
    for inst in GRID:
        y = next(p for p in render_gemm(inst).params if p.name in ("Y", "dW"))
        atomic16 = (inst.form == "rows" and inst.dtype != "float32" and inst.accumulate and inst.scatter
                    and not inst.scatter_unique)
        assert f32_accumulator(inst) == atomic16
        if inst.form == "rows":
            assert (y.role, y.decl.startswith("float*")) == (("tensor:y_f32", True) if atomic16 else
                                                            ("tensor:y", inst.dtype == "float32")), inst
    src = render_gemm(G("rows", 30, 17, dtype="float16", accumulate=True, scatter=True, scatter_unique=False)).source
    assert "float* __restrict__ yp" in src and "atomicAdd(yp + n, v0)" in src and "from_f(v0))" not in src


def test_render_rejects_what_templates_cannot_do():
    with pytest.raises(ValueError, match="unknown epilogue op"):      # refused when the instance is built
        render_gemm(G("rows", 8, 8, epilogue=("softplus",)))
    with pytest.raises(ValueError, match="needs a constant"):      # refused when the instance is built
        render_gemm(G("rows", 8, 8, epilogue=("leaky_relu",)))
    with pytest.raises(ValueError, match="takes no constant"):      # refused when the instance is built
        render_gemm(G("rows", 8, 8, epilogue=("relu:1",)))
    with pytest.raises(ValueError, match="not a number"):      # refused when the instance is built
        render_gemm(G("rows", 8, 8, epilogue=("scale:1; exit(0)",)))
    with pytest.raises(GemmCodegenError, match="no epilogue"):
        render_gemm(G("weight_grad", 8, 8, epilogue=("relu",)))
    with pytest.raises(GemmCodegenError, match="multiple of 16"):
        render_gemm(G("rows", 8, 8, dtype="bfloat16", tile=TileConfig(64, 64, 8, 4)))
    with pytest.raises(GemmCodegenError, match="shared memory"):
        render_gemm(G("rows", 8, 8, tile=TileConfig(256, 256, 64, 8)))
    with pytest.raises(GemmCodegenError, match="dtype"):
        render_gemm(G("rows", 8, 8, dtype="float64"))  # type: ignore[arg-type]


def test_epilogue_code_and_semantics_agree_on_names():
    code = "\n".join(epilogue_code(("leaky_relu:0.2", "sigmoid", "scale:-3")))
    assert "0.200000003f" in code and "expf" in code and "(-3.f)" in code and code.endswith(";")
    # an epilogue is any elementwise expression of the accumulator (bias-free GELU-like tail here)
    from pigeon.ir import expr as ex
    acc = ex.var("acc")
    e = ex.where(ex.binary("gt", acc, ex.const(0.0)), ex.binary("mul", acc, acc), ex.unary("neg", acc))
    assert "?" in "\n".join(epilogue_code(e))
    y0 = torch.tensor([-2.0, 0.5, 3.0])
    torch.testing.assert_close(apply_epilogue(y0, e), torch.where(y0 > 0, y0 * y0, -y0))
    with pytest.raises(GemmCodegenError, match="reads only var"):
        epilogue_code(ex.binary("add", acc, ex.var("bias")))
    y = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(apply_epilogue(y, ("leaky_relu:0.2", "scale:2")),
                               torch.nn.functional.leaky_relu(y, 0.2) * 2)


def _compile(job):
    inst, arch = job
    rk = render_gemm(inst)
    res = compile_cuda(rk.source, arch=arch, name=rk.name)
    return inst, arch, res.resources[rk.name]


@pytest.mark.skipif(not nvcc_available(), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", pytest.param("sm_80", marks=pytest.mark.slow)])   # sm_80: -m slow
def test_templates_compile_without_spills(arch):
    jobs = [(inst, arch) for inst in GRID]
    spills = []
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        for inst, arch, r in ex.map(_compile, jobs):
            print(f"{arch} {render_gemm(inst).meta['template']:20s} {inst.form:11s} {inst.dtype:8s} K={inst.k:2d} "
                  f"N={inst.n:2d}: {r['registers']:3d} regs, {r['smem']:5d} B smem, stack {r['stack']}, "
                  f"spills {r['spill_stores']}/{r['spill_loads']}")
            if r["spill_stores"] or r["spill_loads"] or r["stack"]:
                spills.append((arch, inst))
    assert not spills, f"register spills with the default tiles: {spills}"


# ------------------------------------------------------------------------------ tile schedule

def _schedule_loop(seg, bm):
    rows, tys = [], []
    for t in range(len(seg) - 1):
        for r in range(seg[t], seg[t + 1], bm):
            rows.append(r)
            tys.append(t)
    return rows, tys


@pytest.mark.parametrize("seed", range(8))
def test_tile_schedule_matches_a_loop(seed):
    rng = random.Random(seed)
    T = rng.randint(1, 9)
    lens = [rng.choice([0, 0, 1, rng.randint(1, 300)]) for _ in range(T)]
    seg = [0]
    for n in lens:
        seg.append(seg[-1] + n)
    M = seg[-1]
    for bm in (1, 7, 64, 128):
        tile_row, tile_type, U = tile_schedule(torch.tensor(seg, dtype=torch.int32), bm, M)
        assert U == M // bm + T == tile_row.numel() == tile_type.numel()
        assert tile_row.dtype == tile_type.dtype == torch.int32
        rows, tys = _schedule_loop(seg, bm)
        assert tile_type[:len(tys)].tolist() == tys and tile_row[:len(rows)].tolist() == rows
        assert (tile_type[len(tys):] == -1).all()
        # M taken from seg_ptr when not given
        assert tile_schedule(torch.tensor(seg, dtype=torch.int32), bm)[2] == U


def test_weight_grad_rows_per_block():
    inst = G("weight_grad", 64, 64)
    assert weight_grad_rows_per_block(inst, 10) == 128                  # at least MIN rows
    r = weight_grad_rows_per_block(inst, 10_000_000, sm_count=132)
    assert r % inst.tile.block_k == 0 and 10_000_000 / r <= 4 * 132 + 1


# ------------------------------------------------------------------------------ reference

def _random_case(inst: G, seed: int, segs):
    g = torch.Generator().manual_seed(seed)
    dt = DT[inst.dtype]
    H, K, N = inst.heads, inst.k, inst.n
    segs = segs if inst.typed else [sum(segs)]
    T, M = len(segs), sum(segs)
    seg_ptr = torch.tensor([0] + torch.tensor(segs).cumsum(0).tolist(), dtype=torch.int32)
    mx, my = M + 5 * inst.gather, M + 7 * inst.scatter
    X = torch.randn(mx, H, K, generator=g).to(dt)
    gather = torch.randint(0, mx, (M,), generator=g, dtype=torch.int32) if inst.gather else None
    if inst.scatter and inst.form == "rows" and inst.scatter_unique:
        scatter = torch.randperm(my, generator=g)[:M].to(torch.int32)
    elif inst.scatter:
        scatter = torch.randint(0, my, (M,), generator=g, dtype=torch.int32)
    else:
        scatter = None
    wshape = (T, H, N, K) if inst.transpose_w else (T, H, K, N)
    W = torch.randn(wshape, generator=g).to(dt)
    Y = torch.randn(my, H, N, generator=g).to(dt)
    return X, W, seg_ptr, gather, scatter, Y


def _einsum_semantics(inst: G, X, W, seg_ptr, gather, scatter, Y):
    """The instance semantics, vectorized (no loop over types): float64 result tensor."""
    H, K, N = inst.heads, inst.k, inst.n
    T = seg_ptr.numel() - 1
    lens = (seg_ptr[1:] - seg_ptr[:-1]).long()
    row_type = torch.repeat_interleave(torch.arange(T), lens)
    M = row_type.numel()
    rows = torch.arange(M)
    a = X.double()[gather.long() if gather is not None else rows]               # [M, H, K]
    out_rows = scatter.long() if scatter is not None else rows
    if inst.form == "rows":
        w = W.double().reshape(T, H, N, K).transpose(-1, -2) if inst.transpose_w else W.double().reshape(T, H, K, N)
        y = apply_epilogue(torch.einsum("mhk,mhkn->mhn", a, w[row_type]), inst.epilogue)
        out = Y.double().clone()
        if not inst.accumulate:
            out[out_rows] = y
        else:
            out.index_add_(0, out_rows, y)
        return out
    b = Y.double()[out_rows]                                                     # dY rows [M, H, N]
    outer = torch.einsum("mhk,mhn->mhkn", a, b)
    dw = torch.zeros(T, H, K, N, dtype=torch.float64).index_add_(0, row_type, outer)
    if inst.transpose_w:
        dw = dw.transpose(-1, -2)
    if inst.accumulate:
        dw = dw + W.double().reshape(dw.shape)
    return dw


REF_CASES = GRID + [
    G("rows", 5, 3, heads=3, gather=True, scatter=True, accumulate=True, epilogue=("exp", "scale:0.1")),
    G("rows", 4, 6, transpose_w=True, scatter=True, epilogue=("tanh",)),
    G("weight_grad", 4, 6, heads=2, gather=True, scatter=True, accumulate=True, transpose_w=True),
    G("weight_grad", 3, 5, typed=False, heads=2),
]


@pytest.mark.parametrize("inst", REF_CASES, ids=lambda i: f"{i.form}-{i.dtype}-{i.key()[:6]}")
def test_reference_equals_vectorized_einsum(inst):
    seed = random.randrange(1 << 30)
    segs = [0, 9, 1, 0, 23, 4]
    X, W, seg_ptr, gather, scatter, Y = _random_case(inst, seed, segs)
    want = _einsum_semantics(inst, X, W, seg_ptr, gather, scatter, Y)
    out = Y if inst.form == "rows" else W
    got = gemm_reference(inst, X, W, seg_ptr, gather, scatter, Y, compute_dtype=torch.float64)
    assert got is out
    if inst.dtype == "float32":
        torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"seed={seed}: {m}")
    else:   # rounded once to the storage dtype
        torch.testing.assert_close(got.double(), want.reshape(got.shape).to(DT[inst.dtype]).double(),
                                   rtol=1e-2, atol=1e-2, msg=lambda m: f"seed={seed}: {m}")


def test_reference_weight_grad_of_empty_segment_is_zero():
    inst = G("weight_grad", 4, 4)
    X, W, seg_ptr, gather, scatter, Y = _random_case(inst, 0, [3, 0, 2])
    gemm_reference(inst, X, W, seg_ptr, gather, scatter, Y)
    assert (W[1] == 0).all() and (W[0] != 0).any()


# ------------------------------------------------------------------------------ run_gemm validation (no GPU needed)

class _NoLaunch:
    def function(self, name):  # pragma: no cover - validation fails first
        raise AssertionError("should not launch")


def test_run_gemm_validates_arguments():
    inst = G("rows", 8, 4, gather=True)
    X, W, seg_ptr, gather, scatter, Y = _random_case(inst, 1, [3, 0, 5])
    fn = _NoLaunch()
    with pytest.raises(GemmLaunchError, match="gather=True scatter=False; got gather=None"):
        run_gemm(inst, fn, X, W, seg_ptr, None, None, Y)
    with pytest.raises(GemmLaunchError, match="X has dtype torch.float16"):
        run_gemm(inst, fn, X.half(), W, seg_ptr, gather, None, Y)
    with pytest.raises(GemmLaunchError, match="elements per row"):
        run_gemm(inst, fn, torch.randn(X.shape[0], 9), W, seg_ptr, gather, None, Y)
    with pytest.raises(GemmLaunchError, match="Y has 7 rows, expected M = 8"):
        run_gemm(inst, fn, X, W, seg_ptr, gather, None, Y[:7])
    with pytest.raises(GemmLaunchError, match="contiguous"):
        run_gemm(inst, fn, X, W, seg_ptr, gather, None, torch.randn(4, 8).t())
    with pytest.raises(GemmLaunchError, match="1-D int32"):
        run_gemm(inst, fn, X, W, seg_ptr, gather.long(), None, Y)
    with pytest.raises(GemmLaunchError, match=r"W has shape \[3, 1, 4, 8\]"):
        run_gemm(inst, fn, X, W.transpose(-1, -2).contiguous(), seg_ptr, gather, None, Y)
    with pytest.raises(GemmLaunchError, match="needs CUDA tensors"):
        run_gemm(inst, fn, X, W, seg_ptr, gather, None, Y)
    untyped = G("rows", 8, 4, typed=False)
    with pytest.raises(GemmLaunchError, match="one segment"):
        run_gemm(untyped, fn, X[:8], W[:1], seg_ptr, None, None, Y)
