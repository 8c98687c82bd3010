"""A lockstep CPU model of the sm80 atoms the tensor-core attention templates use (cp.async,
ldmatrix, ldmatrix.trans, mma.sync m16n8k16, __shfl_xor_sync, __syncthreads), for running their exact CUDA text on
a CPU in tests: every thread of a CTA is an OS thread, CTAs run one after another; warp-wide
atoms exchange their operands through a per-warp buffer between two warp barriers, and compute
each lane's registers from the PTX ISA's fragment layouts.  cp.async copies at once (a legal,
stronger ordering), so this checks the indexing, the fragment layouts and the barriers' placement
-- not timing races of real asynchronous copies.  Slow (thread switches): tiny shapes only.

    fn = load(rk)                     # a RenderedKernel of attention_mma / attention_mma_bwd
    fn(grid, args)                    # args as pigeon.runtime.attention_kernel._launch binds them
"""
from __future__ import annotations

import ctypes
import hashlib
import subprocess
import tempfile
from pathlib import Path

from pigeon.runtime import emulate

SHIM = r"""
#include <stdint.h>
#include <string.h>
#include <thread>
#include <mutex>
#include <condition_variable>
#include <vector>

struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
static inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__

struct EmuBarrier {
    std::mutex m; std::condition_variable cv; int n = 0, count = 0, gen = 0;
    void wait() {
        std::unique_lock<std::mutex> l(m);
        int g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); }
        else cv.wait(l, [&] { return gen != g; });
    }
};
struct EmuWarp { EmuBarrier bar; const void* p[32]; uint32_t a[32][4]; uint32_t b[32][2]; float f[32]; };
static EmuBarrier emu_cta;
static EmuWarp emu_warps[32];
static unsigned char* emu_smem;
static inline void __syncthreads() { emu_cta.wait(); }
static inline EmuWarp& emu_warp() { return emu_warps[threadIdx.x >> 5]; }
static inline float __shfl_xor_sync(unsigned, float v, int m) {
    EmuWarp& w = emu_warp(); const int l = threadIdx.x & 31;
    w.f[l] = v; w.bar.wait();
    const float r = w.f[l ^ m];
    w.bar.wait();
    return r;
}

namespace cute {
struct uint128_t { uint64_t lo, hi; };
template <class TS, class TD = TS> struct SM80_CP_ASYNC_CACHEGLOBAL_ZFILL {
    static void copy(TS const& src, TD& dst, bool pred) { if (pred) memcpy(&dst, &src, sizeof(TS)); else memset(&dst, 0, sizeof(TD)); }
};
template <class TS, class TD = TS> struct SM80_CP_ASYNC_CACHEALWAYS_ZFILL {
    static void copy(TS const& src, TD& dst, bool pred) { if (pred) memcpy(&dst, &src, sizeof(TS)); else memset(&dst, 0, sizeof(TD)); }
};
static inline void cp_async_fence() {}
template <int N> static inline void cp_async_wait() {}
struct SM75_U32x4_LDSM_N {     // lane l: 32 bits j of row l/4 of matrix j, at column pair l%4
    static void copy(uint128_t const& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
        EmuWarp& w = emu_warp(); const int l = threadIdx.x & 31;
        w.p[l] = &src; w.bar.wait();
        uint32_t r[4];
        for (int j = 0; j < 4; ++j) memcpy(&r[j], (const char*)w.p[8 * j + l / 4] + (l % 4) * 4, 4);
        w.bar.wait();
        d0 = r[0]; d1 = r[1]; d2 = r[2]; d3 = r[3];
    }
};
struct SM75_U16x8_LDSM_T {     // lane l: elements (2(l%4), l/4) and (2(l%4)+1, l/4) of matrix j
    static void copy(uint128_t const& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
        EmuWarp& w = emu_warp(); const int l = threadIdx.x & 31;
        w.p[l] = &src; w.bar.wait();
        uint32_t r[4];
        for (int j = 0; j < 4; ++j) {
            uint16_t lo, hi;
            memcpy(&lo, (const char*)w.p[8 * j + 2 * (l % 4)] + (l / 4) * 2, 2);
            memcpy(&hi, (const char*)w.p[8 * j + 2 * (l % 4) + 1] + (l / 4) * 2, 2);
            r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
        w.bar.wait();
        d0 = r[0]; d1 = r[1]; d2 = r[2]; d3 = r[3];
    }
};
template <class E> struct EmuMma {      // m16n8k16, row-major A, column-major B, fp32 accumulators
    static float half_of(uint32_t v, int hi) { uint16_t h = hi ? (uint16_t)(v >> 16) : (uint16_t)v; E e; memcpy(&e, &h, 2); return E::to_float(e); }
    static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                    uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3) {
        EmuWarp& w = emu_warp(); const int l = threadIdx.x & 31;
        w.a[l][0] = a0; w.a[l][1] = a1; w.a[l][2] = a2; w.a[l][3] = a3; w.b[l][0] = b0; w.b[l][1] = b1;
        w.bar.wait();
        float c[4] = {c0, c1, c2, c3};
        const int g = l / 4, q = l % 4;
        for (int e = 0; e < 4; ++e) {
            const int row = g + (e >> 1) * 8, col = 2 * q + (e & 1);
            float s = c[e];
            for (int k = 0; k < 16; ++k) {
                const float x = half_of(w.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
                const float y = half_of(w.b[col * 4 + (k % 8) / 2][k >= 8], k % 2);
                s += x * y;
            }
            c[e] = s;
        }
        w.bar.wait();
        d0 = c[0]; d1 = c[1]; d2 = c[2]; d3 = c[3];
    }
};
struct EmuBf16 { __nv_bfloat16 v; static float to_float(EmuBf16 e) { return __bfloat162float(e.v); } };
struct EmuF16 { __half v; static float to_float(EmuF16 e) { return __half2float(e.v); } };
struct SM80_16x8x16_F32BF16BF16F32_TN : EmuMma<EmuBf16> {};
struct SM80_16x8x16_F32F16F16F32_TN : EmuMma<EmuF16> {};
}  // namespace cute
"""


def _source(rk) -> str:
    src = rk.source
    for inc in ("#include <cute/arch/copy_sm75.hpp>", "#include <cute/arch/copy_sm80.hpp>",
                "#include <cute/arch/mma_sm80.hpp>", "#include <cuda_bf16.h>", "#include <cuda_fp16.h>"):
        src = src.replace(inc, "")
    src = src.replace("extern __shared__ __align__(128) unsigned char smem_raw[];", "unsigned char* smem_raw = emu_smem;")
    args = ", ".join(p.name for p in rk.params)
    threads = rk.block[0]
    return SHIM + src + f"""
extern "C" void emu_launch(int gx, int gy, int gz, {rk.signature()}) {{
    std::vector<unsigned char> smem({max(rk.shared_mem, 16)} + 128);
    emu_smem = smem.data() + (128 - ((uintptr_t)smem.data() % 128)) % 128;
    emu_cta.n = {threads};
    for (int w = 0; w < 32; ++w) emu_warps[w].bar.n = 32;
    for (int bz = 0; bz < gz; ++bz) for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {{
        std::vector<std::thread> ts;
        for (int t = 0; t < {threads}; ++t)
            ts.emplace_back([=] {{
                blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz; threadIdx.x = t; threadIdx.y = threadIdx.z = 0;
                blockDim = dim3({threads}, 1, 1); gridDim = dim3(gx, gy, gz);
                {rk.name}({args});
            }});
        for (auto& t : ts) t.join();
    }}
}}
"""


_CT = {"ptr": ctypes.c_void_p, "int32": ctypes.c_int, "int64": ctypes.c_longlong, "float32": ctypes.c_float}


def load(rk):
    """A callable ``fn(grid, args)`` running ``rk`` on the CPU model (tensors: CPU, contiguous)."""
    src = _source(rk)
    d = Path(tempfile.gettempdir()) / "pigeon_mma_emulate"
    d.mkdir(exist_ok=True)
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    so = d / f"{rk.name}_{key}.so"
    if not so.exists():
        cpp = d / f"{rk.name}_{key}.cpp"
        cpp.write_text(src)
        inc = Path(emulate.__file__).resolve().parent.parent / "templates"
        subprocess.run([emulate.cxx_path(), "-x", "c++", "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread",
                        "-Wno-unknown-pragmas", "-I", str(inc), "-include", "cuda_emulate.h", str(cpp), "-o",
                        str(so)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    f = lib.emu_launch
    f.argtypes = [ctypes.c_int] * 3 + [_CT[p.ctype] for p in rk.params]
    f.restype = None

    def run(grid, args):
        conv = [a.data_ptr() if hasattr(a, "data_ptr") else a for a in args]
        f(*grid, *conv)
    return run
