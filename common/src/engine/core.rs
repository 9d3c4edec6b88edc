//! The scheduler and step loop of the engine; see the module docs of [`crate::engine`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::config::EngineConfig;
use super::sequence::{
    Completion, ExportedKv, GenerateRequest, KvSink, KvSource, Placement, SeqEvent, SeqId,
    Sequence, TokenEvent,
};
use crate::kv::{blocks_for_tokens, KvBlockAllocator, KvCache};
use crate::model::{ForwardBatch, LlamaModel};
use crate::sampling::{
    check_stop_token, sample, FinishReason, SampleContext, SampledToken, StopChecker,
};
use crate::telemetry::names;
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
}

pub struct EngineCore {
    model: Arc<LlamaModel>,
    tokenizer: Option<Arc<Tokenizer>>,
    eog_ids: Vec<u32>,
    config: EngineConfig,
    max_model_len: usize,
    cache: KvCache,
    allocator: KvBlockAllocator,
    /// Not yet admitted, or preempted; in arrival order, preempted ones first.
    waiting: VecDeque<Sequence>,
    /// Holding blocks: mid-prefill or decoding; oldest first.
    running: Vec<Sequence>,
    /// Holding blocks reserved for KV that another node is computing; never preempted.
    awaiting: Vec<Sequence>,
    next_id: SeqId,
    preemptions: u64,
}

/// Outcome of appending one sampled token.
enum Appended {
    Continue,
    Finished(FinishReason),
}

impl EngineCore {
    pub fn new(
        model: Arc<LlamaModel>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        let spec = config.cache_spec(model.config(), model.device())?;
        let max_model_len = config.max_model_len(model.config(), &spec);
        let allocator = KvBlockAllocator::new(spec.num_blocks);
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
            waiting: VecDeque::new(),
            running: Vec::new(),
            awaiting: Vec::new(),
            next_id: 0,
            preemptions: 0,
        })
    }

    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The cache tensors (shared: a KV receiver writes into blocks reserved for it).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Whether a step could compute something. Sequences awaiting remote KV are not work.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            awaiting_kv: self.awaiting.len(),
            free_blocks: self.allocator.num_free(),
            total_blocks: self.allocator.num_blocks(),
            // A decoding sequence always has its one sampled token pending: not prompt work.
            pending_tokens: self.waiting.iter().map(|s| s.pending()).sum::<usize>()
                + self
                    .running
                    .iter()
                    .map(|s| s.pending())
                    .filter(|&n| n > 1)
                    .sum::<usize>(),
            preemptions: self.preemptions,
        }
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
        let kv = match placement {
            Placement::Local => KvSource::Local,
            Placement::Remote(reserved) => KvSource::Remote(Some(reserved)),
            Placement::Export(sink) => KvSource::Export(sink),
        };
        let mut decoder = IncrementalDecoder::new(req.params.skip_special_tokens);
        let mut stop = StopChecker::from_params(&req.params);
        // Replay resumed tokens through the detokenizer and stop checker: their text went out
        // already, and what was held back then (a partial character, a possible stop string)
        // must be held back now too. Both are deterministic, so the replay ends in that state.
        if let (Some(tok), false) = (&self.tokenizer, matches!(kv, KvSource::Export(_))) {
            for &token in &req.resume_ids {
                let piece = decoder.push(tok, token)?;
                stop.push(&piece);
            }
        }
        let mut tokens = req.prompt_ids;
        let prompt_len = tokens.len();
        tokens.extend_from_slice(&req.resume_ids);
        self.waiting.push_back(Sequence {
            id,
            prompt_len,
            num_computed: 0,
            blocks: Vec::new(),
            decoder,
            stop,
            tokens,
            params: req.params,
            seed,
            kv,
            events,
            arrived: Instant::now(),
            first_scheduled: None,
            first_token: None,
        });
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
        let mut seq = self.take_awaiting(id)?;
        seq.kv = KvSource::Local;
        seq.num_computed = seq.tokens.len();
        seq.first_scheduled.get_or_insert_with(Instant::now);
        self.running.push(seq);
        let i = self.running.len() - 1;
        match self.append(i, first) {
            Ok(Appended::Continue) => {}
            Ok(Appended::Finished(reason)) => {
                let seq = self.running.remove(i);
                self.finish(seq, reason);
            }
            Err(e) => {
                let seq = self.running.remove(i);
                self.fail(seq, e);
            }
        }
        Ok(())
    }

    /// A sequence awaiting remote KV computes it here instead, in the blocks it holds.
    pub fn prefill_locally(&mut self, id: SeqId) -> Result<()> {
        let mut seq = self.take_awaiting(id)?;
        seq.kv = KvSource::Local;
        seq.num_computed = 0;
        self.running.push(seq);
        Ok(())
    }

    fn take_awaiting(&mut self, id: SeqId) -> Result<Sequence> {
        match self.awaiting.iter().position(|s| s.id == id) {
            Some(i) => Ok(self.awaiting.swap_remove(i)),
            None => Err(Error::NotFound(format!(
                "sequence {id} is not awaiting KV (finished or cancelled)"
            ))),
        }
    }

    /// Ends a request early and frees its blocks. Returns whether it was found.
    pub fn abort(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(seq) = self.waiting.remove(i) {
                self.finish(seq, FinishReason::Cancelled);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.finish(seq, FinishReason::Cancelled);
            return true;
        }
        if let Ok(seq) = self.take_awaiting(id) {
            self.finish(seq, FinishReason::Cancelled);
            return true;
        }
        false
    }

    /// Runs one scheduling round and forward pass. Returns the number of tokens processed.
    pub fn step(&mut self) -> Result<usize> {
        self.drop_abandoned();
        let scheduled = self.schedule();
        if scheduled.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        let bs = self.cache.spec().block_size;
        let mut batch = ForwardBatch::default();
        let mut exports: Vec<(KvSink, usize, crate::kv::BlockRun)> = Vec::new();
        for &(i, n) in &scheduled {
            let seq = &mut self.running[i];
            seq.first_scheduled.get_or_insert(now);
            let from = seq.num_computed;
            let samples = from + n == seq.tokens.len();
            batch.push_seq(&seq.tokens[from..from + n], from, &seq.blocks, samples);
            if let KvSource::Export(sink) = &seq.kv {
                // Every block this chunk wrote into; a block the next chunk completes goes again.
                let (first, end) = (from / bs, blocks_for_tokens(from + n, bs));
                exports.push((
                    sink.clone(),
                    first,
                    self.cache.block_run(&seq.blocks[first..end])?,
                ));
            }
        }
        let cache = &self.cache;
        let mut ship_layer = |layer: usize| -> Result<()> {
            for (sink, first_block, blocks) in &exports {
                let kv = ExportedKv::read(cache, layer, *first_block, blocks)?;
                // A closed sink means the shipper is gone; the sequence ends at the next step.
                let _ = sink.send(kv);
            }
            Ok(())
        };
        let decode_tokens = scheduled
            .iter()
            .filter(|&&(i, n)| {
                let s = &self.running[i];
                n == 1 && s.num_computed + 1 == s.tokens.len() && s.first_token.is_some()
            })
            .count();
        metrics::counter!(names::DECODE_TOKENS_TOTAL).increment(decode_tokens as u64);
        metrics::counter!(names::PREFILL_TOKENS_TOTAL)
            .increment((batch.num_tokens() - decode_tokens) as u64);
        let logits = match self.model.forward(&batch, cache, &mut ship_layer) {
            Ok(l) => l.to_vec2::<f32>()?,
            Err(e) => {
                // The whole batch is lost; fail its sequences rather than retry forever.
                tracing::error!(error = %e, "forward step failed");
                let msg = e.to_string();
                let mut idx: Vec<usize> = scheduled.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let seq = self.running.remove(i);
                    self.fail(seq, Error::Internal(msg.clone()));
                }
                return Err(e);
            }
        };
        let mut rows = logits.into_iter();
        let mut finished = Vec::new();
        for &(i, n) in &scheduled {
            let seq = &mut self.running[i];
            seq.num_computed += n;
            if seq.num_computed < seq.tokens.len() {
                continue; // mid-prefill: no token yet
            }
            let Some(row) = rows.next() else {
                return Err(Error::Internal(
                    "forward returned too few logit rows".into(),
                ));
            };
            match self.sample_and_append(i, &row) {
                Ok(Appended::Continue) => {}
                Ok(Appended::Finished(reason)) => finished.push((i, Ok(reason))),
                Err(e) => finished.push((i, Err(e))),
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, outcome) in finished {
            let seq = self.running.remove(i);
            match outcome {
                Ok(reason) => self.finish(seq, reason),
                Err(e) => self.fail(seq, e),
            }
        }
        Ok(batch.num_tokens())
    }

    /// Picks this step's work: `(index in running, tokens to process)`. Running sequences go
    /// first (oldest first), then waiting ones are admitted while the token budget, the sequence
    /// limit and free blocks allow. A running sequence that needs a block when none is free takes
    /// it from the youngest running sequence, which goes back to wait and recomputes later.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let bs = self.cache.spec().block_size;
        let mut budget = self.config.max_batch_tokens;
        let mut scheduled = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = seq.pending().min(budget);
            let needed =
                blocks_for_tokens(seq.num_computed + n, bs).saturating_sub(seq.blocks.len());
            while needed > self.allocator.num_free() && self.running.len() > i + 1 {
                if let Some(victim) = self.running.pop() {
                    self.preempt(victim);
                }
            }
            if needed > self.allocator.num_free() {
                // Out of blocks even after preempting everyone younger: admitting new requests
                // now would only take blocks this sequence needs.
                return scheduled;
            }
            if let Ok(blocks) = self.allocator.allocate(needed) {
                self.running[i].blocks.extend(blocks);
                scheduled.push((i, n));
                budget -= n;
            }
            i += 1;
        }
        while budget > 0 && self.running.len() + self.awaiting.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            if matches!(seq.kv, KvSource::Remote(_)) {
                // Reserve blocks for every token so far; another node fills them.
                let Ok(blocks) = self
                    .allocator
                    .allocate(blocks_for_tokens(seq.tokens.len(), bs))
                else {
                    break;
                };
                let Some(mut seq) = self.waiting.pop_front() else {
                    break;
                };
                let reserved = match &mut seq.kv {
                    KvSource::Remote(reply) => reply.take(),
                    _ => None,
                };
                seq.blocks = blocks;
                seq.first_scheduled = Some(Instant::now());
                match reserved.map(|r| r.send(seq.blocks.clone())) {
                    Some(Ok(())) => self.awaiting.push(seq),
                    // Whoever asked is gone: nothing will ever fill these blocks.
                    _ => self.finish(seq, FinishReason::Cancelled),
                }
                continue;
            }
            let n = seq.pending().min(budget);
            let needed = blocks_for_tokens(seq.num_computed + n, bs);
            let Ok(blocks) = self.allocator.allocate(needed) else {
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            seq.blocks = blocks;
            scheduled.push((self.running.len(), n));
            self.running.push(seq);
            budget -= n;
        }
        scheduled
    }

    /// Frees a running sequence's blocks and queues it to recompute its KV from scratch.
    fn preempt(&mut self, mut seq: Sequence) {
        tracing::debug!(seq = seq.id, "preempted for KV blocks");
        self.release_blocks(&mut seq);
        self.preemptions += 1;
        metrics::counter!(names::PREEMPTIONS_TOTAL).increment(1);
        seq.num_computed = 0;
        self.waiting.push_front(seq);
    }

    fn sample_and_append(&mut self, i: usize, logits: &[f32]) -> Result<Appended> {
        let seq = &self.running[i];
        let ctx = SampleContext {
            prompt_ids: &seq.tokens[..seq.prompt_len],
            generated_ids: &seq.tokens[seq.prompt_len..],
            seed: seq.seed,
        };
        let token = sample(logits, &seq.params, &ctx)?;
        self.append(i, token)
    }

    /// Appends a sampled token to running sequence `i`, streams it and checks stop conditions.
    fn append(&mut self, i: usize, token: SampledToken) -> Result<Appended> {
        let seq = &mut self.running[i];
        seq.tokens.push(token.id);
        seq.first_token.get_or_insert_with(Instant::now);

        let stops = check_stop_token(token.id, &seq.params, &self.eog_ids);
        let mut text = String::new();
        let mut stopped_by_string = false;
        let exporting = matches!(seq.kv, KvSource::Export(_));
        if !stops && !exporting {
            if let Some(tok) = &self.tokenizer {
                let piece = seq.decoder.push(tok, token.id)?;
                let outcome = seq.stop.push(&piece);
                text = outcome.text;
                stopped_by_string = outcome.stopped;
            }
        }
        let event = SeqEvent::Token(TokenEvent {
            id: token.id,
            text,
            logprob: token.logprob,
            top_logprobs: token.top_logprobs,
        });
        if seq.events.send(event).is_err() {
            return Ok(Appended::Finished(FinishReason::Cancelled));
        }
        Ok(if exporting {
            // A prefill's job ends with its first token; the decode node judges it.
            Appended::Finished(FinishReason::Length)
        } else if stops || stopped_by_string {
            Appended::Finished(FinishReason::Stop)
        } else if seq.generated().len() >= seq.params.max_tokens as usize
            || seq.tokens.len() >= self.max_model_len
        {
            Appended::Finished(FinishReason::Length)
        } else {
            Appended::Continue
        })
    }

    fn finish(&mut self, mut seq: Sequence, reason: FinishReason) {
        self.release_blocks(&mut seq);
        let mut text = String::new();
        let exporting = matches!(seq.kv, KvSource::Export(_));
        if reason != FinishReason::Cancelled && !seq.stop.is_stopped() && !exporting {
            if let Some(tok) = &self.tokenizer {
                match seq.decoder.flush(tok) {
                    Ok(tail) => text = seq.stop.push(&tail).text,
                    Err(e) => return self.fail(seq, e),
                }
            }
            text.push_str(&seq.stop.finish());
        }
        let completion = Completion {
            reason,
            text,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated().len(),
            timings: seq.timings(Instant::now()),
        };
        // The client may be gone already; nothing else to do then.
        let _ = seq.events.send(SeqEvent::Finished(completion));
    }

    fn fail(&mut self, mut seq: Sequence, error: Error) {
        self.release_blocks(&mut seq);
        let _ = seq.events.send(SeqEvent::Failed(error));
    }

    fn release_blocks(&mut self, seq: &mut Sequence) {
        let blocks = std::mem::take(&mut seq.blocks);
        if let Err(e) = self.allocator.free(&blocks) {
            // A broken invariant: report it loudly, but keep serving.
            tracing::error!(seq = seq.id, error = %e, "freeing KV blocks failed");
        }
    }

    /// Fails every sequence with `Unavailable` (shutdown after the drain deadline): a router
    /// resumes such a request on another node.
    pub fn abort_all(&mut self) {
        let all: Vec<Sequence> = self
            .waiting
            .drain(..)
            .chain(self.running.drain(..))
            .chain(self.awaiting.drain(..))
            .collect();
        for seq in all {
            self.fail(seq, Error::Unavailable("the node is shutting down".into()));
        }
    }

    /// Cancels sequences whose client has gone away, freeing their blocks.
    pub fn drop_abandoned(&mut self) {
        let abandoned: Vec<SeqId> = self
            .waiting
            .iter()
            .chain(&self.running)
            .chain(&self.awaiting)
            .filter(|s| s.is_abandoned())
            .map(|s| s.id)
            .collect();
        for id in abandoned {
            tracing::debug!(seq = id, "client went away");
            self.abort(id);
        }
    }
}
