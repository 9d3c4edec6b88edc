//! The error type of the cluster crates. Errors are classified here, near their cause: the edges
//! (gRPC, HTTP) map an [`ErrorKind`] to a status once, and callers decide whether to try another
//! node with [`Error::retry`] instead of each deciding on its own.

use std::time::Duration;

pub use pd_engine::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine's own errors (bad requests, model loading, tensors), kept as they are.
    #[error(transparent)]
    Engine(#[from] pd_engine::Error),

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("not found: {0}")]
    NotFound(String),

    #[error("unavailable: {0}")]
    Unavailable(String),

    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),

    /// Cancelled here: our caller went away or gave up. A peer's CANCELLED arrives as
    /// [`Error::Rpc`].
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A peer's address (from etcd or a request) that cannot be dialled: the peer's fault.
    #[error("bad peer address {address:?}: {reason}")]
    BadPeerAddress { address: String, reason: String },

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

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),

    /// Refused at the client edge before any work, with when to come back.
    #[error("{message}")]
    Refused {
        refusal: Refusal,
        message: String,
        retry_after: Duration,
    },

    /// The caller did not prove who it is (no API key, or a wrong one).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
}

/// Why the edge refused a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The cluster's waiting queue is full: HTTP 503, gRPC UNAVAILABLE.
    Overloaded,
    /// The caller's key is over its own limits: HTTP 429, gRPC RESOURCE_EXHAUSTED.
    RateLimited,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// The gRPC metadata key (and HTTP header) that says how many seconds to wait before retrying.
pub const RETRY_AFTER: &str = "retry-after";

/// What a caller should do after a call to a peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request itself is at fault, or its caller left: another node would fail the same way.
    No,
    /// The peer or the link to it failed: another node may well serve the request.
    Elsewhere,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Engine(e) => e.kind(),
            Error::Membership(e) => e.kind(),
            Error::InvalidRequest(_) | Error::FingerprintMismatch { .. } | Error::BadKvChunk(_) => {
                ErrorKind::InvalidArgument
            }
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Unavailable(_) | Error::BadPeerAddress { .. } => ErrorKind::Unavailable,
            Error::DeadlineExceeded(_) => ErrorKind::DeadlineExceeded,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Rpc(status) => kind_of_code(status.code()),
            Error::Internal(_) | Error::Io(_) => ErrorKind::Internal,
            Error::Refused {
                refusal: Refusal::Overloaded,
                ..
            } => ErrorKind::Unavailable,
            Error::Refused {
                refusal: Refusal::RateLimited,
                ..
            } => ErrorKind::ResourceExhausted,
            // Never retried, never the server's fault; the edges give it its own status.
            Error::Unauthenticated(_) => ErrorKind::InvalidArgument,
        }
    }

    /// Whether trying another node may succeed: the one place that decides it, for the router
    /// (another decode node) and the decode node (another prefill node) alike.
    pub fn retry(&self) -> Retry {
        let elsewhere = match self {
            // A peer's status: the codes a failed node or a broken link produce. CANCELLED
            // from a peer is its stream being reset (a node stopping mid-stream, a proxy
            // dropping it); our own cancellations are `Error::Cancelled`, never retried.
            Error::Rpc(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ),
            other => matches!(
                other.kind(),
                ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Internal
            ),
        };
        if elsewhere {
            Retry::Elsewhere
        } else {
            Retry::No
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Engine(e.into())
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
        match e {
            Error::Rpc(status) => return *status,
            Error::Unauthenticated(message) => return tonic::Status::unauthenticated(message),
            Error::Refused {
                refusal,
                message,
                retry_after,
            } => {
                let code = match refusal {
                    Refusal::Overloaded => tonic::Code::Unavailable,
                    Refusal::RateLimited => tonic::Code::ResourceExhausted,
                };
                let mut status = tonic::Status::new(code, message);
                let seconds = retry_after_secs(retry_after).to_string();
                if let Ok(v) = seconds.parse() {
                    status.metadata_mut().insert(RETRY_AFTER, v);
                }
                return status;
            }
            _ => {}
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

/// Whole seconds for a `Retry-After`: at least one, so that clients do not retry at once.
pub fn retry_after_secs(after: Duration) -> u64 {
    after.as_secs_f64().ceil().max(1.0) as u64
}

/// The gRPC status of an engine error.
pub fn status(e: pd_engine::Error) -> tonic::Status {
    Error::from(e).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_and_link_failures_are_retried_elsewhere_and_request_faults_are_not() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::Aborted,
            tonic::Code::Cancelled,
            tonic::Code::DeadlineExceeded,
        ] {
            let e = Error::from(tonic::Status::new(code, "x"));
            assert_eq!(e.retry(), Retry::Elsewhere, "{code:?}");
        }
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::ResourceExhausted,
            tonic::Code::NotFound,
            tonic::Code::FailedPrecondition,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
        ] {
            let e = Error::from(tonic::Status::new(code, "x"));
            assert_eq!(e.retry(), Retry::No, "{code:?}");
        }
        let bad_address = Error::BadPeerAddress {
            address: "::bad".into(),
            reason: "x".into(),
        };
        assert_eq!(bad_address.retry(), Retry::Elsewhere);
        assert_eq!(Error::Cancelled("client left".into()).retry(), Retry::No);
        assert_eq!(Error::invalid("empty prompt").retry(), Retry::No);
        assert_eq!(
            Error::Unavailable("shutting down".into()).retry(),
            Retry::Elsewhere
        );
        let engine = Error::from(pd_engine::Error::PromptTooLong {
            prompt_tokens: 9,
            max_tokens: 9,
            context: 10,
        });
        assert_eq!(engine.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(engine.retry(), Retry::No);
        assert_eq!(
            Error::from(pd_engine::Error::EngineClosed).retry(),
            Retry::Elsewhere
        );
    }

    #[test]
    fn kinds_become_grpc_codes_once_and_peer_statuses_pass_through() {
        let s = tonic::Status::from(Error::from(pd_engine::Error::invalid("bad")));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let peer = tonic::Status::new(tonic::Code::ResourceExhausted, "too big");
        let s = tonic::Status::from(Error::from(peer));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "too big");
    }

    #[test]
    fn refusals_carry_their_code_and_when_to_retry() {
        let refused = |refusal| Error::Refused {
            refusal,
            message: "busy".into(),
            retry_after: Duration::from_millis(2_300),
        };
        let s = tonic::Status::from(refused(Refusal::Overloaded));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get(RETRY_AFTER).unwrap(), "3");
        let s = tonic::Status::from(refused(Refusal::RateLimited));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        let s = tonic::Status::from(Error::Unauthenticated("no key".into()));
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert_eq!(Error::Unauthenticated("x".into()).retry(), Retry::No);
    }
}
