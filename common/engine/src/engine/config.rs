//! Engine options: cache size, batch limits, context length.

use serde::{Deserialize, Serialize};

use super::speculative::SpeculativeConfig;
use crate::kv::KvCacheSpec;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The KV cache on the CPU when no size is given.
const DEFAULT_CPU_KV_CACHE_MB: usize = 1024;

/// Room for one step's activations beside the weights and the cache: the largest step's hidden
/// states, projections and MLP intermediates several times over (candle frees them as the step
/// goes, but they overlap), the logits of every sampled row in f32 twice, and a fixed margin for
/// the allocator and the libraries' workspaces.
fn activation_reserve(model: &ModelConfig, max_batch_tokens: usize, max_num_seqs: usize) -> usize {
    let per_token = model.hidden_size * 4 + model.intermediate_size * 3;
    let activations = 4 * max_batch_tokens * per_token * 4;
    let logits = 2 * max_num_seqs.min(max_batch_tokens) * model.vocab_size * 4;
    activations + logits + (512 << 20)
}

/// `(free, total)` bytes of a GPU's memory; `None` on the CPU.
fn memory_info(device: &candle_core::Device) -> Result<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        let info = d
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| Error::Internal(format!("cannot read the GPU's free memory: {e}")))?;
        return Ok(Some(info));
    }
    let _ = device;
    Ok(None)
}

/// How big the KV cache is and how much one step may do.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Tokens per KV cache block.
    #[arg(long, env = "PD_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// KV cache blocks; 0 sizes the cache from --kv-cache-mb.
    #[arg(long, env = "PD_NUM_BLOCKS", default_value_t = 0)]
    pub num_blocks: usize,

    /// Memory for the KV cache in MiB, used when --num-blocks is 0. 0 (the default): 1024 MiB
    /// on the CPU; on a GPU, what --gpu-memory-utilization leaves once the weights are loaded
    /// and room for a step's activations is set aside.
    #[arg(long, env = "PD_KV_CACHE_MB", default_value_t = 0)]
    pub kv_cache_mb: usize,

    /// Fraction of the GPU's memory this engine may use (weights, activations and the KV cache),
    /// as vLLM's flag; sizes the KV cache when neither --num-blocks nor --kv-cache-mb is given.
    #[arg(long, env = "PD_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,

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

    /// Prefix caching keeps the KV of full blocks after their sequences end and reuses it for
    /// prompts that begin with the same tokens; on unless --no-enable-prefix-caching (vLLM's
    /// flag) is given.
    #[arg(
        long = "no-enable-prefix-caching",
        env = "PD_NO_ENABLE_PREFIX_CACHING",
        action = clap::ArgAction::SetFalse
    )]
    pub enable_prefix_caching: bool,

    /// Speculative decoding, as vLLM's flag: a JSON object such as
    /// `{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}`.
    /// Off when not given.
    #[arg(long, env = "PD_SPECULATIVE_CONFIG")]
    pub speculative_config: Option<SpeculativeConfig>,
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
            kv_cache_mb: 0,
            gpu_memory_utilization: 0.9,
            max_batch_tokens: 512,
            max_num_seqs: 64,
            max_model_len: 0,
            kv_cache_dtype: KvCacheDtype::Auto,
            enable_prefix_caching: true,
            speculative_config: None,
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
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(Error::invalid(format!(
                "gpu_memory_utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            )));
        }
        if spec.num_blocks == 0 {
            let bytes = match (self.kv_cache_mb, memory_info(device)?) {
                (0, Some(memory)) => self.kv_bytes_on_gpu(model, memory)?,
                (0, None) => DEFAULT_CPU_KV_CACHE_MB << 20,
                (mb, _) => mb << 20,
            };
            spec.num_blocks = bytes / spec.bytes_per_block();
        }
        if spec.num_blocks == 0 {
            return Err(Error::invalid("the KV cache must hold at least one block"));
        }
        Ok(spec)
    }

    /// The KV cache's bytes on a GPU with `(free, total)` bytes now, the weights loaded: what
    /// --gpu-memory-utilization allows beyond what is in use, less a step's activations.
    fn kv_bytes_on_gpu(&self, model: &ModelConfig, (free, total): (usize, usize)) -> Result<usize> {
        let used = total.saturating_sub(free);
        let allowed = (total as f64 * self.gpu_memory_utilization) as usize;
        let reserve = activation_reserve(model, self.max_batch_tokens, self.max_num_seqs);
        let bytes = allowed.saturating_sub(used).saturating_sub(reserve);
        if bytes == 0 {
            return Err(Error::invalid(format!(
                "no GPU memory is left for the KV cache: {} MiB in use of {} MiB, {} MiB allowed \
                 by gpu_memory_utilization {}, {} MiB kept for activations; raise \
                 --gpu-memory-utilization or give --kv-cache-mb",
                used >> 20,
                total >> 20,
                allowed >> 20,
                self.gpu_memory_utilization,
                reserve >> 20
            )));
        }
        Ok(bytes)
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

    fn llama_8b() -> ModelConfig {
        ModelConfig::preset("llama3-8b").unwrap()
    }

    #[test]
    fn the_cpu_default_is_a_gibibyte() {
        let model = ModelConfig::preset("tiny").unwrap();
        let spec = EngineConfig::default()
            .cache_spec(&model, &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(spec.num_blocks, (1024 << 20) / spec.bytes_per_block());
        let given = EngineConfig {
            kv_cache_mb: 10,
            ..EngineConfig::default()
        }
        .cache_spec(&model, &candle_core::Device::Cpu)
        .unwrap();
        assert_eq!(given.num_blocks, (10 << 20) / spec.bytes_per_block());
    }

    #[test]
    fn gpu_cache_takes_what_the_utilization_leaves() {
        let model = llama_8b();
        let config = EngineConfig::default();
        let gib = 1usize << 30;
        // 141 GiB card, 16 GiB of weights loaded.
        let (total, free) = (141 * gib, 125 * gib);
        let bytes = config.kv_bytes_on_gpu(&model, (free, total)).unwrap();
        let reserve = activation_reserve(&model, 512, 64);
        assert_eq!(bytes, (total as f64 * 0.9) as usize - 16 * gib - reserve);
        assert!(reserve < 2 * gib, "{reserve}");
        // Another process holding memory leaves less; a lower fraction too.
        let crowded = config
            .kv_bytes_on_gpu(&model, (free - 20 * gib, total))
            .unwrap();
        assert_eq!(bytes - crowded, 20 * gib);
        let half = EngineConfig {
            gpu_memory_utilization: 0.5,
            ..EngineConfig::default()
        };
        assert!(half.kv_bytes_on_gpu(&model, (free, total)).unwrap() < bytes / 2);
    }

    #[test]
    fn a_full_gpu_is_a_precise_error() {
        let gib = 1usize << 30;
        let err = EngineConfig::default()
            .kv_bytes_on_gpu(&llama_8b(), (4 * gib, 80 * gib))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--gpu-memory-utilization"), "{err}");
    }

    #[test]
    fn utilization_must_be_a_fraction() {
        let model = ModelConfig::preset("tiny").unwrap();
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let config = EngineConfig {
                gpu_memory_utilization: bad,
                ..EngineConfig::default()
            };
            assert!(config
                .cache_spec(&model, &candle_core::Device::Cpu)
                .is_err());
        }
    }

    #[test]
    fn prefix_caching_is_on_unless_turned_off() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            engine: EngineConfig,
        }
        assert!(Cli::parse_from(["node"]).engine.enable_prefix_caching);
        let off = Cli::parse_from(["node", "--no-enable-prefix-caching"]);
        assert!(!off.engine.enable_prefix_caching);
        assert!(EngineConfig::default().enable_prefix_caching);
    }

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
