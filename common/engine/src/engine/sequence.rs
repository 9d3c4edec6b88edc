//! A request's life inside the engine: its tokens, its blocks, its state, and what it streams back.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use super::beam::{BeamOutput, BeamState};
use super::speculative::SpeculativeCounts;
use crate::kv::{BlockHash, BlockId};
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
#[derive(Debug)]
pub enum Placement {
    /// Computed here, then decoded here (aggregated serving).
    Local,
    /// Filled by another node. Once admitted, the engine takes what its prefix cache holds of
    /// the request's tokens, reserves blocks for the rest and says which ones (a
    /// [`Reservation`]); the sequence then waits for
    /// [`EngineHandle::activate`](super::EngineHandle::activate) (its KV has arrived, with the
    /// first token) or [`EngineHandle::prefill_locally`](super::EngineHandle::prefill_locally).
    Remote(oneshot::Sender<Reservation>),
    /// Prefill only: every layer's KV of every computed chunk goes to the sink as soon as the
    /// layer is done, from block `from_block` on (the receiver holds the blocks before it); the
    /// request ends after its first token.
    Export { sink: KvSink, from_block: usize },
}

/// What admitting a [`Placement::Remote`] sequence decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Another node is to fill `blocks`: the sequence's blocks from `first_block` on. The
    /// blocks before it came from this engine's prefix cache.
    Fill {
        first_block: usize,
        blocks: Vec<BlockId>,
    },
    /// The prefix cache holds every block of the prompt but the one its last token is in:
    /// nothing is fetched, the rest is computed here as for a local request.
    Local,
}

/// Receives the KV a prefill computes, layer by layer.
pub type KvSink = mpsc::UnboundedSender<ExportedKv>;

/// One layer's K and V for a run of a sequence's blocks, `[blocks, block_size, kv_heads, head_dim]`.
#[derive(Debug)]
pub struct ExportedKv {
    pub layer: usize,
    /// Index of the run's first block among the blocks the receiver reserved: the sequence's
    /// blocks from the export's `from_block` on.
    pub first_block: usize,
    pub num_blocks: usize,
    pub data: KvData,
}

/// Where an export's K and V are.
#[derive(Debug)]
pub enum KvData {
    /// On the host, as the bytes a KV transfer carries (little-endian elements), read out of the
    /// cache with one copy.
    Host {
        keys: bytes::Bytes,
        values: bytes::Bytes,
    },
    /// On a GPU, as tensors. `ready` is recorded on the engine's stream right after they were
    /// written, so that a sender on another stream waits for them and not for the layers after.
    #[cfg(feature = "cuda")]
    Device {
        keys: Tensor,
        values: Tensor,
        ready: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaEvent>>,
    },
}

impl ExportedKv {
    /// A run read from `cache` just now (on a GPU, with its ready event).
    pub fn read(
        cache: &crate::kv::KvCache,
        layer: usize,
        first_block: usize,
        run: &crate::kv::BlockRun,
    ) -> crate::Result<Self> {
        let num_blocks = run.blocks().len();
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(d) = cache.layer(layer)?.0.device() {
            let (keys, values) = cache.read_run(layer, run)?;
            let ready = d
                .cuda_stream()
                .record_event(None)
                .map_err(|e| crate::Error::Internal(format!("CUDA: {e}")))?;
            return Ok(Self {
                layer,
                first_block,
                num_blocks,
                data: KvData::Device {
                    keys,
                    values,
                    ready: Some(std::sync::Arc::new(ready)),
                },
            });
        }
        let (keys, values) = cache.read_block_shared(layer, run.blocks())?;
        Ok(Self {
            layer,
            first_block,
            num_blocks,
            data: KvData::Host { keys, values },
        })
    }

    /// An export of K and V tensors `[blocks, block_size, kv_heads, head_dim]` (host bytes for
    /// CPU tensors; GPU tensors stay on their device, with no event).
    pub fn from_tensors(
        layer: usize,
        first_block: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> crate::Result<Self> {
        let num_blocks = keys.dim(0)?;
        #[cfg(feature = "cuda")]
        if keys.device().is_cuda() {
            return Ok(Self {
                layer,
                first_block,
                num_blocks,
                data: KvData::Device {
                    keys: keys.contiguous()?,
                    values: values.contiguous()?,
                    ready: None,
                },
            });
        }
        Ok(Self {
            layer,
            first_block,
            num_blocks,
            data: KvData::Host {
                keys: crate::kv::tensor_bytes(keys)?.into(),
                values: crate::kv::tensor_bytes(values)?.into(),
            },
        })
    }

    /// K and V as host bytes (from a GPU: copied through the engine's stream).
    pub fn host_bytes(&self) -> crate::Result<(bytes::Bytes, bytes::Bytes)> {
        match &self.data {
            KvData::Host { keys, values } => Ok((keys.clone(), values.clone())),
            #[cfg(feature = "cuda")]
            KvData::Device { keys, values, .. } => Ok((
                crate::kv::tensor_bytes(keys)?.into(),
                crate::kv::tensor_bytes(values)?.into(),
            )),
        }
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
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
    /// Drafted and accepted tokens, when the engine decodes speculatively.
    pub speculative: Option<SpeculativeCounts>,
    /// Beam search's answer, best first (empty for a sampled request, which streams its
    /// tokens instead). `text` and `reason` are then the best beam's, `completion_tokens` the
    /// tokens of all of them.
    pub beams: Vec<BeamOutput>,
}

/// What a request's stream carries, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug)]
pub enum SeqEvent {
    Token(TokenEvent),
    Finished(Completion),
    Failed(Error),
}

/// Where a sequence is in its life. Each state says which collection of the engine holds it:
/// `Waiting` and `Preempted` are queued and hold no blocks; `AwaitingKv` holds blocks that
/// another node fills; `Prefilling`, `Exporting` and `Decoding` hold blocks and run in steps.
/// A finished sequence leaves the engine at once (its last event carries the reason).
#[derive(Debug)]
pub(crate) enum SeqState {
    /// Arrived and not yet admitted; how its prompt KV will come about. (A remote sequence
    /// whose prompt the prefix cache holds becomes a local one before admission.)
    Waiting(Placement),
    /// Its blocks were taken back for others; it recomputes from the start when readmitted,
    /// ahead of new arrivals. (Only locally computed sequences are preempted, so this is never
    /// `Placement::Remote`.)
    Preempted(Placement),
    /// Holding blocks reserved for the KV another node is computing; never preempted.
    AwaitingKv,
    /// Computing its prompt (and resumed tokens) here, chunk by chunk.
    Prefilling,
    /// Prefill only: computing its prompt here, each layer's KV going to the sink.
    Exporting(KvSink),
    /// Generating, one token a step.
    Decoding,
}

impl SeqState {
    pub fn name(&self) -> &'static str {
        match self {
            SeqState::Waiting(_) => "waiting",
            SeqState::Preempted(_) => "preempted",
            SeqState::AwaitingKv => "awaiting_kv",
            SeqState::Prefilling => "prefilling",
            SeqState::Exporting(_) => "exporting",
            SeqState::Decoding => "decoding",
        }
    }

    /// Queued for admission, holding no blocks.
    pub fn is_queued(&self) -> bool {
        matches!(self, SeqState::Waiting(_) | SeqState::Preempted(_))
    }

    /// Holding blocks and scheduled in steps.
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            SeqState::Prefilling | SeqState::Exporting(_) | SeqState::Decoding
        )
    }

    /// Whether a sequence may go from `self` to `to`: the life cycle in one table.
    pub fn may_become(&self, to: &SeqState) -> bool {
        use SeqState::*;
        matches!(
            (self, to),
            (Waiting(_), Prefilling | Exporting(_) | AwaitingKv)
                | (Waiting(Placement::Remote(_)), Waiting(Placement::Local))
                | (Preempted(_), Prefilling | Exporting(_))
                | (AwaitingKv, Decoding | Prefilling)
                | (Prefilling, Decoding | Preempted(_))
                | (Exporting(_), Preempted(_))
                | (Decoding, Preempted(_))
        )
    }

    /// The sink of a prefill-only sequence, in whichever state it is.
    pub fn export_sink(&self) -> Option<&KvSink> {
        match self {
            SeqState::Exporting(sink)
            | SeqState::Waiting(Placement::Export { sink, .. })
            | SeqState::Preempted(Placement::Export { sink, .. }) => Some(sink),
            _ => None,
        }
    }
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
    /// Names of the full blocks of `tokens` (as far as they have been needed), for the prefix
    /// cache.
    pub block_hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` the prefix cache has seen: found there at admission, or
    /// computed and offered to it since.
    pub cached_blocks: usize,
    /// A prefill-only sequence: leading blocks whose KV went to the sink. Each block goes once,
    /// when its last token is computed (or the prompt ends in it), and not again when a
    /// preempted sequence recomputes it: the receiver has it already.
    pub exported_blocks: usize,
    /// A prefill-only sequence: the first block it ships (the receiver holds those before).
    pub export_from: usize,
    /// Prompt tokens the prefix cache held at the admission that computed the prompt.
    pub cached_prompt_tokens: usize,
    pub params: SamplingParams,
    pub seed: u64,
    pub state: SeqState,
    pub decoder: IncrementalDecoder,
    pub stop: StopChecker,
    /// Per-request stream. Unbounded on purpose: the engine thread must never block on one slow
    /// reader, and a request can queue at most `max_tokens + 1` events.
    pub events: mpsc::UnboundedSender<SeqEvent>,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    /// Tokens drafted for this step, run after the last sampled one (speculative decoding);
    /// empty between steps.
    pub draft: Vec<u32>,
    /// Most tokens to draft next step: a run of agreement lengthens it, a rejection shortens
    /// it to what was accepted plus one (0 until the first draft: the configured length).
    pub draft_len: usize,
    /// Drafts the draft model is to make for this step (`draft_model` method; 0 otherwise):
    /// the scheduler sets aside their blocks, the draft pass fills `draft`.
    pub model_drafts: usize,
    /// Tokens whose KV the draft model's cache holds for this sequence, at the positions of
    /// the sequence's own blocks; never more than `num_computed` counts as valid.
    pub draft_computed: usize,
    pub speculative: SpeculativeCounts,
    /// Set on the sequences of a beam search: which search, and the beam's score so far.
    pub beam: Option<BeamState>,
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
        self.events.is_closed() || self.state.export_sink().is_some_and(|s| s.is_closed())
    }

    /// A prefill-only sequence (its KV goes to another node; it ends with its first token).
    pub fn is_export(&self) -> bool {
        self.state.export_sink().is_some()
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
