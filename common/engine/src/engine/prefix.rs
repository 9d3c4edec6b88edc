//! The prefix cache as the engine uses it: at admission a sequence takes the cached blocks that
//! hold the longest prefix of its tokens and computes only the rest; every full block it
//! computes (or receives) joins the cache. Cached blocks are shared read-only: a sequence writes
//! only at positions past what it found, and the block holding its last prompt token is always
//! its own, because at least that token is computed to sample from.

use super::core::EngineCore;
use super::sequence::SeqId;
use crate::kv::{prefix, BlockId};
use crate::telemetry::names;

impl EngineCore {
    /// Takes the cached blocks holding the longest prefix of sequence `id`'s tokens (a
    /// reference each), or none with prefix caching off.
    pub(super) fn match_prefix(&mut self, id: SeqId) -> Vec<BlockId> {
        let (Some(root), Some(seq)) = (self.prefix_root, self.seqs.get_mut(&id)) else {
            return Vec::new();
        };
        let bs = self.cache.spec().block_size;
        prefix::extend_hashes(&root, &seq.tokens, bs, &mut seq.block_hashes);
        // The last token is always computed: its logits give the next one.
        let usable = (seq.tokens.len() - 1) / bs;
        self.allocator.lookup(&seq.block_hashes[..usable])
    }

    /// Counts an admission's lookup: `tokens` asked for, `hit` blocks found.
    pub(super) fn count_prefix_lookup(&mut self, tokens: usize, hit: usize) {
        if self.prefix_root.is_none() {
            return;
        }
        let hits = (hit * self.cache.spec().block_size) as u64;
        self.prefix_queries += tokens as u64;
        self.prefix_hits += hits;
        metrics::counter!(names::PREFIX_CACHE_QUERIES_TOTAL).increment(tokens as u64);
        metrics::counter!(names::PREFIX_CACHE_HITS_TOTAL).increment(hits);
    }

    /// Caches the full blocks of sequence `id` computed since the last call.
    pub(super) fn cache_computed(&mut self, id: SeqId) {
        let (Some(root), Some(seq)) = (self.prefix_root, self.seqs.get_mut(&id)) else {
            return;
        };
        let bs = self.cache.spec().block_size;
        let full = (seq.num_computed / bs).min(seq.blocks.len());
        if full <= seq.cached_blocks {
            return;
        }
        prefix::extend_hashes(&root, &seq.tokens[..full * bs], bs, &mut seq.block_hashes);
        for i in seq.cached_blocks..full {
            // A name another block holds already stays with it; this block stays private.
            if let Err(e) = self.allocator.register(seq.blocks[i], seq.block_hashes[i]) {
                tracing::error!(seq = id, error = %e, "caching a KV block failed");
            }
        }
        seq.cached_blocks = full;
    }
}
