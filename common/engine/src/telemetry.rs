//! The engine's metrics: names (`pd_` prefix, unit suffixes, bounded labels) and descriptions.
//! A node's Prometheus recorder exports them with the cluster's own (`pd_common::telemetry`).

use metrics::{describe_counter, describe_histogram, Unit};

/// Metric names the engine records.
pub mod names {
    /// Prompt tokens run through the model.
    pub const PREFILL_TOKENS_TOTAL: &str = "pd_prefill_tokens_total";
    /// Tokens decoding sequences ran through the model: one a step each, plus their drafted
    /// tokens with speculative decoding (accepted or not: `pd_spec_decode_*` count those).
    pub const DECODE_TOKENS_TOTAL: &str = "pd_decode_tokens_total";
    /// Sequences preempted for KV blocks (to be recomputed).
    pub const PREEMPTIONS_TOTAL: &str = "pd_preemptions_total";
    /// Prompt tokens looked up in the prefix cache at admission (vLLM's `prefix_cache_queries`).
    pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "pd_prefix_cache_queries_total";
    /// Of those, tokens whose KV the cache held (vLLM's `prefix_cache_hits`).
    pub const PREFIX_CACHE_HITS_TOTAL: &str = "pd_prefix_cache_hits_total";
    /// Speculative steps of a sequence that had a draft (vLLM's `spec_decode_num_drafts`).
    pub const SPEC_DECODE_NUM_DRAFTS_TOTAL: &str = "pd_spec_decode_num_drafts_total";
    /// Tokens drafted (vLLM's `spec_decode_num_draft_tokens`).
    pub const SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL: &str = "pd_spec_decode_num_draft_tokens_total";
    /// Drafted tokens the target model accepted (vLLM's `spec_decode_num_accepted_tokens`).
    /// Acceptance rate: accepted / draft tokens; mean accepted length: 1 + accepted / drafts.
    pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL: &str =
        "pd_spec_decode_num_accepted_tokens_total";
    /// Time of each phase of an engine step (label `phase`: schedule, pack, forward, sample,
    /// emit; see `engine::phases`).
    pub const STEP_PHASE_SECONDS: &str = "pd_engine_step_phase_seconds";
}

/// Histogram buckets for [`names::STEP_PHASE_SECONDS`]: phases last tens of microseconds to
/// tens of milliseconds.
pub const STEP_PHASE_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

/// Describes the engine's metrics to the installed recorder.
pub fn describe() {
    use names::*;
    describe_counter!(PREFILL_TOKENS_TOTAL, "Prompt tokens run through the model.");
    describe_counter!(
        DECODE_TOKENS_TOTAL,
        "Tokens decoding sequences ran through the model, drafts included."
    );
    describe_counter!(PREEMPTIONS_TOTAL, "Sequences preempted for KV blocks.");
    describe_counter!(
        PREFIX_CACHE_QUERIES_TOTAL,
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(
        PREFIX_CACHE_HITS_TOTAL,
        "Prompt tokens whose KV the prefix cache held."
    );
    describe_counter!(
        SPEC_DECODE_NUM_DRAFTS_TOTAL,
        "Speculative steps of sequences that had a draft."
    );
    describe_counter!(SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL, "Tokens drafted.");
    describe_counter!(
        SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL,
        "Drafted tokens the target model accepted."
    );
    describe_histogram!(
        STEP_PHASE_SECONDS,
        Unit::Seconds,
        "Time of each phase of an engine step."
    );
}
