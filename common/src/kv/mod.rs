//! KV cache.
