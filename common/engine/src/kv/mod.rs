//! The paged KV cache: the block allocator (with the prefix cache), the names of cached blocks,
//! per-sequence block tables and the cache tensors.

pub mod allocator;
pub mod bytes;
pub mod cache;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod events;
pub mod prefix;

pub use allocator::{blocks_for_tokens, BlockId, KvBlockAllocator};
pub use bytes::{bytes_tensor, tensor_bytes};
pub use cache::{BlockRun, KvCache, KvCacheSpec, SlotMap};
pub use events::{KvEvent, KvEventLog};
pub use prefix::{BlockHash, PrefixKey};
