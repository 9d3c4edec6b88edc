//! The llama-family forward pass over a packed batch: any mix of sequences, each with one or more
//! new tokens at their true positions, reading and writing the paged KV cache.
//!
//! Per-token work (matmuls, norms, RoPE) is row-independent and attention runs per sequence, so a
//! token's result does not depend on what else is in the batch.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::attention::{paged_attention, AttentionMeta, SeqAttention};
use super::config::{ModelConfig, RopeStyle};
use super::fused::{self, Heads};
use super::linear::{FusedLinear, Linear};
use super::mlp::silu_and_mul;
use crate::kv::KvCache;
use crate::{Error, Result};

pub(crate) struct Layer {
    pub attn_norm: Tensor,
    /// Q, K, V projections.
    pub qkv: FusedLinear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    /// Gate and up projections.
    pub gate_up: FusedLinear,
    pub down: Linear,
}

/// Token embeddings: dense rows, looked up by id.
pub(crate) struct Embedding(pub Tensor);

pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    /// Dtype of activations (f32 on CPU).
    dtype: DType,
    pub(crate) embedding: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    /// RoPE inverse frequencies, one per pair of head dimensions.
    inv_freq: Vec<f32>,
}

/// One forward step's input: the new tokens of every sequence, packed back to back.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqAttention>,
    /// Packed indices of the tokens whose next-token logits are wanted (typically the last token
    /// of each sequence that is due to sample).
    pub logit_rows: Vec<usize>,
}

impl ForwardBatch {
    /// Appends a sequence's new tokens; `cached` tokens of it are already in the cache. The
    /// last `logits` of them (0, 1, or more to verify drafted tokens) get next-token logits.
    pub fn push_seq(&mut self, tokens: &[u32], cached: usize, block_table: &[u32], logits: usize) {
        let q_start = self.token_ids.len();
        self.token_ids.extend_from_slice(tokens);
        self.positions
            .extend((cached..cached + tokens.len()).map(|p| p as u32));
        self.seqs.push(SeqAttention {
            q_start,
            q_len: tokens.len(),
            context_len: cached + tokens.len(),
            block_table: block_table.to_vec(),
        });
        let end = q_start + tokens.len();
        self.logit_rows.extend(end - logits.min(tokens.len())..end);
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

impl LlamaModel {
    pub(crate) fn new(
        config: ModelConfig,
        device: Device,
        dtype: DType,
        embedding: Embedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Self {
        let d = config.head_dim;
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f32 / d as f32))
            .collect();
        Self {
            config,
            device,
            dtype,
            embedding,
            layers,
            norm,
            lm_head,
            inv_freq,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs one step. Writes the new tokens' K/V into `cache` and returns the logits of
    /// `batch.logit_rows`, `[rows, vocab]` in f32. `on_layer(l)` is called once layer `l`'s KV is
    /// in the cache (a prefill node ships it from there while later layers compute).
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &KvCache,
        on_layer: &mut (dyn FnMut(usize) -> Result<()> + Send),
    ) -> Result<Tensor> {
        // Run the step on a worker of the thread pool: each of the ~200 parallel sections of a
        // step then starts in well under a microsecond instead of several from outside the pool.
        rayon::scope(|_| self.forward_in_pool(batch, cache, on_layer))
    }

    fn forward_in_pool(
        &self,
        batch: &ForwardBatch,
        cache: &KvCache,
        on_layer: &mut (dyn FnMut(usize) -> Result<()> + Send),
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n = batch.num_tokens();
        if n == 0 {
            return Err(Error::invalid("empty batch"));
        }
        if batch.positions.len() != n {
            return Err(Error::invalid("every packed token needs a position"));
        }
        if let Some(&id) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {id} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let spec = cache.spec();
        let meta = Arc::new(AttentionMeta::new(
            batch.seqs.clone(),
            spec.block_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )?);
        let slots = cache.slot_map(&self.slots(batch, spec.block_size)?)?;
        let (cos, sin) = self.rope_tables(&batch.positions)?;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);

        let ids = Tensor::from_slice(&batch.token_ids, n, &self.device)?;
        let mut x = self
            .embedding
            .0
            .index_select(&ids, 0)?
            .to_dtype(self.dtype)?;
        let eps = cfg.rms_norm_eps as f32;
        let heads = Heads {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            interleaved: cfg.rope_style == RopeStyle::Interleaved,
        };
        let mut hidden = match self.layers.first() {
            Some(first) => candle_nn::ops::rms_norm(&x, &first.attn_norm, eps)?,
            None => x.clone(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let stacked = layer.qkv.forward_stacked(&hidden)?;
            let fused = match &stacked {
                Some(qkv) => fused::rope_write_kv(qkv, &cos, &sin, cache, l, &slots, heads)?,
                None => None,
            };
            let q = match fused {
                Some(q) => q,
                None => {
                    let qkv = match &stacked {
                        Some(y) => layer.qkv.split(y)?,
                        None => layer.qkv.forward(&hidden)?,
                    };
                    let q = self.rope(&qkv[0], h, &cos, &sin)?;
                    let k = self.rope(&qkv[1], kvh, &cos, &sin)?;
                    let v = qkv[2].reshape((n, kvh, d))?;
                    cache.write_rows(l, &k, &v, &slots)?;
                    q
                }
            };
            on_layer(l)?;
            let (kc, vc) = cache.layer(l)?;
            let attn = paged_attention(&q, kc, vc, &meta)?.reshape((n, h * d))?;
            let o = layer.o.forward(&attn)?;
            (x, hidden) = fused::add_rms_norm(&x, &o, &layer.ffn_norm, eps)?;

            let act = match layer.gate_up.forward_stacked(&hidden)? {
                Some(gate_up) => silu_and_mul(&gate_up)?,
                None => {
                    let gate_up = layer.gate_up.forward(&hidden)?;
                    (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?
                }
            };
            let down = layer.down.forward(&act)?;
            // The residual add, with the next layer's attention norm where there is one.
            match self.layers.get(l + 1) {
                Some(next) => (x, hidden) = fused::add_rms_norm(&x, &down, &next.attn_norm, eps)?,
                None => x = (x + down)?,
            }
        }
        if batch.logit_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let rows: Vec<u32> = batch.logit_rows.iter().map(|&r| r as u32).collect();
        if rows.iter().any(|&r| r as usize >= n) {
            return Err(Error::invalid("logit row outside the batch"));
        }
        let rows = Tensor::from_vec(rows, batch.logit_rows.len(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// Cache slot of every packed token.
    fn slots(&self, batch: &ForwardBatch, block_size: usize) -> Result<Vec<u32>> {
        let mut slots = vec![0u32; batch.num_tokens()];
        for s in &batch.seqs {
            let range = s.q_start..s.q_start + s.q_len;
            for (slot, &pos) in slots[range.clone()].iter_mut().zip(&batch.positions[range]) {
                let pos = pos as usize;
                let block = s.block_table.get(pos / block_size).ok_or_else(|| {
                    Error::invalid(format!("position {pos} lies beyond the sequence's blocks"))
                })?;
                *slot = block * block_size as u32 + (pos % block_size) as u32;
            }
        }
        Ok(slots)
    }

    /// cos and sin of every token's rotation angles, `[tokens, 1, head_dim / 2]`.
    fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// Rotates `[tokens, heads * head_dim]` and returns `[tokens, heads, head_dim]`.
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let n = x.dims()[0];
        let d = self.config.head_dim;
        // Each token is its own "batch" so that it gets its own position's angles.
        let x = x.contiguous()?.reshape((n, heads, 1, d))?;
        let y = match self.config.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        };
        Ok(y.reshape((n, heads, d))?)
    }
}
