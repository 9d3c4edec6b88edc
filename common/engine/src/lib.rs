//! pd-engine: the inference engine of pd-cluster, in one process and without the network.
//!
//! A llama-family model ([`model`]) runs a packed batch of sequences against a paged KV cache
//! ([`kv`]); the tokenizer and chat template come from the model file; [`sampling`] turns logits
//! into tokens; and a continuous-batching loop ([`engine`]) schedules sequences through their
//! life cycle. The single-process front end (`pd-generate`) and the prefill and decode nodes of
//! `pd-common` all drive that loop.

pub mod chat_template;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod telemetry;
#[cfg(test)]
mod test_data;
pub mod tokenizer;

pub use error::{Error, ErrorKind, Result};
