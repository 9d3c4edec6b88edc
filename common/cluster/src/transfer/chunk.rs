//! One layer's K and V for a run of blocks, as bytes with a checksum: the unit a prefill node
//! sends as soon as a layer is computed, and a decode node verifies before writing it into the
//! blocks it reserved.

use candle_core::{DType, Tensor};
use half::{bf16, f16};
use pd_proto::v1::KvChunk;

use crate::kv::{BlockId, KvCache};
use crate::{Error, Result};

/// Reads `blocks` of `layer` from `cache` into a chunk that names them as the run starting at
/// `first_block` of the receiver's reservation.
pub fn encode_chunk(
    cache: &KvCache,
    layer: usize,
    blocks: &[BlockId],
    first_block: u32,
) -> Result<KvChunk> {
    let (k, v) = cache.read_blocks(layer, blocks)?;
    chunk_from_tensors(layer, first_block, &k, &v)
}

/// A chunk of K and V already read from a cache, `[blocks, block_size, kv_heads, head_dim]`.
pub fn chunk_from_tensors(
    layer: usize,
    first_block: u32,
    keys: &Tensor,
    values: &Tensor,
) -> Result<KvChunk> {
    let num_blocks = keys.dim(0)? as u32;
    let keys = tensor_bytes(keys)?;
    let values = tensor_bytes(values)?;
    Ok(KvChunk {
        layer: layer as u32,
        first_block,
        num_blocks,
        checksum: checksum(&keys, &values),
        keys,
        values,
    })
}

/// Verifies a chunk and writes it into the blocks of `reservation` it names. Returns the bytes
/// written. Nothing is written unless the whole chunk is valid.
/// The cache blocks a chunk names: its layer must exist and its run must lie inside the
/// reservation (chunks index the reservation; they never name cache blocks themselves).
pub fn chunk_blocks<'a>(
    spec: &crate::kv::KvCacheSpec,
    chunk: &KvChunk,
    reservation: &'a [BlockId],
) -> Result<&'a [BlockId]> {
    let bad = |msg: String| Error::BadKvChunk(format!("layer {}: {msg}", chunk.layer));
    if chunk.layer as usize >= spec.num_layers {
        return Err(bad(format!("the model has {} layers", spec.num_layers)));
    }
    let first = chunk.first_block as usize;
    let count = chunk.num_blocks as usize;
    first
        .checked_add(count)
        .filter(|&end| count > 0 && end <= reservation.len())
        .map(|end| &reservation[first..end])
        .ok_or_else(|| {
            bad(format!(
                "blocks {first}..{} outside the reservation of {}",
                first.saturating_add(count),
                reservation.len()
            ))
        })
}

pub fn decode_chunk_into(
    cache: &KvCache,
    chunk: &KvChunk,
    reservation: &[BlockId],
) -> Result<usize> {
    let spec = cache.spec();
    let bad = |msg: String| Error::BadKvChunk(format!("layer {}: {msg}", chunk.layer));
    let blocks = chunk_blocks(spec, chunk, reservation)?;
    let count = blocks.len();
    let expected = count * spec.block_size * spec.token_elems() * spec.dtype.size_in_bytes();
    if chunk.keys.len() != expected || chunk.values.len() != expected {
        return Err(bad(format!(
            "{} + {} bytes for {count} blocks, expected {expected} each",
            chunk.keys.len(),
            chunk.values.len()
        )));
    }
    if checksum(&chunk.keys, &chunk.values) != chunk.checksum {
        return Err(bad("checksum mismatch".into()));
    }
    let shape = (count, spec.block_size, spec.num_kv_heads, spec.head_dim);
    let device = cache.layer(0)?.0.device().clone();
    let k = bytes_tensor(&chunk.keys, spec.dtype, shape, &device)?;
    let v = bytes_tensor(&chunk.values, spec.dtype, shape, &device)?;
    cache.write_blocks(chunk.layer as usize, blocks, &k, &v)?;
    Ok(2 * expected)
}

fn checksum(keys: &[u8], values: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(keys);
    h.update(values);
    h.finalize()
}

/// Little-endian bytes of a tensor's elements. On little-endian machines (all we build for in
/// practice) this is one copy of the tensor's memory.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => le_bytes(&flat.to_vec1::<f32>()?, |x| x.to_le_bytes()),
        DType::F16 => le_bytes(&flat.to_vec1::<f16>()?, |x| x.to_le_bytes()),
        DType::BF16 => le_bytes(&flat.to_vec1::<bf16>()?, |x| x.to_le_bytes()),
        other => {
            return Err(Error::invalid(format!(
                "KV cache of dtype {other:?} cannot be shipped"
            )))
        }
    })
}

fn le_bytes<T: bytemuck::Pod, const N: usize>(v: &[T], to_le: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(v).to_vec()
    } else {
        v.iter().flat_map(to_le).collect()
    }
}

fn from_le_bytes<T: bytemuck::Pod, const N: usize>(
    bytes: &[u8],
    from_le: impl Fn([u8; N]) -> T,
) -> Vec<T> {
    if cfg!(target_endian = "little") {
        // Copies into aligned memory: a message's bytes need not be aligned for T.
        let n = bytes.len() / N;
        let mut v = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&bytes[..n * N]);
        v
    } else {
        bytes
            .chunks_exact(N)
            .map(|b| from_le(b.try_into().unwrap_or([0; N])))
            .collect()
    }
}

fn bytes_tensor(
    bytes: &[u8],
    dtype: DType,
    shape: (usize, usize, usize, usize),
    device: &candle_core::Device,
) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => Tensor::from_vec(from_le_bytes(bytes, f32::from_le_bytes), shape, device)?,
        DType::F16 => Tensor::from_vec(from_le_bytes(bytes, f16::from_le_bytes), shape, device)?,
        DType::BF16 => Tensor::from_vec(from_le_bytes(bytes, bf16::from_le_bytes), shape, device)?,
        other => {
            return Err(Error::invalid(format!(
                "KV cache of dtype {other:?} cannot be shipped"
            )))
        }
    })
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
            head_dim: 8,
            block_size: 4,
            num_blocks: 12,
            dtype,
        };
        KvCache::new(spec, &Device::Cpu).unwrap()
    }

    fn fill(cache: &KvCache, layer: usize, blocks: &[u32]) {
        let n = blocks.len() * 4;
        let k = Tensor::randn(0f32, 1., (n, 2, 8), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1., (n, 2, 8), &Device::Cpu).unwrap();
        let slots: Vec<u32> = blocks
            .iter()
            .flat_map(|&b| (0..4).map(move |o| b * 4 + o))
            .collect();
        cache.write_slots(layer, &k, &v, &slots).unwrap();
    }

    fn same(a: &KvCache, ab: &[u32], b: &KvCache, bb: &[u32], layer: usize) -> bool {
        let (ka, va) = a.read_blocks(layer, ab).unwrap();
        let (kb, vb) = b.read_blocks(layer, bb).unwrap();
        let eq = |x: Tensor, y: Tensor| {
            x.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                == y.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
        };
        eq(ka, kb) && eq(va, vb)
    }

    #[test]
    fn chunks_round_trip_into_the_reserved_blocks_for_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let src = cache(dtype);
            fill(&src, 1, &[3, 7, 1]);
            let dst = cache(dtype);
            let reservation = [9, 0, 5, 11];
            // The sender's blocks 7 and 1 become blocks 1 and 2 of the reservation (ids 0, 5).
            let chunk = encode_chunk(&src, 1, &[7, 1], 1).unwrap();
            let written = decode_chunk_into(&dst, &chunk, &reservation).unwrap();
            assert_eq!(written, chunk.keys.len() + chunk.values.len());
            assert!(same(&src, &[7, 1], &dst, &[0, 5], 1), "{dtype:?}");
        }
    }

    #[test]
    fn corrupt_or_misdirected_chunks_are_refused_and_write_nothing() {
        let src = cache(DType::F16);
        fill(&src, 0, &[2, 4]);
        let dst = cache(DType::F16);
        let reservation = [6, 8];
        let good = encode_chunk(&src, 0, &[2, 4], 0).unwrap();

        let mut flipped = good.clone();
        flipped.values[5] ^= 0x10;
        let err = decode_chunk_into(&dst, &flipped, &reservation).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");

        let beyond = KvChunk {
            first_block: 1,
            ..good.clone()
        };
        assert!(decode_chunk_into(&dst, &beyond, &reservation)
            .unwrap_err()
            .to_string()
            .contains("reservation"));
        let huge = KvChunk {
            first_block: u32::MAX,
            ..good.clone()
        };
        assert!(decode_chunk_into(&dst, &huge, &reservation).is_err());
        let layer = KvChunk {
            layer: 2,
            ..good.clone()
        };
        assert!(decode_chunk_into(&dst, &layer, &reservation)
            .unwrap_err()
            .to_string()
            .contains("layers"));
        let mut short = good.clone();
        short.keys.truncate(10);
        assert!(decode_chunk_into(&dst, &short, &reservation)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
        let empty = KvChunk {
            num_blocks: 0,
            keys: vec![],
            values: vec![],
            ..good.clone()
        };
        assert!(decode_chunk_into(&dst, &empty, &reservation).is_err());

        // None of those touched the destination; the good chunk then lands.
        let zero = cache(DType::F16);
        assert!(same(&dst, &[6, 8], &zero, &[6, 8], 0));
        decode_chunk_into(&dst, &good, &reservation).unwrap();
        assert!(same(&src, &[2, 4], &dst, &[6, 8], 0));
    }
}
