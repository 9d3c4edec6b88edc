//! The draft model of speculative decoding's `draft_model` method: a smaller model with the
//! target's vocabulary, run by the same engine, on the same device, with a paged cache of its
//! own.
//!
//! The draft cache mirrors the target's: the same number of blocks of the same size, and a
//! sequence's draft KV lives in the blocks of the sequence's own block table. No second
//! allocator is needed, and whatever frees, shares or preempts a sequence's blocks does the same
//! to its draft KV. Each sequence counts the tokens its draft KV covers (`draft_computed`); a
//! new sequence starts at 0 whatever the target holds (its KV may have been computed by a
//! prefill node, or found in the prefix cache), so on a decode node the draft model prefills
//! its own cache there on the sequence's first drafting step. Only the target's KV crosses the
//! network: a prefill node never needs the draft model. Writing a prompt's draft KV into a
//! block the prefix cache shares writes the values already there (the same tokens at the same
//! positions); and whatever the draft cache holds, drafts are only proposals that the target
//! verifies, so they can change the speed but never the output.
//!
//! Drafts are the draft model's greedy choices. A step drafting k tokens for a sequence runs
//! the draft model k times: first over the tokens its draft cache lacks (the sampled token, or
//! at the start the whole prompt), then once per further draft; all drafting sequences go in
//! the same packed passes.

use std::sync::Arc;

use candle_core::D;

use crate::kv::{KvCache, KvCacheSpec};
use crate::model::{self, ForwardBatch, LlamaModel, ModelSource};
use crate::{Error, Result};

pub(crate) struct DraftModel {
    model: Arc<LlamaModel>,
    cache: KvCache,
}

/// One sequence's drafting for a step: what it has, and the drafts it gets.
pub(crate) struct DraftJob<'a> {
    /// The sequence's tokens; the last (sampled, not yet run through the target) is where
    /// drafting starts.
    pub tokens: &'a [u32],
    /// Tokens whose draft KV is in the cache.
    pub computed: usize,
    /// The sequence's blocks, covering its tokens and the drafts.
    pub blocks: &'a [u32],
    /// Drafts wanted (at least 1).
    pub wanted: usize,
    pub drafts: Vec<u32>,
}

impl DraftModel {
    /// Loads the draft model `source` for `target`: in the target's dtype, on its device.
    pub fn load(source: &str, target: &LlamaModel) -> Result<Arc<LlamaModel>> {
        let parsed: ModelSource = source.parse()?;
        let loaded = model::load_as(&parsed, target.device(), target.dtype())?;
        let (draft, want) = (loaded.model.config(), target.config());
        if draft.vocab_size != want.vocab_size {
            return Err(Error::invalid(format!(
                "speculative config: the draft model `{source}` has a vocabulary of {} tokens, the target {}",
                draft.vocab_size, want.vocab_size
            )));
        }
        Ok(loaded.model)
    }

    /// The layout of `model`'s cache beside a target cache laid out as `target`.
    pub fn cache_spec(model: &LlamaModel, target: &KvCacheSpec) -> KvCacheSpec {
        let c = model.config();
        KvCacheSpec {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            ..target.clone()
        }
    }

    /// `model` with a cache mirroring a target cache laid out as `target`.
    pub fn new(model: Arc<LlamaModel>, target: &KvCacheSpec) -> Result<Self> {
        let cache = KvCache::new(Self::cache_spec(&model, target), model.device())?;
        Ok(Self { model, cache })
    }

    /// Fills each job's `drafts` with `wanted` greedy tokens and returns, per job, the tokens
    /// whose draft KV is then cached: all but the last draft's.
    pub fn propose(&self, jobs: &mut [DraftJob<'_>]) -> Result<Vec<usize>> {
        let rounds = jobs.iter().map(|j| j.wanted).max().unwrap_or(0);
        for round in 0..rounds {
            let mut batch = ForwardBatch::default();
            let mut rows = Vec::new();
            for (i, job) in jobs.iter().enumerate() {
                if round >= job.wanted {
                    continue;
                }
                let len = job.tokens.len();
                match round {
                    // What the draft cache lacks, up to the last sampled token.
                    0 => batch.push_seq(&job.tokens[job.computed..], job.computed, job.blocks, 1),
                    r => batch.push_seq(&job.drafts[r - 1..r], len + r - 1, job.blocks, 1),
                }
                rows.push(i);
            }
            let logits = self.model.forward(&batch, &self.cache, &mut |_| Ok(()))?;
            let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (&i, token) in rows.iter().zip(next) {
                jobs[i].drafts.push(token);
            }
        }
        Ok(jobs
            .iter()
            .map(|j| j.tokens.len() + j.wanted.saturating_sub(1))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load::load_dummy, ModelConfig};
    use candle_core::{DType, Device};

    fn tiny(seed: u64) -> Arc<LlamaModel> {
        let config = ModelConfig::preset("tiny").unwrap();
        Arc::new(load_dummy(config, seed, &Device::Cpu, DType::F32).unwrap())
    }

    /// The plain greedy continuation of `tokens` by `model`, recomputing the whole sequence at
    /// every token in a cache of its own.
    fn greedy(model: &Arc<LlamaModel>, tokens: &[u32], n: usize) -> Vec<u32> {
        let spec = KvCacheSpec {
            num_layers: model.config().num_layers,
            num_kv_heads: model.config().num_kv_heads,
            head_dim: model.config().head_dim,
            block_size: 16,
            num_blocks: 8,
            dtype: DType::F32,
        };
        let cache = KvCache::new(spec, &Device::Cpu).unwrap();
        let mut seq = tokens.to_vec();
        for _ in 0..n {
            let mut batch = ForwardBatch::default();
            batch.push_seq(&seq, 0, &[0, 1, 2, 3, 4, 5, 6, 7], 1);
            let logits = model.forward(&batch, &cache, &mut |_| Ok(())).unwrap();
            seq.push(logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0]);
        }
        seq[tokens.len()..].to_vec()
    }

    #[test]
    fn drafts_are_the_draft_models_greedy_continuation_across_steps() {
        // Two sequences drafting together, over three steps, each step starting where the draft
        // cache left off (as after every draft was accepted, and a token sampled after them).
        let model = tiny(3);
        let target = KvCacheSpec {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            num_blocks: 16,
            dtype: DType::F32,
        };
        let draft = DraftModel::new(model.clone(), &target).unwrap();
        assert_eq!(draft.cache.spec().num_blocks, 16);
        let mut seqs = [
            ((1..40).collect::<Vec<u32>>(), vec![0, 1, 2, 3], 0),
            ((100..107).collect(), vec![4, 5, 6, 7], 0),
        ];
        for step in 0..3 {
            let wanted = [3, 1 + step];
            let mut jobs: Vec<DraftJob> = seqs
                .iter()
                .zip(wanted)
                .map(|((tokens, blocks, computed), wanted)| DraftJob {
                    tokens,
                    computed: *computed,
                    blocks,
                    wanted,
                    drafts: Vec::new(),
                })
                .collect();
            let cached = draft.propose(&mut jobs).unwrap();
            let drafts: Vec<Vec<u32>> = jobs.into_iter().map(|j| j.drafts).collect();
            for (i, ((tokens, _, computed), got)) in seqs.iter_mut().zip(drafts).enumerate() {
                assert_eq!(
                    got,
                    greedy(&model, tokens, got.len()),
                    "step {step}, seq {i}"
                );
                assert_eq!(cached[i], tokens.len() + got.len() - 1);
                *computed = cached[i];
                // All drafts accepted, then a token of the target's own.
                tokens.extend(&got);
                tokens.push(7);
            }
        }
    }
}
