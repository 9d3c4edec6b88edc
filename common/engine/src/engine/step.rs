//! One engine step: pack the scheduled work into a batch, run the forward pass (shipping each
//! layer of exporting sequences as it is written), sample, stream each sequence's new token, and
//! settle what that means for its life: it keeps decoding, finishes, or fails.

use std::time::Instant;

use candle_core::Tensor;

use super::core::EngineCore;
use super::phases::{Phase, PhaseClock};
use super::scheduler::Scheduled;
use super::sequence::{Completion, ExportedKv, KvSink, SeqEvent, SeqId, SeqState, TokenEvent};
use crate::kv::{blocks_for_tokens, BlockRun};
use crate::model::ForwardBatch;
use crate::sampling::{
    check_stop_token, sample_rows, FinishReason, RowRequest, SampleContext, SampledToken,
};
use crate::telemetry::names;
use crate::{Error, Result};

/// What one exporting sequence ships from a step: its sink, the index of the run's first block
/// among its blocks, and the run.
type Export = (KvSink, usize, BlockRun);

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

    fn fail_plan(&mut self, plan: &[Scheduled], e: &Error) {
        let msg = e.to_string();
        for s in plan {
            self.fail(s.id, Error::Internal(msg.clone()));
        }
    }

    /// The forward batch of a plan, the exports its layers feed, and how many of its tokens are
    /// decode tokens (one sampled token of a sequence that already has output).
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
            let samples = from + s.tokens == seq.tokens.len();
            if matches!(seq.state, SeqState::Decoding) {
                decode_tokens += s.tokens;
            }
            batch.push_seq(
                &seq.tokens[from..from + s.tokens],
                from,
                &seq.blocks,
                samples,
            );
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
            seq.num_computed += s.tokens;
            if seq.num_computed == seq.tokens.len() {
                sampled.push(s.id);
            }
            self.cache_computed(s.id);
        }
        let tokens = {
            let seqs = &self.seqs;
            let rows = sampled
                .iter()
                .map(|id| {
                    let seq = seqs
                        .get(id)
                        .ok_or_else(|| Error::Internal(format!("sequence {id} is gone")))?;
                    Ok(RowRequest {
                        params: &seq.params,
                        ctx: SampleContext {
                            prompt_ids: &seq.tokens[..seq.prompt_len],
                            generated_ids: &seq.tokens[seq.prompt_len..],
                            seed: seq.seed,
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sample_rows(logits, &rows)
        };
        let tokens = match tokens {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "sampling step failed");
                self.fail_plan(plan, &e);
                return Err(e);
            }
        };
        clock.lap(Phase::Sample);
        for (id, token) in sampled.into_iter().zip(tokens) {
            let outcome = token.and_then(|t| self.append(id, t));
            self.settle(id, outcome);
        }
        clock.lap(Phase::Emit);
        Ok(())
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
        };
        // The client may be gone already; nothing else to do then.
        let _ = seq.events.send(SeqEvent::Finished(completion));
    }

    /// Ends sequence `id` with an error, freeing its blocks.
    pub(super) fn fail(&mut self, id: SeqId, error: Error) {
        if let Some(seq) = self.remove(id) {
            let _ = seq.events.send(SeqEvent::Failed(error));
        }
    }
}
