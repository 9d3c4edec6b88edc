//! The KV block allocator: hands out fixed-size cache blocks by id and counts references, so that
//! several sequences can share the blocks of a common prefix. The free count is exact at every
//! moment: it is what admission control and the nodes' load reports rely on.

use crate::{Error, Result};

/// Identifies one block of the paged KV cache (an index into every layer's K and V tensors).
pub type BlockId = u32;

/// Reference-counted allocator over `num_blocks` cache blocks.
#[derive(Debug, Clone)]
pub struct KvBlockAllocator {
    /// Reference count of every block; 0 means free.
    ref_counts: Vec<u32>,
    /// Free block ids. Popped from the back, so recently freed blocks are reused first (warm in cache).
    free: Vec<BlockId>,
}

impl KvBlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            ref_counts: vec![0; num_blocks],
            // Reversed so that the first allocations get the low ids: easier to read in logs.
            free: (0..num_blocks as BlockId).rev().collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Allocates `count` blocks, each with one reference, or none at all when fewer are free.
    pub fn allocate(&mut self, count: usize) -> Result<Vec<BlockId>> {
        if count > self.free.len() {
            return Err(Error::OutOfBlocks {
                needed: count,
                free: self.free.len(),
            });
        }
        let blocks = self.free.split_off(self.free.len() - count);
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

    /// Drops one reference to each block; a block whose last reference goes becomes free.
    /// Fails without changing anything if any block is already free (a double free is a bug
    /// that must not silently corrupt the count).
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
        for &block in blocks {
            let count = &mut self.ref_counts[block as usize];
            *count -= 1;
            if *count == 0 {
                self.free.push(block);
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

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(usize),
        Share(usize),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..6).prop_map(Op::Allocate),
            any::<usize>().prop_map(Op::Share),
            any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        /// Against a model of who holds what: no block is ever handed out while held, and the free
        /// count always equals the number of blocks nobody holds.
        #[test]
        fn free_count_is_exact_and_no_block_is_handed_out_twice(ops in prop::collection::vec(op(), 1..200)) {
            const N: usize = 24;
            let mut alloc = KvBlockAllocator::new(N);
            // Each owner holds a list of blocks (one reference each).
            let mut owners: Vec<Vec<BlockId>> = Vec::new();
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
                    _ => {}
                }
                let mut refs: HashMap<BlockId, u32> = HashMap::new();
                for b in owners.iter().flatten() {
                    *refs.entry(*b).or_default() += 1;
                }
                prop_assert_eq!(alloc.num_free(), N - refs.len());
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
