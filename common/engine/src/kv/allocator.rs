//! The KV block allocator: hands out fixed-size cache blocks by id and counts references, so that
//! several sequences can share the blocks of a common prefix, and keeps the prefix cache: full
//! blocks named by the hash of their content ([`super::prefix`]) that outlive their sequences
//! until the room is needed. The free count is exact at every moment and includes cached blocks
//! nobody references (they are given up the moment an allocation needs them): it is what
//! admission control and the nodes' load reports rely on.

use std::collections::{BTreeSet, HashMap};

use super::events::KvEvent;
use super::prefix::BlockHash;
use crate::{Error, Result};

/// Identifies one block of the paged KV cache (an index into every layer's K and V tensors).
pub type BlockId = u32;

/// Reference-counted allocator over `num_blocks` cache blocks, with the prefix cache.
#[derive(Debug, Clone)]
pub struct KvBlockAllocator {
    /// Reference count of every block; 0 means free or evictable.
    ref_counts: Vec<u32>,
    /// Blocks holding nothing anyone may look up. Popped from the back, so recently freed
    /// blocks are reused first (warm in cache).
    free: Vec<BlockId>,
    /// Cached blocks by content, and each block's name while it is cached.
    cached: HashMap<BlockHash, BlockId>,
    hash_of: Vec<Option<BlockHash>>,
    /// Cached blocks nobody references, least recently released first: `(released, block)`.
    evictable: BTreeSet<(u64, BlockId)>,
    /// When each evictable block was released.
    released: Vec<u64>,
    clock: u64,
    /// Changes to the cache's content since the last [`Self::take_events`], in order.
    events: Vec<KvEvent>,
}

impl KvBlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            ref_counts: vec![0; num_blocks],
            // Reversed so that the first allocations get the low ids: easier to read in logs.
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: HashMap::new(),
            hash_of: vec![None; num_blocks],
            evictable: BTreeSet::new(),
            released: vec![0; num_blocks],
            clock: 0,
            events: Vec::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks an allocation may have: free ones and cached ones nobody references.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks in the prefix cache (referenced or not).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Allocates `count` blocks, each with one reference, or none at all when fewer are free.
    /// Cached blocks nobody references are given up, least recently released first, once the
    /// free ones run out.
    pub fn allocate(&mut self, count: usize) -> Result<Vec<BlockId>> {
        if count > self.num_free() {
            return Err(Error::OutOfBlocks {
                needed: count,
                free: self.num_free(),
            });
        }
        let from_free = count.min(self.free.len());
        let mut blocks = self.free.split_off(self.free.len() - from_free);
        while blocks.len() < count {
            let (_, block) = self.evictable.pop_first().expect("counted above");
            if let Some(hash) = self.hash_of[block as usize].take() {
                self.cached.remove(&hash);
                self.events.push(KvEvent::Removed(hash));
            }
            blocks.push(block);
        }
        for &block in &blocks {
            self.ref_counts[block as usize] = 1;
        }
        Ok(blocks)
    }

    /// Adds a reference to blocks that are already in use (a sequence sharing a cached prefix).
    pub fn share(&mut self, blocks: &[BlockId]) -> Result<()> {
        for &block in blocks {
            if self.ref_count(block)? == 0 {
                return Err(Error::invalid(format!(
                    "cannot share free KV block {block}"
                )));
            }
        }
        for &block in blocks {
            self.ref_counts[block as usize] += 1;
        }
        Ok(())
    }

    /// Drops one reference to each block; a block whose last reference goes becomes free, or
    /// evictable if it is cached. Blocks are released in reverse order, so that of a
    /// sequence's blocks (passed in order) the last is the first to be evicted: later blocks
    /// are shared by fewer prompts. Fails without changing anything if any block is already
    /// free (a double free is a bug that must not silently corrupt the count).
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<()> {
        let mut drops: Vec<BlockId> = blocks.to_vec();
        drops.sort_unstable();
        for run in drops.chunk_by(|a, b| a == b) {
            let held = self.ref_count(run[0])?;
            if (held as usize) < run.len() {
                return Err(Error::invalid(format!(
                    "KV block {} freed {} times but holds {held} references",
                    run[0],
                    run.len()
                )));
            }
        }
        for &block in blocks.iter().rev() {
            let count = &mut self.ref_counts[block as usize];
            *count -= 1;
            if *count == 0 {
                if self.hash_of[block as usize].is_some() {
                    self.clock += 1;
                    self.released[block as usize] = self.clock;
                    self.evictable.insert((self.clock, block));
                } else {
                    self.free.push(block);
                }
            }
        }
        Ok(())
    }

    /// The number of references a block holds (0 when free).
    pub fn ref_count(&self, block: BlockId) -> Result<u32> {
        self.ref_counts
            .get(block as usize)
            .copied()
            .ok_or_else(|| Error::invalid(format!("KV block {block} does not exist")))
    }

    /// The cached blocks holding the longest prefix of `hashes`, each with a reference taken
    /// for the caller (who frees them like any other block).
    pub fn lookup(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        for hash in hashes {
            let Some(&block) = self.cached.get(hash) else {
                break;
            };
            let count = &mut self.ref_counts[block as usize];
            if *count == 0 {
                self.evictable
                    .remove(&(self.released[block as usize], block));
            }
            *count += 1;
            blocks.push(block);
        }
        blocks
    }

    /// Caches `block` under `hash`: its KV is computed and no one writes into it any more.
    /// Returns false, changing nothing, when another block is cached under that name already
    /// (two prompts computed the same block at once: the second stays private) or this block is
    /// cached already.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> Result<bool> {
        if self.ref_count(block)? == 0 {
            return Err(Error::invalid(format!(
                "cannot cache free KV block {block}"
            )));
        }
        if self.hash_of[block as usize].is_some() || self.cached.contains_key(&hash) {
            return Ok(false);
        }
        self.cached.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
        self.events.push(KvEvent::Stored(hash));
        Ok(true)
    }

    /// The blocks that joined and left the cache since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// The names of every cached block.
    #[cfg(test)]
    fn cached_hashes(&self) -> impl Iterator<Item = &BlockHash> {
        self.cached.keys()
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for_tokens(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn allocate_all_then_fail_without_partial_allocation() {
        let mut alloc = KvBlockAllocator::new(4);
        let a = alloc.allocate(3).unwrap();
        assert_eq!(a.len(), 3);
        assert!(matches!(
            alloc.allocate(2),
            Err(Error::OutOfBlocks { needed: 2, free: 1 })
        ));
        assert_eq!(alloc.num_free(), 1);
    }

    #[test]
    fn double_free_is_refused_and_changes_nothing() {
        let mut alloc = KvBlockAllocator::new(4);
        let a = alloc.allocate(2).unwrap();
        alloc.free(&a).unwrap();
        assert!(alloc.free(&a).is_err());
        assert!(alloc.free(&[a[0], a[0]]).is_err());
        assert!(alloc.free(&[99]).is_err());
        assert_eq!(alloc.num_free(), 4);
    }

    #[test]
    fn shared_block_is_freed_by_its_last_owner() {
        let mut alloc = KvBlockAllocator::new(2);
        let a = alloc.allocate(1).unwrap();
        alloc.share(&a).unwrap();
        alloc.free(&a).unwrap();
        assert_eq!(alloc.num_free(), 1);
        alloc.free(&a).unwrap();
        assert_eq!(alloc.num_free(), 2);
        assert!(alloc.share(&a).is_err(), "sharing a free block must fail");
    }

    fn name(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    #[test]
    fn cached_blocks_outlive_their_sequence_until_the_room_is_needed() {
        let mut alloc = KvBlockAllocator::new(4);
        let seq = alloc.allocate(3).unwrap();
        assert!(alloc.register(seq[0], name(0)).unwrap());
        assert!(alloc.register(seq[1], name(1)).unwrap());
        alloc.free(&seq).unwrap();
        // Cached and unreferenced blocks count as free.
        assert_eq!((alloc.num_free(), alloc.num_cached()), (4, 2));
        // A lookup takes the longest cached prefix, with a reference.
        let hit = alloc.lookup(&[name(0), name(1), name(2)]);
        assert_eq!(hit, seq[..2]);
        assert_eq!(alloc.ref_count(seq[0]).unwrap(), 1);
        assert_eq!(alloc.num_free(), 2);
        assert!(
            alloc.lookup(&[name(1)]).len() == 1,
            "any cached block is found by name"
        );
        alloc.free(&[seq[1]]).unwrap();
        alloc.free(&hit).unwrap();
        // Free blocks go first; then the cached ones, the sequence's last block before its first.
        let taken = alloc.allocate(3).unwrap();
        assert!(
            taken.contains(&seq[1]) && !taken.contains(&seq[0]),
            "{taken:?}"
        );
        assert_eq!(alloc.num_cached(), 1);
        assert_eq!(alloc.lookup(&[name(0), name(1)]), vec![seq[0]]);
        assert!(
            alloc.lookup(&[name(1)]).is_empty(),
            "an evicted block is gone"
        );
        assert!(matches!(
            alloc.allocate(1),
            Err(Error::OutOfBlocks { needed: 1, free: 0 })
        ));
    }

    #[test]
    fn a_name_is_cached_once_and_only_for_held_blocks() {
        let mut alloc = KvBlockAllocator::new(3);
        let a = alloc.allocate(2).unwrap();
        assert!(alloc.register(a[0], name(7)).unwrap());
        assert!(
            !alloc.register(a[1], name(7)).unwrap(),
            "the first block keeps the name"
        );
        assert!(
            !alloc.register(a[0], name(8)).unwrap(),
            "a block has one name"
        );
        assert!(
            alloc.register(2, name(9)).is_err(),
            "a free block holds nothing"
        );
        alloc.free(&a).unwrap();
        assert_eq!((alloc.num_free(), alloc.num_cached()), (3, 1));
        // The private one went back to the free list: allocating it evicts nothing.
        let b = alloc.allocate(2).unwrap();
        assert_eq!(alloc.num_cached(), 1, "{b:?}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(usize),
        Share(usize),
        Free(usize),
        Register(usize, u8),
        Lookup(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..6).prop_map(Op::Allocate),
            any::<usize>().prop_map(Op::Share),
            any::<usize>().prop_map(Op::Free),
            (any::<usize>(), 0u8..8).prop_map(|(i, h)| Op::Register(i, h)),
            (0u8..8).prop_map(Op::Lookup),
        ]
    }

    proptest! {
        /// Against a model of who holds what and which names are cached: no block is ever
        /// handed out while held, the free count always equals the number of blocks nobody
        /// holds, and a name finds its block until that block is handed out again.
        #[test]
        fn free_count_is_exact_and_no_block_is_handed_out_twice(ops in prop::collection::vec(op(), 1..200)) {
            const N: usize = 24;
            let mut alloc = KvBlockAllocator::new(N);
            // Each owner holds a list of blocks (one reference each).
            let mut owners: Vec<Vec<BlockId>> = Vec::new();
            let mut names: HashMap<u8, BlockId> = HashMap::new();
            // What a follower of the allocator's events believes is cached.
            let mut followed: std::collections::HashSet<BlockHash> = Default::default();
            for op in ops {
                match op {
                    Op::Allocate(n) => {
                        let held: HashMap<BlockId, usize> = owners.iter().flatten().fold(HashMap::new(), |mut m, b| { *m.entry(*b).or_default() += 1; m });
                        match alloc.allocate(n) {
                            Ok(blocks) => {
                                prop_assert_eq!(blocks.len(), n);
                                for b in &blocks {
                                    prop_assert!(!held.contains_key(b), "block {} handed out while held", b);
                                }
                                names.retain(|_, b| !blocks.contains(b));
                                let mut uniq = blocks.clone();
                                uniq.sort_unstable();
                                uniq.dedup();
                                prop_assert_eq!(uniq.len(), n);
                                owners.push(blocks);
                            }
                            Err(_) => prop_assert!(n > N - held.len()),
                        }
                    }
                    Op::Share(i) if !owners.is_empty() => {
                        let blocks = owners[i % owners.len()].clone();
                        alloc.share(&blocks).unwrap();
                        owners.push(blocks);
                    }
                    Op::Free(i) if !owners.is_empty() => {
                        let blocks = owners.swap_remove(i % owners.len());
                        alloc.free(&blocks).unwrap();
                    }
                    Op::Register(i, h) if !owners.is_empty() && !owners[i % owners.len()].is_empty() => {
                        let block = owners[i % owners.len()][0];
                        let fresh = !names.contains_key(&h) && !names.values().any(|&b| b == block);
                        prop_assert_eq!(alloc.register(block, name(h)).unwrap(), fresh);
                        if fresh {
                            names.insert(h, block);
                        }
                    }
                    Op::Lookup(h) => {
                        let found = alloc.lookup(&[name(h)]);
                        prop_assert_eq!(found.first(), names.get(&h));
                        if !found.is_empty() {
                            owners.push(found);
                        }
                    }
                    _ => {}
                }
                let mut refs: HashMap<BlockId, u32> = HashMap::new();
                for b in owners.iter().flatten() {
                    *refs.entry(*b).or_default() += 1;
                }
                prop_assert_eq!(alloc.num_free(), N - refs.len());
                prop_assert_eq!(alloc.num_cached(), names.len());
                for event in alloc.take_events() {
                    match event {
                        KvEvent::Stored(h) => prop_assert!(followed.insert(h), "stored twice"),
                        KvEvent::Removed(h) => prop_assert!(followed.remove(&h), "removed unstored"),
                    }
                }
                let cached: std::collections::HashSet<BlockHash> = alloc.cached_hashes().copied().collect();
                prop_assert_eq!(&followed, &cached);
                for (b, r) in refs {
                    prop_assert_eq!(alloc.ref_count(b).unwrap(), r);
                }
            }
            for blocks in owners.drain(..) {
                alloc.free(&blocks).unwrap();
            }
            prop_assert_eq!(alloc.num_free(), N);
        }
    }
}
