//! Attention over the paged KV cache for a packed batch.
//!
//! One call serves any mix of sequences: each contributes `q_len` new query tokens (a prompt chunk
//! or a single decode token) whose keys are already written into the cache, and attends to its own
//! first `context_len` cached tokens through its block table, causally. There is no padding and no
//! attention across sequences.
//!
//! Every output row is computed by the same loop over keys `0..=position`, in order, whatever else
//! is in the batch and however the prompt was chunked: that is what keeps greedy output identical
//! alone, packed, chunked, or with KV that arrived from another node.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kv::BlockId;
use crate::{Error, Result};

/// Where one sequence's query tokens sit in the packed batch, and which cache blocks it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAttention {
    /// Index of the sequence's first query token in the packed batch.
    pub q_start: usize,
    /// Number of query tokens (new tokens) of this sequence in the batch.
    pub q_len: usize,
    /// Tokens in the cache for this sequence, the new ones included.
    pub context_len: usize,
    /// The sequence's blocks, in order; must cover `context_len` tokens.
    pub block_table: Vec<BlockId>,
}

/// Everything the attention kernel needs besides the tensors.
#[derive(Debug, Clone)]
pub struct AttentionMeta {
    pub seqs: Vec<SeqAttention>,
    pub num_tokens: usize,
    pub block_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// The same metadata uploaded to the GPU, once per step.
    #[cfg(feature = "cuda")]
    pub(crate) device: DeviceMetaCell,
}

/// Holds the batch's metadata on the GPU once the first layer has uploaded it.
#[cfg(feature = "cuda")]
#[derive(Debug, Default)]
pub(crate) struct DeviceMetaCell(std::sync::OnceLock<Arc<crate::cuda::attention::DeviceMeta>>);

#[cfg(feature = "cuda")]
impl Clone for DeviceMetaCell {
    /// A copy uploads its own: the metadata may be changed before it is used.
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[cfg(feature = "cuda")]
impl std::ops::Deref for DeviceMetaCell {
    type Target = std::sync::OnceLock<Arc<crate::cuda::attention::DeviceMeta>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl AttentionMeta {
    pub fn new(
        seqs: Vec<SeqAttention>,
        block_size: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::UnsupportedModel(format!(
                "{num_heads} query heads cannot share {num_kv_heads} KV heads"
            )));
        }
        let num_tokens = seqs.iter().map(|s| s.q_len).sum();
        let mut token_seq = vec![u32::MAX; num_tokens];
        for (i, s) in seqs.iter().enumerate() {
            let end = s.q_start + s.q_len;
            if end > num_tokens || s.q_len > s.context_len {
                return Err(Error::invalid(format!(
                    "sequence {i}: {} query tokens at {} do not fit its context of {}",
                    s.q_len, s.q_start, s.context_len
                )));
            }
            if s.block_table.len() * block_size < s.context_len {
                return Err(Error::invalid(format!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    s.block_table.len(),
                    s.context_len
                )));
            }
            for t in &mut token_seq[s.q_start..end] {
                if *t != u32::MAX {
                    return Err(Error::invalid("overlapping sequences in a packed batch"));
                }
                *t = i as u32;
            }
        }
        if token_seq.contains(&u32::MAX) {
            return Err(Error::invalid("a packed token belongs to no sequence"));
        }
        Ok(Self {
            seqs,
            num_tokens,
            block_size,
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            #[cfg(feature = "cuda")]
            device: DeviceMetaCell::default(),
        })
    }
}

/// `q`: `[tokens, heads, head_dim]`; `k_cache`, `v_cache`: `[blocks, block_size, kv_heads, head_dim]`.
/// Returns `[tokens, heads, head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &Arc<AttentionMeta>,
) -> Result<Tensor> {
    let expected = [meta.num_tokens, meta.num_heads, meta.head_dim];
    if q.dims() != expected {
        return Err(Error::invalid(format!(
            "attention query has shape {:?}, expected {expected:?}",
            q.dims()
        )));
    }
    let q = q.contiguous()?;
    Ok(q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention(meta.clone()))?)
}

struct PagedAttention(Arc<AttentionMeta>);

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let m = &*self.0;
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention::forward(&self.0, q, q_l, k, k_l, v, v_l)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCache, KvCacheSpec};
    use candle_core::{DType, Device, D};
    use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

    /// Plain attention over contiguous K/V with a causal mask, in candle ops: the reference.
    fn contiguous_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Tensor {
        // q: [n, h, d]; k, v: [ctx, kvh, d]; query i sits at position start + i.
        let (n, h, d) = q.dims3().unwrap();
        let (ctx, kvh, _) = k.dims3().unwrap();
        let group = h / kvh;
        let expand = |t: &Tensor| {
            t.unsqueeze(2)
                .unwrap()
                .repeat((1, 1, group, 1))
                .unwrap()
                .reshape((ctx, h, d))
                .unwrap()
        };
        let (k, v) = (
            expand(k).transpose(0, 1).unwrap(),
            expand(v).transpose(0, 1).unwrap(),
        );
        let q = q.transpose(0, 1).unwrap().contiguous().unwrap(); // [h, n, d]
        let scores =
            (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..ctx).map(move |j| {
                    if j <= start + i {
                        0.
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, n, ctx), &Device::Cpu).unwrap();
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        p.matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(0, 1)
            .unwrap()
    }

    #[test]
    fn paged_equals_contiguous_for_random_block_layouts() {
        let mut rng = StdRng::seed_from_u64(7);
        for (h, kvh, d, bs) in [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 16, 8), (6, 2, 8, 1)] {
            let spec = KvCacheSpec {
                num_layers: 1,
                num_kv_heads: kvh,
                head_dim: d,
                block_size: bs,
                num_blocks: 400,
                dtype: DType::F32,
            };
            let cache = KvCache::new(spec, &Device::Cpu).unwrap();
            let mut free: Vec<u32> = (0..400).collect();
            free.shuffle(&mut rng);
            // Three sequences: a fresh prompt, a prompt chunk after cached tokens, one decode token.
            let shapes = [(0usize, 37usize), (21, 11), (60, 1)];
            let mut seqs = Vec::new();
            let mut q_parts = Vec::new();
            let mut refs = Vec::new();
            let mut q_start = 0;
            for (cached, new) in shapes {
                let ctx = cached + new;
                let table: Vec<u32> = free.drain(..ctx.div_ceil(bs)).collect();
                let k = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu).unwrap();
                let v = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu).unwrap();
                let slots: Vec<u32> = (0..ctx)
                    .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                    .collect();
                cache.write_slots(0, &k, &v, &slots).unwrap();
                let q = Tensor::randn(0f32, 1., (new, h, d), &Device::Cpu).unwrap();
                refs.push(contiguous_attention(&q, &k, &v, cached));
                q_parts.push(q);
                seqs.push(SeqAttention {
                    q_start,
                    q_len: new,
                    context_len: ctx,
                    block_table: table,
                });
                q_start += new;
            }
            // Shuffle the order of sequences in the packed batch too.
            let order = [2usize, 0, 1];
            let mut packed = Vec::new();
            let mut metas = Vec::new();
            let mut at = 0;
            for &i in &order {
                packed.push(q_parts[i].clone());
                metas.push(SeqAttention {
                    q_start: at,
                    ..seqs[i].clone()
                });
                at += seqs[i].q_len;
            }
            let q = Tensor::cat(&packed, 0).unwrap();
            let meta = Arc::new(AttentionMeta::new(metas, bs, h, kvh, d).unwrap());
            let (kc, vc) = cache.layer(0).unwrap();
            let out = paged_attention(&q, kc, vc, &meta).unwrap();
            let mut at = 0;
            for &i in &order {
                let n = seqs[i].q_len;
                let got = out.narrow(0, at, n).unwrap();
                let diff = (got - &refs[i])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-5,
                    "h={h} kvh={kvh} d={d} bs={bs} seq {i}: max diff {diff}"
                );
                at += n;
            }
            let _ = rng.random::<u32>();
        }
    }

    #[test]
    fn inconsistent_metadata_is_an_error() {
        let s = |q_start, q_len, context_len, blocks: usize| SeqAttention {
            q_start,
            q_len,
            context_len,
            block_table: vec![0; blocks],
        };
        assert!(
            AttentionMeta::new(vec![s(0, 3, 2, 1)], 16, 4, 4, 8).is_err(),
            "more queries than context"
        );
        assert!(
            AttentionMeta::new(vec![s(0, 3, 40, 2)], 16, 4, 4, 8).is_err(),
            "too few blocks"
        );
        assert!(
            AttentionMeta::new(vec![s(0, 2, 2, 1), s(1, 2, 2, 1)], 16, 4, 4, 8).is_err(),
            "overlap"
        );
        assert!(
            AttentionMeta::new(vec![s(0, 2, 2, 1)], 16, 6, 4, 8).is_err(),
            "bad GQA ratio"
        );
    }
}
