//! A layer's blocks as raw little-endian bytes, the form a KV transfer carries: read out of and
//! written into the paged cache with one copy per run of consecutive blocks, never a per-token
//! scatter and never through an intermediate tensor on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};

use super::allocator::BlockId;
use super::cache::KvCache;
use crate::{Error, Result};

// The wire format is little-endian; on such machines it is the cache's own memory.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "KV transfers assume a little-endian machine"
);

impl KvCache {
    /// Bytes of one block of K (or of V) in one layer.
    pub fn block_bytes(&self) -> usize {
        let spec = self.spec();
        spec.block_size * spec.token_elems() * spec.dtype.size_in_bytes()
    }

    /// [`read_block_bytes`](Self::read_block_bytes) into reused host buffers, as shareable
    /// bytes: what an export ships. A buffer comes back to the pool when the last slice of it is
    /// dropped.
    pub fn read_block_shared(
        &self,
        layer: usize,
        blocks: &[BlockId],
    ) -> Result<(bytes::Bytes, bytes::Bytes)> {
        self.check_blocks(blocks)?;
        let (kc, vc) = self.layer(layer)?;
        if !kc.device().is_cpu() {
            let (k, v) = self.read_block_bytes(layer, blocks)?;
            return Ok((k.into(), v.into()));
        }
        let len = blocks.len() * self.block_bytes();
        let read = |t: &Tensor| -> Result<bytes::Bytes> {
            let mut out = pool::take(len);
            self.copy_runs(t, blocks, &mut out)?;
            Ok(pool::shared(out))
        };
        Ok((read(kc)?, read(vc)?))
    }

    /// Appends the bytes of `blocks` of a CPU layer tensor to `out`, one copy per run.
    fn copy_runs(&self, t: &Tensor, blocks: &[BlockId], out: &mut Vec<u8>) -> Result<()> {
        let bb = self.block_bytes();
        with_cpu_bytes(t, |cache| {
            for (first, count) in runs(blocks) {
                let at = first as usize * bb;
                out.extend_from_slice(&cache[at..at + count * bb]);
            }
        })
    }

    /// K and V of `blocks` of `layer`, `[blocks, block_size, kv_heads, head_dim]` as bytes.
    /// On a GPU this goes through the engine's stream (senders that must not wait for it
    /// stage their own copies).
    pub fn read_block_bytes(&self, layer: usize, blocks: &[BlockId]) -> Result<(Vec<u8>, Vec<u8>)> {
        self.check_blocks(blocks)?;
        let (kc, vc) = self.layer(layer)?;
        if !kc.device().is_cpu() {
            let (k, v) = self.read_blocks(layer, blocks)?;
            return Ok((tensor_bytes(&k)?, tensor_bytes(&v)?));
        }
        let read = |t: &Tensor| -> Result<Vec<u8>> {
            let mut out = Vec::with_capacity(blocks.len() * self.block_bytes());
            self.copy_runs(t, blocks, &mut out)?;
            Ok(out)
        };
        Ok((read(kc)?, read(vc)?))
    }

    /// Writes K and V of `blocks` of `layer` from bytes laid out as
    /// [`read_block_bytes`](Self::read_block_bytes) returns them: block `i` of the bytes goes
    /// to cache block `blocks[i]`.
    pub fn write_block_bytes(
        &self,
        layer: usize,
        blocks: &[BlockId],
        keys: &[u8],
        values: &[u8],
    ) -> Result<()> {
        self.check_blocks(blocks)?;
        let bb = self.block_bytes();
        let expected = blocks.len() * bb;
        if keys.len() != expected || values.len() != expected {
            return Err(Error::invalid(format!(
                "{} + {} bytes of KV for {} blocks, expected {expected} each",
                keys.len(),
                values.len(),
                blocks.len()
            )));
        }
        let (kc, vc) = self.layer(layer)?;
        if !kc.device().is_cpu() {
            let spec = self.spec();
            let shape = (
                blocks.len(),
                spec.block_size,
                spec.num_kv_heads,
                spec.head_dim,
            );
            let device = kc.device();
            let k = bytes_tensor(keys, spec.dtype, shape)?.to_device(device)?;
            let v = bytes_tensor(values, spec.dtype, shape)?.to_device(device)?;
            return self.write_blocks(layer, blocks, &k, &v);
        }
        for (cache, bytes) in [(kc, keys), (vc, values)] {
            cache.inplace_op1(&BlockWrite {
                blocks,
                bytes,
                block_bytes: bb,
            })?;
        }
        Ok(())
    }
}

/// Host buffers for exports, reused. A fresh allocation of megabytes per layer and export is
/// mapped and zeroed by the kernel page by page as the copy first touches it (about 5 % of a
/// loopback transfer's CPU samples under the export copy); a buffer that comes back is already
/// mapped.
mod pool {
    use std::sync::Mutex;

    /// Bytes of idle buffers kept at most.
    const KEEP_BYTES: usize = 256 << 20;

    static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// An empty buffer of at least `len` bytes of capacity: an idle one that is not more than
    /// twice as large, else a new one.
    pub fn take(len: usize) -> Vec<u8> {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        let fit = idle
            .iter()
            .position(|b| b.capacity() >= len && b.capacity() <= len.saturating_mul(2));
        match fit {
            Some(i) => idle.swap_remove(i),
            None => Vec::with_capacity(len),
        }
    }

    /// `buf` as shareable bytes that return it to the pool once the last slice is dropped.
    pub fn shared(buf: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Pooled(buf))
    }

    struct Pooled(Vec<u8>);

    impl AsRef<[u8]> for Pooled {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Pooled {
        fn drop(&mut self) {
            let mut buf = std::mem::take(&mut self.0);
            buf.clear();
            let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
            let kept: usize = idle.iter().map(Vec::capacity).sum();
            if kept + buf.capacity() <= KEEP_BYTES {
                idle.push(buf);
            }
        }
    }
}

/// Runs of consecutive block ids: `(first, count)`.
fn runs(blocks: &[BlockId]) -> impl Iterator<Item = (BlockId, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *blocks.get(i)?;
        let mut count = 1;
        while blocks.get(i + count) == Some(&(first + count as BlockId)) {
            count += 1;
        }
        i += count;
        Some((first, count))
    })
}

/// Calls `f` with the bytes of a contiguous CPU tensor.
fn with_cpu_bytes<T>(t: &Tensor, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::invalid("KV bytes need a contiguous tensor"));
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid("KV bytes of a CPU tensor only"));
    };
    Ok(match cpu {
        CpuStorage::F32(v) => f(bytemuck::cast_slice(&v[a..b])),
        CpuStorage::F16(v) => f(bytemuck::cast_slice(&v[a..b])),
        CpuStorage::BF16(v) => f(bytemuck::cast_slice(&v[a..b])),
        other => {
            return Err(Error::invalid(format!(
                "KV cache of dtype {:?} cannot be shipped",
                other.dtype()
            )))
        }
    })
}

/// The little-endian bytes of a tensor's elements (one copy on the CPU; a GPU tensor comes to
/// the host first).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = if t.device().is_cpu() {
        t.contiguous()?
    } else {
        t.to_device(&candle_core::Device::Cpu)?
    };
    with_cpu_bytes(&t, <[u8]>::to_vec)
}

/// A CPU tensor of `shape` holding `bytes` (little-endian elements of `dtype`).
pub fn bytes_tensor(
    bytes: &[u8],
    dtype: DType,
    shape: (usize, usize, usize, usize),
) -> Result<Tensor> {
    fn typed<T: bytemuck::Pod + candle_core::WithDType>(
        bytes: &[u8],
        shape: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        // Copied into aligned memory: a message's bytes need not be aligned for T.
        let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
        Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
    }
    match dtype {
        DType::F32 => typed::<f32>(bytes, shape),
        DType::F16 => typed::<half::f16>(bytes, shape),
        DType::BF16 => typed::<half::bf16>(bytes, shape),
        other => Err(Error::invalid(format!(
            "KV cache of dtype {other:?} cannot be shipped"
        ))),
    }
}

/// Copies `bytes`, block by block, into the cache blocks `blocks` of one layer's tensor.
struct BlockWrite<'a> {
    blocks: &'a [BlockId],
    bytes: &'a [u8],
    block_bytes: usize,
}

impl InplaceOp1 for BlockWrite<'_> {
    fn name(&self) -> &'static str {
        "kv-write-block-bytes"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("kv-write-block-bytes needs a contiguous cache")
        };
        let cache: &mut [u8] = match storage {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(&mut v[a..b]),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(&mut v[a..b]),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(&mut v[a..b]),
            other => candle_core::bail!("kv-write-block-bytes: dtype {:?}", other.dtype()),
        };
        let bb = self.block_bytes;
        let mut from = 0;
        for (first, count) in runs(self.blocks) {
            let at = first as usize * bb;
            let n = count * bb;
            cache[at..at + n].copy_from_slice(&self.bytes[from..from + n]);
            from += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCacheSpec;
    use candle_core::Device;

    fn cache(dtype: DType) -> KvCache {
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
            num_blocks: 10,
            dtype,
        };
        KvCache::new(spec, &Device::Cpu).unwrap()
    }

    #[test]
    fn runs_group_consecutive_ids() {
        let r: Vec<_> = runs(&[3, 4, 5, 9, 1, 2, 7]).collect();
        assert_eq!(r, vec![(3, 3), (9, 1), (1, 2), (7, 1)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn block_bytes_agree_with_the_tensor_reads_and_writes() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let src = cache(dtype);
            let blocks = [7, 2, 3, 4, 0];
            let shape = (blocks.len(), 4, 2, 4);
            let k = Tensor::randn(0f32, 1., shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let v = (&k * 3.0).unwrap();
            src.write_blocks(1, &blocks, &k, &v).unwrap();
            let (kb, vb) = src.read_block_bytes(1, &blocks).unwrap();
            assert_eq!(kb, tensor_bytes(&k).unwrap(), "{dtype:?}");
            assert_eq!(vb, tensor_bytes(&v).unwrap(), "{dtype:?}");

            // Into other blocks of another cache; read back through tensors.
            let dst = cache(dtype);
            let elsewhere = [1, 9, 8, 5, 6];
            dst.write_block_bytes(1, &elsewhere, &kb, &vb).unwrap();
            let (k2, v2) = dst.read_blocks(1, &elsewhere).unwrap();
            assert_eq!(tensor_bytes(&k2).unwrap(), kb);
            assert_eq!(tensor_bytes(&v2).unwrap(), vb);
            // Nothing else was touched.
            let (k0, _) = dst.read_block_bytes(0, &elsewhere).unwrap();
            assert!(k0.iter().all(|&b| b == 0));
            let (k3, _) = dst.read_block_bytes(1, &[0, 2, 3, 4, 7]).unwrap();
            assert!(k3.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn shared_reads_equal_plain_reads_and_their_buffers_come_back() {
        let c = cache(DType::BF16);
        let blocks = [5, 6, 1];
        let shape = (blocks.len(), 4, 2, 4);
        let k = Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        c.write_blocks(0, &blocks, &k, &(&k * 2.0).unwrap())
            .unwrap();
        let (kb, vb) = c.read_block_bytes(0, &blocks).unwrap();
        let (ks, vs) = c.read_block_shared(0, &blocks).unwrap();
        assert_eq!((&ks[..], &vs[..]), (&kb[..], &vb[..]));
        // A slice keeps the buffer out of the pool; once the last one is gone, the next read of
        // the same size gets it again instead of new memory. (Other tests share the pool, so
        // look for the address among a few reads.)
        let slice = ks.slice(8..16);
        let at = ks.as_ptr();
        drop(ks);
        drop(vs);
        assert_eq!(&slice[..], &kb[8..16]);
        drop(slice);
        let again: Vec<_> = (0..4)
            .map(|_| c.read_block_shared(0, &blocks).unwrap())
            .collect();
        assert!(again
            .iter()
            .any(|(k, v)| k.as_ptr() == at || v.as_ptr() == at));
        assert!(again
            .iter()
            .all(|(k, v)| k[..] == kb[..] && v[..] == vb[..]));
    }

    #[test]
    fn wrong_sizes_and_blocks_are_refused() {
        let c = cache(DType::F16);
        let bb = c.block_bytes();
        assert_eq!(bb, 4 * 2 * 4 * 2);
        let ok = vec![1u8; 2 * bb];
        assert!(c.write_block_bytes(0, &[1, 2], &ok, &ok[..bb]).is_err());
        assert!(c.write_block_bytes(0, &[1, 10], &ok, &ok).is_err());
        assert!(c.write_block_bytes(2, &[1, 2], &ok, &ok).is_err());
        assert!(c.read_block_bytes(0, &[10]).is_err());
        c.write_block_bytes(0, &[1, 2], &ok, &ok).unwrap();
    }

    #[test]
    fn bytes_become_a_tensor_of_the_dtype() {
        let t = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bytes = tensor_bytes(&t).unwrap();
        let back = bytes_tensor(&bytes, DType::BF16, (1, 2, 2, 2)).unwrap();
        assert_eq!(tensor_bytes(&back).unwrap(), bytes);
        assert!(bytes_tensor(&bytes, DType::U8, (1, 2, 2, 2)).is_err());
    }
}
