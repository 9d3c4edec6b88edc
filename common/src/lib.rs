//! pd-common: everything the pd-cluster nodes share.
//!
//! The inference engine lives here: a llama-family model ([`model`]) that runs a packed batch of
//! sequences against a paged KV cache ([`kv`]), the tokenizer and chat template read from the model
//! file, sampling, and a continuous-batching loop ([`engine`]) that the single-process front end and
//! the decode and prefill nodes all drive.

pub mod chat_template;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod kv;
pub mod membership;
pub mod model;
pub mod node;
pub mod rpc;
pub mod sampling;
pub mod telemetry;
pub mod tokenizer;
pub mod transfer;

pub use error::{Error, ErrorKind, Result};
