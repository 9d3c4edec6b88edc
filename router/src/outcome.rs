//! How each request ended, counted exactly once in `pd_requests_total{outcome}`: `stop`,
//! `length`, `cancelled` (the client left, or the node aborted it), `rejected` (refused before
//! any token: bad input, no key, over a limit, no capacity; the reason in
//! `pd_requests_rejected_total{reason}`) or `error` (failed after it started). A request is one
//! sequence: an HTTP request with `n` choices counts `n` once dispatched.

use pd_common::telemetry::names;
use pd_common::{Error, ErrorKind};

/// Counts a request refused before dispatch, for `reason` (see [`reason_of`]).
pub fn rejected(reason: &'static str) {
    metrics::counter!(names::REQUESTS_TOTAL, "outcome" => "rejected").increment(1);
    metrics::counter!(names::REQUESTS_REJECTED_TOTAL, "reason" => reason).increment(1);
}

/// The `reason` label of a refusal.
pub fn reason_of(e: &Error) -> &'static str {
    match e {
        Error::Refused { refusal, .. } => refusal.as_str(),
        Error::Unauthenticated(_) => "unauthenticated",
        other => match other.kind() {
            ErrorKind::InvalidArgument | ErrorKind::NotFound | ErrorKind::ResourceExhausted => {
                "invalid"
            }
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded | ErrorKind::Cancelled | ErrorKind::Internal => "other",
        },
    }
}

/// How one dispatched sequence ends: whatever was set last when it drops, `cancelled` if
/// nothing was (its client left, or its task was dropped).
pub struct Outcome {
    outcome: Option<&'static str>,
    counted: bool,
}

impl Outcome {
    pub fn new() -> Self {
        Self {
            outcome: None,
            counted: false,
        }
    }

    pub fn finished(&mut self, outcome: &'static str) {
        self.outcome = Some(outcome);
    }

    /// Refused before its first attempt started: counted as a rejection instead.
    pub fn rejected(mut self, e: &Error) {
        self.counted = true;
        rejected(reason_of(e));
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.counted {
            let outcome = self.outcome.unwrap_or("cancelled");
            metrics::counter!(names::REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        }
    }
}
