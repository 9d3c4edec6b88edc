//! The engine's one error type, classified near its cause: the cluster's edges map an
//! [`ErrorKind`] to a gRPC or HTTP status once, instead of parsing text.

use std::path::PathBuf;

/// What kind of failure an error is, as the edges (gRPC, HTTP, the command line) need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something invalid (bad sampling values, unknown token ids, empty prompt).
    InvalidArgument,
    /// The request is well formed but too large for this model or this node.
    ResourceExhausted,
    /// Something named by the caller does not exist (model, file, sequence).
    NotFound,
    /// The service cannot take the request right now (shutting down, no capacity, peer gone).
    Unavailable,
    /// A deadline passed before the work ended (a stalled KV transfer).
    DeadlineExceeded,
    /// The caller went away or cancelled.
    Cancelled,
    /// A bug or a broken invariant on our side.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load model from {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },

    #[error("model file not found: {0}")]
    ModelNotFound(PathBuf),

    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("prompt has {prompt_tokens} tokens; with max_tokens={max_tokens} it exceeds the context of {context} tokens")]
    PromptTooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },

    #[error("request needs {needed} KV blocks but the cache holds only {total}")]
    CacheTooSmall { needed: usize, total: usize },

    #[error("out of KV blocks: needed {needed}, {free} free")]
    OutOfBlocks { needed: usize, free: usize },

    #[error("the engine has shut down")]
    EngineClosed,

    #[error("not found: {0}")]
    NotFound(String),

    #[error("unavailable: {0}")]
    Unavailable(String),

    #[error("internal error: {0}")]
    Internal(String),

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest(_) | Error::ChatTemplate(_) => ErrorKind::InvalidArgument,
            Error::PromptTooLong { .. } | Error::CacheTooSmall { .. } => {
                ErrorKind::ResourceExhausted
            }
            Error::ModelNotFound(_) | Error::NotFound(_) => ErrorKind::NotFound,
            Error::OutOfBlocks { .. } | Error::EngineClosed | Error::Unavailable(_) => {
                ErrorKind::Unavailable
            }
            Error::ModelLoad { .. }
            | Error::Internal(_)
            | Error::UnsupportedModel(_)
            | Error::Tokenizer(_)
            | Error::Candle(_)
            | Error::Io(_) => ErrorKind::Internal,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
