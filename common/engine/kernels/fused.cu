// A llama layer's small row-wise steps, fused so that a step launches fewer kernels and reads
// each activation once: the residual add with the RMSNorm after it, and RoPE with the KV cache
// write. Both are row-independent (one block per token), so a token's result does not depend on
// what else is in the batch.

#include <stdint.h>

#include "dtype.cuh"

#define WARP 32

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / WARP) ? scratch[lane] : 0.f;
#pragma unroll
        for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

// out[1] = x + y (rounded to T), out[0] = out[1] * rsqrt(mean(out[1]^2) + eps) * w (rounded
// once). out: [2, rows, cols] (the normed rows first, so that they start where the allocation
// does, as the GEMM that reads them wants). grid: (rows); block: a multiple of 32 threads.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,
                             const T* __restrict__ w, int cols, size_t rows, float eps) {
    __shared__ float scratch[WARP];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* yr = y + row * cols;
    T* hr = out + row * cols;
    T* sr = out + (rows + row) * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const T s = from_f<T>(__fadd_rn(to_f(xr[c]), to_f(yr[c])));
        sr[c] = s;
        const float f = to_f(s);
        ss += f * f;
    }
    const float scale = rsqrtf(block_sum(ss, scratch) / cols + eps);
    // Each thread reads back only the sums it wrote.
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        hr[c] = from_f<T>(__fmul_rn(__fmul_rn(to_f(sr[c]), scale), to_f(w[c])));
}

// One token's query and key heads rotated, its values copied: qkv is [tokens, (H + 2 KVH) * D]
// (the stacked projection: H query heads, KVH key heads, KVH value heads), cos and sin
// [tokens, D / 2]. Writes q_out [tokens, H, D] and the token's key and value rows of the cache
// (rows of KVH * D) at slots[token]. interleaved: the pairs are (2i, 2i + 1), else (i, i + D / 2).
// The products and sums are rounded one at a time (no fused multiply-add), as the CPU computes
// them. grid: (tokens); block: any.
template <typename T>
__device__ void rope_write_kv(T* __restrict__ q_out, T* __restrict__ k_cache,
                              T* __restrict__ v_cache, const T* __restrict__ qkv,
                              const T* __restrict__ cos, const T* __restrict__ sin,
                              const uint32_t* __restrict__ slots, int H, int KVH, int D,
                              int interleaved) {
    const size_t t = blockIdx.x;
    const int half = D / 2;
    const T* row = qkv + t * (size_t)(H + 2 * KVH) * D;
    const T* cs = cos + t * half;
    const T* sn = sin + t * half;
    const size_t slot = slots[t];
    T* kd = k_cache + slot * (size_t)KVH * D;
    T* vd = v_cache + slot * (size_t)KVH * D;
    const int pairs = (H + KVH) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        const int i1 = interleaved ? 2 * i : i;
        const int i2 = interleaved ? 2 * i + 1 : i + half;
        const T* src = row + (size_t)head * D;
        const float x1 = to_f(src[i1]), x2 = to_f(src[i2]);
        const float c = to_f(cs[i]), s = to_f(sn[i]);
        T* dst = head < H ? q_out + (t * H + head) * (size_t)D : kd + (size_t)(head - H) * D;
        dst[i1] = from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        dst[i2] = from_f<T>(__fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c)));
    }
    const T* v = row + (size_t)(H + KVH) * D;
    for (int e = threadIdx.x; e < KVH * D; e += blockDim.x) vd[e] = v[e];
}

#define DEFINE(TAG, T)                                                                         \
    extern "C" __global__ void add_rms_norm_##TAG(T* out, const T* x, const T* y, const T* w, \
                                                  int cols, size_t rows, float eps) {         \
        add_rms_norm<T>(out, x, y, w, cols, rows, eps);                                        \
    }                                                                                          \
    extern "C" __global__ void rope_write_kv_##TAG(                                            \
        T* q_out, T* k_cache, T* v_cache, const T* qkv, const T* cos, const T* sin,            \
        const uint32_t* slots, int H, int KVH, int D, int interleaved) {                       \
        rope_write_kv<T>(q_out, k_cache, v_cache, qkv, cos, sin, slots, H, KVH, D,             \
                         interleaved);                                                         \
    }

DEFINE(bf16, __nv_bfloat16)
DEFINE(f16, __half)
DEFINE(f32, float)
