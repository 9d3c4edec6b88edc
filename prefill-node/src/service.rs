//! `Prefill.Prefill` and `Node.Stats` as a prefill node serves them.
//!
//! A prefill runs in the engine like any request, batched with others under the token budget
//! and chunked when long, but exports each layer's KV the moment the layer is computed and ends
//! after its first token. The export streams into the decode node's `KvTransfer.Push` while later
//! layers compute. The whole call has the caller's deadline; when it passes, or the decode node
//! refuses the transfer, dropping the export cancels the sequence and frees its blocks here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_common::engine::{Completion, EngineHandle, GenerateRequest, Placement, SeqEvent};
use pd_common::error::status;
use pd_common::kv::blocks_for_tokens;
use pd_common::node::RequestTasks;
use pd_common::rpc::RpcConfig;
use pd_common::sampling::{SampledToken, SamplingParams};
use pd_common::telemetry::{self, names};
use pd_common::transfer::{self, grpc, push, TransferBackend};
use pd_common::wire::{FromWire, ToWire};
use pd_common::{node, EngineError, Error, Result};
use pd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::backlog::Backlog;

/// What a prefill node is told at start-up.
pub struct Options {
    pub node_id: String,
    pub fingerprint: pb::ModelFingerprint,
    /// Deadline of a prefill whose caller sets none, and the longest one a caller may ask for.
    pub deadline: Duration,
    pub rpc: RpcConfig,
    #[cfg(feature = "nccl")]
    pub nccl: transfer::nccl::NcclConfig,
}

#[derive(Clone)]
pub struct PrefillService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    options: Options,
    block_size: usize,
    /// Refuses new prefills once shutdown starts; runs each prefill as a task for the drain.
    tasks: RequestTasks,
    /// Channels to decode nodes' `KvTransfer`, kept across transfers.
    clients: grpc::Clients,
    /// How far behind the node is, to refuse prefills it cannot do in time.
    backlog: Arc<Backlog>,
    /// NCCL links to decode nodes, opened on first use.
    #[cfg(feature = "nccl")]
    nccl: transfer::nccl::NcclSender,
}

impl PrefillService {
    pub fn new(engine: EngineHandle, tasks: RequestTasks, options: Options) -> Self {
        let block_size = engine.cache().spec().block_size;
        Self {
            inner: Arc::new(Inner {
                engine,
                block_size,
                tasks,
                clients: grpc::Clients::default(),
                backlog: Arc::default(),
                #[cfg(feature = "nccl")]
                nccl: transfer::nccl::NcclSender::new(options.nccl.clone()),
                options,
            }),
        }
    }
}

#[tonic::async_trait]
impl pb::prefill_server::Prefill for PrefillService {
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let request_id = telemetry::request_id_of(&request);
        let span = tracing::info_span!("prefill", request_id = %request_id);
        let inner = self.inner.clone();
        async move {
            if !inner.tasks.admitting() {
                return Err(Status::unavailable("the prefill node is shutting down"));
            }
            let r = request.into_inner();
            let longest = inner.options.deadline;
            let deadline = match r.deadline_ms {
                0 => longest,
                ms => Duration::from_millis(ms as u64).min(longest),
            };
            // A task of the node's tracker: the drain waits for prefills in flight.
            let work = {
                let (inner, request_id) = (inner.clone(), request_id.clone());
                async move {
                    tokio::time::timeout(deadline, prefill(&inner, &request_id, r, deadline))
                        .await
                        .map_err(|_| {
                            Error::DeadlineExceeded(format!(
                                "the prefill did not end within {deadline:?}"
                            ))
                        })
                        .and_then(|r| r)
                }
            };
            let response = inner
                .tasks
                .spawn(work.in_current_span())
                .await
                .map_err(|e| Error::Internal(format!("the prefill task failed: {e}")))
                .and_then(|r| r);
            match response {
                Ok(r) => Ok(Response::new(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "prefill failed");
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}

async fn prefill(
    inner: &Inner,
    request_id: &str,
    r: pb::PrefillRequest,
    deadline: Duration,
) -> Result<pb::PrefillResponse> {
    let destination = r
        .destination
        .ok_or_else(|| Error::invalid("a prefill request needs a KV destination"))?;
    let theirs = destination
        .fingerprint
        .as_ref()
        .ok_or_else(|| Error::invalid("the KV destination carries no fingerprint"))?;
    // Refuse before computing anything: KV for another model or layout is useless there.
    transfer::check_fingerprint(&inner.options.fingerprint, theirs)?;
    let num_resumed = r.num_resumed as usize;
    if num_resumed >= r.token_ids.len() {
        return Err(Error::invalid(format!(
            "{num_resumed} resumed tokens leave no prompt among {} tokens",
            r.token_ids.len()
        )));
    }
    let needed = blocks_for_tokens(r.token_ids.len(), inner.block_size);
    let first_block = destination.first_block as usize;
    if first_block + destination.num_blocks as usize != needed || destination.num_blocks == 0 {
        // The last block is never the destination's already: its last token is computed.
        return Err(Error::invalid(format!(
            "{} tokens need {needed} blocks; the destination holds {first_block} and reserved {}",
            r.token_ids.len(),
            destination.num_blocks
        )));
    }
    let mut params = SamplingParams::from_wire(&r.sampling.unwrap_or_default());
    params.seed = params.seed.or(Some(r.seed));
    // This node samples one token; the request's own max_tokens is the decode node's business
    // and must not make a smaller cache here refuse the prompt.
    params.max_tokens = r.num_resumed + 1;
    let mut prompt_ids = r.token_ids;
    let resume_ids = prompt_ids.split_off(prompt_ids.len() - num_resumed);
    let request = GenerateRequest {
        prompt_ids,
        params,
        resume_ids,
    };
    let own = request.prompt_ids.len() + request.resume_ids.len();
    let mut taken = match inner.backlog.take(own, deadline) {
        Ok(taken) => taken,
        Err((wait, ahead)) => {
            metrics::counter!(names::PREFILLS_REFUSED_TOTAL, "reason" => "behind").increment(1);
            return Err(Error::Unavailable(format!(
                "this prefill node is about {:.1} s behind ({ahead} prompt tokens ahead), \
                 past the {deadline:?} deadline",
                wait.as_secs_f64()
            )));
        }
    };
    metrics::counter!(names::PREFILLS_TOTAL).increment(1);
    let (sink, exported) = mpsc::unbounded_channel();
    let mut stream = inner
        .engine
        .submit(
            request,
            Placement::Export {
                sink,
                from_block: first_block,
            },
        )
        .await?;

    let handshake = pb::KvHandshake {
        request_id: request_id.to_string(),
        transfer_id: destination.transfer_id,
        fingerprint: Some(inner.options.fingerprint.clone()),
        num_blocks: destination.num_blocks,
        ..Default::default()
    };
    let backend = TransferBackend::from_wire(destination.transfer_backend)?;
    let channel = inner
        .clients
        .get(&inner.options.rpc, &destination.address)?;
    let push = async {
        match backend {
            TransferBackend::Grpc => {
                push::push(
                    channel,
                    &destination.address,
                    request_id,
                    handshake,
                    exported,
                    grpc::GrpcSink::new(),
                )
                .await
            }
            #[cfg(feature = "nccl")]
            TransferBackend::Nccl => {
                let device = inner.engine.cache().layer(0)?.0.device().clone();
                let sink = inner
                    .nccl
                    .sink(&channel, &destination.address, &handshake, &device)
                    .await?;
                push::push(
                    channel,
                    &destination.address,
                    request_id,
                    handshake,
                    exported,
                    sink,
                )
                .await
            }
            #[cfg(not(feature = "nccl"))]
            TransferBackend::Nccl => {
                let _ = &channel;
                Err(Error::invalid(
                    "this prefill node was built without NCCL and cannot send KV over it",
                ))
            }
        }
    };
    let computed = async {
        let mut first = None;
        loop {
            match stream.next().await {
                Some(SeqEvent::Token(t)) => {
                    first = Some(SampledToken {
                        id: t.id,
                        logprob: t.logprob,
                        top_logprobs: t.top_logprobs,
                    })
                }
                Some(SeqEvent::Finished(c)) => {
                    return match first {
                        Some(f) => Ok((f, c, Instant::now())),
                        None => Err(Error::Cancelled("the prefill was cancelled".into())),
                    }
                }
                Some(SeqEvent::Failed(e)) => return Err(e.into()),
                None => return Err(EngineError::EngineClosed.into()),
            }
        }
    };
    let (pushed, computed) = tokio::join!(push, computed);
    // A refused or broken push explains a cancelled prefill better than the cancellation does.
    let ack = pushed?;
    let (first, completion, computed_at): (SampledToken, Completion, Instant) = computed?;
    let timings = completion.timings;
    taken.finished(own.saturating_sub(completion.cached_tokens), computed_at);
    let transfer_seconds = computed_at.elapsed().as_secs_f64();
    tracing::info!(
        kv_bytes = ack.bytes,
        chunks = ack.chunks,
        prefill_seconds = timings.prefill.as_secs_f64(),
        exposed_transfer_seconds = transfer_seconds,
        "prefill shipped"
    );
    Ok(pb::PrefillResponse {
        first_token: Some(first.to_wire()),
        queue_seconds: timings.queue.as_secs_f64(),
        prefill_seconds: timings.prefill.as_secs_f64(),
        transfer_seconds,
        kv_bytes: ack.bytes,
        cached_tokens: completion.cached_tokens as u32,
    })
}

#[tonic::async_trait]
impl pb::node_server::Node for PrefillService {
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
            pb::NodeRole::Prefill,
            &s,
        )))
    }
}
