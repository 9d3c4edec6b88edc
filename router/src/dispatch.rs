//! One request's journey through the cluster, as the router sees it: pick a decode node, name
//! the prefill nodes it may use, relay its tokens, and when the decode node fails mid-stream,
//! resume on another one with the tokens already delivered, so the client's stream continues
//! with nothing lost or repeated.
//!
//! Resuming is exact because everything a decode node decides is a function of the request:
//! greedy decoding is deterministic and batch-invariant, and sampling draws the randomness for
//! output position `i` from `(seed, i)` alone; the router fixes the seed before the first attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_common::sampling::{SamplingParams, StopChecker};
use pd_common::telemetry::{names, with_request_id};
use pd_common::tokenizer::{IncrementalDecoder, Tokenizer};
use pd_common::wire::ToWire;
use pd_common::{Error, Result, Retry};
use pd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Streaming;
use tracing::Instrument;

use crate::admission::Ticket;
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Pool};

/// Messages buffered toward one client.
const CLIENT_QUEUE: usize = 64;
/// How long a decode node may take to take a request (its answer comes once its engine has
/// queued the request, before any prefill); past it the next node is tried.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated, tokenized request.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    /// Complete, with the seed fixed.
    pub params: SamplingParams,
    pub arrived: Instant,
    /// The decode node to use while it is live, whatever the loads say: the choices of one
    /// request go where the first went, so that its engine computes (or fetches) their prompt
    /// once and the others take it from its prefix cache.
    pub decode_node: Option<String>,
}

/// A started job: its messages, and the decode node that took it.
pub struct Started {
    pub stream: JobStream,
    pub decode_node: String,
}

/// The messages of one job; the last is the one with a completion, or an error.
pub type JobStream = mpsc::Receiver<Result<pb::GenerateResponse>>;

pub struct Dispatcher {
    pool: Arc<Pool>,
    /// Replays delivered tokens when a stream breaks right at its end (see `already_complete`).
    tokenizer: Option<Arc<Tokenizer>>,
}

/// An open stream on a decode node.
struct Attempt {
    node_id: String,
    stream: Streaming<pb::GenerateResponse>,
    _active: ActiveGuard,
}

impl Dispatcher {
    pub fn new(pool: Arc<Pool>, tokenizer: Option<Arc<Tokenizer>>) -> Arc<Self> {
        Arc::new(Self { pool, tokenizer })
    }

    /// Starts `job`, admitted with `ticket`. Returns once a decode node has accepted it, so
    /// that a refusal (bad input, no capacity) reaches the caller as an error before any token;
    /// then the stream follows.
    pub async fn start(self: &Arc<Self>, job: Job, ticket: Ticket) -> Result<Started> {
        // Dropped with this future if the caller leaves first: counted as cancelled.
        let outcome = Outcome::new();
        let mut excluded = Vec::new();
        let attempt = match self.open(&job, &[], &mut excluded).await {
            Ok(a) => a,
            Err(e) => {
                outcome.rejected(&e);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let decode_node = attempt.node_id.clone();
        let this = self.clone();
        let span = tracing::info_span!("request", request_id = %job.request_id);
        let clock = Clock::new(job.arrived, ticket, outcome);
        tokio::spawn(
            async move { this.relay(job, attempt, excluded, clock, tx).await }.instrument(span),
        );
        Ok(Started {
            stream: rx,
            decode_node,
        })
    }

    /// Opens `Decode.Generate` on the best decode node not yet tried, moving on while nodes fail.
    async fn open(&self, job: &Job, sent: &[u32], excluded: &mut Vec<String>) -> Result<Attempt> {
        let held = self.pool.held(&[job.prompt_ids.as_slice(), sent].concat());
        loop {
            let pinned = job.decode_node.as_deref();
            let Some((node, active)) = self.pool.pick_decode(excluded, &held, pinned) else {
                return Err(Error::Unavailable(if excluded.is_empty() {
                    "no decode node is available".into()
                } else {
                    format!("no decode node is left ({} failed)", excluded.len())
                }));
            };
            let request = pb::DecodeRequest {
                request_id: job.request_id.clone(),
                prompt_ids: job.prompt_ids.clone(),
                sampling: Some(job.params.to_wire()),
                seed: job.params.seed.unwrap_or_default(),
                resume_ids: sent.to_vec(),
                prefill_candidates: self.pool.prefill_candidates(&node.node_id, &held),
            };
            let call = async {
                let mut client = self.pool.decode_client(&node.address)?;
                let accepted = client.generate(with_request_id(request, &job.request_id));
                // A wedged node must not hold the request: it answers at once when it works.
                match tokio::time::timeout(ACCEPT_TIMEOUT, accepted).await {
                    Ok(answer) => answer.map_err(Error::from),
                    Err(_) => Err(Error::DeadlineExceeded(format!(
                        "decode node {} did not take the request within {ACCEPT_TIMEOUT:?}",
                        node.node_id
                    ))),
                }
            };
            match call.await {
                Ok(response) => {
                    tracing::info!(
                        request_id = %job.request_id,
                        decode = %node.node_id,
                        prompt_tokens = job.prompt_ids.len(),
                        resumed = sent.len(),
                        "request dispatched"
                    );
                    return Ok(Attempt {
                        node_id: node.node_id,
                        stream: response.into_inner(),
                        _active: active,
                    });
                }
                Err(e) => {
                    if e.retry() == Retry::No {
                        return Err(e);
                    }
                    tracing::warn!(decode = %node.node_id, error = %e, "decode node failed; trying another");
                    metrics::counter!(names::RETRIES_TOTAL, "stage" => "decode").increment(1);
                    excluded.push(node.node_id);
                }
            }
        }
    }

    async fn relay(
        &self,
        job: Job,
        mut attempt: Attempt,
        mut excluded: Vec<String>,
        mut clock: Clock,
        tx: mpsc::Sender<Result<pb::GenerateResponse>>,
    ) {
        let mut sent: Vec<u32> = Vec::new();
        loop {
            let message = tokio::select! {
                m = attempt.stream.message() => m,
                // The client went away: dropping the stream cancels the request on the node.
                _ = tx.closed() => return,
            };
            let failure = match message {
                Ok(Some(m)) => {
                    sent.extend_from_slice(&m.token_ids);
                    clock.message(&m);
                    let last = m.completion.is_some();
                    if tx.send(Ok(m)).await.is_err() || last {
                        return;
                    }
                    continue;
                }
                Ok(None) => Error::Unavailable(format!(
                    "decode node {} ended the stream without a completion",
                    attempt.node_id
                )),
                Err(status) => Error::from(status),
            };
            if failure.retry() == Retry::No {
                clock.failed();
                let _ = tx.send(Err(failure)).await;
                return;
            }
            if let Some(done) = self.already_complete(&job, &sent) {
                clock.message(&done);
                let _ = tx.send(Ok(done)).await;
                return;
            }
            tracing::warn!(
                decode = %attempt.node_id,
                delivered = sent.len(),
                error = %failure,
                "decode node failed mid-stream; resuming elsewhere"
            );
            metrics::counter!(names::RETRIES_TOTAL, "stage" => "decode").increment(1);
            excluded.push(attempt.node_id.clone());
            attempt = match self.open(&job, &sent, &mut excluded).await {
                Ok(a) => a,
                Err(e) => {
                    clock.failed();
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
        }
    }

    /// The final message of a stream that broke after its last token but before saying so.
    ///
    /// Replays the delivered tokens as a decode node does, so that text held back then (a
    /// partial character, a possible stop string) is released now as it would have been.
    fn already_complete(&self, job: &Job, sent: &[u32]) -> Option<pb::GenerateResponse> {
        let last = *sent.last()?;
        let p = &job.params;
        let eog = self.tokenizer.as_ref().is_some_and(|t| t.is_eog(last));
        let stop_token = p.stop_token_ids.contains(&last) || (!p.ignore_eos && eog);
        let mut decoder = IncrementalDecoder::new(p.skip_special_tokens);
        let mut stop = StopChecker::from_params(p);
        let mut text = String::new();
        if let Some(tok) = &self.tokenizer {
            let replayed = if stop_token {
                &sent[..sent.len() - 1]
            } else {
                sent
            };
            for &id in replayed {
                let piece = decoder.push(tok, id).ok()?;
                stop.push(&piece);
            }
            if !stop.is_stopped() {
                let tail = decoder.flush(tok).ok()?;
                text = stop.push(&tail).text;
                text.push_str(&stop.finish());
            }
        }
        let reason = if stop_token || stop.is_stopped() {
            pb::FinishReason::Stop
        } else if sent.len() >= p.max_tokens as usize {
            pb::FinishReason::Length
        } else {
            return None;
        };
        Some(pb::GenerateResponse {
            request_id: job.request_id.clone(),
            text,
            completion: Some(pb::Completion {
                finish_reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: job.prompt_ids.len() as u32,
                    completion_tokens: sent.len() as u32,
                    // Unknown: the node that computed the prompt did not say.
                    prompt_tokens_details: None,
                }),
                timings: None,
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Latency metrics of one request as its client sees them, its place in the admission queue,
/// and how it ended.
struct Clock {
    arrived: Instant,
    last_token: Option<Instant>,
    ticket: Ticket,
    outcome: Outcome,
}

impl Clock {
    fn new(arrived: Instant, ticket: Ticket, outcome: Outcome) -> Self {
        Self {
            arrived,
            last_token: None,
            ticket,
            outcome,
        }
    }

    fn message(&mut self, m: &pb::GenerateResponse) {
        let now = Instant::now();
        if !m.token_ids.is_empty() {
            match self.last_token {
                None => {
                    metrics::histogram!(names::TIME_TO_FIRST_TOKEN_SECONDS)
                        .record((now - self.arrived).as_secs_f64());
                    self.ticket.first_token(now - self.arrived);
                }
                Some(last) => metrics::histogram!(names::INTER_TOKEN_LATENCY_SECONDS)
                    .record((now - last).as_secs_f64() / m.token_ids.len() as f64),
            }
            self.last_token = Some(now);
        }
        if let Some(c) = &m.completion {
            let outcome = match c.finish_reason() {
                pb::FinishReason::Length => "length",
                pb::FinishReason::Cancelled => "cancelled",
                _ => "stop",
            };
            self.outcome.finished(outcome);
            metrics::histogram!(names::REQUEST_DURATION_SECONDS)
                .record((now - self.arrived).as_secs_f64());
        }
    }

    fn failed(&mut self) {
        self.outcome.finished("error");
    }
}
