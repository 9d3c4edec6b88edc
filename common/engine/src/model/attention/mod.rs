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
//!
//! The kernels sit side by side: [`cpu`] (f32 over an f32/f16/bf16 cache) and, with the `cuda`
//! feature, `cuda` (our own kernels, launched with the batch's metadata uploaded once per step).

mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

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
pub(crate) struct DeviceMetaCell(std::sync::OnceLock<Arc<cuda::DeviceMeta>>);

#[cfg(feature = "cuda")]
impl Clone for DeviceMetaCell {
    /// A copy uploads its own: the metadata may be changed before it is used.
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[cfg(feature = "cuda")]
impl std::ops::Deref for DeviceMetaCell {
    type Target = std::sync::OnceLock<Arc<cuda::DeviceMeta>>;
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
        cpu::forward(&self.0, q, q_l, k, k_l, v, v_l)
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
        cuda::forward(&self.0, q, q_l, k, k_l, v, v_l)
    }
}
