//! Names for the content of full KV blocks, for the prefix cache.
//!
//! A block's K and V depend on the model, the cache layout and every token up to the block's
//! end, so a block is named by a hash chained from its predecessor's: SHA-256 of the previous
//! block's hash and this block's token ids, starting from a root that hashes the model and the
//! layout. Equal names mean equal KV in every process on every machine (no per-process seed),
//! and SHA-256 makes a collision, which would hand one prompt another's KV, out of reach.

use sha2::{Digest, Sha256};

/// The name of one full block's content: its tokens and everything before them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The name in lowercase hex, as logs and other implementations spell it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a block's KV depends on besides its tokens: the weights (by name), the cache's element
/// type and the block size. Nodes that agree on these share names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixKey {
    pub model: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub kv_dtype: String,
    pub block_size: usize,
}

impl PrefixKey {
    /// The hash every chain starts from.
    pub fn root(&self) -> BlockHash {
        let mut h = Sha256::new();
        h.update(b"pd-prefix-cache/v1\0");
        for part in [self.model.as_bytes(), self.kv_dtype.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for n in [
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
        ] {
            h.update((n as u64).to_le_bytes());
        }
        BlockHash(h.finalize().into())
    }
}

/// The name of a block holding `tokens` after the block named `parent`.
pub fn chain(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.0);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    BlockHash(h.finalize().into())
}

/// Extends `hashes` (the names of the leading full blocks of `tokens`) to every full block.
pub fn extend_hashes(
    root: &BlockHash,
    tokens: &[u32],
    block_size: usize,
    hashes: &mut Vec<BlockHash>,
) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = hashes.last().unwrap_or(root);
        let next = chain(parent, &tokens[i * block_size..(i + 1) * block_size]);
        hashes.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PrefixKey {
        PrefixKey {
            model: "m".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            kv_dtype: "f16".into(),
            block_size: 4,
        }
    }

    #[test]
    fn names_are_fixed_across_processes_and_chained() {
        let root = key().root();
        // Constants: the same in every process and on every machine, release after release (a
        // change here silently stops nodes of two releases from sharing blocks). Reproduced by
        // SHA-256 of the layout documented above, e.g. in Python's hashlib.
        assert_eq!(
            root.to_hex(),
            "f70e3445151e209665be86d4a6f7a3f12baa2332b132d0036a33c72e9bf77fad"
        );
        assert_eq!(
            chain(&root, &[1, 2, 3, 4]).to_hex(),
            "24c5f434cc898938df04d742cbbdb4aecd4ab0f83aa584ab38447fa75d7f8c46"
        );
        let mut a = Vec::new();
        extend_hashes(&root, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, &mut a);
        assert_eq!(a.len(), 2, "the partial third block has no name");
        assert_eq!(a[0], chain(&root, &[1, 2, 3, 4]));
        assert_eq!(a[1], chain(&a[0], &[5, 6, 7, 8]));
        // The same tokens after a different prefix are another block.
        let mut b = Vec::new();
        extend_hashes(&root, &[0, 2, 3, 4, 5, 6, 7, 8], 4, &mut b);
        assert_ne!(a[1], b[1]);
        // Extending is incremental and agrees with hashing at once.
        let mut c = a[..1].to_vec();
        extend_hashes(&root, &[1, 2, 3, 4, 5, 6, 7, 8], 4, &mut c);
        assert_eq!(c, a);
    }

    #[test]
    fn every_part_of_the_key_changes_the_root() {
        let base = key().root();
        let variants = [
            PrefixKey {
                model: "n".into(),
                ..key()
            },
            PrefixKey {
                num_layers: 3,
                ..key()
            },
            PrefixKey {
                num_kv_heads: 1,
                ..key()
            },
            PrefixKey {
                head_dim: 16,
                ..key()
            },
            PrefixKey {
                kv_dtype: "bf16".into(),
                ..key()
            },
            PrefixKey {
                block_size: 16,
                ..key()
            },
        ];
        for v in variants {
            assert_ne!(v.root(), base, "{v:?}");
        }
    }
}
