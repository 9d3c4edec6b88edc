//! The OpenAI-compatible HTTP API: `POST /v1/completions`, `POST /v1/chat/completions` (SSE
//! when `stream: true`), `GET /v1/models`, and for operators `/health` (ready: a decode node is
//! known), `/live`, `/metrics` and `/debug/kv_index` (which blocks the router believes each
//! node's prefix cache holds).
//!
//! Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`:
//! a body that is not JSON is 400, JSON of the wrong shape 422, a body over the limit 413,
//! values out of range, an unknown model or a prompt over the context 400, a missing or wrong
//! API key 401, a key over its limits 429, and a full waiting queue or no capacity 503 (the
//! last two with `Retry-After`).

pub(crate) mod completions;
pub(crate) mod openai;
mod serve;

pub use serve::serve;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use pd_common::error::{retry_after_secs, Refusal};
use pd_common::{EngineError, Error, ErrorKind};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::admission::Admission;
use crate::dispatch::Dispatcher;
use crate::frontend::Frontend;
use crate::outcome;
use crate::pool::Pool;

#[derive(Clone)]
pub struct AppState {
    pub frontend: Arc<Frontend>,
    pub dispatcher: Arc<Dispatcher>,
    pub pool: Arc<Pool>,
    pub metrics: PrometheusHandle,
    pub admission: Arc<Admission>,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
}

/// Bodies over the limit are still read (and dropped) up to this size, so that the client
/// finishes sending and reads the 413 instead of a reset connection; beyond it the
/// connection is dropped.
const DRAIN_LIMIT: usize = 64 << 20;

pub fn router(state: AppState) -> Router {
    let keyed = middleware::from_fn_with_state(state.clone(), require_key);
    let api = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route_layer(keyed.clone());
    let operator = Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/kv_index", get(kv_index));
    let operator = if state.admission.metrics_require_key() {
        operator.route_layer(keyed)
    } else {
        operator
    };
    Router::new()
        .merge(api)
        .merge(operator)
        .route("/health", get(health))
        .route("/live", get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route", "not_found_error")
        })
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Lets a request through with its [`Caller`](crate::admission::Caller) when its
/// `Authorization` names a key (or keys are off); else 401.
async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.admission.authenticate(authorization) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => {
            if request.uri().path().ends_with("completions") {
                outcome::rejected(outcome::reason_of(&e));
            }
            ApiError::from(e).into_response()
        }
    }
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
        // Sequences the decode nodes run at once, and requests admitted waiting for a first
        // token (the admission queue; see --max-waiting-requests).
        "decode_capacity": state.pool.decode_capacity(),
        "waiting_requests": state.admission.waiting().0,
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
    /// Seconds for `Retry-After` (refusals under load).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            retry_after: None,
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
        let retry_after = match &e {
            Error::Refused { retry_after, .. } => Some(retry_after_secs(*retry_after)),
            _ => None,
        };
        let (status, kind, code) = match (&e, e.kind()) {
            (Error::Unauthenticated(_), _) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (
                Error::Refused {
                    refusal: Refusal::RateLimited,
                    ..
                },
                _,
            ) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                Error::Refused {
                    refusal: Refusal::Overloaded,
                    ..
                },
                _,
            ) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("overloaded"),
            ),
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
            retry_after,
        }
    }
}

impl ApiError {
    /// The `reason` label when this error refuses a request before dispatch.
    pub fn rejection_reason(&self) -> &'static str {
        match (self.status, self.code) {
            (StatusCode::UNAUTHORIZED, _) => "unauthenticated",
            (StatusCode::TOO_MANY_REQUESTS, _) => "rate_limited",
            (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")) => "overloaded",
            (StatusCode::SERVICE_UNAVAILABLE, _) => "unavailable",
            (s, _) if s.is_client_error() => "invalid",
            _ => "other",
        }
    }

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
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Reads a JSON body whatever its content type (clients and curl differ), classifying failures
/// as OpenAI servers do.
pub async fn parse_body<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    parse_json(&read_body(body, limit).await?)
}

/// A request body, up to `limit` bytes (413 past it).
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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
    Ok(bytes)
}

/// A JSON body as `T`: not JSON is 400, JSON of the wrong shape 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
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
