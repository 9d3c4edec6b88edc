//! Beam search inside the engine, as vLLM's OpenAI server offers it (`use_beam_search`, `n` as
//! the width, `length_penalty`).
//!
//! A search is a group of sequences, one per live beam, that run in the ordinary packed steps.
//! When every live beam has its logits for its current length, each offers its `2 * width` most
//! likely next tokens (the model's own log-probabilities), and all of them are ranked by
//! cumulative log-probability. In rank order, as Hugging Face transformers' beam search does: a
//! candidate that ends the text (an end-of-generation or stop token) finishes a beam if it ranks
//! among the first `width`, and the first `width` others are the next live beams. The search
//! ends at `max_tokens`, or once `width` beams have finished and none of the live ones could
//! score better if it ended now; the `width` best of the finished and live beams, ranked by
//! `cumulative_logprob / generated_len^length_penalty`, are the answer, sent whole with the
//! completion (a beam search streams no tokens). These rules make width 1 exactly greedy
//! decoding, end token included.
//!
//! A beam chosen several times forks: the children share its full KV blocks (one more
//! reference each) and each gets its own copy of the last, partial block, the only one they
//! will write into (copy on write). A beam chosen by none leaves, giving its blocks back.
//!
//! A beam is preempted like any sequence (its own references go back; what it shares stays
//! with its siblings) and recomputes when readmitted; the group waits for it. The client going
//! away, or any beam failing, ends the whole group and frees every block it holds.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;

use super::core::EngineCore;
use super::sequence::{Completion, Placement, SeqEvent, SeqId, SeqState, Sequence, Timings};
use crate::kv::{blocks_for_tokens, BlockId};
use crate::sampling::{check_stop_token, FinishReason, SampledToken, StopChecker};
use crate::tokenizer::IncrementalDecoder;
use crate::Error;

/// One returned beam.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamOutput {
    /// Its generated tokens, a final end token included.
    pub token_ids: Vec<u32>,
    /// Their text (a final end token left out, as in a sampled completion).
    pub text: String,
    pub cumulative_logprob: f32,
    /// What it was ranked by: `cumulative_logprob / generated_len^length_penalty`.
    pub score: f32,
    pub reason: FinishReason,
    /// Per token, its log-probability and the top-n alternatives when logprobs were asked for
    /// (empty otherwise).
    pub logprobs: Vec<SampledToken>,
}

/// A beam's place in its search (on each of the group's sequences).
#[derive(Debug, Clone)]
pub(crate) struct BeamState {
    /// The search: the id of the request's first sequence.
    pub group: SeqId,
    pub cum_logprob: f64,
    /// One entry per generated token.
    pub steps: Vec<SampledToken>,
}

/// A beam that ended (or the live beams at the end).
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    cum_logprob: f64,
    steps: Vec<SampledToken>,
    reason: FinishReason,
}

/// A beam's most likely next tokens, best first.
type Candidates = Vec<(u32, f32)>;

/// One search.
pub(crate) struct BeamGroup {
    width: usize,
    length_penalty: f32,
    /// The live beams, in rank order, each with its candidates once its logits for its current
    /// length are known.
    live: Vec<(SeqId, Option<Candidates>)>,
    done: Vec<Hypothesis>,
    events: mpsc::UnboundedSender<SeqEvent>,
    prompt_len: usize,
    /// The request's clock (arrival, first step, first selection) and prefix-cache hits.
    arrived: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    cached_prompt_tokens: usize,
}

impl BeamGroup {
    /// Whether the search is over although beams live: `width` beams have finished, and the
    /// best live one (cumulative logprob `best`, `len` tokens) would not rank above the worst
    /// of them if it ended now (transformers' `early_stopping=False` rule).
    fn settled(&self, best: f64, len: usize) -> bool {
        if self.done.len() < self.width {
            return false;
        }
        let mut scores: Vec<f64> = self.done.iter().map(|h| self.score(h)).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        scores[self.width - 1] >= beam_score(best, len, self.length_penalty)
    }

    fn score(&self, h: &Hypothesis) -> f64 {
        beam_score(h.cum_logprob, h.tokens.len(), self.length_penalty)
    }

    pub fn new(seq: &Sequence) -> Self {
        Self {
            width: seq.params.beam_width as usize,
            length_penalty: seq.params.length_penalty,
            live: vec![(seq.id, None)],
            done: Vec::new(),
            events: seq.events.clone(),
            prompt_len: seq.prompt_len,
            arrived: seq.arrived,
            first_scheduled: None,
            first_token: None,
            cached_prompt_tokens: 0,
        }
    }
}

/// The rank of a beam of `generated_len` tokens (a final end token included).
pub fn beam_score(cum_logprob: f64, generated_len: usize, length_penalty: f32) -> f64 {
    cum_logprob / (generated_len.max(1) as f64).powf(f64::from(length_penalty))
}

/// A peer's list of candidates as this engine would have made it: best first, ties to the
/// lower id, each id once, at most `n`.
pub(crate) fn normalized_candidates(mut top: Vec<(u32, f32)>, n: usize) -> Vec<(u32, f32)> {
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut seen = std::collections::HashSet::new();
    top.retain(|(id, _)| seen.insert(*id));
    top.truncate(n);
    top
}

impl EngineCore {
    /// The search sequence `id` is a beam of.
    pub(super) fn beam_group_of(&self, id: SeqId) -> Option<SeqId> {
        self.seqs.get(&id)?.beam.as_ref().map(|b| b.group)
    }

    /// Beam `id`'s logits for its current length gave `candidates`: it waits for its siblings,
    /// and once every live beam has its own, the search moves on by one token.
    pub(super) fn beam_scored(&mut self, id: SeqId, candidates: Vec<(u32, f32)>) {
        let Some(gid) = self.beam_group_of(id) else {
            return;
        };
        if matches!(
            self.seqs.get(&id).map(|s| &s.state),
            Some(SeqState::Prefilling)
        ) {
            if let Err(e) = self.set_state(id, SeqState::Decoding) {
                self.fail(id, e);
                return;
            }
        }
        self.note_beam_cached(id);
        let first_scheduled = self.seqs.get(&id).and_then(|s| s.first_scheduled);
        let Some(group) = self.beam_groups.get_mut(&gid) else {
            return;
        };
        group.first_scheduled = group.first_scheduled.or(first_scheduled);
        if let Some(slot) = group.live.iter_mut().find(|(b, _)| *b == id) {
            slot.1 = Some(candidates);
        }
        if group.live.iter().all(|(_, c)| c.is_some()) {
            self.advance_beams(gid);
        }
    }

    /// Every live beam of search `gid` has its candidates: picks the next live beams, forking
    /// and dropping sequences to match, and ends the search when it is done.
    fn advance_beams(&mut self, gid: SeqId) {
        let Some(group) = self.beam_groups.get_mut(&gid) else {
            return;
        };
        group.first_token.get_or_insert_with(Instant::now);
        let live = std::mem::take(&mut group.live);
        let width = group.width;
        // Every candidate of every live beam: (parent, token, its cumulative logprob).
        let mut ranked: Vec<(SeqId, SampledToken, f64)> = Vec::new();
        for (parent, candidates) in &live {
            let Some(seq) = self.seqs.get(parent) else {
                continue;
            };
            let Some(beam) = &seq.beam else {
                continue;
            };
            let shown = seq.params.logprobs.map_or(0, |n| n as usize);
            for &(token, logprob) in candidates.iter().flatten() {
                let step = SampledToken {
                    id: token,
                    logprob,
                    top_logprobs: candidates.iter().flatten().take(shown).copied().collect(),
                };
                ranked.push((*parent, step, beam.cum_logprob + f64::from(logprob)));
            }
        }
        // Stable: equal sums keep the older beam's, then the likelier token's, candidate first.
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mut next: Vec<(SeqId, SampledToken, f64)> = Vec::with_capacity(width);
        let mut ended = Vec::new();
        for (rank, (parent, step, cum)) in ranked.into_iter().enumerate() {
            if next.len() == width {
                break;
            }
            let Some(seq) = self.seqs.get(&parent) else {
                continue;
            };
            if !check_stop_token(step.id, &seq.params, &self.eog_ids) {
                next.push((parent, step, cum));
            } else if rank < width {
                let mut tokens = seq.generated().to_vec();
                tokens.push(step.id);
                let mut steps = seq
                    .beam
                    .as_ref()
                    .map(|b| b.steps.clone())
                    .unwrap_or_default();
                steps.push(step);
                ended.push(Hypothesis {
                    tokens,
                    cum_logprob: cum,
                    steps,
                    reason: FinishReason::Stop,
                });
            }
        }
        if let Some(group) = self.beam_groups.get_mut(&gid) {
            group.done.extend(ended);
        }
        let mut new_live = Vec::with_capacity(next.len());
        let mut placed: HashMap<SeqId, usize> = HashMap::new();
        for (parent, ..) in &next {
            *placed.entry(*parent).or_default() += 1;
        }
        for (parent, _) in &live {
            if !placed.contains_key(parent) {
                // Nobody continues this beam: its own blocks go back.
                self.remove(*parent);
            }
        }
        for (parent, step, cum) in next {
            let left = placed.get_mut(&parent).map_or(0, |n| {
                *n -= 1;
                *n
            });
            // The last child of a parent takes its sequence; the others are forks of it,
            // made while it still holds its parent's tokens.
            let child = if left == 0 {
                Some(parent)
            } else {
                self.fork_beam(parent)
            };
            let Some(child) = child else {
                continue;
            };
            if let Some(seq) = self.seqs.get_mut(&child) {
                seq.tokens.push(step.id);
                if let Some(beam) = &mut seq.beam {
                    beam.cum_logprob = cum;
                    beam.steps.push(step);
                }
            }
            new_live.push((child, None));
        }
        let best = new_live.first().and_then(|(id, _)| self.seqs.get(id));
        let finished = best.is_none_or(|s| {
            let (len, cum) = (
                s.generated().len(),
                s.beam.as_ref().map_or(0.0, |b| b.cum_logprob),
            );
            s.generated().len() >= s.params.max_tokens as usize
                || s.tokens.len() >= self.max_model_len
                || self
                    .beam_groups
                    .get(&gid)
                    .is_some_and(|g| g.settled(cum, len))
        });
        if let Some(group) = self.beam_groups.get_mut(&gid) {
            group.live = new_live;
        }
        if finished {
            self.end_beams(gid);
        }
    }

    /// A copy of beam `parent` that shares its full KV blocks and owns a copy of its partial
    /// last one; queued to recompute when that block cannot be had (or the parent holds none).
    fn fork_beam(&mut self, parent: SeqId) -> Option<SeqId> {
        let bs = self.cache.spec().block_size;
        let p = self.seqs.get(&parent)?;
        let n = p.tokens.len();
        let full = n / bs;
        let holds = p.state.is_running()
            && p.num_computed == n
            && p.blocks.len() >= blocks_for_tokens(n, bs);
        let source = holds.then(|| p.blocks.clone());
        let blocks = source.and_then(|b| self.fork_blocks(parent, &b, n));
        let p = self.seqs.get(&parent)?;
        let id = self.next_id;
        let running = blocks.is_some();
        let child = Sequence {
            id,
            prompt_len: p.prompt_len,
            tokens: p.tokens.clone(),
            num_computed: if running { n } else { 0 },
            blocks: blocks.unwrap_or_default(),
            block_hashes: match running {
                true => p.block_hashes[..p.block_hashes.len().min(full)].to_vec(),
                false => Vec::new(),
            },
            cached_blocks: if running {
                p.cached_blocks.min(full)
            } else {
                0
            },
            exported_blocks: 0,
            export_from: 0,
            cached_prompt_tokens: p.cached_prompt_tokens,
            params: p.params.clone(),
            seed: p.seed,
            state: match running {
                true => SeqState::Decoding,
                false => SeqState::Preempted(Placement::Local),
            },
            decoder: IncrementalDecoder::new(p.params.skip_special_tokens),
            stop: StopChecker::from_params(&p.params),
            events: p.events.clone(),
            arrived: p.arrived,
            first_scheduled: p.first_scheduled,
            first_token: p.first_token,
            draft: Vec::new(),
            draft_len: 0,
            model_drafts: 0,
            draft_computed: 0,
            speculative: Default::default(),
            beam: p.beam.clone(),
        };
        self.next_id += 1;
        self.seqs.insert(id, child);
        // A new sequence enters its collection directly: it has no earlier state to leave. A
        // fork runs right after its parent, so that a search keeps its age when blocks run out
        // (the youngest sequences are preempted first).
        if running {
            let at = self
                .running
                .iter()
                .position(|&r| r == parent)
                .map_or(self.running.len(), |i| i + 1);
            self.running.insert(at, id);
        } else {
            self.queue.push_front(id);
        }
        Some(id)
    }

    /// The blocks of a fork of a sequence holding `blocks` for its `n` computed tokens: its
    /// full blocks, shared, and a new copy of the partial last one; `None` when no block is
    /// free for that copy.
    fn fork_blocks(&mut self, parent: SeqId, blocks: &[BlockId], n: usize) -> Option<Vec<BlockId>> {
        let bs = self.cache.spec().block_size;
        let full = n / bs;
        let mut own = Vec::new();
        if !n.is_multiple_of(bs) {
            let copy = self.allocator.allocate(1).ok()?;
            if let Err(e) = self.cache.copy_blocks(&blocks[full..full + 1], &copy) {
                tracing::error!(seq = parent, error = %e, "copying a beam's last KV block failed");
                let _ = self.allocator.free(&copy);
                return None;
            }
            own = copy;
        }
        if let Err(e) = self.allocator.share(&blocks[..full]) {
            tracing::error!(seq = parent, error = %e, "sharing a beam's KV blocks failed");
            let _ = self.allocator.free(&own);
            return None;
        }
        let mut forked = blocks[..full].to_vec();
        forked.extend(own);
        Some(forked)
    }

    /// Search `gid` is done: its best beams go to the client and every block it holds back.
    fn end_beams(&mut self, gid: SeqId) {
        let Some(mut group) = self.beam_groups.remove(&gid) else {
            return;
        };
        let mut params = None;
        // Ranked after the finished beams, so that a finished one wins a tie.
        for (id, _) in std::mem::take(&mut group.live) {
            if let Some(seq) = self.remove(id) {
                if let Some(beam) = seq.beam.clone() {
                    group.done.push(Hypothesis {
                        tokens: seq.generated().to_vec(),
                        cum_logprob: beam.cum_logprob,
                        steps: beam.steps,
                        reason: FinishReason::Length,
                    });
                }
                params.get_or_insert(seq.params);
            }
        }
        let Some(params) = params else {
            let _ = group.events.send(SeqEvent::Failed(Error::Internal(
                "beam search ended with no live beam".into(),
            )));
            return;
        };
        let prompt_len = group.prompt_len;
        // Finished beams come before the live ones: on a tie, the finished one ranks first.
        let done = std::mem::take(&mut group.done);
        let mut ranked: Vec<(f64, Hypothesis)> =
            done.into_iter().map(|h| (group.score(&h), h)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.truncate(group.width);
        let mut beams = Vec::with_capacity(ranked.len());
        for (score, h) in ranked {
            let shown = match h.reason {
                FinishReason::Stop => &h.tokens[..h.tokens.len() - 1],
                _ => &h.tokens[..],
            };
            let text = match &self.tokenizer {
                Some(tok) => match tok.decode(shown, params.skip_special_tokens) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = group.events.send(SeqEvent::Failed(e));
                        return;
                    }
                },
                None => String::new(),
            };
            let logprobs = match params.logprobs {
                Some(_) => h.steps,
                None => Vec::new(),
            };
            beams.push(BeamOutput {
                token_ids: h.tokens,
                text,
                cumulative_logprob: h.cum_logprob as f32,
                score: score as f32,
                reason: h.reason,
                logprobs,
            });
        }
        let now = Instant::now();
        let scheduled = group.first_scheduled.unwrap_or(now);
        let first = group.first_token.unwrap_or(now);
        let best = beams.first();
        let completion = Completion {
            reason: best.map_or(FinishReason::Length, |b| b.reason),
            text: best.map(|b| b.text.clone()).unwrap_or_default(),
            prompt_tokens: prompt_len,
            cached_tokens: group.cached_prompt_tokens,
            completion_tokens: beams.iter().map(|b| b.token_ids.len()).sum(),
            timings: Timings {
                queue: scheduled.saturating_duration_since(group.arrived),
                prefill: first.saturating_duration_since(scheduled),
                time_to_first_token: first.saturating_duration_since(group.arrived),
                total: now.saturating_duration_since(group.arrived),
            },
            speculative: None,
            beams,
        };
        let _ = group.events.send(SeqEvent::Finished(completion));
    }

    /// Ends search `gid` early (cancelled, or `error`), freeing every block its beams hold.
    pub(super) fn drop_beams(&mut self, gid: SeqId, error: Option<Error>) {
        let Some(group) = self.beam_groups.remove(&gid) else {
            return;
        };
        for (id, _) in &group.live {
            self.remove(*id);
        }
        let event = match error {
            Some(e) => SeqEvent::Failed(e),
            None => SeqEvent::Finished(Completion {
                reason: FinishReason::Cancelled,
                text: String::new(),
                prompt_tokens: group.prompt_len,
                cached_tokens: group.cached_prompt_tokens,
                completion_tokens: 0,
                timings: Timings::default(),
                speculative: None,
                beams: Vec::new(),
            }),
        };
        let _ = group.events.send(event);
    }

    /// Records how many prompt tokens the prefix cache supplied to search `gid`.
    fn note_beam_cached(&mut self, id: SeqId) {
        let Some(gid) = self.beam_group_of(id) else {
            return;
        };
        let cached = self.seqs.get(&id).map_or(0, |s| s.cached_prompt_tokens);
        if let Some(g) = self.beam_groups.get_mut(&gid) {
            if g.first_token.is_none() {
                g.cached_prompt_tokens = cached;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_divide_by_the_generated_length() {
        assert_eq!(beam_score(-6.0, 3, 1.0), -2.0);
        assert_eq!(beam_score(-6.0, 4, 0.0), -6.0);
        assert!((beam_score(-8.0, 4, 0.5) - -4.0).abs() < 1e-12);
        assert_eq!(beam_score(-1.0, 0, 1.0), -1.0);
    }

    #[test]
    fn a_peers_candidates_are_sorted_deduplicated_and_cut() {
        let got = normalized_candidates(vec![(5, -2.0), (3, -1.0), (4, -1.0), (3, -0.5)], 2);
        assert_eq!(got, vec![(3, -0.5), (4, -1.0)]);
    }
}
