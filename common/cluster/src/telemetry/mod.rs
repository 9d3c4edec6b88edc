//! Logs and metrics of every node: `tracing` to stderr (text or JSON, filtered by `RUST_LOG`),
//! and a Prometheus recorder whose text the node serves at `/metrics`.
//!
//! The request id travels between nodes in the [`REQUEST_ID_HEADER`] gRPC metadata entry and is
//! a field of each request's span, so every log line about a request names it on every node.

pub mod names;

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::{Error, Result};

/// gRPC metadata key (and HTTP header) carrying a request's id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Log line format.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Starts logging to stderr. `RUST_LOG` filters (default `info`). Safe to call twice.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the process-wide Prometheus recorder (once) and describes every metric.
pub fn install_metrics() -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let latency = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(pd_engine::telemetry::names::STEP_PHASE_SECONDS.into()),
            &pd_engine::telemetry::STEP_PHASE_BUCKETS,
        )
        .map_err(|e| Error::Internal(format!("metrics buckets: {e}")))?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .map_err(|e| Error::Internal(format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| Error::Internal(format!("metrics recorder: {e}")))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    use names::*;
    pd_engine::telemetry::describe();
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests, each counted once by how it ended (stop, length, cancelled, rejected, error)."
    );
    describe_counter!(
        PREFILLS_TOTAL,
        "Prefills a prefill node took on: prompts it computed (or found cached) and shipped."
    );
    describe_counter!(
        PREFILLS_REFUSED_TOTAL,
        "Prefills refused before starting because the node is too far behind, by reason."
    );
    describe_counter!(
        REQUESTS_REJECTED_TOTAL,
        "Requests refused before dispatch, by reason."
    );
    describe_gauge!(
        ROUTER_WAITING_REQUESTS,
        "Requests admitted by the router and waiting for their first token."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Arrival to first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Between consecutive tokens."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Arrival to last token."
    );
    describe_gauge!(QUEUE_DEPTH, "Sequences waiting for admission.");
    describe_gauge!(QUEUED_PROMPT_TOKENS, "Prompt tokens queued or mid-prefill.");
    describe_gauge!(RUNNING_SEQUENCES, "Sequences in the running batch.");
    describe_gauge!(
        AWAITING_KV_SEQUENCES,
        "Sequences whose KV another node is computing."
    );
    describe_gauge!(KV_BLOCKS_USED, "KV cache blocks in use.");
    describe_gauge!(KV_BLOCKS_FREE, "KV cache blocks free.");
    describe_gauge!(PREFIX_CACHE_BLOCKS, "KV cache blocks in the prefix cache.");
    describe_counter!(
        KV_TRANSFER_BYTES_TOTAL,
        Unit::Bytes,
        "KV bytes shipped, by direction."
    );
    describe_histogram!(
        KV_TRANSFER_SECONDS,
        Unit::Seconds,
        "Whole KV transfers, by direction."
    );
    describe_counter!(
        KV_LINK_BYTES_TOTAL,
        Unit::Bytes,
        "KV bytes over one link, by direction, backend and peer."
    );
    describe_histogram!(
        KV_LINK_SECONDS,
        Unit::Seconds,
        "Seconds a link spent carrying each transfer (first chunk to last)."
    );
    describe_gauge!(KV_LINK_GBPS, "GB/s of the link's last transfer, measured.");
    describe_counter!(
        KV_TRANSFER_FAILURES_TOTAL,
        "KV transfers that failed, by direction."
    );
    describe_counter!(
        LOCAL_PREFILLS_TOTAL,
        "Prompts a decode node computed itself, by reason."
    );
    describe_counter!(RETRIES_TOTAL, "Attempts moved to another node, by stage.");
    describe_gauge!(CLUSTER_NODES, "Nodes in the router's view, by role.");
    describe_gauge!(
        MEMBERSHIP_STALE,
        "1 while serving from a stale view (etcd unreachable)."
    );
    describe_gauge!(
        ROUTER_KV_INDEX_BLOCKS,
        "Blocks of a node's prefix cache in the router's index, by node."
    );
    describe_counter!(
        ROUTER_KV_HIT_TOKENS_TOTAL,
        "Prompt tokens the chosen prefill node held in its prefix cache, per the router's index."
    );
}

/// Records one finished transfer over a link: `bytes` in `seconds` (first chunk to last).
pub fn record_link(
    direction: &'static str,
    backend: crate::transfer::TransferBackend,
    peer: &str,
    bytes: u64,
    seconds: f64,
) {
    let labels = [
        ("direction", direction.to_string()),
        ("backend", backend.as_str().to_string()),
        ("peer", peer.to_string()),
    ];
    metrics::counter!(names::KV_LINK_BYTES_TOTAL, &labels).increment(bytes);
    metrics::histogram!(names::KV_LINK_SECONDS, &labels).record(seconds);
    if seconds > 0.0 {
        metrics::gauge!(names::KV_LINK_GBPS, &labels).set(bytes as f64 / seconds / 1e9);
    }
}

/// Sets the engine gauges from a stats snapshot.
pub fn record_engine_stats(stats: &crate::engine::EngineStats) {
    use names::*;
    metrics::gauge!(QUEUE_DEPTH).set(stats.waiting as f64);
    metrics::gauge!(QUEUED_PROMPT_TOKENS).set(stats.pending_tokens as f64);
    metrics::gauge!(RUNNING_SEQUENCES).set(stats.running as f64);
    metrics::gauge!(AWAITING_KV_SEQUENCES).set(stats.awaiting_kv as f64);
    metrics::gauge!(KV_BLOCKS_USED).set((stats.total_blocks - stats.free_blocks) as f64);
    metrics::gauge!(KV_BLOCKS_FREE).set(stats.free_blocks as f64);
    metrics::gauge!(PREFIX_CACHE_BLOCKS).set(stats.cached_blocks as f64);
}

/// The request id of an incoming gRPC call, or a new one.
pub fn request_id_of<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// Puts a request id into an outgoing gRPC call's metadata.
pub fn with_request_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = request_id.parse() {
        request.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    request
}

/// A fresh request id: 16 random bytes in hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
