//! The model: a llama-family transformer that runs a packed batch against the paged KV cache,
//! with its weights from GGUF, a Hugging Face folder, or dummy values of a named shape.

pub mod attention;
pub mod config;
pub mod linear;
pub mod llama;
pub mod load;
pub mod quant_cpu;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Device;

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

/// The default model path: `$PD_MODEL` if set, else the fetch script's cache in this checkout.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PD_MODEL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
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

pub fn load(source: &ModelSource, device: &Device) -> Result<LoadedModel> {
    match source {
        ModelSource::Gguf(path) => {
            let (mut file, content) = load::read_gguf(path)?;
            let model = load::load_gguf(path, &mut file, &content, device)?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let chat_template = ChatTemplate::from_gguf(&content, &tokenizer)?;
            Ok(LoadedModel {
                model: Arc::new(model),
                tokenizer: Some(Arc::new(tokenizer)),
                chat_template: chat_template.map(Arc::new),
            })
        }
        ModelSource::HfDir(dir) => {
            let model = load::load_hf_dir(dir, device)?;
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
                model: Arc::new(load::load_dummy(config, *seed, device)?),
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
        ModelSource::HfDir(_) | ModelSource::Dummy { .. } => {
            // Small enough to load whole; dummy weights have no tokenizer anyway.
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
