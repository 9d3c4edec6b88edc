//! The KV cache's CUDA kernels: scattering new token rows into their slots, and moving whole
//! blocks between the paged cache and a contiguous buffer (what a KV transfer sends).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout};

use crate::cuda::{function, Module};

/// `dst[slots[i]] = src[i]` for rows of `row_bytes` bytes.
pub fn scatter_rows(
    dst: &mut CudaStorage,
    dst_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    slots: &CudaSlice<u32>,
    rows: usize,
    row_bytes: usize,
) -> candle_core::Result<()> {
    if !row_bytes.is_multiple_of(4) {
        candle_core::bail!("kv-scatter-rows: rows of {row_bytes} bytes are not whole 32-bit words");
    }
    if rows == 0 {
        return Ok(());
    }
    let dev = dst.device.clone();
    let f = function(&dev, Module::Kv, "kv_scatter_rows")?;
    let row_words = (row_bytes / 4) as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: ((row_words as u32).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    let (Some((d0, d1)), Some((s0, s1))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
    else {
        candle_core::bail!("kv-scatter-rows needs contiguous tensors")
    };
    macro_rules! go {
        ($d:expr, $s:expr) => {{
            let mut d = $d.slice_mut(d0..d1);
            let s = $s.slice(s0..s1);
            let mut b = f.builder();
            b.arg(&mut d);
            b.arg(&s);
            b.arg(slots);
            b.arg(&row_words);
            // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&mut dst.slice, &src.slice) {
        (CudaStorageSlice::BF16(d), CudaStorageSlice::BF16(s)) => go!(d, s),
        (CudaStorageSlice::F16(d), CudaStorageSlice::F16(s)) => go!(d, s),
        (CudaStorageSlice::F32(d), CudaStorageSlice::F32(s)) => go!(d, s),
        _ => candle_core::bail!("kv-scatter-rows: cache and rows differ in dtype"),
    }
    Ok(())
}

fn block_launch(
    dev: &candle_core::CudaDevice,
    name: &str,
    count: usize,
    block_bytes: usize,
) -> candle_core::Result<(crate::cuda::Kernel, LaunchConfig, i32)> {
    if !block_bytes.is_multiple_of(16) {
        candle_core::bail!("KV blocks of {block_bytes} bytes are not whole 16-byte words");
    }
    let block_vecs = (block_bytes / 16) as i32;
    let cfg = LaunchConfig {
        grid_dim: (count as u32, 1, 1),
        block_dim: ((block_vecs as u32).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((function(dev, Module::Kv, name)?, cfg, block_vecs))
}

/// A new buffer holding `cache[blocks[i]]` back to back, blocks of `block_bytes`.
pub fn gather_blocks(
    cache: &CudaStorage,
    cache_l: &Layout,
    blocks: &CudaSlice<u32>,
    count: usize,
    block_elems: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = cache.device.clone();
    let Some((c0, c1)) = cache_l.contiguous_offsets() else {
        candle_core::bail!("KV block copies need a contiguous cache")
    };
    let block_bytes = block_elems * crate::cuda::dtype_of(cache).size_in_bytes();
    let (f, cfg, block_vecs) = block_launch(&dev, "kv_gather_blocks", count, block_bytes)?;
    macro_rules! go {
        ($c:expr, $t:ty) => {{
            // SAFETY: the gather kernel launched below writes every element of `out` before anything reads it.
            let out = unsafe { dev.alloc::<$t>(count * block_elems)? };
            if count > 0 {
                let c = $c.slice(c0..c1);
                let mut b = f.builder();
                b.arg(&out);
                b.arg(&c);
                b.arg(blocks);
                b.arg(&block_vecs);
                // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match &cache.slice {
        CudaStorageSlice::BF16(c) => go!(c, half::bf16),
        CudaStorageSlice::F16(c) => go!(c, half::f16),
        CudaStorageSlice::F32(c) => go!(c, f32),
        _ => candle_core::bail!("KV block copy: unsupported cache dtype"),
    })
}

/// `cache[blocks[i]] = buf[i]`: the inverse of [`gather_blocks`].
pub fn scatter_blocks(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    buf: &CudaStorage,
    buf_l: &Layout,
    blocks: &CudaSlice<u32>,
    count: usize,
    block_elems: usize,
) -> candle_core::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let dev = cache.device.clone();
    let (Some((c0, c1)), Some((b0, b1))) =
        (cache_l.contiguous_offsets(), buf_l.contiguous_offsets())
    else {
        candle_core::bail!("KV block copies need contiguous tensors")
    };
    let block_bytes = block_elems * crate::cuda::dtype_of(cache).size_in_bytes();
    let (f, cfg, block_vecs) = block_launch(&dev, "kv_scatter_blocks", count, block_bytes)?;
    macro_rules! go {
        ($c:expr, $b:expr) => {{
            let mut c = $c.slice_mut(c0..c1);
            let bf = $b.slice(b0..b1);
            let mut b = f.builder();
            b.arg(&mut c);
            b.arg(&bf);
            b.arg(blocks);
            b.arg(&block_vecs);
            // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&mut cache.slice, &buf.slice) {
        (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(b)) => go!(c, b),
        (CudaStorageSlice::F16(c), CudaStorageSlice::F16(b)) => go!(c, b),
        (CudaStorageSlice::F32(c), CudaStorageSlice::F32(b)) => go!(c, b),
        _ => candle_core::bail!("KV block copy: cache and buffer differ in dtype"),
    }
    Ok(())
}

/// [`scatter_blocks`] with raw device addresses on a stream of the caller's (the NCCL
/// receiver's), for a buffer that is not a candle tensor.
pub fn scatter_blocks_raw(
    dev: &candle_core::CudaDevice,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    cache: u64,
    buf: u64,
    blocks: &CudaSlice<u32>,
    count: usize,
    block_bytes: usize,
) -> candle_core::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let (kernel, cfg, block_vecs) = block_launch(dev, "kv_scatter_blocks", count, block_bytes)?;
    let func = kernel.func;
    let mut b = stream.launch_builder(&func);
    b.arg(&cache);
    b.arg(&buf);
    b.arg(blocks);
    b.arg(&block_vecs);
    // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
