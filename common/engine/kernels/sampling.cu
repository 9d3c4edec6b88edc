// Sampling on the device. One CTA per logit row picks the next token, greedy (the largest logit,
// the lowest id on ties) or a seeded draw from softmax((l - max) * inv_t) over the whole
// vocabulary, and writes only the id and its log-probability: the host never sees the logits.
// Rows that need penalties, top-k / top-p / min-p or top-n logprobs are sampled on the host.
//
// The weights use the host sampler's exp (sampling/kernels.rs: Cephes' expf with Cody-Waite
// reduction) with every operation rounded explicitly (no FMA contraction), so both compute
// bit-identical weights; the sums run in f64 as on the host. Each row depends on its own logits,
// inverse temperature and uniform draw only, never on the other rows of the batch.

#include <math.h>
#include <stdint.h>

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
// The id written for a row the host must sample itself (NaN or +inf logits, all -inf): the host
// sampler then reports the precise error.
#define NO_TOKEN 0xffffffffu

__device__ __forceinline__ float exp_nonpos(float x) {
    const float LOW = -87.0f;
    const float MAGIC = 12582912.0f;
    const float C1 = 355.0f / 512.0f;
    const float C2 = -2.1219444e-4f;
    const float LOG2_E = 1.44269504088896340736f;
    const float xc = x < LOW ? LOW : x;
    const float t = __fadd_rn(__fmul_rn(xc, LOG2_E), MAGIC);
    const float n = __fsub_rn(t, MAGIC);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, C1)), __fmul_rn(n, C2));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(p, __fmul_rn(r, r)), r), 1.0f);
    const int n_int = __float_as_int(t) - __float_as_int(MAGIC);
    const float scale = __int_as_float((n_int + 127) << 23);
    return x < LOW ? 0.0f : __fmul_rn(e, scale);
}

__device__ __forceinline__ float scaled(float l, float max, float inv_t) {
    return __fmul_rn(__fsub_rn(l, max), inv_t);
}

__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
    return v > bv || (v == bv && i < bi);
}

// Sum of one value per thread, returned to every thread.
__device__ double block_sum(double x, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < SAMPLE_WARPS ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
        if (lane == 0) scratch[0] = x;
    }
    __syncthreads();
    const double total = scratch[0];
    __syncthreads();
    return total;
}

// logits: [rows, vocab] f32, contiguous. inv_t[row] == 0 means greedy; otherwise u[row] in
// [0, 1) is the row's uniform draw. grid: (rows); block: SAMPLE_THREADS.
extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab,
                                       const float* __restrict__ inv_t, const double* __restrict__ u,
                                       uint32_t* __restrict__ ids, float* __restrict__ logprobs) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int tid = threadIdx.x;
    __shared__ float s_v[SAMPLE_WARPS];
    __shared__ uint32_t s_i[SAMPLE_WARPS];
    __shared__ int s_bad[SAMPLE_WARPS];
    __shared__ double s_scratch[SAMPLE_WARPS];
    __shared__ double s_scan[SAMPLE_THREADS];
    __shared__ uint32_t s_pick;

    // Pass 1: the largest logit, its lowest id, and whether any logit is NaN or +inf.
    float bv = -INFINITY;
    uint32_t bi = NO_TOKEN;
    int bad = 0;
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
        const float x = row[i];
        bad |= isnan(x) || x == INFINITY;
        if (better(x, (uint32_t)i, bv, bi)) {
            bv = x;
            bi = (uint32_t)i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_down_sync(0xffffffffu, bv, o);
        const uint32_t oi = __shfl_down_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    bad = __any_sync(0xffffffffu, bad);
    const int warp = tid / 32, lane = tid % 32;
    if (lane == 0) {
        s_v[warp] = bv;
        s_i[warp] = bi;
        s_bad[warp] = bad;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < SAMPLE_WARPS ? s_v[lane] : -INFINITY;
        bi = lane < SAMPLE_WARPS ? s_i[lane] : NO_TOKEN;
        bad = lane < SAMPLE_WARPS ? s_bad[lane] : 0;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_down_sync(0xffffffffu, bv, o);
            const uint32_t oi = __shfl_down_sync(0xffffffffu, bi, o);
            if (better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        bad = __any_sync(0xffffffffu, bad);
        if (lane == 0) {
            s_v[0] = bv;
            s_i[0] = bi;
            s_bad[0] = bad;
        }
    }
    __syncthreads();
    const float max = s_v[0];
    const uint32_t best = s_i[0];
    if (s_bad[0] || max == -INFINITY) {
        if (tid == 0) {
            ids[blockIdx.x] = NO_TOKEN;
            logprobs[blockIdx.x] = NAN;
        }
        return;
    }

    const float it = inv_t[blockIdx.x];
    if (it == 0.0f) {
        // Greedy: the log-probability is that of temperature 1, as on the host.
        double sum = 0.0;
        for (int i = tid; i < vocab; i += SAMPLE_THREADS) sum += (double)exp_nonpos(scaled(row[i], max, 1.0f));
        const double total = block_sum(sum, s_scratch);
        if (tid == 0) {
            ids[blockIdx.x] = best;
            logprobs[blockIdx.x] = (float)(0.0 - log(total));
        }
        return;
    }

    // A draw: each thread owns a contiguous chunk of ids; the chunks' sums are scanned so that
    // the thread whose chunk holds the target walks it in id order.
    const int chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
    double own = 0.0;
    for (int i = begin; i < end; ++i) own += (double)exp_nonpos(scaled(row[i], max, it));
    s_scan[tid] = own;
    if (tid == 0) s_pick = NO_TOKEN;
    __syncthreads();
    for (int off = 1; off < SAMPLE_THREADS; off <<= 1) {
        const double add = tid >= off ? s_scan[tid - off] : 0.0;
        __syncthreads();
        s_scan[tid] += add;
        __syncthreads();
    }
    const double inclusive = s_scan[tid];
    const double exclusive = inclusive - own;
    const double total = s_scan[SAMPLE_THREADS - 1];
    const double target = u[blockIdx.x] * total;
    // Rounding can put the target at or past the total: the last chunk with weight takes it.
    if (own > 0.0 && exclusive <= target && (target < inclusive || inclusive >= total)) {
        double acc = exclusive;
        uint32_t last = NO_TOKEN;
        for (int i = begin; i < end; ++i) {
            const float w = exp_nonpos(scaled(row[i], max, it));
            if (w > 0.0f) {
                acc += (double)w;
                last = (uint32_t)i;
                if (acc > target) break;
            }
        }
        atomicMin(&s_pick, last);
    }
    __syncthreads();
    if (tid == 0) {
        const uint32_t pick = s_pick;
        ids[blockIdx.x] = pick;
        logprobs[blockIdx.x] =
            pick == NO_TOKEN ? NAN : (float)((double)scaled(row[pick], max, it) - log(total));
    }
}
