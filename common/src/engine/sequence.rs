//! A request's life inside the engine: its tokens, its blocks, its state, and what it streams back.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::kv::BlockId;
use crate::sampling::{FinishReason, SamplingParams, StopChecker};
use crate::tokenizer::IncrementalDecoder;
use crate::Error;

pub type SeqId = u64;

/// What a caller asks the engine for: token ids in, tokens out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Output tokens an earlier attempt already delivered (a request resumed after a node
    /// failed). They are computed with the prompt, count as output (for `max_tokens`, penalties
    /// and the sampling position) and are not streamed again.
    pub resume_ids: Vec<u32>,
}

/// Where a request's prompt KV comes from, and where it goes.
pub enum Placement {
    /// Computed here, then decoded here (aggregated serving).
    Local,
    /// Filled by another node. Once admitted, the engine reserves blocks for every token of the
    /// request so far and sends their ids; the sequence then waits for
    /// [`EngineHandle::activate`](super::EngineHandle::activate) (its KV has arrived, with the
    /// first token) or [`EngineHandle::prefill_locally`](super::EngineHandle::prefill_locally).
    Remote(oneshot::Sender<Vec<BlockId>>),
    /// Prefill only: every layer's KV of every computed chunk goes to the sink as soon as the
    /// layer is done; the request ends after its first token.
    Export(KvSink),
}

/// Receives the KV a prefill computes, layer by layer.
pub type KvSink = mpsc::UnboundedSender<ExportedKv>;

/// One layer's K and V for a run of a sequence's blocks, `[blocks, block_size, kv_heads, head_dim]`.
#[derive(Debug)]
pub struct ExportedKv {
    pub layer: usize,
    /// Index of the run's first block among the sequence's blocks.
    pub first_block: usize,
    pub keys: Tensor,
    pub values: Tensor,
    /// On a GPU: recorded on the engine's stream right after `keys` and `values` were written,
    /// so that a sender on another stream waits for them and not for the layers after.
    #[cfg(feature = "cuda")]
    pub ready: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaEvent>>,
}

impl ExportedKv {
    /// A run read from `cache` just now (on a GPU, with its ready event).
    pub fn read(
        cache: &crate::kv::KvCache,
        layer: usize,
        first_block: usize,
        run: &crate::kv::BlockRun,
    ) -> crate::Result<Self> {
        let (keys, values) = cache.read_run(layer, run)?;
        #[cfg(feature = "cuda")]
        let ready = match keys.device() {
            candle_core::Device::Cuda(d) => Some(std::sync::Arc::new(
                d.cuda_stream()
                    .record_event(None)
                    .map_err(|e| crate::Error::Internal(format!("CUDA: {e}")))?,
            )),
            _ => None,
        };
        Ok(Self {
            layer,
            first_block,
            keys,
            values,
            #[cfg(feature = "cuda")]
            ready,
        })
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text released with this token: may be empty (a multi-byte character still incomplete, a
    /// possible stop string held back, a special token) or hold text of earlier tokens.
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Where a request's time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Waiting before its first forward step.
    pub queue: Duration,
    /// From its first step to its first token.
    pub prefill: Duration,
    /// From arrival to the first token.
    pub time_to_first_token: Duration,
    /// From arrival to the end.
    pub total: Duration,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub reason: FinishReason,
    /// Text still held back when the sequence ended (released now).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// What a request's stream carries, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug)]
pub enum SeqEvent {
    Token(TokenEvent),
    Finished(Completion),
    Failed(Error),
}

/// Where a sequence's KV comes from (see [`Placement`]), once queued.
pub(crate) enum KvSource {
    Local,
    /// Blocks not reserved yet; the sender hears their ids.
    Remote(Option<oneshot::Sender<Vec<BlockId>>>),
    Export(KvSink),
}

/// A sequence as the scheduler sees it.
pub(crate) struct Sequence {
    pub id: SeqId,
    pub prompt_len: usize,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub blocks: Vec<BlockId>,
    pub params: SamplingParams,
    pub seed: u64,
    pub kv: KvSource,
    pub decoder: IncrementalDecoder,
    pub stop: StopChecker,
    /// Per-request stream. Unbounded on purpose: the engine thread must never block on one slow
    /// reader, and a request can queue at most `max_tokens + 1` events.
    pub events: mpsc::UnboundedSender<SeqEvent>,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
}

impl Sequence {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// The client has gone away (for an export, also whoever ships its KV).
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed() || matches!(&self.kv, KvSource::Export(sink) if sink.is_closed())
    }

    pub fn timings(&self, now: Instant) -> Timings {
        let scheduled = self.first_scheduled.unwrap_or(now);
        let first = self.first_token.unwrap_or(now);
        Timings {
            queue: scheduled.saturating_duration_since(self.arrived),
            prefill: first.saturating_duration_since(scheduled),
            time_to_first_token: first.saturating_duration_since(self.arrived),
            total: now.saturating_duration_since(self.arrived),
        }
    }
}
