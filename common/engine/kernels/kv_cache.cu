// Moving KV rows and blocks in and out of the paged cache.
//
// A cache layer is [num_blocks, block_size, num_kv_heads, head_dim]: one token's K (or V) is a
// contiguous row, one block is block_size contiguous rows. The kernels copy 32-bit words; the
// host checks that rows are a whole number of words.

#include <stdint.h>

// dst[slots[i]] = src[i] for each row i. grid: (rows); block: up to 256 threads.
extern "C" __global__ void kv_scatter_rows(uint32_t* __restrict__ dst, const uint32_t* __restrict__ src,
                                           const uint32_t* __restrict__ slots, int row_words) {
    const size_t row = blockIdx.x;
    const size_t slot = slots[row];
    const uint32_t* s = src + row * row_words;
    uint32_t* d = dst + slot * row_words;
    for (int i = threadIdx.x; i < row_words; i += blockDim.x) d[i] = s[i];
}

// Contiguous buffer <- blocks of one cache tensor: buf[i] = cache[blocks[i]].
// grid: (blocks listed); block: 256 threads. block_vecs: 16-byte words per block.
extern "C" __global__ void kv_gather_blocks(uint4* __restrict__ buf, const uint4* __restrict__ cache,
                                            const uint32_t* __restrict__ blocks, int block_vecs) {
    const size_t i = blockIdx.x;
    const uint4* src = cache + (size_t)blocks[i] * block_vecs;
    uint4* dst = buf + i * block_vecs;
    for (int w = threadIdx.x; w < block_vecs; w += blockDim.x) dst[w] = src[w];
}

// Blocks <- contiguous buffer: the inverse of kv_gather_blocks.
extern "C" __global__ void kv_scatter_blocks(uint4* __restrict__ cache, const uint4* __restrict__ buf,
                                             const uint32_t* __restrict__ blocks, int block_vecs) {
    const size_t i = blockIdx.x;
    uint4* dst = cache + (size_t)blocks[i] * block_vecs;
    const uint4* src = buf + i * block_vecs;
    for (int w = threadIdx.x; w < block_vecs; w += blockDim.x) dst[w] = src[w];
}
