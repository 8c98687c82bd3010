// cuda_emulate.h: the CUDA subset pigeon's traversal kernels use, for compiling their exact
// source as C++ on a CPU (pigeon/runtime/emulate.py). A generated host loop runs every
// block and thread of a launch one after another, so there are no barriers, shuffles or shared
// memory here (kernels that need them cannot be emulated), and atomics are plain read-modify-writes.
// cuda_bf16.h / cuda_fp16.h next to this file include it, so kernel sources compile unchanged.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};

// the vector types TVM's generated kernels load and store through (alignment as CUDA's)
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// integer intrinsics CUDA provides on the device (min/max overloads, population count)
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }

static inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
static inline double atomicAdd(double* p, double v) { double old = *p; *p = old + v; return old; }
static inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }
static inline int atomicMax(int* p, int v) { int old = *p; if (v > old) *p = v; return old; }
static inline unsigned int atomicMin(unsigned int* p, unsigned int v) { unsigned int old = *p; if (v < old) *p = v; return old; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

// bfloat16: bits of the upper half of a float; float -> bf16 rounds to nearest even (as CUDA)
struct __nv_bfloat16 { unsigned short __x; };
static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.__x << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) { h.__x = (unsigned short)((u >> 16) | 0x40u); return h; }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.__x = (unsigned short)(u >> 16);
    return h;
}

// float16 through the compiler's _Float16 (IEEE binary16, round to nearest even)
struct __half { unsigned short __x; };
static inline float __half2float(__half h) { _Float16 v; memcpy(&v, &h.__x, 2); return (float)v; }
static inline __half __float2half(float f) { _Float16 v = (_Float16)f; __half h; memcpy(&h.__x, &v, 2); return h; }
static inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }

// Runs f() once per thread of the launch, blocks and threads in order.
template <class F>
static void pg_emulate_launch(dim3 grid, dim3 block, F f) {
    gridDim = grid;
    blockDim = block;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
        blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
        for (unsigned int tz = 0; tz < block.z; ++tz)
        for (unsigned int ty = 0; ty < block.y; ++ty)
        for (unsigned int tx = 0; tx < block.x; ++tx) {
            threadIdx.x = tx; threadIdx.y = ty; threadIdx.z = tz;
            f();
        }
    }
}
