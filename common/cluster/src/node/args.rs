//! Flags every worker node takes the same way: which weights to serve and on what device, which
//! KV transfer backends to offer, and how long each phase of a shutdown may take.

use std::time::Duration;

use crate::model::{self, LoadedModel, ModelSource};
use crate::Result;

/// Which weights a node serves.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face folder, or `dummy:<shape>[:<seed>]`. Default: the SmolLM2
    /// GGUF that deploy/fetch-model.sh fetches.
    #[arg(long, env = "PD_MODEL")]
    pub model: Option<String>,

    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (GPU builds only).
    #[arg(long, env = "PD_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Weights and activations on a GPU: `bf16` (default) or `f32`. The CPU computes in f32.
    #[arg(long, env = "PD_DTYPE", value_enum, default_value_t = ModelDtype::Auto)]
    pub dtype: ModelDtype,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDtype {
    /// f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    Bf16,
    F32,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: None,
            device: "cpu".into(),
            dtype: ModelDtype::Auto,
        }
    }
}

impl ModelArgs {
    pub fn source(&self) -> Result<ModelSource> {
        Ok(match &self.model {
            Some(m) => m.parse()?,
            None => ModelSource::Gguf(model::default_model_path()),
        })
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let source = self.source()?;
        let device = model::open_device(&self.device)?;
        let dtype = match self.dtype {
            ModelDtype::Auto => model::load::activation_dtype(&device),
            ModelDtype::Bf16 => candle_core::DType::BF16,
            ModelDtype::F32 => candle_core::DType::F32,
        };
        tracing::info!(model = %source, device = %self.device, ?dtype, "loading model");
        Ok(model::load_as(&source, &device, dtype)?)
    }
}

/// Which KV transfer backends a node offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransfer {
    /// gRPC, and NCCL where this build and device allow it.
    #[default]
    Auto,
    /// gRPC only.
    Grpc,
}

const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 2_000;

/// How long each phase of a node's shutdown may take.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ShutdownArgs {
    /// On shutdown, how long requests in progress may take to finish before the node hands the
    /// rest off (fails them with UNAVAILABLE, so the router resumes them elsewhere), in seconds.
    #[arg(long, env = "PD_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    pub drain_timeout_secs: u64,

    /// After the hand-off, how long the last messages may take to reach their callers and the
    /// servers and the engine to stop, in milliseconds.
    #[arg(long, env = "PD_SHUTDOWN_GRACE_MS", default_value_t = DEFAULT_SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,
}

impl Default for ShutdownArgs {
    fn default() -> Self {
        Self {
            drain_timeout_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
        }
    }
}

impl ShutdownArgs {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
