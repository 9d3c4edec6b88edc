//! Engine options: cache size, batch limits, context length.

use serde::{Deserialize, Serialize};

use crate::kv::KvCacheSpec;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// How big the KV cache is and how much one step may do.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Tokens per KV cache block.
    #[arg(long, env = "PD_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// KV cache blocks; 0 sizes the cache from --kv-cache-mb.
    #[arg(long, env = "PD_NUM_BLOCKS", default_value_t = 0)]
    pub num_blocks: usize,

    /// Memory for the KV cache in MiB, used when --num-blocks is 0.
    #[arg(long, env = "PD_KV_CACHE_MB", default_value_t = 1024)]
    pub kv_cache_mb: usize,

    /// Most tokens (prompt chunks plus decode tokens) in one forward step.
    #[arg(long, env = "PD_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,

    /// Most sequences running at once.
    #[arg(long, env = "PD_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,

    /// Longest sequence (prompt plus output) in tokens; 0 takes the model's context length.
    #[arg(long, env = "PD_MAX_MODEL_LEN", default_value_t = 0)]
    pub max_model_len: usize,

    /// Element type of the KV cache. `auto`: f16 on the CPU (half the memory of f32, and what
    /// llama.cpp keeps by default), bf16 on a GPU (the activations' type there).
    #[arg(long, env = "PD_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    /// The element type on the CPU.
    pub fn dtype(self) -> candle_core::DType {
        self.dtype_on(&candle_core::Device::Cpu)
    }

    /// The element type on `device`.
    pub fn dtype_on(self, device: &candle_core::Device) -> candle_core::DType {
        match self {
            KvCacheDtype::Auto if device.is_cpu() => candle_core::DType::F16,
            KvCacheDtype::Auto => candle_core::DType::BF16,
            KvCacheDtype::F32 => candle_core::DType::F32,
            KvCacheDtype::F16 => candle_core::DType::F16,
            KvCacheDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 0,
            kv_cache_mb: 1024,
            max_batch_tokens: 512,
            max_num_seqs: 64,
            max_model_len: 0,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }
}

impl EngineConfig {
    /// The cache this configuration asks for, for a given model on a given device.
    pub fn cache_spec(
        &self,
        model: &ModelConfig,
        device: &candle_core::Device,
    ) -> Result<KvCacheSpec> {
        if self.block_size == 0 || self.max_batch_tokens == 0 || self.max_num_seqs == 0 {
            return Err(Error::invalid(
                "block_size, max_batch_tokens and max_num_seqs must be positive",
            ));
        }
        let mut spec = KvCacheSpec {
            num_layers: model.num_layers,
            num_kv_heads: model.num_kv_heads,
            head_dim: model.head_dim,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            dtype: self.kv_cache_dtype.dtype_on(device),
        };
        if spec.num_blocks == 0 {
            spec.num_blocks = self.kv_cache_mb * 1024 * 1024 / spec.bytes_per_block();
        }
        if spec.num_blocks == 0 {
            return Err(Error::invalid("the KV cache must hold at least one block"));
        }
        Ok(spec)
    }

    /// The longest sequence served: the model's context, capped by the option and by the cache.
    pub fn max_model_len(&self, model: &ModelConfig, spec: &KvCacheSpec) -> usize {
        let mut len = model.max_position_embeddings;
        if self.max_model_len > 0 {
            len = len.min(self.max_model_len);
        }
        len.min(spec.num_blocks * spec.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_kv_dtype_is_f16_on_the_cpu() {
        let model = ModelConfig::preset("tiny").unwrap();
        let spec = EngineConfig::default()
            .cache_spec(&model, &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(spec.dtype, candle_core::DType::F16);
        let f32_spec = EngineConfig {
            kv_cache_dtype: KvCacheDtype::F32,
            ..EngineConfig::default()
        }
        .cache_spec(&model, &candle_core::Device::Cpu)
        .unwrap();
        assert_eq!(f32_spec.dtype, candle_core::DType::F32);
    }
}
