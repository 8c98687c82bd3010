"""Build kernels with nvcc (and NVRTC) and launch them through pigeon.runtime.launch on a CUDA GPU.

Run on a GPU machine: ``python -m pytest tests/gpu/test_launch_gpu.py -m gpu``.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from pigeon.runtime.build import build_kernel, compile_cuda, device_arch, nvcc_available, nvrtc_available  # noqa: E402
from pigeon.runtime.cache import KernelCache  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

try:
    import cuda.bindings.driver  # noqa: F401

    HAVE_DRIVER = True
except ImportError:  # pragma: no cover
    HAVE_DRIVER = False

needs_driver = pytest.mark.skipif(not HAVE_DRIVER, reason="cuda.bindings.driver not importable")
needs_nvcc = pytest.mark.skipif(not nvcc_available(), reason="nvcc not found")

SAXPY = r"""
extern "C" __global__ void saxpy(float* __restrict__ out, const float* __restrict__ x,
                                 const float* __restrict__ y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + y[i];
}
"""

SRC = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
""" + SAXPY + r"""

// Reverses each block-sized chunk through dynamic shared memory (size chosen at launch).
extern "C" __global__ void reverse_chunks(float* __restrict__ out, const float* __restrict__ in, int chunk) {
    extern __shared__ float buf[];
    const float* src = in + (long long)blockIdx.x * chunk;
    for (int i = threadIdx.x; i < chunk; i += blockDim.x) buf[i] = src[i];
    __syncthreads();
    float* dst = out + (long long)blockIdx.x * chunk;
    for (int i = threadIdx.x; i < chunk; i += blockDim.x) dst[i] = buf[chunk - 1 - i];
}

extern "C" __global__ void scalars(double* out, long long i64, unsigned int u32, __half h, __nv_bfloat16 b,
                                   double f64, bool flag) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        out[0] = (double)i64;
        out[1] = (double)u32;
        out[2] = (double)__half2float(h);
        out[3] = (double)__bfloat162float(b);
        out[4] = f64;
        out[5] = flag ? 1.0 : 0.0;
        out[6] = (double)(i64 - 1099511627776LL);  // exact low bits of a > 2^32 value
    }
}

extern "C" __global__ void no_args() {}
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return KernelCache(tmp_path_factory.mktemp("pigeon-cache"))


@pytest.fixture(scope="module")
def module(cache):
    from pigeon.runtime.launch import load_module

    if not nvcc_available():
        pytest.skip("nvcc not found")
    if not HAVE_DRIVER:
        pytest.skip("cuda.bindings.driver not importable")
    entry = build_kernel(SRC, device_arch(), (), cache)
    return load_module(entry)


def _poisoned(n, device="cuda"):
    return torch.full((n,), float("nan"), device=device, dtype=torch.float32)


def _saxpy_ref(a, x, y):
    return (a * x.double() + y.double()).float()


@pytest.mark.parametrize("n", [1, 255, 256, 1_000_003])
def test_saxpy_explicit_types(module, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, device="cuda", generator=g)
    y = torch.randn(n, device="cuda", generator=g)
    out = _poisoned(n + 7)  # 7 guard elements past n must stay NaN
    fn = module.function("saxpy")
    fn.launch(((n + 255) // 256,), (256,), [out, x, y, 1.5, n], ["ptr", "ptr", "ptr", "float32", "int32"])
    torch.cuda.synchronize()
    assert not torch.isnan(out[:n]).any(), "unwritten outputs"
    assert torch.isnan(out[n:]).all(), "writes past n"
    torch.testing.assert_close(out[:n], _saxpy_ref(1.5, x, y), rtol=1e-6, atol=1e-6)


def test_saxpy_types_inferred_from_param_sizes(module):
    fn = module.function("saxpy")
    if fn.param_sizes() is None:
        pytest.skip("driver does not report parameter sizes")
    assert fn.param_sizes() == [8, 8, 8, 4, 4]
    n = 4097
    x, y, out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), _poisoned(n)
    fn(math.ceil(n / 128), 128, [out, x, y, -2.0, n])  # __call__ == launch
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _saxpy_ref(-2.0, x, y), rtol=1e-6, atol=1e-6)


def test_argument_errors_are_caught_before_launch(module):
    fn = module.function("saxpy")
    n = 16
    x, y, out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), _poisoned(n)
    if fn.param_sizes() is not None:
        with pytest.raises(TypeError, match="takes 5 parameters"):
            fn.launch(1, 32, [out, x, y, 1.0])
        with pytest.raises(TypeError, match="8 bytes"):
            fn.launch(1, 32, [out, x, y, 1.0, n], ["ptr", "ptr", "ptr", "float64", "int32"])
    with pytest.raises(TypeError, match="tensor"):
        fn.launch(1, 32, [out, x, y, 1.0, n], ["ptr", "ptr", "int64", "float32", "int32"])
    with pytest.raises(ValueError, match="cpu"):
        fn.launch(1, 32, [out, x.cpu(), y, 1.0, n], ["ptr", "ptr", "ptr", "float32", "int32"])
    with pytest.raises(TypeError, match="unknown C type"):
        fn.launch(1, 32, [out, x, y, 1.0, n], ["ptr", "ptr", "ptr", "float", "int7"])
    torch.cuda.synchronize()
    assert torch.isnan(out).all(), "nothing may have been launched"


def test_launch_error_names_kernel_grid_block(module):
    from pigeon.runtime.launch import KernelLaunchError

    fn = module.function("saxpy")
    n = 16
    x, y, out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), _poisoned(n)
    with pytest.raises(KernelLaunchError) as ei:
        fn.launch(1, 2048, [out, x, y, 1.0, n], ["ptr", "ptr", "ptr", "float32", "int32"])  # > 1024 threads
    msg = str(ei.value)
    assert "saxpy" in msg and "(1, 1, 1)" in msg and "(2048, 1, 1)" in msg and "CUDA_ERROR" in msg
    # the context is still usable
    fn.launch(1, 32, [out, x, y, 1.0, n], ["ptr", "ptr", "ptr", "float32", "int32"])
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _saxpy_ref(1.0, x, y))


def test_missing_kernel_name(module):
    from pigeon.runtime.launch import CudaDriverError

    with pytest.raises(CudaDriverError, match="not_there"):
        module.function("not_there")


@pytest.mark.parametrize("chunk", [1024, 30_000])  # 4 KiB and ~117 KiB of dynamic shared memory
def test_dynamic_shared_memory(module, chunk):
    blocks = 5
    src = torch.randn(blocks * chunk, device="cuda")
    out = _poisoned(blocks * chunk)
    module.function("reverse_chunks").launch(
        blocks, 256, [out, src, chunk], ["ptr", "ptr", "int32"], shared_mem=chunk * 4
    )
    torch.cuda.synchronize()
    torch.testing.assert_close(out, src.view(blocks, chunk).flip(1).reshape(-1), rtol=0, atol=0)


def test_scalar_types(module):
    out = torch.full((7,), float("nan"), device="cuda", dtype=torch.float64)
    i64 = (1 << 40) + 12345
    module.function("scalars").launch(
        1, 32,
        [out, i64, 4_000_000_000, 0.333, -1.5, 1e300, True],
        ["ptr", "int64", "uint32", "float16", "bfloat16", "float64", "bool"],
    )
    torch.cuda.synchronize()
    got = out.cpu().tolist()
    assert got[0] == float(i64) and got[6] == 12345.0
    assert got[1] == 4_000_000_000.0
    assert got[2] == torch.tensor(0.333, dtype=torch.float16).item()
    assert got[3] == torch.tensor(-1.5, dtype=torch.bfloat16).item()
    assert got[4] == 1e300 and got[5] == 1.0
    # bf16 rounding matches torch's on a value that is not exactly representable
    module.function("scalars").launch(
        1, 1, [out, 0, 0, 0.0, 3.14159, 0.0, False], ["ptr", "int64", "uint32", "float16", "bf16", "float64", "bool"]
    )
    torch.cuda.synchronize()
    assert out[3].item() == torch.tensor(3.14159, dtype=torch.bfloat16).item() and out[5].item() == 0.0


def test_no_args_kernel(module):
    module.function("no_args").launch(1, 1, [])
    torch.cuda.synchronize()


def test_side_stream_and_cuda_graph(module):
    fn = module.function("saxpy")
    n = 10_000
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    types = ["ptr", "ptr", "ptr", "float32", "int32"]

    s = torch.cuda.Stream()
    out = _poisoned(n)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn.launch(40, 256, [out, x, y, 3.0, n], types)  # current stream is s
    fn.launch(40, 256, [out, x, y, 3.0, n], types, stream=s)  # explicit stream object
    s.synchronize()
    torch.testing.assert_close(out, _saxpy_ref(3.0, x, y), rtol=1e-6, atol=1e-6)

    out2 = _poisoned(n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn.launch(40, 256, [out2, x, y, 0.5, n], types)
    out2.fill_(float("nan"))  # poison again after capture, then replay
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out2, _saxpy_ref(0.5, x, y), rtol=1e-6, atol=1e-6)


def test_module_cache_and_sync_mode(module, cache, monkeypatch):
    from pigeon.runtime.launch import load_module

    entry = build_kernel(SRC, device_arch(), (), cache)  # a cache hit
    assert load_module(entry) is module
    assert load_module(entry.read_cubin()) is module
    assert load_module(entry.cubin_path) is module

    monkeypatch.setenv("PIGEON_SYNC_LAUNCH", "1")
    n = 1000
    x, y, out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), _poisoned(n)
    module.function("saxpy").launch(4, 256, [out, x, y, 2.0, n], ["ptr", "ptr", "ptr", "float32", "int32"])
    torch.testing.assert_close(out, _saxpy_ref(2.0, x, y), rtol=1e-6, atol=1e-6)


def test_resources_reported_for_device_arch(module, cache):
    entry = build_kernel(SRC, device_arch(), (), cache)
    res = entry.resources
    assert res["saxpy"]["registers"] > 0 and res["saxpy"]["spill_stores"] == 0
    regs = module.function("saxpy").attribute("NUM_REGS")
    assert regs == res["saxpy"]["registers"]


@needs_driver
@pytest.mark.skipif(not nvrtc_available(), reason="cuda.bindings.nvrtc not available")
def test_nvrtc_built_kernel_launches(tmp_path):
    from pigeon.runtime.launch import load_module

    res = compile_cuda(SAXPY, arch=device_arch(), builder="nvrtc", failed_dir=tmp_path)
    fn = load_module(res.cubin).function("saxpy")
    n = 3000
    x, y, out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), _poisoned(n)
    fn.launch(12, 256, [out, x, y, 0.25, n], ["ptr", "ptr", "ptr", "float32", "int32"])
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _saxpy_ref(0.25, x, y), rtol=1e-6, atol=1e-6)


@needs_nvcc
@needs_driver
def test_wrong_arch_cubin_is_a_clear_error(tmp_path):
    from pigeon.runtime.launch import CudaDriverError, CudaModule

    major, _ = torch.cuda.get_device_capability()
    other = "sm_80" if major >= 9 else "sm_90"
    res = compile_cuda(SRC, arch=other, failed_dir=tmp_path)
    if major >= 9 and other == "sm_80":
        # sm_80 SASS does not run on sm_90 (no PTX embedded in a -cubin build)
        with pytest.raises(CudaDriverError, match="cuModuleLoadData"):
            CudaModule(res.cubin)
