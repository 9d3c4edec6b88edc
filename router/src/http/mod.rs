//! The OpenAI-compatible HTTP API: `POST /v1/completions`, `POST /v1/chat/completions` (SSE
//! when `stream: true`), `GET /v1/models`, and for operators `/health` (ready: a decode node is
//! known), `/live`, `/metrics` and `/debug/kv_index` (which blocks the router believes each
//! node's prefix cache holds).
//!
//! Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`:
//! a body that is not JSON is 400, JSON of the wrong shape 422, a body over the limit 413,
//! values out of range, an unknown model or a prompt over the context 400, and no capacity 503.

mod completions;
mod openai;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use pd_common::{EngineError, Error, ErrorKind};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::dispatch::Dispatcher;
use crate::frontend::Frontend;
use crate::pool::Pool;

#[derive(Clone)]
pub struct AppState {
    pub frontend: Arc<Frontend>,
    pub dispatcher: Arc<Dispatcher>,
    pub pool: Arc<Pool>,
    pub metrics: PrometheusHandle,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
}

/// Bodies over the limit are still read (and dropped) up to this size, so that the client
/// finishes sending and reads the 413 instead of a reset connection; beyond it the
/// connection is dropped.
const DRAIN_LIMIT: usize = 64 << 20;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/live", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/debug/kv_index", get(kv_index))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route", "not_found_error")
        })
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.frontend.model_name(),
            "object": "model",
            "created": 0,
            "owned_by": "pd-cluster",
            "max_model_len": state.frontend.max_model_len(),
        }],
    }))
}

async fn health(State(state): State<AppState>) -> Response {
    let view = state.pool.snapshot();
    let ready = !view.decode.is_empty();
    let body = json!({
        "status": if ready { "ok" } else { "no decode node" },
        "etcd_connected": view.etcd_connected,
        // Serving from the last view while etcd is unreachable.
        "stale": !view.etcd_connected && view.last_contact.is_some(),
        "nodes": { "prefill": view.prefill.len(), "decode": view.decode.len() },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// `{"nodes": {node_id: {incarnation, next_seq, block_size, blocks: [hex names]}}}`.
async fn kv_index(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "nodes": state.pool.kv_index().dump() }))
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Error::from(e).into()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, kind, code) = match (&e, e.kind()) {
            (Error::Engine(EngineError::PromptTooLong { .. }), _) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            // Unknown models are a client error like any other bad value.
            (_, ErrorKind::NotFound) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (_, ErrorKind::InvalidArgument | ErrorKind::ResourceExhausted) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            (_, ErrorKind::Unavailable) => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None)
            }
            (_, ErrorKind::DeadlineExceeded) => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            (_, ErrorKind::Cancelled) => (StatusCode::SERVICE_UNAVAILABLE, "cancelled", None),
            (_, ErrorKind::Internal) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let message = match &e {
            Error::Rpc(status) => status.message().to_string(),
            other => other.to_string(),
        };
        Self {
            status,
            message,
            kind,
            code,
        }
    }
}

impl ApiError {
    fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Reads a JSON body whatever its content type (clients and curl differ), classifying failures
/// as OpenAI servers do.
pub async fn parse_body<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let mut frames = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
                "invalid_request_error",
            )
        })?;
        total += frame.len();
        if total <= limit {
            bytes.extend_from_slice(&frame);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes"),
            "request_too_large",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        let status = match e.classify() {
            Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            Category::Syntax | Category::Eof | Category::Io => StatusCode::BAD_REQUEST,
        };
        ApiError::new(
            status,
            format!("invalid request body: {e}"),
            "invalid_request_error",
        )
    })
}
