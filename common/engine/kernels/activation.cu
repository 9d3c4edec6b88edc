// The gated MLP activation: out = silu(gate) * up, where gate and up are the two halves of each
// row of one [rows, 2 * width] tensor (the stacked gate/up projection's output). One pass reads
// each input once and writes the output; the values are those of silu then multiply computed
// one after the other in the tensor's type (silu rounded to it before the product).

#include <stdint.h>

#include "dtype.cuh"

template <typename T> __device__ __forceinline__ T silu_mul(T g, T u) {
    const float x = to_f(g);
    const T s = from_f<T>(x / (1.0f + expf(-x)));
    return from_f<T>(to_f(s) * to_f(u));
}

// grid-stride over vectors of 16 bytes (width a multiple of the vector length).
template <typename T>
__device__ void silu_and_mul_vec(T* __restrict__ out, const T* __restrict__ in, int width,
                                 size_t rows) {
    constexpr int PER = 16 / sizeof(T);
    const int vecs = width / PER;
    const size_t total = rows * vecs;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / vecs;
        const int c = (int)(i % vecs) * PER;
        const uint4 gw = *reinterpret_cast<const uint4*>(in + row * 2 * width + c);
        const uint4 uw = *reinterpret_cast<const uint4*>(in + row * 2 * width + width + c);
        const T* g = reinterpret_cast<const T*>(&gw);
        const T* u = reinterpret_cast<const T*>(&uw);
        uint4 ow;
        T* o = reinterpret_cast<T*>(&ow);
#pragma unroll
        for (int e = 0; e < PER; e++) o[e] = silu_mul(g[e], u[e]);
        *reinterpret_cast<uint4*>(out + row * width + c) = ow;
    }
}

// Any width, element by element.
template <typename T>
__device__ void silu_and_mul_any(T* __restrict__ out, const T* __restrict__ in, int width,
                                 size_t rows) {
    const size_t total = rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / width;
        const int c = (int)(i % width);
        out[i] = silu_mul(in[row * 2 * width + c], in[row * 2 * width + width + c]);
    }
}

#define DEFINE(TAG, T)                                                                         \
    extern "C" __global__ void silu_and_mul_vec_##TAG(T* out, const T* in, int width,         \
                                                      size_t rows) {                          \
        silu_and_mul_vec<T>(out, in, width, rows);                                             \
    }                                                                                          \
    extern "C" __global__ void silu_and_mul_any_##TAG(T* out, const T* in, int width,         \
                                                      size_t rows) {                          \
        silu_and_mul_any<T>(out, in, width, rows);                                             \
    }

DEFINE(bf16, __nv_bfloat16)
DEFINE(f16, __half)
DEFINE(f32, float)
