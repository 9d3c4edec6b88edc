//! The crate's one error type. Errors are classified here, near their cause, so that the edges
//! (gRPC, HTTP, the command line) can map a [`ErrorKind`] to a status once instead of parsing text.

use std::path::PathBuf;

/// What kind of failure an [`Error`] is, as the edges need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something invalid (bad sampling values, unknown token ids, empty prompt).
    InvalidArgument,
    /// The request is well formed but too large for this model or this node.
    ResourceExhausted,
    /// Something named by the caller does not exist (model, file).
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

    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),

    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A peer answered with an error status; its code is kept, not flattened into text.
    #[error("peer: {}: {}", .0.code(), .0.message())]
    Rpc(Box<tonic::Status>),

    #[error("internal error: {0}")]
    Internal(String),

    #[error("KV fingerprint mismatch on {field}: ours is {ours}, the peer's is {theirs}")]
    FingerprintMismatch {
        field: &'static str,
        ours: String,
        theirs: String,
    },

    #[error("bad KV chunk: {0}")]
    BadKvChunk(String),

    #[error("membership: {0}")]
    Membership(#[from] crate::membership::MembershipError),

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Membership(e) => e.kind(),
            Error::InvalidRequest(_)
            | Error::ChatTemplate(_)
            | Error::FingerprintMismatch { .. }
            | Error::BadKvChunk(_) => ErrorKind::InvalidArgument,
            Error::PromptTooLong { .. } | Error::CacheTooSmall { .. } => {
                ErrorKind::ResourceExhausted
            }
            Error::ModelNotFound(_) | Error::NotFound(_) => ErrorKind::NotFound,
            Error::OutOfBlocks { .. } | Error::EngineClosed | Error::Unavailable(_) => {
                ErrorKind::Unavailable
            }
            Error::DeadlineExceeded(_) => ErrorKind::DeadlineExceeded,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Rpc(status) => kind_of_code(status.code()),
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

    /// Whether trying again elsewhere may succeed: the fault was the peer's or the network's,
    /// not the request's.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Internal
        ) || matches!(self, Error::Rpc(s) if s.code() == tonic::Code::Unknown)
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rpc(Box::new(status))
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Unavailable(format!("transport: {e}"))
    }
}

/// The gRPC status of an error: the one place where kinds become codes.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        if let Error::Rpc(status) = e {
            return *status;
        }
        let code = match e.kind() {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorKind::Cancelled => tonic::Code::Cancelled,
            ErrorKind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

fn kind_of_code(code: tonic::Code) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            ErrorKind::InvalidArgument
        }
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::NotFound => ErrorKind::NotFound,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::Unavailable | Code::Aborted => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
