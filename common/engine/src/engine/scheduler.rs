//! Picking a step's work: running sequences first (oldest first), then admissions from the queue
//! while the token budget, the sequence limit and free blocks allow; an admission starts after
//! the longest prefix the prefix cache holds. A running sequence that
//! needs a block when none is free takes it from the youngest running sequence, which is
//! preempted: it goes back to the front of the queue and recomputes later.

use super::core::EngineCore;
use super::sequence::{Placement, Reservation, SeqId, SeqState};
use super::speculative::SpeculativeMethod;
use crate::kv::{blocks_for_tokens, BlockId};
use crate::sampling::FinishReason;
use crate::telemetry::names;

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub id: SeqId,
    /// Tokens it runs through the model this step.
    pub tokens: usize,
}

impl EngineCore {
    /// This step's work, in packing order.
    pub(super) fn schedule(&mut self) -> Vec<Scheduled> {
        let bs = self.cache.spec().block_size;
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                i += 1;
                continue;
            };
            let base = seq.pending().min(budget);
            if base == 0 {
                // A beam whose candidates are in, waiting for its siblings'.
                i += 1;
                continue;
            }
            let needed_for = |drafts: usize| {
                blocks_for_tokens(seq.num_computed + base + drafts, bs)
                    .saturating_sub(seq.blocks.len())
            };
            let mut draft = self.draft_for(id, budget - base);
            // Speculation takes only blocks that are free: it never preempts anyone.
            if needed_for(draft.len()) > self.allocator.num_free() {
                draft = Draft::Tokens(Vec::new());
            }
            let tokens = base + draft.len();
            let needed = needed_for(draft.len());
            while needed > self.allocator.num_free() && self.running.len() > i + 1 {
                if let Some(&victim) = self.running.last() {
                    self.preempt(victim);
                }
            }
            if needed > self.allocator.num_free() {
                // Out of blocks even after preempting everyone younger: admitting new requests
                // now would only take blocks this sequence needs.
                return plan;
            }
            if let (Ok(blocks), Some(seq)) =
                (self.allocator.allocate(needed), self.seqs.get_mut(&id))
            {
                seq.blocks.extend(blocks);
                match draft {
                    Draft::Tokens(tokens) => seq.draft = tokens,
                    Draft::Model(n) => seq.model_drafts = n,
                }
                plan.push(Scheduled { id, tokens });
                budget -= tokens;
            }
            i += 1;
        }
        // Sequences left in the queue this step because others are filling their blocks.
        let mut deferred = 0;
        while budget > 0 && self.holding_blocks() < self.config.max_num_seqs {
            let Some(&id) = self.queue.get(deferred) else {
                break;
            };
            match self.admit(id, budget) {
                Admitted::Runs(tokens) => {
                    plan.push(Scheduled { id, tokens });
                    budget -= tokens;
                }
                Admitted::Awaits => {}
                Admitted::Deferred => deferred += 1,
                Admitted::NoRoom => break,
            }
        }
        plan
    }

    /// The tokens speculative decoding drafts for running sequence `id` this step (none when
    /// it is off, the sequence is not decoding, or nothing is proposed), at most `room` (the
    /// step's budget left), and never past `max_tokens` or the context.
    fn draft_for(&self, id: SeqId, room: usize) -> Draft {
        let none = Draft::Tokens(Vec::new());
        let (Some(spec), Some(seq)) = (&self.config.speculative_config, self.seqs.get(&id)) else {
            return none;
        };
        if !matches!(seq.state, SeqState::Decoding) || seq.pending() != 1 || seq.beam.is_some() {
            return none;
        }
        if spec
            .disable_by_batch_size
            .is_some_and(|most| self.running.len() > most)
        {
            return none;
        }
        // A step yields at most its drafts plus one token.
        let output_left = (seq.params.max_tokens as usize).saturating_sub(seq.generated().len());
        let context_left = self.max_model_len.saturating_sub(seq.tokens.len());
        let adapted = match seq.draft_len {
            0 => spec.num_speculative_tokens,
            n => n,
        };
        let limit = room
            .min(output_left.saturating_sub(1))
            .min(context_left)
            .min(adapted);
        match spec.method {
            SpeculativeMethod::Ngram => Draft::Tokens(spec.propose(&seq.tokens, limit).to_vec()),
            SpeculativeMethod::DraftModel => Draft::Model(limit),
        }
    }

    /// Admits the sequence at the front of the queue, if its blocks can be had.
    fn admit(&mut self, id: SeqId, budget: usize) -> Admitted {
        let bs = self.cache.spec().block_size;
        let Some(seq) = self.seqs.get(&id) else {
            // Not reachable: the queue only holds sequences the engine has.
            self.queue.retain(|&q| q != id);
            return Admitted::Awaits;
        };
        let remote = matches!(seq.state, SeqState::Waiting(Placement::Remote(_)));
        // Blocks the prefix cache holds are not computed (or fetched) again.
        let hit = self.match_prefix(id);
        if self.filled_elsewhere(id, hit.len()) {
            // Another sequence is computing (or fetching) the next blocks this prompt needs:
            // they join the prefix cache when done, and this one takes them then.
            self.release(id, &hit);
            return Admitted::Deferred;
        }
        if remote {
            let usable = self.seqs.get(&id).map_or(0, |s| (s.tokens.len() - 1) / bs);
            if hit.is_empty() || hit.len() < usable {
                return self.admit_remote(id, hit);
            }
            // Every block but the last is here already: nothing to fetch, and the rest is
            // computed below like a local prompt's.
            let told = match self.set_state(id, SeqState::Waiting(Placement::Local)) {
                Ok(SeqState::Waiting(Placement::Remote(reply))) => {
                    reply.send(Reservation::Local).is_ok()
                }
                _ => false,
            };
            if !told {
                self.release(id, &hit);
                self.finish(id, FinishReason::Cancelled);
                return Admitted::Awaits;
            }
        }
        let Some(seq) = self.seqs.get_mut(&id) else {
            self.release(id, &hit);
            return Admitted::Awaits;
        };
        let (asked, computed) = (seq.tokens.len(), hit.len() * bs);
        let tokens = (asked - computed).min(budget);
        let more = blocks_for_tokens(computed + tokens, bs) - hit.len();
        let Ok(blocks) = self.allocator.allocate(more) else {
            self.release(id, &hit);
            return Admitted::NoRoom;
        };
        let found = hit.len();
        seq.num_computed = computed;
        seq.cached_prompt_tokens = computed.min(seq.prompt_len);
        seq.cached_blocks = found;
        seq.blocks = hit;
        seq.blocks.extend(blocks);
        self.count_prefix_lookup(asked, found);
        let to = match self.seqs.get(&id).and_then(|s| s.state.export_sink()) {
            Some(sink) => SeqState::Exporting(sink.clone()),
            None => SeqState::Prefilling,
        };
        match self.set_state(id, to) {
            Ok(_) => Admitted::Runs(tokens),
            Err(e) => {
                tracing::error!(seq = id, error = %e, "admission failed");
                self.fail(id, e);
                Admitted::Awaits
            }
        }
    }

    /// Admits a sequence another node fills: keeps the blocks the prefix cache found (`hit`),
    /// reserves the rest and tells the caller which to fill.
    fn admit_remote(&mut self, id: SeqId, hit: Vec<BlockId>) -> Admitted {
        let bs = self.cache.spec().block_size;
        let Some(asked) = self.seqs.get(&id).map(|s| s.tokens.len()) else {
            self.release(id, &hit);
            return Admitted::Awaits;
        };
        let Ok(blocks) = self
            .allocator
            .allocate(blocks_for_tokens(asked, bs) - hit.len())
        else {
            self.release(id, &hit);
            return Admitted::NoRoom;
        };
        let found = hit.len();
        let reservation = Reservation::Fill {
            first_block: found,
            blocks: blocks.clone(),
        };
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.cached_blocks = found;
            seq.cached_prompt_tokens = (found * bs).min(seq.prompt_len);
            seq.blocks = hit;
            seq.blocks.extend(blocks);
            seq.first_scheduled = Some(std::time::Instant::now());
        }
        self.count_prefix_lookup(asked, found);
        let told = match self.set_state(id, SeqState::AwaitingKv) {
            Ok(SeqState::Waiting(Placement::Remote(reply))) => reply.send(reservation).is_ok(),
            _ => false,
        };
        if !told {
            // Whoever asked is gone: nothing will ever fill these blocks.
            self.finish(id, FinishReason::Cancelled);
        }
        Admitted::Awaits
    }

    /// Whether a sequence admitted earlier is filling most of the blocks that queued sequence
    /// `id` would compute after the `found` its prefix lookup found (the same names, so the same
    /// tokens): a prompt sent several times at once (`n` choices, a burst of one prompt) is then
    /// computed, or shipped from a prefill node, once (an export still ships every block it was
    /// asked for: those found in the cache too). Waiting costs this sequence the other's prefill,
    /// so it waits only when the shared blocks are more than half of its own work and of the
    /// other's: prompts that merely open with the same system prompt go ahead side by side, and
    /// a short prompt never waits for a long one. A preempted sequence does not wait.
    fn filled_elsewhere(&self, id: SeqId, found: usize) -> bool {
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        let bs = self.cache.spec().block_size;
        let usable = (seq.tokens.len() - 1) / bs;
        if !matches!(seq.state, SeqState::Waiting(_)) || found >= usable {
            return false;
        }
        // No names with prefix caching off: nothing is shared.
        let wanted = seq.block_hashes.get(found..usable).unwrap_or_default();
        self.seqs.values().any(|other| {
            if other.id == id
                || other.cached_blocks > found
                || !matches!(
                    other.state,
                    SeqState::AwaitingKv | SeqState::Prefilling | SeqState::Exporting(_)
                )
            {
                return false;
            }
            let theirs = other.block_hashes.get(found..).unwrap_or_default();
            let shared = wanted
                .iter()
                .zip(theirs)
                .take_while(|(a, b)| a == b)
                .count();
            let their_work = ((other.tokens.len() - 1) / bs).saturating_sub(found);
            2 * shared > usable - found && 2 * shared > their_work
        })
    }

    /// Gives back the references a prefix lookup took.
    fn release(&mut self, id: SeqId, hit: &[BlockId]) {
        if let Err(e) = self.allocator.free(hit) {
            tracing::error!(seq = id, error = %e, "returning cached KV blocks failed");
        }
    }

    /// Frees a running sequence's blocks and queues it to recompute its KV from scratch.
    pub(super) fn preempt(&mut self, id: SeqId) {
        tracing::debug!(seq = id, "preempted for KV blocks");
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let blocks = std::mem::take(&mut seq.blocks);
        seq.draft.clear();
        seq.model_drafts = 0;
        seq.draft_computed = 0;
        seq.num_computed = 0;
        seq.cached_blocks = 0;
        let placement = match seq.state.export_sink() {
            Some(sink) => Placement::Export {
                sink: sink.clone(),
                from_block: seq.export_from,
            },
            None => Placement::Local,
        };
        if let Err(e) = self.allocator.free(&blocks) {
            tracing::error!(seq = id, error = %e, "freeing KV blocks failed");
        }
        self.preemptions += 1;
        metrics::counter!(names::PREEMPTIONS_TOTAL).increment(1);
        if let Err(e) = self.set_state(id, SeqState::Preempted(placement)) {
            tracing::error!(seq = id, error = %e, "preemption failed");
            self.fail(id, e);
        }
    }
}

/// The drafts of a sequence's step.
enum Draft {
    /// Proposed already (prompt lookup); possibly none.
    Tokens(Vec<u32>),
    /// This many for the draft model to make, once the step's blocks are set aside.
    Model(usize),
}

impl Draft {
    fn len(&self) -> usize {
        match self {
            Draft::Tokens(tokens) => tokens.len(),
            Draft::Model(n) => *n,
        }
    }
}

/// What admitting the front of the queue did.
enum Admitted {
    /// It runs this step with this many tokens.
    Runs(usize),
    /// It holds its reserved blocks and waits for remote KV (or it left).
    Awaits,
    /// Its blocks are not free: admission stops for this step.
    NoRoom,
    /// Another sequence is filling the blocks it needs: it stays queued, and admission goes on
    /// with the next.
    Deferred,
}
