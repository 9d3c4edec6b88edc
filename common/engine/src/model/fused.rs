//! A llama layer's small row-wise steps, fused on a GPU (`kernels/fused.cu`): the residual add
//! with the RMSNorm that follows it, and RoPE with the KV cache write.
//!
//! Unfused, a layer's decode step spends more launches on these than on its matmuls: RoPE of q
//! and of k each copy their strided slice of the stacked projection before rotating it, v is
//! copied likewise, K and V are scattered into the cache one after the other, and each residual
//! add is a pass of its own before the norm reads the sum again. Fused, a layer runs three of
//! these kernels instead of eleven. On the CPU, with the wmma kernel set, and where a kernel
//! does not apply (another cache dtype, an unstacked projection) the separate candle ops run as
//! before.

use candle_core::Tensor;

use crate::kv::{KvCache, SlotMap};
use crate::Result;

/// `x + y` and its RMSNorm with weight `w`: `(sum, normed)`, both `[rows, cols]`.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(both) = cuda::add_rms_norm(x, y, w, eps)? {
        return Ok(both);
    }
    let sum = (x + y)?;
    let normed = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}

/// The shapes of one layer's attention heads.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// RoPE pairs `(2i, 2i + 1)` when set, else `(i, i + head_dim / 2)`.
    pub interleaved: bool,
}

/// From the stacked projection `qkv` (`[tokens, (heads + 2 kv_heads) * head_dim]`): rotates the
/// query and key heads with `cos` and `sin` (`[tokens, 1, head_dim / 2]`), writes K and V into
/// `layer` of `cache` at `slots`, and returns the rotated queries `[tokens, heads, head_dim]`.
/// `None` when no fused kernel applies (the caller then runs RoPE and the cache write itself).
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    cache: &KvCache,
    layer: usize,
    slots: &SlotMap,
    heads: Heads,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let (kc, vc) = cache.layer(layer)?;
        cuda::rope_write_kv(qkv, cos, sin, kc, vc, slots, heads)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, cos, sin, cache, layer, slots, heads);
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
    use half::{bf16, f16};

    use super::Heads;
    use crate::cuda::{dtype_tag, function, view, Module};
    use crate::kv::SlotMap;
    use crate::Result;

    const THREADS: u32 = 256;

    /// Both kernels' launch: one block of `THREADS` per row (token).
    fn block_per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Runs `$f::<T>` for the tensor's element type (bf16, f16, f32).
    macro_rules! by_dtype {
        ($dtype:expr, $f:ident($($arg:expr),*)) => {
            match $dtype {
                DType::BF16 => $f::<bf16>($($arg),*),
                DType::F16 => $f::<f16>($($arg),*),
                DType::F32 => $f::<f32>($($arg),*),
                _ => Ok(None),
            }
        };
    }

    /// The fused kernels belong to the default (mma) kernel set, unless turned off
    /// (`PD_CUDA_FUSED=0`); the wmma set runs the separate ops it always ran.
    fn fused_kernels() -> bool {
        crate::cuda::kernel_set() == crate::cuda::KernelSet::Mma && crate::cuda::fused()
    }

    fn cuda_device(t: &Tensor) -> Option<candle_core::CudaDevice> {
        match t.device() {
            Device::Cuda(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// The tensor's storage, when it is a CUDA tensor, with its layout: `$body` runs with
    /// `$s: &CudaStorage` and `$l: &Layout` bound while the storage is locked for reading.
    macro_rules! with_storage {
        ($t:expr, |$s:ident, $l:ident| $body:expr) => {{
            let (guard, $l) = $t.storage_and_layout();
            let Storage::Cuda($s) = &*guard else {
                return Err(crate::Error::Internal("expected a CUDA tensor".into()));
            };
            $body
        }};
    }

    pub fn add_rms_norm(
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Ok((rows, cols)) = x.dims2() else {
            return Ok(None);
        };
        let fits = cuda_device(x).is_some()
            && fused_kernels()
            && rows > 0
            && y.dims() == x.dims()
            && w.dims() == [cols]
            && y.dtype() == x.dtype()
            && w.dtype() == x.dtype()
            && [x, y, w].iter().all(|t| t.is_contiguous());
        if !fits {
            return Ok(None);
        }
        by_dtype!(x.dtype(), add_rms_norm_t(x, y, w, eps, rows, cols))
    }

    fn add_rms_norm_t<T>(
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
        rows: usize,
        cols: usize,
    ) -> Result<Option<(Tensor, Tensor)>>
    where
        T: CudaDType + DeviceRepr + candle_core::WithDType,
    {
        let dev = cuda_device(x).expect("checked by the caller");
        let f = function(
            &dev,
            Module::Fused,
            &format!("add_rms_norm_{}", dtype_tag(T::DTYPE)?),
        )?;
        // SAFETY: the kernel writes both halves of every row (rows * cols each).
        let out = unsafe { dev.alloc::<T>(2 * rows * cols) }?;
        with_storage!(x, |xs, xl| with_storage!(y, |ys, yl| with_storage!(
            w,
            |ws, wl| {
                let (xv, yv, wv) = (view::<T>(xs, xl)?, view::<T>(ys, yl)?, view::<T>(ws, wl)?);
                let cols_i = cols as i32;
                let cfg = block_per_row(rows);
                let mut b = f.builder();
                b.arg(&out);
                b.arg(&xv);
                b.arg(&yv);
                b.arg(&wv);
                b.arg(&cols_i);
                b.arg(&rows);
                b.arg(&eps);
                // SAFETY: the arguments match add_rms_norm_<T>(T* out, const T* x, const T* y,
                // const T* w, int cols, size_t rows, float eps); x and y hold rows * cols contiguous
                // elements, w cols, out 2 * rows * cols: all the grid of one block per row touches.
                unsafe { b.launch(cfg) }.w()?;
            }
        )));
        let both = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev)),
            (2, rows, cols),
            BackpropOp::none(),
            false,
        );
        Ok(Some((both.get(1)?, both.get(0)?)))
    }

    pub fn rope_write_kv(
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        slots: &SlotMap,
        heads: Heads,
    ) -> Result<Option<Tensor>> {
        let Heads {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            ..
        } = heads;
        let Ok((n, width)) = qkv.dims2() else {
            return Ok(None);
        };
        let dt = qkv.dtype();
        let fits = cuda_device(qkv).is_some()
            && fused_kernels()
            && cuda_device(kc).is_some()
            && n > 0
            && d % 2 == 0
            && width == (h + 2 * kvh) * d
            && slots.len() == n
            && cos.elem_count() == n * d / 2
            && sin.elem_count() == n * d / 2
            && [cos.dtype(), sin.dtype(), kc.dtype(), vc.dtype()]
                .iter()
                .all(|&t| t == dt)
            && kc.dims().last() == Some(&d)
            && kc.dims() == vc.dims()
            && kc.elem_count().is_multiple_of(kvh * d)
            && [qkv, cos, sin, kc, vc].iter().all(|t| t.is_contiguous());
        if !fits {
            return Ok(None);
        }
        by_dtype!(dt, rope_write_kv_t(qkv, cos, sin, kc, vc, slots, heads, n))
    }

    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv_t<T>(
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        slots: &SlotMap,
        heads: Heads,
        n: usize,
    ) -> Result<Option<Tensor>>
    where
        T: CudaDType + DeviceRepr + candle_core::WithDType,
    {
        let dev = cuda_device(qkv).expect("checked by the caller");
        let (h, kvh, d) = (heads.num_heads, heads.num_kv_heads, heads.head_dim);
        let f = function(
            &dev,
            Module::Fused,
            &format!("rope_write_kv_{}", dtype_tag(T::DTYPE)?),
        )?;
        let slots = slots.device_slots(&dev)?;
        // SAFETY: the kernel writes every element of every token's query heads.
        let q = unsafe { dev.alloc::<T>(n * h * d) }?;
        with_storage!(qkv, |qs, ql| with_storage!(cos, |cs, cl| with_storage!(
            sin,
            |ss, sl| {
                with_storage!(kc, |ks, kl| with_storage!(vc, |vs, vl| {
                    let qkv_v = view::<T>(qs, ql)?;
                    let (cos_v, sin_v) = (view::<T>(cs, cl)?, view::<T>(ss, sl)?);
                    let (k_v, v_v) = (view::<T>(ks, kl)?, view::<T>(vs, vl)?);
                    let (hi, kvhi, di) = (h as i32, kvh as i32, d as i32);
                    let interleaved = heads.interleaved as i32;
                    let cfg = block_per_row(n);
                    let mut b = f.builder();
                    b.arg(&q);
                    b.arg(&k_v);
                    b.arg(&v_v);
                    b.arg(&qkv_v);
                    b.arg(&cos_v);
                    b.arg(&sin_v);
                    b.arg(slots);
                    b.arg(&hi);
                    b.arg(&kvhi);
                    b.arg(&di);
                    b.arg(&interleaved);
                    // SAFETY: the arguments match rope_write_kv_<T>(T* q_out, T* k_cache,
                    // T* v_cache, const T* qkv, const T* cos, const T* sin, const uint32_t* slots,
                    // int H, int KVH, int D, int interleaved). qkv holds n rows of (H + 2 KVH) * D,
                    // cos and sin n * D / 2, q_out n * H * D; the slots were checked against the
                    // cache's capacity when the slot map was made, and each cache row is KVH * D.
                    // The caches are device memory written in stream order; the read locks keep
                    // their allocations alive for the launch.
                    unsafe { b.launch(cfg) }.w()?;
                }))
            }
        )));
        Ok(Some(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(q, dev)),
            (n, h, d),
            BackpropOp::none(),
            false,
        )))
    }
}
