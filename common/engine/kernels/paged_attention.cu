// Attention over the paged KV cache, for a packed batch of sequences.
//
// Cache layout, per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].
// A sequence's token at position p lives in block block_table[p / block_size], row p % block_size.
//
// Kernels:
// - paged_attention_*: one query token per (CTA, head), any head_dim, any dtype. Used for decode
//   tokens, and for every token when the prefill kernel does not apply. Long contexts are split
//   into partitions that run in parallel and are merged by paged_attention_reduce_*.
// - paged_attention_group_*: the same work with one CTA per KV head, serving its whole group of
//   query heads (16-bit caches).
// - prefill_attention_*: a tile of query tokens of one sequence per CTA, bf16 tensor cores
//   (WMMA), causal, reading K/V through the block table (varlen: each tile belongs to one
//   sequence, whose earlier chunks may already be cached).
// - paged_attention_mma_* and prefill_attention_mma_*: the grouped and the prefill work on
//   mma.sync with every accumulator in registers, K and V through cp.async: the default kernel
//   set (`pd_engine::cuda::KernelSet::Mma`); PD_CUDA_KERNELS=wmma runs the kernels above.
// All use the online softmax, accumulate in f32 and round the probabilities to the cache's type
// before they meet V, as the CPU kernel does.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "dtype.cuh"

#define WARP 32
#define MAX_HEAD_DIM 256

// Rounds to the cache element's precision (identity for f32).
template <typename C> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<C>(x)); }

__device__ __forceinline__ float warp_max(float x) {
    for (int o = WARP / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

// q . k for one key row: 16-byte loads when the row is a whole number of them (every supported
// head size with a 16-bit cache), element by element otherwise.
template <typename C>
__device__ __forceinline__ float row_dot(const float* q_s, const C* k_row, int head_dim) {
    constexpr int PER = 16 / sizeof(C);
    float dot = 0.f;
    if ((head_dim * sizeof(C)) % 16 == 0) {
        const uint4* k4 = reinterpret_cast<const uint4*>(k_row);
        for (int c = 0; c < head_dim / PER; c++) {
            const uint4 w = k4[c];
            const C* e = reinterpret_cast<const C*>(&w);
#pragma unroll
            for (int u = 0; u < PER; u++) dot += q_s[c * PER + u] * to_f(e[u]);
        }
    } else {
        for (int d = 0; d < head_dim; d++) dot += q_s[d] * to_f(k_row[d]);
    }
    return dot;
}

// ---------------------------------------------------------------------------------------------
// Per-token kernel.
//
// grid: (num_heads, num_work_tokens, num_partitions); block: NUM_WARPS * 32 threads.
// work_tokens[i] is the packed index of the i-th token to compute; token_seq[t] its sequence;
// token_keys[t] how many keys it attends to (its position + 1).
// Partition z covers keys [z * partition, (z + 1) * partition). A token whose keys fit one
// partition writes out directly; otherwise (max, sum, unnormalised out) go to the scratch buffers.
// Warps take 32-key tiles in turn; lane j scores key j of its warp's tile.
// ---------------------------------------------------------------------------------------------
template <typename A, typename C, int NUM_WARPS>
__device__ void paged_attention_token(
    A* __restrict__ out, const A* __restrict__ q, const C* __restrict__ k_cache,
    const C* __restrict__ v_cache, const int* __restrict__ work_tokens,
    const int* __restrict__ token_seq, const int* __restrict__ token_keys,
    const int* __restrict__ block_tables, int max_blocks, int num_heads, int num_kv_heads,
    int head_dim, int block_size, float scale, int partition, float* __restrict__ part_max,
    float* __restrict__ part_sum, float* __restrict__ part_out) {
    const int head = blockIdx.x;
    const int work = blockIdx.y;
    const int part = blockIdx.z;
    const int num_parts = gridDim.z;
    const int token = work_tokens[work];
    const int seq = token_seq[token];
    const int n_keys = token_keys[token];
    // Each token is split by its own length, so its result does not depend on the batch.
    const int own_parts = (n_keys + partition - 1) / partition;
    if (part >= own_parts) return;
    const int key_begin = part * partition;
    const int key_end = min(n_keys, key_begin + partition);
    const int kv_head = head / (num_heads / num_kv_heads);
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int kv_row = num_kv_heads * head_dim;
    const int* table = block_tables + (size_t)seq * max_blocks;

    __shared__ float q_s[MAX_HEAD_DIM];
    __shared__ float w_max[NUM_WARPS], w_sum[NUM_WARPS];
    __shared__ float w_out[NUM_WARPS][MAX_HEAD_DIM];

    const A* q_row = q + ((size_t)token * num_heads + head) * head_dim;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) q_s[i] = round_to<C>(to_f(q_row[i]));
    __syncthreads();

    // Dims owned by this lane when accumulating the output: a contiguous run of head_dim / 32
    // when that divides (one vector load per key), else every 32nd.
    const bool contiguous = head_dim % WARP == 0;
    const int dims_per_lane = (head_dim + WARP - 1) / WARP;
    constexpr int MAX_DPL = MAX_HEAD_DIM / WARP;
    float acc[MAX_DPL];
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    __shared__ float p_sh[NUM_WARPS][WARP];
    __shared__ size_t at_sh[NUM_WARPS][WARP];

    for (int tile = key_begin + warp * WARP; tile < key_end; tile += NUM_WARPS * WARP) {
        const int j = tile + lane;
        float s = -INFINITY;
        size_t row_at = 0;
        if (j < key_end) {
            const int block = table[j / block_size];
            row_at = ((size_t)block * block_size + j % block_size) * kv_row + (size_t)kv_head * head_dim;
            s = row_dot<C>(q_s, k_cache + row_at, head_dim) * scale;
        }
        const float m_new = fmaxf(m, warp_max(s));
        const float alpha = __expf(m - m_new);
        const float p = (j < key_end) ? __expf(s - m_new) : 0.f;
        l = l * alpha + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int i = 0; i < MAX_DPL; i++) acc[i] *= alpha;
        p_sh[warp][lane] = round_to<C>(p);
        at_sh[warp][lane] = row_at;
        __syncwarp();
        const int valid = min(WARP, key_end - tile);
        if (contiguous && sizeof(C) == 2 && dims_per_lane == 4) {
            for (int jj = 0; jj < valid; jj++) {
                const float pj = p_sh[warp][jj];
                const uint2 w = *reinterpret_cast<const uint2*>(v_cache + at_sh[warp][jj] + lane * 4);
                const C* e = reinterpret_cast<const C*>(&w);
#pragma unroll
                for (int i = 0; i < 4; i++) acc[i] += pj * to_f(e[i]);
            }
        } else if (contiguous && sizeof(C) == 2 && dims_per_lane == 2) {
            for (int jj = 0; jj < valid; jj++) {
                const float pj = p_sh[warp][jj];
                const uint32_t w = *reinterpret_cast<const uint32_t*>(v_cache + at_sh[warp][jj] + lane * 2);
                const C* e = reinterpret_cast<const C*>(&w);
#pragma unroll
                for (int i = 0; i < 2; i++) acc[i] += pj * to_f(e[i]);
            }
        } else {
            for (int jj = 0; jj < valid; jj++) {
                const float pj = p_sh[warp][jj];
                const C* v_row = v_cache + at_sh[warp][jj];
#pragma unroll
                for (int i = 0; i < MAX_DPL; i++) {
                    const int d = contiguous ? lane * dims_per_lane + i : lane + i * WARP;
                    if (i < dims_per_lane && d < head_dim) acc[i] += pj * to_f(v_row[d]);
                }
            }
        }
        __syncwarp();
    }

    // Merge the warps.
    if (lane == 0) { w_max[warp] = m; w_sum[warp] = l; }
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++) {
        const int d = contiguous ? lane * dims_per_lane + i : lane + i * WARP;
        if (i < dims_per_lane && d < head_dim) w_out[warp][d] = acc[i];
    }
    __syncthreads();
    float gm = -INFINITY;
    for (int w = 0; w < NUM_WARPS; w++) gm = fmaxf(gm, w_max[w]);
    float gl = 0.f;
    for (int w = 0; w < NUM_WARPS; w++) if (w_max[w] > -INFINITY) gl += w_sum[w] * __expf(w_max[w] - gm);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < NUM_WARPS; w++) if (w_max[w] > -INFINITY) o += w_out[w][d] * __expf(w_max[w] - gm);
        if (own_parts == 1) {
            out[((size_t)token * num_heads + head) * head_dim + d] = from_f<A>(o / gl);
        } else {
            const size_t at = ((size_t)work * num_heads + head) * num_parts + part;
            part_out[at * head_dim + d] = o;
        }
    }
    if (own_parts > 1 && threadIdx.x == 0) {
        const size_t at = ((size_t)work * num_heads + head) * num_parts + part;
        part_max[at] = gm;
        part_sum[at] = gl;
    }
}

// Merges the partitions of each (token, head). grid: (num_heads, num_work_tokens).
template <typename A>
__device__ void paged_attention_reduce(
    A* __restrict__ out, const int* __restrict__ work_tokens, const int* __restrict__ token_keys,
    int num_heads, int head_dim, int partition, int num_parts, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const float* __restrict__ part_out) {
    const int head = blockIdx.x;
    const int work = blockIdx.y;
    const int token = work_tokens[work];
    const int used = (token_keys[token] + partition - 1) / partition;
    if (used == 1) return;  // written directly by the first pass
    const size_t base = ((size_t)work * num_heads + head) * num_parts;
    float gm = -INFINITY;
    for (int p = 0; p < used; p++) gm = fmaxf(gm, part_max[base + p]);
    float gl = 0.f;
    for (int p = 0; p < used; p++) gl += part_sum[base + p] * __expf(part_max[base + p] - gm);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int p = 0; p < used; p++) o += part_out[(base + p) * head_dim + d] * __expf(part_max[base + p] - gm);
        out[((size_t)token * num_heads + head) * head_dim + d] = from_f<A>(o / gl);
    }
}

#define PA_WARPS 4

#define DEFINE_TOKEN_KERNEL(NAME, A, C)                                                          \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * WARP) NAME(                           \
        A* out, const A* q, const C* k_cache, const C* v_cache, const int* work_tokens,           \
        const int* token_seq, const int* token_keys, const int* block_tables, int max_blocks,     \
        int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,               \
        int partition, float* part_max, float* part_sum, float* part_out) {                       \
        paged_attention_token<A, C, PA_WARPS>(out, q, k_cache, v_cache, work_tokens, token_seq,   \
                                              token_keys, block_tables, max_blocks, num_heads,    \
                                              num_kv_heads, head_dim, block_size, scale,          \
                                              partition, part_max, part_sum, part_out);           \
    }

DEFINE_TOKEN_KERNEL(paged_attention_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
DEFINE_TOKEN_KERNEL(paged_attention_bf16_f16, __nv_bfloat16, __half)
DEFINE_TOKEN_KERNEL(paged_attention_bf16_f32, __nv_bfloat16, float)
DEFINE_TOKEN_KERNEL(paged_attention_f32_bf16, float, __nv_bfloat16)
DEFINE_TOKEN_KERNEL(paged_attention_f32_f16, float, __half)
DEFINE_TOKEN_KERNEL(paged_attention_f32_f32, float, float)

#define DEFINE_REDUCE_KERNEL(NAME, A)                                                            \
    extern "C" __global__ void NAME(A* out, const int* work_tokens, const int* token_keys,       \
                                    int num_heads, int head_dim, int partition, int num_parts,  \
                                    const float* part_max, const float* part_sum,               \
                                    const float* part_out) {                                    \
        paged_attention_reduce<A>(out, work_tokens, token_keys, num_heads, head_dim, partition, \
                                  num_parts, part_max, part_sum, part_out);                     \
    }

DEFINE_REDUCE_KERNEL(paged_attention_reduce_bf16, __nv_bfloat16)
DEFINE_REDUCE_KERNEL(paged_attention_reduce_f32, float)

// ---------------------------------------------------------------------------------------------
// Grouped per-token kernel: a 16-bit cache, head_dim D in {64, 128, 256}, G query heads per KV
// head in {1, 2, 4, 8}.
//
// grid: (num_kv_heads, num_work_tokens, num_partitions); block: NUM_WARPS * 32 threads.
// One CTA computes all G query heads of a token that share one KV head, so each K and V row is
// read from memory once per group instead of once per query head. A row is LPK = D / 8 lanes'
// 16-byte chunks, so a warp reads KPW = 32 / LPK rows per coalesced load; each lane issues its U
// loads of K and of V for a tile before it uses any of them, keeping many bytes in flight. Every
// lane keeps the scores, probabilities and output of its own chunk of its own keys; the warp
// shares one running maximum per head, so the partial outputs of its keys simply add at the end.
// Partitions, scratch layout and rounding are those of the per-token kernel above (the same
// reduce kernel merges them), and a token's result depends on its own length only.
// ---------------------------------------------------------------------------------------------
template <typename A, typename C, int D, int G, int NUM_WARPS>
__device__ void paged_attention_group(
    A* __restrict__ out, const A* __restrict__ q, const C* __restrict__ k_cache,
    const C* __restrict__ v_cache, const int* __restrict__ work_tokens,
    const int* __restrict__ token_seq, const int* __restrict__ token_keys,
    const int* __restrict__ block_tables, int max_blocks, int num_heads, int num_kv_heads,
    int block_size, float scale, int partition, float* __restrict__ part_max,
    float* __restrict__ part_sum, float* __restrict__ part_out) {
    static_assert(sizeof(C) == 2, "16-bit caches only");
    constexpr int PER = 8;           // elements per 16-byte chunk
    constexpr int LPK = D / PER;     // lanes per key row
    constexpr int KPW = WARP / LPK;  // key rows per warp-wide load
    constexpr int U = G <= 4 ? 8 : 4;
    constexpr int TILE = KPW * U;    // keys per warp per iteration
    static_assert(LPK <= WARP && WARP % LPK == 0, "head_dim must be 64, 128 or 256");

    const int kv_head = blockIdx.x;
    const int work = blockIdx.y;
    const int part = blockIdx.z;
    const int num_parts = gridDim.z;
    const int token = work_tokens[work];
    const int seq = token_seq[token];
    const int n_keys = token_keys[token];
    const int own_parts = (n_keys + partition - 1) / partition;
    if (part >= own_parts) return;
    const int key_begin = part * partition;
    const int key_end = min(n_keys, key_begin + partition);
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int chunk = lane % LPK;  // which 16 bytes of a row
    const int sub = lane / LPK;    // which of the warp's KPW rows
    const size_t kv_row = (size_t)num_kv_heads * D;
    const int* table = block_tables + (size_t)seq * max_blocks;
    const int head0 = kv_head * G;
    // Block sizes are powers of two in practice; spare the divisions then.
    const int shift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;

    float qr[G][PER];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const A* q_row = q + ((size_t)token * num_heads + head0 + g) * D + chunk * PER;
#pragma unroll
        for (int e = 0; e < PER; e++) qr[g][e] = round_to<C>(to_f(q_row[e]));
    }
    float m[G], l[G], acc[G][PER];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < PER; e++) acc[g][e] = 0.f;
    }

    for (int tile = key_begin + warp * TILE; tile < key_end; tile += NUM_WARPS * TILE) {
        uint4 kw[U], vw[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = tile + u * KPW + sub;
            kw[u] = make_uint4(0, 0, 0, 0);
            vw[u] = make_uint4(0, 0, 0, 0);
            if (j < key_end) {
                const int blk = shift >= 0 ? j >> shift : j / block_size;
                const int row = shift >= 0 ? j & (block_size - 1) : j % block_size;
                const size_t at = ((size_t)table[blk] * block_size + row) * kv_row +
                                  (size_t)kv_head * D + chunk * PER;
                kw[u] = *reinterpret_cast<const uint4*>(k_cache + at);
                vw[u] = *reinterpret_cast<const uint4*>(v_cache + at);
            }
        }
        // Scores: this lane's part of each dot product, summed over the row's LPK lanes.
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const C* e = reinterpret_cast<const C*>(&kw[u]);
            float kf[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) kf[i] = to_f(e[i]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < PER; i++) dot += qr[g][i] * kf[i];
                s[u][g] = dot;
            }
        }
#pragma unroll
        for (int o = 1; o < LPK; o *= 2) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int g = 0; g < G; g++) s[u][g] += __shfl_xor_sync(0xffffffff, s[u][g], o);
            }
        }
        // Online softmax per head over the warp's tile (rows differ across `sub` only).
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = -INFINITY;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const bool valid = tile + u * KPW + sub < key_end;
                s[u][g] = valid ? s[u][g] * scale : -INFINITY;
                mx = fmaxf(mx, s[u][g]);
            }
#pragma unroll
            for (int o = LPK; o < WARP; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            const float m_new = fmaxf(m[g], mx);
            const float alpha = __expf(m[g] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const float p = __expf(s[u][g] - m_new);
                sum += p;
                s[u][g] = round_to<C>(p);
            }
#pragma unroll
            for (int o = LPK; o < WARP; o *= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
            l[g] = l[g] * alpha + sum;
            m[g] = m_new;
#pragma unroll
            for (int i = 0; i < PER; i++) acc[g][i] *= alpha;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const C* e = reinterpret_cast<const C*>(&vw[u]);
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const float vf = to_f(e[i]);
#pragma unroll
                for (int g = 0; g < G; g++) acc[g][i] += s[u][g] * vf;
            }
        }
    }

    // The warp's rows share its maxima: add the partial outputs of its KPW row groups.
#pragma unroll
    for (int o = LPK; o < WARP; o *= 2) {
#pragma unroll
        for (int g = 0; g < G; g++) {
#pragma unroll
            for (int i = 0; i < PER; i++) acc[g][i] += __shfl_xor_sync(0xffffffff, acc[g][i], o);
        }
    }
    __shared__ float w_max[NUM_WARPS][G], w_sum[NUM_WARPS][G];
    __shared__ float w_out[NUM_WARPS][G][D];
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            w_max[warp][g] = m[g];
            w_sum[warp][g] = l[g];
        }
    }
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
#pragma unroll
            for (int i = 0; i < PER; i++) w_out[warp][g][chunk * PER + i] = acc[g][i];
        }
    }
    __syncthreads();
    // Merge the warps, as the per-token kernel does.
    for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
        const int g = x / D, d = x % D;
        float gm = -INFINITY;
        for (int w = 0; w < NUM_WARPS; w++) gm = fmaxf(gm, w_max[w][g]);
        float gl = 0.f, o = 0.f;
        for (int w = 0; w < NUM_WARPS; w++) {
            if (w_max[w][g] > -INFINITY) {
                const float f = __expf(w_max[w][g] - gm);
                gl += w_sum[w][g] * f;
                o += w_out[w][g][d] * f;
            }
        }
        const int head = head0 + g;
        if (own_parts == 1) {
            out[((size_t)token * num_heads + head) * D + d] = from_f<A>(o / gl);
        } else {
            const size_t at = ((size_t)work * num_heads + head) * num_parts + part;
            part_out[at * D + d] = o;
            if (d == 0) {
                part_max[at] = gm;
                part_sum[at] = gl;
            }
        }
    }
}

#define DEFINE_GROUP_KERNEL(A_TAG, A, C_TAG, C, D, G)                                           \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * WARP)                                \
        paged_attention_group_##A_TAG##_##C_TAG##_d##D##_g##G(                                   \
            A* out, const A* q, const C* k_cache, const C* v_cache, const int* work_tokens,      \
            const int* token_seq, const int* token_keys, const int* block_tables,                \
            int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale,        \
            int partition, float* part_max, float* part_sum, float* part_out) {                  \
        paged_attention_group<A, C, D, G, PA_WARPS>(                                             \
            out, q, k_cache, v_cache, work_tokens, token_seq, token_keys, block_tables,          \
            max_blocks, num_heads, num_kv_heads, block_size, scale, partition, part_max,         \
            part_sum, part_out);                                                                 \
    }
#define DEFINE_GROUP_KERNELS_G(A_TAG, A, C_TAG, C, D) \
    DEFINE_GROUP_KERNEL(A_TAG, A, C_TAG, C, D, 1)     \
    DEFINE_GROUP_KERNEL(A_TAG, A, C_TAG, C, D, 2)     \
    DEFINE_GROUP_KERNEL(A_TAG, A, C_TAG, C, D, 4)     \
    DEFINE_GROUP_KERNEL(A_TAG, A, C_TAG, C, D, 8)
#define DEFINE_GROUP_KERNELS(A_TAG, A, C_TAG, C)     \
    DEFINE_GROUP_KERNELS_G(A_TAG, A, C_TAG, C, 64)  \
    DEFINE_GROUP_KERNELS_G(A_TAG, A, C_TAG, C, 128) \
    DEFINE_GROUP_KERNELS_G(A_TAG, A, C_TAG, C, 256)

DEFINE_GROUP_KERNELS(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
DEFINE_GROUP_KERNELS(bf16, __nv_bfloat16, f16, __half)
DEFINE_GROUP_KERNELS(f32, float, bf16, __nv_bfloat16)
DEFINE_GROUP_KERNELS(f32, float, f16, __half)

// ---------------------------------------------------------------------------------------------
// Prefill kernel: bf16 query and cache, head_dim D in {64, 128}, on tensor cores.
//
// grid: (num_tiles, num_heads); block: 64 threads (2 warps, 16 query rows each).
// tile_seq[t], tile_row[t]: the sequence of tile t and the index of its first query token within
// that sequence's new tokens. seq_q_start/seq_q_len/seq_ctx describe each sequence.
// ---------------------------------------------------------------------------------------------
#define PF_BQ 32
#define PF_BK 32
#define PF_WARPS 2

template <int D>
__device__ void prefill_attention(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* __restrict__ tile_seq, const int* __restrict__ tile_row,
    const int* __restrict__ seq_q_start, const int* __restrict__ seq_q_len,
    const int* __restrict__ seq_ctx, const int* __restrict__ block_tables, int max_blocks,
    int num_heads, int num_kv_heads, int block_size, float scale) {
    using namespace nvcuda;
    const int tile = blockIdx.x;
    const int head = blockIdx.y;
    const int seq = tile_seq[tile];
    const int row0 = tile_row[tile];
    const int q_start = seq_q_start[seq];
    const int q_len = seq_q_len[seq];
    const int ctx = seq_ctx[seq];
    const int cached = ctx - q_len;  // keys before the first new token
    const int rows = min(PF_BQ, q_len - row0);
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kv_row = num_kv_heads * D;
    const int* table = block_tables + (size_t)seq * max_blocks;
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;

    __shared__ __align__(32) __nv_bfloat16 q_s[PF_BQ * D];
    __shared__ __align__(32) __nv_bfloat16 k_s[PF_BK * D];
    __shared__ __align__(32) __nv_bfloat16 v_s[PF_BK * D];
    __shared__ __align__(32) float s_s[PF_BQ * PF_BK];
    __shared__ __align__(32) __nv_bfloat16 p_s[PF_BQ * PF_BK];
    __shared__ __align__(32) float o_s[PF_BQ * D];
    __shared__ float m_s[PF_BQ], l_s[PF_BQ], alpha_s[PF_BQ];

    // Load the query tile (16-byte vectors; D is a multiple of 8) and clear the accumulators.
    const int vec_per_row = D / 8;
    for (int i = threadIdx.x; i < PF_BQ * vec_per_row; i += blockDim.x) {
        const int r = i / vec_per_row, c = (i % vec_per_row) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const size_t tok = (size_t)q_start + row0 + r;
            val = *reinterpret_cast<const uint4*>(q + (tok * num_heads + head) * D + c);
        }
        *reinterpret_cast<uint4*>(q_s + r * D + c) = val;
    }
    for (int i = threadIdx.x; i < PF_BQ * D; i += blockDim.x) o_s[i] = 0.f;
    for (int i = threadIdx.x; i < PF_BQ; i += blockDim.x) { m_s[i] = -INFINITY; l_s[i] = 0.f; }

    // Keys this tile needs: up to the position of its last query row.
    const int last_pos = cached + row0 + rows - 1;
    const int n_tiles = last_pos / PF_BK + 1;
    const int wr = warp * 16;  // this warp's first row in the tile

    for (int kt = 0; kt < n_tiles; kt++) {
        const int key0 = kt * PF_BK;
        __syncthreads();
        for (int i = threadIdx.x; i < PF_BK * vec_per_row; i += blockDim.x) {
            const int r = i / vec_per_row, c = (i % vec_per_row) * 8;
            const int j = key0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j <= last_pos) {
                const int block = table[j / block_size];
                const size_t at = ((size_t)block * block_size + j % block_size) * kv_row +
                                  (size_t)kv_head * D + c;
                kv = *reinterpret_cast<const uint4*>(k_cache + at);
                vv = *reinterpret_cast<const uint4*>(v_cache + at);
            }
            *reinterpret_cast<uint4*>(k_s + r * D + c) = kv;
            *reinterpret_cast<uint4*>(v_s + r * D + c) = vv;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
        for (int n = 0; n < PF_BK / 16; n++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int k = 0; k < D / 16; k++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
                wmma::load_matrix_sync(a, q_s + wr * D + k * 16, D);
                wmma::load_matrix_sync(b, k_s + n * 16 * D + k * 16, D);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(s_s + wr * PF_BK + n * 16, acc, PF_BK, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax: two lanes per row, 16 keys each.
        {
            const int r = wr + lane / 2;
            const int half = lane % 2;
            const int pos = cached + row0 + min(r, rows - 1);  // padding rows copy the last row
            float mx = -INFINITY;
            for (int c = half * 16; c < half * 16 + 16; c++) {
                const int j = key0 + c;
                const float s = (j <= pos) ? s_s[r * PF_BK + c] * scale : -INFINITY;
                s_s[r * PF_BK + c] = s;
                mx = fmaxf(mx, s);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            const float m_old = m_s[r];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
            for (int c = half * 16; c < half * 16 + 16; c++) {
                const float s = s_s[r * PF_BK + c];
                const float p = (s == -INFINITY) ? 0.f : __expf(s - m_new);
                const __nv_bfloat16 pb = __float2bfloat16(p);
                p_s[r * PF_BK + c] = pb;
                sum += p;
            }
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            const float alpha = (m_old == -INFINITY) ? 0.f : __expf(m_old - m_new);
            if (half == 0) {
                l_s[r] = l_s[r] * alpha + sum;
                m_s[r] = m_new;
                alpha_s[r] = alpha;
            }
        }
        __syncwarp();

        // O = O * alpha + P V for this warp's rows.
        for (int i = lane; i < 16 * D; i += WARP) {
            const int r = wr + i / D;
            o_s[r * D + i % D] *= alpha_s[r];
        }
        __syncwarp();
        for (int n = 0; n < D / 16; n++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, o_s + wr * D + n * 16, D, wmma::mem_row_major);
            for (int k = 0; k < PF_BK / 16; k++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(a, p_s + wr * PF_BK + k * 16, PF_BK);
                wmma::load_matrix_sync(b, v_s + k * 16 * D + n * 16, D);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(o_s + wr * D + n * 16, acc, D, wmma::mem_row_major);
        }
        __syncwarp();
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        const size_t tok = (size_t)q_start + row0 + r;
        out[(tok * num_heads + head) * D + c] = __float2bfloat16(o_s[r * D + c] / l_s[r]);
    }
}

// One extern kernel per prefill template and head size (the WMMA kernel here, the mma one below).
#define DEFINE_PREFILL_KERNEL(FN, WARPS, D)                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * WARP) FN##_bf16_d##D(                   \
        __nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* k_cache,               \
        const __nv_bfloat16* v_cache, const int* tile_seq, const int* tile_row,                 \
        const int* seq_q_start, const int* seq_q_len, const int* seq_ctx,                       \
        const int* block_tables, int max_blocks, int num_heads, int num_kv_heads,               \
        int block_size, float scale) {                                                          \
        FN<D>(out, q, k_cache, v_cache, tile_seq, tile_row, seq_q_start, seq_q_len, seq_ctx,    \
              block_tables, max_blocks, num_heads, num_kv_heads, block_size, scale);            \
    }

DEFINE_PREFILL_KERNEL(prefill_attention, PF_WARPS, 64)
DEFINE_PREFILL_KERNEL(prefill_attention, PF_WARPS, 128)

// ---------------------------------------------------------------------------------------------
// Tensor-core prefill kernel: bf16 query and cache, head_dim D in {64, 128}, on mma.sync in the
// manner of FlashAttention-2: every accumulator lives in registers (the WMMA kernel above keeps
// them in shared memory).
//
// grid: (num_tiles, num_heads); block: 128 threads (4 warps, 16 query rows each).
// tile_seq[t], tile_row[t]: the sequence of tile t and the index of its first query token within
// that sequence's new tokens. seq_q_start/seq_q_len/seq_ctx describe each sequence.
//
// Each warp keeps its 16 query rows as mma.sync A fragments, S = Q K^T of a 64-key tile as
// m16n8k16 accumulators, and the output as accumulators; the probabilities go from the S
// accumulators straight into A fragments for P V (the two layouts line up), so nothing but K and
// V passes through shared memory. K and V tiles arrive by cp.async through the block table, V
// while S is computed and the next K while P V is, and are read with ldmatrix (transposed for V).
// Rows are padded by 8 elements so those reads hit distinct banks. Tiles run longest first.
// ---------------------------------------------------------------------------------------------
#define FA_BQ 64
#define FA_BK 64
#define FA_WARPS 4
#define FA_PAD 8

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int n = valid ? 16 : 0;  // 0: fill with zeros, read nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() {
    asm volatile("cp.async.wait_group 1;\n" ::);
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
// d += a b for one 16x8x16 bf16 product with f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

template <int D>
__device__ void prefill_attention_mma(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* __restrict__ tile_seq, const int* __restrict__ tile_row,
    const int* __restrict__ seq_q_start, const int* __restrict__ seq_q_len,
    const int* __restrict__ seq_ctx, const int* __restrict__ block_tables, int max_blocks,
    int num_heads, int num_kv_heads, int block_size, float scale) {
    constexpr int S = D + FA_PAD;  // shared row stride, elements
    constexpr int VPR = D / 8;     // 16-byte vectors per row
    constexpr int NK = FA_BK / 8;  // n-tiles of S
    constexpr int NO = D / 8;      // n-tiles of O
    static_assert(FA_BQ == FA_BK, "the query tile passes through k_s");
    __shared__ __align__(128) __nv_bfloat16 k_s[FA_BK * S];
    __shared__ __align__(128) __nv_bfloat16 v_s[FA_BK * S];

    const int tile = gridDim.x - 1 - blockIdx.x;  // later tiles have more keys: start them first
    const int head = blockIdx.y;
    const int seq = tile_seq[tile];
    const int row0 = tile_row[tile];
    const int q_start = seq_q_start[seq];
    const int q_len = seq_q_len[seq];
    const int ctx = seq_ctx[seq];
    const int cached = ctx - q_len;  // keys before the first new token
    const int rows = min(FA_BQ, q_len - row0);
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kv_row = num_kv_heads * D;
    const int* table = block_tables + (size_t)seq * max_blocks;
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    const int g = lane >> 2, t = lane & 3;  // mma fragment row group and column pair
    const int wr = warp * 16;               // this warp's first row in the tile

    // The query tile goes through k_s into A fragments.
    for (int i = threadIdx.x; i < FA_BQ * VPR; i += blockDim.x) {
        const int r = i / VPR, c = (i % VPR) * 8;
        const bool ok = r < rows;
        const __nv_bfloat16* src =
            ok ? q + ((size_t)(q_start + row0 + r) * num_heads + head) * D + c : q;
        cp_async16(k_s + r * S + c, src, ok);
    }
    cp_async_commit();
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldsm_x4(qf[kk], k_s + (wr + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + kk * 16 +
                            8 * (lane >> 4));
    __syncthreads();

    // Keys this tile needs: up to the position of its last query row; keys past it read as 0.
    const int last_pos = cached + row0 + rows - 1;
    const int n_tiles = last_pos / FA_BK + 1;
    auto load = [&](__nv_bfloat16* dst, const __nv_bfloat16* cache, int key0) {
        for (int i = threadIdx.x; i < FA_BK * VPR; i += blockDim.x) {
            const int r = i / VPR, c = (i % VPR) * 8;
            const int j = key0 + r;
            const bool ok = j <= last_pos;
            const __nv_bfloat16* src = cache;
            if (ok) {
                const int block = table[j / block_size];
                src = cache + ((size_t)block * block_size + j % block_size) * kv_row +
                      (size_t)kv_head * D + c;
            }
            cp_async16(dst + r * S + c, src, ok);
        }
    };

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY};  // running maxima of rows g and g + 8 (log2 units)
    float l_r[2] = {0.f, 0.f};              // this thread's share of their sums
    const float scale_log2 = scale * 1.4426950408889634f;
    const int pos_g = cached + row0 + wr + g;  // position of row g; row g + 8 is 8 further
    // The last key any real row of this warp sees (none when all its rows are padding).
    const int warp_last = wr < rows ? min(cached + row0 + wr + 15, last_pos) : -1;

    load(k_s, k_cache, 0);
    cp_async_commit();
    load(v_s, v_cache, 0);
    cp_async_commit();
    for (int kt = 0; kt < n_tiles; kt++) {
        const int key0 = kt * FA_BK;
        const bool active = key0 <= warp_last;  // some key of the tile is seen by the warp
        cp_async_wait_all_but_one();            // K of this tile
        __syncthreads();
        float s[NK][4];
        uint32_t pf[FA_BK / 16][4];
        if (active) {
#pragma unroll
            for (int n = 0; n < NK; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
                for (int n = 0; n < NK; n += 2) {
                    uint32_t b[4];
                    ldsm_x4(b, k_s + (n * 8 + (lane & 7) + 8 * (lane >> 4)) * S + kk * 16 +
                                   8 * ((lane >> 3) & 1));
                    mma_bf16(s[n], qf[kk], b[0], b[1]);
                    mma_bf16(s[n + 1], qf[kk], b[2], b[3]);
                }
            }
            // Online softmax; a row's four threads share its maximum through shuffles.
            const bool masked = key0 + FA_BK - 1 > cached + row0 + wr;
            float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
            for (int n = 0; n < NK; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = key0 + n * 8 + 2 * t + (e & 1);
                    float v = s[n][e] * scale_log2;
                    if (masked && j > pos_g + 8 * (e >> 1)) v = -INFINITY;
                    s[n][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
                alpha[r] = exp2f(m_r[r] - mx[r]);  // 0 on the first tile (m_r = -inf)
                m_r[r] = mx[r];
                l_r[r] *= alpha[r];
            }
#pragma unroll
            for (int n = 0; n < NK; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = exp2f(s[n][e] - mx[e >> 1]);
                    s[n][e] = p;
                    l_r[e >> 1] += p;
                }
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
            // Probabilities, rounded to bf16, as A fragments of P V.
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; kk++) {
                pf[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
                pf[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
                pf[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pf[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
        }
        __syncthreads();  // every warp is done with k_s: fetch the next K during P V
        if (kt + 1 < n_tiles) load(k_s, k_cache, key0 + FA_BK);
        cp_async_commit();
        cp_async_wait_all_but_one();  // V of this tile
        __syncthreads();
        if (active) {
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; kk++) {
#pragma unroll
                for (int n = 0; n < NO; n += 2) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, v_s + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * S +
                                         n * 8 + 8 * (lane >> 4));
                    mma_bf16(o[n], pf[kk], b[0], b[1]);
                    mma_bf16(o[n + 1], pf[kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with v_s
        if (kt + 1 < n_tiles) load(v_s, v_cache, key0 + FA_BK);
        cp_async_commit();
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = l_r[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        inv[r] = 1.f / l;
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = wr + g + 8 * r;
        if (row >= rows) continue;
        __nv_bfloat16* dst =
            out + ((size_t)(q_start + row0 + row) * num_heads + head) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; n++)
            *reinterpret_cast<__nv_bfloat162*>(dst + n * 8) =
                __floats2bfloat162_rn(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core per-token kernel: bf16 query and cache, head_dim D in {64, 128}, G <= 16 query
// heads per KV head. The grouped kernel's work (a token's G query heads against one KV head,
// over one partition of its keys), with the products on tensor cores.
//
// grid: (num_kv_heads, num_work_tokens, num_partitions); block: DEC_WARPS warps; dynamic shared
// memory as mma_kernel_smem (model/attention/cuda.rs) computes it for D, G and STAGES.
// The G heads are the rows of m16n8k16 products (zero rows up to 16), so each K and V row is read
// once per group. Each warp streams its own 16-key tiles of the partition (tiles warp,
// warp + DEC_WARPS, ...) through a ring of STAGES buffers filled by cp.async, so up to
// STAGES - 1 tiles are in flight while it computes on one; S = Q K^T and P V as in the prefill
// kernel above, with the online softmax in registers. The warps merge at the end as the grouped
// kernel's do; partitions, scratch layout and rounding are the same, so a token's result depends
// on its own length only.
// ---------------------------------------------------------------------------------------------
#define DEC_WARPS 4
#define DEC_KEYS 16

template <int D, int STAGES>
__device__ void paged_attention_mma(
    __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,
    const int* __restrict__ work_tokens, const int* __restrict__ token_seq,
    const int* __restrict__ token_keys, const int* __restrict__ block_tables, int max_blocks,
    int num_heads, int num_kv_heads, int block_size, float scale, int partition,
    float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ part_out) {
    constexpr int S = D + FA_PAD;  // shared row stride, elements
    constexpr int VPR = D / 8;     // 16-byte vectors per row
    constexpr int NO = D / 8;      // n-tiles of the output
    constexpr int TILE = DEC_KEYS * S;
    extern __shared__ __align__(128) unsigned char dec_smem[];

    const int G = num_heads / num_kv_heads;
    const int kv_head = blockIdx.x;
    const int work = blockIdx.y;
    const int part = blockIdx.z;
    const int num_parts = gridDim.z;
    const int token = work_tokens[work];
    const int seq = token_seq[token];
    const int n_keys = token_keys[token];
    const int own_parts = (n_keys + partition - 1) / partition;
    if (part >= own_parts) return;
    const int key_begin = part * partition;
    const int key_end = min(n_keys, key_begin + partition);
    const int warp = threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    const int g = lane >> 2, t = lane & 3;
    const size_t kv_row = (size_t)num_kv_heads * D;
    const int* table = block_tables + (size_t)seq * max_blocks;
    const int head0 = kv_head * G;
    const int shift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
    __nv_bfloat16* ring =
        reinterpret_cast<__nv_bfloat16*>(dec_smem) + (size_t)warp * STAGES * 2 * TILE;

    // The group's query rows as A fragments (rows past G are zero).
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int row = g + 8 * (r & 1);
            const int col = kk * 16 + 2 * t + 8 * (r >> 1);
            qf[kk][r] = row < G ? *reinterpret_cast<const uint32_t*>(
                                      q + ((size_t)token * num_heads + head0 + row) * D + col)
                                : 0u;
        }

    const int first = key_begin + warp * DEC_KEYS;
    const int n_own = first < key_end ? (key_end - first + DEC_WARPS * DEC_KEYS - 1) /
                                            (DEC_WARPS * DEC_KEYS)
                                      : 0;
    auto issue = [&](int i) {  // this warp's tile i into ring slot i % STAGES
        const int key0 = first + i * DEC_WARPS * DEC_KEYS;
        __nv_bfloat16* kd = ring + (i % STAGES) * 2 * TILE;
        __nv_bfloat16* vd = kd + TILE;
#pragma unroll
        for (int x = lane; x < DEC_KEYS * VPR; x += WARP) {
            const int r = x / VPR, c = (x % VPR) * 8;
            const int j = key0 + r;
            const bool ok = j < key_end;
            size_t at = 0;
            if (ok) {
                const int blk = shift >= 0 ? j >> shift : j / block_size;
                const int row = shift >= 0 ? j & (block_size - 1) : j % block_size;
                at = ((size_t)table[blk] * block_size + row) * kv_row + (size_t)kv_head * D + c;
            }
            cp_async16(kd + r * S + c, k_cache + at, ok);
            cp_async16(vd + r * S + c, v_cache + at, ok);
        }
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) {
        if (i < n_own) issue(i);
        cp_async_commit();
    }

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    for (int i = 0; i < n_own; i++) {
        // Tile i has landed once at most STAGES - 2 later groups are in flight.
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        __syncwarp();
        // The slot of tile i - 1 is free again: refill it before computing on tile i.
        if (i + STAGES - 1 < n_own) issue(i + STAGES - 1);
        cp_async_commit();
        const int key0 = first + i * DEC_WARPS * DEC_KEYS;
        const __nv_bfloat16* kd = ring + (i % STAGES) * 2 * TILE;
        const __nv_bfloat16* vd = kd + TILE;
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t b[4];
            ldsm_x4(b, kd + ((lane & 7) + 8 * (lane >> 4)) * S + kk * 16 + 8 * ((lane >> 3) & 1));
            mma_bf16(s[0], qf[kk], b[0], b[1]);
            mma_bf16(s[1], qf[kk], b[2], b[3]);
        }
        float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = key0 + n * 8 + 2 * t + (e & 1);
                const float v = j < key_end ? s[n][e] * scale : -INFINITY;
                s[n][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
            alpha[r] = __expf(m_r[r] - mx[r]);  // 0 on the first tile (m_r = -inf)
            m_r[r] = mx[r];
            l_r[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = __expf(s[n][e] - mx[e >> 1]);
                s[n][e] = p;
                l_r[e >> 1] += p;
            }
#pragma unroll
        for (int n = 0; n < NO; n++) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        // Probabilities rounded to bf16, as the A fragment of P V.
        const uint32_t pf[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]),
                                pack_bf16(s[1][0], s[1][1]), pack_bf16(s[1][2], s[1][3])};
#pragma unroll
        for (int n = 0; n < NO; n += 2) {
            uint32_t b[4];
            ldsm_x4_trans(b, vd + ((lane & 7) + 8 * ((lane >> 3) & 1)) * S + n * 8 + 8 * (lane >> 4));
            mma_bf16(o[n], pf, b[0], b[1]);
            mma_bf16(o[n + 1], pf, b[2], b[3]);
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l_r[r] += __shfl_xor_sync(0xffffffff, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(0xffffffff, l_r[r], 2);
    }

    // Merge the warps through the ring's memory: [warp][head][D] outputs, then maxima and sums.
    __syncthreads();
    float* w_out = reinterpret_cast<float*>(dec_smem);
    float* w_max = w_out + DEC_WARPS * G * D;
    float* w_sum = w_max + DEC_WARPS * G;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = g + 8 * r;
        if (row >= G) continue;
        float* dst = w_out + (warp * G + row) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; n++) {
            dst[n * 8] = o[n][2 * r];
            dst[n * 8 + 1] = o[n][2 * r + 1];
        }
        if (t == 0) {
            w_max[warp * G + row] = m_r[r];
            w_sum[warp * G + row] = l_r[r];
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
        const int h = x / D, d = x % D;
        float gm = -INFINITY;
        for (int w = 0; w < DEC_WARPS; w++) gm = fmaxf(gm, w_max[w * G + h]);
        float gl = 0.f, acc = 0.f;
        for (int w = 0; w < DEC_WARPS; w++) {
            if (w_max[w * G + h] > -INFINITY) {
                const float f = __expf(w_max[w * G + h] - gm);
                gl += w_sum[w * G + h] * f;
                acc += w_out[(w * G + h) * D + d] * f;
            }
        }
        const int head = head0 + h;
        if (own_parts == 1) {
            out[((size_t)token * num_heads + head) * D + d] = __float2bfloat16(acc / gl);
        } else {
            const size_t at = ((size_t)work * num_heads + head) * num_parts + part;
            part_out[at * D + d] = acc;
            if (d == 0) {
                part_max[at] = gm;
                part_sum[at] = gl;
            }
        }
    }
}

#define DEFINE_MMA_TOKEN_KERNEL(D, ST)                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * WARP)                              \
        paged_attention_mma_bf16_d##D##_s##ST(                                                  \
            __nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* k_cache,           \
            const __nv_bfloat16* v_cache, const int* work_tokens, const int* token_seq,         \
            const int* token_keys, const int* block_tables, int max_blocks, int num_heads,      \
            int num_kv_heads, int block_size, float scale, int partition, float* part_max,      \
            float* part_sum, float* part_out) {                                                 \
        paged_attention_mma<D, ST>(out, q, k_cache, v_cache, work_tokens, token_seq,            \
                                   token_keys, block_tables, max_blocks, num_heads,             \
                                   num_kv_heads, block_size, scale, partition, part_max,        \
                                   part_sum, part_out);                                         \
    }

// Ring depths of 2, 3 and 4 tiles: deeper rings keep more loads in flight per warp, shallower
// ones leave room for more CTAs per SM (at D = 128: 70, 104 and 139 KB).
DEFINE_MMA_TOKEN_KERNEL(64, 2)
DEFINE_MMA_TOKEN_KERNEL(64, 3)
DEFINE_MMA_TOKEN_KERNEL(64, 4)
DEFINE_MMA_TOKEN_KERNEL(128, 2)
DEFINE_MMA_TOKEN_KERNEL(128, 3)
DEFINE_MMA_TOKEN_KERNEL(128, 4)

DEFINE_PREFILL_KERNEL(prefill_attention_mma, FA_WARPS, 64)
DEFINE_PREFILL_KERNEL(prefill_attention_mma, FA_WARPS, 128)
