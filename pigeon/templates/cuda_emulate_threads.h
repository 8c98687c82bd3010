// cuda_emulate_threads.h: barriers and shared memory on top of cuda_emulate.h, for kernels that
// call __syncthreads() (pigeon/runtime/emulate.py puts this include before such sources).  Every
// CUDA thread of a block is an OS thread; __syncthreads() is a real barrier; the blocks run one
// after another and a barrier after each keeps the next block off the __shared__ arrays, which are
// static (one copy, owned by the block in flight).  No warp shuffles.
#pragma once
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include <cstdint>
#include <type_traits>

// static, for one copy per block; TVM writes `__shared__ alignas(64) float a[n]`, and a standard
// attribute may not follow `static`, so alignas becomes the GNU attribute (the headers that use
// alignas are included above, before the macro)
#define __shared__ static
#define alignas(n) __attribute__((aligned(n)))


struct pg_barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned n = 0, count = 0, gen = 0;
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        const unsigned g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); }
        else cv.wait(lock, [&] { return gen != g; });
    }
};
static pg_barrier* pg_block_barrier = nullptr;
static inline void __syncthreads() { pg_block_barrier->wait(); }

template <class F>
static void pg_emulate_launch_threads(dim3 grid, dim3 block, F f) {
    const unsigned nt = block.x * block.y * block.z;
    pg_barrier bar;
    bar.n = nt;
    pg_block_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; ++t) {
        threads.emplace_back([&, t]() {
            gridDim = grid;
            blockDim = block;
            threadIdx.x = t % block.x; threadIdx.y = (t / block.x) % block.y; threadIdx.z = t / (block.x * block.y);
            for (unsigned int bz = 0; bz < grid.z; ++bz)
            for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
                f();
                bar.wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    pg_block_barrier = nullptr;
}
