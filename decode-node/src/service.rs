//! The gRPC services of a decode node: `Decode.Generate` and `Node.Stats`.
//!
//! Each request gets a task that owns it from reservation to the last token: it waits for the
//! engine to reserve blocks, has prefill nodes fill them (one after the other until one succeeds,
//! each within the transfer deadline, each under a fresh transfer id so a late sender can never
//! write into a retry's blocks), falls back to computing the prompt here, and forwards the
//! engine's events to the client. When the client goes away, the task ends and dropping the
//! engine stream frees the sequence's blocks.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd_common::engine::{
    Completion, EngineHandle, GenerateRequest, Placement, RequestStream, Reservation, SeqEvent,
};
use pd_common::error::status;
use pd_common::kv::BlockId;
use pd_common::node::RequestTasks;
use pd_common::rpc::RpcConfig;
use pd_common::sampling::{SampledToken, SamplingParams};
use pd_common::telemetry::{self, names, with_request_id};
use pd_common::transfer::{KvReceiver, TransferBackend, TransferStats};
use pd_common::wire::{FromWire, ToWire};
use pd_common::{node, Error, ErrorKind, Result, Retry};
use pd_proto::v1 as pb;
use pd_proto::v1::prefill_client::PrefillClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Messages buffered toward one client before the engine's events wait in their own queue.
const CLIENT_QUEUE: usize = 64;

pub struct Options {
    pub node_id: String,
    /// The address prefill nodes push KV to.
    pub self_address: String,
    pub aggregated: bool,
    pub local_prefill_below: usize,
    pub transfer_timeout: Duration,
    /// Extra time over the prefill node's own deadline before we stop waiting for its answer.
    pub answer_grace: Duration,
    pub rpc: RpcConfig,
}

/// Shared by the gRPC services and every request task.
#[derive(Clone)]
pub struct DecodeService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    receiver: Arc<KvReceiver>,
    options: Options,
    prefill_clients: Mutex<HashMap<String, PrefillClient<Channel>>>,
    /// Refuses new requests once shutdown starts; runs each request's task for the drain.
    tasks: RequestTasks,
}

impl DecodeService {
    pub fn new(
        engine: EngineHandle,
        receiver: Arc<KvReceiver>,
        tasks: RequestTasks,
        options: Options,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                receiver,
                options,
                prefill_clients: Mutex::new(HashMap::new()),
                tasks,
            }),
        }
    }
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::decode_server::Decode for DecodeService {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let request_id = telemetry::request_id_of(&request);
        let span = tracing::info_span!("decode", request_id = %request_id);
        let inner = self.inner.clone();
        async move {
            if !inner.tasks.admitting() {
                return Err(Status::unavailable("the decode node is shutting down"));
            }
            let r = request.into_inner();
            let mut params = SamplingParams::from_wire(&r.sampling.unwrap_or_default());
            params.seed = params.seed.or(Some(r.seed));
            let candidates = r
                .prefill_candidates
                .iter()
                .map(|c| Ok((c.address.clone(), TransferBackend::from_wire(c.backend)?)))
                .collect::<Result<Vec<_>>>()?;
            let prefill = Prefill {
                request_id: request_id.clone(),
                params: params.clone(),
                prompt_len: r.prompt_ids.len(),
                candidates,
            };
            let total = r.prompt_ids.len() + r.resume_ids.len();
            let request = GenerateRequest {
                prompt_ids: r.prompt_ids,
                params,
                resume_ids: r.resume_ids,
            };
            let local_reason = if inner.options.aggregated {
                Some("aggregated")
            } else if prefill.candidates.is_empty() {
                Some("no_prefill_node")
            } else if total < inner.options.local_prefill_below {
                Some("short_prompt")
            } else {
                None
            };
            let (stream, reserved) = match local_reason {
                Some(reason) => {
                    metrics::counter!(names::LOCAL_PREFILLS_TOTAL, "reason" => reason).increment(1);
                    let stream = inner.engine.generate(request.clone()).await;
                    (stream.map_err(status)?, None)
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    let stream = inner
                        .engine
                        .submit(request.clone(), Placement::Remote(tx))
                        .await
                        .map_err(status)?;
                    (stream, Some(rx))
                }
            };
            tracing::info!(
                prompt_tokens = prefill.prompt_len,
                resumed = total - prefill.prompt_len,
                local = local_reason.unwrap_or("no"),
                "decode request accepted"
            );
            let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
            let tasks = inner.tasks.clone();
            let task = drive(inner, request, prefill, stream, reserved, tx);
            tasks.spawn(task.in_current_span());
            Ok(Response::new(
                Box::pin(ReceiverStream::new(rx)) as Self::GenerateStream
            ))
        }
        .instrument(span)
        .await
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for DecodeService {
    type KvEventsStream = node::KvEventStream;

    async fn kv_events(
        &self,
        request: Request<pb::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        Ok(Response::new(node::kv_event_stream(
            self.inner.engine.kv_events().clone(),
            request.into_inner(),
            self.inner.tasks.shutdown_token(),
        )))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        let s = self.inner.engine.stats().await.map_err(status)?;
        Ok(Response::new(node::node_stats(
            &self.inner.options.node_id,
            pb::NodeRole::Decode,
            &s,
        )))
    }
}

/// What a remote prefill needs to know about a request.
struct Prefill {
    request_id: String,
    params: SamplingParams,
    prompt_len: usize,
    /// Prefill nodes to try, best first, with how each ships KV here.
    candidates: Vec<(String, TransferBackend)>,
}

/// How the prompt's KV got here, for the final timings.
#[derive(Default)]
struct PrefillTimings {
    queue: f64,
    prefill: f64,
    transfer: f64,
    /// Prompt tokens the prefill node took from its prefix cache; `None` when the prompt was
    /// not prefilled remotely (the engine's own count applies then).
    cached_tokens: Option<usize>,
}

async fn drive(
    inner: Arc<Inner>,
    request: GenerateRequest,
    prefill: Prefill,
    mut stream: RequestStream,
    reserved: Option<oneshot::Receiver<Reservation>>,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
) {
    let mut timings = PrefillTimings::default();
    if let Some(reserved) = reserved {
        let reservation = tokio::select! {
            r = reserved => r.ok(),
            _ = tx.closed() => return,
        };
        if reservation == Some(Reservation::Local) {
            // This node's prefix cache holds the prompt: the engine computes its last block.
            metrics::counter!(names::LOCAL_PREFILLS_TOTAL, "reason" => "cached").increment(1);
        }
        // No reservation: the sequence ended before admission (cancelled); its stream says how.
        if let Some(Reservation::Fill {
            first_block,
            blocks,
        }) = reservation
        {
            let outcome = tokio::select! {
                o = prefill_remote(&inner, &request, &prefill, first_block, blocks) => o,
                _ = tx.closed() => return,
            };
            let activated = match outcome {
                Ok((first, t)) => match inner.engine.activate(stream.id, first).await {
                    // The engine refused what the prefill node sent: compute it here instead.
                    Err(e) if e.kind() == ErrorKind::InvalidArgument => Err(e.into()),
                    done => Ok((done, t)),
                },
                Err(e) => Err(e),
            };
            let handoff = match activated {
                Ok((done, t)) => {
                    timings = t;
                    done
                }
                Err(e) => {
                    tracing::warn!(error = %e, "remote prefill failed; prefilling locally");
                    metrics::counter!(names::LOCAL_PREFILLS_TOTAL, "reason" => "prefill_failed")
                        .increment(1);
                    inner.engine.prefill_locally(stream.id).await
                }
            };
            if let Err(e) = handoff {
                // The sequence is gone (cancelled meanwhile); its stream ends on its own.
                tracing::debug!(error = %e, "handing the sequence to the engine failed");
            }
        }
    }
    forward(&prefill, &mut stream, &tx, timings).await;
}

/// Sends the engine's events to the client until the last one or until the client goes away.
async fn forward(
    prefill: &Prefill,
    stream: &mut RequestStream,
    tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    timings: PrefillTimings,
) {
    let want_logprobs = prefill.params.logprobs.is_some();
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = tx.closed() => return,
        };
        let message = match event {
            None => Err(Status::internal(
                "the engine ended the request without a reason",
            )),
            Some(SeqEvent::Token(t)) => Ok(pb::GenerateResponse {
                request_id: prefill.request_id.clone(),
                token_ids: vec![t.id],
                text: t.text,
                logprobs: if want_logprobs {
                    vec![SampledToken {
                        id: t.id,
                        logprob: t.logprob,
                        top_logprobs: t.top_logprobs,
                    }
                    .to_wire()]
                } else {
                    Vec::new()
                },
                completion: None,
            }),
            Some(SeqEvent::Finished(c)) => Ok(final_message(&prefill.request_id, c, &timings)),
            Some(SeqEvent::Failed(e)) => Err(status(e)),
        };
        let last = !matches!(&message, Ok(m) if m.completion.is_none());
        if tx.send(message).await.is_err() || last {
            return;
        }
    }
}

fn final_message(request_id: &str, c: Completion, remote: &PrefillTimings) -> pb::GenerateResponse {
    let reason = c.reason.to_wire();
    let cached = remote.cached_tokens.unwrap_or(c.cached_tokens);
    pb::GenerateResponse {
        request_id: request_id.to_string(),
        token_ids: Vec::new(),
        text: c.text,
        logprobs: Vec::new(),
        completion: Some(pb::Completion {
            finish_reason: reason as i32,
            usage: Some(pb::Usage {
                prompt_tokens: c.prompt_tokens as u32,
                completion_tokens: c.completion_tokens as u32,
                prompt_tokens_details: Some(pb::PromptTokensDetails {
                    cached_tokens: cached as u32,
                }),
            }),
            timings: Some(pb::Timings {
                queue_seconds: c.timings.queue.as_secs_f64() + remote.queue,
                prefill_seconds: if remote.prefill > 0.0 {
                    remote.prefill
                } else {
                    c.timings.prefill.as_secs_f64()
                },
                transfer_seconds: remote.transfer,
                time_to_first_token_seconds: c.timings.time_to_first_token.as_secs_f64(),
                total_seconds: c.timings.total.as_secs_f64(),
                computed_prompt_tokens: c.prompt_tokens.saturating_sub(cached) as u32,
            }),
            speculative: c.speculative.map(|s| pb::SpeculativeCounts {
                drafted: s.drafted,
                accepted: s.accepted,
            }),
            beams: c.beams.iter().map(ToWire::to_wire).collect(),
        }),
    }
}

/// Has the named prefill nodes fill `blocks` (the prompt's from `first_block` on; this node's
/// prefix cache supplied those before), one after the other until one succeeds.
async fn prefill_remote(
    inner: &Inner,
    request: &GenerateRequest,
    prefill: &Prefill,
    first_block: usize,
    blocks: Vec<BlockId>,
) -> Result<(SampledToken, PrefillTimings)> {
    let mut last_error = Error::Unavailable("no prefill node was named".into());
    // Each candidate over its backend; one that fails over NCCL is tried again over gRPC.
    let mut attempts: Vec<(&str, TransferBackend)> = Vec::new();
    for (address, backend) in &prefill.candidates {
        attempts.push((address, *backend));
        if *backend != TransferBackend::Grpc {
            attempts.push((address, TransferBackend::Grpc));
        }
    }
    for (attempt, &(address, backend)) in attempts.iter().enumerate() {
        if attempt > 0 {
            metrics::counter!(names::RETRIES_TOTAL, "stage" => "prefill").increment(1);
        }
        let fill = (first_block, blocks.as_slice());
        match prefill_once(inner, request, prefill, fill, address, backend).await {
            Ok(done) => return Ok(done),
            Err(e) => {
                tracing::warn!(prefill = %address, %backend, error = %e, "prefill attempt failed");
                let retry = e.retry();
                last_error = e;
                if retry == Retry::No {
                    // The request's own fault would recur on every prefill node; computing it
                    // here in the reserved blocks is what is left.
                    break;
                }
            }
        }
    }
    Err(last_error)
}

async fn prefill_once(
    inner: &Inner,
    request: &GenerateRequest,
    prefill: &Prefill,
    (first_block, blocks): (usize, &[BlockId]),
    address: &str,
    backend: TransferBackend,
) -> Result<(SampledToken, PrefillTimings)> {
    let started = Instant::now();
    // Dropped on every early return: the transfer closes and late chunks are refused.
    let ticket = inner.receiver.expect(blocks.to_vec());
    let mut token_ids = request.prompt_ids.clone();
    token_ids.extend_from_slice(&request.resume_ids);
    let deadline = inner.options.transfer_timeout;
    let message = pb::PrefillRequest {
        request_id: prefill.request_id.clone(),
        token_ids,
        sampling: Some(prefill.params.to_wire()),
        seed: prefill.params.seed.unwrap_or_default(),
        num_resumed: request.resume_ids.len() as u32,
        destination: Some(pb::KvDestination {
            address: inner.options.self_address.clone(),
            transfer_id: ticket.id(),
            num_blocks: blocks.len() as u32,
            fingerprint: Some(inner.receiver.fingerprint().clone()),
            transfer_backend: backend.to_wire() as i32,
            first_block: first_block as u32,
        }),
        deadline_ms: deadline.as_millis().min(u32::MAX as u128) as u32,
    };
    let mut client = inner.prefill_client(address)?;
    let call = client.prefill(with_request_id(message, &prefill.request_id));
    let response = tokio::time::timeout(deadline + inner.options.answer_grace, call)
        .await
        .map_err(|_| {
            Error::DeadlineExceeded(format!("prefill on {address} took over {deadline:?}"))
        })??
        .into_inner();
    let stats: TransferStats = ticket.finish()?;
    let vocab = inner.engine.vocab_size();
    let first = checked_reply(&response, vocab, request, &prefill.params)
        .map_err(|what| Error::Internal(format!("prefill node {address} sent {what}")))?;
    metrics::histogram!(names::KV_TRANSFER_SECONDS, "direction" => "received")
        .record(stats.duration.as_secs_f64());
    tracing::info!(
        prefill = %address,
        kv_bytes = stats.bytes,
        chunks = stats.chunks,
        seconds = started.elapsed().as_secs_f64(),
        "prompt KV received"
    );
    Ok((
        first,
        PrefillTimings {
            queue: response.queue_seconds,
            prefill: response.prefill_seconds,
            transfer: response.transfer_seconds,
            cached_tokens: Some(response.cached_tokens as usize),
        },
    ))
}

/// The first token of a prefill node's reply, once every field is checked as strictly as a
/// client's request would be; else what is wrong with it.
fn checked_reply(
    response: &pb::PrefillResponse,
    vocab: usize,
    request: &GenerateRequest,
    params: &SamplingParams,
) -> std::result::Result<SampledToken, String> {
    let first = response.first_token.as_ref().ok_or("no first token")?;
    if first.token_id as usize >= vocab {
        return Err(format!(
            "first token {} outside the vocabulary of {vocab}",
            first.token_id
        ));
    }
    // A log-probability is at most 0 (a little over it from rounding).
    let valid_logprob = |lp: f32| !lp.is_nan() && lp <= 1e-3;
    if !valid_logprob(first.logprob) {
        return Err(format!("a first-token logprob of {}", first.logprob));
    }
    let wanted = params.top_candidates();
    if first.top.len() > wanted {
        return Err(format!(
            "{} top logprobs where {wanted} were asked for",
            first.top.len()
        ));
    }
    if let Some(t) = first
        .top
        .iter()
        .find(|t| t.token_id as usize >= vocab || !valid_logprob(t.logprob))
    {
        return Err(format!(
            "a top logprob ({}, {}) out of range",
            t.token_id, t.logprob
        ));
    }
    let prompt = request.prompt_ids.len() + request.resume_ids.len();
    if response.cached_tokens as usize > prompt {
        return Err(format!(
            "{} cached tokens for a prompt of {prompt}",
            response.cached_tokens
        ));
    }
    let seconds = [
        response.queue_seconds,
        response.prefill_seconds,
        response.transfer_seconds,
    ];
    if seconds.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(format!("timings out of range: {seconds:?}"));
    }
    Ok(SampledToken::from_wire(first))
}

impl Inner {
    fn prefill_client(&self, address: &str) -> Result<PrefillClient<Channel>> {
        let mut clients = self
            .prefill_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let client = PrefillClient::new(self.options.rpc.channel(address)?);
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }
}
