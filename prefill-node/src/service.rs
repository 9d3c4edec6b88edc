//! `Prefill.Prefill` and `Node.Stats` as a prefill node serves them.
//!
//! A prefill runs in the engine like any request, batched with others under the token budget
//! and chunked when long, but exports each layer's KV the moment the layer is computed and ends
//! after its first token. The export streams into the decode node's `KvTransfer.Push` while later
//! layers compute. The whole call has the caller's deadline; when it passes, or the decode node
//! refuses the transfer, dropping the export cancels the sequence and frees its blocks here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_common::engine::{EngineHandle, GenerateRequest, Placement, SeqEvent, Timings};
use pd_common::kv::blocks_for_tokens;
use pd_common::sampling::{SampledToken, SamplingParams};
use pd_common::telemetry;
use pd_common::transfer::{self, grpc};
use pd_common::{node, Error, Result};
use pd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Used when a caller sets no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct PrefillService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    node_id: String,
    fingerprint: pb::ModelFingerprint,
    block_size: usize,
    admitting: AtomicBool,
    /// NCCL links to decode nodes, opened on first use.
    #[cfg(feature = "nccl")]
    nccl: pd_common::transfer::nccl::NcclSender,
}

impl PrefillService {
    pub fn new(engine: EngineHandle, node_id: String, fingerprint: pb::ModelFingerprint) -> Self {
        let block_size = engine.cache().spec().block_size;
        Self {
            inner: Arc::new(Inner {
                engine,
                node_id,
                fingerprint,
                block_size,
                admitting: AtomicBool::new(true),
                #[cfg(feature = "nccl")]
                nccl: Default::default(),
            }),
        }
    }

    /// New prefills are refused with `Unavailable` from now on (shutting down).
    pub fn stop_admitting(&self) {
        self.inner.admitting.store(false, Ordering::SeqCst);
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
            if !inner.admitting.load(Ordering::SeqCst) {
                return Err(Status::unavailable("the prefill node is shutting down"));
            }
            let r = request.into_inner();
            let deadline = match r.deadline_ms {
                0 => DEFAULT_DEADLINE,
                ms => Duration::from_millis(ms as u64),
            };
            let response = tokio::time::timeout(deadline, prefill(&inner, &request_id, r))
                .await
                .map_err(|_| {
                    Error::DeadlineExceeded(format!("the prefill did not end within {deadline:?}"))
                })
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
) -> Result<pb::PrefillResponse> {
    let destination = r
        .destination
        .ok_or_else(|| Error::invalid("a prefill request needs a KV destination"))?;
    let theirs = destination
        .fingerprint
        .as_ref()
        .ok_or_else(|| Error::invalid("the KV destination carries no fingerprint"))?;
    // Refuse before computing anything: KV for another model or layout is useless there.
    transfer::check_fingerprint(&inner.fingerprint, theirs)?;
    let num_resumed = r.num_resumed as usize;
    if num_resumed >= r.token_ids.len() {
        return Err(Error::invalid(format!(
            "{num_resumed} resumed tokens leave no prompt among {} tokens",
            r.token_ids.len()
        )));
    }
    let needed = blocks_for_tokens(r.token_ids.len(), inner.block_size);
    if destination.num_blocks as usize != needed {
        return Err(Error::invalid(format!(
            "{} tokens need {needed} blocks; the destination reserved {}",
            r.token_ids.len(),
            destination.num_blocks
        )));
    }
    let mut params = SamplingParams::from(&r.sampling.unwrap_or_default());
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
    let (sink, exported) = mpsc::unbounded_channel();
    let mut stream = inner
        .engine
        .submit(request, Placement::Export(sink))
        .await?;

    let handshake = pb::KvHandshake {
        request_id: request_id.to_string(),
        transfer_id: destination.transfer_id,
        fingerprint: Some(inner.fingerprint.clone()),
        num_blocks: destination.num_blocks,
        ..Default::default()
    };
    let client = grpc::client(&destination.address)?;
    let push = async {
        match destination.transfer_backend.as_str() {
            "" | "grpc" => grpc::push(client, request_id, handshake, exported).await,
            #[cfg(feature = "nccl")]
            "nccl" => {
                let device = inner.engine.cache().layer(0)?.0.device().clone();
                inner
                    .nccl
                    .push(
                        client,
                        &destination.address,
                        request_id,
                        handshake,
                        &device,
                        exported,
                    )
                    .await
            }
            other => Err(Error::invalid(format!(
                "this prefill node cannot send KV over {other:?}"
            ))),
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
                        Some(f) => Ok((f, c.timings, Instant::now())),
                        None => Err(Error::Cancelled("the prefill was cancelled".into())),
                    }
                }
                Some(SeqEvent::Failed(e)) => return Err(e),
                None => return Err(Error::EngineClosed),
            }
        }
    };
    let (pushed, computed) = tokio::join!(push, computed);
    // A refused or broken push explains a cancelled prefill better than the cancellation does.
    let ack = pushed?;
    let (first, timings, computed_at): (SampledToken, Timings, Instant) = computed?;
    let transfer_seconds = computed_at.elapsed().as_secs_f64();
    tracing::info!(
        kv_bytes = ack.bytes,
        chunks = ack.chunks,
        prefill_seconds = timings.prefill.as_secs_f64(),
        exposed_transfer_seconds = transfer_seconds,
        "prefill shipped"
    );
    Ok(pb::PrefillResponse {
        first_token: Some(pb::TokenLogprobs::from(&first)),
        queue_seconds: timings.queue.as_secs_f64(),
        prefill_seconds: timings.prefill.as_secs_f64(),
        transfer_seconds,
        kv_bytes: ack.bytes,
    })
}

#[tonic::async_trait]
impl pb::node_server::Node for PrefillService {
    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        let s = self.inner.engine.stats().await?;
        Ok(Response::new(node::node_stats(
            &self.inner.node_id,
            pb::NodeRole::Prefill,
            &s,
        )))
    }
}
