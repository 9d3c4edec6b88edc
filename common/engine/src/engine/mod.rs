//! Continuous batching in one process.
//!
//! [`EngineCore`] owns the model, the KV cache and every sequence; each [`EngineCore::step`]
//! schedules a packed batch (decode tokens of running sequences first, then prompt chunks under a
//! token budget), runs one forward pass, samples, and streams each sequence's new token. Requests
//! join between steps and finished ones leave at once, freeing their blocks. A sequence's life is
//! an explicit state (waiting, preempted, awaiting KV, prefilling, exporting, decoding) that
//! changes in one place (`EngineCore::set_state`); see `sequence.rs`. Full blocks stay in a
//! prefix cache after their sequences end, and prompts that begin with the same tokens take
//! them instead of computing them again (`prefix.rs`).
//!
//! [`EngineHandle`] runs a core on its own thread and is what async code talks to: a bounded
//! command channel in, one event stream per request out.

mod beam;
mod config;
mod core;
mod draft;
mod handle;
pub mod phases;
mod prefix;
mod scheduler;
mod sequence;
pub mod speculative;
mod step;

pub use self::beam::{beam_score, BeamOutput};
pub use self::config::{EngineConfig, KvCacheDtype};
pub use self::core::{EngineCore, EngineStats};
pub use self::handle::{EngineHandle, RequestStream};
pub use self::sequence::{
    Completion, ExportedKv, GenerateRequest, KvData, KvSink, Placement, Reservation, SeqEvent,
    SeqId, Timings, TokenEvent,
};
pub use self::speculative::{
    SpecDecodeStats, SpeculativeConfig, SpeculativeCounts, SpeculativeMethod,
};
