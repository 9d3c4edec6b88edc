//! One engine step: pack the scheduled work into a batch, run the forward pass (shipping each
//! layer of exporting sequences as it is written), sample, stream each sequence's new token, and
//! settle what that means for its life: it keeps decoding, finishes, or fails.

use std::time::Instant;

use candle_core::Tensor;

use super::core::EngineCore;
use super::draft::DraftJob;
use super::phases::{Phase, PhaseClock};
use super::scheduler::Scheduled;
use super::sequence::{Completion, ExportedKv, KvSink, SeqEvent, SeqId, SeqState, TokenEvent};
use super::speculative;
use crate::kv::{blocks_for_tokens, BlockRun};
use crate::model::ForwardBatch;
use crate::sampling::{
    check_stop_token, model_top_logprobs, sample_rows, FinishReason, RowRequest, SampleContext,
    SampledToken,
};
use crate::telemetry::names;
use crate::{Error, Result};

/// What one exporting sequence ships from a step: its sink, the index of the run's first block
/// among its blocks, and the run.
type Export = (KvSink, usize, BlockRun);

/// Rows `rows` of a `[rows, vocab]` logits tensor, in that order.
fn select_rows(logits: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(rows, rows.len(), logits.device())?;
    Ok(logits.index_select(&ids, 0)?)
}

/// What appending one sampled token means for its sequence.
pub(super) enum Appended {
    Continue,
    Finished(FinishReason),
}

impl EngineCore {
    /// Runs one scheduling round and forward pass. Returns the number of tokens processed.
    pub fn step(&mut self) -> Result<usize> {
        let done = self.run_step();
        // What the step stored in the prefix cache and evicted from it, for the routers.
        self.publish_kv_events();
        done
    }

    fn run_step(&mut self) -> Result<usize> {
        let started = Instant::now();
        self.drop_abandoned();
        let plan = self.schedule();
        if plan.is_empty() {
            return Ok(0);
        }
        let mut clock = PhaseClock::starting_at(started);
        clock.lap(Phase::Schedule);
        if self.draft_model.is_some() {
            if let Err(e) = self.draft_with_model(&plan) {
                tracing::error!(error = %e, "draft model step failed");
                self.fail_plan(&plan, &e);
                return Err(e);
            }
            clock.lap(Phase::Draft);
        }
        let (batch, exports, decode_tokens) = self.pack(&plan)?;
        metrics::counter!(names::DECODE_TOKENS_TOTAL).increment(decode_tokens as u64);
        metrics::counter!(names::PREFILL_TOKENS_TOTAL)
            .increment((batch.num_tokens() - decode_tokens) as u64);
        clock.lap(Phase::Pack);
        let cache = &self.cache;
        let mut ship_layer = |layer: usize| -> Result<()> {
            for (sink, first_block, blocks) in &exports {
                let kv = ExportedKv::read(cache, layer, *first_block, blocks)?;
                // A closed sink means the shipper is gone; the sequence ends at the next step.
                let _ = sink.send(kv);
            }
            Ok(())
        };
        let forward = self
            .model
            .forward(&batch, cache, &mut ship_layer)
            // On a GPU the phase ends when the device has finished the pass.
            .and_then(|l| Ok(l.device().synchronize().map(|()| l)?));
        let logits = match forward {
            Ok(l) => l,
            Err(e) => {
                // The whole batch is lost; fail its sequences rather than retry forever.
                tracing::error!(error = %e, "forward step failed");
                self.fail_plan(&plan, &e);
                return Err(e);
            }
        };
        clock.lap(Phase::Forward);
        self.apply(&plan, &logits, &mut clock)?;
        Ok(batch.num_tokens())
    }

    /// Has the draft model make the drafts the plan set blocks aside for, all sequences in the
    /// same passes.
    fn draft_with_model(&mut self, plan: &[Scheduled]) -> Result<()> {
        let Some(draft) = &self.draft_model else {
            return Ok(());
        };
        let mut ids = Vec::new();
        let mut jobs = Vec::new();
        for s in plan {
            let Some(seq) = self.seqs.get(&s.id).filter(|seq| seq.model_drafts > 0) else {
                continue;
            };
            ids.push(s.id);
            jobs.push(DraftJob {
                tokens: &seq.tokens,
                // KV past what the target keeps belongs to rejected drafts.
                computed: seq.draft_computed.min(seq.num_computed),
                blocks: &seq.blocks,
                wanted: seq.model_drafts,
                drafts: Vec::with_capacity(seq.model_drafts),
            });
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let cached = draft.propose(&mut jobs);
        let drafts: Vec<Vec<u32>> = jobs.into_iter().map(|j| j.drafts).collect();
        for ((id, drafted), cached) in ids.iter().zip(drafts).zip(cached?) {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.draft = drafted;
                seq.model_drafts = 0;
                seq.draft_computed = cached;
            }
        }
        Ok(())
    }

    fn fail_plan(&mut self, plan: &[Scheduled], e: &Error) {
        let msg = e.to_string();
        for s in plan {
            self.fail(s.id, Error::Internal(msg.clone()));
        }
    }

    /// The forward batch of a plan, the exports its layers feed, and how many of its tokens are
    /// decode tokens (one sampled token of a sequence that already has output, and its drafts).
    fn pack(&mut self, plan: &[Scheduled]) -> Result<(ForwardBatch, Vec<Export>, usize)> {
        let now = Instant::now();
        let bs = self.cache.spec().block_size;
        let mut batch = ForwardBatch::default();
        let mut exports = Vec::new();
        let mut decode_tokens = 0;
        for s in plan {
            let seq = self
                .seqs
                .get_mut(&s.id)
                .ok_or_else(|| Error::Internal(format!("sequence {} is gone", s.id)))?;
            seq.first_scheduled.get_or_insert(now);
            let from = seq.num_computed;
            // Drafted tokens run after the sequence's own, each with its logits to verify it.
            let own = s.tokens - seq.draft.len();
            let samples = from + own == seq.tokens.len();
            if matches!(seq.state, SeqState::Decoding) {
                decode_tokens += s.tokens;
            }
            let logits = if samples { 1 + seq.draft.len() } else { 0 };
            if seq.draft.is_empty() {
                batch.push_seq(&seq.tokens[from..from + own], from, &seq.blocks, logits);
            } else {
                let fed = [&seq.tokens[from..from + own], &seq.draft[..]].concat();
                batch.push_seq(&fed, from, &seq.blocks, logits);
            }
            if let SeqState::Exporting(sink) = &seq.state {
                // The blocks this chunk completes (with the last, partial one when the prompt
                // ends here) that have not gone yet; on the first chunk, also those the prefix
                // cache held.
                let to = from + s.tokens;
                let end = match to == seq.tokens.len() {
                    true => blocks_for_tokens(to, bs),
                    false => to / bs,
                };
                let first = seq.exported_blocks;
                if end > first {
                    let sink = sink.clone();
                    let run = self.cache.block_run(&seq.blocks[first..end])?;
                    exports.push((sink, first - seq.export_from, run));
                    seq.exported_blocks = end;
                }
            }
        }
        Ok((batch, exports, decode_tokens))
    }

    /// Advances every scheduled sequence past its tokens, samples for those whose prompt (or
    /// last token) is now computed (all rows of the step at once), then appends each token.
    fn apply(&mut self, plan: &[Scheduled], logits: &Tensor, clock: &mut PhaseClock) -> Result<()> {
        let mut sampled = Vec::new();
        for s in plan {
            let seq = self.seq_mut(s.id)?;
            // Drafts count as computed only once accepted (below).
            seq.num_computed += s.tokens - seq.draft.len();
            if seq.num_computed == seq.tokens.len() {
                sampled.push(s.id);
            }
            self.cache_computed(s.id);
        }
        // Beam searches rank the model's own candidates; every other row is sampled. Each
        // sequence has one row, plus one per draft, in the batch's order.
        let mut row = 0u32;
        let (mut scored, mut scored_rows, mut sampled_rows) = (Vec::new(), Vec::new(), Vec::new());
        sampled.retain(|id| {
            let Some(seq) = self.seqs.get(id) else {
                return false;
            };
            let rows = row..row + 1 + seq.draft.len() as u32;
            row = rows.end;
            if seq.params.is_beam_search() {
                scored.push(*id);
                scored_rows.extend(rows);
                false
            } else {
                sampled_rows.extend(rows);
                true
            }
        });
        let outcome = (|| {
            if scored.is_empty() {
                return Ok((self.sample_sequences(&sampled, logits)?, Vec::new()));
            }
            let candidates = self.beam_candidates(&scored, &select_rows(logits, &scored_rows)?)?;
            let tokens = match sampled.is_empty() {
                true => Vec::new(),
                false => self.sample_sequences(&sampled, &select_rows(logits, &sampled_rows)?)?,
            };
            Ok((tokens, candidates))
        })();
        let (tokens, candidates) = match outcome {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "sampling step failed");
                self.fail_plan(plan, &e);
                return Err(e);
            }
        };
        clock.lap(Phase::Sample);
        for (id, top) in scored.into_iter().zip(candidates) {
            self.emit_scored(id, top);
        }
        let mut tokens = tokens.into_iter();
        for id in sampled {
            let drafted = self
                .seqs
                .get_mut(&id)
                .map_or(Vec::new(), |s| std::mem::take(&mut s.draft));
            let rows: Vec<Result<SampledToken>> = tokens.by_ref().take(drafted.len() + 1).collect();
            if drafted.is_empty() {
                for token in rows {
                    let outcome = token.and_then(|t| self.append(id, t));
                    self.settle(id, outcome);
                }
            } else {
                self.verify(id, &drafted, rows);
            }
        }
        clock.lap(Phase::Emit);
        Ok(())
    }

    /// Samples the next token (and one after each draft) of every sequence in `ids`, whose
    /// rows `logits` holds in that order.
    fn sample_sequences(
        &self,
        ids: &[SeqId],
        logits: &Tensor,
    ) -> Result<Vec<Result<SampledToken>>> {
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let seq = self
                .seqs
                .get(id)
                .ok_or_else(|| Error::Internal(format!("sequence {id} is gone")))?;
            // Row i samples the token after the first i drafts, as plain decoding would once
            // they were output: its history (penalties, the seeded draw's position) includes
            // them.
            let history: std::borrow::Cow<[u32]> = match seq.draft.is_empty() {
                true => seq.tokens[seq.prompt_len..].into(),
                false => [&seq.tokens[seq.prompt_len..], &seq.draft[..]]
                    .concat()
                    .into(),
            };
            let own = seq.generated().len();
            rows.push((seq, history, own));
        }
        let requests: Vec<RowRequest> = rows
            .iter()
            .flat_map(|(seq, history, own)| {
                (0..=seq.draft.len()).map(move |i| RowRequest {
                    params: &seq.params,
                    ctx: SampleContext {
                        prompt_ids: &seq.tokens[..seq.prompt_len],
                        generated_ids: &history[..own + i],
                        seed: seq.seed,
                    },
                })
            })
            .collect();
        sample_rows(logits, &requests)
    }

    /// The most likely next tokens of every beam-search sequence in `ids` (one row each in
    /// `logits`, in that order), as many as each asks for.
    fn beam_candidates(&self, ids: &[SeqId], logits: &Tensor) -> Result<Vec<Vec<(u32, f32)>>> {
        let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        ids.iter()
            .zip(rows)
            .map(|(id, row)| {
                let n = self.seqs.get(id).map_or(0, |s| s.params.top_candidates());
                model_top_logprobs(&row, n)
            })
            .collect()
    }

    /// What a beam-search sequence's candidates mean: for a prefill-only one, its first token
    /// (the best) carries them to the decode node; otherwise they go to the search.
    fn emit_scored(&mut self, id: SeqId, top: Vec<(u32, f32)>) {
        if self.beam_group_of(id).is_some() {
            self.beam_scored(id, top);
            return;
        }
        let Some(&(best, logprob)) = top.first() else {
            self.fail(
                id,
                Error::Internal("no token has a non-zero probability".into()),
            );
            return;
        };
        let token = SampledToken {
            id: best,
            logprob,
            top_logprobs: top,
        };
        let outcome = self.append(id, token);
        self.settle(id, outcome);
    }

    /// Emits what a speculative step of sequence `id` yields: the drafts its samples accept,
    /// then the sample after them (`rows[i]` is the sample after the first `i` drafts). The
    /// accepted drafts' KV becomes computed; blocks past what is kept go back.
    fn verify(&mut self, id: SeqId, drafted: &[u32], rows: Vec<Result<SampledToken>>) {
        let ids: Vec<u32> = rows
            .iter()
            .map_while(|r| r.as_ref().ok().map(|t| t.id))
            .collect();
        let accepted = speculative::accepted_len(drafted, &ids);
        let k = self
            .config
            .speculative_config
            .as_ref()
            .map_or(1, |c| c.num_speculative_tokens);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.speculative.drafted += drafted.len() as u32;
            seq.draft_len = speculative::next_draft_len(drafted.len(), accepted, k);
        }
        self.spec_decode.drafts += 1;
        self.spec_decode.draft_tokens += drafted.len() as u64;
        metrics::counter!(names::SPEC_DECODE_NUM_DRAFTS_TOTAL).increment(1);
        metrics::counter!(names::SPEC_DECODE_NUM_DRAFT_TOKENS_TOTAL)
            .increment(drafted.len() as u64);
        for (i, token) in rows.into_iter().take(accepted + 1).enumerate() {
            if i > 0 {
                // Row i exists because draft i-1 was accepted: its KV is valid and counts now.
                let Some(seq) = self.seqs.get_mut(&id) else {
                    return;
                };
                seq.num_computed += 1;
                seq.speculative.accepted += 1;
                self.spec_decode.accepted_tokens += 1;
                metrics::counter!(names::SPEC_DECODE_NUM_ACCEPTED_TOKENS_TOTAL).increment(1);
            }
            let outcome = token.and_then(|t| self.append(id, t));
            let going = matches!(outcome, Ok(Appended::Continue));
            self.settle(id, outcome);
            if !going {
                return;
            }
        }
        self.trim_blocks(id);
        self.cache_computed(id);
    }

    /// Gives back the blocks sequence `id` holds beyond its tokens (those rejected drafts
    /// were written into).
    fn trim_blocks(&mut self, id: SeqId) {
        let bs = self.cache.spec().block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let keep = blocks_for_tokens(seq.tokens.len(), bs);
        if seq.blocks.len() > keep {
            let spare = seq.blocks.split_off(keep);
            if let Err(e) = self.allocator.free(&spare) {
                tracing::error!(seq = id, error = %e, "freeing KV blocks failed");
            }
        }
    }

    /// Appends a sampled token to sequence `id`, streams it and checks stop conditions.
    pub(super) fn append(&mut self, id: SeqId, token: SampledToken) -> Result<Appended> {
        let max_model_len = self.max_model_len;
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or_else(|| Error::Internal(format!("sequence {id} is gone")))?;
        let stops = check_stop_token(token.id, &seq.params, &self.eog_ids);
        let tokenizer = &self.tokenizer;
        seq.tokens.push(token.id);
        seq.first_token.get_or_insert_with(Instant::now);
        let exporting = seq.is_export();
        let mut text = String::new();
        let mut stopped_by_string = false;
        if !stops && !exporting {
            if let Some(tok) = tokenizer {
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
            // A prefill's job ends with its first token; the decode node continues from it.
            Appended::Finished(FinishReason::Exported)
        } else if stops || stopped_by_string {
            Appended::Finished(FinishReason::Stop)
        } else if seq.generated().len() >= seq.params.max_tokens as usize
            || seq.tokens.len() >= max_model_len
        {
            Appended::Finished(FinishReason::Length)
        } else {
            Appended::Continue
        })
    }

    /// What a sampled token means for the sequence's life: a prefilled sequence starts
    /// decoding; a finished one leaves; a failure ends it.
    pub(super) fn settle(&mut self, id: SeqId, outcome: Result<Appended>) {
        match outcome {
            Ok(Appended::Continue) => {
                let prefilled = matches!(
                    self.seqs.get(&id).map(|s| &s.state),
                    Some(SeqState::Prefilling)
                );
                if prefilled {
                    if let Err(e) = self.set_state(id, SeqState::Decoding) {
                        self.fail(id, e);
                    }
                }
            }
            Ok(Appended::Finished(reason)) => self.finish(id, reason),
            Err(e) => self.fail(id, e),
        }
    }

    /// Ends sequence `id` with `reason`: frees its blocks and sends the completion, with the
    /// text still held back.
    pub(super) fn finish(&mut self, id: SeqId, reason: FinishReason) {
        if let Some(group) = self.beam_group_of(id) {
            // One beam ending early (cancelled) ends its whole search.
            self.drop_beams(group, None);
            return;
        }
        let Some(mut seq) = self.remove(id) else {
            return;
        };
        let mut text = String::new();
        let flush = !matches!(reason, FinishReason::Cancelled | FinishReason::Exported);
        if flush && !seq.stop.is_stopped() {
            if let Some(tok) = &self.tokenizer {
                match seq.decoder.flush(tok) {
                    Ok(tail) => text = seq.stop.push(&tail).text,
                    Err(e) => {
                        let _ = seq.events.send(SeqEvent::Failed(e));
                        return;
                    }
                }
            }
            text.push_str(&seq.stop.finish());
        }
        let completion = Completion {
            reason,
            text,
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_prompt_tokens,
            completion_tokens: seq.generated().len(),
            timings: seq.timings(Instant::now()),
            speculative: self
                .config
                .speculative_config
                .is_some()
                .then_some(seq.speculative),
            beams: Vec::new(),
        };
        // The client may be gone already; nothing else to do then.
        let _ = seq.events.send(SeqEvent::Finished(completion));
    }

    /// Ends sequence `id` with an error, freeing its blocks.
    pub(super) fn fail(&mut self, id: SeqId, error: Error) {
        if let Some(group) = self.beam_group_of(id) {
            self.drop_beams(group, Some(error));
            return;
        }
        if let Some(seq) = self.remove(id) {
            let _ = seq.events.send(SeqEvent::Failed(error));
        }
    }
}
