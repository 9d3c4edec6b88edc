//! The CPU kernel: each sequence's K/V gathered from its blocks into f32 once, then every query
//! token attends over its causal prefix in key order, in parallel over tokens (rayon).

use candle_core::{CpuStorage, Layout, Shape};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{AttentionMeta, SeqAttention};

/// The CPU side of the paged-attention op: `q` f32, K and V caches f32, f16 or bf16.
pub(super) fn forward(
    m: &AttentionMeta,
    q: &CpuStorage,
    q_l: &Layout,
    k: &CpuStorage,
    k_l: &Layout,
    v: &CpuStorage,
    v_l: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
        q_l.contiguous_offsets(),
        k_l.contiguous_offsets(),
        v_l.contiguous_offsets(),
    ) else {
        candle_core::bail!("paged-attention needs contiguous tensors")
    };
    let CpuStorage::F32(q) = q else {
        candle_core::bail!("paged-attention on CPU takes an f32 query")
    };
    let q = &q[q0..q1];
    // The cache is large: borrow it rather than copy.
    let out = match (k, v) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => attend(m, q, &k[k0..k1], &v[v0..v1])?,
        (CpuStorage::F16(k), CpuStorage::F16(v)) => attend(m, q, &k[k0..k1], &v[v0..v1])?,
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => attend(m, q, &k[k0..k1], &v[v0..v1])?,
        _ => candle_core::bail!("paged-attention: K and V caches of unsupported dtypes"),
    };
    Ok((
        CpuStorage::F32(out),
        Shape::from((m.num_tokens, m.num_heads, m.head_dim)),
    ))
}

/// An element of the KV cache as the CPU kernel reads it.
trait CacheElem: Copy + Send + Sync {
    /// Converts a run of elements (in bulk: SIMD conversions where the CPU has them).
    fn extend_f32(dst: &mut Vec<f32>, src: &[Self]);
    /// Rounds to this type's precision. With a half-precision cache the query and the attention
    /// probabilities are rounded like this before they meet K and V, as ggml does: it keeps the
    /// output close to llama.cpp's, whose CPU path our golden tests compare against.
    fn round(x: f32) -> f32;
}

impl CacheElem for f32 {
    fn extend_f32(dst: &mut Vec<f32>, src: &[Self]) {
        dst.extend_from_slice(src);
    }
    fn round(x: f32) -> f32 {
        x
    }
}

impl CacheElem for half::f16 {
    fn extend_f32(dst: &mut Vec<f32>, src: &[Self]) {
        let at = dst.len();
        dst.resize(at + src.len(), 0.0);
        src.convert_to_f32_slice(&mut dst[at..]);
    }
    fn round(x: f32) -> f32 {
        half::f16::from_f32(x).to_f32()
    }
}

impl CacheElem for half::bf16 {
    fn extend_f32(dst: &mut Vec<f32>, src: &[Self]) {
        let at = dst.len();
        dst.resize(at + src.len(), 0.0);
        src.convert_to_f32_slice(&mut dst[at..]);
    }
    fn round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }
}

fn attend<T: CacheElem>(
    m: &AttentionMeta,
    q: &[f32],
    kc: &[T],
    vc: &[T],
) -> candle_core::Result<Vec<f32>> {
    let row = m.num_heads * m.head_dim;
    let mut out = vec![0f32; m.num_tokens * row];
    // Each sequence owns a disjoint range of packed rows: hand those out as separate slices.
    let mut order: Vec<&SeqAttention> = m.seqs.iter().collect();
    order.sort_by_key(|s| s.q_start);
    let mut parts = Vec::with_capacity(order.len());
    let mut rest = out.as_mut_slice();
    let mut at = 0;
    for s in order {
        let (_, tail) = rest.split_at_mut((s.q_start - at) * row);
        let (mine, tail) = tail.split_at_mut(s.q_len * row);
        parts.push((s, mine));
        rest = tail;
        at = s.q_start + s.q_len;
    }
    parts
        .into_par_iter()
        .try_for_each(|(s, out_s)| attend_sequence(m, s, &q[s.q_start * row..], kc, vc, out_s))?;
    Ok(out)
}

/// One sequence: its K/V are gathered from the blocks into f32 once, then every query token of
/// it attends over its causal prefix.
fn attend_sequence<T: CacheElem>(
    m: &AttentionMeta,
    s: &SeqAttention,
    q: &[f32],
    kc: &[T],
    vc: &[T],
    out: &mut [f32],
) -> candle_core::Result<()> {
    let (h, d) = (m.num_heads, m.head_dim);
    let group = m.num_heads / m.num_kv_heads;
    let kv_row = m.num_kv_heads * d;
    let capacity = kc.len().min(vc.len()) / kv_row;
    let ctx = s.context_len;
    let mut keys = Vec::with_capacity(ctx * kv_row);
    let mut values = Vec::with_capacity(ctx * kv_row);
    // Block by block: a block's tokens are contiguous in the cache.
    for (b, &block) in s
        .block_table
        .iter()
        .enumerate()
        .take(ctx.div_ceil(m.block_size))
    {
        let tokens = m.block_size.min(ctx - b * m.block_size);
        let first = block as usize * m.block_size;
        if first + tokens > capacity {
            candle_core::bail!("paged-attention: block {block} outside the cache")
        }
        let (at, end) = (first * kv_row, (first + tokens) * kv_row);
        T::extend_f32(&mut keys, &kc[at..end]);
        T::extend_f32(&mut values, &vc[at..end]);
    }
    out.par_chunks_mut(h * d)
        .zip(q.par_chunks(h * d))
        .enumerate()
        .for_each(|(i, (out_t, q_t))| {
            // Position of this query token within its sequence.
            let n_keys = ctx - s.q_len + i + 1;
            let mut scores = vec![0f32; n_keys];
            let mut qh = vec![0f32; d];
            for head in 0..h {
                let kv_off = (head / group) * d;
                for (x, &y) in qh.iter_mut().zip(&q_t[head * d..(head + 1) * d]) {
                    *x = T::round(y);
                }
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores.iter_mut().enumerate() {
                    let at = j * kv_row + kv_off;
                    *score = dot(&qh, &keys[at..at + d]) * m.scale;
                    max = max.max(*score);
                }
                let mut sum = 0f32;
                for score in scores.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                let inv = 1.0 / sum;
                let oh = &mut out_t[head * d..(head + 1) * d];
                for (j, &p) in scores.iter().enumerate() {
                    let at = j * kv_row + kv_off;
                    axpy(T::round(p * inv), &values[at..at + d], oh);
                }
            }
        });
    Ok(())
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
