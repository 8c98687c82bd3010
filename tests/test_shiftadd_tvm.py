"""The TVM shift-linear and Hamming kernels: llvm builds bit-exact against the integer references;
the CUDA builds of the same TIR produce source that nvcc compiles for sm_90."""
import random

import pytest
import torch

tvm = pytest.importorskip("tvm")

from pigeon.runtime.build import nvcc_available
from pigeon.runtime.tvm_cuda import build_cuda_cubin, cuda_target
from pigeon.runtime.tvm_llvm import build_llvm
from pigeon.shiftadd.add import binary_codes, hamming_scores
from pigeon.shiftadd.fixed import shift_linear_ref, to_fixed
from pigeon.shiftadd.quant import pack_shift, quantize_shift
from pigeon.shiftadd.add import code_accumulate_in_order, pack_bits
from pigeon.shiftadd.tvm_add import code_accumulate_primfunc, scheduled_module as accumulate_module
from pigeon.shiftadd.tvm_hamming import hamming_primfunc, scheduled_module as hamming_module
from pigeon.shiftadd.tvm_shift import shift_linear_primfunc, scheduled_module as shift_module

RANGES = [(-15, 0, 6), (-14, 0, 5), (-8, -3, 5)]


@pytest.fixture(scope="module")
def shift_libs():
    return {r: build_llvm(shift_module(shift_linear_primfunc(*r), "llvm")) for r in RANGES}


@pytest.mark.parametrize("rng", RANGES)
def test_shift_linear_llvm_bit_exact(shift_libs, rng):
    p_min, p_max, bits = rng
    lib = shift_libs[rng]["pigeon_shift_linear"]
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 1), (3, 5, 7), (2, 3, 30), (17, 9, 31), (8, 16, 64), (33, 13, 101)]
    for m, n, k in shapes:                     # K not a multiple of 5 or 6 included
        w = torch.randn(n, k, generator=g) * 0.25
        w[torch.rand(n, k, generator=g) < 0.1] = 0
        sign, p = quantize_shift(w, p_min, p_max)
        x = to_fixed(torch.randn(m, k, generator=g, dtype=torch.float64) * 8)
        out = torch.full((m, n), 12345, dtype=torch.int32)
        lib(x, pack_shift(sign, p, p_min, p_max, bits), out)
        assert torch.equal(out, shift_linear_ref(x, sign, p)), (rng, (m, n, k), seed)


@pytest.fixture(scope="module")
def hamming_lib():
    return build_llvm(hamming_module(hamming_primfunc(), "llvm"))


@pytest.mark.parametrize("nbits", [1, 16, 31, 32, 33, 64, 100])
def test_hamming_llvm_bit_exact(hamming_lib, nbits):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    d = 12
    proj = torch.randn(d, nbits, generator=g)
    cq = binary_codes(torch.randn(9, d, generator=g), proj)
    ck = binary_codes(torch.randn(14, d, generator=g), proj)
    out = torch.full((9, 14), -7, dtype=torch.int32)
    hamming_lib["pigeon_hamming"](cq, ck, out, nbits)
    assert torch.equal(out, hamming_scores(cq, ck, nbits)), (nbits, seed)


def test_accumulate_llvm_bit_exact():
    lib = build_llvm(accumulate_module(code_accumulate_primfunc(), "llvm"))["pigeon_code_accumulate"]
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    for G, T, nbits, nv in [(1, 1, 1, 1), (3, 37, 40, 6), (2, 19, 100, 70)]:
        codes = pack_bits(torch.rand(G, T, nbits, generator=g) > 0.5)
        v = torch.randn(G, T, nv, generator=g)
        out = torch.full((G, nbits, nv), float("nan"))
        lib(codes, v, out)
        assert torch.equal(out, code_accumulate_in_order(codes, v, nbits)), ((G, T, nbits, nv), seed)


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
@pytest.mark.parametrize("kernel", ["shift", "hamming", "accumulate"])
def test_tvm_cuda_source_compiles_sm90(kernel):
    if kernel == "shift":
        mod = shift_module(shift_linear_primfunc(), cuda_target("sm_90"))
        name = "pigeon_shift_linear_kernel"
    elif kernel == "hamming":
        mod = hamming_module(hamming_primfunc("cuda"), cuda_target("sm_90"))
        name = "pigeon_hamming_kernel"
    else:
        mod = accumulate_module(code_accumulate_primfunc(), cuda_target("sm_90"))
        name = "pigeon_code_accumulate_kernel"
    r = build_cuda_cubin(mod, "sm_90", name=f"tvm_{kernel}")
    assert r.cubin and name in r.resources, r.resources
    assert r.resources[name]["spill_stores"] == 0 and r.resources[name]["spill_loads"] == 0, r.resources[name]
