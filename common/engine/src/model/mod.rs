//! The model: a llama-family transformer that runs a packed batch against the paged KV cache,
//! with its weights from GGUF, a Hugging Face folder, or dummy values of a named shape.

pub mod attention;
pub mod config;
pub mod fused;
pub mod gemm;
pub mod linear;
pub mod llama;
pub mod load;
pub mod mlp;
pub mod quant_cpu;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device};

pub use attention::SeqAttention;
pub use config::{ModelConfig, RopeStyle};
pub use llama::{ForwardBatch, LlamaModel};

use crate::chat_template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The model file every binary uses when none is named: the one `deploy/fetch-model.sh` fetches.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file: weights, tokenizer and chat template in one.
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`.
    HfDir(PathBuf),
    /// Random weights of a named shape (`dummy:llama3-8b`), for speed work.
    Dummy { shape: String, seed: u64 },
}

impl FromStr for ModelSource {
    type Err = Error;

    /// `dummy:<shape>[:<seed>]`, a folder (Hugging Face layout) or a GGUF file path.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("dummy:") {
            let (shape, seed) = match rest.split_once(':') {
                Some((shape, seed)) => (
                    shape,
                    seed.parse()
                        .map_err(|_| Error::invalid(format!("bad dummy seed `{seed}`")))?,
                ),
                None => (rest, 0),
            };
            ModelConfig::preset(shape)?;
            return Ok(ModelSource::Dummy {
                shape: shape.to_string(),
                seed,
            });
        }
        let path = PathBuf::from(s);
        Ok(if path.is_dir() {
            ModelSource::HfDir(path)
        } else {
            ModelSource::Gguf(path)
        })
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => write!(f, "{}", p.display()),
            ModelSource::Dummy { shape, seed } => write!(f, "dummy:{shape}:{seed}"),
        }
    }
}

/// Opens a device by name: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn open_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = match name {
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::invalid(format!("unknown device `{name}` (cpu, cuda, cuda:N)"))
            })?,
    };
    #[cfg(feature = "cuda")]
    {
        // One explicit stream per device, shared by every thread that touches its tensors.
        let device = Device::new_cuda_with_stream(ordinal)?;
        // Everything candle does runs on that one stream; the only other streams are the NCCL
        // links', which order themselves against it with explicit events. Without tracking,
        // a cache write on a link's stream does not make the engine's stream wait for it.
        // SAFETY: the device was created just now and no tensor exists on it yet, so no pending work relies on the tracking being switched off here; cross-stream order is kept by explicit events (see above).
        unsafe { device.as_cuda_device()?.disable_event_tracking() };
        Ok(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(Error::invalid(format!(
            "device `{name}` needs a build with the `cuda` feature"
        )))
    }
}

/// The default model path: `$PD_MODEL` if set, else the fetch script's cache in this checkout.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PD_MODEL") {
        return PathBuf::from(p);
    }
    // This crate lies at common/engine of the checkout.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(".cache/models")
        .join(DEFAULT_MODEL_FILE)
}

/// A model with what is needed to talk to it in text.
pub struct LoadedModel {
    pub model: Arc<LlamaModel>,
    /// None for dummy weights, which have no vocabulary of their own.
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat_template: Option<Arc<ChatTemplate>>,
}

/// Loads a model with the device's usual activation dtype (f32 on the CPU, bf16 on a GPU).
pub fn load(source: &ModelSource, device: &Device) -> Result<LoadedModel> {
    load_as(source, device, load::activation_dtype(device))
}

/// Loads a model whose weights and activations are `dtype` (the CPU runs f32 only).
pub fn load_as(source: &ModelSource, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if device.is_cpu() && dtype != DType::F32 {
        return Err(Error::invalid("the CPU path computes in f32"));
    }
    match source {
        ModelSource::Gguf(path) => {
            let (mut file, content) = load::read_gguf(path)?;
            let model = load::load_gguf(path, &mut file, &content, device, dtype)?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let chat_template = ChatTemplate::from_gguf(&content, &tokenizer)?;
            Ok(LoadedModel {
                model: Arc::new(model),
                tokenizer: Some(Arc::new(tokenizer)),
                chat_template: chat_template.map(Arc::new),
            })
        }
        ModelSource::HfDir(dir) => {
            let model = load::load_hf_dir(dir, device, dtype)?;
            let tok_path = dir.join("tokenizer.json");
            let tokenizer = if tok_path.exists() {
                Some(Arc::new(Tokenizer::from_tokenizer_json(&tok_path)?))
            } else {
                None
            };
            let config_path = dir.join("tokenizer_config.json");
            let chat_template = match &tokenizer {
                Some(t) if config_path.exists() => {
                    ChatTemplate::from_tokenizer_config(&config_path, t)?.map(Arc::new)
                }
                _ => None,
            };
            Ok(LoadedModel {
                model: Arc::new(model),
                tokenizer,
                chat_template,
            })
        }
        ModelSource::Dummy { shape, seed } => {
            let config = ModelConfig::preset(shape)?;
            Ok(LoadedModel {
                model: Arc::new(load::load_dummy(config, *seed, device, dtype)?),
                tokenizer: None,
                chat_template: None,
            })
        }
    }
}

/// What a router needs of a model: its shape and how to turn text into tokens; no weights.
pub struct ModelText {
    pub config: ModelConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat_template: Option<Arc<ChatTemplate>>,
}

/// Reads a model's configuration, tokenizer and chat template without loading its weights.
pub fn load_text(source: &ModelSource) -> Result<ModelText> {
    match source {
        ModelSource::Gguf(path) => {
            let (_file, content) = load::read_gguf(path)?;
            let config = ModelConfig::from_gguf(&content)?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let chat_template = ChatTemplate::from_gguf(&content, &tokenizer)?;
            Ok(ModelText {
                config,
                tokenizer: Some(Arc::new(tokenizer)),
                chat_template: chat_template.map(Arc::new),
            })
        }
        ModelSource::Dummy { shape, .. } => Ok(ModelText {
            // Dummy weights have no vocabulary: their shape is all there is to know.
            config: ModelConfig::preset(shape)?,
            tokenizer: None,
            chat_template: None,
        }),
        ModelSource::HfDir(_) => {
            let loaded = load(source, &Device::Cpu)?;
            Ok(ModelText {
                config: loaded.model.config().clone(),
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
            })
        }
    }
}

impl LoadedModel {
    pub fn tokenizer(&self) -> Result<&Arc<Tokenizer>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no tokenizer: send token ids"))
    }

    /// Token ids of raw text (special tokens in the text are recognised).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text, true)
    }

    /// Token ids of a chat rendered with the model's template, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &[crate::chat_template::ChatMessage]) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no chat template"))?;
        let text = template.render(messages, true)?;
        self.encode_text(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_cpu_cuda_or_cuda_n() {
        assert!(open_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let e = open_device(bad).unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_says_the_gpu_needs_the_cuda_feature() {
        for name in ["cuda", "cuda:1"] {
            let e = open_device(name).unwrap_err().to_string();
            assert!(e.contains("`cuda` feature"), "{name}: {e}");
        }
    }

    #[test]
    fn the_cpu_computes_in_f32_only() {
        let source: ModelSource = "dummy:tiny".parse().unwrap();
        assert!(load_as(&source, &Device::Cpu, DType::BF16).is_err());
        assert_eq!(
            load_as(&source, &Device::Cpu, DType::F32)
                .unwrap()
                .model
                .dtype(),
            DType::F32
        );
    }
}
