//! The engine's state: every sequence by id, and the life-cycle transitions that move them
//! between the queue and the running batch. Scheduling is in [`super::scheduler`], the step
//! itself in [`super::step`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::beam::{normalized_candidates, BeamGroup, BeamState};
use super::config::EngineConfig;
use super::draft::DraftModel;
use super::sequence::{GenerateRequest, Placement, SeqEvent, SeqId, SeqState, Sequence};
use super::speculative::SpecDecodeStats;
use crate::kv::{BlockHash, KvBlockAllocator, KvCache, KvEventLog, PrefixKey};
use crate::model::LlamaModel;
use crate::sampling::{FinishReason, SampledToken, StopChecker};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::{Error, Result};

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    /// Holding reserved blocks while another node fills them.
    pub awaiting_kv: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
    /// Tokens not yet run through the model: queued prompts and unfinished prompt chunks.
    pub pending_tokens: usize,
    /// Sequences preempted (blocks taken back, to recompute later) since the engine started.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission since the engine started, and
    /// of those, tokens whose KV was found there.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Blocks in the prefix cache (those nobody references count as free too).
    pub cached_blocks: usize,
    /// Most sequences a step runs (`--max-num-seqs`): what the node can run at once.
    pub max_num_seqs: usize,
    /// Speculative decoding's totals (zero when it is off).
    pub spec_decode: SpecDecodeStats,
}

pub struct EngineCore {
    pub(super) model: Arc<LlamaModel>,
    pub(super) tokenizer: Option<Arc<Tokenizer>>,
    pub(super) eog_ids: Vec<u32>,
    pub(super) config: EngineConfig,
    pub(super) max_model_len: usize,
    pub(super) cache: KvCache,
    pub(super) allocator: KvBlockAllocator,
    /// Every sequence the engine holds, whatever its state.
    pub(super) seqs: HashMap<SeqId, Sequence>,
    /// The `Waiting` and `Preempted` sequences, in admission order (preempted ones first).
    pub(super) queue: VecDeque<SeqId>,
    /// The sequences that run in steps (`Prefilling`, `Exporting`, `Decoding`), oldest first:
    /// the youngest is the first to be preempted.
    pub(super) running: Vec<SeqId>,
    pub(super) next_id: SeqId,
    pub(super) preemptions: u64,
    /// Where block names start ([`PrefixKey::root`]); `None` with prefix caching off.
    pub(super) prefix_root: Option<BlockHash>,
    pub(super) prefix_queries: u64,
    pub(super) prefix_hits: u64,
    pub(super) kv_events: Arc<KvEventLog>,
    pub(super) spec_decode: SpecDecodeStats,
    /// The beam searches in progress, by the id of each request's first sequence.
    pub(super) beam_groups: HashMap<SeqId, BeamGroup>,
    /// Speculative decoding's draft model, with its cache (`draft_model` method only).
    pub(super) draft_model: Option<DraftModel>,
}

impl EngineCore {
    pub fn new(
        model: Arc<LlamaModel>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        // The draft model's weights load first: on a GPU the KV cache takes what they leave.
        // (A valid config names a model for the draft_model method only.)
        let speculative = config.speculative_config.as_ref();
        speculative.map(|s| s.validate()).transpose()?;
        let draft = match speculative.and_then(|s| s.model.as_deref()) {
            Some(source) => Some(DraftModel::load(source, &model)?),
            None => None,
        };
        let mut spec = config.cache_spec(model.config(), model.device())?;
        if let (Some(draft), 0) = (&draft, config.num_blocks) {
            // The two caches share the memory set aside for KV, block for block.
            let own = spec.bytes_per_block();
            let both = own + DraftModel::cache_spec(draft, &spec).bytes_per_block();
            spec.num_blocks = (spec.num_blocks * own / both).max(1);
        }
        let max_model_len = config.max_model_len(model.config(), &spec);
        let allocator = KvBlockAllocator::new(spec.num_blocks);
        tracing::info!(
            blocks = spec.num_blocks,
            block_size = spec.block_size,
            mib = (spec.num_blocks * spec.bytes_per_block()) >> 20,
            dtype = ?spec.dtype,
            max_model_len,
            "KV cache"
        );
        let prefix_root = config.enable_prefix_caching.then(|| {
            PrefixKey {
                model: model.config().name.clone(),
                num_layers: spec.num_layers,
                num_kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                kv_dtype: spec.dtype.as_str().to_string(),
                block_size: spec.block_size,
            }
            .root()
        });
        let kv_events = Arc::new(KvEventLog::new(
            prefix_root,
            spec.block_size,
            KvEventLog::DEFAULT_CAPACITY,
        ));
        let draft_model = match draft {
            Some(draft) => Some(DraftModel::new(draft, &spec)?),
            None => None,
        };
        let cache = KvCache::new(spec, model.device())?;
        let eog_ids = tokenizer
            .as_ref()
            .map(|t| t.eog_token_ids().to_vec())
            .unwrap_or_default();
        Ok(Self {
            model,
            tokenizer,
            eog_ids,
            config,
            max_model_len,
            cache,
            allocator,
            seqs: HashMap::new(),
            queue: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
            prefix_root,
            prefix_queries: 0,
            prefix_hits: 0,
            kv_events,
            spec_decode: SpecDecodeStats::default(),
            beam_groups: HashMap::new(),
            draft_model,
        })
    }

    /// The prefix cache's change log, which the node streams to routers.
    pub fn kv_events(&self) -> &Arc<KvEventLog> {
        &self.kv_events
    }

    /// Moves the allocator's cache changes into the event log.
    pub(super) fn publish_kv_events(&mut self) {
        let events = self.allocator.take_events();
        if !events.is_empty() {
            self.kv_events.append(events);
        }
    }

    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    /// The cache tensors (shared: a KV receiver writes into blocks reserved for it).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Whether a step could compute something. Sequences awaiting remote KV are not work.
    pub fn has_work(&self) -> bool {
        !self.queue.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        let seq = |id: &SeqId| self.seqs.get(id);
        EngineStats {
            max_num_seqs: self.config.max_num_seqs,
            waiting: self.queue.len(),
            running: self.running.len(),
            awaiting_kv: self.holding_blocks() - self.running.len(),
            free_blocks: self.allocator.num_free(),
            total_blocks: self.allocator.num_blocks(),
            // A decoding sequence always has its one sampled token pending: not prompt work.
            pending_tokens: self
                .queue
                .iter()
                .filter_map(seq)
                .map(|s| s.pending())
                .sum::<usize>()
                + self
                    .running
                    .iter()
                    .filter_map(seq)
                    .map(|s| s.pending())
                    .filter(|&n| n > 1)
                    .sum::<usize>(),
            preemptions: self.preemptions,
            prefix_cache_queries: self.prefix_queries,
            prefix_cache_hits: self.prefix_hits,
            cached_blocks: self.allocator.num_cached(),
            spec_decode: self.spec_decode,
        }
    }

    /// Sequences holding blocks: running ones and those awaiting remote KV.
    pub(super) fn holding_blocks(&self) -> usize {
        self.seqs.len() - self.queue.len()
    }

    /// Checks a request against the model and this engine's limits.
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if req.prompt_ids.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if let Some(id) = req.prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "prompt token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        if let Some(id) = req.resume_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "resumed token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        req.params.validate(vocab)?;
        let max_tokens = req.params.max_tokens as usize;
        if req.params.is_beam_search() && !req.resume_ids.is_empty() {
            // A beam search streams nothing until it ends: there is nothing to resume from.
            return Err(Error::invalid(
                "a beam search cannot resume from generated tokens",
            ));
        }
        if req.resume_ids.len() >= max_tokens {
            return Err(Error::invalid(format!(
                "{} tokens already generated leave nothing to generate under max_tokens {max_tokens}",
                req.resume_ids.len()
            )));
        }
        if req.prompt_ids.len() + max_tokens > self.max_model_len {
            return Err(Error::PromptTooLong {
                prompt_tokens: req.prompt_ids.len(),
                max_tokens,
                context: self.max_model_len,
            });
        }
        Ok(())
    }

    /// Queues a request to run here from start to end; its tokens arrive on `events`.
    pub fn add_request(
        &mut self,
        req: GenerateRequest,
        events: mpsc::UnboundedSender<SeqEvent>,
    ) -> Result<SeqId> {
        self.submit(req, Placement::Local, events)
    }

    /// Queues a request whose KV is computed as `placement` says.
    pub fn submit(
        &mut self,
        req: GenerateRequest,
        placement: Placement,
        events: mpsc::UnboundedSender<SeqEvent>,
    ) -> Result<SeqId> {
        self.validate(&req)?;
        let id = self.next_id;
        self.next_id += 1;
        let seed = req.params.seed.unwrap_or_else(rand::random);
        let mut decoder = IncrementalDecoder::new(req.params.skip_special_tokens);
        let mut stop = StopChecker::from_params(&req.params);
        // Replay resumed tokens through the detokenizer and stop checker: their text went out
        // already, and what was held back then (a partial character, a possible stop string)
        // must be held back now too. Both are deterministic, so the replay ends in that state.
        let exporting = matches!(placement, Placement::Export { .. });
        let export_from = match placement {
            Placement::Export { from_block, .. } => from_block,
            _ => 0,
        };
        if let (Some(tok), false) = (&self.tokenizer, exporting) {
            for &token in &req.resume_ids {
                let piece = decoder.push(tok, token)?;
                stop.push(&piece);
            }
        }
        let beam = (req.params.is_beam_search() && !exporting).then(|| BeamState {
            group: id,
            cum_logprob: 0.0,
            steps: Vec::new(),
        });
        let mut tokens = req.prompt_ids;
        let prompt_len = tokens.len();
        tokens.extend_from_slice(&req.resume_ids);
        self.seqs.insert(
            id,
            Sequence {
                id,
                prompt_len,
                num_computed: 0,
                blocks: Vec::new(),
                block_hashes: Vec::new(),
                cached_blocks: 0,
                exported_blocks: export_from,
                export_from,
                cached_prompt_tokens: 0,
                decoder,
                stop,
                tokens,
                params: req.params,
                seed,
                state: SeqState::Waiting(placement),
                events,
                arrived: Instant::now(),
                first_scheduled: None,
                first_token: None,
                draft: Vec::new(),
                draft_len: 0,
                model_drafts: 0,
                draft_computed: 0,
                speculative: Default::default(),
                beam,
            },
        );
        if let Some(seq) = self.seqs.get(&id).filter(|s| s.beam.is_some()) {
            self.beam_groups.insert(id, BeamGroup::new(seq));
        }
        self.queue.push_back(id);
        Ok(id)
    }

    /// A sequence awaiting remote KV has it now, with its first token sampled there: it joins
    /// the running batch.
    pub fn activate(&mut self, id: SeqId, first: SampledToken) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if first.id as usize >= vocab {
            // A peer's word is not trusted with the embedding table: the caller falls back.
            return Err(Error::invalid(format!(
                "first token {} is outside the vocabulary of {vocab}",
                first.id
            )));
        }
        let beam = self.seqs.get(&id).is_some_and(|s| s.beam.is_some());
        let bad = |&(t, lp): &(u32, f32)| t as usize >= vocab || lp.is_nan() || lp > 1e-3;
        if beam && (first.top_logprobs.is_empty() || first.top_logprobs.iter().any(bad)) {
            return Err(Error::invalid(
                "the prefill's beam candidates are missing or out of range",
            ));
        }
        self.expect_awaiting(id)?;
        let seq = self.seq_mut(id)?;
        seq.num_computed = seq.tokens.len();
        seq.first_scheduled.get_or_insert_with(Instant::now);
        // The KV that arrived is what this node would have computed: later prompts reuse it.
        self.cache_computed(id);
        self.publish_kv_events();
        self.set_state(id, SeqState::Decoding)?;
        if self.beam_group_of(id).is_some() {
            // The prefill node sent the prompt's candidates with its first token.
            let n = self.seq_mut(id)?.params.top_candidates();
            self.beam_scored(id, normalized_candidates(first.top_logprobs, n));
            return Ok(());
        }
        let outcome = self.append(id, first);
        self.settle(id, outcome);
        Ok(())
    }

    /// A sequence awaiting remote KV computes it here instead, in the blocks it holds.
    pub fn prefill_locally(&mut self, id: SeqId) -> Result<()> {
        self.expect_awaiting(id)?;
        let bs = self.cache.spec().block_size;
        let seq = self.seq_mut(id)?;
        // The blocks its prefix cache supplied hold their KV already (and are shared).
        seq.num_computed = seq.cached_blocks * bs;
        self.set_state(id, SeqState::Prefilling)?;
        Ok(())
    }

    fn expect_awaiting(&self, id: SeqId) -> Result<()> {
        match self.seqs.get(&id).map(|s| &s.state) {
            Some(SeqState::AwaitingKv) => Ok(()),
            _ => Err(Error::NotFound(format!(
                "sequence {id} is not awaiting KV (finished or cancelled)"
            ))),
        }
    }

    pub(super) fn seq_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs
            .get_mut(&id)
            .ok_or_else(|| Error::Internal(format!("sequence {id} is gone")))
    }

    /// Ends a request early and frees its blocks. Returns whether it was found.
    pub fn abort(&mut self, id: SeqId) -> bool {
        if self.beam_groups.contains_key(&id) {
            // A beam search, by its request's id: every beam goes.
            self.drop_beams(id, None);
            return true;
        }
        if !self.seqs.contains_key(&id) {
            return false;
        }
        self.finish(id, FinishReason::Cancelled);
        true
    }

    /// Fails every sequence with `Unavailable` (shutdown after the drain deadline): a router
    /// resumes such a request on another node.
    pub fn abort_all(&mut self) {
        let all: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in all {
            self.fail(id, Error::Unavailable("the node is shutting down".into()));
        }
    }

    /// Cancels sequences whose client has gone away, freeing their blocks.
    pub fn drop_abandoned(&mut self) {
        let abandoned: Vec<SeqId> = self
            .seqs
            .values()
            .filter(|s| s.is_abandoned())
            .map(|s| s.id)
            .collect();
        for id in abandoned {
            tracing::debug!(seq = id, "client went away");
            self.abort(id);
        }
    }

    /// Moves sequence `id` to state `to`, keeping the queue and the running list in step with
    /// the states; returns the state it left. Every transition goes through here.
    pub(super) fn set_state(&mut self, id: SeqId, to: SeqState) -> Result<SeqState> {
        let seq = self.seq_mut(id)?;
        if !seq.state.may_become(&to) {
            return Err(Error::Internal(format!(
                "sequence {id} cannot go from {} to {}",
                seq.state.name(),
                to.name()
            )));
        }
        let (was_queued, was_running) = (seq.state.is_queued(), seq.state.is_running());
        let (queued, running) = (to.is_queued(), to.is_running());
        let front = matches!(to, SeqState::Preempted(_));
        let from = std::mem::replace(&mut seq.state, to);
        if was_queued && !queued {
            self.queue.retain(|&q| q != id);
        }
        if was_running && !running {
            self.running.retain(|&r| r != id);
        }
        if queued && !was_queued {
            // Preempted sequences go ahead of new arrivals.
            if front {
                self.queue.push_front(id);
            } else {
                self.queue.push_back(id);
            }
        }
        if running && !was_running {
            self.running.push(id);
        }
        Ok(from)
    }

    /// Takes a sequence out of the engine, whatever its state, freeing its blocks.
    pub(super) fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        if seq.state.is_queued() {
            self.queue.retain(|&q| q != id);
        }
        if seq.state.is_running() {
            self.running.retain(|&r| r != id);
        }
        let blocks = std::mem::take(&mut seq.blocks);
        if let Err(e) = self.allocator.free(&blocks) {
            // A broken invariant: report it loudly, but keep serving.
            tracing::error!(seq = id, error = %e, "freeing KV blocks failed");
        }
        Some(seq)
    }
}
