//! Launching the paged-attention kernels for one packed batch.
//!
//! Sequences with many new tokens (prompt chunks) go to the tiled tensor-core kernel when the
//! query and cache are bf16 and the head size is 64 or 128; every other token goes to a
//! per-token kernel, in its grouped form (one CTA per KV head and token) when the cache is 16-bit
//! and the head and group sizes are common ones, else one CTA per query head. With the default
//! kernel set ([`crate::cuda::KernelSet`]) both the prefill and the grouped work run on mma.sync
//! kernels instead, where the types and sizes allow. The batch's metadata is uploaded once per forward step and reused by every
//! layer.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use super::AttentionMeta;
use crate::cuda::{dtype_of, dtype_tag, function, upload, view, Module};

/// Sequences with at least this many new tokens use the tiled prefill kernel.
pub const PREFILL_MIN_TOKENS: usize = 16;
/// Query tokens per prefill tile: PF_BQ of the WMMA kernel, and FA_BQ of the mma kernel.
const PREFILL_TILE: usize = 32;
const MMA_PREFILL_TILE: usize = 64;
/// Keys per partition of the per-token kernel (long contexts run as several CTAs).
const PARTITION: usize = 512;
const TOKEN_THREADS: u32 = 128;
const PREFILL_THREADS: u32 = 64;
const MMA_PREFILL_THREADS: u32 = 128;

/// A batch's metadata on the device.
pub struct DeviceMeta {
    block_tables: CudaSlice<i32>,
    max_blocks: i32,
    token: Option<TokenWork>,
    prefill: Option<PrefillWork>,
    /// Built for the mma kernels (their prefill tiles are larger).
    mma: bool,
}

struct TokenWork {
    work: CudaSlice<i32>,
    count: usize,
    token_seq: CudaSlice<i32>,
    token_keys: CudaSlice<i32>,
    num_parts: usize,
}

struct PrefillWork {
    tile_seq: CudaSlice<i32>,
    tile_row: CudaSlice<i32>,
    count: usize,
    seq_q_start: CudaSlice<i32>,
    seq_q_len: CudaSlice<i32>,
    seq_ctx: CudaSlice<i32>,
}

impl std::fmt::Debug for DeviceMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMeta")
            .field("max_blocks", &self.max_blocks)
            .field("token_work", &self.token.as_ref().map(|t| t.count))
            .field("prefill_tiles", &self.prefill.as_ref().map(|p| p.count))
            .finish()
    }
}

/// Whether the tiled kernel can take this batch's prompt chunks.
fn prefill_kernel_applies(q: DType, cache: DType, head_dim: usize) -> bool {
    q == DType::BF16 && cache == DType::BF16 && matches!(head_dim, 64 | 128)
}

/// Whether the per-token work can go to the tensor-core kernel: a bf16 query and cache, and a
/// head size and group size it was built for.
fn mma_kernel_applies(q: DType, cache: DType, head_dim: usize, group: usize) -> bool {
    q == DType::BF16 && cache == DType::BF16 && matches!(head_dim, 64 | 128) && group <= 16
}

/// Dynamic shared memory of the tensor-core per-token kernel: its warps' rings of `stages`
/// tiles of 16 keys (K and V rows padded by 8 elements), or the warps' partial outputs when they
/// merge, whichever is larger (kernels/paged_attention.cu).
fn mma_kernel_smem(head_dim: usize, group: usize, stages: usize) -> usize {
    const WARPS: usize = 4;
    let ring = WARPS * stages * 2 * 16 * (head_dim + 8) * 2;
    let merge = (WARPS * group * head_dim + 2 * WARPS * group) * 4;
    ring.max(merge)
}

/// Whether the per-token work can go to a grouped kernel (one CTA per KV head serving its whole
/// group of query heads): a 16-bit cache, and a head size and group size it was built for.
fn grouped_kernel_applies(cache: DType, head_dim: usize, group: usize) -> bool {
    matches!(cache, DType::BF16 | DType::F16)
        && matches!(head_dim, 64 | 128 | 256)
        && matches!(group, 1 | 2 | 4 | 8)
}

impl DeviceMeta {
    fn build(dev: &CudaDevice, m: &AttentionMeta, tiled: bool) -> candle_core::Result<Self> {
        let max_blocks = m
            .seqs
            .iter()
            .map(|s| s.context_len.div_ceil(m.block_size))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0i32; m.seqs.len() * max_blocks];
        for (i, s) in m.seqs.iter().enumerate() {
            let used = s.context_len.div_ceil(m.block_size);
            for (dst, &b) in tables[i * max_blocks..]
                .iter_mut()
                .zip(&s.block_table[..used])
            {
                *dst = b as i32;
            }
        }
        let mut token_seq = vec![0i32; m.num_tokens];
        let mut token_keys = vec![0i32; m.num_tokens];
        let mut work = Vec::new();
        let (mut tile_seq, mut tile_row) = (Vec::new(), Vec::new());
        let mma = crate::cuda::kernel_set() == crate::cuda::KernelSet::Mma;
        let tile = if mma { MMA_PREFILL_TILE } else { PREFILL_TILE };
        for (i, s) in m.seqs.iter().enumerate() {
            let cached = s.context_len - s.q_len;
            for t in 0..s.q_len {
                token_seq[s.q_start + t] = i as i32;
                token_keys[s.q_start + t] = (cached + t + 1) as i32;
            }
            if tiled && s.q_len >= PREFILL_MIN_TOKENS {
                for row in (0..s.q_len).step_by(tile) {
                    tile_seq.push(i as i32);
                    tile_row.push(row as i32);
                }
            } else {
                work.extend((s.q_start..s.q_start + s.q_len).map(|t| t as i32));
            }
        }
        let token = if work.is_empty() {
            None
        } else {
            let num_parts = work
                .iter()
                .map(|&t| (token_keys[t as usize] as usize).div_ceil(PARTITION))
                .max()
                .unwrap_or(1);
            Some(TokenWork {
                count: work.len(),
                work: upload(dev, &work)?,
                token_seq: upload(dev, &token_seq)?,
                token_keys: upload(dev, &token_keys)?,
                num_parts,
            })
        };
        let prefill = if tile_seq.is_empty() {
            None
        } else {
            let col = |f: &dyn Fn(&crate::model::SeqAttention) -> usize| -> Vec<i32> {
                m.seqs.iter().map(|s| f(s) as i32).collect()
            };
            Some(PrefillWork {
                count: tile_seq.len(),
                tile_seq: upload(dev, &tile_seq)?,
                tile_row: upload(dev, &tile_row)?,
                seq_q_start: upload(dev, &col(&|s| s.q_start))?,
                seq_q_len: upload(dev, &col(&|s| s.q_len))?,
                seq_ctx: upload(dev, &col(&|s| s.context_len))?,
            })
        };
        Ok(Self {
            block_tables: upload(dev, &tables)?,
            max_blocks: max_blocks as i32,
            token,
            prefill,
            mma,
        })
    }
}

/// `q`: `[tokens, heads, head_dim]`; caches `[blocks, block_size, kv_heads, head_dim]`.
/// Returns `[tokens, heads, head_dim]` in the query's dtype.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    m: &AttentionMeta,
    q: &CudaStorage,
    q_l: &Layout,
    k: &CudaStorage,
    k_l: &Layout,
    v: &CudaStorage,
    v_l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (qt, ct) = (dtype_of(q), dtype_of(k));
    if dtype_of(v) != ct {
        candle_core::bail!("paged-attention: K and V caches differ in dtype");
    }
    if m.head_dim > 256 {
        candle_core::bail!("paged-attention on CUDA supports head_dim up to 256");
    }
    let capacity = k_l.shape().elem_count() / (m.num_kv_heads * m.head_dim * m.block_size);
    if let Some(b) = m
        .seqs
        .iter()
        .flat_map(|s| &s.block_table[..s.context_len.div_ceil(m.block_size)])
        .find(|&&b| b as usize >= capacity)
    {
        candle_core::bail!("paged-attention: block {b} outside the cache of {capacity}");
    }
    let dev = q.device.clone();
    let tiled = prefill_kernel_applies(qt, ct, m.head_dim);
    let meta = match m.device.get() {
        Some(d) => d.clone(),
        None => {
            let built = Arc::new(DeviceMeta::build(&dev, m, tiled)?);
            let _ = m.device.set(built.clone());
            built
        }
    };
    let out = match (qt, ct) {
        (DType::BF16, DType::BF16) => run::<bf16, bf16>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (DType::BF16, DType::F16) => run::<bf16, f16>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (DType::BF16, DType::F32) => run::<bf16, f32>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (DType::F32, DType::BF16) => run::<f32, bf16>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (DType::F32, DType::F16) => run::<f32, f16>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (DType::F32, DType::F32) => run::<f32, f32>(&dev, m, &meta, q, q_l, k, k_l, v, v_l)?,
        (a, c) => {
            candle_core::bail!("paged-attention: no kernel for a {a:?} query on a {c:?} cache")
        }
    };
    Ok((out, Shape::from((m.num_tokens, m.num_heads, m.head_dim))))
}

#[allow(clippy::too_many_arguments)]
fn run<A, C>(
    dev: &CudaDevice,
    m: &AttentionMeta,
    meta: &DeviceMeta,
    q: &CudaStorage,
    q_l: &Layout,
    k: &CudaStorage,
    k_l: &Layout,
    v: &CudaStorage,
    v_l: &Layout,
) -> candle_core::Result<CudaStorage>
where
    A: CudaDType + DeviceRepr + candle_core::WithDType,
    C: CudaDType + DeviceRepr + candle_core::WithDType,
{
    let q = view::<A>(q, q_l)?;
    let kc = view::<C>(k, k_l)?;
    let vc = view::<C>(v, v_l)?;
    let elems = m.num_tokens * m.num_heads * m.head_dim;
    // SAFETY: every output row is written by exactly one of the kernels below before it is read.
    let out = unsafe { dev.alloc::<A>(elems)? };
    let (h, kvh, d, bs) = (
        m.num_heads as i32,
        m.num_kv_heads as i32,
        m.head_dim as i32,
        m.block_size as i32,
    );
    let scale = m.scale;
    if let Some(t) = &meta.token {
        let (a, c) = (dtype_tag(A::DTYPE)?, dtype_tag(C::DTYPE)?);
        let group = m.num_heads / m.num_kv_heads;
        let mma = meta.mma && mma_kernel_applies(A::DTYPE, C::DTYPE, m.head_dim, group);
        let grouped = mma || grouped_kernel_applies(C::DTYPE, m.head_dim, group);
        let mut shared_mem_bytes = 0;
        let (f, heads_per_cta) = if mma {
            let stages = crate::cuda::decode_stages();
            let name = format!("paged_attention_mma_bf16_d{}_s{stages}", m.head_dim);
            let f = function(dev, Module::Attention, &name)?;
            shared_mem_bytes = mma_kernel_smem(m.head_dim, group, stages) as u32;
            f.func
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_mem_bytes as i32,
                )
                .w()?;
            (f, group)
        } else if grouped {
            let name = format!("paged_attention_group_{a}_{c}_d{}_g{group}", m.head_dim);
            (function(dev, Module::Attention, &name)?, group)
        } else {
            let name = format!("paged_attention_{a}_{c}");
            (function(dev, Module::Attention, &name)?, 1)
        };
        let scratch = if t.num_parts > 1 {
            t.count * m.num_heads * t.num_parts
        } else {
            1
        };
        // SAFETY: the partition buffers are written by the per-token kernel before the reduce kernel reads them.
        let part_max = unsafe { dev.alloc::<f32>(scratch)? };
        // SAFETY: as for `part_max`.
        let part_sum = unsafe { dev.alloc::<f32>(scratch)? };
        // SAFETY: as for `part_max`.
        let part_out = unsafe { dev.alloc::<f32>(scratch * m.head_dim)? };
        let partition = PARTITION as i32;
        let cfg = LaunchConfig {
            grid_dim: (
                (m.num_heads / heads_per_cta) as u32,
                t.count as u32,
                t.num_parts as u32,
            ),
            block_dim: (TOKEN_THREADS, 1, 1),
            shared_mem_bytes,
        };
        let mut b = f.builder();
        b.arg(&out);
        b.arg(&q);
        b.arg(&kc);
        b.arg(&vc);
        b.arg(&t.work);
        b.arg(&t.token_seq);
        b.arg(&t.token_keys);
        b.arg(&meta.block_tables);
        b.arg(&meta.max_blocks);
        b.arg(&h);
        b.arg(&kvh);
        if !grouped {
            // The grouped kernels have the head size built in.
            b.arg(&d);
        }
        b.arg(&bs);
        b.arg(&scale);
        b.arg(&partition);
        b.arg(&part_max);
        b.arg(&part_sum);
        b.arg(&part_out);
        // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
        unsafe { b.launch(cfg) }.w()?;
        if t.num_parts > 1 {
            let f = function(
                dev,
                Module::Attention,
                &format!("paged_attention_reduce_{a}"),
            )?;
            let num_parts = t.num_parts as i32;
            let cfg = LaunchConfig {
                grid_dim: (m.num_heads as u32, t.count as u32, 1),
                block_dim: (TOKEN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = f.builder();
            b.arg(&out);
            b.arg(&t.work);
            b.arg(&t.token_keys);
            b.arg(&h);
            b.arg(&d);
            b.arg(&partition);
            b.arg(&num_parts);
            b.arg(&part_max);
            b.arg(&part_sum);
            b.arg(&part_out);
            // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
            unsafe { b.launch(cfg) }.w()?;
        }
    }
    if let Some(p) = &meta.prefill {
        let f = function(
            dev,
            Module::Attention,
            &if meta.mma {
                format!("prefill_attention_mma_bf16_d{}", m.head_dim)
            } else {
                format!("prefill_attention_bf16_d{}", m.head_dim)
            },
        )?;
        let cfg = LaunchConfig {
            grid_dim: (p.count as u32, m.num_heads as u32, 1),
            block_dim: (
                if meta.mma {
                    MMA_PREFILL_THREADS
                } else {
                    PREFILL_THREADS
                },
                1,
                1,
            ),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&out);
        b.arg(&q);
        b.arg(&kc);
        b.arg(&vc);
        b.arg(&p.tile_seq);
        b.arg(&p.tile_row);
        b.arg(&p.seq_q_start);
        b.arg(&p.seq_q_len);
        b.arg(&p.seq_ctx);
        b.arg(&meta.block_tables);
        b.arg(&meta.max_blocks);
        b.arg(&h);
        b.arg(&kvh);
        b.arg(&bs);
        b.arg(&scale);
        // SAFETY: the arguments pushed above match the kernel's parameters in kernels/*.cu in order and type, and every buffer covers the elements the launch configuration makes the kernel touch (sizes checked above).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
