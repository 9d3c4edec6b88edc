//! The paged KV cache tensors: per layer, K and V of shape
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, written in place.
//!
//! Blocks are addressed by id so that a sequence's cache need not be contiguous, and whole
//! `(layer, block range)` pieces can be read out and written in: that is how KV computed on a
//! prefill node lands in a decode node's cache.

use candle_core::{
    backend::BackendStorage, CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, WithDType,
};

use super::allocator::BlockId;
use crate::{Error, Result};

/// The shape of a KV cache, which is also what both ends of a KV transfer must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Elements of one token's K (or V) in one layer.
    pub fn token_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of one block of K plus V across all layers.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.token_elems() * self.dtype.size_in_bytes()
    }
}

/// Per-layer K and V cache tensors. Cloning shares the tensors.
#[derive(Debug, Clone)]
pub struct KvCache {
    spec: KvCacheSpec,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl KvCache {
    pub fn new(spec: KvCacheSpec, device: &Device) -> Result<Self> {
        let shape = (
            spec.num_blocks,
            spec.block_size,
            spec.num_kv_heads,
            spec.head_dim,
        );
        let mut keys = Vec::with_capacity(spec.num_layers);
        let mut values = Vec::with_capacity(spec.num_layers);
        for _ in 0..spec.num_layers {
            keys.push(Tensor::zeros(shape, spec.dtype, device)?);
            values.push(Tensor::zeros(shape, spec.dtype, device)?);
        }
        Ok(Self { spec, keys, values })
    }

    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }

    /// The K and V tensors of one layer.
    pub fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match (self.keys.get(layer), self.values.get(layer)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Error::invalid(format!(
                "layer {layer} out of range (the cache has {})",
                self.spec.num_layers
            ))),
        }
    }

    /// Writes the K and V of new tokens (`[tokens, num_kv_heads, head_dim]`) into their slots
    /// (`slot = block_id * block_size + offset in block`).
    pub fn write_slots(&self, layer: usize, k: &Tensor, v: &Tensor, slots: &[u32]) -> Result<()> {
        self.write_rows(layer, k, v, &self.slot_map(slots)?)
    }

    /// Checks slots once for a whole forward step (every layer writes the same slots; on a GPU
    /// they are uploaded once).
    pub fn slot_map(&self, slots: &[u32]) -> Result<SlotMap> {
        SlotMap::new(&self.spec, slots)
    }

    /// [`write_slots`](Self::write_slots) with slots checked beforehand.
    pub fn write_rows(&self, layer: usize, k: &Tensor, v: &Tensor, slots: &SlotMap) -> Result<()> {
        let (kc, vc) = self.layer(layer)?;
        let expected = [
            slots.slots.len(),
            self.spec.num_kv_heads,
            self.spec.head_dim,
        ];
        for rows in [k, v] {
            if rows.dims() != expected {
                return Err(Error::invalid(format!(
                    "new KV rows have shape {:?}, expected {expected:?}",
                    rows.dims()
                )));
            }
        }
        kc.inplace_op2(&k.to_dtype(self.spec.dtype)?.contiguous()?, slots)?;
        vc.inplace_op2(&v.to_dtype(self.spec.dtype)?.contiguous()?, slots)?;
        Ok(())
    }

    /// Reads whole blocks of one layer: K and V of shape `[blocks, block_size, kv_heads, head_dim]`.
    pub fn read_blocks(&self, layer: usize, blocks: &[BlockId]) -> Result<(Tensor, Tensor)> {
        self.read_run(layer, &self.block_run(blocks)?)
    }

    /// A run of blocks checked against the cache, to be read from several layers (on a GPU its
    /// ids are uploaded once: an upload from pageable memory waits for the engine's stream).
    pub fn block_run(&self, blocks: &[BlockId]) -> Result<BlockRun> {
        self.check_blocks(blocks)?;
        Ok(BlockRun {
            blocks: blocks.to_vec(),
            #[cfg(feature = "cuda")]
            op: BlockCopy::new(&self.spec, blocks),
        })
    }

    /// [`read_blocks`](Self::read_blocks) of a checked run.
    pub fn read_run(&self, layer: usize, run: &BlockRun) -> Result<(Tensor, Tensor)> {
        let (kc, vc) = self.layer(layer)?;
        #[cfg(feature = "cuda")]
        if kc.device().is_cuda() {
            return Ok((kc.apply_op1_no_bwd(&run.op)?, vc.apply_op1_no_bwd(&run.op)?));
        }
        let ids = Tensor::from_slice(&run.blocks, run.blocks.len(), kc.device())?;
        Ok((kc.index_select(&ids, 0)?, vc.index_select(&ids, 0)?))
    }

    /// Writes whole blocks of one layer from K and V of shape `[blocks, block_size, kv_heads, head_dim]`.
    pub fn write_blocks(
        &self,
        layer: usize,
        blocks: &[BlockId],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        self.check_blocks(blocks)?;
        let bs = self.spec.block_size;
        let expected = (blocks.len(), bs, self.spec.num_kv_heads, self.spec.head_dim);
        for t in [k, v] {
            if t.dims() != [expected.0, expected.1, expected.2, expected.3] {
                return Err(Error::invalid(format!(
                    "KV blocks have shape {:?}, expected {expected:?}",
                    t.dims()
                )));
            }
        }
        #[cfg(feature = "cuda")]
        if k.device().is_cuda() {
            let (kc, vc) = self.layer(layer)?;
            let op = BlockCopy::new(&self.spec, blocks);
            kc.inplace_op2(&k.to_dtype(self.spec.dtype)?.contiguous()?, &op)?;
            vc.inplace_op2(&v.to_dtype(self.spec.dtype)?.contiguous()?, &op)?;
            return Ok(());
        }
        let slots: Vec<u32> = blocks
            .iter()
            .flat_map(|&b| (0..bs as u32).map(move |o| b * bs as u32 + o))
            .collect();
        let rows = (
            blocks.len() * bs,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        );
        self.write_slots(layer, &k.reshape(rows)?, &v.reshape(rows)?, &slots)
    }

    /// Copies whole blocks `src[i]` to `dst[i]` in every layer (a beam's fork takes its own
    /// copy of the block it will write into).
    pub fn copy_blocks(&self, src: &[BlockId], dst: &[BlockId]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid(format!(
                "copying {} KV blocks into {}",
                src.len(),
                dst.len()
            )));
        }
        let run = self.block_run(src)?;
        for layer in 0..self.spec.num_layers {
            let (k, v) = self.read_run(layer, &run)?;
            self.write_blocks(layer, dst, &k, &v)?;
        }
        Ok(())
    }

    pub(super) fn check_blocks(&self, blocks: &[BlockId]) -> Result<()> {
        match blocks.iter().find(|&&b| b as usize >= self.spec.num_blocks) {
            Some(b) => Err(Error::invalid(format!(
                "KV block {b} out of range (the cache has {})",
                self.spec.num_blocks
            ))),
            None => Ok(()),
        }
    }
}

/// The cache slots of a step's new tokens, checked against the cache: an in-place scatter of
/// token rows into those slots.
pub struct SlotMap {
    slots: Vec<u32>,
    row_elems: usize,
    #[cfg(feature = "cuda")]
    device_slots: std::sync::OnceLock<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>,
}

impl SlotMap {
    fn new(spec: &KvCacheSpec, slots: &[u32]) -> Result<Self> {
        let capacity = spec.num_blocks * spec.block_size;
        if let Some(slot) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(Error::invalid(format!(
                "KV slot {slot} out of range (the cache has {capacity} slots)"
            )));
        }
        Ok(Self {
            slots: slots.to_vec(),
            row_elems: spec.token_elems(),
            #[cfg(feature = "cuda")]
            device_slots: std::sync::OnceLock::new(),
        })
    }

    /// Number of slots (new tokens).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slots on the device, uploaded by the first layer that needs them.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_slots(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<&candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>> {
        if let Some(s) = self.device_slots.get() {
            return Ok(s);
        }
        let uploaded = dev.clone_htod(&self.slots)?;
        let _ = self.device_slots.set(uploaded);
        Ok(self.device_slots.get().expect("just set"))
    }

    fn scatter<T: WithDType>(&self, dst: &mut [T], src: &[T]) {
        let n = self.row_elems;
        for (row, &slot) in src.chunks_exact(n).zip(&self.slots) {
            let at = slot as usize * n;
            dst[at..at + n].copy_from_slice(row);
        }
    }
}

impl InplaceOp2 for SlotMap {
    fn name(&self) -> &'static str {
        "kv-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("kv-scatter-rows needs contiguous tensors")
        };
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.scatter(&mut d[d0..d1], &s[s0..s1]),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.scatter(&mut d[d0..d1], &s[s0..s1]),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.scatter(&mut d[d0..d1], &s[s0..s1]),
            (d, s) => candle_core::bail!(
                "kv-scatter-rows: unsupported dtypes {:?} <- {:?}",
                d.dtype(),
                s.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let slots = self.device_slots(&dst.device)?;
        let row_bytes = self.row_elems * crate::cuda::dtype_of(dst).size_in_bytes();
        super::cuda::scatter_rows(dst, dst_l, src, src_l, slots, self.slots.len(), row_bytes)
    }
}

/// Blocks of one sequence, checked against the cache (see [`KvCache::block_run`]).
pub struct BlockRun {
    blocks: Vec<BlockId>,
    #[cfg(feature = "cuda")]
    op: BlockCopy,
}

impl BlockRun {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
}

/// Whole-block copies between the cache and a contiguous `[blocks, block_size, kv_heads,
/// head_dim]` buffer on a GPU: a gather as a new tensor, a scatter in place.
#[cfg(feature = "cuda")]
struct BlockCopy {
    blocks: Vec<u32>,
    block_elems: usize,
    shape: candle_core::Shape,
    device_ids: std::sync::OnceLock<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>,
}

#[cfg(feature = "cuda")]
impl BlockCopy {
    fn ids(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<&candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>> {
        if let Some(ids) = self.device_ids.get() {
            return Ok(ids);
        }
        let _ = self.device_ids.set(dev.clone_htod(&self.blocks)?);
        Ok(self.device_ids.get().expect("just set"))
    }
}

#[cfg(feature = "cuda")]
impl BlockCopy {
    fn new(spec: &KvCacheSpec, blocks: &[BlockId]) -> Self {
        Self {
            blocks: blocks.to_vec(),
            block_elems: spec.block_size * spec.token_elems(),
            shape: (
                blocks.len(),
                spec.block_size,
                spec.num_kv_heads,
                spec.head_dim,
            )
                .into(),
            device_ids: std::sync::OnceLock::new(),
        }
    }
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for BlockCopy {
    fn name(&self) -> &'static str {
        "kv-gather-blocks"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        candle_core::bail!("kv-gather-blocks runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        cache: &candle_core::CudaStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let blocks = self.ids(&cache.device)?;
        let out = super::cuda::gather_blocks(
            cache,
            cache_l,
            blocks,
            self.blocks.len(),
            self.block_elems,
        )?;
        Ok((out, self.shape.clone()))
    }
}

#[cfg(feature = "cuda")]
impl InplaceOp2 for BlockCopy {
    fn name(&self) -> &'static str {
        "kv-scatter-blocks"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("kv-scatter-blocks runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        buf: &candle_core::CudaStorage,
        buf_l: &Layout,
    ) -> candle_core::Result<()> {
        let blocks = self.ids(&cache.device)?;
        super::cuda::scatter_blocks(
            cache,
            cache_l,
            buf,
            buf_l,
            blocks,
            self.blocks.len(),
            self.block_elems,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
            num_blocks: 8,
            dtype: DType::F32,
        }
    }

    #[test]
    fn copied_blocks_hold_the_source_in_every_layer_and_leave_it_alone() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        let k = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((4, 2, 4))
            .unwrap();
        let v = (&k * -1.0).unwrap();
        for layer in 0..2 {
            let kl = (&k + layer as f64).unwrap();
            cache.write_slots(layer, &kl, &v, &[8, 9, 10, 11]).unwrap();
        }
        cache.copy_blocks(&[2], &[5]).unwrap();
        for layer in 0..2 {
            let (a, av) = cache.read_blocks(layer, &[2]).unwrap();
            let (b, bv) = cache.read_blocks(layer, &[5]).unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_eq!(flat(&a), flat(&b));
            assert_eq!(flat(&av), flat(&bv));
            assert_eq!(flat(&a)[1], 1.0 + layer as f32);
        }
        assert!(cache.copy_blocks(&[2], &[5, 6]).is_err());
        assert!(cache.copy_blocks(&[2], &[99]).is_err());
    }

    #[test]
    fn slots_written_are_read_back_through_their_blocks() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        let k = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((3, 2, 4))
            .unwrap();
        let v = (&k * -1.0).unwrap();
        // Slots 5, 6 (block 1) and 28 (block 7, offset 0).
        cache.write_slots(1, &k, &v, &[5, 6, 28]).unwrap();
        let (kb, vb) = cache.read_blocks(1, &[7, 1]).unwrap();
        // [block, offset, head, dim] -> the 4 values of that head.
        let at = |t: &Tensor, b: usize, o: usize, h: usize| -> Vec<f32> {
            let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let i = ((b * 4 + o) * 2 + h) * 4;
            flat[i..i + 4].to_vec()
        };
        // Row r of k holds 8r..8r+8: head 0 then head 1.
        assert_eq!(at(&kb, 0, 0, 1), vec![20., 21., 22., 23.]); // slot 28 = row 2
        assert_eq!(at(&kb, 1, 1, 0), vec![0., 1., 2., 3.]); // slot 5 = row 0
        assert_eq!(at(&kb, 1, 2, 1), vec![12., 13., 14., 15.]); // slot 6 = row 1
        assert_eq!(at(&vb, 1, 1, 0), vec![0., -1., -2., -3.]);
        // Layer 0 untouched.
        let (k0, _) = cache.read_blocks(0, &[1]).unwrap();
        assert_eq!(
            k0.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn whole_blocks_round_trip_between_caches() {
        let src = KvCache::new(spec(), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1., (8, 2, 4), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1., (8, 2, 4), &Device::Cpu).unwrap();
        let slots: Vec<u32> = (8..16).collect(); // blocks 2 and 3
        src.write_slots(0, &k, &v, &slots).unwrap();
        let (kb, vb) = src.read_blocks(0, &[2, 3]).unwrap();

        let dst = KvCache::new(spec(), &Device::Cpu).unwrap();
        dst.write_blocks(0, &[6, 0], &kb, &vb).unwrap();
        let (k2, v2) = dst.read_blocks(0, &[6, 0]).unwrap();
        let diff = (k2 - kb).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let diff = (v2 - vb).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn out_of_range_blocks_slots_and_shapes_are_errors() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        assert!(cache.read_blocks(0, &[8]).is_err());
        assert!(cache.read_blocks(2, &[0]).is_err());
        let k = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(cache.write_slots(0, &k, &k, &[32]).is_err());
        assert!(cache.write_slots(0, &k, &k, &[1, 2]).is_err());
        let wrong = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(cache.write_blocks(0, &[0], &wrong, &wrong).is_err());
    }
}
