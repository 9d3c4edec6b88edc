//! One layer's K and V for a run of blocks, as bytes with a checksum: the unit a prefill node
//! sends as soon as a layer is computed, and a decode node verifies before writing it into the
//! blocks it reserved.

use bytes::Bytes;
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
    let (keys, values) = cache.read_block_bytes(layer, blocks)?;
    Ok(chunk_from_bytes(
        layer,
        first_block,
        blocks.len() as u32,
        keys.into(),
        values.into(),
    ))
}

/// The whole of one export as a single chunk.
pub fn chunk_of(kv: &crate::engine::ExportedKv) -> Result<KvChunk> {
    let (keys, values) = kv.host_bytes()?;
    Ok(chunk_from_bytes(
        kv.layer,
        kv.first_block as u32,
        kv.num_blocks as u32,
        keys,
        values,
    ))
}

/// A chunk around bytes already laid out for the wire; computes its checksum.
pub fn chunk_from_bytes(
    layer: usize,
    first_block: u32,
    num_blocks: u32,
    keys: Bytes,
    values: Bytes,
) -> KvChunk {
    KvChunk {
        layer: layer as u32,
        first_block,
        num_blocks,
        checksum: checksum(&keys, &values),
        keys,
        values,
    }
}

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

/// Verifies a chunk (range, sizes, checksum) and returns the cache blocks it goes to; nothing
/// is written.
pub fn verify_chunk<'a>(
    cache: &KvCache,
    chunk: &KvChunk,
    reservation: &'a [BlockId],
) -> Result<&'a [BlockId]> {
    let blocks = verify_layout(cache, chunk, reservation)?;
    verify_checksum(chunk)?;
    Ok(blocks)
}

/// Checks a chunk's bytes against its checksum: a pure function of the chunk, so a receiver
/// runs it before taking any lock.
pub fn verify_checksum(chunk: &KvChunk) -> Result<()> {
    if checksum(&chunk.keys, &chunk.values) != chunk.checksum {
        return Err(Error::BadKvChunk(format!(
            "layer {}: checksum mismatch",
            chunk.layer
        )));
    }
    Ok(())
}

/// Checks a chunk's range and sizes (not its checksum) and returns the cache blocks it goes to.
fn verify_layout<'a>(
    cache: &KvCache,
    chunk: &KvChunk,
    reservation: &'a [BlockId],
) -> Result<&'a [BlockId]> {
    let bad = |msg: String| Error::BadKvChunk(format!("layer {}: {msg}", chunk.layer));
    let blocks = chunk_blocks(cache.spec(), chunk, reservation)?;
    let expected = blocks.len() * cache.block_bytes();
    if chunk.keys.len() != expected || chunk.values.len() != expected {
        return Err(bad(format!(
            "{} + {} bytes for {} blocks, expected {expected} each",
            chunk.keys.len(),
            chunk.values.len(),
            blocks.len()
        )));
    }
    Ok(blocks)
}

/// Writes a chunk whose checksum [`verify_checksum`] passed into the blocks of `reservation` it
/// names, after checking its range and sizes. Returns the bytes written.
pub fn write_checked_chunk(
    cache: &KvCache,
    chunk: &KvChunk,
    reservation: &[BlockId],
) -> Result<usize> {
    write_into(cache, chunk, verify_layout(cache, chunk, reservation)?)
}

/// Verifies a chunk and writes it into the blocks of `reservation` it names. Returns the bytes
/// written. Nothing is written unless the whole chunk is valid.
pub fn decode_chunk_into(
    cache: &KvCache,
    chunk: &KvChunk,
    reservation: &[BlockId],
) -> Result<usize> {
    write_into(cache, chunk, verify_chunk(cache, chunk, reservation)?)
}

/// Writes a verified chunk's K and V into `blocks`; returns the bytes written.
fn write_into(cache: &KvCache, chunk: &KvChunk, blocks: &[BlockId]) -> Result<usize> {
    cache.write_block_bytes(chunk.layer as usize, blocks, &chunk.keys, &chunk.values)?;
    Ok(chunk.keys.len() + chunk.values.len())
}

/// CRC-32C (Castagnoli) of `keys` followed by `values`: hardware-accelerated where the CPU has
/// it (SSE 4.2, ARMv8 CRC), so verifying runs at memory speed.
pub fn checksum(keys: &[u8], values: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(keys), values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCacheSpec;
    use candle_core::{DType, Device, Tensor};

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
        let mut values = flipped.values.to_vec();
        values[5] ^= 0x10;
        flipped.values = values.into();
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
            keys: Bytes::new(),
            values: Bytes::new(),
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
