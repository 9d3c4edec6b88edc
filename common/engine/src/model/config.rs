//! The shape of a llama-family model, read from a GGUF file, a Hugging Face `config.json`, or a
//! named preset (for dummy weights).

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::{Error, Result};

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: GGUF llama files (the converter permuted Q and K).
    Interleaved,
    /// Halves `(x[i], x[i + d/2])`: Hugging Face checkpoints.
    Halves,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// A name that identifies the weights (goes into the KV fingerprint).
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f64,
    /// The context length the model was trained for.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// Named shapes for dummy weights (speed does not depend on the values).
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-d64",
    "tiny-smollm2-vocab",
    "smollm2-135m",
    "llama3-1b",
    "llama3-8b",
];

impl ModelConfig {
    /// Number of weights (embedding and head counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let hidden = self.hidden_size;
        let layer = hidden * (h + 2 * kvh) * d
            + h * d * hidden
            + 3 * hidden * self.intermediate_size
            + 2 * hidden;
        let head = if self.tie_word_embeddings { 1 } else { 2 };
        self.num_layers * layer + head * self.vocab_size * hidden + hidden
    }

    /// A named real shape.
    pub fn preset(name: &str) -> Result<Self> {
        let c = |vocab, hidden, inter, layers, heads, kv_heads, head_dim, theta, ctx, tie| Self {
            name: format!("dummy-{name}"),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rope_theta: theta,
            rope_style: RopeStyle::Halves,
            rms_norm_eps: 1e-5,
            max_position_embeddings: ctx,
            tie_word_embeddings: tie,
        };
        Ok(match name {
            // Small enough for unit tests, with GQA.
            "tiny" => c(512, 64, 128, 2, 4, 2, 16, 10_000.0, 1024, true),
            // Tiny, with the head size the GPU's tiled attention kernel takes.
            "tiny-d64" => c(512, 256, 512, 2, 4, 2, 64, 10_000.0, 8192, true),
            // Tiny, with SmolLM2's vocabulary: a draft model for the real model in tests.
            "tiny-smollm2-vocab" => c(49152, 64, 128, 2, 4, 2, 16, 10_000.0, 8192, true),
            "smollm2-135m" => c(49152, 576, 1536, 30, 9, 3, 64, 100_000.0, 8192, true),
            "llama3-1b" => c(128256, 2048, 8192, 16, 32, 8, 64, 500_000.0, 131072, true),
            "llama3-8b" => c(128256, 4096, 14336, 32, 32, 8, 128, 500_000.0, 8192, false),
            _ => {
                return Err(Error::UnsupportedModel(format!(
                    "unknown model shape `{name}`; known: {}",
                    PRESETS.join(", ")
                )))
            }
        })
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(Error::UnsupportedModel(format!(
                "GGUF architecture `{arch}` (supported: llama)"
            )));
        }
        let get = |key: &str| -> Result<&gguf_file::Value> {
            md.get(&format!("{arch}.{key}"))
                .ok_or_else(|| Error::UnsupportedModel(format!("GGUF lacks `{arch}.{key}`")))
        };
        let num = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|_| Error::UnsupportedModel(format!("`{arch}.{key}` is not an integer")))
        };
        let float = |key: &str, default: f32| -> f32 {
            get(key)
                .ok()
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(default)
        };
        let hidden_size = num("embedding_length")?;
        let num_heads = num("attention.head_count")?;
        let num_kv_heads = num("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = num("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::UnsupportedModel("GGUF lacks token_embd.weight".into()))?;
        // ggml lists dims innermost first: [hidden, vocab].
        let vocab_size = embd.shape.dims().iter().copied().max().unwrap_or(0);
        let name = md
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| arch.clone());
        let config = Self {
            name,
            vocab_size,
            hidden_size,
            intermediate_size: num("feed_forward_length")?,
            num_layers: num("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: float("rope.freq_base", 10_000.0),
            rope_style: RopeStyle::Interleaved,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5) as f64,
            max_position_embeddings: num("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        config.validate()?;
        Ok(config)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str, name: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
            #[serde(default)]
            tie_word_embeddings: bool,
            rope_scaling: Option<serde_json::Value>,
        }
        let hf: Hf = serde_json::from_str(json)
            .map_err(|e| Error::UnsupportedModel(format!("config.json: {e}")))?;
        if let Some(arch) = hf.architectures.first() {
            if !matches!(arch.as_str(), "LlamaForCausalLM" | "MistralForCausalLM") {
                return Err(Error::UnsupportedModel(format!(
                    "architecture `{arch}` (supported: LlamaForCausalLM)"
                )));
            }
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::UnsupportedModel(
                "rope_scaling is not supported yet".into(),
            ));
        }
        let config = Self {
            name: name.to_string(),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::Halves,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let ok = self.vocab_size > 0
            && self.hidden_size > 0
            && self.num_layers > 0
            && self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads.is_multiple_of(self.num_kv_heads)
            && self.head_dim.is_multiple_of(2)
            && self.head_dim > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::UnsupportedModel(format!(
                "inconsistent model shape: {self:?}"
            )))
        }
    }

    /// Parameters of the model, counting tied embeddings once.
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2;
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.num_layers * layer + self.vocab_size * h + head + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Llama-3-8B: 8.03 B; SmolLM2-135M (tied embeddings): 134.5 M.
        let llama = ModelConfig::preset("llama3-8b").unwrap().num_params();
        assert!((8_020_000_000..8_040_000_000).contains(&llama), "{llama}");
        let smol = ModelConfig::preset("smollm2-135m").unwrap().num_params();
        assert!((134_000_000..135_000_000).contains(&smol), "{smol}");
    }

    #[test]
    fn presets_are_consistent_and_unknown_names_fail() {
        for name in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        let c = ModelConfig::preset("llama3-8b").unwrap();
        assert_eq!(
            (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
            (32, 32, 8, 128)
        );
        assert!((c.num_parameters() as f64 / 8.03e9 - 1.0).abs() < 0.01);
        assert!(ModelConfig::preset("gpt-5").is_err());
    }

    #[test]
    fn hf_config_json_is_read() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":32,
            "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rope_theta":500000.0,"rms_norm_eps":1e-6,"max_position_embeddings":256,"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(json, "t").unwrap();
        assert_eq!(
            (c.head_dim, c.num_kv_heads, c.rope_style),
            (8, 2, RopeStyle::Halves)
        );
        assert!(ModelConfig::from_hf_json(r#"{"architectures":["GPT2"]}"#, "t").is_err());
        assert!(ModelConfig::from_hf_json("not json", "t").is_err());
    }
}
