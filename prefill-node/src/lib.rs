//! pd-prefill: the prefill worker. It batches prompts under a token budget, runs them through the
//! engine of `pd-common`, and ships each layer's KV into a decode worker's paged cache.
