//! Continuous batching in one process.
//!
//! [`EngineCore`] owns the model, the KV cache and every sequence; each [`EngineCore::step`]
//! schedules a packed batch (decode tokens of running sequences first, then prompt chunks under a
//! token budget), runs one forward pass, samples, and streams each sequence's new token. Requests
//! join between steps and finished ones leave at once, freeing their blocks.
//!
//! [`EngineHandle`] runs a core on its own thread and is what async code talks to: a bounded
//! command channel in, one event stream per request out.

mod config;
mod core;
mod handle;
mod sequence;

pub use self::config::{EngineConfig, KvCacheDtype};
pub use self::core::{EngineCore, EngineStats};
pub use self::handle::{EngineHandle, RequestStream};
pub use self::sequence::{
    Completion, ExportedKv, GenerateRequest, KvSink, Placement, SeqEvent, SeqId, Timings,
    TokenEvent,
};
