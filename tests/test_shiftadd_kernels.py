"""The ShiftAdd family's TVM-generated CUDA kernels through pigeon's runtime (pigeon/runtime/shiftadd_kernel.py):
the generated CUDA text run by the CPU emulator against the references (bit-exact for the integer
kernels), their sources recorded in the kernel cache and found again without TVM, a missing record
without TVM an error naming the prebuild command, the cubin an ordinary cache entry of that source."""
import random

import pytest
import torch

pytest.importorskip("tvm")

from pigeon.runtime import emulate, shiftadd_kernel as sk
from pigeon.runtime.build import nvcc_available
from pigeon.runtime.cache import KernelCache
from pigeon.shiftadd.add import binary_codes, code_accumulate, code_accumulate_in_order, hamming_scores, pack_bits
from pigeon.shiftadd.fixed import shift_linear_ref, to_fixed
from pigeon.shiftadd.layers import ShiftLinear, masked_accumulate
from pigeon.shiftadd.quant import dequantize_shift, pack_shift, quantize_shift
from pigeon.shiftadd.tvm_kernels import TvmKernel

needs_cxx = pytest.mark.skipif(not emulate.available(), reason="needs a C++ compiler to emulate CUDA kernels")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "shiftadd-cache"       # one per session: sources generated once
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(root))
    monkeypatch.setenv("PIGEON_POISON", "1")
    return root


def _gen():
    seed = random.randrange(1 << 30)
    return seed, torch.Generator().manual_seed(seed)


@needs_cxx
@pytest.mark.parametrize("rng", [(-15, 0, 6), (-14, 0, 5)])
def test_shift_kernels_emulated(rng):
    p_min, p_max, bits = rng
    seed, g = _gen()
    for m, n, k in [(1, 1, 1), (3, 50, 7), (5, 13, 37), (2, 129, 31)]:     # M*N across block edges
        w = torch.randn(n, k, generator=g) * 0.3
        w[torch.rand(n, k, generator=g) < 0.1] = 0
        sign, p = quantize_shift(w, p_min, p_max)
        packed = pack_shift(sign, p, p_min, p_max, bits)
        xq = to_fixed(torch.randn(m, k, generator=g, dtype=torch.float64) * 8)
        got = sk.shift_linear(xq, packed, p_min, p_max, bits, emulate=True)
        assert torch.equal(got, shift_linear_ref(xq, sign, p)), ((m, n, k), seed)
        x = torch.randn(m, k, generator=g)
        got = sk.shift_linear(x, packed, p_min, p_max, bits, emulate=True)
        want = x.double() @ dequantize_shift(sign, p, torch.float64).T
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5), ((m, n, k), seed)


@needs_cxx
def test_hamming_and_accumulate_emulated():
    seed, g = _gen()
    for nbits, tq, tk in [(1, 9, 15), (31, 9, 15), (32, 70, 130), (33, 9, 15), (100, 65, 3)]:   # across 64 x 64 tiles
        proj = torch.randn(6, nbits, generator=g)
        cq = binary_codes(torch.randn(tq, 6, generator=g), proj)
        ck = binary_codes(torch.randn(tk, 6, generator=g), proj)
        assert torch.equal(sk.hamming(cq, ck, nbits, emulate=True), hamming_scores(cq, ck, nbits)), (nbits, seed)
    for G, T, nbits, nv in [(1, 1, 1, 1), (3, 37, 40, 6), (2, 5, 100, 70), (1, 50, 64, 64)]:
        b = torch.rand(G, T, nbits, generator=g) > 0.5
        v = torch.randn(G, T, nv, generator=g)
        codes = pack_bits(b)
        got = sk.code_accumulate(codes, v, nbits, emulate=True)
        assert torch.equal(got, code_accumulate_in_order(codes, v, nbits)), ((G, T, nbits, nv), seed)      # bit-exact
        want = torch.stack([code_accumulate(codes[i], v[i], nbits) for i in range(G)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5), ((G, T, nbits, nv), seed)


def test_source_recorded_and_found_without_tvm(cache_dir, monkeypatch):
    k = TvmKernel("hamming")
    src = sk.cuda_source(k, "sm_90")
    assert k.kernel_name in src and KernelCache().get_record(sk.source_key(k, "sm_90"))["source"] == src
    monkeypatch.setattr(sk, "tvm_available", lambda: False)
    assert sk.cuda_source(k, "sm_90") == src                                # from the record
    with pytest.raises(sk.ShiftAddKernelMissing, match=r"no CUDA source recorded .* TVM is not installed .*"
                       r"prebuild_kernels.py --shiftadd only --arch sm_80"):
        sk.cuda_source(k, "sm_80")                                          # another arch: another key


def test_source_key_names_the_kernel_and_definition(monkeypatch):
    a, b = TvmKernel("shift_f32", -15, 0, 6), TvmKernel("shift_f32", -14, 0, 5)
    assert len({sk.source_key(a, "sm_90"), sk.source_key(b, "sm_90"), sk.source_key(a, "sm_80")}) == 3
    key = sk.source_key(a, "sm_90")
    monkeypatch.setattr(sk, "definition_digest", lambda: "0" * 64)          # an edited TIR file
    assert sk.source_key(a, "sm_90") != key


def test_signature_checked():
    k = TvmKernel("hamming")
    src = sk.cuda_source(k, "sm_90")
    rk = sk.rendered_kernel(k, src)
    assert [p.name for p in rk.params] == ["k_ptr", "out_ptr", "q_ptr", "Tk", "Tq", "W", "nbits"]
    assert rk.grid({"Tq": 143, "Tk": 3}) == (1, 3, 1) and rk.block == (16, 16, 1)
    with pytest.raises(sk.ShiftAddKernelError, match="differ from the launcher's"):
        sk.rendered_kernel(k, src.replace("int Tq, int W", "int W, int Tq"))
    with pytest.raises(sk.ShiftAddKernelError, match="has no kernel"):
        sk.rendered_kernel(TvmKernel("accumulate"), src)


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_prebuild_is_an_ordinary_cache_entry(monkeypatch):
    from pigeon.runtime.build import build_kernel
    k = TvmKernel("shift_int", -14, 0, 5)
    entry = sk.prebuild(k, "sm_90")
    assert entry.read_source() == sk.cuda_source(k, "sm_90")
    assert k.kernel_name in entry.resources and entry.resources[k.kernel_name]["spill_stores"] == 0
    monkeypatch.setattr(sk, "tvm_available", lambda: False)                 # the GPU machine: no TVM
    assert build_kernel(sk.cuda_source(k, "sm_90"), "sm_90", name=k.kernel_name).key == entry.key


def test_launch_input_errors():
    packed = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(sk.ShiftAddKernelError, match="x must be int32 .Q16.16. or float32, got torch.float64"):
        sk.shift_linear(torch.zeros(2, 10, dtype=torch.float64), packed, -15, 0, 6)
    with pytest.raises(sk.ShiftAddKernelError, match=r"packed has shape \(4, 2\), expected \[N, 3\]"):
        sk.shift_linear(torch.zeros(2, 11), packed, -15, 0, 6)
    with pytest.raises(sk.ShiftAddKernelError, match="run on CUDA tensors, got cpu"):
        sk.shift_linear(torch.zeros(2, 10), packed, -15, 0, 6)
    with pytest.raises(sk.ShiftAddKernelError, match="nbits=40 needs 2"):
        sk.hamming(torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32), 40)
    with pytest.raises(sk.ShiftAddKernelError, match=r"v has shape \(2, 4, 3\), expected \[2, 5, Nv\]"):
        sk.code_accumulate(torch.zeros(2, 5, 1, dtype=torch.int32), torch.zeros(2, 4, 3), 8)
    with pytest.raises(ValueError, match="TvmKernel shift_int: shift range -31..0 outside -30..0"):
        TvmKernel("shift_int", -31, 0, 6)


def test_layer_backends_on_cpu():
    with pytest.raises(ValueError, match="ShiftLinear: backend is one of .'kernels', 'torch'., got 'cuda'"):
        ShiftLinear(4, 4, backend="cuda")
    torch.manual_seed(0)
    a, b = ShiftLinear(8, 5), ShiftLinear(8, 5, backend="torch")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(a(x), b(x))                      # a CPU runs the torch forms either way
    bb, v = (torch.rand(2, 6, 4) > 0.5).double(), torch.randn(2, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(masked_accumulate(bb, v), bb.transpose(1, 2) @ v)
