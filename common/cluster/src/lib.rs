//! pd-common: what the pd-cluster nodes share besides the engine.
//!
//! Membership in etcd ([`membership`]), KV shipping between nodes ([`transfer`]), the life of a
//! worker node from its flags to a phased drain ([`node`]), gRPC plumbing ([`rpc`]), logs and
//! metrics ([`telemetry`]), the engine's types on the wire ([`wire`]) and the error type with its
//! one retry classification ([`error`]).
//!
//! The engine itself is `pd-engine`, which knows nothing of the network; its modules are
//! re-exported here so that the nodes name one crate.

pub mod error;
pub mod membership;
pub mod node;
pub mod rpc;
pub mod telemetry;
pub mod tls;
pub mod transfer;
pub mod wire;

#[cfg(feature = "cuda")]
pub use pd_engine::cuda;
pub use pd_engine::{chat_template, engine, kv, model, sampling, tokenizer};

pub use error::{Error, ErrorKind, Result, Retry};
pub use pd_engine::Error as EngineError;
