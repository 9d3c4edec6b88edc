//! pd-decode: the decode worker. It owns a paged KV cache that prefill workers fill, and generates
//! with continuous batching through the engine of `pd-common`.
