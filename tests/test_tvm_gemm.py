"""GemmInstance through TVM: the llvm build against a plain-torch per-type loop, and the CUDA source
through nvcc for sm_90."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

pytest.importorskip("tvm")

from pigeon.codegen import tvm as ptvm  # noqa: E402
from pigeon.ir.kernel import GemmInstance  # noqa: E402
from pigeon.reference import unary_fn  # noqa: E402

TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1e-2, atol=5e-2),
       "float16": dict(rtol=1e-2, atol=1e-2)}


# -- plain-torch reference: an explicit loop over types, in float64 ---------------------------------
def apply_epilogue(ops, y):
    for op in ops:
        name, _, c = op.partition(":")
        y = unary_fn(name, y, float(c) if c else None)
    return y


def ref_rows(inst, X, W, seg_ptr, gather, scatter, Y):
    H, K, N = inst.heads, inst.k, inst.n
    x = X.double().reshape(X.shape[0], H, K)
    w = W.double().reshape((-1, H, N, K) if inst.transpose_w else (-1, H, K, N))
    out = Y.double().reshape(Y.shape[0], H, N).clone()
    for t in range(seg_ptr.numel() - 1):
        lo, hi = int(seg_ptr[t]), int(seg_ptr[t + 1])
        rows = torch.arange(lo, hi)
        a = x[gather[rows]] if gather is not None else x[rows]                 # [m, H, K]
        wt = w[t].transpose(-1, -2) if inst.transpose_w else w[t]              # [H, K, N]
        y = apply_epilogue(inst.epilogue, torch.einsum("ihk,hkn->ihn", a, wt))
        dst = scatter[rows] if scatter is not None else rows
        if inst.accumulate:
            out.index_add_(0, dst, y)
        else:
            out[dst] = y
    return out.reshape(Y.shape)


def ref_weight_grad(inst, X, dW, seg_ptr, gather, scatter, dY):
    H, K, N = inst.heads, inst.k, inst.n
    x = X.double().reshape(X.shape[0], H, K)
    dy = dY.double().reshape(dY.shape[0], H, N)
    out = dW.double().clone().reshape((-1, H, N, K) if inst.transpose_w else (-1, H, K, N))
    for t in range(seg_ptr.numel() - 1):
        rows = torch.arange(int(seg_ptr[t]), int(seg_ptr[t + 1]))
        a = x[gather[rows]] if gather is not None else x[rows]
        b = dy[scatter[rows]] if scatter is not None else dy[rows]
        g = torch.einsum("ihk,ihn->hkn", a, b)
        if inst.transpose_w:
            g = g.transpose(-1, -2)
        out[t] = out[t] + g if inst.accumulate else g
    return out.reshape(dW.shape)


# -- random problems ----------------------------------------------------------------------------
def make_seg_ptr(sizes):
    return torch.tensor([0] + sizes).cumsum(0)


def rows_case(inst, sizes, gen, n_x=None, n_y=None, index_dtype=torch.int64, unique=True):
    dt = TORCH_DTYPE[inst.dtype]
    H, K, N = inst.heads, inst.k, inst.n
    m = sum(sizes)
    n_types = len(sizes)
    seg_ptr = make_seg_ptr(sizes) if inst.typed else None
    n_x = n_x if inst.gather else m
    X = torch.randn((n_x, K) if H == 1 else (n_x, H, K), generator=gen).to(dt)
    W = torch.randn((n_types, H, N, K) if inst.transpose_w else (n_types, H, K, N), generator=gen).to(dt)
    gather = torch.randint(0, n_x, (m,), generator=gen).to(index_dtype) if inst.gather else None
    scatter = None
    if inst.scatter:
        scatter = (torch.randperm(n_y, generator=gen)[:m] if unique
                   else torch.randint(0, n_y, (m,), generator=gen)).to(index_dtype)
    else:
        n_y = m
    yshape = (n_y, N) if H == 1 else (n_y, H, N)
    Y = torch.randn(yshape, generator=gen).to(dt) if inst.accumulate else torch.full(yshape, float("nan"), dtype=dt)
    return X, W, seg_ptr, gather, scatter, Y


def check_rows(inst, sizes, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    X, W, seg_ptr, gather, scatter, Y = rows_case(inst, sizes, gen, **kw)
    want = ref_rows(inst, X, W, seg_ptr if seg_ptr is not None else make_seg_ptr([sum(sizes)]), gather, scatter, Y)
    got = ptvm.run_gemm_llvm(inst, X, W, seg_ptr, gather, scatter, Y)
    assert got is Y
    torch.testing.assert_close(Y.double(), want, equal_nan=inst.scatter and not inst.accumulate, **TOL[inst.dtype])
    if not inst.scatter:
        assert not torch.isnan(Y).any()


ROWS = [
    # (instance, segment sizes, extra)
    (GemmInstance("rows", 16, 8, heads=2, gather=True, epilogue=("leaky_relu:0.2",)), [10, 0, 27], dict(n_x=50)),
    (GemmInstance("rows", 12, 20, typed=False), [37], {}),
    (GemmInstance("rows", 8, 5, heads=1, transpose_w=True), [0, 13, 1, 0, 9], {}),
    (GemmInstance("rows", 32, 16, heads=2, transpose_w=True, accumulate=True, epilogue=("gelu",)), [5, 0, 31], {}),
    (GemmInstance("rows", 24, 12, gather=True, scatter=True), [3, 0, 40, 7], dict(n_x=33, n_y=61)),
    (GemmInstance("rows", 16, 16, heads=2, gather=True, scatter=True, scatter_unique=False, accumulate=True),
     [19, 0, 0, 22], dict(n_x=17, n_y=9, unique=False)),
    (GemmInstance("rows", 16, 8, typed=False, scatter=True, accumulate=True, epilogue=("scale:0.5", "tanh")),
     [29], dict(n_y=29)),
    (GemmInstance("rows", 7, 3, heads=2, gather=True, epilogue=("elu",)), [1, 2, 3, 0, 4], dict(n_x=5)),
]


@pytest.mark.parametrize("inst,sizes,extra", ROWS, ids=[f"rows{i}" for i in range(len(ROWS))])
def test_rows_matches_torch(inst, sizes, extra):
    check_rows(inst, sizes, seed=len(sizes) * 31 + inst.k, **extra)


def test_rows_symbolic_m_one_build_many_sizes():
    inst = GemmInstance("rows", 16, 8, heads=2, gather=True)
    fn = ptvm.build_llvm(inst)
    for seed, sizes in enumerate(([1], [0, 0, 3], [50, 0, 77, 1], [0], [])):
        check_rows(inst, sizes, seed, n_x=23)
    assert ptvm.build_llvm(inst) is fn


def test_rows_int32_indices_and_unaligned_inputs():
    inst = GemmInstance("rows", 8, 8, gather=True, scatter=True)
    gen = torch.Generator().manual_seed(3)
    X, W, seg_ptr, gather, scatter, Y = rows_case(inst, [6, 0, 9], gen, n_x=11, n_y=15, index_dtype=torch.int32)
    Xu = torch.cat([torch.zeros(1, 8), X])[1:]          # storage offset of 32 bytes
    assert Xu.data_ptr() % 64
    want = ref_rows(inst, X, W, seg_ptr, gather, scatter, Y)
    ptvm.run_gemm_llvm(inst, Xu, W, seg_ptr, gather, scatter, Y)
    torch.testing.assert_close(Y.double(), want, equal_nan=True, **TOL["float32"])


def test_unaligned_output_written():
    inst = GemmInstance("rows", 8, 4)
    gen = torch.Generator().manual_seed(4)
    X, W, seg_ptr, _, _, _ = rows_case(inst, [5, 6], gen)
    big = torch.full((12, 4), float("nan"))
    Y = big[1:]                                          # contiguous, 16 bytes off alignment
    want = ref_rows(inst, X, W, seg_ptr, None, None, Y)
    ptvm.run_gemm_llvm(inst, X, W, seg_ptr, None, None, Y)
    torch.testing.assert_close(big[1:].double(), want, **TOL["float32"])


@pytest.mark.parametrize("op", ptvm.EPILOGUE_OPS)
def test_every_epilogue_op(op):
    arg = {"leaky_relu": ":0.3", "scale": ":1.5", "shift": ":-0.25", "rsub": ":2", "rdiv": ":3",
           "leaky_step": ":0.1"}.get(op, "")
    inst = GemmInstance("rows", 4, 6, typed=True, epilogue=(op + arg,))
    gen = torch.Generator().manual_seed(5)
    X, W, seg_ptr, _, _, Y = rows_case(inst, [9, 4], gen)
    if op in ("rdiv", "recip"):                         # keep the matmul away from zero
        X, W = X.abs() + 0.5, W.abs() + 0.5
    want = ref_rows(inst, X, W, seg_ptr, None, None, Y)
    ptvm.run_gemm_llvm(inst, X, W, seg_ptr, None, None, Y)
    torch.testing.assert_close(Y.double(), want, **TOL["float32"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rows_half_dtypes(dtype):
    check_rows(GemmInstance("rows", 32, 8, heads=2, gather=True, dtype=dtype), [7, 0, 12], 6, n_x=9)
    check_rows(GemmInstance("rows", 16, 8, scatter=True, accumulate=True, scatter_unique=False, dtype=dtype),
               [4, 11], 7, n_y=6, unique=False)


# -- weight_grad ------------------------------------------------------------------------------
def check_weight_grad(inst, sizes, seed, n_x=None, n_y=None, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    dt = TORCH_DTYPE[inst.dtype]
    H, K, N = inst.heads, inst.k, inst.n
    m = sum(sizes)
    n_x = n_x if inst.gather else m
    n_y = n_y if inst.scatter else m
    seg_ptr = make_seg_ptr(sizes) if inst.typed else None
    X = torch.randn((n_x, K) if H == 1 else (n_x, H, K), generator=gen).to(dt)
    dY = torch.randn((n_y, N) if H == 1 else (n_y, H, N), generator=gen).to(dt)
    gx = torch.randint(0, n_x, (m,), generator=gen).to(index_dtype) if inst.gather else None
    gy = torch.randint(0, n_y, (m,), generator=gen).to(index_dtype) if inst.scatter else None
    wshape = (len(sizes), H, N, K) if inst.transpose_w else (len(sizes), H, K, N)
    dW = torch.randn(wshape, generator=gen).to(dt) if inst.accumulate else torch.full(wshape, float("nan"), dtype=dt)
    want = ref_weight_grad(inst, X, dW, seg_ptr if seg_ptr is not None else make_seg_ptr([m]), gx, gy, dY)
    assert ptvm.run_gemm_llvm(inst, X, dW, seg_ptr, gx, gy, dY) is dW
    torch.testing.assert_close(dW.double(), want, **TOL[inst.dtype])


WGRAD = [
    (GemmInstance("weight_grad", 16, 8, heads=2, gather=True, scatter=True), [10, 0, 27], dict(n_x=50, n_y=13)),
    (GemmInstance("weight_grad", 12, 20, typed=False), [37], {}),
    (GemmInstance("weight_grad", 8, 5, accumulate=True), [0, 13, 1, 0, 9], {}),
    (GemmInstance("weight_grad", 9, 6, heads=2, transpose_w=True, gather=True), [4, 0, 17], dict(n_x=7)),
    (GemmInstance("weight_grad", 16, 16, scatter=True, accumulate=True, transpose_w=True), [0, 0, 0], dict(n_y=4)),
    # K above the llvm schedule's k-block of 16: blocks of 16 (K=32) and of 9 (K=18)
    (GemmInstance("weight_grad", 32, 12, heads=2, gather=True, transpose_w=True), [21, 0, 8], dict(n_x=15)),
    (GemmInstance("weight_grad", 18, 7, typed=False, scatter=True, accumulate=True), [40], dict(n_y=11)),
]


@pytest.mark.parametrize("inst,sizes,extra", WGRAD, ids=[f"wgrad{i}" for i in range(len(WGRAD))])
def test_weight_grad_matches_torch(inst, sizes, extra):
    check_weight_grad(inst, sizes, seed=len(sizes) * 17 + inst.n, **extra)


def test_weight_grad_int32_and_half():
    check_weight_grad(GemmInstance("weight_grad", 8, 8, gather=True, scatter=True), [5, 0, 6], 1,
                      n_x=4, n_y=9, index_dtype=torch.int32)
    for dt in ("bfloat16", "float16"):
        check_weight_grad(GemmInstance("weight_grad", 16, 8, heads=2, gather=True, accumulate=True, dtype=dt),
                          [12, 0, 3], 2, n_x=10)


# -- errors -----------------------------------------------------------------------------------
def test_unsupported_raise_clearly():
    with pytest.raises(NotImplementedError, match="epilogue"):
        ptvm.build_llvm(GemmInstance("weight_grad", 4, 4, epilogue=("relu",)))
    with pytest.raises(NotImplementedError, match="softplus"):
        ptvm.build_llvm(GemmInstance("rows", 4, 4, epilogue=("softplus",)))
    with pytest.raises(NotImplementedError, match="float64"):
        ptvm.build_llvm(GemmInstance("rows", 4, 4, dtype="float64"))
    with pytest.raises(ValueError, match="gather"):
        X, W = torch.randn(3, 4), torch.randn(1, 4, 4)
        ptvm.run_gemm_llvm(GemmInstance("rows", 4, 4, typed=False), X, W, None, torch.arange(3), None,
                           torch.empty(3, 4))
    with pytest.raises(IndexError, match="gather"):
        ptvm.run_gemm_llvm(GemmInstance("rows", 4, 4, typed=False, gather=True), X, W, None,
                           torch.tensor([0, 3, 1]), None, torch.empty(3, 4))


# -- CUDA source ------------------------------------------------------------------------------
CUDA_INSTANCES = [
    GemmInstance("rows", 16, 8, heads=2, gather=True, epilogue=("leaky_relu:0.2",)),
    GemmInstance("rows", 64, 64, transpose_w=True, accumulate=True, dtype="bfloat16", epilogue=("gelu",)),
    GemmInstance("weight_grad", 16, 8, heads=2, gather=True, scatter=True),
    GemmInstance("weight_grad", 32, 16, transpose_w=True, accumulate=True, dtype="float16"),
]


@pytest.mark.parametrize("inst", CUDA_INSTANCES, ids=[f"{i.form}-{i.dtype}" for i in CUDA_INSTANCES])
def test_cuda_source_compiles_for_sm90(inst, tmp_path):
    src = ptvm.cuda_source(inst)
    assert "__global__" in src and f"pigeon_gemm_{inst.form}_{inst.key()}" in src
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    res = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-o", str(tmp_path / "k.cubin"), str(cu)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0
