//! Every metric name in one place: `pd_` prefix, unit suffixes (`_seconds`, `_bytes`,
//! `_total`), labels with a handful of values at most.

/// Requests that reached the router, each counted once by how it ended: `outcome` is `stop`,
/// `length`, `cancelled`, `rejected` (refused before dispatch) or `error`.
pub const REQUESTS_TOTAL: &str = "pd_requests_total";
/// Requests refused before dispatch, by `reason` (`invalid`, `unauthenticated`,
/// `rate_limited`, `overloaded`, `unavailable`, `other`).
pub const REQUESTS_REJECTED_TOTAL: &str = "pd_requests_rejected_total";
/// Requests admitted and waiting for their first token (the router's admission queue).
pub const ROUTER_WAITING_REQUESTS: &str = "pd_router_waiting_requests";
/// From a request's arrival to its first token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "pd_time_to_first_token_seconds";
/// Between consecutive tokens of one request.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "pd_inter_token_latency_seconds";
/// From a request's arrival to its last token.
pub const REQUEST_DURATION_SECONDS: &str = "pd_request_duration_seconds";
/// Sequences waiting for admission.
pub const QUEUE_DEPTH: &str = "pd_queue_depth";
/// Prompt tokens queued or mid-prefill.
pub const QUEUED_PROMPT_TOKENS: &str = "pd_queued_prompt_tokens";
/// Sequences in the running batch.
pub const RUNNING_SEQUENCES: &str = "pd_running_sequences";
/// Sequences holding blocks while another node fills them.
pub const AWAITING_KV_SEQUENCES: &str = "pd_awaiting_kv_sequences";
/// KV cache blocks in use.
pub const KV_BLOCKS_USED: &str = "pd_kv_blocks_used";
/// KV cache blocks free (cached blocks nobody references among them).
pub const KV_BLOCKS_FREE: &str = "pd_kv_blocks_free";
/// KV cache blocks in the prefix cache.
pub const PREFIX_CACHE_BLOCKS: &str = "pd_prefix_cache_blocks";
/// KV bytes shipped, by `direction` (`sent`, `received`).
pub const KV_TRANSFER_BYTES_TOTAL: &str = "pd_kv_transfer_bytes_total";
/// Duration of whole KV transfers, by `direction`.
pub const KV_TRANSFER_SECONDS: &str = "pd_kv_transfer_seconds";
/// KV bytes over one link, by `direction`, `backend` and `peer` (the decode node's address on
/// the sending side, the sender's IP on the receiving side).
pub const KV_LINK_BYTES_TOTAL: &str = "pd_kv_link_bytes_total";
/// Seconds one link spent carrying each transfer (from its first chunk to its last), by the
/// labels of [`KV_LINK_BYTES_TOTAL`]: the bytes counter's rate over this histogram's `_sum`
/// rate is the link's GB/s.
pub const KV_LINK_SECONDS: &str = "pd_kv_link_seconds";
/// The GB/s of the link's last transfer (its bytes over its seconds, as measured). Shipped
/// layer by layer during a prefill, a transfer also waits for the layers being computed, so
/// this is the rate the link was asked for, at most what it can carry.
pub const KV_LINK_GBPS: &str = "pd_kv_link_last_gbps";
/// KV transfers that failed, by `direction`.
pub const KV_TRANSFER_FAILURES_TOTAL: &str = "pd_kv_transfer_failures_total";
/// The engine's own metrics (tokens, preemptions, prefix cache, speculative decoding, step
/// phases), named where they are recorded.
pub use pd_engine::telemetry::names::*;
/// Prompts a decode node computed itself instead of a prefill node, by `reason`.
pub const LOCAL_PREFILLS_TOTAL: &str = "pd_local_prefills_total";
/// Prefills a prefill node took on (each prompt it was asked to compute and ship).
pub const PREFILLS_TOTAL: &str = "pd_prefills_total";
/// Prefills a prefill node refused before starting, by `reason` (`behind`: its queue would
/// not let it finish within the caller's deadline).
pub const PREFILLS_REFUSED_TOTAL: &str = "pd_prefills_refused_total";
/// Attempts moved to another node after a failure, by `stage` (`prefill`, `decode`).
pub const RETRIES_TOTAL: &str = "pd_retries_total";
/// Nodes in the router's view, by `role`.
pub const CLUSTER_NODES: &str = "pd_cluster_nodes";
/// 1 while the router serves from its last view because etcd is unreachable.
pub const MEMBERSHIP_STALE: &str = "pd_membership_stale";
/// Blocks the router's KV index holds for a `node` (what its prefix cache reported).
pub const ROUTER_KV_INDEX_BLOCKS: &str = "pd_router_kv_index_blocks";
/// Prompt tokens of routed requests that the chosen prefill node's cache held, as the router's
/// index saw it when it chose.
pub const ROUTER_KV_HIT_TOKENS_TOTAL: &str = "pd_router_kv_hit_tokens_total";
